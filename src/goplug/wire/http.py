"""HTTP/1.1 framing as GoPlug uses it, sans-IO: bytes in, messages out.

One :class:`MessageReader` parses either side's messages (requests for the plugin server,
responses for the registry client, sync or asyncio alike); the ``*_head`` functions build the
bytes to send. Nothing here touches a socket, a thread or a clock.

Framing follows what GoPlug peers send: ``Content-Length`` or ``Transfer-Encoding: chunked``
bodies, header lines ending in CRLF or a bare LF, pipelined messages, and (responses only) bodies
delimited by the connection closing. Every limit is checked against announced sizes before
anything of that size is allocated.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from goplug.errors import ProtocolError

__all__ = [
    "REASONS",
    "FramingError",
    "Limits",
    "Message",
    "MessageReader",
    "TruncatedMessage",
    "request_head",
    "response_head",
]

REASONS: Final[dict[int, bytes]] = {
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}

# Bodies at least this large are worth receiving in big pieces (see body_wanted): each piece is
# kept as it arrived and the body is joined once, so it is copied once after the kernel's copy.
_SINK_MIN: Final = 256 * 1024


class FramingError(ProtocolError):
    """The bytes do not form a valid message, or a message exceeds a limit.

    :attr:`status` is the HTTP status a server should answer with (400, 413 ...).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class TruncatedMessage(FramingError):
    """The peer closed the connection before a message was complete."""


class Limits(NamedTuple):
    """Size limits for one side of a connection (all in bytes except ``max_headers``)."""

    max_head: int = 64 * 1024
    """Request or status line plus all header lines."""
    max_headers: int = 100
    """Number of header lines."""
    max_body: int = 64 * 1024 * 1024
    """Body size, whether announced by Content-Length or accumulated from chunks."""


class Message:
    """One parsed request or response.

    For a request, :attr:`method` and :attr:`target` are set and :attr:`status` is 0; for a
    response, :attr:`status` and :attr:`reason` are set. Header names are lower-case; values are
    the raw bytes with surrounding whitespace removed (a repeated header keeps its last value).
    """

    __slots__ = ("body", "headers", "keep_alive", "method", "reason", "status", "target")

    def __init__(
        self,
        method: str = "",
        target: str = "",
        status: int = 0,
        reason: str = "",
        headers: dict[bytes, bytes] | None = None,
        body: bytes = b"",
        keep_alive: bool = True,
    ) -> None:
        self.method = method
        self.target = target
        self.status = status
        self.reason = reason
        self.headers: dict[bytes, bytes] = {} if headers is None else headers
        self.body = body
        self.keep_alive = keep_alive

    def header(self, name: bytes, default: bytes = b"") -> bytes:
        """Return the value of a header (``name`` in lower case)."""
        return self.headers.get(name, default)

    def __repr__(self) -> str:
        first = f"{self.method} {self.target}" if self.method else f"{self.status} {self.reason}"
        return f"<Message {first} {len(self.body)} bytes>"


# The answer goplug plugins give to every successful call; parsed without the general path.
_OK_PREFIX: Final = b"HTTP/1.1 200 OK\r\nContent-Length: "
_OK_LEN: Final = len(_OK_PREFIX)


_CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS = range(4)
_HEX = frozenset(b"0123456789abcdefABCDEF")
_CR_LF = b"\r\n"
_WS = b" \t"


