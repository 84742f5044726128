"""An application for the multi-host tests, driven line by line on stdin.

python multihost_app.py LOCATION CERTDIR

Prints ``EVENT <kind> <name> <monotonic time>`` for every registry event, and answers each
command line: ``call NAME METHOD DATA`` → ``OK NAME DATA`` or ``ERR NAME TYPE MESSAGE`` (``\\n``
in DATA is a newline); ``subscribe NAME CALLBACK`` → ``SUBSCRIBED NAME CALLBACK``, then
``CB NAME CALLBACK DATA`` for every notification; ``quit`` ends it. CLOCK_MONOTONIC is shared
by every process of the machine, so the test can compare these times with its own.
"""

from __future__ import annotations

import sys
import threading
import time

import goplug
from goplug.tls import dev_configs

_print_lock = threading.Lock()


def say(line: str) -> None:
    with _print_lock:
        print(line, flush=True)


def main() -> None:
    location, certdir = sys.argv[1], sys.argv[2]
    settings = goplug.RegistrySettings(
        client=goplug.ClientSettings(call_timeout=3.0, connect_timeout=1.0, ping_timeout=1.0)
    )
    registry = goplug.PluginRegistry(
        location, settings=settings, tls=dev_configs(certdir)["registry"]
    )
    registry.add_listener(
        lambda e: say(f"EVENT {e.kind} {e.name} {time.monotonic():.3f}"), replay=True
    )
    say("READY")
    try:
        for line in sys.stdin:
            words = line.split(maxsplit=3)
            if not words:
                continue
            if words[0] == "quit":
                break
            if words[0] == "subscribe" and len(words) == 3:
                name, callback = words[1], words[2]
                handle = registry.get_plugin(name)
                if handle is None:
                    say(f"ERR {name} PluginNotLoaded {name} is not loaded")
                    continue
                handle.register_callback(
                    lambda data, n=name, c=callback: say(f"CB {n} {c} {data.decode()}"), callback
                )
                say(f"SUBSCRIBED {name} {callback}")
                continue
            if words[0] == "call" and len(words) >= 3:
                name, method = words[1], words[2]
                text = words[3].rstrip("\n").replace("\\n", "\n") if len(words) > 3 else ""
                data = text.encode()
                handle = registry.get_plugin(name)
                try:
                    if handle is None:
                        raise goplug.PluginNotLoaded(f"{name} is not loaded")
                    say(f"OK {name} {handle.execute(method, data).decode()}")
                except goplug.GoPlugError as exc:
                    say(f"ERR {name} {type(exc).__name__} {exc}")
    finally:
        registry.close()


if __name__ == "__main__":
    main()
