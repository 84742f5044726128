"""The goplug command, run for real against plugin processes."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from goplug import PluginRegistry

SRC = str(Path(__file__).resolve().parents[1] / "src")
TIMEOUT = 30

TINY_PLUGIN = textwrap.dedent(
    """
    import os
    import sys

    from goplug import Plugin

    def stopper(data):
        print("STOP RECEIVED", flush=True)
        return b"bye"

    location = sys.argv[1] if __name__ == "__main__" else os.environ["TINY_DIR"]
    plugin = Plugin(location, "Tiny", "T", stopper=stopper)

    @plugin.method
    def Echo(data):
        return data

    @plugin.method
    def Upper(data):
        return data.upper()

    @plugin.method
    def Boom(data):
        raise ValueError("boom")

    if __name__ == "__main__":
        plugin.serve_forever()
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def goplug(*args: str, stdin: bytes = b"", **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "goplug", *args],
        input=stdin,
        capture_output=True,
        timeout=TIMEOUT,
        env=_env(**env),
    )


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Procs:
    """Child processes started by a test, killed by pid at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gp", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.kill_all()


@pytest.fixture
def plugin_dir(tmp: Path) -> Path:
    d = tmp / "p"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def tiny(tmp: Path, plugin_dir: Path, procs: Procs) -> Iterator[Path]:
    """A running Tiny@T plugin; yields the file its stdout goes to."""
    script = tmp / "tiny.py"
    script.write_text(TINY_PLUGIN)
    out = tmp / "tiny.out"
    with open(out, "wb") as log:
        proc = procs.start(
            [sys.executable, str(script), str(plugin_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    pconf = plugin_dir / "Tiny@T.pconf"
    wait_for(lambda: pconf.exists() or proc.poll() is not None, "Tiny@T.pconf")
    assert proc.poll() is None, out.read_text()
    yield out
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(10)


def _error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    err = result.stderr.decode()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("goplug: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_ls_shows_live_plugin_with_methods(plugin_dir: Path, tiny: Path) -> None:
    result = goplug("ls", str(plugin_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].split() == [
        "NAMESPACE", "NAME", "STATE", "PID", "UPTIME", "RESTARTS", "METHODS", "SOCKET"
    ]  # fmt: skip
    row = next(line for line in lines if "Tiny" in line).split()
    assert row[:3] == ["T", "Tiny", "live"] and row[3].isdigit()
    assert row[4:] == ["-", "-", "Echo,Upper,Boom", str(plugin_dir / "Tiny@T.sock")]
    # Looking is harmless: no /Stop was sent, and the plugin still answers.
    assert "STOP RECEIVED" not in tiny.read_text()
    assert goplug("call", str(plugin_dir), "Tiny@T", "Echo", "still here").stdout == b"still here"


def test_ls_stale_and_broken_files(plugin_dir: Path, tiny: Path) -> None:
    (plugin_dir / "junk.pconf").write_text('{"Name": "Junk"')
    dead = plugin_dir / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))  # a socket file nobody listens on
    s.close()
    (plugin_dir / "Dead.pconf").write_text(json.dumps({"Name": "Dead", "Sock": str(dead)}))
    (plugin_dir / "Gone.pconf").write_text(json.dumps({"Name": "Gone", "Sock": "/tmp/gp-nope"}))

    result = goplug("ls", str(plugin_dir))
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    rows = {line.split()[1]: line for line in out.splitlines()[1:]}
    assert " live " in rows["Tiny"]
    assert " stale " in rows["Dead"]
    assert " stale " in rows["Gone"]
    assert "broken: not valid JSON" in rows["(junk.pconf)"]

    as_json = json.loads(goplug("ls", str(plugin_dir), "--json").stdout)
    states = {item["file"]: item["state"] for item in as_json}
    assert states["Tiny@T.pconf"] == "live"
    assert states["Dead.pconf"] == "stale"
    assert states["junk.pconf"].startswith("broken: ")


def test_ls_empty_and_missing_directory(plugin_dir: Path, tmp: Path) -> None:
    result = goplug("ls", str(plugin_dir))
    assert result.returncode == 0
    assert "no plugin announce files" in result.stderr.decode()
    result = goplug("ls", str(tmp / "missing"))
    assert result.returncode == 1
    assert "no such plugin directory" in _error_line(result)
    assert not (tmp / "missing").exists()


def test_call_returns_raw_bytes(plugin_dir: Path, tiny: Path) -> None:
    result = goplug("call", str(plugin_dir), "Tiny@T", "Upper", "hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"HELLO"

    data = bytes(range(256)) * 3
    result = goplug("call", str(plugin_dir), "Tiny@T", "Echo", "-", stdin=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data

    result = goplug("call", str(plugin_dir), "Tiny@T", "Echo")
    assert (result.returncode, result.stdout) == (0, b"")
    assert "STOP RECEIVED" not in tiny.read_text()


def test_call_missing_method(plugin_dir: Path, tiny: Path) -> None:
    result = goplug("call", str(plugin_dir), "Tiny@T", "Nope", "x")
    assert result.returncode == 1
    line = _error_line(result)
    assert "'Nope'" in line and "Echo, Upper, Boom" in line
    assert result.stdout == b""


def test_call_method_that_raises(plugin_dir: Path, tiny: Path) -> None:
    result = goplug("call", str(plugin_dir), "Tiny@T", "Boom")
    assert result.returncode == 1
    assert "ValueError: boom" in _error_line(result)
    verbose = goplug("-v", "call", str(plugin_dir), "Tiny@T", "Boom")
    assert verbose.returncode == 1
    assert "raise ValueError" in verbose.stderr.decode()  # the remote traceback


def test_ping(plugin_dir: Path, tiny: Path) -> None:
    result = goplug("ping", str(plugin_dir), "Tiny@T", "--count", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert out.count("Tiny@T: reply in") == 3
    assert "3 pings: min" in out


def test_unknown_plugin(plugin_dir: Path, tiny: Path) -> None:
    for target in ("Tiny", "Nobody@T", "Tiny@Other"):
        result = goplug("call", str(plugin_dir), target, "Echo")
        assert result.returncode == 1, target
        assert "no plugin" in _error_line(result)
    result = goplug("ping", str(plugin_dir), "Nobody")
    assert result.returncode == 1
    assert "no plugin Nobody" in _error_line(result)


def test_usage_errors_exit_2(plugin_dir: Path) -> None:
    for args in (
        ("call", str(plugin_dir)),
        ("call", str(plugin_dir), "Tiny@T", "Echo", "x", "--timeout", "0"),
        ("ping", str(plugin_dir), "Tiny@T", "--count", "zero"),
        ("frobnicate",),
        (),
    ):
        result = goplug(*args)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr.decode()


@pytest.mark.parametrize("sub", ["", "ls", "call", "ping", "watch", "serve", "demo"])
def test_help(sub: str) -> None:
    result = goplug(*([sub] if sub else []), "--help")
    assert result.returncode == 0
    out = result.stdout.decode()
    assert out.startswith("usage: goplug")
    assert "example" in out


def test_serve_file(tmp: Path, plugin_dir: Path, procs: Procs) -> None:
    script = tmp / "tiny.py"
    script.write_text(TINY_PLUGIN)
    proc = procs.start(
        [sys.executable, "-m", "goplug", "serve", str(script)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(TINY_DIR=str(plugin_dir)),
    )
    pconf = plugin_dir / "Tiny@T.pconf"
    wait_for(lambda: pconf.exists() or proc.poll() is not None, "Tiny@T.pconf")
    assert proc.poll() is None

    registry = PluginRegistry(plugin_dir, auto_discover=False)
    try:
        handle = registry.load_plugin("Tiny", "T")
        assert handle.methods == ["Echo", "Upper", "Boom"]
        assert handle.execute("Upper", b"served") == b"SERVED"
    finally:
        registry.close()

    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert b"serving Tiny@T" in err
    assert sorted(os.listdir(plugin_dir)) == []  # .pconf and socket removed


def test_serve_module_attr(tmp: Path, plugin_dir: Path, procs: Procs) -> None:
    (tmp / "tinymod.py").write_text(TINY_PLUGIN)
    proc = procs.start(
        [sys.executable, "-m", "goplug", "serve", "tinymod:plugin"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp,
        env=_env(TINY_DIR=str(plugin_dir)),
    )
    pconf = plugin_dir / "Tiny@T.pconf"
    wait_for(lambda: pconf.exists() or proc.poll() is not None, "Tiny@T.pconf")
    result = goplug("call", str(plugin_dir), "Tiny@T", "Echo", "via module")
    assert result.stdout == b"via module"
    os.kill(proc.pid, signal.SIGINT)
    proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert not pconf.exists()


def test_serve_errors(tmp: Path) -> None:
    empty = tmp / "empty.py"
    empty.write_text("x = 1\n")
    result = goplug("serve", str(empty))
    assert result.returncode == 1
    assert "defines no goplug.Plugin" in _error_line(result)
    result = goplug("serve", str(tmp / "missing.py"))
    assert result.returncode == 1
    assert "no such file" in _error_line(result)
    result = goplug("serve", "os:path")
    assert result.returncode == 1
    assert "not a goplug.Plugin" in _error_line(result)


def test_watch_prints_events_and_leaves_plugins_running(
    tmp: Path, plugin_dir: Path, procs: Procs
) -> None:
    watch = procs.start(
        [sys.executable, "-m", "goplug", "watch", str(plugin_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    lines: queue.Queue[str] = queue.Queue()
    assert watch.stdout is not None
    stdout = watch.stdout

    def read() -> None:
        for raw in stdout:
            lines.put(raw.decode())

    threading.Thread(target=read, daemon=True).start()

    def expect(kind: str) -> str:
        deadline = time.monotonic() + 15
        while True:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line.split()[2:4] == [kind, "Tiny@T"]:
                return line

    assert watch.stderr is not None
    assert b"watching" in watch.stderr.readline()  # the watcher is ready

    script = tmp / "tiny.py"
    script.write_text(TINY_PLUGIN)
    out = tmp / "tiny.out"
    with open(out, "wb") as log:
        plugin = procs.start(
            [sys.executable, str(script), str(plugin_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    expect("discovered")
    assert "methods=Echo,Upper,Boom" in expect("loaded")

    os.kill(plugin.pid, signal.SIGTERM)
    plugin.wait(10)
    assert "was removed" in expect("lost")

    os.kill(watch.pid, signal.SIGINT)
    assert watch.wait(10) == 0
    assert "STOP RECEIVED" not in out.read_text()
