"""``zbroker status``: ask every node for its own view and render what lmstat -a would.

Each node answers ``status`` for itself (role, term, last and committed delta, peers it
hears); the features and holders come from the primary's answer, or from the most
up-to-date node when there is no primary. A node that does not answer within the
timeout is shown as ``down``. Each node also says its security ``mode`` (``curve`` or
``plain``).

``ask`` is the one way the commands talk to nodes: one request to each, over CURVE
when a node's key is known (``ClientCurve``), answers collected until a deadline.
``zbroker down`` uses it for its ``admin`` requests.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import zmq

from broker.security import ClientCurve, process_keypair
from clients.licpath import server_keys
from clients.wire import decode_reply, encode_request


def default_curve(endpoints: list[str]) -> ClientCurve | None:
    """CURVE for endpoints whose keys ``ZBROKER_SERVER_KEYS`` knows; None if it knows none."""
    keys = server_keys(endpoints)
    return ClientCurve(process_keypair(), keys) if any(e in keys for e in endpoints) else None


def ask(
    endpoints: list[tuple[str, str]],
    request: dict[str, Any],
    *,
    timeout: float,
    curve: ClientCurve | None = None,
) -> dict[str, dict[str, Any]]:
    """Each node's reply (a map with ``status``) to ``request``; silent nodes are left out."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    answers: dict[str, dict[str, Any]] = {}
    sockets: dict[zmq.Socket[bytes], str] = {}
    poller = zmq.Poller()
    try:
        for name, endpoint in endpoints:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if curve is not None:
                curve.apply(sock, endpoint)
            sock.connect(endpoint)
            sock.send(encode_request({"req": 1, **request}))
            sockets[sock] = name
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while len(answers) < len(sockets):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for sock, _ in poller.poll(int(left * 1000) + 1):
                reply = decode_reply(sock.recv())
                answers[sockets[sock]] = {"status": reply.status, **reply.body}
    finally:
        for sock in sockets:
            sock.close(linger=0)
    return answers


def query_nodes(
    endpoints: list[tuple[str, str]], timeout: float = 1.0, curve: ClientCurve | None = None
) -> dict[str, Any]:
    """Status of a triad: ``{"nodes": [...], "features": [...], "primary": name|None}``.

    Without ``curve``, the keys come from ``ZBROKER_SERVER_KEYS`` (plain TCP if none).
    """
    if curve is None:
        curve = default_curve([e for _, e in endpoints])
    replies = ask(endpoints, {"op": "status"}, timeout=timeout, curve=curve)
    answers = {
        name: dict(reply["report"])
        for name, reply in replies.items()
        if reply["status"] == "ok" and isinstance(reply.get("report"), dict)
    }
    return merge(endpoints, answers)


def merge(endpoints: list[tuple[str, str]], answers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = []
    for name, endpoint in endpoints:
        own = answers.get(name)
        if own is None:
            nodes.append({"name": name, "endpoint": endpoint, "role": "down", "term": None})
            continue
        nodes.append(_own_entry(own) | {"endpoint": endpoint, "mode": own.get("mode")})
    primaries = [n for n in nodes if n["role"] == "primary"]
    primary = max(primaries, key=lambda n: n["term"])["name"] if primaries else None
    source = None
    if primary is not None:
        source = answers[primary]
    elif answers:
        source = max(
            answers.values(), key=lambda a: (_own_entry(a)["term"], _own_entry(a)["commit"])
        )
    if primary is not None:
        head = _own_entry(answers[primary])["commit"]
        for node in nodes:
            if node["role"] != "down":
                node["lag"] = max(0, head - node["commit"])
    return {
        "primary": primary,
        "mode": source["mode"] if source else None,
        "nodes": nodes,
        "features": source["features"] if source else [],
    }


def _own_entry(report: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = report["nodes"][0]
    return entry


_MODES = {
    "curve": "curve (CURVE: encrypted, node keys checked)",
    "plain": "plain (NOT encrypted nor authenticated: trials only)",
}


def render(status: dict[str, Any]) -> str:
    mode = status.get("mode")
    lines = [f"Nodes (security: {_MODES.get(mode, mode) if mode else 'unknown'}):"]
    for n in status["nodes"]:
        if n["role"] == "down":
            lines.append(f"  {n['name']:<8} down      {n['endpoint']}")
            continue
        odd = f"  [mode {n['mode']}]" if n.get("mode") != mode else ""
        lines.append(
            f"  {n['name']:<8} {n['role']:<9} term {n['term']:<4} last {n['last']:<7} "
            f"commit {n['commit']:<7} lag {n.get('lag', '?'):<5} "
            f"peers {','.join(n['peers']) or '-'}  {n['endpoint']}{odd}"
        )
    if status["primary"] is None:
        lines.append("  no primary: checkouts are unavailable")
    lines.append("")
    lines.append("Features:")
    for f in status["features"]:
        lines.append(
            f"  {f['name']}: {f['in_use']} of {f['total']} seats in use, {f['queued']} queued"
        )
        for h in f["holders"]:
            since = datetime.datetime.fromtimestamp(h["since"]).strftime("%Y-%m-%d %H:%M:%S")
            lines.append(
                f"    {h['user']} {h['host']} {h['display']} v{h['version']}, "
                f"{h['count']} seat(s), grant {h['grant']}, since {since}"
            )
    return "\n".join(lines)
