"""Stand-in for a plugin built with GoPlug 0.1.0 (the Go library), for interop tests.

    python tests/gopeers/go_plugin.py DIR [--name Do] [--namespace Test]
        [--activator-output BYTES] [--no-pconf] [--exit-on-stop] [--methods main.Do,...] [--trace]

Start-up, as the Go library does it: listen on ``DIR/<NameSpace><Name>.sock`` (absolute path),
then write ``DIR/<NameSpace><Name>.pconf`` in place with one write: compact JSON, keys Name,
NameSpace, Url (``unix://<NameSpace><Name>``), Sock, LazyLoad, no trailing newline, mode
0666 & ~umask. Then print ``ready``. If the socket path already exists (a stale socket), listening
fails: it logs ``Failed to Create the server``, prints ``start-failed`` and keeps waiting with no
server and no .pconf, like the original example.

The HTTP server answers byte for byte like Go's net/http server: ``HTTP/1.1 200 OK``, headers in
the order Date, Content-Length, Content-Type (sniffed with Go's DetectContentType, absent for an
empty body), Connection, Transfer-Encoding. Bodies up to 2048 bytes get Content-Length, larger
ones ``Transfer-Encoding: chunked`` (one lower-case hex chunk per handler write, then
``0\\r\\n\\r\\n``). Bytes go out in the same writes as through Go's 4 KiB connection buffer.
Unknown routes and ``/`` give ``400 Bad Request`` with ``Content-Length: 0``, and the connection
stays open. Routing uses the first path segment after %-decoding, case-sensitively. Go's own
protocol errors are reproduced too: no Host header, malformed requests, unsupported
Transfer-Encoding, oversized heads, ``Expect``, HTTP/1.0 and ``Connection: close``,
``OPTIONS *``. Pipelined requests are served in order.

Routes:
  /Activate           ``["main.Do",...,"","","",""]``: the methods in random order, one "" per
                      built-in route, then the --activator-output bytes, if any
  /Ping               echoes the body
  /RegisterCallback   body = JSON string NAME: long poll until NAME is notified; one slot per
                      name, a later registration replaces the earlier one (which then waits
                      forever, as in Go). A body that is not a JSON string: a FATAL line on
                      stderr and exit 1, leaving .pconf and .sock behind.
  /Stop               answers ``stopped``; with --exit-on-stop it instead removes the socket
                      and the .pconf and exits 0 without answering (the original example)
  /main.Do, /main.Nil empty body        /main.Echo   echoes the body
  /main.Big           5000 x ``x`` (chunked, ``1388``)
  /main.Panic         closes the connection with no response bytes (a recovered Go panic)
  /main.Notify        body ``NAME\\nDATA``: Notify(NAME, DATA), then an empty body (or the
                      error text if nobody registered NAME)

Notify(name, data) behaves like the original: it fails with ``Callback could not be found for:
NAME`` when no poll ever registered NAME, and otherwise blocks until the slot's poll takes the
data, forever if that poll already got its answer.

stdin, one command a line: ``notify NAME DATA`` or ``notify-hex NAME HEXDATA``.
stdout: ``ready`` or ``start-failed``; with --trace also ``registered NAME`` (a poll is waiting),
``notified NAME`` and ``notify-failed NAME: REASON``.
SIGTERM: closes the listener, removes the socket and the .pconf, exits 0 (the library's Stop()).

Import ``GoPluginProcess`` from this module to run the script as a child process in a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

if __package__:  # imported as gopeers.go_plugin, for GoPluginProcess
    from .go_registry import (
        GoJSONError,
        LineTooLong,
        SocketReader,
        go_marshal_string,
        go_marshal_string_list,
        go_unmarshal_string,
        has_token,
        header_values,
        parse_http_version,
        read_chunked_body,
        read_header_lines,
    )
else:  # run as a script: its own directory is sys.path[0]
    from go_registry import (
        GoJSONError,
        LineTooLong,
        SocketReader,
        go_marshal_string,
        go_marshal_string_list,
        go_unmarshal_string,
        has_token,
        header_values,
        parse_http_version,
        read_chunked_body,
        read_header_lines,
    )

GO_PLUGIN_SCRIPT = os.path.abspath(__file__)
BUILTIN_ROUTES = ("Activate", "Ping", "RegisterCallback", "Stop")
DEFAULT_METHODS = ("main.Do", "main.Echo", "main.Big", "main.Panic", "main.Nil", "main.Notify")
BIG_BODY = b"x" * 5000
STOPPER_OUTPUT = b"stopped"

BUFFER_BEFORE_CHUNKING = 2048  # net/http: larger bodies are chunked
CONN_BUFFER_SIZE = 4096  # net/http's bufio.Writer on each connection
MAX_HEAD_BYTES = (1 << 20) + 4096  # DefaultMaxHeaderBytes + Go's slack
STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}


def go_log(message: str) -> None:
    """A line as Go's log package prints it to stderr."""
    sys.stderr.write(f"{time.strftime('%Y/%m/%d %H:%M:%S')} {message}\n")
    sys.stderr.flush()


