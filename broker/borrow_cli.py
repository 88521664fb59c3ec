"""``zbroker borrow``: borrow seats for offline use, list the borrowed ones, return one early.

FlexNet's ``lmborrow``/``lmutil lmborrow -return`` in one command (docs/admin.md,
"Borrowing"). It is the library's ``borrow`` / ``return_borrow`` / ``borrowed`` with a
console around it: the token lands in the same store the application's library reads
(``ZBROKER_BORROW_DIR``, else the user's data directory). Loaded only when named
(``broker/cli.py``'s ``TOOLS``): a node never needs it.
"""

from __future__ import annotations

import datetime
from typing import Any

import click

from zbroker.broker.cli import (
    EXIT_CONFIG,
    EXIT_REFUSED,
    _fail,
    _feature,
    _version,
    client_key_option,
    client_license,
    config_option,
)
from zbroker.broker.wire import MAX_BORROW_HOURS, MAX_COUNT


def _when(wall: float) -> str:
    return datetime.datetime.fromtimestamp(wall).astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _until(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        at = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a date and time such as 2026-12-24 or 2026-12-24T18:00"
        ) from None
    return (at if at.tzinfo is not None else at.astimezone()).timestamp()


class Hours(click.ParamType):
    """A finite number of hours above 0, up to ten years (click's FloatRange lets nan in)."""

    name = "hours"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            hours = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of hours", param, ctx)
        if not 0 < hours <= MAX_BORROW_HOURS:  # nan fails this too
            self.fail(
                f"{value!r} is not a number of hours above 0 up to {MAX_BORROW_HOURS:g}", param, ctx
            )
        return hours


@click.command()
@click.argument("feature", required=False, callback=_feature)
@config_option
@click.option(
    "--hours",
    type=Hours(),
    default=None,
    help="borrow for this many hours from the server's time (default: the longest allowed)",
)
@click.option(
    "--until",
    "until",
    default=None,
    callback=_until,
    help="borrow until this local date and time (2026-12-24T18:00; a zone may be given)",
)
@click.option("--count", type=click.IntRange(1, MAX_COUNT), default=1, show_default=True)
@click.option("--version", "min_version", default=None, callback=_version, help="minimum version")
@click.option("--return", "give_back", is_flag=True, help="return the borrow of FEATURE early")
@click.option("--list", "listing", is_flag=True, help="list the borrowed seats this user holds")
@client_key_option
def borrow(
    feature: str | None,
    config_path: str,
    hours: float | None,
    until: float | None,
    count: int,
    min_version: str | None,
    give_back: bool,
    listing: bool,
    key_path: str | None,
) -> None:
    """Borrow seats of FEATURE to use with no server in reach, or return them early.

    The triad counts a borrowed seat until its end through any failover or restart;
    this computer keeps the signed token, and checkouts of FEATURE are served from it
    first, with or without a server in reach. Exit 1 when refused (the reason is printed);
    2 when the token store (ZBROKER_BORROW_DIR) cannot be written: checked before asking,
    and a borrow whose token could not be saved is given back where the line allows.
    """
    from zbroker.clients.client import LicenseClient
    from zbroker.clients.errors import LicenseError as ClientError
    from zbroker.clients.tokens import StoreError

    if hours is not None and until is not None:
        raise click.UsageError("give --hours or --until, not both")
    if feature is None and not listing:
        raise click.UsageError("name the FEATURE to borrow or return, or give --list")
    servers = client_license(config_path)
    try:
        with LicenseClient(servers, client_key=key_path) as client:
            if listing:
                tokens = client.borrowed()
                for t in tokens:
                    click.echo(
                        f"{t.feature} {t.version}: {t.count} seat(s) until {_when(t.end)} "
                        f"(grant {t.grant})"
                    )
                if not tokens:
                    click.echo("no borrowed seats")
                return
            assert feature is not None  # checked above; mypy cannot see it
            if give_back:
                client.return_borrow(feature)
                click.echo(f"returned the borrow of {feature}")
                return
            token = client.borrow(
                feature, until=until, hours=hours, version=min_version, count=count
            )
    except StoreError as exc:  # the store is this computer's setup, not the triad's answer
        _fail(exc, EXIT_CONFIG)
    except ClientError as exc:
        _fail(exc, EXIT_REFUSED)
    click.echo(
        f"borrowed {token.count} seat(s) of {token.feature} {token.version} from "
        f"{_when(token.start)} until {_when(token.end)} (grant {token.grant})"
    )
