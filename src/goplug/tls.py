"""TCP between hosts: mutual TLS (:class:`TLSConfig`), or plaintext on loopback with a token.

A plugin on another host listens on TCP and announces ``Url = https://host:port``; the registry
connects with TLS, presents its own certificate and checks the plugin's against the same CA, and
the plugin refuses any client without a certificate from that CA. Plaintext ``http://`` is only
for loopback, only when both sides ask for it (``insecure_loopback=True``), and only with a
shared token that every request carries: it is the fallback where Unix sockets are missing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from goplug.errors import ConfigError, PluginConnectionError
from goplug.logs import LazyLogger
from goplug.transport import listening

__all__ = [
    "TLSConfig",
    "TcpTransport",
    "dev_configs",
    "is_loopback",
    "make_dev_certs",
    "parse_tcp_url",
]

log = LazyLogger("goplug.tls")

PEM = str | bytes | os.PathLike[str]
"""A file path (``str`` or path object), or PEM text given as ``bytes``."""


@dataclass(frozen=True)
class TLSConfig:
    """Certificates for mutual TLS: the CA both sides trust, and this side's own certificate.

    Each of ``ca``, ``cert`` and ``key`` is a file path, or the PEM text itself as ``bytes``.
    ``server_name`` is the name the plugins' certificates are checked against; by default the
    host in the plugin's ``Url`` (so a plugin announcing ``https://10.0.0.5:7000`` needs a
    certificate naming ``10.0.0.5``). ``client_names``, on a plugin's side, narrows who may
    call it from "any certificate from the CA" to certificates naming one of these (for example
    the registries' name, so that a plugin host's own certificate cannot call other plugins).
    ``goplug tls init DIR`` makes a development set.
    """

    ca: PEM
    """The certificate authority (PEM) that signs every certificate of this deployment."""
    cert: PEM
    """This side's certificate chain (PEM)."""
    key: PEM
    """This side's private key (PEM)."""
    server_name: str | None = None
    """Check plugin certificates against this name instead of the host of their ``Url``."""
    client_names: frozenset[str] | None = None
    """A plugin accepts only client certificates naming one of these (None: any from the CA)."""

    def pem(self) -> tuple[bytes, bytes, bytes]:
        """Return (CA, certificate, key) as PEM bytes, reading files where paths were given."""
        return (_read_pem(self.ca, "ca"), _read_pem(self.cert, "cert"), _read_pem(self.key, "key"))

    def server_context(self) -> ssl.SSLContext:
        """A context for a plugin: TLS 1.2+, a client certificate signed by the CA required."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
        # No session tickets: connections are long-lived, and a ticket arriving after the
        # handshake would look like unsolicited bytes on an idle connection.
        with contextlib.suppress(AttributeError, ValueError):
            ctx.num_tickets = 0
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A context for a registry: TLS 1.2+, the plugin's certificate checked against the CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(ctx)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def _load(self, ctx: ssl.SSLContext) -> None:
        ca, cert, key = self.pem()
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            raise ConfigError(f"TLS: the CA is not a valid PEM certificate: {exc}") from None
        # load_cert_chain reads files only: hand it private temporary copies.
        with tempfile.TemporaryDirectory(prefix="goplug-tls-") as tmp:
            cert_path = os.path.join(tmp, "cert.pem")
            key_path = os.path.join(tmp, "key.pem")
            for path, data in ((cert_path, cert), (key_path, key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            try:
                ctx.load_cert_chain(cert_path, key_path)
            except ssl.SSLError as exc:
                raise ConfigError(
                    f"TLS: the certificate and key do not load or do not match: {exc}"
                ) from None


def _read_pem(value: PEM, what: str) -> bytes:
    if isinstance(value, bytes):
        data = value
    else:
        try:
            with open(os.fspath(value), "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ConfigError(f"TLS {what} {os.fspath(value)}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"TLS {what}: not PEM (no '-----BEGIN' line)")
    return data


def parse_tcp_url(url: str) -> tuple[str, str, int]:
    """Split ``tcp://host:port``, ``https://host:port`` or ``http://host:port``.

    Returns (scheme, host, port); IPv6 hosts come without brackets.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid address {url!r}: {exc}") from None
    if parts.scheme not in ("tcp", "https", "http") or not parts.hostname or port is None:
        raise ConfigError(f"invalid address {url!r}: expected tcp://HOST:PORT (port 0: any)")
    return parts.scheme, parts.hostname, port


