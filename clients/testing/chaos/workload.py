"""One client process of a chaos run: several sessions checking seats out and in, recorded.

Run as ``python -m zbroker.clients.testing.chaos.workload SPEC.json`` by the runner (a
fresh interpreter, so no ZeroMQ context ever crosses a fork). Each session is a thread with its own
``LicenseClient`` (so its own triad session), and loops: check out a random feature
(sometimes queueing with ``wait``), hold the grant a random while, check it in. Every
call is recorded as an ``invoke`` before it and a ``complete`` after it; ``on_lost``
is recorded as it is called.

The runner steers the phases through standard input, one word a line:

    stop     finish the operation in hand, then hold what is held; print "ready"
    release  check in everything still held (phase "final"), close, print "done", exit
    quit     finish the operation in hand, close (the triad releases the rest), exit

Besides the ``sessions``, a *probe* session (numbered last) checks one seat of the
largest feature out and in without pause, so some checkout is always in flight.

End of input (the runner died, or is cleaning up) counts as ``quit``; the spec's
``deadline``, a ``time.monotonic()`` reading, ends the process whatever happens.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from zbroker.clients.client import LicenseClient
from zbroker.clients.errors import LicenseDenied, LicenseError, LicenseUnavailable, OutcomeUnknown
from zbroker.clients.grant import Grant
from zbroker.clients.testing.chaos.history import Recorder

FINAL_TRIES = 5  # check-ins at the end re-tried this often when "unavailable"
CLOSE_TIMEOUT = 1.0  # closing the clients at the end: the triad expires what is left


@dataclass(frozen=True)
class WorkloadSpec:
    process: int
    sessions: int
    endpoints: list[str]
    history: str  # path of this process's history file
    seed: int
    deadline: float  # time.monotonic() by which the process is done (then it closes, exits)
    op_timeout: float = 2.0  # the deadline of every call
    # feature -> (weight, largest count asked for); default_mix makes it from the license.
    mix: dict[str, tuple[float, int]] = field(
        default_factory=lambda: {"solver": (0.35, 1), "cad": (0.45, 4), "viewer": (0.2, 1)}
    )
    # One more session checking this feature out and in without pause, so that some
    # checkout is always being asked for: failover times then measure the triad, not
    # the moments when every other session is holding or queueing. None: no probe.
    probe: str | None = "viewer"
    wait_share: float = 0.3  # share of checkouts that queue
    wait_max: float = 1.5  # the longest queueing asked for
    hold_min: float = 0.05
    hold_max: float = 1.0
    max_held: int = 2  # grants a session holds at once
    think_max: float = 0.05  # pause between two operations

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def probe_spec(self) -> WorkloadSpec:
        """The probe session's behaviour: one seat, no queueing, held for moments."""
        if self.probe is None:
            raise ValueError("this workload has no probe")
        return replace(
            self,
            mix={self.probe: (1.0, 1)},
            wait_share=0.0,
            hold_min=0.0,
            hold_max=0.02,
            max_held=1,
            think_max=0.02,
        )

    @classmethod
    def from_json(cls, text: str) -> WorkloadSpec:
        raw = json.loads(text)
        raw["mix"] = {k: (float(w), int(c)) for k, (w, c) in raw["mix"].items()}
        return cls(**raw)


