"""Helpers shared by the benchmark rows: child processes, temp dirs, timing loops, percentiles.

Every row runs in a worker process of its own (see run.py). A row starts its servers or plugins
through :class:`Procs`, which stops each of them by pid when the row ends, and keeps its sockets
in a :func:`temp_dir`, which is removed when the row ends, on success or failure alike.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import IO, Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PLUGIN_SCRIPT = os.path.join(HERE, "plugins", "bench_plugin.py")

PAYLOADS = {"64B": 64, "4KiB": 4096, "1MiB": 1 << 20, "16MiB": 16 << 20}
BULK_PAYLOADS = ("1MiB", "16MiB")
CHUNK = 64 * 1024  # largest recv size on hot paths (a larger recv() buffer costs an mmap per call)


class Skip(Exception):
    """The row cannot run here; the message says why (printed in the table)."""


@dataclass(frozen=True)
class RowContext:
    """What a row function needs to know about the run it is part of."""

    name: str
    subject: str = ""
    payload: str = ""
    callers: int = 1
    quick: bool = False
    pinned: bool = False
    core: int = 0
    aio_loop: str = "asyncio"
    certs: str = ""  # the run's certificate dir (see write_certs); "" = the row makes its own

    @property
    def size(self) -> int:
        return PAYLOADS[self.payload]


@dataclass(frozen=True)
class Budget:
    """Bounds of one request loop: wall time and calls per caller, and unmeasured warm-up calls."""

    seconds: float
    max_calls: int
    warmup: int
    warmup_seconds: float = 0.25


def budget_for(payload: str, quick: bool) -> Budget:
    """Loop bounds for a payload: every request loop is bounded in count and in time."""
    if quick:
        table = {
            "64B": Budget(0.15, 100_000, 50, 0.05),
            "4KiB": Budget(0.15, 100_000, 50, 0.05),
            "1MiB": Budget(0.15, 5_000, 1, 0.05),
            "16MiB": Budget(0.2, 500, 1, 0.05),
        }
    else:
        table = {
            "64B": Budget(1.0, 500_000, 500),
            "4KiB": Budget(1.0, 500_000, 300),
            "1MiB": Budget(1.0, 20_000, 5),
            "16MiB": Budget(1.5, 2_000, 2),
        }
    return table[payload]


def make_payload(size: int) -> bytes:
    """Incompressible, reproducible bytes of the given size."""
    return random.Random(size).randbytes(size)


# --------------------------------------------------------------------------- processes, files


def short_tmp() -> str:
    """A temp root short enough for Unix socket paths (107 bytes on Linux)."""
    root = tempfile.gettempdir()
    return root if len(root) <= 40 else "/tmp"


@contextmanager
def temp_dir(prefix: str = "gpb-") -> Iterator[str]:
    """A private temp dir, removed with everything in it when the block ends."""
    path = tempfile.mkdtemp(prefix=prefix, dir=short_tmp())
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Procs:
    """The child processes of one row. Each is stopped by its pid when the block ends."""

    def __init__(self) -> None:
        self._procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def spawn(
        self,
        args: Sequence[str],
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdout_pipe: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start a child; its stderr goes to a temp file that :meth:`stderr_tail` reads."""
        err = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        try:
            proc = subprocess.Popen(
                list(args),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else subprocess.DEVNULL,
                stderr=err,
            )
        except BaseException:
            err.close()
            raise
        self._procs.append((proc, err))
        return proc

    def stderr_tail(self, proc: subprocess.Popen[bytes], limit: int = 400) -> str:
        for p, err in self._procs:
            if p is proc:
                err.flush()
                err.seek(0)
                text = err.read().decode(errors="replace").strip()
                return text[-limit:]
        return ""

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
        """SIGTERM the child by pid, wait, then SIGKILL it if it is still there."""
        for i, (p, err) in enumerate(self._procs):
            if p is proc:
                del self._procs[i]
                _stop_proc(p, grace)
                if p.stdout is not None:
                    p.stdout.close()
                err.close()
                return

    def stop_all(self) -> None:
        while self._procs:
            self.stop(self._procs[-1][0])

    def pids(self) -> list[int]:
        return [p.pid for p, _ in self._procs]


