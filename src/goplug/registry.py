"""The application side: :class:`PluginRegistry` discovers, loads, calls and unloads plugins."""

from __future__ import annotations

import atexit
import contextlib
import enum
import functools
import logging
import os
import select
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from goplug.client import ClientSettings, PluginClient, Subscription
from goplug.discovery import DirectoryDiscovery
from goplug.errors import (
    ConfigError,
    GoPlugError,
    PluginAlreadyLoaded,
    PluginConnectionError,
    PluginNotDiscovered,
    PluginNotLoaded,
    PluginStartError,
    RegistryClosed,
)
from goplug.launcher import (
    RESTART_POLICIES,
    Launcher,
    LaunchSettings,
    PluginProcess,
    RestartPolicy,
    describe_exit,
)
from goplug.process import Child
from goplug.transport import Transport, UnixTransport, check_owner
from goplug.wire import routes
from goplug.wire.pconf import (
    ENV_DIR,
    ENV_LAUNCH_TOKEN,
    ENV_NAME,
    ENV_NAMESPACE,
    MAX_PCONF_BYTES,
    PluginConf,
    check_name,
    check_protocol,
    file_stem,
    parse_pconf,
    write_atomically,
)

__all__ = [
    "PluginEvent",
    "PluginHandle",
    "PluginRegistry",
    "PluginState",
    "RegistrySettings",
]

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
            msg = client.call(method, data, timeout)
        except PluginConnectionError:
            self._registry._check_alive(self, client)
            raise
        if msg.status == 200:
            return msg.body
        raise routes.error_from_response(msg, method)

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