def default_mix(
    features: Mapping[str, int],
) -> tuple[dict[str, tuple[float, int]], str | None]:
    """A load for a license: contend on its two smallest features, sprinkle the largest.

    Returns the mix and the probe feature (the largest). For the demo license: solver
    (2 seats) and cad (15) contended, viewer (50) rarely, and the probe on viewer.
    """
    usable = sorted(((t, n) for n, t in features.items() if t > 0))
    if not usable:
        raise ValueError("the license grants no seats of any feature")
    mix: dict[str, tuple[float, int]] = {}
    for weight, (total, name) in zip((0.35, 0.45), usable[:2], strict=False):
        mix[name] = (weight, min(4, max(1, total // 3)))
    largest = usable[-1][1]
    if len(usable) > 2:
        mix[largest] = (0.2, 1)
    return mix, largest


@dataclass
class _Held:
    grant: Grant
    op: str  # the checkout's operation id
    id: int  # the grant id as acknowledged (the library may re-bind the object later)
    release_at: float
    lost: bool = False


class Session:
    def __init__(
        self,
        spec: WorkloadSpec,
        index: int,
        recorder: Recorder,
        stop: threading.Event,
        release: threading.Event,
        quit: threading.Event,
    ) -> None:
        self.spec = spec
        self.index = index
        self.rec = recorder
        self.stop = stop
        self.release = release
        self.quit = quit  # set with release: skip the final check-ins
        self.rng = random.Random(f"{spec.seed}/{spec.process}/{index}")
        self.user = f"chaos-p{spec.process}s{index}"
        self.held: list[_Held] = []
        self.lock = threading.Lock()  # guards held: on_lost comes on the library's thread
        self.holding = threading.Event()  # load stopped: what is held stays held
        self._early_lost: set[Grant] = set()  # named by on_lost before we recorded them
        self._seq = 0

    # --- the thread
    def run(self) -> None:
        self.rec.write("session", process=self.spec.process, session=self.index, user=self.user)
        try:
            client = LicenseClient(
                self.spec.endpoints,
                user=self.user,
                host="chaos",
                display=f":{self.index}",
                timeout=self.spec.op_timeout,
                on_lost=self._on_lost,
            )
        finally:
            self.holding.set()  # the runner must not wait for a session that never was
        self.holding.clear()
        try:
            self._load(client)
            self.holding.set()
            self.release.wait(max(0.0, self.spec.deadline - time.monotonic()))
            self._final(client)
        finally:
            self.holding.set()
            client.close(timeout=CLOSE_TIMEOUT)

    def _load(self, client: LicenseClient) -> None:
        spec = self.spec
        while not self.stop.is_set() and time.monotonic() < spec.deadline:
            now = time.monotonic()
            with self.lock:
                lost = [h for h in self.held if h.lost]
                due = [h for h in self.held if not h.lost and h.release_at <= now]
                active = len(self.held) - len(lost)
                next_due = min((h.release_at for h in self.held if not h.lost), default=None)
            if lost:
                self._checkin(client, lost[0], "load")
            elif due:
                self._checkin(client, due[0], "load")
            elif active < spec.max_held:
                self._checkout(client)
            elif next_due is not None:
                self.stop.wait(max(0.0, next_due - now))
                continue
            self.stop.wait(self.rng.uniform(0.0, spec.think_max))

    def _final(self, client: LicenseClient) -> None:
        if self.quit.is_set():
            return
        with self.lock:
            held = list(self.held)
        for h in held:
            for _ in range(FINAL_TRIES):
                if self.quit.is_set() or self.spec.deadline - time.monotonic() < 0.1:
                    return  # no time left: the runner is about to stop everything
                if self._checkin(client, h, "final") != "unavailable":
                    break

    # --- operations
    def _next_id(self) -> str:
        self._seq += 1
        return f"p{self.spec.process}s{self.index}#{self._seq}"

    def _checkout(self, client: LicenseClient) -> None:
        spec = self.spec
        names = list(spec.mix)
        feature = self.rng.choices(names, [spec.mix[n][0] for n in names])[0]
        count = self.rng.randint(1, spec.mix[feature][1])
        wait = (
            round(self.rng.uniform(0.1, spec.wait_max), 3)
            if self.rng.random() < spec.wait_share
            else None
        )
        hold = self.rng.uniform(spec.hold_min, spec.hold_max)
        op_id = self._next_id()
        self.rec.write(
            "invoke",
            id=op_id,
            process=spec.process,
            session=self.index,
            op="checkout",
            phase="load",
            feature=feature,
            count=count,
            wait=wait,
        )
        try:
            grant = client.checkout(feature, count=count, wait=wait)
        except LicenseError as exc:
            self._complete(op_id, exc)
            return
        except Exception as exc:  # a bug in the library: recorded, and the run goes on
            self._complete(op_id, exc)
            return
        with self.lock:  # on_lost takes it too: it sees the grant held, or not yet
            h = _Held(grant, op_id, grant.id, time.monotonic() + hold)
            self.held.append(h)
            self.rec.write(
                "complete",
                id=op_id,
                status="ok",
                grant={
                    "id": grant.id,
                    "feature": grant.feature,
                    "version": grant.version,
                    "count": grant.count,
                },
            )
            if grant in self._early_lost:
                # on_lost named it between the library's return and our bookkeeping:
                # record it again now that the checkout it belongs to is known.
                self._early_lost.discard(grant)
                h.lost = True
                self._write_lost([h])

    def _checkin(self, client: LicenseClient, h: _Held, phase: str) -> str:
        op_id = self._next_id()
        self.rec.write(
            "invoke",
            id=op_id,
            process=self.spec.process,
            session=self.index,
            op="checkin",
            phase=phase,
            grant=h.id,
            of=h.op,
            after_lost=h.lost,
        )
        status = "ok"
        left = self.spec.deadline - time.monotonic()
        try:
            client.checkin(h.grant, timeout=max(0.1, min(self.spec.op_timeout, left)))
        except Exception as exc:  # LicenseError, or a library bug: recorded either way
            status = self._complete(op_id, exc)
        else:
            self.rec.write("complete", id=op_id, status="ok")
        # "unavailable": nothing happened, the seats are still held: try again later,
        # even if on_lost came meanwhile (the session may live on and keep them).
        if status == "unavailable":
            h.release_at = time.monotonic() + 0.05
        else:
            with self.lock:
                if h in self.held:
                    self.held.remove(h)
        return status

    def _complete(self, op_id: str, exc: BaseException) -> str:
        reason: str | None
        if isinstance(exc, LicenseDenied):
            status, reason = "denied", exc.reason
        elif isinstance(exc, LicenseUnavailable):
            status, reason = "unavailable", exc.code
        elif isinstance(exc, OutcomeUnknown):
            status, reason = "unknown", None
        else:  # LeaseLost, ClientClosed, ProtocolError, a bug: definite, but not expected
            status, reason = "error", type(exc).__name__
        self.rec.write("complete", id=op_id, status=status, reason=reason, detail=str(exc))
        return status

    def _on_lost(self, grants: list[Grant]) -> None:
        with self.lock:  # written under it: a checkin of these grants is recorded after
            mine = {id(h.grant): h for h in self.held}
            known = [mine[id(g)] for g in grants if id(g) in mine]
            for h in known:
                h.lost = True
            if known:
                self._write_lost(known)
            self._early_lost.update(g for g in grants if id(g) not in mine)

    def _write_lost(self, held: list[_Held]) -> None:
        entries: list[dict[str, Any]] = [
            {
                "id": h.id,
                "feature": h.grant.feature,
                "count": h.grant.count,
                "of": h.op,
                "state": h.grant.state.value,
            }
            for h in held
        ]
        self.rec.write("lost", process=self.spec.process, session=self.index, grants=entries)


def _control(stop: threading.Event, release: threading.Event, quit: threading.Event) -> None:
    """Read the runner's words from standard input; end of input means ``quit``."""
    for line in sys.stdin:
        word = line.strip()
        if word == "stop":
            stop.set()
        elif word == "release":
            stop.set()
            release.set()
        elif word == "quit":
            break
    quit.set()  # before release: a session woken by release must see it
    stop.set()
    release.set()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m zbroker.clients.testing.chaos.workload SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    spec = WorkloadSpec.from_json(Path(argv[0]).read_text())
    stop, release, quit = threading.Event(), threading.Event(), threading.Event()
    threading.Thread(target=_control, args=(stop, release, quit), daemon=True).start()
    with Recorder(Path(spec.history)) as recorder:
        sessions = [Session(spec, i, recorder, stop, release, quit) for i in range(spec.sessions)]
        if spec.probe is not None:
            probe = Session(spec.probe_spec(), spec.sessions, recorder, stop, release, quit)
            sessions.append(probe)
        threads = [
            threading.Thread(target=s.run, name=f"session-{i}", daemon=True)
            for i, s in enumerate(sessions)
        ]
        for t in threads:
            t.start()
        for s in sessions:
            s.holding.wait(max(0.0, spec.deadline - time.monotonic()))
        print("ready", flush=True)
        for t in threads:
            t.join(max(0.0, spec.deadline - time.monotonic()) + CLOSE_TIMEOUT)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
