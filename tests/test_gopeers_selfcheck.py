"""Self-checks of the Go stand-ins in tests/gopeers against the captured GoPlug 0.1.0 bytes.

go_plugin.py must answer what the original Go plugin answered, and go_registry.py must send what
the original Go registry sent and accept only what it accepted. The expected bytes below are
captured from GoPlug 0.1.0 on the wire; only Date values may differ.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gopeers.go_plugin import DEFAULT_METHODS, GoPlugin, GoPluginProcess, detect_content_type
from gopeers.go_registry import (
    GoJSONError,
    GoRegistryClient,
    GoRegistryError,
    decode_pconf,
    expected_request_bytes,
    go_unmarshal_string,
    go_unmarshal_string_list,
    scan_plugin_dir,
)

pytestmark = pytest.mark.timeout(60)

# --- Transcript bytes ---------------------------------------------------------------------------

ACTIVATE_REQUEST_HEX = (
    "504f5354202f416374697661746520485454502f312e310d0a486f73743a2054657374446f0d0a5573"
    "65722d4167656e743a20476f2d687474702d636c69656e742f312e310d0a436f6e74656e742d4c656e"
    "6774683a20300d0a0d0a"
)
PING_REQUEST_HEX = (
    "504f5354202f50696e6720485454502f312e310d0a486f73743a2054657374446f0d0a557365722d41"
    "67656e743a20476f2d687474702d636c69656e742f312e310d0a436f6e74656e742d4c656e6774683a"
    "20390d0a436f6e74656e742d547970653a206170706c69636174696f6e2f6a736f6e0d0a0d0a546573"
    "742044617461"
)
DO_REQUEST_HEX = (
    "504f5354202f6d61696e2e446f20485454502f312e310d0a486f73743a2054657374446f0d0a557365"
    "722d4167656e743a20476f2d687474702d636c69656e742f312e310d0a436f6e74656e742d4c656e67"
    "74683a20300d0a0d0a"
)
REGISTER_CALLBACK_REQUEST_HEX = (
    "504f5354202f526567697374657243616c6c6261636b20485454502f312e310d0a486f73743a205465"
    "7374446f0d0a557365722d4167656e743a20476f2d687474702d636c69656e742f312e310d0a436f6e"
    "74656e742d4c656e6774683a2031350d0a436f6e74656e742d547970653a206170706c69636174696f"
    "6e2f6a736f6e0d0a0d0a226d61696e2e63616c6c4261636b22"
)
STOP_REQUEST_HEX = (
    "504f5354202f53746f7020485454502f312e310d0a486f73743a2054657374446f0d0a557365722d41"
    "67656e743a20476f2d687474702d636c69656e742f312e310d0a436f6e74656e742d4c656e6774683a"
    "20300d0a0d0a"
)
ACTIVATE_RESPONSE_HEX = (
    "485454502f312e3120323030204f4b0d0a446174653a205765642c203235204e6f7620323032362031"
    "303a30303a313220474d540d0a436f6e74656e742d4c656e6774683a2032330d0a436f6e74656e742d"
    "547970653a20746578742f706c61696e3b20636861727365743d7574662d380d0a0d0a5b226d61696e"
    "2e446f222c22222c22222c22222c22225d"
)
BAD_REQUEST_RESPONSE_HEX = (
    "485454502f312e31203430302042616420526571756573740d0a446174653a205765642c203235204e"
    "6f7620323032362031303a30303a313220474d540d0a436f6e74656e742d4c656e6774683a20300d0a"
    "0d0a"
)
PCONF_HEX = (
    "7b224e616d65223a22446f222c224e616d65537061636522"
    "3a2254657374222c2255726c223a22756e69783a2f2f5465"
    "7374446f222c22536f636b223a222f746d702f67707275"
    "6e2f412f7265616c2f54657374446f2e736f636b222c224c61"
    "7a794c6f6164223a66616c73657d"
)

DATE = b"Date: Wed, 25 Nov 2026 10:00:12 GMT"
OK_HEAD = b"HTTP/1.1 200 OK\r\n" + DATE + b"\r\n"
TEXT = b"Content-Type: text/plain; charset=utf-8\r\n"
PING_RESPONSE = OK_HEAD + b"Content-Length: 9\r\n" + TEXT + b"\r\nTest Data"
DO_RESPONSE = OK_HEAD + b"Content-Length: 0\r\n\r\n"
CALLBACK_RESPONSE = PING_RESPONSE
STOP_RESPONSE = OK_HEAD + b"Content-Length: 7\r\n" + TEXT + b"\r\nstopped"
BIG_RESPONSE = (
    OK_HEAD + TEXT + b"Transfer-Encoding: chunked\r\n\r\n1388\r\n" + b"x" * 5000 + b"\r\n0\r\n\r\n"
)
MISSING_HOST_RESPONSE = (
    b"HTTP/1.1 400 Bad Request: missing required Host header\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"
    b"400 Bad Request: missing required Host header"
)
SEED_README_PCONF = (
    b'{\n"Name" : "NameOfPlugin",\n"NameSpace" : "NamespaceOfPlugin",\n'
    b'"Url" : "unix://PluginUrl",\n"sock" : "unixSockLocation.sock",\n"LazyLoad" : false,\n}\n'
)


def post(route: str, body: bytes | None = None, host: str = "TestDo") -> bytes:
    """A request exactly as the Go registry sends it (checked against the hex above)."""
    return expected_request_bytes(route, host, body)


# --- Helpers ------------------------------------------------------------------------------------

_DATE_LINE = re.compile(rb"\r\nDate: ([^\r\n]*)\r\n")
_HTTP_DATE = re.compile(
    rb"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} "
    rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
)


def without_date(response: bytes) -> bytes:
    """The response with its Date value (checked for Go's format) replaced by a marker."""
    match = _DATE_LINE.search(response)
    assert match is not None, response
    assert _HTTP_DATE.fullmatch(match[1]), match[1]
    return response[: match.start(1)] + b"<date>" + response[match.end(1) :]


class RawConnection:
    """A plain client socket that reads whole HTTP/1.1 responses as raw bytes.

    Deliberately simple and independent of go_registry: Content-Length, chunked (read up to the
    final ``0\\r\\n\\r\\n``) or bodyless responses.
    """

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _receive(self, deadline: float) -> bool:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def read_response(self, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buffer:
            if not self._receive(deadline):
                raise EOFError(self.buffer)
        head_end = self.buffer.index(b"\r\n\r\n") + 4
        head = self.buffer[:head_end].lower()
        length = re.search(rb"\r\ncontent-length: ([0-9]+)\r\n", head)
        if length:
            end = head_end + int(length[1])
        elif b"\r\ntransfer-encoding: chunked\r\n" in head:
            while b"\r\n0\r\n\r\n" not in self.buffer[head_end - 2 :]:
                if not self._receive(deadline):
                    raise EOFError(self.buffer)
            end = self.buffer.index(b"\r\n0\r\n\r\n", head_end - 2) + 7
        else:
            end = head_end
        while len(self.buffer) < end:
            if not self._receive(deadline):
                raise EOFError(self.buffer)
        response, self.buffer = self.buffer[:end], self.buffer[end:]
        return response

    def read_to_eof(self, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while self._receive(deadline):
            pass
        data, self.buffer = self.buffer, b""
        return data

    def nothing_within(self, seconds: float) -> bool:
        """True if no byte arrives within ``seconds`` (a bounded wait for a negative check)."""
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return True
        self.buffer += chunk
        return False

    def close(self) -> None:
        self.sock.close()


class CannedPlugin:
    """A fake plugin on a real Unix socket: records each request, answers with canned bytes.

    Each answer is ``(bytes, close_after)``; after the last one it records whatever else
    arrives until the client closes.
    """

    def __init__(self, path: Path, answers: list[tuple[bytes, bool]]) -> None:
        self.path = path
        self.answers = answers
        self.requests: list[bytes] = []
        self.extra = b""
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(20)
            buffer = b""
            for answer, close_after in self.answers:
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head_end = buffer.index(b"\r\n\r\n") + 4
                length = re.search(rb"\r\nContent-Length: ([0-9]+)\r\n", buffer[:head_end])
                end = head_end + (int(length[1]) if length else 0)
                while len(buffer) < end:
                    buffer += conn.recv(65536)
                self.requests.append(buffer[:end])
                buffer = buffer[end:]
                conn.sendall(answer)
                if close_after:
                    return
            self.extra = buffer
            while chunk := conn.recv(65536):
                self.extra += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes an accept() still waiting
        self.listener.close()
        self.thread.join(20)
        self.path.unlink(missing_ok=True)


def in_thread(function: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``function`` in a thread; the dict gets "result" or "error"."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = function()
        except Exception as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


# --- Fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Iterator[Path]:
    """pytest's tmp_path, or a short /tmp/gp* directory if socket paths would get too long."""
    if len(str(tmp_path)) <= 70:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="gp", dir="/tmp"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def start_plugin(plugin_dir: Path) -> Iterator[Callable[..., GoPluginProcess]]:
    """Start go_plugin.py processes; each is killed and its files removed at teardown."""
    started: list[GoPluginProcess] = []

    def start(*, ready_line: str = "ready", **options: Any) -> GoPluginProcess:
        plugin = GoPluginProcess(plugin_dir, **options)
        started.append(plugin)
        return plugin.start(ready_line=ready_line)

    yield start
    for plugin in started:
        plugin.close()


@pytest.fixture
def connect() -> Iterator[Callable[[Path], RawConnection]]:
    """Open raw client connections; all are closed at teardown."""
    opened: list[RawConnection] = []

    def open_connection(path: Path) -> RawConnection:
        connection = RawConnection(path)
        opened.append(connection)
        return connection

    yield open_connection
    for connection in opened:
        connection.close()


@pytest.fixture
def canned(plugin_dir: Path) -> Iterator[Callable[[list[tuple[bytes, bool]]], CannedPlugin]]:
    """Start CannedPlugin servers at plugin_dir/TestDo.sock; stopped at teardown."""
    servers: list[CannedPlugin] = []

    def start(answers: list[tuple[bytes, bool]]) -> CannedPlugin:
        server = CannedPlugin(plugin_dir / "TestDo.sock", answers)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


# --- Request bytes (go_registry) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "body", "hex_text", "size"),
    [
        ("Activate", None, ACTIVATE_REQUEST_HEX, 92),
        ("Ping", b"Test Data", PING_REQUEST_HEX, 129),
        ("main.Do", None, DO_REQUEST_HEX, 91),
        ("RegisterCallback", b'"main.callBack"', REGISTER_CALLBACK_REQUEST_HEX, 148),
        ("Stop", None, STOP_REQUEST_HEX, 88),
    ],
)
def test_request_bytes_match_transcript_hex(
    route: str, body: bytes | None, hex_text: str, size: int
) -> None:
    expected = bytes.fromhex(hex_text)
    assert len(expected) == size
    assert expected_request_bytes(route, "TestDo", body) == expected


def test_request_bytes_for_other_bodies_and_urls() -> None:
    assert expected_request_bytes("main.Echo", "TestDo", b"") == (
        b"POST /main.Echo HTTP/1.1\r\nHost: TestDo\r\nUser-Agent: Go-http-client/1.1\r\n"
        b"Content-Length: 0\r\nContent-Type: application/json\r\n\r\n"
    )
    assert expected_request_bytes("", "TestDo", None).startswith(b"POST / HTTP/1.1\r\n")
    assert len(expected_request_bytes("", "TestDo", None)) == 84
    based = expected_request_bytes("Activate", "", None, url="http://otherhost:99/base")
    assert based.startswith(b"POST /base/Activate HTTP/1.1\r\nHost: otherhost:99\r\n")
    no_url = expected_request_bytes("Activate", "", None, url="")
    assert no_url.startswith(b"POST /Activate HTTP/1.1\r\nHost: \r\nUser-Agent:")
    with pytest.raises(GoRegistryError, match='invalid character " " in host name'):
        expected_request_bytes("Activate", "", None, url="unix://Test Do%zz")


def test_pconf_bytes_match_transcript() -> None:
    plugin = GoPlugin("/tmp/gprun/A/real", "Do", "Test")
    expected = bytes.fromhex(PCONF_HEX)
    assert len(expected) == 110
    assert plugin.pconf_bytes() == expected


# --- Go's JSON rules (shared by both stand-ins) ---------------------------------------------------


@pytest.mark.parametrize(
    ("body", "methods", "error"),
    [
        (b'["main.Do","","","",""]', ["main.Do", "", "", "", ""], None),
        (b'["m",""]', ["m", ""], None),
        (b"null", [], None),
        (b'["m",null]', ["m", ""], None),
        (b' \n["m"]\t ', ["m"], None),
        (b"", None, "unexpected end of JSON input"),
        (b"{}", None, "json: cannot unmarshal object into Go value of type []string"),
        (b'["m",1]', ["m", ""], "json: cannot unmarshal number into Go value of type string"),
        (b'["a",""]HELLO', None, "invalid character 'H' after top-level value"),
        (b'["a",]', None, "invalid character ']' looking for beginning of value"),
    ],
)
def test_activate_body_parsed_like_go(
    body: bytes, methods: list[str] | None, error: str | None
) -> None:
    got, got_error = go_unmarshal_string_list(body)
    assert got == methods
    assert (None if got_error is None else str(got_error)) == error


def test_register_callback_name_parsed_like_go() -> None:
    assert go_unmarshal_string(b'"main.callBack"') == "main.callBack"
    assert go_unmarshal_string(b"null") == ""
    with pytest.raises(GoJSONError, match=re.escape("invalid character 'o' in literal null")):
        go_unmarshal_string(b"notjson")
    with pytest.raises(GoJSONError, match="cannot unmarshal number into Go value of type string"):
        go_unmarshal_string(b"5")


def test_pconf_read_like_the_go_registry(tmp_path: Path) -> None:
    with pytest.raises(GoJSONError, match="invalid character '}' looking for beginning of object"):
        decode_pconf(SEED_README_PCONF)
    lower = decode_pconf(b'{"name":"Do","namespace":"Test","url":"unix://TestDo","sock":"/s"}')
    assert (lower.key, lower.url, lower.sock, lower.lazy_load) == (
        "TestDo",
        "unix://TestDo",
        "/s",
        False,
    )
    assert decode_pconf(b'{"Name":"Do","Extra":[1,2]}garbage!!').name == "Do"
    nulls = decode_pconf(b'{"Name":"Do","Url":null,"LazyLoad":null}')
    assert (nulls.url, nulls.lazy_load) == ("", False)
    with pytest.raises(GoJSONError, match=re.escape("PluginConf.LazyLoad of type bool")):
        decode_pconf(b'{"Name":"Do","LazyLoad":"false"}')
    with pytest.raises(GoJSONError, match="invalid character '\u00ef' looking for beginning"):
        decode_pconf(b'\xef\xbb\xbf{"Name":"Do"}')
    with pytest.raises(GoJSONError, match=r"^EOF$"):
        decode_pconf(b"")
    names = ("TestDo.pconf", "TestDo.json.pconf", "TestDo.PCONF", "TestDo.pconf.bak")
    try:
        for name in names:
            (tmp_path / name).write_bytes(b"{}")
        (tmp_path / "dir.pconf").mkdir()
        found = [p.name for p in scan_plugin_dir(tmp_path)]
        assert found == ["TestDo.json.pconf", "TestDo.pconf"]
    finally:
        for name in names:
            (tmp_path / name).unlink(missing_ok=True)
        shutil.rmtree(tmp_path / "dir.pconf", ignore_errors=True)


def test_content_type_sniffed_like_go() -> None:
    assert detect_content_type(b"Test Data") == "text/plain; charset=utf-8"
    assert detect_content_type(b'["main.Do",""]') == "text/plain; charset=utf-8"
    assert detect_content_type(b"\x00\xff\x01\x80") == "application/octet-stream"
    assert detect_content_type(b"<html>") == "text/html; charset=utf-8"
    assert detect_content_type(b"  <HTML ") == "text/html; charset=utf-8"
    assert detect_content_type(b"\x89PNG\r\n\x1a\n....") == "image/png"


# --- go_plugin.py on the wire -------------------------------------------------------------------


def test_plugin_writes_pconf_like_go(start_plugin: Callable[..., GoPluginProcess]) -> None:
    plugin = start_plugin()
    sock = str(plugin.sock_path).encode()
    assert os.path.isabs(sock)
    assert plugin.pconf_path.read_bytes() == (
        b'{"Name":"Do","NameSpace":"Test","Url":"unix://TestDo","Sock":"'
        + sock
        + b'","LazyLoad":false}'
    )
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(plugin.pconf_path.stat().st_mode) == 0o666 & ~umask
    assert stat.S_ISSOCK(plugin.sock_path.stat().st_mode)


def test_plugin_answers_transcript_bytes(
    start_plugin: Callable[..., GoPluginProcess], connect: Callable[[Path], RawConnection]
) -> None:
    plugin = start_plugin(methods=["main.Do"])  # the original example's only method
    connection = connect(plugin.sock_path)
    exchanges = [
        (ACTIVATE_REQUEST_HEX, bytes.fromhex(ACTIVATE_RESPONSE_HEX)),
        (PING_REQUEST_HEX, PING_RESPONSE),
        (DO_REQUEST_HEX, DO_RESPONSE),
        (post("").hex(), bytes.fromhex(BAD_REQUEST_RESPONSE_HEX)),  # the "" methods
        (post("Nope", b"abc").hex(), bytes.fromhex(BAD_REQUEST_RESPONSE_HEX)),
        (PING_REQUEST_HEX, PING_RESPONSE),  # the connection stayed open after the 400s
    ]
    for request_hex, expected in exchanges:
        connection.send(bytes.fromhex(request_hex))
        response = connection.read_response()
        assert without_date(response) == without_date(expected)
    assert len(bytes.fromhex(ACTIVATE_RESPONSE_HEX)) == 140
    assert len(bytes.fromhex(BAD_REQUEST_RESPONSE_HEX)) == 84


def test_plugin_activate_lists_all_methods_in_random_order(
    start_plugin: Callable[..., GoPluginProcess], connect: Callable[[Path], RawConnection]
) -> None:
    plugin = start_plugin()
    connection = connect(plugin.sock_path)
    orders = set()
    for _ in range(12):
        connection.send(bytes.fromhex(ACTIVATE_REQUEST_HEX))
        response = connection.read_response()
        head, body = response.split(b"\r\n\r\n", 1)
        assert head.endswith(b"\r\nContent-Length: %d\r\n" % len(body) + TEXT.rstrip(b"\r\n"))
        names = json.loads(body)
        assert names[-4:] == ["", "", "", ""]
        assert sorted(names[:-4]) == sorted(DEFAULT_METHODS)
        orders.add(tuple(names))
    assert len(orders) > 1


def test_plugin_chunks_large_bodies(
    start_plugin: Callable[..., GoPluginProcess], connect: Callable[[Path], RawConnection]
) -> None:
    plugin = start_plugin()
    connection = connect(plugin.sock_path)
    connection.send(post("main.Big", b""))
    assert without_date(connection.read_response()) == without_date(BIG_RESPONSE)
    connection.send(post("main.Echo", b"y" * 2048))
    assert b"\r\nContent-Length: 2048\r\n" in connection.read_response()
    connection.send(post("main.Echo", b"y" * 2049))
    assert connection.read_response().endswith(
        TEXT + b"Transfer-Encoding: chunked\r\n\r\n801\r\n" + b"y" * 2049 + b"\r\n0\r\n\r\n"
    )
    connection.send(post("main.Echo", b"z" * 0xA0B))  # sizes are lower-case hex
    assert connection.read_response().endswith(b"\r\n\r\na0b\r\n" + b"z" * 0xA0B + b"\r\n0\r\n\r\n")
    connection.send(post("main.Echo", b"\x00\xff\x01\x80"))
    assert without_date(connection.read_response()) == (
        b"HTTP/1.1 200 OK\r\nDate: <date>\r\nContent-Length: 4\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n\x00\xff\x01\x80"
    )
    connection.send(post("main.Nil", None))
    assert without_date(connection.read_response()) == without_date(DO_RESPONSE)


def test_plugin_routes_on_first_decoded_segment_and_pipelines(
    start_plugin: Callable[..., GoPluginProcess], connect: Callable[[Path], RawConnection]
) -> None:
    plugin = start_plugin()
    connection = connect(plugin.sock_path)

    def request(target: str, body: bytes) -> bytes:
        return b"POST %s HTTP/1.1\r\nHost: TestDo\r\nContent-Length: %d\r\n\r\n%s" % (
            target.encode(),
            len(body),
            body,
        )

    connection.send(
        request("/%50ing", b"one")
        + request("/main.Echo/extra/x?q=1", b"two")
        + request("/ping", b"three")
        + request("/main.Echo", b"four")
    )
    bodies = [connection.read_response() for _ in range(4)]
    assert bodies[0].endswith(b"\r\n\r\none")
    assert bodies[1].endswith(b"\r\n\r\ntwo")
    assert bodies[2].startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert bodies[3].endswith(b"\r\n\r\nfour")


def test_plugin_rejects_missing_host_and_closes(
    start_plugin: Callable[..., GoPluginProcess], connect: Callable[[Path], RawConnection]
) -> None:
    plugin = start_plugin()
    connection = connect(plugin.sock_path)
    connection.send(b"POST /Ping HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert connection.read_to_eof() == MISSING_HOST_RESPONSE


def test_plugin_http10_and_connection_close_end_the_connection(
    start_plugin: Callable[..., GoPluginProcess], connect: Callable[[Path], RawConnection]
) -> None:
    plugin = start_plugin()
    old = connect(plugin.sock_path)
    old.send(b"POST /Ping HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi")
    assert without_date(old.read_to_eof()) == (
        b"HTTP/1.0 200 OK\r\nDate: <date>\r\nContent-Length: 2\r\n" + TEXT + b"\r\nhi"
    )
    closing = connect(plugin.sock_path)
    closing.send(
        b"POST /Ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"
    )
    assert without_date(closing.read_to_eof()) == (
        b"HTTP/1.1 200 OK\r\nDate: <date>\r\nContent-Length: 2\r\n"
        + TEXT
        + b"Connection: close\r\n\r\nhi"
    )


def test_plugin_panic_closes_without_response(
    start_plugin: Callable[..., GoPluginProcess], connect: Callable[[Path], RawConnection]
) -> None:
    plugin = start_plugin()
    connection = connect(plugin.sock_path)
    connection.send(post("main.Panic", b"x") + bytes.fromhex(PING_REQUEST_HEX))
    assert connection.read_to_eof() == b""
    plugin.wait_for_stderr("http: panic serving @: boom")
    other = connect(plugin.sock_path)  # the plugin itself lives on
    other.send(bytes.fromhex(PING_REQUEST_HEX))
    assert without_date(other.read_response()) == without_date(PING_RESPONSE)


def test_plugin_long_poll_answers_notify_from_stdin(
    start_plugin: Callable[..., GoPluginProcess], connect: Callable[[Path], RawConnection]
) -> None:
    plugin = start_plugin()
    connection = connect(plugin.sock_path)
    connection.send(bytes.fromhex(REGISTER_CALLBACK_REQUEST_HEX))
    plugin.wait_for_line("registered main.callBack")
    plugin.notify("main.callBack", b"Test Data")
    assert without_date(connection.read_response()) == without_date(CALLBACK_RESPONSE)
    plugin.wait_for_line("notified main.callBack")
    plugin.notify("nobody", b"x")
    plugin.wait_for_line("notify-failed nobody: Callback could not be found for: nobody")


def test_plugin_later_poll_replaces_earlier_and_notify_method(
    start_plugin: Callable[..., GoPluginProcess], connect: Callable[[Path], RawConnection]
) -> None:
    plugin = start_plugin()
    first, second, caller = (connect(plugin.sock_path) for _ in range(3))
    first.send(post("RegisterCallback", b'"main.cb"'))
    plugin.wait_for_line("registered main.cb")
    second.send(post("RegisterCallback", b'"main.cb"'))
    plugin.wait_for_line("registered main.cb", count=2)
    caller.send(post("main.Notify", b"main.cb\nN1"))
    assert without_date(caller.read_response()) == without_date(DO_RESPONSE)
    assert second.read_response().endswith(b"\r\n\r\nN1")
    assert first.nothing_within(0.3)  # its slot was replaced: it waits forever, as in Go
    caller.send(post("main.Notify", b"nobody\nN2"))
    assert caller.read_response().endswith(b"\r\n\r\nCallback could not be found for: nobody")


def test_plugin_exits_on_bad_register_callback_body(
    start_plugin: Callable[..., GoPluginProcess], connect: Callable[[Path], RawConnection]
) -> None:
    plugin = start_plugin()
    connection = connect(plugin.sock_path)
    connection.send(post("RegisterCallback", b"notjson"))
    assert plugin.wait() == 1
    assert connection.read_to_eof() == b""
    plugin.wait_for_stderr(
        "FATAL Failed to get the func name: invalid character 'o' in literal null (expecting 'u')"
    )
    assert plugin.pconf_path.exists()
    assert plugin.sock_path.exists()


def test_plugin_stop_answers_stopper_output(
    start_plugin: Callable[..., GoPluginProcess], connect: Callable[[Path], RawConnection]
) -> None:
    plugin = start_plugin()
    connection = connect(plugin.sock_path)
    connection.send(bytes.fromhex(STOP_REQUEST_HEX))
    assert without_date(connection.read_response()) == without_date(STOP_RESPONSE)
    assert plugin.proc is not None and plugin.proc.poll() is None


def test_plugin_exit_on_stop_removes_files_without_answering(
    start_plugin: Callable[..., GoPluginProcess], connect: Callable[[Path], RawConnection]
) -> None:
    plugin = start_plugin(exit_on_stop=True)
    connection = connect(plugin.sock_path)
    connection.send(bytes.fromhex(STOP_REQUEST_HEX))
    assert connection.read_to_eof() == b""
    assert plugin.wait() == 0
    assert not plugin.pconf_path.exists()
    assert not plugin.sock_path.exists()


def test_plugin_sigterm_removes_files(start_plugin: Callable[..., GoPluginProcess]) -> None:
    plugin = start_plugin()
    assert plugin.terminate() == 0
    assert not plugin.pconf_path.exists()
    assert not plugin.sock_path.exists()


def test_plugin_start_fails_on_stale_socket(
    start_plugin: Callable[..., GoPluginProcess], plugin_dir: Path
) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(plugin_dir / "TestDo.sock"))
    stale.close()  # leaves the socket file behind, like a crashed plugin
    plugin = start_plugin(ready_line="start-failed")
    plugin.wait_for_stderr("Failed to Create the server")
    assert not plugin.pconf_path.exists()
    assert plugin.proc is not None and plugin.proc.poll() is None


# --- go_registry.py against go_plugin.py ---------------------------------------------------------


def test_registry_client_talks_to_plugin(start_plugin: Callable[..., GoPluginProcess]) -> None:
    plugin = start_plugin()
    with GoRegistryClient(plugin.sock_path, "TestDo") as client:
        methods = client.activate()
        assert sorted(m for m in methods if m) == sorted(DEFAULT_METHODS)
        assert methods[-4:] == ["", "", "", ""]
        assert client.methods == methods
        client.ping()
        assert client.execute("main.Echo", b"hello") == b"hello"
        assert client.execute("main.Echo", b"") == b""
        assert client.execute("main.Do", None) == b""
        assert client.execute("main.Nil", None) == b""
        assert client.execute("main.Big", None) == b"x" * 5000
        with pytest.raises(GoRegistryError, match="request failed: status '400 Bad Request'"):
            client.execute("Nope", b"abc")
        with pytest.raises(GoRegistryError, match="400 Bad Request"):
            client.execute("", None)
        client.ping()  # a 400 leaves the connection usable
        assert client.stop() == b"stopped"
        assert client.dead == "use of closed network connection"


def test_registry_client_loads_from_pconf(start_plugin: Callable[..., GoPluginProcess]) -> None:
    plugin = start_plugin(methods=["main.Do"])
    with GoRegistryClient.from_pconf(plugin.pconf_path) as client:
        assert client.activate() == ["main.Do", "", "", "", ""]


def test_registry_client_fails_activation_with_activator_output(
    start_plugin: Callable[..., GoPluginProcess],
) -> None:
    plugin = start_plugin(activator_output="HELLO")
    with GoRegistryClient(plugin.sock_path, "TestDo") as client:
        with pytest.raises(GoRegistryError, match="invalid character 'H' after top-level value"):
            client.activate()
        assert client.methods == []
        client.ping()  # "Ping still worked"


def test_registry_client_loses_connection_on_panic(
    start_plugin: Callable[..., GoPluginProcess],
) -> None:
    plugin = start_plugin()
    with GoRegistryClient(plugin.sock_path, "TestDo") as client:
        with pytest.raises(GoRegistryError, match=r"^unexpected EOF$"):
            client.execute("main.Panic", b"x")
        with pytest.raises(GoRegistryError, match=r"^unexpected EOF$"):
            client.ping()


def test_registry_client_callback_and_queueing_behind_poll(
    start_plugin: Callable[..., GoPluginProcess],
) -> None:
    plugin = start_plugin()
    with GoRegistryClient(plugin.sock_path, "TestDo") as client:
        poll, poll_box = in_thread(lambda: client.register_callback_once("main.callBack"))
        plugin.wait_for_line("registered main.callBack")
        ping, ping_box = in_thread(client.ping)
        ping.join(0.3)
        assert ping.is_alive()  # one connection: the ping waits behind the long poll
        plugin.notify("main.callBack", b"Test Data")
        poll.join(10)
        ping.join(10)
        assert poll_box == {"result": b"Test Data"}
        assert ping_box == {"result": None}


def test_registry_client_stop_of_exiting_plugin_fails_with_eof(
    start_plugin: Callable[..., GoPluginProcess],
) -> None:
    plugin = start_plugin(exit_on_stop=True)
    client = GoRegistryClient(plugin.sock_path, "TestDo")
    with pytest.raises(GoRegistryError, match=r"^unexpected EOF$"):
        client.stop()
    assert plugin.wait() == 0
    assert client.dead is not None


def test_registry_client_connection_failure(plugin_dir: Path) -> None:
    with pytest.raises(GoRegistryError, match="Plugin to connection failed"):
        GoRegistryClient(plugin_dir / "absent.sock", "TestDo")


# --- go_registry.py's bytes and acceptance rules, against a canned plugin -----------------------


def test_registry_client_sends_transcript_bytes(
    canned: Callable[[list[tuple[bytes, bool]]], CannedPlugin], plugin_dir: Path
) -> None:
    answers = [
        (b'HTTP/1.1 200 OK\r\nContent-Length: 23\r\n\r\n["main.Do","","","",""]', False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nTest Data", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nTest Data", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nstopped", False),
    ]
    server = canned(answers)
    client = GoRegistryClient(plugin_dir / "TestDo.sock", "TestDo")
    assert client.activate() == ["main.Do", "", "", "", ""]
    client.ping()
    assert client.execute("main.Do", None) == b""
    assert client.register_callback_once("main.callBack") == b"Test Data"
    assert client.stop() == b"stopped"
    server.close()
    assert server.requests == [
        bytes.fromhex(h)
        for h in (
            ACTIVATE_REQUEST_HEX,
            PING_REQUEST_HEX,
            DO_REQUEST_HEX,
            REGISTER_CALLBACK_REQUEST_HEX,
            STOP_REQUEST_HEX,
        )
    ]


@pytest.mark.parametrize(
    ("answer", "close_after", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nTest Data", False, None),
        (b"HTTP/1.1 200 OK\nContent-Length: 9\n\nTest Data", False, None),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\nTest\r\n5\r\n Data\r\n0\r\n\r\n",
            False,
            None,
        ),
        (b"HTTP/1.1 200\r\nContent-Length: 9\r\n\r\nTest Data", False, "status '200'"),
        (b"HTTP/1.1 200 Ok\r\nContent-Length: 9\r\n\r\nTest Data", False, "status '200 Ok'"),
        (b"HTTP/1.1 201 Created\r\nContent-Length: 9\r\n\r\nTest Data", False, "status '201"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nTest data", False, "different than sent"),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nTest Data", False, "persistent connection"),
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 9\r\n\r\nTest Data",
            False,
            "persistent connection closed",
        ),
        (b"HTTP/1.1 200 OK\r\n\r\nTest Data", True, "persistent connection closed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nTest", True, "^unexpected EOF$"),
    ],
    ids=[
        "plain",
        "bare-lf",
        "chunked",
        "no-reason",
        "Ok",
        "201",
        "wrong-body",
        "http10",
        "connection-close",
        "close-delimited",
        "truncated",
    ],
)
def test_registry_client_accepts_what_go_accepts(
    canned: Callable[[list[tuple[bytes, bool]]], CannedPlugin],
    plugin_dir: Path,
    answer: bytes,
    close_after: bool,
    error: str | None,
) -> None:
    server = canned([(answer, close_after)])
    with GoRegistryClient(plugin_dir / "TestDo.sock", "TestDo", timeout=10) as client:
        if error is None:
            client.ping()
            return
        with pytest.raises(GoRegistryError, match=error):
            client.ping()
        if client.dead is not None:  # dead for good: the next call fails and sends nothing
            with pytest.raises(GoRegistryError, match=re.escape(client.dead)):
                client.ping()
    server.close()
    assert len(server.requests) == 1
    assert server.extra == b""
