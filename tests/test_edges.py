"""Numbers at the edge, and one line and an exit code for every mistake (issue 10, 4 and 6).

- every setting of ``zbroker.toml`` with wrong types, ``nan``, ``inf``, negatives, zero
  and values past its range is refused by ``load_config`` naming the setting and the
  range; so are duplicate endpoints and data directories;
- every numeric option of every ``zbroker`` command likewise ends in exit 2 with click's
  message naming the option, and no traceback;
- a few of these through the real ``zbroker`` command in a subprocess, so that the whole
  path (imports, ``main``, the node's start) is proven, with their exit codes;
- the big number end to end: a count of 2^64 is refused by ``vendor sign`` and, signed
  by other means, at load with file:line;
- SIGHUP rereads the files; the other signals whose default would kill a node
  silently are logged and ignored; SIGTERM, SIGINT and SIGQUIT each end with the
  "stopped" line;
- a property test: any license file the parser accepts can be packed, replicated and
  applied, and each of its lines checked out to the last seat.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import pytest
import zmq
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import event, given, settings
from hypothesis import strategies as st

from zbroker import LicenseClient
from zbroker import LicenseError as ClientError
from zbroker.broker.cli import EXIT_DATA, Seconds, main
from zbroker.broker.config import NODE_SETTINGS, RANGES, SETTINGS, ConfigError, load_config
from zbroker.broker.demo import free_ports, write_demo
from zbroker.broker.ledger import Ledger
from zbroker.broker.license import (
    LicenseSyntaxError,
    LicenseUnservedError,
    load_license,
    parse_license,
    sign_license_text,
)
from zbroker.broker.model import Now, Request
from zbroker.broker.signing import load_private_key, sign_canonical
from zbroker.broker.status import query_nodes
from zbroker.broker.wire import (
    MAX_COUNT,
    MAX_LEASE,
    MAX_VERSION_PART,
    RemoteProtocolError,
    decode_request,
    pack,
    unpack,
)
from zbroker.clients.errors import ProtocolError
from zbroker.clients.testing import LocalTriad, wait_for
from zbroker.clients.wire import Reply, grant_of
from zbroker.peers.messages import Append, validate
from zbroker.peers.types import Entry

pytestmark = pytest.mark.unit

# --- helpers -----------------------------------------------------------------------------


def _zbroker(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zbroker.broker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line that says why, after anything the node logged; never a traceback."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines, f"nothing on stderr (exit {result.returncode})"
    return lines[-1]


def _set(text: str, key: str, value: str, table: str | None = None) -> str:
    """The config ``text`` with ``key = value`` at the top level or in ``[nodes.TABLE]``."""
    lines = text.splitlines()
    if table is None:
        kept = [line for line in lines if line.split("=", 1)[0].strip() != key]
        return "\n".join([f"{key} = {value}", *kept]) + "\n"
    start = lines.index(f"[nodes.{table}]") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
    body = [line for line in lines[start:end] if line.split("=", 1)[0].strip() != key]
    return "\n".join([*lines[:start], f"{key} = {value}", *body, *lines[end:]]) + "\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A secure triad's config (never started): the cases below break copies of it."""
    return write_demo(tmp_path_factory.mktemp("edges") / "demo")


_cases = itertools.count()


def _variant(demo: Path, text: str) -> Path:
    """``text`` as a config beside the demo's, so its relative paths still resolve."""
    path = demo.parent / f"case{next(_cases)}.toml"
    path.write_text(text)
    return path


# --- every setting of zbroker.toml -------------------------------------------------------


def _number_cases() -> list[tuple[str, str, str]]:
    cases = []
    for key, allowed in RANGES.items():
        past = str(int(allowed.high) + 1) if allowed.whole else repr(allowed.high * 10)
        values = ['"1"', "true", "nan", "inf", "-inf", "-1", past, "[1]"]
        if allowed.low > 0 or allowed.low_open:
            values.append("0")  # snapshot_keep = 0 is a setting: keep no log before it
        if allowed.whole:
            values.append("1.5")
        elif allowed.low > 0:
            values.append(repr(allowed.low / 2))
        cases += [(key, value, f"{key} must be {allowed.describe()}") for value in values]
    return cases


