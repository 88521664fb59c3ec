"""Borrow tokens: a borrowed seat's facts as the triad signed them, and the library's store.

A borrow (docs/admin.md, "Borrowing") is a grant that no lease expires, counted on the
triad until its end. When it commits, the primary signs its facts with the triad's
*borrow key* (Ed25519, made by ``zbroker init`` and held by all three nodes) and the
library keeps the token in the user's data directory. A checkout of the feature that the
token covers is served from it first, asking no server, connected or not: the triad
counts the seat for the borrow already, and offline no server would answer.

Token. A msgpack-free JSON map (a person may read the file)::

    {"v": 1, "feature": "cad", "version": "2.0", "count": 1, "user": "ann",
     "host": "laptop", "start": 1764500000.0, "end": 1765104800.0, "grant": 17,
     "triad": "<64 hex digits: the borrow public key>", "sig": "<128 hex digits>"}

``start`` and ``end`` are the primary's wall clock, never the client's. ``triad`` names
the key that signed it: the token of one triad is told from another's by it. ``sig`` is
the Ed25519 signature of ``payload()``: the map without ``sig``, as JSON with sorted keys
and no blanks, UTF-8. Every field is covered, so a token edited in any way (a later end,
another host) no longer verifies.

Trust. A token is only as good as the key that checks it: the library takes the
borrow public keys from the license files it reads (``BORROW_KEY=`` on SERVER lines,
``zbroker.clients.licfile``), never from the token. ``refusal`` says why a token may not
be used: unknown key, bad signature, other user or host, not started or ended.

Store. One file per token, ``<dir>/<triad key prefix>-<feature>.json``, written
atomically (a temporary file renamed over it), mode 0600. The directory is
``ZBROKER_BORROW_DIR`` when set (tests point it at a temporary directory), else
``$XDG_DATA_HOME/zbroker/borrow`` (``~/.local/share/zbroker/borrow``); ``%APPDATA%``
on Windows.

This module is a leaf of the library: the standard library and ``cryptography`` only,
so that the node (which signs) and the library (which verifies) share one format.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

TOKEN_VERSION = 1
STORE_ENV = "ZBROKER_BORROW_DIR"
KEY_HEX = 64  # an Ed25519 public key is 32 bytes
SIG_HEX = 128  # an Ed25519 signature is 64 bytes
MAX_TOKEN_BYTES = 4096  # a token is a few hundred bytes: anything larger is not one
_HEX = re.compile(r"[0-9a-f]+\Z")
_SAFE = re.compile(r"[^A-Za-z0-9_.\-]")


class TokenError(ValueError):
    """A token (a map, a file) that is not a well-formed borrow token: says what is wrong."""


@dataclass(frozen=True, slots=True)
class Token:
    """The signed facts of one borrow (see the module docstring)."""

    feature: str
    version: str
    count: int
    user: str
    host: str
    start: float  # wall seconds, the primary's clock: when the borrow was granted
    end: float  # wall seconds, the primary's clock: when its seat returns to the triad
    grant: int  # the grant id on the triad
    triad: str  # the borrow public key that signed it, 64 lower-case hex digits
    sig: str = ""  # 128 hex digits

    def payload(self) -> bytes:
        """The bytes ``sig`` signs: every field but ``sig``, canonical JSON."""
        return payload_of({k: v for k, v in asdict(self).items() if k != "sig"})

    def to_map(self) -> dict[str, Any]:
        return {"v": TOKEN_VERSION, **asdict(self)}

    @classmethod
    def from_map(cls, m: object) -> Token:
        """A token from its map form; TokenError naming the first field that is wrong."""
        if not isinstance(m, Mapping):
            raise TokenError(f"a borrow token must be a map, not {type(m).__name__}")
        if m.get("v") != TOKEN_VERSION:
            raise TokenError(f"borrow token version {m.get('v')!r} is not {TOKEN_VERSION}")
        strs = {k: m.get(k) for k in ("feature", "version", "user", "host", "triad", "sig")}
        for name, value in strs.items():
            if not isinstance(value, str) or len(value) > 256:
                raise TokenError(f"borrow token field {name!r} must be a string")
        nums = {k: m.get(k) for k in ("start", "end")}
        for name, value in nums.items():
            if not _number(value) or not math.isfinite(float(value)):  # type: ignore[arg-type]
                raise TokenError(f"borrow token field {name!r} must be a finite number")
        ints = {k: m.get(k) for k in ("count", "grant")}
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TokenError(f"borrow token field {name!r} must be a whole number >= 1")
        triad, sig = str(strs["triad"]), str(strs["sig"])
        if len(triad) != KEY_HEX or not _HEX.match(triad):
            raise TokenError(f"borrow token field 'triad' must be {KEY_HEX} lower-case hex digits")
        if len(sig) != SIG_HEX or not _HEX.match(sig):
            raise TokenError(f"borrow token field 'sig' must be {SIG_HEX} lower-case hex digits")
        return cls(
            feature=str(strs["feature"]),
            version=str(strs["version"]),
            count=ints["count"],  # type: ignore[arg-type]
            user=str(strs["user"]),
            host=str(strs["host"]),
            start=float(nums["start"]),  # type: ignore[arg-type]
            end=float(nums["end"]),  # type: ignore[arg-type]
            grant=ints["grant"],  # type: ignore[arg-type]
            triad=triad,
            sig=sig,
        )


BorrowToken = Token  # the name the package exports (``from zbroker import BorrowToken``)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def payload_of(facts: Mapping[str, Any]) -> bytes:
    """Canonical JSON of ``facts`` plus the token version: what the triad signs."""
    return json.dumps(
        {"v": TOKEN_VERSION, **facts}, sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode("ascii")


def signature_ok(token: Token) -> bool:
    """True when ``token.sig`` is the signature of its facts under the key it names."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(token.triad))
        key.verify(bytes.fromhex(token.sig), token.payload())
    except (ValueError, InvalidSignature):
        return False
    return True


