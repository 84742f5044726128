"""goplug rows: the same round trips as the reference rows, plus callbacks, discovery, cold start,
scale and launched plugins (``registry.launch``: start-up, calls during a log flood). Plugins are
``plugins/bench_plugin.py`` started with ``sys.executable`` (or the Node.js example plugin for
``goplug-node``); the application side is this worker process.

Every function takes a :class:`common.RowContext` and returns the row's figures. A missing
package or tool raises :class:`common.Skip`; any other exception fails the row. Either way the
registry is closed, the plugins are stopped by pid and the temp dirs are removed.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import functools
import gc
import inspect
import json
import logging
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from common import (
    PLUGIN_SCRIPT,
    REPO,
    Budget,
    Measurement,
    Procs,
    RowContext,
    Skip,
    affinity_note,
    budget_for,
    cpu_seconds,
    exited,
    latency_summary,
    make_payload,
    measure_tasks,
    measure_threads,
    open_fds,
    pyc_env,
    rss_kib,
    temp_dir,
    wait_until,
)

NODE_SCRIPT = os.path.join(REPO, "examples", "node", "plugin.js")
CALLBACK = "bench"  # the callback name bench_plugin.py notifies
clock = time.perf_counter_ns


def _goplug() -> Any:
    try:
        import goplug
    except Exception as exc:
        raise Skip(f"goplug not importable ({type(exc).__name__}: {exc})") from exc
    return goplug


def _errors() -> Any:
    from goplug import errors

    return errors


# =========================================================================== plugins, handles


def _start_plugin(procs: Procs, directory: str, name: str, count: int = 0, **kw: Any) -> Any:
    """Start bench_plugin.py; with count, one process hosting ``count`` plugins."""
    args = [sys.executable, PLUGIN_SCRIPT, directory, name]
    if count:
        args.append(str(count))
    return procs.spawn(args, **kw)


def _wait_pconf(procs: Procs, proc: Any, path: str) -> None:
    wait_until(
        lambda: os.path.exists(path), 20.0, os.path.basename(path), alive=exited(procs, proc)
    )


def _pconf_files(directory: str) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(".pconf")]


def wait_handle(reg: Any, name: str, namespace: str = "", timeout: float = 20.0) -> Any:
    """The handle of a plugin once the registry has loaded it (loading it if it will not)."""
    errors = _errors()
    start = time.monotonic()
    while True:
        if reg.is_loaded(name, namespace):
            handle = reg.get_plugin(name, namespace)
            if handle is not None:
                return handle
        elif time.monotonic() - start > 3.0 and reg.is_discovered(name, namespace):
            try:
                return reg.load_plugin(name, namespace)
            except errors.PluginAlreadyLoaded:
                pass
        if time.monotonic() - start > timeout:
            raise Skip(f"plugin {name!r} not loaded after {timeout:.0f} s")
        time.sleep(0.002)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def wait_handle_async(reg: Any, name: str, namespace: str = "", timeout: float = 20.0) -> Any:
    """:func:`wait_handle` for ``goplug.aio``'s registry (whose lookups may be sync or async)."""
    errors = _errors()
    start = time.monotonic()
    while True:
        if await _maybe_await(reg.is_loaded(name, namespace)):
            handle = await _maybe_await(reg.get_plugin(name, namespace))
            if handle is not None:
                return handle
        elif time.monotonic() - start > 3.0 and await _maybe_await(
            reg.is_discovered(name, namespace)
        ):
            try:
                return await reg.load_plugin(name, namespace)
            except errors.PluginAlreadyLoaded:
                pass
        if time.monotonic() - start > timeout:
            raise Skip(f"plugin {name!r} not loaded by goplug.aio after {timeout:.0f} s")
        await asyncio.sleep(0.002)


