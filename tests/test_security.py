"""Security: file modes, peer credentials, ownership checks, socket kinds and name validation.

Tests that need a second user run a rogue plugin or a client as ``nobody`` (dropping privileges
with os.setuid in a child process); they are skipped unless the tests run as root.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from faultkit import (
    NOBODY,
    ROGUE_PLUGIN,
    TUNED_PLUGIN,
    Registries,
    loaded_handle,
    read_pconf,
    start_plugin,
    status_of,
)

import goplug
from goplug import (
    ConfigError,
    PluginConnectionError,
    PluginNotDiscovered,
    PluginState,
    RegistrySettings,
)

pytestmark = pytest.mark.timeout(60)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to act as a second user (nobody)"
)


@pytest.fixture
def registries() -> Iterator[Registries]:
    made = Registries()
    try:
        yield made
    finally:
        made.close_all()


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- file modes ------------------------------------------------------------------------------------


def test_plugin_creates_directory_0700_and_files_0600_whatever_the_umask(plugin_dir, spawn):
    location = plugin_dir / "made" / "by-plugin"
    old = os.umask(0)  # the plugin inherits the most permissive umask
    try:
        plugin = start_plugin(spawn, location, "Modes", "NS")
    finally:
        os.umask(old)
    conf = read_pconf(plugin.pconf)
    assert _mode(location) == 0o700
    assert _mode(plugin.pconf) == 0o600
    assert stat.S_ISSOCK(os.lstat(conf["Sock"]).st_mode)
    assert _mode(conf["Sock"]) == 0o600
    assert conf["Sock"] == str(location / "Modes@NS.sock")


def test_registry_creates_its_directory_0700(plugin_dir, registries):
    location = plugin_dir / "made-by-registry"
    old = os.umask(0)
    try:
        registries(location)
    finally:
        os.umask(old)
    assert _mode(location) == 0o700


def test_private_socket_directory_with_loose_mode_is_refused(plugin_dir, monkeypatch):
    fake_tmp = plugin_dir / "tmp"
    fake_tmp.mkdir()
    private = fake_tmp / f"goplug-{os.getuid()}"
    private.mkdir()
    os.chmod(private, 0o777)  # someone loosened it, or planted it
    monkeypatch.setattr(tempfile, "tempdir", str(fake_tmp))
    long_dir = plugin_dir / ("L" * 120)
    plugin = goplug.Plugin(long_dir, "Long")
    with pytest.raises(ConfigError, match="0700"):
        plugin.start()
    assert not (long_dir / "Long.pconf").exists()


# -- peer credentials ------------------------------------------------------------------------------


def _as_nobody_request(sock_path: str, request: bytes) -> bytes | str:
    """Send ``request`` to ``sock_path`` from a child running as nobody; return what came back.

    Returns the bytes received until the plugin closed, or an error description.
    """
    gid = pwd.getpwuid(NOBODY).pw_gid  # looked up before fork: the child takes no locks
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(NOBODY)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(sock_path)
            with contextlib.suppress(OSError):
                sock.sendall(request)
            data = b""
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except ConnectionResetError:
                pass
            os.write(write_end, b"OK" + data)
        except BaseException as exc:
            os.write(write_end, f"ERR{type(exc).__name__}: {exc}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        out = b""
        while chunk := os.read(read_end, 65536):
            out += chunk
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return out[2:] if out.startswith(b"OK") else out.decode()


def _open_to_everyone(location: Path, sock: str) -> None:
    """Let other users reach the socket through the file system, so only SO_PEERCRED guards it."""
    os.chmod(location, 0o755)
    os.chmod(sock, 0o666)


PING = b"POST /Ping HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\nping"


@needs_root
def test_connection_from_another_uid_is_closed_without_an_answer(plugin_dir, spawn, registries):
    plugin = start_plugin(spawn, plugin_dir, "Guarded")
    sock = read_pconf(plugin.pconf)["Sock"]
    _open_to_everyone(plugin_dir, sock)
    answer = _as_nobody_request(sock, PING)
    assert answer == b"", answer
    # Its own uid is still served (once the socket is private again, else the registry refuses).
    os.chmod(sock, 0o600)
    registry = registries(plugin_dir)
    assert loaded_handle(registry, "Guarded").ping() >= 0


@needs_root
def test_allowed_uids_admit_another_uid(plugin_dir, spawn):
    plugin = start_plugin(
        spawn, plugin_dir, "Open", "", f"--allowed-uids=0,{NOBODY}", script=TUNED_PLUGIN
    )
    sock = read_pconf(plugin.pconf)["Sock"]
    _open_to_everyone(plugin_dir, sock)
    answer = _as_nobody_request(sock, PING)
    assert isinstance(answer, bytes) and status_of(answer) == 200, answer
    assert answer.endswith(b"ping")


def test_socket_mode_keeps_other_users_out_before_peer_credentials(plugin_dir, spawn):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as a second user (nobody)")
    plugin = start_plugin(spawn, plugin_dir, "Private")
    sock = read_pconf(plugin.pconf)["Sock"]
    os.chmod(plugin_dir, 0o755)  # the directory is open, the 0600 socket is not
    answer = _as_nobody_request(sock, PING)
    assert isinstance(answer, str) and "PermissionError" in answer, answer


# -- ownership and permission checks of the registry -----------------------------------------------


def _refused(registry: goplug.PluginRegistry, path: Path, reason: str) -> None:
    wait_for(lambda: str(path) in registry.broken(), timeout=3)
    assert reason in str(registry.broken()[str(path)])


@needs_root
def test_registry_refuses_a_pconf_owned_by_another_uid(plugin_dir, spawn, registries, caplog):
    plugin = start_plugin(spawn, plugin_dir, "Owned")
    os.chown(plugin.pconf, NOBODY, -1)
    registry = registries(plugin_dir)
    _refused(registry, plugin.pconf, f"owned by uid {NOBODY}")
    assert any(str(plugin.pconf) in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="not allowed"):
        registry.load_plugin("Owned")
    assert not registry.is_loaded("Owned")


@needs_root
def test_rogue_plugin_running_as_another_user_is_refused(plugin_dir, spawn, registries):
    os.chmod(plugin_dir, 0o777)  # let nobody announce itself here
    rogue = start_plugin(spawn, plugin_dir, "Rogue", "", f"--user={NOBODY}", script=ROGUE_PLUGIN)
    assert os.stat(rogue.pconf).st_uid == NOBODY
    sock = read_pconf(rogue.pconf)["Sock"]
    assert os.stat(sock).st_uid == NOBODY

    registry = registries(plugin_dir)
    _refused(registry, rogue.pconf, f"owned by uid {NOBODY}")
    with pytest.raises(ConfigError, match="not allowed"):
        registry.load_plugin("Rogue")

    # The socket is checked too, not only the announce file.
    os.chown(rogue.pconf, 0, 0)
    strict = registries(plugin_dir, auto_discover=False)
    with pytest.raises(ConfigError, match=f"socket of Rogue .* owned by uid {NOBODY}"):
        strict.load_plugin("Rogue")

    # Allowed explicitly, the same plugin loads: the refusal was about its owner.
    trusting = registries(plugin_dir, RegistrySettings(allowed_uids=frozenset({0, NOBODY})))
    handle = loaded_handle(trusting, "Rogue")
    assert handle.execute("Echo", b"allowed") == b"allowed"


def test_registry_refuses_a_world_writable_pconf(plugin_dir, spawn, registries):
    plugin = start_plugin(spawn, plugin_dir, "Loose")
    os.chmod(plugin.pconf, 0o666)
    registry = registries(plugin_dir)
    _refused(registry, plugin.pconf, "writable by every user")
    with pytest.raises(ConfigError, match="writable by every user"):
        registry.load_plugin("Loose")


def test_registry_refuses_a_world_writable_socket(plugin_dir, spawn, registries):
    plugin = start_plugin(spawn, plugin_dir, "LooseSock")
    os.chmod(read_pconf(plugin.pconf)["Sock"], 0o666)
    registry = registries(plugin_dir, auto_discover=False)
    with pytest.raises(ConfigError, match="writable by every user"):
        registry.load_plugin("LooseSock")


# -- what Sock may name ----------------------------------------------------------------------------


def _announce(location: Path, stem: str, **fields: object) -> Path:
    path = location / f"{stem}.pconf"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(fields, f)
    return path


@pytest.mark.parametrize("kind", ["regular-file", "fifo", "directory", "symlink-to-socket"])
def test_sock_must_name_a_socket(plugin_dir, spawn, registries, kind):
    real = start_plugin(spawn, plugin_dir, "Real")
    target = plugin_dir / f"target-{kind}"
    if kind == "regular-file":
        target.write_bytes(b"")
        os.chmod(target, 0o600)
    elif kind == "fifo":
        os.mkfifo(target, 0o600)
    elif kind == "directory":
        target.mkdir(mode=0o700)
    else:
        os.symlink(read_pconf(real.pconf)["Sock"], target)
    _announce(plugin_dir, "Fake", Name="Fake", Sock=str(target))
    registry = registries(plugin_dir, auto_discover=False)
    with pytest.raises(ConfigError, match="not a socket"):
        registry.load_plugin("Fake")


def test_sock_that_does_not_exist_is_a_connection_error(plugin_dir, registries):
    _announce(plugin_dir, "Ghost", Name="Ghost", Sock=str(plugin_dir / "nowhere.sock"))
    registry = registries(plugin_dir, auto_discover=False)
    with pytest.raises(PluginConnectionError):
        registry.load_plugin("Ghost")


# -- names -----------------------------------------------------------------------------------------

BAD_NAMES = ["a/b", "..", ".", "../etc", "a\x00b", "a\nb", "tab\there", "del\x7f"]


@pytest.mark.parametrize("bad", BAD_NAMES)
@pytest.mark.parametrize("key", ["Name", "NameSpace"])
def test_registry_rejects_unsafe_names(plugin_dir, registries, key, bad):
    fields = {"Name": "Ok", "NameSpace": "NS", "Sock": str(plugin_dir / "x.sock")}
    fields[key] = bad
    path = _announce(plugin_dir, "Ok@NS", **fields)
    registry = registries(plugin_dir)
    _refused(registry, path, "invalid")
    with pytest.raises(ConfigError, match="invalid"):
        registry.load_plugin("Ok", "NS")
    assert registry.discovered() == []


@pytest.mark.parametrize("bad", [*BAD_NAMES, "a@b"])
def test_plugin_rejects_unsafe_names(plugin_dir, bad):
    with pytest.raises(ConfigError):
        goplug.Plugin(plugin_dir, bad)
    with pytest.raises(ConfigError):
        goplug.Plugin(plugin_dir, "Ok", bad)
    assert os.listdir(plugin_dir) == []


def test_plugin_rejects_an_empty_name(plugin_dir):
    with pytest.raises(ConfigError):
        goplug.Plugin(plugin_dir, "")


@pytest.mark.parametrize("url", ["unix://a\r\nX-Injected: 1", "unix://a b", "unix://host/pa th"])
def test_registry_rejects_a_url_that_would_inject_headers(plugin_dir, registries, url):
    path = _announce(plugin_dir, "Inj", Name="Inj", Url=url, Sock=str(plugin_dir / "x.sock"))
    registry = registries(plugin_dir)
    _refused(registry, path, "invalid 'Url'")


def test_refused_files_do_not_disturb_a_good_plugin(plugin_dir, spawn, registries):
    start_plugin(spawn, plugin_dir, "Good")
    _announce(plugin_dir, "Evil", Name="../Evil", Sock=str(plugin_dir / "x.sock"))
    registry = registries(plugin_dir)
    handle = loaded_handle(registry, "Good")
    assert handle.execute("Echo", b"ok") == b"ok"
    assert handle.state is PluginState.LOADED
    with pytest.raises((ConfigError, PluginNotDiscovered)):
        registry.load_plugin("../Evil")
