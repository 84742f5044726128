"""Reference rows: what goplug's figures are measured against, in the same run.

- ``raw-uds``: length-prefixed echo on a Unix socket. The server is thread-per-connection; both
  sides read header and body with as few ``recv_into`` calls as possible into reused buffers
  (one call for a small message) and send each message with one ``sendall``. The server echoes
  the received frame from its buffer; the client sends a frame built once and does not copy the
  answer out of its buffer. This is the floor for a Python round trip.
- ``grpc-uds``: grpcio unary bytes->bytes over a Unix socket, generic handlers, no protoc, the
  identity (de)serializers (``None``), one channel shared by all callers.
- ``stdlib-http``: ``http.client`` against ``http.server.ThreadingHTTPServer``, HTTP/1.1
  keep-alive, one connection per caller.
- ``python-floor-cold-start``: spawn ``floor_server.py`` (stdlib only) with ``sys.executable``
  and make its first round trip.

The module is also the servers' entry point: ``python reference.py serve {raw,http,grpc} SOCK``
prints ``ready`` once it listens and serves until SIGTERM (or until its parent goes away).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from common import (
    CHUNK,
    HERE,
    Budget,
    Procs,
    RowContext,
    Skip,
    affinity_note,
    budget_for,
    latency_summary,
    make_payload,
    measure_tasks,
    measure_threads,
    pyc_env,
    run_async,
    temp_dir,
    wait_ready_line,
)

HEADER = struct.Struct(">I")
GRPC_METHOD = "/bench.Echo/Echo"
GRPC_MAX = 64 * 1024 * 1024 + 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", GRPC_MAX),
    ("grpc.max_receive_message_length", GRPC_MAX),
]
FLOOR_SCRIPT = os.path.join(HERE, "floor_server.py")


# =========================================================================== raw-uds


def _raw_serve_conn(conn: socket.socket) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    recv_into = conn.recv_into
    sendall = conn.sendall
    unpack_from = HEADER.unpack_from
    try:
        while True:
            got = recv_into(view, CHUNK)
            if not got:
                return
            while got < 4:
                more = recv_into(view[got:CHUNK])
                if not more:
                    return
                got += more
            total = 4 + unpack_from(buf)[0]
            if total > len(buf):
                bigger = bytearray(total)
                bigger[:got] = view[:got]
                buf = bigger
                view = memoryview(buf)
            while got < total:
                more = recv_into(view[got:total])
                if not more:
                    return
                got += more
            sendall(view[:total])
    except OSError:
        return
    finally:
        conn.close()


def serve_raw(path: str) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    _ready()
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_raw_serve_conn, args=(conn,), daemon=True).start()


class RawClient:
    """One connection: each call sends a prebuilt frame, reads the echo into a reused buffer."""

    def __init__(self, path: str | socket.socket, size: int) -> None:
        if isinstance(path, socket.socket):  # a connected socket (raw-tls: an SSLSocket)
            self.sock = path
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(path)
        self.buf = bytearray(max(CHUNK, 4 + size))
        self.view = memoryview(self.buf)

    def caller(self, frame: bytes) -> Callable[[], int]:
        sendall = self.sock.sendall
        recv_into = self.sock.recv_into
        view = self.view
        buf = self.buf
        unpack_from = HEADER.unpack_from

        def call() -> int:
            sendall(frame)
            got = recv_into(view, CHUNK)
            while got < 4:
                more = recv_into(view[got:CHUNK])
                if not more:
                    raise ConnectionError("server closed")
                got += more
            total = 4 + unpack_from(buf)[0]
            while got < total:
                more = recv_into(view[got:total])
                if not more:
                    raise ConnectionError("server closed")
                got += more
            return total - 4

        return call

    def check(self, frame: bytes) -> None:
        n = self.caller(frame)()
        if n != len(frame) - 4 or self.view[: len(frame)] != frame:
            raise RuntimeError("raw echo returned different bytes")

    def close(self) -> None:
        self.sock.close()


def rtt_raw(ctx: RowContext) -> dict[str, Any]:
    payload = make_payload(ctx.size)
    frame = HEADER.pack(len(payload)) + payload
    with temp_dir() as d, Procs() as procs:
        sock = os.path.join(d, "raw.sock")
        _start_server(procs, "raw", sock)
        clients = [RawClient(sock, ctx.size) for _ in range(ctx.callers)]
        try:
            for c in clients:
                c.check(frame)
            m = measure_threads([c.caller(frame) for c in clients], _budget(ctx))
        finally:
            for c in clients:
                c.close()
        return _finish(ctx, procs, m.summary(ctx.size))


# =========================================================================== raw-aio


class _RawAioProtocol(asyncio.BufferedProtocol):
    """The raw-uds exchange on an event loop: each answer lands in one reused buffer."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(max(CHUNK, 4 + size))
        self.view = memoryview(self.buf)
        self.got = 0
        self.waiter: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.got :]

    def buffer_updated(self, nbytes: int) -> None:
        self.got += nbytes
        if self.got >= 4:
            total = 4 + HEADER.unpack_from(self.buf)[0]
            if self.got >= total:
                waiter, self.waiter, self.got = self.waiter, None, 0
                if waiter is not None and not waiter.done():
                    waiter.set_result(total - 4)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("server closed"))


