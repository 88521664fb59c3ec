"""The simulation's clients: the library's own ``Link`` on the simulated clock and network.

Each ``SimClient`` is one application session of a chaos workload
(``clients/testing/chaos/workload.py``) run by the simulation instead of a thread: it
checks a random feature out (sometimes queueing with ``wait``), holds it a random while,
checks it in, one operation at a time, and checks in at once what the library reports
lost. Requests are encoded and replies decoded by the library's wire code inside its
pure ``Link`` (``clients/link.py``), which the simulation ticks with its clock and whose
frames it carries over its network; so the sessions, leases, heartbeats, retries,
redirects and re-checkouts are the library's, not a model of them.

Every operation is recorded as the chaos workload records it (``invoke`` before,
``complete`` when the library answers, ``lost`` when it reports grants lost), with the
simulated time, into a ``SimHistory`` that the chaos checker reads as it reads a run's
history file: one checker judges both.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from zbroker.clients.errors import LicenseDenied, LicenseUnavailable, OutcomeUnknown
from zbroker.clients.grant import Grant
from zbroker.clients.link import Link
from zbroker.clients.testing.chaos.history import History, read_history

OP_TIMEOUT = 2.0  # the deadline of every call, as the chaos workload's
TRY_TIMEOUT = 0.3  # the library's per-try timeout (clients/client.py)
FINAL_TRIES = 5  # final check-ins re-tried this often when "unavailable" (as the workload)

Send = Callable[[Link, int, bytes], bool]


class SimHistory:
    """The records of one seed's run, in the format of ``clients/testing/chaos/history.py``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, type_: str, t: float, **fields: Any) -> None:
        self.lines.append(json.dumps({"type": type_, "t": t, **fields}, separators=(",", ":")))

    def read(self, *, interrupted_at: float | None = None) -> History:
        """The history so far; ``interrupted_at`` reads it as a run cut off then (the
        checker then leaves the final status, convergence and the grants held out)."""
        lines = self.lines
        if interrupted_at is not None:
            cut = json.dumps({"type": "phase", "t": interrupted_at, "phase": "interrupted"})
            lines = [*lines, cut]
        return read_history(lines)


@dataclass(frozen=True)
class Mix:
    """What a client asks for: feature -> (weight, largest count)."""

    features: dict[str, tuple[float, int]]
    wait_share: float = 0.3
    wait_max: float = 1.0
    hold_min: float = 0.05
    hold_max: float = 1.0
    max_held: int = 2
    think_max: float = 0.05


@dataclass
class _Held:
    grant: Grant
    op: str  # the checkout's operation id
    id: int  # the grant id as acknowledged (the library may re-bind the grant later)
    release_at: float
    lost: bool = False


class _NoOwner:
    """The grants' owner (``LicenseClient`` in an application): never called here, since
    the simulation checks grants in through the link itself."""

    def checkin(self, grant: Grant, timeout: float | None = None) -> None:
        raise AssertionError("the simulation checks in through the link")


