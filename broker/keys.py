"""The node's key files: writing CURVE key pairs, and reading allow-lists.

``zbroker init`` writes each node's and the administrator's key pair here
(``write_keypair``); reading one, and everything a client needs of keys, is
``zbroker.clients.curve``'s. An allow-list (``admin_keys``, ``client_allow`` in the config) is a
text file with a Z85 public key as the first word of each line (anything after it is a
label; a line whose first word starts with ``#`` and is not a key is a comment: Z85
itself uses ``#``), or a directory of ``*.key`` certificates. ``KeyList`` reads one
again when it changes, so the ZAP policy (``zbroker.broker.zap_policy``) sees keys added live.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from zbroker.clients.curve import (
    SecurityError,
    check_key,
    generate_keypair,
    is_key,
    load_public_key,
)

log = logging.getLogger("zbroker.security")


def write_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write a fresh key pair as ``directory/NAME.key`` and ``directory/NAME.key_secret``.

    The secret file is created with mode 0600 from the start; an existing file is
    never overwritten (SecurityError), since that would orphan every copy of the key.
    """
    directory.mkdir(parents=True, exist_ok=True)
    pair = generate_keypair()
    public_path, secret_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    banner = f"#   zbroker CURVE certificate of {name} (ZeroMQ certificate format)\n"
    body = f'metadata\n    name = "{name}"\ncurve\n    public-key = "{pair.public}"\n'
    _write_new(
        secret_path,
        banner
        + "#   SECRET: keep it to this host, mode 0600.\n"
        + body
        + f'    secret-key = "{pair.secret}"\n',
        0o600,
    )
    _write_new(public_path, banner + body, 0o644)
    return public_path, secret_path


def _write_new(path: Path, text: str, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise SecurityError(f"{path}: already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise SecurityError(f"{path}: cannot create: {exc.strerror}") from None
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def load_key_list(path: Path) -> frozenset[str]:
    """The public keys of an allow-list: a text file of keys or a directory of certs."""
    if path.is_dir():
        return frozenset(load_public_key(cert) for cert in sorted(path.glob("*.key")))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SecurityError(f"{path}: cannot read allow-list: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SecurityError(f"{path}: allow-list is not UTF-8 text") from None
    keys = set()
    for number, row in enumerate(text.splitlines(), start=1):
        words = row.split()
        if not words or (words[0].startswith("#") and not is_key(words[0])):
            continue  # blank, or a comment (Z85 has '#', so a key may start with one)
        keys.add(check_key(words[0], f"{path}:{number}"))
    return frozenset(keys)


class KeyList:
    """An allow-list file, read again when it changes (so keys can be added live).

    Only new connections see the change: an authenticated connection stays. If the
    file turns unreadable or malformed, the last good list stays in force (logged).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._stat()
        self._keys = load_key_list(path)

    def _stat(self) -> tuple[int, int]:
        try:
            st = self.path.stat()
        except OSError:
            return (-1, -1)
        return (st.st_mtime_ns, st.st_size)

    def keys(self) -> frozenset[str]:
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._keys = load_key_list(self.path)
                log.info("allow-list %s reloaded: %d keys", self.path, len(self._keys))
            except SecurityError as exc:
                log.error("allow-list not reloaded, keeping the previous one: %s", exc)
        return self._keys

    def __contains__(self, key: object) -> bool:
        return key in self.keys()
