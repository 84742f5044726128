"""The conformance suite: check that a plugin program speaks the goplug wire protocol.

The suite launches a plugin program (the handshake of docs/PROTOCOL.md §9: ``GOPLUG_DIR`` and
``GOPLUG_LAUNCH_TOKEN`` in its environment, a private temporary directory) or attaches to one
already running, then checks every rule of docs/CONFORMANCE.md against it over its real socket,
speaking raw bytes where a rule is about bytes. Each rule belongs to a level:

- ``goplug-0.1``: what every GoPlug 0.1.0 plugin does (the `.pconf`, the routes, HTTP framing,
  persistent connections, callback long polls, robustness against bad input);
- ``goplug``: the goplug extensions (``Protocol``, ``Pid``, ``Launch``, JSON error bodies,
  reliable subscriptions, body limits, withdrawal on SIGTERM).

>>> report = run(["node", "examples/node/plugin.js"])
>>> report.passed("goplug")
True

A rule is exercised through the methods the plugin has: an echo method (returns its input), a
notify method (its body, ``NAME``, a newline and ``DATA``, notifies the callback NAME with DATA),
a failing method and a sleeping method. They are found by their usual names in the `/Activate`
list, or named with the ``echo``, ``notify``, ``fail`` and ``sleep`` arguments; a rule whose
method is missing is skipped, and a skip never fails a level. Every rule has a timeout; a rule
that ends the plugin fails, and the rules after it fail with that reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import quote, urlsplit

from goplug.errors import ConfigError, ProtocolError
from goplug.launcher import describe_exit
from goplug.transport import peer_pid
from goplug.wire import routes
from goplug.wire.http import FramingError, Limits, Message, MessageReader, request_head
from goplug.wire.pconf import ENV_DIR, ENV_LAUNCH_TOKEN, PROTOCOL_VERSION, default_url

__all__ = [
    "LEVELS",
    "RULES",
    "Level",
    "Report",
    "Result",
    "Rule",
    "Status",
    "run",
]

log = logging.getLogger("goplug.conformance")

Level = Literal["goplug-0.1", "goplug"]
"""A conformance level: ``goplug-0.1`` (GoPlug 0.1.0) or ``goplug`` (with the extensions)."""
Status = Literal["pass", "fail", "skip"]
"""The outcome of one rule."""

LEVELS: Final[tuple[Level, ...]] = ("goplug-0.1", "goplug")
"""The levels, lowest first: passing a level means passing every level below it too."""

DEFAULT_METHODS: Final[Mapping[str, tuple[str, ...]]] = {
    "echo": ("Echo", "main.Echo"),
    "notify": ("Notify", "main.Notify"),
    "fail": ("Fail", "main.Fail", "main.Panic"),
    "sleep": ("Sleep", "main.Sleep"),
}
"""The method names looked for in the `/Activate` list when none is given, in order."""

_BIG_ECHO: Final = 16 * 1024 * 1024
_HUGE_BODY: Final = 1 << 40  # announced by limits.body: over any sensible body limit
_BIG_HEAD: Final = 2 * 1024 * 1024  # over goplug's 64 KiB and Go's 1 MiB head limits
_SLEEP_SECONDS: Final = 1.5
_READ_LIMITS: Final = Limits(max_head=1024 * 1024, max_headers=1000, max_body=64 * 1024 * 1024)


# -- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """The outcome of one rule."""

    id: str
    """The rule's short id, e.g. ``framing.chunked``."""
    level: Level
    """The level the rule belongs to."""
    status: Status
    """``pass``, ``fail`` or ``skip``."""
    reason: str
    """Why it failed or was skipped (expected and seen), or a detail of the pass."""
    seconds: float
    """How long the rule took."""
    description: str = ""
    """What the rule checks, in one line."""

    def to_dict(self) -> dict[str, object]:
        """The result as a JSON-ready dictionary."""
        return {
            "id": self.id,
            "level": self.level,
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 4),
            "description": self.description,
        }


def _level_rank(level: str) -> int:
    try:
        return LEVELS.index(level)
    except ValueError:
        raise ConfigError(f"unknown level {level!r}: expected one of {', '.join(LEVELS)}") from None


