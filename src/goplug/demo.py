"""``goplug demo``: a guided tour with real plugin processes.

The application creates a registry on a temporary directory and launches the example plugins
of a source checkout with :meth:`PluginRegistry.launch`: ``examples/python/do_plugin.py``
(Do@Test) and, when ``node`` is installed, ``examples/node/plugin.js`` (Echo@Node). The
registry starts each process, waits until it has announced itself and is loaded, and keeps it
alive. For each plugin the tour lists its methods, executes them, pings, shows a typed error,
subscribes to a callback and receives notifications. Then it kills Do@Test with SIGKILL: the
registry reports it lost, restarts it, and the same handle works again. Closing the registry
stops both processes; the tour shows how each ended and removes the directory, which must be
empty. Every step is printed with the time since the start; what the plugin processes write
is printed as it arrives, marked with the plugin's name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import goplug
from goplug.errors import GoPlugError, MethodNotFound, RemoteError
from goplug.launcher import PluginProcess, describe_exit
from goplug.registry import PluginEvent, PluginHandle, PluginRegistry

__all__ = ["DemoFailed", "main"]

START_TIMEOUT = 15.0
"""Seconds a plugin process has to announce itself and be loaded (also after a restart)."""
STEP_TIMEOUT = 5.0
"""Seconds to wait for a call, a notification or an event."""


class DemoFailed(Exception):
    """A step of the tour did not happen as it should."""


@dataclass
class _Tour:
    """Shared state: the clock, the printer, and what the registry reported."""

    started: float = field(default_factory=time.perf_counter)
    cond: threading.Condition = field(default_factory=threading.Condition)
    events: list[tuple[str, str]] = field(default_factory=list)  # (kind, label)
    print_lock: threading.Lock = field(default_factory=threading.Lock)

    def say(self, text: str) -> None:
        elapsed = (time.perf_counter() - self.started) * 1000
        with self.print_lock:
            print(f"[{elapsed:8.1f} ms] {text}", flush=True)

    def note(self, text: str) -> None:
        with self.print_lock:
            print(f"{'':13} {text}", flush=True)

    def on_event(self, event: PluginEvent) -> None:
        """The registry listener: print the event and remember it."""
        handle = event.handle
        detail = f" ({event.reason})" if event.reason else ""
        if event.kind == "loaded":
            count = len(handle.methods)
            detail = f"{count} method{'' if count == 1 else 's'}"
            if handle.process is not None:
                detail += f"; pid {handle.process.pid}, restarts={handle.process.restarts}"
            detail = f" ({detail})"
        self.say(f"{event.kind} {handle.label}{detail}")
        with self.cond:
            self.events.append((event.kind, handle.label))
            self.cond.notify_all()

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until ``predicate()`` holds (checked whenever something is reported)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DemoFailed(f"timed out after {timeout:g} s waiting for {what}")
                self.cond.wait(remaining)

    def seen(self, kind: str, label: str, since: int = 0) -> bool:
        """Tell whether the registry reported ``kind`` for ``label`` (after event ``since``)."""
        return (kind, label) in self.events[since:]


class _PluginOutput(logging.Handler):
    """Prints the lines the launched plugins write.

    The registry reads a launched plugin's stdout and stderr line by line and logs each line
    under ``goplug.plugin.<namespace>.<name>``: an application shows them like any log record.
    """

    def __init__(self, tour: _Tour) -> None:
        super().__init__(logging.DEBUG)
        self.tour = tour

    def emit(self, record: logging.LogRecord) -> None:
        try:
            namespace, _, name = record.name.removeprefix("goplug.plugin.").rpartition(".")
            label = f"{name}@{namespace}" if namespace else name
            self.tour.say(f"  {label} | {record.getMessage()}")
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _showing_plugin_output(tour: _Tour) -> Iterator[None]:
    logger = logging.getLogger("goplug.plugin")
    saved = (logger.level, logger.propagate)
    handler = _PluginOutput(tour)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # stdout lines are INFO records, stderr lines WARNING
    logger.propagate = False  # shown here only, not also by the root logger's handler
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


class _Inbox:
    """The notifications a callback received, for the tour to wait on."""

    def __init__(self, tour: _Tour, label: str, name: str) -> None:
        self.tour = tour
        self.label = label
        self.name = name
        self.got: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        with self.tour.cond:
            self.got.append(data)
            self.tour.cond.notify_all()
        self.tour.say(f"{self.label} notified {self.name!r}: {_show(data)}")

    def wait_for_more(self, than: int, what: str) -> None:
        self.tour.wait_for(what, lambda: len(self.got) > than, STEP_TIMEOUT)


def _examples_dir() -> Path | None:
    root = Path(goplug.__file__).resolve().parents[2]
    examples = root / "examples"
    return examples if (examples / "python" / "do_plugin.py").is_file() else None


def _short_tempdir() -> str:
    # Socket paths must stay short: prefer /tmp over a long $TMPDIR.
    base = "/tmp" if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK) else None
    return tempfile.mkdtemp(prefix="gp", dir=base)


def _short_path(path: Path | str) -> str:
    """``path`` relative to the working directory when it is below it (easier to read)."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _show(data: bytes) -> str:
    return repr(data)[1:] if len(data) <= 60 else repr(data[:57])[1:] + "..."