def _stop_proc(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def pyc_env(cache_dir: str) -> dict[str, str]:
    """Environment for cold-start spawns: bytecode is cached in ``cache_dir``.

    Without it, a PYTHONDONTWRITEBYTECODE environment (this sandbox sets it) makes every spawn
    compile goplug's source again, which no installed plugin would pay. Both cold-start rows
    use it, and make one unmeasured spawn first to fill the cache.
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = cache_dir
    return env


def wait_ready_line(procs: Procs, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> str:
    """Wait for the child to print its "ready" line on stdout (it does so once it listens).

    Returns the line; a TCP server says which port it bound: ``ready PORT``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Skip(f"server not ready after {timeout:.0f} s: {procs.stderr_tail(proc)}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 256)
            if not chunk:
                raise Skip(f"server exited before ready: {procs.stderr_tail(proc)}")
            buf += chunk
    if not buf.startswith(b"ready"):
        raise Skip(f"unexpected server output {buf[:80]!r}")
    return buf.split(b"\n", 1)[0].decode(errors="replace")


# --------------------------------------------------------------------------- certificates

CERT_FILES = ("ca.pem", "plugin.pem", "plugin.key", "registry.pem", "registry.key")


def write_certs(directory: str) -> None:
    """A CA and two leaf certificates for 127.0.0.1 and localhost, made with trustme: the
    server side (``plugin.pem``/``plugin.key``) and the client side (``registry.pem``/
    ``registry.key``); each leaf serves for client and server auth. ECDSA P-256, trustme's
    default. Every TLS row of a run uses the same files (run.py makes them once)."""
    try:
        import trustme
    except ImportError as exc:
        raise Skip(f"trustme not importable: {exc}") from exc
    ca = trustme.CA()
    files = {"ca.pem": ca.cert_pem.bytes()}
    for side in ("plugin", "registry"):
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        files[f"{side}.pem"] = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        files[f"{side}.key"] = leaf.private_key_pem.bytes()
    for name, data in files.items():
        fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def has_certs(directory: str) -> bool:
    return bool(directory) and all(os.path.exists(os.path.join(directory, n)) for n in CERT_FILES)


def wait_until(
    cond: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    interval: float = 0.002,
    alive: Callable[[], str | None] | None = None,
) -> Any:
    """Poll ``cond`` until it returns something truthy; raise :class:`Skip` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if alive is not None:
            dead = alive()
            if dead:
                raise Skip(f"{what}: {dead}")
        if time.monotonic() > deadline:
            raise Skip(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def exited(procs: Procs, proc: subprocess.Popen[bytes]) -> Callable[[], str | None]:
    """For :func:`wait_until`: a reason when the child has died, else None."""

    def check() -> str | None:
        if proc.poll() is None:
            return None
        return f"process exited with {proc.returncode}: {procs.stderr_tail(proc)}"

    return check


def affinity_note(pids: Sequence[int], core: int) -> str | None:
    """Say so if a child is not pinned to ``core`` as the worker is (children inherit it)."""
    for pid in pids:
        try:
            cpus = os.sched_getaffinity(pid)
        except OSError:
            continue
        if cpus != {core}:
            return f"pid {pid} runs on cpus {sorted(cpus)}, not only {core}"
    return None


# --------------------------------------------------------------------------- measuring


@dataclass
class Measurement:
    """Raw result of one request loop: per-call latencies and the loop's wall time."""

    latencies_ns: list[int]
    elapsed_ns: int
    notes: list[str] = field(default_factory=list)

    def summary(self, payload_size: int | None) -> dict[str, Any]:
        """p50/p99 in µs, calls/s and payload MB/s (10^6 bytes of payload, one way, per s)."""
        lat = sorted(self.latencies_ns)
        n = len(lat)
        if n == 0:
            raise RuntimeError("no call completed")
        calls_per_s = n / (self.elapsed_ns / 1e9) if self.elapsed_ns > 0 else None
        mb = None
        if payload_size is not None and calls_per_s is not None:
            mb = calls_per_s * payload_size / 1e6
        return {
            "p50_us": percentile(lat, 0.50) / 1e3,
            "p99_us": percentile(lat, 0.99) / 1e3,
            "calls_per_s": calls_per_s,
            "mb_per_s": mb,
            "samples": n,
            "notes": list(self.notes),
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        raise ValueError("no values")
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[idx]


def latency_summary(samples_ns: Sequence[int]) -> dict[str, Any]:
    """p50/p99 in µs of one-off samples (cold start, discovery), other fields null."""
    lat = sorted(samples_ns)
    return {
        "p50_us": percentile(lat, 0.50) / 1e3,
        "p99_us": percentile(lat, 0.99) / 1e3,
        "calls_per_s": None,
        "mb_per_s": None,
        "samples": len(lat),
    }


def _warm_up(fn: Callable[[], object], budget: Budget) -> None:
    deadline = time.monotonic() + budget.warmup_seconds
    for _ in range(budget.warmup):
        fn()
        if time.monotonic() > deadline:
            break


def _timed_loop(fn: Callable[[], object], budget: Budget) -> tuple[list[int], int, int]:
    clock = time.perf_counter_ns
    lat: list[int] = []
    append = lat.append
    start = clock()
    deadline = start + int(budget.seconds * 1e9)
    end = start
    for _ in range(budget.max_calls):
        t0 = clock()
        fn()
        end = clock()
        append(end - t0)
        if end >= deadline:
            break
    return lat, start, end


def measure_threads(calls: Sequence[Callable[[], object]], budget: Budget) -> Measurement:
    """Run each caller function in a loop, one thread per caller (the main thread for one).

    Warm-up calls are made first and not counted; then all callers start together. calls/s is
    the number of calls over the time from that start to the last call's end.
    """
    if len(calls) == 1:
        fn = calls[0]
        _warm_up(fn, budget)
        lat, start, end = _timed_loop(fn, budget)
        return Measurement(lat, end - start)

    barrier = threading.Barrier(len(calls) + 1)
    results: list[tuple[list[int], int] | None] = [None] * len(calls)
    errors: list[BaseException] = []

    def caller(i: int) -> None:
        try:
            _warm_up(calls[i], budget)
            barrier.wait()
            lat, _, end = _timed_loop(calls[i], budget)
            results[i] = (lat, end)
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    with suppress(threading.BrokenBarrierError):
        barrier.wait()
    start = time.perf_counter_ns()
    for t in threads:
        t.join(timeout=budget.seconds + 120)
    if errors:
        raise errors[0]
    done = [r for r in results if r is not None]
    if len(done) != len(calls):
        raise RuntimeError("a caller thread did not finish")
    latencies = [x for lat, _ in done for x in lat]
    return Measurement(latencies, max(end for _, end in done) - start)


async def measure_tasks(
    calls: Sequence[Callable[[], Awaitable[object]]], budget: Budget
) -> Measurement:
    """The asyncio twin of :func:`measure_threads`: one task per caller on the running loop."""
    clock = time.perf_counter_ns
    go = asyncio.Event()
    warm: list[asyncio.Future[None]] = []

    async def caller(fn: Callable[[], Awaitable[object]], ready: asyncio.Future[None]) -> Any:
        warm_until = time.monotonic() + budget.warmup_seconds
        for _ in range(budget.warmup):
            await fn()
            if time.monotonic() > warm_until:
                break
        ready.set_result(None)
        await go.wait()
        lat: list[int] = []
        append = lat.append
        deadline = clock() + int(budget.seconds * 1e9)
        end = clock()
        for _ in range(budget.max_calls):
            t0 = clock()
            await fn()
            end = clock()
            append(end - t0)
            if end >= deadline:
                break
        return lat, end

    loop = asyncio.get_running_loop()
    tasks = []
    for fn in calls:
        ready: asyncio.Future[None] = loop.create_future()
        warm.append(ready)
        tasks.append(asyncio.ensure_future(caller(fn, ready)))
    try:
        await asyncio.gather(*warm)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise
    start = clock()
    go.set()
    done = await asyncio.gather(*tasks)
    latencies = [x for lat, _ in done for x in lat]
    return Measurement(latencies, max(end for _, end in done) - start)


def run_async(main: Awaitable[Any], loop_name: str) -> Any:
    """Run a coroutine on asyncio's default loop or on uvloop."""
    if loop_name == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)  # type: ignore[arg-type]
    return asyncio.run(main)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- process metrics


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size from /proc (KiB)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
