"""Which lines of a license file serve, and how its words are read (probe 2, license file).

Only the first FEATURE line of a feature serves (INCREMENT adds seats), and ``zbroker
vendor sign`` refuses what the nodes would leave out; double-quoted values as FlexNet
writes them (``VENDOR_STRING="site license"``, a quoted ``SIGN=`` over continuation
lines); CR-only line ends; status's wording of a line's days to expiry.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from zbroker.broker.license import (
    LicenseSyntaxError,
    LicenseUnservedError,
    parse_license,
    parse_syntax,
    sign_license_text,
)
from zbroker.broker.seats import Catalog
from zbroker.broker.signing import canonical_form
from zbroker.broker.status import render
from zbroker.broker.vendor_cli import vendor
from zbroker.clients.licfile import parse_servers

pytestmark = pytest.mark.unit

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()
SERVER = "SERVER alpha ANY tcp://127.0.0.1:27001\n"


def signed_each(*lines: str) -> str:
    """Each line signed on its own: a file ``sign_license_text`` would refuse to sign."""
    return "".join(sign_license_text(line + "\n", KEY) for line in lines)


def seats(text: str, feature: str = "cad") -> int:
    lic = parse_license(SERVER + text, path="site.lic", public_key=PUB)
    return sum(
        pool.total(datetime.date(2026, 1, 1)) for pool in Catalog(lic.entitlements).pools(feature)
    )


# --- A: only the first FEATURE line of a feature serves --------------------------------


def test_a_second_feature_line_of_a_feature_adds_no_seats_and_is_named_with_the_first() -> None:
    text = signed_each(
        "FEATURE cad acme 2.0 31-dec-2030 10",
        "FEATURE cad acme 2.0 31-dec-2031 10",  # the renewal, pasted below the old line
    )
    lic = parse_license(SERVER + text, path="site.lic", public_key=PUB)
    assert [e.source for e in lic.entitlements] == ["site.lic:2"]
    assert seats(text) == 10
    (refused,) = lic.refused
    assert refused.line == 4 and refused.keyword == "FEATURE"
    message = str(refused)
    assert message.startswith("site.lic:4: FEATURE cad refused: FEATURE line 2 already gives cad")
    assert "INCREMENT" in message
    assert len(lic.signed) == 1  # the left-out line is not replicated either


@pytest.mark.parametrize(
    ("lines", "total"),
    [
        # INCREMENT always adds, before or after the FEATURE line, at any version
        (["FEATURE cad acme 2.0 permanent 10", "INCREMENT cad acme 2.0 permanent 5"], 15),
        (["INCREMENT cad acme 2.0 permanent 5", "FEATURE cad acme 2.0 permanent 10"], 15),
        (["INCREMENT cad acme 2.0 permanent 5", "INCREMENT cad acme 2.0 permanent 6"], 11),
        # a second FEATURE line at another version or date is still a second FEATURE line
        (["FEATURE cad acme 1.0 permanent 3", "FEATURE cad acme 2.0 permanent 10"], 3),
        (
            [
                "FEATURE cad acme 2.0 permanent 10",
                "INCREMENT cad acme 2.0 permanent 5",
                "FEATURE cad acme 2.0 permanent 7 VENDOR_STRING=renewal",
            ],
            15,
        ),
    ],
)
def test_increment_lines_add_and_later_feature_lines_do_not(lines: list[str], total: int) -> None:
    assert seats(signed_each(*lines)) == total


def test_other_features_keep_their_own_first_feature_line() -> None:
    text = signed_each(
        "FEATURE cad acme 2.0 permanent 10",
        "FEATURE solver acme 2.0 permanent 2",
        "FEATURE cad acme 2.0 permanent 4",
    )
    assert (seats(text, "cad"), seats(text, "solver")) == (10, 2)


def test_a_feature_line_that_does_not_verify_leaves_the_next_one_first() -> None:
    good = signed_each("FEATURE cad acme 2.0 permanent 10")
    forged = good.replace(" 10 ", " 99 ")  # its signature no longer verifies
    text = forged + signed_each("FEATURE cad acme 2.0 permanent 4")
    lic = parse_license(SERVER + text, path="site.lic", public_key=PUB)
    assert [r.why for r in lic.refused] == ["signature does not verify against the vendor key"]
    assert seats(text) == 4


def test_without_a_key_the_first_feature_line_rule_still_holds() -> None:
    text = SERVER + "FEATURE cad acme 2.0 permanent 10\nFEATURE cad acme 2.0 permanent 4\n"
    lic = parse_license(text, path="site.lic", public_key=None)
    assert [e.count for e in lic.entitlements] == [10]
    assert [r.line for r in lic.refused] == [3]


# --- B: the vendor does not sign what the nodes leave out -------------------------------


@pytest.mark.parametrize(
    ("body", "line", "why"),
    [
        (
            "INCREMENT cad acme 2.0 permanent 5\nINCREMENT cad acme 2.0 permanent 5\n",
            3,
            "a copy of line 2",
        ),
        (
            "FEATURE cad acme 2.0 31-dec-2030 10\nFEATURE cad acme 2.0 31-dec-2031 10\n",
            3,
            "FEATURE line 2 already gives cad its seats",
        ),
        (  # written differently, the same canonical form: still a copy
            "INCREMENT cad acme 2.0 permanent 5 \\\n  NOTE=x\n"
            "inCREMENT cad acme 2.0 permanent 05 note=x\n",
            4,
            "a copy of line 2",
        ),
    ],
)
def test_sign_refuses_a_file_with_a_line_the_nodes_would_leave_out(
    body: str, line: int, why: str
) -> None:
    with pytest.raises(LicenseUnservedError) as caught:
        sign_license_text("VENDOR acme\n" + body, KEY, path="order.txt")
    (refused,) = caught.value.refused
    assert (refused.path, refused.line) == ("order.txt", line)  # where it is in the input
    assert why in refused.why
    assert str(refused) in str(caught.value)


def _keys(tmp_path: Path) -> tuple[Path, Path]:
    key_path, pub_path = tmp_path / "vendor.key", tmp_path / "vendor.pub"
    key_path.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pub_path.write_bytes(
        PUB.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_path, pub_path


def test_cli_sign_refuses_duplicates_like_verify_and_writes_nothing(tmp_path: Path) -> None:
    key_path, pub_path = _keys(tmp_path)
    order = tmp_path / "order.txt"
    order.write_text(
        "VENDOR acme\nINCREMENT cad acme 2.0 permanent 5\nINCREMENT cad acme 2.0 permanent 5\n"
    )
    out = tmp_path / "order.lic"
    runner = CliRunner()
    result = runner.invoke(vendor, ["sign", str(order), "--key", str(key_path), "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert f"{order}:3: INCREMENT cad refused: a copy of line 2" in result.output
    assert "not signed" in result.output
    assert not out.exists()

    # verify says the same of the same lines, signed one by one
    out.write_text(
        signed_each("INCREMENT cad acme 2.0 permanent 5", "FEATURE cad acme 2.0 permanent 1")
        + signed_each("INCREMENT cad acme 2.0 permanent 5", "FEATURE cad acme 2.0 permanent 2")
    )
    result = runner.invoke(vendor, ["verify", str(out), "--pub", str(pub_path)])
    assert result.exit_code == 1, result.output
    assert "INCREMENT cad refused: a copy of line 1" in result.output
    assert "FEATURE cad refused: FEATURE line 3 already gives cad its seats" in result.output
    assert result.output.endswith("2 verified, 2 refused\n")


# --- C: double-quoted values ------------------------------------------------------------


def test_a_quoted_value_holds_spaces_and_signs_as_its_canonical_form() -> None:
    text = (
        'VENDOR acme\nFEATURE cad acme 2.0 permanent 10 VENDOR_STRING="site   license" \\\n'
        '  NOTE="x"\n'
    )
    (line,) = parse_syntax(text, path="q.lic", servers_required=False).lines
    assert line.attrs == {"VENDOR_STRING": "site license", "NOTE": "x"}
    assert (
        line.canonical() == b'FEATURE cad acme 2.0 permanent 10 NOTE=x VENDOR_STRING="site license"'
    )
    signed = sign_license_text(text, KEY, path="q.lic")
    assert 'VENDOR_STRING="site   license"' in signed  # layout is kept
    lic = parse_license(SERVER + signed, path="q.lic", public_key=PUB)
    assert lic.refused == [] and len(lic.entitlements) == 1
    # quotes are layout: unquoted, or re-spaced, the line still verifies
    respaced = signed.replace('"site   license"', '" site license "').replace('"x"', "x")
    assert parse_license(SERVER + respaced, path="q.lic", public_key=PUB).refused == []
    # what a primary replicates reads back and verifies on another node
    (replicated,) = parse_syntax("\n".join(lic.signed), path="r", servers_required=False).lines
    assert replicated.canonical() == line.canonical()
    assert parse_license(SERVER + "\n".join(lic.signed), path="r", public_key=PUB).refused == []


def test_canonical_form_quotes_exactly_the_values_with_spaces() -> None:
    form = canonical_form(
        "FEATURE", "cad", "acme", "2.0", "permanent", 1, {"A": "b c", "D": "e"}, ()
    )
    assert form == b'FEATURE cad acme 2.0 permanent 1 A="b c" D=e'
    for bad in ('b"c', "b  c", " b", "b\tc"):
        with pytest.raises(ValueError):
            canonical_form("FEATURE", "cad", "acme", "2.0", "permanent", 1, {"A": bad}, ())


def test_a_quoted_signature_grouped_over_continuation_lines_verifies_and_re_signs() -> None:
    plain = sign_license_text("VENDOR acme\nFEATURE cad acme 2.0 permanent 10\n", KEY)
    hexes = plain.rsplit("SIGN=", 1)[1].strip()
    groups = [hexes[i : i + 4] for i in range(0, len(hexes), 4)]
    flexnet = (
        "VENDOR acme\nFEATURE cad acme 2.0 permanent 10 \\\n"
        f'\tSIGN="{" ".join(groups[:16])} \\\n\t{" ".join(groups[16:])}"\n'
        "INCREMENT cad acme 2.0 permanent 5\n"
    )
    lic = parse_license(SERVER + flexnet, path="f.lic", public_key=PUB)
    assert [r.line for r in lic.refused] == [6]  # the INCREMENT line has no SIGN= yet
    assert lic.entitlements[0].count == 10
    # signing replaces the quoted signature, all its lines, with one SIGN= word
    resigned = sign_license_text(flexnet, KEY, path="f.lic")
    assert resigned.count("SIGN=") == 2 and '"' not in resigned
    assert parse_license(SERVER + resigned, path="f.lic", public_key=PUB).refused == []


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ('VENDOR acme\nFEATURE cad acme 2.0 permanent 10 NOTE="open\n', 2, 40),
        ('VENDOR acme\nFEATURE cad acme 2.0 permanent 10 NOTE="a" B="c \\\n  d\n', 2, 46),
        ('SERVER a ANY tcp://h:1 KEY="x\n', 1, 28),
    ],
)
def test_an_unterminated_quote_names_the_file_line_and_column(
    text: str, line: int, column: int
) -> None:
    with pytest.raises(LicenseSyntaxError) as caught:
        parse_syntax(text, path="u.lic", servers_required=False)
    err = caught.value
    assert (err.path, err.line, err.column) == ("u.lic", line, column), str(err)
    assert str(err).startswith(f'u.lic:{line}:{column}: expected a closing "')


@pytest.mark.parametrize("word", ['NOTE=a"b c"', 'NOTE="a"b', '"NOTE"=a', '"flag"', 'NOTE=""'])
def test_a_quote_that_is_not_around_a_whole_value_is_a_syntax_error(word: str) -> None:
    with pytest.raises(LicenseSyntaxError) as caught:
        parse_syntax(
            f"FEATURE cad acme 2.0 permanent 10 {word}\n", path="q", servers_required=False
        )
    assert (caught.value.line, caught.value.column) == (1, 35)


def test_users_in_quotes_are_names_without_blanks_around_the_commas() -> None:
    (line,) = parse_syntax(
        'FEATURE cad acme 2.0 permanent 1 USERS="ann smith,bob"\n', path="q", servers_required=False
    ).lines
    assert line.entitlement("q").users == frozenset({"ann smith", "bob"})
    with pytest.raises(LicenseSyntaxError, match="comma-separated list"):
        parse_syntax(
            'FEATURE cad acme 2.0 permanent 1 USERS="ann, bob"\n', path="q", servers_required=False
        )


def test_the_client_reads_quoted_values_as_the_node_does() -> None:
    text = (
        'SERVER alpha ANY tcp://127.0.0.1:27001 NOTE="rack 4"\n'
        'FEATURE cad acme 2.0 permanent 1 VENDOR_STRING="a \\\n  SERVER b"\n'
    )
    (server,) = parse_servers(text, path="c.lic")
    assert server.attrs == {"NOTE": "rack 4"}
    assert parse_syntax(text, path="c.lic").servers == [server]


# --- D: CR-only line ends ----------------------------------------------------------------


def test_cr_only_line_ends_read_like_lf_and_sign_keeps_them() -> None:
    lf = (
        "VENDOR acme\n# a comment\nFEATURE cad acme 2.0 permanent 10 \\\n  NOTE=x\n"
        "INCREMENT cad acme 2.0 permanent 5\n"
    )
    cr = lf.replace("\n", "\r")
    signed = sign_license_text(cr, KEY, path="mac.lic")
    assert "\n" not in signed
    lic = parse_license(SERVER.replace("\n", "\r") + signed, path="mac.lic", public_key=PUB)
    assert lic.refused == [] and [e.source for e in lic.entitlements] == ["mac.lic:4", "mac.lic:7"]
    assert [
        e.source for e in parse_license(SERVER + lf, path="lf", public_key=None).entitlements
    ] == [
        "lf:4",
        "lf:6",
    ]
    with pytest.raises(LicenseSyntaxError) as caught:
        parse_syntax(
            "VENDOR acme\rFEATURE cad acme 2.0 permanent ten\r", path="m", servers_required=False
        )
    assert (caught.value.line, caught.value.column) == (2, 32)


# --- E: status's wording of a line's days to expiry -------------------------------------


@pytest.mark.parametrize(
    ("count", "days", "shown"),
    [
        (10, 29, "10 seats expire 2027-12-31 (in 29 days)"),
        (1, 1, "1 seat expires 2027-12-31 (tomorrow)"),
        (2, 0, "2 seats expire 2027-12-31 (today)"),
        (1, -1, "1 seat expires 2027-12-31 (expired: grants nothing new)"),
    ],
)
def test_status_says_seats_and_days_in_words(count: int, days: int, shown: str) -> None:
    line = {"count": count, "expires": "2027-12-31", "days": days, "source": "site.lic:7"}
    cad = {"name": "cad", "in_use": 0, "total": count, "queued": 0,
           "versions": [{"version": "2.0", "lines": [line]}]}  # fmt: skip
    text = render({"mode": "plain", "primary": None, "nodes": [], "features": [cad]})
    assert f"    v2.0 line site.lic:7: {shown}\n" in text + "\n"
