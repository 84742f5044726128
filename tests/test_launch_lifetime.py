"""Launched plugins never outlive the application, however it ends, and leave no zombie.

Each case runs ``tests/apps/reaper.py MODE DIR``: a child subreaper (PID 1 here may not reap
orphans) that runs ``tests/apps/launching_app.py MODE DIR``, an application launching one plugin
and then ending by MODE: returning without ``close()`` (``exit``), an uncaught exception
(``raise``), SIGTERM with Python's default action, so no atexit (``term``), or SIGKILL
(``kill``). The reaper reports, as JSON, how the app and the plugin ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="needs Linux: PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER and /proc",
)

HERE = Path(__file__).resolve().parent
REAPER = HERE / "apps" / "reaper.py"
REAPER_TIMEOUT = 90.0
"""Seconds the reaper may run (its own deadlines add up to about 80 s)."""
PLUGIN_EXIT_WITHIN = 5.0
"""Seconds within which the plugin must be gone once the app ended or was signalled."""

APP_EXIT = {"exit": 0, "raise": 1, "term": -signal.SIGTERM, "kill": -signal.SIGKILL}


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of ``pid``, None if it does not exist."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def _kill_if_ours(pid: int, start: int | None, marker: str) -> None:
    """SIGKILL ``pid`` if it is still the very process the reaper reported, alive.

    The reaper may be gone (its orphans then belong to somebody else), so the process is known
    by pid *and* start time *and* a command line naming this test's private directory.
    """
    state = _stat(pid)
    if state is None or state[0] in ("Z", "X") or (start is not None and state[1] != start):
        return
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return
    if marker in cmd:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _events(stdout: str) -> list[dict[str, Any]]:
    events = []
    for line in stdout.splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                events.append(value)
    return events


def run_reaper(mode: str, location: Path) -> tuple[dict[str, Any], str]:
    """Run the reaper for ``mode``; return its result and its stderr (the app's too).

    Whatever happens, nothing it started keeps running once this returns or raises.
    """
    reaper = subprocess.Popen(
        [sys.executable, str(REAPER), mode, str(location)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout = stderr = ""
    try:
        try:
            stdout, stderr = reaper.communicate(timeout=REAPER_TIMEOUT)
        except subprocess.TimeoutExpired:
            reaper.send_signal(signal.SIGTERM)  # it kills and reaps what it started
            try:
                stdout, stderr = reaper.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                reaper.kill()
                stdout, stderr = reaper.communicate()
            pytest.fail(f"the reaper did not finish within {REAPER_TIMEOUT:g} s:\n{stderr}")
    finally:
        if reaper.poll() is None:
            reaper.kill()
            reaper.wait()
        for event in _events(stdout):
            if event.get("event") in ("app", "plugin") and isinstance(event.get("pid"), int):
                _kill_if_ours(event["pid"], event.get("start"), str(location))
    results = [e for e in _events(stdout) if e.get("event") == "result"]
    assert reaper.returncode == 0 and len(results) == 1, (
        f"reaper exit {reaper.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    )
    return results[0], stderr


@pytest.mark.parametrize("mode", ["exit", "raise", "term", "kill"])
def test_launched_plugin_ends_with_the_application(mode: str, plugin_dir: Path) -> None:
    result, stderr = run_reaper(mode, plugin_dir)
    detail = f"{json.dumps(result, indent=1)}\nstderr:\n{stderr}"

    assert result["errors"] == [], detail
    assert result["app_exit"] == APP_EXIT[mode], detail
    assert isinstance(result["plugin_pid"], int), detail
    # The plugin is gone (and reaped: /proc no longer lists it, or it was reaped as an orphan)...
    assert result["plugin_end"] in ("gone", "reaped-by-reaper"), detail
    now = _stat(result["plugin_pid"])
    assert now is None or now[1] != result["plugin_start"], detail
    # ... within a few seconds, and no process is left behind, zombie or alive.
    assert result["plugin_seconds"] is not None, detail
    assert result["plugin_seconds"] < PLUGIN_EXIT_WITHIN, detail
    assert result["leftovers"] == [], detail

    leftover_files = sorted(p.name for p in plugin_dir.iterdir())
    if mode in ("exit", "raise"):
        # atexit closed the registry: SIGTERM, the plugin stopped cleanly (exit status 0, its
        # .pconf and socket withdrawn) and the app itself reaped it.
        assert result["plugin_end"] == "gone", detail
        assert result["plugin_exit_seen_by_app"] == 0, detail
        assert not [n for n in leftover_files if n.endswith((".pconf", ".sock"))], leftover_files
    else:
        # No atexit: the plugin died of PR_SET_PDEATHSIG, was orphaned to the reaper and
        # reaped by it. Its files may remain (the plugin_dir fixture removes them).
        assert result["plugin_end"] == "reaped-by-reaper", detail
        assert result["plugin_exit"] == -signal.SIGKILL, detail
        assert result["plugin_exit_seen_by_app"] is None, detail
