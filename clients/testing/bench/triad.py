"""A triad for the bench: ``LocalTriad`` with a bench feature, and what the bench reads of it.

The demo license's features are small (15 seats of cad), which would measure
contention; the bench re-signs the demo license with one more line,
``FEATURE bench demo 1.0 permanent 1000000``, before the nodes start. Everything else
is the demo's defaults (heartbeat 100 ms, peer_timeout 500 ms, lease 30 s, failback
on), with ``fsync`` as asked, and plain TCP (``secure = false``) like the echo.

Status is asked with a raw DEALER, so that its time is the query's alone (no session
to open, no library thread): a summary, or every holder a page at a time (``holders``).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import zmq

import zbroker
from zbroker.broker.license import sign_license_text
from zbroker.broker.signing import load_private_key
from zbroker.clients.curve import generate_keypair, load_keypair, secure_client
from zbroker.clients.protocol import ErrorCode
from zbroker.clients.testing.bench.common import (
    BENCH_FEATURE,
    BENCH_SEATS,
    HeartbeatWatcher,
    ProcSample,
    frame,
    reply_of,
    sample,
)
from zbroker.clients.testing.bench.compiled import NotCompiled, maps_compiled, node_command
from zbroker.clients.testing.kit import LocalTriad


def _same_code() -> None:
    """Make node processes (``python -m zbroker.broker``) import the code this process imported.

    Without it they import whatever ``python -m`` finds first from their working
    directory: another checkout's editable install, say, which measures other code.
    """
    root = str(Path(zbroker.__file__).resolve().parent.parent)  # the folder holding zbroker/
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


class _NodesFrom(LocalTriad):
    """A ``LocalTriad`` whose nodes run the code of another tree: a compiled build
    (bench/compiled.py)."""

    def __init__(self, code: Path, directory: Path, **kwargs: Any) -> None:
        super().__init__(directory, **kwargs)
        self.code = code

    def command(self, name: str) -> list[str]:
        return node_command(self.code, super().command(name))


class BenchTriad:
    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool,
        lease: float = 30.0,
        secure: bool = False,
        settings: dict[str, Any] | None = None,
        code: Path | None = None,
    ) -> None:
        """``settings``: more top-level config settings (the snapshot bench's
        ``snapshot_every`` and ``max_sessions``); ``code``: a compiled tree for the nodes
        to run (``check_compiled`` says whether they do), else this process's own code."""
        _same_code()
        # plain TCP by default: the echo baseline has no CURVE either; ``secure`` gives the
        # CURVE triad that the throughput phase measures beside the plain one
        more = {"fsync": fsync, **(settings or {})}
        self.code = code
        self.local = (
            LocalTriad(directory, lease=lease, settings=more, secure=secure)
            if code is None
            else _NodesFrom(code, directory, lease=lease, settings=more, secure=secure)
        )
        self.fsync = fsync
        config = self.local.config
        text = config.license_path.read_text()
        text = text.rstrip("\n") + f"\nFEATURE {BENCH_FEATURE} demo 1.0 permanent {BENCH_SEATS}\n"
        key = load_private_key(self.local.dir / "keys" / "vendor.key")
        config.license_path.write_text(sign_license_text(text, key))
        self.names = self.local.names
        self.endpoint = {n.name: n.client for n in config.nodes}
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        # Z85 public key of each node's client socket (None in plain mode), for load DEALERs
        self.server_key = {n.name: n.public_key for n in config.nodes} if secure else {}
        curve = None
        if secure:
            if any(n.secret_key is None for n in config.nodes):
                raise RuntimeError("a secure triad's config names no secret key")
            curve = {n.name: load_keypair(n.secret_key) for n in config.nodes if n.secret_key}
        self.watch = HeartbeatWatcher(self.ctx, {n.name: n.pub for n in config.nodes}, curve)

    def __enter__(self) -> BenchTriad:
        self.local.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.local.stop()
        self.watch.close()
        self.ctx.destroy(linger=0)

    # --- observing
    def check_compiled(self) -> None:
        """NotCompiled unless every live node has the compiled tree's cores mapped."""
        if self.code is None:
            return
        for name in self.names:
            if self.local.alive(name) and not maps_compiled(self.pid(name), self.code):
                raise NotCompiled(f"node {name} does not run the compiled cores of {self.code}")

    def pid(self, name: str) -> int:
        return self.local.procs[name].pid

    def samples(self) -> dict[str, ProcSample]:
        return {name: sample(self.pid(name)) for name in self.names if self.local.alive(name)}

    def primary(self) -> str | None:
        """The node whose latest heartbeat says primary (fresh heartbeats only)."""
        self.watch.pump()
        for name in self.names:
            hb = self.watch.fresh(name)
            if hb is not None and hb.get("role") == "primary":
                return name
        return None

    def wait_whole(self, timeout: float) -> None:
        """Every node up and caught up, and the top-ranked node primary again (failback)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the triad did not become whole again")
            if self.wait_serving(left) == self.names[0]:
                return
            time.sleep(0.05)  # failback still in progress: poll again

    def wait_serving(self, timeout: float = 20.0) -> str:
        """A primary that says it serves, with every live node at its commit index.

        Asked with the bench's own status query (``status`` below), which needs no
        session.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            own = {}
            for name in self.names:
                if self.local.alive(name):
                    with contextlib.suppress(TimeoutError, RuntimeError):
                        own[name] = self.status(name, timeout=0.5)[2]["nodes"][0]
            serving = [n for n, o in own.items() if o.get("role") == "primary" and o.get("serving")]
            alive = [n for n in self.names if self.local.alive(n)]
            if len(serving) == 1 and len(own) == len(alive):
                head = own[serving[0]].get("commit")
                if all(o.get("commit") == head for o in own.values()):
                    return serving[0]
            time.sleep(0.05)  # polling a condition with a deadline
        raise TimeoutError(f"no serving, caught-up primary within {timeout:.0f} s")

    def status(self, name: str, timeout: float = 30.0) -> tuple[float, int, dict[str, Any]]:
        """Ask ``name`` for status: (seconds to the decoded reply, reply bytes, report)."""
        sock = self._dealer(name, timeout)
        try:
            started = time.monotonic()
            took, data, report = self._ask(sock, name, frame("status", "", 0, 0), timeout)
            return took - started, len(data), report
        finally:
            sock.close(linger=0)

    def holders(
        self, name: str, feature: str | None = None, timeout: float = 30.0
    ) -> tuple[float, int, int, list[dict[str, Any]]]:
        """Every holder ``name`` lists (of ``feature``), a page at a time over one connection:
        (seconds, reply bytes, pages, holders)."""
        sock = self._dealer(name, timeout)
        found: list[dict[str, Any]] = []
        size = pages = 0
        after: int | None = 0
        extra = {"feature": feature} if feature is not None else {}
        try:
            started = time.monotonic()
            while after is not None:
                ask = frame("status", "", pages + 1, 0, holders=True, after=after, **extra)
                _, data, report = self._ask(sock, name, ask, timeout)
                found += report.get("holders", [])
                size += len(data)
                pages += 1
                after = report.get("next")
            return time.monotonic() - started, size, pages, found
        finally:
            sock.close(linger=0)

    def _dealer(self, name: str, timeout: float) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # writable once connected: time the query alone
        if self.server_key.get(name):
            secure_client(sock, str(self.server_key[name]), generate_keypair())
        sock.connect(self.endpoint[name])
        if not sock.poll(int(timeout * 1000), zmq.POLLOUT):
            sock.close(linger=0)
            raise TimeoutError(f"cannot reach {name}")
        return sock

    def _ask(
        self, sock: zmq.Socket[bytes], name: str, request: bytes, timeout: float
    ) -> tuple[float, bytes, dict[str, Any]]:
        """(monotonic time of the decoded reply, its bytes, the report), asking again while
        the node says it builds other pages (code ``limit``)."""
        deadline = time.monotonic() + timeout
        while True:
            sock.send(request)
            if not sock.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
                raise TimeoutError(f"{name} did not answer status within {timeout:.0f} s")
            data = sock.recv()
            reply = reply_of(data)
            done = time.monotonic()
            report = reply.get("report")
            if reply.get("status") == "ok" and isinstance(report, dict):
                return done, data, report
            if reply.get("code") != ErrorCode.LIMIT or done >= deadline:
                raise RuntimeError(f"status of {name} failed: {reply.get('status')}")
            time.sleep(0.02)  # the node answers a few pages a cycle: ask again shortly
