"""How long one group commit takes on a disk: ``python scripts/sync_probe.py [DIR]``.

A node syncs its log once per poll cycle (broker/storage.py), so this is the floor of a
replicated checkout's latency on that disk. Three ways of writing a record and making
it durable, each timed over ``--syncs`` records of ``--size`` bytes in DIR (default: the
current directory; point it at a node's data directory's file system):

- append + fsync: the file grows, so the sync also commits its size and block map;
- append + fdatasync: the same, without the time stamps;
- pre-zeroed + fdatasync: what the node does; records overwrite zeros laid ahead, so
  the sync commits data only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def probe(
    directory: Path,
    open_file: Callable[[str, int], int],
    write: Callable[[int, bytes, int], object],
    sync: Callable[[int], None],
    syncs: int,
    size: int,
) -> list[float]:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        fd = open_file(os.path.join(tmp, "log"), syncs * size)
        record = b"x" * size
        took = []
        try:
            for i in range(syncs):
                write(fd, record, i * size)
                started = time.perf_counter()
                sync(fd)
                took.append(time.perf_counter() - started)
        finally:
            os.close(fd)
    return took


def _appending(path: str, _: int) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)


def _pre_zeroed(path: str, length: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.write(fd, bytes(length))
    os.fsync(fd)
    return fd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", nargs="?", type=Path, default=Path.cwd())
    parser.add_argument("--syncs", type=int, default=300)
    parser.add_argument("--size", type=int, default=3000, help="bytes per record")
    args = parser.parse_args()

    def append(fd: int, data: bytes, _: int) -> int:
        return os.write(fd, data)

    ways = [
        ("append + fsync", _appending, append, os.fsync),
        ("append + fdatasync", _appending, append, os.fdatasync),
        ("pre-zeroed + fdatasync", _pre_zeroed, os.pwrite, os.fdatasync),
    ]
    print(f"{args.syncs} syncs of {args.size}-byte records in {args.directory}")
    for name, open_file, write, sync in ways:
        took = sorted(probe(args.directory, open_file, write, sync, args.syncs, args.size))
        p50, p90 = took[len(took) // 2], took[int(len(took) * 0.9)]
        print(
            f"  {name:24s} p50 {p50 * 1e6:6.0f} us   p90 {p90 * 1e6:6.0f} us   "
            f"mean {statistics.mean(took) * 1e6:6.0f} us"
        )


if __name__ == "__main__":
    main()
