"""The license file parser: statements, SERVER rules, positioned syntax errors, refusals."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from zbroker.broker.license import (
    License,
    LicenseError,
    LicenseFileError,
    LicenseSyntaxError,
    load_license,
    parse_license,
    parse_syntax,
    read_servers,
    sign_license_text,
)

pytestmark = pytest.mark.unit

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()

TRIAD = """\
SERVER alpha ANY tcp://127.0.0.1:27001
SERVER beta  ANY tcp://127.0.0.1:27002
SERVER gamma ANY tcp://127.0.0.1:27003
"""

DEMO = (
    TRIAD
    + """\
# issued to ACME Inc.
VENDOR acme
FEATURE cad    acme 2.0 31-dec-2027 10
INCREMENT cad  acme 2.0 permanent    5
FEATURE solver acme 1.5 permanent    2 user_based USERS=ann,bob HOSTS=h1
"""
)


def parse(text: str) -> License:
    return parse_license(text, path="demo.lic", public_key=None)


def syntax_error(text: str, *, servers_required: bool = True) -> LicenseSyntaxError:
    with pytest.raises(LicenseSyntaxError) as info:
        parse_syntax(text, path="demo.lic", servers_required=servers_required)
    return info.value


# --- what a good file gives ------------------------------------------------------------


def test_demo_file_servers_vendor_and_entitlements() -> None:
    lic = parse_license(DEMO, path="demo.lic", public_key=None)
    assert [s.name for s in lic.servers] == ["alpha", "beta", "gamma"]
    assert [s.line for s in lic.servers] == [1, 2, 3]
    assert lic.servers[1].endpoint == "tcp://127.0.0.1:27002"
    assert lic.servers[0].hostid == "ANY"
    assert lic.vendor == "acme"
    assert lic.refused == []
    cad, extra, solver = lic.entitlements
    assert (cad.feature, cad.version, cad.count) == ("cad", "2.0", 10)
    assert cad.expires == datetime.date(2027, 12, 31)
    assert cad.source == "demo.lic:6"
    assert (extra.count, extra.expires, extra.source) == (5, None, "demo.lic:7")
    assert solver.users == frozenset({"ann", "bob"})
    assert solver.hosts == frozenset({"h1"})
    assert cad.users is None and cad.hosts is None


def test_keywords_and_attribute_keys_are_case_insensitive() -> None:
    text = "server a any tcp://h:1 key=abc\nVendor acme\nincrement cad acme 1 PERMANENT 3 users=u\n"
    syntax = parse_syntax(text, path="x.lic")
    assert syntax.servers[0].attrs == {"KEY": "abc"}
    assert syntax.servers[0].hostid == "ANY"
    (line,) = syntax.lines
    assert (line.keyword, line.expiry, line.attrs) == ("INCREMENT", "permanent", {"USERS": "u"})


def test_comments_blank_lines_and_crlf_are_ignored() -> None:
    text = "  # a comment\r\n\r\nSERVER a ANY tcp://h:1\r\n\t# another\r\n"
    text += "FEATURE f v 1 permanent 1\r\n"
    lic = parse_license(text, path="x.lic", public_key=None)
    assert len(lic.servers) == 1
    assert [e.source for e in lic.entitlements] == ["x.lic:5"]


def test_continuation_lines_join_into_one_statement() -> None:
    text = "SERVER a ANY \\\n  tcp://h:1\nFEATURE cad acme \\\n 2.0 \\\n\tpermanent 4 flag\\\n"
    syntax = parse_syntax(text, path="x.lic")
    assert syntax.servers[0].endpoint == "tcp://h:1"
    (line,) = syntax.lines
    assert (line.count, line.flags, line.line, line.last_line) == (4, ("flag",), 3, 6)


def test_month_names_are_case_insensitive_and_dates_checked() -> None:
    syntax = parse_syntax("FEATURE f v 1 9-FeB-2028 1", path="x", servers_required=False)
    assert syntax.lines[0].expires == datetime.date(2028, 2, 9)
    assert syntax.lines[0].expiry == "9-feb-2028"
    err = syntax_error("FEATURE f v 1 30-feb-2028 1", servers_required=False)
    assert (err.line, err.column) == (1, 15)
    assert "exists on the calendar" in str(err)


def test_expired_lines_are_kept_for_the_ledger_to_judge() -> None:
    lic = parse(TRIAD + "FEATURE old v 1 1-jan-2001 1\n")
    (old,) = lic.entitlements
    assert old.expired_on(datetime.date(2001, 1, 2))


def test_vendor_line_is_optional() -> None:
    lic = parse_license(TRIAD + "FEATURE f anyone 1 permanent 1", path="x", public_key=None)
    assert lic.vendor is None and len(lic.entitlements) == 1


# --- SERVER count rules ----------------------------------------------------------------


def test_one_server_is_a_single_server() -> None:
    assert len(parse_syntax("SERVER solo ANY tcp://h:1\n", path="x").servers) == 1


def test_two_servers_name_the_second_server_line() -> None:
    err = syntax_error("# c\nSERVER a ANY tcp://h:1\n\nSERVER b ANY tcp://h:2\n")
    assert (
        str(err) == "demo.lic:4:1: expected 1 SERVER line (a single server) or 3 (a triad), found 2"
    )


def test_four_servers_name_the_fourth_server_line() -> None:
    err = syntax_error(TRIAD + "server delta ANY tcp://h:4\n")
    assert (err.line, err.column) == (4, 1)
    assert "at most 3 SERVER lines" in str(err)


def test_no_server_is_an_error_unless_signing() -> None:
    text = "FEATURE f v 1 permanent 1\n"
    assert "found none" in str(syntax_error(text))
    assert parse_syntax(text, path="x", servers_required=False).servers == []


def test_duplicate_server_name_or_endpoint() -> None:
    err = syntax_error("SERVER a ANY tcp://h:1\nSERVER b ANY tcp://h:2\nSERVER a ANY tcp://h:3\n")
    assert str(err) == "demo.lic:3:8: expected a server name not already used (line 1), found 'a'"
    err = syntax_error("SERVER a ANY tcp://h:1\nSERVER b ANY tcp://h:1\nSERVER c ANY tcp://h:3\n")
    assert (err.line, err.column, err.found) == (2, 14, "'tcp://h:1'")


def test_server_attrs_are_kept() -> None:
    (server,) = parse_syntax("SERVER a host7 ipc:///tmp/a KEY=pub123 X=1", path="x").servers
    assert (server.hostid, server.endpoint, server.attrs) == (
        "host7",
        "ipc:///tmp/a",
        {"KEY": "pub123", "X": "1"},
    )


def test_read_servers_and_load_license(tmp_path: Path) -> None:
    path = tmp_path / "demo.lic"
    path.write_text(DEMO)
    assert [s.name for s in read_servers(path)] == ["alpha", "beta", "gamma"]
    assert load_license(path, None).entitlements[0].source == f"{path}:6"


def test_unreadable_license_file_is_typed(tmp_path: Path) -> None:
    with pytest.raises(LicenseFileError, match="no such license file"):
        load_license(tmp_path / "missing.lic", None)
    bad = tmp_path / "bad.lic"
    bad.write_bytes(b"SERVER \xff")
    with pytest.raises(LicenseError, match="not UTF-8"):
        load_license(bad, None)


# --- syntax errors: exact line, column and words ---------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "column", "expected", "found"),
    [
        (
            "FEATURE cad acme 2.0 31-dec-2027 ten",
            1,
            34,
            "a seat count (a whole number from 1 to 1000000)",
            "'ten'",
        ),
        ("FEATURE cad acme 2.0 31-dec-2027 0", 1, 34, "a seat count", "'0'"),
        # Numbers past the wire's range: a count msgpack cannot pack, one past MAX_COUNT,
        # digits Python refuses to convert, a version part past 2^31-1, year 0.
        (
            "FEATURE cad acme 2.0 permanent 18446744073709551616",
            1,
            32,
            "from 1 to 1000000",
            "'18446744073709551616'",
        ),
        ("FEATURE cad acme 2.0 permanent 1000001", 1, 32, "from 1 to 1000000", "'1000001'"),
        ("FEATURE cad acme 2.0 permanent " + "9" * 5000, 1, 32, "a seat count", f"{'9' * 40!r}..."),
        (
            "FEATURE cad acme 2.2147483648 permanent 1",
            1,
            18,
            "each part from 0 to 2147483647",
            "'2.2147483648'",
        ),
        (
            "FEATURE cad acme " + "1." * 16 + "1 permanent 1",
            1,
            18,
            "at most 32 characters",
            repr("1." * 16 + "1"),
        ),
        ("FEATURE cad acme 2.0 1-jan-0000 1", 1, 22, "year 1 to 9999", "'1-jan-0000'"),
        (
            "FEATURE " + "c" * 257 + " acme 2.0 permanent 1",
            1,
            9,
            "at most 256 characters",
            f"{'c' * 40!r}...",
        ),
        (
            "SERVER a ANY tcp://127.0.0.1:65536",
            1,
            14,
            "a TCP port from 1 to 65535",
            "'tcp://127.0.0.1:65536'",
        ),
        (
            "SERVER a ANY tcp://127.0.0.1:0",
            1,
            14,
            "a TCP port from 1 to 65535",
            "'tcp://127.0.0.1:0'",
        ),
        ("FEATURE cad acme 2.0 31-dec-2027", 1, 33, "a seat count", "end of line"),
        ("FEATURE cad acme 2.x permanent 1", 1, 18, "a version (dotted decimal", "'2.x'"),
        ("FEATURE cad acme 2.0 31/12/2027 1", 1, 22, "an expiry date", "'31/12/2027'"),
        ("FEATURE cad acme 2.0 31-foo-2027 1", 1, 22, "an expiry date", "'31-foo-2027'"),
        ("FEATUR cad acme 2.0 permanent 1", 1, 1, "a keyword (SERVER, VENDOR", "'FEATUR'"),
        ("FEATURE cad acme 2.0 permanent 1 10", 1, 34, "a KEY=value attribute or a flag", "'10'"),
        ("FEATURE cad acme 2.0 permanent 1 A=1 a=2", 1, 38, "each attribute at most once", "'a=2'"),
        ("FEATURE cad acme 2.0 permanent 1 NOTE=", 1, 34, "a value after NOTE=", "'NOTE='"),
        (
            "FEATURE cad acme 2.0 permanent 1 USERS=a,,b",
            1,
            34,
            "a comma-separated list",
            "'USERS=a,,b'",
        ),
        ("FEATURE cad acme 1 permanent 1 f f", 1, 34, "each flag at most once", "'f'"),
        ("FEATURE c=d acme 1 permanent 1", 1, 9, "a feature name", "'c=d'"),
        (
            "  FEATURE cad acme 1 permanent 1 # note",
            1,
            34,
            "a KEY=value attribute or a flag",
            "'#'",
        ),
        ("SERVER a tcp://h:1", 1, 10, "a host id", "'tcp://h:1'"),
        ("SERVER a ANY", 1, 13, "an endpoint such as tcp://", "end of line"),
        ("SERVER a ANY http://h:1", 1, 14, "an endpoint", "'http://h:1'"),
        ("SERVER a ANY tcp://h:70000", 1, 14, "a TCP port from 1 to 65535", "'tcp://h:70000'"),
        ("SERVER a ANY tcp://h:1 flag", 1, 24, "a KEY=value attribute", "'flag'"),
        ("VENDOR acme\nVENDOR acme", 2, 1, "one VENDOR line (there is one on line 1)", "'VENDOR'"),
        ("VENDOR acme\nFEATURE cad acne 1 permanent 1", 2, 13, "vendor 'acme'", "'acne'"),
        ("FEATURE cad acne 1 permanent 1\nVENDOR acme", 1, 13, "VENDOR line 2", "'acne'"),
    ],
)
def test_syntax_errors_are_positioned(
    text: str, line: int, column: int, expected: str, found: str
) -> None:
    err = syntax_error(text, servers_required=False)
    assert (err.path, err.line, err.column, err.found) == ("demo.lic", line, column, found)
    assert expected in err.expected
    assert str(err).startswith(f"demo.lic:{line}:{column}: expected ")
    assert str(err).endswith(f", found {found}")


def test_message_format_matches_the_spec() -> None:
    err = syntax_error("\n\n\n\nFEATURE cad acme 2.0 31-dec-2027 ten", servers_required=False)
    assert str(err) == (
        "demo.lic:5:34: expected a seat count (a whole number from 1 to 1000000), found 'ten'"
    )


def test_error_positions_are_physical_across_continuation_lines() -> None:
    text = "# header\nFEATURE cad acme \\\n    2.0 \\\n\t31-dec-2027   ten \\\n  SIGN=00\n"
    err = syntax_error(text, servers_required=False)
    assert (err.line, err.column, err.found) == (4, 16, "'ten'")
    # A missing field is reported just after the last word, on its own physical line.
    err = syntax_error("FEATURE cad \\\n   acme 2.0 \\\n   permanent\n", servers_required=False)
    assert (err.line, err.column, err.found) == (3, 13, "end of line")


def test_comment_inside_continuation_is_not_a_comment() -> None:
    err = syntax_error(
        "FEATURE cad acme 1 permanent 1 \\\n# not a comment\n", servers_required=False
    )
    assert (err.line, err.column, err.found) == (2, 1, "'#'")


# --- signatures: refused lines, the others serve ---------------------------------------


def test_signed_lines_serve_and_unsigned_are_refused() -> None:
    signed = sign_license_text(DEMO, KEY)
    text = signed + "FEATURE extra acme 1.0 permanent 1\n"
    lic = parse_license(text, path="demo.lic", public_key=PUB)
    assert [e.feature for e in lic.entitlements] == ["cad", "cad", "solver"]
    (refused,) = lic.refused
    assert refused.line == signed.count("\n") + 1
    assert str(refused) == (
        f"demo.lic:{refused.line}: FEATURE extra refused: no signature (SIGN= is missing)"
    )


def test_bad_signature_is_refused_with_a_message_naming_file_and_line() -> None:
    text = TRIAD + "VENDOR acme\nFEATURE cad acme 2.0 permanent 10 SIGN=" + "ab" * 64 + "\n"
    lic = parse_license(text, path="demo.lic", public_key=PUB)
    assert lic.entitlements == []
    assert [str(r) for r in lic.refused] == [
        "demo.lic:5: FEATURE cad refused: signature does not verify against the vendor key"
    ]


def test_malformed_signature_is_refused_not_raised() -> None:
    lic = parse_license(
        TRIAD + "INCREMENT cad acme 2.0 permanent 1 SIGN=xyz\n", path="d", public_key=PUB
    )
    assert lic.refused[0].keyword == "INCREMENT"
    assert "not 128 hex digits" in lic.refused[0].why


def test_without_a_public_key_every_line_serves() -> None:
    lic = parse_license(
        TRIAD + "FEATURE cad acme 2.0 permanent 1 SIGN=xyz\n", path="d", public_key=None
    )
    assert len(lic.entitlements) == 1 and lic.refused == []


def test_a_file_past_its_bounds_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reload delta of any file that parses must fit one peer message (small bounds
    here for speed: the module's are 100,000 lines and 16 MiB)."""
    import zbroker.broker.license

    monkeypatch.setattr(zbroker.broker.license, "MAX_LINES", 2)
    err = syntax_error(DEMO)  # its third FEATURE/INCREMENT line
    assert (err.line, err.expected) == (8, "at most 2 FEATURE/INCREMENT lines")
    monkeypatch.setattr(zbroker.broker.license, "MAX_LICENSE_BYTES", 100)
    path = tmp_path / "big.lic"
    path.write_text(DEMO)
    with pytest.raises(LicenseFileError, match="larger than 100 bytes"):
        load_license(path, None)
