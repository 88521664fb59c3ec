"""Borrow tokens: a borrowed seat's facts as the triad signed them (the library's store of
them: ``clients/tokens.py``).

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
be used (unknown key, bad signature, other user or host, a start too far ahead of this
clock, ended) and whether to keep it.

Clocks. ``start`` and ``end`` are the triad's clock; the laptop's may be off, and a clock
must never destroy a token the triad still counts. A token exists only once the triad
signed it, so a ``start`` after this computer's time proves this clock is behind: up to
``CLOCK_SLACK`` it serves (it serves past the triad's end by at most as much); further
behind it is kept, not served, until the clock reaches ``start - CLOCK_SLACK``, since
serving it would stretch its end by the whole skew. Past its ``end`` by this clock a
token no longer serves (stopping early is the safe side of a fast clock), but it is
deleted only ``ENDED_KEPT`` after its end: a clock that fast (a wrong time zone) deletes
nothing the triad still counts, and set right, the token serves again until its end.

Store. One file per token, ``<dir>/<triad key prefix>-<feature>.json``, written
atomically (a temporary file renamed over it), mode 0600. The directory is
``ZBROKER_BORROW_DIR`` when set (tests point it at a temporary directory), else
``$XDG_DATA_HOME/zbroker/borrow`` (``~/.local/share/zbroker/borrow``); ``%APPDATA%``
on Windows. ``check`` proves the directory can take a token before a borrow asks the
triad: a seat lent whose token cannot be kept serves nobody offline.

This module is a leaf of the library: the standard library, ``cryptography`` and the
library's errors only, so that the node (which signs) and the library (which verifies)
share one format.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

TOKEN_VERSION = 1
STORE_ENV = "ZBROKER_BORROW_DIR"
KEY_HEX = 64  # an Ed25519 public key is 32 bytes
SIG_HEX = 128  # an Ed25519 signature is 64 bytes
MAX_TOKEN_BYTES = 4096  # a token is a few hundred bytes: anything larger is not one
_HEX = re.compile(r"[0-9a-f]+\Z")
SAFE = re.compile(r"[^A-Za-z0-9_.\-]")
# How far behind the triad's this computer's clock may be and a token still serve: a
# laptop without NTP is seconds off, Kerberos allows 5 minutes for the same reason.
CLOCK_SLACK = 300.0
# How long after its end (by this clock) a token is kept: a day covers any time zone
# set wrong (UTC-12 to UTC+14), the largest mistake a clock commonly makes.
ENDED_KEPT = 86_400.0


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


@dataclass(frozen=True, slots=True)
class Refused:
    """Why a token may not serve now, and what to do with it."""

    why: str
    keep: bool = False  # it may serve later (a clock) or on another path (its key): keep it
    clock: bool = False  # this computer's clock is off: worth a warning, once


def refusal(
    token: Token, *, trusted: frozenset[str], user: str, host: str, now: float
) -> Refused | None:
    """Why ``token`` may not serve ``user`` on ``host`` at wall time ``now``; None: it may.

    ``trusted`` are the borrow public keys (hex) the license files of the path name. Only
    what no clock can change deletes a token (see "Clocks" in the module docstring).
    """
    name = f"borrow token of {token.feature}"
    if token.triad not in trusted:
        return Refused(
            f"{name} is signed by borrow key {token.triad[:16]}..., which no license file "
            "of the path names (BORROW_KEY= on its SERVER lines)",
            keep=True,
        )
    if not signature_ok(token):
        return Refused(f"{name} does not verify: forged or altered")
    if token.user != user or token.host != host:
        return Refused(
            f"{name} is for user {token.user!r} on host {token.host!r}, not {user!r} on {host!r}"
        )
    if now >= token.end:
        ended = f"{name} ended at {when(token.end)} by this computer's clock"
        if now >= token.end + ENDED_KEPT:
            return Refused(ended)
        return Refused(
            f"{ended}; kept until {when(token.end + ENDED_KEPT)} in case this clock is fast",
            keep=True,
        )
    if now < token.start - CLOCK_SLACK:
        return Refused(
            f"{name} was signed by the triad at {when(token.start)}, {_span(token.start - now)}"
            f" after this computer's time: this clock is behind the triad's by at least that "
            f"(more than the {_span(CLOCK_SLACK)} allowed); the token is kept and serves from "
            f"{when(token.start - CLOCK_SLACK)} by this clock: set the clock right",
            keep=True,
            clock=True,
        )
    return None


def _span(seconds: float) -> str:
    """A length of time as a person reads it in a refusal."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def when(wall: float) -> str:
    """``wall`` as a person reads it in a refusal (UTC), whatever its range."""
    try:
        at = datetime.datetime.fromtimestamp(wall, tz=datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{wall:.0f} s"
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")
