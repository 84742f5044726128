"""Stand-in for the client side of the GoPlug 0.1.0 Go registry, for interop tests.

The original registry talks to each plugin through Go's ``httputil.ClientConn`` on ONE Unix socket
connection. This module reproduces what a plugin sees from it and what it accepts back:

* Requests are built as Go builds them (see ``expected_request_bytes``). The request line comes
  from the plugin's ``Url`` + ``"/" + route``. The headers are Host, ``User-Agent:
  Go-http-client/1.1``, Content-Length, and ``Content-Type: application/json`` whenever a body is
  given, even an empty one. Requests are written in 4096-byte pieces, as Go's ``bufio.Writer``
  writes them.
* ONE persistent connection carries every call. Concurrent calls are pipelined on it in order, so
  a call made while a callback long poll waits queues behind that poll (the original's bug).
* A response counts only if its status text is exactly ``200 OK``. HTTP/1.0 without keep-alive
  and ``Connection: close`` fail even when the response is complete ("persistent connection
  closed"). Content-Length, chunked and close-delimited bodies and bare-LF header lines are read
  as Go reads them. After a read failure the connection is dead for good: later calls fail
  with the same reason and send nothing.
* JSON is checked as strictly as Go checks it, with Go's error texts (``go_unmarshal_*``).
  ``go_plugin.py`` uses the same helpers.

Deliberate differences from the original: calls take a timeout (Go waits forever), and failures
raise ``GoRegistryError`` instead of only being logged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GO_WRITE_SIZE",
    "PING_DATA",
    "USER_AGENT",
    "GoJSONError",
    "GoPluginConf",
    "GoRegistryClient",
    "GoRegistryError",
    "GoResponse",
    "LineTooLong",
    "SocketReader",
    "decode_pconf",
    "expected_request_bytes",
    "go_marshal_string",
    "go_marshal_string_list",
    "go_request_target",
    "go_unmarshal_string",
    "go_unmarshal_string_list",
    "has_token",
    "header_values",
    "parse_http_version",
    "read_chunked_body",
    "read_header_lines",
    "read_pconf",
    "scan_plugin_dir",
]

USER_AGENT = "Go-http-client/1.1"
PING_DATA = b"Test Data"
GO_WRITE_SIZE = 4096  # size of Go's default bufio.Writer: the pieces a request is written in
CHUNK_LINE_LIMIT = 4096  # Go's chunked reader rejects longer chunk-size lines


class GoRegistryError(Exception):
    """A call failed where the Go registry fails; ``reason`` uses Go's wording where known."""

    def __init__(self, reason: str, response: GoResponse | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response


# --------------------------------------------------------------------------------------------
# Go's encoding/json, as far as the registry and the plugin use it
# --------------------------------------------------------------------------------------------


class GoJSONError(ValueError):
    """JSON that Go's encoding/json rejects; the message is Go's."""


class _Truncated(Exception):
    """The input ended inside a JSON value."""


class _Object(list[tuple[str, object]]):
    """A decoded JSON object, kept as its (key, value) pairs in order."""


_JSON_SPACE = b" \t\r\n"
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_LITERALS = {0x74: b"true", 0x66: b"false", 0x6E: b"null"}
_MAX_DEPTH = 10000
_SURROGATES = re.compile("[\ud800-\udfff]")

# Scanner states.
_VALUE, _VALUE_OR_CLOSE, _KEY, _KEY_OR_CLOSE, _COLON, _AFTER_VALUE = range(6)


def _go_quote_byte(c: int) -> str:
    """Quote one input byte as Go's JSON scanner does in its messages (strconv.Quote of a rune)."""
    if c == 0x27:
        return "'\\''"
    if c == 0x22:
        return "'\"'"
    short = {7: "\\a", 8: "\\b", 9: "\\t", 10: "\\n", 11: "\\v", 12: "\\f", 13: "\\r", 92: "\\\\"}
    if c in short:
        text = short[c]
    elif c < 0x20 or c == 0x7F:
        text = f"\\x{c:02x}"
    elif 0x80 <= c <= 0xA0 or c == 0xAD:
        text = f"\\u{c:04x}"
    else:
        text = chr(c)
    return f"'{text}'"


def _syntax_error(c: int, context: str) -> GoJSONError:
    return GoJSONError(f"invalid character {_go_quote_byte(c)} {context}")


def _skip_space(data: bytes, i: int) -> int:
    while i < len(data) and data[i] in _JSON_SPACE:
        i += 1
    return i


def _skip_digits(data: bytes, i: int) -> int:
    while i < len(data) and 0x30 <= data[i] <= 0x39:
        i += 1
    return i


def _scan_string(data: bytes, i: int) -> int:
    """``data[i]`` is an opening quote: return the index after the closing one."""
    n = len(data)
    i += 1
    while i < n:
        c = data[i]
        if c == 0x22:
            return i + 1
        if c == 0x5C:
            i += 1
            if i == n:
                break
            escape = data[i]
            if escape == 0x75:  # \uXXXX
                for _ in range(4):
                    i += 1
                    if i == n:
                        raise _Truncated
                    if data[i] not in _HEX_DIGITS:
                        raise _syntax_error(data[i], "in \\u hexadecimal character escape")
            elif escape not in b'"\\/bfnrt':
                raise _syntax_error(escape, "in string escape code")
        elif c < 0x20:
            raise _syntax_error(c, "in string literal")
        i += 1
    raise _Truncated


def _scan_number(data: bytes, i: int) -> int:
    """``data[i]`` starts a number: return the index after it."""
    n = len(data)
    if data[i] == 0x2D:  # '-'
        i += 1
        if i == n:
            raise _Truncated
        if not 0x30 <= data[i] <= 0x39:
            raise _syntax_error(data[i], "in numeric literal")
    i = i + 1 if data[i] == 0x30 else _skip_digits(data, i + 1)
    if i < n and data[i] == 0x2E:  # '.'
        i += 1
        if i == n:
            raise _Truncated
        if not 0x30 <= data[i] <= 0x39:
            raise _syntax_error(data[i], "after decimal point in numeric literal")
        i = _skip_digits(data, i)
    if i < n and data[i] in b"eE":
        i += 1
        if i < n and data[i] in b"+-":
            i += 1
        if i == n:
            raise _Truncated
        if not 0x30 <= data[i] <= 0x39:
            raise _syntax_error(data[i], "in exponent of numeric literal")
        i = _skip_digits(data, i)
    return i


def _scan_literal(data: bytes, i: int) -> int:
    word = _LITERALS[data[i]]
    for k in range(1, len(word)):
        if i + k == len(data):
            raise _Truncated
        if data[i + k] != word[k]:
            expecting = _go_quote_byte(word[k])
            raise _syntax_error(data[i + k], f"in literal {word.decode()} (expecting {expecting})")
    return i + len(word)


def _scan_value(data: bytes, i: int) -> int:
    """Return the index just past the JSON value at ``data[i:]`` (leading space skipped).

    Raises GoJSONError with Go's message for the first bad byte, _Truncated if the input ends
    first. Only validates; decoding is left to ``json.loads``.
    """
    n = len(data)
    stack: list[int] = []  # ord('{') or ord('[') of each open container
    state = _VALUE
    while True:
        if state == _AFTER_VALUE:
            if not stack:
                return i
            i = _skip_space(data, i)
            if i == n:
                raise _Truncated
            c = data[i]
            i += 1
            if stack[-1] == 0x7B:
                if c == 0x2C:
                    state = _KEY
                elif c == 0x7D:
                    stack.pop()
                else:
                    raise _syntax_error(c, "after object key:value pair")
            elif c == 0x2C:
                state = _VALUE
            elif c == 0x5D:
                stack.pop()
            else:
                raise _syntax_error(c, "after array element")
            continue
        i = _skip_space(data, i)
        if i == n:
            raise _Truncated
        c = data[i]
        if state == _COLON:
            if c != 0x3A:
                raise _syntax_error(c, "after object key")
            i += 1
            state = _VALUE
        elif state in (_KEY, _KEY_OR_CLOSE):
            if state == _KEY_OR_CLOSE and c == 0x7D:
                stack.pop()
                i += 1
                state = _AFTER_VALUE
            elif c == 0x22:
                i = _scan_string(data, i)
                state = _COLON
            else:
                raise _syntax_error(c, "looking for beginning of object key string")
        elif state == _VALUE_OR_CLOSE and c == 0x5D:
            stack.pop()
            i += 1
            state = _AFTER_VALUE
        elif c in (0x7B, 0x5B):
            stack.append(c)
            if len(stack) > _MAX_DEPTH:
                raise _syntax_error(c, "exceeded max depth")
            i += 1
            state = _KEY_OR_CLOSE if c == 0x7B else _VALUE_OR_CLOSE
        elif c == 0x22:
            i = _scan_string(data, i)
            state = _AFTER_VALUE
        elif c == 0x2D or 0x30 <= c <= 0x39:
            i = _scan_number(data, i)
            state = _AFTER_VALUE
        elif c in _LITERALS:
            i = _scan_literal(data, i)
            state = _AFTER_VALUE
        else:
            raise _syntax_error(c, "looking for beginning of value")


def _go_check_valid(data: bytes) -> None:
    """What ``json.Unmarshal`` checks before decoding: exactly one value, nothing after it."""
    try:
        end = _scan_value(data, 0)
    except _Truncated:
        raise GoJSONError("unexpected end of JSON input") from None
    end = _skip_space(data, end)
    if end < len(data):
        raise _syntax_error(data[end], "after top-level value")


def _go_text(s: str) -> str:
    """Go's strings hold no surrogates: a lone one becomes U+FFFD."""
    return _SURROGATES.sub("\ufffd", s)


def _go_loads(data: bytes) -> object:
    """Decode a value that already passed the Go scanner (invalid UTF-8 becomes U+FFFD)."""
    return json.loads(data.decode("utf-8", "replace"), object_pairs_hook=_Object)


def _go_kind(value: object) -> str:
    """The JSON kind as Go's UnmarshalTypeError names it."""
    if isinstance(value, _Object):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    return "number"


def go_unmarshal_string(data: bytes) -> str:
    """``json.Unmarshal(data, &s)`` with ``s string``; ``null`` leaves ``""``."""
    _go_check_valid(data)
    value = _go_loads(data)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise GoJSONError(f"json: cannot unmarshal {_go_kind(value)} into Go value of type string")
    return _go_text(value)


def go_unmarshal_string_list(data: bytes) -> tuple[list[str] | None, GoJSONError | None]:
    """``json.Unmarshal(data, &v)`` with ``v []string``, as Go leaves ``v`` and the error.

    Returns ``(None, error)`` when Go leaves ``v`` untouched (syntax error, not an array), and a
    list plus an error when Go fills it partly: a non-string element becomes ``""`` and the first
    such error is returned after the whole array was decoded. ``null`` elements become ``""``,
    a ``null`` document gives an empty list.
    """
    try:
        _go_check_valid(data)
    except GoJSONError as exc:
        return None, exc
    value = _go_loads(data)
    if value is None:
        return [], None
    if not isinstance(value, list) or isinstance(value, _Object):
        kind = _go_kind(value)
        return None, GoJSONError(f"json: cannot unmarshal {kind} into Go value of type []string")
    result: list[str] = []
    error: GoJSONError | None = None
    for item in value:
        if isinstance(item, str):
            result.append(_go_text(item))
            continue
        result.append("")
        if item is not None and error is None:
            kind = _go_kind(item)
            error = GoJSONError(f"json: cannot unmarshal {kind} into Go value of type string")
    return result, error


def go_marshal_string(s: str) -> bytes:
    """``json.Marshal(s)``: compact, UTF-8 kept raw, ``< > &`` and U+2028/2029 escaped."""
    out = json.dumps(_go_text(s), ensure_ascii=False)
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        out = out.replace(char, escape)
    return out.encode()


def go_marshal_string_list(items: list[str]) -> bytes:
    """``json.Marshal`` of a ``[]string``."""
    return b"[" + b",".join(go_marshal_string(item) for item in items) + b"]"


# --------------------------------------------------------------------------------------------
# The .pconf file as the Go registry reads it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GoPluginConf:
    """The Go registry's view of a .pconf (its ``PluginConf`` struct)."""

    name: str = ""
    namespace: str = ""
    url: str = ""
    sock: str = ""
    lazy_load: bool = False

    @property
    def key(self) -> str:
        """The registry's identity of the plugin: NameSpace + Name, simply joined."""
        return self.namespace + self.name


_PCONF_FIELDS: dict[str, tuple[str, type]] = {
    "Name": ("name", str),
    "NameSpace": ("namespace", str),
    "Url": ("url", str),
    "Sock": ("sock", str),
    "LazyLoad": ("lazy_load", bool),
}


def decode_pconf(data: bytes) -> GoPluginConf:
    """``json.NewDecoder(file).Decode(&conf)``: the first JSON value only, keys matched exactly or
    else case-insensitively, unknown keys ignored, ``null`` leaves the default, a wrong type is an
    error (reported after the whole object was read). A BOM or a trailing comma is an error."""
    start = _skip_space(data, 0)
    if start == len(data):
        raise GoJSONError("EOF")
    try:
        end = _scan_value(data, start)
    except _Truncated:
        raise GoJSONError("unexpected EOF") from None
    value = _go_loads(data[start:end])
    if value is None:
        return GoPluginConf()
    if not isinstance(value, _Object):
        kind = _go_kind(value)
        raise GoJSONError(f"json: cannot unmarshal {kind} into Go value of type PluginConf")
    fields: dict[str, object] = {}
    error: GoJSONError | None = None
    for key, item in value:
        name = key if key in _PCONF_FIELDS else None
        if name is None:
            name = next((f for f in _PCONF_FIELDS if f.casefold() == key.casefold()), None)
        if name is None or item is None:
            continue
        attribute, expected = _PCONF_FIELDS[name]
        if isinstance(item, expected):
            fields[attribute] = _go_text(item) if isinstance(item, str) else item
        elif error is None:
            go_type = "bool" if expected is bool else "string"
            error = GoJSONError(
                f"json: cannot unmarshal {_go_kind(item)} into Go struct field "
                f"PluginConf.{name} of type {go_type}"
            )
    if error is not None:
        raise error
    return GoPluginConf(**fields)


def read_pconf(path: str | os.PathLike[str]) -> GoPluginConf:
    """Read and decode one .pconf file the way the Go registry does."""
    return decode_pconf(Path(path).read_bytes())


def scan_plugin_dir(directory: str | os.PathLike[str], ext: str = ".pconf") -> list[Path]:
    """The files one discovery scan of the Go registry opens: sorted by name, directories
    skipped, and only names whose last extension equals ``ext`` exactly (case-sensitive)."""
    found = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_dir():
            continue
        dot = entry.name.rfind(".")
        if dot != -1 and entry.name[dot:] == ext:
            found.append(Path(entry.path))
    return found


# --------------------------------------------------------------------------------------------
# Request bytes, as Go's net/url and net/http build them
# --------------------------------------------------------------------------------------------

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_ALNUM = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HOST_CHARS = _ALNUM | frozenset(b"-_.~!$&'()*+,;=:[]<>\"")  # net/url, encodeHost mode
_PATH_CHARS = _ALNUM | frozenset(b"-_.~$&+,/:;=@")  # net/url, encodePath mode
_VALID_ENCODED = _PATH_CHARS | frozenset(b"!'()*[]%")  # net/url validEncoded
_HOST_HEADER_CHARS = _ALNUM | frozenset(b"!$%&'()*+,-.:;=[]_~")  # httpguts.ValidHostHeader


def _url_error(raw: str, reason: str) -> GoRegistryError:
    return GoRegistryError(f"parse {json.dumps(raw)}: {reason}")


def _go_unescape(raw: str, text: str, *, host: bool) -> str:
    """net/url's unescape: a bad %-escape, or in a host a byte that needs escaping, is an error."""
    data = text.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i < len(data):
        c = data[i]
        if c == 0x25:
            escape = data[i : i + 3]
            if len(escape) < 3 or escape[1] not in _HEX_DIGITS or escape[2] not in _HEX_DIGITS:
                bad = json.dumps(escape.decode("utf-8", "replace"))
                raise _url_error(raw, f"invalid URL escape {bad}")
            if host and int(escape[1:2], 16) < 8 and escape != b"%25":
                bad = json.dumps(escape.decode())
                raise _url_error(raw, f"invalid URL escape {bad}")
            out.append(int(escape[1:], 16))
            i += 3
            continue
        if host and c < 0x80 and c not in _HOST_CHARS:
            raise _url_error(raw, f"invalid character {json.dumps(chr(c))} in host name")
        out.append(c)
        i += 1
    return out.decode("utf-8", "surrogateescape")


def _go_escaped_path(raw_path: str) -> str:
    """URL.EscapedPath(): the path as written if it is validly encoded, else re-escaped."""
    data = raw_path.encode("utf-8", "surrogateescape")
    if all(c in _VALID_ENCODED for c in data):
        return raw_path
    decoded = _go_unescape(raw_path, raw_path, host=False).encode("utf-8", "surrogateescape")
    return "".join(chr(c) if c in _PATH_CHARS else f"%{c:02X}" for c in decoded)


def _go_host_header(host: str) -> str:
    """What Request.Write puts in the Host header: punycode if needed, then validated."""
    if host.endswith(":"):
        host = host[:-1]  # removeEmptyPort
    if not host.isascii():
        name, colon, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
        try:
            host = name.encode("idna").decode("ascii") + colon + port
        except UnicodeError as exc:
            raise GoRegistryError(f"http: invalid Host header ({exc})") from None
    if not all(ord(c) in _HOST_HEADER_CHARS for c in host):
        raise GoRegistryError("http: invalid Host header")
    return host


def go_request_target(url: str, route: str) -> tuple[str, str]:
    """The Host header and request-URI Go derives from ``http.NewRequest("POST", url+"/"+route)``.

    Raises GoRegistryError (nothing would be sent) where Go fails locally, e.g. for a space in
    the host: ``parse "unix://Test Do/Ping": invalid character " " in host name``.
    """
    raw = url + "/" + route
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise _url_error(raw, "net/url: invalid control character in URL")
    rest = raw.partition("#")[0]
    scheme = _SCHEME.match(rest)
    if scheme:
        rest = rest[scheme.end() :]
    rest, has_query, query = rest.partition("?")
    suffix = "?" + query if has_query else ""
    if scheme and not rest.startswith("/"):
        return "", rest + suffix  # opaque URL, e.g. "unix:TestDo/Ping"
    host = ""
    if rest.startswith("//"):
        slash = rest.find("/", 2)
        authority, rest = (rest[2:], "") if slash == -1 else (rest[2:slash], rest[slash:])
        host = authority.rpartition("@")[2]
        if not host.startswith("["):
            colon = host.rfind(":")
            if colon != -1 and not re.fullmatch("[0-9]*", host[colon + 1 :]):
                raise _url_error(raw, f"invalid port {json.dumps(host[colon:])} after host")
        host = _go_unescape(raw, host, host=True)
    _go_unescape(raw, rest, host=False)  # a bad %-escape in the path fails the parse
    target = _go_escaped_path(rest) or "/"
    return _go_host_header(host), target + suffix


def expected_request_bytes(
    route: str, host: str, body: bytes | None, *, url: str | None = None
) -> bytes:
    """The exact bytes the Go registry sends for one call.

    ``host`` is the host part of the plugin's Url (``TestDo``); pass ``url`` instead to use a
    whole Url from a .pconf. ``body=None`` is Go's nil body: ``Content-Length: 0`` and no
    Content-Type; any bytes, even empty, add ``Content-Type: application/json``.
    """
    host_header, target = go_request_target("unix://" + host if url is None else url, route)
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {host_header}",
        f"User-Agent: {USER_AGENT}",
        f"Content-Length: {0 if body is None else len(body)}",
    ]
    if body is not None:
        lines.append("Content-Type: application/json")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (body or b"")


