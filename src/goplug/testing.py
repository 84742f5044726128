"""A pytest plugin for testing goplug plugins: fixtures that start the real thing.

Installed with goplug and loaded by pytest on its own (entry point ``pytest11``). Fixtures:

``plugin_dir``
    A private plugin directory, short enough for Unix socket paths, removed afterwards.
``plugin_registry``
    A :class:`~goplug.PluginRegistry` watching ``plugin_dir``; closed afterwards, which also
    stops every plugin it launched.
``launched``
    ``launched(command, name=None, namespace="", **launch_options)``: start a plugin program
    (an argument list, or a Python file / ``module:attr`` served by ``goplug serve``) under
    ``plugin_registry`` and return its loaded :class:`~goplug.PluginHandle`.
``conformance``
    ``conformance(command, level="goplug", **options)``: run the conformance suite on a plugin
    program (launched afresh in a directory of its own; ``options`` as for
    :func:`goplug.conformance.run`) and fail the test, listing the failed rules, unless it
    passes ``level``; returns the :class:`~goplug.conformance.Report`.

See docs/TESTING.md for a complete example.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from goplug.registry import PluginHandle, PluginRegistry

if TYPE_CHECKING:
    from goplug.conformance import Report

__all__ = ["conformance", "launched", "plugin_dir", "plugin_registry"]


@pytest.fixture
def plugin_dir() -> Iterator[str]:
    """A private plugin directory (mode 0700, under /tmp: socket paths stay short)."""
    path = tempfile.mkdtemp(prefix="goplug-test-", dir="/tmp" if os.path.isdir("/tmp") else None)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def plugin_registry(plugin_dir: str) -> Iterator[PluginRegistry]:
    """A registry on ``plugin_dir``; closing it afterwards stops the plugins it launched."""
    registry = PluginRegistry(plugin_dir)
    try:
        yield registry
    finally:
        registry.close()


@pytest.fixture
def launched(plugin_registry: PluginRegistry) -> Callable[..., PluginHandle]:
    """``launched(command, name=None, namespace="", **options)`` -> a loaded handle."""

    def launch(
        command: Sequence[str] | str,
        name: str | None = None,
        namespace: str = "",
        **options: Any,
    ) -> PluginHandle:
        return plugin_registry.launch(command, name=name, namespace=namespace, **options)

    return launch


@pytest.fixture
def conformance() -> Callable[..., Report]:
    """``conformance(command, level="goplug", **options)``: run the suite; fail unless it passes."""

    def check(command: Sequence[str] | str, level: str = "goplug", **options: Any) -> Report:
        from goplug.conformance import run

        report = run(command, **options)
        if not report.passed(level):
            failed = [r for r in report.results if r.status == "fail"]
            lines = "\n".join(f"  {r.id} ({r.level}): {r.reason}" for r in failed)
            pytest.fail(f"the plugin fails the conformance suite at level {level}:\n{lines}")
        return report

    return check
