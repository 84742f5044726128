"""The plugin side: :class:`Plugin` serves methods to any registry that discovers it."""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import NamedTuple, overload

from goplug.callbacks import CallbackHub, CallbackSettings
from goplug.errors import ConfigError, GoPlugError
from goplug.logs import LazyLogger
from goplug.server import MethodFunc, Server, ServerSettings
from goplug.transport import Transport, UnixTransport, socket_path_for
from goplug.wire import routes
from goplug.wire.pconf import (
    ENV_DIR,
    ENV_LAUNCH_TOKEN,
    PROTOCOL_VERSION,
    PluginConf,
    check_name,
    default_url,
    dump_pconf,
    file_stem,
    write_atomically,
)

__all__ = ["Plugin", "PluginSettings", "serve"]

log = LazyLogger("goplug.plugin")

TYPE_CHECKING = False  # typing.TYPE_CHECKING; a plugin never needs asyncio unless it uses it
if TYPE_CHECKING:
    import asyncio

    from goplug.etcd import EtcdAnnouncer, EtcdLocation
    from goplug.tls import TLSConfig

F = Callable[[bytes], object]


class PluginSettings(NamedTuple):
    """Limits, timeouts and access control of a plugin (defaults in docs/RELIABILITY.md)."""

    server: ServerSettings = ServerSettings()
    """Limits, timeouts and allowed peers of the plugin's server."""
    callbacks: CallbackSettings = CallbackSettings()
    """Bounds of the callback queues."""
    conf_ext: str = ".pconf"
    """Extension of the announce file."""
    backlog: int = 1024
    """Connections the kernel queues before the plugin accepts them."""


