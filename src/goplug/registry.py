"""The application side: :class:`PluginRegistry` discovers, loads, calls and unloads plugins."""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from goplug.client import ClientSettings, PluginClient, Subscription
from goplug.discovery import DirectoryDiscovery, Discovery
from goplug.errors import (
    ConfigError,
    GoPlugError,
    PluginAlreadyLoaded,
    PluginConnectionError,
    PluginNotDiscovered,
    PluginNotLoaded,
    RegistryClosed,
)
from goplug.launcher import (
    Launcher,
    LaunchSettings,
    PluginProcess,
)
from goplug.supervision import _LAUNCHING, LaunchingRegistry
from goplug.transport import Transport, UnixTransport, check_owner
from goplug.wire import routes
from goplug.wire.pconf import (
    MAX_PCONF_BYTES,
    PluginConf,
    check_protocol,
    file_stem,
    parse_pconf,
)

__all__ = [
    "PluginEvent",
    "PluginHandle",
    "PluginRegistry",
    "PluginState",
    "RegistrySettings",
]

TYPE_CHECKING = False  # typing.TYPE_CHECKING; ssl is imported only for plugins on TCP
if TYPE_CHECKING:
    from goplug.tls import TcpTransport, TLSConfig

log = logging.getLogger("goplug.registry")

_PING_DATA = b"Test Data"


class PluginState(enum.Enum):
    """The three states of GoPlug's lifecycle."""

    STOPPED = "stopped"
    """Not announced, or lost (its file went away, or nobody answers on its socket)."""
    DISCOVERED = "discovered"
    """Announced and ready to load."""
    LOADED = "loaded"
    """Activated: methods can be called."""


EventKind = Literal["discovered", "loaded", "unloaded", "lost", "failed"]


@dataclass(frozen=True)
class PluginEvent:
    """What a registry listener receives."""

    kind: EventKind
    name: str
    namespace: str
    handle: PluginHandle
    reason: str = ""


@dataclass(frozen=True)
class RegistrySettings:
    """Timeouts, limits and access control of a registry (defaults in docs/RELIABILITY.md)."""

    client: ClientSettings = field(default_factory=ClientSettings)
    allowed_uids: frozenset[int] | None = None
    """Owners a `.pconf` and its socket may have; None means only this process's uid."""
    health_interval: float = 0.5
    """How often idle connections are checked for a plugin that went away (seconds)."""
    use_inotify: bool = True
    """Watch the directory with inotify; False polls it."""
    poll_interval: float = 0.1
    """Polling period when inotify is not used (seconds)."""
    ping_interval: float | None = None
    """How often loaded plugins the registry did not launch are pinged (None: never); one that
    fails ``launch.ping_failures`` pings in a row is marked lost."""
    launch: LaunchSettings = field(default_factory=LaunchSettings)
    """Supervision of launched plugins: stop grace, restart backoff, health pings."""


