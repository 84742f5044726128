"""Faults: plugins that die, hang, restart, leave files behind or break their announce files.

Every test ends in a typed exception or a recovered plugin, never a hang; all waits are on
conditions with deadlines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from faultkit import (
    TUNED_PLUGIN,
    EventLog,
    Registries,
    children_of_self,
    deadline_call,
    fd_count,
    freeze,
    loaded_handle,
    pconf_pid,
    read_pconf,
    start_plugin,
    wait_loaded,
)

import goplug
from goplug import (
    CallTimeout,
    ClientSettings,
    ConfigError,
    GoPlugError,
    PluginAlreadyRunning,
    PluginConnectionError,
    PluginNotLoaded,
    PluginState,
    RegistryClosed,
    RegistrySettings,
    RemoteError,
)
from goplug.wire.pconf import write_atomically

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def registries() -> Iterator[Registries]:
    made = Registries()
    try:
        yield made
    finally:
        made.close_all()


def _in_thread(fn: object) -> tuple[threading.Thread, dict[str, object]]:
    """Run ``fn()`` in a thread; the dict gets "result" (value or exception) and "at" (time)."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = fn()  # type: ignore[operator]
        except Exception as exc:
            out["result"] = exc
        out["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# -- a plugin killed while a call is in flight -----------------------------------------------------


def test_sigkill_during_call_raises_connection_error_and_marks_lost(plugin_dir, spawn, registries):
    # Several victims and rounds: the kernel tears a killed process down in an order that races
    # with the registry's liveness probe, and one lucky round proves little.
    names = ["Victim1", "Victim2", "Victim3"]
    procs = {name: start_plugin(spawn, plugin_dir, name) for name in names}
    start_plugin(spawn, plugin_dir, "Other")
    events = EventLog()
    registry = registries(plugin_dir)
    registry.add_listener(events)
    handles = {name: loaded_handle(registry, name) for name in names}
    other = loaded_handle(registry, "Other")

    for round_ in range(4):
        calls = {}
        for name, handle in handles.items():
            calls[name] = _in_thread(lambda h=handle: h.execute("Sleep", b"30"))
        for handle in handles.values():
            wait_for(lambda h=handle: h._client is not None and len(h._client._busy) == 1)
        killed_at = time.monotonic()
        for name in names:
            procs[name].kill()
        for name, (thread, out) in calls.items():
            thread.join(5)
            assert not thread.is_alive()
            assert isinstance(out["result"], PluginConnectionError), (name, out["result"])
            assert out["at"] - killed_at < 1.0, name  # type: ignore[operator]
        for name, handle in handles.items():
            wait_for(lambda h=handle: h.state is PluginState.STOPPED, timeout=2)
            assert events.kinds(name).count("lost") == round_ + 1, (round_, name)
            with pytest.raises(PluginNotLoaded):
                handle.execute("Echo", b"x")
        # The other plugin never noticed.
        assert other.execute("Echo", b"still here") == b"still here"
        assert other.state is PluginState.LOADED
        for name in names:
            procs[name] = start_plugin(spawn, plugin_dir, name)
        for handle in handles.values():
            wait_loaded(handle)
    assert events.kinds("Other") == ["discovered", "loaded"]


# -- a plugin that stops answering -----------------------------------------------------------------


def test_sigstopped_plugin_call_times_out_and_connection_is_never_reused(
    plugin_dir, spawn, registries
):
    plugin = start_plugin(spawn, plugin_dir, "Frozen")
    registry = registries(plugin_dir)
    handle = loaded_handle(registry, "Frozen")
    assert handle.execute("Echo", b"warm") == b"warm"
    client = handle._client
    assert client is not None
    pooled = list(client._idle)
    assert pooled

    freeze(plugin)
    try:
        result, elapsed = deadline_call(lambda: handle.execute("Echo", b"first", timeout=0.5), 2)
        assert isinstance(result, CallTimeout), result
        assert 0.4 <= elapsed < 1.5
        # The connection the call used was closed and left the pool.
        assert all(conn.sock.fileno() == -1 for conn in pooled)
        assert client.open_connections == 0
    finally:
        plugin.signal(signal.SIGCONT)
    # Had the old connection been reused, this call would read the late answer b"first".
    assert handle.execute("Echo", b"second", timeout=5) == b"second"
    assert handle.execute("Echo", b"third", timeout=5) == b"third"
    assert handle.state is PluginState.LOADED


def test_method_that_never_returns_times_out_and_plugin_keeps_serving(
    plugin_dir, spawn, registries
):
    start_plugin(spawn, plugin_dir, "Sleepy")
    registry = registries(plugin_dir)
    handle = loaded_handle(registry, "Sleepy")
    result, elapsed = deadline_call(lambda: handle.execute("Sleep", b"3600", timeout=0.3), 2)
    assert isinstance(result, CallTimeout), result
    assert elapsed < 1.0
    assert handle.execute("Echo", b"alive") == b"alive"
    assert handle.state is PluginState.LOADED


def test_default_call_timeout_applies_without_a_per_call_timeout(plugin_dir, spawn, registries):
    assert ClientSettings().call_timeout == 30.0
    start_plugin(spawn, plugin_dir, "Sleepy")
    settings = RegistrySettings(client=ClientSettings(call_timeout=0.4))
    registry = registries(plugin_dir, settings)
    handle = loaded_handle(registry, "Sleepy")
    result, elapsed = deadline_call(lambda: handle.execute("Sleep", b"3600"), 2)
    assert isinstance(result, CallTimeout), result
    assert 0.3 <= elapsed < 1.2


def test_ping_has_its_own_short_timeout(plugin_dir, spawn, registries):
    defaults = ClientSettings()
    assert defaults.ping_timeout < defaults.call_timeout
    plugin = start_plugin(spawn, plugin_dir, "Frozen")
    settings = RegistrySettings(client=ClientSettings(call_timeout=60, ping_timeout=0.3))
    registry = registries(plugin_dir, settings)
    handle = loaded_handle(registry, "Frozen")
    assert handle.ping() >= 0
    freeze(plugin)
    try:
        result, elapsed = deadline_call(handle.ping, 2)
        assert isinstance(result, CallTimeout), result
        assert elapsed < 1.0
    finally:
        plugin.signal(signal.SIGCONT)
    assert handle.ping() >= 0


# -- restarts under the same identity --------------------------------------------------------------


@pytest.mark.parametrize("wait_for_loss", [True, False], ids=["after-loss", "immediately"])
def test_restarted_plugin_is_reloaded_and_old_handle_works(
    plugin_dir, spawn, registries, wait_for_loss
):
    first = start_plugin(spawn, plugin_dir, "Phoenix", "NS")
    events = EventLog()
    registry = registries(plugin_dir)
    registry.add_listener(events)
    handle = loaded_handle(registry, "Phoenix", "NS")
    assert handle.execute("Pid") == str(first.pid).encode()

    first.kill()
    if wait_for_loss:
        with pytest.raises(PluginConnectionError):
            handle.execute("Echo", b"x")
        wait_for(lambda: handle.state is PluginState.STOPPED, timeout=2)
    second = start_plugin(spawn, plugin_dir, "Phoenix", "NS")
    assert second.pid != first.pid

    def answers_from_new_process() -> bool:
        try:
            return handle.execute("Pid", timeout=2) == str(second.pid).encode()
        except GoPlugError:
            return False

    wait_for(answers_from_new_process, timeout=5)
    assert registry.get_plugin("Phoenix", "NS") is handle
    assert handle.state is PluginState.LOADED
    assert handle.execute("Upper", b"again") == b"AGAIN"
    assert events.kinds("Phoenix")[-1] == "loaded"


def test_call_in_flight_when_the_plugin_reannounces_is_not_registry_closed(
    plugin_dir, spawn, registries
):
    plugin = start_plugin(spawn, plugin_dir, "Shifty")
    registry = registries(plugin_dir)
    handle = loaded_handle(registry, "Shifty")
    thread, out = _in_thread(lambda: handle.execute("Sleep", b"30"))
    wait_for(lambda: handle._client is not None and len(handle._client._busy) == 1)
    conf = read_pconf(plugin.pconf)
    conf["Pid"] += 1  # what a new process behind the same socket path would announce
    write_atomically(str(plugin.pconf), json.dumps(conf).encode())
    thread.join(5)
    assert not thread.is_alive()
    wait_loaded(handle)
    assert handle.execute("Echo", b"reloaded") == b"reloaded"
    assert isinstance(out["result"], PluginConnectionError), out["result"]


def test_gracefully_restarted_plugin_is_reloaded(plugin_dir, spawn, registries):
    first = start_plugin(spawn, plugin_dir, "Calm")
    events = EventLog()
    registry = registries(plugin_dir)
    registry.add_listener(events)
    handle = loaded_handle(registry, "Calm")
    assert first.terminate() == 0
    wait_for(lambda: handle.state is PluginState.STOPPED, timeout=2)
    assert "lost" in events.kinds("Calm")
    second = start_plugin(spawn, plugin_dir, "Calm")
    wait_loaded(handle)
    assert handle.execute("Pid") == str(second.pid).encode()


# -- stale files left by a crashed plugin ----------------------------------------------------------


def test_stale_pconf_is_noticed_once_and_not_retried_in_a_loop(
    plugin_dir, spawn, registries, caplog
):
    caplog.set_level(logging.DEBUG, logger="goplug")
    dead = start_plugin(spawn, plugin_dir, "Stale")
    dead.kill()  # leaves Stale.pconf and Stale.sock behind
    assert (plugin_dir / "Stale.pconf").exists() and (plugin_dir / "Stale.sock").exists()
    settings = RegistrySettings(health_interval=0.05)
    registry = registries(plugin_dir, settings)

    def about_stale() -> list[str]:
        return [r.getMessage() for r in caplog.records if "Stale" in r.getMessage()]

    wait_for(lambda: about_stale(), timeout=3)
    handle = registry._handles[("", "Stale")]
    wait_for(lambda: handle.state is PluginState.STOPPED, timeout=2)
    assert "nobody answers" in about_stale()[0]
    events = EventLog()
    registry.add_listener(events)

    # Many health ticks later: still one notice, no reconnection loop.
    ticks = time.monotonic() + 1.0
    wait_for(lambda: time.monotonic() > ticks, timeout=2)
    assert len(about_stale()) == 1, about_stale()
    assert events.events == []

    # Asked explicitly, it fails fast with a typed error.
    result, elapsed = deadline_call(lambda: registry.load_plugin("Stale"), 3)
    assert isinstance(result, PluginConnectionError), result
    assert elapsed < 1.0


def test_plugin_starting_over_a_stale_socket_removes_it(plugin_dir, spawn, registries):
    stale = plugin_dir / "Reborn.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale))
    leftover.close()  # a socket file nobody listens on, as a crash leaves it
    assert stat.S_ISSOCK(os.lstat(stale).st_mode)
    plugin = start_plugin(spawn, plugin_dir, "Reborn")
    registry = registries(plugin_dir)
    handle = loaded_handle(registry, "Reborn")
    assert handle.execute("Pid") == str(plugin.pid).encode()


def test_plugin_refuses_to_start_over_a_live_plugin(plugin_dir, spawn, registries):
    live = start_plugin(spawn, plugin_dir, "Owner", "NS")
    before = (plugin_dir / "Owner@NS.pconf").read_bytes()
    intruder = goplug.Plugin(plugin_dir, "Owner", "NS")
    with pytest.raises(PluginAlreadyRunning, match="already listens"):
        intruder.start()
    assert (plugin_dir / "Owner@NS.pconf").read_bytes() == before
    registry = registries(plugin_dir)
    handle = loaded_handle(registry, "Owner", "NS")
    assert handle.execute("Pid") == str(live.pid).encode()


# -- broken announce files -------------------------------------------------------------------------

_HUGE = b'{"Name":"Bad","Sock":"/x","Pad":"' + b"x" * (10 * 1024 * 1024) + b'"}'

BROKEN = {
    "empty": (b"", "empty"),
    "truncated": (b'{"Name":"Bad","NameSpace":"NS","Sock":"/tmp/x.so', "not valid JSON"),
    "not-json": (b"this is not JSON\n", "not valid JSON"),
    "missing-keys": (b'{"Name":"Bad","NameSpace":"NS"}', "missing key 'Sock'"),
    "wrong-types": (b'{"Name":"Bad","Sock":"/x","LazyLoad":"false"}', "must be a bool"),
    "name-not-string": (b'{"Name":42,"Sock":"/x"}', "must be a str"),
    "huge": (_HUGE, "larger than"),
    "symlink": (None, "symlink"),
    "directory": (None, "not a regular file"),
    "fifo": (None, "not a regular file"),
}


def _make_broken(path: Path, kind: str, good: Path) -> None:
    content = BROKEN[kind][0]
    if kind == "symlink":
        os.symlink(good, path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
    else:
        assert content is not None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)


# load_plugin("Bad", "NS") finds a broken file by its stem: Bad@NS, NSBad or Bad.
BROKEN_CASES = [(kind, "Bad@NS") for kind in BROKEN] + [
    ("empty", "NSBad"),
    ("symlink", "Bad"),
    ("missing-keys", "Bad"),
]


@pytest.mark.parametrize(("kind", "stem"), BROKEN_CASES)
def test_broken_pconf_is_logged_skipped_and_load_raises_config_error(
    plugin_dir, spawn, registries, caplog, kind, stem
):
    caplog.set_level(logging.INFO, logger="goplug")
    start_plugin(spawn, plugin_dir, "Good", "NS")
    broken = plugin_dir / f"{stem}.pconf"
    _make_broken(broken, kind, plugin_dir / "Good@NS.pconf")
    registry = registries(plugin_dir)

    good = loaded_handle(registry, "Good", "NS")
    assert good.execute("Echo", b"fine") == b"fine"
    wait_for(lambda: str(broken) in registry.broken(), timeout=3)
    reason = BROKEN[kind][1]
    assert reason in str(registry.broken()[str(broken)])
    logged = [
        r.getMessage()
        for r in caplog.records
        if str(broken) in r.getMessage() and r.levelno >= logging.WARNING
    ]
    assert len(logged) == 1 and reason in logged[0], logged

    with pytest.raises(ConfigError) as info:
        registry.load_plugin("Bad", "NS")
    assert str(broken) in str(info.value) and reason in str(info.value)
    assert good.execute("Echo", b"still fine") == b"still fine"
    assert [h.name for h in registry.loaded()] == ["Good"]


def test_broken_pconf_without_auto_discovery(plugin_dir, registries):
    (plugin_dir / "Bad@NS.pconf").write_bytes(b"{not json")
    registry = registries(plugin_dir, auto_discover=False)
    with pytest.raises(ConfigError, match="not valid JSON"):
        registry.load_plugin("Bad", "NS")


# -- methods that raise or kill their process ------------------------------------------------------


def test_method_that_raises_gives_remote_error_and_plugin_keeps_serving(
    plugin_dir, spawn, registries
):
    plugin = start_plugin(spawn, plugin_dir, "Raiser")
    registry = registries(plugin_dir)
    handle = loaded_handle(registry, "Raiser")
    for _ in range(3):
        with pytest.raises(RemoteError) as info:
            handle.execute("Fail", b"boom")
        err = info.value
        assert err.remote_type == "ValueError"
        assert err.remote_message == "deliberate failure: boom"
        assert "Traceback (most recent call last)" in err.remote_traceback
        assert "def Fail" in err.remote_traceback or "in Fail" in err.remote_traceback
        assert handle.execute("Pid") == str(plugin.pid).encode()
    assert handle.state is PluginState.LOADED


@pytest.mark.parametrize("method", ["Exit", "Segfault"])
def test_method_that_kills_its_process_gives_connection_error_and_lost(
    plugin_dir, spawn, registries, method
):
    events = EventLog()
    registry = registries(plugin_dir)
    registry.add_listener(events)
    # Several rounds: the teardown order of a dying process races with the liveness probe.
    for round_ in range(5):
        plugin = start_plugin(spawn, plugin_dir, "Suicidal")
        handle = loaded_handle(registry, "Suicidal")
        result, elapsed = deadline_call(lambda h=handle: h.execute(method), 5)
        assert isinstance(result, PluginConnectionError), result
        assert elapsed < 2.0
        plugin.proc.wait(5)
        wait_for(lambda h=handle: h.state is PluginState.STOPPED, timeout=2)
        assert events.kinds("Suicidal").count("lost") == round_ + 1


# -- socket paths too long for a Unix socket address -----------------------------------------------


def test_long_plugin_directory_uses_a_short_private_socket_path(plugin_dir, spawn, registries):
    base = str(plugin_dir) + "/"
    long_dir = Path(base + "L" * (200 - len(base)))
    assert len(str(long_dir)) == 200
    wanted = str(long_dir / "Long@NS.sock")
    expected = os.path.join(
        tempfile.gettempdir(),
        f"goplug-{os.getuid()}",
        hashlib.sha256(os.fsencode(wanted)).hexdigest()[:24] + ".sock",
    )
    plugin = start_plugin(spawn, long_dir, "Long", "NS")
    try:
        assert stat.S_IMODE(os.stat(long_dir).st_mode) == 0o700
        conf = read_pconf(long_dir / "Long@NS.pconf")
        assert conf["Sock"] == expected
        info = os.lstat(expected)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        private = os.lstat(os.path.dirname(expected))
        assert stat.S_IMODE(private.st_mode) == 0o700 and private.st_uid == os.getuid()

        registry = registries(long_dir)
        handle = loaded_handle(registry, "Long", "NS")
        assert handle.execute("Echo", b"through a short path") == b"through a short path"
        assert handle.execute("Pid") == str(plugin.pid).encode()
        assert plugin.terminate() == 0
        assert not os.path.lexists(expected)
    finally:
        plugin.kill()
        if os.path.lexists(expected):
            os.unlink(expected)


# -- callback polls cut, slow consumers ------------------------------------------------------------


class Inbox:
    """A callback that records what it receives."""

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self.lock:
            self.items.append(data)

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)


