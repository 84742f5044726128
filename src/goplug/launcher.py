"""Supervision of launched plugins: the launcher thread, the restart policy and its backoff.

The registry launches a plugin through :class:`Launcher`, which owns one long-lived thread: every
plugin process is started on it (on Linux a child dies with the thread that started it, see
:mod:`goplug.process`), and it waits on every child's exit (a pidfd each, no polling). What
happens then (lose the handle, restart, give up) is the registry's business, told through the
``on_exit`` callback; :meth:`PluginProcess.next_restart` holds the policy.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import os
import secrets
import select
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal

from goplug.errors import RegistryClosed
from goplug.process import Child, is_descendant

__all__ = ["LaunchSettings", "Launcher", "PluginProcess", "RestartPolicy", "describe_exit"]

log = logging.getLogger("goplug.launcher")

RestartPolicy = Literal["never", "on-failure", "always"]
RESTART_POLICIES: frozenset[str] = frozenset({"never", "on-failure", "always"})

ProcessState = Literal["starting", "running", "restarting", "stopping", "stopped", "failed"]


@dataclass(frozen=True)
class LaunchSettings:
    """How a registry supervises the plugins it launches (defaults in docs/RELIABILITY.md)."""

    stop_grace: float = 3.0
    """Seconds between SIGTERM and SIGKILL when a launched plugin is stopped."""
    backoff_initial: float = 0.1
    """Delay before the first restart (seconds); it doubles with each restart in the window."""
    backoff_max: float = 10.0
    """Longest delay between restarts (seconds)."""
    restart_window: float = 60.0
    """``max_restarts`` counts the restarts within this many seconds."""
    ping_interval: float | None = 5.0
    """How often a loaded launched plugin is pinged (seconds; None: never)."""
    ping_failures: int = 3
    """Pings failed in a row after which a launched plugin is killed and restarted."""


def describe_exit(code: int | None) -> str:
    """``exit status 3``, ``killed by SIGKILL`` or ``still running``."""
    if code is None:
        return "still running"
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class PluginProcess:
    """A plugin the registry launched and keeps alive: what ``handle.process`` shows.

    It stays the same object across restarts; :attr:`pid` is the current process.
    """

    def __init__(
        self,
        command: Sequence[str],
        env: dict[str, str],
        cwd: str | None,
        name: str | None,
        namespace: str,
        restart: RestartPolicy,
        max_restarts: int,
        start_timeout: float,
    ) -> None:
        self.command = list(command)
        """The command line it runs."""
        self.name = name
        """The plugin name asked for (None until announced, when launched without one)."""
        self.namespace = namespace
        """The namespace asked for."""
        self.restart_policy: RestartPolicy = restart
        """``never``, ``on-failure`` or ``always``."""
        self.max_restarts = max_restarts
        """Most restarts within the settings' restart window before it is given up."""
        self.start_timeout = start_timeout
        """Seconds a start may take, from exec to loaded."""
        self.restarts = 0
        """How many times it was restarted."""
        self.state: ProcessState = "starting"
        """``starting``, ``running``, ``restarting``, ``stopping``, ``stopped`` or ``failed``."""
        self.reason = ""
        """Why it last left ``running`` (an exit, failed pings, a refusal)."""
        self.env = env
        self.cwd = cwd
        self.cond = threading.Condition()
        self.child: Child | None = None
        self.token = ""
        self.loaded_child: Child | None = None
        self.refusal = ""
        self.spawning = False
        self._restart_times: collections.deque[float] = collections.deque()

    # -- what applications read ----------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The current (or last) process id; None before the first start."""
        child = self.child
        return child.pid if child is not None and child.pid else None

    @property
    def exit_code(self) -> int | None:
        """The last process's exit status once it ended (negative: killed by that signal)."""
        child = self.child
        return child.exit_code if child is not None else None

    @property
    def alive(self) -> bool:
        """True while the current process runs."""
        child = self.child
        return child is not None and child.exit_code is None and child.identity.alive()

    @property
    def started(self) -> float:
        """When the current process started (seconds since the epoch; 0 before)."""
        child = self.child
        return child.started if child is not None else 0.0

    @property
    def uptime(self) -> float:
        """Seconds the current process has been running (0 when it is not)."""
        return max(0.0, time.time() - self.started) if self.alive else 0.0

    @property
    def label(self) -> str:
        """``name@namespace`` as asked, or the command when no name was given."""
        if self.name is None:
            if self.command[1:4] == ["-m", "goplug", "serve"] and len(self.command) > 4:
                return os.path.basename(self.command[4])  # what goplug serve runs
            return os.path.basename(self.command[0])
        return f"{self.name}@{self.namespace}" if self.namespace else self.name

    @property
    def failed(self) -> bool:
        """True once the registry gave up restarting it."""
        return self.state == "failed"

    def __repr__(self) -> str:
        return f"<PluginProcess {self.label} pid={self.pid} {self.state} restarts={self.restarts}>"

    # -- supervision ---------------------------------------------------------------------------

    def owns(self, pid: int | None) -> bool:
        """True if ``pid`` is the current process or one of its descendants."""
        with self.cond:
            self.cond.wait_for(lambda: not self.spawning, self.start_timeout)
            child = self.child
        return pid is not None and child is not None and is_descendant(pid, child.identity)

    def next_restart(self, code: int, settings: LaunchSettings) -> float | None:
        """Return the delay before restarting after exit ``code``, or None to give up.

        Sets :attr:`state` to ``restarting``, ``stopped`` (the policy says no) or ``failed``
        (too many restarts in the window).
        """
        if self.restart_policy == "never" or (self.restart_policy == "on-failure" and code == 0):
            self.state = "stopped"
            return None
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > settings.restart_window:
            self._restart_times.popleft()
        if len(self._restart_times) >= self.max_restarts:
            self.state = "failed"
            return None
        delay = min(
            settings.backoff_max,
            settings.backoff_initial * 2.0 ** len(self._restart_times),
        )
        self._restart_times.append(now + delay)
        self.state = "restarting"
        return delay

    def new_token(self) -> str:
        """A fresh launch token for the next process."""
        return secrets.token_urlsafe(18)


