"""The client front's bookkeeping: which client waits for which answer.

The primary answers a mutating request only once its delta is committed, and a queued
checkout only when ``Ledger.tick`` grants or refuses it, so answers leave later than
requests arrive. This module remembers, with no sockets and no clock:

- ``route``: the ZeroMQ identity a request ``(sid, req)`` last came from, and when it
  first arrived (monotonic seconds: for its latency); a retry over another connection
  (after a failover, or a reconnect) updates the identity, so the answer goes where the
  client is now;
- ``inflight``: per log index, the requests whose answer that delta carries, with the
  answer; released when the index commits, or turned into redirects when the node loses
  control (the outcome is then unknown here, and the client re-asks the new primary,
  which answers from the replicated request table).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from zbroker.broker.model import Reply

Key = tuple[str, int]  # (sid, req)
Released = tuple[bytes, Key, Reply, float]  # identity, key, reply, first arrival


@dataclass
class Front:
    route: dict[Key, tuple[bytes, float]] = field(default_factory=dict)
    inflight: dict[int, list[tuple[Key, Reply]]] = field(default_factory=dict)
    _pending: set[Key] = field(default_factory=set)  # proposed or queued, not answered

    def __post_init__(self) -> None:
        # waiting(key): True while an earlier copy of this request is queued or awaiting
        # commit. Asked of every request: the set's own __contains__ (a C call, no frame).
        self.waiting: Callable[[Key], bool] = self._pending.__contains__

    def wait(self, key: Key, identity: bytes, at: float) -> None:
        """Route ``key``'s answer to ``identity``; ``at``: when this copy arrived."""
        first = self.route.get(key)
        self.route[key] = (identity, at if first is None else first[1])
        self._pending.add(key)

    def proposed(self, index: int, key: Key, reply: Reply) -> None:
        if self.inflight and index < next(reversed(self.inflight)):
            # ``committed`` relies on ascending order; the log never goes back in a term
            raise ValueError(f"index {index} proposed after {next(reversed(self.inflight))}")
        self.inflight.setdefault(index, []).append((key, reply))
        self._pending.add(key)

    def answer(self, key: Key) -> tuple[bytes, float] | None:
        """The identity to answer ``key`` at and when it arrived, forgetting the request."""
        self._pending.discard(key)
        return self.route.pop(key, None)

    def forget(self, key: Key) -> None:
        """A queued request whose session ended: no answer will ever leave for it."""
        self.answer(key)

    def committed(self, upto: int) -> list[Released]:
        """Answers released by the commit of every index <= upto."""
        out: list[Released] = []
        # Indexes are proposed in ascending order, so the dict holds them in that order:
        # stop at the first one still uncommitted instead of scanning (and sorting) all.
        route, pending = self.route, self._pending
        for index in list(itertools.takewhile(lambda i: i <= upto, self.inflight)):
            for key, reply in self.inflight.pop(index):
                pending.discard(key)  # what answer() does, without a call per answer
                routed = route.pop(key, None)
                if routed is not None:
                    out.append((routed[0], key, reply, routed[1]))
        return out

    def abandon(self) -> list[tuple[bytes, Key]]:
        """The node lost control: every waiting client must ask the new primary."""
        out = [(identity, key) for key, (identity, _) in self.route.items()]
        self.route.clear()
        self.inflight.clear()
        self._pending.clear()
        return out
