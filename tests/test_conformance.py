"""The conformance suite (goplug.conformance, ``goplug conformance``) against real plugin processes.

Every peer is launched by the suite itself (GOPLUG_DIR + GOPLUG_LAUNCH_TOKEN, a private directory),
except in the attach test. Deliberately broken plugins are tiny raw-socket servers written below.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import HERE, REPO, TEST_PLUGIN, Spawner
from cplugin import c_plugin_or_skip

from goplug import ConfigError, conformance
from goplug.conformance import RULES, Report

pytestmark = pytest.mark.timeout(120)

NODE = shutil.which("node")
NODE_PLUGIN = REPO / "examples" / "node" / "plugin.js"
GO_PLUGIN = HERE / "gopeers" / "go_plugin.py"
ALL_IDS = [r.id for r in RULES]
GOPLUG_RULES = [r.id for r in RULES if r.level == "goplug"]


def table(report: Report) -> str:
    return "\n" + report.format_table()


def assert_clean(report: Report, level: str, min_passes: int) -> None:
    """No rule of ``level`` or below failed, and at least ``min_passes`` rules passed."""
    assert report.failures(level) == [], table(report)
    passes = [r for r in report.results if r.status == "pass"]
    assert len(passes) >= min_passes, table(report)
    assert [r.id for r in report.results] == ALL_IDS


def python_plugin(name: str = "Conf") -> list[str]:
    return [sys.executable, str(TEST_PLUGIN), "{dir}", name]


# -- conforming peers ------------------------------------------------------------------------------


def test_python_plugin_passes_goplug() -> None:
    report = conformance.run(python_plugin())
    assert report.launched and report.plugin == "Conf"
    assert_clean(report, "goplug", min_passes=len(RULES))  # it has every method: nothing skips
    assert report.passed("goplug") and report.passed("goplug-0.1")
    assert "Sleep" in report.result("conn.slow").reason
    assert report.result("stop.withdrawal").status == "pass"


@pytest.mark.skipif(NODE is None, reason="node is not on PATH")
def test_node_plugin_passes_goplug() -> None:
    assert NODE is not None
    report = conformance.run([NODE, str(NODE_PLUGIN)])
    assert report.plugin == "Echo@Node"
    # No sleep method: conn.slow runs against a held long poll instead; nothing skips.
    assert_clean(report, "goplug", min_passes=len(RULES))


def test_c_plugin_passes_goplug_01(tmp_path_factory: pytest.TempPathFactory) -> None:
    binary = c_plugin_or_skip(tmp_path_factory)
    report = conformance.run([str(binary)], sleep_unit="ms")
    assert report.passed("goplug-0.1"), table(report)
    assert report.result("conn.slow").status == "pass"
    assert "ms" in report.result("conn.slow").reason
    # It never notifies: the callback rules are skipped, with the option to pass.
    longpoll = report.result("callback.longpoll")
    assert longpoll.status == "skip" and "--notify" in longpoll.reason
    passes = [r for r in report.results if r.status == "pass" and r.level == "goplug-0.1"]
    assert len(passes) >= 19, table(report)
    # GoPlug-level .pconf: the extension keys are missing, and it is named.
    assert not report.passed("goplug")
    assert "Protocol" in report.result("pconf.protocol").reason


def test_go_standin_passes_goplug_01_and_fails_goplug() -> None:
    report = conformance.run(
        [sys.executable, str(GO_PLUGIN), "{dir}"], echo="main.Echo", notify="main.Notify"
    )
    assert report.plugin == "Do@Test"
    assert report.passed("goplug-0.1"), table(report)
    assert report.result("callback.longpoll").status == "pass", table(report)
    assert len([r for r in report.results if r.status == "pass"]) >= 21, table(report)
    assert not report.passed("goplug")
    reasons = {r.id: r.reason for r in report.failures("goplug")}
    assert "Protocol" in reasons["pconf.protocol"]
    assert "Launch" in reasons["pconf.launch"]
    assert "JSON error body" in reasons["error.json"]  # main.Panic closes the connection
    assert "404" in reasons["error.notfound"] and "400" in reasons["error.notfound"]
    for rule in ("batch", "order", "resend", "fanout"):
        assert "X-Goplug-Seq" in reasons[f"callback.reliable.{rule}"], table(report)
    assert "/Unsubscribe" in reasons["callback.unsubscribe"]
    assert "413" in reasons["limits.body"]


# -- broken plugins --------------------------------------------------------------------------------

BROKEN_PLUGIN = textwrap.dedent(
    r'''
    """A tiny raw-socket plugin, broken on purpose: python broken.py DIR MODE."""
    import json, os, socket, sys, threading

    directory, mode = sys.argv[1], sys.argv[2]
    sock_path = os.path.join(directory, "Broken.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(16)
    conf = {"Name": "Broken", "NameSpace": "", "Url": "unix://Broken", "Sock": sock_path,
            "LazyLoad": False}
    if mode == "badpconf":
        conf = {"Name": "Broken", "Url": "unix://Broken", "Sock": sock_path, "LazyLoad": "false"}
    tmp = os.path.join(directory, ".Broken.tmp")
    with open(tmp, "w") as f:
        json.dump(conf, f)
    os.replace(tmp, os.path.join(directory, "Broken.pconf"))

    def serve(conn):
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            route = lines[0].split(b" ")[1].lstrip(b"/")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buf) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            body, buf = buf[:length], buf[length:]
            if route == b"Echo" and not body and mode == "crash":
                os._exit(7)  # dies on an empty body
            if route == b"Ping" and mode == "silent":
                continue  # never answers /Ping
            status = b"200 OK"
            if route == b"Activate":
                out = b'["Echo"]'
            elif route in (b"Ping", b"Echo"):
                out = body
            else:
                status, out = b"404 Not Found", b""
            version = b"HTTP/1.0" if mode == "http10" else b"HTTP/1.1"
            conn.sendall(version + b" " + status + b"\r\nContent-Length: %d\r\n\r\n" % len(out)
                         + out)
            if mode == "http10":
                conn.close()  # one request per connection
                return

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
    '''
)


@pytest.fixture
def broken(tmp_path: Path) -> list[str]:
    script = tmp_path / "broken.py"
    script.write_text(BROKEN_PLUGIN)
    return [sys.executable, str(script), "{dir}"]


def test_http10_and_close_after_each_response_fail_their_rules(broken: list[str]) -> None:
    rules = ["route.ping", "echo.bytes", "framing.status_line", "conn.keepalive", "conn.pipeline"]
    report = conformance.run([*broken, "http10"], rules=rules, rule_timeout=3.0)
    assert [r.id for r in report.results] == rules
    assert report.result("route.ping").status == "fail"  # 3 pings on one connection
    assert report.result("echo.bytes").status == "pass"  # one request per connection works
    status_line = report.result("framing.status_line")
    assert status_line.status == "fail"
    assert "HTTP/1.1 200 OK" in status_line.reason and "HTTP/1.0 200 OK" in status_line.reason
    keepalive = report.result("conn.keepalive")
    assert keepalive.status == "fail" and "connection" in keepalive.reason
    assert report.result("conn.pipeline").status == "fail"
    assert not report.passed("goplug-0.1")


def test_wrong_pconf_types_fail_pconf_keys(broken: list[str]) -> None:
    rules = ["pconf.present", "pconf.keys", "pconf.sock", "route.ping", "pconf.protocol"]
    report = conformance.run([*broken, "badpconf"], rules=rules)
    keys = report.result("pconf.keys")
    assert keys.status == "fail"
    assert "'LazyLoad'" in keys.reason and "bool" in keys.reason
    assert "no key 'NameSpace'" in keys.reason
    assert report.result("pconf.present").status == "pass"
    assert report.result("route.ping").status == "pass"
    assert "no Protocol key" in report.result("pconf.protocol").reason


def test_a_rule_that_kills_the_plugin_fails_and_the_rest_are_not_run(broken: list[str]) -> None:
    rules = ["echo.bytes", "echo.empty", "conn.keepalive", "conn.pipeline"]
    report = conformance.run([*broken, "crash"], rules=rules, rule_timeout=3.0)
    assert [r.id for r in report.results] == rules  # the suite's order
    assert report.result("echo.bytes").status == "pass"
    empty = report.result("echo.empty")
    assert empty.status == "fail"
    assert "died during this rule" in empty.reason and "exit status 7" in empty.reason
    for rule in ("conn.keepalive", "conn.pipeline"):
        result = report.result(rule)
        assert result.status == "fail"
        assert "not run" in result.reason and "echo.empty" in result.reason


def test_a_silent_plugin_times_out_instead_of_hanging(broken: list[str]) -> None:
    report = conformance.run(
        [*broken, "silent"], rules=["route.ping", "echo.bytes"], rule_timeout=1.0
    )
    ping = report.result("route.ping")
    assert ping.status == "fail" and ping.seconds < 4.0
    assert "no answer" in ping.reason or "timed out" in ping.reason
    assert report.result("echo.bytes").status == "pass"  # the plugin still serves


def test_a_program_that_never_announces_fails_every_rule(tmp_path: Path) -> None:
    script = tmp_path / "quiet.py"
    script.write_text("import sys\nprint('no directory for me', file=sys.stderr)\nsys.exit(4)\n")
    report = conformance.run([sys.executable, str(script)], rules=["pconf.present", "route.ping"])
    present = report.result("pconf.present")
    assert present.status == "fail"
    assert "exit status 4" in present.reason and "no directory for me" in present.reason
    assert report.result("route.ping").status == "fail"
    assert "not run" in report.result("route.ping").reason


# -- attaching -------------------------------------------------------------------------------------


def test_attach_to_a_running_plugin_skips_launch_only_rules(
    plugin_dir: Path, spawn: Spawner
) -> None:
    spawn(plugin_dir, "Att", "Ns")
    rules = ["pconf.present", "pconf.launch", "pconf.pid", "route.ping", "stop.withdrawal"]
    report = conformance.run(directory=plugin_dir, name="Att", namespace="Ns", rules=rules)
    assert not report.launched and report.plugin == "Att@Ns"
    assert report.result("pconf.launch").status == "skip"
    assert report.result("stop.withdrawal").status == "skip"
    assert report.result("pconf.pid").status == "pass"
    assert report.passed("goplug"), table(report)
    assert (plugin_dir / "Att@Ns.pconf").exists()  # attaching never stops the plugin

    missing = conformance.run(directory=plugin_dir, name="Nobody", rules=["pconf.present"])
    assert missing.result("pconf.present").status == "fail"
    assert "Nobody" in missing.result("pconf.present").reason


def test_a_python_file_is_served_with_goplug_serve() -> None:
    rules = ["pconf.launch", "route.ping", "echo.bytes"]
    report = conformance.run(str(REPO / "examples" / "python" / "do_plugin.py"), rules=rules)
    assert report.plugin == "Do@Test"
    assert report.result("pconf.launch").status == "pass"
    echo = report.result("echo.bytes")
    assert echo.status == "skip" and echo.reason.startswith("needs an echo method: pass --echo")


def test_run_refuses_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        conformance.run()
    with pytest.raises(ConfigError, match="unknown rule"):
        conformance.run(python_plugin(), rules=["no.such.rule"])
    with pytest.raises(ConfigError, match="level"):
        Report("x", False).passed("goplug-9")


# -- the command -----------------------------------------------------------------------------------


def goplug(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "goplug", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        check=False,
    )


def test_cli_table_lists_every_rule_and_exits_0_when_the_level_passes() -> None:
    done = goplug("conformance", "--", *python_plugin("Cli"))
    assert done.returncode == 0, done.stdout + done.stderr
    for rule_id in ALL_IDS:
        assert f"\n{rule_id} " in done.stdout, done.stdout
    assert "level goplug: PASS" in done.stdout
    assert "Cli (launched by the suite)" in done.stdout


def test_cli_exit_status_follows_the_level_and_json_parses() -> None:
    go = [sys.executable, str(GO_PLUGIN), "{dir}"]
    subset = ["--rule", "route.ping", "--rule", "pconf.protocol", "--rule", "error.notfound"]
    done = goplug("conformance", "--json", *subset, "--level", "goplug", "--", *go)
    assert done.returncode == 1, done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert data["plugin"] == "Do@Test" and data["launched"] is True
    assert [r["id"] for r in data["results"]] == ["route.ping", "pconf.protocol", "error.notfound"]
    assert {r["status"] for r in data["results"]} == {"pass", "fail"}
    assert data["levels"]["goplug-0.1"]["passed"] is True
    assert data["levels"]["goplug"]["passed"] is False
    assert all(isinstance(r["seconds"], float) and r["reason"] is not None for r in data["results"])

    done = goplug("conformance", *subset, "--level", "goplug-0.1", "--", *go)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAIL" in done.stdout  # the goplug rules still show as failed


def test_cli_attach_and_usage_errors(plugin_dir: Path, spawn: Spawner) -> None:
    spawn(plugin_dir, "Att")
    done = goplug("conformance", "--rule", "route.ping", str(plugin_dir), "Att")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Att (attached)" in done.stdout
    assert goplug("conformance").returncode == 2
    assert goplug("conformance", str(plugin_dir)).returncode == 2
    done = goplug("conformance", "--rule", "nope", "--", *python_plugin())
    assert done.returncode == 2 and "unknown rule" in done.stderr
