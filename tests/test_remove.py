"""``zbroker remove`` in the ledger: who is taken, min_remove, the ``take`` delta and what
the session remembers of it (broker/removal.py, broker/ledger.py), with a fake clock."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import msgpack
import pytest
from click.testing import CliRunner

from tests.test_core import CAD, NAMES, STEP, WALL, Net, Origin, opened, replies, request
from tests.test_core import config as core_config
from tests.test_ledger import HEARTBEAT, LEASE, World, ent, grant_of
from zbroker.broker.cli import main
from zbroker.broker.core import ClientMessage, NodeCore
from zbroker.broker.ledger import Ledger, LedgerError
from zbroker.broker.model import Now
from zbroker.broker.options import parse_options
from zbroker.broker.removal import Removal, decide_removal
from zbroker.broker.seats import TAKEN_KEPT
from zbroker.broker.storage import Loaded
from zbroker.broker.wire import PROTOCOL_VERSION, RemoteProtocolError, decode_request, pack
from zbroker.clients.errors import LeaseLost
from zbroker.clients.grant import Grant as ClientGrant

pytestmark = pytest.mark.unit

MIN = 120.0


def world() -> World:
    w = World([ent(count=10), ent(feature="solver", count=10)])
    w.send("open", "ann1", user="ann", host="ws1", display=":0", client_version="1")
    w.send("open", "ann2", user="ann", host="ws2", display=":0", client_version="1")
    w.send("open", "ann3", user="ann", host="ws1", display=":1", client_version="1")
    w.send("open", "bob1", user="bob", host="ws1", display=":0", client_version="1")
    return w


def remove(w: World, **what: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Decide a removal and apply its deltas, as the primary does."""
    deltas, reply = decide_removal(w.ledger, Removal(**what), w.now, MIN)
    for delta in deltas:
        w.ledger.apply(delta)
        w.log.append(delta)
    return deltas, dict(reply)


def held(w: World) -> dict[str, set[int]]:
    return {sid: set(w.ledger.session(sid).grants) for sid in w.ledger.sessions()}  # type: ignore[union-attr]


def out_four(w: World) -> dict[str, int]:
    ids = {sid: grant_of(w.checkout(sid))["id"] for sid in ("ann1", "ann2", "ann3", "bob1")}
    w.advance(MIN)
    return ids


@pytest.mark.parametrize(
    ("what", "gone"),
    [
        ({"user": "ann"}, {"ann1", "ann2", "ann3"}),
        ({"user": "ann", "host": "ws1"}, {"ann1", "ann3"}),
        ({"user": "ann", "host": "ws1", "display": ":1"}, {"ann3"}),
        ({"user": "bob", "host": "ws2"}, set()),
        ({"user": "carl"}, set()),
    ],
)
def test_remove_by_user_host_display_takes_exactly_those(
    what: dict[str, str], gone: set[str]
) -> None:
    w = world()
    ids = out_four(w)
    deltas, reply = remove(w, **what)
    assert reply["status"] == "ok"
    assert sorted(reply["taken"]) == sorted(ids[s] for s in gone)
    assert [d["k"] for d in deltas] == ["take"] * len(gone)
    assert all(d["reason"] == "removed" and d["at"] == w.wall for d in deltas)
    assert w.ledger.in_use("cad") == 4 - len(gone)
    for sid, grants in held(w).items():
        assert grants == (set() if sid in gone else {ids[sid]})
    if not gone:
        assert "no grant" in reply["detail"]


def test_remove_by_grant_id_takes_that_grant_only() -> None:
    w = world()
    ids = out_four(w)
    _, reply = remove(w, grant=ids["ann2"])
    assert reply["taken"] == [ids["ann2"]]
    assert held(w)["ann2"] == set() and held(w)["ann1"] == {ids["ann1"]}
    _, again = remove(w, grant=ids["ann2"])
    assert again["taken"] == [] and again["detail"] == f"grant {ids['ann2']} is not out"


def test_a_feature_narrows_a_removal() -> None:
    w = world()
    cad = grant_of(w.checkout("ann1"))["id"]
    solver = grant_of(w.checkout("ann1", feature="solver"))["id"]
    w.advance(MIN)
    _, reply = remove(w, user="ann", feature="solver")
    assert reply["taken"] == [solver]
    assert held(w)["ann1"] == {cad}


