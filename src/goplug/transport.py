"""How bytes move between a registry and a plugin: the :class:`Transport` interface.

Both sides ask a transport for a listening or a connected socket and then only call
``recv``/``sendall`` on it. :class:`UnixTransport` (here) serves plugins on this host;
:class:`goplug.tls.TcpTransport` serves plugins on other hosts (TCP with mutual TLS). Which one
a registry uses for a plugin follows the scheme of the plugin's ``Url``
(:func:`goplug.registry.transport_for`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
import sys
from collections.abc import Callable
from typing import Any, Protocol

from goplug.errors import ConfigError, PluginAlreadyRunning, PluginConnectionError
from goplug.logs import LazyLogger

__all__ = [
    "MAX_UNIX_PATH",
    "Transport",
    "UnixTransport",
    "check_owner",
    "fastpath",
    "listening",
    "peek",
    "peer_pid",
    "peer_uid",
    "set_timeouts",
    "socket_path_for",
    "token_header",
    "token_matches",
]

log = LazyLogger("goplug.transport")

# sun_path holds 108 bytes on Linux and 104 on macOS, including the terminating NUL.
MAX_UNIX_PATH = 103 if sys.platform == "darwin" else 107

_UCRED = struct.Struct("3i")

# The C fast path of a call (goplug/_fastpath.c) serves plain sockets; TLS sockets and
# installs built without a compiler take the pure-Python path, as does GOPLUG_PURE_PYTHON=1.
try:
    if os.environ.get("GOPLUG_PURE_PYTHON", "") == "1":
        raise ImportError("GOPLUG_PURE_PYTHON=1")
    from goplug import _fastpath as fastpath
except ImportError:
    fastpath = None  # type: ignore[assignment]


class Transport(Protocol):
    """What the client and the server need from a transport."""

    token: str | None
    """A shared secret every request carries (plaintext TCP on loopback), else None."""

    def connect(self, address: str, timeout: float) -> socket.socket:
        """Return a blocking socket connected to ``address``; raise PluginConnectionError."""
        ...

    async def connect_async(
        self, loop: Any, factory: Any, address: str, timeout: float
    ) -> tuple[Any, Any]:
        """Open an asyncio connection to ``address`` (a transport and ``factory()``'s protocol)."""
        ...

    def secure(self, conn: socket.socket) -> socket.socket | None:
        """Prepare an accepted connection on the plugin's side (e.g. a TLS handshake).

        Runs in the connection's own thread; returns None when the peer is refused.
        """
        ...

    def listen(self, address: str, backlog: int) -> socket.socket:
        """Return a listening socket bound to ``address``; raise PluginAlreadyRunning if taken."""
        ...

    def unlink(self, address: str) -> None:
        """Remove what :meth:`listen` left at ``address``."""
        ...


def socket_path_for(wanted: str) -> str:
    """Return ``wanted`` if it fits in a socket address, else a short path this user owns.

    The short path is ``$TMPDIR/goplug-<uid>/<hash of wanted>.sock`` in a directory created 0700;
    the hash keeps it stable for the same wanted path, so a restarted plugin finds its old socket.
    """
    if len(os.fsencode(wanted)) <= MAX_UNIX_PATH:
        return wanted
    import hashlib
    import tempfile

    base = os.path.join(tempfile.gettempdir(), f"goplug-{os.getuid()}")
    os.makedirs(base, mode=0o700, exist_ok=True)
    info = os.lstat(base)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(f"{base} must be a directory owned by uid {os.getuid()} with mode 0700")
    digest = hashlib.sha256(os.fsencode(wanted)).hexdigest()[:24]
    return os.path.join(base, f"{digest}.sock")


def token_header(token: str | None) -> bytes:
    """The header line every request carries when a shared token is in use (else nothing)."""
    return b"Authorization: Bearer %s\r\n" % token.encode("ascii") if token else b""


def token_matches(value: bytes, token: str) -> bool:
    """Compare an ``Authorization`` value with ``Bearer <token>`` in constant time."""
    import hmac

    return hmac.compare_digest(value, b"Bearer " + token.encode("ascii"))


def set_timeouts(sock: socket.socket, seconds: float) -> None:
    """Bound every receive and send on ``sock`` to ``seconds`` (0: no bound).

    Kernel timeouts (SO_RCVTIMEO/SO_SNDTIMEO) on a blocking socket keep each recv and send one
    system call, where Python's own socket timeout adds a poll() before each; an expired one
    raises BlockingIOError. A TLS socket would retry a kernel timeout forever inside OpenSSL's
    read loop, so it gets Python's timeout instead (an expired one raises TimeoutError).
    """
    if isinstance(sock, _ssl_socket_type()):
        sock.settimeout(seconds or None)
        return
    whole = int(seconds)
    tv = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _ssl_socket_type() -> type:
    ssl = sys.modules.get("ssl")  # a TLS socket exists only if ssl was imported
    return ssl.SSLSocket if ssl is not None else type(None)


def listening(
    sock: socket.socket,
    bind_to: str | tuple[str, int],
    address: str,
    backlog: int,
    after_bind: Callable[[], object] | None = None,
) -> socket.socket:
    """Bind ``sock`` and listen; on failure close it and raise goplug's error for ``address``."""
    try:
        sock.bind(bind_to)
        if after_bind is not None:
            after_bind()
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PluginAlreadyRunning(f"{address} is already in use") from None
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}") from None
    return sock


