"""A goplug plugin with settings from the command line, for limit and back-pressure tests.

    python tuned_plugin.py DIR NAME [NAMESPACE] [--request-timeout=S] [--idle-timeout=S]
        [--max-body=N] [--max-head=N] [--max-headers=N] [--max-connections=N]
        [--max-queue=N] [--notify-timeout=S] [--allowed-uids=UID,UID]

Methods: Echo, Pid, Sleep (seconds as text), Notify ("name\\npayload"), NotifyN
("name\\ncount[\\ntimeout]": notify name with b"0", b"1", ... in the calling thread; answers JSON
{"accepted": k, "error": "<type or empty>", "elapsed": seconds}), Progress (notifications the
running NotifyN has had accepted so far), Callbacks, Threads.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import goplug


def _options(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    args: list[str] = []
    opts: dict[str, str] = {}
    for arg in argv:
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            opts[key] = value
        else:
            args.append(arg)
    return args, opts


def settings_from(opts: dict[str, str]) -> goplug.PluginSettings:
    limits_defaults = goplug.Limits()
    limits = goplug.Limits(
        max_head=int(opts.get("max-head", limits_defaults.max_head)),
        max_headers=int(opts.get("max-headers", limits_defaults.max_headers)),
        max_body=int(opts.get("max-body", limits_defaults.max_body)),
    )
    server_defaults = goplug.ServerSettings()
    allowed = opts.get("allowed-uids")
    server = goplug.ServerSettings(
        limits=limits,
        request_timeout=float(opts.get("request-timeout", server_defaults.request_timeout)),
        idle_timeout=float(opts.get("idle-timeout", server_defaults.idle_timeout)),
        max_connections=int(opts.get("max-connections", server_defaults.max_connections)),
        allowed_uids=frozenset(int(u) for u in allowed.split(",")) if allowed else None,
    )
    cb_defaults = goplug.CallbackSettings()
    callbacks = goplug.CallbackSettings(
        max_queue=int(opts.get("max-queue", cb_defaults.max_queue)),
        notify_timeout=float(opts.get("notify-timeout", cb_defaults.notify_timeout)),
    )
    return goplug.PluginSettings(server=server, callbacks=callbacks)


def build(location: str, name: str, namespace: str, opts: dict[str, str]) -> goplug.Plugin:
    plugin = goplug.Plugin(location, name, namespace, settings=settings_from(opts))
    progress = [0]

    @plugin.method
    def Echo(data: bytes) -> bytes:
        return data

    @plugin.method
    def Pid(data: bytes) -> bytes:
        return str(os.getpid()).encode()

    @plugin.method
    def Sleep(data: bytes) -> bytes:
        time.sleep(float(data or b"3600"))
        return b"slept"

    @plugin.method
    def Notify(data: bytes) -> bytes:
        cb, _, payload = data.partition(b"\n")
        return str(plugin.notify(cb.decode(), payload)).encode()

    @plugin.method
    def NotifyN(data: bytes) -> bytes:
        parts = data.decode().split("\n")
        cb, count = parts[0], int(parts[1])
        timeout = float(parts[2]) if len(parts) > 2 and parts[2] else None
        progress[0] = 0
        error = ""
        started = time.monotonic()
        for i in range(count):
            try:
                plugin.notify(cb, str(i).encode(), timeout=timeout)
            except goplug.GoPlugError as exc:
                error = type(exc).__name__
                break
            progress[0] += 1
        elapsed = time.monotonic() - started
        return json.dumps({"accepted": progress[0], "error": error, "elapsed": elapsed}).encode()

    @plugin.method
    def Progress(data: bytes) -> bytes:
        return str(progress[0]).encode()

    @plugin.method
    def Callbacks(data: bytes) -> bytes:
        return ",".join(plugin.callbacks).encode()

    @plugin.method
    def Threads(data: bytes) -> bytes:
        return str(threading.active_count()).encode()

    return plugin


def main() -> None:
    args, opts = _options(sys.argv[1:])
    location, name = args[0], args[1]
    namespace = args[2] if len(args) > 2 else ""
    build(location, name, namespace, opts).serve_forever()


if __name__ == "__main__":
    main()
