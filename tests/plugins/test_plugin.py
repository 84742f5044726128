"""A plugin process for the tests: python test_plugin.py DIR NAME [NAMESPACE] [--lazy]."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
import threading
import time

import goplug


def build(
    location: str, name: str, namespace: str = "", lazy: bool = False, **options: object
) -> goplug.Plugin:
    plugin = goplug.Plugin(
        location,
        name,
        namespace,
        lazy_load=lazy,
        activator=lambda data: None,
        stopper=lambda data: b"stopped",
        **options,  # type: ignore[arg-type]
    )

    @plugin.method
    def Echo(data: bytes) -> bytes:
        return data

    @plugin.method
    def Upper(data: bytes) -> bytes:
        return data.upper()

    @plugin.method
    def Fail(data: bytes) -> bytes:
        raise ValueError("deliberate failure: " + data.decode())

    @plugin.method
    def Sleep(data: bytes) -> bytes:
        time.sleep(float(data or b"3600"))
        return b"slept"

    @plugin.method
    async def AsyncEcho(data: bytes) -> bytes:
        await asyncio.sleep(0.001)
        return b"async:" + data

    @plugin.method
    def Pid(data: bytes) -> bytes:
        return str(os.getpid()).encode()

    @plugin.method
    def Exit(data: bytes) -> bytes:
        os._exit(3)

    @plugin.method
    def TermFromThread(data: bytes) -> bytes:
        # SIGTERM caught by this server thread, not by the main one (as the kernel may choose).
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        return b"sent"

    @plugin.method
    def Segfault(data: bytes) -> bytes:
        ctypes.string_at(0)
        return b""

    @plugin.method
    def Big(data: bytes) -> bytes:
        return b"x" * int(data)

    @plugin.method
    def Callbacks(data: bytes) -> bytes:
        return ",".join(plugin.callbacks).encode()

    @plugin.method
    def Notify(data: bytes) -> bytes:
        name, _, payload = data.partition(b"\n")
        return str(plugin.notify(name.decode(), payload)).encode()

    @plugin.method
    def NotifyMany(data: bytes) -> bytes:
        # "name\ncount": notify name with b"0", b"1", ... from a background thread
        name, _, count = data.partition(b"\n")

        def run() -> None:
            for i in range(int(count)):
                plugin.notify(name.decode(), str(i).encode())

        threading.Thread(target=run, daemon=True).start()
        return b"started"

    return plugin


def network_options(argv: list[str]) -> dict[str, object]:
    """--url=tcp://H:P --certs=DIR (plugin.pem/plugin.key/ca.pem) --advertise=A --token=T --ttl=S"""
    given = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    options: dict[str, object] = {}
    if "url" in given:
        options["url"] = given["url"]
    if "certs" in given:
        from goplug.tls import dev_configs

        options["tls"] = dev_configs(given["certs"])["plugin"]
    if "advertise" in given:
        options["advertise"] = given["advertise"]
    if "token" in given:
        options["insecure_loopback"] = True
        options["token"] = given["token"]
    if "ttl" in given:
        options["lease_ttl"] = float(given["ttl"])
    return options


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    location, name = args[0], args[1]
    namespace = args[2] if len(args) > 2 else ""
    plugin = build(
        location, name, namespace, lazy="--lazy" in sys.argv, **network_options(sys.argv[1:])
    )
    plugin.serve_forever()


if __name__ == "__main__":
    main()
