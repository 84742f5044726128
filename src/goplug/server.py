"""Plugin side of the wire: accept connections, read requests, dispatch routes, answer.

One thread per connection, blocking sockets and the sans-IO reader: on these machines that
answers a small call in about the time a raw socket round trip takes, where an event loop costs
several times more. A slow method holds only its own connection. ``async def`` methods run on one
event loop thread shared by the process, so they never block a connection thread's peers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from goplug import memory
from goplug.callbacks import CallbackHub
from goplug.errors import GoPlugError, ProtocolError
from goplug.logs import LazyLogger
from goplug.transport import (
    Transport,
    UnixTransport,
    fastpath,
    peek,
    peer_uid,
    set_timeouts,
    token_matches,
)
from goplug.wire import routes
from goplug.wire.http import FramingError, Limits, Message, MessageReader, response_head

__all__ = ["MethodFunc", "Server", "ServerSettings"]

log = LazyLogger("goplug.server")

TYPE_CHECKING = False  # typing.TYPE_CHECKING; asyncio is imported only when a method needs it
if TYPE_CHECKING:
    import asyncio

MethodFunc = Callable[[bytes], bytes | Awaitable[bytes | None] | None]

_OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: "
_JSON = b"Content-Type: application/json\r\n"
_RECV = 65536
_BIG_RECV = 1024 * 1024  # receive size while a large body is coming
# What a server remembers of the requests it met (targets -> routes and methods, poll bodies ->
# callback names): this many entries of at most this many characters each, so that clients
# sending ever new targets cannot make it grow.
_CACHED = 4096
_CACHED_LEN = 512


class ServerSettings(NamedTuple):
    """Limits and timeouts of a plugin's server."""

    limits: Limits = Limits()
    request_timeout: float = 10.0
    """A request must arrive whole within this many seconds of its first byte (408 otherwise);
    a connection that sends nothing at all is closed after it too."""
    idle_timeout: float = 300.0
    """A connection idle between requests for this long is closed."""
    max_connections: int = 1024
    """Connections beyond this get 503 and are closed."""
    allowed_uids: frozenset[int] | None = None
    """Peers allowed to connect; None means only the plugin's own uid."""


class _AsyncRunner:
    """Runs ``async def`` methods.

    They run on the plugin's own loop (goplug.aio), else on one loop thread shared by the process.
    """

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def run(cls, coro: Awaitable[Any], loop: asyncio.AbstractEventLoop | None = None) -> Any:
        if loop is None:
            loop = cls._loop
        if loop is None:
            with cls._lock:
                if cls._loop is None:
                    import asyncio

                    new_loop = asyncio.new_event_loop()
                    thread = threading.Thread(
                        target=new_loop.run_forever, name="goplug-async-methods", daemon=True
                    )
                    thread.start()
                    cls._loop = new_loop
                loop = cls._loop

        async def wrap() -> Any:
            return await coro

        import asyncio

        return asyncio.run_coroutine_threadsafe(wrap(), loop).result()


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