def http_date() -> str:
    return formatdate(usegmt=True)  # "Wed, 25 Nov 2026 10:00:12 GMT", as Go's http.TimeFormat


# --------------------------------------------------------------------------------------------
# net/http's DetectContentType
# --------------------------------------------------------------------------------------------

_SNIFF_SPACE = b"\t\n\x0c\r "
_HTML_TAGS = (
    *(b"<!DOCTYPE HTML", b"<HTML", b"<HEAD", b"<SCRIPT", b"<IFRAME", b"<H1", b"<DIV", b"<FONT"),
    *(b"<TABLE", b"<A", b"<STYLE", b"<TITLE", b"<B", b"<BODY", b"<BR", b"<P", b"<!--"),
)
_ALL = None  # mask of all 0xFF: an exact prefix
# (pattern, mask, skip leading space, content type), in Go's order after the HTML tags;
# pattern None stands for the mp4 rule, which is not a byte pattern.
_SIGNATURES: tuple[tuple[bytes | None, bytes | None, bool, str], ...] = (
    (b"<?xml", _ALL, True, "text/xml; charset=utf-8"),
    (b"%PDF-", _ALL, False, "application/pdf"),
    (b"%!PS-Adobe-", _ALL, False, "application/postscript"),
    (b"\xfe\xff\x00\x00", b"\xff\xff\x00\x00", False, "text/plain; charset=utf-16be"),
    (b"\xff\xfe\x00\x00", b"\xff\xff\x00\x00", False, "text/plain; charset=utf-16le"),
    (b"\xef\xbb\xbf\x00", b"\xff\xff\xff\x00", False, "text/plain; charset=utf-8"),
    (b"\x00\x00\x01\x00", _ALL, False, "image/x-icon"),
    (b"\x00\x00\x02\x00", _ALL, False, "image/x-icon"),
    (b"BM", _ALL, False, "image/bmp"),
    (b"GIF87a", _ALL, False, "image/gif"),
    (b"GIF89a", _ALL, False, "image/gif"),
    (b"RIFF\0\0\0\0WEBPVP", b"\xff" * 4 + b"\0" * 4 + b"\xff" * 6, False, "image/webp"),
    (b"\x89PNG\x0d\x0a\x1a\x0a", _ALL, False, "image/png"),
    (b"\xff\xd8\xff", _ALL, False, "image/jpeg"),
    (b".snd", _ALL, False, "audio/basic"),
    (b"FORM\0\0\0\0AIFF", b"\xff" * 4 + b"\0" * 4 + b"\xff" * 4, False, "audio/aiff"),
    (b"ID3", _ALL, False, "audio/mpeg"),
    (b"OggS\x00", _ALL, False, "application/ogg"),
    (b"MThd\x00\x00\x00\x06", _ALL, False, "audio/midi"),
    (b"RIFF\0\0\0\0AVI ", b"\xff" * 4 + b"\0" * 4 + b"\xff" * 4, False, "video/avi"),
    (b"RIFF\0\0\0\0WAVE", b"\xff" * 4 + b"\0" * 4 + b"\xff" * 4, False, "audio/wave"),
    (None, _ALL, False, "video/mp4"),
    (b"\x1a\x45\xdf\xa3", _ALL, False, "video/webm"),
    (b"\0" * 34 + b"LP", b"\0" * 34 + b"\xff\xff", False, "application/vnd.ms-fontobject"),
    (b"\x00\x01\x00\x00", _ALL, False, "font/ttf"),
    (b"OTTO", _ALL, False, "font/otf"),
    (b"ttcf", _ALL, False, "font/collection"),
    (b"wOFF", _ALL, False, "font/woff"),
    (b"wOF2", _ALL, False, "font/woff2"),
    (b"\x1f\x8b\x08", _ALL, False, "application/x-gzip"),
    (b"PK\x03\x04", _ALL, False, "application/zip"),
    (b"Rar!\x1a\x07\x00", _ALL, False, "application/x-rar-compressed"),
    (b"Rar!\x1a\x07\x01\x00", _ALL, False, "application/x-rar-compressed"),
    (b"\x00asm", _ALL, False, "application/wasm"),
)
_BINARY_BYTES = frozenset([*range(0x09), 0x0B, *range(0x0E, 0x1B), *range(0x1C, 0x20)])