class Tracker:
    """Registry listener: when each (kind, namespace, name) event first arrived."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.times: dict[tuple[str, str, str], int] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, event: Any) -> None:
        now = clock()
        kind = str(getattr(event.kind, "value", event.kind))
        key = (kind, event.namespace or "", event.name)
        with self.cond:
            if key not in self.times:
                self.times[key] = now
                self.counts[kind] = self.counts.get(kind, 0) + 1
                self.cond.notify_all()

    def when(self, kind: str, name: str, namespace: str = "") -> int | None:
        with self.cond:
            return self.times.get((kind, namespace, name))

    def wait(
        self,
        kind: str,
        name: str,
        timeout: float,
        poll: Callable[[], bool] | None = None,
        namespace: str = "",
    ) -> int | None:
        """Time of the event, waiting up to ``timeout`` s. ``poll`` is a fallback checked every
        20 ms in case the event never comes (its time is then when the poll saw it)."""
        deadline = time.monotonic() + timeout
        key = (kind, namespace, name)
        with self.cond:
            while key not in self.times:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.02))
                if key not in self.times and poll is not None and poll():
                    return clock()
            return self.times[key]

    def wait_count(self, kind: str, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.counts.get(kind, 0) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def last(self, kind: str) -> int | None:
        with self.cond:
            times = [t for (k, _, _), t in self.times.items() if k == kind]
        return max(times) if times else None


def _finish(ctx: RowContext, procs: Procs, summary: dict[str, Any]) -> dict[str, Any]:
    if ctx.pinned:
        note = affinity_note(procs.pids(), ctx.core)
        if note:
            summary.setdefault("notes", []).append(note)
    return summary


def _check_echo(out: bytes, payload: bytes) -> None:
    if out != payload:
        raise RuntimeError(
            f"Echo returned {len(out)} bytes that differ from the {len(payload)} sent"
        )


# =========================================================================== round trips


def rtt_sync(ctx: RowContext) -> dict[str, Any]:
    """goplug-sync-*: ``handle.execute("Echo", payload)``; 8 callers are threads on one handle."""
    goplug = _goplug()
    payload = make_payload(ctx.size)
    with temp_dir() as d, Procs() as procs:
        proc = _start_plugin(procs, d, "echo")
        _wait_pconf(procs, proc, os.path.join(d, "echo.pconf"))
        with goplug.PluginRegistry(d) as reg:
            return _sync_rtt(ctx, procs, reg, "echo", "", payload)


def rtt_node(ctx: RowContext) -> dict[str, Any]:
    """goplug-node-*: the same calls against ``node examples/node/plugin.js DIR``."""
    node = shutil.which("node")
    if node is None:
        raise Skip("node is not on PATH")
    if not os.path.exists(NODE_SCRIPT):
        raise Skip("examples/node/plugin.js does not exist")
    goplug = _goplug()
    payload = make_payload(ctx.size)
    with temp_dir() as d, Procs() as procs:
        proc = procs.spawn([node, NODE_SCRIPT, d], cwd=REPO)
        found = wait_until(
            lambda: _pconf_files(d), 20.0, "the node plugin's .pconf", alive=exited(procs, proc)
        )
        name, namespace = _identity(os.path.join(d, found[0]))
        with goplug.PluginRegistry(d) as reg:
            # V8 compiles the hot path only after some calls: warm up for at least 0.5 s.
            budget = budget_for(ctx.payload, ctx.quick)
            budget = dataclasses.replace(
                budget,
                warmup=max(budget.warmup, 10_000),
                warmup_seconds=max(budget.warmup_seconds, 0.5),
            )
            summary = _sync_rtt(ctx, procs, reg, name, namespace, payload, budget)
    summary["notes"].append(f"node plugin {namespace + '/' if namespace else ''}{name}")
    return summary


def _sync_rtt(
    ctx: RowContext,
    procs: Procs,
    reg: Any,
    name: str,
    namespace: str,
    payload: bytes,
    budget: Budget | None = None,
) -> dict[str, Any]:
    handle = wait_handle(reg, name, namespace)
    _check_echo(handle.execute("Echo", payload), payload)
    call = functools.partial(handle.execute, "Echo", payload)
    m = measure_threads([call] * ctx.callers, budget or budget_for(ctx.payload, ctx.quick))
    return _finish(ctx, procs, m.summary(ctx.size))


def rtt_aio(ctx: RowContext) -> dict[str, Any]:
    """goplug-aio-*: ``await handle.execute(...)``; 8 callers are tasks on one event loop."""
    _goplug()
    try:
        from goplug import aio
    except Exception as exc:
        raise Skip(f"goplug.aio not importable ({type(exc).__name__}: {exc})") from exc
    payload = make_payload(ctx.size)
    budget = budget_for(ctx.payload, ctx.quick)

    async def measure(d: str) -> Any:
        async with aio.PluginRegistry(d) as reg:
            handle = await wait_handle_async(reg, "echo")
            _check_echo(await handle.execute("Echo", payload), payload)
            call = functools.partial(handle.execute, "Echo", payload)
            return await measure_tasks([call] * ctx.callers, budget)

    with temp_dir() as d, Procs() as procs:
        proc = _start_plugin(procs, d, "echo")
        _wait_pconf(procs, proc, os.path.join(d, "echo.pconf"))
        from common import run_async

        m = run_async(measure(d), ctx.aio_loop)
        summary = _finish(ctx, procs, m.summary(ctx.size))
    summary["notes"].append(f"event loop: {ctx.aio_loop}")
    return summary


def _identity(path: str) -> tuple[str, str]:
    """(Name, NameSpace) of a .pconf, read the tolerant way PROTOCOL.md describes."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read().strip()
    try:
        obj, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        import re

        obj, _ = json.JSONDecoder().raw_decode(re.sub(r",\s*}", "}", text))
    keys = {str(k).lower(): v for k, v in obj.items()}
    return str(keys["name"]), str(keys.get("namespace") or "")