TOP_LEVEL_CASES = [
    *_number_cases(),
    *[(k, v, f"{k} must be true or false") for k in ("failback", "fsync", "secure")
      for v in ("1", '"true"', "nan")],
    *[(k, v, f"{k} must be a path") for k in ("license", "vendor_key", "client_allow",
      "admin_keys", "admin_key", "options", "borrow_key") for v in ("5", '""', "inf")],
    ("peer_timeout", "0.15", "peer_timeout (0.15) must exceed two heartbeat_interval"),
    ("bogus", "1", "unknown settings bogus"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "value", "expected"), TOP_LEVEL_CASES)
def test_every_top_level_setting_is_checked_with_its_range(
    demo: Path, key: str, value: str, expected: str
) -> None:
    path = _variant(demo, _set(demo.read_text(), key, value))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert expected in message and str(path) in message
    assert "\n" not in message


def test_the_tables_try_every_setting() -> None:
    assert {key for key, _, _ in TOP_LEVEL_CASES} == {*SETTINGS, "bogus"}
    assert {key for key, _ in NODE_CASES} == {*NODE_SETTINGS, "peeer"}


BAD_ENDPOINTS = [
    '"x"',
    '"tcp://127.0.0.1"',
    '"tcp://127.0.0.1:0"',
    '"tcp://127.0.0.1:65536"',
    '"tcp://127.0.0.1:123456"',
    '"udp://127.0.0.1:5"',
    '"ipc:///tmp/x"',
    "5",
    '""',
    "nan",
]
NODE_CASES = [
    *[(key, value) for key in ("peer", "pub") for value in BAD_ENDPOINTS],
    *[
        (key, value)
        for key in ("data", "secret_key", "report_log")
        for value in ("5", '""', "true")
    ],
    *[("metrics", value) for value in ('"tcp://127.0.0.1:5"', '"127.0.0.1:0"', *BAD_ENDPOINTS)],
    ("peeer", '"tcp://127.0.0.1:5"'),
]


