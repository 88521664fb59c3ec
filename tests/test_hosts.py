"""The hosts kit itself: namespaces made and always deleted, stale ones of a killed run
cleaned, addresses that exist only inside, every process on its own host. Needs root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from zbroker.clients.testing.hosts import (
    CLIENTS,
    PREFIX,
    HostClient,
    Hosts,
    HostsError,
    HostTriad,
    namespaces,
)

pytestmark = pytest.mark.integration


def _mine() -> list[str]:
    return [n for n in namespaces() if n.startswith(f"{PREFIX}{os.getpid()}-")]


def _namespace_of(pid: int) -> str:
    done = subprocess.run(
        ["ip", "netns", "identify", str(pid)], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def _ping(hosts: Hosts, source: str, target: str) -> bool:
    done = subprocess.run(
        [*hosts.exec_prefix(source), sys.executable, "-c", _CONNECT, hosts.addresses[target]],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return done.stdout.strip() == "refused"  # a TCP RST came back: the host is reachable


# Connect to a closed port: "refused" is an answer from the host, anything else is not.
_CONNECT = """
import socket, sys
s = socket.socket()
s.settimeout(0.5)
try:
    s.connect((sys.argv[1], 9))
except ConnectionRefusedError:
    print("refused")
except OSError as exc:
    print(type(exc).__name__)
"""


def test_namespaces_are_deleted_even_when_the_test_fails() -> None:
    with pytest.raises(RuntimeError), Hosts() as hosts:
        hosts.add("somewhere", "10.77.9.9")
        assert len(_mine()) == 4  # the bridge, the clients, the observer, somewhere
        raise RuntimeError("the test failed")
    assert _mine() == []


def test_a_killed_runs_namespaces_are_cleaned_by_the_next() -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    stale = f"{PREFIX}{int(gone.stdout)}-0-bridge"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with Hosts():
            assert stale not in namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", stale], check=False, capture_output=True)


def test_addresses_exist_only_inside_and_cuts_cut_both_ways() -> None:
    root = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True)
    with Hosts() as hosts:
        hosts.add("a", "10.77.9.1")
        hosts.add("b", "10.77.9.2")
        assert "10.77." not in root.stdout
        assert (
            "10.77."
            not in subprocess.run(
                ["ip", "-o", "addr"], capture_output=True, text=True, check=True
            ).stdout
        )
        assert _ping(hosts, "a", "b") and _ping(hosts, CLIENTS, "a")
        hosts.cut("a", "b")
        assert not _ping(hosts, "a", "b") and not _ping(hosts, "b", "a")
        assert _ping(hosts, CLIENTS, "a") and _ping(hosts, CLIENTS, "b")  # only that link
        hosts.heal("a", "b")
        assert _ping(hosts, "a", "b")
        with pytest.raises(HostsError, match="no host 'c'"):
            hosts.cut("a", "c")


def test_each_node_and_the_client_run_on_their_own_host(tmp_path: Path) -> None:
    with Hosts() as hosts, HostTriad(tmp_path, hosts) as triad:
        triad.wait_for_primary(timeout=20)
        for name, proc in triad.procs.items():
            assert _namespace_of(proc.pid) == hosts.namespace(triad.host(name))
        with HostClient(hosts, triad.license, user="u", timeout=4.0) as client:
            assert _namespace_of(client.agent.proc.pid) == hosts.namespace(CLIENTS)
            client.checkin(client.checkout("viewer"))
    assert _mine() == []
