"""``zbroker web`` as a real process over a live triad, read by Debian's headless Chromium.

Holders come from the client library, one of them with a hostile user and host name;
a third client waits in the queue. The test reads the page as Chromium built it (its
DOM after load) and checks what a person would see there: the nodes' roles, each
feature's use against its count, the holders, the hostile names as plain text, the
queue, and a chart of each feature's last 24 hours drawn from the nodes' report logs
(the test triad keeps them: zbroker init turns them on).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_web import HOSTILE, Tables

from zbroker import LicenseClient
from zbroker.clients.licpath import KEYS_ENV
from zbroker.clients.testing import wait_for

pytestmark = pytest.mark.integration

ZBROKER = [sys.executable, "-m", "zbroker.broker"]
HOSTILE_HOST = '<img src=x onerror="document.title=1">'
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # root in a container: the sandbox needs user namespaces
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium(tmp_path: Path, *args: str, timeout: float = 120.0) -> str:
    """Run Debian's Chromium headless with ``args``; its standard output."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail(
            "Debian's chromium is not installed: apt-get install -y chromium (.ci/run does)"
        )
    profile = tmp_path / "chromium-profile"
    done = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise AssertionError(f"chromium exited {done.returncode}:\n{done.stderr[-4000:]}")
    return done.stdout


@contextlib.contextmanager
def zbroker_web(tmp_path: Path, *args: str) -> Iterator[str]:
    """``zbroker web ARGS`` on a port the OS picks, until the block ends; its URL.

    Without ``ZBROKER_SERVER_KEYS`` (which a running test triad sets): the command must
    find the nodes' keys from its own arguments.
    """
    out = tmp_path / f"web{len(list(tmp_path.glob('web*.log')))}.log"
    env = {k: v for k, v in os.environ.items() if k != KEYS_ENV} | {"PYTHONUNBUFFERED": "1"}
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [*ZBROKER, "web", *args, "--listen", "127.0.0.1:0"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def announced() -> str | None:
        if proc.poll() is not None:
            raise AssertionError(f"zbroker web exited {proc.returncode}:\n{out.read_text()}")
        for line in out.read_text().splitlines():
            if line.startswith("serving on "):
                return line.removeprefix("serving on ")
        return None

    try:
        yield wait_for(announced, 30.0, "zbroker web to say where it serves")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode not in (0, -signal.SIGTERM):
            print(out.read_text())


@pytest.fixture
def web(triad: Any, tmp_path: Path) -> Iterator[str]:
    """``zbroker web --config`` for ``triad``, reading its report logs every second; its URL."""
    with zbroker_web(tmp_path, "--config", str(triad.config_path), "--history-every", "1") as url:
        yield url


def _y(chart: dict[str, Any], seats: int) -> float:
    """Where the chart draws ``seats`` (broker/web/model.py: 0 at the bottom)."""
    return round(chart["height"] * (1 - seats / chart["top"]), 1)


def _model(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "status.json", timeout=5) as reply:
        data: dict[str, Any] = json.load(reply)
    return data


def test_a_person_sees_nodes_use_holders_and_queue_in_chromium(
    triad: Any, web: str, tmp_path: Path
) -> None:
    triad.wait_for_primary()
    ann = LicenseClient(triad.license, user="ann", host="ws-ann", display=":1")
    mallory = LicenseClient(triad.license, user=HOSTILE, host=HOSTILE_HOST, display=":0")
    bob = LicenseClient(triad.license, user="bob", host="ws-bob", display=":2")
    carol = LicenseClient(triad.license, user="carol", host="ws-carol", display=":3")
    waiting: list[Any] = []
    try:
        ann.checkout("cad", count=2)
        mallory.checkout("cad", count=1)
        held = bob.checkout("solver", count=2)
        waiter = threading.Thread(
            target=lambda: waiting.append(carol.checkout("solver", count=1, wait=60))
        )
        waiter.start()

        def shown() -> dict[str, Any] | None:
            model = _model(web)
            features = {f["name"]: f for f in model["features"]}
            ready = (
                model["primary"] is not None
                and len(features["cad"]["holders"]) == 2
                and features["solver"]["queued"] == 1
                # the report logs read since: cad's chart ends at its 3 seats
                and (chart := features["cad"]["history"]) is not None
                and chart["peak"].endswith(f" {_y(chart, 3)}")
            )
            return model if ready else None

        wait_for(shown, 30.0, "the page's model to show the holders and the queue", every=0.2)
        dom = chromium(tmp_path, "--dump-dom", web)
        seen = Tables(dom)

        # No markup from a client made it into the page: no script ran, no image loaded.
        assert "script" not in seen.tags and "img" not in seen.tags
        assert "<title>zbroker status</title>" in dom

        roles = sorted(row[1] for row in seen.tables["nodes"][1:])
        assert roles == ["backup", "backup", "primary"]
        features = {row[0]: row for row in seen.tables["features"][1:]}
        assert features["cad"][1] == "3 / 15"
        assert features["solver"][1:3] == ["2 / 2", "1"]
        assert "days left" in features["cad"][3]
        holders = [row[:5] for row in seen.tables["holders"][1:]]
        assert sorted(holders) == sorted(
            [
                ["cad", "ann", "ws-ann", ":1", "2"],
                ["cad", HOSTILE, HOSTILE_HOST, ":0", "1"],
                ["solver", "bob", "ws-bob", ":2", "2"],
            ]
        )
        assert seen.tables["queue"][1:] == [["solver", "1"]]
        # One chart per feature, with its points: what the report logs say of the last day.
        charts = {str(c["data-feature"]): str(c["data-points"]) for c in seen.charts}
        assert sorted(charts) == ["cad", "solver", "viewer"]
        assert all(int(points) >= 1 for points in charts.values())
        assert "3 / 15" in features["cad"][1] and "Use over the last 24 hours" in dom
        assert dom.count('class="average"') == 3 and "No chart" not in dom

        bob.checkin(held)  # the waiter is served, and leaves the queue
        waiter.join(timeout=30)
        assert [g.feature for g in waiting] == ["solver"]
    finally:
        for client in (ann, mallory, bob, carol):
            client.close()


def test_the_triad_from_a_license_file_and_the_mistakes_of_one_line(
    triad: Any, tmp_path: Path
) -> None:
    triad.wait_for_primary()
    with zbroker_web(tmp_path, "--license", triad.license) as url:
        model = wait_for(
            lambda: (m := _model(url))["primary"] and m,
            30.0,
            "the page to show the primary, with the keys of the license's SERVER lines",
            every=0.2,
        )
        assert model["mode"] == "curve"
        assert [n["role"] for n in model["nodes"]].count("backup") == 2
        with urllib.request.urlopen(url, timeout=5) as reply:
            # Beside autoescape: were a name ever to slip through, no script would run.
            assert reply.headers["Content-Security-Policy"].startswith("default-src 'none';")
            assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
        taken = url.removeprefix("http://").rstrip("/")
        mistakes = {
            ("--license", triad.license, "--listen", taken): "cannot serve on " + taken,
            ("--license", triad.license, "--listen", "8090"): "expected HOST:PORT",
            ("--license", str(tmp_path / "none.lic")): "none.lic",
        }
        for args, said in mistakes.items():
            done = subprocess.run(
                [*ZBROKER, "web", *args], capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 2, (args, done.stderr)
            assert done.stderr.count("\n") == 1 and said in done.stderr, done.stderr
