"""Real triads for tests: applications embedding ``clients`` can test against them too.

``LocalTriad`` writes a demo (``zbroker init``) into a folder, starts every node as a
real process (``python -m zbroker.broker run``) on free loopback ports, and offers what tests and
chaos runs need: wait for a primary, kill, pause, resume, restart, wipe a node's data.
Nothing here sleeps to synchronise: every wait is a condition polled until a deadline.

    with LocalTriad(tmp_path) as triad:
        triad.wait_for_primary()
        with LicenseClient(triad.license) as client:
            ...

Secure by default, like ``zbroker init``: CURVE on every socket, node keys on the
SERVER lines of ``triad.license``. So that code handed the bare ``triad.endpoints``
(in this process, or in processes it starts) still finds the nodes' keys, a running
secure triad puts its license file on ``ZBROKER_SERVER_KEYS`` (``zbroker.clients.licpath``) and
takes it off again in ``stop``. ``LocalTriad(..., secure=False)`` runs plain TCP.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class TriadTimeout(Exception):
    """A condition a test waited for did not come true in time."""


def wait_for(
    condition: Callable[[], T | None], timeout: float, what: str, every: float = 0.02
) -> T:
    """Poll ``condition`` until it returns something truthy; TriadTimeout after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TriadTimeout(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(every)  # polling interval of a condition with a deadline


def settled(call: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """``call`` retried across a failover until it answers: the library settles an
    unknown outcome itself (docs/client.md), so LicenseUnavailable and OutcomeUnknown
    only mean "not yet". Its result, or True when it returns nothing."""
    from zbroker.clients.errors import LicenseUnavailable, OutcomeUnknown

    def once() -> Any:
        try:
            return call() or True
        except (LicenseUnavailable, OutcomeUnknown):
            return None

    return wait_for(once, timeout, what)


class LocalTriad:
    def __init__(
        self,
        directory: Path,
        *,
        servers: int = 3,
        lease: float = 30.0,
        settings: dict[str, Any] | None = None,
        secure: bool = True,
    ) -> None:
        from zbroker.broker.config import load_config
        from zbroker.broker.demo import write_demo

        self.dir = Path(directory)
        self.config_path = write_demo(
            self.dir, servers=servers, lease=lease, force=True, secure=secure
        )
        if settings:
            _override(self.config_path, settings)
        self.config = load_config(self.config_path)
        self.names = [n.name for n in self.config.nodes]
        self.endpoints = [n.client for n in self.config.nodes]
        self.license = str(self.config.license_path)  # what a client needs, keys and all
        self._share_keys()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.paused: set[str] = set()  # by ``pause``, and not resumed, killed or started since
        self.logs = self.dir / "logs"
        self.logs.mkdir(exist_ok=True)

    # --- processes
    def start(self, *names: str) -> None:
        self._share_keys()
        for name in names or self.names:
            if name in self.procs and self.procs[name].poll() is None:
                continue
            self.paused.discard(name)
            logfile = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
            self.procs[name] = subprocess.Popen(
                self.command(name),
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal Ctrl-C is for the test, not the nodes
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            logfile.close()

    def command(self, name: str) -> list[str]:
        """The command line that starts node ``name`` (``zbroker run``)."""
        from zbroker.broker.cli import run_command

        return run_command(self.config_path, name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if sig in (signal.SIGSTOP, signal.SIGCONT):
            os.kill(proc.pid, sig)
            if sig == signal.SIGSTOP:
                self.paused.add(name)
            else:
                self.paused.discard(name)
            return
        proc.send_signal(sig)
        proc.wait(timeout=10)
        self.paused.discard(name)

    def pause(self, name: str) -> None:
        self.kill(name, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.kill(name, signal.SIGCONT)

    def restart(self, name: str) -> None:
        if self.alive(name):
            self.kill(name)
        self.start(name)

    def wipe(self, name: str) -> None:
        """Lose a stopped node's data directory, as a dead disk would."""
        if self.alive(name):
            raise RuntimeError(f"stop node {name} before wiping its data")
        data = self.config.node(name).data
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def stop(self) -> None:
        self._share_keys(False)
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # a paused node cannot act on SIGTERM
                proc.terminate()
        self.paused.clear()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> LocalTriad:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _share_keys(self, on: bool = True) -> None:
        """Put this triad's license on ZBROKER_SERVER_KEYS (or take it off)."""
        from zbroker.clients.licpath import KEYS_ENV

        if not self.config.secure:
            return
        mine = str(self.config.license_path)  # not self.license: subclasses skip __init__
        paths = [p for p in os.environ.get(KEYS_ENV, "").split(":") if p and p != mine]
        paths += [mine] if on else []
        if paths:
            os.environ[KEYS_ENV] = ":".join(paths)
        else:
            os.environ.pop(KEYS_ENV, None)

    @property
    def admin_key(self) -> Path | None:
        """The administrator's secret certificate (secure mode), for ``zbroker down``."""
        return self.config.admin_key

    # --- observing
    def status(self, timeout: float = 0.5, holders: bool = True) -> dict[str, Any]:
        """``zbroker.broker.status.query_nodes``: holders too unless ``holders`` is False.

        A node whose process this triad started and that has exited, or that it paused
        and has not resumed, cannot answer: it is not asked, and shows as down at once,
        as a silent node does after ``timeout`` (every poll of a wait with a node down or
        paused would otherwise last the whole timeout).
        """
        from zbroker.broker.cli import config_curve
        from zbroker.broker.status import query_nodes

        silent = set(self.paused)  # a copy: the chaos sampler asks from its own thread
        silent |= {name for name, proc in list(self.procs.items()) if proc.poll() is not None}
        return query_nodes(
            [(n.name, n.client) for n in self.config.nodes],
            timeout=timeout,
            curve=config_curve(self.config, admin=False),
            holders=holders,
            silent=silent,
        )

    def feature(self, name: str, report: dict[str, Any] | None = None) -> dict[str, Any]:
        """One feature of a status report: total, in use, queued, holders."""
        report = self.status() if report is None else report
        found: dict[str, Any] = next(f for f in report["features"] if f["name"] == name)
        return found

    def holders(self, feature: str, report: dict[str, Any] | None = None) -> list[tuple[str, int]]:
        """(user, seats) of each holder of ``feature``, sorted."""
        return sorted((h["user"], h["count"]) for h in self.feature(feature, report)["holders"])

    def primary(self) -> str | None:
        """The node that says it is primary and serving, if any."""
        report = self.status(holders=False)
        for node in report["nodes"]:
            if node["role"] == "primary" and node.get("serving", True):
                return str(node["name"])
        return None

    def wait_for_primary(self, timeout: float = 10.0, not_: str | None = None) -> str:
        def check() -> str | None:
            name = self.primary()
            return name if name is not None and name != not_ else None

        return wait_for(
            check, timeout, "a serving primary" + (f" other than {not_}" if not_ else "")
        )

    def log_text(self) -> str:
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            parts.append(f"===== {path.name}\n{path.read_text(errors='replace')[-20000:]}")
        return "\n".join(parts)


def _override(config_path: Path, settings: dict[str, Any]) -> None:
    """Rewrite top-level settings of a demo config (tests shorten timings and leases)."""
    settings = dict(settings)  # the caller's dict may serve another triad: never consumed
    lines = config_path.read_text().splitlines()
    out = []
    for line in lines:
        key = line.split("=", 1)[0].strip()
        if key in settings:
            value = settings.pop(key)
            line = f"{key} = {str(value).lower() if isinstance(value, bool) else value}"
        out.append(line)
    head = [f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]
    config_path.write_text("\n".join(head + out) + "\n")
