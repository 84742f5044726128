"""GoPlug's example plugin, in Python: plugin "Do" in namespace "Test".

Method ``Do`` answers its input upper-cased (a greeting when the input is empty; input that is
not UTF-8 makes it raise, which the caller receives as a RemoteError). The plugin sends the
notification ``callBack`` with ``b"Test Data"`` every time ``Do`` is called, and once a second
while some application has registered that callback.

Run it on its own, with the plugin directory as argument:

    python examples/python/do_plugin.py ./plugins

or through the goplug command, which imports this file and serves the module-level ``plugin``;
the directory then comes from the environment variable GOPLUG_DIR:

    GOPLUG_DIR=./plugins goplug serve examples/python/do_plugin.py

or let the application start it: ``registry.launch("examples/python/do_plugin.py")`` sets
GOPLUG_DIR itself. Either way it serves until SIGINT or SIGTERM, then removes its .pconf and
socket.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from goplug import CallbackNotFound, GoPlugError, Plugin

CALLBACK = "callBack"
NOTIFICATION = b"Test Data"

log = logging.getLogger("do_plugin")


def plugin_dir() -> str | None:
    """The plugin directory: argv[1] when run as a script, else None (Plugin reads GOPLUG_DIR)."""
    if __name__ == "__main__":
        if len(sys.argv) > 2 or sys.argv[1:] in (["-h"], ["--help"]):
            sys.exit(f"usage: {sys.argv[0]} [PLUGIN_DIR]  (default: $GOPLUG_DIR)")
        if len(sys.argv) > 1:
            return sys.argv[1]
        if not os.environ.get("GOPLUG_DIR"):
            sys.exit(f"{sys.argv[0]}: no plugin directory: give one as argument, or set GOPLUG_DIR")
    return None


def activate(data: bytes) -> bytes | None:
    log.info("activated: a registry loaded Do@Test")
    _start_ticker()
    return None


def stop(data: bytes) -> bytes | None:
    log.info("stop: a registry unloaded Do@Test (still serving until SIGINT/SIGTERM)")
    return None


plugin = Plugin(plugin_dir(), "Do", "Test", activator=activate, stopper=stop)


def send_callback() -> None:
    """Notify ``callBack`` if some application registered it (nobody listening is no error)."""
    try:
        plugin.notify(CALLBACK, NOTIFICATION, timeout=1.0)
    except CallbackNotFound:
        pass
    except GoPlugError as exc:  # a subscriber that does not keep up
        log.warning("notify %s failed: %s", CALLBACK, exc)


@plugin.method
def Do(data: bytes) -> bytes:
    text = data.decode("utf-8")  # not UTF-8: raises, and the caller gets a RemoteError
    send_callback()
    return (text.upper() if text else "Hello from Do@Test!").encode("utf-8")


_ticker_lock = threading.Lock()
_ticker: threading.Thread | None = None


def _tick() -> None:
    stopped = threading.Event()
    while plugin.running and not stopped.wait(1.0):
        if CALLBACK in plugin.callbacks:
            send_callback()


def _start_ticker() -> None:
    """Start the once-a-second notifier (at the first activation; it ends with the plugin)."""
    global _ticker
    with _ticker_lock:
        if _ticker is None:
            _ticker = threading.Thread(target=_tick, name="do-plugin-ticker", daemon=True)
            _ticker.start()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log.info("serving Do@Test in %s", os.path.abspath(plugin.location))
    plugin.serve_forever()
