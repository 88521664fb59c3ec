"""The primary's view of one backup's log: how far it matches, what to send next.

States of one backup, as seen by the primary (etcd-raft calls them probe/replicate)::

    PROBING --ok ack covering the probe--> STREAMING
    STREAMING --reject (the backup lacks prev)--> PROBING

- PROBING: the primary does not know where the backup's log ends. It keeps exactly
  one append (or one snapshot) outstanding, resent every heartbeat, from
  ``next_index``; the reply places the backup.
- STREAMING: the backup's log matched at ``match``; appends are pipelined from
  ``next_index`` without waiting for acks, at most ``window`` entries in flight.

Rules:

- A stream with appends in flight and no ack progress over a whole heartbeat interval
  lost something (or the backup restarted): it goes back to probing from ``match``.
- ``match`` only grows while the backup keeps its disk, because a backup persists
  before it acks. A reject whose ``last`` is below ``match`` means the backup lost
  its disk (wiped): ``match`` falls back to what it reports.
- A reject for an append older than the current probe is stale and ignored, so a
  burst of rejects for pipelined appends after one loss costs one probe, not a storm.
- After a reject, ``next_index`` restarts just after what the backup certainly shares
  with the primary: the greater of ``match`` and the backup's commit.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Progress:
    """Replication state of one backup, kept by the primary for its term only."""

    next_index: int
    match: int = 0
    probing: bool = True
    probe_prev: int = -1  # prev_index of the outstanding probe, -1: none sent yet
    snapshot_sent_at: float = float("-inf")
    beat_match: int = -1  # match at the previous heartbeat, to see a stalled stream

    def beat(self) -> None:
        """A heartbeat: a stream that made no progress since the last one lost an append."""
        if not self.probing and self.in_flight() > 0 and self.match == self.beat_match:
            self.probing = True
            self.next_index = self.match + 1
        self.beat_match = self.match

    def acked(self, match: int) -> None:
        """An ok ack: the backup's log matches the primary's through ``match``."""
        self.match = max(self.match, match)
        if self.probing and self.match >= self.probe_prev:
            self.probing = False
        self.next_index = max(self.next_index, self.match + 1)

    def rejected(self, prev_index: int, last: int, commit: int) -> bool:
        """A reject: the backup lacks ``prev_index``. True when a new probe is due now."""
        if last < self.match:
            self.match = last  # the backup lost its disk; it holds only what it says
        elif prev_index < self.match:
            return False  # stale: answered an append the backup has since caught up past
        if self.probing and prev_index != self.probe_prev:
            return False  # an earlier pipelined append; the outstanding probe will place it
        self.probing = True
        self.next_index = max(self.match, min(commit, last)) + 1
        return True

    def in_flight(self) -> int:
        return self.next_index - self.match - 1
