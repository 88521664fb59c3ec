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

    [nodes.alpha]
    peer = "tcp://127.0.0.1:27101"   # ROUTER: votes, deltas, acks, catch-up
    pub = "tcp://127.0.0.1:27201"    # PUB: heartbeats
    data = "data/alpha"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.license import ServerLine, load_license
from broker.signing import load_public_key


class ConfigError(Exception):
    """The config file is missing, unreadable or inconsistent; the message says where."""


@dataclass(frozen=True)
class NodeConfig:
    name: str
    rank: int
    client: str  # from the SERVER line
    peer: str
    pub: str
    data: Path


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

    def node(self, name: str) -> NodeConfig:
        for node in self.nodes:
            if node.name == name:
                return node
        names = ", ".join(n.name for n in self.nodes)
        raise ConfigError(f"{self.path}: no node named {name!r}; the nodes are {names}")

    @property
    def ranks(self) -> list[str]:
        return [n.name for n in self.nodes]


_DEFAULTS: dict[str, Any] = {
    "heartbeat_interval": 0.1,
    "peer_timeout": 0.5,
    "lease": 30.0,
    "failback": True,
    "fsync": True,
    "max_message": 65536,
    "snapshot_every": 10_000,
}


def load_config(path: str | Path) -> Config:
    path = Path(path).resolve()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    unknown = set(raw) - set(_DEFAULTS) - {"license", "vendor_key", "nodes"}
    if unknown:
        raise ConfigError(f"{path}: unknown settings {', '.join(sorted(unknown))}")
    base = path.parent
    values = {**_DEFAULTS, **{k: v for k, v in raw.items() if k in _DEFAULTS}}
    _check_types(path, values)
    if values["peer_timeout"] <= 2 * values["heartbeat_interval"]:
        raise ConfigError(
            f"{path}: peer_timeout ({values['peer_timeout']}) must exceed two "
            f"heartbeat_interval ({values['heartbeat_interval']}) or peers flap"
        )
    license_path = base / _required_str(path, raw, "license")
    vendor_key = base / _required_str(path, raw, "vendor_key")
    servers = load_license(license_path, load_public_key(vendor_key)).servers
    nodes = _nodes(path, base, raw.get("nodes", {}), servers)
    return Config(
        path=path,
        license_path=license_path,
        vendor_key=vendor_key,
        nodes=nodes,
        **values,
    )


def _check_types(path: Path, values: dict[str, Any]) -> None:
    for key in ("heartbeat_interval", "peer_timeout", "lease"):
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{path}: {key} must be a positive number of seconds")
        values[key] = float(value)
    for key in ("failback", "fsync"):
        if not isinstance(values[key], bool):
            raise ConfigError(f"{path}: {key} must be true or false")
    for key in ("max_message", "snapshot_every"):
        if isinstance(values[key], bool) or not isinstance(values[key], int) or values[key] < 1:
            raise ConfigError(f"{path}: {key} must be a whole number >= 1")


def _required_str(path: Path, raw: dict[str, Any], key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: setting {key!r} (a path) is missing")
    return value


def _nodes(path: Path, base: Path, table: Any, servers: list[ServerLine]) -> tuple[NodeConfig, ...]:
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
        fields = {}
        for key in ("peer", "pub", "data"):
            value = entry.get(key)
            if not isinstance(value, str) or not value:
                raise ConfigError(f'{path}: [nodes.{server.name}] needs {key} = "..."')
            fields[key] = value
        nodes.append(
            NodeConfig(
                name=server.name,
                rank=rank,
                client=server.endpoint,
                peer=fields["peer"],
                pub=fields["pub"],
                data=base / fields["data"],
            )
        )
    return tuple(nodes)
