"""Registry side of the wire: pooled connections to one plugin, calls, and callback long polls.

A :class:`PluginClient` keeps a pool of persistent connections (one per concurrent caller, as
many as there have been at once) so calls from many threads never queue behind each other.
Every long poll has a connection of its own (:class:`Subscription`), so a waiting callback never
delays a call. Timeouts are kernel socket options (``SO_RCVTIMEO``), which keep a call to one
``sendall`` and usually one ``recv``.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

from goplug import memory
from goplug.errors import (
    CallTimeout,
    GoPlugError,
    PluginConnectionError,
    ProtocolError,
    RegistryClosed,
)
from goplug.transport import (
    Transport,
    fastpath,
    peek,
    peer_pid,
    set_timeouts,
    token_header,
)
from goplug.wire import routes
from goplug.wire.http import FramingError, Limits, Message, MessageReader, TruncatedMessage
from goplug.wire.pconf import PluginConf

__all__ = ["ClientSettings", "Connection", "PluginClient", "Subscription"]

log = logging.getLogger("goplug.client")

_RECV = 65536
_BIG_RECV = 1024 * 1024  # receive size while a large body is coming
# Answers after which a plugin closes the connection (docs/PROTOCOL.md §6).
_CLOSING_STATUSES = frozenset({400, 401, 408, 413, 503})


@dataclass(frozen=True)
class ClientSettings:
    """Timeouts and limits of a registry's connections to its plugins."""

    call_timeout: float = 30.0
    """Default timeout of ``execute`` (seconds); a call may pass its own. Also the longest a
    callback poll's answer may take once it has started (the wait for it to start is unbounded)."""
    ping_timeout: float = 2.0
    """Timeout of ``ping``."""
    activate_timeout: float = 5.0
    """Timeout of ``/Activate`` when loading and of ``/Stop`` when unloading."""
    connect_timeout: float = 2.0
    """Timeout of connecting to a plugin socket."""
    pool_idle: float = 60.0
    """Pooled connections unused for this long are closed (the plugin's idle limit is longer)."""
    limits: Limits = field(default_factory=Limits)
    """Largest response head and body accepted."""
    resubscribe_max_delay: float = 2.0
    """Longest wait between two attempts to re-subscribe a cut callback poll."""


def _ok_message(body: bytes) -> Message:
    """The response a plain ``200 OK`` carrying ``body`` parses to."""
    return Message("", "", 200, "OK", {b"content-length": b"%d" % len(body)}, body)


