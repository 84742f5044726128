"""Chaos soak: calls, kills, restarts and cut callback polls, for as long as you like.

    python -m goplug.soak [--seconds N] [--plugins K] [--callers C] [--seed S]

Starts ``K`` plugin processes (this module in plugin mode) and one more that sends
notifications, a registry, ``C`` threads calling the plugins without pause, a thread sending
numbered notifications, and a chaos thread that kills (SIGKILL) and restarts plugins at random
and cuts the registry's callback poll connections. At the end it stops the chaos, checks that
every plugin is back within two seconds and answers every call, that every notification the
plugin accepted was delivered exactly once and in order, and that the registry left no file
descriptor or thread behind. It prints a report and exits with status 1 if any check failed.

The same engine, :class:`ChaosRun`, drives the chaos test in the test suite with plugin
processes started by the tests' own fixtures.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from goplug.errors import GoPlugError
from goplug.plugin import Plugin
from goplug.registry import PluginHandle, PluginRegistry, PluginState, RegistrySettings

__all__ = ["ChaosConfig", "ChaosReport", "ChaosRun", "main", "plugin_main"]

log = logging.getLogger("goplug.soak")

CALLBACK = "chaos"
"""The callback name the notifier plugin sends on."""

Launcher = Callable[[str], "subprocess.Popen[bytes]"]
"""Starts the plugin process of the given name in the run's directory and returns it."""


# -- plugin mode -----------------------------------------------------------------------------------


def plugin_main(location: str, name: str) -> None:
    """Serve a soak plugin: Echo, Notify (name, newline, payload), Callbacks; until SIGTERM."""
    plugin = Plugin(location, name)

    @plugin.method
    def Echo(data: bytes) -> bytes:
        return data

    @plugin.method
    def Notify(data: bytes) -> bytes:
        cb, _, payload = data.partition(b"\n")
        return str(plugin.notify(cb.decode(), payload)).encode()

    @plugin.method
    def Callbacks(data: bytes) -> bytes:
        return ",".join(plugin.callbacks).encode()

    plugin.serve_forever()


