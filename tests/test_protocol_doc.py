"""docs/protocol.md against live nodes: the document's examples are this test's data.

docs/protocol.md is the contract for clients written in other languages. Its example
exchanges are fenced blocks (```` ```jsonc example=NAME [after=OTHER] [node=triad] ````):
each test here reads the ones of one point out of the document, sends their requests
to a real node over ZeroMQ and checks every reply by the rule the document states in
its "Examples" section, so the document and the node cannot drift apart again (issue
11, item 7). The points: the status report's node entries (and redirects), pools,
optional fields and their defaults, bounds (with ``sid`` and ``req`` copied into every
error that can read them), versions compared as numbers, whole-number floats, ``ack``
going down, a REQ socket's two-frame message, and the SERVER lines of a license file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from zbroker.broker.license import parse_syntax
from zbroker.clients.licpath import keys_from_file, servers_from_file
from zbroker.clients.testing import LocalTriad, RawClient, wait_for

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
# The keys whose values depend on the node, its ports, timings and clock: only their
# type is compared (the rule of the document's "Examples" section).
VARYING = frozenset(
    {"detail", "lease", "heartbeat", "term", "last", "commit", "endpoint", "primary"}
    | {"expires", "since", "peers", "days", "source"}
)
REPLY_TIMEOUT = 5.0  # seconds: a node on loopback answers in milliseconds
_FENCE = re.compile(r"^```(\w+) (example=[^\n]*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_MARK = re.compile(r"^// (request|reply)\b.*$", re.MULTILINE)


@dataclass(frozen=True)
class Example:
    name: str
    attrs: dict[str, str]  # after, node
    text: str  # the block as written
    exchanges: tuple[tuple[dict[str, Any], dict[str, Any]], ...]  # (request, reply)


def _exchanges(name: str, text: str) -> tuple[tuple[dict[str, Any], dict[str, Any]], ...]:
    parts = _MARK.split(text)
    if parts[0].strip():
        raise ValueError(f"example {name}: text before the first // request: {parts[0]!r}")
    kinds, bodies = parts[1::2], [json.loads(body) for body in parts[2::2]]
    if not kinds or kinds != ["request", "reply"] * (len(kinds) // 2):
        raise ValueError(f"example {name}: expected // request, // reply pairs, found {kinds}")
    return tuple(zip(bodies[::2], bodies[1::2], strict=True))


def read_examples(text: str) -> dict[str, Example]:
    found: dict[str, Example] = {}
    for lang, header, body in _FENCE.findall(text):
        attrs = dict(word.split("=", 1) for word in header.split())
        name = attrs.pop("example")
        if name in found:
            raise ValueError(f"two examples named {name}")
        exchanges = _exchanges(name, body) if lang == "jsonc" else ()
        found[name] = Example(name, attrs, body, exchanges)
    return found


EXAMPLES = read_examples(DOC.read_text())


def _kind(value: object) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "bool"  # before int: a bool is an int in Python, never on the wire
    for kind, types in (("int", int), ("float", float), ("str", str), ("list", list)):
        if isinstance(value, types):
            return kind
    return "map" if isinstance(value, dict) else type(value).__name__


def mismatches(got: object, want: object, path: str = "reply", loose: bool = False) -> list[str]:
    """How ``got`` differs from the example ``want``, by the document's rule."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{path}: expected a map, found {got!r}"]
        out = []
        if set(got) != set(want):
            out.append(f"{path}: keys {sorted(got)}, the example has {sorted(want)}")
        for key in sorted(set(got) & set(want)):
            out += mismatches(got[key], want[key], f"{path}.{key}", loose or key in VARYING)
        return out
    if isinstance(want, list):
        if not isinstance(got, list):
            return [f"{path}: expected a list, found {got!r}"]
        if loose:
            kinds = {_kind(item) for item in want}
            return [
                f"{path}[{i}]: {_kind(item)} {item!r}, the example's items are {sorted(kinds)}"
                for i, item in enumerate(got)
                if kinds and _kind(item) not in kinds
            ]
        if len(got) != len(want):
            return [f"{path}: {len(got)} items, the example has {len(want)}: {got!r}"]
        pairs = enumerate(zip(got, want, strict=True))
        return [m for i, (item, shown) in pairs for m in mismatches(item, shown, f"{path}[{i}]")]
    if _kind(got) != _kind(want):
        return [f"{path}: {_kind(got)} {got!r}, the example has {_kind(want)} {want!r}"]
    if not loose and got != want:
        return [f"{path}: {got!r}, the example has {want!r}"]
    return []


# --- talking to a node ------------------------------------------------------------------


def play(name: str, endpoint: str, kind: int = zmq.DEALER) -> None:
    """Run example ``name`` (after the one it names, if any) against the node at ``endpoint``."""
    example = EXAMPLES[name]
    if "after" in example.attrs:
        play(example.attrs["after"], endpoint)
    wire = RawClient(endpoint, kind)
    try:
        for request, expected in example.exchanges:
            reply = wire.ask(request, REPLY_TIMEOUT)
            problems = mismatches(reply, expected)
            assert not problems, (
                f"docs/protocol.md example {name}: the node's reply to\n  {json.dumps(request)}"
                f"\nis\n  {json.dumps(reply)}\nnot as documented:\n  " + "\n  ".join(problems)
            )
    finally:
        wire.close()