class SimClient:
    """One application session; ``process`` and ``session`` name it in the history."""

    def __init__(
        self,
        process: int,
        session: int,
        endpoints: tuple[str, ...],
        send: Send,
        history: SimHistory,
        rng: random.Random,
        mix: Mix,
        now: float,
    ) -> None:
        self.process, self.session = process, session
        self.name = f"c{process}.{session}"
        self.user = f"sim-{self.name}"
        self.history = history
        self.rng = rng
        self.mix = mix
        self.held: list[_Held] = []
        self.busy = False  # an operation in flight: the application waits for it
        self.answered = 0  # checkouts answered ok or denied: a serving primary decided them
        self.next_at = now
        self.final_left: list[_Held] | None = None  # the final check-ins still to make
        self.now = now  # of the event being handled: what a completion is recorded at
        self._seq = 0
        self._sids = 0
        self._final_tries = 0
        self.link = Link(
            0,
            endpoints,
            hello={"user": self.user, "host": "sim", "display": f":{process}"},
            send=send,
            report=self._on_lost,
            owner=_NoOwner(),
            new_sid=self._new_sid,
            try_timeout=TRY_TIMEOUT,
            recover_timeout=OP_TIMEOUT,
        )
        history.write("session", now, process=process, session=session, user=self.user)

    def _new_sid(self) -> str:
        self._sids += 1
        return f"{self.name}-{self._sids}"  # deterministic: a seed replays exactly

    # --- driven by the simulation
    def on_frame(self, node: int, frame: bytes, now: float) -> None:
        self.now = now
        self.link.on_frame(node, frame, now)

    def step(self, now: float, load: bool) -> None:
        """Tick the library, then do the application's next operation if it is time."""
        self.now = now
        self.link.tick(now)
        if self.busy or now < self.next_at:
            return
        if self.final_left is not None:
            if self.final_left:
                self._checkin(self.final_left[0], "final", now)
            return
        if not load:
            return
        lost = [h for h in self.held if h.lost]
        due = [h for h in self.held if not h.lost and h.release_at <= now]
        if lost:
            self._checkin(lost[0], "load", now)
        elif due:
            self._checkin(due[0], "load", now)
        elif len(self.held) < self.mix.max_held:
            self._checkout(now)

    def start_final(self) -> None:
        """Check in everything still held (phase ``final``), after the final status."""
        self.final_left = list(self.held)

    @property
    def final_done(self) -> bool:
        return self.final_left is not None and not self.final_left and not self.busy

    def crash(self, now: float) -> None:
        """The application dies: it holds nothing from now on (the triad expires the
        session when its lease runs out)."""
        if self.held:
            self._write_lost(self.held, now)
        self.held = []

    def on_disconnected(self, node: int, now: float) -> None:
        self.now = now
        self.link.on_disconnected(node, now)

    # --- operations
    def _next_id(self) -> str:
        self._seq += 1
        return f"p{self.process}s{self.session}#{self._seq}"

    def _checkout(self, now: float) -> None:
        mix, rng = self.mix, self.rng
        names = sorted(mix.features)
        feature = rng.choices(names, [mix.features[n][0] for n in names])[0]
        count = rng.randint(1, mix.features[feature][1])
        wait = round(rng.uniform(0.1, mix.wait_max), 3) if rng.random() < mix.wait_share else None
        hold = rng.uniform(mix.hold_min, mix.hold_max)
        op_id = self._next_id()
        self.history.write(
            "invoke", now, id=op_id, process=self.process, session=self.session,
            op="checkout", phase="load", feature=feature, count=count, wait=wait,
        )  # fmt: skip
        fut: Future[Any] = Future()
        fut.add_done_callback(lambda f: self._checkout_done(op_id, f, hold))
        self.busy = True
        self.link.checkout(
            fut,
            now,
            feature=feature,
            count=count,
            version=None,
            wait=wait,
            deadline=now + OP_TIMEOUT,
        )

    def _checkout_done(self, op_id: str, fut: Future[Any], hold: float) -> None:
        now = self.now  # the time of the event that settled it
        self.busy = False
        self.next_at = now + self.rng.uniform(0.0, self.mix.think_max)
        error = fut.exception()
        if error is not None:
            self._complete(op_id, error, now)
            return
        grant: Grant = fut.result()
        self.answered += 1
        self.held.append(_Held(grant, op_id, grant.id, now + hold))
        info = {"id": grant.id, "feature": grant.feature, "version": grant.version,
                "count": grant.count}  # fmt: skip
        self.history.write("complete", now, id=op_id, status="ok", grant=info)

    def _checkin(self, h: _Held, phase: str, now: float) -> None:
        op_id = self._next_id()
        self.history.write(
            "invoke", now, id=op_id, process=self.process, session=self.session,
            op="checkin", phase=phase, grant=h.id, of=h.op, after_lost=h.lost,
        )  # fmt: skip
        fut: Future[Any] = Future()
        fut.add_done_callback(lambda f: self._checkin_done(op_id, h, phase, f))
        self.busy = True
        self.link.checkin(fut, now, h.grant, now + OP_TIMEOUT)

    def _checkin_done(self, op_id: str, h: _Held, phase: str, fut: Future[Any]) -> None:
        now = self.now
        self.busy = False
        self.next_at = now + self.rng.uniform(0.0, self.mix.think_max)
        error = fut.exception()
        status = "ok" if error is None else self._complete(op_id, error, now)
        if error is None:
            self.history.write("complete", now, id=op_id, status="ok")
        if status == "unavailable":
            # nothing happened, the seats are still held: try again a little later
            h.release_at = now + 0.05
            if phase == "final":
                self._final_tries += 1
                if self._final_tries >= FINAL_TRIES and self.final_left:
                    self.final_left.pop(0)
                    self._final_tries = 0
            return
        if h in self.held:
            self.held.remove(h)
        if phase == "final" and self.final_left:
            self.final_left.pop(0)
            self._final_tries = 0

    def _complete(self, op_id: str, error: BaseException, now: float) -> str:
        """Record a failed call as the chaos workload does; returns its status."""
        reason: str | None
        if isinstance(error, LicenseDenied):
            status, reason = "denied", error.reason
            self.answered += 1
        elif isinstance(error, LicenseUnavailable):
            status, reason = "unavailable", error.code
        elif isinstance(error, OutcomeUnknown):
            status, reason = "unknown", None
        else:  # a protocol error or a bug: definite, but never expected here
            status, reason = "error", type(error).__name__
        self.history.write(
            "complete", now, id=op_id, status=status, reason=reason, detail=str(error)
        )
        return status

    def _on_lost(self, grants: list[Grant]) -> None:
        ids = {id(g) for g in grants}
        known = [h for h in self.held if id(h.grant) in ids and not h.lost]
        for h in known:
            h.lost = True
        if known:
            self._write_lost(known, self.now)

    def _write_lost(self, held: list[_Held], now: float) -> None:
        entries = [
            {"id": h.id, "feature": h.grant.feature, "count": h.grant.count, "of": h.op,
             "state": h.grant.state.value}
            for h in held
        ]  # fmt: skip
        self.history.write("lost", now, process=self.process, session=self.session, grants=entries)
