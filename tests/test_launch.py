"""Plugins the application launches: handshake, start failures, restarts, health, stop, logs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, TEST_PLUGIN, Spawner, wait_for
from cplugin import c_plugin_or_skip

import goplug
from goplug import (
    ClientSettings,
    LaunchSettings,
    PluginEvent,
    PluginRegistry,
    PluginStartError,
    PluginState,
    RegistrySettings,
)
from goplug.process import ProcessIdentity, is_descendant, parse_log_line, process_start_time

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc needed")

GO_PLUGIN = Path(__file__).resolve().parent / "gopeers" / "go_plugin.py"
NODE_PLUGIN = REPO / "examples" / "node" / "plugin.js"
DO_PLUGIN = REPO / "examples" / "python" / "do_plugin.py"

# A plugin that comes up, is loaded, then ends with the exit code in $EXIT_CODE shortly after.
ENDING_PLUGIN = """
import os, sys, threading
sys.path.insert(0, {plugins!r})
from test_plugin import build

plugin = build(None, "Ends", "T")
done = threading.Event()
plugin.activator = lambda data: done.set()
plugin.start()
done.wait(30)
threading.Timer(0.05, lambda: os._exit(int(os.environ.get("EXIT_CODE", "1")))).start()
threading.Event().wait()
"""

# A plugin that does not leave when asked: SIGTERM is ignored.
STUBBORN_PLUGIN = """
import signal, sys, threading
sys.path.insert(0, {plugins!r})
from test_plugin import build

plugin = build(None, "Stubborn", "T")
plugin.start()
signal.signal(signal.SIGTERM, signal.SIG_IGN)
threading.Event().wait()
"""

# A plugin that talks: stdout before and after start, JSON log lines on stderr.
NOISY_PLUGIN = """
import json, sys
sys.path.insert(0, {plugins!r})
from test_plugin import build

print("hello from stdout, before anything", flush=True)
print("{{not json", flush=True)
plugin = build(None, "Noisy", "T")

@plugin.method
def Say(data):
    print(data.decode(), flush=True)
    return b"said"

@plugin.method
def Flood(data):
    count = int(data)
    for i in range(count):
        sys.stdout.write("line %07d " % i + "x" * 90 + "\\n")
    sys.stdout.flush()
    return b"flooded"

for level, text in (("error", "structured failure"), ("debug", "structured detail")):
    print(json.dumps({{"level": level, "message": text}}), file=sys.stderr, flush=True)
print("plain stderr line", file=sys.stderr, flush=True)
plugin.serve_forever()
"""


def script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text.format(plugins=str(TEST_PLUGIN.parent)))
    return path


def zombies() -> list[int]:
    """Children of this process that ended and were never reaped."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2 :].split()
        if fields[0] == b"Z" and int(fields[1]) == me:
            found.append(int(entry))
    return found


def gone(pid: int) -> bool:
    return not ProcessIdentity(pid, None).alive()


class Events:
    """Collects registry events; wait for one by kind."""

    def __init__(self) -> None:
        self.items: list[PluginEvent] = []
        self._lock = threading.Lock()

    def __call__(self, event: PluginEvent) -> None:
        with self._lock:
            self.items.append(event)

    def kinds(self) -> list[str]:
        with self._lock:
            return [e.kind for e in self.items]

    def count(self, kind: str) -> int:
        return self.kinds().count(kind)


@pytest.fixture
def fast() -> RegistrySettings:
    return RegistrySettings(
        launch=LaunchSettings(stop_grace=1.0, backoff_initial=0.02, backoff_max=0.2),
    )


@pytest.fixture
def registry(plugin_dir: Path, fast: RegistrySettings) -> Iterator[PluginRegistry]:
    registry = PluginRegistry(plugin_dir, settings=fast)
    try:
        yield registry
    finally:
        registry.close()
    assert zombies() == []


def launch_test_plugin(registry: PluginRegistry, name: str = "Do", **kwargs: object):  # type: ignore[no-untyped-def]
    command = [sys.executable, str(TEST_PLUGIN), registry.location, name, "T"]
    return registry.launch(command, name=name, namespace="T", **kwargs)  # type: ignore[arg-type]


