"""The options file: a site's own rules over its license, in FlexNet's syntax.

A FlexNet administrator writes an options file (``vendor.opt``) to say who may use
what; zbroker reads the same file (``options = "..."`` in the node's config) so that a
site moves without rewriting it. This module only reads it into a frozen ``Options``
value; what the lines decide is ``zbroker.broker.policy``'s.

Layout. As the license file's (``zbroker.clients.licfile.logical_lines``): UTF-8 text, a
``\\`` at the end of a physical line continues the logical line, a ``#`` that starts a
logical line makes it a comment, words are separated by blanks. Unlike FlexNet, a word
that starts with ``#`` after a line's first also starts a comment, to the end of the line
(``GROUP eng ann bob  # the team``): read as names, such a comment's words would become
members. A comment inside a continued line is refused (``_uncommented``). One keyword a line;
keywords and principal types are case-insensitive, every name is case-sensitive (except
group members under ``GROUPCASEINSENSITIVE ON``).

Lines zbroker implements::

    GROUP name user...                   (USER_GROUP is an alias; lines of one name add up)
    HOST_GROUP name host...              (lines of one name add up)
    GROUPCASEINSENSITIVE ON|OFF
    INCLUDE|EXCLUDE feature type name
    INCLUDEALL|EXCLUDEALL type name
    RESERVE n feature type name
    MAX n feature type name              (USER ALL_USERS, GROUP ALL_GROUPS: each one)
    TIMEOUT feature seconds
    TIMEOUTALL seconds
    LINGER feature seconds
    INCLUDE_BORROW|EXCLUDE_BORROW feature type name
    MAX_BORROW_HOURS feature hours       (can only shorten the line's BORROW=hours)
    BORROW_LOWWATER feature n            (n seats of each pool can never be borrowed)

``type`` is USER, HOST, DISPLAY, INTERNET, PROJECT, GROUP or HOST_GROUP. A HOST or
INTERNET name, or a HOST_GROUP member, may be an IP address with ``*`` wildcards
(``10.1.*.*``). ``feature`` is a name, optionally qualified as in FlexNet:
``cad:VERSION=2.0`` names the pool of that version only (the whole word may be in
double quotes). A GROUP or HOST_GROUP a line names must be defined somewhere in the file.

Anything else FlexNet knows (NOLOG, REPORTLOG, ...) and any other
keyword is *ignored*: the line is kept in ``Options.ignored`` and reported once by
``Options.warnings()`` with file:line, so that a real site's file loads. A feature
qualifier other than VERSION= makes its line ignored the same way (zbroker's lines
carry no VENDOR_STRING, EXPDATE, ...). A line of a keyword zbroker implements that is
malformed refuses the whole file: ``OptionsSyntaxError`` names file, line, column, what
was expected and what was found.

Ranges. Counts (RESERVE, MAX) are 0 to ``MAX_COUNT``; seconds (TIMEOUT, LINGER) 0 to
``MAX_SECONDS``; a name at most ``MAX_TEXT`` characters; at most ``MAX_RESERVES``
RESERVE lines (FlexNet's own limit), ``MAX_LINES`` rule lines and ``MAX_MEMBERS`` group
members in a file of at most ``MAX_OPTIONS_BYTES``: the parsed value travels in one
replicated delta.

``Options.to_map`` / ``Options.from_map`` are its msgpack-able form; ``from_map``
checks every field (a delta is input from outside) and raises ``OptionsMapError``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zbroker.broker.wire import MAX_COUNT, MAX_TEXT, check_version
from zbroker.clients.licfile import (
    NAME,
    Cursor,
    LicenseError,
    LicenseFileError,
    LicenseSyntaxError,
    Word,
    logical_lines,
)

__all__ = [
    "ALL_GROUPS",
    "ALL_USERS",
    "MAX_OPTIONS_BYTES",
    "TYPES",
    "Ignored",
    "OptionLine",
    "Options",
    "OptionsError",
    "OptionsFileError",
    "OptionsMapError",
    "OptionsSyntaxError",
    "load_options",
    "parse_options",
]

MAX_OPTIONS_BYTES = 4 * 1024 * 1024
MAX_LINES = 100_000  # rule lines (INCLUDE ... LINGER)
MAX_MEMBERS = 100_000  # members of every GROUP and HOST_GROUP together
MAX_RESERVES = 10_000  # FlexNet's "total number of reservations supported per options file"
MAX_SECONDS = 10 * 366 * 86_400  # ten years: past any sane idle time, within every int
MAX_HOURS = 87_600  # ten years of MAX_BORROW_HOURS, as BORROW=hours on a license line

TYPES = ("USER", "HOST", "DISPLAY", "INTERNET", "PROJECT", "GROUP", "HOST_GROUP")
ALL_USERS = "ALL_USERS"
ALL_GROUPS = "ALL_GROUPS"
# Keywords whose lines name a feature and a principal, a count and so on.
RULES = (
    "INCLUDE",
    "EXCLUDE",
    "INCLUDEALL",
    "EXCLUDEALL",
    "RESERVE",
    "MAX",
    "TIMEOUT",
    "TIMEOUTALL",
    "LINGER",
    # borrowing (docs/admin.md, "Borrowing")
    "INCLUDE_BORROW",
    "EXCLUDE_BORROW",
    "MAX_BORROW_HOURS",
    "BORROW_LOWWATER",
)
# Every keyword zbroker acts on: a near miss of one is likely a typo (a warning says so).
_KEYWORDS = ("GROUP", "USER_GROUP", "HOST_GROUP", "GROUPCASEINSENSITIVE", *RULES)
# Lines that name a feature and a number after it, and no principal.
_FEATURE_NUMBER = ("TIMEOUT", "LINGER", "MAX_BORROW_HOURS", "BORROW_LOWWATER")
_TYPES_EXPECTED = "a principal type (" + ", ".join(TYPES) + ")"
_COUNT = re.compile(r"[0-9]+\Z")
_IP_PATTERN = re.compile(r"[0-9A-Fa-f:.*]*[0-9*][0-9A-Fa-f:.*]*\Z")
_MISPLACED = "a comment: put it on a line of its own before the continued line"
_FEATURE = f"a feature name (at most {MAX_TEXT} characters), optionally :VERSION=v"


# --- errors ----------------------------------------------------------------------------


class OptionsError(LicenseError):
    """Root of the options file's errors (a LicenseError: the node refuses to start
    on one, exit 2, as on a broken license file)."""


class OptionsSyntaxError(LicenseSyntaxError, OptionsError):
    """A malformed options file: ``path:line:column: expected X, found Y``."""


class OptionsFileError(LicenseFileError, OptionsError):
    """An options file that cannot be read at all."""


class OptionsMapError(OptionsError):
    """A map that is not an ``Options.to_map()`` (a bad delta or snapshot)."""


# --- values ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptionLine:
    """One rule line, in the file's words.

    ``feature`` is None on the ...ALL lines; ``version`` is the VERSION= qualifier as
    written (None: every pool of the feature); ``kind``/``name`` the principal (None on
    TIMEOUT, TIMEOUTALL, LINGER); ``number`` the count (RESERVE, MAX) or the seconds
    (TIMEOUT, TIMEOUTALL, LINGER), None on INCLUDE/EXCLUDE lines.
    """

    keyword: str
    line: int
    feature: str | None = None
    version: str | None = None
    kind: str | None = None
    name: str | None = None
    number: int | None = None

    def where(self, path: str) -> str:
        """``KEYWORD words (path:line)`` for a person reading a denial."""
        feature = None
        if self.feature is not None:
            feature = self.feature + ("" if self.version is None else f":VERSION={self.version}")
        count = str(self.number) if self.keyword in ("RESERVE", "MAX") else None
        seconds = str(self.number) if self.keyword in (*_FEATURE_NUMBER, "TIMEOUTALL") else None
        words = [self.keyword, count, feature, self.kind, self.name, seconds]
        return " ".join(w for w in words if w is not None) + f" ({path}:{self.line})"


@dataclass(frozen=True, slots=True)
class Ignored:
    """A line zbroker does not act on, and why (reported once when the file loads)."""

    line: int
    keyword: str
    why: str


@dataclass(frozen=True)
class Options:
    """A parsed options file. Groups are (name, members) in order of first definition,
    members in the order written, each once."""

    # Where it was read, for messages; not part of the policy (nodes may keep the same
    # file at different paths without a reload at every failover).
    path: str = field(compare=False)
    lines: tuple[OptionLine, ...] = ()
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    host_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    case_insensitive: bool = False
    ignored: tuple[Ignored, ...] = ()

    def warnings(self, features: Collection[str] | None = None) -> list[str]:
        """One line per keyword ignored, naming where, and, given the license's
        ``features``, one per feature the lines name that it lacks (a misspelt name makes
        a rule that never applies). The node logs these at load; ``zbroker reread`` and
        ``zbroker up`` print them."""
        by_keyword: dict[tuple[str, str], list[Ignored]] = {}
        for item in self.ignored:
            by_keyword.setdefault((item.keyword, item.why), []).append(item)
        out = []
        for (keyword, _), items in by_keyword.items():
            first = items[0]
            also = ""
            if len(items) > 1:
                more = ", ".join(str(i.line) for i in items[1:6])
                also = f" (also line{'s' if len(items) > 2 else ''} {more}"
                also += ", ...)" if len(items) > 6 else ")"
            out.append(f"{self.path}:{first.line}: {keyword} {first.why}: ignored{also}")
        if features is not None:
            unknown: dict[str, list[OptionLine]] = {}
            for ln in self.lines:
                if ln.feature is not None and ln.feature not in features:
                    unknown.setdefault(ln.feature, []).append(ln)
            for name, lines in unknown.items():
                near = difflib.get_close_matches(name, sorted(features), n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                where = ", ".join(str(ln.line) for ln in lines[:5])
                where += ", ..." if len(lines) > 5 else ""
                many = "s" if len(lines) > 1 else ""
                out.append(
                    f"{self.path}:{lines[0].line}: no license line serves feature {name!r}"
                    f"{hint}: the line{many} naming it ({where}) apply to nothing"
                )
        return out

    def to_map(self) -> dict[str, Any]:
        """The msgpack-able form (for a reload delta and a snapshot)."""
        return {
            "path": self.path,
            "lines": [
                [ln.keyword, ln.line, ln.feature, ln.version, ln.kind, ln.name, ln.number]
                for ln in self.lines
            ],
            "groups": [[name, list(members)] for name, members in self.groups],
            "host_groups": [[name, list(members)] for name, members in self.host_groups],
            "case_insensitive": self.case_insensitive,
            "ignored": [[i.line, i.keyword, i.why] for i in self.ignored],
        }

    @classmethod
    def from_map(cls, m: object) -> Options:
        """The inverse of ``to_map``; ``OptionsMapError`` names the first field that is wrong."""
        if not isinstance(m, dict):
            raise OptionsMapError(f"options must be a map, got {type(m).__name__}")
        path = m.get("path")
        if not isinstance(path, str):
            raise OptionsMapError("options: 'path' must be a str")
        raw_lines = _list(m, "lines")
        if len(raw_lines) > MAX_LINES:
            raise OptionsMapError(f"options: more than {MAX_LINES} lines")
        lines = tuple(_line_from(raw) for raw in raw_lines)
        groups = _groups_from(m, "groups")
        host_groups = _groups_from(m, "host_groups")
        ci = m.get("case_insensitive")
        if not isinstance(ci, bool):
            raise OptionsMapError("options: 'case_insensitive' must be a bool")
        ignored = []
        for raw in _list(m, "ignored"):
            if not (
                isinstance(raw, list)
                and len(raw) == 3
                and _is_int(raw[0])
                and isinstance(raw[1], str)
                and isinstance(raw[2], str)
            ):
                raise OptionsMapError("options: an ignored line must be [line, keyword, why]")
            ignored.append(Ignored(raw[0], raw[1], raw[2]))
        options = cls(path, lines, groups, host_groups, ci, tuple(ignored))
        _check_references(options)
        return options


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _list(m: dict[str, Any], name: str) -> list[Any]:
    value = m.get(name)
    if not isinstance(value, list):
        raise OptionsMapError(f"options: {name!r} must be a list")
    return value


def _groups_from(m: dict[str, Any], name: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    out = []
    total = 0
    for raw in _list(m, name):
        if not (
            isinstance(raw, list)
            and len(raw) == 2
            and isinstance(raw[0], str)
            and isinstance(raw[1], list)
            and all(isinstance(x, str) for x in raw[1])
        ):
            raise OptionsMapError(f"options: each of {name!r} must be [name, [member, ...]]")
        total += len(raw[1])
        if total > MAX_MEMBERS:
            raise OptionsMapError(f"options: more than {MAX_MEMBERS} group members")
        out.append((raw[0], tuple(raw[1])))
    return tuple(out)


def _line_from(raw: object) -> OptionLine:
    if not isinstance(raw, list) or len(raw) != 7:
        raise OptionsMapError("options: a line must be a list of 7 fields")
    keyword, line, feature, version, kind, name, number = raw
    if keyword not in RULES or not _is_int(line):
        raise OptionsMapError(f"options: line {raw!r:.80} has a bad keyword or line number")
    for field_name, value in (("feature", feature), ("version", version), ("name", name)):
        if value is not None and not isinstance(value, str):
            raise OptionsMapError(f"options: line {line}: {field_name!r} must be a str or nil")
    if kind is not None and kind not in TYPES:
        raise OptionsMapError(f"options: line {line}: 'kind' {kind!r:.40} is no principal type")
    if number is not None and not (_is_int(number) and 0 <= number <= max(MAX_COUNT, MAX_SECONDS)):
        raise OptionsMapError(f"options: line {line}: 'number' is out of range")
    if version is not None:
        try:
            check_version(version)
        except ValueError as exc:
            raise OptionsMapError(f"options: line {line}: {exc}") from None
    ln = OptionLine(keyword, line, feature, version, kind, name, number)
    if _shape(ln) is not None:
        raise OptionsMapError(f"options: line {line}: {_shape(ln)}")
    return ln


def _shape(ln: OptionLine) -> str | None:
    """What is wrong with the fields of ``ln`` for its keyword, None when nothing."""
    kw = ln.keyword
    wants_feature = kw not in ("INCLUDEALL", "EXCLUDEALL", "TIMEOUTALL")
    wants_who = kw not in (*_FEATURE_NUMBER, "TIMEOUTALL")
    wants_number = kw not in (
        "INCLUDE", "EXCLUDE", "INCLUDEALL", "EXCLUDEALL", "INCLUDE_BORROW", "EXCLUDE_BORROW"
    )  # fmt: skip
    if (ln.feature is not None) != wants_feature or (ln.feature is None and ln.version):
        return f"{kw} {'needs' if wants_feature else 'takes no'} feature"
    if (ln.kind is not None) != wants_who or (ln.name is not None) != wants_who:
        return f"{kw} {'needs' if wants_who else 'takes no'} principal"
    if (ln.number is not None) != wants_number:
        return f"{kw} {'needs' if wants_number else 'takes no'} number"
    return None


def _check_references(options: Options) -> None:
    groups = {name for name, _ in options.groups}
    host_groups = {name for name, _ in options.host_groups}
    for ln in options.lines:
        if ln.kind == "GROUP" and ln.name not in groups and ln.name != ALL_GROUPS:
            raise OptionsMapError(f"options: line {ln.line} names GROUP {ln.name} not defined")
        if ln.kind == "HOST_GROUP" and ln.name not in host_groups:
            raise OptionsMapError(f"options: line {ln.line} names HOST_GROUP {ln.name} not defined")


# --- parsing ---------------------------------------------------------------------------


class _Groups:
    """GROUP or HOST_GROUP lines as they are read: lines of one name add up."""

    def __init__(self) -> None:
        self.members: dict[str, dict[str, None]] = {}  # ordered sets
        self.first: dict[str, int] = {}

    def add(self, name: str, members: list[str], line: int) -> None:
        self.first.setdefault(name, line)
        into = self.members.setdefault(name, {})
        for member in members:
            into[member] = None

    def done(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return tuple((name, tuple(m)) for name, m in self.members.items())


class _Reader:
    """Reads one file's logical lines into the parts of an ``Options``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: list[OptionLine] = []
        self.groups = _Groups()
        self.host_groups = _Groups()
        self.case_insensitive = False
        self.ignored: list[Ignored] = []
        self.members = 0
        self.reserves = 0
        # (kind, group word) of every line that names a group: checked once all are read
        self.references: list[tuple[str, Word]] = []

    def read(self, cur: Cursor) -> None:
        keyword = cur.take("a keyword")
        kw = keyword.text.upper()
        if kw in ("GROUP", "USER_GROUP", "HOST_GROUP"):
            self._group(cur, self.host_groups if kw == "HOST_GROUP" else self.groups)
        elif kw == "GROUPCASEINSENSITIVE":
            value = cur.take("ON or OFF")
            if value.text.upper() not in ("ON", "OFF"):
                raise cur.error(value, "ON or OFF")
            self._end(cur)
            self.case_insensitive = value.text.upper() == "ON"
        elif kw in RULES:
            if len(self.lines) == MAX_LINES:
                raise cur.error(keyword, f"at most {MAX_LINES} INCLUDE ... LINGER lines")
            line = self._rule(cur, kw, keyword.line)
            if line is not None:
                self.lines.append(line)
        else:
            near = difflib.get_close_matches(kw, _KEYWORDS, n=1, cutoff=0.8)
            hint = f" (did you mean {near[0]}?)" if near else ""
            self.ignored.append(Ignored(keyword.line, kw, f"is not implemented by zbroker{hint}"))

    def _group(self, cur: Cursor, into: _Groups) -> None:
        name = self._name(cur, "a group name")
        members = [self._name(cur, "a member name").text]
        while cur.index < len(cur.words):
            members.append(self._name(cur, "a member name").text)
        self.members += len(members)
        if self.members > MAX_MEMBERS:
            raise cur.error(name, f"at most {MAX_MEMBERS} group members in a file")
        into.add(name.text, members, name.line)

    def _rule(self, cur: Cursor, kw: str, line: int) -> OptionLine | None:
        number: int | None = None
        if kw in ("RESERVE", "MAX"):
            number = self._number(cur, f"a count of seats (0 to {MAX_COUNT})", MAX_COUNT)
            if kw == "RESERVE":
                self.reserves += 1
                if self.reserves > MAX_RESERVES:
                    raise cur.error(cur.words[0], f"at most {MAX_RESERVES} RESERVE lines")
        feature: str | None = None
        version: str | None = None
        unsupported: str | None = None
        if kw not in ("INCLUDEALL", "EXCLUDEALL", "TIMEOUTALL"):
            feature, version, unsupported = self._feature(cur)
        kind: str | None = None
        name: str | None = None
        if kw in ("TIMEOUT", "TIMEOUTALL", "LINGER"):
            number = self._number(cur, f"a number of seconds (0 to {MAX_SECONDS})", MAX_SECONDS)
        elif kw == "MAX_BORROW_HOURS":
            number = self._number(cur, f"a number of hours (0 to {MAX_HOURS})", MAX_HOURS)
        elif kw == "BORROW_LOWWATER":
            number = self._number(cur, f"a count of seats (0 to {MAX_COUNT})", MAX_COUNT)
        else:
            kind, name = self._principal(cur, kw)
        self._end(cur)
        if unsupported is not None:
            why = f"with the feature qualifier {unsupported}= is not supported by zbroker"
            self.ignored.append(Ignored(line, kw, why))
            return None
        return OptionLine(kw, line, feature, version, kind, name, number)

    def _feature(self, cur: Cursor) -> tuple[str, str | None, str | None]:
        """(name, VERSION= value or None, an unsupported qualifier's key or None)."""
        word = cur.take(_FEATURE)
        text = word.text
        if text.startswith('"'):
            # A quoted feature word, as FlexNet allows; it may hold blanks.
            while len(text) < 2 or not text.endswith('"'):
                text += " " + cur.take('the closing " of the quoted feature').text
            text = text[1:-1]
        name, colon, qualifier = text.partition(":")
        if not NAME.match(name) or len(name) > MAX_TEXT:
            raise cur.error(word, _FEATURE)
        if not colon:
            return name, None, None
        key, eq, value = qualifier.partition("=")
        if not eq or not key or not value:
            raise cur.error(word, "a feature qualifier KEY=value after the colon")
        if key.upper() != "VERSION":
            return name, None, key.upper()
        try:
            check_version(value)
        except ValueError as exc:
            raise cur.error(word, f"a VERSION= that is a version: {exc}") from None
        return name, value, None

    def _principal(self, cur: Cursor, kw: str) -> tuple[str, str]:
        kind_word = cur.take(_TYPES_EXPECTED)
        kind = kind_word.text.upper()
        if kind not in TYPES:
            raise cur.error(kind_word, _TYPES_EXPECTED)
        name = self._name(cur, f"a {kind} name")
        if kind == "INTERNET" and not _IP_PATTERN.match(name.text):
            raise cur.error(name, "an IP address, with * wildcards (such as 10.1.*.*)")
        if kind in ("GROUP", "HOST_GROUP") and not (
            kw == "MAX" and kind == "GROUP" and name.text == ALL_GROUPS
        ):
            self.references.append((kind, name))
        return kind, name.text

    def _name(self, cur: Cursor, expected: str) -> Word:
        word = cur.take(f"{expected} (at most {MAX_TEXT} characters)")
        if len(word.text) > MAX_TEXT:
            raise cur.error(word, f"{expected} (at most {MAX_TEXT} characters)")
        return word

    def _number(self, cur: Cursor, expected: str, top: int) -> int:
        word = cur.take(expected, _COUNT)
        digits = word.text.lstrip("0")
        # Digits past the range are refused before int(): Python refuses to convert 4,300.
        if len(digits) > len(str(top)) or int(digits or "0") > top:
            raise cur.error(word, expected)
        return int(digits or "0")

    def _end(self, cur: Cursor) -> None:
        rest = cur.rest()
        if rest:
            raise cur.error(rest[0], "the end of the line")

    def done(self) -> Options:
        defined = {"GROUP": self.groups.members, "HOST_GROUP": self.host_groups.members}
        for kind, word in self.references:
            if word.text not in defined[kind]:
                raise OptionsSyntaxError(
                    self.path,
                    word.line,
                    word.column,
                    f"a {kind} defined by a {kind} line of this file",
                    repr(word.text),
                )
        return Options(
            self.path,
            tuple(self.lines),
            self.groups.done(),
            self.host_groups.done(),
            self.case_insensitive,
            tuple(self.ignored),
        )


