"""The license file's layout and its SERVER lines: what a client reads of a license.

A client given a license file (``port@host`` paths aside, ``zbroker.clients.licpath``) dials the
nodes its SERVER lines name, with the CURVE key each one's ``KEY=`` gives. This module
reads that, and is also the node's reading of the same lines (``zbroker.broker.license`` builds
the VENDOR and FEATURE/INCREMENT lines and their signatures on it), so that a file reads
the same to both. It lives in the library because the library must not import the node.

Layout. The file is UTF-8 text (at most ``MAX_LICENSE_BYTES``) read as *logical lines*:

- a physical line ends at LF, CR LF or a lone CR (files from old Macs);
- a physical line whose last non-blank character is ``\\`` continues on the next
  physical line (the backslash counts as a space); a logical line is its physical
  lines joined;
- a physical line whose first non-blank character is ``#`` is a comment, but only at
  the start of a logical line (there are no trailing comments, and Z85 keys contain
  ``#``); blank lines are ignored;
- words are separated by spaces or tabs; keywords are case-insensitive, and so are
  attribute keys (``key=`` is ``KEY=``). A value with spaces is written in double
  quotes, as FlexNet writes them (``VENDOR_STRING="site license"``; ``SIGN="..."`` may
  run over continuation lines inside its quotes): the whole value is quoted, it holds no
  ``"``, and a run of blanks inside (a continuation counts as one) reads as one space,
  leading and trailing blanks as none. An unterminated quote is an error naming its
  line and column. Quotes are read in license files only (``logical_lines(quotes=True)``).

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

import bisect
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

_WORD = re.compile(r"\S+")
_QUOTED_WORD = re.compile(r'(?:[^\s"]|"[^"]*")+')
_LINE_END = re.compile(r"(\r\n|\r|\n)")
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


class Word(NamedTuple):  # a tuple: a file makes one per word, and a tuple is made fastest
    text: str  # as written; a continuation inside double quotes reads as a space
    line: int
    column: int
    # Where the word ends (the column just past it) on its last physical line; 0: on the
    # line it starts, ``column + len(text)`` (only a quoted value spans lines).
    last_line: int = 0
    end_column: int = 0

    @property
    def end_line(self) -> int:
        return self.last_line or self.line

    @property
    def end(self) -> int:
        return self.end_column or self.column + len(self.text)


def rows(text: str) -> list[tuple[str, str]]:
    """The physical lines of ``text``, each as its body and its line end ("" for the last
    line when the text does not end with one). CR LF, LF and a lone CR (old Mac files)
    each end a line, as Python's universal newlines read them."""
    parts = _LINE_END.split(text)
    return [(parts[i], parts[i + 1] if i + 1 < len(parts) else "") for i in range(0, len(parts), 2)]


def logical_lines(
    text: str, *, path: str = "<license>", quotes: bool = False
) -> Iterator[tuple[list[Word], int]]:
    """Each logical line as its words (with physical positions) and its last line.

    ``quotes``: a double-quoted part of a word (``KEY="a b"``) holds spaces, and a
    continuation inside it reads as a space; an unterminated quote is a
    ``LicenseSyntaxError`` naming ``path`` and the quote's line and column.
    """
    segments: list[tuple[str, int]] = []  # the logical line's rows so far: (body, line)
    continuing = False
    number = 0
    for number, (row, _) in enumerate(rows(text), start=1):
        body = row.rstrip()
        if not continuing and body.lstrip().startswith("#"):
            continue
        continuing = body.endswith("\\")
        segments.append((body[:-1] if continuing else body, number))
        if not continuing:
            words = _words(segments, path, quotes)
            if words:
                yield words, number
            segments = []
    if segments:  # a backslash on the very last line continues into nothing
        words = _words(segments, path, quotes)
        if words:
            yield words, number


def _words(segments: list[tuple[str, int]], path: str, quotes: bool) -> list[Word]:
    """The words of one logical line's rows (a continuation's backslash taken off)."""
    if not quotes or not any('"' in body for body, _ in segments):
        # No word spans rows: each row's words where they stand.
        return [
            Word(m.group(), number, m.start() + 1)
            for body, number in segments
            for m in _WORD.finditer(body)
        ]
    # A quoted word may span rows: read the rows joined (a continuation counts as a
    # space), and map each offset back to its row by where each row starts.
    starts: list[tuple[int, int]] = []
    size = 0
    for body, number in segments:
        starts.append((size, number))
        size += len(body) + 1
    line = " ".join(body for body, _ in segments)

    def at(offset: int) -> tuple[int, int]:  # physical (line, column) of an offset
        index = bisect.bisect_right(starts, (offset, sys.maxsize)) - 1
        begin, number = starts[index]
        return number, offset - begin + 1

    if line.count('"') % 2:
        # Quotes pair left to right, so the one left open is the last.
        number, column = at(line.rindex('"'))
        raise LicenseSyntaxError(
            path,
            number,
            column,
            'a closing " for the quote here (a quoted value goes on to the next line only '
            "after a \\ at the end of this one)",
            "end of line",
        )
    words = []
    for m in _QUOTED_WORD.finditer(line):
        number, column = at(m.start())
        last, end = at(m.end() - 1)
        if last == number:
            words.append(Word(m.group(), number, column))
        else:
            words.append(Word(m.group(), number, column, last, end + 1))
    return words


class Cursor:
    """Reads the words of one logical line left to right, raising positioned errors."""

    def __init__(self, path: str, words: list[Word]) -> None:
        self.path = path
        self.words = words
        self.index = 0

    def take(self, expected: str, pattern: re.Pattern[str] | None = None) -> Word:
        if self.index >= len(self.words):
            last = self.words[-1]
            raise LicenseSyntaxError(self.path, last.end_line, last.end, expected, "end of line")
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
        if '"' in value:
            if len(value) < 2 or value[0] != '"' or value[-1] != '"' or '"' in value[1:-1]:
                raise cur.error(word, f"a value after {key}=, the whole of it in quotes if any")
            # Quotes are layout, like spacing: a run of blanks inside them reads as one
            # space, as the canonical form writes it (zbroker.broker.signing).
            value = " ".join(value[1:-1].split())
        if not value:
            raise cur.error(word, f"a value after {key}=")
        key = key.upper()
        if key in where:
            first = where[key]
            raise cur.error(
                word, f"each attribute at most once ({key}= is on {first.line}:{first.column})"
            )
        if key in ("USERS", "HOSTS") and any(
            not name or name != name.strip() for name in value.split(",")
        ):
            raise cur.error(word, f"a comma-separated list of names after {key}= (no blanks)")
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
    for words, _ in logical_lines(text, path=path, quotes=True):
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
