"""The options file's reservations in status (broker/reserved.py): each RESERVE line's
seats and how many of them are unused, as the policy counts them, kept between reads."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_ledger import HEARTBEAT, LEASE, World, ent, grant_of
from zbroker.broker.ledger import Ledger
from zbroker.broker.options import parse_options
from zbroker.broker.policy import Holding, Policy, Principal
from zbroker.broker.reserved import Reservations

pytestmark = pytest.mark.unit

OPTIONS = """\
GROUP eng bob carol
RESERVE 2 cad USER mel
RESERVE 3 cad GROUP eng
RESERVE 1 solver HOST ws9
"""


def world(options: str = OPTIONS, kind: type[Ledger] = Ledger) -> World:
    opts = parse_options(options, path="site.opt")
    lines = [ent(count=10), ent(feature="solver", version="1.0", count=2), ent(feature="viewer")]
    return World([], kind(lines, lease=LEASE, heartbeat=HEARTBEAT, options=opts))


def features(w: World, kept: Reservations | None = None) -> dict[str, dict[str, Any]]:
    found = w.ledger.status(w.now)
    (kept or Reservations()).add_to(found, w.ledger, w.now.date)
    return {f["name"]: f for f in found}


def test_each_reserve_line_says_its_seats_and_how_many_are_unused() -> None:
    w = world()
    status = features(w)
    assert status["cad"]["reservations"] == [
        {"count": 2, "kind": "USER", "name": "mel", "unused": 2},
        {"count": 3, "kind": "GROUP", "name": "eng", "unused": 3},
    ]
    assert status["solver"]["reservations"] == [
        {"count": 1, "kind": "HOST", "name": "ws9", "unused": 1}
    ]
    assert "reservations" not in status["viewer"]  # no RESERVE line names it
    w.open("s1", user="mel")
    w.open("s2", user="bob")
    w.open("s3", user="ann")
    grant_of(w.checkout("s1"))
    grant_of(w.checkout("s2", count=2))
    grant_of(w.checkout("s3", count=4))  # ann fills no reservation
    assert [r["unused"] for r in features(w)["cad"]["reservations"]] == [1, 1]


def test_a_holder_on_two_reservations_fills_the_one_that_leaves_fewest_unused() -> None:
    # The policy's maximum flow, not file order: mel is on both lines.
    w = world("GROUP eng mel\nRESERVE 1 cad GROUP eng\nRESERVE 1 cad USER mel\n")
    w.open("s1", user="mel")
    grant_of(w.checkout("s1", count=2))
    assert [r["unused"] for r in features(w)["cad"]["reservations"]] == [0, 0]


def test_reservations_past_the_pool_s_count_keep_only_what_is_left() -> None:
    w = world("RESERVE 2 solver USER a\nRESERVE 2 solver USER b\n")
    assert features(w)["solver"]["reservations"] == [
        {"count": 2, "kind": "USER", "name": "a", "unused": 2}
    ]


def test_without_an_options_file_there_are_none() -> None:
    w = World([ent()])
    assert "reservations" not in features(w)["cad"]


class _CountingLedger(Ledger):
    """A ledger that notes each feature whose holdings are read (a subclass: the compiled
    build's Ledger refuses a method replaced on one instance)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read: list[str] = []

    def holdings(self, feature: str) -> list[Holding]:
        self.read.append(feature)
        return super().holdings(feature)


def test_a_flood_of_reads_reads_the_holdings_once_until_a_grant_changes() -> None:
    w = world(kind=_CountingLedger)
    w.open("s1", user="mel")
    assert isinstance(w.ledger, _CountingLedger)
    read = w.ledger.read
    read.clear()  # only the reads of status count
    kept = Reservations()
    for _ in range(50):
        features(w, kept)
    assert sorted(read) == ["cad", "solver"]
    held = grant_of(w.checkout("s1"))
    assert [r["unused"] for r in features(w, kept)["cad"]["reservations"]] == [1, 3]
    w.send("checkin", "s1", grant=held["id"])
    assert [r["unused"] for r in features(w, kept)["cad"]["reservations"]] == [2, 3]
    assert read.count("cad") == 3


def test_zbroker_status_shows_reservations_and_held_seats() -> None:
    from zbroker.broker.status import render

    since = 1_800_000_000.0
    holder = {"user": "ann", "host": "ws1", "display": ":0", "version": "2.0", "count": 1,
              "grant": 7, "since": since}  # fmt: skip
    status = {
        "primary": "alpha",
        "mode": "curve",
        "nodes": [],
        "features": [
            {"name": "cad", "total": 15, "in_use": 3, "queued": 0, "lingering": 1,
             "borrowed": 1, "reservations": [
                 {"count": 3, "kind": "GROUP", "name": "eng", "unused": 2}],
             "holders": [holder, holder | {"grant": 8, "hold": "linger", "until": since + 60},
                         holder | {"grant": 9, "hold": "borrow", "until": since + 3600},
                         holder | {"grant": 10, "sharers": [4, 10]}]},
            {"name": "solver", "total": 2, "in_use": 0, "queued": 0, "lingering": 0,
             "borrowed": 0},
        ],
    }  # fmt: skip
    text = render(status).splitlines()
    assert "  cad: 3 of 15 seats in use, 1 lingering, 1 borrowed, 0 queued" in text
    assert "    reserved for GROUP eng: 3 seat(s), 2 unused" in text
    assert "  solver: 0 of 2 seats in use, 0 queued" in text
    held = [ln for ln in text if "grant 8" in ln or "grant 9" in ln]
    assert [ln.split(", ")[-1].split(" until ")[0] for ln in held] == ["lingering", "borrowed"]
    assert "until" not in next(ln for ln in text if "grant 7" in ln)
    assert next(ln for ln in text if "grant 10" in ln).endswith(
        ", sharing its seat with grant(s) 4"
    )
    # names a client chose reach the terminal as words, never as escape sequences
    status["features"][0]["holders"] = [holder | {"user": "\x1b]0;TITLE\x07x y", "host": ""}]
    (line,) = [ln for ln in render(status).splitlines() if "grant 7" in ln]
    assert line.startswith("    ?]0;TITLE?x_y - :0 v2.0, 1 seat(s), grant 7")


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(
        st.tuples(st.integers(1, 4), st.sampled_from(["USER u0", "USER u1", "GROUP g", "HOST h1"])),
        min_size=1,
        max_size=4,
    ),
    held=st.lists(st.tuples(st.sampled_from(["u0", "u1", "u2", "u3"]), st.integers(1, 3))),
    total=st.integers(1, 10),
)
def test_the_unused_reserved_seats_are_what_an_outsider_cannot_take(
    lines: list[tuple[int, str]], held: list[tuple[str, int]], total: int
) -> None:
    # Status must never show a seat as free that the policy refuses to someone on no
    # reservation: free to them = total - held - unused, as ``room`` decides.
    text = "GROUP g u1 u2\n" + "".join(f"RESERVE {n} cad {who}\n" for n, who in lines)
    policy = Policy(parse_options(text, path="p.opt"))
    holdings = [(Principal(user, "h1" if user == "u3" else "h9"), (2, 0), n) for user, n in held]
    used = sum(n for _, _, n in holdings)
    unused = sum(k - f for _, k, f in policy.reserved("cad", (2, 0), total, holdings))
    room = policy.room(Principal("zed", "h9"), "cad", (2, 0), total, used, holdings)
    assert room.seats == max(0, min(total - used, total - used - unused))
