"""docs/TESTING.md is a working example: its two files, run by pytest with goplug's plugin."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

pytest_plugins = ["pytester"]


def doc_blocks() -> list[str]:
    text = (REPO / "docs" / "TESTING.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_documented_example_passes(pytester: pytest.Pytester) -> None:
    plugin_code, test_code = doc_blocks()[:2]
    pytester.makepyfile(upper=plugin_code, test_upper=test_code)
    # A fresh process: the example's plugin runs as goplug's own pytest plugin loads it.
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_a_failing_plugin_fails_the_conformance_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        broken="""
from goplug import Plugin

plugin = Plugin(None, "Broken")


@plugin.method
def Echo(data: bytes) -> bytes:
    return data[:-1]  # loses the last byte
""",
        test_broken="""
def test_conformance(conformance):
    conformance("broken.py")
""",
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*fails the conformance suite at level goplug*", "*echo.*"])


def test_the_fixtures_clean_up(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_dirs="""
import os, sys

seen = []

def test_dir_and_registry(plugin_dir, plugin_registry, launched):
    seen.append(plugin_dir)
    assert os.path.isdir(plugin_dir) and plugin_registry.location == plugin_dir
    handle = launched([sys.executable, PLUGIN, plugin_dir, "Kit"], name="Kit")
    seen.append(handle.process.pid)

def test_after():
    directory, pid = seen
    assert not os.path.exists(directory)
    assert not os.path.exists(f"/proc/{pid}")  # stopped and reaped
""".replace("PLUGIN", repr(str(REPO / "tests" / "plugins" / "test_plugin.py")))
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
