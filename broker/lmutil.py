"""The shell of ``zbroker lmstat`` and of the ``zbroker-lmutil`` console script.

``run_lmstat`` reads lmstat's options (``zbroker.broker.lmstat``), finds the servers of the
license path (``-c``, else ``$ZBROKER_LICENSE``, else ``$LM_LICENSE_FILE``), asks each
entry's nodes for their status and holders (``zbroker.broker.status.query_nodes``: every page
of holders, each page within the timeout), and prints lmstat's text.

``main`` is ``zbroker-lmutil``: FlexNet's ``lmutil`` takes the tool as its first
argument (``lmutil lmstat -a -c 27000@host``), and a program named ``lmstat`` (a
symlink) is lmstat itself. So a site points LSF's ``LMSTAT_PATH``, a Slurm sync
script or the FlexLM exporter at a directory holding an ``lmutil`` symlink to it.
The other lmutil tools answer with one line naming what zbroker offers instead.

Exit codes: 0 when every entry's servers were asked (a server that does not answer is
printed as lmstat prints it); 1 when no server of any entry answered, or ``-f F`` names
a feature that none of those that answered serves; 2 bad usage or a license path that
cannot be used. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from zbroker.broker.lmstat import (
    USAGE,
    Clock,
    Entry,
    LicenseLine,
    LmstatUsage,
    Options,
    flexnet_servers,
    host_port,
    info_rows,
    parse_args,
    render,
    render_info,
    unknown_feature,
    version_lines,
)

EXIT_REFUSED = 1
EXIT_USAGE = 2
MAX_TIMEOUT = 3600.0  # -t: an hour is already far past any answer (zbroker status's bound)
PATH_ENVS = ("ZBROKER_LICENSE", "LM_LICENSE_FILE")

# What zbroker offers for the other lmutil tools (None: nothing yet).
OTHER_TOOLS: dict[str, str | None] = {
    "lmdown": "zbroker down --config CONFIG (every node) or --node NAME",
    "lmver": "zbroker --version",
    "lmdiag": "zbroker status --config CONFIG (each node's role, term, lag and peers)",
    "lmremove": None,
    "lmreread": None,
    "lmswitchr": None,
    "lmswitch": None,
    "lmnewlog": None,
    "lmhostid": None,
    "lminstall": None,
    "lmborrow": None,
    "lmpath": None,
    "lmcksum": None,
    "lmnewgen": None,
}


class LmutilError(Exception):
    """The license path or a file on it cannot be used; the message says why."""


def _version() -> str:
    try:
        return package_version("zbroker")
    except PackageNotFoundError:
        return "unknown"


def run_lmstat(argv: Sequence[str], prog: str = "lmstat") -> int:
    """Print lmstat's answer for ``argv`` (its options); the exit code."""
    try:
        opts = parse_args(argv, MAX_TIMEOUT)
    except LmstatUsage as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if opts.help:
        print(USAGE)
        return 0
    if opts.version:
        print("\n".join(version_lines(prog, _version())))
        return 0
    try:
        entries = entries_of(_license_path(opts))
        curve = _curve(entries)
    except LmutilError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _report(prog, opts, entries, curve)


def _report(prog: str, opts: Options, entries: list[Entry], curve: Any) -> int:
    from zbroker.broker.status import query_nodes
    from zbroker.clients.errors import LicenseError

    if opts.info and all(e.own_file for e in entries):  # lmstat -i reads the license file only
        rows = [row for e in entries for row in info_rows(e, None)]
        sys.stdout.write(render_info(prog, _version(), rows, opts.feature))
        return 0
    asked: list[tuple[Entry, dict[str, Any]]] = []
    try:
        triads = _triads([_named(entry, opts.timeout, curve) for entry in entries])
        for entry, nodes in triads:
            status = query_nodes(
                nodes,
                timeout=opts.timeout,
                curve=curve,
                holders=opts.features and opts.users and not opts.info,
                feature=opts.feature if opts.features else None,
            )
            if status.get("holders_partial"):
                print(f"{prog}: holders partial: {status['holders_partial']}", file=sys.stderr)
            asked.append((entry, status))
    except LicenseError as exc:  # a node's reply we cannot read
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    answered = any(n["role"] != "down" for _, s in asked for n in s["nodes"])
    if opts.info:
        rows = [row for e, s in asked for row in info_rows(e, s)]
        sys.stdout.write(render_info(prog, _version(), rows, opts.feature))
    else:
        sys.stdout.write(render(prog, _version(), asked, opts, Clock(time.time())))
    # A feature no server serves is an error, as in FlexNet: a script that asks for a
    # misspelt feature must not read "nobody uses it" from an exit status of 0.
    return 0 if answered and not unknown_feature(asked, opts) else EXIT_REFUSED