@dataclass
class Report:
    """What :func:`run` found: one :class:`Result` per rule, in the order they ran."""

    plugin: str
    """The plugin checked (``Name@NameSpace``, or the command when it never announced itself)."""
    launched: bool
    """True when the suite launched the plugin (launch-only rules ran)."""
    results: list[Result] = field(default_factory=list)
    """One result per rule."""

    def passed(self, level: str = "goplug") -> bool:
        """True when no rule of ``level`` or of a level below it failed (skips do not fail)."""
        rank = _level_rank(level)
        return not any(r.status == "fail" for r in self.results if _level_rank(r.level) <= rank)

    def failures(self, level: str = "goplug") -> list[Result]:
        """The failed rules of ``level`` and of the levels below it."""
        rank = _level_rank(level)
        return [r for r in self.results if r.status == "fail" and _level_rank(r.level) <= rank]

    def result(self, rule_id: str) -> Result:
        """The result of one rule; KeyError if it did not run."""
        for r in self.results:
            if r.id == rule_id:
                return r
        raise KeyError(rule_id)

    def counts(self, level: str) -> dict[str, int]:
        """``{"pass": n, "fail": n, "skip": n}`` for the rules of exactly ``level``."""
        out = {"pass": 0, "fail": 0, "skip": 0}
        for r in self.results:
            if r.level == level:
                out[r.status] += 1
        return out

    def to_dict(self) -> dict[str, object]:
        """The report as a JSON-ready dictionary."""
        return {
            "plugin": self.plugin,
            "launched": self.launched,
            "levels": {
                level: {"passed": self.passed(level), **self.counts(level)} for level in LEVELS
            },
            "results": [r.to_dict() for r in self.results],
        }

    def to_json(self) -> str:
        """The report as JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self) -> str:
        """The report as a text table (rule, level, result, time, reason), then one line a level."""
        header = ("RULE", "LEVEL", "RESULT", "TIME", "REASON")
        rows = [
            (r.id, r.level, r.status.upper(), f"{r.seconds:.2f}s", r.reason) for r in self.results
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
        lines = []
        for row in [header, *rows]:
            cells = [row[i].ljust(widths[i]) for i in range(4)]
            lines.append("  ".join([*cells, row[4]]).rstrip())
        lines.append("")
        for level in LEVELS:
            c = self.counts(level)
            verdict = "PASS" if self.passed(level) else "FAIL"
            lines.append(
                f"level {level}: {verdict} ({c['pass']} passed, {c['fail']} failed, "
                f"{c['skip']} skipped)"
            )
        return "\n".join(lines)


# -- rules -----------------------------------------------------------------------------------------


class _Fail(Exception):
    """The rule failed; the message says what was expected and what was seen."""


class _Skip(Exception):
    """The rule cannot be checked against this plugin; the message says why."""


@dataclass(frozen=True)
class Rule:
    """One check of the suite."""

    id: str
    """Short id, e.g. ``route.ping``."""
    level: Level
    """The level it belongs to."""
    description: str
    """What it checks, in one line."""
    check: Callable[[_Ctx], str] = field(repr=False)
    """Runs the check; returns a detail for the report, raises to fail or skip."""
    timeout_factor: float = 1.0
    """Multiplies the rule timeout (the 16 MiB echo gets more)."""


class _Closed(Exception):
    """The plugin closed the connection without (completing) an answer."""


class _Conn:
    """One raw connection to the plugin: send bytes, read parsed responses."""

    def __init__(self, path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.reader = MessageReader(is_response=True, limits=_READ_LIMITS)
        self.raw = bytearray()  # the first bytes received, for rules about exact bytes
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, timeout: float | None = None) -> Message:
        """Read the next response. TimeoutError if none in time, _Closed if the peer closed."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        while True:
            msg = self.reader.next_message()
            if msg is not None:
                return msg
            if self.eof:
                raise _Closed("the plugin closed the connection without an answer")
            try:
                data = self.sock.recv(1 << 20)
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise _Closed(f"the connection was reset ({exc.strerror})") from None
            if len(self.raw) < 65536:
                self.raw += data[: 65536 - len(self.raw)]
            if not data:
                self.eof = True
                try:
                    msg = self.reader.feed_eof()
                except FramingError:
                    raise _Closed(
                        "the plugin closed the connection in the middle of an answer"
                    ) from None
                if msg is not None:
                    return msg
                raise _Closed("the plugin closed the connection without an answer")
            self.reader.feed(data)

    def wait_closed(self, timeout: float) -> bool:
        """True if the peer closes (or resets) the connection within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except OSError:
            return True
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _show(data: bytes, limit: int = 60) -> str:
    """A short printable form of some bytes for a reason."""
    if len(data) > limit:
        return f"{data[:limit]!r}... ({len(data)} bytes)"
    return repr(data)


def _describe(msg: Message) -> str:
    return f"{msg.status} {msg.reason}".strip() + f" with body {_show(msg.body)}"


def _key(raw: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """Look a `.pconf` key up case-insensitively, as registries do: (present, value)."""
    for k, v in raw.items():
        if k.lower() == key.lower():
            return True, v
    return False, None


def _lenient_object(data: bytes) -> dict[str, Any] | None:
    """The JSON object a `.pconf` holds (BOM, whitespace and bytes after it tolerated)."""
    text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "replace").strip()
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


class _Output:
    """Drains one pipe of the launched process, keeping its last lines."""

    def __init__(self, stream: Any, name: str) -> None:
        self.lines: deque[str] = deque(maxlen=10)
        self.thread = threading.Thread(
            target=self._drain, args=(stream,), name=f"conformance-{name}", daemon=True
        )
        self.thread.start()

    def _drain(self, stream: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in stream:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
        with contextlib.suppress(OSError):
            stream.close()


@dataclass
class _Options:
    methods: dict[str, str | None]
    sleep_unit: Literal["s", "ms"]
    rule_timeout: float
    start_timeout: float


class _Session:
    """Everything the rules share: the plugin's announcement, its process, the options."""

    def __init__(self, options: _Options) -> None:
        self.options = options
        self.label = ""
        self.directory = ""
        self.pconf_path = ""
        self.pconf_data = b""
        self.raw: dict[str, Any] | None = None
        self.sock = ""
        self.host = "localhost"
        self.prefix = ""
        self.methods: list[str] = []
        self.setup_error = ""  # why no rule can talk to the plugin
        # launched only
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""
        self.outputs: list[_Output] = []
        self.first_read = b""  # the .pconf's bytes the moment it appeared
        self.first_read_ok = True
        self.complete_after = 0.0  # seconds until it parsed, when the first read did not
        self.listening_at_appearance: bool | None = None
        self.listen_error = ""
        self.gone = ""  # why the plugin is gone, once it is

    @property
    def launched(self) -> bool:
        return self.proc is not None

    def method(self, role: str, flag: str) -> str:
        """The method playing ``role`` (echo, notify, ...), or skip the rule."""
        chosen = self.options.methods.get(role)
        if chosen:
            return chosen
        for name in DEFAULT_METHODS[role]:
            if name in self.methods:
                return name
        tried = ", ".join(DEFAULT_METHODS[role])
        article = "an" if role[0] in "aeiou" else "a"
        raise _Skip(f"needs {article} {role} method: pass {flag} (none of {tried} in /Activate)")

    def path_for(self, route: str) -> str:
        return self.prefix + "/" + quote(route, safe="")

    def stderr_tail(self) -> str:
        if len(self.outputs) < 2 or not self.outputs[1].lines:
            return ""
        return "; last stderr line: " + self.outputs[1].lines[-1][:200]

    def check_alive(self) -> str:
        """'' while the plugin serves; else why it is gone."""
        proc = self.proc
        if proc is not None and proc.poll() is not None:
            return self._ended(proc)
        try:
            conn = _Conn(self.sock, 2.0)
        except OSError as exc:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(1.0)  # it may be exiting: tell its status if it does
                if proc.poll() is not None:
                    return self._ended(proc)
            return f"nobody accepts connections on its socket any more ({exc.strerror or exc})"
        conn.close()
        return ""

    def _ended(self, proc: subprocess.Popen[bytes]) -> str:
        return f"the plugin process ended ({describe_exit(proc.returncode)})" + self.stderr_tail()


class _Ctx:
    """What one rule works with: the session and the connections the rule opened."""

    def __init__(self, session: _Session, timeout: float) -> None:
        self.s = session
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self._conns: list[_Conn] = []
        self._lock = threading.Lock()
        self.abandoned = False

    def remaining(self, at_most: float | None = None) -> float:
        left = max(0.05, self.deadline - time.monotonic())
        return left if at_most is None else min(left, at_most)

    def conn(self) -> _Conn:
        if self.abandoned:
            raise _Fail("timed out")
        try:
            conn = _Conn(self.s.sock, self.remaining())
        except OSError as exc:
            raise _Fail(
                f"cannot connect to {self.s.sock}: {exc.strerror or exc}; expected it to accept "
                "connections"
            ) from None
        with self._lock:
            self._conns.append(conn)
        return conn

    def close_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    def head(self, route: str, length: int, extra: bytes = b"") -> bytes:
        return request_head(self.s.path_for(route), self.s.host, length, extra)

    def call(
        self,
        conn: _Conn,
        route: str,
        body: bytes = b"",
        extra: bytes = b"",
        timeout: float | None = None,
    ) -> Message:
        """Send one request and read its answer; fail if there is none."""
        conn.send(self.head(route, len(body), extra) + body)
        wait = self.remaining(timeout)
        try:
            return conn.read(wait)
        except TimeoutError:
            raise _Fail(f"/{route}: no answer within {wait:.1f} s") from None
        except _Closed as exc:
            raise _Fail(f"/{route}: expected an answer; {exc}") from None
        except ProtocolError as exc:
            raise _Fail(f"/{route}: the answer is not valid HTTP/1.1: {exc}") from None

    def call_new(self, route: str, body: bytes = b"", extra: bytes = b"") -> Message:
        conn = self.conn()
        try:
            return self.call(conn, route, body, extra)
        finally:
            conn.close()

    def expect_ok(self, msg: Message, route: str, body: bytes | None = None) -> None:
        if msg.status != 200:
            raise _Fail(f"/{route}: expected 200, got {_describe(msg)}")
        if body is not None and msg.body != body:
            raise _Fail(
                f"/{route}: expected the body {_show(body)}, got {_show(msg.body)}"
                + (f" (a {len(msg.body)}-byte body)" if len(body) > 60 else "")
            )


# -- goplug-0.1 rules ------------------------------------------------------------------------------


def _pconf_present(ctx: _Ctx) -> str:
    s = ctx.s
    if not s.pconf_path:
        raise _Fail(s.setup_error or "no .pconf found")
    return os.path.basename(s.pconf_path)


def _pconf_keys(ctx: _Ctx) -> str:
    s = ctx.s
    if s.raw is None:
        raise _Fail(f"expected one JSON object, read {_show(s.pconf_data)}")
    problems = []
    for key, kind in (
        ("Name", str),
        ("NameSpace", str),
        ("Url", str),
        ("Sock", str),
        ("LazyLoad", bool),
    ):
        present, value = _key(s.raw, key)
        if not present:
            problems.append(f"no key {key!r}")
        elif not isinstance(value, kind):
            problems.append(f"{key!r} is {json.dumps(value)[:40]}, expected a {kind.__name__}")
    present, name = _key(s.raw, "Name")
    if isinstance(name, str) and not name:
        problems.append("'Name' is empty")
    present, sock = _key(s.raw, "Sock")
    if isinstance(sock, str) and sock and not os.path.isabs(sock):
        problems.append(f"'Sock' {sock!r} is not an absolute path")
    if problems:
        raise _Fail("; ".join(problems))
    return ""


def _pconf_complete(ctx: _Ctx) -> str:
    s = ctx.s
    if not s.launched:
        if s.raw is None:
            raise _Fail(f"expected a complete JSON object, read {_show(s.pconf_data)}")
        return "complete (attached: read once)"
    if s.raw is None:
        raise _Fail(
            f"expected the file to hold a complete JSON object within 1 s of appearing; "
            f"read {_show(s.pconf_data)}"
        )
    if not s.first_read_ok:
        return (
            f"first read {_show(s.first_read, 20)}; complete {s.complete_after * 1000:.0f} ms "
            "later (written in place, not atomically)"
        )
    return "complete when first read"