class PluginHandle:
    """The application's handle on one plugin, kept across unloads, losses and reloads."""

    def __init__(self, registry: PluginRegistry, name: str, namespace: str) -> None:
        self._registry = registry
        self.name = name
        """The plugin's name."""
        self.namespace = namespace
        """The plugin's namespace ('' if none)."""
        self.state = PluginState.STOPPED
        """Where the plugin is in its lifecycle."""
        self.methods: list[str] = []
        """Method names the plugin announced when it was loaded."""
        self.activation_output = b""
        """Bytes the plugin's activator returned at the last load."""
        self.conf: PluginConf | None = None
        """The announce file this plugin was last discovered from."""
        self.process: PluginProcess | None = None
        """The process behind the plugin when this registry launched it (else None)."""
        self._client: PluginClient | None = None
        self._ping_failures = 0
        self._pinging = False
        self._next_ping = 0.0
        self._subscriptions: list[Subscription] = []
        self._load_lock = threading.Lock()  # one load at a time (discovery vs load_plugin)

    @property
    def label(self) -> str:
        """``name@namespace`` (or ``name``)."""
        return file_stem(self.name, self.namespace)

    def execute(self, method: str, data: bytes = b"", *, timeout: float | None = None) -> bytes:
        """Call ``method`` with ``data`` and return its output.

        Raises MethodNotFound, RemoteError (the method raised), CallTimeout,
        PluginConnectionError (the plugin went away) or PluginNotLoaded.
        """
        client = self._client
        if client is None:
            raise PluginNotLoaded(f"plugin {self.label} is not loaded ({self.state.value})")
        try:
            return client.request(method, data, timeout)
        except PluginConnectionError:
            self._registry._check_alive(self, client)
            raise

    def ping(self, *, timeout: float | None = None) -> float:
        """Check the plugin answers; return the round-trip time in seconds."""
        client = self._client
        if client is None:
            raise PluginNotLoaded(f"plugin {self.label} is not loaded ({self.state.value})")
        started = time.perf_counter()
        try:
            body = client.request(
                routes.PING,
                _PING_DATA,
                self._registry.settings.client.ping_timeout if timeout is None else timeout,
            )
        except PluginConnectionError:
            self._registry._check_alive(self, client)
            raise
        if body != _PING_DATA:
            raise PluginConnectionError(f"plugin {self.label} answered the ping with other bytes")
        return time.perf_counter() - started

    def register_callback(
        self, fn: Callable[[bytes], object], name: str | None = None
    ) -> Subscription:
        """Deliver every ``notify(name, ...)`` of the plugin to ``fn(bytes)``, in order.

        ``fn`` runs on a thread of its own (one per callback); an exception it raises is logged
        and delivery goes on. The subscription survives reloads and ends on unload or close.
        """
        cb_name = name or getattr(fn, "__name__", "")
        if not cb_name:
            raise ConfigError("a callback needs a name")
        if self._client is None:
            raise PluginNotLoaded(f"plugin {self.label} is not loaded ({self.state.value})")
        sub = Subscription(
            cb_name,
            fn,
            lambda: self._client,
            self._registry.settings.client,
            lambda: self._registry._check_alive(self, self._client),
        )
        self._subscriptions.append(sub)
        sub.start()
        return sub

    @property
    def callbacks(self) -> list[str]:
        """Names of the callbacks registered through this handle."""
        return [sub.name for sub in self._subscriptions]

    def __repr__(self) -> str:
        return f"<PluginHandle {self.label} {self.state.value}>"


