"""The client front's bookkeeping: which client waits for which answer.

The primary answers a mutating request only once its delta is committed, and a queued
checkout only when ``Ledger.tick`` grants or refuses it, so answers leave later than
requests arrive. This module remembers, with no sockets and no clock:

- ``route``: the ZeroMQ identity a request ``(sid, req)`` last came from; a retry over
  another connection (after a failover, or a reconnect) updates it, so the answer goes
  where the client is now;
- ``inflight``: per log index, the requests whose answer that delta carries, with the
  answer; released when the index commits, or turned into redirects when the node loses
  control (the outcome is then unknown here, and the client re-asks the new primary,
  which answers from the replicated request table).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from broker.model import Reply

Key = tuple[str, int]  # (sid, req)


@dataclass
class Front:
    route: dict[Key, bytes] = field(default_factory=dict)
    inflight: dict[int, list[tuple[Key, Reply]]] = field(default_factory=dict)
    _pending: set[Key] = field(default_factory=set)  # proposed or queued, not answered

    def waiting(self, key: Key) -> bool:
        """True while an earlier copy of this request is queued or awaiting commit."""
        return key in self._pending

    def wait(self, key: Key, identity: bytes) -> None:
        self.route[key] = identity
        self._pending.add(key)

    def proposed(self, index: int, key: Key, reply: Reply) -> None:
        if self.inflight and index < next(reversed(self.inflight)):
            # ``committed`` relies on ascending order; the log never goes back in a term
            raise ValueError(f"index {index} proposed after {next(reversed(self.inflight))}")
        self.inflight.setdefault(index, []).append((key, reply))
        self._pending.add(key)

    def answer(self, key: Key) -> bytes | None:
        """The identity to answer ``key`` at, forgetting the request."""
        self._pending.discard(key)
        return self.route.pop(key, None)

    def forget(self, key: Key) -> None:
        """A queued request whose session ended: no answer will ever leave for it."""
        self.answer(key)

    def committed(self, upto: int) -> list[tuple[bytes, Key, Reply]]:
        """Answers released by the commit of every index <= upto."""
        out = []
        # Indexes are proposed in ascending order, so the dict holds them in that order:
        # stop at the first one still uncommitted instead of scanning (and sorting) all.
        for index in list(itertools.takewhile(lambda i: i <= upto, self.inflight)):
            for key, reply in self.inflight.pop(index):
                identity = self.answer(key)
                if identity is not None:
                    out.append((identity, key, reply))
        return out

    def abandon(self) -> list[tuple[bytes, Key]]:
        """The node lost control: every waiting client must ask the new primary."""
        out = [(identity, key) for key, identity in self.route.items()]
        self.route.clear()
        self.inflight.clear()
        self._pending.clear()
        return out
