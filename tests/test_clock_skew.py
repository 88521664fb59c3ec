"""Clocks and settings the triad must agree on, seen through heartbeats (broker/core.py).

A node whose wall clock both others agree is off does not stand for election (the
primary decides wall-time deadlines: linger, borrow, TIMEOUT), a primary whose clock
steps hands over, and with one peer heard nobody can tell which clock is wrong: a note,
no refusal. A setting of the triad's contract that differs between configs is logged
once, naming both values. Losing and regaining a primary is logged once each; the same
peer-connection line at most once per peer per ``CONNECTION_LOG_EVERY``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import pytest

from tests.test_core import CAD, NAMES, STEP, WALL, Net, config, replies, request
from tests.test_replica import Triad
from zbroker.broker.config import contract_notes
from zbroker.broker.core import (
    CLOCK_CONFIRM,
    CONNECTION_LOG_EVERY,
    MAX_CLOCK_SKEW,
    NodeCore,
    PeerClocks,
    PeerLost,
    Ready,
    judge_clocks,
)
from zbroker.broker.model import Now
from zbroker.broker.storage import Loaded
from zbroker.peers import messages
from zbroker.peers.types import Durable, Role, Send

pytestmark = pytest.mark.unit

HOURS_2 = 7200.0


@dataclass
class SkewedNet(Net):
    """``Net`` with each node's own wall clock: ``skew`` seconds off the true one."""

    skew: dict[str, float] = field(default_factory=dict)

    def at(self, name: str) -> Now:
        return Now(self.mono, WALL + self.mono + self.skew.get(name, 0.0))

    def cycle(self, name: str, *client: object) -> Ready:
        core = self.cores[name]
        now = self.at(name)
        for event in self.inbox.pop(name, []):
            core.step(event, now)
        for message in client:
            core.step(message, now)  # type: ignore[arg-type]
        ready = core.ready(now)
        self.post(name, ready)
        core.advance()
        self.last[name] = ready
        return ready

    def primary(self) -> str | None:
        up = [n for n, c in self.cores.items() if n not in self.cut and c.replica.serving]
        return up[0] if len(up) == 1 else None


def skewed_triad(skew: dict[str, float], names: tuple[str, ...] = NAMES) -> SkewedNet:
    cfg = config()
    cores = {
        n: NodeCore(cfg, n, CAD, Loaded(fresh=False), Now(100.0, WALL + 100.0 + skew.get(n, 0)),
                    mode="plain")
        for n in names
    }  # fmt: skip
    return SkewedNet(cores, skew=dict(skew))


def warnings(caplog: pytest.LogCaptureFixture, part: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and part in r.getMessage()
    ]


# --- the rule ---------------------------------------------------------------------------


def test_a_clock_both_others_agree_is_off_does_not_stand() -> None:
    verdict = judge_clocks({"beta": -HOURS_2, "gamma": -HOURS_2 + 0.2}, majority=2)
    assert not verdict.stands and verdict.far == {"beta", "gamma"}
    assert verdict.note is not None
    assert verdict.note.startswith("clock is 7199.9 s ahead of beta and gamma: this node will")


def test_one_peer_heard_or_peers_that_disagree_warn_and_still_stand() -> None:
    alone = judge_clocks({"beta": HOURS_2}, majority=2)
    assert alone.stands and alone.note is not None and "no third node" in alone.note
    split = judge_clocks({"beta": 10.0, "gamma": -10.0}, majority=2)
    assert split.stands and split.note is not None and "no two clocks agree" in split.note
    odd = judge_clocks({"beta": HOURS_2, "gamma": 0.2}, majority=2)
    assert odd.stands and odd.far == {"beta"} and odd.note is not None
    assert "gamma agrees with this node" in odd.note
    fine = judge_clocks({"beta": MAX_CLOCK_SKEW - 0.1, "gamma": 0.0}, majority=2)
    assert fine.stands and fine.note is None


def test_a_peer_offset_follows_this_nodes_own_step_and_ignores_a_late_heartbeat() -> None:
    clocks = PeerClocks()
    clocks.read("beta", WALL + 10.0, Now(10.0, WALL + 10.0))
    assert clocks.offset("beta", Now(10.5, WALL + 10.5)) == pytest.approx(0.0)
    # this node's clock steps: the offset moves at once, before beta's next heartbeat
    assert clocks.offset("beta", Now(10.6, WALL + 10.6 + HOURS_2)) == pytest.approx(-HOURS_2)
    # a heartbeat read 5 s late (this node paused) looks 5 s behind: not believed...
    clocks.read("beta", WALL + 11.0, Now(16.0, WALL + 16.0))
    assert clocks.offset("beta", Now(16.0, WALL + 16.0)) == pytest.approx(0.0)
    # ...but a clock set back stays back, and is believed once it lasted CLOCK_CONFIRM
    t = 16.0
    while t < 16.0 + 2 * CLOCK_CONFIRM:
        t += 0.1
        clocks.read("beta", WALL + t - 60.0, Now(t, WALL + t))
    assert clocks.offset("beta", Now(t, WALL + t)) == pytest.approx(-60.0)


