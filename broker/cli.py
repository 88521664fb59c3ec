"""The ``zbroker`` command: each subcommand parses, builds a Config, and calls one thing.

Exit codes a script can rely on, each with one line on stderr that names the cause
(never a traceback):

- 0 success;
- 1 the request was refused (denied, unavailable, a node down for ``up``);
- 2 bad usage, config or license (click's own usage errors are 2 as well), or a port
  that cannot be bound;
- 3 (``EXIT_DATA``) the data directory: locked by another process, not usable (not a
  directory, not creatable, not writable), or a disk or I/O error stopped the node.

Every number an option takes has a range (``Seconds``, ``click.IntRange``); outside it,
click refuses the option by name with exit 2.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from zbroker.broker.config import RANGES, Config, ConfigError, Range, load_config
from zbroker.broker.demo import DemoError, write_demo
from zbroker.broker.keys import write_keypair as write_curve_keypair
from zbroker.broker.license import LicenseError
from zbroker.broker.signing import LicenseKeyError
from zbroker.broker.storage import StorageError, bootstrap
from zbroker.broker.vendor_cli import vendor
from zbroker.broker.wire import (
    MAX_COUNT,
    MAX_REQ,
    MAX_WAIT,
    check_feature,
    check_version,
)
from zbroker.clients.curve import ClientCurve, SecurityError, load_keypair, process_keypair

EXIT_REFUSED = 1
EXIT_CONFIG = 2
EXIT_DATA = 3
_CONFIG_ERRORS = (ConfigError, LicenseError, LicenseKeyError, DemoError, SecurityError)
ADMIN_KEY_ENV = "ZBROKER_ADMIN_KEY"
MAX_HOLD = 7 * 86_400.0  # --hold: a week, the longest lease
MAX_ASK = 3600.0  # --timeout of status and down: an hour is already far past any answer
_KEY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}\Z")


class Seconds(click.ParamType):
    """A finite number of seconds within a ``Range``: click's FloatRange lets nan through
    (every comparison with it is false) and inf where there is no upper bound."""

    name = "seconds"

    def __init__(self, allowed: Range) -> None:
        self.allowed = allowed

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number of seconds", param, ctx)
        try:
            return float(self.allowed.check(number))
        except ValueError as exc:
            self.fail(f"{value!r} is not {exc}", param, ctx)


def _checked(check: Callable[[str], object]) -> Callable[..., str | None]:
    """A click callback refusing, as bad usage, a value ``check`` raises ValueError on."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None:
            try:
                check(value)
            except ValueError as exc:
                raise click.BadParameter(str(exc)) from None
        return value

    return callback


_version = _checked(check_version)
_feature = _checked(check_feature)


class _Commands(click.Group):
    """``zbroker``'s commands, of which ``chaos`` and ``bench`` (the test tools, click
    commands of their own modules) are imported only when named or listed: they pull in
    the client library and their runners, which no node and no administrator's command
    needs, and they import this module for its ``Seconds``."""

    # `report` (broker/report_cli.py) is loaded the same way: its statistics need no node.
    TOOLS = {
        "chaos": "zbroker.clients.testing.chaos.cli",
        "bench": "zbroker.clients.testing.bench.cli",
        "report": "zbroker.broker.report_cli",
        "borrow": "zbroker.broker.borrow_cli",  # the library's borrow calls: no node needs them
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.TOOLS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = self.TOOLS.get(cmd_name)
        if module is None:
            return super().get_command(ctx, cmd_name)
        command = getattr(importlib.import_module(module), cmd_name)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module}.{cmd_name} is not a click command")
        return command


@click.group(
    cls=_Commands,
    epilog="Exit codes: 0 success; 1 refused (denied, unavailable, no primary); 2 bad "
    "usage, config or license; 3 the data directory is locked, unusable, or a disk "
    "error stopped the node.",
)
@click.version_option(package_name="zbroker")
def main() -> None:
    """zbroker: a highly available floating-license server (three-server redundancy)."""


main.add_command(vendor)


def _fail(exc: Exception, code: int = EXIT_CONFIG) -> NoReturn:
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


