"""Checks of report logs against each other and against what clients were told.

For the chaos tooling and the tests (issue 13, item 3): after a run with failovers,

- ``compare_nodes``: every node's log holds the same record at each (index, n) that it
  covers (a node covers the indexes from its first record to its last, except the
  ranges its ``gap`` records name), and lacks none of them;
- ``match_clients``: each grant a client was told it got appears as exactly one ``out``
  record, each checkin a client was told succeeded as exactly one ``in`` of that grant,
  and no grant id is checked out or returned twice.

Both read whole logs into memory: they are for test-sized logs, not a year's (which
``zbroker report`` reads in one pass).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from zbroker.broker.reportfile import read_stream
from zbroker.broker.reportlog import Record


def _events(files: Sequence[Path]) -> tuple[dict[tuple[int, int], Record], list[range]]:
    records: dict[tuple[int, int], Record] = {}
    gaps: list[range] = []
    for line in read_stream(files):
        r = line.record
        if "ix" in r:
            records[(r["ix"], r["n"])] = {k: v for k, v in r.items() if k != "h"}
        elif r["ev"] == "gap":
            gaps.append(range(int(r["from"]), int(r["to"]) + 1))
    return records, gaps


def compare_nodes(logs: Mapping[str, Sequence[Path]], limit: int = 20) -> list[str]:
    """What differs between the nodes' logs (``logs``: node -> its files), in words."""
    read = {node: _events(files) for node, files in logs.items()}
    problems: list[str] = []
    keys = sorted({key for records, _ in read.values() for key in records})
    for key in keys:
        held: dict[str, Record] = {}
        for node, (records, gaps) in read.items():
            if key in records:
                held[node] = records[key]
            elif _covers(records, gaps, key[0]):
                problems.append(f"node {node} lacks record {key[0]}/{key[1]} that others hold")
        values = list(held.values())
        if any(v != values[0] for v in values[1:]):
            problems.append(f"record {key[0]}/{key[1]} differs: {held}")
        if len(problems) >= limit:
            break
    return problems


def _covers(records: dict[tuple[int, int], Record], gaps: list[range], ix: int) -> bool:
    if not records:
        return False
    first, last = min(records)[0], max(records)[0]
    return first <= ix <= last and not any(ix in g for g in gaps)


def match_clients(
    records: Iterable[Record],
    checkouts: Mapping[int, tuple[str, int]],
    checkins: Iterable[int],
    limit: int = 20,
) -> list[str]:
    """``checkouts``: grant id -> (feature, count) of every checkout a client was told
    succeeded; ``checkins``: the grant ids of every checkin a client was told succeeded."""
    outs: Counter[int] = Counter()
    ins: Counter[int] = Counter()
    returned_by: dict[int, str] = {}
    out_of: dict[int, tuple[str, int]] = {}
    for r in records:
        if r.get("ev") == "out":
            outs[int(r["grant"])] += 1
            out_of[int(r["grant"])] = (str(r["feature"]), int(r["count"]))
        elif r.get("ev") == "in":
            ins[int(r["grant"])] += 1
            returned_by[int(r["grant"])] = str(r.get("reason"))
    problems = [f"grant {g} checked out {n} times in the log" for g, n in outs.items() if n > 1]
    problems += [f"grant {g} returned {n} times in the log" for g, n in ins.items() if n > 1]
    for gid, what in sorted(checkouts.items()):
        if outs[gid] == 0:
            problems.append(f"grant {gid} ({what[0]} x{what[1]}) a client got has no out record")
        elif out_of[gid] != what:
            problems.append(f"grant {gid}: the client got {what}, the log says {out_of[gid]}")
    for gid in sorted(set(checkins)):
        if ins[gid] == 0:
            problems.append(f"grant {gid}, checked in by its client, has no in record")
        elif returned_by[gid] != "checkin":
            problems.append(f"grant {gid}, checked in by its client, is in as {returned_by[gid]}")
    return problems[:limit]