def test_a_grant_younger_than_min_remove_is_left_and_listed() -> None:
    w = world()
    old = grant_of(w.checkout("ann1"))["id"]
    w.advance(MIN - 20)
    young = grant_of(w.checkout("ann1"))["id"]
    w.advance(20)  # old is exactly MIN old, young 20 s
    deltas, reply = remove(w, user="ann")
    assert reply["taken"] == [old]
    assert reply["young"] == [{"grant": young, "age": 20.0}]
    assert reply["min_remove"] == MIN and "younger than min_remove" in reply["detail"]
    assert [d["grant"] for d in deltas] == [old]
    w.advance(MIN)
    _, later = remove(w, user="ann")
    assert later["taken"] == [young]


@pytest.mark.parametrize(
    ("what", "why"),
    [
        ({}, "needs a grant id or a user"),
        ({"host": "ws1"}, "needs a grant id or a user"),
        ({"user": "ann", "display": ":0"}, "needs the host too"),
        ({"grant": 3, "user": "ann"}, "not both"),
    ],
)
def test_an_unclear_removal_is_a_bad_request(what: dict[str, Any], why: str) -> None:
    w = world()
    out_four(w)
    deltas, reply = remove(w, **what)
    assert deltas == [] and reply["status"] == "error" and reply["code"] == "bad_request"
    assert why in reply["detail"] and w.ledger.in_use("cad") == 4


def test_the_freed_seat_serves_a_waiter_at_the_next_tick() -> None:
    w = World([ent(count=1)])
    w.open("s1", user="ann")
    w.open("s2", user="bob")
    grant_of(w.checkout("s1"))
    assert w.checkout("s2", wait=600) is None  # queued
    w.advance(MIN)
    w.send("heartbeat", "s1")
    w.send("heartbeat", "s2")  # no tick since: the leases are renewed, none lapsed
    remove(w, user="ann")
    granted = [d for d in w.tick() if d["k"] == "grant"]
    assert [d["sid"] for d in granted] == ["s2"]


# ---------------------------------------------------------------- the take delta


def test_take_remembers_why_and_the_heartbeat_says_so_every_time() -> None:
    w = world()
    ids = out_four(w)
    remove(w, user="ann", host="ws2")
    assert w.ledger.session("ann2").taken == {ids["ann2"]: "removed"}  # type: ignore[union-attr]
    for _ in range(2):  # repeated until the session ends: the library reports it once
        reply = w.send("heartbeat", "ann2")
        assert reply == {"status": "ok", "lease": LEASE,
                         "taken": [{"grant": ids["ann2"], "reason": "removed"}]}  # fmt: skip
    assert w.send("heartbeat", "ann1") == {"status": "ok", "lease": LEASE}


def test_a_checkin_of_a_taken_grant_is_not_held() -> None:
    w = world()
    ids = out_four(w)
    remove(w, grant=ids["ann1"])
    reply = w.send("checkin", "ann1", grant=ids["ann1"])
    assert reply is not None and reply["status"] == "denied" and reply["reason"] == "not_held"


def test_a_session_remembers_only_the_last_taken_grants() -> None:
    w = World([ent(count=TAKEN_KEPT + 10)])
    w.open("s1")
    for _ in range(TAKEN_KEPT + 5):
        gid = grant_of(w.checkout("s1"))["id"]
        w.ledger.apply({"k": "take", "grant": gid, "reason": "timeout", "at": w.wall})
    taken = w.ledger.session("s1").taken  # type: ignore[union-attr]
    assert len(taken) == TAKEN_KEPT
    assert min(taken) == 6 and max(taken) == TAKEN_KEPT + 5


@pytest.mark.parametrize(
    "delta",
    [
        {"k": "take", "grant": 99, "reason": "removed", "at": 1.0},
        {"k": "take", "grant": 1, "reason": "bored", "at": 1.0},
        {"k": "take", "grant": 1, "reason": ["removed"], "at": 1.0},
        {"k": "take", "grant": "1", "reason": "removed", "at": 1.0},
    ],
)
def test_a_take_that_does_not_fit_changes_nothing(delta: dict[str, Any]) -> None:
    w = world()
    grant_of(w.checkout("ann1"))
    before = w.ledger.snapshot()
    with pytest.raises(LedgerError):
        w.ledger.apply(delta)
    assert w.ledger.snapshot() == before