class Launcher:
    """The thread that starts launched plugins and hears when they end."""

    def __init__(self, on_exit: Callable[[PluginProcess, Child], None]) -> None:
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._jobs: collections.deque[tuple[Callable[[], object], Future[object]]] = (
            collections.deque()
        )
        self._timers: list[tuple[float, int, Callable[[], object]]] = []
        self._order = itertools.count()
        self._watched: dict[Child, PluginProcess] = {}
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="goplug-launcher", daemon=True)
        self._thread.start()

    def spawn(self, proc: PluginProcess, env: dict[str, str], token: str) -> Child:
        """Start a new process for ``proc`` on the launcher thread and watch it."""
        if threading.current_thread() is self._thread:
            return self._spawn(proc, env, token)
        future: Future[object] = Future()
        self._submit(lambda: self._spawn(proc, env, token), future)
        child = future.result()
        assert isinstance(child, Child)
        return child

    def later(self, delay: float, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the launcher thread in ``delay`` seconds."""
        with self._lock:
            if self._closed:
                return
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._order), fn))
        self._wake()

    def close(self) -> None:
        """End the thread (call once every child has been stopped)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(5.0)

    # -- the thread ----------------------------------------------------------------------------

    def _spawn(self, proc: PluginProcess, env: dict[str, str], token: str) -> Child:
        logger = logging.getLogger("goplug.plugin." + _logger_suffix(proc))
        child = Child(proc.command, env, proc.cwd, logger)
        # The process may announce itself before spawn() returns: its token is known first,
        # and checks that need the process itself wait while `spawning` is set.
        with proc.cond:
            proc.token = token
            proc.spawning = True
        try:
            child.spawn()
        finally:
            with proc.cond:
                if child.pid:
                    proc.child = child
                proc.spawning = False
                proc.cond.notify_all()
        self._watched[child] = proc
        log.info("started %s: pid %d: %s", proc.label, child.pid, " ".join(proc.command))
        return child

    def _submit(self, fn: Callable[[], object], future: Future[object]) -> None:
        with self._lock:
            if self._closed:
                future.set_exception(RegistryClosed("the registry is closed"))
                return
            self._jobs.append((fn, future))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return
                    jobs = list(self._jobs)
                    self._jobs.clear()
                    now = time.monotonic()
                    while self._timers and self._timers[0][0] <= now:
                        _, _, fn = heapq.heappop(self._timers)
                        jobs.append((_logged(fn), Future()))  # nobody waits on a timer
                    timeout = self._timers[0][0] - now if self._timers else None
                for fn, future in jobs:
                    try:
                        future.set_result(fn())
                    except Exception as exc:
                        future.set_exception(exc)
                # This thread must outlive every child (PR_SET_PDEATHSIG): an error in one
                # pass is logged, never the end of it.
                try:
                    self._check_exits()
                    self._wait(timeout)
                except Exception:
                    log.exception("launcher: watching the plugin processes failed")
                    time.sleep(0.05)
        finally:
            with self._lock:
                left, self._jobs = list(self._jobs), collections.deque()
            for _, future in left:  # a spawn asked for as the registry closed: refused
                future.set_exception(RegistryClosed("the registry is closed"))
            for child in self._watched:
                child.close_pidfd()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _wait(self, timeout: float | None) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        polled = False
        for child in self._watched:
            pidfd = child.pidfd
            if pidfd >= 0:
                poller.register(pidfd, select.POLLIN)
            else:
                polled = True  # no pidfd here: look again soon
        if polled:
            timeout = 0.05 if timeout is None else min(timeout, 0.05)
        ms = -1 if timeout is None else max(0, int(timeout * 1000) + 1)
        for fd, _ in poller.poll(ms):
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)

    def _check_exits(self) -> None:
        for child in [c for c in self._watched if c.has_exited()]:
            proc = self._watched.pop(child)
            child.close_pidfd()  # this thread polls it: only this thread closes it
            # The registry's reaction may block (it stops connections, calls listeners):
            # never on this thread, which must stay free to start and watch the others.
            threading.Thread(
                target=self._on_exit, args=(proc, child), name="goplug-exit", daemon=True
            ).start()


def _logger_suffix(proc: PluginProcess) -> str:
    if proc.name is None:  # until the plugin announces its name
        return "launched." + proc.label.replace(".", "_")
    return f"{proc.namespace}.{proc.name}" if proc.namespace else proc.name


def _logged(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        try:
            return fn()
        except Exception:
            log.exception("launcher job failed")
            return None

    return run