# -- launching and the handshake ---------------------------------------------------------------


def test_launch_loads_the_plugin_which_echoes_the_token(
    registry: PluginRegistry, plugin_dir: Path
) -> None:
    handle = launch_test_plugin(registry)
    assert handle.state is PluginState.LOADED
    assert handle.execute("Upper", b"abc") == b"ABC"
    proc = handle.process
    assert proc is not None and proc.alive and proc.state == "running"
    assert proc.pid == int(handle.execute("Pid")) == handle.conf.pid  # type: ignore[union-attr]
    assert proc.restarts == 0 and proc.exit_code is None and proc.uptime >= 0
    conf = json.loads((plugin_dir / "Do@T.pconf").read_text())
    assert conf["Launch"] and conf["Version"] == goplug.__version__
    assert conf["Protocol"] == "goplug/1" and conf["Pid"] == proc.pid
    record = json.loads((plugin_dir / ".Do@T.launch").read_text())
    assert record["Pid"] == proc.pid and record["State"] == "running"
    registry.close()
    assert proc.exit_code == 0 and proc.state == "stopped"  # SIGTERM: a clean exit
    assert sorted(os.listdir(plugin_dir)) == []


def test_launch_a_python_file_through_goplug_serve_without_a_name(
    registry: PluginRegistry,
) -> None:
    handle = registry.launch(str(DO_PLUGIN))
    assert (handle.name, handle.namespace) == ("Do", "Test")
    assert handle.execute("Do", b"hi") == b"HI"
    assert handle.process is not None and handle.process.name == "Do"


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_launch_the_node_plugin(registry: PluginRegistry) -> None:
    # The JavaScript library also takes GOPLUG_DIR and echoes the token.
    handle = registry.launch(["node", str(NODE_PLUGIN)], name="Echo", namespace="Node")
    assert handle.execute("Reverse", b"abc") == b"cba"
    assert handle.conf is not None and handle.conf.launch


def test_a_plugin_that_knows_nothing_of_goplug_is_known_by_its_process(
    registry: PluginRegistry,
) -> None:
    # The GoPlug 0.1.0 stand-in echoes no token: its socket's peer pid identifies it.
    handle = registry.launch(
        [sys.executable, str(GO_PLUGIN), registry.location], name="Do", namespace="Test"
    )
    assert handle.conf is not None and not handle.conf.launch and handle.conf.pid is None
    assert handle.execute("main.Echo", b"go") == b"go"
    assert handle.process is not None and handle.process.alive


def test_a_compiled_plugin_is_launched_too(
    registry: PluginRegistry, tmp_path_factory: pytest.TempPathFactory, plugin_dir: Path
) -> None:
    binary = c_plugin_or_skip(tmp_path_factory)  # takes GOPLUG_DIR, echoes no token
    handle = registry.launch([str(binary)], name="CDo", namespace="C")
    assert handle.execute("Upper", b"c") == b"C"
    assert handle.process is not None and int(handle.execute("Pid")) == handle.process.pid
    registry.unload_plugin(handle)
    assert handle.process.exit_code == 0
    assert os.listdir(plugin_dir) == []


