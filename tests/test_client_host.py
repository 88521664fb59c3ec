"""The client library as a guest in its host process: shared I/O, descriptors, fork.

Every test runs its clients in a child interpreter of its own, with its own
``RLIMIT_NOFILE`` and its own exit status (an abort by libzmq is exit 134, which only
a separate process can show), against one live secure triad whose license has a
``host`` feature of 2,000 seats. The child prints one JSON line of what it saw; the
test judges it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from zbroker.broker.license import sign_license_text
from zbroker.broker.signing import load_private_key
from zbroker.clients.testing import LocalTriad, wait_for

pytestmark = pytest.mark.integration

SEATS = 2000
CHILD_TIMEOUT = 120.0  # a child that hangs is a failure, not a stuck suite

# What every child starts with: its descriptor limit, then the library.
PRELUDE = """
import json, os, resource, sys, threading, time
limit = int(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
from zbroker import ClientForked, LicenseClient, LicenseUnavailable
lic = sys.argv[2]

def fds():
    return len(os.listdir("/proc/self/fd")) - 1

def tasks():
    # Python's threads, and libzmq's (named ZMQbg/...), not the OS threads of a pool
    # that has just been joined and may not have left the task list yet.
    zmq_threads = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                zmq_threads += comm.read().startswith("ZMQbg")
        except FileNotFoundError:
            pass  # a thread that ended since the listing
    return threading.active_count() + zmq_threads

def hog():
    # What a host application does: take every descriptor there is.
    files = []
    while True:
        try:
            files.append(open(os.devnull))
        except OSError:
            return files
"""


@pytest.fixture(scope="module")
def host_triad(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalTriad]:
    triad = LocalTriad(tmp_path_factory.mktemp("host"))
    text = triad.config.license_path.read_text().rstrip("\n")
    text += f"\nFEATURE host demo 1.0 permanent {SEATS}\n"
    key = load_private_key(triad.dir / "keys" / "vendor.key")
    triad.config.license_path.write_text(sign_license_text(text, key))
    failed = request.session.testsfailed
    triad.start()
    try:
        triad.wait_for_primary(timeout=30)
        yield triad
    finally:
        triad.stop()
        if request.session.testsfailed > failed:
            print(triad.log_text())


def run_child(body: str, limit: int, triad: LocalTriad, *args: str) -> dict[str, Any]:
    """Run PRELUDE + ``body`` under ``limit`` descriptors; its JSON line, once it exited 0."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip(f"needs a hard RLIMIT_NOFILE of {limit}, this host allows {hard}")
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + body, str(limit), triad.license, *args],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, f"child exited {proc.returncode}:\n{proc.stderr[-5000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"child printed nothing:\n{proc.stderr[-5000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def in_use(triad: LocalTriad) -> int:
    return int(triad.feature("host")["in_use"])


# --- 1,000 clients in one process


THOUSAND = """
from concurrent.futures import ThreadPoolExecutor
n = int(sys.argv[3])
base = {"fds": fds(), "tasks": tasks()}
clients = [LicenseClient(lic, user=f"u{i}", timeout=30) for i in range(n)]
with ThreadPoolExecutor(16) as pool:
    grants = list(pool.map(lambda c: c.checkout("host"), clients))
held = {"fds": fds(), "tasks": tasks()}  # every session open, every grant held
safe = sum(g.safe for g in grants)
report = clients[0].status()
seen = next(f["in_use"] for f in report["features"] if f["name"] == "host")
with ThreadPoolExecutor(16) as pool:
    list(pool.map(lambda c: c.close(), clients))
print(json.dumps({
    "grants": safe, "ids": len({g.id for g in grants}),
    "seen": seen, "base": base, "held": held, "after": {"fds": fds(), "tasks": tasks()},
    "released": sum(g.released for g in grants),
}))
"""


def test_a_thousand_clients_hold_a_grant_each_within_4096_descriptors(
    host_triad: LocalTriad,
) -> None:
    got = run_child(THOUSAND, 4096, host_triad, "1000")
    assert got["grants"] == got["ids"] == got["seen"] == 1000
    assert got["released"] == 1000
    # One connection per node carries up to 32 clients (clients/engine.py): 32 per node
    # at most and a spare, 4 descriptors each, and 7 for the engine and the context.
    assert got["held"]["fds"] - got["base"]["fds"] <= 7 + 3 * 33 * 4, got
    # the library's I/O thread and libzmq's two, beside the main thread: none per client
    assert got["held"]["tasks"] == got["base"]["tasks"] + 3, got
    assert got["after"] == got["base"], "the last close gives every descriptor back"
    wait_for(lambda: in_use(host_triad) == 0, 10, "every seat back in the pool")


# --- running out of descriptors


SWEEP = """
# Leave k descriptors free, for every k around what the library needs: before the
# guard, libzmq aborted the process (exit 134) when its context started with 1 to 3.
sweep = []
for k in range(0, 41):
    files = hog()
    for _ in range(min(k, len(files))):
        files.pop().close()
    started = time.monotonic()
    client = None
    try:
        client = LicenseClient(lic, timeout=5)
        client.status()
        outcome = "ok"
    except LicenseUnavailable as exc:
        outcome = str(exc)
    sweep.append([k, time.monotonic() - started, outcome])
    if client is not None:
        client.close()
    for f in files:
        f.close()

# Clients until one fails: the first takes its connections, then the host takes every
# descriptor left. Clients that fit on the connections there are need none; the one
# that needs a new connection is refused with the cause, and served once some are free.
clients = [LicenseClient(lic, timeout=5) for _ in range(200)]
grants = [clients[0].checkout("host")]
files = hog()
refused = None
for client in clients[1:]:
    started = time.monotonic()
    try:
        grants.append(client.checkout("host"))
    except LicenseUnavailable as exc:
        refused = [str(exc), time.monotonic() - started]
        break
served_while_starved = len(grants)
for f in files:
    f.close()
grants.append(client.checkout("host"))
for client in clients:
    client.close()
print(json.dumps({"sweep": sweep, "refused": refused, "served_while_starved":
    served_while_starved, "served_after": len(grants)}))
"""


def test_running_out_of_descriptors_is_license_unavailable_with_the_cause(
    host_triad: LocalTriad,
) -> None:
    got = run_child(SWEEP, 128, host_triad)  # run_child: exit status 0, no abort
    outcomes = [outcome for _, _, outcome in got["sweep"]]
    for k, took, outcome in got["sweep"]:
        assert outcome == "ok" or (
            "too many open files (EMFILE)" in outcome and "raise ulimit -n" in outcome
        ), (k, outcome)
        # at once, not at the 5 s deadline of the call (a few ms; slack for a loaded host)
        assert took < 2.5, f"{k} descriptors free: {took:.3f} s"
    assert any("reading" in o for o in outcomes), "the license file itself could not be read"
    assert any("starting the client's I/O thread" in o for o in outcomes)
    assert any("while connecting to tcp://" in o for o in outcomes)
    assert outcomes[-1] == "ok"

    message, took = got["refused"]
    assert "while connecting to tcp://" in message and "raise ulimit -n" in message, message
    assert took < 2.5
    assert got["served_while_starved"] >= 32  # every client the first connection carries
    assert got["served_after"] == got["served_while_starved"] + 1
    wait_for(lambda: in_use(host_triad) == 0, 10, "every seat back in the pool")


# --- fork


FORK = """
parent = LicenseClient(lic, timeout=5)
unused = LicenseClient(lic, timeout=5)  # never called before the fork
grant = parent.checkout("host")
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read)
    seen = {}
    for name, call in (("status", parent.status), ("release", grant.release),
                       ("unused", unused.status)):
        started = time.monotonic()
        try:
            call()
            seen[name] = ["no error", 0.0]
        except ClientForked as exc:
            seen[name] = [str(exc), time.monotonic() - started]
        except Exception as exc:
            seen[name] = [f"{type(exc).__name__}: {exc}", time.monotonic() - started]
    parent.close()  # only this copy: the sessions are the parent's
    with LicenseClient(lic, timeout=5) as own:
        mine = own.checkout("host")
        seen["own"] = [mine.safe, own.status()["node"]]
        own.checkin(mine)
    os.write(write, json.dumps(seen).encode())
    os._exit(0)
os.close(write)
_, status = os.waitpid(pid, 0)
child = json.loads(os.read(read, 65536).decode())
alive = grant.safe and parent.status()["node"] != ""
parent.checkin(grant)
parent.close()
unused.close()
print(json.dumps({"child": child, "child_status": status, "parent_alive": alive,
                  "released": grant.released}))
"""


def test_a_forked_child_fails_at_once_and_can_make_its_own_client(
    host_triad: LocalTriad,
) -> None:
    got = run_child(FORK, 4096, host_triad)
    child = got["child"]
    for name in ("status", "release", "unused"):
        message, took = child[name]
        assert "cannot be used in its forked child" in message, (name, message)
        assert "create a new LicenseClient" in message
        assert took < 0.5, f"{name} took {took:.3f} s"  # microseconds: no I/O at all
    assert child["own"][0] is True
    assert got["child_status"] == 0
    assert got["parent_alive"] and got["released"], "the parent's client is untouched"
    wait_for(lambda: in_use(host_triad) == 0, 10, "every seat back in the pool")
