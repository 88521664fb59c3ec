"""One thread that asks the triad for its status and keeps the last answer.

The page's requests never talk to the triad: they render ``StatusPoller.latest``, so a
hundred browsers cost the nodes what one poller does. The poller asks at most every
``POLL_EVERY`` seconds, and never spends more than about a ``1 / SLOW_SHARE`` of its time
asking: a triad with many holders, whose pages take long to read, is asked less often.
The ZeroMQ sockets of each poll are made, used and closed in the poller's thread
(``fetch`` is ``zbroker.broker.status.query_nodes`` with the triad's endpoints and keys).

A failed poll keeps the last good status and says why it failed, so the page can show
both: what it last knew, and that it is no longer sure.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("zbroker.web")

POLL_EVERY = 2.0  # seconds between two polls of the triad, at the least
SLOW_SHARE = 5  # wait at least this many times what the last poll took


@dataclass(frozen=True)
class Snapshot:
    status: dict[str, Any] | None  # the last status read; None before the first
    read_at: float | None  # Unix time it was read
    error: str | None  # why the latest poll failed; None when it succeeded


def pause_after(took: float, every: float = POLL_EVERY) -> float:
    """Seconds to wait after a poll that took ``took`` seconds before the next one."""
    return max(every, SLOW_SHARE * took) - took


class StatusPoller:
    """Calls ``fetch`` in a thread of its own, from ``start`` until ``stop``."""

    def __init__(
        self,
        fetch: Callable[[], dict[str, Any]],
        *,
        every: float = POLL_EVERY,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetch = fetch
        self._every = every
        self._wall_clock = wall_clock  # Unix time: the page shows when the status was read
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Replaced whole, never changed: a reader in another thread sees one or the other.
        self.latest = Snapshot(None, None, None)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("this StatusPoller was started already")
        self._thread = threading.Thread(target=self._run, name="zbroker-web-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def poll_once(self) -> Snapshot:
        """Ask the triad once and keep the answer (the thread's step; tests call it too)."""
        try:
            status = self._fetch()
        except Exception as exc:  # a page that says why beats a dead poller
            log.warning("status poll failed", exc_info=True)
            self.latest = Snapshot(self.latest.status, self.latest.read_at, _why(exc))
        else:
            self.latest = Snapshot(status, self._wall_clock(), None)
        return self.latest

    def _run(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            self.poll_once()
            self._stopping.wait(pause_after(time.monotonic() - started, self._every))


def _why(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