def _cut(sub: goplug.Subscription) -> object:
    """Cut the subscription's poll connection for real; return the cut connection."""
    conn = sub._conn
    assert conn is not None
    conn.sock.shutdown(socket.SHUT_RDWR)
    return conn


def _polling_on_new_connection(sub: goplug.Subscription, old: object) -> bool:
    conn = sub._conn
    return conn is not None and conn is not old


def test_cut_poll_resubscribes_and_delivers_in_order_exactly_once(plugin_dir, spawn, registries):
    start_plugin(spawn, plugin_dir, "Talker")
    registry = registries(plugin_dir)
    handle = loaded_handle(registry, "Talker")
    inbox = Inbox()
    sub = handle.register_callback(inbox, "evt")
    wait_for(lambda: handle.execute("Callbacks") == b"evt", timeout=3)
    wait_for(lambda: sub._conn is not None)

    expected: list[bytes] = []
    for round_ in range(6):
        old = _cut(sub)
        # Sent while the poll is down (re-subscribing waits out a backoff first).
        for j in range(5):
            payload = f"{round_}-{j}".encode()
            assert handle.execute("Notify", b"evt\n" + payload) == b"1"
            expected.append(payload)
        wait_for(lambda old=old: _polling_on_new_connection(sub, old), timeout=5)
        wait_for(lambda: len(inbox) >= len(expected), timeout=5)
    wait_for(lambda: len(inbox) == len(expected), timeout=5)
    assert inbox.items == expected
    assert sub.alive