def _sniff_mp4(data: bytes) -> bool:
    if len(data) < 12:
        return False
    box_size = int.from_bytes(data[:4], "big")
    if len(data) < box_size or box_size % 4 != 0 or data[4:8] != b"ftyp":
        return False
    return any(data[st : st + 3] == b"mp4" for st in range(8, box_size, 4) if st != 12)


def detect_content_type(body: bytes) -> str:
    """Go's http.DetectContentType, looking at the first 512 bytes."""
    data = body[:512]
    first = 0
    while first < len(data) and data[first] in _SNIFF_SPACE:
        first += 1
    text = data[first:]
    for tag in _HTML_TAGS:
        if len(text) <= len(tag) or text[len(tag)] not in b" >":  # needs a tag-ending byte
            continue
        head = text[: len(tag)]  # upper-cased where the tag has a letter
        if all(t == (d & 0xDF if 0x41 <= t <= 0x5A else d) for t, d in zip(tag, head, strict=True)):
            return "text/html; charset=utf-8"
    for pattern, mask, skip_space, content_type in _SIGNATURES:
        if pattern is None:
            if _sniff_mp4(data):
                return content_type
            continue
        candidate = text if skip_space else data
        if len(candidate) < len(pattern):
            continue
        if mask is None:
            if candidate.startswith(pattern):
                return content_type
        elif all(d & m == p for d, m, p in zip(candidate[: len(mask)], mask, pattern, strict=True)):
            return content_type
    if any(b in _BINARY_BYTES for b in text):
        return "application/octet-stream"
    return "text/plain; charset=utf-8"


# --------------------------------------------------------------------------------------------
# net/http's server side of one connection
# --------------------------------------------------------------------------------------------


class _GoConnWriter:
    """Go's 4 KiB bufio.Writer in front of a connection: decides how responses are cut into
    writes (a write larger than the free space fills the buffer, flushes it, and a large
    remainder goes out directly)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view) > CONN_BUFFER_SIZE - len(self._buf):
            if not self._buf:
                self._sock.sendall(view)
                return
            free = CONN_BUFFER_SIZE - len(self._buf)
            self._buf += view[:free]
            view = view[free:]
            self.flush()
        self._buf += view

    def flush(self) -> None:
        if self._buf:
            self._sock.sendall(self._buf)
            self._buf.clear()


class _Reject(Exception):
    """Go's server refuses the request: ``raw`` goes straight to the socket, then it closes."""

    def __init__(self, raw: bytes) -> None:
        super().__init__(raw)
        self.raw = raw


