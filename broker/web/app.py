"""The web shell: a Starlette application over a ``StatusPoller``, run by uvicorn.

Routes: ``/`` the page (HTML, reloaded by the browser every ``REFRESH`` seconds) and
``/status.json`` the same ``Page`` as JSON. Both render the poller's last answer and
never talk to the triad themselves. The poller starts with the application (its
lifespan) and stops with it, on SIGINT or SIGTERM, which uvicorn handles. So does a
second poller, when nodes keep report logs this host can read: it reads their last
24 hours (``zbroker.broker.web.history``) every minute at most, in its own thread, and
the page draws its last reading.

``serve`` binds the listening socket itself, before uvicorn runs: so a port taken by
another program is one line and exit 2 from ``zbroker web``, and port 0 (the OS picks
one) can be told to whoever started it on the line ``serving on http://HOST:PORT/``.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from zbroker.broker.web.history import READ_EVERY, read_history
from zbroker.broker.web.model import Page, build_page
from zbroker.broker.web.poller import StatusPoller
from zbroker.broker.web.render import REFRESH, render_page

# Defence in depth beside autoescape: the page runs no script and loads nothing.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


NO_REPORT_LOG = (
    "No chart of the last 24 hours: it is drawn from the nodes' report logs (report_log "
    "in a node's config, docs/reportlog.md), and no node of the triad this page was "
    "started for keeps one (zbroker web --config C names them)."
)


def create_app(
    poller: StatusPoller,
    *,
    report_logs: Sequence[Path] = (),
    history_every: float = READ_EVERY,
    refresh: int = REFRESH,
    wall_clock: Callable[[], float] = time.time,
    tz: datetime.tzinfo | None = None,
) -> Starlette:
    """The application over ``poller``; ``report_logs``: the nodes' report log
    directories, read for the last 24 hours of use every ``history_every`` seconds at
    most, when there are any."""
    logs = list(report_logs)
    history = (
        StatusPoller(
            lambda: read_history(logs, wall_clock()).to_map(),
            every=history_every,
            wall_clock=wall_clock,
        )
        if logs
        else None
    )

    def page() -> Page:
        latest = poller.latest
        drawn, note = _history(history)
        return build_page(
            latest.status,
            read_at=latest.read_at,
            now=wall_clock(),
            error=latest.error,
            tz=tz,
            history=drawn,
            history_note=note,
        )

    async def html(request: Request) -> Response:
        return HTMLResponse(render_page(page(), refresh), headers=_HEADERS)

    async def as_json(request: Request) -> Response:
        return JSONResponse(page().to_json(), headers=_HEADERS)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pollers = [poller] if history is None else [poller, history]
        for each in pollers:
            each.start()
        try:
            yield
        finally:
            for each in pollers:
                each.stop()

    return Starlette(
        routes=[Route("/", html), Route("/status.json", as_json)],
        lifespan=lifespan,
    )


def _history(history: StatusPoller | None) -> tuple[dict[str, Any] | None, str | None]:
    """The last reading of the report logs, and what the page says about it."""
    if history is None:
        return None, NO_REPORT_LOG
    latest = history.latest
    if latest.status is None:
        if latest.error is None:
            return None, "Reading the nodes' report logs for the last 24 hours..."
        return None, f"The nodes' report logs cannot be read on this host: {latest.error}"
    if latest.error is not None:
        return latest.status, f"The last reading of the report logs failed: {latest.error}"
    return latest.status, None


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (OSError if it cannot be bound)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def serve(app: Starlette, sock: socket.socket, announce: Callable[[str], None]) -> None:
    """Run ``app`` on the bound ``sock`` until SIGINT or SIGTERM."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    announce(f"serving on http://{shown}:{port}/")
    server.run(sockets=[sock])
