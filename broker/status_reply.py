"""The status requests of one loop cycle, answered together (SPEC 6: greedy clients).

Anyone who reaches the client port may ask for status, without a session, as often as
they like, and need never read the answers. So a status request must cost the node
little, and the same whatever the ledger holds or however many are queued:

- A reply holds the report (the nodes and each feature's summary: totals, in use,
  queued, lingering, borrowed, versions, the options file's reservations), whose size
  follows the license's and the options file's lines, not the grants. Holders
  come only when asked (``holders``), a page at a time: at most ``limit`` holders
  (``zbroker.broker.wire.HOLDERS_PAGE``) and ``HOLDERS_PAGE_BYTES`` of them, from the grant
  after the cursor ``after``, with the cursor of the next page in ``next``.
- The queue's waiters come with the holders, never in the summary: a page carries, in
  each feature it covers (``feature``, or every feature), ``queue``: the first
  ``QUEUE_SHOWN`` waiters in line, and at most ``QUEUE_BYTES`` of waiters in all (``queued``
  still counts every one). Lines, not the queue, size the summary.
- The node does not answer status requests as it reads them: it collects them here and
  answers all of one cycle after its drain. The report is built and packed once per
  cycle, and each request then costs its decode and one copy of those bytes. Each
  distinct page (feature, after, limit) is built once per cycle, at most
  ``PAGES_PER_CYCLE`` of them, and at most ``PAGE_REPLIES_PER_CYCLE`` replies carry a
  page: any other page request of that cycle gets ``error`` with code ``limit`` (ask
  again), so that a flood of page requests can neither hold the loop nor make it hold
  more than about a megabyte of pages at once.

Pure: no sockets and no clock; the node hands in its report and its ledger.
"""

from __future__ import annotations

from typing import Any

from zbroker.broker.ledger import Ledger
from zbroker.broker.model import ErrorCode, Request, reply_error
from zbroker.broker.wire import (
    HOLDERS_PAGE,
    HOLDERS_PAGE_BYTES,
    encode_reply,
    encode_status_reply,
    pack,
    pack_array_raw,
    pack_map_raw,
)

PAGES_PER_CYCLE = 4  # distinct pages of holders built per loop cycle: each costs ~1-3 ms
PAGE_REPLIES_PER_CYCLE = 16  # replies with a page per cycle: each is a copy of up to 64 KiB
QUEUE_SHOWN = 100  # waiters a page lists per feature, first in line first
QUEUE_BYTES = 32 * 1024  # packed waiters in one page, over every feature it lists
_BUSY = reply_error(
    ErrorCode.LIMIT,
    f"status: this node answers at most {PAGE_REPLIES_PER_CYCLE} requests for pages of holders "
    f"({PAGES_PER_CYCLE} different pages) at a time; ask again shortly",
)

PageKey = tuple[str, int, int]  # feature ("" for all), after, limit


class StatusReplies:
    """The status requests read in one cycle, until ``answer`` replies to them all."""

    def __init__(self) -> None:
        self._asks: list[tuple[bytes, Request]] = []

    def __bool__(self) -> bool:
        return bool(self._asks)

    def add(self, identity: bytes, request: Request) -> None:
        self._asks.append((identity, request))

    def answer(self, report: dict[str, Any], ledger: Ledger) -> list[list[bytes]]:
        """[identity, reply frame] for every request added since the last call."""
        asks, self._asks = self._asks, []
        summary: bytes | None = None
        pages: dict[PageKey, bytes] = {}
        paged = 0
        out: list[list[bytes]] = []
        for identity, request in asks:
            sid = request.sid or None
            if not request.holders:
                if summary is None:
                    summary = pack(report)
                out.append([identity, encode_status_reply(summary, sid, request.req)])
                continue
            key = (request.feature, request.after, request.limit)
            body = pages.get(key)
            if paged >= PAGE_REPLIES_PER_CYCLE or (body is None and len(pages) >= PAGES_PER_CYCLE):
                out.append([identity, encode_reply(_BUSY, sid, request.req)])
                continue
            if body is None:
                body = pages[key] = page(report, ledger, request)
            paged += 1
            out.append([identity, encode_status_reply(body, sid, request.req)])
        return out


def page(report: dict[str, Any], ledger: Ledger, request: Request) -> bytes:
    """The packed report with one page of holders (``holders``) and its ``next`` cursor."""
    limit = request.limit or HOLDERS_PAGE  # 0: a Request built without the wire's default
    found, cursor = ledger.holders(request.feature or None, request.after, limit)
    packed: list[bytes] = []
    size = 0
    for holder in found:
        data = pack(holder)
        if packed and size + len(data) > HOLDERS_PAGE_BYTES:
            cursor = found[len(packed) - 1]["grant"]  # the next page starts after the last kept
            break
        packed.append(data)
        size += len(data)
    features = with_queues(report["features"], ledger, request.feature or None)
    return pack_map_raw(
        {**report, "features": features, "next": cursor}, {"holders": pack_array_raw(packed)}
    )


def with_queues(
    features: list[dict[str, Any]], ledger: Ledger, only: str | None
) -> list[dict[str, Any]]:
    """The report's features, each of ``only`` (None: every one) with its ``queue``: its
    first QUEUE_SHOWN waiters, and QUEUE_BYTES of waiters over all features at most."""
    left = QUEUE_BYTES
    out = []
    for feature in features:
        if only is not None and feature["name"] != only:
            out.append(feature)
            continue
        shown = []
        for waiter in ledger.queue(feature["name"], QUEUE_SHOWN) if left > 0 else ():
            left -= len(pack(waiter))
            if left < 0:
                break
            shown.append(waiter)
        out.append({**feature, "queue": shown})
    return out