class Connection:
    """One persistent connection: a blocking socket and its response reader."""

    __slots__ = ("fd", "idle_sweeps", "max_body", "reader", "sock", "timeout", "unread")

    def __init__(self, sock: socket.socket, limits: Limits) -> None:
        self.sock = sock
        self.reader = MessageReader(True, limits)
        self.timeout = -1.0
        self.idle_sweeps = 0
        self.max_body = limits.max_body
        # A plain socket takes the C fast path of a call; -1: this one does not (TLS).
        self.fd = sock.fileno() if fastpath is not None and type(sock) is socket.socket else -1
        self.unread = False  # the reader holds bytes of an answer: the C path must not read on

    def set_timeout(self, seconds: float) -> None:
        """Bound every single receive and send on this connection to ``seconds``."""
        set_timeouts(self.sock, max(seconds, 0.001))
        self.timeout = seconds

    def close(self) -> None:
        """Shut the socket down (waking any thread blocked on it) and close it."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def call(self, prefix: bytes, data: bytes, timeout: float) -> bytes | Message:
        """Send ``prefix``, the body's length and ``data``; read the response.

        Returns the body of a plain ``200 OK``, else the parsed response (raises OSError,
        FramingError, TimeoutError).
        """
        if self.fd < 0 or self.unread:
            n = len(data)
            if n < 65536:
                return self._exchange(b"%s%d\r\n\r\n%s" % (prefix, n, data), None, timeout)
            return self._exchange(b"%s%d\r\n\r\n" % (prefix, n), data, timeout)
        if timeout != self.timeout:
            self.set_timeout(timeout)
        try:
            answer = fastpath.exchange(
                self.fd, prefix, data, timeout, self.max_body, memory.tune_malloc
            )
        except (BrokenPipeError, ConnectionResetError):
            # As in exchange(): a plugin that refused the request may have answered first.
            msg = self._answer_after_failed_send()
            if msg is None:
                raise
            return msg
        if isinstance(answer, bytes):
            if len(answer) >= 65536:
                self.timeout = -1.0  # a long body may have shrunk SO_RCVTIMEO to fit the call
            return answer
        received, eof = answer
        msg = self._receive(received, eof, time.monotonic(), timeout)
        self.unread = self.reader.in_message
        return msg

    def exchange(self, request: bytes, body: bytes | None, timeout: float) -> Message:
        """Send one request and read its response (raises OSError, FramingError, TimeoutError)."""
        answer = self._exchange(request, body, timeout)
        return _ok_message(answer) if isinstance(answer, bytes) else answer

    def poll(self, request: bytes, timeout: float) -> tuple[int, list[bytes]] | Message:
        """Send a long poll and wait for its answer, as long as it takes to start.

        Once it has started, the rest must come within ``timeout`` seconds. Returns
        ``(first_seq, notifications)`` for a batch as goplug plugins send it, else the parsed
        response (raises OSError, TimeoutError, FramingError).
        """
        if self.fd >= 0 and not self.unread:
            answer = fastpath.notifications(
                self.fd, request, self.max_body, timeout, memory.tune_malloc
            )
            if type(answer[0]) is int:
                return answer
            received, eof = answer
            msg = self._rest_of_answer(received, bool(eof), timeout)  # type: ignore[arg-type]
        else:
            self.sock.sendall(request)
            data = self.sock.recv(_RECV)
            msg = self._rest_of_answer(data, not data, timeout)
        if self.reader.in_message:  # a plugin answers one poll at a time
            raise FramingError("unsolicited response")
        return msg

    def _rest_of_answer(self, first: bytes, eof: bool, timeout: float) -> Message:
        if eof:
            return self._receive(first, True, 0.0, 0.0)
        msg = self.reader.receive(first)
        if msg is not None:
            return msg
        # The answer has started: what is left of it must come within the timeout, or a plugin
        # that stalls in the middle of an answer would hold the poll for ever.
        self.set_timeout(timeout)
        try:
            return self._receive(None, False, time.monotonic(), timeout)
        finally:
            set_timeouts(self.sock, 0)
            self.timeout = 0.0

    def _exchange(self, request: bytes, body: bytes | None, timeout: float) -> bytes | Message:
        sock = self.sock
        started = time.monotonic()
        if timeout != self.timeout:
            self.set_timeout(timeout)
        try:
            sock.sendall(request)
            if body is not None:
                sock.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            # The plugin may have refused the request (413) and closed before reading it all:
            # its answer is still there to read.
            answer = self._answer_after_failed_send()
            if answer is None:
                raise
            return answer
        if self.reader.in_message:  # left over from an earlier exchange: a protocol breach
            raise FramingError("unsolicited response")
        data = sock.recv(_RECV)
        if fastpath is not None and data:
            ok = fastpath.ok_body(data, self.max_body)  # the usual answer, parsed in C
            if ok is not None:
                return ok
        return self._receive(data, not data, started, timeout)

    def _receive(self, first: bytes | None, eof: bool, started: float, timeout: float) -> Message:
        sock = self.sock
        reader = self.reader
        data = first
        while True:
            if data is None:
                wanted = reader.body_wanted()
                if wanted:
                    if not memory.tuned:
                        memory.tune_malloc()
                    data = sock.recv(min(wanted, _BIG_RECV))
                else:
                    data = sock.recv(_RECV)
                eof = not data
            if eof:
                if data:
                    reader.feed(data)
                msg = reader.feed_eof()
                if msg is None:
                    raise ConnectionResetError("the plugin closed the connection")
                return msg
            msg = reader.receive(data)
            data = None
            if msg is not None:
                return msg
            if timeout <= 0:
                continue
            # A response that trickles in: shrink SO_RCVTIMEO to what is left of the call's
            # timeout (in steps, to spare a system call per chunk of a large body).
            remaining = started + timeout - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("response not complete within the timeout")
            if remaining < self.timeout - 0.05:
                self.set_timeout(remaining)

    def _answer_after_failed_send(self) -> Message | None:
        try:
            self.set_timeout(0.2)
            while True:
                data = self.sock.recv(_RECV)
                if not data:
                    return self.reader.feed_eof()
                msg = self.reader.receive(data)
                if msg is not None:
                    msg.keep_alive = False
                    return msg
        except (OSError, FramingError):
            return None


class PluginClient:
    """Calls to one plugin over a pool of persistent connections."""

    def __init__(
        self,
        conf: PluginConf,
        transport: Transport,
        settings: ClientSettings,
    ) -> None:
        self.conf = conf
        self._transport = transport
        self._settings = settings
        self._idle: deque[Connection] = deque()
        self._busy: set[Connection] = set()
        self._closed = False
        self._closed_error: GoPlugError = RegistryClosed("the registry was closed")
        self._host = conf.host.encode("ascii")
        self._path = conf.path_prefix.encode("ascii")
        self._prefixes: dict[str, bytes] = {}
        self._auth = token_header(transport.token)

    # -- the call path -------------------------------------------------------------------------

    def call(
        self, route: str, data: bytes, timeout: float | None = None, extra_headers: bytes = b""
    ) -> Message:
        """Send one request and return the response (any status); raise typed errors."""
        answer = self._call(route, data, timeout, extra_headers)
        return _ok_message(answer) if isinstance(answer, bytes) else answer

    def request(self, route: str, data: bytes, timeout: float | None = None) -> bytes:
        """Call ``route`` and return the body of a 200 answer; raise the typed error otherwise."""
        answer = self._call(route, data, timeout, b"")
        if isinstance(answer, bytes):
            return answer
        if answer.status == 200:
            return answer.body
        raise routes.error_from_response(answer, route)

    def _call(
        self, route: str, data: bytes, timeout: float | None, extra_headers: bytes
    ) -> bytes | Message:
        if timeout is None:
            timeout = self._settings.call_timeout
        prefix = self._prefixes.get(route) if not extra_headers else None
        if prefix is None:
            prefix = self._prefix(route, extra_headers)
        if self._closed:
            raise self._closed_error
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self.connect()
        busy = self._busy
        busy.add(conn)
        try:
            answer = conn.call(prefix, data, timeout)
        except (BlockingIOError, TimeoutError):
            busy.discard(conn)
            conn.close()
            raise CallTimeout(
                f"{self._label}: /{route} did not answer within {timeout:g} s"
            ) from None
        except FramingError as exc:
            busy.discard(conn)
            conn.close()
            if self._closed:
                raise self._closed_error from None
            if isinstance(exc, TruncatedMessage):
                raise PluginConnectionError(f"{self._label}: /{route}: {exc}") from None
            raise ProtocolError(f"{self._label}: /{route}: {exc}") from None
        except OSError as exc:
            busy.discard(conn)
            conn.close()
            if self._closed:
                raise self._closed_error from None
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise PluginConnectionError(
                f"{self._label}: connection lost during /{route}: {reason}"
            ) from None
        busy.discard(conn)
        conn.idle_sweeps = 0
        if isinstance(answer, bytes):
            keep = not self._closed
        else:
            # Bytes left after the answer answer nothing that was asked: the connection ends.
            keep = (
                answer.keep_alive
                and not self._closed
                and answer.status not in _CLOSING_STATUSES
                and not conn.reader.in_message
            )
        if keep:
            self._idle.append(conn)
        else:
            conn.close()
        return answer

    def _prefix(self, route: str, extra_headers: bytes) -> bytes:
        path = self._path + b"/" + quote(route, safe="!$&'()*+,;=:@").encode("ascii")
        prefix = b"POST %s HTTP/1.1\r\nHost: %s\r\n%s%sContent-Length: " % (
            path,
            self._host,
            self._auth,
            extra_headers,
        )
        if not extra_headers and len(self._prefixes) < 1024:
            self._prefixes[route] = prefix
        return prefix

    def _acquire(self) -> Connection:
        if self._closed:
            raise self._closed_error
        try:
            return self._idle.pop()
        except IndexError:
            return self.connect()

    @property
    def transport(self) -> Transport:
        """The transport this client connects with."""
        return self._transport

    def peer_pid(self) -> int | None:
        """Return the pid that listens on the plugin's socket, if the OS tells.

        The connection opened to find out joins the pool, so the next call reuses it.
        """
        conn = self._acquire()
        try:
            return peer_pid(conn.sock)
        finally:
            self._idle.append(conn)

    def connect(self) -> Connection:
        """Open a new connection to the plugin (not pooled until used)."""
        sock = self._transport.connect(self.conf.address, self._settings.connect_timeout)
        return Connection(sock, self._settings.limits)

    @property
    def _label(self) -> str:
        conf = self.conf
        return f"{conf.name}@{conf.namespace}" if conf.namespace else conf.name

    # -- health --------------------------------------------------------------------------------

    def sweep(self) -> bool:
        """Check the idle connections; return False if the plugin's end has gone away.

        A connection the plugin closed reads as end-of-file without blocking; it is dropped.
        """
        healthy = True
        count = len(self._idle)
        for _ in range(count):
            try:
                conn = self._idle.popleft()
            except IndexError:
                break
            peeked = peek(conn.sock)
            if peeked is not None:  # EOF, or bytes nobody asked for: this connection is done
                conn.close()
                healthy = healthy and peeked != b""
                continue
            self._idle.append(conn)
        return healthy

    def idle_fds(self) -> list[int]:
        """File descriptors of the idle connections (one more tick of idleness for each)."""
        fds = []
        for conn in list(self._idle):
            conn.idle_sweeps += 1
            fds.append(conn.sock.fileno())
        return fds

    def probe(self, timeout: float) -> bool | None:
        """Ping the plugin on a fresh connection; tell whether it is there.

        True if it answers, False if it is gone, None if it accepted the connection but did not
        answer in time (hung, not gone).
        A bare connect is not enough: a dying process may still accept for a moment.
        """
        try:
            conn = self.connect()
        except PluginConnectionError:
            return False
        request = self._prefix("Ping", b"") + b"9\r\n\r\nTest Data"
        try:
            msg = conn.exchange(request, None, timeout)
        except (BlockingIOError, TimeoutError):
            return None
        except (OSError, FramingError):
            return False
        finally:
            conn.close()
        return msg.status == 200

    def expire_idle(self, max_sweeps: int) -> None:
        """Close idle connections that stayed unused for ``max_sweeps`` sweeps (keep one)."""
        for _ in range(len(self._idle) - 1):
            try:
                if self._idle[0].idle_sweeps < max_sweeps:
                    break
                self._idle.popleft().close()
            except IndexError:  # a caller took the connections meanwhile
                break

    def close(self, error: GoPlugError | None = None) -> None:
        """Close every connection, waking calls in flight.

        They raise ``error``: by default RegistryClosed, the registry passes
        PluginConnectionError when it closes the pool of a plugin it lost.
        """
        if error is not None:
            self._closed_error = error
        self._closed = True
        while self._idle:
            with contextlib.suppress(IndexError):
                self._idle.pop().close()
        for conn in list(self._busy):
            conn.close()

    @property
    def open_connections(self) -> int:
        """Connections currently open (idle and busy)."""
        return len(self._idle) + len(self._busy)


class Subscription:
    """One callback: a thread long-polling the plugin and handing each notification to ``fn``.

    Uses the reliable subscription extension (docs/PROTOCOL.md §5): every notification is
    delivered once, in order, across cut connections and re-subscriptions; with a GoPlug plugin
    it falls back to the original one-at-a-time polling.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[bytes], object],
        client_of: Callable[[], PluginClient | None],
        settings: ClientSettings,
        on_broken: Callable[[], None],
    ) -> None:
        self.name = name
        self.fn = fn
        self.token = secrets.token_urlsafe(12)
        self.delivered = 0
        self._ack = 0
        self._client_of = client_of
        self._settings = settings
        self._on_broken = on_broken
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._conn: Connection | None = None
        self._answered = False
        self._conn_lock = threading.Lock()
        self._body = routes.callback_name_body(name)
        self._thread = threading.Thread(
            target=self._run, name=f"goplug-callback-{name}", daemon=True
        )

    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def kick(self) -> None:
        """Retry at once (the plugin was just reloaded) instead of waiting out the backoff."""
        self._wake.set()

    def close(self, timeout: float = 1.0) -> None:
        """Stop polling and wait (up to ``timeout``) for the thread to end."""
        self._stop.set()
        self._wake.set()
        with self._conn_lock:
            if self._conn is not None:
                self._conn.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """True while the polling thread runs."""
        return self._thread.is_alive()

    def _run(self) -> None:
        delay = 0.01
        while not self._stop.is_set():
            client = self._client_of()
            if client is None:
                self._wait(delay)
                delay = min(delay * 2, self._settings.resubscribe_max_delay)
                continue
            try:
                conn = client.connect()
            except GoPlugError:
                self._wait(delay)
                delay = min(delay * 2, self._settings.resubscribe_max_delay)
                continue
            with self._conn_lock:
                if self._stop.is_set():
                    conn.close()
                    return
                self._conn = conn
            self._answered = False
            try:
                self._poll_loop(client, conn)
                delay = 0.01
            except (OSError, FramingError, GoPlugError) as exc:
                # Cut, garbled or refused (a plugin that is stopping answers 503): the
                # thread lives on and subscribes again, with backoff, until it is closed.
                if self._answered:
                    delay = 0.01  # this connection worked: a cut is news, not a pattern
                if self._stop.is_set():
                    break
                log.info("callback %r: poll ended (%s); re-subscribing", self.name, exc)
                self._on_broken()
                self._wait(delay)
                delay = min(delay * 2, self._settings.resubscribe_max_delay)
            finally:
                with self._conn_lock:
                    self._conn = None
                conn.close()

    def _wait(self, delay: float) -> None:
        self._wake.wait(delay)
        self._wake.clear()

    def _poll_loop(self, client: PluginClient, conn: Connection) -> None:
        # Long polls wait as long as they must: no receive timeout.
        set_timeouts(conn.sock, 0)
        conn.timeout = 0.0
        while not self._stop.is_set():
            answer = conn.poll(self._request(client), self._settings.call_timeout)
            keep_alive = True
            if type(answer) is tuple:
                items = self._acknowledge(*answer)
            else:
                assert isinstance(answer, Message)
                items = self._items(answer)
                keep_alive = answer.keep_alive
            self._answered = True
            for item in items:
                self._deliver(item)
            if not keep_alive:
                return

    def _request(self, client: PluginClient) -> bytes:
        extra = b"X-Goplug-Subscriber: %s\r\nX-Goplug-Ack: %d\r\n" % (
            self.token.encode(),
            self._ack,
        )
        prefix = client._prefix(routes.REGISTER_CALLBACK, extra)
        return b"%s%d\r\n\r\n%s" % (prefix, len(self._body), self._body)

    def _items(self, msg: Message) -> list[bytes]:
        """The notifications a parsed poll answer brings (a numbered batch is acknowledged)."""
        if msg.status != 200:
            raise routes.error_from_response(msg, routes.REGISTER_CALLBACK)
        seq_text = msg.header(routes.SEQ_HEADER)
        if not seq_text:
            return [msg.body]  # a GoPlug plugin: one notification per poll, unnumbered
        count_text = msg.header(routes.COUNT_HEADER, b"1")
        if not seq_text.isdigit() or not count_text.isdigit():
            raise ProtocolError("bad X-Goplug-Seq or X-Goplug-Count")
        return self._acknowledge(int(seq_text), routes.decode_batch(msg.body, int(count_text)))

    def _acknowledge(self, first: int, items: list[bytes]) -> list[bytes]:
        """Acknowledge a numbered batch; return its notifications."""
        if first <= self._ack:
            # A plugin answers only what follows the acknowledged number, so a lower one
            # means its numbering restarted (a new process, or an expired subscription).
            self._ack = first - 1
        if items:
            self._ack = first + len(items) - 1
        return items

    def _deliver(self, data: bytes) -> None:
        if self._stop.is_set():
            return
        self.delivered += 1
        try:
            self.fn(data)
        except Exception:
            log.exception("callback %r raised; delivery goes on", self.name)
