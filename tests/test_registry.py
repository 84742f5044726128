"""The registry against real plugin processes: discovery, loading, calls, unloading."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import Spawner, wait_for

import goplug
from goplug import PluginRegistry, PluginState


def events_of(registry: PluginRegistry) -> list[tuple[str, str, str]]:
    seen: list[tuple[str, str, str]] = []
    registry.add_listener(lambda e: seen.append((e.kind, e.name, e.namespace)))
    return seen


def test_discovers_loads_and_calls(plugin_dir: Path, spawn: Spawner) -> None:
    with PluginRegistry(plugin_dir) as registry:
        events = events_of(registry)
        spawn(plugin_dir, "Do", "Test")
        wait_for(lambda: registry.is_loaded("Do", "Test"))
        handle = registry.get_plugin("Do", "Test")
        assert handle is not None
        assert handle.state is PluginState.LOADED
        assert {"Echo", "Upper", "Fail", "AsyncEcho"} <= set(handle.methods)
        assert handle.execute("Upper", b"hello") == b"HELLO"
        assert handle.execute("Echo") == b""
        assert handle.execute("AsyncEcho", b"x") == b"async:x"
        assert handle.ping() > 0
        assert ("discovered", "Do", "Test") in events
        assert ("loaded", "Do", "Test") in events
        assert [h.name for h in registry.loaded()] == ["Do"]
        assert [h.name for h in registry.discovered()] == ["Do"]


def test_payload_sizes_round_trip(plugin_dir: Path, spawn: Spawner) -> None:
    spawn(plugin_dir, "Big")
    with PluginRegistry(plugin_dir) as registry:
        wait_for(lambda: registry.is_loaded("Big"))
        handle = registry.get_plugin("Big")
        assert handle is not None
        for size in (0, 1, 2048, 2049, 65535, 65536, 300_000, 4 * 1024 * 1024):
            data = os.urandom(size)
            assert handle.execute("Echo", data) == data
            assert handle.execute("Big", str(size).encode()) == b"x" * size


def test_typed_errors(plugin_dir: Path, spawn: Spawner) -> None:
    spawn(plugin_dir, "Err")
    with PluginRegistry(plugin_dir) as registry:
        wait_for(lambda: registry.is_loaded("Err"))
        handle = registry.get_plugin("Err")
        assert handle is not None
        with pytest.raises(goplug.RemoteError) as info:
            handle.execute("Fail", b"boom")
        assert info.value.remote_type == "ValueError"
        assert info.value.remote_message == "deliberate failure: boom"
        assert "Traceback" in info.value.remote_traceback
        with pytest.raises(goplug.MethodNotFound):
            handle.execute("NoSuchMethod")
        assert handle.execute("Echo", b"still serving") == b"still serving"


def test_lazy_plugin_waits_for_load(plugin_dir: Path, spawn: Spawner) -> None:
    with PluginRegistry(plugin_dir) as registry:
        spawn(plugin_dir, "Lazy", "", "--lazy")
        wait_for(lambda: registry.is_discovered("Lazy"))
        assert not registry.is_loaded("Lazy")
        assert registry.get_plugin("Lazy") is None
        handle = registry.load_plugin("Lazy")
        assert handle.execute("Echo", b"a") == b"a"
        with pytest.raises(goplug.PluginAlreadyLoaded):
            registry.load_plugin("Lazy")


def test_without_auto_discovery_loads_on_demand(plugin_dir: Path, spawn: Spawner) -> None:
    spawn(plugin_dir, "Manual", "Space")
    # The file name says nothing: the identity comes from the contents.
    (plugin_dir / "Manual@Space.pconf").rename(plugin_dir / "whatever.pconf")
    with PluginRegistry(plugin_dir, auto_discover=False) as registry:
        assert not registry.is_discovered("Manual", "Space")
        with pytest.raises(goplug.PluginNotDiscovered):
            registry.load_plugin("Manual")  # wrong namespace
        handle = registry.load_plugin("Manual", "Space")
        assert handle.execute("Upper", b"m") == b"M"


def test_unload_sends_stop_and_keeps_plugin_discovered(plugin_dir: Path, spawn: Spawner) -> None:
    proc = spawn(plugin_dir, "Un")
    with PluginRegistry(plugin_dir) as registry:
        events = events_of(registry)
        wait_for(lambda: registry.is_loaded("Un"))
        handle = registry.get_plugin("Un")
        assert handle is not None
        registry.unload_plugin(handle)
        assert handle.state is PluginState.DISCOVERED
        assert registry.is_discovered("Un") and not registry.is_loaded("Un")
        assert ("unloaded", "Un", "") in events
        with pytest.raises(goplug.PluginNotLoaded):
            handle.execute("Echo")
        with pytest.raises(goplug.PluginNotLoaded):
            registry.unload_plugin(handle)
        # The plugin process keeps running; it can be loaded again explicitly.
        assert proc.proc.poll() is None
        again = registry.load_plugin("Un")
        assert again is handle
        assert handle.execute("Echo", b"back") == b"back"


def test_clean_stop_is_lost_and_restart_reloads_same_handle(
    plugin_dir: Path, spawn: Spawner
) -> None:
    proc = spawn(plugin_dir, "Phoenix")
    with PluginRegistry(plugin_dir) as registry:
        events = events_of(registry)
        wait_for(lambda: registry.is_loaded("Phoenix"))
        handle = registry.get_plugin("Phoenix")
        assert handle is not None
        first_pid = handle.execute("Pid")
        assert proc.terminate() == 0
        wait_for(lambda: handle.state is PluginState.STOPPED)
        assert ("lost", "Phoenix", "") in events
        assert not registry.is_discovered("Phoenix")
        assert not (plugin_dir / "Phoenix.pconf").exists()
        assert not (plugin_dir / "Phoenix.sock").exists()
        spawn(plugin_dir, "Phoenix")
        wait_for(lambda: handle.state is PluginState.LOADED)
        assert handle.execute("Pid") != first_pid
        assert registry.get_plugin("Phoenix") is handle


def test_broken_pconf_is_skipped_and_reported(
    plugin_dir: Path, spawn: Spawner, caplog: pytest.LogCaptureFixture
) -> None:
    (plugin_dir / "Bad.pconf").write_bytes(b'{"Name": "Bad", "Sock": ')
    (plugin_dir / "Typed.pconf").write_text(json.dumps({"Name": "Typed", "Sock": 5}))
    spawn(plugin_dir, "Good")
    with PluginRegistry(plugin_dir) as registry:
        wait_for(lambda: registry.is_loaded("Good"))
        broken = registry.broken()
        assert str(plugin_dir / "Bad.pconf") in broken
        with pytest.raises(goplug.ConfigError) as info:
            registry.load_plugin("Bad")
        assert "Bad.pconf" in str(info.value) and "JSON" in str(info.value)
        with pytest.raises(goplug.ConfigError, match="'Sock' must be a str"):
            registry.load_plugin("Typed")
    assert any("Bad.pconf" in r.getMessage() for r in caplog.records)


def test_seed_readme_example_pconf_is_accepted(plugin_dir: Path, spawn: Spawner) -> None:
    proc = spawn(plugin_dir, "Seed", "Ns", "--lazy")
    conf = json.loads(proc.pconf.read_text())
    proc.pconf.unlink()
    seed_style = (
        "{\n"
        '"Name" : "Seed",\n'
        '"NameSpace" : "Ns",\n'
        '"Url" : "unix://NsSeed",\n'
        f'"sock" : "{conf["Sock"]}",\n'
        '"LazyLoad" : false,\n'
        "}"
    )
    (plugin_dir / "NsSeed.pconf").write_text(seed_style)
    with PluginRegistry(plugin_dir) as registry:
        wait_for(lambda: registry.is_loaded("Seed", "Ns"))


def test_stale_pconf_is_lost_once_and_not_retried(
    plugin_dir: Path, spawn: Spawner, caplog: pytest.LogCaptureFixture
) -> None:
    proc = spawn(plugin_dir, "Stale")
    proc.kill()  # leaves Stale.pconf and Stale.sock behind
    assert proc.pconf.exists()
    caplog.set_level("INFO", logger="goplug.registry")
    with PluginRegistry(plugin_dir) as registry:
        wait_for(lambda: any("lost plugin Stale" in r.getMessage() for r in caplog.records))
        assert not registry.is_discovered("Stale")
        with pytest.raises(goplug.PluginConnectionError):
            registry.load_plugin("Stale")
        # A restart under the same identity takes over the stale socket and is loaded.
        spawn(plugin_dir, "Stale")
        wait_for(lambda: registry.is_loaded("Stale"))
    lost_logs = [r for r in caplog.records if "lost plugin Stale" in r.getMessage()]
    assert 1 <= len(lost_logs) <= 2  # the automatic attempt, and the explicit load above


def test_concurrent_calls_from_many_threads(plugin_dir: Path, spawn: Spawner) -> None:
    spawn(plugin_dir, "Busy")
    with PluginRegistry(plugin_dir) as registry:
        wait_for(lambda: registry.is_loaded("Busy"))
        handle = registry.get_plugin("Busy")
        assert handle is not None
        errors: list[BaseException] = []

        def worker(n: int) -> None:
            try:
                for i in range(200):
                    data = f"{n}-{i}".encode()
                    assert handle.execute("Upper", data) == data.upper()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        # One pooled connection per concurrent caller, at most.
        assert handle._client is not None and handle._client.open_connections <= 8


def test_slow_method_does_not_block_others(plugin_dir: Path, spawn: Spawner) -> None:
    spawn(plugin_dir, "Slow")
    with PluginRegistry(plugin_dir) as registry:
        wait_for(lambda: registry.is_loaded("Slow"))
        handle = registry.get_plugin("Slow")
        assert handle is not None
        done = threading.Event()
        result: list[bytes] = []

        def slow() -> None:
            result.append(handle.execute("Sleep", b"1.5"))
            done.set()

        threading.Thread(target=slow).start()
        wait_for(lambda: handle._client is not None and len(handle._client._busy) == 1)
        # While Sleep holds its connection, other calls are answered.
        for _ in range(20):
            assert handle.execute("Echo", b"quick") == b"quick"
        assert not done.is_set()
        assert done.wait(10)
        assert result == [b"slept"]


def test_several_plugins_in_one_process(plugin_dir: Path, spawn: Spawner, tmp_path: Path) -> None:
    script = tmp_path / "multi.py"
    script.write_text(
        "import sys, goplug\n"
        "plugins = [goplug.Plugin(sys.argv[1], f'P{i}', 'multi') for i in range(5)]\n"
        "for i, p in enumerate(plugins):\n"
        "    p.register_method(lambda data, i=i: b'%d:' % i + data, 'Who')\n"
        "goplug.serve(*plugins)\n"
    )
    proc = spawn(plugin_dir, "P4", "multi", script=script)
    with PluginRegistry(plugin_dir) as registry:
        wait_for(lambda: len(registry.loaded()) == 5)
        for i in range(5):
            handle = registry.get_plugin(f"P{i}", "multi")
            assert handle is not None
            assert handle.execute("Who", b"x") == b"%d:x" % i
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(10) == 0
        wait_for(lambda: not registry.loaded())
    assert not list(plugin_dir.iterdir())


def test_stop_ends_discovery_but_keeps_loaded(plugin_dir: Path, spawn: Spawner) -> None:
    spawn(plugin_dir, "First")
    registry = PluginRegistry(plugin_dir)
    try:
        wait_for(lambda: registry.is_loaded("First"))
        registry.stop()
        assert registry.wait_for_stop(timeout=5)
        spawn(plugin_dir, "Second")
        handle = registry.get_plugin("First")
        assert handle is not None and handle.execute("Echo", b"1") == b"1"
        assert not registry.is_discovered("Second")
    finally:
        registry.close()


def test_close_leaves_plugins_running_and_is_idempotent(plugin_dir: Path, spawn: Spawner) -> None:
    proc = spawn(plugin_dir, "Keep")
    registry = PluginRegistry(plugin_dir)
    wait_for(lambda: registry.is_loaded("Keep"))
    handle = registry.get_plugin("Keep")
    assert handle is not None
    started = time.monotonic()
    registry.close()
    registry.close()
    assert time.monotonic() - started < 1.0
    assert proc.proc.poll() is None and proc.pconf.exists()
    with pytest.raises(goplug.PluginNotLoaded):
        handle.execute("Echo")
    with pytest.raises(goplug.RegistryClosed):
        registry.load_plugin("Keep")


def test_listener_added_late_gets_current_state(plugin_dir: Path, spawn: Spawner) -> None:
    spawn(plugin_dir, "Early")
    with PluginRegistry(plugin_dir) as registry:
        wait_for(lambda: registry.is_loaded("Early"))
        events = events_of(registry)
        assert events == [("discovered", "Early", ""), ("loaded", "Early", "")]


def test_discovery_by_polling_fallback(plugin_dir: Path, spawn: Spawner) -> None:
    settings = goplug.RegistrySettings(use_inotify=False, poll_interval=0.02)
    with PluginRegistry(plugin_dir, settings=settings) as registry:
        spawn(plugin_dir, "Polled")
        wait_for(lambda: registry.is_loaded("Polled"))
        assert registry._discovery.mode == "polling"


def test_plugin_refuses_invalid_names(plugin_dir: Path) -> None:
    for bad in ("", "a/b", "..", "a\x00b", "a\nb", "a@b"):
        with pytest.raises(goplug.ConfigError):
            goplug.Plugin(plugin_dir, bad or "", "")
    with pytest.raises(goplug.ConfigError):
        goplug.Plugin(plugin_dir, "ok", "../up")
    plugin = goplug.Plugin(plugin_dir, "ok")
    with pytest.raises(goplug.ConfigError):
        plugin.register_method(lambda d: d, "Activate")


def test_in_process_plugin_and_registry(plugin_dir: Path) -> None:
    plugin = goplug.Plugin(plugin_dir, "Local", "Here")

    @plugin.method
    def Twice(data: bytes) -> bytes:
        return data * 2

    with plugin, PluginRegistry(plugin_dir) as registry:
        assert (plugin_dir / "Local@Here.pconf").stat().st_mode & 0o777 == 0o600
        assert Path(plugin.sock_path).stat().st_mode & 0o777 == 0o600
        wait_for(lambda: registry.is_loaded("Local", "Here"))
        handle = registry.get_plugin("Local", "Here")
        assert handle is not None and handle.execute("Twice", b"ab") == b"abab"
    assert not list(plugin_dir.iterdir())


def test_plugin_is_running_when_a_registry_activates_it_during_start(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A watching registry may activate the plugin as soon as its .pconf appears, before start()
    # returns; an activator that starts work "while the plugin runs" must see it running.
    import goplug.plugin

    activated = threading.Event()
    seen: list[bool] = []
    plugin = goplug.Plugin(plugin_dir, "Early", activator=lambda data: seen.append(plugin.running))
    write = goplug.plugin.write_atomically

    def write_then_wait_for_activation(path: str, data: bytes) -> None:
        write(path, data)
        assert activated.wait(10), "the registry did not activate the plugin"

    monkeypatch.setattr(goplug.plugin, "write_atomically", write_then_wait_for_activation)
    with PluginRegistry(plugin_dir) as registry:
        registry.add_listener(lambda e: e.kind == "loaded" and activated.set())
        with plugin:
            assert seen == [True]
            assert registry.is_loaded("Early")


def test_sigterm_caught_by_a_server_thread_still_stops_the_plugin(
    plugin_dir: Path, spawn: Spawner
) -> None:
    proc = spawn(plugin_dir, "Term")
    with PluginRegistry(plugin_dir) as registry:
        wait_for(lambda: registry.is_loaded("Term"))
        handle = registry.get_plugin("Term")
        assert handle is not None
        with contextlib.suppress(goplug.GoPlugError):  # it may stop before answering
            handle.execute("TermFromThread")
        assert proc.proc.wait(10) == 0
    assert not list(plugin_dir.iterdir())