def test_cuts_during_a_notification_stream_lose_and_duplicate_nothing(
    plugin_dir, spawn, registries
):
    start_plugin(spawn, plugin_dir, "Stream")
    registry = registries(plugin_dir)
    handle = loaded_handle(registry, "Stream")
    inbox = Inbox()
    sub = handle.register_callback(inbox, "evt")
    wait_for(lambda: handle.execute("Callbacks") == b"evt", timeout=3)
    total = 20_000
    assert handle.execute("NotifyMany", b"evt\n%d" % total) == b"started"
    cuts = 0
    deadline = time.monotonic() + 15
    while len(inbox) < total and cuts < 8 and time.monotonic() < deadline:
        seen = len(inbox)
        wait_for(lambda seen=seen: len(inbox) > seen or len(inbox) >= total, timeout=5)
        if sub._conn is not None and len(inbox) < total:
            old = _cut(sub)
            cuts += 1
            wait_for(lambda old=old: _polling_on_new_connection(sub, old), timeout=5)
    wait_for(lambda: len(inbox) >= total, timeout=15)
    assert cuts >= 1
    assert inbox.items == [str(i).encode() for i in range(total)]


def test_resubscribing_after_a_cut_stays_prompt_after_many_cuts(plugin_dir, spawn, registries):
    start_plugin(spawn, plugin_dir, "Cutty")
    registry = registries(plugin_dir)
    handle = loaded_handle(registry, "Cutty")
    inbox = Inbox()
    sub = handle.register_callback(inbox, "evt")
    wait_for(lambda: handle.execute("Callbacks") == b"evt", timeout=3)
    gaps = []
    for i in range(8):
        # Each cut follows a successful re-subscription and delivery.
        assert handle.execute("Notify", b"evt\n%d" % i) == b"1"
        wait_for(lambda i=i: len(inbox) == i + 1, timeout=5)
        old = _cut(sub)
        cut_at = time.monotonic()
        wait_for(lambda old=old: _polling_on_new_connection(sub, old), timeout=5)
        gaps.append(time.monotonic() - cut_at)
    # A backoff is for attempts that fail; one that succeeded starts the next wait afresh.
    assert max(gaps) < 0.5, [round(g, 3) for g in gaps]


