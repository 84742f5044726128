"""goplug.aio against real plugin processes, and an asyncio plugin."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from conftest import Spawner

import goplug
from goplug import aio


async def until(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)


def test_aio_registry_calls_and_events(plugin_dir: Path, spawn: Spawner) -> None:
    async def main() -> None:
        async with aio.PluginRegistry(plugin_dir) as registry:
            loaded = asyncio.Event()
            registry.add_listener(lambda e: loaded.set() if e.kind == "loaded" else None)
            spawn(plugin_dir, "Async", "Ns")
            await asyncio.wait_for(loaded.wait(), 10)
            handle = registry.get_plugin("Async", "Ns")
            assert handle is not None
            assert "Echo" in handle.methods
            assert await handle.execute("Upper", b"abc") == b"ABC"
            assert await handle.ping() > 0
            big = os.urandom(3 * 1024 * 1024)
            assert await handle.execute("Echo", big) == big
            results = await asyncio.gather(*(handle.execute("Echo", b"%d" % i) for i in range(500)))
            assert results == [b"%d" % i for i in range(500)]
            with pytest.raises(goplug.RemoteError):
                await handle.execute("Fail", b"x")
            with pytest.raises(goplug.MethodNotFound):
                await handle.execute("Missing")
            with pytest.raises(goplug.CallTimeout):
                await handle.execute("Sleep", b"10", timeout=0.2)
            assert await handle.execute("Echo", b"after") == b"after"
            await registry.unload_plugin(handle)
            with pytest.raises(goplug.PluginNotLoaded):
                await handle.execute("Echo")

    asyncio.run(main())


def test_aio_callbacks_in_order_with_async_fn(plugin_dir: Path, spawn: Spawner) -> None:
    spawn(plugin_dir, "AsyncCb")

    async def main() -> None:
        async with aio.PluginRegistry(plugin_dir) as registry:
            await until(lambda: registry.is_loaded("AsyncCb"))
            with pytest.raises(goplug.PluginAlreadyLoaded):
                await registry.load_plugin("AsyncCb")
            handle = registry.get_plugin("AsyncCb")
            assert handle is not None
            got: list[bytes] = []

            async def on_data(data: bytes) -> None:
                await asyncio.sleep(0)
                got.append(data)

            handle.register_callback(on_data)

            async def subscribed() -> bool:
                try:
                    await handle.execute("Notify", b"on_data\n-1")
                except goplug.RemoteError:
                    return False
                return True

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while not await subscribed():
                assert loop.time() < deadline
                await asyncio.sleep(0.01)
            await handle.execute("NotifyMany", b"on_data\n1000")
            await until(lambda: len(got) >= 1001, timeout=15)
            assert got[1:] == [str(i).encode() for i in range(1000)]

    asyncio.run(main())


def test_aio_plugin_runs_async_methods_on_its_loop(plugin_dir: Path) -> None:
    async def main() -> None:
        plugin = aio.Plugin(plugin_dir, "LoopSide")
        loop = asyncio.get_running_loop()
        seen_loops: list[asyncio.AbstractEventLoop] = []

        @plugin.method
        async def Where(data: bytes) -> bytes:
            seen_loops.append(asyncio.get_running_loop())
            return b"on loop"

        @plugin.method
        def Blocking(data: bytes) -> bytes:
            import time

            time.sleep(0.2)  # runs on a connection thread, not on the loop
            return b"done"

        async with plugin, aio.PluginRegistry(plugin_dir) as registry:
            await until(lambda: registry.is_loaded("LoopSide"))
            handle = registry.get_plugin("LoopSide")
            assert handle is not None
            assert await handle.execute("Where") == b"on loop"
            assert seen_loops == [loop]
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(ticker())
            assert await handle.execute("Blocking") == b"done"
            task.cancel()
            assert ticks >= 5  # the loop kept running while the sync method slept
            got: list[bytes] = []
            handle.register_callback(got.append, "cb")
            await until(lambda: plugin.callbacks == ["cb"])
            assert await plugin.notify("cb", b"from async plugin") == 1
            await until(lambda: got == [b"from async plugin"])
        assert not list(plugin_dir.iterdir())

    asyncio.run(main())


def test_aio_registry_under_uvloop(plugin_dir: Path, spawn: Spawner) -> None:
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")
    spawn(plugin_dir, "Uv")

    async def main() -> None:
        async with aio.PluginRegistry(plugin_dir, auto_discover=False) as registry:
            handle = await registry.load_plugin("Uv")
            assert await handle.execute("Upper", b"uv") == b"UV"
            big = os.urandom(2 * 1024 * 1024)
            assert await handle.execute("Echo", big) == big
            results = await asyncio.gather(*(handle.execute("Echo", b"%d" % i) for i in range(200)))
            assert results == [b"%d" % i for i in range(200)]

    uvloop.run(main())


def test_aio_launch_supervises_like_the_sync_registry(plugin_dir: Path) -> None:
    import signal
    import sys

    from conftest import TEST_PLUGIN

    async def main() -> None:
        settings = goplug.RegistrySettings(launch=goplug.LaunchSettings(backoff_initial=0.01))
        async with aio.PluginRegistry(plugin_dir, settings=settings) as registry:
            command = [sys.executable, str(TEST_PLUGIN), str(plugin_dir), "Aio", "T"]
            handle = await registry.launch(command, name="Aio", namespace="T")
            assert await handle.execute("Upper", b"a") == b"A"
            proc = handle.process
            assert proc is not None and proc.pid is not None
            first = proc.pid
            os.kill(first, signal.SIGKILL)
            await until(lambda: proc.restarts == 1 and registry.is_loaded("Aio", "T"))
            assert int(await handle.execute("Pid")) == proc.pid != first
            with pytest.raises(goplug.PluginStartError):
                await registry.launch([sys.executable, "-c", "raise SystemExit(4)"], name="No")
        assert proc.state == "stopped" and proc.exit_code == 0

    asyncio.run(main())


def test_aio_timeouts_of_concurrent_calls_each_hold(plugin_dir: Path, spawn: Spawner) -> None:
    """One timer serves a pool's calls: each call still ends at its own deadline."""
    spawn(plugin_dir, "Timeouts")

    async def main() -> None:
        async with aio.PluginRegistry(plugin_dir) as registry:
            await until(lambda: registry.is_loaded("Timeouts"))
            handle = registry.get_plugin("Timeouts")
            assert handle is not None
            loop = asyncio.get_running_loop()
            assert await handle.execute("Echo", b"x") == b"x"  # a pending 30 s deadline
            started = loop.time()
            patient, short, shorter = await asyncio.gather(
                handle.execute("Sleep", b"0.6", timeout=10),
                handle.execute("Sleep", b"10", timeout=0.4),
                handle.execute("Sleep", b"10", timeout=0.2),
                return_exceptions=True,
            )
            assert patient == b"slept"
            assert isinstance(short, goplug.CallTimeout)
            assert isinstance(shorter, goplug.CallTimeout)
            assert loop.time() - started < 5
            # The timer fired and re-armed: a later short call still times out on time.
            started = loop.time()
            with pytest.raises(goplug.CallTimeout):
                await handle.execute("Sleep", b"10", timeout=0.3)
            assert loop.time() - started < 3
            assert await handle.execute("Echo", b"after") == b"after"

    asyncio.run(main())
