"""Turning what the application gives (or ``ZBROKER_LICENSE``) into server entries.

A license path is written like FlexLM's ``LM_LICENSE_FILE``, and read as zbroker-lmutil
reads it: entries separated by ``:`` or ``;`` (FlexNet's separator on Windows), each
independent and tried in order. An entry is either

- ``port@host``: one server, ``tcp://host:port``;
- ``port@h1,port@h2,port@h3``: one triad, in rank order;
- a directory: each of its ``*.lic`` files, in name order, as FlexNet reads one;
- anything else: the path of a license file, whose SERVER lines name the triad:
  zbroker's own (``SERVER name hostid endpoint``), or else a FlexNet one, of which only
  the SERVER lines are read (``SERVER host hostid [port]``, port 27000 when left out).

Without servers given, the path is ``ZBROKER_LICENSE``, else ``LM_LICENSE_FILE``.
A list of endpoints (``["tcp://127.0.0.1:27001", ...]``) is one triad, used as is.
Hosts containing ``:`` (IPv6 literals) cannot be written in a path; give endpoints.
Every endpoint is checked whole as it is read (``tcp://host:port``, port 1 to 65535): a
wrong one is a ``LicensePathError`` naming it, not a call that waits out its timeout.

Server keys (secure mode). A SERVER line's ``KEY=`` is its node's CURVE public key;
``server_keys`` gathers them for every endpoint the client may dial, from (lowest
precedence first) the license files named by ``ZBROKER_SERVER_KEYS`` (``:``-separated:
how endpoints given bare, or as ``port@host``, find their keys), the license files on
the path itself, and keys the application passes. An endpoint without a key is dialled
in plain TCP; ``LicenseClient(secure=True)`` refuses that instead.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from zbroker.clients.curve import SecurityError, check_key
from zbroker.clients.errors import LicensePathError, LicenseUnavailable
from zbroker.clients.licfile import (
    LicenseError,
    ServerLine,
    parse_servers,
    read_license_text,
    tcp_host_port,
)

log = logging.getLogger(__name__)  # under "zbroker.clients", which has the NullHandler

ENV_VAR = "ZBROKER_LICENSE"
PATH_ENVS = (ENV_VAR, "LM_LICENSE_FILE")  # where a path not given is read, in this order
KEYS_ENV = "ZBROKER_SERVER_KEYS"
DEFAULT_PORT = 27000  # FlexNet's, for its SERVER lines that give none
_PORT_AT_HOST = re.compile(r"(\d+)@([^@,:\s]+)\Z")
# A host name or IPv4 address (RFC 1123 labels; '_' as hosts files allow), or [IPv6].
_HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]\Z|[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})\Z")
_LOCAL = re.compile(r"(ipc|inproc)://\S+\Z")

Entry = tuple[str, ...]  # the endpoints of one server or triad, in rank order
FileReader = Callable[[str], Entry]


def raise_if_out_of_descriptors(path: str, exc: BaseException) -> None:
    """Raise LicenseUnavailable if ``exc`` means the process had no descriptor to read with.

    Then the file is not at fault, and a client must not go on without it (without
    its keys, say, dialling a secure triad in plain TCP). The license module's own
    errors keep the OSError as their context.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.EMFILE, errno.ENFILE):
            raise LicenseUnavailable(
                f"too many open files ({errno.errorcode[seen.errno]}) while reading {path}: "
                "raise ulimit -n (RLIMIT_NOFILE) or close descriptors"
            ) from exc
        seen = seen.__cause__ or seen.__context__


def servers_from_file(path: str) -> Entry:
    """The endpoints of a license file's SERVER lines: zbroker's own, else FlexNet's."""
    servers = read_server_lines(path)
    if servers:
        return tuple(s.endpoint for s in servers)
    endpoints = flexnet_servers(_read_text(path), path)
    if not endpoints:
        raise LicensePathError(f"license file {path} has no SERVER line")
    return endpoints


def read_server_lines(path: str) -> list[ServerLine]:
    """The zbroker SERVER lines of a license file; none for a FlexNet file (its SERVER
    lines are ``flexnet_servers``'). Errors as LicensePathError (out of descriptors:
    LicenseUnavailable)."""
    text = _read_text(path)
    try:
        return parse_servers(text, path=path)
    except LicenseError as exc:  # its messages already name file:line:column
        if flexnet_servers(text, path):
            return []
        raise LicensePathError(str(exc)) from exc


