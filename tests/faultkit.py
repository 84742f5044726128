"""Helpers shared by the reliability, security and chaos tests (real processes, no mocks)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import PluginProcess, Spawner, wait_for

from goplug import PluginHandle, PluginRegistry, PluginState, RegistrySettings

PLUGINS = Path(__file__).resolve().parent / "plugins"
TUNED_PLUGIN = PLUGINS / "tuned_plugin.py"
ROGUE_PLUGIN = PLUGINS / "rogue_plugin.py"
NOBODY = 65534


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def thread_count() -> int:
    return len(threading.enumerate())


def vm_rss_kib(pid: int | str = "self") -> int:
    """Resident set size of a process, in KiB (from /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def children_of_self() -> set[int]:
    """Pids of this process's living children (every thread's)."""
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


def read_pconf(path: Path) -> dict[str, Any]:
    return json.loads(path.read_bytes())


def pconf_pid(path: Path) -> int | None:
    try:
        return int(read_pconf(path).get("Pid") or 0) or None
    except (OSError, ValueError):
        return None


def start_plugin(
    spawn: Spawner, location: Path, name: str, namespace: str = "", *extra: str, **kw: Any
) -> PluginProcess:
    """Spawn a plugin and wait until *its own* `.pconf` is in place (not one left by a dead one)."""
    plugin = spawn(location, name, namespace, *extra, wait=False, **kw)
    wait_for(
        lambda: pconf_pid(plugin.pconf) == plugin.pid or plugin.proc.poll() is not None,
        timeout=20,
    )
    if plugin.proc.poll() is not None:
        raise AssertionError(f"plugin {name} exited with {plugin.proc.returncode}")
    return plugin


def wait_loaded(handle: PluginHandle, timeout: float = 5.0) -> None:
    wait_for(lambda: handle.state is PluginState.LOADED, timeout=timeout)


def loaded_handle(
    registry: PluginRegistry, name: str, namespace: str = "", timeout: float = 5.0
) -> PluginHandle:
    """Wait for auto discovery to load a plugin and return its handle."""
    found: list[PluginHandle] = []

    def ready() -> bool:
        handle = registry.get_plugin(name, namespace)
        if handle is not None:
            found.append(handle)
        return handle is not None

    wait_for(ready, timeout=timeout)
    return found[-1]


class Registries:
    """Creates registries for a test and closes them all at its end."""

    def __init__(self) -> None:
        self.made: list[PluginRegistry] = []

    def __call__(
        self,
        location: str | os.PathLike[str],
        settings: RegistrySettings | None = None,
        auto_discover: bool = True,
    ) -> PluginRegistry:
        registry = PluginRegistry(location, auto_discover, settings=settings)
        self.made.append(registry)
        return registry

    def close_all(self) -> None:
        for registry in self.made:
            registry.close()


class EventLog:
    """A registry listener that records every event, thread-safely."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, event: Any) -> None:
        with self._lock:
            self.events.append((event.kind, event.name, event.reason))

    def kinds(self, name: str) -> list[str]:
        with self._lock:
            return [k for k, n, _ in self.events if n == name]


def raw_connect(path: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def read_until_closed(sock: socket.socket, deadline: float, limit: int = 1 << 20) -> bytes:
    """Read what the peer sends until it closes (or resets); fail at ``deadline``."""
    data = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the peer did not close in time; got {bytes(data[:200])!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(data)
        except TimeoutError:
            continue
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise AssertionError("the peer sent far more than expected")


def status_of(response: bytes) -> int | None:
    """The status code of the first response in ``response`` (None if there is none)."""
    if not response.startswith(b"HTTP/1.1 "):
        return None
    return int(response[9:12])


def deadline_call(fn: Callable[[], object], seconds: float) -> tuple[object, float]:
    """Run ``fn`` and return (its result or the exception it raised, elapsed seconds)."""
    started = time.monotonic()
    try:
        result: object = fn()
    except Exception as exc:
        result = exc
    return result, time.monotonic() - started


def _all_threads_stopped(pid: int) -> bool:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for task in tasks:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state not in ("T", "t"):
                return False
    except OSError:
        return False
    return True


def freeze(plugin: PluginProcess) -> None:
    """SIGSTOP a plugin and wait until every one of its threads has actually stopped."""
    plugin.signal(signal.SIGSTOP)
    wait_for(lambda: _all_threads_stopped(plugin.pid), timeout=5)
