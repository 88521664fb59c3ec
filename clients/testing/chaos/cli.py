"""The ``chaos`` click command (``zbroker chaos``, ``scripts/chaos.py``): parse, build
RunOptions, run, check, print, draw, exit.

    python scripts/chaos.py --duration 300                  # a full run, every fault
    python scripts/chaos.py --faults kill-primary --count 5 # five primary kills, then stop
    python scripts/chaos.py --seed 7 --dry-run              # print seed 7's schedule
    python scripts/chaos.py --check RUN/history.jsonl       # check a recorded history again
    python scripts/chaos.py --hosts --duration 300          # hosts as namespaces, partitions

Exit status: 0 clean verdict; 1 an invariant broke; 2 bad usage or the run could not
start; 130 interrupted (Ctrl-C, SIGTERM), clean as far as it went. The run's folder
(``--out``, default a new temporary folder) keeps ``history.jsonl``, ``report.txt``,
``figures.json``, ``timeline.png``, the client processes' logs and the triad with its
node logs.
"""

from __future__ import annotations

import itertools
import json
import signal
import sys
from pathlib import Path
from types import FrameType

import click

from zbroker.broker.cli import Seconds
from zbroker.broker.config import RANGES, Range
from zbroker.broker.wire import MAX_REQ
from zbroker.clients.testing.chaos.checker import check
from zbroker.clients.testing.chaos.history import HistoryError, read_history
from zbroker.clients.testing.chaos.nemesis import (
    ALL_KINDS,
    PARTITION_KINDS,
    CutKind,
    FaultKind,
    Kind,
    parse_kinds,
    schedule,
)
from zbroker.clients.testing.chaos.runner import RunError, Runner, RunOptions
from zbroker.clients.testing.chaos.verdict import CheckOptions, figures, render

EXIT_CLEAN, EXIT_VIOLATED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MAX_RUN = 7 * 86_400.0  # --duration: a week is already a soak test
MAX_WAIT = 3600.0  # --op-timeout, --liveness-limit, --min-window: an hour is far past any
MAX_FAULTS = 1_000_000  # --count
MAX_PROCESSES = 64  # --processes: each is a Python process with its sessions' threads
MAX_SESSIONS = 1_000  # --sessions, per process


