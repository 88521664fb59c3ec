"""The license file: parsing it into SERVER lines and entitlements (SPEC section 2).

Format. The file's layout (logical lines, comments, words) and its SERVER lines are read
by ``zbroker.clients.licfile``, the client library's reading of a license, so that client and
node read a file alike; this module reads the rest. Keywords and attribute keys are
case-insensitive (``sign=`` is ``SIGN=``); everything else is case-sensitive except the
expiry date.

Statements, one per logical line::

    SERVER name hostid endpoint [KEY=value ...]
    VENDOR name [KEY=value ...]
    FEATURE|INCREMENT name vendor version expiry count [KEY=value | flag] ...

SERVER lines are in rank order (the first outranks the others); there must be 1 (a
single server) or 3 (a triad), or none when a vendor parses the file to sign it. The
hostid is ``ANY`` or any word; the endpoint is ``tcp://host:port``, ``ipc://path`` or
``inproc://name``. There is at most one VENDOR line; when there is one, every
FEATURE/INCREMENT line must name its vendor. A version is dotted decimal
(``zbroker.broker.model.parse_version``), an expiry ``permanent`` or ``d-mmm-yyyy``
(``31-dec-2027``), a count a whole number >= 1. ``USERS=a,b`` and ``HOSTS=a,b`` restrict
who may check out; ``USER_BASED[=n]`` and ``HOST_BASED[=n]`` (flag, or n a count) give
the line to the users or hosts the options file's INCLUDE lines name (``zbroker.broker.based``);
``SIGN=`` is the vendor's signature (``zbroker.broker.signing``): 128 hex digits, which
in quotes may be grouped with blanks and run over continuation lines, as FlexNet writes
them (``SIGN="0a1b 2c3d \\`` then ``4e5f ..."``). An attribute key or flag may appear once
per line.

FEATURE and INCREMENT. As in FlexNet, only the first FEATURE line of a feature serves
(the first that verifies); a later FEATURE line of that feature is left out with a
warning naming both lines (a renewal pasted below the old line must not add its seats
to it), and every INCREMENT line adds its seats. ``unserved`` is that judgement, with
the signature checks: the one the nodes, ``zbroker vendor verify`` and
``sign_license_text`` make. ``License.signed`` keeps each verified line as its canonical form
and signature (``FeatureLine.signed_text``): what a primary replicates for every node to
verify with its own key (``zbroker.broker.served``).

Ranges. Every number has the range the wire has (``zbroker.broker.wire``), so that whatever
parses can be replicated and asked for: a TCP port 1 to 65535; a count 1 to
``MAX_COUNT`` (1,000,000); a version at most ``MAX_VERSION`` (32) characters, each part
0 to ``MAX_VERSION_PART`` (2^31-1); a date from 1-jan-0001 to 31-dec-9999; a feature
name at most ``MAX_TEXT`` (256) characters, the longest a checkout may name; at most
``MAX_LINES`` (100,000) FEATURE/INCREMENT lines in a file of at most 16 MiB. A value
outside is a syntax error naming the range, so ``zbroker vendor sign`` refuses to sign it.

Errors. Anything malformed raises ``LicenseSyntaxError`` naming the file, the 1-based
physical line and column of the offending word, what was expected and what was found:
the file must be fixed. A well-formed FEATURE/INCREMENT line whose signature is
missing or does not verify, that copies an earlier line, or that is a second FEATURE
line of a feature, is not an error of the file: it becomes a ``LicenseLineRefused`` in
``License.refused`` (the node logs each as a warning) and the other lines serve.

The parser is pure (text in, values out); ``load_license`` is the one function that
reads a file. It keeps expired lines: whether a line grants today is the ledger's call
(``Entitlement.expired_on``).
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from zbroker.broker.model import Entitlement
from zbroker.broker.signing import (
    SIGNATURE_HEX_LENGTH,
    LicenseKeyError,
    canonical_form,
    sign_canonical,
    verify_signature,
)
from zbroker.broker.wire import MAX_COUNT, MAX_TEXT, MAX_VERSION, MAX_VERSION_PART, check_version
from zbroker.clients.licfile import (
    KEYWORDS,
    MAX_LICENSE_BYTES,
    NAME,
    Cursor,
    LicenseError,
    LicenseFileError,
    LicenseSyntaxError,
    ServerLine,
    Servers,
    Word,
    extras,
    logical_lines,
    read_license_text,
    read_servers,
    rows,
    tcp_host_port,
)
from zbroker.clients.protocol import parse_dup_mask

__all__ = [
    "MAX_LICENSE_BYTES",
    "FeatureLine",
    "License",
    "LicenseError",
    "LicenseFileError",
    "LicenseKeyError",
    "LicenseLineRefused",
    "LicenseSyntax",
    "LicenseSyntaxError",
    "LicenseUnservedError",
    "ServerLine",
    "check_signature",
    "load_license",
    "parse_license",
    "parse_syntax",
    "read_license_text",
    "read_servers",
    "sign_license_text",
    "tcp_host_port",
    "unserved",
]

_COUNT = re.compile(r"[0-9]+\Z")
_DATE = re.compile(r"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})\Z")
_HEX = re.compile(r"[0-9A-Fa-f]+\Z")
_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTHS = {name: number for number, name in enumerate(_MONTH_NAMES, start=1)}
# Appended SIGN= attributes go on a continuation line of their own, indented like this.
_SIGN_INDENT = "    "
MAX_LINES = 100_000  # FEATURE/INCREMENT lines
_VERSION_EXPECTED = (
    f"a version (dotted decimal such as 2.0, at most {MAX_VERSION} characters, "
    f"each part from 0 to {MAX_VERSION_PART})"
)
_COUNT_EXPECTED = f"a seat count (a whole number from 1 to {MAX_COUNT})"
_FEATURE_NAME = f"a feature name (at most {MAX_TEXT} characters)"
_DUP_EXPECTED = "DUP_GROUP=NONE, SITE or letters of UHDV (user, host, display, vendor string)"
DEFAULT_BORROW_HOURS = 168  # a bare BORROW flag: FlexNet's default, one week
MAX_BORROW_HOURS = 87_600  # ten years: BORROW=hours beyond it is a typing error
NO_EARLY_RETURN = "NO_EARLY_RETURN"  # the line flag that forbids returning a borrow early
_BORROW_EXPECTED = f"BORROW=hours, a whole number of hours from 1 to {MAX_BORROW_HOURS}"


# --- errors ----------------------------------------------------------------------------


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


class LicenseUnservedError(LicenseError):
    """Lines a vendor asked to sign that the nodes would not serve (``unserved``)."""

    def __init__(self, path: str, refused: list[LicenseLineRefused]) -> None:
        self.path = path
        self.refused = refused
        lines = "".join(f"\n  {line}" for line in refused)
        super().__init__(
            f"{path}: not signed: the nodes would not serve {len(refused)} of its lines; "
            f"fix them and sign again:{lines}"
        )


# --- values ----------------------------------------------------------------------------


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
    # (line, column, last line, end column) of the SIGN= word: a quoted one may span lines
    sign_at: tuple[int, int, int, int] | None

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
            vendor=self.vendor,
            borrow=self.borrow_hours(),
            early_return=not any(f.upper() == NO_EARLY_RETURN for f in self.flags),
            user_based=self._based("USER_BASED"),
            host_based=self._based("HOST_BASED"),
            dup_group=_dup_group(self.attrs.get("DUP_GROUP")),
        )

    def _based(self, keyword: str) -> int | None:
        """``USER_BASED[=n]`` / ``HOST_BASED[=n]``: how many users (hosts) the options
        file's INCLUDE lines may name for the line, its count when the flag has no ``=n``;
        None when the line has neither (``zbroker.broker.based``)."""
        if keyword in self.attrs:
            return int(self.attrs[keyword])  # checked by _feature: a count in range
        if any(flag.upper() == keyword for flag in self.flags):
            return self.count
        return None

    def signed_text(self) -> str:
        """The line as the triad replicates it: its canonical form and its signature, one
        line that ``parse_syntax`` reads back (``zbroker.broker.served`` verifies it)."""
        return f"{self.canonical().decode()} SIGN={self.signature}"

    def borrow_hours(self) -> float | None:
        """BORROW=hours, or the default for a bare BORROW flag; None: not borrowable."""
        if "BORROW" in self.attrs:
            return float(self.attrs["BORROW"])  # checked by the parser: whole hours in range
        if any(f.upper() == "BORROW" for f in self.flags):
            return float(DEFAULT_BORROW_HOURS)
        return None


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
    # ``FeatureLine.signed_text`` of each entitlement, in the same order (empty when no
    # key checked the signatures): what a primary replicates for the others to verify.
    signed: list[str] = field(default_factory=list)


def _name_set(value: str | None) -> frozenset[str] | None:
    return None if value is None else frozenset(value.split(","))


def _dup_group(value: str | None) -> str | None:
    return None if value is None else parse_dup_mask(value)  # checked by the parser


# --- parsing ---------------------------------------------------------------------------


def _expiry(cur: Cursor) -> tuple[Word, datetime.date | None]:
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


def _feature(cur: Cursor, keyword: Word, last_line: int) -> tuple[FeatureLine, Word]:
    name = cur.take(_FEATURE_NAME, NAME)
    if len(name.text) > MAX_TEXT:
        raise cur.error(name, _FEATURE_NAME)
    vendor = cur.take("a vendor name", NAME)
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
    attrs, where, flags = extras(cur, flags_allowed=True)
    _check_borrow(cur, attrs, where, flags)
    if "DUP_GROUP" in where:  # signed with the line like every attribute (broker/dup.py)
        try:
            parse_dup_mask(attrs["DUP_GROUP"])
        except ValueError:
            raise cur.error(where["DUP_GROUP"], _DUP_EXPECTED) from None
    for based in ("USER_BASED", "HOST_BASED"):
        if based in where:  # USER_BASED=n: n a count, as the line's own
            n = attrs[based].lstrip("0")
            if not _COUNT.match(attrs[based]) or len(n) > 7 or not 1 <= int(n or "0") <= MAX_COUNT:
                raise cur.error(where[based], f"{based}=n, n a whole number from 1 to {MAX_COUNT}")
    signature = attrs.pop("SIGN", None)
    if signature is not None:  # FlexNet groups a quoted signature's digits with blanks
        signature = "".join(signature.split())
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
        else (sign_word.line, sign_word.column, sign_word.end_line, sign_word.end),
    )
    return line, vendor


def _check_borrow(
    cur: Cursor, attrs: dict[str, str], where: dict[str, Word], flags: list[str]
) -> None:
    """BORROW=hours is whole hours in range, and BORROW is given once, flag or attribute."""
    word = where.get("BORROW")
    if word is None:
        return
    if any(f.upper() == "BORROW" for f in flags):
        raise cur.error(word, "BORROW once: as a flag (168 hours) or as BORROW=hours, not both")
    digits = attrs["BORROW"].lstrip("0")
    if (
        not _COUNT.match(attrs["BORROW"])
        or len(digits) > 5
        or not 1 <= int(digits or "0") <= (MAX_BORROW_HOURS)
    ):
        raise cur.error(word, _BORROW_EXPECTED)


def parse_syntax(text: str, *, path: str, servers_required: bool = True) -> LicenseSyntax:
    """Check the syntax of a license file and read its lines; signatures are not checked.

    ``servers_required=False`` accepts a file without SERVER lines (for signing).
    Raises ``LicenseSyntaxError``.
    """
    servers = Servers(path)
    vendor: Word | None = None
    features: list[tuple[FeatureLine, Word]] = []
    for words, last_line in logical_lines(text, path=path, quotes=True):
        cur = Cursor(path, words)
        keyword = cur.take(KEYWORDS)
        kind = keyword.text.upper()
        if kind == "SERVER":
            servers.add(cur, keyword)
        elif kind == "VENDOR":
            if vendor is not None:
                raise cur.error(keyword, f"one VENDOR line (there is one on line {vendor.line})")
            vendor = cur.take("a vendor name", NAME)
            extras(cur, flags_allowed=False)
        elif kind in ("FEATURE", "INCREMENT"):
            if len(features) == MAX_LINES:
                raise cur.error(keyword, f"at most {MAX_LINES} FEATURE/INCREMENT lines")
            features.append(_feature(cur, keyword, last_line))
        else:
            raise cur.error(keyword, KEYWORDS)

    server_lines = servers.done(required=servers_required)
    if vendor is not None:
        for line, written in features:
            if line.vendor != vendor.text:
                expected = f"vendor {vendor.text!r} as on the VENDOR line {vendor.line}"
                raise LicenseSyntaxError(
                    path, written.line, written.column, expected, repr(written.text)
                )
    return LicenseSyntax(
        path=path,
        servers=server_lines,
        vendor=None if vendor is None else vendor.text,
        lines=[f for f, _ in features],
    )


# Lines that verified, by (key, canonical form, signature): a reread of a large license
# verifies only the lines that changed (0.2 ms a line: 4 s at 20,000). Only successes are
# kept, so a hostile file cannot fill it; cleared whole past the bound.
_VERIFIED: set[tuple[bytes, bytes, str]] = set()
_VERIFIED_MAX = 200_000


def check_signature(line: FeatureLine, key: Ed25519PublicKey) -> str | None:
    """Why ``line`` is refused under the vendor's ``key``, or None when it verifies."""
    if line.signature is None:
        return "no signature (SIGN= is missing)"
    if len(line.signature) != SIGNATURE_HEX_LENGTH or not _HEX.match(line.signature):
        return f"signature is not {SIGNATURE_HEX_LENGTH} hex digits"
    seen = (key.public_bytes_raw(), line.canonical(), line.signature.lower())
    if seen in _VERIFIED:
        return None
    if not verify_signature(key, seen[1], line.signature):
        return "signature does not verify against the vendor key"
    if len(_VERIFIED) >= _VERIFIED_MAX:
        _VERIFIED.clear()
    _VERIFIED.add(seen)
    return None


