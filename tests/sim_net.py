"""The simulation's network: every message between nodes and clients, as frames of bytes.

One seeded ``random.Random`` decides each message's fate: lost (``drop``), delivered
twice (``dup``, between nodes only), and when (a delay up to ``max_delay``, so messages
overtake each other). ``blocked`` holds the (from, to) pairs a partition cuts, one way
each; a blocked message is lost when it would arrive. A message is addressed by name (a
node's or a client's) and has a kind, which says which socket it arrives on:

- ``peer``: a node's DEALER to a peer's ROUTER (frames: the sender's name, the body);
- ``hb``: a node's PUB to a peer's SUB (frames: the body);
- ``request``: a client's DEALER to a node's client ROUTER (frames: routing id, body);
- ``reply``: a node's client ROUTER to a client (frames: routing id, body).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

# Only peer traffic is duplicated: the replica must bear it. ZeroMQ over TCP never hands
# a message over twice, and the client library counts replies per copy it sent
# (clients/exchange.py: a duplicated reply would make it call a request it may have had
# acted on "unavailable").
DUPLICATED = frozenset({"peer", "hb"})
Message = tuple[float, int, str, str, str, list[bytes], bool]  # at, seq, src, dst, kind, ...


@dataclass
class Network:
    rng: random.Random
    drop: float
    dup: float
    max_delay: float
    queue: list[Message] = field(default_factory=list)
    blocked: set[tuple[str, str]] = field(default_factory=set)
    cut: set[str] = field(default_factory=set)  # whatever these send is lost as it is sent
    seq: int = 0
    sent: int = 0

    def send(
        self, now: float, src: str, dst: str, kind: str, frames: list[bytes], hostile: bool = False
    ) -> None:
        self.sent += 1
        if src in self.cut or self.rng.random() < self.drop:
            return
        copies = 2 if kind in DUPLICATED and self.rng.random() < self.dup else 1
        for _ in range(copies):
            self.seq += 1
            at = now + self.rng.uniform(0.0002, self.max_delay)
            heapq.heappush(self.queue, (at, self.seq, src, dst, kind, frames, hostile))

    def due(self, now: float) -> Iterator[tuple[str, str, str, list[bytes], bool]]:
        """Messages that arrive by ``now``, in arrival order, less those a partition cuts."""
        while self.queue and self.queue[0][0] <= now:
            _, _, src, dst, kind, frames, hostile = heapq.heappop(self.queue)
            if (src, dst) not in self.blocked:
                yield src, dst, kind, frames, hostile

    def forget(self, name: str) -> None:
        """Messages from and to ``name`` vanish: its process died and its connections went."""
        self.queue = [q for q in self.queue if name not in (q[2], q[3])]
        heapq.heapify(self.queue)

    def isolate(self, name: str, others: list[str]) -> None:
        for other in others:
            if other != name:
                self.blocked |= {(name, other), (other, name)}