def _pconf_listen_first(ctx: _Ctx) -> str:
    s = ctx.s
    if not s.launched:
        raise _Skip("needs the suite to launch the plugin (it watches the file appear)")
    if s.listening_at_appearance is None:
        raise _Fail(f"could not check: {s.listen_error or 'no Sock when the file appeared'}")
    if not s.listening_at_appearance:
        raise _Fail(
            "expected the socket to accept connections when the .pconf appeared; connecting "
            f"failed: {s.listen_error}"
        )
    return ""


def _pconf_sock(ctx: _Ctx) -> str:
    s = ctx.s
    try:
        st = os.stat(s.sock)
    except OSError as exc:
        raise _Fail(f"Sock {s.sock!r}: {exc.strerror}; expected a Unix socket") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise _Fail(f"Sock {s.sock!r} is not a socket (mode {oct(st.st_mode)})")
    return ""


def _route_activate(ctx: _Ctx) -> str:
    msg = ctx.call_new(routes.ACTIVATE)
    ctx.expect_ok(msg, routes.ACTIVATE)
    text = msg.body.decode("utf-8", "surrogateescape").lstrip()
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except (ValueError, RecursionError):
        raise _Fail(f"expected a JSON array of strings, got {_show(msg.body)}") from None
    if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
        raise _Fail(f"expected a JSON array of strings, got {_show(msg.body)}")
    names = [v for v in value if v]
    extra = f"; then {len(text) - end} bytes of activator output" if text[end:] else ""
    return f"{len(names)} method(s): {', '.join(names)[:120]}{extra}"


def _route_ping(ctx: _Ctx) -> str:
    conn = ctx.conn()
    for body in (b"Test Data", b"", bytes(range(256)) * 4):
        msg = ctx.call(conn, routes.PING, body)
        ctx.expect_ok(msg, routes.PING, body)
    return ""


def _echo(ctx: _Ctx, body: bytes) -> str:
    method = ctx.s.method("echo", "--echo")
    msg = ctx.call_new(method, body)
    ctx.expect_ok(msg, method, body)
    return method


def _echo_bytes(ctx: _Ctx) -> str:
    method = _echo(ctx, bytes(range(256)) * 2)
    return f"via {method}"


def _echo_empty(ctx: _Ctx) -> str:
    method = _echo(ctx, b"")
    return f"via {method}"


