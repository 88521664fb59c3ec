"""The ``zbroker`` command: each subcommand parses, builds a Config, and calls one thing.

Exit codes a script can rely on: 0 success; 1 the request was refused (denied,
unavailable, a node down for ``up``); 2 bad usage, config or license (click's own usage
errors are 2 as well).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from broker.config import ConfigError, load_config
from broker.demo import DemoError, write_demo
from broker.license import LicenseError
from broker.signing import LicenseKeyError
from broker.vendor_cli import vendor

EXIT_REFUSED = 1
EXIT_CONFIG = 2
_CONFIG_ERRORS = (ConfigError, LicenseError, LicenseKeyError, DemoError)


@click.group()
@click.version_option(package_name="zbroker")
def main() -> None:
    """zbroker: a highly available floating-license server (three-server redundancy)."""


main.add_command(vendor)


def _fail(exc: Exception, code: int = EXIT_CONFIG) -> None:
    click.echo(f"zbroker: {exc}", err=True)
    sys.exit(code)


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=lambda: os.environ.get("ZBROKER_CONFIG", "zbroker.toml"),
    show_default="$ZBROKER_CONFIG or ./zbroker.toml",
    help="the zbroker.toml written by `zbroker init`",
)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--servers",
    type=click.Choice(["1", "3"]),
    default="3",
    show_default=True,
    help="3 for a triad, 1 for a single unreplicated server",
)
@click.option(
    "--lease",
    type=float,
    default=30.0,
    show_default=True,
    help="seconds a client may stay unheard before its seats return",
)
@click.option("--force", is_flag=True, help="overwrite an existing demo in DIRECTORY")
def init(directory: Path, servers: str, lease: float, force: bool) -> None:
    """Write a ready-to-run demo: vendor keys, a signed license, zbroker.toml, data dirs."""
    try:
        config_path = write_demo(directory, servers=int(servers), lease=lease, force=force)
    except _CONFIG_ERRORS as exc:
        _fail(exc)
    click.echo(f"wrote {config_path}")
    click.echo(f"start it with:  zbroker up --config {config_path}")


@main.command()
@config_option
@click.option("--node", "node_name", required=True, help="this node's name, as on its SERVER line")
def run(config_path: str, node_name: str) -> None:
    """Run one node in the foreground, logging to stderr, until SIGTERM or Ctrl-C."""
    from broker.node import Node  # the node pulls in zmq and the peers; keep other commands light

    try:
        config = load_config(config_path)
        node = Node(config, node_name)
    except _CONFIG_ERRORS as exc:
        _fail(exc)
    node.run()


@main.command()
@config_option
def up(config_path: str) -> None:
    """Start every node of the config as a child process; stop them all on Ctrl-C/SIGTERM.

    A node that exits is reported and not restarted: a silent restart would hide the
    failure the triad exists to survive.
    """
    try:
        config = load_config(config_path)
    except _CONFIG_ERRORS as exc:
        _fail(exc)
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    children = {
        node.name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker",
                "run",
                "--config",
                str(config.path),
                "--node",
                node.name,
            ],
        )
        for node in config.nodes
    }
    click.echo(f"started {', '.join(f'{n} (pid {p.pid})' for n, p in children.items())}")
    reported: set[str] = set()
    while not stopping:
        for name, proc in children.items():
            if name not in reported and proc.poll() is not None:
                click.echo(
                    f"node {name} exited with code {proc.returncode}; not restarted", err=True
                )
                reported.add(name)
        if len(reported) == len(children):
            break
        time.sleep(0.2)  # a supervisor's polling interval, not a synchronisation
    for proc in children.values():
        if proc.poll() is None:
            proc.terminate()
    for proc in children.values():
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
    sys.exit(EXIT_REFUSED if reported else 0)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--timeout", type=float, default=1.0, show_default=True)
def status(config_path: str, as_json: bool, timeout: float) -> None:
    """Show every node (role, term, deltas, lag, peers) and every feature's holders."""
    from broker.status import query_nodes, render

    try:
        config = load_config(config_path)
    except _CONFIG_ERRORS as exc:
        _fail(exc)
    report = query_nodes([(n.name, n.client) for n in config.nodes], timeout=timeout)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
    if report["primary"] is None:
        sys.exit(EXIT_REFUSED)


@main.command()
@click.argument("feature")
@config_option
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--version", "min_version", default=None, help="minimum version, such as 2.0")
@click.option("--wait", type=float, default=None, help="queue up to this many seconds")
@click.option(
    "--hold",
    type=float,
    default=0.0,
    show_default=True,
    help="seconds to hold the grant before checking it in",
)
def checkout(
    feature: str,
    config_path: str,
    count: int,
    min_version: str | None,
    wait: float | None,
    hold: float,
) -> None:
    """Check out seats of FEATURE by hand, hold them, and check them in."""
    from clients import LicenseClient
    from clients import LicenseError as ClientError

    if "ZBROKER_LICENSE" in os.environ:
        servers: str | list[str] = os.environ["ZBROKER_LICENSE"]
    else:
        try:
            config = load_config(config_path)
        except _CONFIG_ERRORS as exc:
            _fail(exc)
        servers = [n.client for n in config.nodes]
    try:
        with LicenseClient(servers) as client:
            grant = client.checkout(feature, count=count, version=min_version, wait=wait)
            click.echo(
                f"granted {grant.count} seat(s) of {grant.feature} {grant.version} "
                f"(grant {grant.id})"
            )
            if hold > 0:
                time.sleep(hold)  # holding a seat for the user is the point of --hold
            client.checkin(grant)
            click.echo("checked in")
    except ClientError as exc:
        _fail(exc, EXIT_REFUSED)