def is_loopback(host: str) -> bool:
    """Tell whether ``host`` is a loopback address (names other than 'localhost' are not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token(token: str | None) -> str:
    """Validate a shared token for plaintext loopback: 16 to 256 printable ASCII characters."""
    if not token:
        raise ConfigError("insecure_loopback needs a shared token (token=...)")
    if not (16 <= len(token) <= 256) or not all("!" <= c <= "~" for c in token):
        raise ConfigError("the shared token must be 16 to 256 printable ASCII characters")
    return token


class TcpTransport:
    """TCP sockets, with mutual TLS, or plaintext restricted to loopback.

    Addresses are ``host:port`` strings (``[v6]:port`` for IPv6). A plugin's server hands every
    accepted connection to :meth:`secure` in the connection's own thread, so a slow or silent
    handshake holds only that connection.
    """

    def __init__(
        self,
        tls: TLSConfig | None,
        *,
        insecure_loopback: bool = False,
        token: str | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        if tls is None and not insecure_loopback:
            raise ConfigError(
                "TCP needs mutual TLS (tls=TLSConfig(...)); plaintext is allowed only on "
                "loopback with insecure_loopback=True and a shared token"
            )
        self.tls = tls
        self.insecure_loopback = tls is None
        self.token = check_token(token) if self.insecure_loopback else None
        self.handshake_timeout = handshake_timeout
        self._server_ctx: ssl.SSLContext | None = None
        self._client_ctx: ssl.SSLContext | None = None
        if tls is not None:
            # Load certificates now, so that a bad file is a ConfigError at construction.
            self._server_ctx = tls.server_context()
            self._client_ctx = tls.client_context()

    @property
    def scheme(self) -> str:
        """``https`` with TLS, ``http`` for plaintext loopback."""
        return "http" if self.tls is None else "https"

    def connect(self, address: str, timeout: float) -> socket.socket:
        """Connect to ``host:port`` and, with TLS, complete the handshake (within ``timeout``)."""
        host, port = split_address(address)
        if self.tls is None and not is_loopback(host):
            raise ConfigError(f"refusing plaintext TCP to {address}: not a loopback address")
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise PluginConnectionError(f"cannot connect to {address}: {reason}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._client_ctx is None:
            sock.settimeout(None)
            return sock
        assert self.tls is not None
        name = self.tls.server_name or host
        try:
            secure = self._client_ctx.wrap_socket(sock, server_hostname=name)
        except (OSError, ValueError) as exc:
            sock.close()
            raise PluginConnectionError(
                f"TLS handshake with {address} failed: {_reason(exc)}"
            ) from None
        secure.settimeout(None)
        return secure

    async def connect_async(
        self, loop: Any, factory: Any, address: str, timeout: float
    ) -> tuple[Any, Any]:
        """The asyncio counterpart of :meth:`connect` (``factory`` makes the protocol)."""
        import asyncio  # only a registry's asyncio side gets here; plugins never import it

        host, port = split_address(address)
        if self.tls is None and not is_loopback(host):
            raise ConfigError(f"refusing plaintext TCP to {address}: not a loopback address")
        ctx = self._client_ctx
        name = (self.tls.server_name or host) if self.tls is not None else None
        try:
            return await asyncio.wait_for(
                loop.create_connection(
                    factory,
                    host,
                    port,
                    ssl=ctx,
                    server_hostname=name,
                ),
                timeout,
            )
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            raise PluginConnectionError(
                f"cannot connect to {address}: {_reason(exc) or 'timed out'}"
            ) from None

    def listen(self, address: str, backlog: int) -> socket.socket:
        """Listen on ``host:port`` (port 0: any free port; see ``getsockname()``)."""
        host, port = split_address(address)
        if self.tls is None and not is_loopback(host):
            raise ConfigError(
                f"refusing to listen on {address} in plaintext: insecure_loopback allows only "
                "loopback addresses"
            )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return listening(sock, (host, port), address, backlog)

    def unlink(self, address: str) -> None:
        """Nothing to remove for TCP."""

    def secure(self, conn: socket.socket) -> socket.socket | None:
        """Finish an accepted connection: the TLS handshake, checking the client's certificate.

        Returns the socket to serve, or None (logged) when the client is refused.
        """
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._server_ctx is None:
            return conn
        conn.settimeout(self.handshake_timeout)
        try:
            secure = self._server_ctx.wrap_socket(conn, server_side=True)
        except (OSError, ValueError) as exc:
            log.warning("refused a TLS connection: %s", _reason(exc))
            with contextlib.suppress(OSError):
                conn.close()
            return None
        names = self.tls.client_names if self.tls is not None else None
        if names is not None and not names.intersection(certificate_names(secure)):
            log.warning(
                "refused a TLS client whose certificate names none of %s", ", ".join(sorted(names))
            )
            with contextlib.suppress(OSError):
                secure.close()
            return None
        secure.settimeout(None)
        return secure


def certificate_names(sock: ssl.SSLSocket) -> set[str]:
    """The names the peer's (verified) certificate carries: its subjectAltName entries and CN."""
    cert: dict[str, Any] = dict(sock.getpeercert() or {})
    names = {str(value) for _, value in cert.get("subjectAltName", ())}
    for rdn in cert.get("subject", ()):
        names.update(str(value) for key, value in rdn if key == "commonName")
    return names