def test_heartbeats_carry_wall_and_setup_and_older_ones_have_neither() -> None:
    hb = messages.Heartbeat(3, "beta", Role.BACKUP, 5, 3, 5, "alpha", True, WALL, {"lease": 30.0})
    assert messages.validate(hb.to_wire()) == hb
    old = hb.to_wire()
    del old["wall"], old["setup"]
    parsed = messages.validate(old)
    assert isinstance(parsed, messages.Heartbeat) and parsed.wall is None and parsed.setup is None
    # Advisory fields a node cannot read (a later version's) are unknown: the heartbeat's
    # term, role and standing still count.
    for bad in (float("nan"), -1.0, True, "now", 2.0**41):
        parsed = messages.validate({**hb.to_wire(), "wall": bad})
        assert parsed == dataclasses.replace(hb, wall=None)
    for setup, kept in (
        ({"lease": True}, {}),
        ({"lease": float("nan"), "heartbeat": 10.0}, {"heartbeat": 10.0}),
        ({1: "x"}, {}),
        ([1], None),
        ({"k": [1]}, {}),
    ):
        parsed = messages.validate({**hb.to_wire(), "setup": setup})
        assert parsed == dataclasses.replace(hb, setup=kept)


# --- a triad of cores -----------------------------------------------------------------


def test_a_node_two_hours_fast_never_leads_and_the_agreeing_two_elect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """n1, the highest rank, would stand first and take control back by failback."""
    net = skewed_triad({"n1": HOURS_2})
    with caplog.at_level(logging.WARNING, logger="zbroker.node"):
        net.run(4.0)
    assert net.primary() in ("n2", "n3")
    n1 = net.cores["n1"]
    assert n1.replica.role is Role.BACKUP and not n1.replica.stands
    said = warnings(caplog, "clock is 7200.0 s ahead of n2 and n3")
    assert len(said) == 1 and "will not stand for election" in said[0]
    own = n1.report(net.at("n1"))["nodes"][0]
    assert own["clocks"] == {
        "n2": pytest.approx(-HOURS_2, abs=0.1),
        "n3": pytest.approx(-HOURS_2, abs=0.1),
    }
    assert own["not_standing"] == own["clock"] == said[0]
    primary = net.cores[net.primary() or ""]
    assert "clock" in primary.report(net.at(primary.me.name))["nodes"][0]  # it names n1 too
    # the clock set right: n1 stands again, takes control back, and says so once
    net.skew["n1"] = 0.0
    with caplog.at_level(logging.WARNING, logger="zbroker.node"):
        net.run(4.0)
    assert net.primary() == "n1" and n1.replica.stands
    assert len(warnings(caplog, "clock agrees with n2 and n3 again")) == 1
    assert "clock" not in n1.report(net.at("n1"))["nodes"][0]


def test_a_skewed_node_that_rejoins_is_not_handed_control() -> None:
    """The prober's skew_failback: n1 comes back 2 h fast while n2 serves; failback would
    hand it control before it has heard both others (its own verdict needs both)."""
    net = skewed_triad({"n1": HOURS_2}, names=("n2", "n3"))
    net.run(2.0)
    assert net.primary() == "n2"
    n1 = NodeCore(config(), "n1", CAD, Loaded(fresh=False), net.at("n1"), mode="plain")
    net.cores = {"n1": n1, **net.cores}
    for _ in range(int(3.0 / STEP)):
        net.run(STEP)
        assert n1.replica.role is not Role.PRIMARY
    assert net.primary() == "n2" and net.cores["n2"].replica.shunned == {"n1"}


def test_a_primary_whose_clock_steps_stops_deciding_at_once_and_hands_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = skewed_triad({})
    assert net.serving() == "n1"
    net.run(0.5)
    net.skew["n1"] = HOURS_2
    net.mono += STEP
    # in the very cycle of the step: refused, before its ledger decides by that clock
    open_ = request(b"c", op="open", sid="s1", req=1, user="ann", host="ws1")
    with caplog.at_level(logging.WARNING, logger="zbroker.node"):
        ready = net.cycle("n1", open_)
        assert not net.cores["n1"].replica.is_serving(net.mono)
        net.run(3.0)
    ((_, reply),) = replies(ready)
    assert reply["status"] == "unavailable"
    assert net.primary() in ("n2", "n3") and net.cores["n1"].replica.role is Role.BACKUP
    assert len(warnings(caplog, "clock is 7200.0 s ahead of n2 and n3")) == 1