def _error_reply(code: int, detail: str = "", *, body: str | None = None) -> _Reject:
    """The fixed replies net/http writes itself before closing (server.go, conn.serve)."""
    status = f"{code} {STATUS_TEXT[code]}" + (f": {detail}" if detail else "")
    text = status if body is None else body
    return _Reject(
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Connection: close\r\n\r\n{text}".encode()
    )


class _GoPanic(Exception):
    """A method panicked: net/http logs it and closes the connection, answering nothing."""


class _ConnectionBroken(Exception):
    """The request body could not be read: close without answering."""


@dataclass
class _Request:
    method: str
    target: str
    version: tuple[int, int]
    headers: list[tuple[str, str]]
    path: bytes = b""
    body: bytes = b""
    wants_close: bool = False
    wants_10_keep_alive: bool = False
    expectation_failed: bool = False
    map_headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def is11(self) -> bool:
        return self.version >= (1, 1)

    @property
    def route(self) -> str:
        segments = self.path.split(b"/")
        return segments[1].decode("utf-8", "surrogateescape") if len(segments) > 1 else ""


_HOST_HEADER_CHARS = frozenset(
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!$%&'()*+,-.:;=[]_~"
)
_METHOD_CHARS = frozenset(
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!#$%&'*+-.^_`|~"
)
_HEX = b"0123456789abcdefABCDEF"


