"""FlexNet's ``lmutil lmstat`` text, made from a triad's status (issue 14).

Schedulers and monitors that sites already run (IBM LSF License Scheduler, Slurm sync
scripts, the Prometheus FlexLM exporter, phpLicenseWatcher) read lmstat's text with
regular expressions. This module is what they read: ``parse_args`` takes lmstat's
options, ``render`` turns a status (``zbroker.broker.status.query_nodes``) into lmstat's layout
line for line, ``render_info`` the ``-i`` listing. ``zbroker.broker.lmutil`` is the shell that
asks the nodes and prints; this module is pure (text and values in, text out; the
caller passes the time and the local time zone it prints in).

The layout follows FlexNet 11's, as its administration guide and the outputs that
public parsers were written against show it (docs/integration.md names them):

- the banner, ``Flexible License Manager status on Mon 11/30/2026 9:05``;
- per license-path entry: ``License server status: 27001@h1,27002@h2,27003@h3``, one
  ``h1: license server UP (MASTER) v11.19.0`` line per node (``UP`` for a node that
  answers but is not the primary, FlexNet's ``Cannot connect`` message for one that
  does not), the vendor daemon (``UP`` while a primary serves, else ``DOWN``);
- ``Users of F:  (Total of N licenses issued;  Total of M licenses in use)`` per
  feature (``license`` when the number is 1, as FlexNet writes it), then, for a
  feature in use, per pool ``"F" v2.0, vendor: V, expiry: 31-dec-2027`` and
  ``floating license``, reservations (``\\tN RESERVATIONs for GROUP g (h/port)``), one
  line per holder (``user host display (v2.0) (h/port grant), start Mon 11/30 9:05``
  with ``, N licenses`` past one seat and ``  (linger: LEFT / LINGER)`` while a seat
  lingers), and queued requests (``... (h/port handle) queued for N licenses``);
- for ``-f F`` of a feature the triad does not serve, FlexNet's error where the totals
  would be: ``Users of F:  (Error: No such feature exists. (-5) (zbroker: it serves
  cad, viewer))``; and for an entry none of whose nodes answered, the server block
  (each node ``Cannot connect``) even with ``-f`` and ``-S``, which leave it out otherwise.

Reservations, lingering and borrowed seats and the queue's entries are printed when the
status carries them: a feature's ``reservations`` (the seats each RESERVE line still
keeps from others, its ``unused``: a filled one is not printed), a holder's ``hold``
and ``until`` (FlexNet prints lingering and borrowed seats alike, ``(linger: LEFT /
ALL)``) and a feature's ``queue``. A node lists the queue (its first waiters:
docs/protocol.md) with the holders, so ``-a`` shows it; the vendor is the license
file's, else the status's.

Text from clients (user, host, display) is printed as one word each: a control
character becomes ``?``, a space ``_``, an empty field ``-``. A client must not be able
to forge a line, or a part of one, that a scheduler would believe
(``\\nUsers of cad:  (Total of 99 licenses issued; ...``).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from zbroker.clients.licfile import tcp_host_port

# The lmgrd version whose lmstat layout this reproduces; parsers match ``v[\d.]+``.
COMPAT_VERSION = "v11.19.0"
DEFAULT_TIMEOUT = 3.0  # seconds to wait for each node (lmstat -t changes it)
DEFAULT_PORT = 27000  # FlexNet's default port, for SERVER lines that give none
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
# FlexNet writes a permanent line's expiry as the date 1-jan-0; parsers know it.
PERMANENT = "1-jan-0"

USAGE = """\
usage: lmstat [-a] [-A] [-asec] [-c license_path] [-f [feature]] [-i [feature]]
              [-s [server]] [-S [vendor]] [-t timeout] [--no-user-info] [-v] [-help]
  -a                display everything
  -asec             display everything, start times in HH:MM:SS
  -A                list all active licenses
  -c license_path   port@host, port@h1,port@h2,port@h3 (a triad) or a license file;
                    several separated by ':' or ';' (default $ZBROKER_LICENSE, then
                    $LM_LICENSE_FILE)
  -f [feature]      users of that (or every) feature
  -i [feature]      the license's lines of that (or every) feature, with their expiry
  -s [server]       status of the license servers (of that host only)
  -S [vendor]       users of the features of that (or every) vendor
  -t timeout        seconds to wait for each server (default 3)
  --no-user-info    totals only, no line per user
  -v                version
  -lm, -vd, -old, -proj, -verbose: accepted and ignored (zbroker has one kind of
                    server, and its status does not list the project of a holder)"""


class LmstatUsage(ValueError):
    """The options cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Options:
    """What lmstat was asked for."""

    license_path: str | None = None  # -c
    features: bool = False  # list features at all (-a, -A, -f, -S)
    servers: bool = True  # the server status block (not with -f, -S or -i)
    users: bool = True  # one line per holder (off with --no-user-info)
    feature: str | None = None  # -f F / -i F: only this feature
    vendor: str | None = None  # -S V: only this vendor's features
    server: str | None = None  # -s H: only this host's server lines
    active: bool = False  # -A: only features in use
    seconds: bool = False  # -asec: start times with seconds
    info: bool = False  # -i: the expiry listing
    version: bool = False  # -v
    help: bool = False  # -help
    timeout: float = DEFAULT_TIMEOUT