def test_taken_survives_a_snapshot_and_a_backup_applies_the_same() -> None:
    w = world()
    ids = out_four(w)
    backup = Ledger([], lease=LEASE, heartbeat=HEARTBEAT)
    backup.apply(w.ledger.reload_delta(w.ledger.entitlements))
    remove(w, user="ann")
    for delta in w.log:
        backup.apply(msgpack.unpackb(msgpack.packb(delta), raw=False, strict_map_key=True))
    assert backup.snapshot() == w.ledger.snapshot()
    wire = msgpack.unpackb(msgpack.packb(w.ledger.snapshot()), raw=False, strict_map_key=True)
    again = Ledger.from_snapshot(wire, lease=LEASE, heartbeat=HEARTBEAT)
    assert again.snapshot() == w.ledger.snapshot()
    assert again.session("ann1").taken == {ids["ann1"]: "removed"}  # type: ignore[union-attr]
    assert again.in_use("cad") == 1


def test_a_snapshot_with_a_malformed_taken_list_is_refused() -> None:
    w = world()
    snap = w.ledger.snapshot()
    snap["sessions"][0]["taken"] = [[1, "stolen"]]
    with pytest.raises(LedgerError, match="taken"):
        Ledger.from_snapshot(snap, lease=LEASE, heartbeat=HEARTBEAT)


# ---------------------------------------------------------------- holds


def held_world(options: str) -> World:
    line = dataclasses.replace(ent(count=4), borrow=72.0)
    opts = parse_options(options, path="site.opt")
    w = World([], Ledger([line], lease=LEASE, heartbeat=HEARTBEAT, options=opts))
    w.open("s1", user="ann")
    return w


def test_a_lingering_seat_is_removed_like_any_grant() -> None:
    w = held_world("LINGER cad 3600\n")
    gid = grant_of(w.checkout("s1"))["id"]
    w.send("checkin", "s1", grant=gid)
    assert w.ledger.in_use("cad") == 1  # lingering
    w.advance(MIN)
    _, reply = remove(w, user="ann")
    assert reply["taken"] == [gid] and w.ledger.in_use("cad") == 0
    assert w.ledger.status()[0]["lingering"] == 0


def test_a_borrowed_seat_is_never_removed_and_the_answer_says_why_and_until_when() -> None:
    w = held_world("")
    reply = w.send("borrow", "s1", feature="cad", count=1, hours=24.0)
    assert reply is not None and reply["status"] == "ok", reply
    gid = grant_of(reply)["id"]
    until = w.wall + 24 * 3600.0
    w.open("s2", user="bob")
    bobs = w.send("borrow", "s2", feature="cad", count=1, hours=1.0)
    assert bobs is not None and bobs["status"] == "ok", bobs
    w.advance(MIN)
    for what in ({"user": "ann"}, {"grant": gid}, {"user": "ann", "host": "ws1", "feature": "cad"}):
        deltas, answer = remove(w, **what)
        assert deltas == [] and answer["taken"] == [] and answer["young"] == [], what
        assert answer["borrowed"] == [{"grant": gid, "feature": "cad", "until": until}], what
        assert answer["detail"].endswith(  # what a person needs to free it
            "; 1 borrowed left alone: a borrowed seat is freed by `zbroker borrow FEATURE "
            "--return` on the machine that borrowed it, or at its end"
        ), what
        assert "is out" not in answer["detail"], what
    assert remove(w, user="ann")[1]["detail"].startswith("0 grant(s) of user 'ann' removed;")
    assert remove(w, grant=gid)[1]["detail"].startswith(f"grant {gid} not removed;")
    assert w.ledger.in_use("cad") == 2
    # Not what the removal names: another feature, or another host's.
    for what in ({"user": "ann", "feature": "viewer"}, {"user": "ann", "host": "ws9"}):
        _, answer = remove(w, **what)
        assert answer["borrowed"] == [] and "is out" in answer["detail"], what


def test_a_removal_that_matches_nothing_says_so_plainly() -> None:
    w = world()
    out_four(w)
    assert remove(w, grant=999)[1]["detail"] == "grant 999 is not out"
    assert remove(w, grant=1, feature="solver")[1]["detail"] == (
        "grant 1 of feature 'solver' is not out"
    )
    assert remove(w, user="carl")[1]["detail"] == "no grant of user 'carl' is out"
    _, one = remove(w, grant=1)
    assert one["taken"] == [1] and one["detail"] == "grant 1 removed"


# ---------------------------------------------------------------- the node core


