"""``zbroker vendor``: the vendor's commands to make keys, sign and verify license files.

These commands only parse arguments, call ``zbroker.broker.signing`` /
``zbroker.broker.license`` and render the result. What they print is stable, for scripts:

- ``keygen DIR`` prints ``private key: PATH`` then ``public key: PATH``;
- ``sign FILE`` prints ``signed N lines: PATH``; but when a signed line would not be
  served by the nodes (as ``verify`` would refuse it: a copy of an earlier line, a
  second FEATURE line of a feature), it writes nothing and prints each such line as
  ``verify`` does, on stderr, then ``error: FILE: not signed: ...``;
- ``verify FILE`` prints one line per FEATURE/INCREMENT line, either
  ``FILE:LINE: KEYWORD NAME ok`` or ``FILE:LINE: KEYWORD NAME refused: WHY``, then
  ``N verified, M refused``. Refused: what the nodes leave out
  (``zbroker.broker.license.unserved``, the one check the nodes and ``sign`` make too):
  no signature, a malformed one, one that does not verify against the vendor key (a
  changed field, a signature copied from another line, another vendor's key), a
  verified line that repeats an earlier one (a copy of a signed INCREMENT would
  otherwise add its seats again), or a FEATURE line of a feature an earlier FEATURE
  line gives seats to (only the first serves; INCREMENT adds seats).

Exit status: 0 on success (for ``verify``: every line verifies), 1 when ``verify``
refused a line or ``sign`` would sign one the nodes refuse, 2 on a syntax, file or key
error, with ``error: MESSAGE`` on stderr. A
number out of its range (a count past 1,000,000, a version part past 2^31-1, a port past
65535: see ``zbroker.broker.license``) is a syntax error naming file:line:column and the range,
so ``sign`` never signs a line the nodes could not serve.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NoReturn

import click

from zbroker.broker.license import (
    LicenseError,
    LicenseLineRefused,
    LicenseUnservedError,
    parse_syntax,
    read_license_text,
    sign_license_text,
    unserved,
)
from zbroker.broker.signing import load_private_key, load_public_key, write_keypair

__all__ = ["vendor"]

EXIT_REFUSED = 1
EXIT_ERROR = 2  # also what click uses for usage errors


def _fail(error: Exception) -> NoReturn:
    click.echo(f"error: {error}", err=True)
    raise SystemExit(EXIT_ERROR)


@click.group()
def vendor() -> None:
    """Vendor tools: make a key pair, sign and verify license files."""


@vendor.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def keygen(directory: Path) -> None:
    """Write a new Ed25519 key pair as DIRECTORY/vendor.key and DIRECTORY/vendor.pub.

    Refuses to overwrite an existing key. Keep vendor.key secret; ship vendor.pub
    with the nodes.
    """
    try:
        private_path, public_path = write_keypair(directory)
    except LicenseError as exc:
        _fail(exc)
    click.echo(f"private key: {private_path}")
    click.echo(f"public key: {public_path}")


@vendor.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The vendor's private key (vendor.key).",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the signed file (default: rewrite FILE in place).",
)
def sign(file: Path, key_path: Path, output: Path | None) -> None:
    """Sign every FEATURE/INCREMENT line of FILE (replacing any SIGN=)."""
    try:
        key = load_private_key(key_path)
        text = read_license_text(file)
        signed = sign_license_text(text, key, path=str(file))
        count = len(parse_syntax(signed, path=str(file), servers_required=False).lines)
    except LicenseUnservedError as exc:
        # Refused, as verify would: the same lines, and nothing written.
        for line in exc.refused:
            click.echo(str(line), err=True)
        click.echo(f"error: {exc.path}: not signed: fix the lines above and sign again", err=True)
        raise SystemExit(EXIT_REFUSED) from None
    except LicenseError as exc:
        _fail(exc)
    target = file if output is None else output
    try:
        _write_atomically(target, signed)
    except OSError as exc:
        _fail(LicenseError(f"{target}: cannot write the signed file: {exc.strerror}"))
    click.echo(f"signed {count} lines: {target}")


@vendor.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--pub",
    "pub_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The vendor's public key (vendor.pub).",
)
def verify(file: Path, pub_path: Path) -> None:
    """Check the signature of every FEATURE/INCREMENT line of FILE.

    SERVER lines are not signed and may be absent here; the nodes require 1 or 3.
    """
    try:
        key = load_public_key(pub_path)
        syntax = parse_syntax(read_license_text(file), path=str(file), servers_required=False)
    except LicenseError as exc:
        _fail(exc)
    refused = 0
    for line, why in zip(syntax.lines, unserved(syntax.lines, key), strict=True):
        if why is None:
            click.echo(f"{syntax.path}:{line.line}: {line.keyword} {line.name} ok")
        else:
            refused += 1
            click.echo(
                str(LicenseLineRefused(syntax.path, line.line, line.name, why, line.keyword))
            )
    click.echo(f"{len(syntax.lines) - refused} verified, {refused} refused")
    if refused:
        raise SystemExit(EXIT_REFUSED)


def _write_atomically(path: Path, text: str) -> None:
    # A crash half-way must never leave a customer's license file truncated.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a license file is not secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