def test_an_impostor_under_a_launched_name_is_refused(
    registry: PluginRegistry, plugin_dir: Path, spawn: Spawner, tmp_path: Path
) -> None:
    go_on = tmp_path / "go-on"
    waiting = tmp_path / "waiting.py"
    waiting.write_text(
        "import os, sys, time\n"
        f"while not os.path.exists({str(go_on)!r}):\n"
        "    time.sleep(0.01)\n"
        f"sys.argv = [{str(TEST_PLUGIN)!r}, {registry.location!r}, 'Do', 'Test']\n"
        f"exec(compile(open({str(TEST_PLUGIN)!r}).read(), 'test_plugin', 'exec'))\n"
    )
    result: list[object] = []
    starter = threading.Thread(
        target=lambda: result.append(
            registry.launch([sys.executable, str(waiting)], name="Do", namespace="Test")
        )
    )
    starter.start()
    try:
        wait_for(
            lambda: (plugin_dir / ".Do@Test.launch").exists() or "Do" in str(registry._launches)
        )
        # Somebody else's process announces the launched identity (GoPlug-style file names).
        rogue = [sys.executable, str(GO_PLUGIN), str(plugin_dir)]
        spawn(plugin_dir, "Do", "Test", command=rogue, wait=False)
        rogue_conf = str(plugin_dir / "TestDo.pconf")
        # (It writes its file in place: it may be seen empty first.)
        wait_for(
            lambda: "launched by this registry" in str(registry.broken().get(rogue_conf)),
            timeout=15,
        )
        assert not registry.is_loaded("Do", "Test")
    finally:
        go_on.touch()
        starter.join(20)
    handle = result[0]
    assert isinstance(handle, goplug.PluginHandle) and handle.process is not None
    assert int(handle.execute("Pid")) == handle.process.pid


def test_a_plugin_announcing_another_name_than_asked_is_refused(
    registry: PluginRegistry, plugin_dir: Path
) -> None:
    command = [sys.executable, str(TEST_PLUGIN), registry.location, "Real", "T"]
    with pytest.raises(PluginStartError, match="announced Real@T, not Asked@T") as caught:
        registry.launch(command, name="Asked", namespace="T")
    assert not registry.is_loaded("Real", "T")
    wait_for(lambda: not os.listdir(plugin_dir))  # the process was stopped, its files gone
    assert caught.value.exit_code is None  # it was running when refused, then stopped


def test_a_plugin_without_token_announcing_another_name_is_refused_at_once(
    registry: PluginRegistry, plugin_dir: Path
) -> None:
    # The GoPlug stand-in echoes no token; launched as "Other" it announces Do@Test.
    command = [sys.executable, str(GO_PLUGIN), registry.location]
    started = time.monotonic()
    with pytest.raises(PluginStartError, match="announced Do@Test, not Other@Test"):
        registry.launch(command, name="Other", namespace="Test", start_timeout=30)
    assert time.monotonic() - started < 10  # at once, not at the start timeout
    assert not registry.is_loaded("Do", "Test")


def test_a_newer_protocol_is_refused_naming_both_versions(
    registry: PluginRegistry, plugin_dir: Path
) -> None:
    path = plugin_dir / "Future.pconf"
    path.write_text(
        json.dumps({"Name": "Future", "Sock": "/nowhere", "Protocol": "goplug/9", "Version": "9.0"})
    )
    path.chmod(0o600)
    wait_for(lambda: "goplug/9" in str(registry.broken().get(str(path))))
    reason = str(registry.broken()[str(path)])
    assert "goplug/9" in reason and "goplug/1" in reason and "9.0" in reason
    with pytest.raises(goplug.ConfigError, match="goplug/9"):
        registry.load_plugin("Future")


# -- start failures --------------------------------------------------------------------------


def test_a_launched_plugin_speaking_another_protocol_fails_at_once(
    registry: PluginRegistry, tmp_path: Path
) -> None:
    future = tmp_path / "future.py"
    future.write_text(
        "import json, os, threading\n"
        "d = os.environ['GOPLUG_DIR']\n"
        "conf = {'Name': 'Fut', 'Sock': d + '/Fut.sock', 'Protocol': 'goplug/9',\n"
        "        'Launch': os.environ['GOPLUG_LAUNCH_TOKEN']}\n"
        "open(d + '/.Fut.tmp', 'w').write(json.dumps(conf))\n"
        "os.chmod(d + '/.Fut.tmp', 0o600)\n"
        "os.rename(d + '/.Fut.tmp', d + '/Fut.pconf')\n"
        "threading.Event().wait()\n"
    )
    started = time.monotonic()
    with pytest.raises(PluginStartError, match="goplug/9"):
        registry.launch([sys.executable, str(future)], name="Fut", start_timeout=30)
    assert time.monotonic() - started < 10  # refused when seen, not at the start timeout


