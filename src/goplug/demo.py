"""``goplug demo``: a guided tour with real plugin processes.

The tour starts the example plugins of a source checkout as separate processes in a temporary
directory: ``examples/python/do_plugin.py`` (Do@Test) and, when ``node`` is installed,
``examples/node/plugin.js`` (Echo@Node). An application registry discovers and loads them, then
for each one lists its methods, executes them, pings, shows a typed error, subscribes to a
callback and receives notifications, and unloads it. Each step is printed with the time since
the start. At the end every process is stopped and the temporary directory, empty, is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import goplug
from goplug.errors import GoPlugError, MethodNotFound, RemoteError
from goplug.registry import PluginEvent, PluginHandle, PluginRegistry

__all__ = ["DemoFailed", "main"]

START_TIMEOUT = 15.0
"""Seconds a plugin process has to announce itself and be loaded."""
STEP_TIMEOUT = 5.0
"""Seconds to wait for a notification, an event or a process to end."""


class DemoFailed(Exception):
    """A step of the tour did not happen as it should."""


@dataclass
class _Child:
    """A plugin process the tour started."""

    label: str
    name: str
    namespace: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes]


@dataclass
class _Tour:
    """Shared state: the clock, the printer, and what the registry reported."""

    started: float = field(default_factory=time.perf_counter)
    cond: threading.Condition = field(default_factory=threading.Condition)
    events: list[tuple[str, str]] = field(default_factory=list)  # (kind, label)
    exited: dict[str, int] = field(default_factory=dict)  # label -> exit status
    print_lock: threading.Lock = field(default_factory=threading.Lock)

    def say(self, text: str) -> None:
        elapsed = (time.perf_counter() - self.started) * 1000
        with self.print_lock:
            print(f"[{elapsed:8.1f} ms] {text}", flush=True)

    def note(self, text: str) -> None:
        with self.print_lock:
            print(f"{'':13} {text}", flush=True)

    def on_event(self, event: PluginEvent) -> None:
        label = event.handle.label
        detail = f" ({event.reason})" if event.reason else ""
        if event.kind == "loaded":
            count = len(event.handle.methods)
            detail = f" ({count} method{'' if count == 1 else 's'})"
        self.say(f"{event.kind} {label}{detail}")
        with self.cond:
            self.events.append((event.kind, label))
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

    def has(self, kind: str, label: str) -> bool:
        return (kind, label) in self.events


def _examples_dir() -> Path | None:
    root = Path(goplug.__file__).resolve().parents[2]
    examples = root / "examples"
    return examples if (examples / "python" / "do_plugin.py").is_file() else None


def _short_tempdir() -> str:
    # Socket paths must stay short: prefer /tmp over a long $TMPDIR.
    base = "/tmp" if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK) else None
    return tempfile.mkdtemp(prefix="gp", dir=base)


def _child_env(plugin_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(goplug.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    env["GOPLUG_DIR"] = plugin_dir
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(tour: _Tour, label: str, argv: list[str], env: dict[str, str]) -> _Child:
    # The plugin's output, shown if something goes wrong; closed by main() at the end.
    log = tempfile.TemporaryFile()  # noqa: SIM115
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    name, _, namespace = label.partition("@")
    child = _Child(label, name, namespace, proc, log)

    def reap() -> None:
        status = proc.wait()
        with tour.cond:
            tour.exited[label] = status
            tour.cond.notify_all()

    threading.Thread(target=reap, name=f"demo-wait-{label}", daemon=True).start()
    tour.say(f"started {label} plugin process (pid {proc.pid}): {' '.join(argv[1:2])}")
    return child


def _show(data: bytes) -> str:
    return repr(data)[1:] if len(data) <= 60 else repr(data[:57])[1:] + "..."


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
        if exc.remote_traceback:
            lines = len(exc.remote_traceback.strip().splitlines())
            tour.note(f"(the plugin's traceback, {lines} lines, comes with it)")
    else:
        raise DemoFailed(f"{handle.label}.{method} did not fail")


def _common_steps(tour: _Tour, handle: PluginHandle) -> None:
    tour.say(f"{handle.label} methods: {', '.join(handle.methods) or '(none)'}")
    rtt = handle.ping()
    tour.say(f"{handle.label} ping: {rtt * 1000:.3f} ms round trip")
    _expect_error(tour, handle, "NoSuchMethod", b"")


def _tour_do(tour: _Tour, handle: PluginHandle) -> None:
    _common_steps(tour, handle)
    _call(tour, handle, "Do", b"hello goplug")
    _call(tour, handle, "Do", b"")
    _expect_error(tour, handle, "Do", b"\xff not UTF-8")

    got: list[bytes] = []

    def callBack(data: bytes) -> None:
        with tour.cond:
            got.append(data)
            tour.cond.notify_all()
        tour.say(f"{handle.label} notified callBack: {_show(data)}")

    handle.register_callback(callBack)
    tour.say(f"{handle.label}: registered callback 'callBack' (it notifies once a second)")
    tour.wait_for("a callBack notification from Do@Test", lambda: len(got) >= 1, STEP_TIMEOUT)
    tour.say(f"{handle.label}: a call to Do notifies too")
    before = len(got)
    _call(tour, handle, "Do", b"ping me back")
    tour.wait_for("the notification sent by Do", lambda: len(got) > before, STEP_TIMEOUT)


def _tour_node(tour: _Tour, handle: PluginHandle) -> None:
    _common_steps(tour, handle)
    for method in ("Echo", "Upper", "Reverse"):
        _call(tour, handle, method, b"hello from Python")
    _expect_error(tour, handle, "Fail", b"")

    got: list[bytes] = []

    def on_node(data: bytes) -> None:
        with tour.cond:
            got.append(data)
            tour.cond.notify_all()
        tour.say(f"{handle.label} notified 'fromNode': {_show(data)}")

    handle.register_callback(on_node, name="fromNode")
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
    tour.wait_for("3 notifications from the Node.js plugin", lambda: len(got) >= 3, STEP_TIMEOUT)
    if got[:3] != [b"notification 1", b"notification 2", b"notification 3"]:
        raise DemoFailed(f"notifications out of order: {got!r}")
    tour.say(f"{handle.label}: all 3 notifications arrived, in order")


def _stop_child(child: _Child, timeout: float = STEP_TIMEOUT) -> int | None:
    """SIGTERM the child by pid, wait, SIGKILL if it does not end; return its exit status."""
    proc = child.proc
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def _tail(child: _Child, lines: int = 8) -> list[str]:
    with contextlib.suppress(OSError, ValueError):
        child.log.seek(0)
        text = child.log.read().decode("utf-8", errors="replace")
        return text.strip().splitlines()[-lines:]
    return []


def _run(tour: _Tour, plugin_dir: str, examples: Path, children: list[_Child]) -> None:
    env = _child_env(plugin_dir)
    tour.say(f"plugin directory: {plugin_dir}")
    registry = PluginRegistry(plugin_dir, auto_discover=True)
    registry.add_listener(tour.on_event)
    try:
        tour.say("application: registry watching the directory (auto discovery on)")

        do_script = examples / "python" / "do_plugin.py"
        children.append(_start(tour, "Do@Test", [sys.executable, str(do_script), plugin_dir], env))

        node = shutil.which("node")
        node_script = examples / "node" / "plugin.js"
        if node is None:
            tour.say("skipping the JavaScript plugin: node is not on PATH")
        elif not node_script.is_file():
            tour.say(f"skipping the JavaScript plugin: {node_script} is missing")
        else:
            children.append(_start(tour, "Echo@Node", [node, str(node_script), plugin_dir], env))

        for child in children:
            label = child.label

            def loaded_or_exited(label: str = label) -> bool:
                return tour.has("loaded", label) or label in tour.exited

            tour.wait_for(f"{label} to be loaded", loaded_or_exited, START_TIMEOUT)
            if label in tour.exited:
                raise DemoFailed(f"{label} exited with status {tour.exited[label]}")

        for child in children:
            handle = registry.get_plugin(child.name, child.namespace)
            if handle is None:
                raise DemoFailed(f"{child.label} is not loaded any more")
            tour.say(f"--- {child.label} (pid {child.proc.pid}) ---")
            (_tour_do if child.label == "Do@Test" else _tour_node)(tour, handle)
            started = time.perf_counter()
            registry.unload_plugin(handle)
            took = (time.perf_counter() - started) * 1000
            tour.say(
                f"{child.label}: unload took {took:.2f} ms (it got /Stop and keeps running; "
                f"loaded={registry.is_loaded(child.name, child.namespace)})"
            )

        tour.say("--- stopping the plugin processes ---")
        for child in children:
            status = _stop_child(child)
            tour.say(f"{child.label}: process {child.proc.pid} ended with status {status}")
        for child in children:
            label = child.label

            def lost(label: str = label) -> bool:
                return tour.has("lost", label)

            tour.wait_for(f"the registry to see {label} go", lost, STEP_TIMEOUT)
    finally:
        registry.close()
    tour.say("application: registry closed")


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
    children: list[_Child] = []
    plugin_dir = _short_tempdir()
    failure = ""
    try:
        _run(tour, plugin_dir, examples, children)
    except (DemoFailed, GoPlugError, OSError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        failure = "interrupted"
    finally:
        for child in children:
            if child.proc.poll() is None:
                status = _stop_child(child)
                tour.say(f"stopped {child.label} (pid {child.proc.pid}, status {status})")
    if failure:
        tour.say(f"FAILED: {failure}")
        for child in children:
            tail = _tail(child)
            if tail:
                tour.note(f"last output of {child.label}:")
                for line in tail:
                    tour.note(f"  {line}")
    for child in children:
        child.log.close()
    leftovers = sorted(os.listdir(plugin_dir)) if os.path.isdir(plugin_dir) else []
    shutil.rmtree(plugin_dir, ignore_errors=True)
    if leftovers:
        tour.say(f"FAILED: files left in {plugin_dir}: {', '.join(leftovers)} (removed)")
        return 1
    tour.say(f"removed {plugin_dir} (it was empty)")
    if failure:
        return 1
    tour.say("demo complete")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
