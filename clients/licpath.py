"""Turning what the application gives (or ``ZBROKER_LICENSE``) into server entries.

A license path is written like FlexLM's ``LM_LICENSE_FILE``: entries separated by
``:``, each independent and tried in order. An entry is either

- ``port@host``: one server, ``tcp://host:port``;
- ``port@h1,port@h2,port@h3``: one triad, in rank order;
- anything else: the path of a license file, whose SERVER lines name the triad.

A list of endpoints (``["tcp://127.0.0.1:27001", ...]``) is one triad, used as is.
Hosts containing ``:`` (IPv6 literals) cannot be written in a path; give endpoints.

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
from zbroker.clients.licfile import LicenseError, ServerLine, read_servers

log = logging.getLogger("zbroker.client")

ENV_VAR = "ZBROKER_LICENSE"
KEYS_ENV = "ZBROKER_SERVER_KEYS"
_PORT_AT_HOST = re.compile(r"(\d+)@([^@,:\s]+)\Z")
_ENDPOINT = re.compile(r"(tcp|ipc|inproc)://\S+\Z")

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
    """The endpoints of a license file's SERVER lines (``zbroker.clients.licfile``)."""
    servers = read_server_lines(path)
    if not servers:
        raise LicensePathError(f"license file {path} has no SERVER line")
    return tuple(s.endpoint for s in servers)


def read_server_lines(path: str) -> list[ServerLine]:
    """``read_servers``, its errors as LicensePathError (out of descriptors: unavailable)."""
    try:
        return read_servers(path)
    except LicenseError as exc:  # its messages already name file:line:column
        raise_if_out_of_descriptors(path, exc)
        raise LicensePathError(str(exc)) from exc


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
        endpoints.append(f"tcp://{match.group(2)}:{port}")
    if len(endpoints) > 3:
        raise LicensePathError(f"{text!r} names {len(endpoints)} servers; a triad has 3")
    return tuple(endpoints)


def parse_license_path(text: str, read_file: FileReader = servers_from_file) -> list[Entry]:
    """Every entry of a ``:``-separated license path, in order; empty entries are skipped."""
    entries = []
    for raw in text.split(":"):
        item = raw.strip()
        if not item:
            continue
        entries.append(parse_server_list(item) if "@" in item else read_file(item))
    if not entries:
        raise LicensePathError(f"license path {text!r} names no server")
    return entries


def resolve(
    servers: str | Sequence[str] | None, read_file: FileReader = servers_from_file
) -> list[Entry]:
    """The entries a LicenseClient uses: from a path string, an endpoint list, or the env."""
    if servers is None:
        text = os.environ.get(ENV_VAR)
        if not text:
            raise LicensePathError(f"no servers given and {ENV_VAR} is not set")
        return parse_license_path(text, read_file)
    if isinstance(servers, str):
        return parse_license_path(servers, read_file)
    endpoints = tuple(servers)
    if not 1 <= len(endpoints) <= 3:
        raise LicensePathError(f"{len(endpoints)} endpoints given; one triad has 1 to 3")
    for endpoint in endpoints:
        if not isinstance(endpoint, str) or not _ENDPOINT.match(endpoint):
            raise LicensePathError(f"{endpoint!r} is not an endpoint such as tcp://host:27001")
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


def server_keys(
    servers: str | Sequence[str] | None, given: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The CURVE public key of each server endpoint known for ``servers`` (see above)."""
    keys: dict[str, str] = {}
    for path in os.environ.get(KEYS_ENV, "").split(":"):
        if path.strip():
            try:
                keys.update(keys_from_file(path.strip()))
            except LicensePathError as exc:
                log.warning("%s names a file that gives no keys: %s", KEYS_ENV, exc)
    text = os.environ.get(ENV_VAR) if servers is None else servers
    if isinstance(text, str):
        for item in text.split(":"):
            if item.strip() and "@" not in item:
                keys.update(keys_from_file(item.strip()))
    if given:
        try:
            keys.update({e: check_key(k, f"server_keys[{e!r}]") for e, k in given.items()})
        except SecurityError as exc:
            raise LicensePathError(str(exc)) from exc
    return keys


def borrow_keys(servers: str | Sequence[str] | None) -> frozenset[str]:
    """The borrow public keys (64 hex digits, lower case) that the license files of
    ``servers`` (or ``ZBROKER_LICENSE``) and of ``ZBROKER_SERVER_KEYS`` name on their
    SERVER lines (``BORROW_KEY=``): the keys a borrow token may be signed with
    (``zbroker.clients.borrow``). A file that cannot be read gives none (logged)."""
    paths = [p.strip() for p in os.environ.get(KEYS_ENV, "").split(":") if p.strip()]
    text = os.environ.get(ENV_VAR) if servers is None else servers
    if isinstance(text, str):
        paths += [item.strip() for item in text.split(":") if item.strip() and "@" not in item]
    keys: set[str] = set()
    for path in paths:
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
