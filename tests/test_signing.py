"""Vendor keys, the canonical form, signing license text, tampering, and the vendor CLI."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from zbroker.broker.license import (
    LicenseSyntaxError,
    parse_license,
    parse_syntax,
    sign_license_text,
)
from zbroker.broker.signing import (
    LicenseError,
    LicenseKeyError,
    canonical_form,
    load_private_key,
    load_public_key,
    verify_signature,
    write_keypair,
)
from zbroker.broker.vendor_cli import vendor

pytestmark = pytest.mark.unit

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()
OTHER_KEY = Ed25519PrivateKey.generate()

TRIAD = """\
SERVER alpha ANY tcp://127.0.0.1:27001
SERVER beta  ANY tcp://127.0.0.1:27002
SERVER gamma ANY tcp://127.0.0.1:27003
"""
LINE = "FEATURE cad acme 2.0 31-dec-2027 10 USERS=ann,bob user_based"


def refused_whys(text: str, pub: Ed25519PublicKey = PUB) -> list[str]:
    lic = parse_license(text, path="t.lic", public_key=pub)
    return [r.why for r in lic.refused]


# --- key files -------------------------------------------------------------------------


def test_write_keypair_creates_loadable_keys_with_private_mode_0600(tmp_path: Path) -> None:
    private_path, public_path = write_keypair(tmp_path / "new" / "keys")
    assert (private_path.name, public_path.name) == ("vendor.key", "vendor.pub")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in private_path.read_bytes()
    assert b"BEGIN PUBLIC KEY" in public_path.read_bytes()
    private, public = load_private_key(private_path), load_public_key(public_path)
    assert verify_signature(public, b"x", private.sign(b"x").hex())


@pytest.mark.parametrize("existing", ["vendor.key", "vendor.pub"])
def test_write_keypair_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_text("precious")
    with pytest.raises(LicenseKeyError, match="refusing to overwrite") as info:
        write_keypair(tmp_path)
    assert existing in str(info.value)
    assert (tmp_path / existing).read_text() == "precious"


def test_missing_key_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(LicenseKeyError, match="no such key file") as info:
        load_private_key(tmp_path / "nope.key")
    assert info.value.path == str(tmp_path / "nope.key")
    with pytest.raises(LicenseKeyError, match=r"nope\.pub: no such key file"):
        load_public_key(tmp_path / "nope.pub")


def test_wrong_kinds_of_key_are_refused(tmp_path: Path) -> None:
    private_path, public_path = write_keypair(tmp_path)
    with pytest.raises(LicenseKeyError, match="not a PEM private key"):
        load_private_key(public_path)
    with pytest.raises(LicenseKeyError, match="not a PEM public key"):
        load_public_key(private_path)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_path = tmp_path / "ec.key"
    ec_path.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(LicenseKeyError, match="not an Ed25519 private key"):
        load_private_key(ec_path)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(LicenseKeyError, match="encrypted"):
        load_private_key(encrypted)
    assert issubclass(LicenseKeyError, LicenseError)


# --- canonical form --------------------------------------------------------------------

BASE = ("feature", "cad", "acme", "2.0", "31-DEC-2027", 10, {"users": "a", "HOSTS": "h"}, ["f"])


def test_canonical_form_is_as_documented() -> None:
    assert canonical_form(*BASE) == b"FEATURE cad acme 2.0 31-dec-2027 10 HOSTS=h USERS=a f"
    doc_example = canonical_form(
        "increment", "solver", "acme", "1.5", "PERMANENT", 2,
        {"users": "ann,bob", "HOSTS": "h1", "SIGN": "ab"}, ["user_based"],
    )  # fmt: skip
    assert doc_example == b"INCREMENT solver acme 1.5 permanent 2 HOSTS=h1 USERS=ann,bob user_based"


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, "INCREMENT"),
        (1, "cam"),
        (2, "acne"),
        (3, "2.00"),
        (4, "30-dec-2027"),
        (5, 11),
        (6, {"users": "b", "HOSTS": "h"}),
        (6, {"users": "a"}),
        (7, ["g"]),
        (7, []),
    ],
)
def test_every_field_changes_the_canonical_form(index: int, value: object) -> None:
    changed = list(BASE)
    changed[index] = value
    assert canonical_form(*changed) != canonical_form(*BASE)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        ("SERVER", "a", "v", "1", "permanent", 1, {}, []),
        ("FEATURE", "a b", "v", "1", "permanent", 1, {}, []),
        ("FEATURE", "a", "v", "1", "permanent", 0, {}, []),
        ("FEATURE", "a", "v", "1", "permanent", 1, {"K": ""}, []),
        ("FEATURE", "a", "v", "1", "permanent", 1, {"k": "1", "K": "2"}, []),
        ("FEATURE", "a", "v", "1", "permanent", 1, {}, ["x=y"]),
    ],
)
def test_canonical_form_refuses_ambiguous_fields(bad: tuple[object, ...]) -> None:
    with pytest.raises(ValueError):
        canonical_form(*bad)  # type: ignore[arg-type]


# --- signing text ----------------------------------------------------------------------


def test_signing_adds_a_continued_sign_line_and_leaves_the_rest_alone() -> None:
    text = TRIAD + "# keep me \\\nVENDOR acme\n" + LINE + "\n\n# end\n"
    signed = sign_license_text(text, KEY)
    rows = signed.split("\n")
    assert rows[:5] == text.split("\n")[:5]
    assert rows[5] == LINE + " \\"
    assert rows[6].startswith("    SIGN=") and len(rows[6]) == len("    SIGN=") + 128
    assert rows[7:] == ["", "# end", ""]
    assert refused_whys(signed) == []


def test_resigning_replaces_the_signature_in_place() -> None:
    text = TRIAD + "FEATURE cad acme 2.0 permanent 1 sign=" + "0" * 128 + " flag\n"
    signed = sign_license_text(text, KEY)
    assert signed.count("SIGN=") == 1 and "sign=" not in signed
    assert signed.split("\n")[3].startswith("FEATURE cad acme 2.0 permanent 1 SIGN=")
    assert signed.split("\n")[3].endswith(" flag")
    assert refused_whys(signed) == []
    assert sign_license_text(signed, KEY) == signed  # Ed25519 signatures are deterministic
    resigned = sign_license_text(signed, OTHER_KEY)
    assert refused_whys(resigned) == ["signature does not verify against the vendor key"]
    assert refused_whys(resigned, OTHER_KEY.public_key()) == []


def test_signing_keeps_crlf_and_handles_a_backslash_at_end_of_file() -> None:
    crlf = sign_license_text("FEATURE a v 1 permanent 1\r\nFEATURE b v 1 permanent 1 \\", KEY)
    # The last row had no line ending at all: the SIGN= line added after it is joined
    # with the file's own line end, CR LF, so that a CR LF file stays CR LF.
    assert crlf.count("\r\n") == 3 and crlf.count("\r\n    SIGN=") == 2
    assert not crlf.endswith("\\")
    assert refused_whys(TRIAD + crlf) == []


def test_signing_a_malformed_file_raises_the_syntax_error() -> None:
    with pytest.raises(LicenseSyntaxError, match=r"^x\.lic:2:"):
        sign_license_text("VENDOR v\nFEATURE a v 1 permanent many\n", KEY, path="x.lic")


def tamper_cases() -> list[tuple[str, str]]:
    return [
        ("FEATURE cad", "INCREMENT cad"),
        (" 10 ", " 11 "),
        ("31-dec-2027", "31-dec-2028"),
        (" 2.0 ", " 2.1 "),
        ("FEATURE cad ", "FEATURE cam "),
        (" acme ", " acne "),
        ("USERS=ann,bob", "USERS=ann,bob,eve"),
        (" user_based", " user_basedx"),
        (" user_based", " user_based extra"),
        (" user_based", " HOSTS=h"),
    ]


@pytest.mark.parametrize(("old", "new"), tamper_cases())
def test_tampering_with_any_field_refuses_the_line(old: str, new: str) -> None:
    signed = sign_license_text(TRIAD + LINE + "\nINCREMENT other acme 1 permanent 1\n", KEY)
    assert refused_whys(signed) == []
    tampered = signed.replace(old, new, 1)
    assert tampered != signed
    lic = parse_license(tampered, path="t.lic", public_key=PUB)
    assert [(r.line, r.why) for r in lic.refused] == [
        (4, "signature does not verify against the vendor key")
    ]
    assert [e.feature for e in lic.entitlements] == ["other"]  # the other line still serves


def test_layout_changes_do_not_refuse_the_line() -> None:
    signed = sign_license_text(TRIAD + LINE + "\n", KEY)
    relaid = signed.replace("FEATURE cad", "feature   cad").replace("31-dec", "31-DEC")
    relaid = relaid.replace(" USERS=ann,bob user_based", " \\\n user_based users=ann,bob")
    assert refused_whys(relaid) == []


def test_a_signature_copied_to_another_line_is_refused() -> None:
    signed = sign_license_text(
        TRIAD + "FEATURE a v 1 permanent 5\nFEATURE b v 1 permanent 5\n", KEY
    )
    syntax = parse_syntax(signed, path="t")
    first, second = syntax.lines
    if first.signature is None or second.signature is None:
        pytest.fail("signing left a line unsigned")
    swapped = signed.replace(second.signature, first.signature)
    lic = parse_license(swapped, path="t", public_key=PUB)
    assert [e.feature for e in lic.entitlements] == ["a"]
    assert [r.feature for r in lic.refused] == ["b"]


# --- property: sign then parse is the identity on the entitlements ---------------------

names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,8}", fullmatch=True)
keys = st.from_regex(r"[A-Z_][A-Z0-9_]{0,6}", fullmatch=True).filter(lambda k: k != "SIGN")
flags = st.from_regex(r"[A-Za-z_][A-Za-z0-9_\-]{0,6}", fullmatch=True)
versions = st.lists(st.integers(0, 30), min_size=1, max_size=3).map(
    lambda parts: ".".join(map(str, parts))
)
expiries = st.one_of(
    st.just("permanent"),
    st.dates(min_value=datetime.date(1000, 1, 1)).map(
        lambda d: f"{d.day}-{d.strftime('%b').lower()}-{d.year:04d}"
    ),
)
feature_lines = st.tuples(
    st.sampled_from(["FEATURE", "INCREMENT", "feature", "Increment"]),
    names,
    versions,
    expiries,
    st.integers(1, 10_000),
    st.dictionaries(keys, names, max_size=3),
    st.lists(flags, max_size=3, unique=True),
)


def render(line: tuple[str, str, str, str, int, dict[str, str], list[str]]) -> str:
    keyword, name, version, expiry, count, attrs, flags = line
    extras = [f"{k}={v}" for k, v in attrs.items()] + flags
    return " ".join([keyword, name, "acme", version, expiry, str(count), *extras])


def _one_feature_line_a_name(lines: list[tuple[str, ...]]) -> bool:
    """Only the first FEATURE line of a name serves: the nodes leave the others out."""
    names = [line[1] for line in lines if line[0].upper() == "FEATURE"]
    return len(names) == len(set(names))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        feature_lines,
        min_size=1,
        max_size=4,
        # identical lines: the second is refused as a copy (docs/security.md)
        unique_by=lambda f: (f[0].upper(), *f[1:5], tuple(sorted(f[5].items())), tuple(f[6])),
    ).filter(_one_feature_line_a_name),
    st.data(),
)
def test_sign_then_parse_round_trip(
    lines: list[tuple[str, str, str, str, int, dict[str, str], list[str]]], data: st.DataObject
) -> None:
    text = TRIAD + "VENDOR acme\n" + "\n".join(render(line) for line in lines) + "\n"
    signed = sign_license_text(text, KEY)
    lic = parse_license(signed, path="t", public_key=PUB)
    assert lic.refused == []
    assert [(e.feature, e.version, e.count) for e in lic.entitlements] == [
        (name, version, count) for _, name, version, _, count, _, _ in lines
    ]
    # Changing the count of any one line refuses that line and no other.
    victim = data.draw(st.integers(0, len(lines) - 1))
    syntax = parse_syntax(signed, path="t")
    rows = signed.split("\n")
    row = rows[syntax.lines[victim].line - 1].split(" ")
    row[5] = str(int(row[5]) + 1)
    rows[syntax.lines[victim].line - 1] = " ".join(row)
    lic = parse_license("\n".join(rows), path="t", public_key=PUB)
    assert [r.line for r in lic.refused] == [syntax.lines[victim].line]
    assert len(lic.entitlements) == len(lines) - 1


# --- the vendor CLI --------------------------------------------------------------------


def test_cli_keygen_sign_verify(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(vendor, ["keygen", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    key_path, pub_path = tmp_path / "keys" / "vendor.key", tmp_path / "keys" / "vendor.pub"
    assert result.output == f"private key: {key_path}\npublic key: {pub_path}\n"

    lic = tmp_path / "demo.lic"
    lic.write_text(TRIAD + "VENDOR acme\n" + LINE + "\nINCREMENT cad acme 2.0 permanent 5\n")
    result = runner.invoke(vendor, ["sign", str(lic), "--key", str(key_path)])
    assert result.exit_code == 0, result.output
    assert result.output == f"signed 2 lines: {lic}\n"

    result = runner.invoke(vendor, ["verify", str(lic), "--pub", str(pub_path)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"{lic}:5: FEATURE cad ok",
        f"{lic}:7: INCREMENT cad ok",
        "2 verified, 0 refused",
    ]

    lic.write_text(lic.read_text().replace(" 10 ", " 99 "))
    result = runner.invoke(vendor, ["verify", str(lic), "--pub", str(pub_path)])
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == (
        f"{lic}:5: FEATURE cad refused: signature does not verify against the vendor key"
    )
    assert result.output.splitlines()[-1] == "1 verified, 1 refused"


def test_cli_sign_to_output_leaves_the_input(tmp_path: Path) -> None:
    key_path, pub_path = write_keypair(tmp_path)
    source, out = tmp_path / "in.lic", tmp_path / "out.lic"
    source.write_text("FEATURE a v 1 permanent 1\n")
    result = CliRunner().invoke(
        vendor, ["sign", str(source), "--key", str(key_path), "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert source.read_text() == "FEATURE a v 1 permanent 1\n"
    assert refused_whys(TRIAD + out.read_text(), load_public_key(pub_path)) == []


def test_cli_errors_exit_2_with_the_message_on_stderr(tmp_path: Path) -> None:
    runner = CliRunner()
    key_path, pub_path = write_keypair(tmp_path)
    result = runner.invoke(vendor, ["keygen", str(tmp_path)])
    assert result.exit_code == 2
    assert "refusing to overwrite" in result.stderr

    bad = tmp_path / "bad.lic"
    bad.write_text("FEATURE a v 1 permanent ten\n")
    for args in (
        ["sign", str(bad), "--key", str(key_path)],
        ["verify", str(bad), "--pub", str(pub_path)],
    ):
        result = runner.invoke(vendor, args)
        assert result.exit_code == 2
        assert (
            result.stderr
            == f"error: {bad}:1:25: expected a seat count (a whole number from 1 to 1000000), "
            "found 'ten'\n"
        )
        assert result.stdout == ""
    assert bad.read_text() == "FEATURE a v 1 permanent ten\n"  # not rewritten

    result = runner.invoke(vendor, ["verify", str(bad), "--pub", str(tmp_path / "none.pub")])
    assert result.exit_code == 2
    assert result.stderr == f"error: {tmp_path / 'none.pub'}: no such key file\n"
