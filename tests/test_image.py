"""Snapshot images (broker/image.py): the bytes a snapshot rests and travels as, and the
stepwise loader that builds the ledger from them a few items at a time."""

from __future__ import annotations

import gc
import io
import zlib
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from tests.test_borrow import ledger as borrowing_ledger
from tests.test_borrow import opened, run
from tests.test_ledger import World, ent, grant_of
from tests.test_timeout import idle
from tests.test_timeout import world as timeout_world
from zbroker.broker.image import (
    IMAGE_BATCH,
    SESSION_WEIGHT,
    ImageLoader,
    head_of,
    image_of,
    load_image,
    write_image,
)
from zbroker.broker.ledger import Ledger, LedgerError
from zbroker.broker.model import Request
from zbroker.broker.wire import pack
from zbroker.peers.types import Image

pytestmark = pytest.mark.unit

SETTINGS: dict[str, Any] = {"lease": 10_000.0, "heartbeat": 10_000.0 / 3}


def rich() -> Ledger:
    """Sessions, grants, a linger hold, an idle session, a taken grant, options, a license."""
    w = timeout_world("LINGER cad 3600\nTIMEOUT solver 900")
    w.open("s1")
    w.open("s2", user="bob", host="ws2")
    w.open("s3", user="cyd")
    g1 = grant_of(w.checkout("s1"))
    w.checkout("s1", 2)
    w.checkout("s2", feature="solver")
    w.checkout("s3", feature="solver")
    w.send("checkin", "s1", grant=g1["id"])  # lingers in a hold
    idle(w, "s2")
    w.advance(901)
    w.tick()  # takes s2's solver grant: it was idle past its feature's timeout
    idle(w, "s3")  # idle, not yet timed out
    lines = ["FEATURE cad zb 2.0 permanent 4 SIGN=0", "FEATURE solver zb 2.0 permanent 4 SIGN=0"]
    w.ledger.apply(w.ledger.reload_delta(w.ledger.entitlements, w.ledger.options, None, lines))
    snap = w.ledger.snapshot()
    assert [s["sid"] for s in snap["sessions"] if "hold" in s] and snap["license"] == lines
    assert any("taken" in s for s in snap["sessions"]) and snap["options"] is not None
    assert any("idle_since" in s for s in snap["sessions"])
    return w.ledger


def borrowed() -> Ledger:
    led = borrowing_ledger()
    opened(led, "s1")
    assert run(led, Request("borrow", sid="s1", req=2, feature="cad", hours=2))["status"] == "ok"
    run(led, Request("close", sid="s1", req=3))
    assert any(s.get("hold") == "borrow" for s in led.snapshot()["sessions"])
    return led


def many(sessions: int = 2 * IMAGE_BATCH + 10, per: int = 2) -> Ledger:
    w = World([ent(count=sessions * per)])
    for s in range(sessions):
        w.open(f"s{s}", user=f"u{s}")
        for _ in range(per):
            w.checkout(f"s{s}")
    return w.ledger


LEDGERS: dict[str, Callable[[], Ledger]] = {
    "empty": lambda: Ledger((), **SETTINGS),
    "rich": rich,
    "borrowed": borrowed,
    "many": many,
}


def settings_of(ledger: Ledger) -> dict[str, Any]:
    return {"lease": ledger.lease, "heartbeat": ledger.heartbeat}


def objects(image: Image) -> list[Any]:
    return list(msgpack.Unpacker(io.BytesIO(bytes(image.buf)), raw=False))


@pytest.mark.parametrize("kind", sorted(LEDGERS))
def test_an_image_loads_the_ledger_it_was_taken_of(kind: str) -> None:
    ledger = LEDGERS[kind]()
    image = image_of(ledger, 12, 3)
    assert (image.index, image.term, image.crc) == (12, 3, zlib.crc32(image.buf))
    again = load_image(image, **settings_of(ledger))
    assert again.snapshot() == ledger.snapshot()
    assert head_of(image.buf) == (12, 3)