class FaultKinds(click.ParamType):
    """``kill-primary,pause-primary`` or ``all``: the faults of SPEC section 6 to apply."""

    name = "faults"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[Kind, ...]:
        if isinstance(value, tuple):
            return value  # a default, converted already
        try:
            return parse_kinds(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.command(
    epilog="Exit status: 0 clean verdict; 1 an invariant broke; 2 bad usage or the run "
    "could not start; 130 interrupted, clean as far as it went."
)
@click.option(
    "--duration",
    type=Seconds(Range(0.0, MAX_RUN, low_open=True)),
    default=60.0,
    show_default=True,
    help="seconds, start to cleanup",
)
@click.option(
    "--faults",
    type=FaultKinds(),
    default=None,
    help="comma-separated: kill-primary, pause-primary, kill-backup, kill-two, "
    "restart-all, wipe, kill-all; or all (default; without wipe under --config); with "
    "--hosts also cut-primary, cut-backup, cut-link, flap-link, cut-client, or partitions "
    "(the default with --hosts)",
)
@click.option(
    "--count",
    type=click.IntRange(1, MAX_FAULTS),
    default=None,
    help="stop after this many faults (default: as many as fit)",
)
@click.option(
    "--processes",
    type=click.IntRange(1, MAX_PROCESSES),
    default=2,
    show_default=True,
    help="client processes",
)
@click.option(
    "--sessions",
    type=click.IntRange(1, MAX_SESSIONS),
    default=4,
    show_default=True,
    help="sessions per client process",
)
@click.option(
    "--seed",
    type=click.IntRange(0, MAX_REQ),
    default=0,
    show_default=True,
    help="same seed, same schedule",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="folder for the results (default: a temp folder)",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="run the nodes of this zbroker.toml (not running yet) instead of a fresh demo; "
    "its data directories are used as they are (and deleted by the wipe fault, which "
    "therefore runs only when --faults names it)",
)
@click.option(
    "--lease",
    type=Seconds(RANGES["lease"]),
    default=10.0,
    show_default=True,
    help="the demo's client lease, seconds",
)
@click.option(
    "--op-timeout",
    type=Seconds(Range(0.0, MAX_WAIT, low_open=True)),
    default=2.0,
    show_default=True,
    help="each client call's deadline, seconds",
)
@click.option(
    "--hosts",
    is_flag=True,
    help="each node in a network namespace of its own, the clients in another (needs "
    "root), so that links can be cut; the default faults become the partitions",
)
@click.option("--dry-run", is_flag=True, help="print the schedule and exit")
@click.option(
    "--check",
    "history_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="HISTORY",
    default=None,
    help="only check this recorded history",
)
@click.option(
    "--liveness-limit",
    type=Seconds(Range(0.0, MAX_WAIT)),
    default=CheckOptions.liveness_limit,
    show_default=True,
    help="seconds within which a checkout must be served after the primary fails, "
    "two nodes up (SPEC 5.4; 0: do not check)",
)
@click.option(
    "--min-window",
    type=Seconds(Range(0.0, MAX_WAIT)),
    default=CheckOptions.min_window,
    show_default=True,
    help="shortest gap between definite answers reported as an unavailable window",
)
@click.option("--no-plot", is_flag=True, help="skip the timeline picture")
def chaos(
    duration: float,
    faults: tuple[Kind, ...] | None,
    count: int | None,
    processes: int,
    sessions: int,
    seed: int,
    out: Path | None,
    config_path: Path | None,
    lease: float,
    op_timeout: float,
    hosts: bool,
    dry_run: bool,
    history_path: Path | None,
    liveness_limit: float,
    min_window: float,
    no_plot: bool,
) -> None:
    """Break a triad under client load and check SPEC 5's invariants from the clients' record.

    \b
      chaos --duration 300                  a full run, every fault
      chaos --faults kill-primary --count 5 five primary kills, then stop
      chaos --seed 7 --dry-run              print seed 7's schedule
      chaos --check RUN/history.jsonl       check a recorded history again
      chaos --hosts --duration 300          hosts as network namespaces, partitions (root)
    """
    kinds: tuple[Kind, ...] = faults or (PARTITION_KINDS if hosts else ALL_KINDS)
    if faults is None and config_path is not None:
        kinds = tuple(k for k in ALL_KINDS if k is not FaultKind.WIPE)  # someone's real data
    cuts = [k.value for k in kinds if isinstance(k, CutKind)]
    if cuts and not hosts and not dry_run:
        raise click.UsageError(f"{', '.join(cuts)} cut links between hosts: add --hosts")
    check_options = CheckOptions(liveness_limit=liveness_limit, min_window=min_window)
    if dry_run:
        steps = schedule(seed, kinds, count=count)
        for step in itertools.islice(steps, count or 60):
            click.echo(step.describe())
        sys.exit(EXIT_CLEAN)
    if history_path is not None:
        sys.exit(_check(history_path, history_path.parent, check_options, plot=not no_plot))
    options = RunOptions(
        duration=duration,
        faults=kinds,
        count=count,
        processes=processes,
        sessions=sessions,
        seed=seed,
        out=out,
        config=config_path,
        lease=lease,
        op_timeout=op_timeout,
        hosts=hosts,
    )
    runner = Runner(options, log=lambda line: print(line, flush=True))
    print(f"chaos run for {options.duration:.0f} s, seed {options.seed}, results in {runner.out}")

    def stop(signum: int, frame: FrameType | None) -> None:
        # First signal: no more faults, clean up, check what was recorded. A second
        # Ctrl-C interrupts that too (the runner's cleanup still stops every process).
        print("interrupted: cleaning up, then checking the history so far", flush=True)
        runner.request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        result = runner.run()
    except RunError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    stopped = f"; {result.stopped_early}" if result.stopped_early else ""
    print(f"{result.faults} fault(s) applied{stopped}")
    status = _check(result.history, result.out, check_options, plot=not no_plot)
    if result.interrupted and status == EXIT_CLEAN:
        sys.exit(EXIT_INTERRUPTED)  # clean as far as it went, but not a full run
    sys.exit(status)


def _check(path: Path, out: Path, options: CheckOptions, *, plot: bool) -> int:
    try:
        history = read_history(path)
    except HistoryError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return EXIT_USAGE
    report = check(history, options)
    text = render(report, history, str(path))
    print(text)
    (out / "report.txt").write_text(text + "\n")
    (out / "figures.json").write_text(json.dumps(figures(report), indent=2) + "\n")
    if plot:
        from zbroker.clients.testing.chaos.plot import PlotUnavailable, plot_timeline

        try:
            print(f"timeline: {plot_timeline(history, report, out / 'timeline.png')}")
        except PlotUnavailable as exc:
            print(f"no timeline: {exc}")
    return EXIT_CLEAN if report.ok else EXIT_VIOLATED