def rtt_raw_aio(ctx: RowContext) -> dict[str, Any]:
    """raw-aio: the raw-uds server, asyncio clients (one connection and task per caller)."""
    payload = make_payload(ctx.size)
    frame = HEADER.pack(len(payload)) + payload

    async def measure(sock: str) -> Any:
        loop = asyncio.get_running_loop()
        calls = []
        transports = []
        for _ in range(ctx.callers):
            transport, proto = await loop.create_unix_connection(
                lambda: _RawAioProtocol(ctx.size), sock
            )
            transports.append(transport)

            async def call(proto: _RawAioProtocol = proto, transport: Any = transport) -> int:
                proto.waiter = loop.create_future()
                transport.write(frame)
                return await proto.waiter

            if await call() != len(payload) or proto.view[: len(frame)] != frame:
                raise RuntimeError("raw echo returned different bytes")
            calls.append(call)
        try:
            return await measure_tasks(calls, _budget(ctx))
        finally:
            for transport in transports:
                transport.close()

    with temp_dir() as d, Procs() as procs:
        sock = os.path.join(d, "raw.sock")
        _start_server(procs, "raw", sock)
        m = run_async(measure(sock), ctx.aio_loop)
        summary = _finish(ctx, procs, m.summary(ctx.size))
    summary["notes"].append(f"event loop: {ctx.aio_loop}")
    return summary


# =========================================================================== stdlib-http


def serve_http(path: str) -> None:
    import http.server
    import socketserver

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def address_string(self) -> str:
            return "unix"

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class UnixThreadingHTTPServer(http.server.ThreadingHTTPServer):
        address_family = socket.AF_UNIX

        def server_bind(self) -> None:
            socketserver.TCPServer.server_bind(self)
            self.server_name = "localhost"
            self.server_port = 0

    server = UnixThreadingHTTPServer(path, Handler)
    _ready()
    server.serve_forever()


def _http_connection(path: str) -> Any:
    import http.client

    class UnixHTTPConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            self.sock = sock

    return UnixHTTPConnection("localhost")


def rtt_http(ctx: RowContext) -> dict[str, Any]:
    payload = make_payload(ctx.size)
    with temp_dir() as d, Procs() as procs:
        sock = os.path.join(d, "http.sock")
        _start_server(procs, "http", sock)
        conns = [_http_connection(sock) for _ in range(ctx.callers)]

        def caller(conn: Any) -> Callable[[], bytes]:
            def call() -> bytes:
                conn.request("POST", "/Echo", body=payload)
                resp = conn.getresponse()
                data: bytes = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                return data

            return call

        try:
            calls = [caller(c) for c in conns]
            for call in calls:
                if call() != payload:
                    raise RuntimeError("http echo returned different bytes")
            m = measure_threads(calls, _budget(ctx))
        finally:
            for c in conns:
                c.close()
        return _finish(ctx, procs, m.summary(ctx.size))


# =========================================================================== grpc-uds


def serve_grpc(path: str) -> None:
    from concurrent import futures

    import grpc

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, _ctx: req)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port("unix:" + path)
    server.start()
    _ready()
    server.wait_for_termination()