def _read_text(path: str) -> str:
    try:
        return read_license_text(path)
    except LicenseError as exc:
        raise_if_out_of_descriptors(path, exc)
        raise LicensePathError(str(exc)) from exc


def flexnet_servers(text: str, path: str) -> Entry:
    """The endpoints of a FlexNet license file's SERVER lines (``SERVER host hostid
    [port] ...``, port 27000 when left out), such as the one-line files Slurm sync
    scripts write to point lmstat at a server; () when it has none, or when a SERVER
    line is zbroker's own (its parser's error is the one to show)."""
    endpoints = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if len(words) < 3 or words[0].upper() != "SERVER":
            continue
        if len(words) > 3 and "://" in words[3]:
            return ()
        port = words[3] if len(words) > 3 and words[3].isdigit() else str(DEFAULT_PORT)
        endpoints.append(check_endpoint(f"tcp://{words[1]}:{port}", f"{path}:{number}"))
    return tuple(endpoints)


def check_endpoint(endpoint: object, where: str) -> str:
    """``endpoint`` if a node can be dialled there: ``tcp://host:port`` (a host name, an
    IPv4 address or a bracketed IPv6 one; port 1 to 65535), ``ipc://`` or ``inproc://``;
    else LicensePathError naming it and ``where`` it was given."""
    if isinstance(endpoint, str) and _LOCAL.match(endpoint):
        return endpoint
    try:
        if not isinstance(endpoint, str):
            raise ValueError(f"{endpoint!r} is not a string")
        host, _ = tcp_host_port(endpoint)
        if not _HOST.match(host):
            raise ValueError(f"{endpoint!r} has host {host!r}, not a host name or address")
    except ValueError as exc:
        raise LicensePathError(f"{where}: {exc} (write one as tcp://10.0.0.1:27001)") from None
    return endpoint


def parse_server_list(text: str) -> Entry:
    """``port@h1,port@h2,port@h3`` (or one ``port@host``) as endpoints."""
    endpoints = []
    for part in text.split(","):
        match = _PORT_AT_HOST.match(part.strip())
        if match is None:
            raise LicensePathError(f"{part!r} in {text!r} is not port@host")
        port = int(match.group(1))
        if not 1 <= port <= 65535:
            raise LicensePathError(f"port {port} in {text!r} is not 1..65535")
        endpoints.append(check_endpoint(f"tcp://{match.group(2)}:{port}", repr(text)))
    if len(endpoints) > 3:
        raise LicensePathError(f"{text!r} names {len(endpoints)} servers; a triad has 3")
    return tuple(endpoints)


def path_items(text: str) -> list[str]:
    """The entries of a license path as written: split at ``:`` and ``;`` (FlexNet's
    separator on Windows, which users copy), blanks dropped."""
    return [item.strip() for item in re.split(r"[:;]", text) if item.strip()]


def expand_item(item: str) -> list[str]:
    """A license file entry as files: a directory is its ``*.lic`` files, in name order."""
    if not os.path.isdir(item):
        return [item]
    try:
        names = sorted(n for n in os.listdir(item) if n.endswith(".lic"))
    except OSError as exc:
        raise_if_out_of_descriptors(item, exc)
        raise LicensePathError(f"{item}: cannot list the directory: {exc.strerror}") from None
    if not names:
        raise LicensePathError(f"{item}: a directory with no *.lic license file")
    return [os.path.join(item, n) for n in names]


def license_files(text: str) -> list[str]:
    """The license files a path names (directories expanded), in order."""
    return [f for item in path_items(text) if "@" not in item for f in expand_item(item)]


def parse_license_path(text: str, read_file: FileReader = servers_from_file) -> list[Entry]:
    """Every entry of a license path (see above), in order; empty entries are skipped."""
    if "://" in text:  # split at its ':' it would name files 'tcp' and '//host'
        raise LicensePathError(
            f"{text!r}: a license path writes a server as port@host (27001@h1); give "
            'endpoints such as tcp://h1:27001 as a list: ["tcp://h1:27001", ...]'
        )
    entries = []
    for item in path_items(text):
        if "@" in item:
            entries.append(parse_server_list(item))
        else:
            entries += [read_file(f) for f in expand_item(item)]
    if not entries:
        raise LicensePathError(f"license path {text!r} names no server")
    return entries


def path_from_env() -> str | None:
    """The license path of the environment: the first of ``PATH_ENVS`` that is set."""
    return next((os.environ[n] for n in PATH_ENVS if os.environ.get(n)), None)


