"""Plugin processes an application launches: starting one, knowing it, its output, stopping it.

A launched plugin runs in a process group of its own, so stopping it also stops whatever it
started, and on Linux with ``PR_SET_PDEATHSIG`` = SIGKILL, so it dies with the thread that
started it even when the application is killed with SIGKILL. Its stdout and stderr are pipes read
line by line into :mod:`logging`. A process is known by its pid *and* its start time, so a pid
the system gave to somebody else is never taken for it, and it is never signalled once reaped.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, NamedTuple

__all__ = [
    "MAX_LOG_LINE",
    "Child",
    "ProcessIdentity",
    "is_descendant",
    "parse_log_line",
    "process_start_time",
]

log = logging.getLogger("goplug.process")

MAX_LOG_LINE = 1024 * 1024
"""Longest log line taken whole; a longer one reaches logging in pieces of this size."""
STDERR_TAIL = 20
"""Lines of a plugin's stderr kept for the error that reports a failed start."""

_PR_SET_PDEATHSIG = 1
_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "notice": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "err": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
}


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields 3 and on of /proc/PID/stat (after the command name, which may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """Return when process ``pid`` started (clock ticks since boot), or None if unknown."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def is_descendant(pid: int, ancestor: ProcessIdentity) -> bool:
    """Tell whether ``pid`` is ``ancestor`` itself or one of its descendants (Linux /proc)."""
    if not ancestor.alive():
        return False
    for _ in range(64):  # deep enough for any real tree; a loop in /proc cannot hold us
        if pid == ancestor.pid:
            return True
        fields = _stat_fields(pid)
        if fields is None or len(fields) < 2:
            return False
        pid = int(fields[1])
        if pid <= 1:
            return False
    return False


class ProcessIdentity(NamedTuple):
    """A process as pid plus start time: a reused pid has another start time."""

    pid: int
    start: int | None

    def alive(self) -> bool:
        """True while this very process exists and has not exited."""
        fields = _stat_fields(self.pid)
        if fields is None or len(fields) <= 19 or fields[0] in (b"Z", b"X"):
            return False
        return self.start is None or int(fields[19]) == self.start


def parse_log_line(text: str, default: int) -> tuple[int, str]:
    """Return (level, message) for one line a plugin wrote.

    A JSON object with ``level`` and ``message`` keeps its level (a name such as ``"warn"`` or a
    :mod:`logging` number) and message; any other line is logged as it is at ``default``.
    """
    if text.startswith("{") and text.endswith("}"):
        try:
            value = json.loads(text)
        except ValueError:
            return default, text
        if isinstance(value, dict) and "level" in value and "message" in value:
            level = value["level"]
            if isinstance(level, str):
                number = _LEVELS.get(level.strip().lower(), default)
            elif isinstance(level, int) and not isinstance(level, bool):
                number = max(logging.DEBUG, min(level, logging.CRITICAL))
            else:
                number = default
            message = value["message"]
            return number, message if isinstance(message, str) else json.dumps(message)
    return default, text


def _prctl() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.prctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


class Child:
    """One run of a launched plugin's command.

    :meth:`spawn` must be called on a thread that lives as long as the child should: on Linux
    the child is killed when that thread ends (``PR_SET_PDEATHSIG`` follows the thread).
    """

    def __init__(
        self,
        command: Sequence[str],
        env: dict[str, str],
        cwd: str | None,
        logger: logging.Logger,
    ) -> None:
        self.command = list(command)
        self.env = env
        self.cwd = cwd
        self.logger = logger
        """Where its output goes; may be replaced once the plugin's name is known."""
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self.popen: subprocess.Popen[bytes] | None = None
        self.identity = ProcessIdentity(0, None)
        self.started = 0.0
        """When it started (seconds since the epoch)."""
        self.exit_code: int | None = None
        """Its exit status once reaped (negative: the signal that killed it)."""
        self._reap_lock = threading.Lock()
        self._pumps: list[threading.Thread] = []
        self.pidfd = -1

    @property
    def pid(self) -> int:
        """Its process id (0 before it started)."""
        return self.identity.pid

    def spawn(self) -> None:
        """Start the command; raise OSError if it cannot be executed."""
        parent = os.getpid()
        prctl = _prctl()

        def setup() -> None:  # runs in the child between fork and exec: keep it tiny
            os.setpgid(0, 0)
            if prctl is not None:
                prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the application died before the line above
                os._exit(1)

        popen = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            close_fds=True,
            preexec_fn=setup,  # small and free of locks: safe although threads run
        )
        self.popen = popen
        self.identity = ProcessIdentity(popen.pid, process_start_time(popen.pid))
        self.started = time.time()
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                self.pidfd = os.pidfd_open(popen.pid)
        assert popen.stdout is not None and popen.stderr is not None
        for stream, level, tail in (
            (popen.stdout, logging.INFO, None),
            (popen.stderr, logging.WARNING, self.stderr_tail),
        ):
            thread = threading.Thread(
                target=self._pump,
                args=(stream, level, tail),
                name=f"goplug-output-{popen.pid}",
                daemon=True,
            )
            thread.start()
            self._pumps.append(thread)

    def _pump(self, stream: IO[bytes], level: int, tail: collections.deque[str] | None) -> None:
        try:
            with stream:
                for line in iter(lambda: stream.readline(MAX_LOG_LINE), b""):
                    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
                    number, message = parse_log_line(text, level)
                    if tail is not None:
                        tail.append(message)
                    self.logger.log(number, "%s", message)
        except (OSError, ValueError) as exc:  # the pipe was closed under us
            log.debug("output of pid %d ended: %s", self.pid, exc)

    def has_exited(self) -> bool:
        """True once the process has ended (reaped or not); never reaps it."""
        popen = self.popen
        if popen is None or self.exit_code is not None:
            return True
        try:
            info = os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True  # reaped already
        return info is not None

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to end; True if it has (not reaped)."""
        deadline = time.monotonic() + timeout
        while not self.has_exited():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            pidfd = self.pidfd
            if pidfd >= 0:
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                poller.poll(max(1, int(remaining * 1000)))
            else:
                time.sleep(min(remaining, 0.01))
        return True

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the child's process group, unless the child was already reaped.

        While the group's leader is not reaped its pid (the group's id) cannot be reused, so
        the signal reaches only what this child started.
        """
        with self._reap_lock:
            if self.popen is None or self.exit_code is not None:
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)

    def reap(self) -> int:
        """Kill what is left of the group, collect the exit status, close the pipes' fds."""
        with self._reap_lock:
            if self.exit_code is not None:
                return self.exit_code
            popen = self.popen
            if popen is None:
                return 0
            # The leader has exited (or is about to be killed): anything it left running in
            # its group goes too, before the leader is reaped and its pid can be reused.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)
            code = popen.wait()
            self.exit_code = code
        for thread in self._pumps:
            thread.join(1.0)  # every line written before the end reaches logging first
        return code

    def close_pidfd(self) -> None:
        """Close the pidfd (by the thread that polls it, once it no longer does)."""
        fd, self.pidfd = self.pidfd, -1
        if fd >= 0:
            os.close(fd)

    def stop(self, grace: float) -> int:
        """End the process: SIGTERM to its group, SIGKILL after ``grace`` seconds; reap it."""
        if not self.has_exited():
            self.signal_group(signal.SIGTERM)
            if not self.wait_exit(grace):
                log.info("pid %d ignored SIGTERM for %.1f s: killing it", self.pid, grace)
                self.signal_group(signal.SIGKILL)
                self.wait_exit(5.0)
        return self.reap()
