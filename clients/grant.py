"""``Grant``: seats an application holds, as one object that survives failovers.

The application sees a read-only object. Behind it, the client's I/O thread is the
only writer: it re-binds the grant to a new id when the triad expired the session and
the library checked the seats out again, and it moves the grant through its states:

    HELD ──lease lapsed──> UNSAFE ──lease renewed──> HELD
    HELD/UNSAFE ──triad forgot the session──> RECOVERING ──checked out again──> HELD
    RECOVERING ──could not get it back──> LOST
    any ──checkin / close──> RELEASED

Reads from other threads are of single attributes, each written whole by the I/O
thread, so no lock is needed to look at a grant.
"""

from __future__ import annotations

import enum
from types import TracebackType
from typing import Protocol


class GrantState(enum.Enum):
    HELD = "held"  # on the ledger, lease valid
    UNSAFE = "unsafe"  # our copy of the lease lapsed: the triad may have expired it
    RECOVERING = "recovering"  # the triad forgot the session; being checked out again
    LOST = "lost"  # could not be got back: gone for good
    RELEASED = "released"  # checked in (or the client closed)


class _Releaser(Protocol):
    def checkin(self, grant: Grant, timeout: float | None = None) -> None: ...


class Grant:
    """``count`` seats of ``feature`` at ``version``, held from one triad.

    Use it as a context manager to check it in on exit. ``id`` may change (and
    ``version`` too) when the library had to check the seats out again after the
    triad expired its session; the object stays the one to check in.
    """

    def __init__(
        self,
        owner: _Releaser,
        *,
        id: int,
        feature: str,
        version: str,
        count: int,
        triad: tuple[str, ...],
        entry: int,
        session: str,
    ) -> None:
        self._owner = owner
        self._id = id
        self._feature = feature
        self._version = version
        self._count = count
        self._triad = triad
        self._entry = entry  # which server/triad of the license path it came from
        self._session = session  # the sid it was granted under: checkins go there
        self._state = GrantState.HELD

    @property
    def id(self) -> int:
        return self._id

    @property
    def feature(self) -> str:
        return self._feature

    @property
    def version(self) -> str:
        """The version of the license line that granted (>= the version asked for)."""
        return self._version

    @property
    def count(self) -> int:
        return self._count

    @property
    def triad(self) -> tuple[str, ...]:
        """Endpoints of the server or triad that granted it."""
        return self._triad

    @property
    def state(self) -> GrantState:
        return self._state

    @property
    def safe(self) -> bool:
        """True while the seats are held and the lease is valid: safe to use the feature."""
        return self._state is GrantState.HELD

    @property
    def lost(self) -> bool:
        return self._state is GrantState.LOST

    @property
    def released(self) -> bool:
        return self._state is GrantState.RELEASED

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
        self._owner.checkin(self)

    def __repr__(self) -> str:
        return (
            f"Grant(id={self._id}, feature={self._feature!r}, version={self._version!r}, "
            f"count={self._count}, state={self._state.value})"
        )

    # --- written by the client's I/O thread only
    def _rebind(self, id: int, version: str, session: str) -> None:
        self._id = id
        self._version = version
        self._session = session
        self._state = GrantState.HELD

    def _set_state(self, state: GrantState) -> None:
        self._state = state
