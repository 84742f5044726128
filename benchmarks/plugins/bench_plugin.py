"""The goplug plugin the benchmarks start: ``bench_plugin.py DIR NAME [COUNT]``.

With COUNT (default 1) the process hosts that many Plugin instances named NAME0, NAME1, ...
(the discovery and scale rows); with none, one instance named NAME. Each instance has:

- ``Echo``: returns its input (round-trip rows, cold start);
- ``Subscribed``: b"1" once an application subscribed to the callback named by the input;
- ``NotifyOne``: one notification on callback ``bench``: 8 bytes of ``perf_counter_ns`` (the
  same CLOCK_MONOTONIC in every process) padded to 64 bytes;
- ``Burst``: input b"N": N such notifications, sent from a thread as fast as notify allows.

Imports stay light (stdlib + goplug): this script is what the cold-start row starts.
"""

import sys
import threading
import time

from _watchdog import exit_with_parent

from goplug import Plugin

CALLBACK = "bench"
PAD = bytes(56)


def build(directory: str, name: str) -> Plugin:
    p = Plugin(directory, name)

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

    return p


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