def test_subscription_survives_a_plugin_restart(plugin_dir, spawn, registries):
    first = start_plugin(spawn, plugin_dir, "Again")
    registry = registries(plugin_dir)
    handle = loaded_handle(registry, "Again")
    inbox = Inbox()
    handle.register_callback(inbox, "evt")
    wait_for(lambda: handle.execute("Callbacks") == b"evt", timeout=3)
    assert handle.execute("Notify", b"evt\nbefore") == b"1"
    wait_for(lambda: len(inbox) == 1)
    first.kill()
    start_plugin(spawn, plugin_dir, "Again")

    def subscribed_again() -> bool:
        try:
            return handle.execute("Callbacks", timeout=1) == b"evt"
        except GoPlugError:
            return False

    wait_for(subscribed_again, timeout=5)
    assert handle.execute("Notify", b"evt\nafter") == b"1"
    wait_for(lambda: len(inbox) == 2, timeout=3)
    assert inbox.items == [b"before", b"after"]


def _tuned(spawn, plugin_dir, name, *opts):
    return start_plugin(spawn, plugin_dir, name, "", *opts, script=TUNED_PLUGIN)


def test_slow_consumer_notify_applies_back_pressure_then_times_out(plugin_dir, spawn, registries):
    defaults = goplug.CallbackSettings()
    assert (defaults.max_queue, defaults.notify_timeout) == (10_000, 10.0)
    _tuned(spawn, plugin_dir, "Slow", "--max-queue=5", "--notify-timeout=0.5")
    registry = registries(plugin_dir)
    handle = loaded_handle(registry, "Slow")
    gate = threading.Event()
    got = Inbox()

    def slow(data: bytes) -> None:
        got(data)
        gate.wait(20)

    handle.register_callback(slow, "slow")
    wait_for(lambda: _callbacks_of(handle) == ["slow"], timeout=3)
    try:
        answer = json.loads(handle.execute("NotifyN", b"slow\n20", timeout=10))
    finally:
        gate.set()
    assert answer["accepted"] == 5  # the bound: nothing dropped, the sixth was refused
    assert answer["error"] == "NotifyTimeout"
    assert 0.45 <= answer["elapsed"] < 3.0
    wait_for(lambda: len(got) == 5, timeout=3)
    assert got.items == [str(i).encode() for i in range(5)]
    # Once the consumer caught up, notify flows again.
    assert json.loads(handle.execute("NotifyN", b"slow\n3"))["accepted"] == 3
    wait_for(lambda: len(got) == 8, timeout=3)