def test_the_stream_is_a_head_then_records_of_at_most_a_batch() -> None:
    ledger = many()
    snap = ledger.snapshot()
    head, *records = objects(image_of(ledger, 5, 2))
    assert head == {
        **{k: v for k, v in snap.items() if k not in ("sessions", "grants")},
        "index": 5,
        "term": 2,
        "sessions": len(snap["sessions"]),
        "grants": len(snap["grants"]),
    }
    assert [(next(iter(r)), len(next(iter(r.values())))) for r in records] == [
        ("s", 1000), ("s", 1000), ("s", 10), ("g", 1000), ("g", 1000), ("g", 1000),
        ("g", 1000), ("g", 20),
    ]  # fmt: skip
    assert [m for r in records if "s" in r for m in r["s"]] == snap["sessions"]
    assert [m for r in records if "g" in r for m in r["g"]] == snap["grants"]


def test_write_image_streams_the_same_bytes_and_says_their_size_and_crc() -> None:
    ledger = rich()
    out = io.BytesIO()
    size, crc = write_image(ledger, 7, 1, out)
    image = image_of(ledger, 7, 1)
    assert out.getvalue() == image.buf and (size, crc) == (image.size, image.crc)


@pytest.mark.parametrize("kind", ["rich", "many"])
def test_loading_one_item_a_step_builds_the_same_ledger(kind: str) -> None:
    ledger = LEDGERS[kind]()
    snap = ledger.snapshot()
    loader = ImageLoader(image_of(ledger, 9, 2), **settings_of(ledger))
    steps, before = 0, 0
    while (built := loader.step(1)) is None:
        steps += 1
        added = sum(loader.added.values())
        assert added - before <= 1  # one session or one grant a step, never more
        before = added
    assert built.snapshot() == snap
    assert steps == len(snap["sessions"]) + len(snap["grants"]) - 1
    assert loader.step(1) is built  # done: the same ledger again