_IGNORED = {"-lm", "-vd", "-old", "-proj", "-verbose"}
_OPTIONAL = {"-f", "-i", "-s", "-S"}  # flags whose value may be left out


def parse_args(argv: Sequence[str], max_timeout: float) -> Options:
    """lmstat's options, as ``lmutil lmstat`` takes them (``-c path`` or ``-cpath``)."""
    fields: dict[str, Any] = {}
    args = list(argv)
    i = 0

    def value(flag: str) -> str | None:
        nonlocal i
        if flag in _OPTIONAL:
            if i + 1 < len(args) and not args[i + 1].startswith("-"):
                i += 1
                return args[i]
            return None
        if i + 1 >= len(args):
            raise LmstatUsage(f"{flag} needs a value\n{USAGE}")
        i += 1
        return args[i]

    while i < len(args):
        arg = args[i]
        if arg == "-a":
            fields |= {"features": True}
        elif arg == "-asec":
            fields |= {"features": True, "seconds": True}
        elif arg == "-A":
            fields |= {"features": True, "active": True}
        elif arg == "-c" or (arg.startswith("-c") and len(arg) > 2):
            fields["license_path"] = arg[2:] if len(arg) > 2 else value(arg)
        elif arg == "-f":
            fields |= {"features": True, "servers": False, "feature": value(arg)}
        elif arg == "-S":
            fields |= {"features": True, "servers": False, "vendor": value(arg)}
        elif arg == "-i":
            fields |= {"info": True, "feature": value(arg)}
        elif arg == "-s":
            fields["server"] = value(arg)
        elif arg == "-t":
            fields["timeout"] = _timeout(value(arg), max_timeout)
        elif arg == "--no-user-info":
            fields["users"] = False
        elif arg == "-v":
            fields["version"] = True
        elif arg in ("-help", "-h", "--help"):
            fields["help"] = True
        elif arg not in _IGNORED:
            raise LmstatUsage(f"unknown option {arg!r}\n{USAGE}")
        i += 1
    return Options(**fields)


def _timeout(text: str | None, max_timeout: float) -> float:
    try:
        seconds = float(text or "")
    except ValueError:
        raise LmstatUsage(f"-t {text!r}: expected a number of seconds") from None
    if not 0 < seconds <= max_timeout:  # also refuses nan
        raise LmstatUsage(f"-t {text}: expected seconds above 0 and at most {max_timeout:g}")
    return seconds


# --- the parts of an entry -------------------------------------------------------------


