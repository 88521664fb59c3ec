"""``zbroker.toml``: what a node needs besides the license file, validated once.

The license file's SERVER lines say which nodes exist, their rank and their client
endpoints; the config adds, per node, its peer endpoints and data directory, and the
timings shared by the triad. Relative paths are relative to the config file, so a
demo folder can be moved as a whole.

Layout::

    license = "demo.lic"
    vendor_key = "vendor.pub"
    heartbeat_interval = 0.1     # seconds between node heartbeats
    peer_timeout = 0.5           # a peer is dead after this long unheard
    lease = 30.0                 # a client session expires after this long unheard
    failback = true
    fsync = true
    secure = true                # CURVE on every socket (false: plain TCP, for trials)
    admin_keys = "curve/admins"  # public keys that may administer (zbroker down)
    admin_key = "curve/admin.key_secret"  # the key `zbroker down` and status use here
    client_allow = "curve/clients"        # optional: serve only these client keys
    options = "acme.opt"         # optional: the options file, FlexNet syntax (docs/admin.md)
    borrow_key = "keys/borrow.key"  # optional: signs borrow tokens (docs/admin.md, Borrowing)
    max_sessions = 100000        # limits: see docs/security.md
    max_sessions_per_host = 10000
    max_queue = 10000
    max_unacked = 10000
    max_replies = 1000000        # every session's unacknowledged replies together

    [nodes.alpha]
    peer = "tcp://127.0.0.1:27101"   # ROUTER: votes, deltas, acks, catch-up
    pub = "tcp://127.0.0.1:27201"    # PUB: heartbeats
    data = "data/alpha"
    secret_key = "curve/alpha.key_secret"  # secure mode: this node's CURVE key pair
    metrics = "127.0.0.1:27301"      # optional: Prometheus metrics over HTTP (docs/metrics.md)
    report_log = "report/alpha"      # optional: the report log's directory (docs/reportlog.md)

In secure mode every SERVER line of the license must carry the node's public key
(``KEY=<z85>``), and each node needs ``secret_key``; the file itself is read only by the
node that uses it (``broker/security.py``), so one config can serve every host.

Ranges (``RANGES``): a value of the wrong type, ``nan``, ``inf`` or outside its range is
refused naming the setting and the range:

- ``heartbeat_interval`` 0.01 to 10 s: the node ticks every 10 ms, nothing goes faster;
- ``peer_timeout`` above 0 up to 60 s, and more than two ``heartbeat_interval``;
- ``lease`` 0.5 s to a week (``zbroker.broker.wire.MAX_LEASE``): clients heartbeat every lease / 3;
- ``max_message`` 8,192 to 1,048,576 bytes: the largest honest request is about 5 KB;
- ``snapshot_every`` 1 to 10,000,000 deltas;
- ``snapshot_keep`` 0 to 10,000,000 deltas (default 10,000): log entries a node keeps
  before its snapshot, so that a node lagging by fewer catches up from the log and not
  from a whole snapshot;
- ``min_remove`` above 0 up to a week (default 120, RLM's): ``zbroker remove`` leaves
  grants younger than that alone (docs/admin.md, "zbroker remove");
- ``min_timeout`` above 0 up to a week (default 900, FlexNet's floor): a TIMEOUT line
  below it is raised to it (docs/admin.md, "TIMEOUT");
- the limits 1 to 1,000,000 (``zbroker.broker.limits.MAXIMA``).

Endpoints (``peer``, ``pub``) are ``tcp://host:port`` with a port from 1 to 65535. No
two endpoints of one config, the SERVER lines' included, may share a host:port, and
no two nodes a data directory: on one host, the second node to start would fail to
bind or share the first one's files. ``metrics`` is ``host:port`` (``[v6]:port`` for an
IPv6 address), an HTTP listener and not a ZeroMQ endpoint, and takes part in the same
check.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zbroker.broker.license import ServerLine, load_license, tcp_host_port
from zbroker.broker.limits import MAXIMA, Limits
from zbroker.broker.policy import DEFAULT_MIN_TIMEOUT
from zbroker.broker.signing import load_public_key
from zbroker.broker.wire import MAX_LEASE
from zbroker.clients.curve import SecurityError, check_key


class ConfigError(Exception):
    """The config file is missing, unreadable or inconsistent; the message says where."""


@dataclass(frozen=True)
class Range:
    """The values a number may take: a setting of the config, an option of the CLI."""

    low: float
    high: float
    whole: bool = False  # a whole number (a count, bytes) rather than seconds
    low_open: bool = False  # ``low`` itself is refused (no timing may be 0 s)

    def describe(self) -> str:
        low = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
        if self.whole:
            return f"a whole number {low} and <= {self.high:.0f}"
        return f"a number of seconds {low} and <= {self.high:g}"

    def check(self, value: object) -> float:
        """``value`` as a number in range; ValueError (``describe``) otherwise.

        Refuses bools (TOML's ``true`` is no count), floats for whole numbers, and
        ``nan`` and ``inf``, which every comparison would let through or never reach.
        """
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(self.describe())
        if self.whole and not isinstance(value, int):
            raise ValueError(self.describe())
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(self.describe())
        too_low = value <= self.low if self.low_open else value < self.low
        if too_low or value > self.high:
            raise ValueError(self.describe())
        return value


RANGES: dict[str, Range] = {
    "heartbeat_interval": Range(0.01, 10.0),
    "peer_timeout": Range(0.0, 60.0, low_open=True),
    "lease": Range(0.5, MAX_LEASE),
    "max_message": Range(8192, 1 << 20, whole=True),
    "snapshot_every": Range(1, 10_000_000, whole=True),
    "snapshot_keep": Range(0, 10_000_000, whole=True),
    "min_remove": Range(0.0, MAX_LEASE, low_open=True),
    "min_timeout": Range(0.0, MAX_LEASE, low_open=True),
    **{name: Range(1, high, whole=True) for name, high in MAXIMA.items()},
}


@dataclass(frozen=True)
class NodeConfig:
    name: str
    rank: int
    client: str  # from the SERVER line
    peer: str
    pub: str
    data: Path
    public_key: str | None = None  # KEY= of the SERVER line (Z85); required when secure
    secret_key: Path | None = None  # the node's secret certificate; required when secure
    metrics: tuple[str, int] | None = None  # (host, port) of the Prometheus listener; None: off
    report_log: Path | None = None  # the report log's directory (docs/reportlog.md); None: off


@dataclass(frozen=True)
class Config:
    path: Path
    license_path: Path
    vendor_key: Path
    heartbeat_interval: float
    peer_timeout: float
    lease: float
    failback: bool
    fsync: bool
    max_message: int
    snapshot_every: int
    nodes: tuple[NodeConfig, ...]
    snapshot_keep: int = 10_000
    secure: bool = True
    client_allow: Path | None = None  # client allow-list (secure mode); None: any key
    admin_keys: Path | None = None  # admin allow-list (secure mode); None: no admin
    admin_key: Path | None = None  # the admin's secret certificate, for the CLI
    # The options file (docs/admin.md); None: no options. Read by the node when it starts
    # and by `zbroker up` and `zbroker reread` (node.read_files), never here: a typo in it
    # while an administrator edits must not keep status, remove or down from the triad.
    options: Path | None = None
    # The triad's borrow key (Ed25519 PKCS8 PEM, the same file on every node): signs
    # borrow tokens (docs/admin.md, "Borrowing"); None: borrows are refused. Read by the
    # node when it starts (a bad key: exit 2), never here: the commands that read this
    # config on a user's host must not need the secret.
    borrow_key: Path | None = None
    limits: Limits = field(default_factory=Limits)
    # zbroker remove leaves grants younger than this alone (broker/removal.py; RLM's 120 s)
    min_remove: float = 120.0
    # TIMEOUT lines below this are raised to it (the primary's decision: broker/ledger.py)
    min_timeout: float = DEFAULT_MIN_TIMEOUT

    @property
    def mode(self) -> str:
        return "curve" if self.secure else "plain"

    def node(self, name: str) -> NodeConfig:
        for node in self.nodes:
            if node.name == name:
                return node
        names = ", ".join(n.name for n in self.nodes)
        raise ConfigError(f"{self.path}: no node named {name!r}; the nodes are {names}")

    @property
    def ranks(self) -> list[str]:
        return [n.name for n in self.nodes]

    def contract(self) -> dict[str, str | float]:
        """What every node's config must say alike, as a node's heartbeats carry it for the
        others to compare (``contract_notes``): the timings the triad runs by (a failover
        to a node with another lease or timeout changes them under the clients), and
        where each node listens for its peers (a node that binds one port while the
        others' configs name another is heard by none of them), and the SERVER lines'
        order (``ORDER``: the rank; two nodes that each rank the other first hand the
        triad to each other without end: broker/core.py, ``order_note``)."""
        terms: dict[str, str | float] = {key: getattr(self, key) for key in CONTRACT}
        for node in self.nodes:
            terms[f"peer.{node.name}"] = node.peer
            terms[f"pub.{node.name}"] = node.pub
        terms[ORDER] = " ".join(self.ranks)
        return terms


# The settings of the triad's contract besides the nodes' endpoints (Config.contract):
# each is the primary's to apply, so a failover must not change it.
CONTRACT = ("lease", "heartbeat_interval", "peer_timeout", "min_timeout")
_LISTENS = {"peer": "listens for peers at", "pub": "publishes heartbeats at"}
# The contract's key for the SERVER lines' order, names apart by spaces; judged by
# ``order_note`` (one line for all the peers), never by ``contract_notes``.
ORDER = "ranks"


def order_note(me: str, mine: str, theirs: dict[str, str]) -> str:
    """The line a person reads while peers' license files (``theirs``, by peer: the
    orders that differ from ``mine``) order the SERVER lines otherwise than this node's:
    both orders, what the triad does meanwhile, and what to fix."""
    by_order: dict[str, list[str]] = {}
    for peer in sorted(theirs):
        by_order.setdefault(theirs[peer], []).append(peer)
    said = "; ".join(
        f"{' and '.join(peers)}'s: {', '.join(order.split())}" for order, peers in by_order.items()
    )
    return (
        f"the nodes' license files order the SERVER lines differently (the rank): this "
        f"node's ({me}): {', '.join(mine.split())}; {said}: put the same license file on "
        "every node and restart the nodes one at a time (a reread does not change the "
        "order); until they agree no node hands over by failback and elections rank the "
        f"nodes by name ({', '.join(sorted(mine.split()))})"
    )


def contract_notes(
    me: str, peer: str, mine: dict[str, str | float], theirs: dict[str, str | float]
) -> list[str]:
    """How ``peer``'s config (``theirs``, from its heartbeats) differs from this node's
    (``mine``) on the triad's contract, one line per setting, for a person: what each
    says, and what to fix. Empty when they agree."""
    notes = []
    for key in sorted(mine.keys() | theirs.keys()):
        ours, their = mine.get(key), theirs.get(key)
        if ours == their or key == ORDER:
            continue
        kind, _, node = key.partition(".")
        if not node:
            notes.append(
                f"{peer}'s config sets {key} = {_said(their)}; this node's says {_said(ours)}: "
                f"every node of the triad needs the same {key} (a failover changes it): fix "
                f"{peer}'s config or this one's"
            )
        elif their is None or ours is None:
            which = f"{peer}'s config" if their is None else "this node's config"
            notes.append(
                f"{which} has no node {node} ([nodes.{node}]): every node's config needs "
                "the same nodes"
            )
        elif node == peer:
            notes.append(
                f"{peer} {_LISTENS.get(kind, kind)} {their}; this node's config says "
                f"{ours}: fix {peer}'s [nodes.{peer}] entry or this one's"
            )
        elif node == me:
            notes.append(
                f"{peer}'s config says this node ({me}) {_LISTENS.get(kind, kind)} {their}; "
                f"it binds {ours}: fix [nodes.{me}] in {peer}'s config or this one's"
            )
        else:
            notes.append(
                f"{peer}'s config says {node} {_LISTENS.get(kind, kind)} {their}; this "
                f"node's says {ours}: fix [nodes.{node}] in {peer}'s config or this one's"
            )
    return notes


def server_changes(running: Config, read: Config) -> str | None:
    """How the SERVER lines of a config read again (``read``: a reread) differ from those
    the node runs by (``running``), for a person, or None: a reread changes none of them
    (the rank, the endpoints bound, the keys ZAP checks); the nodes take them at a restart."""
    what = []
    if running.ranks != read.ranks:
        what.append(f"the order {', '.join(read.ranks)} (it runs by {', '.join(running.ranks)})")
    old = {n.name: n for n in running.nodes}
    for node in read.nodes:
        was = old.get(node.name)
        if was is not None and was.client != node.client:
            what.append(f"{node.name}'s endpoint {node.client} (it runs by {was.client})")
        if was is not None and was.public_key != node.public_key:
            what.append(f"{node.name}'s KEY=")
    if not what:
        return None
    return (
        f"the license file's SERVER lines change {'; '.join(what)}: a reread does not change "
        "them; they take effect when the nodes restart with the new file, one at a time"
    )


def _said(value: object) -> str:
    return "nothing" if value is None else str(value)


_DEFAULTS: dict[str, Any] = {
    "heartbeat_interval": 0.1,
    "peer_timeout": 0.5,
    "lease": 30.0,
    "failback": True,
    "fsync": True,
    "max_message": 65536,
    "snapshot_every": 10_000,
    "snapshot_keep": 10_000,
    "secure": True,
    "min_remove": 120.0,
    "min_timeout": DEFAULT_MIN_TIMEOUT,
}
# optional, relative to config
_PATHS = ("client_allow", "admin_keys", "admin_key", "options", "borrow_key")
_LIMITS = {name: getattr(Limits(), name) for name in Limits.__dataclass_fields__}
# Every setting there is: top level, and in each [nodes.NAME] table.
SETTINGS = ("license", "vendor_key", *_DEFAULTS, *_PATHS, *_LIMITS)
NODE_SETTINGS = ("peer", "pub", "data", "secret_key", "metrics", "report_log")


def load_config(path: str | Path) -> Config:
    path = Path(path).resolve()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    unknown = set(raw) - set(SETTINGS) - {"nodes"}
    if unknown:
        raise ConfigError(f"{path}: unknown settings {', '.join(sorted(unknown))}")
    base = path.parent
    values = {**_DEFAULTS, **{k: v for k, v in raw.items() if k in _DEFAULTS}}
    _check_values(path, values)
    if values["peer_timeout"] <= 2 * values["heartbeat_interval"]:
        raise ConfigError(
            f"{path}: peer_timeout ({values['peer_timeout']}) must exceed two "
            f"heartbeat_interval ({values['heartbeat_interval']}) or peers flap"
        )
    license_path = base / _required_str(path, raw, "license")
    vendor_key = base / _required_str(path, raw, "vendor_key")
    servers = load_license(license_path, load_public_key(vendor_key)).servers
    nodes = _nodes(path, base, raw.get("nodes", {}), servers, secure=values["secure"])
    _check_distinct(path, nodes)
    paths: dict[str, Any] = {}
    for key in _PATHS:
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{path}: {key} must be a path, not {_shown(value)}")
        paths[key] = None if value is None else base / value
    limits = {}
    for key, default in _LIMITS.items():
        limits[key] = int(_in_range(path, key, raw.get(key, default)))
    return Config(
        path=path,
        license_path=license_path,
        vendor_key=vendor_key,
        nodes=nodes,
        limits=Limits(**limits),
        **paths,
        **values,
    )


def _in_range(path: Path, key: str, value: object) -> float:
    try:
        return RANGES[key].check(value)
    except ValueError as exc:
        raise ConfigError(f"{path}: {key} must be {exc}, not {_shown(value)}") from None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}..."


def _check_values(path: Path, values: dict[str, Any]) -> None:
    for key in ("heartbeat_interval", "peer_timeout", "lease"):
        values[key] = float(_in_range(path, key, values[key]))
    for key in ("failback", "fsync", "secure"):
        if not isinstance(values[key], bool):
            raise ConfigError(f"{path}: {key} must be true or false, not {_shown(values[key])}")
    for key in ("max_message", "snapshot_every", "snapshot_keep"):
        values[key] = int(_in_range(path, key, values[key]))
    values["min_remove"] = float(_in_range(path, "min_remove", values["min_remove"]))
    values["min_timeout"] = float(_in_range(path, "min_timeout", values["min_timeout"]))


def _check_distinct(path: Path, nodes: tuple[NodeConfig, ...]) -> None:
    """No two endpoints share a host:port, no two nodes a data directory."""
    used: dict[object, str] = {}
    for node in nodes:
        places: list[tuple[str, str, object]] = []
        for setting, endpoint in (
            ("client endpoint (SERVER line)", node.client),
            ("peer", node.peer),
            ("pub", node.pub),
        ):
            try:
                places.append((setting, endpoint, tcp_host_port(endpoint)))
            except ValueError:  # an ipc:// or inproc:// SERVER line: the name is the place
                places.append((setting, endpoint, endpoint))
        if node.metrics is not None:
            places.append(("metrics", "{}:{}".format(*node.metrics), node.metrics))
        for setting, endpoint, where in places:
            this = f"{setting} of {node.name} ({endpoint})"
            if where in used:
                raise ConfigError(
                    f"{path}: the {this} is the {used[where]}: each endpoint needs its own port"
                )
            used[where] = this
    for key, what in (("data", "data directory"), ("report_log", "report log")):
        owners: dict[Path, str] = {}
        for node in nodes:
            given: Path | None = getattr(node, key)
            if given is None:
                continue
            directory = given.resolve()
            if directory in owners:
                raise ConfigError(
                    f"{path}: [nodes.{node.name}] {key} is the {what} of node "
                    f"{owners[directory]} ({given}): each node needs its own"
                )
            owners[directory] = node.name


def _required_str(path: Path, raw: dict[str, Any], key: str) -> str:
    value = raw.get(key)
    if value is None:
        raise ConfigError(f"{path}: setting {key!r} (a path) is missing")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: {key} must be a path, not {_shown(value)}")
    return value


def _nodes(
    path: Path, base: Path, table: Any, servers: list[ServerLine], *, secure: bool
) -> tuple[NodeConfig, ...]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [nodes.NAME] tables are missing")
    names = [s.name for s in servers]
    if set(table) != set(names):
        raise ConfigError(
            f"{path}: [nodes] names {sorted(table)} must match the license's SERVER lines {names}"
        )
    nodes = []
    for rank, server in enumerate(servers):
        entry = table[server.name]
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: [nodes.{server.name}] must be a table")
        unknown = set(entry) - set(NODE_SETTINGS)
        if unknown:
            raise ConfigError(
                f"{path}: [nodes.{server.name}] unknown settings {', '.join(sorted(unknown))}"
            )
        fields = {}
        for key in ("peer", "pub", "data"):
            value = entry.get(key)
            if not isinstance(value, str) or not value:
                raise ConfigError(f'{path}: [nodes.{server.name}] needs {key} = "..."')
            fields[key] = value
        for key in ("peer", "pub"):
            try:
                tcp_host_port(fields[key])
            except ValueError:
                raise ConfigError(
                    f"{path}: [nodes.{server.name}] {key} must be an endpoint tcp://host:port "
                    f"with a port from 1 to 65535, not {_shown(fields[key])}"
                ) from None
        public_key, secret_key = _node_keys(path, base, server, entry, secure=secure)
        metrics = _metrics_listener(path, server.name, entry.get("metrics"))
        report_log = entry.get("report_log")
        if report_log is not None and (not isinstance(report_log, str) or not report_log):
            raise ConfigError(f'{path}: [nodes.{server.name}] report_log must be "a/directory"')
        nodes.append(
            NodeConfig(
                name=server.name,
                rank=rank,
                client=server.endpoint,
                peer=fields["peer"],
                pub=fields["pub"],
                data=base / fields["data"],
                public_key=public_key,
                secret_key=secret_key,
                metrics=metrics,
                report_log=None if report_log is None else base / report_log,
            )
        )
    keys = [n.public_key for n in nodes if n.public_key is not None]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{path}: two SERVER lines carry the same KEY=; each node needs its own")
    return tuple(nodes)


def _metrics_listener(path: Path, node: str, value: object) -> tuple[str, int] | None:
    """``metrics = "host:port"`` of ``[nodes.NODE]`` as (host, port), None when absent.

    Read as the other endpoints are (``tcp_host_port``), without the ``tcp://``: it is an
    HTTP listener. The host keeps an IPv6 address's brackets, so that the endpoint check
    compares it with the others; ``broker/metrics.py`` removes them to bind.
    """
    if value is None:
        return None
    try:
        if not isinstance(value, str) or "://" in value:
            raise ValueError(value)
        return tcp_host_port(f"tcp://{value}")
    except ValueError:
        raise ConfigError(
            f"{path}: [nodes.{node}] metrics must be host:port (an HTTP listener such as "
            f'"127.0.0.1:27301", no tcp://) with a port from 1 to 65535, not {_shown(value)}'
        ) from None


def _node_keys(
    path: Path, base: Path, server: ServerLine, entry: dict[str, Any], *, secure: bool
) -> tuple[str | None, Path | None]:
    """The SERVER line's public key and the node's secret key file (checked when secure)."""
    where = f"SERVER {server.name} (license line {server.line}) KEY="
    public = server.attrs.get("KEY")
    secret = entry.get("secret_key")
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise ConfigError(f"{path}: [nodes.{server.name}] secret_key must be a path")
    if not secure:
        return public, None if secret is None else base / secret
    if public is None:
        raise ConfigError(
            f"{path}: secure mode needs the node's public key on its SERVER line: "
            f"{server.name} (license line {server.line}) has no KEY=; add it, or set "
            "secure = false"
        )
    try:
        check_key(public, where)
    except SecurityError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if secret is None:
        raise ConfigError(
            f'{path}: secure mode needs [nodes.{server.name}] secret_key = "..." '
            "(the node's CURVE secret certificate)"
        )
    return public, base / secret
