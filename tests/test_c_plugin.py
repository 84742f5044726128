"""The C plugin (tests/plugins/c_plugin.c): a compiled plugin that knows nothing of goplug."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from cplugin import c_plugin_or_skip

import goplug
from goplug import PluginRegistry, PluginState

pytestmark = pytest.mark.timeout(90)

NAME = "CDo"
NAMESPACE = "C"
METHODS = ["Echo", "Upper", "Pid", "Exit", "Sleep"]
ALL_BYTES = bytes(range(256))


@pytest.fixture(scope="session")
def c_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return c_plugin_or_skip(tmp_path_factory)


class CProcess:
    """One c_plugin process; its stdout and stderr go to files."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        directory: Path,
        logs: Path,
        name: str = NAME,
        namespace: str = NAMESPACE,
    ) -> None:
        self.proc = proc
        self.directory = directory
        self.logs = logs
        self.pconf = directory / f"{namespace}{name}.pconf"
        self.sock = directory / f"{namespace}{name}.sock"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stdout(self) -> str:
        return (self.logs / "stdout").read_text(errors="replace")

    def stderr_lines(self) -> list[str]:
        return (self.logs / "stderr").read_text(errors="replace").splitlines()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout)

    def wait_ready(self, timeout: float = 20) -> None:
        """Wait for the "ready" line (the .pconf is in place by then)."""
        wait_for(
            lambda: "ready\n" in self.stdout() or self.proc.poll() is not None, timeout=timeout
        )
        if self.proc.poll() is not None:
            raise AssertionError(
                f"c_plugin exited with {self.proc.returncode}: {self.stderr_lines()}"
            )


Launch = Callable[..., CProcess]


@pytest.fixture
def launch(c_binary: Path, tmp_path: Path) -> Iterator[Launch]:
    """Start c_plugin processes; every one is ended (by pid) after the test."""
    started: list[CProcess] = []

    def start(
        *args: str | Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        wait: bool = True,
        directory: Path | None = None,
    ) -> CProcess:
        logs = tmp_path / f"run{len(started)}"
        logs.mkdir()
        full_env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("GOPLUG_DIR", "C_PLUGIN_IGNORE_SIGTERM")
        }
        full_env.update(env or {})
        with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [str(c_binary), *map(str, args)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=full_env,
                cwd=cwd,
            )
        where = directory if directory is not None else Path(args[0]) if args else Path()
        plugin = CProcess(proc, where, logs, *map(str, args[1:3]))
        started.append(plugin)
        if wait:
            plugin.wait_ready()
        return plugin

    try:
        yield start
    finally:
        for plugin in started:
            if plugin.proc.poll() is None:
                plugin.signal(signal.SIGTERM)
                try:
                    plugin.proc.wait(10)
                except subprocess.TimeoutExpired:
                    plugin.signal(signal.SIGKILL)
                    plugin.proc.wait(10)
        for plugin in started:
            bad = [line for line in plugin.stderr_lines() if not line.startswith("c_plugin: ")]
            assert not bad, f"stderr lines without the c_plugin: prefix: {bad}"


@pytest.fixture
def plugin(launch: Launch, plugin_dir: Path) -> Iterator[CProcess]:
    """The plugin with default name and namespace, running in ``plugin_dir``.

    Afterwards it is stopped with SIGTERM (it must exit 0) and the directory must be empty.
    """
    started = launch(plugin_dir)
    assert started.pconf.exists()
    yield started
    if started.proc.poll() is None:
        started.signal(signal.SIGTERM)
        assert started.wait(10) == 0
    assert not list(plugin_dir.iterdir()), "c_plugin left files behind"


@contextlib.contextmanager
def loaded(directory: Path) -> Iterator[tuple[PluginRegistry, goplug.PluginHandle]]:
    with PluginRegistry(directory) as registry:
        wait_for(lambda: registry.is_loaded(NAME, NAMESPACE), timeout=10)
        handle = registry.get_plugin(NAME, NAMESPACE)
        assert handle is not None
        yield registry, handle


# Raw HTTP on the plugin's socket ----------------------------------------------------------------


