"""One behavioural suite, two places of discovery: a directory (Unix sockets) and etcd (TCP + TLS).

Whatever the backend, a registry discovers and loads real plugin processes, calls them, loses
them when they go, finds them again when they come back (the same handle works again), and
delivers every notification in order.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Spawner, wait_for

import goplug
from goplug.tls import dev_configs, make_dev_certs

TTL = 2  # the shortest lease etcd plugins may ask for: losses show within TTL + 1 s


@dataclass
class Backend:
    """How to run the same scenario in one place of discovery."""

    kind: str
    location: str
    plugin_args: list[str]
    registry_kwargs: dict[str, Any] = field(default_factory=dict)
    server: Any = None
    prefix: str = ""

    @property
    def loss_bound(self) -> float:
        """Seconds within which a silent plugin must be reported lost (generous on 2 cores)."""
        return TTL + 1 + 2 if self.kind == "etcd" else 5

    def registry(self, **kwargs: Any) -> goplug.PluginRegistry:
        return goplug.PluginRegistry(self.location, **self.registry_kwargs, **kwargs)

    def announce_garbage(self, name: str, document: bytes) -> None:
        if self.kind == "directory":
            (Path(self.location) / f"{name}.pconf").write_bytes(document)
        else:
            self.server.put(f"{self.prefix}//{name}", document)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("certs")
    make_dev_certs(root)
    return root


@pytest.fixture(params=["directory", "etcd"])
def backend(request: pytest.FixtureRequest, plugin_dir: Path, certs: Path) -> Iterator[Backend]:
    if request.param == "directory":
        yield Backend("directory", str(plugin_dir), [])
        return
    etcdserver = pytest.importorskip("etcdserver", reason="the etcd test helper is missing")
    with etcdserver.EtcdServer(plugin_dir) as server:
        prefix = f"/t{time.monotonic_ns()}"
        yield Backend(
            "etcd",
            server.location(prefix),
            ["--url=tcp://127.0.0.1:0", f"--certs={certs}", f"--ttl={TTL}"],
            {"tls": dev_configs(certs)["registry"]},
            server,
            prefix,
        )


def start(spawn: Spawner, backend: Backend, name: str, *extra: str) -> Any:
    return spawn(backend.location, name, "", *backend.plugin_args, *extra, wait=False)


def loaded(registry: goplug.PluginRegistry, name: str, timeout: float = 15.0) -> Any:
    wait_for(lambda: registry.is_loaded(name), timeout=timeout)
    handle = registry.get_plugin(name)
    assert handle is not None
    return handle


def test_discover_load_call(backend: Backend, spawn: Spawner) -> None:
    events: list[tuple[str, str]] = []
    with backend.registry() as registry:
        registry.add_listener(lambda e: events.append((e.kind, e.name)))
        start(spawn, backend, "Alpha")
        start(spawn, backend, "Beta")
        alpha, beta = loaded(registry, "Alpha"), loaded(registry, "Beta")
        assert alpha.execute("Upper", b"alpha") == b"ALPHA"
        assert beta.execute("Echo", b"\x00\xff" * 1000) == b"\x00\xff" * 1000
        assert "Upper" in alpha.methods
        with pytest.raises(goplug.MethodNotFound):
            alpha.execute("Nope")
        with pytest.raises(goplug.RemoteError, match="deliberate"):
            beta.execute("Fail", b"x")
        assert events.index(("discovered", "Alpha")) < events.index(("loaded", "Alpha"))


def test_stop_and_come_back_with_the_same_handle(backend: Backend, spawn: Spawner) -> None:
    with backend.registry() as registry:
        first = start(spawn, backend, "Phoenix")
        handle = loaded(registry, "Phoenix")
        pid = handle.execute("Pid")
        first.terminate()  # a clean stop withdraws the announcement at once
        wait_for(lambda: handle.state is goplug.PluginState.STOPPED, timeout=5)
        with pytest.raises(goplug.PluginNotLoaded):
            handle.execute("Pid")
        start(spawn, backend, "Phoenix")
        wait_for(lambda: handle.state is goplug.PluginState.LOADED, timeout=15)
        assert handle.execute("Pid") != pid
        assert registry.get_plugin("Phoenix") is handle


def test_killed_plugin_is_lost_then_found_again(backend: Backend, spawn: Spawner) -> None:
    with backend.registry() as registry:
        victim = start(spawn, backend, "Victim")
        handle = loaded(registry, "Victim")
        lost = threading.Event()
        registry.add_listener(
            lambda e: lost.set() if (e.kind, e.name) == ("lost", "Victim") else None,
            replay=False,
        )
        killed_at = time.monotonic()
        victim.kill()
        assert lost.wait(backend.loss_bound), "a killed plugin was not reported lost"
        assert time.monotonic() - killed_at < backend.loss_bound
        start(spawn, backend, "Victim")
        wait_for(lambda: handle.state is goplug.PluginState.LOADED, timeout=15)
        assert handle.execute("Echo", b"back") == b"back"


def test_silent_plugin_is_lost_and_returns(backend: Backend, spawn: Spawner) -> None:
    """A plugin that stops answering (SIGSTOP: no keepalives, no answers) is lost; SIGCONT: back."""
    with backend.registry(settings=goplug.RegistrySettings(ping_interval=0.5)) as registry:
        frozen = start(spawn, backend, "Frozen")
        handle = loaded(registry, "Frozen")
        frozen.signal(signal.SIGSTOP)
        try:
            wait_for(
                lambda: handle.state is not goplug.PluginState.LOADED,
                timeout=backend.loss_bound + 4,
            )
        finally:
            frozen.signal(signal.SIGCONT)
        # etcd: the thawed plugin finds its lease gone and announces itself anew (loaded again
        # by itself). Directory: its file never changed; asking for it loads it again.
        wait_for(lambda: reloaded(registry, "Frozen"), timeout=15)
        assert registry.get_plugin("Frozen") is handle
        assert handle.execute("Echo", b"thawed") == b"thawed"


def test_callbacks_arrive_in_order_across_a_restart(backend: Backend, spawn: Spawner) -> None:
    with backend.registry() as registry:
        first = start(spawn, backend, "Talker")
        handle = loaded(registry, "Talker")
        got: list[bytes] = []
        lock = threading.Lock()

        def on_tick(data: bytes) -> None:
            with lock:
                got.append(data)

        handle.register_callback(on_tick, "tick")
        wait_for(lambda: handle.execute("Callbacks") == b"tick")
        handle.execute("NotifyMany", b"tick\n300")
        wait_for(lambda: len(got) == 300, timeout=10)
        assert got == [str(i).encode() for i in range(300)]
        first.terminate()
        wait_for(lambda: handle.state is goplug.PluginState.STOPPED, timeout=5)
        start(spawn, backend, "Talker")
        wait_for(lambda: handle.state is goplug.PluginState.LOADED, timeout=15)
        # The subscription survived: the new process sees it and delivers to the same callback.
        wait_for(lambda: handle.execute("Callbacks") == b"tick", timeout=10)
        handle.execute("NotifyMany", b"tick\n50")
        wait_for(lambda: len(got) == 350, timeout=10)
        assert got[300:] == [str(i).encode() for i in range(50)]


def test_broken_announcement_is_refused_alone(backend: Backend, spawn: Spawner) -> None:
    with backend.registry() as registry:
        backend.announce_garbage("Broken", b'{"Name": "Broken", "Url": ')
        start(spawn, backend, "Fine")
        handle = loaded(registry, "Fine")
        wait_for(lambda: any("Broken" in key for key in registry.broken()), timeout=5)
        (error,) = (e for k, e in registry.broken().items() if "Broken" in k)
        assert isinstance(error, goplug.ConfigError) and "JSON" in str(error)
        assert handle.execute("Echo", b"unaffected") == b"unaffected"


def test_lazy_plugin_waits_for_load_plugin(backend: Backend, spawn: Spawner) -> None:
    with backend.registry() as registry:
        start(spawn, backend, "Sloth", "--lazy")
        wait_for(lambda: registry.is_discovered("Sloth"), timeout=15)
        assert not registry.is_loaded("Sloth")
        handle = registry.load_plugin("Sloth")
        assert handle.execute("Echo", b"awake") == b"awake"


def test_without_auto_discovery_load_plugin_looks(backend: Backend, spawn: Spawner) -> None:
    start(spawn, backend, "OnDemand")
    with backend.registry() as watcher:
        loaded(watcher, "OnDemand")  # it is up and announced
    with backend.registry(auto_discover=False) as registry:
        handle = registry.load_plugin("OnDemand")
        assert handle.execute("Upper", b"found") == b"FOUND"
        with pytest.raises(goplug.PluginNotDiscovered):
            registry.load_plugin("Nobody")


def reloaded(registry: goplug.PluginRegistry, name: str) -> bool:
    if registry.is_loaded(name):
        return True
    try:
        registry.load_plugin(name)
    except (goplug.PluginAlreadyLoaded, goplug.PluginNotDiscovered, goplug.PluginConnectionError):
        return registry.is_loaded(name)
    return True


def test_cli_lists_and_calls_plugins_in_etcd(backend: Backend, spawn: Spawner, certs: Path) -> None:
    from test_cli import goplug as run_goplug

    start(spawn, backend, "Listed")
    with backend.registry() as registry:
        loaded(registry, "Listed")
    tls = ["--tls", str(certs)] if backend.kind == "etcd" else []
    listed = run_goplug("ls", backend.location, "--json", *tls)
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert entry["name"] == "Listed" and entry["state"] == "live", entry
    assert "Upper" in entry["methods"]
    called = run_goplug("call", backend.location, "Listed", "Upper", "cli", *tls)
    assert called.returncode == 0 and called.stdout == b"CLI", called.stderr


def test_aio_registry(backend: Backend, spawn: Spawner) -> None:
    import asyncio

    import goplug.aio

    start(spawn, backend, "Async")

    async def main() -> None:
        registry = goplug.aio.PluginRegistry(backend.location, **backend.registry_kwargs)
        async with registry:
            deadline = time.monotonic() + 15
            while not registry.is_loaded("Async") and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            handle = registry.get_plugin("Async")
            assert handle is not None
            answers = await asyncio.gather(*(handle.execute("Echo", b"%d" % i) for i in range(32)))
            assert answers == [b"%d" % i for i in range(32)]

    asyncio.run(main())


def test_cli_watch_shows_plugins_coming_and_going(
    backend: Backend, spawn: Spawner, certs: Path
) -> None:
    import subprocess
    import sys

    from netns import wait_for_line
    from test_cli import _env

    tls = ["--tls", str(certs)] if backend.kind == "etcd" else []
    watch = subprocess.Popen(
        [sys.executable, "-m", "goplug", "watch", backend.location, *tls],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=_env(),
    )
    try:
        plugin = start(spawn, backend, "Watched")
        wait_for_line(watch, lambda line: "loaded" in line and "Watched" in line, timeout=20)
        plugin.terminate()
        wait_for_line(watch, lambda line: "lost" in line and "Watched" in line, timeout=20)
    finally:
        watch.terminate()
        watch.wait(10)