def _launch(
    tour: _Tour,
    registry: PluginRegistry,
    command: list[str] | str,
    name: str,
    namespace: str,
    launched: list[PluginProcess],
) -> PluginHandle:
    """``registry.launch(command, ...)``, printed as the call it is."""
    label = f"{name}@{namespace}"
    shown = repr(command) if isinstance(command, str) else f"[{', '.join(map(repr, command))}]"
    tour.say(f"registry.launch({shown}, name={name!r}, namespace={namespace!r})")
    started = time.perf_counter()
    handle = registry.launch(command, name=name, namespace=namespace, start_timeout=START_TIMEOUT)
    took = (time.perf_counter() - started) * 1000
    proc = handle.process
    if proc is None:
        raise DemoFailed(f"{label} was launched but its handle has no process")
    launched.append(proc)
    # launch() returns once the plugin is loaded; the listener may print that a moment later.
    tour.wait_for(f"the loaded event of {label}", lambda: tour.seen("loaded", label), STEP_TIMEOUT)
    tour.say(
        f"launched {label} in {took:.1f} ms: plugin process (pid {proc.pid}) is {proc.state}, "
        f"restart policy {proc.restart_policy}"
    )
    return handle


def _call(tour: _Tour, handle: PluginHandle, method: str, data: bytes) -> bytes:
    started = time.perf_counter()
    out = handle.execute(method, data, timeout=STEP_TIMEOUT)
    took = (time.perf_counter() - started) * 1000
    tour.say(f"{handle.label}.{method}({_show(data)}) -> {_show(out)}  [{took:.2f} ms]")
    return out


def _expect_error(tour: _Tour, handle: PluginHandle, method: str, data: bytes) -> None:
    try:
        handle.execute(method, data, timeout=STEP_TIMEOUT)
    except MethodNotFound as exc:
        tour.say(f"{handle.label}.{method}(...) raised MethodNotFound: {exc}")
    except RemoteError as exc:
        tour.say(
            f"{handle.label}.{method}({_show(data)}) raised RemoteError: "
            f"type={exc.remote_type!r} message={exc.remote_message!r}"
        )
        lines = exc.remote_traceback.strip().splitlines()
        if lines:
            # Python puts the innermost frame last, JavaScript first: show that end.
            python = lines[0].startswith("Traceback")
            part = lines[-4:] if python else lines[:4]
            tour.note(f"the plugin's traceback comes with it ({len(lines)} lines); innermost:")
            for line in part:
                tour.note(f"  {line}")
    else:
        raise DemoFailed(f"{handle.label}.{method} did not fail")


def _common_steps(tour: _Tour, handle: PluginHandle) -> None:
    tour.say(f"{handle.label} methods: {', '.join(handle.methods) or '(none)'}")
    rtt = handle.ping(timeout=STEP_TIMEOUT)
    tour.say(f"{handle.label} ping: {rtt * 1000:.3f} ms round trip")
    _expect_error(tour, handle, "NoSuchMethod", b"")