@dataclass(frozen=True)
class LicenseLine:
    """A FEATURE/INCREMENT line of a license file, for ``-i`` and the vendor names."""

    feature: str
    version: str
    count: int
    expires: datetime.date | None  # None: permanent
    vendor: str


@dataclass(frozen=True)
class Entry:
    """One entry of the license path: a server or triad, and its license file if given."""

    endpoints: tuple[str, ...]  # tcp://host:port, in rank order
    license_file: str | None = None
    own_file: bool = False  # license_file is zbroker's own: its lines were read
    lines: tuple[LicenseLine, ...] = ()  # of that file
    keys: tuple[tuple[str, str], ...] = ()  # (endpoint, CURVE key) of its SERVER lines' KEY=

    def vendor_of(self, feature: str, default: str) -> str:
        return next((ln.vendor for ln in self.lines if ln.feature == feature), default)


def host_port(endpoint: str) -> tuple[str, int]:
    """``(host, port)`` of ``tcp://host:port`` (others: the whole endpoint and port 0)."""
    try:
        return tcp_host_port(endpoint)
    except ValueError:
        return endpoint, 0


def flexnet_servers(text: str) -> tuple[str, ...]:
    """The endpoints of FlexNet SERVER lines (``SERVER host hostid [port] ...``).

    For license files written for FlexNet's own lmstat, such as the one-line
    ``SERVER host 0123456789AB 27000`` files that Slurm sync scripts write to point
    lmstat at a server; zbroker's own files are ``zbroker.broker.license``'s to read.
    """
    endpoints = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[0].upper() != "SERVER":
            continue
        if len(words) > 3 and "://" in words[3]:
            return ()  # zbroker's own SERVER line: its parser's error is the one to show
        port = int(words[3]) if len(words) > 3 and words[3].isdigit() else DEFAULT_PORT
        endpoints.append(f"tcp://{words[1]}:{port}")
    return tuple(endpoints)


# --- rendering -------------------------------------------------------------------------


def banner(prog: str, version: str) -> str:
    return (
        f"{prog} - Copyright (c) 2026 the zbroker authors. "
        f"zbroker {version}, answering as FlexNet lmstat."
    )


def version_lines(prog: str, version: str) -> list[str]:
    """``-v``: the line the FlexLM exporter reads (``lmstat v11 build N arch``)."""
    return [banner(prog, version), f"lmstat {COMPAT_VERSION} build 0 x64_lsb (zbroker {version})"]


def status_date(now: datetime.datetime) -> str:
    """``Mon 11/30/2026 9:05``, as lmstat dates its status (the local time)."""
    return f"{_DAYS[now.weekday()]} {now.month}/{now.day}/{now.year} {now.hour}:{now.minute:02d}"


def start_time(when: datetime.datetime, seconds: bool = False) -> str:
    """``Mon 11/30 9:05`` (with ``:SS`` for -asec), a holder's checkout time."""
    clock = f"{when.hour}:{when.minute:02d}" + (f":{when.second:02d}" if seconds else "")
    return f"{_DAYS[when.weekday()]} {when.month}/{when.day} {clock}"


def expiry(date: datetime.date | None) -> str:
    """``31-dec-2027``; ``1-jan-0`` for permanent, as FlexNet writes it."""
    return PERMANENT if date is None else f"{date.day}-{_MONTHS[date.month - 1]}-{date.year}"


def _iso_expiry(text: str | None) -> str:
    try:
        return expiry(None if text is None else datetime.date.fromisoformat(text))
    except (TypeError, ValueError):  # not a date: shown as the node gave it
        return clean(text)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def clean(text: Any) -> str:
    """A client's text as one word: ``?`` for a control character, ``_`` for a space.

    Parsers split holder lines on spaces and some match ``Users of F: (Total of ...``
    anywhere in a line; a user named ``x Users of cad:  (Total of 99 ...`` must not be
    read as a feature's totals.
    """
    out = "".join(("_" if c.isspace() else c) if c.isprintable() else "?" for c in str(text))
    return out or "-"


