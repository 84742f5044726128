"""Callbacks end to end: notify in a plugin process, delivery in the application."""

from __future__ import annotations

import threading
from pathlib import Path

from conftest import Spawner, wait_for

from goplug import PluginHandle, PluginRegistry


def loaded(registry: PluginRegistry, name: str) -> PluginHandle:
    wait_for(lambda: registry.is_loaded(name))
    handle = registry.get_plugin(name)
    assert handle is not None
    return handle


def subscribed(handle: PluginHandle, name: str, count: int = 1) -> None:
    """Wait until the plugin sees ``count`` subscribers of ``name`` (polls arrive later)."""

    def ready() -> bool:
        try:
            return handle.execute("Notify", name.encode() + b"\n__probe__") == str(count).encode()
        except Exception:
            return False

    wait_for(ready)


def test_every_notification_in_order_on_another_thread(plugin_dir: Path, spawn: Spawner) -> None:
    spawn(plugin_dir, "Cb")
    with PluginRegistry(plugin_dir) as registry:
        handle = loaded(registry, "Cb")
        got: list[bytes] = []
        threads: set[int] = set()
        done = threading.Event()

        def on_event(data: bytes) -> None:
            threads.add(threading.get_ident())
            if data != b"__probe__":
                got.append(data)
                if len(got) == 5000:
                    done.set()

        sub = handle.register_callback(on_event)
        assert sub.name == "on_event"
        subscribed(handle, "on_event")
        assert handle.execute("Callbacks") == b"on_event"
        handle.execute("NotifyMany", b"on_event\n5000")
        assert done.wait(20)
        assert got == [str(i).encode() for i in range(5000)]
        assert threading.get_ident() not in threads


def test_callback_exception_is_logged_and_delivery_goes_on(
    plugin_dir: Path, spawn: Spawner
) -> None:
    spawn(plugin_dir, "Raise")
    with PluginRegistry(plugin_dir) as registry:
        handle = loaded(registry, "Raise")
        got: list[bytes] = []

        def flaky(data: bytes) -> None:
            got.append(data)
            raise RuntimeError("callback failure")

        handle.register_callback(flaky, "flaky")
        subscribed(handle, "flaky")
        handle.execute("Notify", b"flaky\none")
        handle.execute("Notify", b"flaky\ntwo")
        wait_for(lambda: got[-2:] == [b"one", b"two"])


def test_two_applications_each_get_every_notification(plugin_dir: Path, spawn: Spawner) -> None:
    spawn(plugin_dir, "Fan")
    with PluginRegistry(plugin_dir) as first, PluginRegistry(plugin_dir) as second:
        got: dict[str, list[bytes]] = {"a": [], "b": []}
        handles = [loaded(first, "Fan"), loaded(second, "Fan")]
        for key, handle in zip("ab", handles, strict=True):
            handle.register_callback(
                lambda d, key=key: got[key].append(d) if d != b"__probe__" else None, "shared"
            )
        subscribed(handles[0], "shared", count=2)
        handles[0].execute("NotifyMany", b"shared\n300")
        expected = [str(i).encode() for i in range(300)]
        wait_for(lambda: got["a"] == expected and got["b"] == expected, timeout=15)


def test_unload_ends_delivery_without_leftovers(plugin_dir: Path, spawn: Spawner) -> None:
    spawn(plugin_dir, "End")
    with PluginRegistry(plugin_dir) as registry:
        handle = loaded(registry, "End")
        before = threading.active_count()
        sub = handle.register_callback(lambda d: None, "gone")
        subscribed(handle, "gone")
        registry.unload_plugin(handle)
        assert not sub.alive
        wait_for(lambda: threading.active_count() <= before)
        # The plugin no longer lists the subscription.
        handle = registry.load_plugin("End")
        assert handle.execute("Callbacks") == b""


def test_subscription_survives_plugin_restart(plugin_dir: Path, spawn: Spawner) -> None:
    proc = spawn(plugin_dir, "Again")
    with PluginRegistry(plugin_dir) as registry:
        handle = loaded(registry, "Again")
        got: list[bytes] = []
        handle.register_callback(lambda d: got.append(d), "tick")
        subscribed(handle, "tick")
        handle.execute("Notify", b"tick\nbefore")
        wait_for(lambda: b"before" in got)
        proc.kill()
        spawn(plugin_dir, "Again")
        wait_for(lambda: registry.is_loaded("Again"))
        subscribed(handle, "tick")
        handle.execute("Notify", b"tick\nafter")
        wait_for(lambda: b"after" in got)


def test_a_plugin_stopping_under_a_waiting_poll_does_not_end_the_subscription(
    plugin_dir: Path,
) -> None:
    # A stopping plugin answers the waiting poll with 503: the subscription must outlive that
    # and come back to the plugin's next run.
    import goplug

    first = goplug.Plugin(plugin_dir, "Again")
    with PluginRegistry(plugin_dir) as registry:
        first.start()
        handle = loaded(registry, "Again")
        inbox: list[bytes] = []
        sub = handle.register_callback(inbox.append, "news")
        wait_for(lambda: first.callbacks == ["news"])
        first.stop()
        wait_for(lambda: not registry.is_loaded("Again"))
        assert sub.alive
        second = goplug.Plugin(plugin_dir, "Again")
        second.start()
        try:
            wait_for(lambda: second.callbacks == ["news"])
            assert second.notify("news", b"back") == 1
            wait_for(lambda: inbox == [b"back"])
            assert sub.alive
        finally:
            second.stop()
