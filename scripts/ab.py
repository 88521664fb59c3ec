"""Compare the replicated throughput of two source trees, alternating, in one run.

    git worktree add /tmp/before <commit>
    python scripts/ab.py /tmp/before . --rounds 3            # fsync on
    python scripts/ab.py /tmp/before . --rounds 2 --no-fsync

For each round and each tree, in turn: a fresh echo and a fresh triad of that tree's
code, driven by the same kind of load processes at ``--outstanding`` requests (64, as
SPEC 7 measures). It prints, per run, the triad's pairs/s as a ratio to the echo of the
same run, and the µs of CPU per request of every process, read from /proc. Alternating
the trees spreads the machine's drift over both; compare ratios, not pairs/s.

Each measurement runs in a child process whose ``PYTHONPATH`` is that tree, so the
triad, the echo and the load all run the tree's own code: its ``clients/testing/bench``,
or ``clients/bench`` in a tree from before the test tooling left the library.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def measure(fsync: bool, outstanding: int, duration: float, warmup: float) -> dict[str, Any]:
    """One echo and one triad of the code on ``sys.path``; run inside the child."""
    free_ports = _module("broker.demo").free_ports

    echo = _bench("echo")
    sample = _bench("common").sample
    LoadPool = _bench("load").LoadPool
    BenchTriad = _bench("triad").BenchTriad
    pool = LoadPool(2)
    loaders = [c.proc.pid for c in pool.children if c.proc.pid is not None]
    out: dict[str, Any] = {}

    def drive(endpoint: str, servers: dict[str, int]) -> dict[str, Any]:
        before = {n: sample(p).cpu for n, p in servers.items()}
        load_before = sum(sample(p).cpu for p in loaders)
        level = pool.run(endpoint, outstanding, warmup, duration)
        requests = level.answered * (warmup + duration) / duration  # warm-up CPU too
        cpu = {n: (sample(p).cpu - before[n]) / requests * 1e6 for n, p in servers.items()}
        cpu["load"] = (sum(sample(p).cpu for p in loaders) - load_before) / requests * 1e6
        return {"pairs_per_s": level.pairs_per_s, "cpu_us": cpu}

    try:
        endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
        proc = echo.start(endpoint)
        try:
            out["echo"] = drive(endpoint, {"echo": proc.pid or 0})
        finally:
            proc.terminate()
        with tempfile.TemporaryDirectory() as tmp, BenchTriad(Path(tmp), fsync=fsync) as triad:
            primary = triad.wait_serving()
            pids = {n: triad.pid(n) for n in triad.names}
            out["triad"] = drive(triad.endpoint[primary], pids)
            out["primary"] = primary
    finally:
        pool.close()
    out["ratio"] = out["triad"]["pairs_per_s"] / out["echo"]["pairs_per_s"]
    return out


def _tree() -> Path:
    """The tree this child measures: the first entry of its PYTHONPATH (see main)."""
    return Path(os.environ["PYTHONPATH"].split(os.pathsep)[0])


def _module(name: str) -> Any:
    """Module ``name`` (``broker.demo``, say) of the tree measured: under the ``zbroker``
    namespace, or top-level in a tree from before it. Decided by the tree's layout, not by
    what imports: an installed zbroker (an editable install of another checkout) would
    import too, and measure the wrong code."""
    namespaced = (_tree() / "zbroker" / "__init__.py").is_file()
    return importlib.import_module(("zbroker." if namespaced else "") + name)


def _bench(name: str) -> Any:
    """The benchmark's module ``name`` in the tree measured, whichever layout it has."""
    if (_tree() / "zbroker" / "__init__.py").is_file():
        packages: tuple[str, ...] = ("zbroker.clients.testing.bench",)
    else:  # before the namespace: the test tooling in clients/testing, or in clients/bench
        packages = ("clients.testing.bench", "clients.bench")
    for package in packages:
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name is None or not package.startswith(exc.name):
                raise  # a module the benchmark itself imports is missing
    raise ModuleNotFoundError(f"{_tree()} has no bench package: {', '.join(packages)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs=2, type=Path, help="two checkouts: before, after")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-fsync", action="store_true", help="triads with fsync = false")
    parser.add_argument("--outstanding", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the child: this tree's code is on PYTHONPATH
        result = measure(not args.no_fsync, args.outstanding, args.duration, args.warmup)
        print(json.dumps(result))
        return
    ratios: dict[Path, list[float]] = {tree: [] for tree in args.trees}
    for n in range(1, args.rounds + 1):
        for tree in args.trees:
            root = tree.resolve()
            flags = ["--no-fsync"] if args.no_fsync else []
            flags += ["--outstanding", str(args.outstanding), "--duration", str(args.duration)]
            flags += ["--warmup", str(args.warmup)]
            env = {**os.environ, "PYTHONPATH": str(root)}
            done = subprocess.run(
                [sys.executable, __file__, str(root), str(root), "--measure", *flags],
                env=env,
                cwd=root,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                sys.exit(f"measuring {root} failed:\n{done.stderr}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            ratios[tree].append(r["ratio"])
            cpu = ", ".join(f"{k} {v:.1f}" for k, v in r["triad"]["cpu_us"].items())
            echo_cpu = ", ".join(f"{k} {v:.1f}" for k, v in r["echo"]["cpu_us"].items())
            print(
                f"round {n} {tree}: ratio {r['ratio']:.3f} "
                f"(triad {r['triad']['pairs_per_s']:.0f} / echo {r['echo']['pairs_per_s']:.0f} "
                f"pairs/s); CPU us/request: {cpu}; echo run: {echo_cpu}",
                flush=True,
            )
    for tree, got in ratios.items():
        print(f"{tree}: median ratio {sorted(got)[len(got) // 2]:.3f} of {len(got)} runs")


if __name__ == "__main__":
    main()
