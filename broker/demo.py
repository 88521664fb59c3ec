"""``zbroker init``: a ready-to-run folder with a vendor key, a signed license and a config.

The triad's borrow key (``keys/borrow.key``, named by ``borrow_key`` in the config) is
made too, and its public half goes on every SERVER line as ``BORROW_KEY=``, so that the
library can check borrow tokens offline (docs/admin.md, "Borrowing").

Ports are asked from the OS (bind to port 0 on loopback, read the port, close), so two
demos or test triads on one machine do not collide. The demo license's dated line
expires a year from today so the demo never ships a time bomb.

Secure mode is the default: ``curve/`` gets a CURVE key pair per node and one for the
administrator, each SERVER line carries its node's public key (``KEY=``), the admin's
public key goes on the admin allow-list ``curve/admins``, and the config names them
all. ``secure=False`` writes a plain-TCP demo (no keys, no ``KEY=``) for trials.
"""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

from zbroker.broker.borrow import borrow_key_hex, load_borrow_key, write_borrow_key
from zbroker.broker.keys import write_keypair as write_curve_keypair
from zbroker.broker.license import sign_license_text
from zbroker.broker.signing import load_private_key, write_keypair
from zbroker.broker.storage import write_marker
from zbroker.clients.curve import KeyPair, load_keypair

NODE_NAMES = ("alpha", "beta", "gamma")


class DemoError(Exception):
    """The demo folder cannot be written; the message says why."""


# Every port free_ports chose in this process. Whoever asked may not have bound it yet:
# a triad's ports are chosen when its config is written and bound when its nodes start,
# so two triads written before either starts would be given the same port (the second
# node to bind it exits), as a bench or a test that makes several triads does.
_HANDED_OUT: set[int] = set()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the OS reports free now and this process never chose before (the ports of a
    triad whose nodes are not started yet, or are stopped, which the OS sees as free);
    all sockets stay open until all are chosen."""
    sockets = []
    chosen: list[int] = []
    try:
        while len(chosen) < count:  # each refused port stays bound: never offered twice
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
            port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                chosen.append(port)
        _HANDED_OUT.update(chosen)
        return chosen
    finally:
        for s in sockets:
            s.close()


def demo_license_text(
    endpoints: list[tuple[str, str]],
    today: datetime.date,
    keys: dict[str, str] | None = None,
    borrow_key: str | None = None,
) -> str:
    """The demo license; ``keys`` (node name -> Z85 public key) adds ``KEY=`` to SERVER
    lines, ``borrow_key`` (64 hex digits) ``BORROW_KEY=`` (docs/admin.md, "Borrowing")."""
    expiry = (today + datetime.timedelta(days=365)).strftime("%d-%b-%Y").lower()
    keys = keys or {}
    lend = f" BORROW_KEY={borrow_key}" if borrow_key is not None else ""
    servers = "\n".join(
        f"SERVER {name} ANY {endpoint}" + (f" KEY={keys[name]}" if name in keys else "") + lend
        for name, endpoint in endpoints
    )
    return f"""# zbroker demo license: one file, the same on every node.