def _decode_request_path(target: str) -> bytes:
    """url.ParseRequestURI's path, %-decoded; ValueError where Go's parse fails."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        raise ValueError("invalid control character in URL")
    if target == "*":
        return b"*"
    path = target.partition("?")[0]
    if not path.startswith("/"):
        scheme, sep, rest = path.partition("://")
        if not sep or not scheme.isalpha():
            raise ValueError("invalid URI for request")
        path = "/" + rest.partition("/")[2] if "/" in rest else ""
    raw = path.encode("latin-1")
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x25:
            escape = raw[i + 1 : i + 3]
            if len(escape) < 2 or escape[0] not in _HEX or escape[1] not in _HEX:
                raise ValueError("invalid URL escape")
            out.append(int(escape, 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def read_request(reader: SocketReader, conn: socket.socket) -> _Request:
    """http.ReadRequest plus the checks of net/http's server (conn.readRequest).

    EOFError: the client went away (no answer). _Reject: Go's fixed error reply.
    """
    try:
        line = reader.read_line(limit=MAX_HEAD_BYTES)
        used = len(line)
        text = line.rstrip(b"\n").removesuffix(b"\r").decode("latin-1")
        method, space1, rest = text.partition(" ")
        target, space2, proto = rest.partition(" ")
        version = parse_http_version(proto)
        if not space1 or not space2 or not method or version is None:
            raise _error_reply(400)
        if any(ord(c) not in _METHOD_CHARS for c in method):
            raise _error_reply(400)
        path = _decode_request_path(target)
        headers, _ = read_header_lines(reader, limit=MAX_HEAD_BYTES - used)
    except LineTooLong:
        raise _error_reply(431) from None
    except ValueError:
        raise _error_reply(400) from None

    hosts = header_values(headers, "Host")
    if len(hosts) > 1:
        raise _error_reply(400)  # "too many Host headers", a plain error
    connection = header_values(headers, "Connection")
    request = _Request(method, target, version, headers, path)
    request.wants_close = has_token(connection, "close") or (
        version == (1, 0) and not has_token(connection, "keep-alive")
    )
    request.wants_10_keep_alive = version == (1, 0) and has_token(connection, "keep-alive")

    encodings = header_values(headers, "Transfer-Encoding") if request.is11 else []
    if len(encodings) > 1 or (encodings and encodings[0].lower() != "chunked"):
        raise _error_reply(501, body="Unsupported transfer encoding")
    lengths = {value.strip(" \t") for value in header_values(headers, "Content-Length")}
    valid = all(v.isascii() and v.isdigit() for v in lengths)
    if not encodings and (len(lengths) > 1 or not valid):
        raise _error_reply(400)
    length = int(lengths.pop()) if lengths and not encodings else 0

    if version[0] != 1:
        raise _error_reply(505, "unsupported protocol version")
    if request.is11 and not hosts:
        raise _error_reply(400, "missing required Host header")
    if hosts and any(c not in _HOST_HEADER_CHARS for c in hosts[0].encode("latin-1")):
        raise _error_reply(400, "malformed Host header")

    expect = header_values(headers, "Expect")
    if has_token(expect, "100-continue"):
        if request.is11 and (encodings or length):
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # when the handler reads the body
    elif expect and expect[0]:
        request.expectation_failed = True  # answered 417 without reading the body
        return request
    try:
        request.body = read_chunked_body(reader) if encodings else reader.read_exact(length)
    except (EOFError, ValueError):
        raise _ConnectionBroken from None
    return request


def write_response(writer: _GoConnWriter, request: _Request, code: int, body: bytes) -> bool:
    """Write one handler's response as net/http's response writer does; True to keep alive.

    The handler's single Write of ``body`` happens before it returns: up to 2048 bytes stay in
    the response buffer and get a Content-Length when the handler is done; more are written at
    once, chunked (HTTP/1.1) or delimited by closing (HTTP/1.0).
    """
    head_only = request.method == "HEAD"
    buffered = len(body) <= BUFFER_BEFORE_CHUNKING
    map_has_length = any(name == "Content-Length" for name, _ in request.map_headers)
    content_length = None
    if buffered and not map_has_length and (not head_only or body):
        content_length = len(body)
    has_length = content_length is not None or map_has_length
    content_type = detect_content_type(body) if body else None

    # The handler set "Connection" itself only for a 417, which closes.
    handler_connection = any(name == "Connection" for name, _ in request.map_headers)
    close = handler_connection
    connection = None
    if request.wants_10_keep_alive and (head_only or has_length):
        if not handler_connection:
            connection = "keep-alive"
    elif not request.is11 or request.wants_close:
        close = True
    chunked = False
    if not head_only and not has_length:
        if request.is11:
            chunked = True
        else:
            close = True
    if close and request.is11 and not handler_connection:
        connection = "close"

    lines = [f"HTTP/1.{1 if request.is11 else 0} {code} {STATUS_TEXT[code]}"]
    lines += [f"{name}: {value}" for name, value in sorted(request.map_headers)]
    lines.append(f"Date: {http_date()}")
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if connection is not None:
        lines.append(f"Connection: {connection}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    if buffered:
        writer.write(head + (b"" if head_only else body))
    else:
        writer.write(head)
        if chunked:
            writer.write(f"{len(body):x}\r\n".encode())
            writer.write(body)
            writer.write(b"\r\n")
            writer.write(b"0\r\n\r\n")
        elif not head_only:
            writer.write(body)
    writer.flush()
    return not close


# --------------------------------------------------------------------------------------------
# The plugin
# --------------------------------------------------------------------------------------------


class _GoChan:
    """An unbuffered Go channel received from once: the waiting slot of one long poll."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._receiving = False
        self._full = False
        self._value = b""

    def receive(self) -> bytes:
        with self._cond:
            self._receiving = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._full)
            self._receiving = False  # the only receive is over: later sends block forever
            self._full = False
            return self._value

    def send(self, value: bytes) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._receiving and not self._full)
            self._value = value
            self._full = True
            self._cond.notify_all()


