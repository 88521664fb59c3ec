"""Compare the instructions a node spends per request in two source trees, under callgrind.

    git worktree add /tmp/before <commit>
    python scripts/ab_instructions.py /tmp/before . --pairs 3000
    python scripts/ab_instructions.py /tmp/before . --servers 3      # a triad's primary
    python scripts/ab_instructions.py /tmp/before . --annotate 25    # and where they go

``scripts/ab.py`` compares seconds, which a loaded machine distorts; this counts the
instructions one node executes, which it does not. For each tree, in a child process whose
``PYTHONPATH`` is that tree: a fresh plain-TCP demo (fsync off, no report log, the bench
feature of 1,000,000 seats), its first node started under ``valgrind --tool=callgrind``
with instrumentation off, the others (``--servers 3``) as usual; once it serves, a load
client outside valgrind opens ``--outstanding`` sessions, callgrind is switched on, the
client runs exactly ``--pairs`` checkout+checkin pairs with that many requests in
flight, callgrind is switched off, and the node is stopped. What is counted is the
node's whole work for those requests: receive, decode, decide, append, send, plus the
ticks that fell in the window (a node ticks every 10 ms; ``--idle`` measures a window
with no load of the same length, so the ticks can be told apart).

A triad's primary (``--servers 3``) also sends the appends and reads the acks; its
peers get a peer timeout of 30 s, because a node under callgrind is some 50 times
slower than usual and would otherwise be voted out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ab import _bench, _module  # scripts/ab.py: the tree's modules, either layout

NO_RESEND = 600.0  # a request is never sent twice: every pair is counted exactly once


def measure(
    servers: int, pairs: int, outstanding: int, idle: bool, out: Path, calls: bool = False
) -> dict[str, Any]:
    """Run the node of the tree on ``sys.path`` under callgrind (``calls``: cProfile, for
    the Python functions' call counts); run inside the child."""
    import zmq

    load_config = _module("broker.config").load_config
    write_demo = _module("broker.demo").write_demo
    load_private_key = _module("broker.signing").load_private_key
    license_module = _module("broker.license")
    # a tree from before it moved to broker/license.py has it in broker/signing.py
    sign_license_text = (
        getattr(license_module, "sign_license_text", None)
        or _module("broker.signing").sign_license_text
    )

    common = _bench("common")
    tmp = Path(tempfile.mkdtemp(prefix="abi-"))
    config_path = write_demo(tmp, servers=servers, force=True, secure=False)
    lines = [
        line
        for line in config_path.read_text().splitlines()
        if not line.startswith(("report_log", "fsync", "peer_timeout", "heartbeat_interval"))
    ]
    # the same disk work in both trees (no fsync, no report log); a slow node is not dead
    head = ["fsync = false", "heartbeat_interval = 0.1", "peer_timeout = 30.0"]
    config_path.write_text("\n".join(head + lines) + "\n")
    config = load_config(config_path)
    text = config.license_path.read_text().rstrip("\n")
    text += f"\nFEATURE {common.BENCH_FEATURE} demo 1.0 permanent {common.BENCH_SEATS}\n"
    key = load_private_key(tmp / "keys" / "vendor.key")
    config.license_path.write_text(sign_license_text(text, key))
    names = [n.name for n in config.nodes]
    endpoint = config.nodes[0].client
    procs: list[subprocess.Popen[bytes]] = []
    ctx = zmq.Context()
    try:
        valgrind = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if calls:
            valgrind = [sys.executable, "-m", "cProfile", "-o", str(out)]
        log = open(tmp / "node.log", "ab")  # noqa: SIM115 - the children own it
        first = run_command(config_path, names[0])
        node = subprocess.Popen(
            valgrind + (first[1:] if calls else first),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        procs.append(node)
        for name in names[1:]:
            procs.append(
                subprocess.Popen(
                    run_command(config_path, name), stdout=log, stderr=subprocess.STDOUT, env=env
                )
            )
        log.close()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.connect(endpoint)
        _wait_serving(sock, common, servers, 300.0)
        sids = [uuid.uuid4().hex for _ in range(outstanding)]
        _open(sock, common, sids, 120.0)
        if not calls:
            _control(node.pid, "on")
        started = time.monotonic()
        if idle:
            time.sleep(idle_seconds := float(pairs))  # --idle: pairs is the seconds to idle
            done = 0
        else:
            done = _drive(sock, common, sids, pairs)
        took = time.monotonic() - started
        if not calls:
            _control(node.pid, "off")
        sock.close()
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        ctx.destroy(linger=0)
    if calls:
        return {"pairs": done, "seconds": took}
    instructions = _total(out)
    result: dict[str, Any] = {"instructions": instructions, "seconds": took, "pairs": done}
    if idle:
        result["idle_seconds"] = idle_seconds
    else:
        result["per_request"] = instructions / (2 * done)
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def run_command(config_path: Path, node: str) -> list[str]:
    """``zbroker run`` of one node (spelt out: a tree from before has no ``run_command``)."""
    package = _module("broker").__name__  # zbroker.broker, or broker in a tree from before
    return [sys.executable, "-m", package, "run", "--config", str(config_path), "--node", node]


def _control(pid: int, state: str) -> None:
    subprocess.run(
        ["callgrind_control", "-i", state, str(pid)], check=True, capture_output=True, timeout=120
    )


def _total(out: Path) -> int:
    """The instruction count of a callgrind output file (its ``totals:`` or ``summary:``)."""
    text = out.read_text(errors="replace")
    # the header's summary: is 0 when instrumentation started off; totals: is at the end
    found = re.search(r"^totals:\s+(\d+)", text, re.M) or re.search(
        r"^summary:\s+(\d+)", text, re.M
    )
    if found is None:
        raise RuntimeError(f"{out}: no totals line (did the node exit before dumping?)")
    return int(found.group(1))


def _ask(sock: Any, common: Any, request: bytes, timeout: float) -> dict[str, Any]:
    sock.send(request)
    if not sock.poll(int(timeout * 1000)):
        raise TimeoutError("no answer")
    return dict(common.reply_of(sock.recv()))


def _wait_serving(sock: Any, common: Any, servers: int, timeout: float) -> None:
    """Until the node under callgrind is the serving primary with every node caught up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = _ask(sock, common, common.frame("status", "", 0, 0), 5.0)
        except TimeoutError:
            continue  # still starting: it answers nothing yet
        nodes = (reply.get("report") or {}).get("nodes") or []
        own = nodes[0] if nodes else {}
        if own.get("role") == "primary" and own.get("serving"):
            up = [n for n in nodes if n.get("role") in ("primary", "backup")]
            if len(up) == servers:
                return
        time.sleep(0.2)  # polling a condition with a deadline
    raise TimeoutError(f"the node did not serve within {timeout:.0f} s")


def _open(sock: Any, common: Any, sids: list[str], timeout: float) -> None:
    for sid in sids:
        sock.send(common.open_frame(sid))
    waiting = set(sids)
    deadline = time.monotonic() + timeout
    while waiting:
        if not sock.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
            raise TimeoutError(f"{len(waiting)} sessions not opened within {timeout:.0f} s")
        reply = common.reply_of(sock.recv())
        if reply.get("status") != "ok":
            raise RuntimeError(f"open refused: {reply}")
        waiting.discard(reply.get("sid"))


def _drive(sock: Any, common: Any, sids: list[str], pairs: int) -> int:
    """Exactly ``pairs`` checkout+checkin pairs, one request in flight per session."""
    index = {sid: i for i, sid in enumerate(sids)}
    reqs = [1] * len(sids)
    holding: list[int | None] = [None] * len(sids)
    started = finished = 0

    def issue(i: int) -> None:
        nonlocal started
        reqs[i] += 1
        grant = holding[i]
        if grant is None:
            if started >= pairs:
                return
            started += 1
            sock.send(common.checkout_frame(sids[i], reqs[i]))
        else:
            sock.send(common.checkin_frame(sids[i], reqs[i], grant))

    for i in range(len(sids)):
        issue(i)
    while finished < pairs:
        if not sock.poll(int(NO_RESEND * 1000)):
            raise TimeoutError(f"no answer within {NO_RESEND:.0f} s ({finished} of {pairs})")
        reply = common.reply_of(sock.recv())
        i = index[reply["sid"]]
        if reply.get("req") != reqs[i] or reply.get("status") != "ok":
            raise RuntimeError(f"unexpected reply {reply}")
        if holding[i] is None:
            holding[i] = common.grant_id(reply)
        else:
            holding[i] = None
            finished += 1
        issue(i)
    return finished


def annotate(out: Path, top: int) -> str:
    """The ``top`` functions by inclusive instructions (callgrind_annotate)."""
    done = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=99", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line for line in done.stdout.splitlines() if re.match(r"^\s*[\d,]+ ", line)]
    return "\n".join(rows[: top + 1])


def _child(root: Path, out: Path, flags: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, str(root), "--measure", str(out), *flags],
        env={**os.environ, "PYTHONPATH": str(root)},
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"measuring {root} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def calls_per_request(out: Path, requests: int) -> dict[str, float]:
    """Calls per request of each Python function (folder/file:name), from cProfile's file.

    The node's start and the sessions' opens are in it too: compare trees, not absolutes.
    (Its seconds are left out: a loaded machine distorts them.)"""
    import pstats

    stats: dict[Any, Any] = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    found: dict[str, float] = {}
    for (file, line, name), (_, ncalls, _, _, _) in stats.items():
        where = f"{Path(file).parent.name}/{Path(file).name}:{name}" if line else name
        found[where] = found.get(where, 0.0) + ncalls / requests
    return found


def compare_calls(keep: Path, trees: list[Path], flags: list[str], pairs: int, top: int) -> None:
    """Where the calls per request differ between the first two trees (cProfile)."""
    counts = []
    for t, tree in enumerate(trees[:2]):
        out = keep / f"cprofile.{t}"
        r = _child(tree.resolve(), out, [*flags, "--calls", "1"])
        counts.append(calls_per_request(out, 2 * r["pairs"]))
    before, after = counts
    rows = []
    for where in set(before) | set(after):
        b, a = before.get(where, 0.0), after.get(where, 0.0)
        rows.append((a - b, where, b, a))
    rows.sort(key=lambda row: -abs(row[0]))
    print(f"{'calls/request':>13} {'before':>8} {'after':>8}")
    for diff, where, b, a in rows[:top]:
        print(f"{diff:+13.2f} {b:8.2f} {a:8.2f}  {where}")
    total = f"{sum(before.values()):.1f} before, {sum(after.values()):.1f} after"
    print(f"total calls/request: {total}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", type=Path, help="checkouts: before, after")
    parser.add_argument("--servers", type=int, choices=(1, 3), default=1)
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--outstanding", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--idle", type=float, default=0.0, help="also count this many seconds of an idle node"
    )
    parser.add_argument("--annotate", type=int, default=0, help="show the top N C functions")
    parser.add_argument(
        "--calls",
        type=int,
        default=0,
        help="instead: the N Python functions whose calls per request differ most (cProfile)",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep the output files here")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:  # the child: this tree's code is on PYTHONPATH
        amount = int(args.idle) if args.idle else args.pairs
        result = measure(
            args.servers, amount, args.outstanding, bool(args.idle), args.measure, args.calls > 0
        )
        print(json.dumps(result))
        return
    keep = args.keep or Path(tempfile.mkdtemp(prefix="abi-out-"))
    keep.mkdir(parents=True, exist_ok=True)
    flags = ["--servers", str(args.servers), "--outstanding", str(args.outstanding)]
    if args.calls:
        compare_calls(
            keep, args.trees, [*flags, "--pairs", str(args.pairs)], args.pairs, args.calls
        )
        return
    for n in range(1, args.rounds + 1):
        for t, tree in enumerate(args.trees):
            root = tree.resolve()
            r = _child(root, keep / f"callgrind.{n}.{t}", [*flags, "--pairs", str(args.pairs)])
            print(
                f"round {n} {tree}: {r['per_request']:,.0f} instructions/request "
                f"({r['instructions']:,} for {r['pairs']} pairs in {r['seconds']:.1f} s; "
                f"servers {args.servers}, outstanding {args.outstanding})",
                flush=True,
            )
            if args.annotate:
                print(annotate(keep / f"callgrind.{n}.{t}", args.annotate), flush=True)
            if args.idle:
                r = _child(
                    root, keep / f"callgrind.{n}.{t}.idle", [*flags, "--idle", str(args.idle)]
                )
                print(
                    f"round {n} {tree} idle: {r['instructions'] / r['seconds']:,.0f} "
                    f"instructions/s of an idle node ({r['seconds']:.1f} s)",
                    flush=True,
                )
    print(f"callgrind files: {keep}")


if __name__ == "__main__":
    main()