def test_a_command_that_exits_reports_its_code_and_stderr(registry: PluginRegistry) -> None:
    command = [
        sys.executable,
        "-c",
        "import sys; print('no config here', file=sys.stderr); sys.exit(3)",
    ]
    with pytest.raises(PluginStartError) as caught:
        registry.launch(command, name="Bad")
    assert caught.value.exit_code == 3
    assert caught.value.stderr_tail == ["no config here"]
    assert "exit status 3" in str(caught.value) and "no config here" in str(caught.value)


def test_a_command_that_cannot_run_is_a_start_error(
    registry: PluginRegistry, tmp_path: Path
) -> None:
    with pytest.raises(PluginStartError, match="cannot start"):
        registry.launch([str(tmp_path / "missing-program")], name="Missing")


def test_a_silent_command_times_out_and_is_stopped(registry: PluginRegistry) -> None:
    command = [sys.executable, "-c", "import time; print('busy', flush=True); time.sleep(60)"]
    started = time.monotonic()
    with pytest.raises(PluginStartError, match=r"did not announce itself within 0\.5 s") as caught:
        registry.launch(command, name="Silent", start_timeout=0.5)
    assert time.monotonic() - started < 5
    assert caught.value.exit_code is None  # it was still running, and was stopped
    assert not registry.discovered()


def test_a_plugin_run_by_hand_without_a_directory_explains_itself(tmp_path: Path) -> None:
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "GOPLUG_DIR"}
    env["PYTHONPATH"] = str(REPO / "src")
    for command in (
        [sys.executable, str(DO_PLUGIN)],
        [sys.executable, "-m", "goplug", "serve", str(DO_PLUGIN)],
    ):
        result = subprocess.run(
            command, capture_output=True, timeout=30, env=env, cwd=tmp_path, text=True
        )
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "GOPLUG_DIR" in lines[0], result.stderr


# -- supervision -------------------------------------------------------------------------------


def test_a_crashed_plugin_is_restarted_and_its_handle_and_callbacks_keep_working(
    registry: PluginRegistry,
) -> None:
    events = Events()
    registry.add_listener(events)
    handle = launch_test_plugin(registry)
    inbox: list[bytes] = []
    handle.register_callback(inbox.append, "news")
    wait_for(lambda: handle.execute("Callbacks") == b"news")
    assert handle.process is not None
    first = handle.process.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: events.count("lost") == 1)
    wait_for(lambda: handle.process.restarts == 1 and registry.is_loaded("Do", "T"))  # type: ignore[union-attr]
    assert handle.process.pid != first and handle.process.exit_code is None
    assert int(handle.execute("Pid")) == handle.process.pid  # the same handle object
    # The subscription made before the crash is made again with the new process.
    wait_for(lambda: handle.execute("Callbacks") == b"news")
    assert handle.execute("Notify", b"news\nafter") == b"1"
    wait_for(lambda: inbox == [b"after"])
    assert events.kinds().count("loaded") == 2


def test_a_crash_loop_ends_in_a_failed_event(
    registry: PluginRegistry, tmp_path: Path, plugin_dir: Path
) -> None:
    events = Events()
    registry.add_listener(events)
    command = [sys.executable, str(script(tmp_path, "ends.py", ENDING_PLUGIN))]
    handle = registry.launch(command, name="Ends", namespace="T", max_restarts=2)
    wait_for(lambda: events.count("failed") == 1, timeout=20)
    proc = handle.process
    assert proc is not None and proc.state == "failed" and proc.restarts == 2
    failed = next(e for e in events.items if e.kind == "failed")
    assert "exit status 1" in failed.reason and "gave up after 2 restarts" in failed.reason
    assert events.count("loaded") == 3 and handle.state is PluginState.STOPPED
    assert gone(proc.pid)  # type: ignore[arg-type]
    assert json.loads((plugin_dir / ".Ends@T.launch").read_text())["State"] == "failed"