def peek(sock: socket.socket) -> bytes | None:
    """Look at an idle connection without blocking: None (nothing), b"" (closed) or bytes.

    Looks at the raw socket under a TLS layer too, where a plain ``recv`` cannot peek.
    """
    try:
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def peer_uid(sock: socket.socket) -> int | None:
    """Return the uid of the process at the other end of a Unix socket, if the OS tells."""
    if sys.platform.startswith("linux") and sock.family == socket.AF_UNIX:
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        return int(_UCRED.unpack(data)[1])
    return None


def peer_pid(sock: socket.socket) -> int | None:
    """Return the pid of the process that set up the other end of a Unix socket, if known."""
    if sys.platform.startswith("linux") and sock.family == socket.AF_UNIX:
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        return int(_UCRED.unpack(data)[0])
    return None


def check_owner(path: str, allowed_uids: frozenset[int], what: str, want_socket: bool) -> None:
    """Refuse a file that an untrusted user could have planted or could change.

    The file must be owned by an allowed uid, not writable by everybody, and of the right kind (a
    socket, or a regular file that is not a symlink).
    """
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None
    if want_socket and not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"{what} {path} is not a socket")
    if not want_socket and not stat.S_ISREG(info.st_mode):
        kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a regular file"
        raise ConfigError(f"{what} {path} is {kind}")
    if info.st_uid not in allowed_uids:
        raise ConfigError(f"{what} {path} is owned by uid {info.st_uid}, which is not allowed")
    if info.st_mode & 0o002:
        raise ConfigError(f"{what} {path} is writable by every user")


class UnixTransport:
    """Unix domain stream sockets named by a file system path."""

    token: str | None = None

    def connect(self, address: str, timeout: float) -> socket.socket:
        """Connect to the plugin socket at ``address``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.settimeout(None)
        except OSError as exc:
            sock.close()
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise PluginConnectionError(f"cannot connect to {address}: {reason}") from None
        return sock

    async def connect_async(
        self, loop: Any, factory: Any, address: str, timeout: float
    ) -> tuple[Any, Any]:
        """Connect to the plugin socket at ``address`` from an event loop."""
        import asyncio

        try:
            return await asyncio.wait_for(loop.create_unix_connection(factory, address), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise PluginConnectionError(
                f"cannot connect to {address}: {exc or 'timed out'}"
            ) from None

    def secure(self, conn: socket.socket) -> socket.socket | None:
        """Nothing to do: the server checks the peer's uid when it accepts."""
        return conn

    def listen(self, address: str, backlog: int) -> socket.socket:
        """Listen at ``address``, taking over a stale socket file but never a live one."""
        if os.path.lexists(address):
            if not stat.S_ISSOCK(os.lstat(address).st_mode):
                raise ConfigError(f"{address} exists and is not a socket; refusing to replace it")
            if self.is_listening(address):
                raise PluginAlreadyRunning(f"a live plugin already listens on {address}")
            log.info("removing stale socket %s", address)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Before listen() nobody can connect, so 0600 is in force from the first accept.
        return listening(sock, address, address, backlog, lambda: os.chmod(address, 0o600))

    def unlink(self, address: str) -> None:
        """Remove the socket file."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)

    @staticmethod
    def is_listening(address: str, timeout: float = 1.0) -> bool:
        """Tell whether some process accepts connections at ``address``."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(timeout)
        try:
            probe.connect(address)
        except OSError:
            return False
        finally:
            probe.close()
        return True
