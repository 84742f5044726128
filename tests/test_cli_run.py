"""``goplug run`` (a supervised launched plugin) and what ``goplug ls`` shows of it, for real."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_PLUGIN, Spawner, wait_for

from goplug.process import ProcessIdentity, process_start_time

SRC = str(Path(__file__).resolve().parents[1] / "src")
TIMEOUT = 30.0
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH", "")) if p)
    return env


def goplug(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "goplug", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
    )


def ls_json(directory: Path) -> list[dict[str, Any]]:
    result = goplug("ls", str(directory), "--json")
    assert result.returncode == 0, result.stderr
    items: list[dict[str, Any]] = json.loads(result.stdout)
    return items


def plugin_cmd(directory: Path, name: str, namespace: str = "") -> list[str]:
    return [sys.executable, str(TEST_PLUGIN), str(directory), name, namespace]


class Run:
    """A ``goplug run`` process; its stdout lines are collected as they come."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.directory = directory
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "goplug", "run", str(directory), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        self.lines: list[str] = []
        self.err: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._seen = 0
        # Plugin processes seen in the events, with their start time (to never kill a reused pid).
        self.plugins: dict[int, ProcessIdentity] = {}
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read_out, args=(self.proc.stdout,), daemon=True),
            threading.Thread(target=self._read_err, args=(self.proc.stderr,), daemon=True),
        ]
        for thread in self._readers:
            thread.start()

    def _read_out(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)
            match = re.search(r" pid=(\d+) ", line)
            if match:
                pid = int(match.group(1))
                if pid not in self.plugins:
                    self.plugins[pid] = ProcessIdentity(pid, process_start_time(pid))
            self._queue.put(line)
        self._queue.put(None)

    def _read_err(self, stream: Any) -> None:
        for line in stream:
            self.err.append(line)

    def expect(self, kind: str, *, timeout: float = 20.0) -> dict[str, str]:
        """Wait for the next event line of ``kind``; return its fields (label, pid, ...)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {kind} line within {timeout} s:\n{self.output()}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"goplug run ended before a {kind} line:\n{self.output()}")
            fields = parse_event(line)
            if fields["kind"] == kind:
                return fields

    def wait(self, timeout: float = TIMEOUT) -> int:
        code = self.proc.wait(timeout)
        for thread in self._readers:
            thread.join(timeout)
        return code

    def output(self) -> str:
        return "".join(self.lines) + "--- stderr ---\n" + "".join(self.err)

    def stderr(self) -> str:
        return "".join(self.err)

    def stop(self) -> None:
        """End the run and every plugin process it started (teardown, test passed or not)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for identity in list(self.plugins.values()):
            # Only a process known by its start time: a pid reused since is somebody else's.
            if identity.start is not None and identity.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(identity.pid, signal.SIGKILL)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def parse_event(line: str) -> dict[str, str]:
    """``STAMP  kind  label  pid=N restarts=N  detail`` as a dict."""
    match = re.match(
        STAMP + r"  (?P<kind>\S+)\s+(?P<label>\S+)  pid=(?P<pid>\S+) restarts=(?P<restarts>\d+)"
        r"(?:  (?P<detail>.*))?$",
        line.rstrip("\n"),
    )
    assert match, f"not an event line: {line!r}"
    return {k: v or "" for k, v in match.groupdict().items()}


@pytest.fixture
def start_run() -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def start(directory: Path, *args: str) -> Run:
        run = Run(directory, *args)
        runs.append(run)
        return run

    try:
        yield start
    finally:
        for run in runs:
            run.stop()


def gone(pid: int) -> Callable[[], bool]:
    identity = ProcessIdentity(pid, process_start_time(pid))
    return lambda: not identity.alive()


# -- tests -----------------------------------------------------------------------------------------