@dataclass(frozen=True)
class Clock:
    """What ``render`` needs to print times: now, and the zone to print them in."""

    now: float  # Unix time
    zone: datetime.tzinfo | None = None  # None: the local time zone

    def local(self, unix: float) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(unix, self.zone)


def render(
    prog: str,
    version: str,
    entries: Sequence[tuple[Entry, dict[str, Any]]],
    opts: Options,
    clock: Clock,
) -> str:
    """lmstat's text for each entry and its status (``query_nodes``'s dict)."""
    lines = [
        banner(prog, version),
        f"Flexible License Manager status on {status_date(clock.local(clock.now))}",
    ]
    for entry, status in entries:
        lines.append("")
        # -f and -S leave the server block out, but for servers that did not answer it
        # is all there is to say: without it, the reader sees no users and no reason.
        if opts.servers or not _answered(status):
            lines += _servers(entry, status, opts)
        if opts.features and _answered(status):
            lines += _features(entry, status, opts, clock)
    return "\n".join(lines) + "\n"


def _answered(status: dict[str, Any]) -> bool:
    return any(n["role"] != "down" for n in status["nodes"])


def unknown_feature(entries: Sequence[tuple[Entry, dict[str, Any]]], opts: Options) -> bool:
    """``-f F`` of a feature that no server that answered serves (a typo, most often)."""
    if opts.feature is None or not opts.features:
        return False
    answered = [status for _, status in entries if _answered(status)]
    return bool(answered) and not any(_serves_feature(s, opts.feature) for s in answered)


def _serves_feature(status: dict[str, Any], name: str) -> bool:
    return any(f["name"] == name for f in status["features"])


def _serves(node: dict[str, Any]) -> bool:
    """A primary that grants now (one that lost its quorum answers "unavailable")."""
    return node["role"] == "primary" and bool(node.get("serving", True))


def _master(status: dict[str, Any]) -> tuple[str, int] | None:
    """Host and port of the serving primary, as the nodes were asked; None if none."""
    for node in status["nodes"]:
        if _serves(node):
            return host_port(node["endpoint"])
    return None


def _servers(entry: Entry, status: dict[str, Any], opts: Options) -> list[str]:
    hosts = [host_port(e) for e in entry.endpoints]
    lines = ["License server status: " + ",".join(f"{port}@{host}" for host, port in hosts)]
    master = _master(status)
    where = master[0] if master is not None else hosts[0][0]
    if entry.license_file is not None:
        lines.append(f"    License file(s) on {where}: {entry.license_file}:")
    lines.append("")
    for node in status["nodes"]:
        host, _ = host_port(node["endpoint"])
        if opts.server is not None and host != opts.server:
            continue
        if node["role"] == "down":
            lines.append(
                f"{host}: Cannot connect to license server system. "
                f"(zbroker: no answer within {opts.timeout:g} s)"
            )
        elif _serves(node):
            lines.append(f"{host}: license server UP (MASTER) {COMPAT_VERSION}")
        else:
            lines.append(f"{host}: license server UP {COMPAT_VERSION}")
    lines.append("")
    lines.append(f"Vendor daemon status (on {where}):")
    lines.append("")
    state = "UP" if master is not None else "DOWN"
    for vendor in _vendors(entry, status):
        lines.append(f"    {vendor}: {state} {COMPAT_VERSION}")
    return lines


def _vendors(entry: Entry, status: dict[str, Any]) -> list[str]:
    names = {entry.vendor_of(f["name"], _vendor_default(f)) for f in status["features"]}
    return sorted(names) or [entry.lines[0].vendor if entry.lines else "zbroker"]


def _vendor_default(feature: dict[str, Any]) -> str:
    # A status that names the vendor wins; else the vendor daemon is zbroker itself.
    return str(feature.get("vendor") or "zbroker")