def unserved(lines: Sequence[FeatureLine], key: Ed25519PublicKey | None) -> list[str | None]:
    """Why the nodes do not serve each of ``lines`` (None: it serves), in file order: the
    one judgement of ``parse_license``, ``zbroker vendor verify`` and ``sign_license_text``.

    A line is not served when its signature does not verify under ``key`` (None: none is
    checked); when it is a copy of an earlier verified line (its canonical form again: a
    signed line cannot be forged, so copying it is the one way to add its seats twice);
    and when it is a FEATURE line of a feature an earlier served FEATURE line defines.
    As in FlexNet, only the first FEATURE line of a feature serves: FEATURE says how many
    seats there are, INCREMENT adds to them (a renewal pasted below the old FEATURE line
    does not add its seats to it).
    """
    whys: list[str | None] = []
    first_copy: dict[bytes, int] = {}  # canonical form -> the line it first verified on
    first_feature: dict[str, int] = {}  # feature -> its FEATURE line that serves
    for line in lines:
        why = None if key is None else check_signature(line, key)
        if why is None and key is not None:
            first = first_copy.setdefault(line.canonical(), line.line)
            if first != line.line:
                why = f"a copy of line {first}: a signed line counts once"
        if why is None and line.keyword == "FEATURE":
            first = first_feature.setdefault(line.name, line.line)
            if first != line.line:
                why = (
                    f"FEATURE line {first} already gives {line.name} its seats: only the "
                    "first FEATURE line of a feature serves; to add seats, make this an "
                    "INCREMENT line"
                )
        whys.append(why)
    return whys


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
    signed: list[str] = []
    for line, why in zip(syntax.lines, unserved(syntax.lines, public_key), strict=True):
        if why is None:
            entitlements.append(line.entitlement(path))
            if public_key is not None:
                signed.append(line.signed_text())
        else:
            refused.append(LicenseLineRefused(path, line.line, line.name, why, line.keyword))
    return License(path, syntax.servers, syntax.vendor, entitlements, refused, signed)


