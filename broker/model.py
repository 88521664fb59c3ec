"""Plain values shared by the license file, the ledger and the node.

Nothing here does I/O or reads a clock: ``Now`` is how the shell hands the current
time to the pure cores (monotonic seconds for every timeout, wall-clock seconds only
where a person's date is meant: license expiry and "holding since").
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

# The protocol's words are the library's leaf module's (clients/protocol.py says why);
# the node's modules take them from here with the values below.
from zbroker.clients.protocol import ErrorCode, Reason, Status, parse_version

__all__ = [
    "Entitlement",
    "ErrorCode",
    "Now",
    "Reason",
    "Reply",
    "Request",
    "parse_version",
    "reply_denied",
    "reply_error",
    "reply_ok",
]


@dataclass(frozen=True)
class Now:
    """The current time as the shell read it once for one event."""

    mono: float  # time.monotonic(): timeouts, leases, deadlines
    wall: float  # time.time(): license expiry dates and "since" shown to people

    @property
    def date(self) -> datetime.date:
        return datetime.datetime.fromtimestamp(self.wall, tz=datetime.UTC).date()


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
    # The line's vendor, for status; not replicated (a reload delta carries no vendor),
    # hence not compared: the ledger's entitlements equal the license file's without it.
    vendor: str = field(default="", compare=False)

    def expired_on(self, day: datetime.date) -> bool:
        """True when the line no longer grants on ``day`` (it expires at the end of its date)."""
        return self.expires is not None and day > self.expires


# Not frozen: one is made per request, and a frozen dataclass's __init__ sets each of
# its fields through object.__setattr__: 12 % of a node's instructions per request
# (scripts/ab_instructions.py: 216,000 -> 191,000). Nothing changes one once made.
@dataclass(slots=True)
class Request:
    """One validated client request (``zbroker.broker.wire`` builds it from the bytes)."""

    op: str  # open, close, checkout, checkin, heartbeat, status, admin
    sid: str = ""
    req: int = 0
    ack: int = 0
    user: str = ""
    host: str = ""
    display: str = ""
    client_version: str = ""
    project: str = ""  # open: the client's project (``ZBROKER_PROJECT``), may be empty
    # open: the remote address the node saw the connection at; the node sets it from the
    # connection, never from the message (broker/core.py)
    address: str = ""
    feature: str = ""
    count: int = 1
    version: str | None = None
    wait: float | None = None
    grant: int = 0
    action: str = ""  # admin: what to do ("down")
    # status: a page of holders (of ``feature`` only, when given) with grant ids > after
    holders: bool = False
    after: int = 0
    limit: int = 0  # 0: as many as a page holds (zbroker.broker.wire.HOLDERS_PAGE)


Reply = dict[str, object]


def reply_ok(**payload: object) -> Reply:
    return {"status": Status.OK, **payload}


def reply_denied(reason: str, detail: str) -> Reply:
    return {"status": Status.DENIED, "reason": reason, "detail": detail}


def reply_error(code: str, detail: str) -> Reply:
    return {"status": Status.ERROR, "code": code, "detail": detail}