def refusal(
    token: Token, *, trusted: frozenset[str], user: str, host: str, now: float
) -> str | None:
    """Why ``token`` may not serve ``user`` on ``host`` at wall time ``now``; None: it may.

    ``trusted`` are the borrow public keys (hex) the license files of the path name.
    """
    if token.triad not in trusted:
        return (
            f"borrow token of {token.feature} is signed by borrow key {token.triad[:16]}..., "
            "which no license file of the path names (BORROW_KEY= on its SERVER lines)"
        )
    if not signature_ok(token):
        return f"borrow token of {token.feature} does not verify: forged or altered"
    if token.user != user or token.host != host:
        return (
            f"borrow token of {token.feature} is for user {token.user!r} on host "
            f"{token.host!r}, not {user!r} on {host!r}"
        )
    if now >= token.end:
        return f"borrow token of {token.feature} ended at {when(token.end)}"
    if now < token.start:
        return (
            f"borrow token of {token.feature} starts at {when(token.start)}, after this "
            "computer's time: is its clock right?"
        )
    return None


def when(wall: float) -> str:
    """``wall`` as a person reads it in a refusal (UTC), whatever its range."""
    try:
        at = datetime.datetime.fromtimestamp(wall, tz=datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{wall:.0f} s"
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


# --- the store ---------------------------------------------------------------------------


def default_dir() -> Path:
    """Where tokens live: ``ZBROKER_BORROW_DIR``, else the user's data directory."""
    given = os.environ.get(STORE_ENV)
    if given:
        return Path(given)
    if os.name == "nt" and os.environ.get("APPDATA"):
        return Path(os.environ["APPDATA"]) / "zbroker" / "borrow"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "zbroker" / "borrow"


class TokenStore:
    """The borrow tokens of one user, one file each (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_dir()

    def path_of(self, triad: str, feature: str) -> Path:
        return self.directory / f"{triad[:16]}-{_SAFE.sub('_', feature)}.json"

    def save(self, token: Token) -> Path:
        """Write ``token`` (replacing one of the same triad and feature); its path."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.path_of(token.triad, token.feature)
        fd, tmp = tempfile.mkstemp(prefix=".token-", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                json.dump(token.to_map(), f, sort_keys=True, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def files(self) -> Iterator[Path]:
        if self.directory.is_dir():
            yield from sorted(self.directory.glob("*.json"))

    def load(self, path: Path) -> Token:
        """The token in ``path``; TokenError when it is no token, OSError when unreadable."""
        with path.open("rb") as f:
            data = f.read(MAX_TOKEN_BYTES + 1)
        if len(data) > MAX_TOKEN_BYTES:
            raise TokenError(f"{path}: larger than {MAX_TOKEN_BYTES} bytes: not a borrow token")
        try:
            m = json.loads(data.decode("ascii"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenError(f"{path}: not a borrow token ({exc})") from None
        try:
            return Token.from_map(m)
        except TokenError as exc:
            raise TokenError(f"{path}: {exc}") from None

    def tokens(self, feature: str | None = None) -> Iterator[tuple[Path, Token | TokenError]]:
        """Every file of the store (of ``feature`` only, when given) and its token, or the
        TokenError that says why it is none."""
        for path in self.files():
            try:
                token: Token | TokenError = self.load(path)
            except TokenError as exc:
                token = exc
            except OSError as exc:
                token = TokenError(f"{path}: cannot read: {exc.strerror}")
            if feature is None or isinstance(token, TokenError) or token.feature == feature:
                yield path, token

    def delete(self, path: Path) -> None:
        path.unlink(missing_ok=True)
