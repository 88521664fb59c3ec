"""The faults of SPEC section 6, a seeded schedule of them, and their execution.

A schedule is a sequence of ``Step``s drawn from ``random.Random(seed)`` alone, so the
same seed and the same choice of kinds give the same schedule (the nodes a step hits
are chosen at run time among the nodes in the right role, by the step's ``pick``: the
same roles give the same node). The first steps go once through every kind chosen, in
a shuffled order, so even a short run sees each of them; the rest are drawn by weight,
kills of the primary most often.

``Nemesis.run(step)`` breaks the triad as the step says, recording a ``fault`` start,
one ``action`` per signal or restart (with the node's role just before, which is how
the checker knows which kills were failovers) and a ``fault`` end once the triad is
healed again: every node up, one primary serving, the backups caught up, and (with
failback) the highest-ranked node back in control. Every wait has a deadline; a node
left stopped or down by a failure is always resumed and started again by ``heal``.

Partitions (``CutKind``) need hosts (``zbroker.clients.testing.hosts``): the nemesis is then given
the run's ``Network`` and cuts links between the hosts instead of stopping processes.
Their actions: ``isolate`` (a node cut off from both other nodes; the role says whether
it was the primary: a failover is due), ``cut`` and ``heal`` of one link (``node`` is one
end, ``to`` the other, ``clients`` for the clients' host), and ``probe``: the observer
asked the cut-off primary alone for a seat once ``peer_timeout`` had passed since the cut,
its ``role`` field is what the node answered (``ok`` would be a grant it must not make).
``heal`` removes every cut left.
"""

from __future__ import annotations

import enum
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from zbroker.clients.testing.kit import TriadTimeout, wait_for


class FaultKind(enum.Enum):
    KILL_PRIMARY = "kill-primary"  # SIGKILL the primary, later start it again
    PAUSE_PRIMARY = "pause-primary"  # SIGSTOP it past peer_timeout, then SIGCONT
    KILL_BACKUP = "kill-backup"  # SIGKILL a backup, start it again: it catches up
    KILL_TWO = "kill-two"  # two nodes down (no quorum), then one back, then the other
    RESTART_ALL = "restart-all"  # every node killed and started, one after another
    WIPE = "wipe"  # a node killed, its data directory lost, started again
    KILL_ALL = "kill-all"  # all three killed, then started: grants come back from disk


class CutKind(enum.Enum):
    """Partitions: links between hosts cut, then healed (``--hosts`` only)."""

    CUT_PRIMARY = "cut-primary"  # the primary cut off from both backups; clients reach it
    CUT_BACKUP = "cut-backup"  # a backup cut off from every other host
    CUT_LINK = "cut-link"  # one link between two nodes
    FLAP_LINK = "flap-link"  # one link between two nodes cut and healed several times
    CUT_CLIENT = "cut-client"  # the clients' host cut off from the primary only


Kind = FaultKind | CutKind
ALL_KINDS: tuple[Kind, ...] = tuple(FaultKind)
PARTITION_KINDS: tuple[Kind, ...] = tuple(CutKind)
FLAPS = (3, 5)  # a flapping link is cut this many times (inclusive range)

# How often each kind is drawn after the first round; the primary's failure is the one
# the triad exists for, so most faults are that.
WEIGHTS = {
    FaultKind.KILL_PRIMARY: 8.0,
    FaultKind.PAUSE_PRIMARY: 2.5,
    FaultKind.KILL_BACKUP: 1.0,
    FaultKind.KILL_TWO: 0.5,
    FaultKind.RESTART_ALL: 0.3,
    FaultKind.WIPE: 0.6,
    FaultKind.KILL_ALL: 0.4,
    # Partitions, equally often: each is a different question to the election.
    CutKind.CUT_PRIMARY: 1.0,
    CutKind.CUT_BACKUP: 1.0,
    CutKind.CUT_LINK: 1.0,
    CutKind.FLAP_LINK: 1.0,
    CutKind.CUT_CLIENT: 1.0,
}

# Rough seconds a step takes on a loaded 2-core machine, quiet time included: the runner
# starts a step only if this much time is left, so a run ends within its duration.
ESTIMATE = {
    FaultKind.KILL_PRIMARY: 5.0,
    FaultKind.PAUSE_PRIMARY: 5.0,
    FaultKind.KILL_BACKUP: 4.0,
    FaultKind.KILL_TWO: 9.0,
    FaultKind.RESTART_ALL: 12.0,
    FaultKind.WIPE: 5.0,
    FaultKind.KILL_ALL: 7.0,
    CutKind.CUT_PRIMARY: 5.0,
    CutKind.CUT_BACKUP: 4.0,
    CutKind.CUT_LINK: 4.0,
    CutKind.FLAP_LINK: 5.0,
    CutKind.CUT_CLIENT: 4.0,
}

