"""``zbroker lmstat``'s text from synthetic statuses: the layout line for line, and what
parsers written by others (tests/test_lmstat_parsers.py) read from it.

Reservations, held seats and queued requests are synthetic here (in two shapes: a
holder's ``linger``/``lingering``, and a hold's ``hold``/``until`` as the ledger gives
it); tests/test_lmstat_live.py reads reservations and a queue on a live triad.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from test_lmstat_parsers import (
    exporter_parse,
    exporter_parse_expiry,
    omnivector_parse,
    vsc_parse,
)

from zbroker.broker.lmstat import (
    USAGE,
    Clock,
    Entry,
    LicenseLine,
    LmstatUsage,
    Options,
    flexnet_servers,
    info_rows,
    parse_args,
    render,
    render_info,
    unknown_feature,
    version_lines,
)
from zbroker.broker.lmutil import _triads, entries_of, main

pytestmark = pytest.mark.unit

UTC = datetime.UTC
NOW = datetime.datetime(2026, 11, 30, 9, 5, tzinfo=UTC).timestamp()
CLOCK = Clock(NOW, UTC)
ENDPOINTS = (
    "tcp://h1.example.com:27001",
    "tcp://h2.example.com:27002",
    "tcp://h3.example.com:27003",
)


def _holder(
    grant: int, user: str, host: str, display: str, count: int, **more: Any
) -> dict[str, Any]:
    since = datetime.datetime(2026, 11, 30, 8, grant, tzinfo=UTC).timestamp()
    return {"grant": grant, "feature": "cad", "user": user, "host": host, "display": display,
            "count": count, "version": "2.0", "since": since, **more}  # fmt: skip


FORGED = "x\nUsers of cad:  (Total of 99 licenses issued;  Total of 0 licenses in use)"


def _status(primary: bool = True) -> dict[str, Any]:
    first = {"role": "primary", "serving": True} if primary else {"role": "candidate"}
    return {
        "primary": "alpha" if primary else None,
        "nodes": [
            {"name": "alpha", "endpoint": ENDPOINTS[0], "term": 2, **first},
            {"name": "beta", "endpoint": ENDPOINTS[1], "role": "backup", "term": 2},
            {"name": "gamma", "endpoint": ENDPOINTS[2], "role": "down", "term": None},
        ],
        "features": [
            {
                "name": "cad", "total": 15, "in_use": 5, "queued": 1,
                "versions": [{"version": "2.0", "total": 15, "in_use": 5, "expires": "2027-12-31"}],
                "holders": [
                    _holder(1, "ann", "ws1", ":0", 3),
                    _holder(2, "bob", "ws2", "", 1, linger=600, lingering=42),
                    _holder(3, FORGED, "ws4", "/dev/pts/1", 1),
                ],
                "reservations": [
                    {"count": 2, "kind": "GROUP", "name": "eng"},
                    {"count": 1, "kind": "HOST", "name": "ws9"},
                ],
                "queue": [{"user": "carol", "host": "ws3", "display": ":1", "version": "2.0",
                           "count": 2, "handle": "q7"}],
            },
            {"name": "solver", "total": 2, "in_use": 0, "queued": 0,
             "versions": [{"version": "1.5", "total": 2, "in_use": 0, "expires": None}]},
            {"name": "viewer", "total": 1, "in_use": 1, "queued": 0,
             "versions": [{"version": "3.0", "total": 1, "in_use": 1, "expires": None}],
             "holders": [_holder(4, "dave", "ws5", ":0", 1, feature="viewer", version="3.0")]},
        ],
    }  # fmt: skip


LINES = (
    LicenseLine("cad", "2.0", 10, datetime.date(2027, 12, 31), "acme"),
    LicenseLine("cad", "2.0", 5, None, "acme"),
    LicenseLine("solver", "1.5", 2, None, "acme"),
    LicenseLine("viewer", "3.0", 1, None, "acme"),
)
ENTRY = Entry(ENDPOINTS, license_file="/opt/acme/license.lic", own_file=True, lines=LINES)

EXPECTED_A = """\
lmstat - Copyright (c) 2026 the zbroker authors. zbroker 1.0, answering as FlexNet lmstat.
Flexible License Manager status on Mon 11/30/2026 9:05