# =========================================================================== callbacks


class _Callbacks:
    """The application's callback: latency of single notifications, or counting a burst."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.latency = 0
        self.burst_target = 0
        self.count = 0
        self.last = 0

    def __call__(self, data: bytes) -> None:
        now = clock()
        if self.burst_target:
            self.count += 1
            if self.count >= self.burst_target:
                self.last = now
                self.event.set()
        else:
            self.latency = now - int.from_bytes(data[:8], "little")
            self.event.set()


def callback(ctx: RowContext) -> dict[str, Any]:
    """notify in the plugin -> callback in the application.

    p50/p99: one notification at a time (the plugin stamps perf_counter_ns, CLOCK_MONOTONIC, the
    callback subtracts it from its own clock). calls_per_s: notifications/s of a burst of N, from
    the execute that starts it to the N-th callback.
    """
    goplug = _goplug()
    lat_count, lat_seconds = (300, 0.5) if ctx.quick else (3000, 3.0)
    burst = 20_000 if ctx.quick else 100_000
    with temp_dir() as d, Procs() as procs:
        proc = _start_plugin(procs, d, "cb")
        _wait_pconf(procs, proc, os.path.join(d, "cb.pconf"))
        with goplug.PluginRegistry(d) as reg:
            handle = wait_handle(reg, "cb")
            cb = _Callbacks()
            handle.register_callback(cb, name=CALLBACK)
            wait_until(
                lambda: handle.execute("Subscribed", CALLBACK.encode()) == b"1",
                10.0,
                "the callback subscription to reach the plugin",
                interval=0.005,
            )
            latencies: list[int] = []
            deadline = time.monotonic() + lat_seconds
            for _ in range(lat_count):
                cb.event.clear()
                handle.execute("NotifyOne")
                if not cb.event.wait(5.0):
                    raise RuntimeError("a notification did not arrive within 5 s")
                latencies.append(cb.latency)
                if time.monotonic() > deadline:
                    break
            cb.event.clear()
            cb.burst_target = burst
            t0 = clock()
            handle.execute("Burst", str(burst).encode())
            complete = cb.event.wait(10.0 if ctx.quick else 30.0)
            end = cb.last if complete else clock()
            received = cb.count
    summary = latency_summary(latencies)
    summary["calls_per_s"] = received / ((end - t0) / 1e9)
    summary["notifications"] = received
    summary["notes"] = [f"burst of {burst} notifications of 64 B"]
    if not complete:
        summary["notes"].append(f"only {received} of {burst} notifications arrived in time")
    return _finish(ctx, procs, summary)


# =========================================================================== discovery


def _stage_copies(stage: str, directory: str, names: Sequence[str]) -> list[tuple[str, str]]:
    """Copy each plugin's .pconf from ``stage`` to a hidden temp file in ``directory``.

    Renaming a copy to ``<name>.pconf`` then announces the plugin there, exactly as a plugin
    announces itself (write a temp file, rename it into place). The copies' ``Sock`` still
    points at the plugin's socket in ``stage``.
    """
    pairs = []
    for name in names:
        with open(os.path.join(stage, f"{name}.pconf"), "rb") as f:
            data = f.read()
        tmp = os.path.join(directory, f".{name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        pairs.append((tmp, os.path.join(directory, f"{name}.pconf")))
    return pairs


def _start_hosts(procs: Procs, stage: str, prefixes: Sequence[str], per_host: int) -> list[str]:
    """Start one process per prefix hosting ``per_host`` plugins; wait for all their .pconf."""
    hosts = [_start_plugin(procs, stage, prefix, per_host) for prefix in prefixes]
    total = per_host * len(prefixes)

    def dead() -> str | None:
        for h in hosts:
            reason = exited(procs, h)()
            if reason:
                return reason
        return None

    wait_until(
        lambda: len(_pconf_files(stage)) >= total,
        60.0,
        f"{total} plugins to announce themselves",
        interval=0.01,
        alive=dead,
    )
    return [f"{prefix}{i}" for prefix in prefixes for i in range(per_host)]


def discovery(ctx: RowContext) -> dict[str, Any]:
    """A .pconf renamed into a watched directory -> "discovered" and "loaded" events.

    One process hosts K plugins in a staging dir; their .pconf files are renamed one at a time
    (a random 1-10 ms apart, after the previous one loaded) into the registry's directory.
    p50/p99 are renamed -> loaded; discovered_p50_us/discovered_p99_us renamed -> discovered.
    """
    goplug = _goplug()
    count, seconds = (30, 6.0) if ctx.quick else (100, 30.0)
    per_sample_timeout = 3.0
    loaded: list[int] = []
    discovered: list[int] = []
    missed = 0
    with temp_dir("gpb-s-") as stage, temp_dir("gpb-d-") as d, Procs() as procs:
        names = _start_hosts(procs, stage, ["d"], count)
        copies = _stage_copies(stage, d, names)
        with goplug.PluginRegistry(d) as reg:
            tracker = Tracker()
            reg.add_listener(tracker)
            time.sleep(0.2)
            deadline = time.monotonic() + seconds
            for name, (tmp, final) in zip(names, copies, strict=True):
                time.sleep(random.uniform(0.001, 0.010))
                t0 = clock()
                os.rename(tmp, final)
                t_loaded = tracker.wait(
                    "loaded", name, per_sample_timeout, poll=functools.partial(reg.is_loaded, name)
                )
                if t_loaded is None:
                    missed += 1
                    t_loaded = t0 + int(per_sample_timeout * 1e9)
                loaded.append(t_loaded - t0)
                t_disc = tracker.when("discovered", name)
                if t_disc is not None:
                    discovered.append(t_disc - t0)
                if time.monotonic() > deadline:
                    break
        summary = latency_summary(loaded)
        if discovered:
            disc = latency_summary(discovered)
            summary["discovered_p50_us"] = disc["p50_us"]
            summary["discovered_p99_us"] = disc["p99_us"]
        summary["notes"] = [f"{len(loaded)} renames"]
        if missed:
            summary["notes"].append(
                f"{missed} not loaded within {per_sample_timeout:.0f} s (counted as that long)"
            )
        if len(discovered) < len(loaded):
            summary["notes"].append(f"{len(loaded) - len(discovered)} without a discovered event")
        return _finish(ctx, procs, summary)


# =========================================================================== cold start


def cold_start(ctx: RowContext) -> dict[str, Any]:
    """Spawn bench_plugin.py with sys.executable -> first successful execute through a registry
    that is already watching the directory. One unmeasured spawn first warms the page cache and
    the bytecode cache (kept in a temp PYTHONPYCACHEPREFIX), as python-floor-cold-start does."""
    goplug = _goplug()
    samples = 3 if ctx.quick else 15
    payload = make_payload(64)
    spawn_to_answer: list[int] = []
    spawn_to_loaded: list[int] = []
    with temp_dir() as d, temp_dir("gpb-pyc-") as cache, Procs() as procs:
        env = pyc_env(cache)
        with goplug.PluginRegistry(d) as reg:
            tracker = Tracker()
            reg.add_listener(tracker)
            time.sleep(0.2)
            for i in range(samples + 1):
                name = f"cs{i}"
                t0 = clock()
                proc = _start_plugin(procs, d, name, env=env)
                t_loaded = tracker.wait(
                    "loaded", name, 20.0, poll=functools.partial(reg.is_loaded, name)
                )
                if t_loaded is None:
                    raise Skip(f"plugin not loaded 20 s after spawn: {procs.stderr_tail(proc)}")
                handle = wait_until(lambda n=name: reg.get_plugin(n), 5.0, "get_plugin")
                out = handle.execute("Echo", payload)
                t1 = clock()
                _check_echo(out, payload)
                if i:
                    spawn_to_answer.append(t1 - t0)
                    spawn_to_loaded.append(t_loaded - t0)
                procs.stop(proc)
                time.sleep(0.05)
    summary = latency_summary(spawn_to_answer)
    summary["loaded_p50_us"] = latency_summary(spawn_to_loaded)["p50_us"]
    summary["notes"] = [f"{samples} spawns after one warm-up spawn"]
    return _finish(ctx, procs, summary)


# =========================================================================== scale


def scale(ctx: RowContext) -> dict[str, Any]:
    """500 plugins served by 5 processes of 100 Plugin instances each, in one directory.

    The plugins listen in a staging dir; their .pconf files are copied beside the registry's
    directory and renamed into it: one first (RSS and fds with one plugin loaded), then the other
    499 at once. load_all_s runs from the first rename to the 500th "loaded" event.
    rss_per_plugin_kib = (RSS with 500 loaded - RSS with 1) / 499; fds_per_plugin = (open fds
    with 500 loaded - before the registry existed) / 500; idle_cpu_pct: the host process's CPU
    over the idle window after loading (10 s; 2 s with --quick), in % of one core.
    """
    goplug = _goplug()
    hosts, per_host = 5, 100
    total = hosts * per_host
    idle_s = 2.0 if ctx.quick else 10.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    notes = [
        f"{hosts} plugin processes x {per_host} plugins; idle window {idle_s:.0f} s",
        f"RLIMIT_NOFILE soft limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}",
    ]
    with temp_dir("gpb-s-") as stage, temp_dir("gpb-d-") as d, Procs() as procs:
        names = _start_hosts(procs, stage, [f"s{j}x" for j in range(hosts)], per_host)
        copies = _stage_copies(stage, d, names)
        gc.collect()
        fds0, rss0 = open_fds(), rss_kib()
        with goplug.PluginRegistry(d) as reg:
            tracker = Tracker()
            reg.add_listener(tracker)
            time.sleep(0.3)
            rss_registry = rss_kib()
            t0 = clock()
            os.rename(*copies[0])
            if (
                tracker.wait(
                    "loaded", names[0], 20.0, poll=functools.partial(reg.is_loaded, names[0])
                )
                is None
            ):
                raise Skip("the first plugin was not loaded within 20 s")
            rss1 = rss_kib()
            for tmp, final in copies[1:]:
                os.rename(tmp, final)
            everything = tracker.wait_count("loaded", total, 30.0 if ctx.quick else 60.0)
            t_all = tracker.last("loaded") if everything else clock()
            n_loaded = sum(1 for nm in names if reg.is_loaded(nm))
            if not everything:
                notes.append(f"only {n_loaded} of {total} loaded before the timeout")
            time.sleep(0.5)
            rss_all, fds_all = rss_kib(), open_fds()
            before = resource.getrusage(resource.RUSAGE_SELF)
            plugins_before = sum(cpu_seconds(pid) for pid in procs.pids())
            w0 = time.monotonic()
            time.sleep(idle_s)
            wall = time.monotonic() - w0
            after = resource.getrusage(resource.RUSAGE_SELF)
            plugins_after = sum(cpu_seconds(pid) for pid in procs.pids())
    host_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    n = max(n_loaded, 1)
    return {
        "p50_us": None,
        "p99_us": None,
        "calls_per_s": None,
        "mb_per_s": None,
        "load_all_s": ((t_all or clock()) - t0) / 1e9,
        "loaded": n_loaded,
        "rss_per_plugin_kib": (rss_all - rss1) / max(n - 1, 1),
        "fds_per_plugin": (fds_all - fds0) / n,
        "idle_cpu_pct": 100.0 * host_cpu / wall,
        "plugins_idle_cpu_pct": 100.0 * (plugins_after - plugins_before) / wall,
        "rss_host_kib": rss_all,
        "rss_registry_empty_kib": rss_registry - rss0,
        "notes": notes,
    }


# =========================================================================== launched plugins

FLOOD_LINE = 120  # bytes per log line the plugin writes, newline included
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _need_launch(goplug: Any) -> None:
    if not hasattr(goplug.PluginRegistry, "launch"):
        raise Skip("this goplug has no PluginRegistry.launch")


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time): tells a pid from a later one that reuses it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class _Launched:
    """Pids (with start times) of the processes a registry launched for a row. After the
    registry is closed, :meth:`kill_leftovers` SIGKILLs any of them (by pid) still running:
    registry.close() should have stopped them, and a row says so in its notes if it did not."""

    def __init__(self) -> None:
        self.procs: list[tuple[int, str | None]] = []

    def add(self, handle: Any) -> int:
        pid = int(handle.process.pid)
        self.procs.append((pid, _start_time(pid)))
        return pid

    def kill_leftovers(self) -> list[str]:
        notes = []
        for pid, start in self.procs:
            if start is not None and _start_time(pid) == start:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                if state in ("Z", "X"):
                    continue
                notes.append(f"pid {pid} still ran after registry.close(): killed")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return notes


def launch_cold_start(ctx: RowContext) -> dict[str, Any]:
    """``registry.launch([sys.executable, bench_plugin.py, DIR, NAME], name=NAME)`` -> the
    returned (loaded) handle: p50/p99. answer_p50_us: launch() -> first answered 64 B Echo, the
    span goplug-cold-start measures for a plugin spawned by hand. Same bytecode cache and one
    unmeasured launch first, as the cold-start rows do; each launched plugin is unloaded (which
    stops its process) before the next launch."""
    goplug = _goplug()
    _need_launch(goplug)
    samples = 3 if ctx.quick else 15
    payload = make_payload(64)
    to_handle: list[int] = []
    to_answer: list[int] = []
    notes = [f"{samples} launches after one warm-up launch"]
    launched = _Launched()
    with temp_dir() as d, temp_dir("gpb-pyc-") as cache:
        # launch() adds env to os.environ: an empty PYTHONDONTWRITEBYTECODE is "not set", so
        # this is pyc_env(cache), the environment goplug-cold-start spawns with.
        env = {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": cache}
        reg = goplug.PluginRegistry(d)
        try:
            time.sleep(0.2)
            for i in range(samples + 1):
                name = f"lc{i}"
                argv = [sys.executable, PLUGIN_SCRIPT, reg.location, name]
                t0 = clock()
                handle = reg.launch(argv, name=name, env=env, restart="never", start_timeout=20.0)
                t1 = clock()
                out = handle.execute("Echo", payload)
                t2 = clock()
                pid = launched.add(handle)
                _check_echo(out, payload)
                if i:
                    to_handle.append(t1 - t0)
                    to_answer.append(t2 - t0)
                if ctx.pinned:
                    note = affinity_note([pid], ctx.core)
                    if note and note not in notes:
                        notes.append(note)
                reg.unload_plugin(handle)
                time.sleep(0.05)
        finally:
            reg.close()
            notes += launched.kill_leftovers()
    summary = latency_summary(to_handle)
    summary["answer_p50_us"] = latency_summary(to_answer)["p50_us"]
    summary["notes"] = notes
    return summary


@contextlib.contextmanager
def _file_logging(directory: str, logger_name: str) -> Iterator[tuple[str, int]]:
    """What an application would configure: the root logger at INFO with a FileHandler writing
    LOG_FORMAT records to a file (in a temp dir of its own, not the watched plugin directory).
    Yields (file, bytes of one flood line's record in it); restores the root logger after."""
    path = os.path.join(directory, "app.log")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    record = logging.LogRecord(logger_name, logging.INFO, "", 0, "%s", (_flood_text(),), None)
    record_bytes = len(handler.format(record).encode()) + len(handler.terminator)
    try:
        yield path, record_bytes
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def _flood_text() -> str:
    """One flood line as the plugin writes it, without its newline (see bench_plugin.py)."""
    return ("INFO bench flood: " + "x" * FLOOD_LINE)[: FLOOD_LINE - 1]


def _pump_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) so far of the application threads that read plugin ``pid``'s
    stdout and stderr and log each line (goplug.process names them goplug-output-PID)."""
    ticks = 0
    found = False
    for t in threading.enumerate():
        if t.name == f"goplug-output-{pid}" and t.native_id is not None:
            try:
                with open(f"/proc/self/task/{t.native_id}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])
            found = True
    return ticks / os.sysconf("SC_CLK_TCK") if found else None


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _log_size(path: str) -> int:
    return os.stat(path).st_size


def _wait_size(path: str, size: int, deadline: float) -> bool:
    """Poll (every 2 ms) until the log file holds ``size`` bytes; False at the deadline."""
    while _log_size(path) < size:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def _calls_until(
    call: Callable[[], object], finished: Callable[[], bool], seconds: float
) -> tuple[Measurement, bool]:
    """Back-to-back timed calls until ``finished()`` (checked every 256 calls, untimed) or for
    ``seconds`` at most: (the calls, True if time ran out first)."""
    lat = array.array("q")
    append = lat.append
    deadline = time.monotonic() + seconds
    start = end = clock()
    for i in range(1, 3_000_001):
        t0 = clock()
        call()
        end = clock()
        append(end - t0)
        if not i & 255:
            if finished():
                return Measurement(list(lat), end - start), False
            if time.monotonic() > deadline:
                return Measurement(list(lat), end - start), True
    return Measurement(list(lat), end - start), not finished()


def _pooled(parts: Sequence[Measurement]) -> dict[str, Any]:
    """Summary of several request loops taken as one: all their calls, all their time."""
    return Measurement(
        [x for m in parts for x in m.latencies_ns], sum(m.elapsed_ns for m in parts)
    ).summary(64)


def launch_flood(ctx: RowContext) -> dict[str, Any]:
    """64 B Echo calls on a launched plugin while it floods its stdout with log lines.

    One launched bench_plugin.py; the application logs to a file (see _file_logging).
    - direct: the application logs the flood's line itself N times in a loop: thread CPU per
      record, what the logging costs without goplug;
    - alone: a flood (20 MB; 3 MB --quick) and no calls: how fast the application absorbs it
      (lines/s, MB/s), and its CPU per line: the pump threads' own CPU (reading, parsing,
      logging.log and the handler all run on them), and the process's CPU beyond its idle rate;
    - then R rounds (5; 2 --quick) of three request loops, the same back-to-back calls in each:
      quiet (0.25 s; 0.1 s), applog (while a thread of the application logs the same line
      itself, as fast as it can, 1/R of 20 MB worth; 2 MB --quick) and flood (from the Flood
      call until its last line is in the file, 1/R of 100 MB; 25 MB for -1core; 2 MB --quick),
      and one more quiet loop at the end. Each kind is pooled over the rounds: interleaving
      them spreads over all three whatever the scheduler and the other load do meanwhile.
    The row's p50/p99/calls/s are the flood's. Bounded: the floods stop after 60 s in all
    (8 s --quick), each loop after 3 million calls; registry.close() stops the plugin whatever
    happened.
    """
    goplug = _goplug()
    _need_launch(goplug)
    one_core = ctx.name.endswith("-1core")
    line = FLOOD_LINE
    if ctx.quick:
        rounds, flood_mb, alone_mb, applog_mb, direct_n, limit_s = 2, 2, 3, 2, 3_000, 8.0
        quiet_budget = Budget(0.1, 100_000, 0, 0.0)
    else:
        rounds, alone_mb, applog_mb, direct_n, limit_s = 5, 20, 20, 20_000, 60.0
        flood_mb = 25 if one_core else 100
        quiet_budget = Budget(0.25, 500_000, 0, 0.0)
    flood_bytes = flood_mb * 1_000_000 // line // rounds * line  # per round
    applog_lines = applog_mb * 1_000_000 // line // rounds  # per round
    alone_bytes = alone_mb * 1_000_000 // line * line
    payload = make_payload(64)
    name = "flood"
    notes = [
        f"stdout log lines of {line} B; root logger INFO -> FileHandler {LOG_FORMAT!r} "
        f"in a temp dir; {rounds} rounds of quiet, applog and flood",
    ]
    launched = _Launched()
    out: dict[str, Any] = {}
    quiet: list[Measurement] = []
    applog: list[Measurement] = []
    flood: list[Measurement] = []
    with (
        temp_dir() as d,
        temp_dir("gpb-log-") as logdir,
        _file_logging(logdir, f"goplug.plugin.{name}") as (logf, rec),
    ):
        reg = goplug.PluginRegistry(d)
        try:
            argv = [sys.executable, PLUGIN_SCRIPT, reg.location, name]
            handle = reg.launch(argv, name=name, restart="never", start_timeout=20.0)
            pid = launched.add(handle)
            _check_echo(handle.execute("Echo", payload), payload)
            call = functools.partial(handle.execute, "Echo", payload)
            warm = budget_for("64B", ctx.quick)
            warm_until = time.monotonic() + warm.warmup_seconds
            for _ in range(warm.warmup):  # as the round-trip rows warm up
                call()
                if time.monotonic() > warm_until:
                    break

            # the same records logged by the application itself, in a loop
            logger = logging.getLogger(f"goplug.plugin.{name}")
            text = _flood_text()
            t0 = time.thread_time()
            for _ in range(direct_n):
                logger.info("%s", text)
            out["direct_log_us_per_line"] = (time.thread_time() - t0) / direct_n * 1e6

            # a flood alone; the process's idle CPU rate first, with the same polling
            c0, w0 = _self_cpu(), time.monotonic()
            _wait_size(logf, 1 << 62, w0 + 0.3)
            idle_rate = (_self_cpu() - c0) / (time.monotonic() - w0)
            size0, lines = _log_size(logf), alone_bytes // line
            c0, p0, w0 = _self_cpu(), _pump_cpu(pid), time.monotonic()
            handle.execute("Flood", f"{alone_bytes} {line}".encode())
            if not _wait_size(logf, size0 + lines * rec, w0 + limit_s):
                handle.execute("FloodStop")
                raise RuntimeError(f"{alone_mb} MB of log lines not logged in {limit_s:.0f} s")
            wall = time.monotonic() - w0
            c1, p1 = _self_cpu(), _pump_cpu(pid)
            out["lines_per_s"] = lines / wall
            out["log_mb_per_s"] = alone_bytes / 1e6 / wall
            out["app_us_per_line"] = max(0.0, c1 - c0 - idle_rate * wall) / lines * 1e6
            if p0 is not None and p1 is not None:
                out["pump_us_per_line"] = (p1 - p0) / lines * 1e6
                out["pump_cpu_s_per_mb"] = (p1 - p0) / (alone_bytes / 1e6)
            else:
                notes.append("no goplug-output-PID thread found: pump CPU not measured")

            applog_wall = flood_wall = flood_pump = 0.0
            absorbed = 0.0
            flood_deadline = time.monotonic() + limit_s
            for _ in range(rounds):
                quiet.append(measure_threads([call], quiet_budget))

                # calls while a thread of the application logs the same lines itself
                done = threading.Event()

                def log_lines(done: threading.Event = done) -> None:
                    try:
                        for _ in range(applog_lines):
                            if done.is_set():
                                break
                            logger.info("%s", text)
                    finally:
                        done.set()

                logging_thread = threading.Thread(target=log_lines, daemon=True)
                w0 = time.monotonic()
                logging_thread.start()
                m, cut = _calls_until(call, done.is_set, limit_s)
                if cut:
                    notes.append(f"a loop while the application logged: cut at {limit_s:.0f} s")
                done.set()  # ends the thread if the calls ran out of time
                logging_thread.join(limit_s)
                applog_wall += time.monotonic() - w0
                applog.append(m)

                # calls during a flood
                size0, lines = _log_size(logf), flood_bytes // line
                target = size0 + lines * rec
                p0, w0 = _pump_cpu(pid), time.monotonic()
                handle.execute("Flood", f"{flood_bytes} {line}".encode())
                m, cut = _calls_until(
                    call,
                    lambda t=target: _log_size(logf) >= t,
                    max(0.0, flood_deadline - time.monotonic()),
                )
                got = (_log_size(logf) - size0) / rec
                flood_wall += time.monotonic() - w0
                p1 = _pump_cpu(pid)
                if p0 is not None and p1 is not None:
                    flood_pump += p1 - p0
                absorbed += got
                flood.append(m)
                if got < lines:
                    handle.execute("FloodStop")
                    notes.append(
                        f"calls ended before the floods did: {absorbed * line / 1e6:.1f} of "
                        f"{flood_mb} MB logged" + (f" in {limit_s:.0f} s" if cut else "")
                    )
                    break
                _wait_size(logf, target, time.monotonic() + limit_s)
            quiet.append(measure_threads([call], quiet_budget))
            out["applog_lines_per_s"] = applog_lines * len(applog) / applog_wall
            out["flood_log_mb"] = absorbed * line / 1e6
            out["flood_lines_per_s"] = absorbed / flood_wall
            out["flood_log_mb_per_s"] = absorbed * line / 1e6 / flood_wall
            out["flood_pump_cores"] = flood_pump / flood_wall  # share of a core the pump took
            if ctx.pinned:
                note = affinity_note([pid], ctx.core)
                if note:
                    notes.append(note)
        finally:
            reg.close()
            notes += launched.kill_leftovers()
    q, a = _pooled(quiet), _pooled(applog)
    summary = _pooled(flood)
    summary["mb_per_s"] = None  # payload MB/s would mislead here: the log MB/s are separate
    summary.update(
        quiet_p50_us=q["p50_us"],
        quiet_p99_us=q["p99_us"],
        quiet_calls_per_s=q["calls_per_s"],
        applog_p50_us=a["p50_us"],
        applog_p99_us=a["p99_us"],
        applog_calls_per_s=a["calls_per_s"],
        **out,
    )
    summary["notes"] = notes
    return summary
