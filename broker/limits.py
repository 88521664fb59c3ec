"""Limits that keep one client, or one host, from filling a node's memory.

Pure decisions: each check takes the counts that matter and returns the ``error``
reply to send (code ``limit``, a sentence saying which limit and how to get under
it), or None to go on. The ledger asks them on the primary before it decides a
request; nothing is recorded for a refusal, so a retry later is decided afresh.

- ``max_message`` (in Config, 65,536 bytes): a larger client message makes the node
  drop the connection (``ZMQ_MAXMSGSIZE``);
- ``max_sessions`` (100,000): opening a session while this many are open;
- ``max_sessions_per_host`` (10,000): opening a session from a ``host`` that has this
  many open;
- ``max_queue`` (10,000): a checkout that would wait behind this many waiters of its
  feature;
- ``max_unacked`` (10,000): a request that records a reply, in a session holding this
  many replies it has not acknowledged;
- ``max_replies`` (1,000,000): a request that records a reply while the sessions
  together hold this many unacknowledged, from a session holding at least its share of
  them (``max_replies`` over the sessions open).

Each may be set from 1 to ``MAXIMA`` (1,000,000; ``max_replies`` 100,000,000).

The host is what the client says in ``open``: the per-host limit keeps an honest but
runaway host (a build farm spawning jobs) from taking every session; ``max_sessions``
is the bound that holds whatever a hostile client claims. ``max_unacked`` bounds the
per-session table of recorded replies, which a client that never advances ``ack``
would otherwise grow without end (the Python library acks as it goes); ``max_replies``
bounds all the tables together, which ``max_sessions`` times ``max_unacked`` (10^9
replies of a few hundred bytes each, on every node) does not. Only sessions at or past
their share are refused, so a client that fills the tables from many sessions stops
itself, not the sessions that ack as they go: once the total is reached, it grows only
through sessions under their share, so it stays under twice ``max_replies``.
"""

from __future__ import annotations

from dataclasses import dataclass

from zbroker.broker.model import ErrorCode, Reply, reply_error

# The most each limit may be set to: far above any site's need, and low enough that a
# typo of a few extra zeros cannot quietly take the protection away.
MAXIMA = {
    "max_sessions": 1_000_000,
    "max_sessions_per_host": 1_000_000,
    "max_queue": 1_000_000,
    "max_unacked": 1_000_000,
    "max_replies": 100_000_000,
}


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 100_000
    max_sessions_per_host: int = 10_000
    max_queue: int = 10_000
    max_unacked: int = 10_000
    max_replies: int = 1_000_000

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 1 <= value <= MAXIMA[name]
            ):
                raise ValueError(
                    f"{name} must be a whole number from 1 to {MAXIMA[name]}, not {value!r}"
                )

    def refuse_open(self, sessions: int, of_host: int, host: str) -> Reply | None:
        """Opening one more session, with ``sessions`` open, ``of_host`` of them from ``host``."""
        if sessions >= self.max_sessions:
            return _limit(f"{sessions} sessions are open, the most this triad keeps (max_sessions)")
        if of_host >= self.max_sessions_per_host:
            return _limit(
                f"host {host!r:.80} has {of_host} sessions open, the most one host may "
                "have (max_sessions_per_host); close some first"
            )
        return None

    def refuse_queue(self, feature: str, waiting: int) -> Reply | None:
        """Queueing one more checkout of ``feature`` behind ``waiting`` waiters."""
        if waiting >= self.max_queue:
            return _limit(
                f"{waiting} checkouts already wait for {feature!r:.80} (max_queue); "
                "try again later or without wait"
            )
        return None

    def refuse_unacked(self, sid: str, unacked: int) -> Reply | None:
        """A request that records a reply, in a session with ``unacked`` replies kept."""
        if unacked >= self.max_unacked:
            return _limit(
                f"session {sid} holds {unacked} replies it has not acknowledged "
                "(max_unacked); send ack with the lowest request you may still retry"
            )
        return None

    def refuse_replies(self, sid: str, unacked: int, total: int, sessions: int) -> Reply | None:
        """The same request, with ``total`` replies unacknowledged over ``sessions``."""
        share = max(1, self.max_replies // max(1, sessions))
        if total >= self.max_replies and unacked >= share:
            return _limit(
                f"the sessions hold {total} replies they have not acknowledged (max_replies), "
                f"and session {sid} holds {unacked}, at least its share ({share}); send ack "
                "with the lowest request you may still retry"
            )
        return None


def _limit(detail: str) -> Reply:
    return reply_error(ErrorCode.LIMIT, detail)
