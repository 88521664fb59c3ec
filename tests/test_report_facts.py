"""The facts the report log needs, carried by the deltas the ledger decides (issue 13).

Every delta ``Ledger.handle`` and ``tick`` make carries its wall time; a denied
checkout's answer names what was asked for; a decision from the queue says how long it
waited; a session keeps the address it opened from and its project. Each test drives
the real ledger (and, for the address, the real node core and codec), derives the
report's records from what it decided, and checks that deltas and snapshots written
before these fields existed still apply.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_core import STEP, Origin, triad
from zbroker.broker.core import ClientMessage, client_address
from zbroker.broker.ledger import Decided, Ledger
from zbroker.broker.model import Entitlement, Now, Request
from zbroker.broker.options import parse_options
from zbroker.broker.report_stats import Report
from zbroker.broker.reportlog import Record, derive, settle
from zbroker.broker.wire import PROTOCOL_VERSION, RemoteProtocolError, decode_request, pack
from zbroker.clients.client import PROJECT_ENV, LicenseClient

pytestmark = pytest.mark.unit

WALL = 1_795_000_000.0  # 2026-11-18
CAD = [Entitlement("cad", "2.0", 1, None)]


class Desk:
    """A ledger on a primary that commits what it decides at once, deriving the report's
    records of each delta from the ledger just before it applies (as a node does)."""

    def __init__(self, lines: list[Entitlement] = CAD, **kw: Any) -> None:
        self.ledger = Ledger((), lease=30.0, heartbeat=10.0, **kw)
        self.mono = 0.0
        self.deltas: list[dict[str, Any]] = []
        self.records: list[Record] = []
        self.commit([(self.ledger.reload_delta(lines, kw.get("options"), self.now), None)])

    @property
    def now(self) -> Now:
        return Now(self.mono, WALL + self.mono)

    def commit(self, decided: list[Decided]) -> None:
        for delta, _ in decided:
            records = derive(len(self.deltas) + 1, 1, delta, self.ledger)
            self.ledger.apply(delta)
            settle(records, self.ledger)
            self.records += records
            self.deltas.append(delta)

    def ask(self, op: str, sid: str, req: int, **kw: Any) -> Any:
        out = self.ledger.handle(Request(op, sid, req, **kw), self.now)
        self.commit(out.decided)
        if out.reply is not None or not out.decided:
            return out.reply  # None: it waits in the queue
        return out.decided[-1][1]

    def tick(self) -> None:
        self.commit(self.ledger.tick(self.now).decided)

    def advance(self, seconds: float) -> None:
        self.mono += seconds


def _report(records: list[Record], by: str = "user") -> Report:
    rep = Report(by=by)
    for r in records:
        rep.add(r)
    rep.finish()
    return rep


def test_every_delta_the_ledger_decides_carries_its_wall_time_and_so_does_its_record() -> None:
    d = Desk()
    d.ask("open", "s1", 1, user="ann")
    d.ask("open", "s1", 2)  # a second open: an ok answer
    d.advance(1.0)
    grant = d.ask("checkout", "s1", 3, feature="cad")["grant"]["id"]
    d.advance(1.0)
    d.ask("checkout", "s1", 4, feature="cad")  # denied at once: no seats
    d.ask("checkin", "s1", 5, grant=99)  # denied: not held
    d.advance(1.0)
    d.ask("checkin", "s1", 6, grant=grant)
    d.ask("open", "s2", 1, user="bob")
    d.ask("checkout", "s2", 2, feature="cad")
    d.ask("close", "s2", 3)
    d.ask("open", "s3", 1, user="cyd")
    d.ask("checkout", "s3", 2, feature="cad")
    d.advance(31.0)  # s1's and s3's leases lapse
    d.tick()
    kinds = [delta["k"] for delta in d.deltas]
    assert set(kinds) == {"reload", "open", "answer", "grant", "release", "close", "expire"}
    for delta in d.deltas:
        assert isinstance(delta["at"], float), delta
    assert [r["ev"] for r in d.records] == [
        "reread", "out", "deny", "deny", "in", "out", "in", "out", "in",
    ]  # fmt: skip
    assert all(r["at"] is not None for r in d.records)
    assert [r["at"] - WALL for r in d.records if r["ev"] == "deny"] == [2.0, 2.0]
    assert [(r["reason"], r["at"] - WALL) for r in d.records if r["ev"] == "in"] == [
        ("checkin", 3.0), ("closed", 3.0), ("expired", 34.0)
    ]  # fmt: skip
    rep = _report(d.records)
    assert rep.estimated == 0  # no record took the time of the one before it


def test_deltas_and_snapshots_written_before_the_new_fields_still_apply() -> None:
    led = Ledger((), lease=30.0, heartbeat=10.0)
    old: list[dict[str, Any]] = [
        {"k": "reload", "entitlements": [{"feature": "cad", "version": "2.0", "count": 2}],
         "options": None},
        {"k": "open", "sid": "s1", "req": 1, "ack": 0, "user": "ann", "host": "h",
         "display": "", "client_version": "1", "at": WALL},
        {"k": "grant", "sid": "s1", "req": 2, "ack": 0, "grant": 1, "feature": "cad",
         "version": "2.0", "count": 1, "at": WALL},
        {"k": "answer", "sid": "s1", "req": 3, "ack": 0,
         "reply": {"status": "denied", "reason": "no_seats", "detail": "full"}},
        {"k": "release", "sid": "s1", "req": 4, "ack": 0, "grant": 1},
        {"k": "close", "sid": "s1", "req": 5, "ack": 0},
        {"k": "open", "sid": "s2", "req": 1, "ack": 0, "user": "bob", "host": "h",
         "display": "", "client_version": "1", "at": WALL},
    ]  # fmt: skip
    records: list[Record] = []
    for ix, delta in enumerate(old, 1):
        records += derive(ix, 1, delta, led)
        led.apply(delta)
    session = led.session("s2")
    assert session is not None and (session.address, session.project) == ("", "")
    assert [(r["ev"], r["at"]) for r in records if r["ev"] in ("deny", "in")] == [
        ("deny", None), ("in", None)
    ]  # fmt: skip
    deny = next(r for r in records if r["ev"] == "deny")
    assert "feature" not in deny and "address" not in deny and "project" not in deny
    assert _report(records).estimated == 3  # the denial, the checkin, the reread
    # A snapshot of an older node: its sessions have no address or project.
    snap = led.snapshot()
    for s in snap["sessions"]:
        del s["address"], s["project"]
    again = Ledger.from_snapshot(snap, lease=30.0, heartbeat=10.0)
    restored = again.session("s2")
    assert restored is not None and (restored.address, restored.project) == ("", "")


def test_a_denied_checkout_names_the_feature_version_and_count_it_asked_for() -> None:
    d = Desk([Entitlement("cad", "2.0", 2, None)])
    d.ask("open", "s1", 1, user="ann")
    d.ask("checkout", "s1", 2, feature="cad", count=3)  # more than the pool holds
    d.ask("checkout", "s1", 3, feature="cad", version="3.0")
    d.ask("checkout", "s1", 4, feature="nope")
    answers = [delta for delta in d.deltas if delta["k"] == "answer"]
    assert [(a.get("feature"), a.get("version"), a.get("count")) for a in answers] == [
        ("cad", None, 3), ("cad", "3.0", 1), ("nope", None, 1)
    ]  # fmt: skip
    assert "version" not in answers[0] and "waited" not in answers[0]  # none asked, no queue
    denies = [r for r in d.records if r["ev"] == "deny"]
    assert [(r["feature"], r["count"], r["reason"]) for r in denies] == [
        ("cad", 3, "no_seats"), ("cad", 1, "version_too_high"), ("nope", 1, "no_such_feature")
    ]  # fmt: skip
    rep = _report(d.records)
    assert rep.features["cad"].denials == {"no_seats": 1, "version_too_high": 1}
    assert rep.features["nope"].denials == {"no_such_feature": 1}
    assert "(not recorded)" not in rep.features


def test_decisions_from_the_queue_say_how_long_the_checkout_waited() -> None:
    d = Desk()
    d.ask("open", "s1", 1, user="ann")
    d.ask("open", "s2", 1, user="bob")
    d.ask("open", "s3", 1, user="cyd")
    held = d.ask("checkout", "s1", 2, feature="cad")["grant"]["id"]
    d.advance(0.5)
    assert d.ask("checkout", "s2", 2, feature="cad", wait=60.0) is None  # queued
    assert d.ask("checkout", "s3", 2, feature="cad", wait=5.0) is None  # behind it
    d.advance(3.0)
    d.ask("checkin", "s1", 3, grant=held)
    d.tick()  # bob's wait ends with the seat
    d.advance(2.5)
    d.ask("heartbeat", "s3", 3)
    d.ask("heartbeat", "s2", 3)
    d.tick()  # cyd's deadline passed: denied after waiting
    waited = [(x["k"], x["sid"], x["waited"]) for x in d.deltas if "waited" in x]
    assert waited == [("grant", "s2", 3.0), ("answer", "s3", 5.5)]
    first = next(x for x in d.deltas if x["k"] == "grant")
    assert "waited" not in first  # decided at once: it never queued
    evs = [(r["ev"], r.get("waited")) for r in d.records if r["ev"] != "reread"]
    assert evs == [
        ("out", None), ("in", None), ("queued", None), ("dequeued", 3.0), ("out", None),
        ("queued", None), ("dequeued", 5.5), ("deny", None),
    ]  # fmt: skip
    # A wait is recorded once, when it ends: queued at its arrival (the decision's time
    # less the wait), dequeued at the decision, both of the decision's index, with who.
    queued = [r for r in d.records if r["ev"] in ("queued", "dequeued")]
    assert [(r["ev"], r["user"], r["req"], r["feature"]) for r in queued] == [
        ("queued", "bob", 2, "cad"), ("dequeued", "bob", 2, "cad"),
        ("queued", "cyd", 2, "cad"), ("dequeued", "cyd", 2, "cad"),
    ]  # fmt: skip
    assert queued[1]["at"] - queued[0]["at"] == pytest.approx(3.0)
    assert queued[3]["at"] - queued[2]["at"] == pytest.approx(5.5)
    assert len({r["ix"] for r in queued[:2]}) == 1 and queued[0]["n"] + 1 == queued[1]["n"]
    f = _report(d.records).features["cad"]
    assert f.waits_n == 2 and f.wait_quantile(0.5) == pytest.approx(3.0, rel=0.05)
    assert f.wait_quantile(0.95) == pytest.approx(5.5, rel=0.05)


def test_a_session_keeps_its_address_and_project_into_snapshots_and_records() -> None:
    d = Desk()
    d.ask("open", "s1", 1, user="ann", address="192.0.2.7", project="bridge")
    d.ask("open", "s2", 1, user="bob")
    opened = [x for x in d.deltas if x["k"] == "open"]
    assert [(x["address"], x["project"]) for x in opened] == [("192.0.2.7", "bridge"), ("", "")]
    d.advance(1.0)
    gid = d.ask("checkout", "s1", 2, feature="cad")["grant"]["id"]
    d.ask("checkout", "s2", 2, feature="cad")  # denied
    d.advance(10.0)
    d.ask("checkin", "s1", 3, grant=gid)
    out, deny, back = (next(r for r in d.records if r["ev"] == ev) for ev in ("out", "deny", "in"))
    assert (out["address"], out["project"]) == ("192.0.2.7", "bridge")
    assert (back["address"], back["project"]) == ("192.0.2.7", "bridge")
    assert "address" not in deny and "project" not in deny  # bob's session has neither
    again = Ledger.from_snapshot(d.ledger.snapshot(), lease=30.0, heartbeat=10.0)
    restored = again.session("s1")
    assert restored is not None and (restored.address, restored.project) == (
        "192.0.2.7",
        "bridge",
    )
    assert _report(d.records, by="project").features["cad"].hours == {"bridge": 10.0}


def test_the_options_file_matches_a_sessions_project_and_address() -> None:
    options = parse_options(
        "EXCLUDE cad PROJECT secret\nEXCLUDE cad INTERNET 198.51.100.*\n", path="site.opt"
    )
    d = Desk([Entitlement("cad", "2.0", 5, None)], options=options)
    d.ask("open", "s1", 1, user="ann", project="secret")
    d.ask("open", "s2", 1, user="bob", address="198.51.100.9")
    d.ask("open", "s3", 1, user="cyd", address="192.0.2.7", project="bridge")
    got = [d.ask("checkout", sid, 2, feature="cad") for sid in ("s1", "s2", "s3")]
    assert [r.get("reason") for r in got] == ["excluded", "excluded", None]


def test_the_codec_reads_the_project_and_never_an_address_from_the_message() -> None:
    def opened(**fields: Any) -> Request:
        return decode_request(
            pack({"v": PROTOCOL_VERSION, "op": "open", "sid": "s", "req": 1, **fields})
        )

    assert opened(project="bridge", address="10.9.9.9") == Request("open", "s", 1, project="bridge")
    assert opened().project == ""
    with pytest.raises(RemoteProtocolError, match="field 'project'"):
        opened(project="p" * 257)


def test_the_core_gives_an_open_the_address_of_its_connection_only() -> None:
    net = triad()
    primary = net.serving()
    far = Origin(**{"Peer-Address": "192.0.2.7"})

    def send(origin: Origin, **fields: Any) -> None:
        message = pack({"v": PROTOCOL_VERSION, "sid": "s1", **fields})
        net.cycle(primary, ClientMessage([b"c1", message], origin))

    send(far, op="open", req=1, project="bridge")
    send(Origin(**{"Peer-Address": "203.0.113.1"}), op="heartbeat", req=2)
    for _ in range(100):
        net.run(STEP)
        if all(core.ledger.session("s1") is not None for core in net.cores.values()):
            break
    for name, core in net.cores.items():
        session = core.ledger.session("s1")
        assert session is not None, name
        assert (session.address, session.project) == ("192.0.2.7", "bridge"), name


class _NoMetadata:
    def get(self, key: str) -> Any:
        raise OSError(f"no {key} on this transport")  # as zmq.ZMQError is


def test_an_address_zeromq_cannot_give_is_empty() -> None:
    assert client_address(_NoMetadata()) == ""
    assert client_address(Origin()) == ""
    assert client_address(Origin(**{"Peer-Address": "x" * 300})) == "x" * 256


def test_the_library_sends_its_project_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PROJECT_ENV, "bridge")
    assert LicenseClient(["tcp://127.0.0.1:1"])._hello["project"] == "bridge"
    assert LicenseClient(["tcp://127.0.0.1:1"], project="p" * 300)._hello["project"] == "p" * 256
    monkeypatch.delenv(PROJECT_ENV)
    assert LicenseClient(["tcp://127.0.0.1:1"])._hello["project"] == ""