def _uncommented(path: str, words: list[Word]) -> list[Word]:
    """The words of a logical line before its trailing comment: a word that starts with
    ``#`` after the first starts a comment to the end of its physical line. FlexNet knows
    only whole-line comments, and a ``#`` word read as a name would make a comment's words
    group members; a comment that a ``\\`` continuation would run on from, either way,
    is refused, as it is unclear which words it ends."""
    for i, word in enumerate(words[1:], start=1):
        if not word.text.startswith("#"):
            continue
        if words[i - 1].line != word.line:
            expected = f"the rest of the line continued by the \\ of line {word.line - 1}"
            raise OptionsSyntaxError(path, word.line, word.column, expected, _MISPLACED)
        after = next((w for w in words[i:] if w.line != word.line), None)
        if after is not None:
            expected = "no comment on a line continued by \\"
            raise OptionsSyntaxError(path, word.line, word.column, expected, _MISPLACED)
        return words[:i]
    return words


def parse_options(text: str, *, path: str) -> Options:
    """Parse an options file's text; ``OptionsSyntaxError`` on a malformed line."""
    reader = _Reader(path)
    try:
        for words, _ in logical_lines(text):
            reader.read(Cursor(path, _uncommented(path, words)))
    except OptionsSyntaxError:
        raise
    except LicenseSyntaxError as exc:  # the shared Cursor's: say it of the options file
        raise OptionsSyntaxError(exc.path, exc.line, exc.column, exc.expected, exc.found) from None
    return reader.done()


def read_options_text(path: str | Path) -> str:
    """The text of an options file; ``OptionsFileError`` if it cannot be read."""
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_OPTIONS_BYTES + 1)
    except FileNotFoundError:
        raise OptionsFileError(str(path), "no such options file") from None
    except OSError as exc:
        raise OptionsFileError(str(path), f"cannot read options file: {exc.strerror}") from None
    if len(data) > MAX_OPTIONS_BYTES:
        raise OptionsFileError(
            str(path), f"larger than {MAX_OPTIONS_BYTES} bytes: not an options file"
        )
    try:
        return data.decode("utf-8-sig")  # editors on Windows like to start with a BOM
    except UnicodeDecodeError as exc:
        raise OptionsFileError(
            str(path), f"not UTF-8 text (invalid byte at offset {exc.start})"
        ) from None


def load_options(path: str | Path) -> Options:
    """Read and parse the options file at ``path``."""
    return parse_options(read_options_text(path), path=str(path))