def split_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"invalid TCP address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    """Join a host and a port into an address (brackets around IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


REGISTRY_NAME = "goplug-registry"
"""The name on the registry certificate :func:`make_dev_certs` makes."""

DEV_FILES = ("ca.pem", "ca.key", "plugin.pem", "plugin.key", "registry.pem", "registry.key")
"""What :func:`make_dev_certs` writes."""


def make_dev_certs(
    directory: str | os.PathLike[str], hosts: list[str] | None = None
) -> dict[str, TLSConfig]:
    """Make a development CA and certificates in ``directory`` (``goplug tls init``).

    The plugin certificate names ``hosts`` (default: localhost, 127.0.0.1, ::1): every address
    a plugin announces must be among them. Returns ``{"plugin": ..., "registry": ...}``, the
    :class:`TLSConfig` of each side. Needs ``trustme`` (``pip install goplug[tls]``); existing
    files are never overwritten. For development only: the CA key lies beside the certificates.
    """
    try:
        import trustme
    except ImportError:
        raise ConfigError(
            "making development certificates needs trustme: pip install 'goplug[tls]'"
        ) from None
    names = hosts or ["localhost", "127.0.0.1", "::1"]
    root = os.path.abspath(os.fspath(directory))
    os.makedirs(root, mode=0o700, exist_ok=True)
    taken = [name for name in DEV_FILES if os.path.exists(os.path.join(root, name))]
    if taken:
        raise ConfigError(f"{root} already holds {', '.join(taken)}; not overwriting")
    ca = trustme.CA(organization_name="goplug development CA")
    plugin = ca.issue_cert(*names, common_name="goplug plugin")
    registry = ca.issue_cert(REGISTRY_NAME, common_name="goplug registry")
    contents = {
        "ca.pem": ca.cert_pem.bytes(),
        "ca.key": ca.private_key_pem.bytes(),
        "plugin.pem": b"".join(blob.bytes() for blob in plugin.cert_chain_pems),
        "plugin.key": plugin.private_key_pem.bytes(),
        "registry.pem": b"".join(blob.bytes() for blob in registry.cert_chain_pems),
        "registry.key": registry.private_key_pem.bytes(),
    }
    for name, data in contents.items():
        mode = 0o600 if name.endswith(".key") else 0o644
        fd = os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return dev_configs(root)


def dev_configs(directory: str | os.PathLike[str]) -> dict[str, TLSConfig]:
    """The :class:`TLSConfig` of each side for a directory made by :func:`make_dev_certs`.

    The plugin side accepts only clients whose certificate names ``goplug-registry``.
    """
    root = os.path.abspath(os.fspath(directory))

    def side(stem: str, client_names: frozenset[str] | None) -> TLSConfig:
        return TLSConfig(
            ca=os.path.join(root, "ca.pem"),
            cert=os.path.join(root, f"{stem}.pem"),
            key=os.path.join(root, f"{stem}.key"),
            client_names=client_names,
        )

    # Plugins take calls from the registry certificate only, not from each other's.
    return {
        "plugin": side("plugin", frozenset({REGISTRY_NAME})),
        "registry": side("registry", None),
    }
