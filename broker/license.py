"""The license file: parsing it into SERVER lines and entitlements (SPEC section 2).

Format. The file is UTF-8 text read as *logical lines*:

- a physical line whose last non-blank character is ``\\`` continues on the next
  physical line (the backslash counts as a space); a logical line is its physical
  lines joined;
- a physical line whose first non-blank character is ``#`` is a comment, but only at
  the start of a logical line (there are no trailing comments); blank lines are
  ignored;
- words are separated by spaces or tabs; keywords are case-insensitive, and so are
  attribute keys (``sign=`` is ``SIGN=``); everything else is case-sensitive except
  the expiry date. Values contain no spaces (there is no quoting).

Statements, one per logical line::

    SERVER name hostid endpoint [KEY=value ...]
    VENDOR name [KEY=value ...]
    FEATURE|INCREMENT name vendor version expiry count [KEY=value | flag] ...

SERVER lines are in rank order (the first outranks the others); there must be 1 (a
single server) or 3 (a triad), or none when a vendor parses the file to sign it. The
hostid is ``ANY`` or any word; the endpoint is ``tcp://host:port``, ``ipc://path`` or
``inproc://name``. There is at most one VENDOR line; when there is one, every
FEATURE/INCREMENT line must name its vendor. A version is dotted decimal
(``broker.model.parse_version``), an expiry ``permanent`` or ``d-mmm-yyyy``
(``31-dec-2027``), a count a whole number >= 1. ``USERS=a,b`` and ``HOSTS=a,b`` restrict
who may check out; ``SIGN=`` is the vendor's signature (``broker.signing``). An
attribute key or flag may appear once per line.

Ranges. Every number has the range the wire has (``broker.wire``), so that whatever
parses can be replicated and asked for: a TCP port 1 to 65535; a count 1 to
``MAX_COUNT`` (1,000,000); a version at most ``MAX_VERSION`` (32) characters, each part
0 to ``MAX_VERSION_PART`` (2^31-1); a date from 1-jan-0001 to 31-dec-9999; a feature
name at most ``MAX_TEXT`` (256) characters, the longest a checkout may name; at most
``MAX_LINES`` (100,000) FEATURE/INCREMENT lines in a file of at most 16 MiB. A value
outside is a syntax error naming the range, so ``zbroker vendor sign`` refuses to sign it.

Errors. Anything malformed raises ``LicenseSyntaxError`` naming the file, the 1-based
physical line and column of the offending word, what was expected and what was found:
the file must be fixed. A well-formed FEATURE/INCREMENT line whose signature is
missing or does not verify is not an error of the file: it becomes a
``LicenseLineRefused`` in ``License.refused`` and the other lines serve.

The parser is pure (text in, values out); ``load_license`` is the one function that
reads a file. It keeps expired lines: whether a line grants today is the ledger's call
(``Entitlement.expired_on``).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.model import Entitlement
from broker.signing import (
    SIGNATURE_HEX_LENGTH,
    LicenseError,
    LicenseKeyError,
    canonical_form,
    verify_signature,
)
from broker.wire import MAX_COUNT, MAX_TEXT, MAX_VERSION, MAX_VERSION_PART, check_version

__all__ = [
    "FeatureLine",
    "License",
    "LicenseError",
    "LicenseFileError",
    "LicenseKeyError",
    "LicenseLineRefused",
    "LicenseSyntax",
    "LicenseSyntaxError",
    "ServerLine",
    "check_signature",
    "load_license",
    "parse_license",
    "parse_syntax",
    "read_license_text",
    "read_servers",
    "tcp_host_port",
]

_WORD = re.compile(r"\S+")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FLAG = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")
_COUNT = re.compile(r"[0-9]+\Z")
_DATE = re.compile(r"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})\Z")
_HEX = re.compile(r"[0-9A-Fa-f]+\Z")
_ENDPOINT = re.compile(
    r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):([0-9]{1,5})\Z|(ipc|inproc)://\S+\Z"
)
_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTHS = {name: number for number, name in enumerate(_MONTH_NAMES, start=1)}
_KEYWORDS = "a keyword (SERVER, VENDOR, FEATURE or INCREMENT)"
# Bounds on the whole file, so that its reload delta is one peer message of a few MB
# (the peer socket takes 256 MiB) that packs in milliseconds.
MAX_LICENSE_BYTES = 16 * 1024 * 1024
MAX_LINES = 100_000  # FEATURE/INCREMENT lines
_PORTS = "a TCP port from 1 to 65535"
_VERSION_EXPECTED = (
    f"a version (dotted decimal such as 2.0, at most {MAX_VERSION} characters, "
    f"each part from 0 to {MAX_VERSION_PART})"
)
_COUNT_EXPECTED = f"a seat count (a whole number from 1 to {MAX_COUNT})"
_FEATURE_NAME = f"a feature name (at most {MAX_TEXT} characters)"
_SERVER_COUNT = "1 SERVER line (a single server) or 3 (a triad)"


# --- errors ----------------------------------------------------------------------------


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


@dataclass(frozen=True)
class LicenseLineRefused:
    """A FEATURE/INCREMENT line left out because its signature is missing or wrong."""

    path: str
    line: int
    feature: str
    why: str
    keyword: str = "FEATURE"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.keyword} {self.feature} refused: {self.why}"


# --- values ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerLine:
    """One node of the triad (or the single server), in rank order in the file."""

    name: str
    hostid: str  # "ANY" (normalised) or a host identifier as written
    endpoint: str
    attrs: dict[str, str]  # keys upper case
    line: int


@dataclass(frozen=True)
class FeatureLine:
    """A well-formed FEATURE/INCREMENT line, before its signature is checked."""

    keyword: str  # FEATURE or INCREMENT
    name: str
    vendor: str
    version: str  # as written
    expiry: str  # as written, lower case: "permanent" or "d-mmm-yyyy"
    expires: datetime.date | None  # None: permanent
    count: int
    attrs: dict[str, str]  # keys upper case, SIGN left out
    flags: tuple[str, ...]
    signature: str | None  # the SIGN= value as written
    line: int  # physical line of the keyword
    last_line: int  # last physical line of the logical line
    sign_at: tuple[int, int, int] | None  # (line, column, length) of the SIGN= word

    def canonical(self) -> bytes:
        return canonical_form(
            self.keyword,
            self.name,
            self.vendor,
            self.version,
            self.expiry,
            self.count,
            self.attrs,
            self.flags,
        )

    def entitlement(self, path: str) -> Entitlement:
        return Entitlement(
            feature=self.name,
            version=self.version,
            count=self.count,
            expires=self.expires,
            users=_name_set(self.attrs.get("USERS")),
            hosts=_name_set(self.attrs.get("HOSTS")),
            source=f"{path}:{self.line}",
        )


@dataclass(frozen=True)
class LicenseSyntax:
    """A well-formed license file, signatures not yet checked (what a signer needs)."""

    path: str
    servers: list[ServerLine]
    vendor: str | None
    lines: list[FeatureLine]


@dataclass(frozen=True)
class License:
    """A parsed license file: its triad and the entitlements of lines that verified."""

    path: str
    servers: list[ServerLine]
    vendor: str | None
    entitlements: list[Entitlement]
    refused: list[LicenseLineRefused] = field(default_factory=list)


def _name_set(value: str | None) -> frozenset[str] | None:
    return None if value is None else frozenset(value.split(","))


# --- lexing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Word:
    text: str
    line: int
    column: int

    @property
    def end(self) -> int:
        return self.column + len(self.text)


def _logical_lines(text: str) -> Iterator[tuple[list[_Word], int]]:
    """Each logical line as its words (with physical positions) and its last line."""
    words: list[_Word] = []
    continuing = False
    number = 0
    for number, row in enumerate(text.split("\n"), start=1):
        body = row.rstrip()
        if not continuing and body.lstrip().startswith("#"):
            continue
        continuing = body.endswith("\\")
        if continuing:
            body = body[:-1]
        words += [_Word(m.group(), number, m.start() + 1) for m in _WORD.finditer(body)]
        if not continuing:
            if words:
                yield words, number
            words = []
    if words:  # a backslash on the very last line continues into nothing
        yield words, number


class _Cursor:
    """Reads the words of one logical line left to right, raising positioned errors."""

    def __init__(self, path: str, words: list[_Word]) -> None:
        self.path = path
        self.words = words
        self.index = 0

    def take(self, expected: str, pattern: re.Pattern[str] | None = None) -> _Word:
        if self.index >= len(self.words):
            last = self.words[-1]
            raise LicenseSyntaxError(self.path, last.line, last.end, expected, "end of line")
        word = self.words[self.index]
        self.index += 1
        if pattern is not None and not pattern.match(word.text):
            raise self.error(word, expected)
        return word

    def rest(self) -> list[_Word]:
        words = self.words[self.index :]
        self.index = len(self.words)
        return words

    def error(self, word: _Word, expected: str) -> LicenseSyntaxError:
        # A line-long word (a count of 5,000 digits) would bury the message: show its start.
        found = repr(word.text) if len(word.text) <= 60 else f"{word.text[:40]!r}..."
        return LicenseSyntaxError(self.path, word.line, word.column, expected, found)


# --- parsing ---------------------------------------------------------------------------


def _extras(
    cur: _Cursor, *, flags_allowed: bool
) -> tuple[dict[str, str], dict[str, _Word], list[str]]:
    """The trailing KEY=value attributes (keys upper-cased) and flags of a line."""
    attrs: dict[str, str] = {}
    where: dict[str, _Word] = {}
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


def _server(cur: _Cursor, keyword: _Word) -> tuple[ServerLine, _Word, _Word]:
    name = cur.take("a server name", _NAME)
    hostid = cur.take("a host id (ANY or a host identifier)")
    if "://" in hostid.text or "=" in hostid.text:
        raise cur.error(hostid, "a host id (ANY or a host identifier) before the endpoint")
    endpoint = cur.take("an endpoint such as tcp://127.0.0.1:27001", _ENDPOINT)
    if endpoint.text.startswith("tcp://"):
        try:
            tcp_host_port(endpoint.text)
        except ValueError:
            raise cur.error(endpoint, _PORTS) from None
    attrs, _, _ = _extras(cur, flags_allowed=False)
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


def _expiry(cur: _Cursor) -> tuple[_Word, datetime.date | None]:
    expected = "an expiry date (permanent or d-mmm-yyyy such as 31-dec-2027)"
    word = cur.take(expected)
    if word.text.lower() == "permanent":
        return word, None
    match = _DATE.match(word.text)
    if match is None or match.group(2).lower() not in _MONTHS:
        raise cur.error(word, expected)
    day, month, year = int(match.group(1)), _MONTHS[match.group(2).lower()], int(match.group(3))
    try:
        return word, datetime.date(year, month, day)
    except ValueError:
        # year 0 is the only one the pattern lets through that datetime cannot hold
        raise cur.error(
            word, "an expiry date that exists on the calendar, year 1 to 9999"
        ) from None


def _feature(cur: _Cursor, keyword: _Word, last_line: int) -> tuple[FeatureLine, _Word]:
    name = cur.take(_FEATURE_NAME, _NAME)
    if len(name.text) > MAX_TEXT:
        raise cur.error(name, _FEATURE_NAME)
    vendor = cur.take("a vendor name", _NAME)
    version = cur.take(_VERSION_EXPECTED)
    try:
        check_version(version.text)
    except ValueError:
        raise cur.error(version, _VERSION_EXPECTED) from None
    expiry, expires = _expiry(cur)
    count = cur.take(_COUNT_EXPECTED, _COUNT)
    # Digits past the range are refused before int(): Python refuses to convert 4,300.
    digits = count.text.lstrip("0")
    if len(digits) > len(str(MAX_COUNT)) or not 1 <= int(digits or "0") <= MAX_COUNT:
        raise cur.error(count, _COUNT_EXPECTED)
    attrs, where, flags = _extras(cur, flags_allowed=True)
    signature = attrs.pop("SIGN", None)
    sign_word = where.get("SIGN")
    line = FeatureLine(
        keyword=keyword.text.upper(),
        name=name.text,
        vendor=vendor.text,
        version=version.text,
        expiry=expiry.text.lower(),
        expires=expires,
        count=int(digits),
        attrs=attrs,
        flags=tuple(flags),
        signature=signature,
        line=keyword.line,
        last_line=last_line,
        sign_at=None
        if sign_word is None
        else (sign_word.line, sign_word.column, len(sign_word.text)),
    )
    return line, vendor


def parse_syntax(text: str, *, path: str, servers_required: bool = True) -> LicenseSyntax:
    """Check the syntax of a license file and read its lines; signatures are not checked.

    ``servers_required=False`` accepts a file without SERVER lines (for signing).
    Raises ``LicenseSyntaxError``.
    """
    servers: list[tuple[ServerLine, _Word]] = []
    vendor: _Word | None = None
    features: list[tuple[FeatureLine, _Word]] = []
    for words, last_line in _logical_lines(text):
        cur = _Cursor(path, words)
        keyword = cur.take(_KEYWORDS)
        kind = keyword.text.upper()
        if kind == "SERVER":
            server, name, endpoint = _server(cur, keyword)
            if len(servers) == 3:
                raise cur.error(keyword, "at most 3 SERVER lines (a triad)")
            for other, _ in servers:
                if server.name == other.name:
                    raise cur.error(name, f"a server name not already used (line {other.line})")
                if server.endpoint == other.endpoint:
                    raise cur.error(endpoint, f"an endpoint not already used (line {other.line})")
            servers.append((server, keyword))
        elif kind == "VENDOR":
            if vendor is not None:
                raise cur.error(keyword, f"one VENDOR line (there is one on line {vendor.line})")
            vendor = cur.take("a vendor name", _NAME)
            _extras(cur, flags_allowed=False)
        elif kind in ("FEATURE", "INCREMENT"):
            if len(features) == MAX_LINES:
                raise cur.error(keyword, f"at most {MAX_LINES} FEATURE/INCREMENT lines")
            features.append(_feature(cur, keyword, last_line))
        else:
            raise cur.error(keyword, _KEYWORDS)

    if len(servers) == 2:
        second = servers[1][1]
        raise LicenseSyntaxError(path, second.line, second.column, _SERVER_COUNT, "2")
    if not servers and servers_required:
        raise LicenseSyntaxError(path, 1, 1, _SERVER_COUNT, "none")
    if vendor is not None:
        for line, written in features:
            if line.vendor != vendor.text:
                expected = f"vendor {vendor.text!r} as on the VENDOR line {vendor.line}"
                raise LicenseSyntaxError(
                    path, written.line, written.column, expected, repr(written.text)
                )
    return LicenseSyntax(
        path=path,
        servers=[s for s, _ in servers],
        vendor=None if vendor is None else vendor.text,
        lines=[f for f, _ in features],
    )


def check_signature(line: FeatureLine, key: Ed25519PublicKey) -> str | None:
    """Why ``line`` is refused under the vendor's ``key``, or None when it verifies."""
    if line.signature is None:
        return "no signature (SIGN= is missing)"
    if len(line.signature) != SIGNATURE_HEX_LENGTH or not _HEX.match(line.signature):
        return f"signature is not {SIGNATURE_HEX_LENGTH} hex digits"
    if not verify_signature(key, line.canonical(), line.signature):
        return "signature does not verify against the vendor key"
    return None