HEALTHY_LAG = 100  # deltas a backup may trail the primary by and count as caught up
STATUS_TIMEOUT = 0.3  # a live node answers status in milliseconds


class NemesisError(Exception):
    """A step could not be carried out (no primary to kill, say); the message says why."""


def parse_kinds(text: str) -> tuple[Kind, ...]:
    """``"kill-primary,cut-link"``, ``"all"`` (processes) or ``"partitions"`` -> kinds;
    ValueError names a bad one."""
    if text.strip() == "all":
        return ALL_KINDS
    if text.strip() == "partitions":
        return PARTITION_KINDS
    kinds: list[Kind] = []
    for name in (part.strip() for part in text.split(",")):
        try:
            kinds.append(FaultKind(name))
        except ValueError:
            try:
                kinds.append(CutKind(name))
            except ValueError:
                known = ", ".join(k.value for k in (*ALL_KINDS, *PARTITION_KINDS))
                raise ValueError(
                    f"unknown fault {name!r}; the faults are: {known}, all, partitions"
                ) from None
    if not kinds:
        raise ValueError("no fault named")
    return tuple(dict.fromkeys(kinds))


@dataclass(frozen=True)
class Step:
    number: int
    kind: Kind
    quiet: float  # seconds of plain load before the fault
    dwell: float  # seconds the node(s) stay down or paused
    dwell2: float  # kill-two: seconds between the first and the second node coming back
    pick: int  # chooses the node(s) among those in the right role

    def describe(self) -> str:
        extra = f", then {self.dwell2:.2f} s" if self.kind is FaultKind.KILL_TWO else ""
        return (
            f"#{self.number} {self.kind.value}: after {self.quiet:.2f} s quiet, "
            f"down {self.dwell:.2f} s{extra}, pick {self.pick}"
        )


def schedule(
    seed: int,
    kinds: Sequence[Kind] = ALL_KINDS,
    *,
    peer_timeout: float = 0.5,
    count: int | None = None,
) -> Iterator[Step]:
    """The steps for ``seed``: a shuffled round of every kind, then weighted draws.

    Kinds of equal weight (the partitions) go on in shuffled rounds instead of draws, so
    that every kind is applied as often as the others, give or take one.
    """
    if not kinds:
        raise ValueError("a schedule needs at least one kind of fault")
    rng = random.Random(seed)
    first = list(kinds)
    rng.shuffle(first)
    weights = [WEIGHTS[k] for k in kinds]
    rounds = len(kinds) > 1 and len(set(weights)) == 1
    for number in itertools.count(1) if count is None else range(1, count + 1):
        if rounds and number > len(first) and (number - 1) % len(first) == 0:
            rng.shuffle(first)  # the next round
        drawn = rng.choices(list(kinds), weights)[0] if number > len(first) and not rounds else None
        kind = first[(number - 1) % len(first)] if rounds else drawn or first[number - 1]
        if kind is FaultKind.PAUSE_PRIMARY:
            dwell = rng.uniform(2.0, 4.0) * peer_timeout  # well past the timeout
        elif kind is FaultKind.KILL_PRIMARY:
            dwell = rng.uniform(1.5, 3.0) * peer_timeout  # long enough to fail over
        elif kind is FaultKind.KILL_TWO:
            dwell = rng.uniform(1.0, 2.5)
        elif kind is FaultKind.RESTART_ALL:
            dwell = rng.uniform(0.1, 0.6)
        elif kind in (CutKind.CUT_PRIMARY, CutKind.CUT_BACKUP):
            dwell = rng.uniform(2.0, 4.0) * peer_timeout  # well past the timeout
        elif kind in (CutKind.CUT_LINK, CutKind.CUT_CLIENT):
            dwell = rng.uniform(1.0, 3.0) * peer_timeout
        elif kind is CutKind.FLAP_LINK:
            dwell = rng.uniform(0.2, 1.5) * peer_timeout  # each cut: some past the timeout
        else:
            dwell = rng.uniform(0.3, 1.5)
        # A partition heals within the step (the nemesis waits for it): less quiet after.
        quiet = rng.uniform(0.3, 1.0) if isinstance(kind, CutKind) else rng.uniform(0.5, 1.5)
        yield Step(
            number=number,
            kind=kind,
            quiet=quiet,
            dwell=dwell,
            dwell2=rng.uniform(0.5, 1.5),
            pick=rng.randrange(1_000_000),
        )