class _Phase(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class Plugin:
    """A plugin: methods served on a socket, announced by a `.pconf` document in ``location``.

    >>> plugin = Plugin("plugins", "Do", "Test")
    >>> @plugin.method
    ... def Do(data: bytes) -> bytes:
    ...     return data.upper()

    ``location=None`` takes the directory from the environment variable ``GOPLUG_DIR``, which a
    registry sets when it launches the plugin (:meth:`PluginRegistry.launch`); a plugin started
    that way also echoes the registry's launch token in its `.pconf`.

    For registries on other hosts, ``location`` is ``etcd://host:2379[,host2:2379]/prefix`` (the
    `.pconf` is put in etcd on a lease of ``lease_ttl`` seconds that the plugin keeps alive) and
    ``url`` is ``tcp://HOST:PORT`` (port 0: any free port): the plugin listens on TCP with mutual
    TLS (``tls``), announces ``https://<advertise or HOST>:<port>`` and refuses clients without
    a certificate from the same CA. ``insecure_loopback=True`` with a shared ``token`` allows
    plaintext on loopback instead (docs/MULTIHOST.md).
    """

    def __init__(
        self,
        location: str | os.PathLike[str] | None,
        name: str,
        namespace: str = "",
        url: str | None = None,
        lazy_load: bool = False,
        activator: Callable[[bytes], bytes | None] | None = None,
        stopper: Callable[[bytes], bytes | None] | None = None,
        *,
        settings: PluginSettings | None = None,
        transport: Transport | None = None,
        tls: TLSConfig | None = None,
        advertise: str | None = None,
        insecure_loopback: bool = False,
        token: str | None = None,
        lease_ttl: float = 5.0,
        etcd_tls: TLSConfig | None = None,
    ) -> None:
        check_name(name, "name", plugin_side=True)
        check_name(namespace, "namespace", plugin_side=True)
        if location is None:
            location = os.environ.get(ENV_DIR, "")
            if not location:
                raise ConfigError(
                    f"plugin {file_stem(name, namespace)}: no plugin directory; pass one, or set "
                    f"{ENV_DIR} (a registry's launch() sets it)"
                )
        location = os.fspath(location)
        self._etcd: EtcdLocation | None = None
        if location.startswith(("etcd://", "etcds://")):
            from goplug.etcd import parse_etcd_location

            self._etcd = parse_etcd_location(location)
            self.location = location
        else:
            self.location = os.path.abspath(location)
        self.name = name
        self.namespace = namespace
        self.url = url or default_url(name, namespace)
        self._tcp: tuple[str, int] | None = None  # where to listen, for a plugin on TCP
        self._scheme = ""  # of the Url it announces, for a plugin on TCP
        self._advertise = advertise
        if self.url.startswith("tcp://"):
            from goplug.tls import TcpTransport, parse_tcp_url

            _, host, port = parse_tcp_url(self.url)
            self._tcp = (host, port)
            if advertise is None and host in ("0.0.0.0", "::", ""):
                raise ConfigError(
                    f"plugin {file_stem(name, namespace)} listens on all interfaces ({self.url}): "
                    "pass advertise=ADDRESS, the address registries reach it at"
                )
            if transport is None:
                transport = TcpTransport(tls, insecure_loopback=insecure_loopback, token=token)
            self._scheme = transport.scheme if isinstance(transport, TcpTransport) else "https"
        elif tls is not None or insecure_loopback:
            raise ConfigError("tls and insecure_loopback apply to a plugin on TCP (url='tcp://...')")
        elif self._etcd is not None:
            raise ConfigError(
                "a plugin announced in etcd is reached over TCP: pass url='tcp://HOST:PORT'"
            )
        if lease_ttl < 2:
            raise ConfigError(f"lease_ttl must be at least 2 seconds, not {lease_ttl:g}")
        self.lease_ttl = lease_ttl
        self._etcd_tls = etcd_tls or tls
        self._announcer: EtcdAnnouncer | None = None
        self.lazy_load = lazy_load
        self.activator = activator
        self.stopper = stopper
        self.settings = settings or PluginSettings()
        self._transport = transport or UnixTransport()
        self._methods: dict[str, MethodFunc] = {}
        self._hub = CallbackHub(self.settings.callbacks)
        self._server: Server | None = None
        self._phase = _Phase.NEW
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # set by goplug.aio.Plugin
        self.announced_url = ""
        """The ``Url`` the plugin announced (set by :meth:`start`)."""
        stem = file_stem(name, namespace)
        if self._etcd is not None:
            from goplug.etcd import key_for

            self.pconf_path = key_for(self._etcd.prefix, name, namespace)
        else:
            self.pconf_path = os.path.join(self.location, stem + self.settings.conf_ext)
        """Where the plugin announces itself: a file path, or its key in etcd."""
        self.sock_path = ""
        """The socket it listens on (set by :meth:`start`; may be a short path, see PROTOCOL.md;
        ``host:port`` for a plugin on TCP)."""

    # -- methods -------------------------------------------------------------------------------

    def register_method(self, fn: F, name: str | None = None) -> None:
        """Serve ``fn`` (``bytes -> bytes``, plain or ``async def``) as ``name``.

        The name defaults to the function's ``__name__``.
        """
        method_name = name or getattr(fn, "__name__", "")
        if not method_name or "/" in method_name or method_name in routes.RESERVED:
            raise ConfigError(f"invalid method name {method_name!r}")
        if self._phase is _Phase.RUNNING:
            raise GoPlugError("register methods before start(): registries read them at load time")
        self._methods[method_name] = fn  # type: ignore[assignment]

    @overload
    def method(self, fn: F, /) -> F: ...

    @overload
    def method(self, name: str, /) -> Callable[[F], F]: ...

    def method(self, fn_or_name: F | str, /) -> F | Callable[[F], F]:
        """Register a method: ``@plugin.method`` or ``@plugin.method("Name")``."""
        if isinstance(fn_or_name, str):
            given = fn_or_name

            def decorate(fn: F) -> F:
                self.register_method(fn, given)
                return fn

            return decorate
        self.register_method(fn_or_name)
        return fn_or_name

    @property
    def methods(self) -> list[str]:
        """Names of the registered methods."""
        return list(self._methods)

    # -- callbacks -----------------------------------------------------------------------------

    @property
    def callbacks(self) -> list[str]:
        """Callback names that applications have currently registered."""
        return self._hub.names()

    def notify(self, name: str, data: bytes = b"", *, timeout: float | None = None) -> int:
        """Send ``data`` to every application that registered the callback ``name``.

        Returns the number of subscribers. Raises CallbackNotFound if there is none, and
        NotifyTimeout if a subscriber's queue stayed full for ``timeout`` seconds.
        """
        return self._hub.notify(name, data, timeout)

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._phase is _Phase.RUNNING

    def start(self) -> None:
        """Listen on the socket, then publish the `.pconf` so registries can discover it."""
        with self._lock:
            if self._phase is not _Phase.NEW:
                raise GoPlugError(f"plugin {self.label} was already started")
            if self._etcd is None and not os.path.isdir(self.location):
                os.makedirs(self.location, mode=0o700, exist_ok=True)
            stem = file_stem(self.name, self.namespace)
            url = self.url
            if self._tcp is not None:
                from goplug.tls import join_address

                host, port = self._tcp
                listener = self._transport.listen(join_address(host, port), self.settings.backlog)
                port = listener.getsockname()[1]  # the one the kernel chose for port 0
                self.sock_path = join_address(host, port)
                url = f"{self._scheme}://{join_address(self._advertise or host, port)}"
            else:
                self.sock_path = socket_path_for(os.path.join(self.location, stem + ".sock"))
                listener = self._transport.listen(self.sock_path, self.settings.backlog)
            prefix = url.split("://", 1)[-1].partition("/")[2]
            server = Server(
                listener,
                self._methods,
                self._hub,
                self.activator,
                self.stopper,
                "/" + prefix.rstrip("/") if prefix else "",
                self.settings.server,
                self.label,
                self._loop,
                self._transport,
            )
            server.start()
            self._server = server
            # Running from here on: a registry may activate the plugin as soon as the file
            # below appears, before this method returns, and an activator may check it.
            self._phase = _Phase.RUNNING
            conf = PluginConf(
                name=self.name,
                namespace=self.namespace,
                url=url,
                sock="" if self._tcp is not None else self.sock_path,
                lazy_load=self.lazy_load,
                pid=os.getpid(),
                protocol=PROTOCOL_VERSION,
                version=_version(),
                launch=_launch_token(),
            )
            try:
                self._publish(dump_pconf(conf))
            except BaseException:
                self._phase = _Phase.NEW
                self._server = None
                server.close()
                self._transport.unlink(self.sock_path)
                raise
            self.announced_url = url
        log.info("plugin %s listening on %s", self.label, self.sock_path)

    def stop(self) -> None:
        """Withdraw the `.pconf`, close the socket and remove the socket file."""
        with self._lock:
            if self._phase is not _Phase.RUNNING:
                self._phase = _Phase.STOPPED
                return
            self._phase = _Phase.STOPPED
            self._withdraw()
            if self._server is not None:
                self._server.close()
            self._transport.unlink(self.sock_path)
        log.info("plugin %s stopped", self.label)

    def _publish(self, document: bytes) -> None:
        if self._etcd is None:
            write_atomically(self.pconf_path, document)
            return
        from goplug.etcd import EtcdAnnouncer

        announcer = EtcdAnnouncer(
            self._etcd, self.pconf_path, document, ttl=self.lease_ttl, tls=self._etcd_tls
        )
        announcer.start()
        self._announcer = announcer

    def _withdraw(self) -> None:
        announcer, self._announcer = self._announcer, None
        if announcer is not None:
            announcer.stop()  # revokes the lease: registries see the plugin go at once
        elif self._etcd is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pconf_path)

    def serve_forever(self) -> None:
        """Start (if needed), block until SIGINT or SIGTERM, then stop cleanly."""
        serve(self)

    @property
    def label(self) -> str:
        """``name@namespace`` (or ``name``), for messages."""
        return file_stem(self.name, self.namespace)

    def __enter__(self) -> Plugin:
        if self._phase is _Phase.NEW:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Plugin {self.label} {self._phase.value}>"