@pytest.mark.parametrize(
    ("policy", "exit_code", "restarted"),
    [
        ("never", 1, False),
        ("on-failure", 0, False),
        ("on-failure", 1, True),
        ("always", 0, True),
    ],
)
def test_restart_policies(
    plugin_dir: Path,
    fast: RegistrySettings,
    tmp_path: Path,
    policy: str,
    exit_code: int,
    restarted: bool,
) -> None:
    events = Events()
    command = [sys.executable, str(script(tmp_path, "ends.py", ENDING_PLUGIN))]
    with PluginRegistry(plugin_dir, settings=fast) as registry:
        registry.add_listener(events)
        handle = registry.launch(
            command,
            name="Ends",
            namespace="T",
            restart=policy,  # type: ignore[arg-type]
            max_restarts=1,
            env={"EXIT_CODE": str(exit_code)},
        )
        proc = handle.process
        assert proc is not None
        if restarted:
            wait_for(lambda: events.count("loaded") == 2)
            wait_for(lambda: proc.state == "failed")  # the second exit is one too many
        else:
            wait_for(lambda: proc.state == "stopped")
            assert proc.restarts == 0 and events.count("loaded") == 1
        assert proc.exit_code == exit_code
    assert zombies() == []


def test_a_hung_plugin_fails_its_pings_and_is_restarted(plugin_dir: Path) -> None:
    settings = RegistrySettings(
        client=ClientSettings(ping_timeout=0.2),
        health_interval=0.05,
        launch=LaunchSettings(ping_interval=0.1, ping_failures=2, stop_grace=0.5),
    )
    with PluginRegistry(plugin_dir, settings=settings) as registry:
        handle = launch_test_plugin(registry)
        proc = handle.process
        assert proc is not None
        hung = proc.pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        try:
            wait_for(lambda: proc.restarts == 1 and registry.is_loaded("Do", "T"), timeout=10)
        finally:
            if not gone(hung):
                os.kill(hung, signal.SIGCONT)
        assert proc.pid != hung and int(handle.execute("Pid")) == proc.pid
        assert gone(hung)
    assert zombies() == []


