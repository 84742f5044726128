"""TLS rows: round trips over TCP on loopback (127.0.0.1) with mutual TLS.

Every side presents a certificate from the run's CA (``common.write_certs``: trustme, ECDSA
P-256) and every server requires the client's. Connections are opened once, before the loop,
and kept alive: a new mutual-TLS connection costs a handshake worth hundreds of round trips
(``raw-tls-64B-1`` measures it: ``tls_connect_p50_us`` against ``tcp_connect_p50_us``).

- ``raw-tls``: ``raw-uds``'s length-prefixed echo (same server loop, same client) with each
  connection wrapped in ``ssl``: a thread-per-connection server on 127.0.0.1 and one
  connection per caller, TCP_NODELAY on both ends.
- ``grpc-tls``: ``grpc-uds``'s unary bytes->bytes echo over TCP, ``grpc.ssl_server_credentials``
  with ``require_client_auth=True`` and ``grpc.ssl_channel_credentials`` with the client's
  certificate; one channel shared by the callers.
- ``goplug-tls``: ``handle.execute("Echo", payload)`` through ``goplug.PluginRegistry(dir,
  tls=TLSConfig(...))`` on ``plugins/tls_plugin.py`` (``Plugin(..., url="tcp://127.0.0.1:0",
  tls=TLSConfig(...))``): discovery through a directory, calls over TLS (``Url https://...``).

The module is also the reference servers' entry point: ``python tls_rows.py serve {raw,grpc}
CERTDIR`` prints ``ready PORT`` (raw: ``ready TLSPORT TCPPORT``, the second a plaintext twin for
the connect figures) once it listens, and serves until SIGTERM or until its parent goes away.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from common import (
    HERE,
    Procs,
    RowContext,
    Skip,
    affinity_note,
    budget_for,
    exited,
    has_certs,
    latency_summary,
    make_payload,
    measure_threads,
    temp_dir,
    wait_ready_line,
    wait_until,
    write_certs,
)
from reference import (
    GRPC_OPTIONS,
    HEADER,
    RawClient,
    _exit_with_parent,
    _raw_serve_conn,
    measure_grpc_echo,
)

TLS_PLUGIN = os.path.join(HERE, "plugins", "tls_plugin.py")
NAMESPACE = "Bench"  # tls_plugin.py's namespace
LOOPBACK = "127.0.0.1"
clock = time.perf_counter_ns


# =========================================================================== certificates


@contextlib.contextmanager
def cert_dir(ctx: RowContext) -> Iterator[str]:
    """The run's certificates (``--certs``, made once by run.py), or a set of the row's own."""
    if has_certs(ctx.certs):
        yield ctx.certs
        return
    with temp_dir("gpb-certs-") as d:
        write_certs(d)
        yield d


def _path(certs: str, name: str) -> str:
    return os.path.join(certs, name)


def server_context(certs: str) -> ssl.SSLContext:
    """TLS 1.2+ (1.3 negotiated), the server's certificate, a client certificate required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(_path(certs, "ca.pem"))
    ctx.load_cert_chain(_path(certs, "plugin.pem"), _path(certs, "plugin.key"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0  # no resumption: every connection is a full handshake, as in goplug
    return ctx


def client_context(certs: str) -> ssl.SSLContext:
    """TLS 1.2+, the server's certificate checked against the CA and 127.0.0.1, our own sent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(_path(certs, "ca.pem"))
    ctx.load_cert_chain(_path(certs, "registry.pem"), _path(certs, "registry.key"))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def goplug_tls_config(goplug: Any, certs: str) -> Any:
    """The registry's side: ``goplug.TLSConfig`` with the client certificate."""
    return goplug.TLSConfig(
        ca=_path(certs, "ca.pem"),
        cert=_path(certs, "registry.pem"),
        key=_path(certs, "registry.key"),
    )


# =========================================================================== servers


def _listen() -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((LOOPBACK, 0))
    srv.listen(64)
    return srv


def serve_raw_tls(certs: str) -> None:
    """raw-uds's echo behind mutual TLS; a plaintext twin on a second port (connect figures)."""
    ctx = server_context(certs)
    tls_srv, tcp_srv = _listen(), _listen()

    def handle(conn: socket.socket, secure: bool) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if secure:
            try:
                conn = ctx.wrap_socket(conn, server_side=True)
            except (OSError, ValueError):
                conn.close()
                return
        _raw_serve_conn(conn)

    def accept(srv: socket.socket, secure: bool) -> None:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=handle, args=(conn, secure), daemon=True).start()

    threading.Thread(target=accept, args=(tcp_srv, False), daemon=True).start()
    _ready(tls_srv.getsockname()[1], tcp_srv.getsockname()[1])
    accept(tls_srv, True)


def serve_grpc_tls(certs: str) -> None:
    from concurrent import futures

    import grpc

    def read(name: str) -> bytes:
        with open(_path(certs, name), "rb") as f:
            return f.read()

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, _ctx: req)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [(read("plugin.key"), read("plugin.pem"))],
        root_certificates=read("ca.pem"),
        require_client_auth=True,
    )
    port = server.add_secure_port(f"{LOOPBACK}:0", creds)
    server.start()
    _ready(port)
    server.wait_for_termination()


