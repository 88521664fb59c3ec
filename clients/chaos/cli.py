"""The chaos command line: parse, build RunOptions, run, check, print, draw, exit.

    python scripts/chaos.py --duration 300                  # a full run, every fault
    python scripts/chaos.py --faults kill-primary --count 5 # five primary kills, then stop
    python scripts/chaos.py --seed 7 --dry-run              # print seed 7's schedule
    python scripts/chaos.py --check RUN/history.jsonl       # check a recorded history again

Exit status: 0 clean verdict; 1 an invariant broke; 2 bad usage or the run could not
start; 130 interrupted (Ctrl-C, SIGTERM), clean as far as it went. The run's folder
(``--out``, default a new temporary folder) keeps ``history.jsonl``, ``report.txt``,
``figures.json``, ``timeline.png``, the client processes' logs and the triad with its
node logs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import sys
from pathlib import Path
from types import FrameType

from clients.chaos.checker import check
from clients.chaos.history import HistoryError, read_history
from clients.chaos.nemesis import ALL_KINDS, FaultKind, parse_kinds, schedule
from clients.chaos.runner import RunError, Runner, RunOptions
from clients.chaos.verdict import CheckOptions, figures, render

EXIT_CLEAN, EXIT_VIOLATED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _kinds(text: str) -> tuple[FaultKind, ...]:
    try:
        return parse_kinds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parser(prog: str = "chaos") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Break a zbroker triad under client load (SPEC section 6) and check, "
        "from the clients' history, that SPEC section 5's invariants held.",
    )
    run = p.add_argument_group("the run")
    run.add_argument("--duration", type=float, default=60.0, help="seconds, start to cleanup")
    run.add_argument(
        "--faults",
        type=_kinds,
        default=None,
        help="comma-separated: kill-primary, pause-primary, kill-backup, kill-two, "
        "restart-all, wipe, kill-all; or all (default; without wipe under --config)",
    )
    run.add_argument("--count", type=int, help="stop after this many faults (default: fill)")
    run.add_argument("--processes", type=int, default=2, help="client processes")
    run.add_argument("--sessions", type=int, default=4, help="sessions per client process")
    run.add_argument("--seed", type=int, default=0, help="same seed, same schedule")
    run.add_argument("--out", type=Path, help="folder for the results (default: a temp folder)")
    run.add_argument(
        "--config",
        type=Path,
        help="run the nodes of this zbroker.toml (not running yet) instead of a fresh demo; "
        "its data directories are used as they are (and deleted by the wipe fault, which "
        "therefore runs only when --faults names it)",
    )
    run.add_argument("--lease", type=float, default=10.0, help="the demo's client lease, s")
    run.add_argument("--op-timeout", type=float, default=2.0, help="each client call's deadline")
    run.add_argument("--dry-run", action="store_true", help="print the schedule and exit")
    chk = p.add_argument_group("the check")
    chk.add_argument("--check", type=Path, metavar="HISTORY", help="only check this history")
    chk.add_argument(
        "--liveness-limit",
        type=float,
        default=CheckOptions.liveness_limit,
        help="seconds within which a checkout must be served after the primary fails, "
        "two nodes up (SPEC 5.4; 0: do not check)",
    )
    chk.add_argument(
        "--min-window",
        type=float,
        default=CheckOptions.min_window,
        help="shortest gap between definite answers reported as an unavailable window",
    )
    chk.add_argument("--no-plot", action="store_true", help="skip the timeline picture")
    return p


def main(argv: list[str] | None = None, prog: str = "chaos") -> int:
    """Run the command with ``argv`` (default: sys.argv); returns the exit status."""
    args = parser(prog).parse_args(argv)
    kinds: tuple[FaultKind, ...] = args.faults or ALL_KINDS
    if args.faults is None and args.config is not None:
        kinds = tuple(k for k in ALL_KINDS if k is not FaultKind.WIPE)  # someone's real data
    check_options = CheckOptions(liveness_limit=args.liveness_limit, min_window=args.min_window)
    if args.dry_run:
        steps = schedule(args.seed, kinds, count=args.count)
        for step in itertools.islice(steps, args.count or 60):
            print(step.describe())
        return EXIT_CLEAN
    if args.check is not None:
        return _check(args.check, args.check.parent, check_options, plot=not args.no_plot)
    options = RunOptions(
        duration=args.duration,
        faults=kinds,
        count=args.count,
        processes=args.processes,
        sessions=args.sessions,
        seed=args.seed,
        out=args.out,
        config=args.config,
        lease=args.lease,
        op_timeout=args.op_timeout,
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
        return EXIT_USAGE
    stopped = f"; {result.stopped_early}" if result.stopped_early else ""
    print(f"{result.faults} fault(s) applied{stopped}")
    status = _check(result.history, result.out, check_options, plot=not args.no_plot)
    if result.interrupted and status == EXIT_CLEAN:
        return EXIT_INTERRUPTED  # clean as far as it went, but not a full run
    return status


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
        from clients.chaos.plot import PlotUnavailable, plot_timeline

        try:
            print(f"timeline: {plot_timeline(history, report, out / 'timeline.png')}")
        except PlotUnavailable as exc:
            print(f"no timeline: {exc}")
    return EXIT_CLEAN if report.ok else EXIT_VIOLATED
