"""Write a synthetic report log of N records, for BENCHMARKS.md's `zbroker report` figures.

    python scripts/reportgen.py DIR --records 1000000 [--days 365] [--features 20] [--users 2000]

A busy site's year: features of 10 to 200 seats, users checking seats out and in (and
their sessions closing or expiring now and then), denials when a feature is full, some
checkouts that waited in the queue first, and applications marking their sessions idle
and busy again. The records have the fields, sizes and order the node writes (schema 2,
through ``ReportWriter``: headers, rotation, the hash chain), and times spread over
``--days``.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zbroker.broker.reportfile import ReportWriter

T0 = 1_767_225_600.0  # 2026-01-01T00:00Z


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--records", type=click.IntRange(1), default=1_000_000, show_default=True)
@click.option("--days", type=click.IntRange(1), default=365, show_default=True)
@click.option("--features", "n_features", type=click.IntRange(1), default=20, show_default=True)
@click.option("--users", "n_users", type=click.IntRange(1), default=2000, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--load", type=click.FloatRange(0.05, 0.95), default=0.5, show_default=True,
              help="the share of seats in use the walk tends to")  # fmt: skip
def main(
    directory: Path, records: int, days: int, n_features: int, n_users: int, seed: int, load: float
) -> None:
    rng = random.Random(seed)
    counts = {f"feat{k:02d}": rng.choice((10, 20, 50, 100, 200)) for k in range(n_features)}
    lines = [
        {"feature": f, "version": "1.0", "count": c, "expires": None} for f, c in counts.items()
    ]
    users = [f"user{k:04d}" for k in range(n_users)]
    held: dict[str, list[tuple[int, str, float]]] = {f: [] for f in counts}  # grant, user, since
    idle: set[str] = set()  # users whose session is marked idle
    w = ReportWriter(directory, "gen", retention_days=0)
    w.open()
    step = days * 86_400.0 / records
    t, ix, gid, written = T0, 2, 1, 0
    began = time.monotonic()
    batch: list[dict] = [
        {"ix": 1, "n": 0, "term": 1, "ev": "term", "at": t, "primary": "alpha"},
        {"ix": ix, "n": 0, "term": 1, "ev": "reread", "at": t, "lines": lines},
    ]
    names = list(counts)
    while written < records:
        t += rng.expovariate(1 / step)
        ix += 1 + rng.randrange(3)  # opens, heartbeats' answers: entries without records
        f = rng.choice(names)
        pool = held[f]
        user = rng.choice(users)
        who = {"sid": f"s-{user}", "user": user, "host": f"{user}-pc", "display": ":0",
               "client_version": "1.0"}  # fmt: skip
        asked = {"feature": f, "version": "1.0", "count": 1}
        if rng.random() < 0.01:  # the application marks its session idle, or busy again
            ev = "busy" if user in idle else "idle"
            (idle.discard if ev == "busy" else idle.add)(user)
            batch.append({"ix": ix, "n": 0, "term": 1, "ev": ev, "at": t, **who})
        elif pool and rng.random() < len(pool) / counts[f] / (2 * load):
            g, holder, since = pool.pop(rng.randrange(len(pool)))
            reason = rng.choices(("checkin", "closed", "expired"), (90, 8, 2))[0]
            who |= {"sid": f"s-{holder}", "user": holder, "host": f"{holder}-pc"}
            batch.append({"ix": ix, "n": 0, "term": 1, "ev": "in", "at": t, "reason": reason,
                          **asked, "grant": g, "since": since, **who,
                          "in_use": len(pool)})  # fmt: skip
        elif len(pool) < counts[f]:
            pool.append((gid, user, t))
            n = 0
            if rng.random() < 0.05:  # it waited in the queue first
                waited = rng.expovariate(1 / 30)
                batch.append({"ix": ix, "n": 0, "term": 1, "ev": "queued", "at": t - waited,
                              "req": 7, **asked, **who})  # fmt: skip
                batch.append({"ix": ix, "n": 1, "term": 1, "ev": "dequeued", "at": t,
                              "waited": waited, "req": 7, **asked, **who})  # fmt: skip
                n = 2
            batch.append({"ix": ix, "n": n, "term": 1, "ev": "out", "at": t, **asked,
                          "grant": gid, **who, "in_use": len(pool)})  # fmt: skip
            gid += 1
        else:
            batch.append({"ix": ix, "n": 0, "term": 1, "ev": "deny", "at": t, "op": "checkout",
                          "reason": "no_seats", "detail": f"{f} 1.0: all seats in use",
                          "req": 7, **who, **asked})  # fmt: skip
        written += 1
        if len(batch) >= 512:
            w.write(batch, t)
            batch = []
    w.write(batch, t)
    w.close()
    took = time.monotonic() - began
    click.echo(f"{written} records in {directory} ({took:.1f} s)")


if __name__ == "__main__":
    main()