License server status: 27001@h1.example.com,27002@h2.example.com,27003@h3.example.com
    License file(s) on h1.example.com: /opt/acme/license.lic:

h1.example.com: license server UP (MASTER) v11.19.0
h2.example.com: license server UP v11.19.0
h3.example.com: Cannot connect to license server system. (zbroker: no answer within 3 s)

Vendor daemon status (on h1.example.com):

    acme: UP v11.19.0
Feature usage info:

Users of cad:  (Total of 15 licenses issued;  Total of 5 licenses in use)

  "cad" v2.0, vendor: acme, expiry: 31-dec-2027
  floating license

\t2 RESERVATIONs for GROUP eng (h1.example.com/27001)
\t1 RESERVATIONs for HOST ws9 (h1.example.com/27001)
    ann ws1 :0 (v2.0) (h1.example.com/27001 1), start Mon 11/30 8:01, 3 licenses
    bob ws2 - (v2.0) (h1.example.com/27001 2), start Mon 11/30 8:02  (linger: 42 / 600)
    x?Users_of_cad:__(Total_of_99_licenses_issued;__Total_of_0_licenses_in_use) ws4 /dev/pts/1 \
(v2.0) (h1.example.com/27001 3), start Mon 11/30 8:03
    carol ws3 :1 (v2.0) (h1.example.com/27001 q7) queued for 2 licenses

Users of solver:  (Total of 2 licenses issued;  Total of 0 licenses in use)

Users of viewer:  (Total of 1 license issued;  Total of 1 license in use)

  "viewer" v3.0, vendor: acme, expiry: 1-jan-0
  floating license

    dave ws5 :0 (v3.0) (h1.example.com/27001 4), start Mon 11/30 8:04

