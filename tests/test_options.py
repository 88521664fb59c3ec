"""The options file parser (broker/options.py): what it reads, what it ignores, what it
refuses (file:line:col), its limits, and its msgpack-able map."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from zbroker.broker.license import LicenseError
from zbroker.broker.options import (
    MAX_OPTIONS_BYTES,
    Ignored,
    OptionLine,
    Options,
    OptionsFileError,
    OptionsMapError,
    OptionsSyntaxError,
    load_options,
    parse_options,
)

pytestmark = pytest.mark.unit

# Every keyword zbroker implements, in FlexNet's own examples where the guide has one
# (FlexNet Publisher License Administration Guide, docs.revenera.com/fnp/.../LicAdmin_Guide:
# GROUP, HOST_GROUP, GROUPCASEINSENSITIVE, INCLUDE, EXCLUDE, INCLUDEALL, RESERVE, MAX,
# TIMEOUT, TIMEOUTALL, LINGER pages; "Simple Options File Example" of the End User Guide).
SITE = """\
# a site's options file
GROUP Hackers bob howard james
GROUP Hackers \\
      mel
USER_GROUP stars joe barbara susan
HOST_GROUP Pacific tokyo seattle auckland
GROUPCASEINSENSITIVE ON
RESERVE 1 compile USER robert
RESERVE 3 compile HOST mainline
EXCLUDE compile USER lori
NOLOG QUEUED
INCLUDE f1 USER bob
EXCLUDE f1 USER hank
INCLUDEALL USER jane
EXCLUDEALL GROUP Hackers
RESERVE 1 f1 USER mel
MAX 5 f1 USER jan
max 2 f1 user ALL_USERS
MAX 3 f1 GROUP ALL_GROUPS
TIMEOUT f1 3600
TIMEOUTALL 7200
LINGER f1 3600
INCLUDE cad:VERSION=2.0 INTERNET 10.1.*.*
EXCLUDE "cad:VERSION=2.0" HOST_GROUP Pacific
DEBUGLOG +/var/log/debug.log
"""


def test_a_site_file_reads_every_keyword() -> None:
    o = parse_options(SITE, path="site.opt")
    assert o.groups == (
        ("Hackers", ("bob", "howard", "james", "mel")),  # lines of one name add up
        ("stars", ("joe", "barbara", "susan")),
    )
    assert o.host_groups == (("Pacific", ("tokyo", "seattle", "auckland")),)
    assert o.case_insensitive
    assert [ln.keyword for ln in o.lines] == [
        "RESERVE", "RESERVE", "EXCLUDE", "INCLUDE", "EXCLUDE", "INCLUDEALL", "EXCLUDEALL",
        "RESERVE", "MAX", "MAX", "MAX", "TIMEOUT", "TIMEOUTALL", "LINGER", "INCLUDE", "EXCLUDE",
    ]  # fmt: skip
    assert o.lines[0] == OptionLine("RESERVE", 8, "compile", None, "USER", "robert", 1)
    assert o.lines[9] == OptionLine("MAX", 18, "f1", None, "USER", "ALL_USERS", 2)
    assert o.lines[12] == OptionLine("TIMEOUTALL", 21, number=7200)
    assert o.lines[14] == OptionLine("INCLUDE", 23, "cad", "2.0", "INTERNET", "10.1.*.*")
    assert o.lines[15] == OptionLine("EXCLUDE", 24, "cad", "2.0", "HOST_GROUP", "Pacific")
    assert o.ignored == (
        Ignored(11, "NOLOG", "is not implemented by zbroker"),
        Ignored(25, "DEBUGLOG", "is not implemented by zbroker"),
    )


def test_ignored_keywords_are_reported_once_each_with_file_and_line() -> None:
    text = "NOLOG QUEUED\nNOLOG DENIED\nREPORTLOG +r.log\nINCLUDE f1:VENDOR_STRING=x USER bob\n"
    o = parse_options(text, path="x.opt")
    assert o.lines == ()
    assert o.warnings() == [
        "x.opt:1: NOLOG is not implemented by zbroker: ignored (also line 2)",
        "x.opt:3: REPORTLOG is not implemented by zbroker: ignored",
        "x.opt:4: INCLUDE with the feature qualifier VENDOR_STRING= is not supported "
        "by zbroker: ignored",
    ]


def test_comments_continuations_and_blank_lines() -> None:
    text = "# c\n\n   # indented comment\nEXCLUDE \\\n  f1 \\\n  USER hank\n"
    o = parse_options(text, path="c.opt")
    assert o.lines == (OptionLine("EXCLUDE", 4, "f1", None, "USER", "hank"),)


def test_a_comment_after_a_lines_words_ends_it_on_every_kind_of_line() -> None:
    text = (
        "GROUP eng ann bob     # lines of one name add up\n"
        "HOST_GROUP lab ws1 #ws2 was sold\n"
        "EXCLUDE f1 GROUP eng  # no engineer on f1\n"
        "MAX 2 f1 USER ALL_USERS #each\n"
        "TIMEOUTALL 3600 # an hour\n"
        "GROUPCASEINSENSITIVE OFF # as FlexNet\n"
        "GROUP eng a#b\n"  # a # inside a word is part of the name
    )
    o = parse_options(text, path="c.opt")
    assert o.groups == (("eng", ("ann", "bob", "a#b")),)
    assert o.host_groups == (("lab", ("ws1",)),)
    assert [(ln.keyword, ln.feature, ln.kind, ln.name, ln.number) for ln in o.lines] == [
        ("EXCLUDE", "f1", "GROUP", "eng", None),
        ("MAX", "f1", "USER", "ALL_USERS", 2),
        ("TIMEOUTALL", None, None, None, 3600),
    ]
    assert o.warnings() == []


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("GROUP eng ann \\\n# former staff below\n   bob\n", 2, 1),
        ("GROUP eng ann \\\n   # former staff below\n", 2, 4),
        ("GROUP eng ann # the team \\\n   bob\n", 1, 15),
    ],
)
def test_a_comment_inside_a_continued_line_is_refused(text: str, line: int, column: int) -> None:
    # read on, its words (or the next line's) would become members or rules of their own
    with pytest.raises(OptionsSyntaxError) as caught:
        parse_options(text, path="c.opt")
    assert (caught.value.line, caught.value.column) == (line, column), str(caught.value)
    assert "put it on a line of its own" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "line", "column", "expected", "found"),
    [
        ("INCLUDE f1 USR bob", 1, 12, "a principal type", "'USR'"),
        ("GROUP lonely # nobody yet", 1, 13, "a member name", "end of line"),
        ("INCLUDE f1 USER", 1, 16, "a USER name", "end of line"),
        ("INCLUDE f1 USER bob extra", 1, 21, "the end of the line", "'extra'"),
        ("\n\nRESERVE x f1 USER bob", 3, 9, "a count of seats", "'x'"),
        ("RESERVE 1000001 f1 USER bob", 1, 9, "a count of seats (0 to 1000000)", "'1000001'"),
        ("MAX 1 f1 GROUP nobody", 1, 16, "a GROUP defined by a GROUP line", "'nobody'"),
        ("GROUP g a\nINCLUDE f1 HOST_GROUP g", 2, 23, "a HOST_GROUP defined", "'g'"),
        ("TIMEOUT f1", 1, 11, "a number of seconds", "end of line"),
        ("TIMEOUT f1 -5", 1, 12, "a number of seconds", "'-5'"),
        ("TIMEOUTALL 999999999999999999999", 1, 12, "a number of seconds", "'9999"),
        ("LINGER f1 1.5", 1, 11, "a number of seconds", "'1.5'"),
        ("INCLUDE f1:VERSION=two USER bob", 1, 9, "a VERSION= that is a version", "'f1:"),
        ("INCLUDE f1: USER bob", 1, 9, "a feature qualifier KEY=value", "'f1:'"),
        ("INCLUDE f/1 USER bob", 1, 9, "a feature name", "'f/1'"),
        ('INCLUDE "f1:VERSION=2.0 USER bob', 1, 33, 'the closing "', "end of line"),
        ("INCLUDE f1 INTERNET host.example", 1, 21, "an IP address", "'host.example'"),
        ("GROUPCASEINSENSITIVE maybe", 1, 22, "ON or OFF", "'maybe'"),
        ("GROUP lonely", 1, 13, "a member name", "end of line"),
        ("INCLUDEALL f1 USER bob", 1, 12, "a principal type", "'f1'"),
        (f"EXCLUDE f1 USER {'u' * 257}", 1, 17, "at most 256 characters", "'uuuu"),
    ],
)
def test_a_malformed_line_refuses_the_file_with_line_and_column(
    text: str, line: int, column: int, expected: str, found: str
) -> None:
    with pytest.raises(OptionsSyntaxError) as caught:
        parse_options(text, path="bad.opt")
    err = caught.value
    assert (err.path, err.line, err.column) == ("bad.opt", line, column), str(err)
    assert expected in err.expected
    assert err.found.startswith(found)
    assert str(err).startswith(f"bad.opt:{line}:{column}: expected ")
    assert isinstance(err, LicenseError)  # the node's start refuses it as a config error


def test_a_syntax_error_anywhere_refuses_the_whole_file() -> None:
    text = "EXCLUDE f1 USER hank\nNOLOG QUEUED\nRESERVE 1 f1 USR mel\n"
    with pytest.raises(OptionsSyntaxError, match=r"^s\.opt:3:"):
        parse_options(text, path="s.opt")


def test_limits_on_reserve_lines_and_members() -> None:
    many = "RESERVE 1 f1 USER u\n" * 10_001
    with pytest.raises(OptionsSyntaxError, match="at most 10000 RESERVE lines"):
        parse_options(many, path="m.opt")
    members = "GROUP g " + " ".join(f"u{i}" for i in range(100_001))
    with pytest.raises(OptionsSyntaxError, match="at most 100000 group members"):
        parse_options(members, path="m.opt")


def test_loading_names_the_file(tmp_path: Path) -> None:
    base = tmp_path
    good = base / "ok.opt"
    good.write_text("\ufeffEXCLUDE f1 USER hank\n", encoding="utf-8")  # a BOM is fine
    assert load_options(good).lines[0].name == "hank"
    with pytest.raises(OptionsFileError, match="no such options file"):
        load_options(base / "missing.opt")
    big = base / "big.opt"
    big.write_bytes(b"#" * (MAX_OPTIONS_BYTES + 1))
    with pytest.raises(OptionsFileError, match="larger than"):
        load_options(big)
    binary = base / "bin.opt"
    binary.write_bytes(b"EXCLUDE \xff")
    with pytest.raises(OptionsFileError, match="not UTF-8"):
        load_options(binary)


def test_the_map_round_trips_through_msgpack() -> None:
    o = parse_options(SITE, path="site.opt")
    packed = msgpack.packb(o.to_map(), use_bin_type=True)
    back = Options.from_map(msgpack.unpackb(packed, raw=False))
    assert back == o
    assert hash(back) == hash(o)  # frozen all the way down


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.update(lines=[["INCLUDE", 1, "f1", None, "USER", "bob"]]), "7 fields"),
        (lambda m: m.update(lines=[["FOO", 1, "f1", None, "USER", "b", None]]), "keyword"),
        (lambda m: m.update(lines=[["INCLUDE", 1, "f1", None, "WHO", "b", None]]), "type"),
        (lambda m: m.update(lines=[["INCLUDE", 1, None, None, "USER", "b", None]]), "feature"),
        (lambda m: m.update(lines=[["MAX", 1, "f1", None, "USER", "b", None]]), "number"),
        (lambda m: m.update(lines=[["MAX", 1, "f1", "x", "USER", "b", 1]]), "version"),
        (lambda m: m.update(lines=[["MAX", 1, "f1", None, "USER", "b", -1]]), "range"),
        (lambda m: m.update(lines=[["MAX", 1, "f1", None, "GROUP", "nope", 1]]), "not defined"),
        (lambda m: m.update(groups=[["g", "a b"]]), "groups"),
        (lambda m: m.update(case_insensitive=1), "case_insensitive"),
        (lambda m: m.pop("path"), "path"),
    ],
)
def test_a_bad_map_is_refused_naming_the_field(mutate: object, message: str) -> None:
    m = parse_options("GROUP g a\nMAX 1 f1 GROUP g\n", path="p.opt").to_map()
    mutate(m)  # type: ignore[operator]
    with pytest.raises(OptionsMapError, match=message):
        Options.from_map(m)
    with pytest.raises(OptionsMapError):
        Options.from_map(["not", "a", "map"])


def _demo_with_options(tmp_path: Path, text: str) -> Path:
    from zbroker.broker.demo import write_demo

    config = write_demo(tmp_path / "demo", secure=False)
    (tmp_path / "demo" / "site.opt").write_text(text)
    config.write_text('options = "site.opt"\n' + config.read_text())
    return config


def test_a_broken_options_file_stops_up_and_reread_but_not_the_other_commands(
    tmp_path: Path,
) -> None:
    # An administrator half-way through an edit must still see, remove from and stop the
    # triad: only what reads the file for the nodes refuses it.
    from click.testing import CliRunner

    from zbroker.broker.cli import main
    from zbroker.broker.config import load_config

    config = _demo_with_options(tmp_path, "NOLOG QUEUED\nEXCLUDE cad USR bob\n")
    assert load_config(config).options == tmp_path / "demo" / "site.opt"
    for command in (["up"], ["reread", "--timeout", "0.2"]):
        result = CliRunner().invoke(main, [*command, "--config", str(config)])
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1  # one line; no node started or asked
        assert "site.opt:2:13: expected a principal type" in result.stderr
    result = CliRunner().invoke(main, ["status", "--config", str(config), "--timeout", "0.2"])
    assert result.exit_code == 1 and "site.opt" not in result.output  # no node up: 1


def test_reread_prints_the_warnings_a_node_would_only_log(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from zbroker.broker.cli import main
    from zbroker.broker.config import load_config
    from zbroker.broker.node import read_files

    text = "EXCLUDEE viewer USER mallory\nEXCLUDE veiwer USER mallory\nMAX 1 veiwer USER ann\n"
    config = _demo_with_options(tmp_path, text)
    _, options, warnings = read_files(load_config(config))
    assert options is not None and len(options.lines) == 2
    site = tmp_path / "demo" / "site.opt"
    assert warnings == [
        f"{site}:1: EXCLUDEE is not implemented by zbroker (did you mean EXCLUDE?): ignored",
        f"{site}:2: no license line serves feature 'veiwer' (did you mean viewer?): the "
        "lines naming it (2, 3) apply to nothing",
    ]
    result = CliRunner().invoke(main, ["reread", "--config", str(config), "--timeout", "0.2"])
    assert result.exit_code == 1  # no node answered
    for line in warnings:
        assert f"zbroker: warning: {line}\n" in result.stderr