Named = tuple[Entry, list[tuple[str, str]], frozenset[str]]  # entry, (name, endpoint)s, triad


def _named(entry: Entry, timeout: float, curve: Any) -> Named:
    """The entry, (node name, endpoint) of each of its servers, and the names of their triad.

    ``query_nodes`` matches answers to nodes by name, and a ``port@host`` path names
    none: each node says its own in a summary status (one cheap request each), and the
    names of its triad's nodes. A node that does not answer keeps ``port@host`` as its
    name, and is shown down.
    """
    from zbroker.broker.status import ask

    asked = [(f"{port}@{host}", e) for e in entry.endpoints for host, port in [host_port(e)]]
    replies = ask(asked, {"op": "status"}, timeout=timeout, curve=curve)
    reports = {
        label: reply["report"]
        for label, reply in replies.items()
        if reply["status"] == "ok" and isinstance(reply.get("report"), dict)
    }
    names = {label: str(report["node"]) for label, report in reports.items()}
    triad = frozenset(str(n["name"]) for r in reports.values() for n in r.get("nodes", ()))
    return entry, [(names.get(label, label), endpoint) for label, endpoint in asked], triad


def _triads(named: list[Named]) -> list[tuple[Entry, list[tuple[str, str]]]]:
    """The entries to print, single servers of one triad joined into one entry.

    A triad's nodes given as separate entries (``27001@h1:27002@h2:27003@h3``, as some
    schedulers pass a redundant group) are one license service: printed once, with the
    master among them, not three times with their seats counted thrice.
    """
    out: list[tuple[Entry, list[tuple[str, str]]]] = []
    joined: dict[frozenset[str], int] = {}  # triad -> index in out of its joined entry
    for entry, nodes, triad in named:
        at = joined.get(triad) if len(entry.endpoints) == 1 and len(triad) > 1 else None
        if at is None:
            if len(entry.endpoints) == 1 and len(triad) > 1:
                joined[triad] = len(out)
            out.append((entry, list(nodes)))
            continue
        first, first_nodes = out[at]
        if nodes[0] not in first_nodes:
            first_nodes.append(nodes[0])
            first = replace(first, endpoints=(*first.endpoints, *entry.endpoints))
        out[at] = (first, first_nodes)
    return out


def _license_path(opts: Options) -> str:
    if opts.license_path:
        return opts.license_path
    for name in PATH_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    raise LmutilError(
        "no license path: give -c port@host,port@host,port@host (or a license file), "
        f"or set {' or '.join(PATH_ENVS)}"
    )


def entries_of(path: str) -> list[Entry]:
    """The entries of a license path, as FlexNet takes them: separated by ``:`` or ``;``,
    each ``port@host``, a triad ``port@h1,port@h2,port@h3``, a license file, or a
    directory of ``*.lic`` files."""
    from zbroker.clients.errors import LicensePathError
    from zbroker.clients.licpath import parse_server_list

    entries = []
    for raw in path.replace(";", ":").split(":"):
        item = raw.strip()
        if not item:
            continue
        if "@" in item:
            try:
                entries.append(Entry(parse_server_list(item)))
            except LicensePathError as exc:
                raise LmutilError(str(exc)) from None
        elif os.path.isdir(item):  # FlexNet reads every *.lic file of a directory
            files = sorted(f for f in os.listdir(item) if f.endswith(".lic"))
            if not files:
                raise LmutilError(f"{item}: a directory with no *.lic license file")
            entries += [_file_entry(os.path.join(item, f)) for f in files]
        else:
            entries.append(_file_entry(item))
    if not entries:
        raise LmutilError(f"license path {path!r} names no server")
    return entries