class GoPlugin:
    """The Go plugin: its files, its server and its routes."""

    def __init__(
        self,
        directory: str,
        name: str,
        namespace: str,
        *,
        methods: Sequence[str] = DEFAULT_METHODS,
        activator_output: bytes = b"",
        exit_on_stop: bool = False,
        write_pconf: bool = True,
        trace: bool = False,
    ) -> None:
        self.name = name
        self.namespace = namespace
        base = os.path.abspath(directory)
        self.sock_path = os.path.join(base, namespace + name + ".sock")
        self.pconf_path = os.path.join(base, namespace + name + ".pconf")
        self.methods = tuple(methods)
        self.activator_output = activator_output
        self.exit_on_stop = exit_on_stop
        self.write_pconf = write_pconf
        self.trace = trace
        self._listener: socket.socket | None = None
        self._pconf_written = False
        self._pconf_fd: int | None = None  # Go never closes it
        self._slots: dict[str, _GoChan] = {}
        self._stdout_lock = threading.Lock()

    # Lifecycle --------------------------------------------------------------------------------

    def start(self) -> bool:
        """Listen, serve, then write the .pconf; False (and nothing written) if listen fails."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.sock_path)
            listener.listen(socket.SOMAXCONN)
        except OSError as exc:
            listener.close()
            reason = exc.strerror or exc
            go_log(f"Failed to Create the server: listen unix {self.sock_path}: {reason}")
            return False
        self._listener = listener
        threading.Thread(target=self._accept_loop, daemon=True).start()
        if self.write_pconf:
            self._pconf_fd = os.open(
                self.pconf_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666
            )
            self._pconf_written = True
            os.write(self._pconf_fd, self.pconf_bytes())
        return True

    def pconf_bytes(self) -> bytes:
        """The .pconf as Go's json.Marshal writes the library's config struct."""
        fields = (
            ("Name", self.name),
            ("NameSpace", self.namespace),
            ("Url", "unix://" + self.namespace + self.name),
            ("Sock", self.sock_path),
        )
        encoded = b",".join(b'"%s":%s' % (k.encode(), go_marshal_string(v)) for k, v in fields)
        return b"{" + encoded + b',"LazyLoad":false}'

    def remove_files(self) -> None:
        """The library's Stop(): close the listener (which unlinks the socket), remove .pconf."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop
            self._listener.close()
            self._listener = None
            _unlink(self.sock_path)
        if self._pconf_written:
            _unlink(self.pconf_path)

    def say(self, line: str, *, traced: bool = True) -> None:
        """A line on stdout for the test driving this process."""
        if traced and not self.trace:
            return
        with self._stdout_lock:
            try:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            except (OSError, ValueError):
                pass

    # Notify -----------------------------------------------------------------------------------

    def notify(self, name: str, data: bytes) -> str | None:
        """The library's Notify: None once the waiting poll took the data, else the error."""
        slot = self._slots.get(name)
        if slot is None:
            return f"Callback could not be found for: {name}"
        slot.send(data)
        return None

    def notify_and_report(self, name: str, data: bytes) -> None:
        error = self.notify(name, data)
        if error is None:
            self.say(f"notified {name}")
        else:
            go_log(error)
            self.say(f"notify-failed {name}: {error}")

    # Serving ----------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        while listener is not None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        reader = SocketReader(conn)
        writer = _GoConnWriter(conn)
        last_method = ""
        try:
            while True:
                if last_method == "POST":  # net/http forgives up to 4 stray CR/LF after a POST
                    stray = reader.peek(4)
                    skip = len(stray) - len(stray.lstrip(b"\r\n"))
                    reader.read_exact(skip)
                try:
                    request = read_request(reader, conn)
                except _Reject as reject:
                    conn.sendall(reject.raw)
                    return
                last_method = request.method
                if not self._handle(request, writer):
                    return
        except (EOFError, OSError, _ConnectionBroken, _GoPanic):
            return
        finally:
            conn.close()

    def _handle(self, request: _Request, writer: _GoConnWriter) -> bool:
        if request.expectation_failed:
            request.map_headers.append(("Connection", "close"))
            return write_response(writer, request, 417, b"")
        if request.target == "*" and request.method == "OPTIONS":
            request.map_headers.append(("Content-Length", "0"))
            return write_response(writer, request, 200, b"")
        route = request.route
        if route not in BUILTIN_ROUTES and route not in self.methods:
            return write_response(writer, request, 400, b"")
        try:
            output = self._call(route, request.body)
        except _GoPanic as panic:
            go_log(f"http: panic serving @: {panic}\ngoroutine 7 [running]:\n{route}(...)")
            raise
        return write_response(writer, request, 200, output or b"")

    def _call(self, route: str, body: bytes) -> bytes | None:
        """Run one route's function; its returned bytes are the response body."""
        if route == "Activate":
            names = list(self.methods)
            random.shuffle(names)
            names += [""] * len(BUILTIN_ROUTES)
            return go_marshal_string_list(names) + self.activator_output
        if route == "Ping":
            return body
        if route == "RegisterCallback":
            return self._long_poll(body)
        if route == "Stop":
            if self.exit_on_stop:
                self.remove_files()
                os._exit(0)
            return STOPPER_OUTPUT
        if route == "main.Echo":
            return body
        if route == "main.Big":
            return BIG_BODY
        if route == "main.Panic":
            raise _GoPanic("boom")
        if route == "main.Notify":
            name, _, data = body.partition(b"\n")
            error = self.notify(name.decode("utf-8", "surrogateescape"), data)
            return None if error is None else error.encode("utf-8", "surrogateescape")
        return None  # main.Do, main.Nil

    def _long_poll(self, body: bytes) -> bytes:
        try:
            name = go_unmarshal_string(body)
        except GoJSONError as exc:
            go_log(f"FATAL Failed to get the func name: {exc}")
            os._exit(1)  # log.Fatal: the files stay behind
        slot = _GoChan()
        self._slots[name] = slot
        self.say(f"registered {name}")
        return slot.receive()


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _read_commands(plugin: GoPlugin) -> None:
    """Serve stdin commands until it closes; each notify runs in its own thread (it may block)."""
    for raw in sys.stdin.buffer:
        parts = raw.rstrip(b"\r\n").split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"notify", b"notify-hex"):
            go_log(f"unknown command: {raw!r}")
            continue
        name = parts[1].decode("utf-8", "surrogateescape")
        data = parts[2] if len(parts) > 2 else b""
        if parts[0] == b"notify-hex":
            try:
                data = bytes.fromhex(data.decode("ascii"))
            except ValueError:
                go_log(f"bad hex data: {raw!r}")
                continue
        threading.Thread(target=plugin.notify_and_report, args=(name, data), daemon=True).start()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Stand-in for a GoPlug 0.1.0 Go plugin.")
    parser.add_argument("directory")
    parser.add_argument("--name", default="Do")
    parser.add_argument("--namespace", default="Test")
    parser.add_argument("--activator-output", default="")
    parser.add_argument("--no-pconf", action="store_true")
    parser.add_argument("--exit-on-stop", action="store_true")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args(argv)

    plugin = GoPlugin(
        args.directory,
        args.name,
        args.namespace,
        methods=[m for m in args.methods.split(",") if m],
        activator_output=os.fsencode(args.activator_output),
        exit_on_stop=args.exit_on_stop,
        write_pconf=not args.no_pconf,
        trace=args.trace,
    )

    def on_sigterm(signum: int, frame: object) -> None:
        plugin.remove_files()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # like Go: die at once, files left behind
    plugin.say("ready" if plugin.start() else "start-failed", traced=False)
    _read_commands(plugin)
    while True:  # stdin closed: keep serving until a signal
        signal.pause()


