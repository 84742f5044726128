"""The pure-Python path of a call, which TLS sockets and builds without a C compiler take.

Everything else in the suite runs with the C fast path (goplug/_fastpath.c) where it is built;
here the suites that exercise the wire most run again with it turned off, in plugins and
registry alike, so both paths keep the same behaviour.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent
SUITES = [
    "test_registry.py",
    "test_callbacks.py",
    "test_reliability_input.py",
    "test_reliability_faults.py",
]


def pure_env() -> dict[str, str]:
    env = dict(os.environ)
    env["GOPLUG_PURE_PYTHON"] = "1"
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def test_the_switch_turns_the_fast_path_off() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from goplug import transport; print(transport.fastpath)"],
        env=pure_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "None"


def test_wire_suites_pass_on_the_pure_python_path() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + [str(TESTS / name) for name in SUITES],
        env=pure_env(),
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