def test_slow_consumer_blocked_notify_proceeds_when_consumer_catches_up(
    plugin_dir, spawn, registries
):
    _tuned(spawn, plugin_dir, "Slow", "--max-queue=5", "--notify-timeout=10")
    registry = registries(plugin_dir)
    handle = loaded_handle(registry, "Slow")
    gate = threading.Event()
    got = Inbox()

    def slow(data: bytes) -> None:
        got(data)
        gate.wait(20)

    handle.register_callback(slow, "slow")
    wait_for(lambda: _callbacks_of(handle) == ["slow"], timeout=3)
    thread, out = _in_thread(lambda: handle.execute("NotifyN", b"slow\n8\n10", timeout=20))
    try:
        wait_for(lambda: handle.execute("Progress") == b"5", timeout=5)
        assert thread.is_alive()  # notify #6 is blocked on the full queue
        assert len(got) == 1
    finally:
        gate.set()
    thread.join(10)
    answer = json.loads(out["result"])  # type: ignore[arg-type]
    assert answer == {"accepted": 8, "error": "", "elapsed": answer["elapsed"]}
    wait_for(lambda: len(got) == 8, timeout=3)
    assert got.items == [str(i).encode() for i in range(8)]


def _callbacks_of(handle: goplug.PluginHandle) -> list[str]:
    """Callback names the plugin itself has subscribers for."""
    return [n for n in handle.execute("Callbacks").decode().split(",") if n]


