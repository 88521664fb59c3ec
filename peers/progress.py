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

A backup that needs entries the log no longer holds gets the primary's image instead,
in chunks (``Transfer``): it is PROBING at the image's index until it acknowledges the
whole image with an ok append ack (match = the image's index), then streams from there.
The transfer keeps its image to the end, even if the primary takes a newer one meanwhile
(the log holds the entries after it: ``Log.compact``'s ``hold``), so that a large image
on a slow link is never restarted by compactions.
"""

from __future__ import annotations

from dataclasses import dataclass

from zbroker.peers.types import Image

SNAPSHOT_WINDOW = 4  # chunks of an image sent and not yet acknowledged, per backup


@dataclass
class Transfer:
    """The primary's image on its way to one backup, chunk by chunk, with flow control.

    Bytes [0, acked) are acknowledged (the backup holds them), [acked, sent) are in
    flight, at most ``SNAPSHOT_WINDOW`` chunks of ``chunk`` bytes
    (``Timing.snapshot_chunk``). Chunks start at multiples of ``chunk`` from 0, so the
    backup's acks fall on chunk boundaries.

    - An ack above ``acked`` is progress (the backup never acks what it does not hold).
    - An ack below ``acked`` is a refusal from a backup that lost what it held (it
      restarted): the transfer resends from the offset it names, once (the refusals
      of the other chunks in flight name the same offset: ``rewound``).
    - An ack at ``acked`` with chunks in flight is a refusal too: a chunk was lost (the
      chunks after it were refused) or one was a duplicate; the answer cannot tell
      which. It resends from there as above, but at most once per ``pause`` (a
      heartbeat interval): the resent chunks that the backup then holds already are
      refused in turn, and that would otherwise go on to the end of the transfer.
    - No ack for ``peer_timeout`` with chunks in flight: the transfer resends from
      ``acked`` (the acks or chunks were lost).
    """

    image: Image
    chunk: int
    progress_at: float  # when the backup last acknowledged bytes (or the transfer began)
    sent: int = 0
    acked: int = 0
    rewound: int = -1  # the offset of the last resend on a refusal, -1: none since progress
    rewound_at: float = float("-inf")

    def on_ack(self, offset: int, now: float, pause: float) -> None:
        if offset >= self.image.size:
            return  # the last chunk is answered by an append ack, never by this
        if offset > self.acked:
            self.acked, self.sent = offset, max(self.sent, offset)
            self.progress_at, self.rewound = now, -1
        elif (
            offset < self.sent
            and offset != self.rewound
            and (offset < self.acked or now - self.rewound_at >= pause)
        ):
            self.acked = self.sent = self.rewound = offset
            self.progress_at = self.rewound_at = now  # the backup answers: it is alive

    def due(self, now: float, timeout: float) -> list[tuple[int, bytes]]:
        """The chunks to send now: the window filled, from ``acked`` again if stalled."""
        if self.sent > self.acked and now - self.progress_at >= timeout:
            self.sent, self.progress_at, self.rewound = self.acked, now, -1
        chunks = []
        limit = min(self.image.size, self.acked + SNAPSHOT_WINDOW * self.chunk)
        while self.sent < limit:
            data = self.image.chunk(self.sent, self.chunk)
            chunks.append((self.sent, data))
            self.sent += len(data)
        return chunks


@dataclass
class Progress:
    """Replication state of one backup, kept by the primary for its term only."""

    next_index: int
    match: int = 0
    probing: bool = True
    probe_prev: int = -1  # prev_index of the outstanding probe, -1: none sent yet
    transfer: Transfer | None = None  # the image being sent, if the backup needs one
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
        if self.transfer is not None and self.match >= self.transfer.image.index:
            self.transfer = None  # the backup installed it (or holds all it covers)
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