class PluginRegistry(LaunchingRegistry):
    """Discovers plugins announced in ``location`` and manages their lifecycle.

    With ``auto_discover`` the directory is watched: new plugins are discovered within
    milliseconds and loaded at once unless they ask for lazy loading. Without it, plugins are
    found when :meth:`load_plugin` asks for them.

    ``location`` may also be ``etcd://host:2379[,host2:2379]/prefix`` (``etcds://`` for TLS to
    etcd, with ``etcd_tls`` or else ``tls``): plugins on other hosts announce themselves there.
    Plugins whose ``Url`` is ``https://`` are reached over TCP with mutual TLS (``tls``: the CA,
    and the certificate this registry presents); ``http://`` only on loopback, with
    ``insecure_loopback=True`` and the plugins' shared ``token`` (docs/MULTIHOST.md).
    """

    def __init__(
        self,
        location: str | os.PathLike[str],
        auto_discover: bool = True,
        conf_ext: str = ".pconf",
        *,
        settings: RegistrySettings | None = None,
        transport: Transport | None = None,
        tls: TLSConfig | None = None,
        insecure_loopback: bool = False,
        token: str | None = None,
        etcd_tls: TLSConfig | None = None,
    ) -> None:
        location = os.fspath(location)
        self._etcd = location.startswith(("etcd://", "etcds://"))
        self.location = location if self._etcd else os.path.abspath(location)
        self.conf_ext = conf_ext or ".pconf"
        self.auto_discover = auto_discover
        self.settings = settings or RegistrySettings()
        self._allowed = self.settings.allowed_uids or frozenset({os.getuid()})
        self._transport = transport or UnixTransport()
        self._tcp: TcpTransport | None = None
        if tls is not None or insecure_loopback:
            from goplug.tls import TcpTransport

            self._tcp = TcpTransport(tls, insecure_loopback=insecure_loopback, token=token)
        self._lock = threading.RLock()
        self._handles: dict[tuple[str, str], PluginHandle] = {}
        self._files: dict[str, tuple[str, str]] = {}  # .pconf path -> identity
        self._broken: dict[str, ConfigError] = {}  # .pconf path -> why it was refused
        self._listeners: list[Callable[[PluginEvent], object]] = []
        self._closed = False
        self._loader: ThreadPoolExecutor | None = None
        self._launches: dict[tuple[str, str], PluginProcess] = {}  # identity -> its process
        self._unnamed: list[PluginProcess] = []  # launched without a name, not announced yet
        self._launcher: Launcher | None = None
        self._discovery: Discovery
        if self._etcd:
            from goplug.etcd import EtcdDiscovery, parse_etcd_location

            self._etcd_location = parse_etcd_location(location)
            self._discovery = EtcdDiscovery(
                self._etcd_location,
                self._on_files,
                on_tick=self._health_check,
                tick_interval=self.settings.health_interval,
                tls=etcd_tls or tls,
            )
        else:
            if not os.path.isdir(self.location):
                os.makedirs(self.location, mode=0o700, exist_ok=True)
            self._discovery = DirectoryDiscovery(
                self.location,
                self.conf_ext,
                self._on_files,
                on_tick=self._health_check,
                tick_interval=self.settings.health_interval,
                poll_interval=self.settings.poll_interval,
                use_inotify=self.settings.use_inotify,
            )
        if auto_discover:
            self._discovery.start()

    # -- queries -------------------------------------------------------------------------------

    def get_plugin(self, name: str, namespace: str = "") -> PluginHandle | None:
        """Return the handle of a loaded plugin, or None."""
        handle = self._handles.get((namespace, name))
        return handle if handle is not None and handle.state is PluginState.LOADED else None

    def is_discovered(self, name: str, namespace: str = "") -> bool:
        """Tell whether the plugin is announced (discovered or loaded)."""
        handle = self._handles.get((namespace, name))
        return handle is not None and handle.state is not PluginState.STOPPED

    def is_loaded(self, name: str, namespace: str = "") -> bool:
        """Tell whether the plugin is loaded."""
        return self.get_plugin(name, namespace) is not None

    def discovered(self) -> list[PluginHandle]:
        """Handles of every announced plugin (discovered or loaded), sorted by identity."""
        with self._lock:
            return [
                h for _, h in sorted(self._handles.items()) if h.state is not PluginState.STOPPED
            ]

    def loaded(self) -> list[PluginHandle]:
        """Handles of every loaded plugin, sorted by identity."""
        with self._lock:
            return [h for _, h in sorted(self._handles.items()) if h.state is PluginState.LOADED]

    def broken(self) -> dict[str, ConfigError]:
        """Announce files that were refused, with the reason."""
        with self._lock:
            return dict(self._broken)

    def add_listener(self, fn: Callable[[PluginEvent], object], *, replay: bool = True) -> None:
        """Call ``fn(event)`` for every discovered / loaded / unloaded / lost event.

        With ``replay`` (the default) ``fn`` first receives a "discovered" event for every
        plugin already announced and a "loaded" event for every one already loaded, so a
        listener added after the registry started misses nothing. Listeners run on the thread
        that caused the event; an exception they raise is logged.
        """
        with self._lock:
            self._listeners.append(fn)
            current = [(h, h.state) for _, h in sorted(self._handles.items())]
        if not replay:
            return
        for handle, state in current:
            kinds: list[EventKind] = []
            if state is not PluginState.STOPPED:
                kinds.append("discovered")
            if state is PluginState.LOADED:
                kinds.append("loaded")
            for kind in kinds:
                try:
                    fn(PluginEvent(kind, handle.name, handle.namespace, handle))
                except Exception:
                    log.exception("registry listener raised on replayed %s event", kind)

    def remove_listener(self, fn: Callable[[PluginEvent], object]) -> None:
        """Stop calling ``fn``."""
        with self._lock, contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    # -- lifecycle -----------------------------------------------------------------------------

    def load_plugin(self, name: str, namespace: str = "") -> PluginHandle:
        """Connect to a discovered plugin and activate it; return its handle.

        Without auto discovery the directory is searched first. Raises PluginNotDiscovered,
        ConfigError (its announce file is invalid), PluginAlreadyLoaded or
        PluginConnectionError.
        """
        self._check_open()
        identity = (namespace, name)
        handle = self._handles.get(identity)
        if handle is None or handle.state is PluginState.STOPPED:
            self._discovery.scan()
            handle = self._handles.get(identity)
        if handle is not None and handle.state is PluginState.STOPPED:
            self._rediscover(handle)
        if handle is None or handle.state is PluginState.STOPPED:
            error = self._broken_file_for(name, namespace)
            if error is not None:
                raise error
            raise PluginNotDiscovered(
                f"no plugin {file_stem(name, namespace)} announced in {self.location}"
            )
        if handle.state is PluginState.LOADED:
            raise PluginAlreadyLoaded(f"plugin {handle.label} is already loaded")
        try:
            self._load(handle)
        except PluginConnectionError as exc:
            self._lose(handle, f"nobody answers: {exc}")
            raise
        return handle

    def unload_plugin(self, handle: PluginHandle) -> None:
        """End the handle's callbacks, send `/Stop`, disconnect; the plugin stays discovered."""
        with self._lock:
            proc = handle.process
            if proc is not None and proc.state in ("stopped", "failed", "stopping"):
                proc = None
            # A launched plugin between two runs (restarting) can be unloaded too: that stops it.
            if handle.state is not PluginState.LOADED and proc is None:
                raise PluginNotLoaded(f"plugin {handle.label} is not loaded")
            client = handle._client
            handle._client = None
            if proc is not None:
                with proc.cond:
                    proc.state = "stopping"  # its exit is expected now, not a crash
            # A launched plugin goes with its process; another one stays announced.
            new_state = PluginState.STOPPED if proc is not None else PluginState.DISCOVERED
            listeners = self._set_state(handle, new_state)
            subs, handle._subscriptions = handle._subscriptions, []
        for sub in subs:
            sub.close()
        if client is not None:
            timeout = self.settings.client.activate_timeout
            if proc is not None:
                # Its process goes away: no unsubscribing, and /Stop may take the grace period
                # at most, so that a hung plugin is signalled in time.
                timeout = min(timeout, self.settings.launch.stop_grace)
                subs_to_end: list[Subscription] = []
            else:
                subs_to_end = subs
            for sub in subs_to_end:
                with contextlib.suppress(GoPlugError):
                    extra = b"X-Goplug-Subscriber: %s\r\n" % sub.token.encode()
                    client.call(
                        routes.UNSUBSCRIBE, routes.callback_name_body(sub.name), timeout, extra
                    )
            try:
                client.request(routes.STOP, b"", timeout)
            except PluginConnectionError:
                pass  # GoPlug's example plugin exits on /Stop before answering
            except GoPlugError as exc:
                log.warning("plugin %s: /Stop failed: %s", handle.label, exc)
            client.close()
        if proc is not None:
            self._stop_launched([proc])
            with self._lock:
                if self._launches.get((handle.namespace, handle.name)) is proc:
                    del self._launches[(handle.namespace, handle.name)]
        self._emit("unloaded", handle, listeners)

    def stop(self) -> None:
        """End discovery (loaded plugins stay loaded)."""
        self._discovery.stop()

    def wait_for_stop(self, timeout: float | None = None) -> bool:
        """Wait until discovery has ended; return False on timeout."""
        return self._discovery.join(timeout)

    def close(self) -> None:
        """End discovery and disconnect from every plugin, callbacks included.

        Plugins the registry did not start keep running; the ones it launched are stopped
        (`/Stop`, SIGTERM, then SIGKILL after ``settings.launch.stop_grace``). Calls in flight
        raise RegistryClosed. Returns within about a second, plus the time launched plugins
        take to stop.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            handles = list(self._handles.values())
            procs = [*self._launches.values(), *self._unnamed]
            for proc in procs:
                with proc.cond:
                    if proc.state not in ("stopped", "failed"):
                        proc.state = "stopping"
                    proc.cond.notify_all()
        self._discovery.stop()
        subs: list[Subscription] = []
        stopping: list[threading.Thread] = []
        for handle in handles:
            with self._lock:
                client, handle._client = handle._client, None
                subs.extend(handle._subscriptions)
                handle._subscriptions = []
                if handle.state is PluginState.LOADED:
                    launched = handle.process is not None
                    handle.state = PluginState.STOPPED if launched else PluginState.DISCOVERED
            if client is None:
                continue
            if handle.process is None:
                client.close()
                continue
            # Launched: /Stop to all of them at once, each bounded, then the signals.
            thread = threading.Thread(
                target=self._send_stop,
                args=(client, min(0.5, self.settings.launch.stop_grace)),
                name="goplug-stop",
                daemon=True,
            )
            thread.start()
            stopping.append(thread)
        for thread in stopping:
            thread.join()
        if procs:
            self._stop_launched(procs)
            for proc in procs:
                self._record_launch(proc)  # closed: the records go
        if self._launcher is not None:
            self._launcher.close()
        _LAUNCHING.discard(self)
        for sub in subs:
            sub.close(timeout=0)
        deadline = time.monotonic() + 0.9
        for sub in subs:
            sub.close(timeout=max(0.0, deadline - time.monotonic()))
        if self._loader is not None:
            self._loader.shutdown(wait=False, cancel_futures=True)
        self._discovery.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> PluginRegistry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[PluginHandle]:
        return iter(self.loaded())

    # -- internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryClosed("the registry is closed")

    def _set_state(
        self, handle: PluginHandle, state: PluginState
    ) -> list[Callable[[PluginEvent], object]]:
        """Change a state (lock held); return the listeners that must hear of it.

        Taking them in the same locked step as the change means a listener added concurrently
        either gets the event or sees the new state replayed, never both or neither.
        """
        handle.state = state
        return list(self._listeners)

    def _emit(
        self,
        kind: EventKind,
        handle: PluginHandle,
        listeners: list[Callable[[PluginEvent], object]],
        reason: str = "",
    ) -> None:
        event = PluginEvent(kind, handle.name, handle.namespace, handle, reason)
        for fn in listeners:
            try:
                fn(event)
            except Exception:
                log.exception("registry listener raised on %s event", kind)

    def _read_conf(self, path: str) -> PluginConf:
        if self._etcd:
            return self._read_etcd_conf(path)
        check_owner(path, self._allowed, "announce file", want_socket=False)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise ConfigError(f"cannot open: {exc.strerror}", path) from None
        try:
            data = os.read(fd, MAX_PCONF_BYTES + 1)
        finally:
            os.close(fd)
        conf = parse_pconf(data, path)
        try:
            check_protocol(conf)
        except ConfigError as exc:
            self._refuse_launched(conf, exc.reason)
            raise
        return conf

    def _read_etcd_conf(self, key: str) -> PluginConf:
        from goplug.etcd import EtcdDiscovery, identity_of_key

        assert isinstance(self._discovery, EtcdDiscovery)
        conf = parse_pconf(self._discovery.read(key), key)
        if identity_of_key(self._etcd_location.prefix, key) != conf.identity:
            raise ConfigError(
                f"announces {file_stem(conf.name, conf.namespace)}, which belongs at another key",
                key,
            )
        if not conf.remote:
            raise ConfigError(f"'Url' {conf.url!r}: a plugin in etcd must be reached over TCP", key)
        check_protocol(conf)
        return conf

    def _transport_for(self, conf: PluginConf) -> Transport:
        return transport_for(conf, self._transport, self._tcp)

    def _on_files(self, changed: list[str], removed: list[str]) -> None:
        for path in removed:
            with self._lock:
                self._broken.pop(path, None)
                identity = self._files.pop(path, None)
                handle = self._handles.get(identity) if identity else None
            if handle is not None and handle.conf is not None and handle.conf.path == path:
                self._lose(handle, f"{os.path.basename(path)} was removed")
        for path in changed:
            try:
                conf = self._read_conf(path)
            except Exception as exc:
                if not isinstance(exc, ConfigError):
                    exc = ConfigError(f"unreadable: {exc!r:.200}", path)
                with self._lock:
                    first = path not in self._broken or str(self._broken[path]) != str(exc)
                    self._broken[path] = exc
                if first:
                    log.warning("skipping plugin announce file: %s", exc)
                continue
            self._announce(path, conf)

    def _refuse(self, path: str, error: ConfigError) -> None:
        with self._lock:
            first = path not in self._broken or str(self._broken[path]) != str(error)
            self._broken[path] = error
        if first:
            log.warning("skipping plugin announce file: %s", error)

    def _announce(self, path: str, conf: PluginConf) -> None:
        proc, refusal = self._launch_for(conf)
        if refusal:
            self._refuse(
                path,
                ConfigError(
                    f"refused {file_stem(conf.name, conf.namespace)}, a plugin this registry "
                    f"launched: {refusal}",
                    path,
                ),
            )
            return
        with self._lock:
            if self._closed:
                return
            self._broken.pop(path, None)
            old_identity = self._files.get(path)
            self._files[path] = conf.identity
            handle = self._handles.get(conf.identity)
            if handle is None:
                handle = self._handles[conf.identity] = PluginHandle(
                    self, conf.name, conf.namespace
                )
            previous, handle.conf = handle.conf, conf
            state = handle.state
            if (
                proc is not None
                or handle.process is None
                or handle.process.state
                in (
                    "stopped",
                    "failed",
                )
            ):
                handle.process = proc  # launched by us, or not (any more)
            # A launched plugin is loaded whatever its LazyLoad says: launching asked for it.
            auto_load = proc is not None or (not conf.lazy_load and self.auto_discover)
        if old_identity is not None and old_identity != conf.identity:
            old = self._handles.get(old_identity)
            if old is not None:
                self._lose(old, f"{os.path.basename(path)} now announces another plugin")
        if state is PluginState.LOADED:
            client = handle._client
            same = previous is not None and _same_endpoint(previous, conf)
            if same and client is not None and client.sweep():
                return  # the same live plugin rewrote its file
            self._lose(handle, "the plugin announced itself anew")
        elif state is PluginState.DISCOVERED:
            if previous is not None and _same_endpoint(previous, conf):
                return
            if auto_load:
                self._schedule_load(handle)  # announced anew: a new process may be listening
            return
        with self._lock:
            listeners = self._set_state(handle, PluginState.DISCOVERED)
        self._emit("discovered", handle, listeners)
        if auto_load:
            self._schedule_load(handle)

    def _rediscover(self, handle: PluginHandle) -> None:
        """Take a lost plugin whose announce file is still there back to DISCOVERED."""
        conf = handle.conf
        if conf is None or not conf.path:
            return
        try:
            fresh = self._read_conf(conf.path)
        except ConfigError:
            return
        with self._lock:
            if handle.state is not PluginState.STOPPED or fresh.identity != conf.identity:
                return
            handle.conf = fresh
            listeners = self._set_state(handle, PluginState.DISCOVERED)
        self._emit("discovered", handle, listeners)

    def _schedule_load(self, handle: PluginHandle) -> None:
        def run() -> None:
            try:
                self._load(handle)
            except PluginAlreadyLoaded:
                pass  # load_plugin got there first
            except PluginConnectionError as exc:
                # Typically an announce file left by a plugin that died: nobody listens. It is
                # tried again only when the file changes (the plugin starts anew).
                self._lose(handle, f"nobody answers: {exc}")
            except ConfigError as exc:  # e.g. an impostor under a launched plugin's name
                if exc.path:
                    self._refuse(exc.path, exc)
                else:
                    log.warning("could not load plugin %s: %s", handle.label, exc)
            except GoPlugError as exc:
                log.warning("could not load plugin %s: %s", handle.label, exc)

        self._run_in_pool(run)

    def _load(self, handle: PluginHandle) -> None:
        with handle._load_lock:
            self._load_locked(handle)

    def _load_locked(self, handle: PluginHandle) -> None:
        with self._lock:
            self._check_open()
            conf = handle.conf
            if handle.state is not PluginState.DISCOVERED or conf is None:
                if handle.state is PluginState.LOADED:
                    raise PluginAlreadyLoaded(f"plugin {handle.label} is already loaded")
                raise PluginNotDiscovered(f"plugin {handle.label} is not discovered")
        transport = self._transport_for(conf)
        if not conf.remote:
            if not os.path.lexists(conf.sock):
                raise PluginConnectionError(f"plugin {handle.label}: no socket at {conf.sock}")
            check_owner(conf.sock, self._allowed, f"socket of {handle.label}", want_socket=True)
        client = PluginClient(conf, transport, self.settings.client)
        try:
            self._check_launched_peer(handle, conf, client)
            body = client.request(routes.ACTIVATE, b"", self.settings.client.activate_timeout)
            methods, extra = routes.parse_activation(body)
        except GoPlugError:
            client.close()
            raise
        with self._lock:
            if (
                self._closed
                or handle.state is not PluginState.DISCOVERED
                or handle.conf != conf  # rewritten with other contents meanwhile
            ):
                client.close()
                if self._closed:
                    raise RegistryClosed("the registry was closed while loading")
                raise PluginConnectionError(f"plugin {handle.label} changed while loading")
            handle.methods = methods
            handle.activation_output = extra
            handle._client = client
            handle._ping_failures = 0
            handle._next_ping = 0.0
            listeners = self._set_state(handle, PluginState.LOADED)
            subs = list(handle._subscriptions)
        proc = handle.process
        if proc is not None:
            with proc.cond:
                if conf.launch == proc.token or not conf.launch:
                    if proc.state in ("starting", "restarting"):
                        proc.state = "running"
                    self._record_launch(proc)
                    proc.loaded_child = proc.child
                proc.cond.notify_all()
        for sub in subs:
            sub.kick()
        log.info("loaded plugin %s (%d methods)", handle.label, len(methods))
        self._emit("loaded", handle, listeners)

    def _lose(self, handle: PluginHandle, reason: str) -> None:
        with self._lock:
            if handle.state is PluginState.STOPPED:
                return
            client, handle._client = handle._client, None
            listeners = self._set_state(handle, PluginState.STOPPED)
        if client is not None:
            client.close(PluginConnectionError(f"plugin {handle.label} was lost: {reason}"))
        log.info("lost plugin %s: %s", handle.label, reason)
        self._emit("lost", handle, listeners, reason)

    def _check_alive(self, handle: PluginHandle, client: PluginClient | None) -> None:
        """After a connection failure: if the plugin does not answer a ping, it is lost."""
        if client is None or handle._client is not client or self._closed:
            return
        if client.probe(self.settings.client.ping_timeout) is False:
            self._lose(handle, "the plugin went away")

    def _health_check(self) -> None:
        with self._lock:
            loaded = [
                (h, h._client) for h in self._handles.values() if h.state is PluginState.LOADED
            ]
        max_sweeps = max(1, int(self.settings.client.pool_idle / self.settings.health_interval))
        # One poll() over every idle connection: with hundreds of plugins loaded this keeps the
        # check to one system call; only connections with news (end-of-file) are looked at.
        poller = select.poll()
        owners: dict[int, tuple[PluginHandle, PluginClient]] = {}
        for handle, client in loaded:
            if client is None:
                continue
            client.expire_idle(max_sweeps)
            for fd in client.idle_fds():
                if fd >= 0:
                    poller.register(fd, select.POLLIN)
                    owners[fd] = (handle, client)
        suspects = {owners[fd] for fd, _ in poller.poll(0) if fd in owners}
        for handle, client in suspects:
            if not client.sweep():
                self._check_alive(handle, client)
        self._ping_due(time.monotonic())

    def _ping_due(self, now: float) -> None:
        """Start the health pings that are due (each on a pool thread)."""
        with self._lock:
            loaded = [h for h in self._handles.values() if h.state is PluginState.LOADED]
        for handle in loaded:
            interval = (
                self.settings.launch.ping_interval
                if handle.process is not None
                else self.settings.ping_interval
            )
            if interval is None or handle._pinging or now < handle._next_ping:
                continue
            handle._pinging = True
            handle._next_ping = now + interval
            self._run_in_pool(functools.partial(self._health_ping, handle))

    def _health_ping(self, handle: PluginHandle) -> None:
        try:
            handle.ping()
            handle._ping_failures = 0
        except PluginNotLoaded:
            handle._ping_failures = 0
        except GoPlugError as exc:
            handle._ping_failures += 1
            limit = self.settings.launch.ping_failures
            failures = handle._ping_failures
            log.info("plugin %s: ping %d/%d failed: %s", handle.label, failures, limit, exc)
            if handle._ping_failures >= limit:
                handle._ping_failures = 0
                reason = f"it failed {limit} pings in a row"
                proc = handle.process
                child = proc.child if proc is not None else None
                if proc is not None and child is not None and proc.state == "running":
                    log.warning(
                        "launched plugin %s: %s; killing pid %d", handle.label, reason, child.pid
                    )
                    child.signal_group(signal.SIGKILL)  # its exit restarts it
                else:
                    self._lose(handle, reason)
        finally:
            handle._pinging = False

    def _run_in_pool(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the registry's small pool (loads and pings); nothing once closed."""
        with self._lock:
            if self._closed:
                return
            if self._loader is None:
                self._loader = ThreadPoolExecutor(4, thread_name_prefix="goplug-load")
            self._loader.submit(fn)

    def _broken_file_for(self, name: str, namespace: str) -> ConfigError | None:
        stems = {file_stem(name, namespace), namespace + name, name}
        with self._lock:
            for path, error in self._broken.items():
                base = os.path.basename(path)[: -len(self.conf_ext)]
                if base in stems:
                    return error
        return None


