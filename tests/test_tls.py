"""Plugins on TCP: mutual TLS, refusals, plaintext loopback with a token (real sockets)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import threading
from pathlib import Path

import pytest
import trustme
from conftest import wait_for
from faultkit import freeze

import goplug
import goplug.aio
from goplug.errors import ConfigError, PluginConnectionError
from goplug.tls import TcpTransport, TLSConfig, dev_configs, make_dev_certs

TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("certs")
    make_dev_certs(root)
    return root


def tls_of(certs: Path, side: str) -> TLSConfig:
    return dev_configs(certs)[side]


def url_of(pconf: Path) -> str:
    return str(json.loads(pconf.read_text())["Url"])


def test_plugin_process_over_mutual_tls(plugin_dir, spawn, certs) -> None:
    plugin = spawn(plugin_dir, "Remote", "Net", "--url=tcp://127.0.0.1:0", f"--certs={certs}")
    conf = json.loads(plugin.pconf.read_text())
    assert conf["Url"].startswith("https://127.0.0.1:") and conf["Sock"] == ""
    with goplug.PluginRegistry(plugin_dir, tls=tls_of(certs, "registry")) as registry:
        wait_for(lambda: registry.is_loaded("Remote", "Net"))
        handle = registry.get_plugin("Remote", "Net")
        assert handle is not None
        assert handle.execute("Upper", b"over tls") == b"OVER TLS"
        big = handle.execute("Big", b"%d" % (3 << 20))
        assert big == b"x" * (3 << 20)
        assert handle.execute("Echo", b"y" * (1 << 20)) == b"y" * (1 << 20)
        with pytest.raises(goplug.RemoteError, match="deliberate failure"):
            handle.execute("Fail", b"tls")
        got: list[bytes] = []
        done = threading.Event()

        def on_event(data: bytes) -> None:
            got.append(data)
            if len(got) == 200:
                done.set()

        handle.register_callback(on_event, "events")
        wait_for(lambda: handle.execute("Callbacks") == b"events")
        handle.execute("NotifyMany", b"events\n200")
        assert done.wait(10)
        assert got == [str(i).encode() for i in range(200)]
        # Eight threads at once: one pooled TLS connection each.
        errors: list[BaseException] = []

        def caller(n: int) -> None:
            try:
                for i in range(50):
                    assert handle.execute("Echo", b"%d-%d" % (n, i)) == b"%d-%d" % (n, i)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        plugin.kill()
        # Either the call finds the connection gone, or the registry noticed first.
        with pytest.raises((PluginConnectionError, goplug.PluginNotLoaded)):
            handle.execute("Echo", b"gone")
        wait_for(lambda: handle.state is goplug.PluginState.STOPPED)


def test_aio_registry_over_tls(plugin_dir, spawn, certs) -> None:
    spawn(plugin_dir, "AioRemote", "", "--url=tcp://127.0.0.1:0", f"--certs={certs}")

    async def main() -> None:
        async with goplug.aio.PluginRegistry(plugin_dir, tls=tls_of(certs, "registry")) as reg:
            deadline = asyncio.get_running_loop().time() + 5
            while not reg.is_loaded("AioRemote") and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            handle = reg.get_plugin("AioRemote")
            assert handle is not None
            answers = await asyncio.gather(*(handle.execute("Echo", b"%d" % i) for i in range(20)))
            assert answers == [b"%d" % i for i in range(20)]
            assert await handle.execute("Echo", b"z" * (2 << 20)) == b"z" * (2 << 20)

    asyncio.run(main())


def test_client_without_certificate_is_refused(plugin_dir, spawn, certs) -> None:
    plugin = spawn(plugin_dir, "Guarded", "", "--url=tcp://127.0.0.1:0", f"--certs={certs}")
    port = int(url_of(plugin.pconf).rsplit(":", 1)[1])
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        # With TLS 1.3 the client's handshake ends before the server checks it: the refusal
        # shows on the first request.
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls_sock:
                tls_sock.sendall(b"POST /Echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
                answer = tls_sock.recv(100)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
            answer = repr(exc).encode()
        assert not answer.startswith(b"HTTP/"), answer
    # A registry without a client certificate fails with a typed error, not a hang.
    with (
        goplug.PluginRegistry(plugin_dir, auto_discover=False) as registry,
        pytest.raises(ConfigError, match="no certificates"),
    ):
        registry.load_plugin("Guarded")


def test_certificate_from_another_ca_is_refused_both_ways(plugin_dir, spawn, certs) -> None:
    spawn(plugin_dir, "Picky", "", "--url=tcp://127.0.0.1:0", f"--certs={certs}")
    other = trustme.CA()
    leaf = other.issue_cert("127.0.0.1", "goplug-registry")
    stranger = TLSConfig(
        ca=other.cert_pem.bytes(),
        cert=leaf.cert_chain_pems[0].bytes(),
        key=leaf.private_key_pem.bytes(),
    )
    with (
        goplug.PluginRegistry(plugin_dir, auto_discover=False, tls=stranger) as registry,
        pytest.raises(PluginConnectionError, match="TLS handshake"),
    ):
        registry.load_plugin("Picky")
    # The registry's CA right, its own certificate from a stranger: the plugin refuses it.
    half = TLSConfig(
        ca=certs / "ca.pem", cert=leaf.cert_chain_pems[0].bytes(), key=leaf.private_key_pem.bytes()
    )
    with (
        goplug.PluginRegistry(plugin_dir, auto_discover=False, tls=half) as registry,
        pytest.raises(PluginConnectionError),
    ):
        registry.load_plugin("Picky")


def test_plugin_certificate_must_name_the_announced_host(plugin_dir, tmp_path) -> None:
    made = make_dev_certs(tmp_path / "c", hosts=["plugin.example"])
    plugin = goplug.Plugin(
        plugin_dir, "Named", url="tcp://127.0.0.1:0", tls=made["plugin"], activator=None
    )
    plugin.register_method(lambda data: data, "Echo")
    with plugin:
        with (
            goplug.PluginRegistry(plugin_dir, auto_discover=False, tls=made["registry"]) as reg,
            pytest.raises(PluginConnectionError, match="TLS handshake"),
        ):
            reg.load_plugin("Named")
        registry_side = made["registry"]
        renamed = TLSConfig(
            registry_side.ca, registry_side.cert, registry_side.key, server_name="plugin.example"
        )
        with goplug.PluginRegistry(plugin_dir, auto_discover=False, tls=renamed) as reg:
            assert reg.load_plugin("Named").execute("Echo", b"ok") == b"ok"


def test_silent_connection_does_not_hold_others(plugin_dir, spawn, certs) -> None:
    plugin = spawn(plugin_dir, "Busy", "", "--url=tcp://127.0.0.1:0", f"--certs={certs}")
    port = int(url_of(plugin.pconf).rsplit(":", 1)[1])
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
    garbage = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        garbage.sendall(b"GET / HTTP/1.1\r\n\r\n" * 10)  # plaintext to a TLS port
        try:
            answer = garbage.recv(100)
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"HTTP/")  # refused (at most a TLS alert), never served
        with goplug.PluginRegistry(plugin_dir, tls=tls_of(certs, "registry")) as registry:
            wait_for(lambda: registry.is_loaded("Busy"))
            handle = registry.get_plugin("Busy")
            assert handle is not None
            assert handle.execute("Echo", b"still served") == b"still served"
    finally:
        for s in [*silent, garbage]:
            s.close()


def test_insecure_loopback_needs_the_token(plugin_dir, spawn) -> None:
    spawn(plugin_dir, "Plain", "", "--url=tcp://127.0.0.1:0", f"--token={TOKEN}")
    with goplug.PluginRegistry(plugin_dir, insecure_loopback=True, token=TOKEN) as registry:
        wait_for(lambda: registry.is_loaded("Plain"))
        handle = registry.get_plugin("Plain")
        assert handle is not None
        assert handle.execute("Upper", b"plain") == b"PLAIN"
    wrong = "another-token-of-enough-length"
    with (
        goplug.PluginRegistry(
            plugin_dir, auto_discover=False, insecure_loopback=True, token=wrong
        ) as registry,
        pytest.raises(PluginConnectionError, match="refused this registry"),
    ):
        registry.load_plugin("Plain")
    with (
        goplug.PluginRegistry(plugin_dir, auto_discover=False) as registry,
        pytest.raises(ConfigError, match="insecure_loopback"),
    ):
        registry.load_plugin("Plain")


def test_plaintext_is_refused_off_loopback(plugin_dir, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="insecure_loopback needs a shared token"):
        goplug.Plugin(plugin_dir, "NoToken", url="tcp://127.0.0.1:0", insecure_loopback=True)
    with pytest.raises(ConfigError, match="needs mutual TLS"):
        goplug.Plugin(plugin_dir, "NoTls", url="tcp://127.0.0.1:0")
    wide = goplug.Plugin(
        plugin_dir,
        "Wide",
        url="tcp://0.0.0.0:0",
        advertise="127.0.0.1",
        insecure_loopback=True,
        token=TOKEN,
    )
    with pytest.raises(ConfigError, match="only loopback"):
        wide.start()

    # A plaintext announcement pointing off loopback is refused before anything is sent (and
    # should that ever break, the guard fails the test instead of letting a packet out).
    def no_connection(*args: object, **kwargs: object) -> None:
        raise AssertionError("a plaintext connection off loopback was attempted")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    transport = TcpTransport(None, insecure_loopback=True, token=TOKEN)
    with pytest.raises(ConfigError, match="not a loopback address"):
        transport.connect("192.0.2.1:80", 1.0)


def test_all_interfaces_need_an_advertised_address(plugin_dir, certs) -> None:
    with pytest.raises(ConfigError, match="advertise"):
        goplug.Plugin(plugin_dir, "Any", url="tcp://0.0.0.0:0", tls=tls_of(certs, "plugin"))
    plugin = goplug.Plugin(
        plugin_dir,
        "Any",
        url="tcp://0.0.0.0:0",
        advertise="127.0.0.1",
        tls=tls_of(certs, "plugin"),
    )
    with plugin:
        assert plugin.announced_url.startswith("https://127.0.0.1:")


def test_tls_config_errors_are_clear(tmp_path, certs) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        TLSConfig(tmp_path / "none.pem", certs / "plugin.pem", certs / "plugin.key").pem()
    with pytest.raises(ConfigError, match="not PEM"):
        TLSConfig(b"garbage", certs / "plugin.pem", certs / "plugin.key").pem()
    mismatched = TLSConfig(certs / "ca.pem", certs / "plugin.pem", certs / "registry.key")
    with pytest.raises(ConfigError, match="do not match"):
        mismatched.server_context()
    with pytest.raises(ConfigError, match="already holds"):
        make_dev_certs(certs)
    in_memory = TLSConfig(
        (certs / "ca.pem").read_bytes(),
        (certs / "plugin.pem").read_bytes(),
        (certs / "plugin.key").read_bytes(),
    )
    assert in_memory.client_context().verify_mode is ssl.CERT_REQUIRED
    for name in ("ca.key", "plugin.key", "registry.key"):
        assert (certs / name).stat().st_mode & 0o077 == 0


def test_cli_reaches_plugins_on_tcp(plugin_dir, spawn, certs, tmp_path) -> None:
    from test_cli import goplug as run_goplug

    spawn(plugin_dir, "Cli", "Net", "--url=tcp://127.0.0.1:0", f"--certs={certs}")
    listed = run_goplug("ls", str(plugin_dir), "--json", "--tls", str(certs))
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert entry["state"] == "live" and "Upper" in entry["methods"]
    assert entry["sock"].startswith("https://127.0.0.1:")
    bare = run_goplug("ls", str(plugin_dir), "--json")
    (entry,) = json.loads(bare.stdout)
    assert entry["state"].startswith("unreachable") and "--tls" in entry["state"]
    called = run_goplug("call", str(plugin_dir), "Cli@Net", "Upper", "hi", "--tls", str(certs))
    assert called.returncode == 0 and called.stdout == b"HI", called.stderr
    refused = run_goplug("call", str(plugin_dir), "Cli@Net", "Upper", "hi")
    assert refused.returncode != 0 and b"tls=TLSConfig" in refused.stderr
    made = run_goplug("tls", "init", str(tmp_path / "fresh"), "--host", "10.0.0.5")
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == sorted(
        ["ca.pem", "ca.key", "plugin.pem", "plugin.key", "registry.pem", "registry.key"]
    )
    again = run_goplug("tls", "init", str(tmp_path / "fresh"))
    assert again.returncode != 0 and b"not overwriting" in again.stderr


def test_calls_over_tls_time_out_and_the_plugin_serves_on(plugin_dir, spawn, certs) -> None:
    import time

    plugin = spawn(plugin_dir, "Slow", "", "--url=tcp://127.0.0.1:0", f"--certs={certs}")
    with goplug.PluginRegistry(plugin_dir, tls=tls_of(certs, "registry")) as registry:
        wait_for(lambda: registry.is_loaded("Slow"))
        handle = registry.get_plugin("Slow")
        assert handle is not None
        started = time.monotonic()
        with pytest.raises(goplug.CallTimeout):
            handle.execute("Sleep", b"30", timeout=0.3)
        assert time.monotonic() - started < 5
        assert handle.execute("Echo", b"next", timeout=5) == b"next"
        # A frozen plugin: the call's deadline ends it, not the kernel or the plugin.
        freeze(plugin)  # every thread stopped, not only signalled
        try:
            with pytest.raises(goplug.CallTimeout):
                handle.execute("Echo", b"frozen", timeout=0.3)
        finally:
            plugin.signal(signal.SIGCONT)
        assert handle.execute("Echo", b"thawed", timeout=5) == b"thawed"


def test_cli_reaches_a_plaintext_loopback_plugin_with_the_token(plugin_dir, spawn) -> None:
    from test_cli import goplug as run_goplug

    spawn(plugin_dir, "PlainCli", "", "--url=tcp://127.0.0.1:0", f"--token={TOKEN}")
    listed = run_goplug("ls", str(plugin_dir), "--json", "--insecure-loopback", GOPLUG_TOKEN=TOKEN)
    (entry,) = json.loads(listed.stdout)
    assert entry["state"] == "live" and entry["sock"].startswith("http://127.0.0.1:"), entry
    called = run_goplug(
        "call",
        str(plugin_dir),
        "PlainCli",
        "Upper",
        "plain",
        "--insecure-loopback",
        "--token",
        TOKEN,
    )
    assert called.returncode == 0 and called.stdout == b"PLAIN", called.stderr
    bare = run_goplug("ls", str(plugin_dir), "--json")
    (entry,) = json.loads(bare.stdout)
    assert entry["state"].startswith("unreachable") and "insecure" in entry["state"]


def test_plugins_take_calls_from_the_registry_certificate_only(plugin_dir, spawn, certs) -> None:
    # Development plugins accept the registry's certificate, not another plugin's.
    spawn(plugin_dir, "Strict", "", "--url=tcp://127.0.0.1:0", f"--certs={certs}")
    plugin_side = tls_of(certs, "plugin")
    assert plugin_side.client_names == frozenset({"goplug-registry"})
    as_a_plugin = TLSConfig(plugin_side.ca, plugin_side.cert, plugin_side.key)
    with (
        goplug.PluginRegistry(plugin_dir, auto_discover=False, tls=as_a_plugin) as registry,
        pytest.raises(PluginConnectionError),
    ):
        registry.load_plugin("Strict")
    with goplug.PluginRegistry(plugin_dir, auto_discover=False, tls=tls_of(certs, "registry")) as r:
        assert r.load_plugin("Strict").execute("Echo", b"registry") == b"registry"
