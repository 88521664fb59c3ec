"""A chaos run: a triad, client processes under load, a schedule of faults, one history.

The run, in order (each phase is a ``phase`` record in the history):

1. start the triad (``LocalTriad`` in ``out/triad``, or the nodes of an existing config)
   and wait for a primary; record ``meta`` with the features' totals from its status;
2. ``load``: start the client processes (``python -m zbroker.clients.testing.chaos.workload``) and a
   sampler thread (the triad's status every ``sample_every`` seconds: who is primary,
   seats in use); apply the schedule's faults one after another while time is left;
3. ``hold``: heal the triad, tell the clients to stop and hold what they hold;
4. wait until the three nodes agree (same commit, same holders), then record each
   node's own view as ``final``;
5. ``final``: the clients check in everything and close; ``end``.

It stops by itself: no fault starts unless its estimated time fits before the load
ends, the load ends ``FINAL_RESERVE`` seconds before the duration is up, and every
later wait is cut at its own point before the deadline. ``request_stop`` (Ctrl-C,
SIGTERM) cuts a run short: no more faults, no final phase, an ``interrupted`` record.
Whatever happens, the ``finally`` block stops the client processes and every node,
and merges the per-process histories into ``out/history.jsonl``.

Hosts (``RunOptions.hosts``, ``zbroker chaos --hosts``): every node runs in a network
namespace of its own and the client processes in the clients' (``zbroker.clients.testing.hosts``),
the runner's status queries go through the observer's host, and the nemesis can cut
links (``CutKind``). Every namespace is deleted at the end, whatever happened.

Security: a secure triad's client keys reach the client processes the way
``LocalTriad`` shares them, through ``ZBROKER_SERVER_KEYS`` in the environment they
inherit; the status queries find them there too.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from zbroker.broker.config import ConfigError, load_config
from zbroker.broker.status import query_nodes
from zbroker.clients.testing.chaos.history import Recorder, merge_files
from zbroker.clients.testing.chaos.nemesis import (
    ALL_KINDS,
    ESTIMATE,
    Kind,
    Nemesis,
    Network,
    schedule,
)
from zbroker.clients.testing.chaos.workload import WorkloadSpec, default_mix
from zbroker.clients.testing.kit import LocalTriad, TriadTimeout

# The end of a run, counted back from its deadline (seconds before it):
FINAL_RESERVE = 10.0  # the load ends: hold, settle, final check-ins, shutdown follow
HEAL_BY = 7.0  # every wait for the triad to heal is over
HOLD_BY = 5.0  # the clients have stopped (in-flight calls end within their deadline)
SETTLE_BY = 3.0  # the final status is recorded
WORKERS_BY = 1.5  # the client processes' own deadline: then they close and exit
SETTLE_MIN = 1.5  # let the library settle unknown outcomes in the background first
TAIL = 1.0  # seconds of plain load after the last fault of a counted schedule
WORKER_QUIT = 6.0  # a client process told to quit: a call in hand (queueing), then close

Log = Callable[[str], None]


class RunError(Exception):
    """The run could not start (no primary, a bad config); the message says why."""


@dataclass(frozen=True)
class RunOptions:
    duration: float = 60.0  # the whole run, start to cleanup
    faults: tuple[Kind, ...] = ALL_KINDS
    count: int | None = None  # at most this many faults (None: as many as fit)
    processes: int = 2
    sessions: int = 4  # per process
    seed: int = 0
    out: Path | None = None  # where the history, logs and the triad go (None: a temp dir)
    config: Path | None = None  # run the nodes of this config instead of a fresh demo
    lease: float = 10.0  # the demo's client lease
    op_timeout: float = 2.0  # every client call's deadline
    sample_every: float = 0.25
    heal_timeout: float = 15.0
    settings: dict[str, Any] = field(default_factory=dict)  # demo config overrides
    hosts: bool = False  # nodes and clients in network namespaces of their own (root)


@dataclass
class RunResult:
    out: Path
    history: Path
    faults: int
    stopped_early: str = ""  # why faults stopped before the time was up, if they did
    interrupted: bool = False  # a signal cut the run short: no final phase


class ConfigTriad(LocalTriad):
    """The nodes of an existing config, run and broken the way LocalTriad does a demo's.

    Nothing is written into the config's folder except what the nodes write themselves;
    node logs go to ``logs``.
    """

    def __init__(self, config_path: Path, logs: Path) -> None:
        # LocalTriad.__init__ writes a demo; everything else of it works on these fields.
        self.config_path = config_path.resolve()
        self.dir = self.config_path.parent
        try:
            self.config = load_config(self.config_path)
        except ConfigError as exc:
            raise RunError(str(exc)) from None
        self.names = [n.name for n in self.config.nodes]
        self.endpoints = [n.client for n in self.config.nodes]
        self.license = str(self.config.license_path)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.paused: set[str] = set()
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)


def node_views(triad: LocalTriad, timeout: float = 0.5) -> dict[str, Any]:
    """Each node's own view (role, term, commit, features and holders); None if silent."""
    from zbroker.clients.testing.hosts import HostTriad

    views: dict[str, Any] = {}
    for node in triad.config.nodes:
        if isinstance(triad, HostTriad):  # asked from the observer's host
            report = triad.query([(node.name, node.client)], timeout=timeout)
        else:
            report = query_nodes([(node.name, node.client)], timeout=timeout)
        own = report["nodes"][0]
        if own["role"] == "down":
            views[node.name] = None
            continue
        views[node.name] = {
            "role": own["role"],
            "term": own.get("term"),
            "commit": own.get("commit"),
            "last": own.get("last"),
            "serving": own.get("serving"),
            "features": {
                f["name"]: {
                    "total": f["total"],
                    "in_use": f["in_use"],
                    "holders": [
                        {"grant": h["grant"], "user": h["user"], "count": h["count"]}
                        for h in f["holders"]
                    ],
                }
                for f in report["features"]
            },
        }
    return views


