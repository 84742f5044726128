"""``goplug demo`` runs the tour end to end and leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is not alive
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def test_demo() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH", "")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "goplug", "demo"],
        capture_output=True,
        timeout=60,
        env=env,
    )
    out = result.stdout.decode()
    pids = [int(pid) for pid in re.findall(r"plugin process \(pid (\d+)\)", out)]
    try:
        assert result.returncode == 0, out + result.stderr.decode()
        assert "Do@Test" in out
        assert "Test Data" in out  # a callback notification arrived
        if shutil.which("node") and (Path(SRC).parent / "examples/node/plugin.js").is_file():
            assert "Echo@Node" in out
            assert "deliberate failure" in out
        else:
            assert "skipping the JavaScript plugin:" in out
        assert "demo complete" in out

        match = re.search(r"plugin directory: (\S+)", out)
        assert match, out
        assert not os.path.exists(match.group(1))  # removed, and it was empty
        assert re.search(r"removed \S+ \(it was empty\)", out)

        assert pids, out
        assert not [pid for pid in pids if _alive(pid)]
    finally:
        for pid in pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