def test_pings_of_plugins_not_launched_are_a_setting(plugin_dir: Path, spawn: Spawner) -> None:
    # Off by default: a hung plugin someone else started stays loaded (hung is not dead)...
    plugin = spawn(plugin_dir, "Other", "T")
    # Were pings on, one failed ping of 0.2 s would mark it lost well within the second below.
    quiet_settings = RegistrySettings(
        client=ClientSettings(ping_timeout=0.2),
        health_interval=0.05,
        launch=LaunchSettings(ping_failures=1),
    )
    with PluginRegistry(plugin_dir, settings=quiet_settings) as quiet:
        wait_for(lambda: quiet.is_loaded("Other", "T"))
        plugin.signal(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:  # a second of health checks: nothing happens
                assert quiet.is_loaded("Other", "T")
                time.sleep(0.05)
        finally:
            plugin.signal(signal.SIGCONT)
    # ...and with ping_interval set, one that fails its pings is marked lost (not killed).
    settings = RegistrySettings(
        client=ClientSettings(ping_timeout=0.2),
        health_interval=0.05,
        ping_interval=0.1,
        launch=LaunchSettings(ping_failures=2),
    )
    with PluginRegistry(plugin_dir, settings=settings) as watched:
        events = Events()
        watched.add_listener(events)
        wait_for(lambda: watched.is_loaded("Other", "T"))
        plugin.signal(signal.SIGSTOP)
        try:
            wait_for(lambda: events.count("lost") == 1)
            lost = next(e for e in events.items if e.kind == "lost")
            assert "2 pings" in lost.reason
        finally:
            plugin.signal(signal.SIGCONT)
        assert plugin.proc.poll() is None  # not ours: never signalled


def test_a_plugin_ignoring_sigterm_is_killed_after_the_grace_period(
    plugin_dir: Path, tmp_path: Path
) -> None:
    settings = RegistrySettings(launch=LaunchSettings(stop_grace=0.3))
    command = [sys.executable, str(script(tmp_path, "stubborn.py", STUBBORN_PLUGIN))]
    with PluginRegistry(plugin_dir, settings=settings) as registry:
        events = Events()
        registry.add_listener(events)
        handle = registry.launch(command, name="Stubborn", namespace="T")
        proc = handle.process
        assert proc is not None
        started = time.monotonic()
        registry.unload_plugin(handle)
        assert time.monotonic() - started < 5
        assert proc.exit_code == -signal.SIGKILL and proc.state == "stopped"
        assert handle.state is PluginState.STOPPED
        assert events.kinds()[-1] == "unloaded" and "lost" not in events.kinds()
        # SIGKILL left its files: the registry removed them.
        assert sorted(os.listdir(plugin_dir)) == []
    assert zombies() == []


def test_a_hung_launched_plugin_unloads_within_the_grace_period(plugin_dir: Path) -> None:
    settings = RegistrySettings(launch=LaunchSettings(stop_grace=0.5, ping_interval=None))
    with PluginRegistry(plugin_dir, settings=settings) as registry:
        handle = launch_test_plugin(registry)
        for name in ("a", "b"):
            handle.register_callback(lambda data: None, name)
        wait_for(lambda: handle.execute("Callbacks") == b"a,b")
        proc = handle.process
        assert proc is not None and proc.pid is not None
        os.kill(proc.pid, signal.SIGSTOP)  # answers nothing any more; SIGKILL still works
        started = time.monotonic()
        registry.unload_plugin(handle)
        assert time.monotonic() - started < 0.5 + 1.5
        assert proc.exit_code == -signal.SIGKILL and proc.state == "stopped"
    assert zombies() == []


def test_unloading_a_plugin_that_is_restarting_stops_it_for_good(plugin_dir: Path) -> None:
    settings = RegistrySettings(launch=LaunchSettings(backoff_initial=0.3, stop_grace=1.0))
    with PluginRegistry(plugin_dir, settings=settings) as registry:
        events = Events()
        registry.add_listener(events)
        handle = launch_test_plugin(registry)
        proc = handle.process
        assert proc is not None and proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: proc.state == "restarting")
        registry.unload_plugin(handle)  # between two runs: no PluginNotLoaded
        assert proc.state == "stopped" and events.kinds()[-1] == "unloaded"
        deadline = time.monotonic() + 0.8  # past the backoff: the restart must not happen
        while time.monotonic() < deadline:
            assert proc.restarts == 0 and not registry.is_loaded("Do", "T")
            time.sleep(0.02)
    assert zombies() == []


def test_close_stops_every_launched_plugin_and_leaves_nothing(plugin_dir: Path) -> None:
    threads = threading.active_count()
    registry = PluginRegistry(plugin_dir)
    procs = [launch_test_plugin(registry, f"P{i}").process for i in range(3)]
    pids = [p.pid for p in procs if p is not None]
    assert len(pids) == 3
    registry.close()
    for pid in pids:
        assert gone(pid)  # type: ignore[arg-type]
    assert [p.exit_code for p in procs if p is not None] == [0, 0, 0]
    assert os.listdir(plugin_dir) == []
    assert zombies() == []
    wait_for(lambda: threading.active_count() <= threads)
    with pytest.raises(goplug.RegistryClosed):
        launch_test_plugin(registry)


def test_unload_then_launch_again(registry: PluginRegistry) -> None:
    handle = launch_test_plugin(registry)
    registry.unload_plugin(handle)
    assert handle.process is not None and handle.process.state == "stopped"
    again = launch_test_plugin(registry)
    assert again is handle and again.execute("Echo", b"x") == b"x"
    with pytest.raises(goplug.PluginAlreadyLoaded):
        launch_test_plugin(registry)


def test_after_a_launch_ends_anyone_may_serve_the_identity_again(
    registry: PluginRegistry, spawn: Spawner, plugin_dir: Path
) -> None:
    handle = launch_test_plugin(registry)
    registry.unload_plugin(handle)
    spawn(plugin_dir, "Do", "T")  # started by hand this time: not refused as an impostor
    wait_for(lambda: registry.is_loaded("Do", "T"))
    assert registry.get_plugin("Do", "T") is handle and handle.process is None
    assert handle.execute("Echo", b"mine") == b"mine"