def serve(*plugins: Plugin) -> None:
    """Start every plugin, block until SIGINT or SIGTERM, then stop them all.

    One process may host many plugins, each with its own socket and `.pconf`.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, on_signal) for sig in wanted}
    # The kernel may hand the signal to any of the server's threads; Python then runs the
    # handler on the main thread only once that thread wakes up, and a wait on a lock does
    # not. The wakeup fd gets the signal's number from whichever thread caught it.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    previous_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    try:
        for plugin in plugins:
            if not plugin.running:
                plugin.start()
        while not stop.is_set():
            try:
                caught = os.read(wake_r, 64)
            except InterruptedError:
                continue
            if any(n in wanted for n in caught):
                stop.set()
    finally:
        signal.set_wakeup_fd(previous_fd)
        os.close(wake_r)
        os.close(wake_w)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for plugin in plugins:
            plugin.stop()


def _version() -> str:
    from goplug import __version__

    return __version__


def _launch_token() -> str:
    """The launch token to echo, if a registry launched this process and it is well-formed."""
    token = os.environ.get(ENV_LAUNCH_TOKEN, "")
    valid = all(c.isascii() and (c.isalnum() or c in "-_") for c in token)
    if token and len(token) <= 64 and valid:
        return token
    if token:
        log.warning("ignoring a malformed %s", ENV_LAUNCH_TOKEN)
    return ""
