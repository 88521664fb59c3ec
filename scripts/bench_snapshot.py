"""Snapshots at 1,000,000 grants: ``python scripts/bench_snapshot.py [--quick]``.

A triad, 100,000 sessions holding 1,000,000 grants, a probe checking out beside it;
compaction and the catch-up of a wiped backup timed, elections counted. Everything lives
in ``clients/testing/bench/snapshot.py`` (see its docstring); BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from zbroker.broker.limits import MAXIMA
from zbroker.clients.testing.bench.common import BENCH_SEATS


@click.command()
@click.option("--quick", is_flag=True, help="10,000 sessions, 100,000 grants")
@click.option("--tiny", is_flag=True, hidden=True, help="seconds, for the smoke test; no figures")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("bench_snapshot.json"),
    show_default=True,
    help="where to write every figure as JSON",
)
@click.option(
    "--sessions",
    type=click.IntRange(1, MAXIMA["max_sessions"] - 1_000),
    default=None,
    help="sessions holding the grants [full: 100,000]",
)
@click.option(
    "--grants",
    type=click.IntRange(1, BENCH_SEATS),
    default=None,
    help="grants in all, a multiple of --sessions [full: 1,000,000]",
)
@click.option(
    "--snapshot-every",
    type=click.IntRange(1, 10_000_000),
    default=None,
    help="the nodes' snapshot_every [full: 20,000]",
)
@click.option(
    "--build-seconds",
    type=click.FloatRange(1, 86_400),
    default=None,
    help="start no grant round after this long; measure at the size reached",
)
@click.option(
    "--keep",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="run the triad in this folder and leave it (config, data, node logs)",
)
def main(
    quick: bool,
    tiny: bool,
    json_path: Path,
    sessions: int | None,
    grants: int | None,
    snapshot_every: int | None,
    build_seconds: float | None,
    keep: Path | None,
) -> None:
    """Compaction and a wiped backup's catch-up on a triad holding many grants."""
    from zbroker.clients.testing.bench.snapshot import plan_named, render, run

    try:
        plan = plan_named(
            "tiny" if tiny else "quick" if quick else "full",
            sessions=sessions,
            grants=grants,
            snapshot_every=snapshot_every,
            build_seconds=build_seconds,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    # ``timeout`` or a kill sends SIGTERM: end through the finally blocks that stop the nodes
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(plan, json_path, say=lambda line: click.echo(line, err=True), keep=keep)
    click.echo(render(result))
    click.echo(f"\nwrote {json_path}")


if __name__ == "__main__":
    main()
