"""The words of docs/protocol.md, declared once for the node and the client library.

The protocol version, the bounds of every field, the statuses of a reply, the reasons
of a ``denied`` and the codes of an ``error``, and how a version string reads: what a
node accepts and what a client sends and checks must be the same values, so both sides
import them from here instead of each keeping a copy that could drift.

Why here, in the library's package: the library must not import the node (an
application installs it to check licenses out, not to run a server), while the node
may import a module of the library that is a leaf. This module is that leaf: it
imports nothing of the project and nothing outside the standard library, holds no
state, and does no I/O. ``zbroker.broker.wire`` and ``zbroker.broker.model`` (the node's codec and
values) and ``zbroker.clients.wire`` and ``zbroker.clients.errors`` (the library's) build on it.
"""

from __future__ import annotations

import re

PROTOCOL_VERSION = 1

# --- bounds -----------------------------------------------------------------------------
# Numbers at the edge: the same bounds hold for the license file, the config and the CLI
# (they import these), so that anything a node accepts also packs (msgpack ints stop at
# 2**64 - 1) and fits any client's 32- or 64-bit integers.
MAX_TEXT = 256  # the field cap: user, host, display, client_version, project, feature
MAX_SID = 64  # characters of a session id
MAX_COUNT = 1_000_000  # seats of one checkout, and of one FEATURE/INCREMENT line
MAX_REQ = 2**63 - 1  # request numbers, acks and grant ids
MAX_VERSION = 32  # characters of a version such as "2.0"
MAX_VERSION_PART = 2**31 - 1  # each dotted part of a version
MAX_WAIT = 86_400.0  # seconds a checkout may queue
MAX_LEASE = 7 * 86_400.0  # seconds: the longest lease a config may set or a reply announce
MAX_OP = 16  # characters of an op
MAX_ACTION = 32  # characters of an admin action
# A float stands for a whole number only up to here: above it, neighbouring floats are
# more than 1 apart, so a client's number may already have been rounded (JavaScript's
# Number.MAX_SAFE_INTEGER is 2**53 - 1).
MAX_FLOAT_WHOLE = 2**53
# A status reply lists holders only when asked, a page at a time, so that no reply grows
# with the ledger: at most HOLDERS_PAGE holders and HOLDERS_PAGE_BYTES of them per page.
HOLDERS_PAGE = 1_000
HOLDERS_PAGE_BYTES = 64 * 1024

OPS = frozenset(
    {"open", "close", "checkout", "checkin", "heartbeat", "status", "admin", "borrow", "return"}
    | {"idle"}
)
ADMIN_ACTIONS = ("down", "reread", "remove")


class Status:
    """The ``status`` of a reply (docs/protocol.md, "Replies")."""

    OK = "ok"
    DENIED = "denied"
    REDIRECT = "redirect"
    UNAVAILABLE = "unavailable"
    ERROR = "error"


STATUSES = frozenset({Status.OK, Status.DENIED, Status.REDIRECT, Status.UNAVAILABLE, Status.ERROR})


class Reason:
    """Machine-readable reasons of a ``denied`` reply (docs/protocol.md)."""

    NO_SUCH_FEATURE = "no_such_feature"
    VERSION_TOO_HIGH = "version_too_high"
    NO_SEATS = "no_seats"
    EXPIRED = "expired"
    NOT_ALLOWED = "not_allowed"
    NOT_HELD = "not_held"
    # The options file's denials (broker/policy.py, docs/admin.md)
    EXCLUDED = "excluded"
    NOT_INCLUDED = "not_included"
    MAX_REACHED = "max_reached"
    RESERVED = "reserved"


class ErrorCode:
    """Machine-readable codes of an ``error`` reply (docs/protocol.md)."""

    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_SESSION = "unknown_session"
    STALE_REQUEST = "stale_request"
    LIMIT = "limit"
    NOT_ALLOWED = "not_allowed"  # an admin request from a connection that may not administer


# --- duplicate grouping ---------------------------------------------------------------

DUP_LETTERS = "UHDV"  # user, host, display, vendor string (FlexNet's DUP_GROUP letters)
MAX_DUP = 8  # characters of a DUP_GROUP mask


def parse_dup_mask(text: str) -> str:
    """A DUP_GROUP value as node and library keep it: ``NONE``, ``SITE``, or letters of
    ``UHDV`` in that order (``dhu`` is ``UHD``). ValueError on anything else."""
    upper = text.strip().upper()
    if upper in ("NONE", "SITE"):
        return upper
    if not upper or any(ch not in DUP_LETTERS for ch in upper) or len(set(upper)) != len(upper):
        raise ValueError(
            f"DUP_GROUP {text[:20]!r}: expected NONE, SITE or letters of UHDV (user, host, "
            "display, vendor string) each at most once, such as UHD"
        )
    return "".join(ch for ch in DUP_LETTERS if ch in upper)


# --- versions ---------------------------------------------------------------------------

_VERSION = re.compile(r"\d+(\.\d+)*\Z")


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


def check_feature(name: object) -> str:
    """``name`` if it can name a feature on the wire; ValueError saying why not. A longer
    name would only be refused by the node (or, past the message cap, never answered)."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_TEXT:
        shown = name[:40] + "..." if isinstance(name, str) and len(name) > 40 else name
        raise ValueError(f"feature must be a string of 1 to {MAX_TEXT} characters, not {shown!r}")
    return name


def check_version(text: str) -> tuple[int, ...]:
    """``text`` parsed as a version within the bounds above; ValueError saying which."""
    if len(text) > MAX_VERSION:
        raise ValueError(f"version {text[:40]!r} is longer than {MAX_VERSION} characters")
    parts = parse_version(text)
    if max(parts) > MAX_VERSION_PART:
        raise ValueError(f"version {text!r} has a part above {MAX_VERSION_PART}")
    return parts