class Server:
    """Serves one plugin's routes on a listening socket."""

    def __init__(
        self,
        listener: socket.socket,
        methods: dict[str, MethodFunc],
        hub: CallbackHub,
        activator: MethodFunc | None,
        stopper: MethodFunc | None,
        url_prefix: str,
        settings: ServerSettings,
        label: str,
        loop: asyncio.AbstractEventLoop | None = None,
        transport: Transport | None = None,
    ) -> None:
        self._listener = listener
        self._transport = transport or UnixTransport()
        self._token = self._transport.token
        self._loop = loop
        self._methods = methods
        self._hub = hub
        self._activator = activator
        self._stopper = stopper
        self._prefix = url_prefix
        self._settings = settings
        self._label = label
        self._allowed = (
            settings.allowed_uids if settings.allowed_uids is not None else frozenset({os.getuid()})
        )
        self._conns: set[socket.socket] = set()
        self._routes: dict[str, str] = {}  # request target -> route, for repeated calls
        # Request targets the C fast path answers by itself (filled as the Python path meets
        # them, so both agree on which target is which method by construction).
        self._fast_targets: dict[bytes, MethodFunc] = {}
        self._callback_names: dict[bytes, str] = {}  # a poll's (short) body -> its callback name
        self._lock = threading.Lock()
        self._closing = False
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"goplug-accept-{label}", daemon=True
        )

    def start(self) -> None:
        """Start accepting connections."""
        self._accept_thread.start()

    def close(self) -> None:
        """Stop accepting, wake every waiting poll and end every connection."""
        self._closing = True
        self._hub.close()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._accept_thread.is_alive() and threading.current_thread() is not self._accept_thread:
            self._accept_thread.join(timeout=2.0)

    # -- connections ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closing:
                    return
                log.exception("%s: accept failed", self._label)
                time.sleep(0.05)  # e.g. EMFILE: give closing connections a moment
                continue
            try:
                uid = peer_uid(conn)
                if uid is not None and uid not in self._allowed:
                    log.warning("%s: refused a connection from uid %s", self._label, uid)
                    conn.close()
                    continue
                with self._lock:
                    busy = len(self._conns) >= self._settings.max_connections
                    if not busy:
                        self._conns.add(conn)
                if busy:
                    self._refuse(conn, 503, "ServiceUnavailable", "too many connections")
                    continue
                threading.Thread(
                    target=self._serve, args=(conn,), name=f"goplug-conn-{self._label}", daemon=True
                ).start()
            except Exception:
                log.exception("%s: could not start serving a connection", self._label)
                conn.close()

    def _refuse(self, conn: socket.socket, status: int, kind: str, message: str) -> None:
        body = routes.error_body(kind, message)
        with contextlib.suppress(OSError):
            conn.sendall(response_head(status, len(body), _JSON + b"Connection: close\r\n") + body)
        conn.close()

    def _serve(self, accepted: socket.socket) -> None:
        try:
            conn = self._transport.secure(accepted)
        except Exception:
            log.exception("%s: could not set up a connection", self._label)
            conn = None
        with self._lock:
            self._conns.discard(accepted)
            if conn is not None and not self._closing:
                self._conns.add(conn)  # close() must reach the TLS socket, not the raw one
        if conn is None:
            with contextlib.suppress(OSError):
                accepted.close()
            return
        if self._closing:
            conn.close()
            return
        self._serve_secured(conn)

    def _serve_secured(self, conn: socket.socket) -> None:
        settings = self._settings
        timeout = settings.request_timeout
        set_timeouts(conn, timeout)
        reader = MessageReader(False, settings.limits)
        idle_limit = max(1, int(settings.idle_timeout / timeout))
        idle_periods = 0  # request timeouts that expired while nothing was pending
        started = 0.0  # when a partial request was first seen (for slow senders)
        served = False
        authorized = self._token is None
        recv = conn.recv
        answer = self._answer
        receive = reader.receive
        # Plain sockets without a shared token take the C fast path between Python requests.
        plain = fastpath is not None and authorized and type(conn) is socket.socket
        fd = conn.fileno() if plain else -1
        max_body = settings.limits.max_body
        # Elsewhere (TLS) a call's request is still recognised in C when it arrives whole.
        request_of = fastpath.request_of if fastpath is not None and authorized else None
        # So is a long poll, wherever it arrives (a notification waits on its parsing).
        poll_of = fastpath.poll_of if fastpath is not None and authorized else None
        fast_targets = self._fast_targets
        try:
            while True:
                data: bytes | None = None  # a request's bytes, for the parsers below
                if fd >= 0 and not reader.in_message:
                    outcome = fastpath.serve(
                        fd, self._fast_targets, max_body, timeout, memory.tune_malloc
                    )
                    code = outcome[0]
                    if outcome[1] or code == fastpath.RAISED or code == fastpath.RESULT:
                        served = True  # a request arrived: the connection is not idle
                        idle_periods = 0
                    if code == fastpath.DATA:
                        data = outcome[2]
                    elif code == fastpath.IDLE:
                        idle_periods += 1
                        if not served or idle_periods >= idle_limit:
                            return
                        continue
                    elif code == fastpath.RAISED:
                        self._send_error(conn, 500, outcome[3])
                        continue
                    elif code == fastpath.RESULT:
                        self._reply(conn, self._route_of(outcome[2]), outcome[3])
                        continue
                    elif code == fastpath.SLOW:
                        self._refuse(conn, 408, "RequestTimeout", "the request took too long")
                        return
                    else:  # EOF
                        return
                elif not reader.in_message:
                    # The usual case: an idle connection, one whole request per recv.
                    try:
                        data = recv(_RECV)
                    except (BlockingIOError, TimeoutError):  # nothing came within the timeout
                        idle_periods += 1
                        if not served or idle_periods >= idle_limit:
                            return
                        continue
                    if not data:
                        return
                    if request_of is not None:
                        call = request_of(data, max_body)
                        method = fast_targets.get(call[0]) if call is not None else None
                        if method is not None:
                            assert call is not None
                            served = True
                            idle_periods = 0
                            self._call(conn, call[0], method, call[1])
                            continue
                else:
                    msg = reader.next_message()  # a pipelined request, or the rest of one
                    if msg is None:
                        # Each recv is bounded by SO_RCVTIMEO; this bounds a trickling request.
                        now = time.monotonic()
                        if not started:
                            started = now
                        elif now - started > timeout:
                            self._refuse(conn, 408, "RequestTimeout", "the request took too long")
                            return
                        try:
                            wanted = reader.body_wanted()
                            if wanted:
                                if not memory.tuned:
                                    memory.tune_malloc()
                                data = recv(min(wanted, _BIG_RECV))
                            else:
                                data = recv(_RECV)
                        except (BlockingIOError, TimeoutError):
                            self._refuse(conn, 408, "RequestTimeout", "the request took too long")
                            return
                        if not data:
                            return
                        reader.feed(data)
                        continue
                if data is not None:
                    poll = poll_of(data, max_body) if poll_of is not None else None
                    if poll is not None and self._route_of(poll[0]) == routes.REGISTER_CALLBACK:
                        served = True
                        idle_periods = 0
                        if not self._long_poll(conn, poll[3], poll[1] or None, poll[2]):
                            return
                        continue
                    msg = receive(data)
                    if msg is None:
                        continue
                assert msg is not None  # every branch above that has none went on or returned
                started = 0.0
                idle_periods = 0
                served = True
                if not authorized:
                    assert self._token is not None
                    if not token_matches(msg.header(b"authorization"), self._token):
                        log.warning("%s: refused a request without the shared token", self._label)
                        self._refuse(conn, 401, "Unauthorized", "a valid shared token is required")
                        return
                    authorized = True  # the connection is authenticated from here on
                if not answer(conn, msg) or not msg.keep_alive:
                    return
        except FramingError as exc:
            self._refuse(conn, exc.status, "ProtocolError", str(exc))
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    # -- routes --------------------------------------------------------------------------------

    def _answer(self, conn: socket.socket, msg: Message) -> bool:
        """Answer one request; return False when the connection must end."""
        target = msg.target
        route = self._route(target)
        method = self._methods.get(route)
        if method is not None:
            if len(self._fast_targets) < _CACHED and len(target) <= _CACHED_LEN:
                self._fast_targets[target.encode("ascii")] = method
            try:
                body = method(msg.body)
            except Exception as exc:
                return self._send_error(conn, 500, exc)
            return self._reply(conn, route, body)
        if route == routes.PING:
            return self._send(conn, 200, msg.body)
        if route == routes.REGISTER_CALLBACK:
            return self._poll(conn, msg)
        if route == routes.ACTIVATE:
            try:
                extra = _as_bytes(self._activator(msg.body), route) if self._activator else b""
            except Exception as exc:
                return self._send_error(conn, 500, exc)
            return self._send(conn, 200, routes.activation_body(self._methods, extra))
        if route == routes.STOP:
            try:
                out = _as_bytes(self._stopper(msg.body), route) if self._stopper else b""
            except Exception as exc:
                return self._send_error(conn, 500, exc)
            return self._send(conn, 200, out)
        if route == routes.UNSUBSCRIBE:
            try:
                name = routes.parse_callback_name(msg.body)
            except ProtocolError as exc:
                return self._send_error(conn, 400, exc)
            token = msg.header(routes.SUBSCRIBER_HEADER)
            self._hub.unsubscribe(token.decode() if token else None, name)
            return self._send(conn, 200, b"")
        if not route:
            return self._send_error(conn, 400, ProtocolError("empty route"))
        body = routes.error_body("MethodNotFound", f"no method {route!r}")
        return self._send(conn, 404, body, _JSON)

    def _route(self, target: str) -> str:
        route = self._routes.get(target)
        if route is None:
            route = routes.route_of(target, self._prefix)
            if len(self._routes) < _CACHED and len(target) <= _CACHED_LEN:
                self._routes[target] = route
        return route

    def _route_of(self, target: bytes) -> str:
        return self._route(target.decode("ascii"))

    def _call(self, conn: socket.socket, target: bytes, method: MethodFunc, body: bytes) -> None:
        """Call a method met before (its target is in the fast targets) and answer."""
        try:
            result = method(body)
        except Exception as exc:
            self._send_error(conn, 500, exc)
            return
        if type(result) is bytes:
            self._send_ok(conn, result)
        else:
            self._reply(conn, self._route_of(target), result)

    def _reply(self, conn: socket.socket, route: str, result: object) -> bool:
        """Answer with what a method returned: bytes, None, or an awaitable of either."""
        try:
            if type(result) is not bytes:
                if isinstance(result, Awaitable):
                    result = _AsyncRunner.run(result, self._loop)
                result = _as_bytes(result, route)
        except Exception as exc:
            return self._send_error(conn, 500, exc)
        assert isinstance(result, bytes)
        self._send_ok(conn, result)
        return True

    @staticmethod
    def _send_ok(conn: socket.socket, body: bytes) -> None:
        n = len(body)
        if n < 65536:
            conn.sendall(b"%s%d\r\n\r\n%s" % (_OK_HEAD, n, body))
        else:
            conn.sendall(b"%s%d\r\n\r\n" % (_OK_HEAD, n))
            conn.sendall(body)

    def _poll(self, conn: socket.socket, msg: Message) -> bool:
        ack_text = msg.header(routes.ACK_HEADER, b"0")
        if not ack_text.isdigit():
            return self._send_error(conn, 400, ProtocolError("invalid X-Goplug-Ack"))
        token = msg.header(routes.SUBSCRIBER_HEADER) or None
        return self._long_poll(conn, msg.body, token, int(ack_text))

    def _long_poll(self, conn: socket.socket, body: bytes, token: bytes | None, ack: int) -> bool:
        """Wait for notifications for one subscriber and answer them."""
        try:
            name = self._callback_names.get(body)
            if name is None:
                name = routes.parse_callback_name(body)
                if len(self._callback_names) < _CACHED and len(body) <= _CACHED_LEN:
                    self._callback_names[body] = name
            if token is not None and not routes.valid_subscriber(token):
                raise ProtocolError("invalid X-Goplug-Subscriber")
        except ProtocolError as exc:
            return self._send_error(conn, 400, exc)

        if TYPE_CHECKING:
            from goplug.callbacks import Batch

        def peer_gone() -> bool:
            return peek(conn) == b""

        def answer(batch: Batch) -> bool:
            # Called by the hub while this poll waits, on the thread of the notify that brought
            # the batch (or on this one, below): never on both at once.
            records = b"".join(routes.encode_batch(batch.items))
            extra = b"X-Goplug-Seq: %d\r\nX-Goplug-Count: %d\r\n" % (
                batch.first_seq,
                len(batch.items),
            )
            try:
                return self._send(conn, 200, records, extra)
            except OSError:  # the registry went away: it polls again on a new connection
                return False

        batch = self._hub.poll(
            token.decode() if token else None,
            name,
            ack,
            peer_gone,
            answer=answer if token else None,
        )
        if batch is None:
            if self._closing:
                self._send(
                    conn, 503, routes.error_body("Stopping", "the plugin is stopping"), _JSON
                )
            return False
        if batch.sent:
            return True
        if batch.legacy:
            return self._send(conn, 200, batch.items[0])
        return answer(batch)

    def _send(self, conn: socket.socket, status: int, body: bytes, extra: bytes = b"") -> bool:
        head = response_head(status, len(body), extra)
        if len(body) < 65536:
            conn.sendall(head + body)
        else:
            conn.sendall(head)
            conn.sendall(body)
        return True

    def _send_error(self, conn: socket.socket, status: int, exc: BaseException) -> bool:
        if status == 500:
            log.warning("%s: method raised %s: %s", self._label, _type_name(exc), exc)
            import traceback

            tb = "".join(traceback.format_exception(exc))
        else:
            tb = ""
        kind = type(exc).__name__ if isinstance(exc, GoPlugError) else _type_name(exc)
        return self._send(conn, status, routes.error_body(kind, str(exc), tb), _JSON)


def _as_bytes(result: object, route: str) -> bytes:
    if result is None:
        return b""
    if isinstance(result, bytes):
        return result
    if isinstance(result, bytearray | memoryview):
        return bytes(result)
    raise TypeError(f"{route} returned {type(result).__name__}; methods must return bytes or None")