def _tour_do(tour: _Tour, handle: PluginHandle) -> _Inbox:
    _common_steps(tour, handle)
    _call(tour, handle, "Do", b"hello goplug")
    _call(tour, handle, "Do", b"")
    _expect_error(tour, handle, "Do", b"\xff not UTF-8")

    inbox = _Inbox(tour, handle.label, "callBack")
    handle.register_callback(inbox, name="callBack")
    tour.say(f"{handle.label}: registered callback 'callBack' (it notifies once a second)")
    inbox.wait_for_more(0, "a callBack notification from Do@Test")
    tour.say(f"{handle.label}: a call to Do notifies too")
    before = len(inbox.got)
    _call(tour, handle, "Do", b"ping me back")
    inbox.wait_for_more(before, "the notification sent by Do")
    return inbox


def _crash_and_restart(tour: _Tour, registry: PluginRegistry, handle: PluginHandle) -> None:
    """Kill the plugin's process; the registry restarts it and the same handle works again."""
    proc = handle.process
    assert proc is not None
    label = handle.label
    old_pid = proc.pid
    if old_pid is None or not proc.alive:
        raise DemoFailed(f"{label} is not running ({proc.state})")
    tour.say(f"--- {label}: a crash, and the registry restarts it ---")
    mark = len(tour.events)
    tour.say(f"killing it: os.kill(handle.process.pid, SIGKILL), pid {old_pid}")
    os.kill(old_pid, signal.SIGKILL)
    tour.wait_for(
        f"the registry to report {label} lost", lambda: tour.seen("lost", label, mark), STEP_TIMEOUT
    )
    backoff = registry.settings.launch.backoff_initial
    tour.say(f"{label}: the registry restarts it after a backoff of {backoff:g} s")

    def back_or_failed() -> bool:
        return tour.seen("loaded", label, mark) or tour.seen("failed", label, mark)

    tour.wait_for(f"{label} to be restarted and loaded", back_or_failed, START_TIMEOUT)
    if tour.seen("failed", label, mark):
        raise DemoFailed(f"the registry gave up restarting {label}: {proc.reason}")
    if proc.restarts != 1 or proc.pid == old_pid:
        raise DemoFailed(f"{label}: expected a new process, restarts=1; got {proc!r}")
    tour.say(
        f"{label} is back: handle.process has pid {proc.pid} (was {old_pid}), "
        f"restarts={proc.restarts}, state {proc.state}"
    )
    tour.note(f"why it restarted (handle.process.reason): {proc.reason}")


def _after_restart(tour: _Tour, handle: PluginHandle, inbox: _Inbox) -> None:
    tour.say(f"{handle.label}: the same handle, not fetched anew, calls the new process")
    before = len(inbox.got)
    _call(tour, handle, "Do", b"still the same handle")
    inbox.wait_for_more(before, "a callBack notification from the restarted Do@Test")
    tour.say(f"{handle.label}: the 'callBack' subscription carried over to the new process")


def _tour_node(tour: _Tour, handle: PluginHandle) -> None:
    _common_steps(tour, handle)
    for method in ("Echo", "Upper", "Reverse"):
        _call(tour, handle, method, b"hello from Python")
    _expect_error(tour, handle, "Fail", b"")

    inbox = _Inbox(tour, handle.label, "fromNode")
    handle.register_callback(inbox, name="fromNode")
    tour.say(f"{handle.label}: registered callback 'fromNode'; asking Notify to send 3")
    # The subscription reaches the plugin asynchronously: until it has, Notify finds nobody.
    # Retry with a short, growing backoff until the plugin has it, within a deadline.
    deadline = time.monotonic() + STEP_TIMEOUT
    backoff, delay = threading.Event(), 0.005
    while True:
        try:
            handle.execute("Notify", b"fromNode\nnotification 1", timeout=STEP_TIMEOUT)
            break
        except RemoteError:
            if time.monotonic() > deadline:
                raise DemoFailed("the Node.js plugin never saw the subscription") from None
            backoff.wait(delay)
            delay = min(delay * 2, 0.1)
    for n in (2, 3):
        handle.execute("Notify", b"fromNode\nnotification %d" % n, timeout=STEP_TIMEOUT)
    tour.wait_for(
        "3 notifications from the Node.js plugin", lambda: len(inbox.got) >= 3, STEP_TIMEOUT
    )
    if inbox.got[:3] != [b"notification 1", b"notification 2", b"notification 3"]:
        raise DemoFailed(f"notifications out of order: {inbox.got!r}")
    tour.say(f"{handle.label}: all 3 notifications arrived, in order")