def resolve(
    servers: str | os.PathLike[str] | Sequence[str] | None,
    read_file: FileReader = servers_from_file,
) -> list[Entry]:
    """The entries a LicenseClient uses: from a path string (or a path object: one file
    or directory), an endpoint list, or the environment."""
    if servers is None:
        text = path_from_env()
        if not text:
            raise LicensePathError(f"no servers given and neither {' nor '.join(PATH_ENVS)} is set")
        return parse_license_path(text, read_file)
    if isinstance(servers, os.PathLike):
        return [read_file(f) for f in expand_item(os.fspath(servers))]
    if isinstance(servers, str):
        return parse_license_path(servers, read_file)
    try:
        if isinstance(servers, (bytes, bytearray)):
            raise TypeError  # iterable, but of ints: not endpoints
        endpoints = tuple(servers)
    except TypeError:
        raise LicensePathError(
            "servers must be a license path (a str or a path object) or a list of endpoints, "
            f"not {type(servers).__name__}"
        ) from None
    if not 1 <= len(endpoints) <= 3:
        raise LicensePathError(f"{len(endpoints)} endpoints given; one triad has 1 to 3")
    for endpoint in endpoints:
        check_endpoint(endpoint, "servers")
    return [endpoints]


def keys_from_file(path: str) -> dict[str, str]:
    """``{endpoint: key}`` of the SERVER lines of a license file that carry ``KEY=``."""
    return keys_of(read_server_lines(path), path)


def keys_of(servers: Iterable[ServerLine], path: str) -> dict[str, str]:
    """``{endpoint: key}`` of those of ``servers`` (read from ``path``) that carry ``KEY=``.

    The one reading of ``KEY=``, for callers that read the file's SERVER lines already.
    """
    try:
        return {
            s.endpoint: check_key(s.attrs["KEY"], f"{path}:{s.line}: SERVER {s.name} KEY=")
            for s in servers
            if "KEY" in s.attrs
        }
    except SecurityError as exc:
        raise LicensePathError(str(exc)) from exc


def _path_files(servers: str | os.PathLike[str] | Sequence[str] | None) -> list[str]:
    """The license files of ``servers`` (or of the environment's path): none for a list
    of endpoints; a file that is missing or unreadable is the caller's to report."""
    text = path_from_env() if servers is None else servers
    if isinstance(text, os.PathLike):
        text = os.fspath(text)
    if not isinstance(text, str):
        return []
    try:
        return license_files(text)
    except LicensePathError:  # resolve reports it; nothing to read keys from
        return []


def server_keys(
    servers: str | os.PathLike[str] | Sequence[str] | None,
    given: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The CURVE public key of each server endpoint known for ``servers`` (see above)."""
    keys: dict[str, str] = {}
    for path in path_items(os.environ.get(KEYS_ENV, "")):
        try:
            keys.update(keys_from_file(path))
        except LicensePathError as exc:
            log.warning("%s names a file that gives no keys: %s", KEYS_ENV, exc)
    for path in _path_files(servers):
        keys.update(keys_from_file(path))
    if given:
        try:
            keys.update({e: check_key(k, f"server_keys[{e!r}]") for e, k in given.items()})
        except SecurityError as exc:
            raise LicensePathError(str(exc)) from exc
    return keys


def borrow_keys(servers: str | os.PathLike[str] | Sequence[str] | None) -> frozenset[str]:
    """The borrow public keys (64 hex digits, lower case) that the license files of
    ``servers`` (or ``ZBROKER_LICENSE``) and of ``ZBROKER_SERVER_KEYS`` name on their
    SERVER lines (``BORROW_KEY=``): the keys a borrow token may be signed with
    (``zbroker.clients.borrow``). A file that cannot be read gives none (logged)."""
    keys: set[str] = set()
    for path in path_items(os.environ.get(KEYS_ENV, "")) + _path_files(servers):
        try:
            lines = read_server_lines(path)
        except LicensePathError as exc:
            log.warning("no borrow keys from %s: %s", path, exc)
            continue
        for s in lines:
            key = s.attrs.get("BORROW_KEY", "").lower()
            if _BORROW_KEY.match(key):
                keys.add(key)
            elif key:
                log.warning("%s:%d: BORROW_KEY= is not 64 hex digits: ignored", path, s.line)
    return frozenset(keys)


_BORROW_KEY = re.compile(r"[0-9a-f]{64}\Z")