def _features(entry: Entry, status: dict[str, Any], opts: Options, clock: Clock) -> list[str]:
    master = _master(status) or host_port(entry.endpoints[0])
    lines: list[str] = []
    if opts.vendor is not None or not opts.servers:
        lines.append(
            "Users of features served by "
            + (opts.vendor or ", ".join(_vendors(entry, status)))
            + ":"
        )
    else:
        lines.append("Feature usage info:")
    lines.append("")
    for feature in status["features"]:
        name = feature["name"]
        vendor = entry.vendor_of(name, _vendor_default(feature))
        if opts.feature is not None and name != opts.feature:
            continue
        if opts.vendor is not None and vendor != opts.vendor:
            continue
        if opts.active and not feature["in_use"]:
            continue
        lines += _feature(feature, vendor, master, opts, clock)
    if opts.feature is not None and not _serves_feature(status, opts.feature):
        lines += _no_such_feature(opts.feature, status)
    return lines


# FlexNet's words for error -5 (LM_NOFEATURE), in the place lmstat prints a feature's
# totals; parsers that read totals do not match it (no "Total of").
NO_SUCH_FEATURE = "No such feature exists. (-5)"
_NAMED_AT_MOST = 10  # features named in the error; a site's license may have hundreds


def _no_such_feature(name: str, status: dict[str, Any]) -> list[str]:
    served = sorted(clean(f["name"]) for f in status["features"])
    shown = ", ".join(served[:_NAMED_AT_MOST])
    if len(served) > _NAMED_AT_MOST:
        shown += f" and {len(served) - _NAMED_AT_MOST} more"
    why = f"it serves {shown}" if served else "it serves no feature"
    return [f"Users of {clean(name)}:  (Error: {NO_SUCH_FEATURE} (zbroker: {why}))", ""]


def _feature(
    feature: dict[str, Any],
    vendor: str,
    master: tuple[str, int],
    opts: Options,
    clock: Clock,
) -> list[str]:
    name = clean(feature["name"])
    lines = [
        f"Users of {name}:  (Total of {_plural(feature['total'], 'license')} issued;  "
        f"Total of {_plural(feature['in_use'], 'license')} in use)",
        "",
    ]
    holders = list(feature.get("holders", ())) if opts.users else []
    queue = list(feature.get("queue", ())) if opts.users else []
    reservations = [r for r in feature.get("reservations", ()) if _unused(r) > 0]
    if not (feature["in_use"] or holders or queue or reservations):
        return lines
    where = f"{master[0]}/{master[1]}"
    pools = list(feature.get("versions", ())) or [
        {"version": h["version"], "expires": None} for h in holders[:1]
    ]
    shown = [
        p for p in pools if p.get("in_use") or any(h["version"] == p["version"] for h in holders)
    ] or pools[:1]
    versions = {p["version"] for p in shown}
    for n, pool in enumerate(shown):
        lines.append(
            f'  "{name}" v{pool["version"]}, vendor: {clean(vendor)}, '
            f"expiry: {_iso_expiry(pool.get('expires'))}"
        )
        lines.append("  floating license")
        lines.append("")
        if n == 0:  # reservations and the queue are the feature's, not a pool's
            lines += [_reservation(r, where) for r in reservations]
        lines += [
            _holder(h, where, opts, clock)
            for h in holders
            # a holder of a pool the status does not list goes under the first
            if h["version"] == pool["version"] or (n == 0 and h["version"] not in versions)
        ]
        if n == 0:
            lines += [_queued(q, where, pool["version"]) for q in queue]
        lines.append("")
    return lines


def _who(entry: dict[str, Any]) -> str:
    return f"{clean(entry['user'])} {clean(entry['host'])} {clean(entry['display'])}"


def _holder(h: dict[str, Any], where: str, opts: Options, clock: Clock) -> str:
    line = (
        f"    {_who(h)} (v{clean(h['version'])}) ({where} {h['grant']}), "
        f"start {start_time(clock.local(h['since']), opts.seconds)}"
    )
    if h["count"] > 1:
        line += f", {h['count']} licenses"
    held = _held_on(h, clock.now)
    if held is not None:
        line += f"  (linger: {held[0]} / {held[1]})"
    return line


