"""The ``bench`` click command, shared by ``scripts/bench.py`` and ``zbroker bench``.

It only parses options, picks a plan and calls ``runner.run``; the heavy imports
happen inside, so that ``zbroker --help`` (which imports this module for its one line of
help) stays quick.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

import click

from zbroker.broker.cli import Seconds
from zbroker.broker.config import Range
from zbroker.broker.limits import MAXIMA
from zbroker.clients.testing.bench import PHASES

# Every number has a range (the checks of ``zbroker``'s other options): far above any
# run this machine could make, far below what would overflow or never end.
MAX_KILLS = 1_000  # failover trials
MAX_WINDOW = 3600.0  # seconds of one measured window
MAX_GRANTS_PER_SESSION = 10_000
MAX_PROCS = 256  # load processes
MAX_CLIENTS = 100_000  # reconnect storm
MAX_FLOOD = 1_000_000  # status requests never read


@click.command()
@click.option("--quick", is_flag=True, help="a reduced run that finishes within a minute")
@click.option(
    "--tiny", is_flag=True, hidden=True, help="a few seconds, for the smoke test; no figures"
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("bench.json"),
    show_default=True,
    help="where to write every figure as JSON",
)
@click.option("--kills", type=click.IntRange(1, MAX_KILLS), default=None, help="failover trials")
@click.option(
    "--duration",
    type=Seconds(Range(0.0, MAX_WINDOW, low_open=True)),
    default=None,
    help="seconds of each measured window",
)
@click.option(
    "--sessions",
    type=click.IntRange(1, MAXIMA["max_sessions"]),
    default=None,
    help="heartbeating sessions",
)
@click.option(
    "--grants-per-session",
    type=click.IntRange(1, MAX_GRANTS_PER_SESSION),
    default=None,
    help="live grants each",
)
@click.option("--procs", type=click.IntRange(1, MAX_PROCS), default=None, help="load processes")
@click.option("--no-fsync-off", is_flag=True, help="skip the fsync = false triad")
@click.option(
    "--compiled",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="also measure a triad (fsync on) whose nodes run this compiled tree, built by "
    "`scripts/compiled.sh --keep DIR --build-only`",
)
@click.option(
    "--storm-clients",
    type=click.IntRange(1, MAX_CLIENTS),
    default=None,
    help="clients failing over at once in the reconnect storm",
)
@click.option(
    "--flood-requests",
    type=click.IntRange(1, MAX_FLOOD),
    default=None,
    help="status requests of the flood phase (never read)",
)
@click.option(
    "--only",
    "only",
    multiple=True,
    type=click.Choice(PHASES),
    help="run only this phase (repeatable); fleet is the sessions and grants phases",
)
def bench(
    quick: bool,
    tiny: bool,
    json_path: Path,
    kills: int | None,
    duration: float | None,
    sessions: int | None,
    grants_per_session: int | None,
    procs: int | None,
    no_fsync_off: bool,
    compiled: Path | None,
    storm_clients: int | None,
    flood_requests: int | None,
    only: tuple[str, ...],
) -> None:
    """Measure the triad against a bare ZeroMQ echo, in one run (SPEC section 7)."""
    from zbroker.clients.testing.bench.compiled import NotCompiled, check_tree
    from zbroker.clients.testing.bench.plan import plan_named
    from zbroker.clients.testing.bench.report import render
    from zbroker.clients.testing.bench.runner import run

    plan = plan_named(
        "tiny" if tiny else "quick" if quick else "full",
        kills=kills,
        duration=duration,
        sessions=sessions,
        grants_per_session=grants_per_session,
        procs=procs,
        fsync_off=False if no_fsync_off else None,
        compiled=None if compiled is None else str(compiled.resolve()),
        storm_clients=storm_clients,
        flood_requests=flood_requests,
        phases=tuple(p for p in PHASES if p in only) or None,
    )
    if plan.compiled is not None:  # refused now rather than after the phases before it
        if "throughput" not in plan.phases:
            raise click.UsageError("--compiled adds a triad to the throughput phase: run it")
        try:
            check_tree(Path(plan.compiled))
        except NotCompiled as exc:
            raise click.ClickException(str(exc)) from None
    # A SIGTERM or a closed terminal ends the run as Ctrl-C does, through the runner's
    # cleanup: by default it killed this process alone, and its triads (sessions of
    # their own) ran on, nine nodes busy for nothing.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    result = run(plan, json_path, say=lambda line: click.echo(line, err=True))
    click.echo(render(result))
    click.echo(f"\nwrote {json_path}")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)