def measure_grpc_echo(ctx: RowContext, channel: Any, payload: bytes) -> dict[str, Any]:
    """Round trips of ``payload`` through the echo method on ``channel`` (closed after)."""
    try:
        # None is grpc's identity serializer: bytes go through untouched.
        echo = channel.unary_unary(
            GRPC_METHOD,
            request_serializer=None,
            response_deserializer=None,
            _registered_method=False,
        )

        def call() -> bytes:
            out: bytes = echo(payload)
            return out

        if call() != payload:
            raise RuntimeError("grpc echo returned different bytes")
        m = measure_threads([call] * ctx.callers, _budget(ctx))
    finally:
        channel.close()
    return m.summary(ctx.size)


def rtt_grpc(ctx: RowContext) -> dict[str, Any]:
    try:
        import grpc
    except ImportError as exc:
        raise Skip(f"grpcio not importable: {exc}") from exc
    payload = make_payload(ctx.size)
    with temp_dir() as d, Procs() as procs:
        sock = os.path.join(d, "grpc.sock")
        _start_server(procs, "grpc", sock)
        channel = grpc.insecure_channel("unix:" + sock, options=GRPC_OPTIONS)
        summary = measure_grpc_echo(ctx, channel, payload)
        summary["notes"].append(f"grpcio {grpc.__version__}, one channel")
        return _finish(ctx, procs, summary)


# =========================================================================== python floor


def floor_cold_start(ctx: RowContext) -> dict[str, Any]:
    """Spawn the minimal stdlib server, wait for its ready line, make one 64 B round trip.

    One unmeasured spawn first warms the page cache and the bytecode cache, as the goplug
    cold-start row does (see common.pyc_env).
    """
    samples = 3 if ctx.quick else 15
    frame = HEADER.pack(64) + make_payload(64)
    spawn_to_answer: list[int] = []
    interpreter: list[int] = []
    with temp_dir() as d, temp_dir("gpb-pyc-") as cache, Procs() as procs:
        env = pyc_env(cache)
        for i in range(samples + 1):
            sock_path = os.path.join(d, f"floor{i}.sock")
            t0 = time.perf_counter_ns()
            proc = procs.spawn([sys.executable, FLOOR_SCRIPT, sock_path], env=env, stdout_pipe=True)
            wait_ready_line(procs, proc)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(sock_path)
                s.sendall(frame)
                got = b""
                while len(got) < len(frame):
                    chunk = s.recv(CHUNK)
                    if not chunk:
                        raise RuntimeError("floor server closed early")
                    got += chunk
            if i:
                spawn_to_answer.append(time.perf_counter_ns() - t0)
            if got != frame:
                raise RuntimeError("floor server answered different bytes")
            procs.stop(proc)
            time.sleep(0.05)
        for _ in range(samples):
            t0 = time.perf_counter_ns()
            subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
            interpreter.append(time.perf_counter_ns() - t0)
    summary = latency_summary(spawn_to_answer)
    summary["interpreter_p50_us"] = latency_summary(interpreter)["p50_us"]
    summary["notes"] = [
        f"{samples} spawns after one warm-up spawn; interpreter_p50_us: `python -c pass` alone"
    ]
    return _finish(ctx, procs, summary)


# =========================================================================== helpers


def _budget(ctx: RowContext) -> Budget:
    return budget_for(ctx.payload, ctx.quick)


def _start_server(procs: Procs, kind: str, sock: str) -> None:
    proc = procs.spawn(
        [sys.executable, os.path.abspath(__file__), "serve", kind, sock], stdout_pipe=True
    )
    wait_ready_line(procs, proc)


def _finish(ctx: RowContext, procs: Procs, summary: dict[str, Any]) -> dict[str, Any]:
    if ctx.pinned:
        note = affinity_note(procs.pids(), ctx.core)
        if note:
            summary["notes"].append(note)
    return summary


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def _exit_with_parent() -> None:
    """Servers end themselves if the worker that started them disappears."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "serve" or argv[1] not in ("raw", "http", "grpc"):
        print("usage: reference.py serve {raw,http,grpc} SOCKET", file=sys.stderr)
        return 2
    _exit_with_parent()
    {"raw": serve_raw, "http": serve_http, "grpc": serve_grpc}[argv[1]](argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