def _held_on(h: dict[str, Any], now: float) -> tuple[int, int] | None:
    """(seconds left, seconds in all) of a seat held past its checkin; None if not held.

    A hold (``hold``: a lingering or borrowed seat, until the wall time ``until``) is
    printed as FlexNet prints both, ``(linger: LEFT / ALL)``; ALL is the holder's
    ``linger`` when the status gives it, else the time from checkout to ``until`` (a
    borrow's whole period). A status of an older shape gives ``linger``/``lingering``.
    """
    until = h.get("until")
    if h.get("hold") and isinstance(until, int | float):
        left = max(0, int(until - now))
        every = h.get("linger") or until - float(h["since"])
        return left, max(left, int(every))
    if h.get("linger") is not None:
        return int(h.get("lingering") or 0), int(h["linger"])
    return None


def _queued(q: dict[str, Any], where: str, pool: str) -> str:
    """A waiter's line: the version it asked for, else the pool's it is listed under (the
    place FlexNet always has one); its handle never a bare number, which would read as a
    grant id to ``zbroker remove --grant`` (an older node sent the request's number)."""
    handle = q["handle"]
    handle = clean(handle) if isinstance(handle, str) else f"q{handle}"
    return (
        f"    {_who(q)} (v{clean(q.get('version') or pool)}) ({where} {handle}) "
        f"queued for {_plural(q['count'], 'license')}"
    )


def _reservation(r: dict[str, Any], where: str) -> str:
    # The seats a reservation still keeps from others: those its principals hold are on
    # their own user lines already (and counted in use).
    return f"\t{_unused(r)} RESERVATIONs for {r['kind']} {clean(r['name'])} ({where})"


def _unused(r: dict[str, Any]) -> int:
    return int(r.get("unused", r["count"]))


# --- -i --------------------------------------------------------------------------------

_INFO_NOTE = [
    "NOTE: lmstat -i does not give information from the server,",
    "      but only reads the license file.  For this reason,",
    "      lmstat -a is recommended instead.",
]


def render_info(prog: str, version: str, rows: Iterable[LicenseLine], feature: str | None) -> str:
    """``-i``: one row per line of the license (or pool of the triad), FlexNet's columns."""
    lines = [banner(prog, version), "", *_INFO_NOTE, ""]
    lines.append(_info_row("Feature", "Version", "#licenses", "Expires", "Vendor", header=True))
    lines.append(
        _info_row("_______", "_________", "_________", "__________", "______", header=True)
    )
    for row in rows:
        if feature is None or row.feature == feature:
            lines.append(
                _info_row(
                    clean(row.feature),
                    row.version,
                    str(row.count),
                    expiry(row.expires),
                    clean(row.vendor),
                )
            )
    return "\n".join(lines) + "\n"


def _info_row(
    feature: str, version: str, count: str, expires: str, vendor: str, *, header: bool = False
) -> str:
    # FlexNet's widths: the values sit one column right of their headings.
    widths = (32, 12, 13, 13) if header else (32, 13, 12, 13)
    cells = (feature, version, count, expires)
    return "".join(c.ljust(w - 1) + " " for c, w in zip(cells, widths, strict=True)) + vendor


def info_rows(entry: Entry, status: dict[str, Any] | None) -> list[LicenseLine]:
    """The rows of ``-i``: the license file's lines, else the triad's pools."""
    if entry.own_file:
        return list(entry.lines)
    rows = []
    for f in (status or {}).get("features", ()):
        for pool in f.get("versions", ()):
            expires = pool.get("expires")
            rows.append(
                LicenseLine(
                    feature=f["name"],
                    version=pool["version"],
                    count=pool["total"],
                    expires=None if expires is None else datetime.date.fromisoformat(expires),
                    vendor=_vendor_default(f),
                )
            )
    return rows
