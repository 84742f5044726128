"""The JavaScript plugin (examples/node, Node's standard library only) under our registry."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from conftest import REPO, Spawner, wait_for

import goplug
from goplug import PluginRegistry, PluginState

NODE = shutil.which("node")
PLUGIN_JS = REPO / "examples" / "node" / "plugin.js"

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not on PATH"),
    pytest.mark.timeout(60),
]


@pytest.fixture(params=["net", "http"])
def node_plugin(request: pytest.FixtureRequest, plugin_dir: Path, spawn: Spawner) -> Path:
    assert NODE is not None
    command = [NODE, str(PLUGIN_JS), str(plugin_dir), "--engine", request.param]
    spawn(plugin_dir, "Echo", "Node", command=command)
    return plugin_dir


def test_node_plugin_is_loaded_and_called(node_plugin: Path) -> None:
    conf = json.loads((node_plugin / "Echo@Node.pconf").read_text())
    assert conf["Protocol"] == "goplug/1"
    assert (node_plugin / "Echo@Node.pconf").stat().st_mode & 0o777 == 0o600
    with PluginRegistry(node_plugin) as registry:
        wait_for(lambda: registry.is_loaded("Echo", "Node"))
        handle = registry.get_plugin("Echo", "Node")
        assert handle is not None
        assert {"Echo", "Upper", "Reverse", "Fail", "Notify"} <= set(handle.methods)
        assert handle.execute("Echo", b"from python") == b"from python"
        assert handle.execute("Upper", b"abc") == b"ABC"
        assert handle.execute("Reverse", b"abc") == b"cba"
        big = os.urandom(2 * 1024 * 1024)
        assert handle.execute("Echo", big) == big
        assert handle.ping() > 0
        with pytest.raises(goplug.RemoteError) as info:
            handle.execute("Fail")
        assert info.value.remote_type == "Error"
        assert "deliberate failure" in info.value.remote_message
        with pytest.raises(goplug.MethodNotFound):
            handle.execute("Missing")


def test_node_plugin_callbacks(node_plugin: Path) -> None:
    with PluginRegistry(node_plugin) as registry:
        wait_for(lambda: registry.is_loaded("Echo", "Node"))
        handle = registry.get_plugin("Echo", "Node")
        assert handle is not None
        got: list[bytes] = []
        handle.register_callback(got.append, "js")

        def notified() -> bool:
            try:
                return handle.execute("Notify", b"js\nfirst") == b"1"
            except goplug.RemoteError:
                return False  # the subscription has not reached the plugin yet

        wait_for(notified)
        for i in range(200):
            handle.execute("Notify", b"js\n%d" % i)
        wait_for(lambda: len(got) >= 201)
        assert got[0] == b"first"
        assert got[-200:] == [b"%d" % i for i in range(200)]
        registry.unload_plugin(handle)
        assert handle.state is PluginState.DISCOVERED


def test_node_plugin_stops_cleanly(plugin_dir: Path, spawn: Spawner) -> None:
    assert NODE is not None
    proc = spawn(plugin_dir, "Echo", "Node", command=[NODE, str(PLUGIN_JS), str(plugin_dir)])
    with PluginRegistry(plugin_dir) as registry:
        wait_for(lambda: registry.is_loaded("Echo", "Node"))
        handle = registry.get_plugin("Echo", "Node")
        assert handle is not None
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(10) == 0
        wait_for(lambda: handle.state is PluginState.STOPPED)
    assert not list(plugin_dir.iterdir())
