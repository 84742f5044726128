"""Shared fixtures: short temporary plugin directories and real plugin processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TEST_PLUGIN = HERE / "plugins" / "test_plugin.py"
REPO = HERE.parent


def wait_for(
    predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.005
) -> None:
    """Wait until ``predicate()`` is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


class PluginProcess:
    """A plugin running in a child process of the test."""

    def __init__(self, proc: subprocess.Popen[bytes], pconf: Path) -> None:
        self.proc = proc
        self.pconf = pconf

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 10) -> int:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def stderr_text(self) -> str:
        return ""


class Spawner:
    """Starts plugin processes and guarantees they end with the test."""

    def __init__(self) -> None:
        self.procs: list[PluginProcess] = []

    def __call__(
        self,
        location: str | Path,
        name: str,
        namespace: str = "",
        *extra: str,
        script: str | Path = TEST_PLUGIN,
        wait: bool = True,
        command: list[str] | None = None,
    ) -> PluginProcess:
        where = str(location)  # as given: an etcd:// location is not a path
        location = Path(location)
        cmd = command or [sys.executable, str(script), where, name, namespace, *extra]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        stem = f"{name}@{namespace}" if namespace else name
        plugin = PluginProcess(proc, location / f"{stem}.pconf")
        self.procs.append(plugin)
        if wait:
            wait_for(lambda: plugin.pconf.exists() or proc.poll() is not None, timeout=20)
            if proc.poll() is not None:
                raise AssertionError(f"plugin {stem} exited with {proc.returncode}")
        return plugin

    def cleanup(self) -> None:
        for plugin in self.procs:
            with contextlib.suppress(ProcessLookupError):
                if plugin.proc.poll() is None:
                    os.kill(plugin.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                plugin.proc.wait(10)


@pytest.fixture
def plugin_dir() -> Iterator[Path]:
    """A short, private plugin directory (socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="gp", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    """Start plugin processes: ``spawn(dir, name, namespace, *args)``; all are killed after."""
    spawner = Spawner()
    try:
        yield spawner
    finally:
        spawner.cleanup()
