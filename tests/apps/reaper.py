"""Run ``launching_app.py MODE DIR`` as a child subreaper and report what became of its plugin.

``reaper.py MODE DIR`` (Linux only) makes itself a child subreaper, so the plugin the app
launched is reparented to it (not to PID 1, which may not reap) once the app is gone. It starts
the app, reads the ``plugin <pid>`` line the app prints once ``launch()`` returned, sends SIGTERM
or SIGKILL to the app for MODE term/kill, waits for the app, then waits until the plugin has
exited and been reaped (by the reaper, as its new parent, or by the app itself), and finally
reaps everything left until it has no child at all.

Every line it prints on stdout is one JSON object: ``{"event": "app", ...}`` and
``{"event": "plugin", ...}`` as soon as those processes are known (pid, start time), so a
caller can clean up even if the reaper itself never finishes, then ``{"event": "result", ...}``:

``app_exit``
    the app's exit status (negative: the signal that killed it), None if it did not end;
``plugin_pid``, ``plugin_start``
    the plugin's pid and start time (clock ticks since boot);
``plugin_end``
    ``reaped-by-reaper`` (it was orphaned and reaped here; ``plugin_exit`` is its status),
    ``gone`` (it was no child of the reaper any more and no longer exists: the app reaped it),
    ``still-running`` (it outlived the deadline: the reaper killed it), or ``unknown``;
``plugin_exit_seen_by_app``
    the exit status the app's registry recorded (the ``plugin-exit`` line), if it printed one;
``plugin_seconds``
    seconds from the trigger (signal sent, or ``plugin`` line read for exit/raise) until the
    plugin was seen gone;
``leftovers``
    any other child reaped or still alive at the end (must be empty);
``errors``
    what went wrong (deadlines missed, unexpected lines).

SIGTERM makes the reaper kill (SIGKILL) and reap whatever it started, then report and exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

APP = Path(__file__).resolve().parent / "launching_app.py"
PR_SET_CHILD_SUBREAPER = 36

READ_PLUGIN_LINE = 40.0
"""Seconds the app may take to print its plugin's pid (start-up plus ``launch()``)."""
APP_EXIT = 20.0
"""Seconds the app may take to end once triggered (its atexit close included)."""
PLUGIN_EXIT = 15.0
"""Seconds the plugin may take to be gone once the app was reaped."""
LEFTOVERS = 5.0
"""Seconds allowed for any other child to end and be reaped."""


