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


# Not frozen, for the reason Request is not (below): one is made per event. No one
# changes one once made.
@dataclass(slots=True)
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
    # BORROW[=hours] (docs/admin.md, "Borrowing"): the longest a seat of the line may be
    # borrowed, in hours; None: the line's seats cannot be borrowed. NO_EARLY_RETURN on
    # the line sets ``early_return`` False: a borrow of it stays until its end.
    borrow: float | None = None
    early_return: bool = True
    # DUP_GROUP= (docs/admin.md, "Duplicate grouping"): the mask under which checkouts of
    # the feature share one seat ("SITE" or letters of "UHDV"); None: the client decides.
    dup_group: str | None = None
    # USER_BASED[=n] / HOST_BASED[=n] (docs/admin.md): only the first n users (hosts) that
    # the options file's INCLUDE lines name may use the line; None: the line is not.
    user_based: int | None = None
    host_based: int | None = None

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
    idle: bool = False  # idle: the application went idle (True) or is busy again (False)
    grant: int = 0
    # checkout: the client's DUP_GROUP mask (used when no license line sets one; None:
    # none) and its vendor string, which the mask's V compares (broker/dup.py)
    dup: str | None = None
    vendor_string: str = ""
    # borrow: the end asked for, as wall seconds (``until``) or hours from the primary's
    # now (``hours``): one of them, or neither for the longest the line allows
    until: float | None = None
    hours: float | None = None
    action: str = ""  # admin: what to do ("down"); remove also reads user/host/display/
    # feature/grant (broker/removal.py)
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