# -- the run ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChaosConfig:
    """What a chaos run does and for how long."""

    seconds: float = 60.0
    """How long the chaos lasts."""
    plugins: int = 4
    """Plugins called and killed (the notifier comes on top and is never killed)."""
    callers: int = 8
    """Threads calling the plugins."""
    chaos_interval: tuple[float, float] = (0.15, 0.6)
    """Range of the random pause between two chaos actions (seconds)."""
    cut_ratio: float = 0.3
    """Share of chaos actions that cut a callback poll instead of killing a plugin."""
    call_timeout: float = 2.0
    """Timeout of every call."""
    recovery_deadline: float = 2.0
    """After the chaos stops, every plugin must answer again within this many seconds."""
    max_calls_per_caller: int = 10_000_000
    """A bound on each caller's loop besides time."""
    seed: int | None = None
    """Seed of the chaos thread's choices (random if None)."""


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class ChaosReport:
    """What a chaos run observed; :meth:`failures` lists every broken promise."""

    seed: int = 0
    seconds: float = 0.0
    calls: int = 0
    wrong_answers: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    untyped_errors: list[str] = field(default_factory=list)
    kills: int = 0
    cuts: int = 0
    recoveries: list[float] = field(default_factory=list)
    """Seconds from each kill to the restarted plugin answering a call through its old handle."""
    final_recovery: float | None = None
    """Seconds after the chaos stopped until every plugin answered (None: not within deadline)."""
    final_failures: int = 0
    """Calls that failed once every plugin was back."""
    notifications_accepted: int = 0
    notifications_delivered: int = 0
    notifications_lost: int = 0
    notifications_duplicated: int = 0
    notifications_out_of_order: int = 0
    fds_before: int = 0
    fds_after: int = 0
    threads_before: int = 0
    threads_after: int = 0
    close_seconds: float = 0.0

    def failures(self) -> list[str]:
        """Human-readable reasons the run failed (empty when it passed)."""
        out: list[str] = []
        if self.wrong_answers:
            out.append(f"{self.wrong_answers} calls returned wrong bytes")
        if self.untyped_errors:
            out.append(f"{len(self.untyped_errors)} calls raised non-goplug errors")
        if self.final_recovery is None:
            out.append("plugins were not all back within the recovery deadline")
        if self.final_failures:
            out.append(f"{self.final_failures} calls failed after recovery")
        if self.notifications_lost:
            out.append(f"{self.notifications_lost} accepted notifications were lost")
        if self.notifications_duplicated:
            out.append(f"{self.notifications_duplicated} notifications were delivered twice")
        if self.notifications_out_of_order:
            out.append(f"{self.notifications_out_of_order} notifications arrived out of order")
        if self.fds_after > self.fds_before:
            out.append(f"file descriptors grew from {self.fds_before} to {self.fds_after}")
        if self.threads_after > self.threads_before:
            out.append(f"threads grew from {self.threads_before} to {self.threads_after}")
        return out

    def render(self) -> str:
        """The report as text."""
        errors = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items())) or "none"
        final = (
            "not within deadline" if self.final_recovery is None else f"{self.final_recovery:.3f} s"
        )
        lines = [
            f"goplug soak: {self.seconds:.0f} s of chaos (seed {self.seed})",
            f"calls done:          {self.calls}",
            f"wrong answers:       {self.wrong_answers}",
            f"errors by type:      {errors}",
            f"untyped errors:      {len(self.untyped_errors)}",
            f"kills / poll cuts:   {self.kills} / {self.cuts}",
            f"recovery p50 / p99:  {_percentile(self.recoveries, 0.5):.3f} s / "
            f"{_percentile(self.recoveries, 0.99):.3f} s ({len(self.recoveries)} measured)",
            f"final recovery:      {final}, {self.final_failures} failed calls after it",
            f"notifications:       {self.notifications_accepted} accepted, "
            f"{self.notifications_delivered} delivered, {self.notifications_lost} lost, "
            f"{self.notifications_duplicated} duplicated, "
            f"{self.notifications_out_of_order} out of order",
            f"fds before / after:  {self.fds_before} / {self.fds_after}",
            f"threads before/after: {self.threads_before} / {self.threads_after}",
            f"registry close:      {self.close_seconds:.3f} s",
        ]
        failures = self.failures()
        lines.append(
            "result:              " + ("FAILED: " + "; ".join(failures) if failures else "ok")
        )
        return "\n".join(lines) + "\n"


def _fd_count() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: count what can be fstat'ed
        count = 0
        for fd in range(4096):
            with contextlib.suppress(OSError):
                os.fstat(fd)
                count += 1
        return count


def _wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def _announced_pid(pconf: str) -> int | None:
    try:
        with open(pconf, "rb") as f:
            value = json.loads(f.read()).get("Pid")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