class PluginRegistry:
    """Discovers plugins announced in ``location`` and manages their lifecycle.

    With ``auto_discover`` the directory is watched: new plugins are discovered within
    milliseconds and loaded at once unless they ask for lazy loading. Without it, plugins are
    found when :meth:`load_plugin` asks for them.
    """

    def __init__(
        self,
        location: str | os.PathLike[str],
        auto_discover: bool = True,
        conf_ext: str = ".pconf",
        *,
        settings: RegistrySettings | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.location = os.path.abspath(os.fspath(location))
        self.conf_ext = conf_ext or ".pconf"
        self.auto_discover = auto_discover
        self.settings = settings or RegistrySettings()
        self._allowed = self.settings.allowed_uids or frozenset({os.getuid()})
        self._transport = transport or UnixTransport()
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

    def launch(
        self,
        command: Sequence[str] | str,
        *,
        name: str | None = None,
        namespace: str = "",
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        restart: RestartPolicy = "on-failure",
        max_restarts: int = 5,
        start_timeout: float = 10.0,
    ) -> PluginHandle:
        """Start a plugin process, wait until it announces itself, load it; return its handle.

        ``command`` is an argument list (any executable, any language), or a string naming a
        Python file or ``module:attr`` to run through ``goplug serve``. The process learns where
        to announce itself from the environment (``GOPLUG_DIR``, ``GOPLUG_LAUNCH_TOKEN``, see
        docs/PROTOCOL.md); ``env`` adds variables. It is recognised by the launch token it
        echoes in its `.pconf`, or, for plugins that know nothing of goplug (give ``name``),
        by its socket being served by the launched process or a descendant. With ``name`` the
        plugin must announce exactly that name and namespace.

        The registry keeps it alive: ``restart`` is ``never``, ``on-failure`` (default) or
        ``always``, with exponential backoff and at most ``max_restarts`` restarts within the
        restart window (``settings.launch``); after that a "failed" event is sent. Unloading the
        handle or closing the registry stops the process. Raises PluginStartError (carrying the
        exit code and the last stderr lines) when it exits or stays silent for
        ``start_timeout`` seconds, ConfigError for bad arguments.
        """
        self._check_open()
        argv = _command_line(command)
        if restart not in RESTART_POLICIES:
            raise ConfigError(f"restart must be one of {sorted(RESTART_POLICIES)}, not {restart!r}")
        if max_restarts < 0 or start_timeout <= 0:
            raise ConfigError("max_restarts must be >= 0 and start_timeout > 0")
        if name is not None:
            check_name(name, "name")
            check_name(namespace, "namespace")
        proc = PluginProcess(
            argv,
            dict(env or {}),
            os.fspath(cwd) if cwd is not None else None,
            name,
            namespace,
            restart,
            max_restarts,
            start_timeout,
        )
        with self._lock:
            self._check_open()
            if name is not None:
                identity = (namespace, name)
                other = self._launches.get(identity)
                if other is not None and other.state not in ("stopped", "failed"):
                    raise PluginAlreadyLoaded(f"plugin {proc.label} was launched already")
                handle = self._handles.get(identity)
                if handle is not None and handle.state is PluginState.LOADED:
                    raise PluginAlreadyLoaded(f"plugin {proc.label} is already loaded")
                self._launches[identity] = proc
            else:
                self._unnamed.append(proc)
            if self._launcher is None:
                self._launcher = Launcher(self._on_process_exit)
                _LAUNCHING.add(self)
            launcher = self._launcher
        child = None
        try:
            child = self._spawn(launcher, proc)
            return self._await_start(proc, child)
        except BaseException:
            with self._lock:
                with proc.cond:
                    proc.state = "stopping"  # this exit is no crash to restart after
                identity = (proc.namespace, proc.name or "")
                if self._launches.get(identity) is proc:
                    del self._launches[identity]
                with contextlib.suppress(ValueError):
                    self._unnamed.remove(proc)
            if child is not None:
                child.stop(self.settings.launch.stop_grace)
                self._remove_leftovers(proc, child)
            with proc.cond:
                proc.state = "failed"
            raise

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

    def _refuse_launched(self, conf: PluginConf, reason: str) -> None:
        """A process this registry is starting announced itself unusably: its launch fails now."""
        if not conf.launch:
            return
        with self._lock:
            procs = [*self._launches.values(), *self._unnamed]
        for proc in procs:
            if proc.token == conf.launch and proc.state in ("starting", "restarting"):
                with proc.cond:
                    proc.refusal = reason
                    proc.cond.notify_all()

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

        with self._lock:
            if self._closed:
                return
            if self._loader is None:
                self._loader = ThreadPoolExecutor(4, thread_name_prefix="goplug-load")
            self._loader.submit(run)

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
        if not os.path.lexists(conf.sock):
            raise PluginConnectionError(f"plugin {handle.label}: no socket at {conf.sock}")
        check_owner(conf.sock, self._allowed, f"socket of {handle.label}", want_socket=True)
        client = PluginClient(conf, self._transport, self.settings.client)
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

    # -- launched plugins ----------------------------------------------------------------------

    def _spawn(self, launcher: Launcher, proc: PluginProcess) -> Child:
        token = proc.new_token()
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")  # its log lines arrive as they are written
        env.update(proc.env)
        env[ENV_DIR] = self.location
        env[ENV_LAUNCH_TOKEN] = token
        if proc.name is not None:
            env[ENV_NAME] = proc.name
            env[ENV_NAMESPACE] = proc.namespace
        try:
            return launcher.spawn(proc, env, token)
        except OSError as exc:
            raise PluginStartError(f"cannot start {proc.label}: {exc}", None) from None

    def _await_start(self, proc: PluginProcess, child: Child) -> PluginHandle:
        """Wait until ``child`` is loaded; raise PluginStartError if it exits or times out."""
        deadline = time.monotonic() + proc.start_timeout
        with proc.cond:
            while True:
                handle = self._handles.get((proc.namespace, proc.name or ""))
                if proc.loaded_child is child and handle is not None:
                    return handle
                if proc.refusal:
                    raise PluginStartError(
                        f"{proc.label}: {proc.refusal}", child.exit_code, list(child.stderr_tail)
                    )
                if child.has_exited():
                    code = child.reap()
                    raise PluginStartError(
                        f"{proc.label} (pid {child.pid}) ended ({describe_exit(code)}) "
                        "before it announced itself",
                        code,
                        list(child.stderr_tail),
                    )
                if self._closed:
                    raise RegistryClosed("the registry was closed while a plugin was starting")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PluginStartError(
                        f"{proc.label} (pid {child.pid}) did not announce itself within "
                        f"{proc.start_timeout:g} s (it must write its .pconf in {self.location})",
                        None,
                        list(child.stderr_tail),
                    )
                if not self.auto_discover:
                    proc.cond.release()  # nobody watches the directory: look ourselves
                    try:
                        self._discovery.scan()
                    finally:
                        proc.cond.acquire()
                    if proc.loaded_child is child or proc.refusal:
                        continue
                # Announcements, loads and exits notify the condition; the bound on the wait
                # only paces the directory scans done without auto discovery.
                proc.cond.wait(min(remaining, 1.0 if self.auto_discover else 0.05))

    def _launch_for(self, conf: PluginConf) -> tuple[PluginProcess | None, str]:
        """Find the launched plugin an announcement belongs to; return it and a refusal."""
        with self._lock:
            proc = self._launches.get(conf.identity)
            if proc is not None and proc.state in ("stopped", "failed", "stopping"):
                proc = None
            if proc is not None:
                if conf.launch and conf.launch != proc.token:
                    return proc, "it does not carry the launch token of the process started"
                return proc, ""
            if not conf.launch:
                return None, ""
            for candidate in [*self._unnamed, *self._launches.values()]:
                if candidate.token != conf.launch:
                    continue
                if candidate.name is not None:
                    refusal = (
                        f"the launched process announced {file_stem(conf.name, conf.namespace)}, "
                        f"not {candidate.label}"
                    )
                    with candidate.cond:
                        candidate.refusal = refusal
                        candidate.cond.notify_all()
                    return None, refusal
                self._unnamed.remove(candidate)
                candidate.name, candidate.namespace = conf.name, conf.namespace
                self._launches[conf.identity] = candidate
                child = candidate.child
                if child is not None:
                    child.logger = logging.getLogger(
                        "goplug.plugin."
                        + (f"{conf.namespace}.{conf.name}" if conf.namespace else conf.name)
                    )
                return candidate, ""
        return None, ""

    def _check_launched_peer(
        self, handle: PluginHandle, conf: PluginConf, client: PluginClient
    ) -> None:
        """A launched plugin without the token must be served by the launched process tree."""
        proc = handle.process
        if proc is None or proc.state in ("stopped", "failed"):
            return
        if conf.launch and conf.launch == proc.token:
            return
        pid = client.peer_pid()
        if not proc.owns(pid):
            raise ConfigError(
                f"plugin {handle.label} was launched by this registry, but its socket is served "
                f"by pid {pid}, not by the launched pid {proc.pid} or its descendants",
                conf.path or None,
            )

    def _on_process_exit(self, proc: PluginProcess, child: Child) -> None:
        """A launched process ended (on its own thread): lose the plugin, restart or give up."""
        code = child.reap()
        with proc.cond:
            proc.cond.notify_all()
            if proc.child is not child or proc.state not in ("running", "restarting"):
                return  # a start in progress reports it; a stop expects it
            proc.reason = f"pid {child.pid} ended ({describe_exit(code)})"
        log.warning("launched plugin %s: %s", proc.label, proc.reason)
        handle = self._handles.get((proc.namespace, proc.name or ""))
        if handle is not None:
            self._lose(handle, proc.reason)
        self._remove_leftovers(proc, child)
        with self._lock:
            if self._closed:
                return
            with proc.cond:
                if proc.child is not child or proc.state not in ("running", "restarting"):
                    return  # unloaded meanwhile: the stop wins over a restart
                delay = proc.next_restart(code, self.settings.launch)
            launcher = self._launcher
        if delay is not None and launcher is not None:
            log.info("restarting %s in %.2f s", proc.label, delay)
            launcher.later(delay, lambda: self._restart(proc))
            return
        if proc.failed:
            reason = (
                f"{proc.reason}; gave up after {proc.max_restarts} restarts in "
                f"{self.settings.launch.restart_window:g} s"
            )
            tail = list(child.stderr_tail)[-5:]
            if tail:
                reason += "; last stderr lines: " + " | ".join(tail)
            self._give_up(proc, reason)
        else:
            self._record_launch(proc)
            with proc.cond:
                proc.cond.notify_all()

    def _give_up(self, proc: PluginProcess, reason: str) -> None:
        """A launched plugin will not be restarted again: say so with a "failed" event."""
        with proc.cond:
            proc.state = "failed"
            proc.reason = reason
            proc.cond.notify_all()
        self._record_launch(proc)
        log.error("launched plugin %s failed: %s", proc.label, reason)
        handle = self._handles.get((proc.namespace, proc.name or ""))
        if handle is not None:
            with self._lock:
                listeners = list(self._listeners)
            self._emit("failed", handle, listeners, reason)

    def _restart(self, proc: PluginProcess) -> None:
        """On the launcher thread: start the next process, then wait for it elsewhere."""
        with self._lock:  # close() either sees the new process, or this sees close()
            launcher = self._launcher
            if self._closed or launcher is None or proc.state != "restarting":
                return
            proc.restarts += 1
            try:
                child = self._spawn(launcher, proc)
            except PluginStartError as exc:
                failure: PluginStartError | None = exc
            else:
                failure = None
        if failure is not None:
            self._give_up(proc, f"restart {proc.restarts} failed: {failure}")
            return

        def wait() -> None:
            try:
                self._await_start(proc, child)
            except GoPlugError as exc:
                log.warning("restart of %s failed: %s", proc.label, exc)
                child.signal_group(9)  # its exit brings the policy back in
            else:
                log.info("restarted %s (pid %d)", proc.label, child.pid)

        threading.Thread(target=wait, name="goplug-restart", daemon=True).start()

    def _stop_launched(self, procs: list[PluginProcess]) -> None:
        """Stop launched processes together: SIGTERM, then SIGKILL after the grace period."""
        children: list[tuple[PluginProcess, Child]] = []
        for proc in procs:
            with proc.cond:
                if proc.state in ("stopped", "failed") and (
                    proc.child is None or proc.child.exit_code is not None
                ):
                    continue
                proc.state = "stopping"
                child = proc.child
            if child is not None:
                children.append((proc, child))
                if not child.has_exited():
                    child.signal_group(15)
        deadline = time.monotonic() + self.settings.launch.stop_grace
        for _, child in children:
            child.wait_exit(max(0.0, deadline - time.monotonic()))
        for proc, child in children:
            if not child.has_exited():
                log.warning(
                    "launched plugin %s (pid %d) ignored SIGTERM for %g s: killing it",
                    proc.label,
                    child.pid,
                    self.settings.launch.stop_grace,
                )
                child.signal_group(9)
        for proc, child in children:
            child.wait_exit(5.0)
            child.reap()
            self._remove_leftovers(proc, child)
            with proc.cond:
                proc.state = "stopped"
                proc.cond.notify_all()
            self._record_launch(proc)

    @staticmethod
    def _send_stop(client: PluginClient, timeout: float) -> None:
        with contextlib.suppress(GoPlugError):
            client.request(routes.STOP, b"", timeout)
        client.close()

    def _record_launch(self, proc: PluginProcess) -> None:
        """Keep ``.<stem>.launch`` up to date, for ``goplug ls`` in other processes."""
        with proc.cond:  # one writer at a time, so the last state written is the last one
            self._write_launch_record(proc)

    def _write_launch_record(self, proc: PluginProcess) -> None:
        if proc.name is None:
            return
        path = os.path.join(self.location, "." + file_stem(proc.name, proc.namespace) + ".launch")
        if proc.state in ("stopping", "stopped") or self._closed:
            with contextlib.suppress(OSError):
                os.unlink(path)
            return
        import json

        record = {
            "Name": proc.name,
            "NameSpace": proc.namespace,
            "Pid": proc.pid,
            "Started": proc.started,
            "Restarts": proc.restarts,
            "State": proc.state,
            "Command": proc.command,
            "Registry": os.getpid(),
        }
        try:
            write_atomically(path, json.dumps(record).encode())
        except OSError as exc:
            log.debug("cannot write %s: %s", path, exc)

    def _remove_leftovers(self, proc: PluginProcess, child: Child) -> None:
        """Remove the announce file and socket a killed launched process could not remove."""
        identity = (proc.namespace, proc.name or "")
        handle = self._handles.get(identity)
        conf = handle.conf if handle is not None else None
        if conf is None or not conf.path:
            return
        try:
            fresh = self._read_conf(conf.path)
        except (ConfigError, OSError):
            return
        if (fresh.launch and fresh.launch == proc.token) or (fresh.pid == child.pid):
            for path, want_socket in ((fresh.sock, True), (fresh.path, False)):
                with contextlib.suppress(OSError):
                    info = os.lstat(path)
                    if stat.S_ISSOCK(info.st_mode) == want_socket and info.st_uid == os.getuid():
                        os.unlink(path)

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
                    child.signal_group(9)  # its exit restarts it
                else:
                    self._lose(handle, reason)
        finally:
            handle._pinging = False

    def _run_in_pool(self, fn: Callable[[], None]) -> None:
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


_LAUNCHING: weakref.WeakSet[PluginRegistry] = weakref.WeakSet()
"""Registries with launched plugins: closed at interpreter exit, stopping those plugins."""


@atexit.register
def _close_launching() -> None:
    for registry in list(_LAUNCHING):
        try:
            registry.close()
        except Exception:
            log.exception("closing a registry at exit failed")


def _command_line(command: Sequence[str] | str) -> list[str]:
    if isinstance(command, str):
        if not command:
            raise ConfigError("empty command")
        # A Python file or module:attr, served by goplug serve with this interpreter.
        return [sys.executable, "-m", "goplug", "serve", command]
    argv = [os.fspath(arg) for arg in command]
    if not argv or not argv[0]:
        raise ConfigError("empty command")
    return argv


def _same_endpoint(a: PluginConf, b: PluginConf) -> bool:
    return (a.sock, a.url, a.pid) == (b.sock, b.url, b.pid)