def test_a_step_adds_its_budget_of_grants_or_sessions_worth_as_much() -> None:
    ledger = many(sessions=300, per=3)
    loader = ImageLoader(image_of(ledger, 9, 2), **settings_of(ledger))
    assert loader.step(100) is None
    assert loader.added == {"sessions": 100 // SESSION_WEIGHT, "grants": 0}
    assert loader.items == 300 + 900
    while loader.added["sessions"] < 300:
        assert loader.step(100) is None
    assert loader.added == {"sessions": 300, "grants": 0}
    assert loader.step(100) is None
    assert loader.added == {"sessions": 300, "grants": 100}
    assert loader.finish().snapshot() == ledger.snapshot()


def test_the_loader_feeds_its_unpacker_only_what_it_needs() -> None:
    ledger = many()
    image = image_of(ledger, 9, 2)
    assert image.size > 4 * 64 * 1024
    loader = ImageLoader(image, **settings_of(ledger))
    loader.step(10)
    assert loader._stream._fed <= 64 * 1024  # not the whole buffer: a slice at a time


def test_an_image_over_a_read_only_memoryview_loads() -> None:
    ledger = rich()
    data = bytearray(image_of(ledger, 4, 1).buf)
    image = Image(4, 1, memoryview(data).toreadonly(), zlib.crc32(data))
    assert load_image(image, **settings_of(ledger)).snapshot() == ledger.snapshot()


# --- malformed images


def _image(*parts: Any, index: int = 5, term: int = 2) -> Image:
    return Image.of(index, term, b"".join(p if isinstance(p, bytes) else pack(p) for p in parts))


def _parts(ledger: Ledger, index: int = 5, term: int = 2) -> tuple[dict[str, Any], Any, Any]:
    head, *records = objects(image_of(ledger, index, term))
    sessions = [m for r in records if "s" in r for m in r["s"]]
    grants = [m for r in records if "g" in r for m in r["g"]]
    return head, sessions, grants


def _two() -> Ledger:
    w = World([ent(count=5)])
    w.open("s1")
    w.open("s2")
    w.checkout("s1")
    w.checkout("s2", 2)
    return w.ledger


def _malformed() -> dict[str, Image]:
    head, sessions, grants = _parts(_two())
    return {
        "head_not_a_map": _image([head]),
        "wrong_version": _image({**head, "v": 2}, {"s": sessions}, {"g": grants}),
        "head_of_another_index": _image({**head, "index": 6}, {"s": sessions}, {"g": grants}),
        "head_of_another_term": _image({**head, "term": 1}, {"s": sessions}, {"g": grants}),
        "count_not_an_int": _image({**head, "grants": "2"}, {"s": sessions}, {"g": grants}),
        "count_below_zero": _image({**head, "sessions": -1}, {"s": sessions}, {"g": grants}),
        "more_sessions_than_said": _image(head, {"s": [*sessions, {**sessions[0], "sid": "s9"}]}),
        "fewer_sessions_than_said": _image(head, {"s": sessions[:1]}, {"g": grants}),
        "more_grants_than_said": _image(head, {"s": sessions}, {"g": [*grants, grants[0]]}),
        "fewer_grants_than_said": _image(head, {"s": sessions}, {"g": grants[:1]}),
        "grants_before_sessions": _image(head, {"g": grants}, {"s": sessions}),
        "sessions_after_grants": _image(
            {**head, "sessions": 2}, {"s": sessions[:1]}, {"g": []}, {"s": sessions[1:]}
        ),
        "unknown_record_kind": _image(head, {"s": sessions}, {"q": grants}),
        "record_of_two_kinds": _image(head, {"s": sessions, "g": grants}),
        "record_not_a_map": _image(head, [sessions]),
        "data_after_the_last_grant": _image(head, {"s": sessions}, {"g": grants}, {"g": []}),
        "a_byte_after_the_last_grant": _image(head, {"s": sessions}, {"g": grants}, b"\0"),
        "duplicated_session": _image(head, {"s": [sessions[0], sessions[0]]}, {"g": grants}),
        "orphaned_grant": _image(
            head, {"s": sessions}, {"g": [grants[0], {**grants[1], "sid": "nobody"}]}
        ),
        "duplicated_grant": _image(head, {"s": sessions}, {"g": [grants[0], grants[0]]}),
        "grant_too_new": _image(
            head, {"s": sessions}, {"g": [grants[0], {**grants[1], "grant": head["next_grant"]}]}
        ),
        "grant_not_a_map": _image(head, {"s": sessions}, {"g": [grants[0], [1, 2]]}),
        "session_without_replies": _image(
            head, {"s": [{k: v for k, v in sessions[0].items() if k != "replies"}, sessions[1]]}
        ),
        "undecodable": _image(head, b"\xc1"),
        "record_kind_not_a_string": _image(head, b"\x81\x01\x90"),
    }


@pytest.mark.parametrize("kind", sorted(_malformed()))
def test_a_malformed_image_raises_ledger_error(kind: str) -> None:
    image = _malformed()[kind]
    with pytest.raises(LedgerError, match="snapshot"):
        load_image(image, **SETTINGS)
    loader = ImageLoader(image, **SETTINGS)
    with pytest.raises(LedgerError, match="snapshot"):
        while loader.step(1) is None:
            pass


def test_an_image_cut_anywhere_raises_ledger_error() -> None:
    image = image_of(_two(), 5, 2)
    for size in range(image.size):
        cut = Image.of(5, 2, bytes(image.buf[:size]))
        with pytest.raises(LedgerError, match="snapshot image"):
            load_image(cut, **SETTINGS)


def test_head_of_reads_only_a_head_with_an_index_and_term() -> None:
    assert head_of(pack({"v": 1, "index": 3, "term": 0}) + b"\xc1 garbage after it") == (3, 0)
    for bad in (b"", b"\xc1", pack([1]), pack({"index": 0, "term": 1}), pack({"index": 2})):
        with pytest.raises(LedgerError, match="snapshot image"):
            head_of(bad)


@pytest.mark.parametrize("enabled", [True, False])
def test_finish_pauses_the_cyclic_gc_and_leaves_it_as_it_was(enabled: bool) -> None:
    ledger = rich()
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        assert load_image(image_of(ledger, 3, 1), **settings_of(ledger)).snapshot() == (
            ledger.snapshot()
        )
        assert gc.isenabled() == enabled
        with pytest.raises(LedgerError):
            load_image(Image.of(3, 1, b"\xc1"), **SETTINGS)
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()