def _node_command(examples: Path) -> tuple[list[str] | None, str]:
    """The command that runs the Node.js plugin, or None and why it cannot run here."""
    node = shutil.which("node")
    script = examples / "node" / "plugin.js"
    if node is None:
        return None, "node is not on PATH"
    if not script.is_file():
        return None, f"{script} is missing"
    return ["node", _short_path(script)], ""


def _run(tour: _Tour, plugin_dir: str, examples: Path, launched: list[PluginProcess]) -> str:
    """The tour itself; return why the Node.js part was skipped ('' if it ran)."""
    tour.say(f"plugin directory: {plugin_dir}")
    with PluginRegistry(plugin_dir, auto_discover=True) as registry:
        registry.add_listener(tour.on_event)
        tour.say("application: registry watching the directory (auto discovery on)")
        tour.note("lines marked 'Name@Namespace |' are what a plugin process writes")

        do_script = _short_path(examples / "python" / "do_plugin.py")
        do = _launch(tour, registry, do_script, "Do", "Test", launched)
        node_command, skipped = _node_command(examples)
        node = None
        if node_command is None:
            tour.say(f"skipping the JavaScript plugin: {skipped} (install Node.js to see it)")
        else:
            node = _launch(tour, registry, node_command, "Echo", "Node", launched)

        tour.say(f"--- {do.label} ---")
        inbox = _tour_do(tour, do)
        _crash_and_restart(tour, registry, do)
        _after_restart(tour, do, inbox)

        if node is not None:
            tour.say(f"--- {node.label} ---")
            _tour_node(tour, node)

        tour.say("--- registry.close(): it stops the plugins it launched ---")
        started = time.perf_counter()
    # Leaving the with block closed the registry.
    took = (time.perf_counter() - started) * 1000
    tour.say(f"application: registry closed in {took:.1f} ms")
    return skipped


def _check_ended(tour: _Tour, launched: list[PluginProcess]) -> list[str]:
    """Print how each launched process ended; kill and return any still running."""
    running = []
    for proc in launched:
        pid = proc.pid
        if proc.alive and pid is not None:  # not reaped: its pid is still its own
            running.append(f"{proc.label} (pid {pid})")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # it leads its own process group
            tour.say(f"{proc.label}: pid {pid} was still running: killed it")
        else:
            tour.say(f"{proc.label}: pid {pid} ended: {describe_exit(proc.exit_code)}")
    return running


def main() -> int:
    """Run the tour; return 0 if every step worked, else 1 (after cleaning up)."""
    examples = _examples_dir()
    if examples is None:
        where = Path(goplug.__file__).resolve().parents[2] / "examples"
        print(
            f"goplug demo: the example plugins are not at {where}.\n"
            "The demo runs from a source checkout of goplug (make demo, or goplug demo with\n"
            "goplug installed in editable mode from the checkout).",
            file=sys.stderr,
        )
        return 1
    tour = _Tour()
    launched: list[PluginProcess] = []
    plugin_dir = _short_tempdir()
    failure = skipped = ""
    with _showing_plugin_output(tour):
        try:
            skipped = _run(tour, plugin_dir, examples, launched)  # closes the registry
        except (DemoFailed, GoPlugError, OSError) as exc:
            failure = f"{type(exc).__name__}: {exc}"
        except KeyboardInterrupt:
            failure = "interrupted"
        except Exception:  # a bug in the tour: say where, and clean up all the same
            failure = "unexpected error\n" + traceback.format_exc().rstrip()
        finally:
            running = _check_ended(tour, launched)
    if running:
        failure = failure or f"still running after registry.close(): {', '.join(running)}"
    if failure:
        first, *more = failure.splitlines()
        tour.say(f"FAILED: {first}")
        for line in more:
            tour.note(line)
    leftovers = sorted(os.listdir(plugin_dir)) if os.path.isdir(plugin_dir) else []
    shutil.rmtree(plugin_dir, ignore_errors=True)
    if leftovers:
        tour.say(f"FAILED: files left in {plugin_dir}: {', '.join(leftovers)} (removed)")
        return 1
    tour.say(f"removed {plugin_dir} (it was empty)")
    if failure:
        return 1
    if skipped:
        tour.say(f"demo complete, without the JavaScript plugin ({skipped})")
    else:
        tour.say("demo complete")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