Node = Callable[[], str]  # starts a fresh single node, returns its client endpoint


@pytest.fixture
def node(make_triad: Any) -> Node:
    """A fresh single node as the document's examples have it: plain TCP, lease 30 s."""

    def make() -> str:
        single: LocalTriad = make_triad(servers=1, lease=30.0, secure=False)
        single.wait_for_primary()
        return single.endpoints[0]

    return make


# --- the points -------------------------------------------------------------------------

# The examples each point plays, in the order played; every example of the document is in
# one (checked below), so a new example without a test fails.
POINTS = {
    "status": ("status-triad", "redirect", "status-down"),
    "pool": ("checkout-pool", "status-holders"),
    "defaults": ("open-minimal", "open", "checkout-defaults"),
    "bounds": ("bounds",),
    "versions": ("versions",),
    "floats": ("whole-floats",),
    "ack": ("ack",),
    "req": ("req-socket",),
    "license": ("license-servers",),
}


def test_every_example_of_the_document_is_played_and_well_formed() -> None:
    played = [name for names in POINTS.values() for name in names]
    assert sorted(EXAMPLES) == sorted(played), "an example that no test plays, or a lost one"
    for example in EXAMPLES.values():
        assert example.attrs.get("after") in (None, *EXAMPLES), example.name
        assert set(example.attrs) <= {"after", "node"}, example.name
        assert (example.attrs.get("node") == "triad") == (example.name in POINTS["status"])
        if example.name not in POINTS["license"]:
            assert example.exchanges, f"{example.name}: no request in it"


def test_status_entries_down_nodes_and_redirects(triad: LocalTriad) -> None:
    alpha, beta, _ = triad.endpoints
    status_triad, redirect, status_down = POINTS["status"]

    def roles() -> list[str | None]:
        wire = RawClient(alpha)
        try:
            report = wire.ask({"v": 1, "op": "status"}, REPLY_TIMEOUT)["report"]
        finally:
            wire.close()
        own = report["nodes"][0]
        return [own["role"] if own["serving"] else None, *(n["role"] for n in report["nodes"][1:])]

    # alpha outranks the others and fails back: wait for the steady state the example shows
    wait_for(lambda: roles() == ["primary", "backup", "backup"], 10, "alpha primary, two backups")
    play(status_triad, alpha)
    play(redirect, beta)
    triad.kill("gamma")
    wait_for(lambda: roles() == ["primary", "backup", "down"], 10, "alpha to count gamma down")
    play(status_down, alpha)


def test_a_checkout_is_served_from_a_pool_of_lines(node: Node) -> None:
    checkout_pool, status_holders = POINTS["pool"]
    assert EXAMPLES[status_holders].attrs["after"] == checkout_pool  # played first
    play(status_holders, node())


def test_optional_fields_have_the_documented_defaults(node: Node) -> None:
    for name in POINTS["defaults"]:
        play(name, node())


def test_bounds_and_sid_and_req_in_every_error_that_can_read_them(node: Node) -> None:
    (bounds,) = POINTS["bounds"]
    endpoint = node()
    play(bounds, endpoint)
    # The one case too long to print in the document: a field past 4,096 characters.
    wire = RawClient(endpoint)
    try:
        reply = wire.ask(
            {"v": 1, "op": "open", "sid": "s" * 64, "req": 9, "user": "u" * 5000}, REPLY_TIMEOUT
        )
    finally:
        wire.close()
    assert (reply["sid"], reply["req"], reply["status"], reply["code"]) == (
        "s" * 64,
        9,
        "error",
        "bad_request",
    ), reply


def test_versions_compare_as_numbers(node: Node) -> None:
    for name in POINTS["versions"]:
        play(name, node())


def test_whole_number_floats_are_integers(node: Node) -> None:
    for name in POINTS["floats"]:
        play(name, node())


def test_a_lower_ack_is_ignored_and_a_request_below_it_is_stale(node: Node) -> None:
    for name in POINTS["ack"]:
        play(name, node())


def test_a_req_socket_is_told_to_use_a_dealer(node: Node) -> None:
    (name,) = POINTS["req"]
    play(name, node(), kind=zmq.REQ)


def test_server_lines_as_documented(tmp_path: Path) -> None:
    """The license block is read as the document says, by the node and by the client."""
    (name,) = POINTS["license"]
    text = EXAMPLES[name].text
    shown = re.findall(r"SERVER (\w+)\s+ANY (\S+)\s+\\?\s*KEY=(\S+)", text)
    assert [name for name, _, _ in shown] == ["alpha", "beta", "gamma"]
    assert "#" in shown[0][2]  # the point: a '#' inside a word is not a comment
    servers = parse_syntax(text, path="doc.lic").servers
    assert [(s.name, s.endpoint, s.attrs["KEY"]) for s in servers] == shown
    path = tmp_path / "doc.lic"
    path.write_text(text)
    assert servers_from_file(str(path)) == tuple(endpoint for _, endpoint, _ in shown)
    assert keys_from_file(str(path)) == {endpoint: key for _, endpoint, key in shown}