def _file_entry(path: str) -> Entry:
    """A license file: zbroker's own (its SERVER lines and lines), else FlexNet's SERVERs."""
    from zbroker.broker.license import parse_syntax
    from zbroker.clients.errors import LicensePathError
    from zbroker.clients.licfile import LicenseError, read_license_text
    from zbroker.clients.licpath import keys_of

    try:
        text = read_license_text(path)
    except LicenseError as exc:
        raise LmutilError(str(exc)) from None
    try:
        syntax = parse_syntax(text, path=path)
    except LicenseError as exc:
        endpoints = flexnet_servers(text)
        if not endpoints:
            raise LmutilError(str(exc)) from None
        return Entry(endpoints, license_file=path)
    lines = tuple(
        LicenseLine(ln.name, ln.version, ln.count, ln.expires, ln.vendor) for ln in syntax.lines
    )
    servers = tuple(s.endpoint for s in syntax.servers)
    try:
        keys = tuple(keys_of(syntax.servers, path).items())
    except LicensePathError as exc:
        raise LmutilError(str(exc)) from None
    return Entry(servers, license_file=path, own_file=True, lines=lines, keys=keys)


def _curve(entries: list[Entry]) -> Any:
    """CURVE for the nodes whose keys are known (``ZBROKER_SERVER_KEYS``, SERVER ``KEY=``).

    Our own key pair: ``$ZBROKER_CLIENT_KEY`` (a triad with a client allow-list needs
    it), else one made for this process. None when no node's key is known (plain TCP).
    """
    from pathlib import Path

    from zbroker.clients.client import CLIENT_KEY_ENV
    from zbroker.clients.curve import ClientCurve, SecurityError, load_keypair, process_keypair
    from zbroker.clients.errors import LicensePathError
    from zbroker.clients.licpath import server_keys

    try:
        keys = server_keys("")  # those of the files on $ZBROKER_SERVER_KEYS
        for entry in entries:
            keys.update(entry.keys)
        if not any(e in keys for entry in entries for e in entry.endpoints):
            return None
        own = os.environ.get(CLIENT_KEY_ENV)
        pair = load_keypair(Path(own)) if own else process_keypair()
    except (LicensePathError, SecurityError) as exc:
        raise LmutilError(str(exc)) from None
    return ClientCurve(pair, keys)


def main(argv: Sequence[str] | None = None) -> None:
    """``zbroker-lmutil lmstat ...``, or ``lmstat ...`` through a symlink of that name."""
    args = list(sys.argv if argv is None else argv)
    prog = os.path.basename(args[0]) if args else "zbroker-lmutil"
    if prog == "lmstat":
        sys.exit(run_lmstat(args[1:], prog="lmstat"))
    if len(args) < 2 or args[1] in ("-h", "-help", "--help"):
        print(f"usage: {prog} lmstat [options]   (lmstat -help lists them)", file=sys.stderr)
        sys.exit(EXIT_USAGE if len(args) < 2 else 0)
    tool = args[1]
    if tool == "lmstat":
        sys.exit(run_lmstat(args[2:], prog="lmutil"))
    if tool in OTHER_TOOLS:
        instead = OTHER_TOOLS[tool]
        offer = f"use {instead}" if instead else "zbroker has no counterpart yet"
        print(f"{prog}: {tool} is not offered here (only lmstat is); {offer}", file=sys.stderr)
    else:
        print(f"{prog}: unknown tool {tool!r}; {prog} offers lmstat", file=sys.stderr)
    sys.exit(EXIT_USAGE)
