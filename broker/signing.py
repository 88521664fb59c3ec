"""Ed25519 vendor keys and the signatures of FEATURE/INCREMENT lines.

Theory of operation. The vendor holds an Ed25519 private key (``vendor.key``, PKCS8
PEM, unencrypted, mode 0600); every node holds the matching public key
(``vendor.pub``, SubjectPublicKeyInfo PEM). Each FEATURE/INCREMENT line carries
``SIGN=<128 hex digits>``: the 64-byte Ed25519 signature of the line's *canonical
form* (see ``canonical_form``), which covers every field of the line except the
signature itself and none of its layout (spacing, continuation lines, attribute
order, keyword case, quotes). SERVER and VENDOR lines are not signed: the customer
edits SERVER lines for their own hosts, and so a license is not bound to hosts
(``docs/security.md``, "SERVER lines are not signed, and a license is not bound to
hosts").

This module is the lower layer: it knows keys, bytes and signatures. The root of the
license error tree, ``LicenseError``, is ``zbroker.clients.licfile``'s (the client library reads
SERVER lines too, and must not import the node); both this module and ``zbroker.broker.license``
raise its subclasses.
Signing a whole file needs its parser: that is ``zbroker.broker.license.sign_license_text``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from zbroker.broker.wire import MAX_COUNT
from zbroker.clients.licfile import LicenseError

__all__ = [
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
    "SIGNATURE_HEX_LENGTH",
    "LicenseError",
    "LicenseKeyError",
    "canonical_form",
    "load_private_key",
    "load_public_key",
    "sign_canonical",
    "verify_signature",
    "write_keypair",
]

PRIVATE_KEY_NAME = "vendor.key"
PUBLIC_KEY_NAME = "vendor.pub"
SIGNATURE_HEX_LENGTH = 128  # an Ed25519 signature is 64 bytes
SIGNED_KEYWORDS = ("FEATURE", "INCREMENT")


class LicenseKeyError(LicenseError):
    """A vendor key file that is missing, unreadable, not Ed25519, or would be overwritten."""

    def __init__(self, path: str | Path, why: str) -> None:
        self.path = str(path)
        self.why = why
        super().__init__(f"{self.path}: {why}")


# --- key files -------------------------------------------------------------------------


def write_keypair(directory: Path, name: str = "vendor") -> tuple[Path, Path]:
    """Create a fresh key pair as ``directory/vendor.key`` and ``directory/vendor.pub``
    (``name`` other than vendor: the triad's borrow key, ``borrow.key``/``borrow.pub``).

    Creates ``directory`` if needed. Refuses (``LicenseKeyError``) when either file
    already exists: overwriting a vendor key would orphan every license signed with it.
    The private key is created with mode 0600 from the start, never readable by others.
    """
    directory = Path(directory)
    private_path = directory / f"{name}.key"
    public_path = directory / f"{name}.pub"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LicenseKeyError(directory, f"cannot create directory: {exc.strerror}") from exc
    for existing in (private_path, public_path):
        if existing.exists():
            raise LicenseKeyError(existing, "already exists; refusing to overwrite a vendor key")

    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, public_pem, 0o644)
    return private_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL closes the race between the exists() check and the write.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise LicenseKeyError(path, "already exists; refusing to overwrite a vendor key") from exc
    except OSError as exc:
        raise LicenseKeyError(path, f"cannot create: {exc.strerror}") from exc
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed the mode given to open()
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_key_file(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise LicenseKeyError(path, "no such key file") from exc
    except OSError as exc:
        raise LicenseKeyError(path, f"cannot read key file: {exc.strerror}") from exc


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The vendor's private key from an unencrypted PKCS8 PEM file."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # cryptography's way of saying "encrypted, needs a password"
        raise LicenseKeyError(
            path, "private key is encrypted; expected an unencrypted key"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise LicenseKeyError(path, "not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise LicenseKeyError(path, f"not an Ed25519 private key ({type(key).__name__})")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The vendor's public key from a SubjectPublicKeyInfo PEM file."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise LicenseKeyError(path, "not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise LicenseKeyError(path, f"not an Ed25519 public key ({type(key).__name__})")
    return key


# --- canonical form and signatures -----------------------------------------------------


def canonical_form(
    keyword: str,
    name: str,
    vendor: str,
    version: str,
    expiry: str,
    count: int,
    attrs: Mapping[str, str],
    flags: Sequence[str],
) -> bytes:
    """The bytes of a FEATURE/INCREMENT line that its signature covers.

    The canonical form is the UTF-8 encoding of these fields joined by single spaces
    (U+0020), with no leading or trailing space and no newline:

    1. the keyword in upper case: ``FEATURE`` or ``INCREMENT``;
    2. the feature name, as written;
    3. the vendor name, as written;
    4. the version, as written (``2.0`` stays ``2.0``; it is not shortened to ``2``);
    5. the expiry, as written but in lower case: ``permanent`` or ``d-mmm-yyyy``;
    6. the count in decimal, without leading zeros (1 to ``zbroker.broker.wire.MAX_COUNT``);
    7. every attribute except ``SIGN`` as ``KEY=value``, the key in upper case, the
       value as read, sorted by key (code point order); a value with a space is written
       in double quotes (``VENDOR_STRING="site license"``), any other without, however
       the file quoted it. As read: quotes are layout, so a run of blanks inside them
       (a continuation line too) is one space and leading or trailing blanks are none
       (``zbroker.clients.licfile``);
    8. every flag as written, in the order of the line.

    So ``increment solver acme 1.5 PERMANENT 2 user_based users=ann,bob HOSTS=h1 SIGN=..``
    (spread over any number of continuation lines) has the canonical form
    ``INCREMENT solver acme 1.5 permanent 2 HOSTS=h1 USERS=ann,bob user_based``.

    No field may be empty or contain whitespace, but an attribute's value, which may hold
    single spaces between other characters and no ``"``; keys and flags contain no
    ``=``: then every field is one space-separated word or one quoted value, attributes
    and flags are told apart by the ``=``, and different lines always have different
    canonical forms. Raises ValueError otherwise.
    """
    keyword = keyword.upper()
    if keyword not in SIGNED_KEYWORDS:
        raise ValueError(f"only FEATURE and INCREMENT lines are signed, not {keyword!r}")
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count must be from 1 to {MAX_COUNT}, not {count}")
    attr_words = []
    seen: set[str] = set()
    for key, value in sorted((k.upper(), v) for k, v in attrs.items()):
        if key in seen or "=" in key or not key or any(ch.isspace() for ch in key) or not value:
            raise ValueError(f"attribute {key!r} is repeated, malformed or has no value")
        seen.add(key)
        if '"' in value or " ".join(value.split()) != value:
            raise ValueError(f"value {value!r} of {key} has a quote or blanks not read as such")
        if key != "SIGN":
            attr_words.append(f'{key}="{value}"' if " " in value else f"{key}={value}")
    if any("=" in flag for flag in flags):
        raise ValueError(f"a flag contains '=': {list(flags)!r}")
    words = [keyword, name, vendor, version, expiry.lower(), str(count), *attr_words, *flags]
    for word in (keyword, name, vendor, version, expiry, str(count), *flags):
        if not word or any(ch.isspace() for ch in word):
            raise ValueError(f"field {word!r} of a signed line is empty or contains whitespace")
    return " ".join(words).encode("utf-8")


def sign_canonical(key: Ed25519PrivateKey, data: bytes) -> str:
    """The signature of ``data`` as 128 lower-case hex digits."""
    return key.sign(data).hex()


def verify_signature(key: Ed25519PublicKey, data: bytes, signature_hex: str) -> bool:
    """True when ``signature_hex`` (hex, either case) is ``key``'s signature of ``data``."""
    if len(signature_hex) != SIGNATURE_HEX_LENGTH:
        return False
    try:
        signature = bytes.fromhex(signature_hex)
    except ValueError:
        return False
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