def connect(sock_path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(str(sock_path))
    return conn


def read_until_eof(conn: socket.socket) -> bytes:
    data = bytearray()
    while chunk := conn.recv(65536):
        data += chunk
    return bytes(data)


def read_response(conn: socket.socket, buffered: bytearray) -> tuple[bytes, dict[str, str], bytes]:
    """One response (status line, headers with lower-case names, body); extra bytes stay."""
    while b"\r\n\r\n" not in buffered:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed inside a response head: {bytes(buffered)!r}"
        buffered += chunk
    head, _, _ = bytes(buffered).partition(b"\r\n\r\n")
    del buffered[: len(head) + 4]
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        key, _, value = line.decode().partition(":")
        headers[key.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    while len(buffered) < length:
        chunk = conn.recv(65536)
        assert chunk, "connection closed inside a response body"
        buffered += chunk
    body = bytes(buffered[:length])
    del buffered[:length]
    return status, headers, body


# The tests ----------------------------------------------------------------------------------


def test_announces_itself_like_a_go_plugin(plugin: CProcess, plugin_dir: Path) -> None:
    sock = str(plugin_dir.resolve() / "CCDo.sock")
    fields = {"Name": "CDo", "NameSpace": "C", "Url": "unix://CCDo", "Sock": sock}
    expected = json.dumps({**fields, "LazyLoad": False}, separators=(",", ":"))
    assert plugin.pconf.read_text() == expected
    assert stat.S_IMODE(plugin.pconf.stat().st_mode) == 0o600
    assert stat.S_ISSOCK(plugin.sock.stat().st_mode)
    assert stat.S_IMODE(plugin.sock.stat().st_mode) == 0o600
    lines = plugin.stdout().splitlines()
    assert lines[0].startswith("c_plugin: starting")
    assert lines[-1] == "ready"
    assert len(lines) >= 3  # noise besides "ready", including a line that looks like JSON
    assert sorted(p.name for p in plugin_dir.iterdir()) == ["CCDo.pconf", "CCDo.sock"]


def test_registry_loads_and_calls_it(plugin: CProcess, plugin_dir: Path) -> None:
    with loaded(plugin_dir) as (_, handle):
        assert handle.methods == METHODS
        data = ALL_BYTES * 100
        assert handle.execute("Echo", data) == data
        assert handle.execute("Echo") == b""
        big = os.urandom(3 * 1024 * 1024)
        assert handle.execute("Echo", big) == big
        assert handle.execute("Upper", b"abc xyz 123 \xe9\x00z") == b"ABC XYZ 123 \xe9\x00Z"
        assert handle.execute("Pid") == str(plugin.pid).encode()
        assert handle.execute("Sleep", b"20") == b""
        assert handle.ping() > 0
        with pytest.raises(goplug.MethodNotFound):
            handle.execute("Missing")
        with pytest.raises(goplug.MethodNotFound):
            handle.execute("echo")  # routes are case-sensitive
        with pytest.raises(goplug.RemoteError) as info:
            handle.execute("Sleep", b"soon")
        assert info.value.remote_type == "ValueError"
        assert handle.execute("Echo", b"still there") == b"still there"


def test_calls_run_concurrently(plugin: CProcess, plugin_dir: Path) -> None:
    with loaded(plugin_dir) as (_, handle):
        results: list[bytes] = []
        errors: list[BaseException] = []

        def sleep() -> None:
            try:
                results.append(handle.execute("Sleep", b"1000"))
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=sleep) for _ in range(5)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        elapsed = time.monotonic() - started
        assert not errors
        assert results == [b""] * 5
        assert elapsed < 3.5, f"5 calls of 1 s took {elapsed:.2f} s: not one thread each?"


def test_unload_and_a_callback_that_is_never_notified(plugin: CProcess, plugin_dir: Path) -> None:
    with loaded(plugin_dir) as (registry, handle):
        got: list[bytes] = []
        handle.register_callback(got.append, "main.cb")
        time.sleep(0.2)  # the poll is held open by the plugin
        assert handle.execute("Echo", b"x") == b"x"
        started = time.monotonic()
        registry.unload_plugin(handle)  # /Unsubscribe is unknown to it (404), /Stop answers
        assert time.monotonic() - started < 5
        assert handle.state is PluginState.DISCOVERED
        assert got == []
    assert plugin.proc.poll() is None  # /Stop does not end it


def test_exit_ends_the_process_with_that_code(
    plugin: CProcess, plugin_dir: Path, launch: Launch
) -> None:
    with loaded(plugin_dir) as (_, handle):
        with pytest.raises(goplug.PluginConnectionError):
            handle.execute("Exit", b"3")
        assert plugin.wait(10) == 3
        wait_for(lambda: handle.state is PluginState.STOPPED, timeout=10)
    # It died at once: its files are left behind. A new instance replaces the stale socket.
    assert plugin.pconf.exists()
    assert plugin.sock.exists()
    second = launch(plugin_dir)
    with loaded(plugin_dir) as (_, handle):
        assert handle.execute("Pid") == str(second.pid).encode()
    second.signal(signal.SIGTERM)
    assert second.wait(10) == 0
    assert not list(plugin_dir.iterdir())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_removes_its_files_and_exits_0(plugin: CProcess, plugin_dir: Path, sig: int) -> None:
    with loaded(plugin_dir) as (_, handle):
        plugin.signal(sig)
        assert plugin.wait(10) == 0
        assert not list(plugin_dir.iterdir())
        wait_for(lambda: handle.state is PluginState.STOPPED, timeout=10)
    lines = plugin.stderr_lines()
    assert lines
    assert all(line.startswith("c_plugin: ") for line in lines)


def test_no_directory_is_a_usage_error(c_binary: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GOPLUG_DIR"}
    result = subprocess.run(
        [str(c_binary)], env=env, capture_output=True, timeout=10, cwd=tmp_path, check=False
    )
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("c_plugin: ")
    assert "usage" in lines[0]
    assert not list(tmp_path.iterdir())


def test_directory_from_goplug_dir(launch: Launch, plugin_dir: Path) -> None:
    started = launch(env={"GOPLUG_DIR": str(plugin_dir)}, directory=plugin_dir)
    with loaded(plugin_dir) as (_, handle):
        assert handle.execute("Upper", b"env") == b"ENV"
    started.signal(signal.SIGTERM)
    assert started.wait(10) == 0
    assert not list(plugin_dir.iterdir())


def test_relative_directory_name_and_namespace(launch: Launch, plugin_dir: Path) -> None:
    relative = f"./{plugin_dir.name}/../{plugin_dir.name}"
    started = launch(relative, "Job", "", cwd=plugin_dir.parent, directory=plugin_dir)
    assert started.pconf == plugin_dir / "Job.pconf"
    conf = json.loads(started.pconf.read_text())
    assert conf == {
        "Name": "Job",
        "NameSpace": "",
        "Url": "unix://Job",
        "Sock": str(plugin_dir.resolve() / "Job.sock"),
        "LazyLoad": False,
    }
    with PluginRegistry(plugin_dir) as registry:
        wait_for(lambda: registry.is_loaded("Job"), timeout=10)
        handle = registry.get_plugin("Job")
        assert handle is not None
        assert handle.execute("Echo", b"job") == b"job"
    started.signal(signal.SIGTERM)
    assert started.wait(10) == 0
    assert not list(plugin_dir.iterdir())


def test_ignore_sigterm(launch: Launch, plugin_dir: Path) -> None:
    started = launch(plugin_dir, env={"C_PLUGIN_IGNORE_SIGTERM": "1"})
    with loaded(plugin_dir) as (_, handle):
        started.signal(signal.SIGTERM)
        time.sleep(0.3)
        assert started.proc.poll() is None
        assert handle.execute("Echo", b"alive") == b"alive"
        started.signal(signal.SIGKILL)
        assert started.wait(10) == -signal.SIGKILL
        wait_for(lambda: handle.state is PluginState.STOPPED, timeout=10)
    assert started.pconf.exists()  # killed: nothing removed its files
    started.pconf.unlink()
    started.sock.unlink()


def test_second_instance_refuses_a_socket_in_use(
    plugin: CProcess, plugin_dir: Path, launch: Launch
) -> None:
    before = plugin.pconf.read_bytes()
    second = launch(plugin_dir, wait=False)
    assert second.wait(10) == 1
    lines = second.stderr_lines()
    assert len(lines) == 1
    assert lines[0].startswith("c_plugin: ")
    assert plugin.pconf.read_bytes() == before
    with loaded(plugin_dir) as (_, handle):
        assert handle.execute("Pid") == str(plugin.pid).encode()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        b"hello there\r\n\r\n",
        b"POST /Echo HTTP/9.9\r\n\r\n",
        b"POST /Echo HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST /Echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST /Echo HTTP/1.1\r\nno colon here\r\n\r\n",
        b"POST /E%zzcho HTTP/1.1\r\n\r\n",
        b"POST /Echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n",
    ],
)
def test_garbage_gets_400_and_it_keeps_serving(
    plugin: CProcess, plugin_dir: Path, garbage: bytes
) -> None:
    with loaded(plugin_dir) as (_, handle):
        with connect(plugin.sock) as conn:
            conn.sendall(garbage)
            answer = read_until_eof(conn)
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert b"\r\nContent-Length: 0\r\n" in answer
        assert answer.endswith(b"\r\n\r\n")
        assert handle.execute("Echo", b"fine") == b"fine"
        assert handle.ping() > 0


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /Echo HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (64 * 1024 * 1024 + 1),
        b"POST /Echo HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"POST /Echo HTTP/1.1\r\nX-Big: " + b"a" * (64 * 1024) + b"\r\n\r\n",
        b"POST /Echo HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n",
    ],
    ids=["body", "huge-length", "head", "header-lines"],
)
def test_too_large_gets_413_and_close(
    plugin: CProcess, plugin_dir: Path, request_bytes: bytes
) -> None:
    with connect(plugin.sock) as conn:
        conn.sendall(request_bytes)
        answer = read_until_eof(conn)
    assert answer == (
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    with loaded(plugin_dir) as (_, handle):
        assert handle.execute("Echo", b"fine") == b"fine"


def test_wire_keep_alive_pipelining_and_framing(plugin: CProcess) -> None:
    requests = (
        b"\r\n"  # a stray empty line before a request is forgiven
        b"POST /Activate HTTP/1.1\r\nHost: CCDo\r\nContent-Length: 0\r\n\r\n"
        b"POST /Upper HTTP/1.1\ncontent-length: 3\nhost: x\n\nabc"  # bare LF, any case
        b"PUT /Ping/extra?q=1 HTTP/1.1\r\nCONTENT-LENGTH:4\r\n\r\nping"
        b"POST /Nope%2Fx HTTP/1.1\r\n\r\n"
        b"POST /Echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n"
        b"POST unix://CCDo/Stop HTTP/1.1\r\n\r\n"
        b"POST /Echo HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    )
    buffered = bytearray()
    with connect(plugin.sock) as conn:
        conn.sendall(requests)
        answers = [read_response(conn, buffered) for _ in range(7)]
        assert read_until_eof(conn) == b""
    assert not buffered
    ok = b"HTTP/1.1 200 OK"
    assert answers[0][0] == ok
    assert json.loads(answers[0][2]) == METHODS
    assert answers[0][1]["content-type"] == "application/octet-stream"
    assert answers[1][::2] == (ok, b"ABC")
    assert answers[2][::2] == (ok, b"ping")
    status, headers, body = answers[3]
    assert status == b"HTTP/1.1 404 Not Found"
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"type": "MethodNotFound", "message": "no method 'Nope'"}
    assert answers[4][::2] == (ok, b"abcde")
    assert answers[5][::2] == (ok, b"stopped")
    assert answers[6][::2] == (ok, b"ok")
    assert answers[6][1]["connection"] == "close"


def test_wire_partial_writes_from_the_client(plugin: CProcess) -> None:
    request = b"POST /Echo HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789"
    buffered = bytearray()
    with connect(plugin.sock) as conn:
        for i in range(len(request)):
            conn.sendall(request[i : i + 1])
            time.sleep(0.001)
        assert read_response(conn, buffered)[2] == b"0123456789"
        conn.sendall(request * 50)
        for _ in range(50):
            assert read_response(conn, buffered)[2] == b"0123456789"
