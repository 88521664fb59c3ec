"""The license file's layout and its SERVER lines: what a client reads of a license.

A client given a license file (``port@host`` paths aside, ``zbroker.clients.licpath``) dials the
nodes its SERVER lines name, with the CURVE key each one's ``KEY=`` gives. This module
reads that, and is also the node's reading of the same lines (``zbroker.broker.license`` builds
the VENDOR and FEATURE/INCREMENT lines and their signatures on it), so that a file reads
the same to both. It lives in the library because the library must not import the node.

Layout. The file is UTF-8 text (at most ``MAX_LICENSE_BYTES``) read as *logical lines*:

- a physical line whose last non-blank character is ``\\`` continues on the next
  physical line (the backslash counts as a space); a logical line is its physical
  lines joined;
- a physical line whose first non-blank character is ``#`` is a comment, but only at
  the start of a logical line (there are no trailing comments, and Z85 keys contain
  ``#``); blank lines are ignored;
- words are separated by spaces or tabs; keywords are case-insensitive, and so are
  attribute keys (``key=`` is ``KEY=``). Values contain no spaces (there is no quoting).

``SERVER name hostid endpoint [KEY=value ...]``: one node, in rank order (the first
outranks the others); there must be 1 (a single server) or 3 (a triad). The hostid is
``ANY`` or any word; the endpoint is ``tcp://host:port`` (port 1 to 65535),
``ipc://path`` or ``inproc://name``; names and endpoints are each used once.

Errors. Anything malformed raises ``LicenseSyntaxError`` naming the file, the 1-based
physical line and column of the offending word, what was expected and what was found.
``read_servers`` checks the SERVER lines only: the rest of the file is the node's to
judge (``zbroker.broker.license.parse_syntax``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_WORD = re.compile(r"\S+")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")  # a server, vendor or feature name
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FLAG = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")
_ENDPOINT = re.compile(
    r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):([0-9]{1,5})\Z|(ipc|inproc)://\S+\Z"
)
KEYWORDS = "a keyword (SERVER, VENDOR, FEATURE or INCREMENT)"
# Bounds on the whole file, so that its reload delta is one peer message of a few MB
# (the peer socket takes 256 MiB) that packs in milliseconds.
MAX_LICENSE_BYTES = 16 * 1024 * 1024
_PORTS = "a TCP port from 1 to 65535"
_SERVER_COUNT = "1 SERVER line (a single server) or 3 (a triad)"


# --- errors ----------------------------------------------------------------------------


class LicenseError(Exception):
    """Root of every error about license files and vendor keys.

    Not the client library's root error (``zbroker.clients.errors.LicenseError``, which a call
    to a triad raises): this one says a file is wrong, and ``zbroker.clients.licpath`` hands it to
    the application as a ``LicensePathError``. The node's signing and parsing errors
    (``zbroker.broker.signing``, ``zbroker.broker.license``) are subclasses of it.
    """


class LicenseSyntaxError(LicenseError):
    """A malformed license file: ``path:line:column: expected X, found Y``."""

    def __init__(self, path: str, line: int, column: int, expected: str, found: str) -> None:
        self.path = path
        self.line = line  # 1-based physical line
        self.column = column  # 1-based character column within that line
        self.expected = expected
        self.found = found  # a quoted word, or a description such as "end of line"
        super().__init__(f"{path}:{line}:{column}: expected {expected}, found {found}")


class LicenseFileError(LicenseError):
    """A license file that cannot be read at all."""

    def __init__(self, path: str, why: str) -> None:
        self.path = path
        self.why = why
        super().__init__(f"{path}: {why}")


# --- values ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerLine:
    """One node of the triad (or the single server), in rank order in the file."""

    name: str
    hostid: str  # "ANY" (normalised) or a host identifier as written
    endpoint: str
    attrs: dict[str, str]  # keys upper case
    line: int


# --- lexing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Word:
    text: str
    line: int
    column: int

    @property
    def end(self) -> int:
        return self.column + len(self.text)


def logical_lines(text: str) -> Iterator[tuple[list[Word], int]]:
    """Each logical line as its words (with physical positions) and its last line."""
    words: list[Word] = []
    continuing = False
    number = 0
    for number, row in enumerate(text.split("\n"), start=1):
        body = row.rstrip()
        if not continuing and body.lstrip().startswith("#"):
            continue
        continuing = body.endswith("\\")
        if continuing:
            body = body[:-1]
        words += [Word(m.group(), number, m.start() + 1) for m in _WORD.finditer(body)]
        if not continuing:
            if words:
                yield words, number
            words = []
    if words:  # a backslash on the very last line continues into nothing
        yield words, number


class Cursor:
    """Reads the words of one logical line left to right, raising positioned errors."""

    def __init__(self, path: str, words: list[Word]) -> None:
        self.path = path
        self.words = words
        self.index = 0

    def take(self, expected: str, pattern: re.Pattern[str] | None = None) -> Word:
        if self.index >= len(self.words):
            last = self.words[-1]
            raise LicenseSyntaxError(self.path, last.line, last.end, expected, "end of line")
        word = self.words[self.index]
        self.index += 1
        if pattern is not None and not pattern.match(word.text):
            raise self.error(word, expected)
        return word

    def rest(self) -> list[Word]:
        words = self.words[self.index :]
        self.index = len(self.words)
        return words

    def error(self, word: Word, expected: str) -> LicenseSyntaxError:
        # A line-long word (a count of 5,000 digits) would bury the message: show its start.
        found = repr(word.text) if len(word.text) <= 60 else f"{word.text[:40]!r}..."
        return LicenseSyntaxError(self.path, word.line, word.column, expected, found)


# --- SERVER lines ----------------------------------------------------------------------


def extras(
    cur: Cursor, *, flags_allowed: bool
) -> tuple[dict[str, str], dict[str, Word], list[str]]:
    """The trailing KEY=value attributes (keys upper-cased) and flags of a line."""
    attrs: dict[str, str] = {}
    where: dict[str, Word] = {}
    flags: list[str] = []
    expected = "a KEY=value attribute or a flag" if flags_allowed else "a KEY=value attribute"
    for word in cur.rest():
        key, eq, value = word.text.partition("=")
        if not eq:
            if not flags_allowed or not _FLAG.match(word.text):
                raise cur.error(word, expected)
            if word.text in flags:
                raise cur.error(word, f"each flag at most once ({word.text} is already set)")
            flags.append(word.text)
            continue
        if not _KEY.match(key):
            raise cur.error(word, expected)
        if not value:
            raise cur.error(word, f"a value after {key}=")
        key = key.upper()
        if key in where:
            first = where[key]
            raise cur.error(
                word, f"each attribute at most once ({key}= is on {first.line}:{first.column})"
            )
        if key in ("USERS", "HOSTS") and "" in value.split(","):
            raise cur.error(word, f"a comma-separated list of names after {key}=")
        attrs[key] = value
        where[key] = word
    return attrs, where, flags


def parse_server(cur: Cursor, keyword: Word) -> tuple[ServerLine, Word, Word]:
    """The SERVER line after ``keyword``, and the words of its name and endpoint."""
    name = cur.take("a server name", NAME)
    hostid = cur.take("a host id (ANY or a host identifier)")
    if "://" in hostid.text or "=" in hostid.text:
        raise cur.error(hostid, "a host id (ANY or a host identifier) before the endpoint")
    endpoint = cur.take("an endpoint such as tcp://127.0.0.1:27001", _ENDPOINT)
    if endpoint.text.startswith("tcp://"):
        try:
            tcp_host_port(endpoint.text)
        except ValueError:
            raise cur.error(endpoint, _PORTS) from None
    attrs, _, _ = extras(cur, flags_allowed=False)
    hostid_text = "ANY" if hostid.text.upper() == "ANY" else hostid.text
    return ServerLine(name.text, hostid_text, endpoint.text, attrs, keyword.line), name, endpoint


def tcp_host_port(endpoint: str) -> tuple[str, int]:
    """``(host, port)`` of ``tcp://host:port``; ValueError saying what is wrong.

    The one reading of a TCP endpoint, for SERVER lines and the config's endpoints alike.
    """
    match = _ENDPOINT.match(endpoint)
    if match is None or match.group(1) is None:
        raise ValueError(f"{endpoint!r} is not an endpoint tcp://host:port")
    port = int(match.group(2))  # at most 5 digits: the pattern says so
    if not 1 <= port <= 65535:
        raise ValueError(f"{endpoint!r} has port {port}; expected {_PORTS}")
    return match.group(1), port


class Servers:
    """The SERVER lines of one file as they are read, checked as a set when done."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._read: list[tuple[ServerLine, Word]] = []

    def add(self, cur: Cursor, keyword: Word) -> None:
        """Read the SERVER line ``cur`` is on (after its ``keyword``)."""
        server, name, endpoint = parse_server(cur, keyword)
        if len(self._read) == 3:
            raise cur.error(keyword, "at most 3 SERVER lines (a triad)")
        for other, _ in self._read:
            if server.name == other.name:
                raise cur.error(name, f"a server name not already used (line {other.line})")
            if server.endpoint == other.endpoint:
                raise cur.error(endpoint, f"an endpoint not already used (line {other.line})")
        self._read.append((server, keyword))

    def done(self, *, required: bool = True) -> list[ServerLine]:
        """Every SERVER line in rank order; 1 or 3 of them (or none, unless ``required``)."""
        if len(self._read) == 2:
            second = self._read[1][1]
            raise LicenseSyntaxError(self.path, second.line, second.column, _SERVER_COUNT, "2")
        if not self._read and required:
            raise LicenseSyntaxError(self.path, 1, 1, _SERVER_COUNT, "none")
        return [server for server, _ in self._read]


