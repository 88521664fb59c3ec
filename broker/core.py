"""The node core: every decision a node makes, with no sockets, no disk and no clock.

CONTRACT SKELETON (lead, issue 11): the types and signatures below are what the
executor (``broker/node.py``) and the simulation (``tests/sim.py``) are written against.
The implementation fills in ``NodeCore``; a change of this interface is written here
and noted in /tmp/prompts/interface-changes.md for the others.

The core owns the ledger, the replica and the client front. The shell feeds it events
(``step``), each with the current time, and at the end of each poll cycle asks for one
``Ready`` record of everything to do, in this order:

1. ``persist``: write these to the data directory, in order;
2. ``early``: peer messages that may leave before the sync (a primary's appends in a
   cycle that wrote nothing but entries: Raft thesis 10.2.1);
3. sync the data directory (one fsync for the cycle: group commit) when ``persist`` is
   not empty; then, if ``mark_recovered``, write the caught-up marker;
4. ``peer`` then ``answers``: every other peer message and every client answer;
5. ``advance()``: the core then does what may wait until the sends have left (a
   backup applies the deltas it acknowledged this cycle);
6. ``start_over`` (a reason): set the data directory aside with that reason and hand
   what storage then loads to ``restart``; ``stop``: stop after this cycle's sends.

The next cycle's poll waits no longer than ``wake_at`` (monotonic seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.config import Config
from broker.model import Entitlement, Now
from broker.storage import Loaded


class Origin(Protocol):
    """What ZeroMQ knows of the connection a message came in on (a ``zmq.Frame``):
    ``get("User-Id")`` is the name the ZAP handler gave it, ``get("Peer-Address")`` the
    remote address. Read only when a decision needs it (admin requests, peer messages)."""

    def get(self, key: str) -> Any: ...


# --- events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientMessage:
    """The frames of one message on the client ROUTER, the connection's routing id first."""

    frames: list[bytes]
    origin: Origin


@dataclass(frozen=True, slots=True)
class PeerMessage:
    """The frames of one message on the peer ROUTER: the sender's routing id, the body."""

    frames: list[bytes]
    origin: Origin


@dataclass(frozen=True, slots=True)
class PeerHeartbeat:
    """The frames of one message on the heartbeat SUB socket."""

    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class PeerLost:
    """The connection to peer ``peer`` dropped (its process died, or the network)."""

    peer: str


Event = ClientMessage | PeerMessage | PeerHeartbeat | PeerLost


# --- what to persist ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Append:
    """Append these (index, term, delta) records to the log."""

    entries: list[tuple[int, int, Any]]


@dataclass(frozen=True, slots=True)
class Truncate:
    """Drop the log's records from ``from_index`` on."""

    from_index: int


@dataclass(frozen=True, slots=True)
class SaveHardState:
    term: int
    voted_for: str | None


@dataclass(frozen=True, slots=True)
class SaveSnapshot:
    """Write this snapshot and rewrite the log to hold only ``keep`` after it."""

    index: int
    term: int
    snapshot: dict[str, Any]
    keep: list[tuple[int, int, Any]]


Persist = Append | Truncate | SaveHardState | SaveSnapshot

# A peer message: to a peer by name over its DEALER, or published (None) on the PUB.
Outgoing = tuple[str | None, dict[str, Any]]


@dataclass(slots=True)
class Ready:
    """Everything one cycle decided (see the module docstring for the order)."""

    persist: list[Persist] = field(default_factory=list)
    early: list[Outgoing] = field(default_factory=list)
    mark_recovered: bool = False
    peer: list[Outgoing] = field(default_factory=list)
    answers: list[list[bytes]] = field(default_factory=list)  # frames, routing id first
    start_over: str | None = None
    stop: bool = False
    wake_at: float = 0.0


class NodeCore:
    """One node's decisions. Built from what storage loaded; never reads a clock."""

    def __init__(
        self,
        config: Config,
        name: str,
        entitlements: tuple[Entitlement, ...],
        loaded: Loaded,
        now: Now,
        *,
        mode: str,
    ) -> None:
        raise NotImplementedError

    def step(self, event: Event, now: Now) -> None:
        raise NotImplementedError

    def ready(self, now: Now) -> Ready:
        raise NotImplementedError

    def advance(self) -> None:
        raise NotImplementedError

    def restart(self, loaded: Loaded, now: Now) -> None:
        raise NotImplementedError

    def report(self, now: Now) -> dict[str, Any]:
        """The status report (docs/protocol.md), as a status request is answered."""
        raise NotImplementedError
