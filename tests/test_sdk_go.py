"""The Go plugin library in sdk/go: its own tests, and its example plugin against our registry.

Needs a Go toolchain: ``tools/ensure-go`` finds one (installing Debian's golang-go when run as
root with apt); without one every test here is skipped with the script's reason. Nothing is
downloaded by the go command (GOPROXY=off, GOTOOLCHAIN=local: the module uses only the
standard library). Build results are cached per user under the system temp directory, so a
second run takes seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, wait_for

from goplug import PluginRegistry, PluginState

pytestmark = pytest.mark.timeout(600)

SDK = REPO / "sdk" / "go"
ENSURE_GO = REPO / "tools" / "ensure-go"


def _find_go() -> str:
    try:
        done = subprocess.run(
            [str(ENSURE_GO)], capture_output=True, text=True, timeout=900, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"tools/ensure-go failed to run: {exc}")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        reason = lines[-1] if lines else done.stderr.strip()[-200:]
        pytest.skip(f"no Go toolchain: {reason}")
    return lines[-1]


@pytest.fixture(scope="module")
def go() -> str:
    """The path of the go binary (the module is skipped without one)."""
    return _find_go()


def go_env() -> dict[str, str]:
    cache = Path(tempfile.gettempdir()) / f"goplug-go-cache-{os.getuid()}"
    env = dict(os.environ)
    env.update(
        GOTOOLCHAIN="local",
        GOPROXY="off",
        GOFLAGS="",
        GOCACHE=str(cache / "build"),
        GOPATH=str(cache / "gopath"),
        GOMODCACHE=str(cache / "gopath" / "pkg" / "mod"),
        CGO_ENABLED=env.get("CGO_ENABLED", "1"),
    )
    env.pop("GOPLUG_DIR", None)
    env.pop("GOPLUG_LAUNCH_TOKEN", None)
    return env


def run_go(go: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [go, *args],
        cwd=SDK,
        env=go_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"go {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def do_binary(go: str) -> Iterator[Path]:
    """The example plugin Do@Test, built into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="gpgo-bin") as tmp:
        binary = Path(tmp) / "do-plugin"
        run_go(go, "build", "-o", str(binary), "./examples/do")
        yield binary


def test_go_vet(go: str) -> None:
    run_go(go, "vet", "./...")


def test_go_test(go: str) -> None:
    done = run_go(go, "test", "-count=1", "./...")
    assert "ok" in done.stdout


def test_launched_go_plugin(plugin_dir: Path, do_binary: Path) -> None:
    """The registry launches the Go example, calls it, gets its callbacks, unloads it."""
    with PluginRegistry(plugin_dir) as registry:
        handle = registry.launch([str(do_binary)], name="Do", namespace="Test")
        assert handle.state is PluginState.LOADED
        assert handle.methods == ["main.Do"]  # GoPlug's naming: the Go runtime name
        conf = handle.conf
        assert conf is not None and conf.protocol == "goplug/1" and conf.launch
        assert handle.execute("main.Do", b"hello") == b"HELLO"
        assert handle.execute("main.Do") == b"Hello from Do@Test!"
        assert handle.ping() > 0

        received: list[bytes] = []
        got = threading.Event()

        def callBack(data: bytes) -> None:
            received.append(data)
            got.set()

        handle.register_callback(callBack)  # subscribes to "callBack"
        wait_for(lambda: handle.execute("main.Do", b"x") == b"X" and got.wait(0.2), timeout=10)
        assert received and all(item == b"Test Data" for item in received)

        proc = handle.process
        assert proc is not None
        registry.unload_plugin(handle)
        wait_for(lambda: proc.exit_code is not None, timeout=10)
        assert proc.exit_code == 0
    assert sorted(os.listdir(plugin_dir)) == []


def test_go_plugin_run_by_hand(plugin_dir: Path, do_binary: Path) -> None:
    """The example started by hand is discovered and loaded; SIGTERM ends it cleanly."""
    proc = subprocess.Popen(
        [str(do_binary), str(plugin_dir)], stdin=subprocess.DEVNULL, env=go_env()
    )
    try:
        wait_for(lambda: (plugin_dir / "Do@Test.pconf").exists() or proc.poll() is not None)
        assert proc.poll() is None
        with PluginRegistry(plugin_dir) as registry:
            wait_for(lambda: registry.is_loaded("Do", "Test"))
            handle = registry.get_plugin("Do", "Test")
            assert handle is not None
            assert handle.execute("main.Do", b"abc\x00d\xc3\xa9") == "ABC\x00DÉ".encode()
            received = threading.Event()
            handle.register_callback(lambda data: received.set(), name="callBack")
            assert received.wait(5)  # the once-a-second notifier
            registry.unload_plugin(handle)
            assert handle.state is PluginState.DISCOVERED  # not launched: it keeps running
            assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert sorted(os.listdir(plugin_dir)) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_go_plugin_without_directory(do_binary: Path) -> None:
    done = subprocess.run(
        [str(do_binary)], env=go_env(), capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2
    assert "GOPLUG_DIR" in done.stderr


def test_go_library_passes_the_conformance_suite(go: str) -> None:
    from goplug import conformance

    with tempfile.TemporaryDirectory(prefix="gpgo-bin") as tmp:
        binary = Path(tmp) / "echo-plugin"
        run_go(go, "build", "-o", str(binary), "./examples/echo")
        report = conformance.run([str(binary)])
    failed = [(r.id, r.reason) for r in report.results if r.status == "fail"]
    assert report.passed("goplug"), failed
    assert sum(r.status == "pass" for r in report.results) >= 30