# --------------------------------------------------------------------------------------------
# Running it from a test
# --------------------------------------------------------------------------------------------


class GoPluginProcess:
    """go_plugin.py as a child process (started with sys.executable), for one test.

    >>> with GoPluginProcess(tmp_dir) as plugin:          # waits for "ready"
    ...     client = GoRegistryClient(plugin.sock_path, "TestDo")
    ...     plugin.wait_for_line("registered main.cb")   # needs trace (on by default)
    ...     plugin.notify("main.cb", b"data")

    ``close()`` kills the process by pid if it still runs, closes its pipes, and removes its
    socket and .pconf. Its stdout and stderr are drained in the background.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        name: str = "Do",
        namespace: str = "Test",
        *,
        activator_output: str = "",
        exit_on_stop: bool = False,
        no_pconf: bool = False,
        methods: Sequence[str] | None = None,
        trace: bool = True,
    ) -> None:
        self.directory = Path(os.path.abspath(directory))
        self.sock_path = self.directory / f"{namespace}{name}.sock"
        self.pconf_path = self.directory / f"{namespace}{name}.pconf"
        self.args = [str(self.directory), "--name", name, "--namespace", namespace]
        if activator_output:
            self.args += ["--activator-output", activator_output]
        if exit_on_stop:
            self.args.append("--exit-on-stop")
        if no_pconf:
            self.args.append("--no-pconf")
        if methods is not None:
            self.args += ["--methods", ",".join(methods)]
        if trace:
            self.args.append("--trace")
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout_lines: list[str] = []
        self._stderr = bytearray()
        self._stdout_done = False
        self._stderr_done = False
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> GoPluginProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def stderr(self) -> str:
        with self._cond:
            return self._stderr.decode("utf-8", "replace")

    def start(self, *, timeout: float = 15.0, ready_line: str = "ready") -> GoPluginProcess:
        """Start the process and wait until it prints ``ready_line`` (``start-failed``...)."""
        self.proc = subprocess.Popen(
            [sys.executable, GO_PLUGIN_SCRIPT, *self.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._threads = [
            threading.Thread(target=self._drain_stdout, daemon=True),
            threading.Thread(target=self._drain_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self.wait_for_line(ready_line, timeout=timeout)
        return self

    def _drain_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.stdout_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._stdout_done = True
            self._cond.notify_all()

    def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while chunk := self.proc.stderr.read1(65536):
            with self._cond:
                self._stderr += chunk
                self._cond.notify_all()
        with self._cond:
            self._stderr_done = True
            self._cond.notify_all()

    def wait_for_line(self, line: str, *, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until stdout has shown ``line`` at least ``count`` times."""
        with self._cond:
            self._cond.wait_for(
                lambda: self.stdout_lines.count(line) >= count or self._stdout_done, timeout
            )
            if self.stdout_lines.count(line) >= count:
                return
            seen = list(self.stdout_lines)
        raise AssertionError(
            f"go_plugin did not print {line!r} x{count} within {timeout}s; "
            f"stdout={seen!r} stderr={self.stderr!r}"
        )

    def wait_for_stderr(self, text: str, *, timeout: float = 10.0) -> None:
        """Wait until stderr contains ``text``."""
        needle = text.encode()
        with self._cond:
            self._cond.wait_for(lambda: needle in self._stderr or self._stderr_done, timeout)
            if needle in self._stderr:
                return
        raise AssertionError(f"go_plugin did not log {text!r} within {timeout}s: {self.stderr!r}")

    def notify(self, name: str, data: bytes) -> None:
        """Ask the plugin to Notify(name, data) (it runs in the plugin, asynchronously)."""
        assert self.proc is not None and self.proc.stdin is not None
        assert name and not any(c.isspace() for c in name), "name must be one word"
        self.proc.stdin.write(f"notify-hex {name} {data.hex()}\n".encode())
        self.proc.stdin.flush()

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit; its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM (the plugin removes its files and exits 0); the exit code."""
        os.kill(self.pid, signal.SIGTERM)
        return self.wait(timeout)

    def close(self) -> None:
        """Kill the process if it runs, reap it, close pipes, remove its socket and .pconf."""
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            for thread in self._threads:
                thread.join(10)
            for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        for path in (self.sock_path, self.pconf_path):
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