def _agree(views: dict[str, Any]) -> bool:
    live = list(views.values())
    if any(v is None for v in live) or not live:
        return False
    if sum(1 for v in live if v["role"] == "primary") != 1:
        return False
    if any(v["role"] not in ("primary", "backup") for v in live):
        return False
    first = live[0]
    return all(
        v["commit"] == first["commit"] and v["features"] == first["features"] for v in live[1:]
    )


def _prober(triad: LocalTriad, feature: str | None) -> Callable[[str], str] | None:
    """HostTriad.probe of ``feature`` (the workload's probe: the largest), None without hosts."""
    from zbroker.clients.testing.hosts import HostTriad

    if not isinstance(triad, HostTriad) or feature is None:
        return None
    return lambda node: triad.probe(node, feature)


class _Sampler(threading.Thread):
    def __init__(self, triad: LocalTriad, rec: Recorder, every: float) -> None:
        super().__init__(name="chaos-sampler", daemon=True)
        self.triad, self.rec, self.every = triad, rec, every
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            began = time.monotonic()
            try:
                report = self.triad.status(timeout=0.3)
            except Exception as exc:  # the sampler only observes: never end the run
                self.rec.write("sample", primary=None, roles={}, in_use={}, error=str(exc))
            else:
                nodes = {n["name"]: n for n in report["nodes"]}
                primary = report["primary"]
                serving = primary is not None and nodes[primary].get("serving", True)
                self.rec.write(
                    "sample",
                    t=began,
                    primary=primary if serving else None,
                    roles={name: n["role"] for name, n in nodes.items()},
                    in_use={f["name"]: f["in_use"] for f in report["features"]},
                )
            self.halt.wait(max(0.0, self.every - (time.monotonic() - began)))


class _Worker:
    """One client process, its control pipe, and a thread reading what it says."""

    def __init__(
        self, spec: WorkloadSpec, spec_path: Path, log_path: Path, prefix: list[str]
    ) -> None:
        spec_path.write_text(spec.to_json())
        self.spec = spec
        command = [sys.executable, "-m", "zbroker.clients.testing.chaos.workload", str(spec_path)]
        with open(log_path, "ab") as log:
            self.proc: subprocess.Popen[str] = subprocess.Popen(
                prefix + command,  # prefix: on the clients' host (ip netns exec), or none
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                # Not in the terminal's process group: a Ctrl-C meant for the runner must
                # not kill it mid-record; it ends through its pipe instead.
                start_new_session=True,
            )
        self.said = {"ready": threading.Event(), "done": threading.Event()}
        self._reader = threading.Thread(target=self._read, name="chaos-worker-out", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.proc.stdout
        if stdout is not None:
            for line in stdout:
                event = self.said.get(line.strip())
                if event is not None:
                    event.set()
        for event in self.said.values():
            event.set()  # it exited: nothing more to wait for

    def say(self, word: str) -> None:
        stdin: IO[str] | None = self.proc.stdin
        if stdin is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError):  # it exited meanwhile: BrokenPipeError
            stdin.write(word + "\n")
            stdin.flush()

    def stop(self, timeout: float) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # end of input: the worker finishes by itself
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(1.0)