def ask_timeout_option(default: float, what: str = "for the nodes' answers") -> Any:
    """``--timeout``: the seconds a command waits on the nodes (``what`` it waits for)."""
    return click.option(
        "--timeout",
        type=Seconds(Range(0.0, MAX_ASK, low_open=True)),
        default=default,
        show_default=True,
        help=f"seconds to wait {what}",
    )


client_key_option = click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="this client's CURVE secret key (default $ZBROKER_CLIENT_KEY, else a fresh one)",
)


admin_key_option = click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False),
    default=None,
    help=f"the administrator's secret key (default ${ADMIN_KEY_ENV}, else admin_key of the config)",
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
    type=Seconds(RANGES["lease"]),
    default=30.0,
    show_default=True,
    help="seconds a client may stay unheard before its seats return",
)
@click.option("--force", is_flag=True, help="overwrite an existing demo in DIRECTORY")
@click.option("--plain", is_flag=True, help="no CURVE keys: plain TCP, for trials (secure = false)")
def init(directory: Path, servers: str, lease: float, force: bool, plain: bool) -> None:
    """Write a ready-to-run demo: vendor keys, a signed license, zbroker.toml, data dirs.

    Secure by default: a CURVE key pair per node and one for the administrator in
    DIRECTORY/curve, each node's public key on its SERVER line.
    """
    try:
        config_path = write_demo(
            directory, servers=int(servers), lease=lease, force=force, secure=not plain
        )
    except (*_CONFIG_ERRORS, StorageError) as exc:
        _fail(exc)
    click.echo(f"wrote {config_path} ({'plain TCP' if plain else 'secure: CURVE'})")
    click.echo(f"start it with:  zbroker up --config {config_path}")


@main.command()
@config_option
@click.option("--node", "node_name", required=True, help="this node's name, as on its SERVER line")
def run(config_path: str, node_name: str) -> None:
    """Run one node in the foreground, logging to stderr, until SIGTERM or Ctrl-C.

    SIGHUP rereads the license and options files (docs/admin.md). Exit 3 when the data
    directory is locked by another process or cannot be used, or a disk error stops it.
    """
    import zmq  # the node pulls in zmq and the peers; keep other commands light

    from zbroker.broker.node import Node

    try:
        config = load_config(config_path)
        node = Node(config, node_name)
        node.run()
    except _CONFIG_ERRORS as exc:
        _fail(exc)
    except StorageError as exc:
        _fail(exc, EXIT_DATA)
    except zmq.ZMQError as exc:
        if exc.errno not in _BIND_ERRORS:
            raise  # not a mistake of the config: a bug, and its traceback is the report
        _fail(
            ConfigError(
                f"node {node_name} cannot open its sockets: {exc}; is another program "
                "using the port, or is the host not this machine's?"
            )
        )


@main.command("bootstrap")
@config_option
@click.option("--node", "node_name", required=True, help="this node's name, as on its SERVER line")
def bootstrap_command(config_path: str, node_name: str) -> None:
    """Give a brand-new triad's node its first, empty state, once, before its first start.

    A node without it counts as wiped: it does not vote until a primary has caught it up,
    so three new nodes without it would never elect one. Refused (exit 3) unless the
    node's data directory is absent or empty; never needed again (a node whose disk was
    lost starts as a wiped one and catches up from the others).
    """
    try:
        node = load_config(config_path).node(node_name)
        bootstrap(node.data, node_name)
    except _CONFIG_ERRORS as exc:
        _fail(exc)
    except StorageError as exc:
        _fail(exc, EXIT_DATA)
    click.echo(f"node {node_name}: {node.data} holds an empty state; start it with zbroker run")


def run_command(config_path: str | Path, node: str) -> list[str]:
    """The command line that starts one node (``zbroker run``) with this interpreter:
    what ``zbroker up`` and the test kit's ``LocalTriad`` run."""
    return [
        sys.executable,
        "-m",
        "zbroker.broker",
        "run",
        "--config",
        str(config_path),
        "--node",
        node,
    ]


# What bind() says when the port is taken or the host is not this machine's.
_BIND_ERRORS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES, errno.ENODEV)