def parse_license(
    text: str,
    *,
    path: str,
    public_key: Ed25519PublicKey | None,
    servers_required: bool = True,
) -> License:
    """Parse a license file and check each FEATURE/INCREMENT line against ``public_key``.

    ``public_key=None`` checks no signature: every line serves (for clients that only
    need the SERVER lines). Raises ``LicenseSyntaxError``; bad signatures do not raise
    but land in ``License.refused``.
    """
    syntax = parse_syntax(text, path=path, servers_required=servers_required)
    entitlements: list[Entitlement] = []
    refused: list[LicenseLineRefused] = []
    first_of: dict[bytes, int] = {}  # canonical form -> the line it first verified on
    for line in syntax.lines:
        why = None if public_key is None else check_signature(line, public_key)
        if why is None and public_key is not None:
            # A copy of a signed line verifies too: counted twice it would add seats.
            first = first_of.setdefault(line.canonical(), line.line)
            if first != line.line:
                why = f"a copy of line {first}: a signed line counts once"
        if why is None:
            entitlements.append(line.entitlement(path))
        else:
            refused.append(LicenseLineRefused(path, line.line, line.name, why, line.keyword))
    return License(path, syntax.servers, syntax.vendor, entitlements, refused)


def read_license_text(path: str | Path) -> str:
    """The text of a license file; ``LicenseFileError`` if it cannot be read."""
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_LICENSE_BYTES + 1)
        if len(data) > MAX_LICENSE_BYTES:
            raise LicenseFileError(
                str(path), f"larger than {MAX_LICENSE_BYTES} bytes: not a license file"
            )
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


def load_license(
    path: str | Path, public_key: Ed25519PublicKey | None, *, servers_required: bool = True
) -> License:
    """Read and parse the license file at ``path`` (see ``parse_license``)."""
    return parse_license(
        read_license_text(path),
        path=str(path),
        public_key=public_key,
        servers_required=servers_required,
    )


def read_servers(path: str | Path) -> list[ServerLine]:
    """The SERVER lines of a license file, in rank order, without checking signatures."""
    return load_license(path, None).servers