def _wait_all(workers: list[_Worker], word: str, timeout: float) -> list[int]:
    """Wait for every worker to say ``word``; returns the processes that did not."""
    deadline = time.monotonic() + timeout
    for w in workers:
        w.said[word].wait(max(0.0, deadline - time.monotonic()))
    return [w.spec.process for w in workers if not w.said[word].is_set()]


class Runner:
    def __init__(self, options: RunOptions, log: Log = print) -> None:
        self.o = options
        self.log = log
        self.halt = threading.Event()  # set by request_stop (a signal handler, say)
        self.interrupted_at: float | None = None
        self.out = options.out or Path(tempfile.mkdtemp(prefix="zbroker-chaos-"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.parts = self.out / "parts"
        self.parts.mkdir(exist_ok=True)
        for stale in self.parts.glob("*.jsonl"):
            stale.unlink()  # a rerun into the same folder must not mix histories

    def request_stop(self) -> None:
        """Cut the run short (from a signal handler): no more faults, no final phase.

        A Ctrl-C in a terminal reaches the nodes too, so the triad cannot be trusted to
        answer a final status; the history records ``interrupted`` and the checker
        judges only what happened before.
        """
        if not self.halt.is_set():
            self.interrupted_at = time.monotonic()
        self.halt.set()

    def _sleep(self, seconds: float) -> None:
        self.halt.wait(seconds)

    def run(self) -> RunResult:
        o = self.o
        began = time.monotonic()
        deadline = began + o.duration
        load_end = deadline - FINAL_RESERVE
        history = self.out / "history.jsonl"
        triad: LocalTriad
        hosts = None
        network: Network | None = None  # the HostTriad: it cuts links by node name
        client_prefix: list[str] = []  # what starts a client process on the clients' host
        if o.hosts:
            from zbroker.clients.testing.hosts import Hosts, HostsError, HostTriad

            if o.config is not None:
                raise RunError("--hosts runs a fresh demo on its own hosts; not with --config")
            try:
                hosts = Hosts()
            except HostsError as exc:
                raise RunError(str(exc)) from None
            try:
                host_triad = HostTriad(
                    self.out / "triad", hosts, lease=o.lease, settings=dict(o.settings)
                )
            except BaseException:
                hosts.close()
                raise
            triad = network = host_triad
            client_prefix = host_triad.client_prefix
        elif o.config is not None:
            triad = ConfigTriad(o.config, self.out / "logs")
        else:
            triad = LocalTriad(self.out / "triad", lease=o.lease, settings=dict(o.settings))
        rec = Recorder(self.parts / "runner.jsonl")
        workers: list[_Worker] = []
        sampler: _Sampler | None = None
        result = RunResult(self.out, history, 0)
        try:
            triad.start()
            try:
                triad.wait_for_primary(timeout=min(20.0, o.duration / 2))
            except TriadTimeout as exc:
                raise RunError(f"{exc}; node logs in {triad.logs}") from None
            mix, probe = self._meta(triad, rec, began)
            rec.write("phase", phase="load")
            workers = self._start_workers(triad, deadline - WORKERS_BY, mix, probe, client_prefix)
            sampler = _Sampler(triad, rec, o.sample_every)
            sampler.start()
            nemesis = Nemesis(
                triad,
                rec.write,
                failback=triad.config.failback,
                heal_timeout=o.heal_timeout,
                deadline=deadline - HEAL_BY,
                sleep=self._sleep,
                abort=self.halt,
                network=network,
                probe=_prober(triad, probe),
                peer_timeout=triad.config.peer_timeout,
            )
            result.faults, result.stopped_early = self._faults(nemesis, triad, load_end)
            if self.interrupted_at is None:
                self._finish(nemesis, triad, rec, workers, deadline)
        finally:
            if self.interrupted_at is not None:
                result.interrupted = True
                rec.write("phase", t=self.interrupted_at, phase="interrupted")
            if sampler is not None:
                sampler.halt.set()
                sampler.join(2.0)
            for w in workers:  # end of input: they quit (calls in hand end by their deadline)
                w.stop(timeout=min(WORKER_QUIT, max(0.5, deadline - time.monotonic())))
            triad.stop()
            if hosts is not None:
                hosts.close()
            rec.write("phase", phase="end")
            rec.close()
            merge_files(sorted(self.parts.glob("*.jsonl")), history)
        return result

    # --- phases
    def _meta(
        self, triad: LocalTriad, rec: Recorder, began: float
    ) -> tuple[dict[str, tuple[float, int]], str | None]:
        report = triad.status()
        features = {f["name"]: f["total"] for f in report["features"]}
        try:
            mix, probe = default_mix(features)
        except ValueError as exc:
            raise RunError(f"{triad.config.license_path}: {exc}") from None
        rec.write(
            "meta",
            t=began,
            version=1,
            seed=self.o.seed,
            features=features,
            nodes=list(triad.names),
            peer_timeout=triad.config.peer_timeout,
            lease=triad.config.lease,
            failback=triad.config.failback,
            options={
                "duration": self.o.duration,
                "faults": [k.value for k in self.o.faults],
                "count": self.o.count,
                "processes": self.o.processes,
                "sessions": self.o.sessions,
                "op_timeout": self.o.op_timeout,
                "config": str(triad.config_path),
                "mix": mix,
                "probe": probe,
            },
        )
        return mix, probe

    def _start_workers(
        self,
        triad: LocalTriad,
        deadline: float,
        mix: dict[str, tuple[float, int]],
        probe: str | None,
        prefix: list[str],
    ) -> list[_Worker]:
        workers = []
        for p in range(self.o.processes):
            spec = WorkloadSpec(
                process=p,
                sessions=self.o.sessions,
                endpoints=list(triad.endpoints),
                history=str(self.parts / f"p{p}.jsonl"),
                seed=self.o.seed,
                deadline=deadline,
                op_timeout=self.o.op_timeout,
                mix=mix,
                probe=probe,
            )
            workers.append(
                _Worker(spec, self.out / f"worker-{p}.json", self.out / f"worker-{p}.log", prefix)
            )
        return workers

    def _faults(self, nemesis: Nemesis, triad: LocalTriad, load_end: float) -> tuple[int, str]:
        done = 0
        why = ""
        steps = schedule(
            self.o.seed, self.o.faults, peer_timeout=triad.config.peer_timeout, count=self.o.count
        )
        for step in steps:
            left = load_end - time.monotonic()
            if self.halt.is_set():
                why = "interrupted"
                break
            if left < step.quiet + ESTIMATE[step.kind]:
                break  # the next one would not fit: the run ends on time
            self._sleep(step.quiet)
            self.log(f"fault {step.describe()}")
            healed = nemesis.run(step)
            done += 1
            if self.halt.is_set():
                why = "interrupted"
                break
            if not healed.ok:
                why = f"fault #{step.number} ({step.kind.value}) did not heal: {healed.detail}"
                self.log(f"  {why}; no more faults")
                break
            if healed.detail:
                self.log(f"  healed, but: {healed.detail}")
        if why:
            return done, why  # a broken triad or a stop request: straight to the end
        if self.o.count is not None:
            self._sleep(min(TAIL, max(0.0, load_end - time.monotonic())))
        else:
            self._sleep(max(0.0, load_end - time.monotonic()))
        return done, why

    def _finish(
        self,
        nemesis: Nemesis,
        triad: LocalTriad,
        rec: Recorder,
        workers: list[_Worker],
        deadline: float,
    ) -> None:
        healed = nemesis.heal()
        if not healed.ok:
            self.log(f"the triad did not heal before the final status: {healed.detail}")
        rec.write("phase", phase="hold")
        for w in workers:
            w.say("stop")
        # In-flight calls finish within their deadline (plus a queueing wait).
        silent = _wait_all(workers, "ready", max(0.0, deadline - HOLD_BY - time.monotonic()))
        if silent:
            self.log(f"client processes {silent} did not stop in time")
        settle_by = deadline - SETTLE_BY
        self._sleep(min(SETTLE_MIN, max(0.0, settle_by - time.monotonic())))
        views: dict[str, Any] = {}
        previous: dict[str, Any] | None = None
        while True:
            views = node_views(triad)
            if _agree(views) and views == previous:
                break  # the same answer twice in a row: settled
            previous = views
            if time.monotonic() >= settle_by:
                self.log("the nodes did not agree before the final status was recorded")
                break
            time.sleep(0.1)  # polling a condition with a deadline
        primary = next((n for n, v in views.items() if v and v["role"] == "primary"), None)
        rec.write("final", primary=primary, nodes=views)
        rec.write("phase", phase="final")
        for w in workers:
            w.say("release")
        _wait_all(workers, "done", max(0.5, deadline - time.monotonic()))
