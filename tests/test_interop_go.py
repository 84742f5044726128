"""Wire compatibility with GoPlug 0.1.0, both ways.

- our registry loads a peer that answers exactly what the original Go plugin answers
  (tests/gopeers/go_plugin.py: Content-Length and chunked bodies, padded /Activate arrays,
  400 for unknown routes, panics that close the connection, one waiting slot per callback);
- a client that sends exactly the original Go registry's bytes and checks the answers the way it
  does (tests/gopeers/go_registry.py) loads our plugin.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from conftest import Spawner, wait_for
from gopeers.go_plugin import GoPluginProcess
from gopeers.go_registry import GoRegistryClient, GoRegistryError

import goplug
from goplug import PluginRegistry, PluginState

pytestmark = pytest.mark.timeout(60)


def go_plugin(plugin_dir: Path, **kwargs: object) -> GoPluginProcess:
    """A Go-style plugin process; ``with`` starts it and ends it."""
    return GoPluginProcess(plugin_dir, "Do", "Test", **kwargs)  # type: ignore[arg-type]


def test_registry_loads_go_plugin(plugin_dir: Path) -> None:
    with go_plugin(plugin_dir) as peer, PluginRegistry(plugin_dir) as registry:
        wait_for(lambda: registry.is_loaded("Do", "Test"))
        handle = registry.get_plugin("Do", "Test")
        assert handle is not None
        # Empty names padding the array are skipped; Go runtime names are kept as announced.
        assert "" not in handle.methods
        assert {"main.Do", "main.Echo", "main.Big", "main.Panic", "main.Nil"} <= set(handle.methods)
        assert handle.execute("main.Echo", b"hello") == b"hello"
        assert handle.execute("main.Do") == b""
        assert handle.execute("main.Nil", b"x") == b""
        big = handle.execute("main.Big")  # answered with Transfer-Encoding: chunked
        assert big == b"x" * 5000
        payload = bytes(range(256)) * 40
        assert handle.execute("main.Echo", payload) == payload  # chunked, binary
        assert handle.ping() > 0
        with pytest.raises(goplug.MethodNotFound):
            handle.execute("main.Nope")  # Go answers 400 with an empty body
        assert peer.pid > 0


def test_go_plugin_panic_is_a_connection_error_and_plugin_keeps_working(
    plugin_dir: Path,
) -> None:
    with go_plugin(plugin_dir), PluginRegistry(plugin_dir) as registry:
        wait_for(lambda: registry.is_loaded("Do", "Test"))
        handle = registry.get_plugin("Do", "Test")
        assert handle is not None
        with pytest.raises(goplug.PluginConnectionError):
            handle.execute("main.Panic", b"x")
        # Unlike the original registry, a broken connection is replaced, not fatal.
        assert handle.state is PluginState.LOADED
        assert handle.execute("main.Echo", b"again") == b"again"


def test_go_plugin_activator_output_after_array(plugin_dir: Path) -> None:
    with go_plugin(plugin_dir, activator_output="HELLO"), PluginRegistry(plugin_dir) as reg:
        wait_for(lambda: reg.is_loaded("Do", "Test"))
        handle = reg.get_plugin("Do", "Test")
        assert handle is not None
        assert "main.Echo" in handle.methods
        assert handle.activation_output == b"HELLO"


def test_go_plugin_callbacks_and_stop(plugin_dir: Path) -> None:
    with go_plugin(plugin_dir) as peer, PluginRegistry(plugin_dir) as registry:
        wait_for(lambda: registry.is_loaded("Do", "Test"))
        handle = registry.get_plugin("Do", "Test")
        assert handle is not None
        got: list[bytes] = []
        handle.register_callback(got.append, "main.callBack")
        # Calls are not delayed by the waiting poll: it has its own connection.
        peer.wait_for_line("registered main.callBack")
        assert handle.execute("main.Echo", b"while polling") == b"while polling"
        for i in range(3):
            peer.notify("main.callBack", b"N%d" % i)
            wait_for(lambda i=i: len(got) == i + 1)
            peer.wait_for_line("registered main.callBack", count=i + 2)
        assert got == [b"N0", b"N1", b"N2"]
        registry.unload_plugin(handle)  # /Stop is not stuck behind the poll
        assert handle.state is PluginState.DISCOVERED


def test_go_plugin_exiting_on_stop_unloads_cleanly(plugin_dir: Path) -> None:
    with go_plugin(plugin_dir, exit_on_stop=True) as peer, PluginRegistry(plugin_dir) as reg:
        wait_for(lambda: reg.is_loaded("Do", "Test"))
        handle = reg.get_plugin("Do", "Test")
        assert handle is not None
        reg.unload_plugin(handle)  # the peer exits before answering: not an error
        assert peer.wait() == 0
        wait_for(lambda: handle.state is PluginState.STOPPED)


def test_go_written_pconf_in_place_is_read(plugin_dir: Path) -> None:
    # The original writes the file in place: a registry may see it empty first.
    with go_plugin(plugin_dir) as peer:
        raw = peer.pconf_path.read_bytes()
        assert raw.startswith(b'{"Name":"Do","NameSpace":"Test","Url":"unix://TestDo","Sock":')
        peer.pconf_path.write_bytes(b"")
        with PluginRegistry(plugin_dir) as registry:
            wait_for(lambda: str(peer.pconf_path) in registry.broken())
            peer.pconf_path.write_bytes(raw)
            wait_for(lambda: registry.is_loaded("Do", "Test"))


# -- the other way: the original registry's bytes against our plugin ---------------------------


@pytest.fixture
def our_plugin(plugin_dir: Path, spawn: Spawner) -> GoRegistryClient:
    proc = spawn(plugin_dir, "Do", "Test")
    conf = json.loads(proc.pconf.read_text())
    assert list(conf)[:5] == ["Name", "NameSpace", "Url", "Sock", "LazyLoad"]
    assert conf["Url"] == "unix://TestDo"
    return GoRegistryClient(conf["Sock"], "TestDo")


def test_go_registry_activates_and_calls_our_plugin(our_plugin: GoRegistryClient) -> None:
    with our_plugin as client:
        methods = client.activate()  # strict JSON array, as the Go registry parses it
        assert {"Echo", "Upper", "Fail"} <= set(methods)
        client.ping()  # requires exactly "Test Data" back and "200 OK"
        assert client.execute("Upper", b"abc") == b"ABC"
        assert client.execute("Echo", None) == b""  # nil body: no Content-Type
        assert client.execute("Echo", b"") == b""
        assert client.execute("Big", b"5000") == b"x" * 5000
        with pytest.raises(GoRegistryError):
            client.execute("Fail", b"x")  # non-200: the Go registry's "request failed"
        # The connection stays usable after a failure, as the Go client requires.
        assert client.execute("Echo", b"still") == b"still"
        assert client.stop() == b"stopped"


def test_go_registry_callback_long_poll(our_plugin: GoRegistryClient, plugin_dir: Path) -> None:
    with our_plugin as client, PluginRegistry(plugin_dir) as registry:
        client.activate()
        wait_for(lambda: registry.is_loaded("Do", "Test"))
        handle = registry.get_plugin("Do", "Test")
        assert handle is not None
        result: list[bytes] = []
        poll = threading.Thread(target=lambda: result.append(client.register_callback_once("cb")))
        poll.start()
        wait_for(lambda: handle.execute("Callbacks") == b"cb")
        assert handle.execute("Notify", b"cb\nTest Data") == b"1"
        poll.join(10)
        assert result == [b"Test Data"]