def _echo_large(ctx: _Ctx) -> str:
    start = time.monotonic()
    method = _echo(ctx, bytes(range(256)) * (_BIG_ECHO // 256))
    return f"16 MiB via {method} in {time.monotonic() - start:.2f} s"


def _framing_content_length(ctx: _Ctx) -> str:
    body = b'"Content-Length framed"' + b"x" * 5000
    extra = b"User-Agent: Go-http-client/1.1\r\nContent-Type: application/json\r\n"
    msg = ctx.call_new(routes.PING, body, extra)
    ctx.expect_ok(msg, routes.PING, body)
    return ""


def _framing_chunked(ctx: _Ctx) -> str:
    conn = ctx.conn()
    parts = [b"chunked ", b"request " * 300, bytes(range(256))]
    payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    head = (
        f"POST {ctx.s.path_for(routes.PING)} HTTP/1.1\r\nHost: {ctx.s.host}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode("ascii")
    conn.send(head + payload)
    try:
        msg = conn.read(ctx.remaining())
    except TimeoutError:
        raise _Fail("a chunked /Ping got no answer") from None
    except _Closed as exc:
        raise _Fail(f"a chunked /Ping: expected its body echoed; {exc}") from None
    ctx.expect_ok(msg, routes.PING, b"".join(parts))
    msg = ctx.call(conn, routes.PING, b"after chunked")  # the framing left nothing behind
    ctx.expect_ok(msg, routes.PING, b"after chunked")
    return ""


def _framing_status_line(ctx: _Ctx) -> str:
    calls: list[tuple[str, bytes]] = [(routes.PING, b"status"), (routes.ACTIVATE, b"")]
    with contextlib.suppress(_Skip):
        calls.append((ctx.s.method("echo", "--echo"), b"status"))
    for route, body in calls:
        conn = ctx.conn()
        msg = ctx.call(conn, route, body)
        line = bytes(conn.raw).split(b"\n", 1)[0].removesuffix(b"\r")
        conn.close()
        if msg.status == 200 and line != b"HTTP/1.1 200 OK":
            raise _Fail(f"/{route}: expected the status line b'HTTP/1.1 200 OK', got {line!r}")
        if msg.status != 200:
            raise _Fail(f"/{route}: expected 200, got {_describe(msg)}")
    return ", ".join(f"/{r}" for r, _ in calls)


def _no_close(msg: Message, route: str, what: str) -> None:
    if not msg.keep_alive:
        how = msg.header(b"connection") or b"the framing (HTTP/1.0 or a close-delimited body)"
        raise _Fail(f"{what}: /{route} answered that the connection ends ({how!r})")


def _conn_keepalive(ctx: _Ctx) -> str:
    conn = ctx.conn()
    for i in range(10):
        body = b"keep-alive %d" % i
        msg = ctx.call(conn, routes.PING, body)
        ctx.expect_ok(msg, routes.PING, body)
        _no_close(msg, routes.PING, f"request {i + 1} of 10 on one connection")
    time.sleep(0.2)
    msg = ctx.call(conn, routes.PING, b"after a pause")
    ctx.expect_ok(msg, routes.PING, b"after a pause")
    return "11 requests on one connection"


def _conn_pipeline(ctx: _Ctx) -> str:
    conn = ctx.conn()
    bodies = [b"pipelined %d " % i + b"p" * (i * 3000) for i in range(4)]
    conn.send(b"".join(ctx.head(routes.PING, len(b)) + b for b in bodies))
    for i, body in enumerate(bodies):
        try:
            msg = conn.read(ctx.remaining())
        except TimeoutError:
            raise _Fail(f"4 pipelined /Ping requests: answer {i + 1} never came") from None
        except _Closed as exc:
            raise _Fail(f"4 pipelined /Ping requests: after {i} answers, {exc}") from None
        ctx.expect_ok(msg, routes.PING, body)
    return "4 requests in one write, answered in order"


def _route_unknown(ctx: _Ctx) -> str:
    conn = ctx.conn()
    route = "conformance.NoSuchMethod"
    msg = ctx.call(conn, route, b"x")
    if msg.status == 200:
        raise _Fail(f"/{route}: expected a non-200 answer, got {_describe(msg)}")
    if not msg.keep_alive:
        raise _Fail(
            f"/{route} answered {msg.status} and ended the connection; expected it to stay usable"
        )
    after = ctx.call(conn, routes.PING, b"still usable")
    ctx.expect_ok(after, routes.PING, b"still usable")
    return f"{msg.status} {msg.reason}".strip()


def _notified(msg: Message) -> bool:
    """Whether a notify method's answer says the notification went out."""
    lowered = msg.body.lower()
    return msg.status == 200 and b"not found" not in lowered and b"not be found" not in lowered


class _Notifier:
    """Calls the notify method on a connection of its own."""

    def __init__(self, ctx: _Ctx) -> None:
        self.ctx = ctx
        self.method = ctx.s.method("notify", "--notify")
        self.conn: _Conn | None = None

    def once(self, name: str, data: bytes) -> Message:
        if self.conn is None:
            self.conn = self.ctx.conn()
        try:
            return self.ctx.call(self.conn, self.method, name.encode() + b"\n" + data)
        except _Fail:
            self.conn.close()
            self.conn = None
            raise

    def until_delivered(self, name: str, data: bytes, within: float = 5.0) -> None:
        """Notify until the plugin says it had a subscriber (it may not have read the poll yet)."""
        deadline = time.monotonic() + self.ctx.remaining(within)
        last = ""
        while True:
            msg = self.once(name, data)
            if _notified(msg):
                return
            last = _describe(msg)
            if time.monotonic() > deadline:
                raise _Fail(
                    f"{self.method} never reported a subscriber for {name!r} while a poll "
                    f"waited; last answer {last}"
                )
            time.sleep(0.02)

    def must(self, name: str, data: bytes) -> None:
        msg = self.once(name, data)
        if not _notified(msg):
            raise _Fail(f"{self.method} {name!r} failed with a subscriber: {_describe(msg)}")


def _poll_request(ctx: _Ctx, name: str, subscriber: str = "", ack: int = 0) -> bytes:
    body = routes.callback_name_body(name)
    extra = b""
    if subscriber:
        extra = b"X-Goplug-Subscriber: %s\r\nX-Goplug-Ack: %d\r\n" % (subscriber.encode(), ack)
    return ctx.head(routes.REGISTER_CALLBACK, len(body), extra) + body


def _callback_longpoll(ctx: _Ctx) -> str:
    notifier = _Notifier(ctx)
    name = "conformance.longpoll." + secrets.token_hex(4)
    data = b"long poll \x00\xff\r\n data"
    poll = ctx.conn()
    poll.send(_poll_request(ctx, name))
    notifier.until_delivered(name, data)
    try:
        msg = poll.read(ctx.remaining(5.0))
    except TimeoutError:
        raise _Fail(f"/RegisterCallback {name!r}: no answer after {name!r} was notified") from None
    except _Closed as exc:
        raise _Fail(f"/RegisterCallback: expected the notified data; {exc}") from None
    ctx.expect_ok(msg, routes.REGISTER_CALLBACK, data)
    return f"via {notifier.method}"


def _conn_parallel(ctx: _Ctx) -> str:
    errors: list[str] = []
    n_conns, n_calls = 8, 5
    barrier = threading.Barrier(n_conns, timeout=ctx.remaining())

    def worker(i: int) -> None:
        try:
            conn = ctx.conn()
            barrier.wait()
            for j in range(n_calls):
                body = b"parallel %d.%d " % (i, j) + bytes([i]) * 65536
                msg = ctx.call(conn, routes.PING, body)
                ctx.expect_ok(msg, routes.PING, body)
        except (_Fail, OSError, threading.BrokenBarrierError) as exc:
            errors.append(f"connection {i + 1}: {exc or type(exc).__name__}")

    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(ctx.remaining())
    if any(t.is_alive() for t in threads):
        raise _Fail(f"{n_conns} connections calling /Ping at once: some never finished")
    if errors:
        raise _Fail(f"{n_conns} connections calling /Ping at once: {errors[0]}")
    took = time.monotonic() - start
    return f"{n_conns} connections x {n_calls} calls of 64 KiB in {took:.2f} s"


def _conn_slow(ctx: _Ctx) -> str:
    s = ctx.s
    try:
        method = s.method("sleep", "--sleep")
    except _Skip:
        method = ""
    slow = ctx.conn()
    if method:
        amount = _SLEEP_SECONDS if s.options.sleep_unit == "s" else _SLEEP_SECONDS * 1000
        body = f"{amount:g}".encode()
        slow.send(ctx.head(method, len(body)) + body)
        what = f"{method}({body.decode()} {s.options.sleep_unit})"
    else:
        slow.send(_poll_request(ctx, "conformance.slow." + secrets.token_hex(4)))
        what = "a /RegisterCallback long poll (no sleep method: pass --sleep to use one)"
    time.sleep(0.1)
    start = time.monotonic()
    other = ctx.conn()
    msg = ctx.call(other, routes.PING, b"while slow", timeout=_SLEEP_SECONDS + 3.0)
    took = time.monotonic() - start
    ctx.expect_ok(msg, routes.PING, b"while slow")
    if method:
        # The sleep must still be running: it answers after the ping.
        try:
            answer = slow.read(ctx.remaining(_SLEEP_SECONDS + 5.0))
        except TimeoutError:
            raise _Fail(f"{what} never answered") from None
        except _Closed as exc:
            raise _Fail(f"{what}: {exc}") from None
        answered = time.monotonic() - start
        if answer.status != 200:
            raise _Fail(f"{what}: expected 200, got {_describe(answer)} (check --sleep-unit s|ms)")
        if answered < took or took >= _SLEEP_SECONDS - 0.1:
            raise _Fail(
                f"/Ping on another connection took {took:.2f} s while {what} ran: it waited "
                "for the slow call"
            )
    elif took >= _SLEEP_SECONDS:
        raise _Fail(f"/Ping on another connection took {took:.2f} s while {what} waited")
    return f"/Ping answered in {took * 1000:.0f} ms during {what}"


def _refused(ctx: _Ctx, conn: _Conn, what: str, send_error: str) -> str:
    """Read what the plugin does after bad bytes: a 4xx answer or a closed connection."""
    try:
        msg = conn.read(ctx.remaining(5.0))
    except TimeoutError:
        raise _Fail(
            f"{what}: expected a 4xx answer or the connection closed; neither within 5 s"
        ) from None
    except _Closed:
        outcome = "the connection was closed"
    except ProtocolError as exc:
        raise _Fail(f"{what}: expected a 4xx answer or the connection closed; got {exc}") from None
    else:
        if not 400 <= msg.status < 500:
            raise _Fail(
                f"{what}: expected a 4xx answer or the connection closed; got {_describe(msg)}"
            )
        outcome = f"answered {msg.status} {msg.reason}".strip()
    if send_error:
        outcome += f" ({send_error})"
    time.sleep(0.05)
    after = ctx.call_new(routes.PING, b"after bad bytes")
    if after.status != 200 or after.body != b"after bad bytes":
        raise _Fail(f"{what}: {outcome}, but then a fresh /Ping got {_describe(after)}")
    return outcome + "; a fresh connection is served"


def _robust_garbage(ctx: _Ctx) -> str:
    conn = ctx.conn()
    conn.send(b"\x16\x03\x01\x02\x00\x01\xff\xfe GARBAGE \x00 not http\r\n\xc3\x28\r\n\r\n")
    return _refused(ctx, conn, "garbage bytes", "")


def _robust_big_head(ctx: _Ctx) -> str:
    conn = ctx.conn()
    head = (
        f"POST {ctx.s.path_for(routes.PING)} HTTP/1.1\r\nHost: {ctx.s.host}\r\nX-Big: ".encode()
        + b"a" * _BIG_HEAD
        + b"\r\nContent-Length: 0\r\n\r\n"
    )
    send_error = ""
    try:
        conn.sock.settimeout(ctx.remaining(5.0))
        conn.send(head)
    except TimeoutError:
        raise _Fail(
            "a 2 MiB request head: the plugin stopped reading it and never answered"
        ) from None
    except OSError as exc:
        send_error = f"closed while the head was sent: {exc.strerror or exc}"
    return _refused(ctx, conn, "a 2 MiB request head", send_error)


# -- goplug rules ----------------------------------------------------------------------------------


def _pconf_protocol(ctx: _Ctx) -> str:
    raw = ctx.s.raw or {}
    present, value = _key(raw, "Protocol")
    if not present or value is None:
        raise _Fail(
            f"no Protocol key: expected {PROTOCOL_VERSION!r} (without it the plugin speaks "
            "GoPlug 0.1.0 only)"
        )
    if value != PROTOCOL_VERSION:
        raise _Fail(f"Protocol is {json.dumps(value)[:40]}, expected {PROTOCOL_VERSION!r}")
    return ""


def _pconf_pid(ctx: _Ctx) -> str:
    raw = ctx.s.raw or {}
    present, value = _key(raw, "Pid")
    if not present or value is None:
        raise _Fail("no Pid key: expected the pid of the process serving the socket")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _Fail(f"Pid is {json.dumps(value)[:40]}, expected a positive integer")
    conn = ctx.conn()
    try:
        served_by = peer_pid(conn.sock)
    except OSError:
        served_by = None
    if served_by is None:
        try:
            os.kill(value, 0)
        except ProcessLookupError:
            raise _Fail(f"Pid {value}: no such process") from None
        except PermissionError:
            pass
        return f"Pid {value} (peer credentials not available here)"
    if served_by != value:
        raise _Fail(f"Pid is {value}, but the socket is served by pid {served_by} (SO_PEERCRED)")
    return f"Pid {value} serves the socket"


def _pconf_launch(ctx: _Ctx) -> str:
    s = ctx.s
    if not s.launched:
        raise _Skip("needs the suite to launch the plugin (it hands out the token)")
    present, value = _key(s.raw or {}, "Launch")
    if not present or value is None:
        raise _Fail(f"no Launch key: expected the launch token {s.token!r} echoed")
    if value != s.token:
        raise _Fail(f"Launch is {json.dumps(value)[:80]}, expected the token {s.token!r}")
    return ""


def _pconf_atomic(ctx: _Ctx) -> str:
    s = ctx.s
    if not s.launched:
        raise _Skip("needs the suite to launch the plugin (it watches the file appear)")
    if not s.first_read_ok:
        raise _Fail(
            f"the .pconf was read as {_show(s.first_read, 30)} when it appeared; expected it "
            "complete (written to a temporary file and renamed into place)"
        )
    return "complete when it appeared (best effort: a partial file is caught only if seen)"


def _pconf_mode(ctx: _Ctx) -> str:
    s = ctx.s
    problems = []
    for what, path in ((".pconf", s.pconf_path), ("socket", s.sock)):
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError as exc:
            problems.append(f"{what}: {exc.strerror}")
            continue
        if mode & 0o077:
            problems.append(f"the {what} is mode {mode:04o}, expected 0600 (owner only)")
    if problems:
        raise _Fail("; ".join(problems))
    return ""


def _error_json(ctx: _Ctx) -> str:
    method = ctx.s.method("fail", "--fail")
    conn = ctx.conn()
    conn.send(ctx.head(method, 11) + b"conformance")
    want = 'a non-200 answer with a JSON error body {"type","message"} (goplug/1 errors)'
    try:
        msg = conn.read(ctx.remaining())
    except TimeoutError:
        raise _Fail(f"{method}: no answer; expected {want}") from None
    except _Closed as exc:
        raise _Fail(f"{method}: {exc}; expected {want}") from None
    if msg.status == 200:
        raise _Fail(f"{method}: expected {want}; got {_describe(msg)} (pass --fail)")
    ctype = msg.header(b"content-type")
    if not ctype.startswith(b"application/json"):
        raise _Fail(
            f"{method}: answered {msg.status} with Content-Type {ctype.decode('latin-1')!r} and "
            f"body {_show(msg.body)}; expected {want} and Content-Type: application/json"
        )
    try:
        info = json.loads(msg.body)
    except (ValueError, UnicodeDecodeError):
        raise _Fail(f"{method}: expected {want}; the body is not JSON: {_show(msg.body)}") from None
    if not isinstance(info, dict):
        raise _Fail(f"{method}: expected {want}; got {_show(msg.body)}")
    problems = []
    if not isinstance(info.get("type"), str) or not info["type"]:
        problems.append("'type' is missing or not a non-empty string")
    if not isinstance(info.get("message"), str):
        problems.append("'message' is missing or not a string")
    if "traceback" in info and not isinstance(info["traceback"], str):
        problems.append("'traceback' is not a string")
    if problems:
        raise _Fail(f"{method}: the JSON error body {_show(msg.body)}: {'; '.join(problems)}")
    return f"{msg.status} {info['type']}: {info['message'][:60]}"


def _error_notfound(ctx: _Ctx) -> str:
    route = "conformance.NoSuchMethod"
    msg = ctx.call_new(route, b"x")
    want = "404 with a JSON body of type MethodNotFound"
    if msg.status != 404:
        raise _Fail(f"/{route}: expected {want}, got {_describe(msg)}")
    ctype = msg.header(b"content-type")
    if not ctype.startswith(b"application/json"):
        raise _Fail(f"/{route}: expected {want}; Content-Type is {ctype.decode('latin-1')!r}")
    try:
        info = json.loads(msg.body)
    except (ValueError, UnicodeDecodeError):
        info = None
    if not isinstance(info, dict) or info.get("type") != "MethodNotFound":
        raise _Fail(f"/{route}: expected {want}, got the body {_show(msg.body)}")
    return ""


class _Subscriber:
    """One reliable subscriber (X-Goplug-Subscriber) of one callback name."""

    def __init__(self, ctx: _Ctx, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.token = "conf-" + secrets.token_hex(8)
        self.ack = 0
        self.conn: _Conn | None = None
        self.items: list[tuple[int, bytes]] = []  # every (seq, data) received

    def send_poll(self, ack: int | None = None) -> None:
        if self.conn is None:
            self.conn = self.ctx.conn()
        self.conn.send(
            _poll_request(self.ctx, self.name, self.token, self.ack if ack is None else ack)
        )

    def read(self, timeout: float) -> list[tuple[int, bytes]] | None:
        """The batch the waiting poll answers (None if none in time); checks its framing."""
        assert self.conn is not None
        try:
            msg = self.conn.read(self.ctx.remaining(timeout))
        except TimeoutError:
            return None
        except _Closed as exc:
            raise _Fail(f"a reliable poll (subscriber {self.token}): {exc}") from None
        if msg.status != 200:
            raise _Fail(
                f"a reliable poll (subscriber {self.token}): expected 200, got {_describe(msg)}"
            )
        seq_text, count_text = msg.header(b"x-goplug-seq"), msg.header(b"x-goplug-count")
        if not seq_text or not count_text:
            raise _Fail(
                "a poll with X-Goplug-Subscriber was answered without X-Goplug-Seq and "
                f"X-Goplug-Count (no reliable subscriptions, goplug/1): body {_show(msg.body)}"
            )
        if not seq_text.isdigit() or not count_text.isdigit() or int(count_text) < 1:
            raise _Fail(f"bad X-Goplug-Seq {seq_text!r} / X-Goplug-Count {count_text!r}")
        seq, count = int(seq_text), int(count_text)
        try:
            records = routes.decode_batch(msg.body, count)
        except ProtocolError as exc:
            raise _Fail(
                f"X-Goplug-Count {count}: the body is not {count} length-prefixed records ({exc})"
            ) from None
        batch = [(seq + i, data) for i, data in enumerate(records)]
        if seq <= self.ack:
            raise _Fail(
                f"acknowledged {self.ack}, then got X-Goplug-Seq {seq}: an acknowledged "
                "notification was sent again"
            )
        if seq != self.ack + 1:
            raise _Fail(
                f"acknowledged {self.ack}, then got X-Goplug-Seq {seq}: expected {self.ack + 1} "
                f"(notifications {self.ack + 1}..{seq - 1} lost)"
            )
        self.items.extend(batch)
        self.ack = batch[-1][0]
        return batch

    def unsubscribe(self) -> Message:
        conn = self.ctx.conn()
        body = routes.callback_name_body(self.name)
        extra = b"X-Goplug-Subscriber: %s\r\nX-Goplug-Ack: %d\r\n" % (self.token.encode(), self.ack)
        try:
            return self.ctx.call(conn, routes.UNSUBSCRIBE, body, extra)
        finally:
            conn.close()


def _warm_up(ctx: _Ctx, notifier: _Notifier, subs: list[_Subscriber]) -> None:
    """Make sure the plugin has a queue for every subscriber: poll, notify until each answers."""
    for sub in subs:
        sub.send_poll()
    pending = list(subs)
    k = 0
    deadline = time.monotonic() + ctx.remaining(8.0)
    while pending:
        if time.monotonic() > deadline:
            raise _Fail(
                f"{len(pending)} of {len(subs)} reliable subscribers got nothing while "
                f"{notifier.method} notified {k} times"
            )
        notifier.until_delivered(subs[0].name, b"warmup-%d" % k)
        k += 1
        for sub in list(pending):
            if sub.read(0.3 if len(subs) > 1 else 5.0) is not None:
                pending.remove(sub)


def _collect(ctx: _Ctx, sub: _Subscriber, want: list[bytes]) -> None:
    """Poll until every notification in ``want`` came; check order, none lost, none twice."""
    got: list[bytes] = []
    while len(got) < len(want):
        sub.send_poll()
        batch = sub.read(5.0)
        if batch is None:
            raise _Fail(
                f"subscriber {sub.token}: {len(want) - len(got)} of {len(want)} notifications "
                f"never came (last Ack {sub.ack}); got {[d.decode() for d in got][-5:]}"
            )
        got.extend(d for _, d in batch if not d.startswith(b"warmup-"))
    if got != want:
        dups = sorted({d.decode() for d in got if got.count(d) > 1})
        detail = f"duplicates {dups[:5]}" if dups else f"got {[d.decode() for d in got][:12]}"
        raise _Fail(
            f"subscriber {sub.token}: expected {len(want)} notifications in order; {detail}"
        )


def _reliable_setup(ctx: _Ctx, n_subs: int) -> tuple[_Notifier, list[_Subscriber]]:
    notifier = _Notifier(ctx)
    name = "conformance.reliable." + secrets.token_hex(4)
    subs = [_Subscriber(ctx, name) for _ in range(n_subs)]
    _warm_up(ctx, notifier, subs)
    return notifier, subs


def _cleanup(subs: list[_Subscriber]) -> None:
    for sub in subs:
        with contextlib.suppress(_Fail, OSError):
            sub.unsubscribe()


def _reliable_batch(ctx: _Ctx) -> str:
    notifier, subs = _reliable_setup(ctx, 1)
    first = subs[0].items[0]
    if first[0] != 1:
        raise _Fail(f"a new subscriber (Ack 0) got X-Goplug-Seq {first[0]}; expected 1")
    _cleanup(subs)
    return f"Seq 1, {len(subs[0].items)} record(s) via {notifier.method}"


def _reliable_order(ctx: _Ctx) -> str:
    notifier, subs = _reliable_setup(ctx, 1)
    want = [b"n%d" % i for i in range(50)]
    for data in want:
        notifier.must(subs[0].name, data)
    _collect(ctx, subs[0], want)
    _cleanup(subs)
    return "50 notifications, in order, each once"


def _reliable_resend(ctx: _Ctx) -> str:
    notifier, subs = _reliable_setup(ctx, 1)
    sub = subs[0]
    acked = sub.ack
    notifier.must(sub.name, b"resend-me")
    sub.send_poll()
    batch = sub.read(5.0)
    if batch is None or not any(d == b"resend-me" for _, d in batch):
        raise _Fail(f"the poll after Ack {acked} did not answer the queued notification: {batch}")
    seq = next(s for s, d in batch if d == b"resend-me")
    # The answer is "lost": cut that connection and poll again without acknowledging it.
    assert sub.conn is not None
    sub.conn.close()
    sub.conn = None
    sub.ack = acked
    sub.send_poll()
    again = sub.read(5.0)
    if again is None or (seq, b"resend-me") not in again:
        raise _Fail(
            f"after a cut poll, a poll with Ack {acked} got {again}; expected notification "
            f"{seq} sent again"
        )
    notifier.must(sub.name, b"after-ack")
    sub.send_poll()  # acknowledges everything so far
    later = sub.read(5.0)
    if later is None:
        raise _Fail(f"a poll with Ack {sub.ack} got nothing after another notification")
    if any(d == b"resend-me" for _, d in later):
        raise _Fail("an acknowledged notification was sent again")
    if not any(d == b"after-ack" for _, d in later):
        raise _Fail(f"expected the next notification after Ack {seq}; got {later}")
    _cleanup(subs)
    return f"notification {seq} resent after a cut poll, not after its Ack"


def _reliable_fanout(ctx: _Ctx) -> str:
    notifier, subs = _reliable_setup(ctx, 2)
    want = [b"f%d" % i for i in range(10)]
    for data in want:
        notifier.must(subs[0].name, data)
    for sub in subs:
        _collect(ctx, sub, want)
    _cleanup(subs)
    return "2 subscribers, 10 notifications each"


def _callback_unsubscribe(ctx: _Ctx) -> str:
    sub = _Subscriber(ctx, "conformance.unsubscribe." + secrets.token_hex(4))
    sub.send_poll()
    time.sleep(0.1)
    msg = sub.unsubscribe()
    if msg.status != 200 or msg.body:
        raise _Fail(f"/Unsubscribe: expected 200 with an empty body, got {_describe(msg)}")
    return ""


def _limits_body(ctx: _Ctx) -> str:
    conn = ctx.conn()
    conn.send(ctx.head(routes.PING, _HUGE_BODY))
    want = f"413 before the body is sent, then the connection closed (announced {_HUGE_BODY} bytes)"
    try:
        msg = conn.read(ctx.remaining(5.0))
    except TimeoutError:
        raise _Fail(
            f"expected {want}; no answer within 5 s (the plugin waits for the body)"
        ) from None
    except _Closed as exc:
        raise _Fail(f"expected {want}; {exc}") from None
    if msg.status != 413:
        raise _Fail(f"expected {want}; got {_describe(msg)}")
    if not conn.wait_closed(ctx.remaining(3.0)):
        raise _Fail("answered 413 but kept the connection open; expected it closed")
    return ""


def _stop_withdrawal(ctx: _Ctx) -> str:
    s = ctx.s
    if s.proc is None:
        raise _Skip("needs the suite to launch the plugin (it sends SIGTERM)")
    proc = s.proc
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    order_problem = ""
    pconf_gone = sock_gone = 0.0
    limit = min(5.0, ctx.remaining())
    while time.monotonic() - start < limit:
        sock_exists = os.path.lexists(s.sock)  # the socket first: see below
        pconf_exists = os.path.lexists(s.pconf_path)
        now = time.monotonic() - start
        if not sock_exists and not sock_gone:
            sock_gone = now
        if not pconf_exists and not pconf_gone:
            pconf_gone = now
        # Checked in this order, seeing the socket gone and the .pconf still there proves the
        # socket went first; the reverse order can never be seen this way.
        if not sock_exists and pconf_exists and not order_problem:
            order_problem = "the socket was removed before the .pconf"
        if not sock_exists and not pconf_exists and proc.poll() is not None:
            break
        time.sleep(0.001)
    s.gone = "stopped by the suite (stop.withdrawal)"
    code = proc.poll()
    problems = []
    if code is None:
        problems.append(f"still running {limit:g} s after SIGTERM")
    elif code != 0:
        problems.append(f"ended with {describe_exit(code)}, expected exit status 0")
    if os.path.lexists(s.pconf_path):
        problems.append("its .pconf is still there")
    if os.path.lexists(s.sock):
        problems.append("its socket is still there")
    if order_problem:
        problems.append(order_problem + " (expected the .pconf removed first)")
    if problems:
        raise _Fail("after SIGTERM: " + "; ".join(problems))
    return f"withdrew and exited 0 in {time.monotonic() - start:.2f} s"


def _rule(
    rule_id: str, level: Level, description: str, check: Callable[[_Ctx], str], factor: float = 1.0
) -> Rule:
    return Rule(rule_id, level, description, check, factor)


_V01: Final = "goplug-0.1"
_GP: Final = "goplug"

RULES: Final[tuple[Rule, ...]] = (
    _rule("pconf.present", _V01, "a .pconf file announces the plugin", _pconf_present),
    _rule(
        "pconf.keys",
        _V01,
        "the .pconf is a JSON object: Name, NameSpace, Url, Sock strings, LazyLoad a bool",
        _pconf_keys,
    ),
    _rule(
        "pconf.complete", _V01, "the .pconf is a complete JSON object once written", _pconf_complete
    ),
    _rule(
        "pconf.listen_first",
        _V01,
        "the socket accepts connections when the .pconf appears (launched only)",
        _pconf_listen_first,
    ),
    _rule("pconf.sock", _V01, "Sock names a Unix socket", _pconf_sock),
    _rule(
        "route.activate",
        _V01,
        "/Activate answers 200 with a JSON array of strings",
        _route_activate,
    ),
    _rule("route.ping", _V01, "/Ping answers 200 with its body", _route_ping),
    _rule("echo.bytes", _V01, "the echo method round-trips all 256 byte values", _echo_bytes),
    _rule("echo.empty", _V01, "the echo method round-trips an empty body", _echo_empty),
    _rule("echo.large", _V01, "the echo method round-trips 16 MiB", _echo_large, 3.0),
    _rule(
        "framing.content_length",
        _V01,
        "a Content-Length request as the Go registry sends it (User-Agent, Content-Type)",
        _framing_content_length,
    ),
    _rule("framing.chunked", _V01, "a Transfer-Encoding: chunked request body", _framing_chunked),
    _rule(
        "framing.status_line",
        _V01,
        "success is exactly the status line HTTP/1.1 200 OK",
        _framing_status_line,
    ),
    _rule("conn.keepalive", _V01, "one connection serves many requests", _conn_keepalive),
    _rule("conn.pipeline", _V01, "pipelined requests are answered in order", _conn_pipeline),
    _rule(
        "route.unknown",
        _V01,
        "an unknown method gets a non-200 answer and the connection stays usable",
        _route_unknown,
    ),
    _rule(
        "callback.longpoll",
        _V01,
        "/RegisterCallback (no subscriber header) answers the notified data",
        _callback_longpoll,
    ),
    _rule("conn.parallel", _V01, "calls on 8 connections at once", _conn_parallel),
    _rule(
        "conn.slow",
        _V01,
        "a slow call does not delay a call on another connection",
        _conn_slow,
    ),
    _rule(
        "robust.garbage",
        _V01,
        "garbage bytes are refused (4xx or closed); a fresh connection is served",
        _robust_garbage,
    ),
    _rule(
        "robust.big_head",
        _V01,
        "a 2 MiB request head is refused (4xx or closed); a fresh connection is served",
        _robust_big_head,
    ),
    _rule("pconf.protocol", _GP, "the .pconf says Protocol goplug/1", _pconf_protocol),
    _rule("pconf.pid", _GP, "Pid is the process serving the socket (SO_PEERCRED)", _pconf_pid),
    _rule(
        "pconf.launch",
        _GP,
        "the launch token is echoed as Launch (launched only)",
        _pconf_launch,
    ),
    _rule(
        "pconf.atomic",
        _GP,
        "the .pconf is never seen empty or partial (launched only)",
        _pconf_atomic,
    ),
    _rule("pconf.mode", _GP, "the .pconf and the socket are 0600", _pconf_mode),
    _rule(
        "error.json",
        _GP,
        "a failing method: non-200, Content-Type application/json, {type, message}",
        _error_json,
    ),
    _rule(
        "error.notfound",
        _GP,
        "an unknown method: 404 with a JSON body of type MethodNotFound",
        _error_notfound,
    ),
    _rule(
        "callback.reliable.batch",
        _GP,
        "a subscriber's poll answers X-Goplug-Seq/Count and length-prefixed records from 1",
        _reliable_batch,
    ),
    _rule(
        "callback.reliable.order",
        _GP,
        "reliable notifications come in order, none lost, none twice",
        _reliable_order,
    ),
    _rule(
        "callback.reliable.resend",
        _GP,
        "an unacknowledged notification is resent after a cut poll, an acknowledged one is not",
        _reliable_resend,
    ),
    _rule(
        "callback.reliable.fanout",
        _GP,
        "two subscribers of one name each get every notification",
        _reliable_fanout,
    ),
    _rule(
        "callback.unsubscribe",
        _GP,
        "/Unsubscribe answers 200 with an empty body",
        _callback_unsubscribe,
    ),
    _rule(
        "limits.body",
        _GP,
        "an announced body over the limit (1 TiB) gets 413 before it is sent, then close",
        _limits_body,
    ),
    _rule(
        "stop.withdrawal",
        _GP,
        "SIGTERM: .pconf removed, then the socket, exit 0 within 5 s (launched only)",
        _stop_withdrawal,
    ),
)
"""Every rule, in the order the suite runs them (stop.withdrawal ends the plugin: last)."""


_FILE_RULES: Final = frozenset(
    {
        "pconf.present",
        "pconf.keys",
        "pconf.complete",
        "pconf.protocol",
        "pconf.launch",
        "pconf.atomic",
    }
)
"""Rules that judge the `.pconf` alone: they run even when its Sock is unusable."""


# -- launching and attaching -----------------------------------------------------------------------


def _find_pconf(directory: str, name: str, namespace: str) -> tuple[str, bytes]:
    """The `.pconf` in ``directory`` that announces (namespace, name): (path, bytes)."""
    stem = f"{name}@{namespace}" if namespace else name
    candidates = [os.path.join(directory, stem + ".pconf")]
    with contextlib.suppress(OSError):
        candidates += sorted(
            os.path.join(directory, f)
            for f in os.listdir(directory)
            if f.endswith(".pconf") and not f.startswith(".")
        )
    for path in candidates:
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
        except OSError:
            continue
        raw = _lenient_object(data)
        if raw is None:
            continue
        if _key(raw, "Name")[1] == name and (_key(raw, "NameSpace")[1] or "") == namespace:
            return path, data
    return "", b""


def _use_conf(session: _Session, path: str, data: bytes) -> None:
    """Take the plugin's socket and Url from its `.pconf` (leniently: rules judge it)."""
    session.pconf_path = path
    session.pconf_data = data
    session.raw = _lenient_object(data)
    raw = session.raw or {}
    name = _key(raw, "Name")[1]
    namespace = _key(raw, "NameSpace")[1]
    if isinstance(name, str):
        session.label = f"{name}@{namespace}" if isinstance(namespace, str) and namespace else name
    sock = _key(raw, "Sock")[1]
    if not isinstance(sock, str) or not sock:
        session.setup_error = f"not run: {os.path.basename(path)} has no usable Sock"
        return
    if not os.path.isabs(sock):
        sock = os.path.join(os.path.dirname(path), sock)
    session.sock = sock
    url = _key(raw, "Url")[1]
    if not isinstance(url, str) or not url:
        url = default_url(name if isinstance(name, str) else "", namespace or "")
    try:
        parts = urlsplit(url)
        host = parts.netloc
        if host.isascii() and host and not any(c in host for c in " \t\r\n"):
            session.host = host
        if parts.path.isascii() and not any(c in parts.path for c in " \t\r\n"):
            session.prefix = parts.path.rstrip("/")
    except ValueError:
        pass


def _activate_quietly(session: _Session, timeout: float) -> None:
    """Read the method list for choosing default methods (route.activate judges it)."""
    try:
        conn = _Conn(session.sock, timeout)
    except OSError:
        return
    try:
        body = b""
        conn.send(request_head(session.path_for(routes.ACTIVATE), session.host, 0) + body)
        msg = conn.read(timeout)
        if msg.status == 200:
            session.methods, _ = routes.parse_activation(msg.body)
    except (OSError, _Closed, ProtocolError):
        pass
    finally:
        conn.close()


def _launch(session: _Session, command: Sequence[str], env: Mapping[str, str] | None) -> None:
    session.directory = tempfile.mkdtemp(prefix="gpconf-")
    session.token = secrets.token_urlsafe(18)
    full_env = {**os.environ, **(env or {})}
    full_env[ENV_DIR] = session.directory
    full_env[ENV_LAUNCH_TOKEN] = session.token
    argv = [arg.replace("{dir}", session.directory) for arg in command]
    session.label = os.path.basename(argv[0]) if argv else "?"
    log.info("launching %s in %s", " ".join(argv), session.directory)
    try:
        proc = subprocess.Popen(
            argv,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        session.setup_error = f"cannot run {argv[0]!r}: {exc.strerror or exc}"
        return
    session.proc = proc
    session.outputs = [_Output(proc.stdout, "stdout"), _Output(proc.stderr, "stderr")]
    deadline = time.monotonic() + session.options.start_timeout
    path = ""
    while not path:
        with contextlib.suppress(OSError):
            names = sorted(
                f
                for f in os.listdir(session.directory)
                if f.endswith(".pconf") and not f.startswith(".")
            )
            if names:
                path = os.path.join(session.directory, names[0])
                break
        if proc.poll() is not None:
            session.setup_error = (
                f"the process ended ({describe_exit(proc.returncode)}) before announcing "
                f"itself in GOPLUG_DIR{session.stderr_tail()}"
            )
            return
        if time.monotonic() > deadline:
            session.setup_error = (
                f"no .pconf appeared in GOPLUG_DIR within {session.options.start_timeout:g} s "
                f"(does the program read GOPLUG_DIR, or need {{dir}} in its arguments?)"
                f"{session.stderr_tail()}"
            )
            return
        time.sleep(0.02)
    appeared = time.monotonic()
    data = b""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        data = f.read(1 << 20)
    session.first_read = data
    raw = _lenient_object(data)
    if raw is not None:
        sock = _key(raw, "Sock")[1]
        if isinstance(sock, str) and sock:
            try:
                _Conn(sock, 2.0).close()
                session.listening_at_appearance = True
            except OSError as exc:
                session.listening_at_appearance = False
                session.listen_error = f"{exc.strerror or exc} on {sock}"
    else:
        session.first_read_ok = False
        while raw is None and time.monotonic() - appeared < 1.0:
            time.sleep(0.005)
            with contextlib.suppress(OSError), open(path, "rb") as f:
                data = f.read(1 << 20)
            raw = _lenient_object(data)
        session.complete_after = time.monotonic() - appeared
        session.listen_error = "the .pconf was not complete when it appeared"
        if raw is not None:
            sock = _key(raw, "Sock")[1]
            with contextlib.suppress(OSError):
                if isinstance(sock, str) and sock:
                    _Conn(sock, 2.0).close()
                    session.listening_at_appearance = True
    _use_conf(session, path, data)


def _shutdown(session: _Session) -> None:
    proc = session.proc
    if proc is not None:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(3.0)
            except subprocess.TimeoutExpired:
                log.warning("the plugin did not end on SIGTERM: killing its process group")
        # Anything left in the session it was started in (children of a wrapper) goes too.
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5.0)
        for output in session.outputs:
            output.thread.join(2.0)
    if session.directory:
        shutil.rmtree(session.directory, ignore_errors=True)


# -- running ---------------------------------------------------------------------------------------


def _run_rule(rule: Rule, session: _Session) -> Result:
    timeout = session.options.rule_timeout * rule.timeout_factor
    ctx = _Ctx(session, timeout)
    outcome: list[tuple[Status, str]] = []

    def target() -> None:
        try:
            outcome.append(("pass", rule.check(ctx)))
        except _Skip as exc:
            outcome.append(("skip", str(exc)))
        except _Fail as exc:
            outcome.append(("fail", str(exc)))
        except OSError as exc:
            outcome.append(("fail", f"connection error: {exc.strerror or exc!r}"))
        except Exception as exc:
            log.exception("rule %s raised", rule.id)
            outcome.append(("fail", f"the check raised {exc!r}"))

    start = time.monotonic()
    thread = threading.Thread(target=target, name=f"conformance-{rule.id}", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if thread.is_alive():
        ctx.abandoned = True
        ctx.close_all()
        thread.join(2.0)
        status: Status = "fail"
        reason = f"timed out after {timeout:g} s"
    else:
        status, reason = outcome[0] if outcome else ("fail", "the check ended without a result")
    ctx.close_all()
    return Result(rule.id, rule.level, status, reason, time.monotonic() - start, rule.description)


def _rules_to_run(only: Collection[str] | None) -> list[Rule]:
    if only is None:
        return list(RULES)
    known = {r.id for r in RULES}
    unknown = sorted(set(only) - known)
    if unknown:
        known_ids = ", ".join(sorted(known))
        raise ConfigError(f"unknown rule(s) {', '.join(unknown)}; known: {known_ids}")
    return [r for r in RULES if r.id in only]


def run(
    command: Sequence[str] | str | None = None,
    *,
    directory: str | os.PathLike[str] | None = None,
    name: str | None = None,
    namespace: str = "",
    echo: str | None = None,
    notify: str | None = None,
    fail: str | None = None,
    sleep: str | None = None,
    sleep_unit: Literal["s", "ms"] = "s",
    rules: Collection[str] | None = None,
    rule_timeout: float = 10.0,
    start_timeout: float = 10.0,
    env: Mapping[str, str] | None = None,
) -> Report:
    """Check a plugin against the conformance rules; return the :class:`Report`.

    Launch: give ``command``: an argument list, or (as for :meth:`PluginRegistry.launch`) a
    string naming a Python file or ``module:attr``, served by ``goplug serve``. It runs with
    ``GOPLUG_DIR`` set to a private temporary directory and a fresh ``GOPLUG_LAUNCH_TOKEN``
    (``env`` adds variables); ``{dir}`` in an argument is replaced by that directory, for
    programs that take it as an argument. The process is stopped (SIGTERM, then SIGKILL for
    its process group) and the directory removed when the suite ends. Attach: give
    ``directory`` and ``name`` (and ``namespace``) of a plugin already running; launch-only
    rules are skipped.

    ``echo``, ``notify``, ``fail`` and ``sleep`` name the plugin's methods for the rules that need
    them (default: the usual names found in its `/Activate` list, see :data:`DEFAULT_METHODS`);
    ``sleep_unit`` says whether the sleep method takes seconds or milliseconds. ``rules``
    restricts the run to those rule ids. Each rule may take ``rule_timeout`` seconds (the
    16 MiB echo three times that); ``start_timeout`` bounds the wait for the `.pconf`.
    """
    if (command is None) == (directory is None or name is None):
        raise ConfigError("give either command (launch) or directory and name (attach)")
    if command is not None and not command:
        raise ConfigError("the command is empty")
    if sleep_unit not in ("s", "ms"):
        raise ConfigError("sleep_unit must be 's' or 'ms'")
    if isinstance(command, str):
        command = [sys.executable, "-m", "goplug", "serve", command]
    selected = _rules_to_run(rules)
    options = _Options(
        methods={"echo": echo, "notify": notify, "fail": fail, "sleep": sleep},
        sleep_unit=sleep_unit,
        rule_timeout=rule_timeout,
        start_timeout=start_timeout,
    )
    session = _Session(options)
    try:
        if command is not None:
            _launch(session, command, env)
        else:
            assert directory is not None and name is not None
            folder = os.path.abspath(os.fspath(directory))
            session.label = f"{name}@{namespace}" if namespace else name
            path, data = _find_pconf(folder, name, namespace)
            if path:
                _use_conf(session, path, data)
            else:
                session.setup_error = f"no .pconf in {folder} announces {session.label}"
        if session.sock:
            _activate_quietly(session, min(5.0, rule_timeout))
        report = Report(session.label, session.launched)
        for rule in selected:
            report.results.append(_check_one(rule, session))
        return report
    finally:
        _shutdown(session)


_DEATH_HINTS: Final = ("closed", "reset", "cannot connect", "timed out", "no answer")


def _check_one(rule: Rule, session: _Session) -> Result:
    """Run one rule unless the plugin is unusable or gone; note if the rule ended it."""
    if session.gone:
        return Result(
            rule.id, rule.level, "fail", f"not run: {session.gone}", 0.0, rule.description
        )
    file_only = rule.id in _FILE_RULES and bool(session.pconf_path)
    if rule.id != "pconf.present" and not file_only and not session.sock:
        reason = session.setup_error or "no socket to talk to"
        if not reason.startswith("not run"):
            reason = "not run: " + reason
        return Result(rule.id, rule.level, "fail", reason, 0.0, rule.description)
    result = _run_rule(rule, session)
    if rule.id == "stop.withdrawal" or not session.sock:
        return result
    if result.status == "fail" and any(word in result.reason for word in _DEATH_HINTS):
        # A connection closed may be the plugin dying: give its end a moment to show.
        if session.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                session.proc.wait(0.5)
        else:
            time.sleep(0.2)
    gone = session.check_alive()
    if gone:
        session.gone = f"the plugin is gone since {rule.id}: {gone}"
        reason = f"the plugin died during this rule: {gone}" + (
            f" ({result.status}: {result.reason})" if result.reason else ""
        )
        log.warning("%s: %s", rule.id, reason)
        return Result(rule.id, rule.level, "fail", reason, result.seconds, rule.description)
    log.info("%s: %s %s", rule.id, result.status, result.reason)
    return result
