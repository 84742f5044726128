"""Build the C test plugin (``tests/plugins/c_plugin.c``) for tests that need a compiled plugin.

>>> binary = c_plugin_or_skip(tmp_path_factory)   # in a test or fixture; built once a session
>>> subprocess.Popen([str(binary), str(plugin_dir)])  # serves CDo in namespace C
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

C_PLUGIN_SOURCE = Path(__file__).resolve().parent / "plugins" / "c_plugin.c"
"""The plugin's only source file (libc and pthreads)."""

C_FLAGS = ("-O2", "-Wall", "-Wextra", "-pthread")
"""Flags it is built with; it compiles without a warning with these."""

_binary: Path | None = None  # built once per session (per xdist worker), by c_plugin_or_skip


class CPluginBuildError(RuntimeError):
    """The compiler was found but could not build the plugin."""


def _compiler() -> list[str] | None:
    """The compiler command: ``$CC`` (which may carry flags) or ``cc``; None if not installed."""
    command = shlex.split(os.environ.get("CC", "")) or ["cc"]
    found = shutil.which(command[0])
    return [found, *command[1:]] if found else None


def build_c_plugin(out_dir: Path) -> Path | None:
    """Compile the C plugin into ``out_dir``; return the binary, or None if there is no compiler.

    Raises CPluginBuildError, with the compiler's output, if compilation fails.
    """
    compiler = _compiler()
    if compiler is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / "c_plugin"
    result = subprocess.run(
        [*compiler, *C_FLAGS, "-o", str(binary), str(C_PLUGIN_SOURCE)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise CPluginBuildError(
            f"{shlex.join(compiler)} failed on {C_PLUGIN_SOURCE} (exit {result.returncode}):\n"
            f"{result.stderr}{result.stdout}"
        )
    return binary


def c_plugin_or_skip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C plugin binary, built on first use in this session; skip the test if no compiler.

    Call it from a test or a fixture of any scope with pytest's ``tmp_path_factory``.
    """
    global _binary
    if _binary is None or not _binary.exists():
        built = build_c_plugin(tmp_path_factory.mktemp("c_plugin"))
        if built is None:
            pytest.skip("no C compiler on this machine (cc)")
        _binary = built
    return _binary