@main.command()
@config_option
def up(config_path: str) -> None:
    """Start every node of the config as a child process; stop them all on Ctrl-C/SIGTERM.

    A node that exits is reported and not restarted: a silent restart would hide the
    failure the triad exists to survive.
    """
    try:
        config = load_config(config_path)
        _check_files(config)
    except _CONFIG_ERRORS as exc:
        _fail(exc)
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # The nodes reread on SIGHUP; a closed terminal must still stop the triad it started.
    signal.signal(signal.SIGHUP, _stop)
    children = {
        node.name: subprocess.Popen(run_command(config.path, node.name)) for node in config.nodes
    }
    click.echo(f"started {', '.join(f'{n} (pid {p.pid})' for n, p in children.items())}")
    reported: set[str] = set()
    failed = False
    while not stopping:
        for name, proc in children.items():
            if name not in reported and proc.poll() is not None:
                if proc.returncode == 0:  # asked to stop (zbroker down): no failure
                    click.echo(f"node {name} stopped")
                else:
                    failed = True
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
    sys.exit(EXIT_REFUSED if failed else 0)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@ask_timeout_option(1.0)
@click.option(
    "--holders/--summary",
    default=True,
    show_default=True,
    help="list every holder (read a page at a time), or only each feature's totals",
)
@click.option(
    "--feature",
    type=click.STRING,
    callback=_feature,
    default=None,
    help="list the holders of this feature only",
)
def status(
    config_path: str, as_json: bool, timeout: float, holders: bool, feature: str | None
) -> None:
    """Show every node (role, term, deltas, lag, peers) and every feature's holders."""
    from zbroker.broker.status import query_nodes, render
    from zbroker.clients.errors import LicenseError as ClientError

    try:
        config = load_config(config_path)
        curve = config_curve(config, admin=False)
    except _CONFIG_ERRORS as exc:
        _fail(exc)
    # A node not at its file's endpoint is shown where the running triad says it serves.
    endpoints, curve = _triad_endpoints(
        config, [(n.name, n.client) for n in config.nodes], curve, timeout
    )
    try:
        report = query_nodes(
            endpoints,
            timeout=timeout,
            curve=curve,
            holders=holders or feature is not None,
            feature=feature,
        )
    except ClientError as exc:  # a node's reply we cannot read
        _fail(exc, EXIT_REFUSED)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
    if report["primary"] is None:
        sys.exit(EXIT_REFUSED)


@main.command()
@config_option
@click.option(
    "--license",
    "license_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="a license file whose SERVER lines (and KEY=) name the triad, instead of --config",
)
@click.option(
    "--listen",
    default="127.0.0.1:8090",
    show_default=True,
    help="HOST:PORT to serve on (port 0: one the OS picks); loopback unless you mean it",
)
@click.option(
    "--timeout",
    type=Seconds(Range(0.0, 60.0, low_open=True)),
    default=1.0,
    show_default=True,
    help="seconds to wait for the nodes' answers in each poll",
)
@click.option(
    "--history-every",
    type=Seconds(Range(1.0, 3600.0)),
    default=60.0,
    show_default=True,
    help="seconds between two readings of the report logs for the last 24 hours' charts",
)
def web(
    config_path: str, license_path: str | None, listen: str, timeout: float, history_every: float
) -> None:
    """Serve a read-only status page (and /status.json) of the triad until Ctrl-C/SIGTERM.

    One thread asks the triad every 2 s; the page shows its last answer, so any number
    of browsers costs the nodes nothing more. With --config, it also draws each
    feature's last 24 hours of use from the nodes' report logs this host can read. It
    lists user and host names: serve it on loopback, or where only administrators
    reach it.
    """
    from zbroker.broker.status import query_nodes
    from zbroker.clients.errors import LicenseError as ClientError
    from zbroker.clients.licpath import keys_of, read_server_lines

    try:
        from zbroker.broker.web.app import create_app, listen_socket, serve
        from zbroker.broker.web.poller import StatusPoller
    except ImportError as exc:  # the web extra: no node needs a web server
        _fail(ValueError(f"zbroker web needs {exc.name}: python -m pip install 'zbroker[web]'"))

    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        _fail(ValueError(f"--listen {listen!r}: expected HOST:PORT, such as 127.0.0.1:8090"))
    report_logs: list[Path] = []  # drawn from for the last 24 hours, where readable here
    try:
        if license_path is not None:
            servers = read_server_lines(license_path)
            endpoints = [(s.name, s.endpoint) for s in servers]
            keys = keys_of(servers, license_path)
            curve = ClientCurve(process_keypair(), keys) if keys else None
        else:
            config = load_config(config_path)
            endpoints = [(n.name, n.client) for n in config.nodes]
            curve = config_curve(config, admin=False)
            report_logs = [n.report_log for n in config.nodes if n.report_log is not None]
    except (*_CONFIG_ERRORS, ClientError) as exc:
        _fail(exc)
    except OSError as exc:
        _fail(ValueError(f"{license_path}: {exc.strerror}"))
    if not endpoints:
        _fail(ValueError(f"{license_path}: no SERVER line names a node"))
    try:
        sock = listen_socket(host, int(port_text))
    except OSError as exc:
        _fail(
            ValueError(
                f"cannot serve on {listen}: {exc.strerror}; is another program using the "
                "port, or is the host not this machine's?"
            )
        )
    poller = StatusPoller(lambda: query_nodes(endpoints, timeout=timeout, curve=curve))
    app = create_app(poller, report_logs=report_logs, history_every=history_every)
    serve(app, sock, lambda line: click.echo(line))