def test_with_one_peer_heard_a_clock_that_disagrees_is_no_reason_to_refuse(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = skewed_triad({"n1": HOURS_2})
    net.cut.add("n3")
    with caplog.at_level(logging.WARNING, logger="zbroker.node"):
        net.run(4.0)
    assert net.primary() in ("n1", "n2")  # either: nobody can tell which clock is wrong
    assert net.cores["n1"].replica.stands and net.cores["n2"].replica.stands
    assert len(warnings(caplog, "n2's clock is 7200.0 s behind this node's, and no third")) == 1


def test_a_setting_of_the_triads_contract_that_differs_is_logged_once_each_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """cfgchange.py port and lease_mismatch.py: n2's own copy of the config differs."""
    cfg = config()
    n2 = dataclasses.replace(cfg.nodes[1], peer="tcp://127.0.0.1:7999")
    theirs = dataclasses.replace(cfg, lease=5.0, nodes=(cfg.nodes[0], n2, cfg.nodes[2]))
    now = Now(100.0, WALL + 100.0)
    net = Net({
        n: NodeCore(theirs if n == "n2" else cfg, n, CAD, Loaded(fresh=False), now, mode="plain")
        for n in NAMES
    })  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="zbroker.node"):
        net.serving()
        net.run(2.0)
    said = warnings(caplog, "")
    at_n1 = (
        "n2 listens for peers at tcp://127.0.0.1:7999; this node's config says tcp://127.0.0.1:7101"
    )
    at_n2 = "n1's config says this node (n2) listens for peers at tcp://127.0.0.1:7101; it binds"
    lease = "n2's config sets lease = 5.0; this node's says 30.0"
    assert sum(at_n1 in s for s in said) == 2  # from n1 and n3, once each
    assert sum(at_n2 in s for s in said) == 1
    assert sum(lease in s for s in said) == 2
    (own,) = [e for e in net.cores["n1"].report(net.now)["nodes"] if e["name"] == "n1"]
    assert any(at_n1 in s for s in own["settings"])


def test_the_contract_notes_name_the_setting_both_values_and_what_to_fix() -> None:
    mine = config().contract()
    assert contract_notes("n1", "n2", mine, dict(mine)) == []
    theirs = {**mine, "peer.n3": "tcp://h:1", "heartbeat_interval": 0.2}
    notes = contract_notes("n1", "n2", mine, theirs)
    assert notes == [
        "n2's config sets heartbeat_interval = 0.2; this node's says 0.1: every node of the "
        "triad needs the same heartbeat_interval (a failover changes it): fix n2's config or "
        "this one's",
        "n2's config says n3 listens for peers at tcp://h:1; this node's says "
        "tcp://127.0.0.1:7102: fix [nodes.n3] in n2's config or this one's",
    ]


def test_losing_and_regaining_a_primary_is_logged_once_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = skewed_triad({})
    net.serving()
    with caplog.at_level(logging.WARNING, logger="zbroker.node"):
        net.cut |= {"n2", "n3"}
        net.run(5.0)
        lost = warnings(caplog, "lost quorum: checkouts unavailable")
        net.cut.clear()
        net.serving()
        net.run(1.0)
    assert len(lost) == 3  # once on each node: each hears no other
    assert all("hears no other node; a primary needs 2 of the 3 nodes up" in s for s in lost)
    again = warnings(caplog, "serving again")
    assert len(again) == 3 and all("checkouts were unavailable for" in s for s in again)


def test_a_peer_connection_line_is_logged_once_per_period_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = skewed_triad({})
    core = net.cores["n1"]
    with caplog.at_level(logging.INFO, logger="zbroker.node"):
        for _ in range(50):  # a key mismatch: 7-8 drops a second
            net.mono += 0.13
            core.step(PeerLost("n2"), net.now)
        net.mono += CONNECTION_LOG_EVERY
        core.step(PeerLost("n2"), net.now)
    lines = [r.getMessage() for r in caplog.records if "connection to n2" in r.getMessage()]
    assert lines[0] == "connection to n2 dropped"
    assert len(lines) == 2 and "more times since the last line" in lines[1]


# --- the replica: a primary never hands over to a peer its shell shuns ----------------


def test_a_primary_does_not_hand_over_to_a_shunned_peer() -> None:
    triad = Triad(down={"alpha"})
    triad.run(2.0)
    assert triad.serving() == ["beta"]
    triad.reps["beta"].shunned = frozenset({"alpha"})
    triad.restart("alpha", Durable())
    triad.run(3.0)
    sent = [e for e in triad.seen["beta"] if isinstance(e, Send) and e.msg["t"] == "timeout_now"]
    assert triad.serving() == ["beta"] and not sent
    triad.reps["beta"].shunned = frozenset()
    triad.run(3.0)
    assert triad.serving() == ["alpha"]
