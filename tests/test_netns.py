"""The namespaced test network: hosts reach each other, partitions are silent, nothing leaks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from netns import (
    Host,
    NetnsUnavailable,
    Network,
    WaitForLineError,
    network_or_skip,
    require_netns,
    sweep_stale,
    wait_for_line,
)

PY = [sys.executable, "-I", "-S"]

ECHO_SERVER = """
import socket, sys
srv = socket.socket()
srv.bind((sys.argv[1], 0))
srv.listen()
print("LISTENING", srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        conn.settimeout(5)
        while data := conn.recv(4096):
            conn.sendall(data)
"""

ECHO_CLIENT = """
import socket, sys
host, port, payload, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
try:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(payload.encode())
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
except OSError as exc:
    print("ERROR", type(exc).__name__, exc)
    sys.exit(1)
print("ECHO", data.decode())
"""


@pytest.fixture
def net() -> Iterator[Network]:
    with network_or_skip() as network:
        yield network


def main_ns(*args: str) -> str:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout


def netns_names() -> set[str]:
    return {line.split()[0] for line in main_ns("netns", "list").splitlines() if line.strip()}


def echo(
    client_host: Host, server_ip: str, port: int, payload: str, timeout: float = 1.0
) -> subprocess.CompletedProcess[str]:
    # The subprocess timeout bounds the whole attempt even if connect's own timeout misbehaves.
    return client_host.run(
        [*PY, "-c", ECHO_CLIENT, server_ip, str(port), payload, str(timeout)], timeout=timeout + 5
    )


def start_echo_server(host: Host) -> int:
    server = host.popen([*PY, "-c", ECHO_SERVER, host.ip], stdout=subprocess.PIPE, text=True)
    return int(wait_for_line(server, "LISTENING ", timeout=10).split()[1])


def test_hosts_talk_partition_is_silent_and_heal_restores(net: Network) -> None:
    a, b = net.add_host("a"), net.add_host("b")
    assert a.ip != b.ip and a.ip.rsplit(".", 1)[0] == b.ip.rsplit(".", 1)[0]
    port = start_echo_server(a)

    ok = echo(b, a.ip, port, "hello")
    assert ok.returncode == 0 and ok.stdout.strip() == "ECHO hello", ok

    net.partition(a)
    started = time.monotonic()
    cut = echo(b, a.ip, port, "lost", timeout=1.0)
    assert cut.returncode == 1 and cut.stdout.startswith("ERROR"), cut
    # Silent: no RST or ICMP comes back, the attempt only ends by its own timeout.
    assert "timeout" in cut.stdout.lower() and time.monotonic() - started >= 0.9, cut

    net.heal(a)
    deadline = time.monotonic() + 5
    for _ in range(20):
        back = echo(b, a.ip, port, "again")
        if back.returncode == 0 or time.monotonic() > deadline:
            break
    assert back.returncode == 0 and back.stdout.strip() == "ECHO again", back


def test_partitioned_block_heals_after(net: Network) -> None:
    a, b = net.add_host("a"), net.add_host("b")
    port = start_echo_server(a)
    with net.partitioned("a"):
        assert echo(b, a.ip, port, "x", timeout=0.3).returncode == 1
    assert echo(b, a.ip, port, "y").stdout.strip() == "ECHO y"


def test_main_namespace_never_sees_the_subnet(net: Network) -> None:
    links_before = main_ns("-o", "link")
    hosts = [net.add_host(f"h{i}") for i in range(3)]
    for host in hosts:
        assert host.run(["ip", "-o", "addr"]).stdout.count(host.ip + "/24") == 1
    net_prefix = net.subnet.rsplit(".", 1)[0] + "."
    assert net_prefix.startswith("10.77.")
    for listing in (main_ns("-o", "addr"), main_ns("route"), main_ns("-o", "-4", "neigh")):
        assert net_prefix not in listing
    # No veth or bridge was ever made in (or left behind in) the main namespace.
    assert main_ns("-o", "link") == links_before
    assert not re.search(r"\bbr0\b|\bv\d+@", main_ns("-o", "link"))


def test_close_removes_namespaces_processes_and_files() -> None:
    try:
        network = Network()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    try:
        names = set(network.namespaces)
        a = network.add_host("a")
        names |= set(network.namespaces)
        sleeper = a.popen([*PY, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                          stdout=subprocess.PIPE, text=True)
        # A grandchild the harness never saw: the close must find it in the namespace anyway.
        shell = a.popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE,
                        text=True)
        grandchild = int(wait_for_line(shell, re.compile(r"^\d+$"), timeout=10))
        wait_for_line(sleeper, "up", timeout=10)
        stderr_files = [p.stderr_path for p in network.processes]
        assert all(path is not None and path.exists() for path in stderr_files)
        assert names <= netns_names()
    finally:
        started = time.monotonic()
        network.close()
        close_seconds = time.monotonic() - started
    assert not names & netns_names()
    assert sleeper.returncode is not None and shell.returncode is not None
    assert not os.path.exists(f"/proc/{grandchild}") or _state(grandchild) == "Z"
    assert not any(path.exists() for path in stderr_files)
    assert close_seconds < 3, close_seconds  # SIGTERM is enough; nobody waited out the grace
    network.close()  # idempotent


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_wait_for_line_reports_exit_and_timeout_with_stderr(net: Network) -> None:
    a = net.add_host("a")
    dies = a.popen(
        [*PY, "-c", "import sys; print('one'); sys.stderr.write('boom here\\n'); sys.exit(3)"],
        stdout=subprocess.PIPE, text=True,
    )
    with pytest.raises(WaitForLineError) as info:
        wait_for_line(dies, "never", timeout=10)
    assert "exited with 3" in str(info.value) and "boom here" in str(info.value)
    assert "one" in str(info.value)

    quiet = a.popen([*PY, "-c", "import time; print('tick', flush=True); time.sleep(60)"],
                    stdout=subprocess.PIPE)  # bytes mode: lines still come back as str
    assert quiet.wait_for_line(lambda line: line == "tick", timeout=10) == "tick"
    started = time.monotonic()
    with pytest.raises(WaitForLineError, match=r"within 0\.3 s"):
        quiet.wait_for_line("never", timeout=0.3)
    assert time.monotonic() - started < 2
    assert net.stop(quiet, grace=1) == -15


def test_two_networks_at_once_do_not_collide() -> None:
    with network_or_skip() as one, network_or_skip() as two:
        assert one.subnet != two.subnet
        assert not set(one.namespaces) & set(two.namespaces)
        x, y = one.add_host("x"), two.add_host("x")
        assert x.ns != y.ns and str(os.getpid()) in x.ns


def test_skips_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="root"), network_or_skip():
        pass


def test_sweep_removes_only_dead_creators_namespaces() -> None:
    try:
        require_netns()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"gpz{dead.pid}n0h1", f"gpz{os.getppid()}n0h1"
    try:
        main_ns("netns", "add", stale)
        main_ns("netns", "add", live)
        assert sweep_stale("gpz") == [stale]
        assert stale not in netns_names() and live in netns_names()
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