# --------------------------------------------------------------------------------------------
# Reading HTTP/1.x from a socket
# --------------------------------------------------------------------------------------------


class LineTooLong(ValueError):
    """A line (or a request head) is longer than allowed."""


class SocketReader:
    """Buffered reads from a stream socket; ``deadline`` is a ``time.monotonic()`` value or None.

    EOFError when the stream ends too early, TimeoutError when the deadline passes.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._eof = False

    def _fill(self, deadline: float | None) -> None:
        if self._eof:
            raise EOFError
        if deadline is not None:
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise TimeoutError
        chunk = self._sock.recv(65536)
        if not chunk:
            self._eof = True
            raise EOFError
        self._buf += chunk

    def read_line(self, deadline: float | None = None, limit: int | None = None) -> bytes:
        """The next line including its ``\\n``; ValueError if longer than ``limit``."""
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end != -1:
                if limit is not None and end + 1 > limit:
                    raise LineTooLong("line too long")
                line = bytes(self._buf[: end + 1])
                del self._buf[: end + 1]
                return line
            if limit is not None and len(self._buf) >= limit:
                raise LineTooLong("line too long")
            start = len(self._buf)
            self._fill(deadline)

    def peek(self, n: int, deadline: float | None = None) -> bytes:
        """Up to ``n`` bytes without consuming them (fewer only at the end of the stream)."""
        while len(self._buf) < n:
            try:
                self._fill(deadline)
            except EOFError:
                break
        return bytes(self._buf[:n])

    def read_exact(self, n: int, deadline: float | None = None) -> bytes:
        while len(self._buf) < n:
            self._fill(deadline)
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def read_until(self, marker: bytes, deadline: float | None = None) -> bytes:
        """Everything up to and including ``marker``."""
        while (end := self._buf.find(marker)) == -1:
            self._fill(deadline)
        return self.read_exact(end + len(marker))

    def read_to_eof(self, deadline: float | None = None) -> bytes:
        while True:
            try:
                self._fill(deadline)
            except EOFError:
                break
        return self.read_exact(len(self._buf))


def read_chunked_body(reader: SocketReader, deadline: float | None = None) -> bytes:
    """A chunked body as Go's chunked reader accepts it.

    Chunk-size lines may end in LF or CRLF and carry ``;extensions``; sizes are hex (either case,
    at most 16 digits); each chunk's data must be followed by exactly CRLF; after the last chunk
    either CRLF or trailer lines ending in CRLF CRLF. ValueError (Go's text) for malformed input,
    EOFError if the stream ends.
    """
    body = bytearray()
    while True:
        line = reader.read_line(deadline, CHUNK_LINE_LIMIT).rstrip(b" \t\r\n")
        digits = line.partition(b";")[0]
        if not digits:
            raise ValueError("empty hex number for chunk length")
        if any(c not in _HEX_DIGITS for c in digits):
            raise ValueError("invalid byte in chunk length")
        if len(digits) > 16:
            raise ValueError("http chunk length too large")
        size = int(digits, 16)
        if size == 0:
            break
        body += reader.read_exact(size, deadline)
        if reader.read_exact(2, deadline) != b"\r\n":
            raise ValueError("malformed chunked encoding")
    ending = reader.peek(2, deadline)
    if len(ending) < 2:
        raise EOFError
    if ending == b"\r\n":
        reader.read_exact(2, deadline)
    else:
        reader.read_until(b"\r\n\r\n", deadline)  # trailer fields, ignored
    return bytes(body)


def parse_http_version(text: str) -> tuple[int, int] | None:
    """net/http's ParseHTTPVersion: ``HTTP/X.Y`` with one digit each."""
    match = re.fullmatch(r"HTTP/([0-9])\.([0-9])", text)
    return (int(match[1]), int(match[2])) if match else None


_TOKEN_CHARS = _ALNUM | frozenset(b"!#$%&'*+-.^_`|~")


def read_header_lines(
    reader: SocketReader, deadline: float | None = None, limit: int | None = None
) -> tuple[list[tuple[str, str]], int]:
    """Header lines up to the empty line, as textproto.ReadMIMEHeader reads them.

    LF or CRLF endings; folded continuation lines joined with a space; a line without a colon or
    with a bad field name is a ValueError. Returns the fields and the number of bytes read.
    """
    fields: list[tuple[str, str]] = []
    used = 0
    while True:
        raw = reader.read_line(deadline, None if limit is None else limit - used)
        used += len(raw)
        line = raw.rstrip(b"\n")
        line = line.removesuffix(b"\r")
        if not line:
            return fields, used
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise ValueError(f"malformed MIME header initial line: {line!r}")
            name, value = fields[-1]
            folded = line.strip(b" \t").decode("latin-1")
            fields[-1] = (name, f"{value} {folded}")
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or any(c not in _TOKEN_CHARS for c in name):
            raise ValueError(f"malformed MIME header line: {line!r}")
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
            raise ValueError(f"malformed MIME header line: {line!r}")
        fields.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))


