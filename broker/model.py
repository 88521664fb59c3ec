"""Plain values shared by the license file, the ledger and the node.

Nothing here does I/O or reads a clock: ``Now`` is how the shell hands the current
time to the pure cores (monotonic seconds for every timeout, wall-clock seconds only
where a person's date is meant: license expiry and "holding since").
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field

_VERSION = re.compile(r"\d+(\.\d+)*\Z")


@dataclass(frozen=True)
class Now:
    """The current time as the shell read it once for one event."""

    mono: float  # time.monotonic(): timeouts, leases, deadlines
    wall: float  # time.time(): license expiry dates and "since" shown to people

    @property
    def date(self) -> datetime.date:
        return datetime.datetime.fromtimestamp(self.wall, tz=datetime.UTC).date()


def parse_version(text: str) -> tuple[int, ...]:
    """A feature version such as ``2.0`` or ``11.4.1`` as a tuple of ints for ordering.

    Components compare as integers, so ``2.10`` is newer than ``2.9``; trailing zeros
    do not matter (``2`` == ``2.0``). Raises ValueError on anything else.
    """
    if not _VERSION.match(text):
        raise ValueError(f"version {text!r} is not dotted decimal digits such as 2.0")
    parts = [int(p) for p in text.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


@dataclass(frozen=True)
class Entitlement:
    """Seats granted by one valid, signature-checked FEATURE or INCREMENT line."""

    feature: str
    version: str  # as written; compare with parse_version
    count: int
    expires: datetime.date | None  # None: permanent
    users: frozenset[str] | None = None  # USERS=a,b: only these users may check out
    hosts: frozenset[str] | None = None  # HOSTS=a,b: only from these hosts
    source: str = field(default="", compare=False)  # "file:line", for messages

    def expired_on(self, day: datetime.date) -> bool:
        """True when the line no longer grants on ``day`` (it expires at the end of its date)."""
        return self.expires is not None and day > self.expires


class Reason:
    """Machine-readable reasons of a ``denied`` reply (docs/protocol.md)."""

    NO_SUCH_FEATURE = "no_such_feature"
    VERSION_TOO_HIGH = "version_too_high"
    NO_SEATS = "no_seats"
    EXPIRED = "expired"
    NOT_ALLOWED = "not_allowed"
    NOT_HELD = "not_held"


class ErrorCode:
    """Machine-readable codes of an ``error`` reply (docs/protocol.md)."""

    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_SESSION = "unknown_session"
    STALE_REQUEST = "stale_request"
    LIMIT = "limit"


@dataclass(frozen=True)
class Request:
    """One validated client request (``broker.wire`` builds it from the bytes)."""

    op: str  # open, close, checkout, checkin, heartbeat, status, admin
    sid: str = ""
    req: int = 0
    ack: int = 0
    user: str = ""
    host: str = ""
    display: str = ""
    client_version: str = ""
    feature: str = ""
    count: int = 1
    version: str | None = None
    wait: float | None = None
    grant: int = 0
    action: str = ""  # admin: what to do ("down")
    # status: a page of holders (of ``feature`` only, when given) with grant ids > after
    holders: bool = False
    after: int = 0
    limit: int = 0  # 0: as many as a page holds (broker.wire.HOLDERS_PAGE)


Reply = dict[str, object]


def reply_ok(**payload: object) -> Reply:
    return {"status": "ok", **payload}


def reply_denied(reason: str, detail: str) -> Reply:
    return {"status": "denied", "reason": reason, "detail": detail}


def reply_error(code: str, detail: str) -> Reply:
    return {"status": "error", "code": code, "detail": detail}