# SERVER lines are in rank order: the first outranks the others.
{servers}
VENDOR demo
FEATURE cad    demo 2.0 {expiry} 10
INCREMENT cad  demo 2.0 permanent 5 BORROW=72
FEATURE solver demo 1.5 permanent 2
FEATURE viewer demo 3.0 permanent 50
"""


def write_demo(
    directory: Path,
    *,
    servers: int = 3,
    lease: float = 30.0,
    today: datetime.date | None = None,
    force: bool = False,
    secure: bool = True,
) -> Path:
    """Write the demo into ``directory``; returns the path of zbroker.toml.

    Raises DemoError (a folder that cannot be written names the path), or the
    ``LicenseKeyError``/``SecurityError`` of a key that cannot be made.
    """
    if servers not in (1, 3):
        raise DemoError(f"--servers must be 1 or 3, not {servers}")
    config_path = directory / "zbroker.toml"
    if config_path.exists() and not force:
        raise DemoError(f"{config_path} already exists; use --force to overwrite the demo")
    try:
        return _write_demo(directory, servers, lease, today, force, secure)
    except OSError as exc:
        where = exc.filename if exc.filename is not None else directory
        raise DemoError(f"{where}: cannot write the demo: {exc.strerror}") from None


def _write_demo(
    directory: Path,
    servers: int,
    lease: float,
    today: datetime.date | None,
    force: bool,
    secure: bool,
) -> Path:
    config_path = directory / "zbroker.toml"
    directory.mkdir(parents=True, exist_ok=True)
    keys = directory / "keys"
    key_path, _ = (
        (keys / "vendor.key", keys / "vendor.pub")
        if force and (keys / "vendor.key").exists()
        else write_keypair(keys)
    )
    lender = keys / "borrow.key"
    if not lender.exists():
        write_borrow_key(keys)
    names = NODE_NAMES[:servers]
    ports = free_ports(3 * servers)
    endpoints = [(name, f"tcp://127.0.0.1:{ports[i]}") for i, name in enumerate(names)]
    curve = directory / "curve"
    node_keys = {name: _curve_keys(curve, name) for name in names} if secure else {}
    text = demo_license_text(
        endpoints,
        today or datetime.date.today(),
        {n: k.public for n, k in node_keys.items()},
        borrow_key_hex(load_borrow_key(lender)),
    )
    (directory / "demo.lic").write_text(sign_license_text(text, load_private_key(key_path)))
    node_tables = []
    for i, name in enumerate(names):
        peer, pub = ports[servers + 2 * i], ports[servers + 2 * i + 1]
        data = directory / "data" / name
        # A brand-new triad starts from empty logs; the marker says "not a wiped disk".
        write_marker(data, name)
        node_tables.append(
            f'[nodes.{name}]\npeer = "tcp://127.0.0.1:{peer}"\n'
            f'pub = "tcp://127.0.0.1:{pub}"\ndata = "data/{name}"\n'
            f'report_log = "report/{name}"\n'  # docs/reportlog.md: on by default
            + (f'secret_key = "curve/{name}.key_secret"\n' if secure else "")
        )
    security = "secure = false           # plain TCP: anyone who reaches a port is trusted\n"
    if secure:
        admin = _curve_keys(curve, "admin")
        (curve / "admins").write_text(
            f"# public keys that may administer the triad\n{admin.public} admin\n"
        )
        security = (
            "secure = true            # CURVE on every socket; see docs/security.md\n"
            'admin_keys = "curve/admins"           # keys that may stop the triad (zbroker down)\n'
            'admin_key = "curve/admin.key_secret"  # the key zbroker down and status use here\n'
            '# client_allow = "curve/clients"      # serve only the client keys listed there\n'
        )
    config_path.write_text(
        "# zbroker configuration; paths are relative to this file.\n"
        'license = "demo.lic"\n'
        'vendor_key = "keys/vendor.pub"\n'
        'borrow_key = "keys/borrow.key"  # signs borrow tokens (docs/admin.md, Borrowing)\n'
        "heartbeat_interval = 0.1  # seconds between node heartbeats\n"
        "peer_timeout = 0.5        # a node unheard this long is dead\n"
        f"lease = {lease}              # a client unheard this long loses its seats\n"
        "failback = true           # a returning higher-ranked node takes control back\n"
        "fsync = true              # fsync the delta log once per poll cycle (group commit)\n"
        + security
        + "\n"
        + "\n".join(node_tables)
    )
    return config_path


def _curve_keys(directory: Path, name: str) -> KeyPair:
    """The CURVE key pair ``name`` in ``directory``, made if missing (kept on --force)."""
    secret = directory / f"{name}.key_secret"
    if not secret.exists():
        write_curve_keypair(directory, name)
    return load_keypair(secret)