# -- closing the registry with work in flight ------------------------------------------------------


def test_close_with_calls_and_polls_in_flight(plugin_dir, spawn):
    plugin = start_plugin(spawn, plugin_dir, "Busy")
    fds_before = fd_count()
    threads_before = set(threading.enumerate())

    registry = goplug.PluginRegistry(plugin_dir)
    try:
        handle = loaded_handle(registry, "Busy")
        subs = [handle.register_callback(Inbox(), f"cb{i}") for i in range(2)]
        wait_for(lambda: all(s._conn is not None for s in subs), timeout=3)
        calls = [_in_thread(lambda: handle.execute("Sleep", b"30")) for _ in range(4)]
        wait_for(lambda: handle._client is not None and len(handle._client._busy) == 4)

        started = time.monotonic()
        registry.close()
        assert time.monotonic() - started < 1.0
    finally:
        registry.close()

    for thread, out in calls:
        thread.join(2)
        assert not thread.is_alive()
        assert isinstance(out["result"], RegistryClosed), out["result"]
        assert out["at"] - started < 1.0  # type: ignore[operator]
    assert not any(s.alive for s in subs)
    with pytest.raises(RegistryClosed):
        registry.load_plugin("Busy")
    with pytest.raises(GoPlugError):
        handle.execute("Echo", b"x")

    wait_for(lambda: fd_count() <= fds_before, timeout=3)
    wait_for(lambda: set(threading.enumerate()) <= threads_before, timeout=3)
    assert children_of_self() <= {plugin.pid}
    assert pconf_pid(plugin.pconf) == plugin.pid  # the plugin was not touched
