"""An application that launches one plugin and then ends: ``launching_app.py MODE DIR``.

It opens ``goplug.PluginRegistry(DIR)``, launches ``tests/plugins/test_plugin.py`` as plugin
"Life" in namespace "T", prints ``plugin <pid>`` and flushes, then, per MODE:

``exit``
    returns from ``main`` normally, without closing the registry;
``raise``
    raises an uncaught RuntimeError;
``term`` / ``kill``
    blocks until it is signalled (SIGTERM keeps Python's default action: no atexit); after
    ``WAIT_LIMIT`` seconds without a signal it exits with status 3, so nothing hangs forever.

At exit (when atexit hooks run at all) it prints ``plugin-exit <code|None>``: the launched
plugin's exit status as the registry saw it. That hook is registered before goplug is imported,
so it runs after goplug's own atexit hook (atexit runs hooks last in, first out), that is after
the registry has stopped the plugin.
"""

from __future__ import annotations

import atexit
import sys
import time
from pathlib import Path
from typing import Any

PLUGIN = Path(__file__).resolve().parent.parent / "plugins" / "test_plugin.py"
MODES = ("exit", "raise", "term", "kill")
WAIT_LIMIT = 60.0
"""Seconds a ``term``/``kill`` app waits for its signal before giving up (exit status 3)."""

_launched: list[Any] = []  # the PluginProcess only: it holds no reference to the registry


def _report() -> None:
    for process in _launched:
        print(f"plugin-exit {process.exit_code}", flush=True)


def main(mode: str, location: str) -> int:
    if mode not in MODES:
        print(f"usage: launching_app.py {{{','.join(MODES)}}} DIR", file=sys.stderr)
        return 2
    atexit.register(_report)  # before goplug registers its own hook: runs after it
    import goplug

    registry = goplug.PluginRegistry(location)
    handle = registry.launch(
        [sys.executable, str(PLUGIN), location, "Life", "T"], name="Life", namespace="T"
    )
    assert handle.process is not None and handle.process.pid is not None
    _launched.append(handle.process)
    print(f"plugin {handle.process.pid}", flush=True)
    if mode == "raise":
        raise RuntimeError("launching_app: deliberate uncaught exception")
    if mode in ("term", "kill"):
        deadline = time.monotonic() + WAIT_LIMIT
        while time.monotonic() < deadline:
            time.sleep(0.5)
        print(f"no signal within {WAIT_LIMIT:g} s", file=sys.stderr, flush=True)
        return 3
    return 0  # "exit": the registry is left open, for the atexit hook to close


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(f"usage: launching_app.py {{{','.join(MODES)}}} DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