def parse_servers(text: str, *, path: str) -> list[ServerLine]:
    """The SERVER lines of a license file's text; the other lines are not checked."""
    servers = Servers(path)
    for words, _ in logical_lines(text):
        cur = Cursor(path, words)
        keyword = cur.take(KEYWORDS)
        if keyword.text.upper() == "SERVER":
            servers.add(cur, keyword)
    return servers.done()


def read_license_text(path: str | Path, *, max_bytes: int = MAX_LICENSE_BYTES) -> str:
    """The text of a license file; ``LicenseFileError`` if it cannot be read or is
    larger than ``max_bytes``."""
    try:
        with Path(path).open("rb") as file:
            data = file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise LicenseFileError(str(path), f"larger than {max_bytes} bytes: not a license file")
        # utf-8-sig: editors on Windows like to start files with a byte order mark.
        return data.decode("utf-8-sig")
    except FileNotFoundError:
        raise LicenseFileError(str(path), "no such license file") from None
    except OSError as exc:
        raise LicenseFileError(str(path), f"cannot read license file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise LicenseFileError(
            str(path), f"not UTF-8 text (invalid byte at offset {exc.start})"
        ) from None


def read_servers(path: str | Path) -> list[ServerLine]:
    """The SERVER lines of a license file, in rank order."""
    return parse_servers(read_license_text(path), path=str(path))
