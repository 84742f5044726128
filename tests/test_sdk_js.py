"""The goplug package for Node.js (sdk/js): its own test suite, and its README's example plugin."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, wait_for

import goplug
from goplug import PluginRegistry

NODE = shutil.which("node")
SDK = REPO / "sdk" / "js"

pytestmark = pytest.mark.skipif(
    NODE is None, reason="Node.js is not installed (no `node` on PATH): sdk/js cannot be tested"
)


def test_the_node_test_suite_passes() -> None:
    assert NODE is not None
    # The files, not the directory: Node 21+ takes glob patterns where Node 20 took directories.
    files = sorted(str(p) for p in (SDK / "test").glob("*.test.js"))
    assert files, "no test files in sdk/js/test"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOPLUG_")}
    try:
        result = subprocess.run(
            [NODE, "--test", *files],
            cwd=SDK,
            env=env,
            capture_output=True,
            timeout=180,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # node --test ends its children with it
        pytest.fail(f"node --test did not finish in {exc.timeout} s")
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, out[-20000:]
    passed = re.search(r"^# pass (\d+)$", out, re.MULTILINE)
    failed = re.search(r"^# fail (\d+)$", out, re.MULTILINE)
    assert passed and int(passed.group(1)) > 0, out[-5000:]
    assert failed and int(failed.group(1)) == 0, out[-20000:]


def readme_example() -> str:
    """The example plugin of sdk/js/README.md: the first ```js block after its marker."""
    text = (SDK / "README.md").read_text()
    marker = text.index("<!-- example:")
    match = re.compile(r"```js\n(.*?)```", re.DOTALL).search(text, marker)
    assert match, "no ```js block after the example marker in sdk/js/README.md"
    code = match.group(1)
    assert "require('goplug')" in code
    return code


def test_the_readme_example_is_ten_lines_or_fewer() -> None:
    assert len(readme_example().strip().splitlines()) <= 10


def test_the_readme_example_is_launched_and_called(plugin_dir: Path, tmp_path: Path) -> None:
    # A project that ran `npm install path/to/sdk/js`: node_modules/goplug is a link to it.
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "goplug").symlink_to(SDK, target_is_directory=True)
    script = tmp_path / "greeter.js"
    script.write_text(readme_example())
    with PluginRegistry(plugin_dir) as registry:
        handle = registry.launch(["node", str(script)])
        assert (handle.name, handle.namespace) == ("Greeter", "Node")
        assert handle.conf is not None and handle.conf.launch
        assert handle.conf.protocol == "goplug/1"
        assert set(handle.methods) == {"Hello", "Upper", "Tick"}
        assert handle.execute("Hello", b"world") == b"hello, world"
        assert handle.execute("Upper", b"abc") == b"ABC"
        data = bytes(range(256))
        assert handle.execute("Hello", data) == b"hello, " + data
        got: list[bytes] = []
        handle.register_callback(got.append, "tick")

        def ticked() -> bool:
            try:
                return handle.execute("Tick", b"t0") == b"1"
            except goplug.RemoteError:
                return False  # the subscription has not reached the plugin yet

        wait_for(ticked)
        handle.execute("Tick", b"t1")
        wait_for(lambda: got[-2:] == [b"t0", b"t1"])
        assert handle.process is not None
        pid = handle.process.pid
        registry.unload_plugin(handle)
        assert handle.process.exit_code == 0, f"pid {pid} exited with {handle.process.exit_code}"
    assert sorted(os.listdir(plugin_dir)) == []