def _ready(*ports: int) -> None:
    sys.stdout.write("ready " + " ".join(str(p) for p in ports) + "\n")
    sys.stdout.flush()


def _start_server(procs: Procs, kind: str, certs: str) -> list[int]:
    proc = procs.spawn(
        [sys.executable, os.path.abspath(__file__), "serve", kind, certs], stdout_pipe=True
    )
    return [int(p) for p in wait_ready_line(procs, proc).split()[1:]]


# =========================================================================== raw-tls


def _connect(port: int, ctx: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ctx is None:
        return sock
    try:
        return ctx.wrap_socket(sock, server_hostname=LOOPBACK)
    except BaseException:
        sock.close()
        raise


def _connect_times(port: int, ctx: ssl.SSLContext | None, frame: bytes, n: int) -> list[int]:
    """connect (+ handshake) + the first round trip of a new connection, ``n`` times.

    With TLS 1.3 the client is done with the handshake before the server has checked the
    client's certificate: the first answer is what says the connection is usable."""
    times = []
    for _ in range(n):
        t0 = clock()
        client = RawClient(_connect(port, ctx), len(frame) - 4)
        try:
            client.check(frame)
            times.append(clock() - t0)
        finally:
            client.close()
    return times


def rtt_raw_tls(ctx: RowContext) -> dict[str, Any]:
    payload = make_payload(ctx.size)
    frame = HEADER.pack(len(payload)) + payload
    with cert_dir(ctx) as certs, Procs() as procs:
        tls_port, tcp_port = _start_server(procs, "raw", certs)
        cctx = client_context(certs)
        clients: list[RawClient] = []
        try:
            for _ in range(ctx.callers):
                clients.append(RawClient(_connect(tls_port, cctx), ctx.size))
            for c in clients:
                c.check(frame)
            m = measure_threads([c.caller(frame) for c in clients], _budget(ctx))
        finally:
            for c in clients:
                c.close()
        summary = m.summary(ctx.size)
        summary["notes"].append(f"{ssl.OPENSSL_VERSION}, one kept-alive connection per caller")
        if ctx.payload == "64B" and ctx.callers == 1:
            # What keeping connections alive saves: a new connection to its first answer.
            n = 5 if ctx.quick else 30
            small = HEADER.pack(64) + make_payload(64)
            tls_times = _connect_times(tls_port, cctx, small, n)
            tcp_times = _connect_times(tcp_port, None, small, n)
            summary["tls_connect_p50_us"] = latency_summary(tls_times)["p50_us"]
            summary["tcp_connect_p50_us"] = latency_summary(tcp_times)["p50_us"]
        return _finish(ctx, procs, summary)


# =========================================================================== grpc-tls


def rtt_grpc_tls(ctx: RowContext) -> dict[str, Any]:
    try:
        import grpc
    except ImportError as exc:
        raise Skip(f"grpcio not importable: {exc}") from exc
    payload = make_payload(ctx.size)
    with cert_dir(ctx) as certs, Procs() as procs:
        (port,) = _start_server(procs, "grpc", certs)

        def read(name: str) -> bytes:
            with open(_path(certs, name), "rb") as f:
                return f.read()

        creds = grpc.ssl_channel_credentials(
            root_certificates=read("ca.pem"),
            private_key=read("registry.key"),
            certificate_chain=read("registry.pem"),
        )
        channel = grpc.secure_channel(f"{LOOPBACK}:{port}", creds, options=GRPC_OPTIONS)
        summary = measure_grpc_echo(ctx, channel, payload)
        summary["notes"].append(f"grpcio {grpc.__version__}, one channel, mutual TLS")
        return _finish(ctx, procs, summary)


# =========================================================================== goplug-tls


def goplug_with_tls() -> Any:
    """goplug, if it has the TCP + mutual TLS API; else :class:`Skip` saying what is missing."""
    try:
        import goplug
    except Exception as exc:
        raise Skip(f"goplug not importable ({type(exc).__name__}: {exc})") from exc
    if not hasattr(goplug, "TLSConfig"):
        raise Skip("this goplug has no TLSConfig")
    for cls in (goplug.Plugin, goplug.PluginRegistry):
        if "tls" not in inspect.signature(cls).parameters:
            raise Skip(f"this goplug's {cls.__name__} takes no tls=")
    return goplug


def announced_url(path: str) -> str:
    with open(path, encoding="utf-8-sig") as f:
        obj = json.load(f)
    return str({str(k).lower(): v for k, v in obj.items()}.get("url") or "")


def rtt_goplug_tls(ctx: RowContext) -> dict[str, Any]:
    """goplug-tls-*: ``handle.execute("Echo", payload)`` over TCP + mutual TLS; 8 callers are 8
    threads sharing one handle."""
    goplug = goplug_with_tls()
    from goplug_rows import _sync_rtt

    payload = make_payload(ctx.size)
    with temp_dir() as d, cert_dir(ctx) as certs, Procs() as procs:
        proc = procs.spawn([sys.executable, TLS_PLUGIN, d, "echo", certs])
        found = wait_until(
            lambda: [n for n in os.listdir(d) if n.endswith(".pconf")],
            20.0,
            "tls_plugin.py's .pconf",
            alive=exited(procs, proc),
        )
        url = announced_url(os.path.join(d, found[0]))
        if not url.startswith(f"https://{LOOPBACK}:"):
            raise RuntimeError(f"the plugin announced {url!r}, not https://{LOOPBACK}:PORT")
        with goplug.PluginRegistry(d, tls=goplug_tls_config(goplug, certs)) as reg:
            summary = _sync_rtt(ctx, procs, reg, "echo", NAMESPACE, payload)
    summary["notes"].append(f"plugin at {url}")
    return summary


# =========================================================================== helpers


def _budget(ctx: RowContext) -> Any:
    return budget_for(ctx.payload, ctx.quick)


def _finish(ctx: RowContext, procs: Procs, summary: dict[str, Any]) -> dict[str, Any]:
    if ctx.pinned:
        note = affinity_note(procs.pids(), ctx.core)
        if note:
            summary["notes"].append(note)
    return summary


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "serve" or argv[1] not in ("raw", "grpc"):
        print("usage: tls_rows.py serve {raw,grpc} CERTDIR", file=sys.stderr)
        return 2
    _exit_with_parent()
    {"raw": serve_raw_tls, "grpc": serve_grpc_tls}[argv[1]](argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