def load_license(
    path: str | Path, public_key: Ed25519PublicKey | None, *, servers_required: bool = True
) -> License:
    """Read and parse the license file at ``path`` (see ``parse_license``)."""
    return parse_license(
        read_license_text(path, max_bytes=MAX_LICENSE_BYTES),
        path=str(path),
        public_key=public_key,
        servers_required=servers_required,
    )


def sign_license_text(text: str, key: Ed25519PrivateKey, *, path: str = "<license>") -> str:
    """``text`` with a fresh ``SIGN=`` on every FEATURE/INCREMENT line.

    An existing ``SIGN=`` token is replaced where it stands; a line without one gets
    ``SIGN=...`` on a new continuation line (``\\`` then an indented line). Every other
    line, comment and byte of layout is left as it was. The text is parsed first, so a
    syntax error raises ``LicenseSyntaxError`` naming ``path``; SERVER lines may be
    absent (vendors often sign before the customer fills them in).
    """
    syntax = parse_syntax(text, path=path, servers_required=False)
    physical = rows(text)
    newline = next((end for _, end in physical if end), "\n")  # for a line added at the end
    # Last line first: a rewrite that adds or joins physical lines moves only those below.
    for line in reversed(syntax.lines):
        token = f"SIGN={sign_canonical(key, line.canonical())}"
        if line.sign_at is not None:
            first, column, last, end = line.sign_at
            body = physical[first - 1][0][: column - 1] + token + physical[last - 1][0][end - 1 :]
            physical[first - 1 : last] = [(body, physical[last - 1][1])]
        else:
            body, ending = physical[line.last_line - 1]
            head, tail = _append_continued(body, token)
            if head is None:
                physical[line.last_line - 1] = (tail, ending)
            else:
                physical[line.last_line - 1 : line.last_line] = [
                    (head, ending or newline),
                    (tail, ending),
                ]
    signed = "".join(body + ending for body, ending in physical)

    # The output must parse and verify; if it did not, the rewrite above is wrong.
    check = parse_syntax(signed, path=path, servers_required=False)
    public = key.public_key()
    if len(check.lines) != len(syntax.lines):
        raise LicenseError(f"{path}: signing changed the number of FEATURE/INCREMENT lines")
    for line in check.lines:
        why = check_signature(line, public)
        if why is not None:
            raise LicenseError(f"{path}:{line.line}: just-signed line does not verify: {why}")
    # A line the nodes would leave out is the vendor's mistake: say so now, not at a site,
    # naming the line where it is in the file as given (signing may add lines above it).
    given = [
        dataclasses.replace(line, signature=done.signature)
        for line, done in zip(syntax.lines, check.lines, strict=True)
    ]
    refused = [
        LicenseLineRefused(path, line.line, line.name, why, line.keyword)
        for line, why in zip(given, unserved(given, public), strict=True)
        if why is not None
    ]
    if refused:
        raise LicenseUnservedError(path, refused)
    return signed


def _append_continued(body: str, token: str) -> tuple[str | None, str]:
    """``token`` after the logical line that ends with ``body``: (the line continued, the
    new line), or (None, the line) when ``body`` is blank."""
    body = body.rstrip()
    if body.endswith("\\"):
        # Only the last line of the file can end a logical line with a backslash.
        body = body[:-1].rstrip()
    if not body:
        return None, f"{_SIGN_INDENT}{token}"
    return f"{body} \\", f"{_SIGN_INDENT}{token}"
