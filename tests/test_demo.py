"""``goplug demo`` runs the tour end to end and leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
HAS_NODE = bool(shutil.which("node")) and (Path(SRC).parent / "examples/node/plugin.js").is_file()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is not alive
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def _run_demo(path: str | None = None) -> tuple[int, str, list[int]]:
    """Run ``python -m goplug demo``; return its status, its stdout and the pids it printed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH", "")) if p)
    if path is not None:
        env["PATH"] = path
    result = subprocess.run(
        [sys.executable, "-m", "goplug", "demo"],
        capture_output=True,
        timeout=60,
        env=env,
    )
    out = result.stdout.decode()
    # Every plugin process the tour launched: "(pid N)", "pid N, restarts=...", "pid N ended".
    pids = sorted({int(pid) for pid in re.findall(r"\bpid (\d+)", out)})
    if result.returncode != 0:
        out += "\n--- stderr ---\n" + result.stderr.decode()
    return result.returncode, out, pids


def _kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _line_index(lines: list[str], pattern: str, start: int = 0) -> int:
    """Index of the first line at or after ``start`` matching ``pattern``."""
    for i in range(start, len(lines)):
        if re.search(pattern, lines[i]):
            return i
    raise AssertionError(f"no line matching {pattern!r} after line {start}:\n" + "\n".join(lines))


def _check_common(out: str, pids: list[int]) -> None:
    assert "Do@Test" in out
    assert re.search(r"registry\.launch\('\S*examples/python/do_plugin\.py', name='Do'", out)
    assert "launched Do@Test in" in out
    assert "raised MethodNotFound" in out
    assert "raised RemoteError: type='UnicodeDecodeError'" in out
    assert "the plugin's traceback comes with it" in out
    assert "Test Data" in out  # a callback notification arrived
    assert "  Do@Test | " in out  # the plugin's own output is shown

    lines = out.splitlines()
    # The restart step: SIGKILL, "lost", then "loaded" again with restarts=1 under a new pid,
    # and the same handle works (a call succeeds) and its callback gets notified again.
    kill = _line_index(lines, r"os\.kill\(handle\.process\.pid, SIGKILL\), pid \d+")
    killed_pid = int(re.findall(r"pid (\d+)", lines[kill])[-1])
    first_loaded = _line_index(lines, r"^\[.*\] loaded Do@Test \(1 method; pid \d+, restarts=0\)")
    assert f"pid {killed_pid}," in lines[first_loaded]
    lost = _line_index(lines, r"^\[.*\] lost Do@Test", kill)
    loaded = _line_index(lines, r"^\[.*\] loaded Do@Test \(1 method; pid \d+, restarts=1\)", lost)
    new_pid = int(re.findall(r"pid (\d+)", lines[loaded])[0])
    assert new_pid != killed_pid
    _line_index(lines, r"Do@Test is back: .*restarts=1, state running", loaded)
    called = _line_index(
        lines, r"Do@Test\.Do\('still the same handle'\) -> 'STILL THE SAME", loaded
    )
    _line_index(lines, r"the 'callBack' subscription carried over", called)
    assert "killed by SIGKILL" in out  # handle.process.reason, or the "lost" event's reason

    # Closing the registry stopped the plugins; the tour says how each ended.
    closed = _line_index(lines, r"application: registry closed in")
    _line_index(lines, rf"Do@Test: pid {new_pid} ended: exit status 0", closed)

    match = re.search(r"plugin directory: (\S+)", out)
    assert match, out
    assert not os.path.exists(match.group(1))  # removed, and it was empty
    assert re.search(r"removed \S+ \(it was empty\)", out)
    assert "FAILED" not in out

    assert killed_pid in pids and new_pid in pids
    assert not [pid for pid in pids if _alive(pid)]


def test_demo() -> None:
    status, out, pids = _run_demo()
    try:
        assert status == 0, out
        _check_common(out, pids)
        if HAS_NODE:
            assert "launched Echo@Node in" in out
            assert "Echo@Node.Upper('hello from Python') -> 'HELLO FROM PYTHON'" in out
            assert "deliberate failure" in out
            assert "all 3 notifications arrived, in order" in out
            assert re.search(r"Echo@Node: pid \d+ ended: exit status 0", out), out
            assert re.search(r"demo complete$", out, re.MULTILINE), out
        else:
            assert "skipping the JavaScript plugin:" in out
            assert "demo complete, without the JavaScript plugin" in out
    finally:
        _kill_leftovers(pids)


def test_demo_without_node() -> None:
    """Without node on the PATH the tour runs the Python part and says what it skipped."""
    with tempfile.TemporaryDirectory() as empty:
        status, out, pids = _run_demo(path=empty)
    try:
        assert status == 0, out
        _check_common(out, pids)
        assert "skipping the JavaScript plugin: node is not on PATH" in out
        assert "Echo@Node" not in out
        assert "demo complete, without the JavaScript plugin (node is not on PATH)" in out
    finally:
        _kill_leftovers(pids)
