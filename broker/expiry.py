"""Warnings of license lines about to expire: 30, 14 and 7 days ahead (issue 12 item 4).

An expired line grants nothing new and the grants made on it run until checked in
(``zbroker.broker.seats``: a pool's total on a day counts only the lines live that day), so
an administrator must hear of an expiry before it happens. Each node logs a warning when
a line of the license the triad serves is 30, 14 and 7 days (or fewer) from its expiry
date, once per threshold per line per start of the node; a node started 5 days before
an expiry logs the 7-day warning only (the larger thresholds are passed, not due), and
the day a line expires one warning says so.

``due`` decides, purely, from the lines, the day and what was warned already;
``ExpiryWarnings`` keeps what was warned for the node's core, which logs them.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence

from zbroker.broker.model import Entitlement

__all__ = ["THRESHOLDS", "ExpiryWarnings", "days_left", "due"]

THRESHOLDS = (30, 14, 7)  # days before the expiry date
Warned = tuple[str, str, str, int, datetime.date, int]  # a line's identity, and a threshold
_EXPIRED = -1  # the threshold key of "has expired"


def days_left(line: Entitlement, day: datetime.date) -> int | None:
    """Days from ``day`` to the line's last day (0: it expires tonight; < 0: expired);
    None for a permanent line."""
    return None if line.expires is None else (line.expires - day).days


def due(
    lines: Iterable[Entitlement], day: datetime.date, warned: frozenset[Warned] | set[Warned]
) -> list[tuple[Warned, str]]:
    """The warnings due on ``day`` that ``warned`` does not hold yet: (key, message) each,
    at most one per line (its smallest threshold reached)."""
    out: list[tuple[Warned, str]] = []
    for line in lines:
        left = days_left(line, day)
        if left is None or line.expires is None or left > THRESHOLDS[0]:
            continue
        threshold = _EXPIRED if left < 0 else min(t for t in THRESHOLDS if left <= t)
        key = (line.source, line.feature, line.version, line.count, line.expires, threshold)
        if key in warned:
            continue
        seats = "1 seat" if line.count == 1 else f"{line.count} seats"
        what = f"{line.feature} {line.version} ({seats}, {line.source or 'license'})"
        if left < 0:
            message = (
                f"license line {what} expired on {line.expires.isoformat()}: it grants no new "
                "seat; the seats already out run until checked in"
            )
        else:
            when = "today" if left == 0 else f"in {left} day{'s' if left != 1 else ''}"
            message = (
                f"license line {what} expires {when} ({line.expires.isoformat()}); renew it, "
                "then copy the new file to every node and reread"
            )
        out.append((key, message))
    return out


class ExpiryWarnings:
    """What one node has warned since it started."""

    def __init__(self) -> None:
        self.warned: set[Warned] = set()
        self._checked: tuple[object, datetime.date | None] = (None, None)

    def check(self, lines: Sequence[Entitlement], day: datetime.date) -> list[str]:
        """The warnings to log now; asks ``due`` only when the lines or the day changed."""
        if self._checked[0] is lines and self._checked[1] == day:
            return []
        self._checked = (lines, day)
        found = due(lines, day, self.warned)
        for key, _ in found:
            line_key = key[:5]
            # a threshold passed counts as warned: only the smallest reached is logged
            self.warned.update((*line_key, t) for t in (*THRESHOLDS, _EXPIRED) if t >= key[5])
        return [message for _, message in found]
