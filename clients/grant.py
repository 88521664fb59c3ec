"""``Grant``: seats an application holds, as one object that survives failovers.

The application sees a read-only ``Grant``, a view of the ``GrantRecord`` its link
keeps. The client's I/O thread is the record's only writer: it re-binds the grant to a
new id when the triad expired the session and the library checked the seats out again,
and it moves the grant through its states (``TRANSITIONS`` below is the whole table;
``GrantRecord._set_state`` checks every change):

    (granted) ──lease copy valid──> HELD      (granted) ──lease copy lapsed──> UNSAFE
    HELD ──lease lapsed──> UNSAFE ──lease renewed──> HELD
    HELD/UNSAFE ──triad forgot the session──> RECOVERING
    HELD/UNSAFE ──the triad took it (removed, timed out: ``lost_reason``)──> LOST
    RECOVERING ──checked out again──> HELD, or UNSAFE if the lease copy has lapsed since
    RECOVERING ──could not get it back──> LOST
    HELD/UNSAFE/RECOVERING ──checkin / close──> RELEASED
    LOST, RELEASED: final

A grant is HELD only while the link's copy of the lease is valid: one got (or got
back) while it has lapsed starts UNSAFE and is reported like the grants that lapsed,
since the triad may expire the session before the next renewal.

Reads from other threads are of single attributes, each written whole by the I/O
thread, so no lock is needed to look at a grant.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol


class GrantState(enum.Enum):
    HELD = "held"  # on the ledger, lease valid
    UNSAFE = "unsafe"  # our copy of the lease lapsed: the triad may have expired it
    RECOVERING = "recovering"  # the triad forgot the session; being checked out again
    LOST = "lost"  # could not be got back: gone for good
    RELEASED = "released"  # checked in (or the client closed)


# from -> the states a grant may go to; LOST and RELEASED are final
TRANSITIONS: dict[GrantState, frozenset[GrantState]] = {
    GrantState.HELD: frozenset(
        {GrantState.UNSAFE, GrantState.RECOVERING, GrantState.RELEASED, GrantState.LOST}
    ),
    GrantState.UNSAFE: frozenset(
        {GrantState.HELD, GrantState.RECOVERING, GrantState.RELEASED, GrantState.LOST}
    ),
    GrantState.RECOVERING: frozenset(
        {GrantState.HELD, GrantState.UNSAFE, GrantState.LOST, GrantState.RELEASED}
    ),
    GrantState.LOST: frozenset(),
    GrantState.RELEASED: frozenset(),
}
INITIAL = frozenset({GrantState.HELD, GrantState.UNSAFE})  # the states a grant is born in


class IllegalTransition(RuntimeError):
    """A state change outside its transition table: a bug in the library, never taken.

    Not a ``LicenseError``: an application has nothing to handle, the library is wrong.
    """

    def __init__(self, what: str, old: enum.Enum | None, new: enum.Enum) -> None:
        self.what, self.old, self.new = what, old, new
        start = "(new)" if old is None else old.value
        super().__init__(f"{what}: illegal transition {start} -> {new.value}")


class _Releaser(Protocol):
    """What a grant is checked in through: ``LicenseClient``, which also has ``_let_go``
    (a checkin as a ``with`` block ends by an exception, raising nothing of its own)."""

    def checkin(self, grant: Grant, timeout: float | None = None) -> None: ...


class GrantRecord:
    """The library's record of a grant: the state the client's I/O thread keeps and moves.

    A link holds the records of its grants; the application holds ``Grant``s, each a view
    of one record that keeps its client alive. The record never refers to the client, so
    a client the application dropped, grants and all, is collected (and its sessions
    closed) though its links go on holding the records.
    """

    def __init__(
        self,
        *,
        id: int,
        feature: str,
        version: str,
        count: int,
        triad: tuple[str, ...],
        entry: int,
        session: str,
        state: GrantState = GrantState.HELD,
        borrowed_until: float | None = None,
        lease_valid: Callable[[], bool] | None = None,
    ) -> None:
        if state not in INITIAL:
            raise IllegalTransition(f"grant {id}", None, state)
        self._id = id
        self._feature = feature
        self._version = version
        self._count = count
        self._triad = triad
        self._entry = entry  # which server/triad of the license path it came from
        self._session = session  # the sid it was granted under: checkins go there
        self._state = state
        self._borrowed_until = borrowed_until
        # Judges the link's lease copy by the clock at each read: the I/O thread's move to
        # UNSAFE comes late after a process stop (SIGSTOP, a paused VM) longer than the lease.
        self._lease_valid = lease_valid
        self._lost_reason: str | None = None
        self._grouping: dict[str, str] = {}  # dup, vendor_string asked: a re-checkout sends them
        self._view: weakref.ref[Grant] | None = None  # the application's Grant, while it lives

    @property
    def id(self) -> int:
        return self._id

    @property
    def feature(self) -> str:
        return self._feature

    @property
    def version(self) -> str:
        return self._version

    @property
    def count(self) -> int:
        return self._count

    @property
    def state(self) -> GrantState:
        return self._state

    def grant(self, owner: _Releaser) -> Grant:
        """The application's ``Grant`` of this record: the one it holds, if it still does
        (a report names the very object it got), else a new one."""
        view = self._view() if self._view is not None else None
        return view if view is not None else Grant(owner, self)

    # --- written by the client's I/O thread only
    def _rebind(self, id: int, version: str, session: str, state: GrantState) -> None:
        """Checked out again on a new session: ``state`` HELD, or UNSAFE if its lease
        copy has lapsed since."""
        self._set_state(state)
        self._id = id
        self._version = version
        self._session = session

    def _taken(self, reason: str) -> None:
        """The triad took it from its session (the heartbeat reply said so)."""
        self._lost_reason = reason
        self._set_state(GrantState.LOST)

    def _set_state(self, state: GrantState) -> None:
        """The one way a grant changes state: along ``TRANSITIONS`` only."""
        if state not in TRANSITIONS[self._state]:
            raise IllegalTransition(f"grant {self._id} of {self._feature}", self._state, state)
        self._state = state


class Grant:
    """``count`` seats of ``feature`` at ``version``, held from one triad.

    Use it as a context manager to check it in on exit. A block left by an exception
    lets that exception through whatever the checkin meets: a checkin that fails (no
    node answers) goes on in the background. ``id`` may change (and ``version`` too)
    when the library had to check the seats out again after the triad expired its
    session; the object stays the one to check in.

    A grant keeps its client alive: a client the application dropped unclosed is closed
    (its sessions and seats freed) only once the application holds none of its grants.
    """

    def __init__(self, owner: _Releaser, record: GrantRecord | None = None, **fields: Any) -> None:
        """A view of ``record``, or of a new one of ``fields`` (``GrantRecord``'s)."""
        self._owner = owner
        self._record = record if record is not None else GrantRecord(**fields)
        self._record._view = weakref.ref(self)

    @property
    def id(self) -> int:
        return self._record._id

    @property
    def feature(self) -> str:
        return self._record._feature

    @property
    def version(self) -> str:
        """The version of the license line that granted (>= the version asked for)."""
        return self._record._version

    @property
    def count(self) -> int:
        return self._record._count

    @property
    def triad(self) -> tuple[str, ...]:
        """Endpoints of the server or triad that granted it."""
        return self._record._triad

    @property
    def state(self) -> GrantState:
        return self._record._state

    @property
    def safe(self) -> bool:
        """True while the seats are held and the lease is valid: safe to use the feature.

        The lease is judged by the clock when read, so this turns False the moment the
        library's lease copy runs out, even before ``state`` says UNSAFE."""
        valid = self._record._lease_valid
        return self.state is GrantState.HELD and (valid is None or valid())

    @property
    def borrowed_until(self) -> float | None:
        """Served offline from a borrow token: the borrow's end (wall seconds, the triad's
        clock); None for a grant of a server (docs/client.md, "Borrowing")."""
        return self._record._borrowed_until

    @property
    def lost(self) -> bool:
        return self.state is GrantState.LOST

    @property
    def lost_reason(self) -> str | None:
        """Why the triad took the grant: ``removed`` (an administrator's ``zbroker
        remove``) or ``timeout`` (idle longer than the options file's TIMEOUT); None
        when it was not taken (a lease that lapsed, a session that could not recover)."""
        return self._record._lost_reason

    @property
    def released(self) -> bool:
        return self.state is GrantState.RELEASED

    def release(self, timeout: float | None = None) -> None:
        """Check the grant in (same as ``client.checkin(grant)``)."""
        self._owner.checkin(self, timeout)

    def __enter__(self) -> Grant:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self._owner.checkin(self)
        else:
            # The block's own exception is the one the application must see: a checkin
            # that fails now goes on in the background instead of replacing it.
            getattr(self._owner, "_let_go", self._owner.checkin)(self)

    # --- the record's writers, reached through the view (the I/O thread's only)
    def _set_state(self, state: GrantState) -> None:
        self._record._set_state(state)

    def _taken(self, reason: str) -> None:
        self._record._taken(reason)

    def __repr__(self) -> str:
        return (
            f"Grant(id={self.id}, feature={self.feature!r}, version={self.version!r}, "
            f"count={self.count}, state={self.state.value})"
        )
