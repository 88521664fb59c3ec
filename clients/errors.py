"""The client library's one error tree: definite failures apart from unknown outcomes.

    LicenseError                     root: catch this to catch everything below
    ├── LicenseDenied                definite: the triad refused; nothing changed (.reason)
    ├── LicenseUnavailable           definite: no server could act on the request; nothing changed
    ├── ProtocolError                definite: a reply or request broke docs/protocol.md (.code)
    ├── ClientClosed                 definite: the client was closed; nothing was sent
    ├── ClientForked                 definite: used in a forked child of its process; nothing sent
    ├── LicensePathError             the servers / license path given could not be used
    ├── LeaseLost                    grants are no longer safe to use (.lost)
    └── OutcomeUnknown               the deadline passed; the request may or may not have acted

The split is Jepsen's ``fail`` (definite) and ``info`` (unknown), which the chaos
checker relies on, so ``OutcomeUnknown`` is deliberately *not* a subclass of
``LicenseUnavailable``: code that treats "unavailable" as "nothing happened" must not
swallow an outcome that may have happened. Every class carries ``definite``, so a
history recorder can classify an error without an ``isinstance`` ladder.

The rule the library follows: a request is unknown when at least one copy of it was
handed to a connected node and no reply to that copy came back before the deadline.
Replies ``unavailable`` and ``redirect`` say "nothing changed", and a send refused
locally because no connection to the node exists never left the process, so a call
that saw only those ends with ``LicenseUnavailable``. A checkout or checkin whose
outcome is unknown is not forgotten: the library keeps re-sending the same request
(same session, same request id) until the triad answers, and checks back in any grant
the checkout turns out to have got, so no seat leaks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: grant.py does not import errors at runtime
    from zbroker.clients.grant import Grant


class LicenseError(Exception):
    """Root of every error the client library raises on purpose."""

    definite: bool = True  # False: the request may have taken effect

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class LicenseDenied(LicenseError):
    """The triad refused the request; ``reason`` is the protocol's machine-readable reason.

    Reasons (docs/protocol.md): ``no_such_feature``, ``version_too_high``, ``no_seats``,
    ``expired``, ``not_allowed``, ``not_held``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class LicenseUnavailable(LicenseError):
    """No server acted on the request before the deadline, and none can have.

    ``code`` is ``"limit"`` when a server limit (sessions, queue length) refused it,
    otherwise None (no quorum, election in progress, no server reachable).
    """

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.code = code


class ProtocolError(LicenseError):
    """A reply did not follow the protocol, or a node called our request wrong.

    ``code`` is the node's error code (``bad_request``, ``unsupported_version``,
    ``stale_request``) when the node reported it, None for a malformed reply.
    """

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.code = code


class ClientClosed(LicenseError):
    """The LicenseClient was closed; the call sent nothing."""


class ClientForked(LicenseError):
    """The LicenseClient was made in another process (this one is a fork of it); nothing sent.

    A forked child shares none of its parent's connections or I/O thread, and its
    sessions are the parent's: the child makes a LicenseClient of its own instead.
    """

    def __init__(self, created_in: int, used_in: int) -> None:
        super().__init__(
            f"this LicenseClient was created in process {created_in} and cannot be used in "
            f"its forked child {used_in}: create a new LicenseClient in the child"
        )
        self.created_in = created_in
        self.used_in = used_in


class LicensePathError(LicenseError, ValueError):
    """The servers or license path (``ZBROKER_LICENSE``) could not be turned into endpoints."""


class LeaseLost(LicenseError):
    """Grants are no longer safe to use: the session's lease lapsed or could not be
    renewed, or the triad took them (``zbroker remove``, an idle TIMEOUT).

    ``lost`` holds the grants concerned; ``reasons`` maps the id of each grant the triad
    took to why (``removed``, ``timeout``: its ``lost_reason``). Raised from the next
    ``checkout`` or ``status`` call when no ``on_lost`` callback was given (the call
    itself then did nothing).
    """

    def __init__(self, lost: Sequence[Grant], detail: str | None = None) -> None:
        self.lost: tuple[Grant, ...] = tuple(lost)
        self.reasons: dict[int, str] = {
            g.id: g.lost_reason for g in self.lost if g.lost_reason is not None
        }
        names = ", ".join(
            f"{g.feature}#{g.id}" + (f" ({g.lost_reason})" if g.lost_reason else "")
            for g in self.lost
        )
        super().__init__(detail or f"grants no longer safe to use: {names}")


class OutcomeUnknown(LicenseError):
    """The deadline passed before an answer; the request may or may not have taken effect.

    For a checkout, the library settles it in the background: it re-sends the same
    request until the triad answers and checks back in any grant it got.
    """

    definite = False
