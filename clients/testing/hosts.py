"""Hosts as network namespaces: each node on a machine of its own, clients on another.

A triad is three machines by design; ``LocalTriad`` runs three processes on one loopback.
``Hosts`` builds the machines: one network namespace per host, each with one address of
``10.77.0.0/16`` on its ``eth0``, joined by a bridge that lives in a namespace of its own.
The addresses exist only inside these namespaces: nothing outside them is ever a target,
and two runs (each with its own bridge) never see each other's packets. Needs root.

    with Hosts() as hosts:
        with HostTriad(tmp_path, hosts) as triad:
            triad.wait_for_primary()
            subprocess.run(hosts.exec_prefix(CLIENTS) + [sys.executable, "app.py"])
            triad.cut("alpha", "beta")   # a blackhole route both ways

Layout of site ``s`` (1, 2, ...): its nodes are hosts ``alpha<s>``, ``beta<s>``,
``gamma<s>`` at ``10.77.s.1`` to ``10.77.s.3`` (``HostTriad`` speaks of them by node
name, as the nemesis does: ``triad.cut("alpha", "beta")``); the clients' host is
``10.77.0.100`` and the observer's ``10.77.0.254``. The observer is where the test kit
itself stands (status queries, the probes of a cut-off node): a process inside that
namespace answering over a pipe (``Observer``), since a ZeroMQ context of the test's own
process lives in the root namespace. Nothing ever cuts the observer off: it sees every
node as the administrator's console would.

Cuts are ``blackhole`` routes (``ip route add blackhole ADDR/32``) inside the namespaces,
both ways: packets to the other side are dropped silently, as a broken switch drops them,
and established TCP connections stall rather than reset. ``heal`` deletes them.

Names are unique per run (``zbh<pid>-<n>-<host>``); a namespace whose creating process is
gone is a stale one of a killed run, deleted by the next ``Hosts``. ``close`` (also on
``__exit__``, also after a failure) deletes every namespace of the run, which ends the
veth pairs and the bridge with them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from zbroker.clients.testing.kit import LocalTriad

PREFIX = "zbh"  # every namespace of this kit starts with it (and the creator's pid)
SUBNET = 16  # one L2 segment: 10.77.0.0/16
CLIENTS = "clients"
OBSERVER = "observer"
CLIENTS_ADDRESS = "10.77.0.100"
OBSERVER_ADDRESS = "10.77.0.254"
IP_TIMEOUT = 10.0  # one ip(8) command; they take milliseconds
_STALE = re.compile(rf"{PREFIX}(\d+)-")
_runs = itertools.count()


class HostsError(Exception):
    """The namespaces could not be built or changed; the message says which command failed."""


def node_address(site: int, index: int) -> str:
    """The address of node ``index`` (0-based, in rank order) of site ``site`` (1-based)."""
    return f"10.77.{site}.{index + 1}"


def _ip(*args: str) -> None:
    try:
        done = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise HostsError("ip(8) is not installed: apt-get install iproute2") from None
    except subprocess.TimeoutExpired:
        raise HostsError(f"ip {' '.join(args)}: no answer in {IP_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        raise HostsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


def namespaces() -> list[str]:
    """Every network namespace ``ip netns`` knows (names only)."""
    done = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
    )
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def clean_stale() -> list[str]:
    """Delete the namespaces of runs whose process is gone; returns their names."""
    gone = []
    for name in namespaces():
        match = _STALE.match(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            with contextlib.suppress(HostsError):
                _ip("netns", "delete", name)
                gone.append(name)
    return gone


def require_root() -> None:
    if os.geteuid() != 0:
        raise HostsError("network namespaces need root (CI runs as root; try sudo)")


class Hosts:
    """The machines of one run: a bridge and a namespace per host, with cuts between them."""

    def __init__(self) -> None:
        require_root()
        clean_stale()
        self.run = f"{PREFIX}{os.getpid()}-{next(_runs)}"
        self.addresses: dict[str, str] = {}
        self.cuts: set[frozenset[str]] = set()
        self._made: list[str] = []
        self._lock = threading.Lock()  # the nemesis and a test's thread may both cut
        self.bridge = f"{self.run}-bridge"
        try:
            self._namespace("bridge")
            _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge, "link", "set", "br0", "up")
            self.add(CLIENTS, CLIENTS_ADDRESS)
            self.add(OBSERVER, OBSERVER_ADDRESS)
        except BaseException:
            self.close()
            raise

    def _namespace(self, host: str) -> str:
        name = f"{self.run}-{host}"
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def namespace(self, host: str) -> str:
        if host not in self.addresses:
            raise HostsError(f"no host {host!r}; the hosts are {sorted(self.addresses)}")
        return f"{self.run}-{host}"

    def add(self, host: str, address: str) -> None:
        """A machine ``host`` with ``address`` on the bridge."""
        if host in self.addresses:
            raise HostsError(f"host {host!r} exists already")
        ns = self._namespace(host)
        port = f"v{len(self.addresses)}"  # its end on the bridge (names are per namespace)
        _ip("-n", self.bridge, "link", "add", port, "type", "veth", "peer", "name", "eth0")
        _ip("-n", self.bridge, "link", "set", "eth0", "netns", ns)
        _ip("-n", self.bridge, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/{SUBNET}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        self.addresses[host] = address

    def exec_prefix(self, host: str) -> list[str]:
        """Prepend to a command line to run it on ``host`` (``ip netns exec`` execs: same pid)."""
        return ["ip", "netns", "exec", self.namespace(host)]

    # --- cuts
    def cut(self, a: str, b: str) -> None:
        """Cut the link between hosts ``a`` and ``b``: each drops what it sends the other."""
        self.namespace(a), self.namespace(b)  # both known, or nothing is changed
        with self._lock:
            link = frozenset((a, b))
            if link in self.cuts:
                return
            self._route("add", a, b)
            self._route("add", b, a)
            self.cuts.add(link)

    def heal(self, a: str, b: str) -> None:
        with self._lock:
            link = frozenset((a, b))
            if link not in self.cuts:
                return
            self._route("delete", a, b)
            self._route("delete", b, a)
            self.cuts.discard(link)

    def isolate(self, host: str, others: Iterable[str]) -> None:
        for other in others:
            self.cut(host, other)

    def _route(self, verb: str, host: str, other: str) -> None:
        _ip("-n", self.namespace(host), "route", verb, "blackhole", f"{self.addresses[other]}/32")

    # --- the end
    def close(self) -> None:
        """Delete every namespace of the run (processes still inside keep theirs alive)."""
        for name in reversed(self._made):
            with contextlib.suppress(HostsError):
                _ip("netns", "delete", name)
        self._made.clear()

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Observer:
    """A process on a host (the observer's, unless told) doing what the test kit asks there.

    One JSON request a line on its stdin, one JSON answer a line on its stdout
    (``python -m zbroker.clients.testing.hosts``); ``ask`` is safe from several threads.
    """

    def __init__(self, hosts: Hosts, host: str = OBSERVER) -> None:
        self.proc: subprocess.Popen[str] = subprocess.Popen(
            [*hosts.exec_prefix(host), sys.executable, "-m", "zbroker.clients.testing.hosts"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._lock = threading.Lock()

    def ask(self, **request: Any) -> dict[str, Any]:
        stdin: IO[str] | None = self.proc.stdin
        stdout: IO[str] | None = self.proc.stdout
        with self._lock:
            if stdin is None or stdout is None or self.proc.poll() is not None:
                raise HostsError(f"the observer process exited ({self.proc.returncode})")
            stdin.write(json.dumps(request) + "\n")
            stdin.flush()
            line = stdout.readline()
        if not line:
            raise HostsError("the observer process exited while answering")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise HostsError(f"observer: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class RemoteRefusal(Exception):
    """A call of a ``HostClient`` raised this library error on its host (``kind``: its class)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class HostClient:
    """A ``LicenseClient`` of ``servers`` (a license path) living in a process on ``host``.

    For tests whose client must stand where users stand: ``checkout`` returns a handle of
    the grant for ``checkin`` (not its id: two triads number their grants alike); a
    library error (denied, unavailable) comes back as ``RemoteRefusal``.
    """

    def __init__(
        self, hosts: Hosts, servers: str, *, host: str = CLIENTS, user: str, timeout: float
    ) -> None:
        self.agent = Observer(hosts, host)
        try:
            self.agent.ask(op="client", servers=servers, user=user, timeout=timeout)
        except BaseException:
            self.agent.close()
            raise

    def _call(self, **request: Any) -> dict[str, Any]:
        answer = self.agent.ask(**request)
        if "refused" in answer:
            raise RemoteRefusal(answer["refused"], answer["message"])
        return answer

    def checkout(self, feature: str, count: int = 1) -> int:
        return int(self._call(op="checkout", feature=feature, count=count)["grant"])

    def checkin(self, grant: int) -> None:
        self._call(op="checkin", grant=grant)

    def close(self) -> None:
        with contextlib.suppress(HostsError):
            self.agent.ask(op="close")
        self.agent.close()

    def __enter__(self) -> HostClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HostTriad(LocalTriad):
    """A ``LocalTriad`` whose nodes are hosts of ``hosts``: site ``site``'s three addresses.

    The demo's ports stay as the OS gave them (each host has its own, so they cannot
    collide); only the host part of every endpoint (the license's SERVER lines, the
    config's ``peer`` and ``pub``) becomes the node's address. ``status``, ``query`` and
    ``probe`` are asked from the observer's host; ``client_prefix`` is what client load
    must be started with; ``cut`` and ``heal`` take node names.
    """

    def __init__(
        self,
        directory: Path,
        hosts: Hosts,
        *,
        site: int = 1,
        lease: float = 30.0,
        settings: dict[str, Any] | None = None,
        observer: Observer | None = None,
    ) -> None:
        from zbroker.broker.config import load_config

        # A copy: LocalTriad takes the settings it writes out of the dict it is given.
        super().__init__(directory, lease=lease, settings=dict(settings or {}))
        self.hosts = hosts
        addresses = {name: node_address(site, i) for i, name in enumerate(self.names)}
        _readdress(self.config_path, addresses)
        self.config = load_config(self.config_path)
        self.endpoints = [n.client for n in self.config.nodes]
        self._share_keys()  # the same file, its SERVER lines rewritten
        self.site = site
        for name, address in addresses.items():
            hosts.add(self.host(name), address)
        self._own_observer = observer is None
        self.observer = observer or Observer(hosts)

    @property
    def client_prefix(self) -> list[str]:
        return self.hosts.exec_prefix(CLIENTS)

    def host(self, name: str) -> str:
        """The host of node ``name`` (other hosts, ``clients`` say, keep their names)."""
        return f"{name}{self.site}" if name in self.names else name

    def command(self, name: str) -> list[str]:
        return self.hosts.exec_prefix(self.host(name)) + super().command(name)

    # --- cuts, by node name (the nemesis's Network)
    @property
    def cuts(self) -> set[frozenset[str]]:
        """The links of this site cut now (node names; ``clients`` for the clients' host)."""
        mine = {self.host(n): n for n in self.names}
        return {
            frozenset(mine.get(h, h) for h in link)
            for link in self.hosts.cuts
            if any(h in mine for h in link)
        }

    def cut(self, a: str, b: str) -> None:
        self.hosts.cut(self.host(a), self.host(b))

    def heal(self, a: str, b: str) -> None:
        self.hosts.heal(self.host(a), self.host(b))

    def status(self, timeout: float = 0.5, holders: bool = True) -> dict[str, Any]:
        return self.query([(n.name, n.client) for n in self.config.nodes], timeout, holders)

    def query(
        self, endpoints: list[tuple[str, str]], timeout: float = 0.5, holders: bool = True
    ) -> dict[str, Any]:
        """``zbroker.broker.status.query_nodes`` of these nodes, asked from the observer's host."""
        answer = self.observer.ask(
            op="status",
            config=str(self.config_path),
            endpoints=endpoints,
            timeout=timeout,
            holders=holders,
        )
        report: dict[str, Any] = answer["report"]
        return report

    def probe(self, name: str, feature: str, timeout: float = 0.5) -> str:
        """Ask node ``name`` alone for one seat of ``feature``, from the observer's host.

        Returns what it answered the checkout (``ok``: it granted), or that it answered
        no session (``open:<status>``), or ``silent``. A seat granted is checked in.
        """
        answer = self.observer.ask(
            op="probe", endpoint=self.config.node(name).client, feature=feature, timeout=timeout
        )
        return str(answer["outcome"])

    def stop(self) -> None:
        super().stop()
        if self._own_observer:
            self.observer.close()

    def __enter__(self) -> HostTriad:
        self.start()
        return self


def _readdress(config_path: Path, addresses: dict[str, str]) -> None:
    """Move a demo's nodes from 127.0.0.1 to their addresses, in the license and the config."""
    import datetime

    from zbroker.broker.config import load_config
    from zbroker.broker.demo import demo_license_text
    from zbroker.broker.license import sign_license_text
    from zbroker.broker.signing import load_private_key
    from zbroker.clients.curve import load_keypair

    config = load_config(config_path)
    directory = config_path.parent
    endpoints = [(n.name, n.client.replace("127.0.0.1", addresses[n.name])) for n in config.nodes]
    keys = {
        n.name: load_keypair(directory / "curve" / f"{n.name}.key_secret").public
        for n in config.nodes
    }
    text = demo_license_text(endpoints, datetime.date.today(), keys)
    private = load_private_key(directory / "keys" / "vendor.key")
    config.license_path.write_text(sign_license_text(text, private))
    lines = []
    node = ""
    for line in config_path.read_text().splitlines():
        if line.startswith("[nodes."):
            node = line[len("[nodes.") : -1]
        elif node and line.split("=", 1)[0].strip() in ("peer", "pub"):
            line = line.replace("127.0.0.1", addresses[node])
        lines.append(line)
    config_path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- the observer


def _serve() -> None:
    """The observer's loop (inside its namespace): answer each request line until EOF."""
    from zbroker.broker.cli import config_curve
    from zbroker.broker.config import load_config
    from zbroker.broker.status import query_nodes

    curves: dict[str, Any] = {}
    held = _Held()
    for line in sys.stdin:
        answer: dict[str, Any]
        try:
            request = json.loads(line)
            if request["op"] in _CLIENT_OPS:
                answer = held.do(request)
            elif request["op"] == "status":
                path = request["config"]
                if path not in curves:
                    curves[path] = config_curve(load_config(Path(path)), admin=False)
                report = query_nodes(
                    [tuple(e) for e in request["endpoints"]],
                    timeout=float(request["timeout"]),
                    curve=curves[path],
                    holders=bool(request["holders"]),
                )
                answer = {"report": report}
            elif request["op"] == "probe":
                answer = {"outcome": _probe(request["endpoint"], request["feature"], request)}
            else:
                answer = {"error": f"unknown request {request['op']!r}"}
        except Exception as exc:  # the observer answers every line, even a failed one
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


_CLIENT_OPS = frozenset({"client", "checkout", "checkin", "close"})


class _Held:
    """The one LicenseClient of a HostClient's process, and the grants it holds by handle."""

    def __init__(self) -> None:
        from zbroker.clients.client import LicenseClient
        from zbroker.clients.grant import Grant

        self.client: LicenseClient | None = None
        self.grants: dict[int, Grant] = {}
        self.handles = itertools.count(1)

    def do(self, request: dict[str, Any]) -> dict[str, Any]:
        from zbroker.clients.client import LicenseClient
        from zbroker.clients.errors import LicenseError

        op = request["op"]
        if op == "client":
            self.client = LicenseClient(
                request["servers"], user=request["user"], timeout=float(request["timeout"])
            )
            return {}
        if self.client is None:
            return {"error": "no client yet: send op=client first"}
        try:
            if op == "checkout":
                handle = next(self.handles)
                self.grants[handle] = self.client.checkout(
                    request["feature"], int(request["count"])
                )
                return {"grant": handle}
            if op == "checkin":
                self.client.checkin(self.grants.pop(int(request["grant"])))
                return {}
            self.client.close()
            return {}
        except LicenseError as exc:
            return {"refused": type(exc).__name__, "message": str(exc)}


def _probe(endpoint: str, feature: str, request: dict[str, Any]) -> str:
    """One session and one checkout on one node, over a socket of its own (no redirects)."""
    from zbroker.clients.testing.raw import RawClient

    timeout = float(request["timeout"])
    raw = RawClient(endpoint)
    try:
        opened = raw.call(
            timeout, op="open", user="probe", host="observer", display=":0", client_version="probe"
        )
        if opened["status"] != "ok":
            return f"open:{opened['status']}"
        reply = raw.call(timeout, op="checkout", feature=feature, count=1)
        if reply["status"] == "ok":
            with contextlib.suppress(TimeoutError):
                raw.call(timeout, op="close")
        return str(reply["status"])
    except TimeoutError:
        return "silent"
    finally:
        raw.close()


def main(argv: list[str]) -> None:
    if argv:
        raise SystemExit(
            "usage: python -m zbroker.clients.testing.hosts  (the observer: JSON lines)"
        )
    _serve()


if __name__ == "__main__":
    main(sys.argv[1:])