class MessageReader:
    """Incremental parser of the messages one peer sends on one connection.

    Feed it whatever bytes arrive (:meth:`feed`), then take complete messages with
    :meth:`next_message` until it returns ``None`` (more bytes needed). Call :meth:`feed_eof`
    when the peer closes. Errors raise :class:`FramingError`; after one the connection must be
    dropped.
    """

    __slots__ = (
        "_body",
        "_buf",
        "_chunk_left",
        "_chunk_state",
        "_close_delimited",
        "_eof",
        "_is_response",
        "_limits",
        "_msg",
        "_need",
        "_parts",
        "_pos",
    )

    def __init__(self, is_response: bool, limits: Limits | None = None) -> None:
        self._is_response = is_response
        self._limits = limits or Limits()
        self._buf = b""
        self._pos = 0
        self._msg: Message | None = None  # head parsed, body pending
        self._need = -1  # Content-Length body bytes still to read
        self._body = bytearray()
        self._parts: list[bytes] = []  # pieces of a Content-Length body received so far
        self._chunk_state = -1  # -1: not chunked
        self._chunk_left = 0
        self._close_delimited = False
        self._eof = False

    # -- input ---------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Add bytes received from the peer."""
        if self._eof:
            raise FramingError("data after end of stream")
        if self._pos:
            self._buf = self._buf[self._pos :] + data
            self._pos = 0
        elif self._buf:
            self._buf += data
        else:
            self._buf = data

    def receive(self, data: bytes) -> Message | None:
        """Feed ``data`` and return the next complete message, if there is one now.

        The same as :meth:`feed` then :meth:`next_message`, with a shortcut for the usual case:
        one whole message arriving on an idle connection.
        """
        if not self._buf and self._msg is None and not self._eof:
            self._buf = data
            if self._is_response:
                if data.startswith(_OK_PREFIX):
                    msg = self._fast_ok(data)
                    if msg is not None:
                        return msg
            elif data.startswith(b"POST /"):
                msg = self._fast_post(data)
                if msg is not None:
                    return msg
            return self.next_message()
        self.feed(data)
        return self.next_message()

    def feed_eof(self) -> Message | None:
        """Record that the peer closed; return a close-delimited message it completes, if any.

        Raises :class:`FramingError` if a message was cut short.
        """
        self._eof = True
        if self._msg is not None and self._close_delimited:
            self._msg.body = bytes(self._body) + self._buf[self._pos :]
            self._buf, self._pos = b"", 0
            return self._finish()
        if self.in_message:
            raise TruncatedMessage("connection closed in the middle of a message")
        return None

    @property
    def in_message(self) -> bool:
        """True when part of a message has arrived but not all of it."""
        return self._msg is not None or len(self._buf) > self._pos

    @property
    def buffered(self) -> int:
        """Number of bytes received but not yet part of a returned message."""
        return len(self._buf) - self._pos + len(self._body) + sum(map(len, self._parts))

    # -- zero-copy body reception ----------------------------------------------------------------

    def body_wanted(self) -> int:
        """Bytes a large Content-Length body still needs, if nothing else is buffered; else 0.

        Receiving that much in one call (``socket.recv(n)``) and feeding it keeps a big body to
        one copy after the kernel's: pieces are kept as they arrive and joined once.
        """
        if self._need >= _SINK_MIN and self._msg is not None and len(self._buf) <= self._pos:
            return self._need
        return 0

    # -- parsing -------------------------------------------------------------------------------

    def next_message(self) -> Message | None:
        """Return the next complete message, or ``None`` if more bytes are needed."""
        if self._msg is None:
            buf = self._buf
            if self._pos >= len(buf):
                return None
            if self._is_response:
                if buf.startswith(_OK_PREFIX, self._pos):
                    fast = self._fast_ok(buf)
                    if fast is not None:
                        return fast
            elif buf.startswith(b"POST /", self._pos):
                fast = self._fast_post(buf)
                if fast is not None:
                    return fast
            if not self._parse_head():
                return None
        msg = self._msg
        assert msg is not None
        if self._need >= 0:
            return self._read_sized()
        if self._chunk_state >= 0:
            return self._read_chunked()
        if self._close_delimited:
            avail = len(self._buf) - self._pos + len(self._body)
            if avail > self._limits.max_body:
                raise FramingError("body exceeds the limit", 413)
            self._body += self._buf[self._pos :]
            self._buf, self._pos = b"", 0
            return None
        return self._finish()

    def _fast_ok(self, buf: bytes) -> Message | None:
        """Parse a complete ``200 OK`` with only a Content-Length header, or return None."""
        start = self._pos + _OK_LEN
        end = buf.find(b"\r\n\r\n", start, start + 24)
        if end < 0:
            return None
        digits = buf[start:end]
        if not digits.isdigit():
            return None
        n = int(digits)
        body_start = end + 4
        stop = body_start + n
        if n > self._limits.max_body or stop > len(buf):
            return None  # the general path reports the limit or waits for the rest
        body = buf[body_start:stop]
        if stop == len(buf):
            self._buf, self._pos = b"", 0
        else:
            self._pos = stop
        return Message("", "", 200, "OK", {b"content-length": digits}, body)

    def _fast_post(self, buf: bytes) -> Message | None:
        """Parse a complete POST whose only headers are Host and Content-Length, or return None.

        That is every call a goplug registry makes; anything else takes the general path.
        """
        pos = self._pos
        end = buf.find(b"\r\n\r\n", pos, pos + 1024)
        if end < 0:
            return None
        head = buf[pos:end]
        lines = head.split(b"\r\n")
        if len(lines) != 3 or head.count(b"\n") != 2:
            return None
        request_line, host, length = lines
        if not host.startswith(b"Host: ") or not length.startswith(b"Content-Length: "):
            return None
        parts = request_line.split(b" ")
        digits = length[16:]
        if len(parts) != 3 or parts[2] != b"HTTP/1.1" or not digits.isdigit():
            return None
        n = int(digits)
        start = end + 4
        stop = start + n
        if n > self._limits.max_body or stop > len(buf) or not parts[1].isascii():
            return None  # the general path reports the limit or waits for the rest
        if stop == len(buf):
            self._buf, self._pos = b"", 0
        else:
            self._pos = stop
        headers = {b"host": host[6:].strip(), b"content-length": digits}
        return Message("POST", parts[1].decode("ascii"), 0, "", headers, buf[start:stop])

    def _finish(self) -> Message:
        msg = self._msg
        assert msg is not None
        self._msg = None
        self._need = -1
        if self._chunk_state >= 0 or self._close_delimited or self._body or self._parts:
            self._chunk_state = -1
            self._close_delimited = False
            self._body = bytearray()
            self._parts = []
        if self._pos == len(self._buf):
            self._buf, self._pos = b"", 0
        return msg

    def _read_sized(self) -> Message | None:
        msg = self._msg
        assert msg is not None
        buf, pos, need = self._buf, self._pos, self._need
        avail = len(buf) - pos
        if avail < need:
            if avail:
                self._parts.append(buf[pos:] if pos else buf)
                self._buf, self._pos = b"", 0
                self._need = need - avail
            return None
        piece = buf if pos == 0 and need == len(buf) else buf[pos : pos + need]
        if self._parts:
            self._parts.append(piece)
            msg.body = b"".join(self._parts)
        else:
            msg.body = piece
        self._pos = pos + need
        return self._finish()

    def _read_chunked(self) -> Message | None:
        limits = self._limits
        while True:
            buf, pos = self._buf, self._pos
            state = self._chunk_state
            if state == _CHUNK_DATA:
                avail = len(buf) - pos
                take = min(avail, self._chunk_left)
                if take:
                    self._body += buf[pos : pos + take]
                    self._pos = pos + take
                    self._chunk_left -= take
                if self._chunk_left:
                    return None
                self._chunk_state = _CHUNK_CRLF
                continue
            end = buf.find(b"\n", pos)
            if end < 0:
                if len(buf) - pos > limits.max_head:
                    raise FramingError("chunk framing line too long")
                return None
            line = buf[pos:end]
            if line.endswith(b"\r"):
                line = line[:-1]
            self._pos = end + 1
            if state == _CHUNK_CRLF:
                if line:
                    raise FramingError("missing CRLF after chunk data")
                self._chunk_state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                size_text = line.split(b";", 1)[0].strip()
                if not size_text or len(size_text) > 15 or not _HEX.issuperset(size_text):
                    raise FramingError(f"bad chunk size line {line[:40]!r}")
                size = int(size_text, 16)
                if len(self._body) + size > limits.max_body:
                    raise FramingError("body exceeds the limit", 413)
                if size == 0:
                    self._chunk_state = _TRAILERS
                else:
                    self._chunk_left = size
                    self._chunk_state = _CHUNK_DATA
            elif not line:  # _TRAILERS: an empty line ends the message
                msg = self._msg
                assert msg is not None
                msg.body = bytes(self._body)
                return self._finish()

    def _parse_head(self) -> bool:
        buf, pos = self._buf, self._pos
        if pos < len(buf) and buf[pos] in _CR_LF:
            # Tolerate empty lines before a message (RFC 9112 §2.2).
            while buf.startswith(b"\r\n", pos) or buf.startswith(b"\n", pos):
                pos += 1 if buf[pos] == 10 else 2
            self._pos = pos
        end = buf.find(b"\r\n\r\n", pos)
        # A bare-LF line may end the head earlier ("\n\n" or "\n\r\n" before the CRLFCRLF).
        if (
            end >= 0
            and buf.find(b"\n\n", pos, end + 2) < 0
            and buf.find(b"\n\r\n", pos, end + 2) < 0
        ):
            body_start = end + 4
            head = buf[pos:end]
            lines = head.split(b"\r\n")
            if head.count(b"\n") != len(lines) - 1:  # a bare LF among CRLFs
                lines = [ln.rstrip(b"\r") for ln in head.split(b"\n")]
        else:
            end_lf = buf.find(b"\n\n", pos)
            end_mixed = buf.find(b"\n\r\n", pos)
            ends = [e for e in (end_lf, end_mixed) if e >= 0]
            if not ends:
                if len(buf) - pos > self._limits.max_head:
                    raise FramingError("message head exceeds the limit")
                return False
            end = min(ends)
            body_start = end + (2 if end == end_lf else 3)
            lines = [ln.rstrip(b"\r") for ln in buf[pos:end].split(b"\n")]
        if end - pos > self._limits.max_head:
            raise FramingError("message head exceeds the limit")
        if len(lines) > self._limits.max_headers + 1:
            raise FramingError("too many header lines")
        msg = self._parse_start_line(lines[0])
        headers = msg.headers
        for i in range(1, len(lines)):
            name, sep, value = lines[i].partition(b":")
            if not sep or not name or b" " in name or b"\t" in name:
                raise FramingError(f"bad header line {lines[i][:40]!r}")
            key = name.lower()
            value = value.strip()
            if key == b"content-length" and headers.get(key, value) != value:
                raise FramingError("conflicting content-length headers")
            headers[key] = value
        self._pos = body_start
        self._msg = msg
        self._setup_body(msg)
        return True

    def _parse_start_line(self, line: bytes) -> Message:
        if self._is_response:
            # Status line: HTTP/1.x SP code [SP reason]
            if not line.startswith(b"HTTP/1."):
                raise FramingError(f"bad status line {line[:40]!r}")
            parts = line.split(b" ", 2)
            if len(parts) < 2 or len(parts[1]) != 3 or not parts[1].isdigit():
                raise FramingError(f"bad status line {line[:40]!r}")
            reason = parts[2].decode("latin-1") if len(parts) == 3 else ""
            return Message(status=int(parts[1]), reason=reason, keep_alive=parts[0] == b"HTTP/1.1")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0] or not parts[1]:
            raise FramingError(f"bad request line {line[:40]!r}")
        try:
            method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
        except UnicodeDecodeError:
            raise FramingError("request line is not ASCII") from None
        return Message(method=method, target=target, keep_alive=parts[2] == b"HTTP/1.1")

    def _setup_body(self, msg: Message) -> None:
        headers = msg.headers
        connection = headers.get(b"connection")
        if connection is not None:
            options = {option.strip() for option in connection.lower().split(b",")}
            if b"close" in options:
                msg.keep_alive = False
            elif b"keep-alive" in options and msg.target:
                msg.keep_alive = True
        cl = headers.get(b"content-length")
        te = headers.get(b"transfer-encoding")
        if te is not None:
            if te.lower().rsplit(b",", 1)[-1].strip() != b"chunked":
                raise FramingError(f"unsupported transfer-encoding {te[:40]!r}")
            if cl is not None and not self._is_response:
                raise FramingError("both content-length and transfer-encoding")
            self._chunk_state = _CHUNK_SIZE
            return
        if cl is not None:
            if not cl.isdigit() or len(cl) > 19:
                raise FramingError(f"bad content-length {cl[:40]!r}")
            n = int(cl)
            if n > self._limits.max_body:
                raise FramingError(
                    f"body of {n} bytes exceeds the limit of {self._limits.max_body}", 413
                )
            self._need = n
            return
        if self._is_response and msg.status >= 200 and msg.status not in (204, 304):
            self._close_delimited = True
            msg.keep_alive = False
            return
        self._need = 0


def request_head(path: str, host: str, length: int, extra: bytes = b"") -> bytes:
    """Build a POST request head; ``extra`` holds already-formatted header lines."""
    return b"POST %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n" % (
        path.encode("ascii"),
        host.encode("ascii"),
        extra,
        length,
    )


def response_head(status: int, length: int, extra: bytes = b"") -> bytes:
    """Build a response head; ``extra`` holds already-formatted header lines."""
    return b"HTTP/1.1 %d %s\r\n%sContent-Length: %d\r\n\r\n" % (
        status,
        REASONS.get(status, b"Unknown"),
        extra,
        length,
    )
