"""Load with faults: callers, kills and restarts at random, cut callback polls.

The engine is goplug.soak's ChaosRun (``python -m goplug.soak`` runs it for longer); here its
plugin processes are the test plugin, started and reaped by the ``spawn`` fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from goplug.soak import ChaosConfig, ChaosRun

pytestmark = pytest.mark.timeout(90)

CHAOS_SECONDS = 10.0


def test_chaos_calls_are_right_or_typed_and_everything_recovers(plugin_dir, spawn):
    seed = int(os.environ.get("GOPLUG_CHAOS_SEED", "0")) or None
    config = ChaosConfig(seconds=CHAOS_SECONDS, plugins=4, callers=8, seed=seed)
    run = ChaosRun(str(plugin_dir), lambda name: spawn(plugin_dir, name, wait=False).proc, config)
    started = time.monotonic()
    report = run.run()
    print(report.render())  # shown by pytest on failure, with the seed to replay it
    assert time.monotonic() - started < 20

    assert report.calls > 1000
    assert report.kills >= 5 and report.cuts >= 1
    # Every call returned the right bytes or raised a typed GoPlugError.
    assert report.wrong_answers == 0
    assert report.untyped_errors == []
    # After the chaos stops every plugin is back within 2 s and every call succeeds.
    assert report.final_recovery is not None and report.final_recovery <= 2.0
    assert report.final_failures == 0
    # No notification that notify accepted was lost or duplicated, and order held.
    assert report.notifications_accepted > 100
    assert report.notifications_lost == 0
    assert report.notifications_duplicated == 0
    assert report.notifications_out_of_order == 0
    # Resources flat: what the registry opened it closed.
    assert report.fds_after <= report.fds_before
    assert report.threads_after <= report.threads_before
    assert report.close_seconds < 1.0
    assert report.failures() == []


def test_soak_command_runs_and_reports(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "goplug.soak", "--seconds", "3", "--plugins", "2", "--seed", "7"],
        capture_output=True,
        timeout=60,
        env={**os.environ, "TMPDIR": "/tmp"},
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()[-2000:]
    for line in (
        "calls done:",
        "errors by type:",
        "recovery p50 / p99:",
        "notifications:",
        "result:              ok",
    ):
        assert line in out, out