def test_the_core_removes_on_the_primary_only_and_answers_once_committed() -> None:
    cfg = dataclasses.replace(core_config(), min_remove=0.001)
    now = Now(100.0, WALL + 100.0)
    net = Net({n: NodeCore(cfg, n, CAD, Loaded(fresh=False), now, mode="plain") for n in NAMES})
    primary = net.serving()
    backup = next(n for n in NAMES if n != primary)
    opened(net, primary)
    net.cycle(primary, request(b"c-s1", op="checkout", sid="s1", req=2, ack=2, feature="cad"))
    net.run(0.2)
    assert all(core.ledger.in_use("cad") == 1 for core in net.cores.values())
    ask = {"op": "admin", "action": "remove", "sid": "admin-1", "req": 1, "user": "ann"}
    remote = Origin(**{"Peer-Address": "192.0.2.7"})
    far = ClientMessage([b"far", pack({"v": PROTOCOL_VERSION, **ask})], remote)
    (refused,) = [r for _, r in replies(net.cycle(primary, far))]
    assert refused["code"] == "not_allowed"
    (redirected,) = [r for _, r in replies(net.cycle(backup, request(b"a", **ask)))]
    assert redirected["status"] == "redirect"
    assert replies(net.cycle(primary, request(b"a", **ask))) == []  # waits for the commit
    answers: list[dict[str, Any]] = []
    for _ in range(100):
        net.run(STEP)
        answers += [r for ident, r in replies(net.last[primary]) if ident == b"a"]
        if answers:
            break
    assert answers == [{"v": PROTOCOL_VERSION, "sid": "admin-1", "req": 1, "status": "ok",
                        "taken": [1], "young": [], "borrowed": [], "min_remove": 0.001,
                        "detail": "1 grant(s) of user 'ann' removed"}]  # fmt: skip
    net.run(0.2)
    for core in net.cores.values():
        assert core.ledger.in_use("cad") == 0
        assert core.ledger.session("s1").taken == {1: "removed"}  # type: ignore[union-attr]


def test_the_command_needs_a_user_or_a_grant(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["remove", "--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 2
    assert "name a --user (with --host, --display) or a --grant id" in result.stderr


def test_the_command_lists_the_borrowed_grants_it_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer = {"status": "ok", "taken": [], "young": [], "min_remove": 120.0,
              "borrowed": [{"grant": 3, "feature": "cad", "until": 1_764_553_011.0}],
              "detail": "0 grant(s) of user 'kim' removed; 1 borrowed left alone: ..."}  # fmt: skip
    asked: list[dict[str, Any]] = []

    def ask_admin(*args: Any) -> tuple[list[Any], None, dict[str, Any]]:
        asked.append(args[-1])
        return [], None, {"alpha": answer}

    monkeypatch.setattr("zbroker.broker.cli._ask_admin", ask_admin)
    config = str(tmp_path / "zbroker.toml")
    result = CliRunner().invoke(main, ["remove", "--config", config, "--user", "kim"])
    assert result.exit_code == 1  # nothing taken
    assert result.stdout.splitlines() == [
        "left grant 3 of cad: borrowed until 2025-12-01 01:36:51 UTC",
        "0 grant(s) of user 'kim' removed; 1 borrowed left alone: ...",
    ]
    assert asked[0]["user"] == "kim"


def test_lease_lost_names_why_each_taken_grant_went() -> None:
    def grant(gid: int) -> ClientGrant:
        return ClientGrant(
            _Owner(), id=gid, feature="cad", version="2.0", count=1, triad=("tcp://a:1",),
            entry=0, session="s1",
        )  # fmt: skip

    removed, lapsed = grant(7), grant(8)
    removed._taken("removed")
    error = LeaseLost([removed, lapsed])
    assert removed.lost and removed.lost_reason == "removed" and lapsed.lost_reason is None
    assert error.reasons == {7: "removed"}
    assert str(error) == "grants no longer safe to use: cad#7 (removed), cad#8"


class _Owner:
    def checkin(self, grant: ClientGrant, timeout: float | None = None) -> None:
        raise AssertionError("not checked in here")


def test_the_wire_reads_a_remove_and_needs_its_sid() -> None:
    ask = {"v": PROTOCOL_VERSION, "op": "admin", "action": "remove", "req": 1, "user": "ann"}
    with pytest.raises(RemoteProtocolError, match="sid"):
        decode_request(pack(ask))
    request = decode_request(pack({**ask, "sid": "admin-1", "host": "ws1", "grant": 4}))
    assert Removal.of(request) == Removal("ann", "ws1", "", "", 4)
    down = decode_request(pack({"v": PROTOCOL_VERSION, "op": "admin", "action": "down"}))
    assert down.action == "down" and down.sid == ""  # other actions need no sid