# -- output ------------------------------------------------------------------------------------


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self.lock_:
            self.records.append(record)

    def messages(self, level: int | None = None) -> list[str]:
        with self.lock_:
            return [r.getMessage() for r in self.records if level is None or r.levelno == level]


@pytest.fixture
def plugin_lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("goplug.plugin.T.Noisy")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def test_output_never_breaks_the_handshake_and_reaches_logging(
    registry: PluginRegistry, tmp_path: Path, plugin_lines: Lines
) -> None:
    command = [sys.executable, str(script(tmp_path, "noisy.py", NOISY_PLUGIN))]
    handle = registry.launch(command, name="Noisy", namespace="T")
    assert handle.execute("Say", b"said later") == b"said"
    wait_for(lambda: "said later" in plugin_lines.messages(logging.INFO))
    info = plugin_lines.messages(logging.INFO)
    assert info[:2] == ["hello from stdout, before anything", "{not json"]
    assert plugin_lines.messages(logging.ERROR) == ["structured failure"]
    assert plugin_lines.messages(logging.DEBUG) == ["structured detail"]
    assert "plain stderr line" in plugin_lines.messages(logging.WARNING)


def test_a_log_flood_loses_no_line_and_calls_go_on(
    registry: PluginRegistry, tmp_path: Path, plugin_lines: Lines
) -> None:
    command = [sys.executable, str(script(tmp_path, "noisy.py", NOISY_PLUGIN))]
    handle = registry.launch(command, name="Noisy", namespace="T")
    count = 50_000  # 5 MB; `make soak` floods more
    flood = threading.Thread(target=handle.execute, args=("Flood", str(count).encode()))
    flood.start()
    try:
        for i in range(200):  # calls keep being answered while the output pours in
            assert handle.execute("Echo", b"%d" % i) == b"%d" % i
    finally:
        flood.join(60)
    expected = [f"line {i:07d} " + "x" * 90 for i in range(count)]
    wait_for(lambda: len([m for m in plugin_lines.messages() if m.startswith("line ")]) == count)
    assert [m for m in plugin_lines.messages() if m.startswith("line ")] == expected


def test_parse_log_line() -> None:
    info = logging.INFO
    assert parse_log_line("plain", info) == (info, "plain")
    assert parse_log_line('{"level":"warn","message":"m"}', info) == (logging.WARNING, "m")
    assert parse_log_line('{"level":"FATAL","message":"m"}', info) == (logging.CRITICAL, "m")
    assert parse_log_line('{"level":40,"message":"m"}', info) == (logging.ERROR, "m")
    assert parse_log_line('{"level":"odd","message":"m"}', info) == (info, "m")
    assert parse_log_line('{"level":"info","message":{"a":1}}', info) == (info, '{"a": 1}')
    assert parse_log_line('{"message":"no level"}', info) == (info, '{"message":"no level"}')
    assert parse_log_line("{broken}", info) == (info, "{broken}")


# -- process identity --------------------------------------------------------------------------


def test_a_process_is_known_by_pid_and_start_time() -> None:
    me = ProcessIdentity(os.getpid(), process_start_time(os.getpid()))
    assert me.alive() and is_descendant(os.getpid(), me)
    reused = ProcessIdentity(os.getpid(), (me.start or 0) + 1)  # same pid, another process
    assert not reused.alive() and not is_descendant(os.getpid(), reused)
    assert not is_descendant(os.getppid(), me)


def test_a_reaped_child_is_never_signalled(registry: PluginRegistry) -> None:
    handle = launch_test_plugin(registry)
    proc = handle.process
    assert proc is not None and proc.child is not None
    child = proc.child
    registry.unload_plugin(handle)
    assert child.exit_code is not None
    sent: list[tuple[int, int]] = []
    real_killpg = os.killpg
    try:
        os.killpg = lambda pid, sig: sent.append((pid, sig))  # type: ignore[assignment]
        child.signal_group(signal.SIGKILL)
    finally:
        os.killpg = real_killpg
    assert sent == []
