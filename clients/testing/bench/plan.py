"""The bench's plans: how long, how many and which phases (``zbroker bench --plan``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from zbroker.clients.testing.bench import PHASES


@dataclass(frozen=True)
class Plan:
    name: str
    levels: tuple[int, ...] = (1, 16, 64)
    warmup: float = 1.0  # seconds of load before each measured window
    duration: float = 5.0  # seconds of each measured window
    procs: int = 2  # load processes
    fsync_off: bool = True  # also measure a triad with fsync = false
    tuned_echo: bool = True  # also measure the tuned echo (echo.py), a stricter baseline
    curve: bool = True  # also measure a triad in secure mode (CURVE + ZAP), fsync on
    floor: bool = True  # also measure the replication floor (floor.py), fsync on
    # also measure a triad whose nodes run this compiled tree, fsync on (bench/compiled.py)
    compiled: str | None = None
    kills: int = 20
    sessions: int = 10_000
    grants_per_session: int = 10
    idle_window: float = 5.0
    beat_window: float = 10.0  # one whole heartbeat interval (lease 30 s / 3)
    wipe: bool = True  # also time the catch-up of a backup whose disk was wiped
    window: int = 64  # requests in flight while opening sessions and checking out grants
    storm_clients: int = 1_000  # SPEC 7: 1,000 clients failing over at once
    storm_procs: int = 4  # processes the storm's clients are spread over
    flood_requests: int = 1_000  # SPEC 7: 1,000 status requests that are never read
    flood_outstanding: int = 16  # honest checkout/checkin sessions beside the flood
    flood_abort_mb: int = 4_096  # a primary past this RSS is killed (and the run says so)
    phases: tuple[str, ...] = PHASES


PLANS: dict[str, Plan] = {
    "full": Plan("full"),
    "quick": Plan(
        "quick",
        warmup=0.4,
        duration=1.5,
        kills=3,
        sessions=2_000,
        grants_per_session=5,
        idle_window=1.0,
        beat_window=2.0,
        storm_clients=200,
    ),
    "tiny": Plan(
        "tiny",
        levels=(1, 4),
        warmup=0.1,
        duration=0.3,
        fsync_off=False,
        tuned_echo=False,
        kills=1,
        sessions=50,
        grants_per_session=2,
        idle_window=0.2,
        beat_window=0.3,
        wipe=False,
        storm_clients=20,
        storm_procs=2,
        flood_requests=50,
        flood_outstanding=4,
    ),
}


def plan_named(name: str, **overrides: Any) -> Plan:
    return replace(PLANS[name], **{k: v for k, v in overrides.items() if v is not None})