class ChaosRun:
    """One chaos run over plugin processes that ``launch`` starts in ``location``."""

    def __init__(self, location: str, launch: Launcher, config: ChaosConfig | None = None) -> None:
        self.location = os.path.abspath(location)
        self.launch = launch
        self.config = config or ChaosConfig()
        seed = self.config.seed if self.config.seed is not None else random.randrange(1 << 30)
        self.report = ChaosReport(seed=seed, seconds=self.config.seconds)
        self._rng = random.Random(seed)
        self.names = [f"Chaos{i}" for i in range(self.config.plugins)]
        self.notifier = "Herald"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._accepted: list[int] = []
        self._delivered: list[int] = []
        self._pending_recovery: dict[str, float] = {}
        self.registry: PluginRegistry | None = None

    # -- processes -------------------------------------------------------------------------------

    def _start(self, name: str) -> None:
        proc = self.launch(name)
        self.procs[name] = proc
        pconf = os.path.join(self.location, name + ".pconf")
        if (
            not _wait_until(
                lambda: _announced_pid(pconf) == proc.pid or proc.poll() is not None, 20
            )
            or proc.poll() is not None
        ):
            raise RuntimeError(f"plugin {name} did not start (exit status {proc.poll()})")

    def _kill(self, name: str) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_plugins(self) -> None:
        """End every plugin process this run started (SIGTERM, then SIGKILL)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    # -- the threads -----------------------------------------------------------------------------

    def _caller(self, index: int, handles: list[PluginHandle]) -> None:
        rng = random.Random(index)
        calls = wrong = 0
        errors: Counter[str] = Counter()
        untyped: list[str] = []
        stop = self._stop
        for i in range(self.config.max_calls_per_caller):
            if stop.is_set():
                break
            handle = handles[(index + i) % len(handles)]
            payload = b"%d:%d:%d" % (index, i, rng.randrange(1 << 30))
            calls += 1
            try:
                answer = handle.execute("Echo", payload, timeout=self.config.call_timeout)
            except GoPlugError as exc:
                errors[type(exc).__name__] += 1
                stop.wait(0.005)  # the plugin is down: do not spin
                continue
            except Exception as exc:
                untyped.append(f"{type(exc).__name__}: {exc}")
                stop.wait(0.005)
                continue
            if answer != payload:
                wrong += 1
        with self._lock:
            self.report.calls += calls
            self.report.wrong_answers += wrong
            self.report.errors.update(errors)
            self.report.untyped_errors.extend(untyped)

    def _notifier(self, handle: PluginHandle) -> None:
        stop = self._stop
        number = 0
        while not stop.is_set():
            number += 1
            try:
                answer = handle.execute(
                    "Notify",
                    b"%s\n%d" % (CALLBACK.encode(), number),
                    timeout=self.config.call_timeout,
                )
            except GoPlugError as exc:
                with self._lock:
                    self.report.errors["notify:" + type(exc).__name__] += 1
                stop.wait(0.01)
                continue
            if answer == b"1":
                with self._lock:
                    self._accepted.append(number)
            stop.wait(0.001)

    def _deliver(self, data: bytes) -> None:
        with self._lock:
            self._delivered.append(int(data))

    def _chaos(self, handles: dict[str, PluginHandle], notifier: PluginHandle) -> None:
        rng = self._rng
        low, high = self.config.chaos_interval
        while not self._stop.wait(rng.uniform(low, high)):
            if rng.random() < self.config.cut_ratio:
                subs = list(notifier._subscriptions)
                conn = subs[0]._conn if subs else None
                if conn is not None:
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    self.report.cuts += 1
                continue
            name = rng.choice(self.names)
            killed_at = time.monotonic()
            self._kill(name)
            self.report.kills += 1
            with self._lock:
                self._pending_recovery.setdefault(name, killed_at)
            try:
                self._start(name)
            except RuntimeError as exc:
                log.error("chaos could not restart %s: %s", name, exc)

    def _watch_recovery(self, handles: dict[str, PluginHandle]) -> None:
        while not self._stop.wait(0.01):
            with self._lock:
                pending = dict(self._pending_recovery)
            for name, killed_at in pending.items():
                handle = handles[name]
                if handle.state is not PluginState.LOADED:
                    continue
                try:
                    handle.execute("Echo", b"recovered?", timeout=0.5)
                except GoPlugError:
                    continue
                with self._lock:
                    if self._pending_recovery.get(name) == killed_at:
                        del self._pending_recovery[name]
                        self.report.recoveries.append(time.monotonic() - killed_at)

    # -- the whole run ---------------------------------------------------------------------------

    def run(self) -> ChaosReport:
        """Run the chaos and every check; return the report (see :meth:`ChaosReport.failures`)."""
        report = self.report
        for name in [*self.names, self.notifier]:
            self._start(name)
        report.fds_before = _fd_count()
        report.threads_before = threading.active_count()
        settings = RegistrySettings()
        registry = self.registry = PluginRegistry(self.location, settings=settings)
        try:
            self._run_with(registry)
        finally:
            started = time.monotonic()
            registry.close()
            report.close_seconds = time.monotonic() - started
        _wait_until(lambda: _fd_count() <= report.fds_before, 5, 0.01)
        _wait_until(lambda: threading.active_count() <= report.threads_before, 5, 0.01)
        report.fds_after = _fd_count()
        report.threads_after = threading.active_count()
        return report

    def _run_with(self, registry: PluginRegistry) -> None:
        report = self.report
        config = self.config
        all_names = [*self.names, self.notifier]
        if not _wait_until(lambda: all(registry.is_loaded(n) for n in all_names), 10):
            raise RuntimeError("the plugins were not all loaded within 10 s")
        handles = {name: registry.get_plugin(name) for name in self.names}
        handle_list = [h for h in handles.values() if h is not None]
        notifier = registry.get_plugin(self.notifier)
        assert notifier is not None and len(handle_list) == len(self.names)
        notifier.register_callback(self._deliver, CALLBACK)
        if not _wait_until(lambda: _subscribed(notifier), 5):
            raise RuntimeError("the callback subscription did not reach the notifier")

        threads = [
            threading.Thread(target=self._caller, args=(i, handle_list), name=f"soak-caller-{i}")
            for i in range(config.callers)
        ]
        threads.append(
            threading.Thread(target=self._notifier, args=(notifier,), name="soak-notify")
        )
        loaded = {name: h for name, h in handles.items() if h is not None}
        threads.append(
            threading.Thread(target=self._watch_recovery, args=(loaded,), name="soak-watch")
        )
        chaos = threading.Thread(target=self._chaos, args=(loaded, notifier), name="soak-chaos")
        threads.append(chaos)
        for thread in threads:
            thread.start()
        self._stop.wait(config.seconds)
        self._stop.set()
        for thread in threads:
            thread.join(config.call_timeout + 15)
            if thread.is_alive():
                report.untyped_errors.append(f"thread {thread.name} did not end")

        # Every plugin back within the deadline, then every call succeeds.
        stopped = time.monotonic()
        if _wait_until(
            lambda: all(_answers(h) for h in handle_list), config.recovery_deadline, 0.01
        ):
            report.final_recovery = time.monotonic() - stopped
        for handle in handle_list:
            for i in range(20):
                payload = b"final %d" % i
                try:
                    if handle.execute("Echo", payload, timeout=config.call_timeout) != payload:
                        report.wrong_answers += 1
                except GoPlugError:
                    report.final_failures += 1

        # Every accepted notification delivered once, in order.
        accepted = set(self._accepted)
        _wait_until(lambda: accepted <= set(self._snapshot_delivered()), 10, 0.01)
        delivered = self._snapshot_delivered()
        report.notifications_accepted = len(accepted)
        report.notifications_delivered = len(delivered)
        report.notifications_lost = len(accepted - set(delivered))
        report.notifications_duplicated = len(delivered) - len(set(delivered))
        report.notifications_out_of_order = sum(
            1 for a, b in itertools.pairwise(delivered) if b <= a
        )

    def _snapshot_delivered(self) -> list[int]:
        with self._lock:
            return list(self._delivered)


def _subscribed(handle: PluginHandle) -> bool:
    try:
        return CALLBACK in handle.execute("Callbacks", timeout=1).decode().split(",")
    except GoPlugError:
        return False


def _answers(handle: PluginHandle) -> bool:
    try:
        return handle.execute("Echo", b"back?", timeout=0.5) == b"back?"
    except GoPlugError:
        return False


# -- command line ----------------------------------------------------------------------------------


def _module_launcher(location: str) -> Launcher:
    def launch(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "goplug.soak", "--plugin", location, name],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    return launch


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak from the command line; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m goplug.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="chaos duration (default 60)")
    parser.add_argument("--plugins", type=int, default=4, help="plugins killed at random")
    parser.add_argument("--callers", type=int, default=8, help="calling threads")
    parser.add_argument("--seed", type=int, default=None, help="seed of the chaos")
    parser.add_argument("--plugin", nargs=2, metavar=("DIR", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    args = parser.parse_args(argv)
    if args.plugin:
        plugin_main(args.plugin[0], args.plugin[1])
        return 0
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format="%(asctime)s %(name)s %(message)s",
    )
    import shutil
    import tempfile

    location = tempfile.mkdtemp(prefix="gpsoak")
    config = ChaosConfig(
        seconds=args.seconds, plugins=args.plugins, callers=args.callers, seed=args.seed
    )
    run = ChaosRun(location, _module_launcher(location), config)
    try:
        report = run.run()
    finally:
        run.stop_plugins()
        shutil.rmtree(location, ignore_errors=True)
    sys.stdout.write(report.render())
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