@main.command(
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lmstat(args: tuple[str, ...]) -> None:
    """FlexNet's lmstat for a triad: -a, -c port@h1,port@h2,port@h3, -f, -i, -s, -A, -t.

    Prints lmstat's layout line for line, for the schedulers and monitors that read it
    (LSF License Scheduler, Slurm sync scripts, the FlexLM exporter: docs/integration.md).
    ``zbroker lmstat -help`` lists the options.
    """
    from zbroker.broker.lmutil import run_lmstat

    sys.exit(run_lmstat(args, prog="lmstat"))


@main.command()
@click.argument("feature", callback=_feature)
@config_option
@click.option("--count", type=click.IntRange(1, MAX_COUNT), default=1, show_default=True)
@click.option(
    "--version",
    "min_version",
    default=None,
    callback=_version,
    help="minimum version, such as 2.0",
)
@click.option(
    "--wait",
    type=Seconds(Range(0.0, MAX_WAIT)),
    default=None,
    help="queue up to this many seconds",
)
@click.option(
    "--hold",
    type=Seconds(Range(0.0, MAX_HOLD)),
    default=0.0,
    show_default=True,
    help="seconds to hold the grant before checking it in",
)
@client_key_option
def checkout(
    feature: str,
    config_path: str,
    count: int,
    min_version: str | None,
    wait: float | None,
    hold: float,
    key_path: str | None,
) -> None:
    """Check out seats of FEATURE by hand, hold them, and check them in."""
    from zbroker.clients.client import LicenseClient
    from zbroker.clients.errors import LicenseError as ClientError

    servers = client_license(config_path)
    try:
        with LicenseClient(servers, client_key=key_path) as client:
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


@main.command()
@config_option
@click.option("--node", "only", multiple=True, help="stop only this node (repeatable)")
@admin_key_option
@ask_timeout_option(5.0, "until every node asked has stopped")
def down(config_path: str, only: tuple[str, ...], key_path: str | None, timeout: float) -> None:
    """Stop the triad's nodes cleanly, as FlexLM's lmdown does.

    Each node gets an ``admin`` request (action ``down``), answers it and exits; the
    command then waits until none answers any more. Secure mode needs the
    administrator's key (one listed in admin_keys); plain mode, a shell on a node's host.
    Exit status: 0 when every node asked is down, 1 when one refused or still answers.
    """
    from zbroker.broker.status import query_nodes

    endpoints, curve, replies = _ask_admin(config_path, key_path, only, "down", timeout)
    refused = False
    for name, _ in endpoints:
        reply = replies.get(name)
        if reply is None:
            click.echo(f"{name}: no answer (down already, or it refused our key)")
        elif reply["status"] == "ok":
            click.echo(f"{name}: stopping")
        else:
            refused = True
            click.echo(f"{name}: refused: {reply.get('code')}: {reply.get('detail')}", err=True)

    def all_down() -> bool:
        report = query_nodes(endpoints, timeout=0.3, curve=curve, holders=False)
        return all(n["role"] == "down" for n in report["nodes"])

    deadline = time.monotonic() + timeout
    while not (stopped := all_down()) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling a condition until a deadline
    if stopped and not refused:
        click.echo("all stopped" if not only else f"stopped {', '.join(only)}")
        return
    click.echo("some nodes still answer", err=True)
    sys.exit(EXIT_REFUSED)


@main.command()
@config_option
@admin_key_option
@ask_timeout_option(5.0)
def reread(config_path: str, key_path: str | None, timeout: float) -> None:
    """Make every node read its license and options files again, as FlexLM's lmreread.

    The files are checked here first: a syntax error or a bad key is refused with
    file:line:col (exit 2) and no node is asked. Each node then reads its own copy (as
    on SIGHUP); the primary replicates what changed as one delta, so the three switch at
    one point of the log, and a node whose copy does not load logs why and keeps what it
    had. The command then waits (up to --timeout) until the triad serves them: until no
    node says its files differ from the triad's, which it does from its reread until the
    primary's reload reaches it (docs/admin.md, "The license the triad serves"). Exit
    status: 0 when every node answered and serves its files, 1 when one refused, did not
    answer, or still differs at the deadline (its note is printed), when the file has
    lines the nodes refuse (a broken signature: they serve the others), or when its SERVER
    lines differ from those the nodes run by (they change only at a restart).
    """
    from zbroker.broker.status import query_nodes

    try:  # a broken file exits 2 here, no node asked; its warnings are printed
        config = load_config(config_path)
        refused = _check_files(config)
    except _CONFIG_ERRORS as exc:
        _fail(exc)
    endpoints, curve, replies = _ask_admin(config_path, key_path, (), "reread", timeout)
    failed = False
    rereading: list[tuple[str, str]] = []
    for name, endpoint in endpoints:
        reply = replies.get(name)
        if reply is None:
            failed = True
            click.echo(f"{name}: no answer (down, or it refused our key)", err=True)
        elif reply["status"] == "ok":
            click.echo(f"{name}: rereading")
            rereading.append((name, endpoint))
        else:
            failed = True
            click.echo(f"{name}: refused: {reply.get('code')}: {reply.get('detail')}", err=True)

    def differing() -> dict[str, str]:  # each node's own word, asked after its reread
        report = query_nodes(rereading, timeout=0.3, curve=curve, holders=False)
        return {
            n["name"]: n.get("license")
            or ("still reading its files" if n.get("rereading") else "no answer")
            for n in report["nodes"]
            # a node still reading says what it says of its files of before: not done
            if n.get("license") or n.get("rereading") or n["role"] == "down"
        }

    deadline = time.monotonic() + timeout
    while (left := differing() if rereading else {}) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling a condition until a deadline
    for name, note in left.items():
        failed = True
        click.echo(f"{name}: {note}", err=True)
    restart = query_nodes(rereading, timeout=0.3, curve=curve, holders=False) if rereading else {}
    said: dict[str, list[str]] = {}  # SERVER lines a reread cannot change: by note
    for node in restart.get("nodes", []):
        if node.get("restart"):
            said.setdefault(str(node["restart"]), []).append(str(node["name"]))
    for note, names in said.items():
        failed = True
        click.echo(f"{', '.join(names)}: {note}", err=True)
    if refused:
        failed = True
        click.echo(
            f"{refused} license line(s) refused (the warnings above): the nodes serve the "
            "others; restore the vendor's lines, then reread",
            err=True,
        )
    if rereading and not left and not failed:
        click.echo(f"{', '.join(name for name, _ in rereading)}: serving the files read")
    if failed:
        sys.exit(EXIT_REFUSED)


@main.command()
@config_option
@click.option("--user", default="", help="take every grant of this user")
@click.option("--host", default="", help="... on this host only (with --user)")
@click.option("--display", default="", help="... on this display only (with --user and --host)")
@click.option("--feature", default="", help="only grants of this feature")
@click.option("--grant", type=click.IntRange(1, MAX_REQ), default=None, help="take this grant only")
@admin_key_option
@ask_timeout_option(5.0)
def remove(
    config_path: str,
    user: str,
    host: str,
    display: str,
    feature: str,
    grant: int | None,
    key_path: str | None,
    timeout: float,
) -> None:
    """Take grants from their sessions and free their seats, as FlexLM's lmremove.

    By --user (and --host, and --display), or one --grant id; --feature narrows either.
    The primary takes every matching grant at least min_remove seconds old (the node
    setting, 120 s by default) and leaves younger ones, listing them; the holder's
    library hears the grant was removed. A borrowed seat is left too (its token serves
    offline: only a return or its end frees it), listed with its end. Exit status: 0
    when a grant was taken, 1 when none was (or no primary answered), 2 on bad usage.
    """
    from zbroker.clients.borrow import when

    if grant is None and not user:
        _fail(click.UsageError("name a --user (with --host, --display) or a --grant id"))
    fields = {"sid": f"admin-{os.getpid()}-{time.time_ns()}", "user": user, "host": host,
              "display": display, "feature": feature, "grant": grant or 0}  # fmt: skip
    _, _, replies = _ask_admin(config_path, key_path, (), "remove", timeout, fields)
    answer = next((r for r in replies.values() if r["status"] in ("ok", "error")), None)
    if answer is None:
        click.echo("no primary answered (an election in progress? try again)", err=True)
        sys.exit(EXIT_REFUSED)
    if answer["status"] != "ok":
        click.echo(f"refused: {answer.get('code')}: {answer.get('detail')}", err=True)
        sys.exit(EXIT_REFUSED)
    for gid in answer.get("taken", []):
        click.echo(f"removed grant {gid}")
    for young in answer.get("young", []):
        click.echo(
            f"left grant {young.get('grant')}: {young.get('age')} s old, under min_remove "
            f"({answer.get('min_remove')} s)"
        )
    for lent in answer.get("borrowed", []):  # absent from a node of an earlier version
        until = lent.get("until")
        end = when(until) if isinstance(until, int | float) else "its end"
        click.echo(f"left grant {lent.get('grant')} of {lent.get('feature')}: borrowed until {end}")
    click.echo(str(answer.get("detail", "")))
    if not answer.get("taken"):
        sys.exit(EXIT_REFUSED)


def client_license(config_path: str) -> str:
    """The license path a command's client uses: ``$ZBROKER_LICENSE``, else the config's
    license file, whose SERVER lines carry the nodes' keys (and the borrow key)."""
    if "ZBROKER_LICENSE" in os.environ:
        return os.environ["ZBROKER_LICENSE"]
    try:
        return str(load_config(config_path).license_path)
    except _CONFIG_ERRORS as exc:
        _fail(exc)


def _check_files(config: Config) -> int:
    """Read ``config``'s license and options file as its nodes will, and print their
    warnings (lines refused, options lines ignored or naming no licensed feature): a
    node only logs them. The number of license lines refused; LicenseError when one
    file does not load."""
    from zbroker.broker.node import read_files

    own, _, warnings = read_files(config)
    for line in warnings:
        click.echo(f"zbroker: warning: {line}", err=True)
    return len(own.refused)


def _triad_endpoints(
    config: Config, nodes: list[tuple[str, str]], curve: ClientCurve | None, timeout: float
) -> tuple[list[tuple[str, str]], ClientCurve | None]:
    """Where the running triad serves ``nodes``: the file's endpoints, but a node that
    does not answer at its file's endpoint is looked for where the nodes that answer say
    it serves (their status lists the others at the endpoints they started with: an
    endpoint edited in the file takes effect only when the nodes restart with it),
    saying so. The endpoints, and the CURVE with the node's key at any endpoint so found."""
    from zbroker.broker.status import ask
    from zbroker.clients.errors import LicenseError as ClientError

    try:
        replies = ask(nodes, {"op": "status"}, timeout=min(timeout, 1.0), curve=curve)
    except ClientError as exc:  # a node's reply we cannot read
        _fail(exc, EXIT_REFUSED)
    known: dict[str, str] = {}
    for reply in replies.values():
        report = reply.get("report")
        entries = report.get("nodes") if isinstance(report, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and isinstance(entry.get("endpoint"), str):
                known.setdefault(str(entry.get("name")), entry["endpoint"])
    found = []
    keys: dict[str, str] = {}
    for name, endpoint in nodes:
        running = known.get(name, endpoint)
        if name not in replies and running != endpoint:
            click.echo(
                f"{name}: no answer at {endpoint}; the triad's nodes know it at {running}: "
                "an endpoint change takes effect when the nodes restart with the new file",
                err=True,
            )
            key = config.node(name).public_key
            if key is not None:
                keys[running] = key
            endpoint = running
        found.append((name, endpoint))
    if curve is not None and keys:
        curve = ClientCurve(curve.keys, {**curve.servers, **keys})
    return found, curve


def _ask_admin(
    config_path: str,
    key_path: str | None,
    only: tuple[str, ...],
    action: str,
    timeout: float,
    fields: dict[str, Any] | None = None,
) -> tuple[list[tuple[str, str]], ClientCurve | None, dict[str, Any]]:
    """Ask the config's nodes (those named in ``only``, else all) for an admin ``action``
    (with ``fields``, the action's own).

    The (name, endpoint)s asked, the administrator's CURVE and the replies by node name.
    Exit 2 on a config error, 1 on a reply that cannot be read.
    """
    from zbroker.broker.status import ask
    from zbroker.clients.errors import LicenseError as ClientError

    try:
        config = load_config(config_path)
        nodes = [config.node(name) for name in only] if only else list(config.nodes)
        curve = config_curve(config, admin=True, key_path=key_path)
    except _CONFIG_ERRORS as exc:
        _fail(exc)
    endpoints, curve = _triad_endpoints(config, [(n.name, n.client) for n in nodes], curve, timeout)
    try:
        request = {"op": "admin", "action": action, **(fields or {})}
        replies = ask(endpoints, request, timeout=timeout, curve=curve)
    except ClientError as exc:  # a node's reply we cannot read
        _fail(exc, EXIT_REFUSED)
    return endpoints, curve, replies


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
def keygen(directory: Path, name: str) -> None:
    """Make a CURVE key pair DIRECTORY/NAME.key (public) and NAME.key_secret (mode 0600).

    For a client of a triad with client_allow (add the public key printed to that
    list; give the client the secret: ZBROKER_CLIENT_KEY) or another administrator
    (add it to admin_keys). Node keys come from zbroker init.
    """
    if not _KEY_NAME.match(name):
        _fail(
            ValueError(
                f"key name {name[:40]!r}: expected 1 to 64 letters, digits, '_', '.' or '-', "
                "not starting with '.' or '-'"
            )
        )
    try:
        public_path, secret_path = write_curve_keypair(directory, name)
        public = load_keypair(secret_path).public
    except SecurityError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(ValueError(f"{directory}: cannot create the key directory: {exc.strerror}"))
    click.echo(f"public key: {public}")
    click.echo(f"public certificate: {public_path}")
    click.echo(f"secret certificate: {secret_path}")


def config_curve(config: Config, *, admin: bool, key_path: str | None = None) -> ClientCurve | None:
    """CURVE for the commands: the nodes' keys from the config, and our key pair.

    Our key: ``key_path``, else ``$ZBROKER_ADMIN_KEY``, else the config's ``admin_key``.
    ``admin=False`` (status) falls back to a fresh key when that one cannot be read.
    """
    if not config.secure:
        return None
    servers = {n.client: n.public_key for n in config.nodes if n.public_key}
    path = key_path or os.environ.get(ADMIN_KEY_ENV) or config.admin_key
    if path is None:
        if admin:
            raise SecurityError(
                f"{config.path}: no administrator key: set admin_key, ${ADMIN_KEY_ENV} or --key"
            )
        return ClientCurve(process_keypair(), servers)
    try:
        keys = load_keypair(Path(path))
    except SecurityError:
        if admin:
            raise
        keys = process_keypair()
    return ClientCurve(keys, servers)