"""


def _render(args: list[str], status: dict[str, Any] | None = None) -> str:
    opts = parse_args(args, 3600.0)
    return render("lmstat", "1.0", [(ENTRY, status or _status())], opts, CLOCK)


def test_all_prints_lmstat_layout_line_for_line() -> None:
    assert _render(["-a"]) == EXPECTED_A


def test_the_exporter_reads_servers_vendor_features_users_and_reservations() -> None:
    got = exporter_parse(_render(["-a"]))
    # Every host is named on the status line (the exporter would dereference nil if not).
    assert got.servers["h1"]["master"] and got.servers["h1"]["status"]
    assert got.servers["h2"]["status"] and not got.servers["h2"]["master"]
    assert not got.servers["h3"]["status"]  # down
    assert got.vendors == {"acme": {"status": True, "version": "v11.19.0"}}
    assert got.features == {
        "cad": {"issued": 15.0, "used": 5.0},
        "solver": {"issued": 2.0, "used": 0.0},
        "viewer": {"issued": 1.0, "used": 1.0},
    }
    assert got.users["cad"]["ann"] == [["(v2.0)", 3.0]]
    assert got.users["cad"]["bob"] == [["(v2.0)", 1.0]]  # a lingering seat is a seat
    assert "carol" not in got.users["cad"]  # queued: not a user of a seat
    assert got.users["viewer"] == {"dave": [["(v3.0)", 1.0]]}
    assert got.reservations == {"cad": {"eng": 2.0}}  # it reads GROUP reservations only


def test_holds_print_as_flexnet_lingering_seats_and_filled_reservations_not_at_all() -> None:
    status = _status()
    cad = status["features"][0]
    cad["holders"] = [
        _holder(1, "ann", "ws1", ":0", 1, hold="linger", until=NOW + 300),
        _holder(2, "bob", "ws2", ":1", 2, hold="borrow", until=NOW + 86_400),
        _holder(3, "cyd", "ws3", ":2", 1, hold="linger", until=NOW - 5),  # its lapse is due
    ]
    cad["reservations"] = [
        {"count": 2, "kind": "GROUP", "name": "eng", "unused": 0},
        {"count": 3, "kind": "USER", "name": "mel", "unused": 2},
    ]
    text = render("lmstat", "1.0", [(ENTRY, status)], parse_args(["-a"], 60), CLOCK)
    lines = [ln for ln in text.splitlines() if "(linger:" in ln or "RESERVATION" in ln]
    # LEFT / ALL: ALL is from checkout (8:01, 8:02, 8:03) to the hold's end
    assert lines == [
        "\t2 RESERVATIONs for USER mel (h1.example.com/27001)",
        "    ann ws1 :0 (v2.0) (h1.example.com/27001 1), start Mon 11/30 8:01"
        "  (linger: 300 / 4140)",
        "    bob ws2 :1 (v2.0) (h1.example.com/27001 2), start Mon 11/30 8:02, 2 licenses"
        "  (linger: 86400 / 90180)",
        "    cyd ws3 :2 (v2.0) (h1.example.com/27001 3), start Mon 11/30 8:03  (linger: 0 / 3715)",
    ]
    got = exporter_parse(text)
    assert got.users["cad"] == {"ann": [["(v2.0)", 1.0]], "bob": [["(v2.0)", 2.0]],
                                "cyd": [["(v2.0)", 1.0]]}  # fmt: skip
    assert got.reservations == {}  # the exporter reads GROUP ones; eng's is filled


def test_a_queued_line_names_a_version_and_a_handle_no_grant_can_have() -> None:
    status = _status()
    cad = status["features"][0]
    cad["holders"] = [_holder(2, "dave", "ws2", ":0", 1)]  # grant 2
    cad["queue"] = [  # an older node's handle is the request's number, 2 as well
        {"user": "erin", "host": "ws1", "display": "", "version": None, "count": 1, "handle": 2},
        {"user": "fay", "host": "ws3", "display": ":1", "version": "1.0", "count": 2,
         "handle": "q5"},
    ]  # fmt: skip
    text = render("lmstat", "1.0", [(ENTRY, status)], parse_args(["-a"], 60), CLOCK)
    lines = [ln for ln in text.splitlines() if "queued for" in ln]
    assert lines == [  # the version of the pool it is listed under, when it asked none
        "    erin ws1 - (v2.0) (h1.example.com/27001 q2) queued for 1 license",
        "    fay ws3 :1 (v1.0) (h1.example.com/27001 q5) queued for 2 licenses",
    ]
    assert exporter_parse(text).users["cad"] == {"dave": [["(v2.0)", 1.0]]}


def test_the_help_says_why_proj_is_ignored_truly() -> None:
    # PROJECT lines of the options file are enforced: zbroker has projects
    assert "no projects" not in USAGE
    assert "-proj" in USAGE and "project of a holder" in USAGE


def test_the_slurm_scripts_read_the_totals() -> None:
    assert vsc_parse(_render(["-a"])) == {
        "cad": {"total": 15, "in_use": 5},
        "solver": {"total": 2, "in_use": 0},
        "viewer": {"total": 1, "in_use": 1},
    }
    parsed = omnivector_parse(_render(["-f", "cad"]))
    assert (parsed["feature"], parsed["total"], parsed["used"]) == ("cad", 15, 5)
    booked = {u["username"]: u["booked"] for u in parsed["uses"]}  # type: ignore[attr-defined]
    assert booked["ann"] == 3 and len(booked) == 2  # ann, and the forger's one seat
    assert "bob" not in booked  # its regexes know no "(linger: ...)", on FlexNet's text either


def test_a_client_cannot_forge_a_line() -> None:
    text = _render(["-a"])
    assert text.count("\nUsers of cad:") == 1
    assert all(line.isprintable() for line in text.replace("\t", " ").splitlines())


def test_no_primary_shows_no_master_and_the_vendor_daemon_down() -> None:
    text = _render(["-a"], _status(primary=False))
    assert "(MASTER)" not in text
    assert "h1.example.com: license server UP v11.19.0" in text
    assert "    acme: DOWN v11.19.0" in text
    assert exporter_parse(text).vendors["acme"]["status"] is False
    cut_off = _status()
    cut_off["nodes"][0]["serving"] = False  # a primary without its quorum grants nothing
    text = _render(["-a"], cut_off)
    assert "(MASTER)" not in text and "    acme: DOWN v11.19.0" in text


def test_options_narrow_what_is_printed() -> None:
    active = _render(["-A"])
    assert "Users of cad:" in active and "Users of solver:" not in active
    plain = _render([])  # lmstat alone: servers and vendor daemons only
    assert "Users of" not in plain and "license server UP (MASTER)" in plain
    bare = _render(["-a", "--no-user-info"])
    assert "ann ws1" not in bare and "RESERVATIONs" in bare
    one_server = _render(["-s", "h2.example.com"])
    assert (
        "h2.example.com: license server UP" in one_server
        and "h1.example.com: license" not in one_server
    )
    feature = _render(["-f", "viewer"])
    assert "License server status" not in feature and "Users of cad:" not in feature
    assert feature.splitlines()[3] == "Users of features served by acme:"
    seconds = _render(["-asec"])
    assert "start Mon 11/30 8:01:00, 3 licenses" in seconds
    vendor = _render(["-S", "other"])
    assert "Users of cad:" not in vendor


def test_parse_args_takes_lmutil_forms_and_refuses_the_rest() -> None:
    opts = parse_args(["-a", "-c27001@h1,27002@h2", "-t", "5", "-lm", "-old"], 3600.0)
    assert opts == Options(license_path="27001@h1,27002@h2", features=True, timeout=5.0)
    assert (
        parse_args(["-c", "x.lic", "-i"], 60).info
        and parse_args(["-i", "cad"], 60).feature == "cad"
    )
    assert parse_args(["-f", "-c", "x"], 60).feature is None  # -f's feature is optional
    for bad in (["-t", "0"], ["-t", "nan"], ["-t", "7200"], ["-c"], ["-q"]):
        with pytest.raises(LmstatUsage):
            parse_args(bad, 3600.0)


def test_info_lists_lines_in_flexnet_columns_that_the_exporter_reads() -> None:
    text = render_info("lmstat", "1.0", info_rows(ENTRY, None), None)
    assert text.splitlines()[6:9] == [
        "Feature                         Version     #licenses    Expires      Vendor",
        "_______                         _________   _________    __________   ______",
        "cad                             2.0          10          31-dec-2027  acme",
    ]
    rows = exporter_parse_expiry(text)
    assert [(r["name"], r["licenses"]) for r in rows] == [
        ("cad", "10"), ("cad", "5"), ("solver", "2"), ("viewer", "1")
    ]  # fmt: skip
    assert {r["vendor"] for r in rows} == {"acme"}
    assert rows[0]["expires"] == datetime.datetime(2027, 12, 31, tzinfo=UTC).timestamp()
    assert rows[1]["expires"] == float("inf")
    pools = info_rows(Entry(ENDPOINTS), _status())  # port@host: the triad's pools
    assert [(p.feature, p.count, p.expires) for p in pools][:1] == [
        ("cad", 15, datetime.date(2027, 12, 31))
    ]


def test_version_is_what_the_exporter_reads() -> None:
    assert exporter_parse("\n".join(version_lines("lmutil", "1.0"))).version == "v11.19.0"


def test_flexnet_server_lines_name_the_servers() -> None:
    assert flexnet_servers("SERVER lic1 AABBCCDDEEFF 27005\nSERVER lic2 ANY\nVENDOR acme\n") == (
        "tcp://lic1:27005",
        "tcp://lic2:27000",
    )
    assert flexnet_servers("SERVER alpha ANY tcp://127.0.0.1:27001\n") == ()  # zbroker's own


def test_other_lmutil_tools_name_what_zbroker_offers(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, says in (
        (["lmutil", "lmdown", "-c", "x"], "use zbroker down"),
        (["/opt/bin/lmutil", "lmremove", "cad"], "no counterpart yet"),
        (["zbroker-lmutil", "lmfoo"], "unknown tool 'lmfoo'"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["lmutil", "lmstat", "-v"])
    assert exit_.value.code == 0 and "lmstat v11.19.0 build 0" in capsys.readouterr().out


def test_single_servers_of_one_triad_are_joined_into_one_entry() -> None:
    triad = frozenset({"alpha", "beta", "gamma"})
    one = [Entry((e,)) for e in ENDPOINTS]
    named = [
        (one[0], [("alpha", ENDPOINTS[0])], triad),
        (one[1], [("beta", ENDPOINTS[1])], triad),
        (Entry(("tcp://other:1",)), [("1@other", "tcp://other:1")], frozenset()),  # down
        (one[2], [("gamma", ENDPOINTS[2])], triad),
    ]
    joined = _triads(named)  # type: ignore[arg-type]
    assert [e.endpoints for e, _ in joined] == [ENDPOINTS, ("tcp://other:1",)]
    assert [name for name, _ in joined[0][1]] == ["alpha", "beta", "gamma"]


def test_entries_of_reads_lists_files_and_directories(tmp_path: Any) -> None:
    (tmp_path / "a.lic").write_text("SERVER lic1 AABBCCDDEEFF 27005\n")
    (tmp_path / "notes.txt").write_text("SERVER ignored ANY 1\n")
    entries = entries_of(f"27001@h1,27002@h2,27003@h3;{tmp_path}:9@h9")
    assert [e.endpoints for e in entries] == [
        ("tcp://h1:27001", "tcp://h2:27002", "tcp://h3:27003"),
        ("tcp://lic1:27005",),
        ("tcp://h9:9",),
    ]
    assert entries[1].license_file == str(tmp_path / "a.lic") and not entries[1].own_file


def _down() -> dict[str, Any]:
    """The status of an entry none of whose nodes answered (no server, or no CURVE key)."""
    nodes = [{"name": f"{e[-5:]}@h", "endpoint": e, "role": "down", "term": None}
             for e in ENDPOINTS]  # fmt: skip
    return {"primary": None, "nodes": nodes, "features": []}


def test_features_of_servers_that_do_not_answer_say_so_as_all_does() -> None:
    for args in (["-f", "cad"], ["-f"], ["-S", "acme"]):
        text = _render(args, _down())
        assert text == _render(["-a"], _down()), args  # the server block, nothing more
        cannot = [ln for ln in text.splitlines() if "Cannot connect" in ln]
        assert cannot == [
            f"{h}: Cannot connect to license server system. (zbroker: no answer within 3 s)"
            for h in ("h1.example.com", "h2.example.com", "h3.example.com")
        ], args
        assert "    acme: DOWN v11.19.0" in text
        assert not exporter_parse(text).servers["h1"]["status"]
    # Where a node answered, -f still leaves the server block out.
    assert "Cannot connect" not in _render(["-f", "cad"])


def test_an_unknown_feature_is_flexnet_s_error_that_no_totals_parser_reads() -> None:
    text = _render(["-f", "nosuch"])
    assert text.splitlines()[3:] == [
        "Users of features served by acme:",
        "",
        "Users of nosuch:  (Error: No such feature exists. (-5) "
        "(zbroker: it serves cad, solver, viewer))",
        "",
    ]
    assert exporter_parse(text).features == {}
    assert vsc_parse(text) == {} and omnivector_parse(text) == {}
    served = _render(["-f", "viewer"])
    assert "Error" not in served and "Users of viewer:  (Total of 1 license" in served
    idle = _render(["-A", "-f", "solver"])  # served, not in use: -A leaves it out, no error
    assert "Users of solver" not in idle and "Error" not in idle


def test_an_unknown_feature_names_at_most_ten_that_are_served() -> None:
    status = _status()
    status["features"] = [
        {"name": f"f{n:02d}", "total": 1, "in_use": 0, "queued": 0} for n in range(12)
    ]
    (line,) = [ln for ln in _render(["-f", "nosuch"], status).splitlines() if "Error" in ln]
    assert line.endswith("(zbroker: it serves f00, f01, f02, f03, f04, f05, f06, f07, f08, "
                         "f09 and 2 more))")  # fmt: skip
    status["features"] = []
    assert "(zbroker: it serves no feature))" in _render(["-f", "nosuch"], status)


def test_unknown_feature_is_what_no_server_that_answered_serves() -> None:
    named = parse_args(["-f", "nosuch"], 60)
    assert unknown_feature([(ENTRY, _status())], named)
    assert not unknown_feature([(ENTRY, _status())], parse_args(["-f", "cad"], 60))
    assert not unknown_feature([(ENTRY, _status())], parse_args(["-f"], 60))
    assert not unknown_feature([(ENTRY, _status())], parse_args(["-i", "nosuch"], 60))
    assert not unknown_feature([(ENTRY, _down())], named)  # nobody asked: exit 1 anyway
    other = _status()
    other["features"] = [{"name": "nosuch", "total": 1, "in_use": 0, "queued": 0}]
    assert not unknown_feature([(ENTRY, _status()), (ENTRY, other)], named)  # 2nd entry has it