@pytest.mark.parametrize(("key", "value"), NODE_CASES)
def test_every_node_setting_is_checked(demo: Path, key: str, value: str) -> None:
    path = _variant(demo, _set(demo.read_text(), key, value, table="beta"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "[nodes.beta]" in message and key in message, message
    if key in ("peer", "pub") and value.startswith('"tcp'):
        assert "port from 1 to 65535" in message


def test_two_nodes_with_one_endpoint_or_data_directory_are_refused(demo: Path) -> None:
    text = demo.read_text()
    config = load_config(demo)
    alpha = config.node("alpha")
    cases = [
        (_set(text, "peer", f'"{alpha.peer}"', table="beta"), ("peer of alpha", "peer of beta")),
        (_set(text, "pub", f'"{alpha.client}"', table="gamma"), ("alpha", "pub of gamma")),
        (_set(text, "pub", f'"{alpha.peer}"', table="alpha"), ("peer of alpha", "pub of alpha")),
        (_set(text, "data", '"data/alpha"', table="beta"), ("[nodes.beta] data", "alpha")),
        (_set(text, "data", '"./data/../data/alpha/"', table="gamma"), ("gamma", "alpha")),
    ]
    for variant, names in cases:
        path = _variant(demo, variant)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert all(name in str(info.value) for name in names), str(info.value)
    load_config(_variant(demo, text))  # the control: the demo itself is fine


# --- every numeric option of every command -----------------------------------------------

NOT_SECONDS = ["x", "nan", "inf", "-inf", "-1", "1e12"]
CLI_CASES = [
    *[(["init", "{dir}", "--lease", v], "--lease") for v in [*NOT_SECONDS, "0", "0.1"]],
    (["init", "{dir}", "--servers", "2"], "--servers"),
    *[(["web", "--config", "{config}", "--history-every", v], "--history-every")
      for v in [*NOT_SECONDS, "0", "0.5", "3601"]],
    *[(["status", "--config", "{config}", "--timeout", v], "--timeout")
      for v in [*NOT_SECONDS, "0"]],
    *[(["down", "--config", "{config}", "--timeout", v], "--timeout")
      for v in [*NOT_SECONDS, "0"]],
    *[(["checkout", "cad", "--config", "{config}", "--count", v], "--count")
      for v in ["x", "nan", "inf", "-1", "0", "1.5", "2000000", str(2**64)]],
    *[(["checkout", "cad", "--config", "{config}", "--wait", v], "--wait") for v in NOT_SECONDS],
    *[(["checkout", "cad", "--config", "{config}", "--hold", v], "--hold")
      for v in [*NOT_SECONDS, "-5"]],
    *[(["checkout", "cad", "--config", "{config}", "--version", v], "--version")
      for v in ["x", "", "2.x", "1." + str(MAX_VERSION_PART + 1), "1" * 40, "-1"]],
    *[(["status", "--config", "{config}", "--feature", v], "--feature") for v in ["", "f" * 257]],
    *[(["checkout", v, "--config", "{config}"], "FEATURE") for v in ["", "f" * 257]],
    *[(["borrow", v, "--config", "{config}"], "FEATURE") for v in ["", "f" * 257]],
    *[(["chaos", option, v, "--dry-run"], option)
      for option in ("--duration", "--op-timeout") for v in [*NOT_SECONDS, "0"]],
    *[(["chaos", option, v, "--dry-run"], option)
      for option in ("--liveness-limit", "--min-window") for v in NOT_SECONDS],
    *[(["chaos", "--lease", v, "--dry-run"], "--lease") for v in [*NOT_SECONDS, "0", "0.1"]],
    *[(["chaos", option, v, "--dry-run"], option)
      for option in ("--count", "--processes", "--sessions")
      for v in ["x", "nan", "inf", "-1", "0", "1.5", str(2**64)]],
    *[(["chaos", "--seed", v, "--dry-run"], "--seed") for v in ["x", "nan", "-1", str(2**64)]],
    (["chaos", "--faults", "kill-everyone", "--dry-run"], "--faults"),
    *[(["bench", "--duration", v], "--duration") for v in [*NOT_SECONDS, "0"]],
    *[(["remove", "--config", "{config}", "--grant", v], "--grant")
      for v in ["x", "nan", "-1", "0", "1.5", str(2**64)]],
    *[(["remove", "--config", "{config}", "--timeout", v], "--timeout")
      for v in [*NOT_SECONDS, "0"]],
    *[(["borrow", "cad", "--config", "{config}", "--hours", v], "--hours")
      for v in ["x", "nan", "inf", "-1", "0", "87601"]],
    *[(["borrow", "cad", "--config", "{config}", "--count", v], "--count")
      for v in ["x", "nan", "-1", "0", "1.5", str(2**64)]],
    (["borrow", "cad", "--config", "{config}", "--until", "someday"], "--until"),
    *[(["bench", option, v], option)
      for option in ("--kills", "--sessions", "--grants-per-session", "--procs",
                     "--storm-clients", "--flood-requests")
      for v in ["x", "nan", "inf", "-1", "0", "1.5", str(2**64)]],
]  # fmt: skip


def _options(group: click.Group, path: str = "zbroker") -> list[tuple[str, click.Parameter]]:
    found = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):  # chaos and bench are imported when asked for
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            found += _options(command, f"{path} {name}")
        elif command is not None:
            found += [(f"{path} {name}", param) for param in command.params]
    return found


def test_no_option_takes_a_number_without_a_range() -> None:
    """A new option of type float or int would let nan, inf or 10**100 through."""
    unbounded = [
        f"{command} {param.name}"
        for command, param in _options(main)
        if param.type in (click.FLOAT, click.INT)
        or (isinstance(param.type, click.IntRange) and None in (param.type.min, param.type.max))
        or isinstance(param.type, click.FloatRange)  # lets nan through
    ]
    assert unbounded == []
    numeric = {p.name for _, p in _options(main) if isinstance(p.type, Seconds | click.IntRange)}
    assert numeric == {  # each in CLI_CASES
        *("lease", "timeout", "count", "wait", "hold"),
        *("duration", "processes", "sessions", "seed", "op_timeout", "liveness_limit"),
        *("min_window", "kills", "grants_per_session", "procs", "storm_clients"),
        "flood_requests",
        "grant",
        "history_every",
    }


@pytest.mark.parametrize(("args", "option"), CLI_CASES)
def test_every_numeric_option_refuses_bad_values_with_exit_2(
    demo: Path, tmp_path: Path, args: list[str], option: str
) -> None:
    argv = [a.format(dir=tmp_path / "new", config=demo) for a in args]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert option in result.stderr.strip().splitlines()[-1], result.stderr
    assert not (tmp_path / "new").exists()  # refused before anything was written


MISTAKES = [
    (["run", "--config", "{config}", "--node", "delta"], "no node named 'delta'"),
    (["run", "--config", "{missing}", "--node", "alpha"], "cannot read config"),
    (["status", "--config", "{missing}"], "cannot read config"),
    (["down", "--config", "{config}", "--node", "delta"], "no node named 'delta'"),
    (["keygen", "{dir}", "../escape"], "key name '../escape'"),
    (["keygen", "/proc/no/such/dir", "ok"], "cannot create the key directory"),
    (["init", "/proc/no/such/dir"], "cannot write the demo"),
]


@pytest.mark.parametrize(("args", "expected"), MISTAKES)
def test_other_mistakes_are_one_line_and_exit_2(
    demo: Path, tmp_path: Path, args: list[str], expected: str
) -> None:
    missing = tmp_path / "missing.toml"
    argv = [a.format(dir=tmp_path / "k", config=demo, missing=missing) for a in args]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("zbroker: ") and result.stderr.count("\n") == 1
    assert expected in result.stderr


@pytest.mark.parametrize(
    ("config", "expected"),
    [("{missing}", "cannot read config"), ("{license}", "Expected '='"), ("/dev/null", "missing")],
)
def test_chaos_on_a_config_it_cannot_read_is_one_line_and_exit_2(
    demo: Path, tmp_path: Path, config: str, expected: str
) -> None:
    license = load_config(demo).license_path
    path = config.format(missing=tmp_path / "missing.toml", license=license)
    out = tmp_path / "run"
    args = ["chaos", "--duration", "5", "--out", str(out), "--config", path]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("chaos: ") and result.stderr.count("\n") == 1
    assert expected in result.stderr


# --- the real command, in a subprocess ---------------------------------------------------


@pytest.mark.integration
def test_the_real_command_exits_2_with_one_line_for_settings_and_options(demo: Path) -> None:
    bad_lease = _variant(demo, _set(demo.read_text(), "lease", "nan"))
    result = _zbroker("run", "--config", str(bad_lease), "--node", "alpha")
    assert result.returncode == 2
    assert _last_line(result) == (
        f"zbroker: {bad_lease}: lease must be {RANGES['lease'].describe()}, not nan"
    )
    assert result.stderr.count("\n") == 1

    alpha = load_config(demo).node("alpha")
    same_port = _variant(demo, _set(demo.read_text(), "peer", f'"{alpha.peer}"', table="beta"))
    result = _zbroker("status", "--config", str(same_port))
    assert result.returncode == 2 and "peer of beta" in _last_line(result)

    result = _zbroker("checkout", "cad", "--config", str(demo), "--count", "2000000")
    assert result.returncode == 2
    assert _last_line(result).startswith("Error: Invalid value for '--count'")

    (demo.parent / "latin1.toml").write_bytes(b"lease = 30 # caf\xe9\n")
    result = _zbroker("status", "--config", str(demo.parent / "latin1.toml"))
    assert result.returncode == 2 and "not UTF-8" in _last_line(result)


def _single(tmp_path: Path) -> Path:
    return write_demo(tmp_path / "one", servers=1, secure=False)


@pytest.mark.integration
def test_a_data_directory_that_cannot_be_used_exits_3_with_one_line(tmp_path: Path) -> None:
    config = _single(tmp_path)
    data = load_config(config).node("alpha").data
    shutil.rmtree(data)
    data.write_text("not a directory\n")
    result = _zbroker("run", "--config", str(config), "--node", "alpha")
    assert result.returncode == EXIT_DATA, result.stderr
    line = _last_line(result)
    assert line.startswith("zbroker: ") and str(data) in line
    assert data.read_text() == "not a directory\n"  # touched nothing

    uncreatable = _variant(config, _set(config.read_text(), "data", '"/proc/no/such"', "alpha"))
    result = _zbroker("run", "--config", str(uncreatable), "--node", "alpha")
    assert result.returncode == EXIT_DATA, result.stderr
    assert _last_line(result).startswith("zbroker: /proc/no/such")


@pytest.mark.integration
def test_a_disk_that_refuses_writes_stops_the_node_with_exit_3_and_one_line(
    tmp_path: Path,
) -> None:
    """As a full disk would: past the file size limit every write fails (EFBIG)."""
    config = _single(tmp_path)
    node = load_config(config).node("alpha")
    # 64 blocks (32 or 64 KiB, by the shell's unit): a few hundred deltas fill the log.
    # A shell sets the limit: a preexec_fn in a process with threads could deadlock.
    command = f"ulimit -f 64 && exec {shlex.quote(sys.executable)} -m zbroker.broker run --config "
    command += f"{shlex.quote(str(config))} --node alpha"
    proc = subprocess.Popen(
        ["sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        with LicenseClient([node.client], timeout=2) as client:
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                # unavailable while it starts, or once it has stopped
                with contextlib.suppress(ClientError):
                    client.checkin(client.checkout("cad"))
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_DATA, stderr
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("zbroker: ") and str(node.data) in line, line


@pytest.mark.integration
def test_a_port_taken_by_another_program_exits_2_with_one_line(tmp_path: Path) -> None:
    config = _single(tmp_path)
    host, port = load_config(config).node("alpha").peer.removeprefix("tcp://").split(":")
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()
        result = _zbroker("run", "--config", str(config), "--node", "alpha")
    assert result.returncode == 2
    line = _last_line(result)
    assert "cannot open its sockets" in line and "Address already in use" in line
    assert f":{port}" in line


@pytest.mark.integration
def test_a_count_of_2_to_the_64_is_refused_at_signing_and_at_load(tmp_path: Path) -> None:
    config = _single(tmp_path)
    license_path = load_config(config).license_path
    key_path = config.parent / "keys" / "vendor.key"
    big = "FEATURE huge demo 1.0 permanent 18446744073709551616"
    text = license_path.read_text() + big + "\n"
    number = text.count("\n")  # the line of the big count
    unsigned = tmp_path / "unsigned.lic"
    unsigned.write_text(text)

    result = _zbroker("vendor", "sign", str(unsigned), "--key", str(key_path))
    assert result.returncode == 2
    assert _last_line(result) == (
        f"error: {unsigned}:{number}:33: expected a seat count (a whole number from 1 to "
        f"{MAX_COUNT}), found '18446744073709551616'"
    )
    assert unsigned.read_text() == text  # nothing signed, nothing rewritten

    # Signed by an older tool that knew no range: the signature itself verifies.
    signature = sign_canonical(load_private_key(key_path), big.encode())
    license_path.write_text(f"{text.rstrip()} SIGN={signature}\n")
    with pytest.raises(LicenseSyntaxError) as info:
        load_license(license_path, None)
    assert (info.value.line, info.value.column) == (number, 33)
    for args in (
        ("run", "--config", str(config), "--node", "alpha"),
        ("vendor", "verify", str(license_path), "--pub", str(config.parent / "keys/vendor.pub")),
    ):
        result = _zbroker(*args)
        assert result.returncode == 2
        line = _last_line(result)
        assert f"{license_path}:{number}:33:" in line and f"from 1 to {MAX_COUNT}" in line


# --- signals -----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_sighup_rereads_sigusr1_is_ignored_and_each_stop_signal_logs_stopped(
    make_triad: Any, stop: signal.Signals
) -> None:
    triad: LocalTriad = make_triad(servers=1, lease=5.0, secure=False)
    triad.wait_for_primary()
    log = triad.logs / "alpha.log"
    proc = triad.procs["alpha"]
    for sent, said in (
        (signal.SIGHUP, "reread: "),  # FlexNet's lmreread (docs/admin.md)
        (signal.SIGUSR1, "ignores SIGUSR1"),
    ):
        proc.send_signal(sent)

        def logged(said: str = said) -> bool:
            return said in log.read_text()

        wait_for(logged, 10, f"{said!r} in the log")
    assert proc.poll() is None
    with LicenseClient(triad.endpoints, timeout=5) as client:
        client.checkin(client.checkout("cad"))  # still serving
    proc.send_signal(stop)
    assert proc.wait(timeout=10) == 0
    text = log.read_text()
    assert "node alpha stopped" in text and "Traceback" not in text
    assert "rereads the license and options" in text


@pytest.mark.integration
def test_up_stops_its_nodes_on_sighup(tmp_path: Path) -> None:
    config = _single(tmp_path)
    up = subprocess.Popen(
        [sys.executable, "-m", "zbroker.broker", "up", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    endpoints = [("alpha", load_config(config).node("alpha").client)]
    try:
        wait_for(lambda: query_nodes(endpoints, 0.3)["primary"], 20, "the node of zbroker up")
        up.send_signal(signal.SIGHUP)
        output, _ = up.communicate(timeout=15)
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
    assert up.returncode == 0, output
    assert "node alpha stopped" in output and "Traceback" not in output
    assert query_nodes(endpoints, 0.3)["nodes"][0]["role"] == "down"


def test_a_node_known_silent_is_not_asked_and_shows_down() -> None:
    """``query_nodes(silent=...)``: the test kit's stopped and paused nodes."""
    (port,) = free_ports(1)
    endpoint = f"tcp://127.0.0.1:{port}"
    ctx = zmq.Context.instance()
    listener = ctx.socket(zmq.ROUTER)  # where the node would be: it must hear nothing
    listener.setsockopt(zmq.LINGER, 0)
    listener.bind(endpoint)
    try:
        status = query_nodes([("alpha", endpoint)], 0.3, holders=False, silent={"alpha"})
        assert status["nodes"] == [
            {"name": "alpha", "endpoint": endpoint, "role": "down", "term": None}
        ]
        assert status["primary"] is None
        assert not listener.poll(300)
    finally:
        listener.close()


# --- the wire's bounds -------------------------------------------------------------------

WIRE_CASES = [
    ("count", 0), ("count", MAX_COUNT + 1), ("count", 2**64 - 1), ("count", -(2**63)),
    ("count", 1.5), ("version", "1" * 33), ("version", f"1.{MAX_VERSION_PART + 1}"),
    ("wait", float("nan")), ("wait", float("inf")), ("wait", -1.0), ("wait", 86_401),
    ("req", 2**63), ("req", 0), ("req", 2.0**60), ("ack", -1),
]  # fmt: skip


@pytest.mark.parametrize(("field", "value"), WIRE_CASES)
def test_the_wire_refuses_numbers_past_their_range(field: str, value: object) -> None:
    request = {"v": 1, "op": "checkout", "sid": "s", "req": 1, "feature": "cad", field: value}
    with pytest.raises(RemoteProtocolError) as info:
        decode_request(pack(request))
    assert info.value.reply["code"] == "bad_request"
    assert field in str(info.value) or "version" in str(info.value)


def test_the_client_refuses_a_reply_with_numbers_past_their_range() -> None:
    for lease in (float("nan"), float("inf"), 0.0, -1.0, MAX_LEASE * 2, True):
        with pytest.raises(ProtocolError):
            Reply(sid="s", req=1, status="ok", body={"lease": lease}).seconds("lease")
    grant = {"id": 1, "feature": "cad", "version": "2.0", "count": MAX_COUNT + 1}
    with pytest.raises(ProtocolError):
        grant_of(Reply(sid="s", req=1, status="ok", body={"grant": grant}))
    with pytest.raises(ProtocolError):
        grant_of(Reply(sid="s", req=1, status="ok", body={"grant": {**grant, "count": 1, "id": 0}}))
    assert (
        grant_of(Reply("s", 1, "ok", {"grant": {**grant, "count": MAX_COUNT}})).count == MAX_COUNT
    )


# --- any license the parser accepts can be packed, replicated and applied ----------------

VENDOR = Ed25519PrivateKey.generate()
_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]


def _mostly(valid: st.SearchStrategy[Any], past: st.SearchStrategy[Any]) -> Any:
    """Values in range with their extremes, and one time in eight one past the range,
    so that files of several lines are often accepted whole."""
    return st.integers(0, 7).flatmap(lambda i: past if i == 7 else valid)


_PART = st.one_of(st.integers(0, 12), st.just(MAX_VERSION_PART), st.integers(0, MAX_VERSION_PART))
_VERSIONS = _mostly(
    st.lists(_PART.map(str), min_size=1, max_size=4).map(".".join).filter(lambda v: len(v) <= 32),
    st.one_of(
        st.lists(_PART.map(str), min_size=5, max_size=20).map(".".join),  # often too long
        st.integers(MAX_VERSION_PART + 1, 10**25).map("1.{}".format),
    ),
)
_COUNTS = _mostly(
    st.one_of(st.integers(1, 12), st.just(MAX_COUNT), st.integers(1, MAX_COUNT)),
    st.one_of(st.just(0), st.integers(MAX_COUNT + 1, 2**64 + 2), st.integers(2**64, 10**40)),
)
_DATES = _mostly(
    st.one_of(
        st.just("permanent"),
        st.sampled_from(["31-dec-9999", "1-jan-0001", "29-feb-2028"]),
        st.builds(
            "{}-{}-{:04d}".format,
            st.integers(1, 28),
            st.sampled_from(_MONTHS),
            st.integers(1, 9999),
        ),
    ),
    st.builds(
        "{}-{}-{:04d}".format,
        st.integers(0, 32),
        st.sampled_from(_MONTHS),
        st.sampled_from([0, 2027]),
    ),
)
_NAMES = _mostly(
    st.one_of(st.sampled_from(["cad", "solver", "x_1.y-z"]), st.just("f" * 256)),
    st.integers(257, 300).map("f".__mul__),
)
_LINES = st.builds(
    lambda keyword, name, version, expiry, zeros, count, extras: " ".join(
        [keyword, name, "acme", version, expiry, f"{zeros}{count}", *extras]
    ),
    st.sampled_from(["FEATURE", "INCREMENT"]),
    _NAMES,
    _VERSIONS,
    _DATES,
    st.sampled_from(["", "0", "000"]),
    _COUNTS,
    st.lists(st.sampled_from(["USERS=ann,bob", "HOSTS=h1", "user_based", "NOTE=x"]),
             unique=True, max_size=3),
)  # fmt: skip
DAY0 = datetime.datetime(2026, 6, 1, 12, tzinfo=datetime.UTC).timestamp()


def _replicated(delta: dict[str, Any], index: int) -> dict[str, Any]:
    """``delta`` as a backup gets it: in an append message, packed, unpacked, validated."""
    append = Append(term=1, prev_index=index - 1, prev_term=1 if index > 1 else 0,
                    entries=(Entry(1, index, delta),), commit=index)  # fmt: skip
    received = validate(unpack(pack(append.to_wire())))
    assert isinstance(received, Append)
    got = received.entries[0].delta
    assert got is not None
    return got


@settings(max_examples=300, deadline=None)
@given(st.lists(_LINES, min_size=1, max_size=6))
def test_any_license_the_parser_accepts_packs_replicates_and_applies(lines: list[str]) -> None:
    event(_serve(lines))


def _serve(lines: list[str]) -> str:
    """Sign ``lines``; if they parse, replicate them and check every seat out."""
    key = VENDOR
    text = "SERVER alpha ANY tcp://127.0.0.1:27001\nVENDOR acme\n" + "\n".join(lines) + "\n"
    try:
        signed = sign_license_text(text, key, path="p.lic")
    except LicenseUnservedError as unserved:
        # A copy of a line, or a second FEATURE line of a feature: the nodes would leave
        # it out, so the vendor may not sign it (zbroker.broker.license.unserved).
        assert all("a copy of line" in r.why or "already gives" in r.why for r in unserved.refused)
        return "unserved"
    except LicenseSyntaxError as refused:
        # What the vendor cannot sign, the parser refuses too, at the same place.
        with pytest.raises(LicenseSyntaxError) as again:
            parse_license(text, path="p.lic", public_key=key.public_key())
        assert str(again.value) == str(refused)
        assert re.match(r"p\.lic:\d+:\d+: expected ", str(refused))
        return "refused"
    lic = parse_license(signed, path="p.lic", public_key=key.public_key())
    assert lic.refused == []

    primary = Ledger((), lease=30.0, heartbeat=10.0)
    backup = Ledger((), lease=30.0, heartbeat=10.0)
    index = 0

    def commit(decided: list[tuple[dict[str, Any], Any]]) -> None:
        nonlocal index
        for delta, reply in decided:
            primary.apply(delta)
            index += 1
            backup.apply(_replicated(delta, index))
            if reply is not None:
                unpack(pack(reply))

    commit([(primary.reload_delta(lic.entitlements), None)])
    assert backup.entitlements == primary.entitlements == tuple(lic.entitlements)
    now = Now(mono=100.0, wall=DAY0)
    opened = primary.handle(Request(op="open", sid="s", req=1, user="ann", host="h1"), now)
    commit(opened.decided)
    for req, line in enumerate(lic.entitlements, start=2):
        # The largest checkout the line allows: every seat of it, at its own version.
        ask = Request(op="checkout", sid="s", req=req, feature=line.feature,
                      count=line.count, version=line.version)  # fmt: skip
        outcome = primary.handle(ask, now)
        commit(outcome.decided)
        if outcome.reply is not None:
            unpack(pack(outcome.reply))
    snap = unpack(pack(backup.snapshot()))
    assert Ledger.from_snapshot(snap, lease=30.0, heartbeat=10.0).snapshot() == primary.snapshot()
    unpack(pack(primary.status(now)))
    return f"accepted, {len(lines)} line(s)"


def test_the_property_test_reaches_the_extremes() -> None:
    """The strategy's edges parse: MAX_COUNT, the highest part, 31-dec-9999, 256 chars."""
    name = "f" * 256
    line = f"FEATURE {name} acme 1.{MAX_VERSION_PART} 31-dec-9999 000{MAX_COUNT}"
    lic = parse_license(f"SERVER a ANY tcp://h:1\n{line}\n", path="p.lic", public_key=None)
    (only,) = lic.entitlements
    assert (only.count, only.expires) == (MAX_COUNT, datetime.date(9999, 12, 31))
    assert _serve([line.replace("FEATURE", "INCREMENT"), line]) == "accepted, 2 line(s)"