def test_run_prints_loaded_and_ls_shows_pid_uptime_restarts(
    plugin_dir: Path, start_run: Callable[..., Run]
) -> None:
    run = start_run(plugin_dir, "--", *plugin_cmd(plugin_dir, "Test", "NS"))
    loaded = run.expect("loaded")
    assert loaded["label"] == "Test@NS"
    assert loaded["restarts"] == "0"
    assert "Echo" in loaded["detail"]
    pid = int(loaded["pid"])

    result = goplug("ls", str(plugin_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:6] == ["NAMESPACE", "NAME", "STATE", "PID", "UPTIME", "RESTARTS"]
    row = next(line for line in lines[1:] if " Test " in line).split()
    assert row[:4] == ["NS", "Test", "live", str(pid)]
    assert re.fullmatch(r"\d+s|\d+m\d\ds", row[4]), row
    assert row[5] == "0"

    (item,) = ls_json(plugin_dir)
    assert item["pid"] == pid
    assert item["launched"] is True
    assert item["restarts"] == 0
    assert isinstance(item["uptime"], float) and 0 <= item["uptime"] < 600
    assert run.proc.poll() is None


def test_run_restarts_a_killed_plugin(plugin_dir: Path, start_run: Callable[..., Run]) -> None:
    run = start_run(plugin_dir, "--", *plugin_cmd(plugin_dir, "Test", "NS"))
    first = int(run.expect("loaded")["pid"])
    (item,) = ls_json(plugin_dir)
    assert item["pid"] == first

    os.kill(first, signal.SIGKILL)
    lost = run.expect("lost")
    assert lost["pid"] == str(first)
    assert "SIGKILL" in lost["detail"] or "went away" in lost["detail"], lost
    again = run.expect("loaded")
    assert again["restarts"] == "1"
    second = int(again["pid"])
    assert second != first

    # ls sees the new process once its record is rewritten (the record follows the load).
    def restarted() -> bool:
        items = ls_json(plugin_dir)
        return len(items) == 1 and items[0]["pid"] == second and items[0]["restarts"] == 1

    wait_for(restarted, timeout=15, interval=0.05)
    assert run.proc.poll() is None


def test_sigterm_stops_the_plugin_and_empties_the_directory(
    plugin_dir: Path, start_run: Callable[..., Run]
) -> None:
    run = start_run(plugin_dir, "--", *plugin_cmd(plugin_dir, "Test", "NS"))
    pid = int(run.expect("loaded")["pid"])
    plugin_gone = gone(pid)
    assert sorted(os.listdir(plugin_dir)) == [".Test@NS.launch", "Test@NS.pconf", "Test@NS.sock"]

    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.wait() == 0, run.output()
    assert os.listdir(plugin_dir) == []
    wait_for(plugin_gone, timeout=5)
    assert "Traceback" not in run.stderr()


def test_command_that_exits_at_once(plugin_dir: Path) -> None:
    code = "import sys; sys.stderr.write('boom: no configuration\\n'); sys.exit(3)"
    result = subprocess.run(
        [sys.executable, "-m", "goplug", "run", str(plugin_dir), "--", sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
    )
    assert result.returncode == 1, result
    assert "exit status 3" in result.stderr
    assert "boom: no configuration" in result.stderr
    assert "goplug: error:" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(plugin_dir) == []


def test_restart_never_exits_when_the_plugin_dies(
    plugin_dir: Path, start_run: Callable[..., Run]
) -> None:
    run = start_run(plugin_dir, "--restart", "never", "--", *plugin_cmd(plugin_dir, "Test"))
    pid = int(run.expect("loaded")["pid"])

    os.kill(pid, signal.SIGKILL)
    assert run.wait() == 1, run.output()
    kinds = [parse_event(line)["kind"] for line in run.lines]
    assert kinds.count("loaded") == 1, run.output()
    assert "lost" in kinds
    assert kinds[-1] == "stopped"
    assert "not restarted" in run.stderr()
    assert os.listdir(plugin_dir) == []


def test_clean_exit_is_not_restarted_and_exits_0(
    plugin_dir: Path, start_run: Callable[..., Run]
) -> None:
    run = start_run(plugin_dir, "--", *plugin_cmd(plugin_dir, "Test"))
    pid = int(run.expect("loaded")["pid"])

    os.kill(pid, signal.SIGTERM)  # the plugin stops cleanly: exit status 0, policy on-failure
    assert run.wait() == 0, run.output()
    stopped = parse_event(run.lines[-1])
    assert stopped["kind"] == "stopped"
    assert "exit status 0" in stopped["detail"]
    assert [parse_event(line)["kind"] for line in run.lines].count("loaded") == 1


def test_gives_up_after_max_restarts(plugin_dir: Path, start_run: Callable[..., Run]) -> None:
    run = start_run(plugin_dir, "--max-restarts", "0", "--", *plugin_cmd(plugin_dir, "Test"))
    pid = int(run.expect("loaded")["pid"])

    os.kill(pid, signal.SIGKILL)
    failed = run.expect("failed")
    assert "gave up after 0 restarts" in failed["detail"]
    assert run.wait() == 1, run.output()
    assert "failed" in run.stderr()


def test_plugin_output_is_logged_with_time_and_logger_name(
    plugin_dir: Path, start_run: Callable[..., Run]
) -> None:
    script = (
        "import runpy, sys\n"
        "print('hello on stdout', flush=True)\n"
        "print('hello on stderr', file=sys.stderr, flush=True)\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    command = [sys.executable, "-c", script, *plugin_cmd(plugin_dir, "Out", "NS")[1:]]
    run = start_run(plugin_dir, "--name", "Out", "--namespace", "NS", "--", *command)
    run.expect("loaded")

    def logged() -> bool:
        text = run.stderr()
        return "hello on stdout" in text and "hello on stderr" in text

    wait_for(logged, timeout=10, interval=0.02)
    for line in run.err:
        if "hello on" in line:
            assert re.match(STAMP + r" goplug\.plugin\.NS\.Out: hello on std(out|err)$", line), line


def test_ls_without_a_live_launch_record(plugin_dir: Path, spawn: Spawner) -> None:
    plain = spawn(plugin_dir, "Plain")
    result = goplug("ls", str(plugin_dir))
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if " Plain " in line).split()
    assert row[:6] == ["-", "Plain", "live", str(plain.pid), "-", "-"]
    (item,) = ls_json(plugin_dir)
    assert (item["launched"], item["uptime"], item["restarts"]) == (False, None, None)

    record = plugin_dir / ".Plain.launch"

    def write(**fields: object) -> None:
        base = {
            "Name": "Plain",
            "NameSpace": "",
            "Pid": plain.pid,
            "Started": time.time() - 200,
            "Restarts": 2,
            "State": "running",
            "Command": ["x"],
            "Registry": os.getpid(),
        }
        record.write_text(json.dumps({**base, **fields}))

    write()  # a live registry (this test) naming this very pid
    (item,) = ls_json(plugin_dir)
    assert (item["launched"], item["restarts"]) == (True, 2)
    assert 199 <= item["uptime"] < 600
    table = goplug("ls", str(plugin_dir)).stdout
    text = next(line for line in table.splitlines() if "Plain" in line)
    assert re.search(r" 3m\d\ds +2 ", text), text

    write(Pid=plain.pid + 100000)  # it names another process
    assert ls_json(plugin_dir)[0]["launched"] is False

    write(Registry=_dead_pid())  # its registry is gone
    assert ls_json(plugin_dir)[0]["launched"] is False


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(TIMEOUT)
    return proc.pid


@pytest.mark.parametrize(
    "args",
    [
        ["run", "DIR"],  # no command
        ["run", "DIR", "--restart", "sometimes", "--", "x"],
        ["run", "DIR", "--max-restarts", "-1", "--", "x"],
        ["run", "DIR", "--namespace", "NS", "--", "x"],  # a namespace needs a name
    ],
)
def test_run_usage_errors(plugin_dir: Path, args: list[str]) -> None:
    result = goplug(*[str(plugin_dir) if a == "DIR" else a for a in args])
    assert result.returncode == 2, result
    assert "goplug: error:" in result.stderr


def test_run_help() -> None:
    result = goplug("run", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: goplug run")
    assert "DIR -- COMMAND [ARGS...]" in result.stdout
    assert "example" in result.stdout


def test_sigterm_while_the_plugin_starts(plugin_dir: Path, start_run: Callable[..., Run]) -> None:
    # A command that never announces itself: the signal must not wait for --start-timeout.
    script = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(120)"
    run = start_run(plugin_dir, "--start-timeout", "60", "--", sys.executable, "-c", script)

    def child_pid() -> int | None:
        for line in run.err:
            match = re.search(r": pid (\d+)$", line.rstrip("\n"))
            if match:
                return int(match.group(1))
        return None

    wait_for(lambda: child_pid() is not None, timeout=15, interval=0.02)
    pid = child_pid()
    assert pid is not None
    identity = ProcessIdentity(pid, process_start_time(pid))
    run.plugins[pid] = identity  # killed at teardown should the test fail
    started = time.monotonic()
    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.wait() == 0, run.output()
    assert time.monotonic() - started < 20
    wait_for(lambda: not identity.alive(), timeout=5)
    assert os.listdir(plugin_dir) == []