class Terminated(Exception):
    """The reaper received SIGTERM."""


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` (clock ticks since boot), None if it does not exist."""
    state = proc_state(pid)
    return state[1] if state is not None else None


def proc_state(pid: int) -> tuple[str, int, int] | None:
    """(state letter, start time, parent pid) of ``pid``, None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19]), int(fields[1])


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (a scan of /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            state = proc_state(int(entry))
            if state is not None and state[2] == pid:
                found.append(int(entry))
    return found


def status_code(status: int) -> int:
    """A wait status as a returncode: the exit status, or minus the signal that killed it."""
    return os.waitstatus_to_exitcode(status)


class LineReader:
    """Lines from a pipe, read with a deadline."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.eof = False

    def readline(self, deadline: float) -> str | None:
        """The next line (without its newline); None at EOF or when the deadline passed."""
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if self.eof or remaining <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                data = os.read(self.fd, 65536)
                if not data:
                    self.eof = True
                    if self.buffer:  # a last line without newline
                        line, self.buffer = self.buffer, b""
                        return line.decode(errors="replace")
                self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode(errors="replace")


def wait_app(app: subprocess.Popen[bytes], deadline: float) -> int | None:
    try:
        return app.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None


def wait_plugin(pid: int, start: int | None, deadline: float) -> tuple[str, int | None]:
    """Wait until ``pid`` is gone: (how it ended, its exit status if reaped here)."""
    while True:
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            # Not (or no longer) our child: once the app is reaped that means someone reaped it.
            state = proc_state(pid)
            if state is None or state[1] != start:
                return "gone", None
        else:
            if reaped == pid:
                return "reaped-by-reaper", status_code(status)
        if time.monotonic() > deadline:
            return "still-running", None
        time.sleep(0.005)


def reap_all(deadline: float, known: set[int]) -> list[dict[str, Any]]:
    """Reap every child until there is none; kill those alive at the deadline."""
    leftovers: list[dict[str, Any]] = []
    me = os.getpid()
    killed = False
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return leftovers  # no child at all
        if pid:
            if pid not in known:
                leftovers.append({"pid": pid, "exit": status_code(status)})
            continue
        if time.monotonic() > deadline and not killed:
            for child in children_of(me):
                leftovers.append({"pid": child, "alive": True, "cmd": cmdline(child)})
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)  # our unreaped child: the pid is still its
            killed = True
            deadline = time.monotonic() + 5.0
        elif killed and time.monotonic() > deadline:
            leftovers.append({"error": "children left after SIGKILL", "pids": children_of(me)})
            return leftovers
        time.sleep(0.005)


def run(mode: str, location: str) -> dict[str, Any]:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    result: dict[str, Any] = {
        "mode": mode,
        "reaper": os.getpid(),
        "app_pid": None,
        "app_exit": None,
        "plugin_pid": None,
        "plugin_start": None,
        "plugin_end": "unknown",
        "plugin_exit": None,
        "plugin_exit_seen_by_app": None,
        "plugin_seconds": None,
        "app_lines": [],
        "leftovers": [],
        "errors": [],
    }
    errors: list[str] = result["errors"]
    known: set[int] = set()
    app = subprocess.Popen(
        [sys.executable, str(APP), mode, location], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    known.add(app.pid)
    result["app_pid"] = app.pid
    emit("app", pid=app.pid, start=start_time(app.pid))
    assert app.stdout is not None
    reader = LineReader(app.stdout.fileno())
    plugin: int | None = None
    try:
        deadline = time.monotonic() + READ_PLUGIN_LINE
        while plugin is None:
            line = reader.readline(deadline)
            if line is None:
                errors.append("the app printed no plugin pid")
                break
            if line.startswith("plugin "):
                plugin = int(line.split()[1])
                start = start_time(plugin)
                known.add(plugin)
                result["plugin_pid"], result["plugin_start"] = plugin, start
                emit("plugin", pid=plugin, start=start)
            else:
                result["app_lines"].append(line)
        triggered = time.monotonic()
        if plugin is not None and mode in ("term", "kill"):
            app.send_signal(signal.SIGTERM if mode == "term" else signal.SIGKILL)
            triggered = time.monotonic()
        # What the app still says (its atexit report) until it closes stdout.
        deadline = triggered + APP_EXIT
        while (line := reader.readline(deadline)) is not None:
            if line.startswith("plugin-exit "):
                value = line.split()[1]
                result["plugin_exit_seen_by_app"] = None if value == "None" else int(value)
            else:
                result["app_lines"].append(line)
        result["app_exit"] = wait_app(app, deadline)
        if result["app_exit"] is None:
            errors.append(f"the app did not end within {APP_EXIT:g} s")
        elif plugin is not None:
            end, code = wait_plugin(plugin, result["plugin_start"], time.monotonic() + PLUGIN_EXIT)
            result["plugin_end"], result["plugin_exit"] = end, code
            result["plugin_seconds"] = round(time.monotonic() - triggered, 3)
            if end == "still-running":
                errors.append(f"the plugin outlived the app by {PLUGIN_EXIT:g} s")
    except Terminated:
        errors.append("the reaper was terminated")
    finally:
        # Whatever is still running here was started by us: the plugin (checked by start time:
        # it may be the app's child, not ours) first, then the app (our unreaped child).
        if plugin is not None and start_time(plugin) == result["plugin_start"]:
            state = proc_state(plugin)
            if state is not None and state[0] not in "ZX":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(plugin, signal.SIGKILL)
        if app.poll() is None:
            app.kill()
            result["app_exit"] = app.wait()
        app.stdout.close()
        result["leftovers"] = reap_all(time.monotonic() + LEFTOVERS, known)
    return result


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: reaper.py {exit,raise,term,kill} DIR", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the cleanup must not be cut short
        raise Terminated

    signal.signal(signal.SIGTERM, on_term)
    emit("result", **run(sys.argv[1], sys.argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