def transport_for(conf: PluginConf, local: Transport, tcp: TcpTransport | None) -> Transport:
    """The transport that reaches ``conf``'s plugin, by the scheme of its ``Url``.

    ``local`` serves Unix sockets; ``tcp`` (if any) is the TCP transport the caller was given:
    ``https://`` needs one with TLS, ``http://`` one for plaintext loopback. ConfigError names
    what is missing.
    """
    if not conf.remote:
        return local
    label = file_stem(conf.name, conf.namespace)
    if conf.url.startswith("https://"):
        if tcp is None or tcp.tls is None:
            raise ConfigError(
                f"plugin {label} is reached over TLS ({conf.url}) and no certificates were "
                "given: pass tls=TLSConfig(ca=..., cert=..., key=...) (goplug: --tls CERTDIR)",
                conf.path or None,
            )
        return tcp
    if tcp is None or tcp.tls is not None:
        raise ConfigError(
            f"plugin {label} is reached in plaintext ({conf.url}), which is allowed only with "
            "insecure_loopback=True and the shared token (goplug: --insecure-loopback)",
            conf.path or None,
        )
    return tcp


def _same_endpoint(a: PluginConf, b: PluginConf) -> bool:
    return (a.sock, a.url, a.pid) == (b.sock, b.url, b.pid)
