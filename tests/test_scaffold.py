"""goplug new: each generated project passes its own test, as generated."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from goplug import ConfigError
from goplug.scaffold import create_project

VENV_BIN = str(Path(sys.executable).parent)


def env_with_goplug() -> dict[str, str]:
    """The generated tests call `goplug` (and pytest); both come from this interpreter's bin."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([VENV_BIN, env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    return env


def new(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "goplug", "new", *args],
        cwd=tmp_path,
        env=env_with_goplug(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        cmd, cwd=cwd, env=env_with_goplug(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done


def test_python_project_passes_its_own_tests(tmp_path: Path) -> None:
    result = new(tmp_path, "Greeter", "--lang", "python", "--namespace", "Tools")
    assert result.returncode == 0, result.stderr
    project = tmp_path / "Greeter"
    assert sorted(p.name for p in project.iterdir()) == ["README.md", "plugin.py", "test_plugin.py"]
    done = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], project)
    assert "2 passed" in done.stdout


@pytest.mark.skipif(shutil.which("npm") is None, reason="Node.js (npm) is not installed")
def test_js_project_passes_its_own_tests(tmp_path: Path) -> None:
    result = new(tmp_path, "Greeter", "--lang", "js", "greeter-js")
    assert result.returncode == 0, result.stderr
    project = tmp_path / "greeter-js"
    run(["npm", "install", "--offline", "--no-audit", "--no-fund"], project)
    done = run(["npm", "test"], project)
    assert "# pass 1" in done.stdout and "# fail 0" in done.stdout


def test_go_project_passes_its_own_tests(tmp_path: Path) -> None:
    ensure = subprocess.run(
        [str(REPO / "tools" / "ensure-go")], capture_output=True, text=True, timeout=600
    )
    if ensure.returncode != 0:
        pytest.skip(ensure.stdout.strip() or ensure.stderr.strip() or "no Go toolchain")
    go = ensure.stdout.strip().splitlines()[-1]
    result = new(tmp_path, "Greeter", "--lang", "go")
    assert result.returncode == 0, result.stderr
    project = tmp_path / "Greeter"
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / f"goplug-go-cache-{os.getuid()}"
    env_go = ["env", "GOPROXY=off", "GOTOOLCHAIN=local", "GOFLAGS=", f"GOCACHE={cache / 'build'}"]
    done = run([*env_go, go, "test", "-v", "-count=1", "./..."], project)
    assert "--- PASS: TestConformance" in done.stdout  # run, not skipped


def test_refusals(tmp_path: Path) -> None:
    (tmp_path / "Taken").mkdir()
    (tmp_path / "Taken" / "file").write_text("mine")
    with pytest.raises(ConfigError, match="not an empty directory"):
        create_project("Taken", "python", directory=str(tmp_path / "Taken"))
    with pytest.raises(ConfigError, match="invalid name"):
        create_project("no-dashes", "python", directory=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="unknown language"):
        create_project("Fine", "cobol", directory=str(tmp_path / "y"))
    result = new(tmp_path, "Taken", "--lang", "python")
    assert result.returncode == 2 and "goplug: error:" in result.stderr
    assert (tmp_path / "Taken" / "file").read_text() == "mine"