def header_values(fields: list[tuple[str, str]], name: str) -> list[str]:
    """All values of one header field (names compare case-insensitively)."""
    return [value for key, value in fields if key.lower() == name.lower()]


def has_token(values: list[str], token: str) -> bool:
    """httpguts.HeaderValuesContainsToken: comma-separated, case-insensitive."""
    return any(part.strip(" \t").lower() == token for value in values for part in value.split(","))


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


@dataclass
class GoResponse:
    """One response as Go's http.ReadResponse parsed it."""

    proto: str
    status: str  # everything after "HTTP/1.1 ", e.g. "200 OK": what the registry compares
    headers: list[tuple[str, str]]
    body: bytes
    close: bool = False

    @property
    def status_code(self) -> int:
        return int(self.status[:3])

    def header(self, name: str) -> str | None:
        values = header_values(self.headers, name)
        return values[0] if values else None


class _Default:
    """Marker: use the client's timeout."""


_DEFAULT = _Default()


class GoRegistryClient:
    """The Go registry's side of one loaded plugin: ONE connection, used for every call.

    >>> client = GoRegistryClient("/tmp/gp1/TestDo.sock", "TestDo")  # dials, like LoadPlugin
    >>> client.activate()       # ["main.Do", "", "", "", ""]
    >>> client.ping()
    >>> client.execute("main.Echo", b"hi")
    >>> client.stop()           # POST /Stop, then the connection is closed (UnloadPlugin)

    Calls from several threads are pipelined on the connection in call order, as ClientConn
    does. ``timeout`` (seconds, None = forever like Go) bounds each call; a timed-out call
    leaves the connection dead.
    """

    def __init__(
        self,
        sock_path: str | os.PathLike[str],
        host: str = "",
        *,
        url: str | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        self.sock_path = os.fspath(sock_path)
        self.url = "unix://" + host if url is None else url
        self.timeout = timeout
        self.methods: list[str] = []  # what GetMethods returns, "" entries included
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(self.sock_path)
        except OSError as exc:
            self._sock.close()
            raise GoRegistryError(f"Plugin to connection failed: {exc}") from None
        self._reader = SocketReader(self._sock)
        self._write_lock = threading.Lock()
        self._turn = threading.Condition()
        self._next_ticket = 0
        self._reading = 0
        self._dead: str | None = None

    @classmethod
    def from_pconf(
        cls, path: str | os.PathLike[str], *, timeout: float | None = 30.0
    ) -> GoRegistryClient:
        """Load a plugin the way the Go registry does: Sock and Url from its .pconf."""
        conf = read_pconf(path)
        return cls(conf.sock, url=conf.url, timeout=timeout)

    def __enter__(self) -> GoRegistryClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def dead(self) -> str | None:
        """Why the connection is dead for good, or None while it is usable."""
        return self._dead

    def close(self) -> None:
        self._fail("use of closed network connection")
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    # The registry's operations ---------------------------------------------------------------

    def activate(self) -> list[str]:
        """POST /Activate; the body must be a JSON array of strings and nothing else."""
        response = self.request("Activate", None)
        self._require_ok(response, "activation failed")
        methods, error = go_unmarshal_string_list(response.body)
        if methods is not None:
            self.methods = methods
        if error is not None:
            raise GoRegistryError(f"activation failed: {error}", response)
        return list(self.methods)

    def ping(self) -> None:
        """POST /Ping with ``Test Data``; the body must come back exactly."""
        response = self.request("Ping", PING_DATA)
        self._require_ok(response, "ping failed")
        if response.body != PING_DATA:
            raise GoRegistryError("Received data is different than sent one", response)

    def execute(self, method: str, data: bytes | None) -> bytes:
        """POST /<method>; ``None`` is Go's nil body (no Content-Type)."""
        response = self.request(method, data)
        self._require_ok(response, "request failed")
        return response.body

    def register_callback_once(
        self, name: str, *, timeout: float | _Default | None = _DEFAULT
    ) -> bytes:
        """One round of the callback loop: the long poll for ``name``, answered by a notify."""
        response = self.request("RegisterCallback", go_marshal_string(name), timeout=timeout)
        self._require_ok(response, "Failed to sent CallBack Execution Request")
        return response.body

    def stop(self) -> bytes:
        """UnloadPlugin: POST /Stop, then close the connection whatever happened.

        (Go's UnloadPlugin only logs a failure; this raises it.)
        """
        try:
            response = self.request("Stop", None)
            self._require_ok(response, "Failed to stop the plugin")
            return response.body
        finally:
            self.close()

    # The transport ---------------------------------------------------------------------------

    def request(
        self, route: str, body: bytes | None, *, timeout: float | _Default | None = _DEFAULT
    ) -> GoResponse:
        """Send one request on the shared connection and read its response (status unchecked)."""
        data = expected_request_bytes(route, "", body, url=self.url)
        limit = self.timeout if isinstance(timeout, _Default) else timeout
        deadline = None if limit is None else time.monotonic() + limit
        with self._write_lock:
            self._raise_if_dead()
            ticket = self._next_ticket
            self._next_ticket += 1
            try:
                for start in range(0, len(data), GO_WRITE_SIZE):
                    self._sock.sendall(data[start : start + GO_WRITE_SIZE])
            except OSError as exc:
                self._fail(f"write: {exc}")
                raise GoRegistryError(f"write: {exc}") from None
        with self._turn:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            my_turn = self._turn.wait_for(
                lambda: self._reading == ticket or self._dead is not None, remaining
            )
        if not my_turn:
            self._fail("timeout waiting for an earlier pipelined response")
        self._raise_if_dead()
        try:
            response = self._read_response(deadline)
        except GoRegistryError as exc:
            self._fail(exc.reason)
            raise
        finally:
            with self._turn:
                self._reading += 1
                self._turn.notify_all()
        if response.close:
            self._fail("persistent connection closed")
            raise GoRegistryError("persistent connection closed", response)
        return response

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise GoRegistryError(self._dead)

    def _fail(self, reason: str) -> None:
        with self._turn:
            if self._dead is None:
                self._dead = reason
            self._turn.notify_all()

    @staticmethod
    def _require_ok(response: GoResponse, what: str) -> None:
        if response.status != "200 OK":
            raise GoRegistryError(f"{what}: status {response.status!r}", response)

    def _read_response(self, deadline: float | None) -> GoResponse:
        """http.ReadResponse, then io.ReadAll of the body, with Go's acceptance rules."""
        try:
            return self._read_response_raw(deadline)
        except EOFError:
            raise GoRegistryError("unexpected EOF") from None
        except TimeoutError:
            raise GoRegistryError("timeout waiting for the response") from None
        except ValueError as exc:
            raise GoRegistryError(str(exc)) from None
        except OSError as exc:
            raise GoRegistryError(f"read: {exc}") from None

    def _read_response_raw(self, deadline: float | None) -> GoResponse:
        line = self._reader.read_line(deadline).rstrip(b"\n").removesuffix(b"\r")
        text = line.decode("latin-1")
        proto, space, status = text.partition(" ")
        if not space:
            raise ValueError(f"malformed HTTP response {json.dumps(text)}")
        status = status.lstrip(" ")
        code = status.partition(" ")[0]
        if not re.fullmatch("[0-9]{3}", code):
            raise ValueError(f"malformed HTTP status code {json.dumps(code)}")
        version = parse_http_version(proto)
        if version is None:
            raise ValueError(f"malformed HTTP version {json.dumps(proto)}")
        headers, _ = read_header_lines(self._reader, deadline)

        chunked = False
        encodings = header_values(headers, "Transfer-Encoding")
        if encodings and version >= (1, 1):
            if len(encodings) != 1:
                raise ValueError(f"too many transfer encodings: {encodings!r}")
            if encodings[0].lower() != "chunked":
                raise ValueError(f"unsupported transfer encoding: {json.dumps(encodings[0])}")
            chunked = True
        length = self._content_length(headers, int(code), chunked)

        connection = header_values(headers, "Connection")
        close = has_token(connection, "close")
        if version == (1, 0):
            close = close or not has_token(connection, "keep-alive")
        if length == -1 and not chunked:
            close = True  # the body runs to EOF
        response = GoResponse(proto, status, headers, b"", close)
        if close:
            return response  # ClientConn fails it before the body is read
        if chunked:
            response.body = read_chunked_body(self._reader, deadline)
        else:
            response.body = self._reader.read_exact(length, deadline)
        return response

    @staticmethod
    def _content_length(headers: list[tuple[str, str]], code: int, chunked: bool) -> int:
        """net/http fixLength for a response: the body length, -1 for chunked or to-EOF."""
        values = [value.strip(" \t") for value in header_values(headers, "Content-Length")]
        if len(set(values)) > 1:
            raise ValueError(
                "http: message cannot contain multiple Content-Length headers; "
                f"got {header_values(headers, 'Content-Length')!r}"
            )
        if code // 100 == 1 or code in (204, 304):
            return 0
        if chunked:
            return -1
        if not values:
            return -1
        if not values[0]:
            raise ValueError('invalid empty Content-Length ""')
        if not values[0].isascii() or not values[0].isdigit() or len(values[0]) > 18:
            raise ValueError(f"bad Content-Length {json.dumps(values[0])}")
        return int(values[0])
