"""The goplug plugin the benchmarks start: ``bench_plugin.py DIR NAME [COUNT]``.

With COUNT (default 1) the process hosts that many Plugin instances named NAME0, NAME1, ...
(the discovery and scale rows); with none, one instance named NAME. Each instance has:

- ``Echo``: returns its input (round-trip rows, cold start);
- ``Subscribed``: b"1" once an application subscribed to the callback named by the input;
- ``NotifyOne``: one notification on callback ``bench``: 8 bytes of ``perf_counter_ns`` (the
  same CLOCK_MONOTONIC in every process) padded to 64 bytes;
- ``Burst``: input b"N": N such notifications, sent from a thread as fast as notify allows;
- ``Flood``: input b"BYTES LINE": writes BYTES bytes of log lines of LINE bytes each (newline
  included) to stdout from a thread, in blocks of about 64 KiB built once, as fast as the reader
  of the pipe takes them (the launch rows: a launched plugin's stdout is logged by the
  application); ``FloodState``: b"WRITTEN DONE" (DONE 1 once the thread ended);
  ``FloodStop``: ends the flood early.

Imports stay light (stdlib + goplug): this script is what the cold-start row starts.
"""

import os
import sys
import threading
import time
from typing import Any

from _watchdog import exit_with_parent

from goplug import Plugin

CALLBACK = "bench"
PAD = bytes(56)


def build(directory: str, name: str, namespace: str = "", **options: Any) -> Plugin:
    """One plugin with the methods above; ``options`` go to ``Plugin`` (tls_plugin.py)."""
    p = Plugin(directory, name, namespace, **options)

    @p.method
    def Echo(data: bytes) -> bytes:
        return data

    @p.method
    def Subscribed(data: bytes) -> bytes:
        return b"1" if data.decode() in p.callbacks else b"0"

    @p.method
    def NotifyOne(data: bytes) -> bytes:
        p.notify(CALLBACK, time.perf_counter_ns().to_bytes(8, "little") + PAD)
        return b""

    def burst(n: int) -> None:
        notify = p.notify
        clock = time.perf_counter_ns
        for _ in range(n):
            notify(CALLBACK, clock().to_bytes(8, "little") + PAD)

    @p.method
    def Burst(data: bytes) -> bytes:
        threading.Thread(target=burst, args=(int(data),), daemon=True).start()
        return b""

    flood = _Flood()
    p.register_method(flood.start, "Flood")
    p.register_method(flood.state, "FloodState")
    p.register_method(flood.stop, "FloodStop")
    return p


class _Flood:
    """Log lines on stdout, written from a thread until BYTES are out or FloodStop."""

    def __init__(self) -> None:
        self.written = 0
        self.done = True
        self.halt = threading.Event()

    def start(self, data: bytes) -> bytes:
        if not self.done:
            raise RuntimeError("a flood is running")
        total, line = (int(x) for x in data.split())
        self.written, self.done = 0, False
        self.halt.clear()
        threading.Thread(target=self._write, args=(total, line), daemon=True).start()
        return b""

    def _write(self, total: int, line: int) -> None:
        try:
            text = (b"INFO bench flood: " + b"x" * line)[: line - 1] + b"\n"
            block = memoryview(text * max(1, 65536 // line))
            while self.written < total and not self.halt.is_set():
                chunk = block[: min(len(block), total - self.written)]
                while chunk:  # os.write may take part of it
                    n = os.write(1, chunk)
                    chunk = chunk[n:]
                    self.written += n
        finally:
            self.done = True

    def state(self, data: bytes) -> bytes:
        return f"{self.written} {int(self.done)}".encode()

    def stop(self, data: bytes) -> bytes:
        self.halt.set()
        return b""


def main() -> None:
    directory, name = sys.argv[1], sys.argv[2]
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    exit_with_parent()
    if count == 0:
        build(directory, name).serve_forever()
        return
    plugins = [build(directory, f"{name}{i}") for i in range(count)]
    started = []
    try:
        for p in plugins[:-1]:
            p.start()
            started.append(p)
        plugins[-1].serve_forever()
    finally:
        for p in reversed(started):
            p.stop()


if __name__ == "__main__":
    main()