# --------------------------------------------------------------------------- execution


class Triad(Protocol):
    """What the nemesis needs of a triad: zbroker.clients.testing.kit.LocalTriad has it."""

    names: list[str]

    def start(self, *names: str) -> None: ...
    def kill(self, name: str) -> None: ...
    def pause(self, name: str) -> None: ...
    def resume(self, name: str) -> None: ...
    def wipe(self, name: str) -> None: ...
    def alive(self, name: str) -> bool: ...
    def status(self, timeout: float = 0.5) -> dict[str, Any]: ...


class Network(Protocol):
    """What the nemesis needs to cut links between nodes: ``hosts.HostTriad``."""

    @property
    def cuts(self) -> set[frozenset[str]]: ...  # the links cut now

    def cut(self, a: str, b: str) -> None: ...
    def heal(self, a: str, b: str) -> None: ...


Record = Callable[..., Any]  # Recorder.write
Probe = Callable[[str], str]  # node -> what it answered a checkout (HostTriad.probe)
CLIENTS = "clients"  # the clients' host (zbroker.clients.testing.hosts.CLIENTS)


@dataclass(frozen=True)
class Healed:
    ok: bool
    detail: str  # why not, or a remark (no failback in time)


class Nemesis:
    def __init__(
        self,
        triad: Triad,
        record: Record,
        *,
        failback: bool,
        heal_timeout: float = 15.0,
        deadline: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        abort: threading.Event | None = None,
        network: Network | None = None,
        probe: Probe | None = None,
        peer_timeout: float = 0.5,
    ) -> None:
        self.triad = triad
        self.network = network  # partitions need it
        self.probe = probe  # asks a cut-off primary for a seat
        self.peer_timeout = peer_timeout
        self.record = record
        self.failback = failback
        self.heal_timeout = heal_timeout
        self.deadline = deadline  # time.monotonic() past which no wait goes on
        self.sleep = sleep  # the runner passes one that wakes early when asked to stop
        self.abort = abort or threading.Event()  # set: stop waiting, the run is cut short
        self.paused: set[str] = set()
        self._fault = 0

    # --- the steps
    def run(self, step: Step) -> Healed:
        """Carry out one step, heal the triad, record it all; returns whether it healed."""
        self._fault = step.number
        roles = self.roles()
        self.record(
            "fault", fault=step.number, kind=step.kind.value, phase="start", detail=step.describe()
        )
        nodes: list[str] = []
        try:
            nodes = self._STEPS[step.kind](self, step, roles)
        except (NemesisError, TriadTimeout) as exc:
            healed = self.heal()
            detail = f"{exc}; {healed.detail}" if healed.detail else str(exc)
            self.record(
                "fault", fault=step.number, phase="end", healed=False, detail=detail, nodes=nodes
            )
            return Healed(False, detail)
        healed = self.heal()
        self.record(
            "fault",
            fault=step.number,
            phase="end",
            healed=healed.ok,
            detail=healed.detail,
            nodes=nodes,
        )
        return healed

    def _kill_primary(self, step: Step, roles: dict[str, str]) -> list[str]:
        primary = self._primary(roles)
        self._act("kill", primary, roles)
        self.sleep(step.dwell)
        self._act("start", primary, {})
        return [primary]

    def _pause_primary(self, step: Step, roles: dict[str, str]) -> list[str]:
        primary = self._primary(roles)
        self._act("pause", primary, roles)
        self.sleep(step.dwell)
        self._act("resume", primary, {primary: "paused"})
        return [primary]

    def _kill_backup(self, step: Step, roles: dict[str, str]) -> list[str]:
        backups = [n for n in self.triad.names if roles.get(n) == "backup"]
        if not backups:
            raise NemesisError(f"no backup to kill (roles: {roles})")
        backup = backups[step.pick % len(backups)]
        self._act("kill", backup, roles)
        self.sleep(step.dwell)
        self._act("start", backup, {})
        return [backup]

    def _kill_two(self, step: Step, roles: dict[str, str]) -> list[str]:
        pairs = list(itertools.combinations(self.triad.names, 2))
        pair = list(pairs[step.pick % len(pairs)])
        if step.pick // len(pairs) % 2:
            pair.reverse()  # which of the two comes back first
        for name in pair:
            self._act("kill", name, roles)
        self.sleep(step.dwell)
        self._act("start", pair[0], {})
        self._wait_primary()
        self.sleep(step.dwell2)
        self._act("start", pair[1], {})
        return pair

    def _restart_all(self, step: Step, roles: dict[str, str]) -> list[str]:
        names = list(self.triad.names)
        first = step.pick % len(names)
        order = names[first:] + names[:first]
        for i, name in enumerate(order):
            if i:
                healed = self.heal()
                if not healed.ok:
                    raise NemesisError(f"before restarting {name}: {healed.detail}")
                roles = self.roles()
            self._act("kill", name, roles)
            self.sleep(step.dwell)
            self._act("start", name, {})
        return order

    def _wipe(self, step: Step, roles: dict[str, str]) -> list[str]:
        name = self.triad.names[step.pick % len(self.triad.names)]
        self._act("kill", name, roles)
        self._act("wipe", name, {name: "down"})
        self.sleep(step.dwell)
        self._act("start", name, {})
        return [name]

    def _kill_all(self, step: Step, roles: dict[str, str]) -> list[str]:
        names = list(self.triad.names)
        for name in names:
            self._act("kill", name, roles)
        self.sleep(step.dwell)
        for name in names:
            self._act("start", name, {})
        return names

    # --- partitions
    def _net(self) -> Network:
        if self.network is None:
            raise NemesisError("partitions need hosts (zbroker chaos --hosts)")
        return self.network

    def _cut_primary(self, step: Step, roles: dict[str, str]) -> list[str]:
        primary = self._primary(roles)
        others = [n for n in self.triad.names if n != primary]
        t = self._isolate(primary, others, roles)
        # Once peer_timeout has passed it must grant nothing: ask it, early and late.
        self._sleep_until(t + self.peer_timeout * 1.1)
        self._probe(primary)
        self._sleep_until(t + step.dwell)
        self._probe(primary)
        self._heal_links(primary, others, roles)
        return [primary]

    def _cut_backup(self, step: Step, roles: dict[str, str]) -> list[str]:
        backups = [n for n in self.triad.names if roles.get(n) == "backup"]
        if not backups:
            raise NemesisError(f"no backup to cut off (roles: {roles})")
        backup = backups[step.pick % len(backups)]
        others = [n for n in self.triad.names if n != backup] + [CLIENTS]
        self._isolate(backup, others, roles)
        self.sleep(step.dwell)
        self._heal_links(backup, others, roles)
        return [backup]

    def _pair(self, step: Step) -> list[str]:
        pairs = list(itertools.combinations(self.triad.names, 2))
        return list(pairs[step.pick % len(pairs)])

    def _cut_link(self, step: Step, roles: dict[str, str]) -> list[str]:
        a, b = self._pair(step)
        self._link("cut", a, b, roles)
        self.sleep(step.dwell)
        self._link("heal", a, b, roles)
        return [a, b]

    def _flap_link(self, step: Step, roles: dict[str, str]) -> list[str]:
        a, b = self._pair(step)
        low, high = FLAPS
        flaps = low + step.pick // 7 % (high - low + 1)
        for i in range(flaps):
            if i:
                self.sleep(step.dwell2 / 3)  # up for a while between two cuts
            self._link("cut", a, b, roles)
            self.sleep(step.dwell * (0.5 + (step.pick >> i) % 3 / 2))  # 0.5x, 1x, 1.5x
            self._link("heal", a, b, roles)
        return [a, b]

    def _cut_client(self, step: Step, roles: dict[str, str]) -> list[str]:
        primary = self._primary(roles)
        self._link("cut", CLIENTS, primary, roles)
        self.sleep(step.dwell)
        self._link("heal", CLIENTS, primary, roles)
        return [primary]

    def _isolate(self, node: str, others: list[str], roles: dict[str, str]) -> float:
        net = self._net()
        for other in others:
            net.cut(node, other)
        t = time.monotonic()  # once every route is in: from here nothing passes
        self.record(
            "action",
            t=t,
            fault=self._fault,
            action="isolate",
            node=node,
            role=roles.get(node, "down"),
            to=others,
        )
        return t

    def _heal_links(self, node: str, others: list[str], roles: dict[str, str]) -> None:
        for other in others:
            self._link("heal", node, other, roles)

    def _link(self, action: str, a: str, b: str, roles: dict[str, str]) -> None:
        net = self._net()
        if action == "cut":
            net.cut(a, b)
        else:
            net.heal(a, b)
        t = time.monotonic()  # once the routes changed
        self.record(
            "action", t=t, fault=self._fault, action=action, node=a, role=roles.get(a, ""), to=b
        )

    def _probe(self, node: str) -> None:
        if self.probe is None:
            return
        t = time.monotonic()  # taken before the request is sent: the checker's bound
        outcome = self.probe(node)
        self.record("action", t=t, fault=self._fault, action="probe", node=node, role=outcome)

    def _sleep_until(self, t: float) -> None:
        self.sleep(max(0.0, t - time.monotonic()))

    _STEPS: dict[Kind, Callable[[Nemesis, Step, dict[str, str]], list[str]]] = {
        FaultKind.KILL_PRIMARY: _kill_primary,
        FaultKind.PAUSE_PRIMARY: _pause_primary,
        FaultKind.KILL_BACKUP: _kill_backup,
        FaultKind.KILL_TWO: _kill_two,
        FaultKind.RESTART_ALL: _restart_all,
        FaultKind.WIPE: _wipe,
        FaultKind.KILL_ALL: _kill_all,
        CutKind.CUT_PRIMARY: _cut_primary,
        CutKind.CUT_BACKUP: _cut_backup,
        CutKind.CUT_LINK: _cut_link,
        CutKind.FLAP_LINK: _flap_link,
        CutKind.CUT_CLIENT: _cut_client,
    }

    # --- actions
    def _act(self, action: str, name: str, roles: dict[str, str]) -> None:
        """Record then do one action; the record's time is taken just before the signal."""
        role = roles.get(name, "down")
        t = time.monotonic()
        if action == "kill":
            self.triad.kill(name)
            self.paused.discard(name)
        elif action == "pause":
            self.triad.pause(name)
            self.paused.add(name)
        elif action == "resume":
            self.triad.resume(name)
            self.paused.discard(name)
        elif action == "start":
            self.triad.start(name)
        elif action == "wipe":
            self.triad.wipe(name)
        else:
            raise NemesisError(f"unknown action {action!r}")
        self.record("action", t=t, fault=self._fault, action=action, node=name, role=role)

    # --- observing
    def roles(self) -> dict[str, str]:
        """Each node's role as it says itself (``down`` when it does not answer)."""
        report = self.triad.status(timeout=STATUS_TIMEOUT)
        roles = {}
        for node in report["nodes"]:
            role = str(node["role"])
            if role == "primary" and not node.get("serving", True):
                role = "primary-not-serving"
            roles[str(node["name"])] = role
        return roles

    def _primary(self, roles: dict[str, str]) -> str:
        for name, role in roles.items():
            if role == "primary":
                return name
        name = self._wait_primary()
        roles.update(self.roles())
        return name

    def _wait_primary(self) -> str:
        def serving() -> str | None:
            if self.abort.is_set():
                raise NemesisError("interrupted")
            roles = self.roles()
            return next((n for n, r in roles.items() if r == "primary"), None)

        return wait_for(serving, self._budget(), "a serving primary", every=0.05)

    def heal(self) -> Healed:
        """Heal every cut, resume and start every node, then wait until the triad is whole
        and caught up."""
        if self.network is not None:
            for link in sorted(sorted(c) for c in self.network.cuts):
                self._link("heal", link[0], link[1], {})
        for name in sorted(self.paused):
            self._act("resume", name, {name: "paused"})
        for name in self.triad.names:
            if not self.triad.alive(name):
                self._act("start", name, {})
        last: list[str] = ["no status yet"]

        def whole() -> bool:
            if self.abort.is_set():
                last[:] = ["interrupted"]
                return True
            problems = self._problems(self.triad.status(timeout=STATUS_TIMEOUT))
            last[:] = problems
            return not problems

        budget = self._budget()
        try:
            wait_for(whole, budget, "the triad to heal", every=0.05)
        except TriadTimeout:
            hard = [p for p in last if not p.startswith("failback")]
            text = "; ".join(last)
            if hard:
                return Healed(False, f"not healed after {budget:.1f} s: {text}")
            return Healed(True, text)
        if self.abort.is_set():
            return Healed(False, "interrupted")
        return Healed(True, "")

    def _budget(self) -> float:
        """How long a wait may take: the heal timeout, cut short by the run's deadline."""
        if self.deadline is None:
            return self.heal_timeout
        return max(0.5, min(self.heal_timeout, self.deadline - time.monotonic()))

    def _problems(self, report: dict[str, Any]) -> list[str]:
        nodes = report["nodes"]
        problems = []
        primaries = [n for n in nodes if n["role"] == "primary" and n.get("serving", True)]
        if len(primaries) != 1:
            problems.append(f"{len(primaries)} serving primaries")
        for n in nodes:
            if n["role"] not in ("primary", "backup"):
                problems.append(f"{n['name']} is {n['role']}")
            elif n.get("lag", 0) > HEALTHY_LAG:
                problems.append(f"{n['name']} trails by {n['lag']} deltas")
        if not problems and self.failback and primaries[0]["name"] != self.triad.names[0]:
            problems.append(f"failback: {self.triad.names[0]} has not taken control back")
        return problems
