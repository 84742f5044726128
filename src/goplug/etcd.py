"""Announcements in etcd: plugins on many hosts, one view of them in every registry.

A plugin puts its announcement at ``<prefix>/<namespace>/<name>`` on a lease it keeps alive
(:class:`EtcdAnnouncer`); if the plugin dies, the lease expires and etcd deletes the key. A
registry (:class:`EtcdDiscovery`) lists the prefix once, then watches it from the revision right
after that list, so no change can fall between the two. When etcd goes away the watcher keeps
what it knew (plugins already loaded go on working: they are reached directly, not through etcd)
and resumes from the last revision it saw; if etcd compacted that revision meanwhile, it lists
again and reports the difference. aetcd is asyncio while goplug is threads: each object runs its
own event loop in a daemon thread, and the discovery hands its reports to one more thread, so a
slow change handler never stalls the connection to etcd.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from goplug.discovery import ChangeHandler
from goplug.errors import ConfigError, PluginConnectionError

if TYPE_CHECKING:
    from goplug.tls import TLSConfig

__all__ = [
    "DEFAULT_PREFIX",
    "EtcdAnnouncer",
    "EtcdDiscovery",
    "EtcdLocation",
    "identity_of_key",
    "is_etcd_location",
    "key_for",
    "parse_etcd_location",
]

log = logging.getLogger("goplug.etcd")

DEFAULT_PREFIX = "/goplug"
"""The key prefix of a location that names none (``etcd://host:2379``)."""

DEFAULT_PORT = 2379
MIN_LEASE_TTL = 2
_FIRST_RETRY = 0.05
_T = TypeVar("_T")


# -- locations and keys ------------------------------------------------------------------------


class EtcdLocation(NamedTuple):
    """A parsed ``etcd://`` or ``etcds://`` location."""

    endpoints: tuple[tuple[str, int], ...]
    """(host, port) of each etcd member to try, in order; IPv6 hosts without brackets."""
    prefix: str
    """Key prefix of the announcements: starts with ``/``, never ends with one."""
    secure: bool
    """True for ``etcds://``: TLS with a client certificate to etcd."""

    def hosts(self) -> str:
        """The endpoints as ``host:port,host:port`` (for messages)."""
        return ",".join(_target(host, port) for host, port in self.endpoints)


def is_etcd_location(text: object) -> bool:
    """Tell whether ``text`` is an etcd location (``etcd://`` or ``etcds://``), not a directory."""
    return isinstance(text, str) and text[:8].lower().startswith(("etcd://", "etcds://"))


def parse_etcd_location(text: str) -> EtcdLocation:
    """Parse ``etcd://host:port[,host:port...]/prefix`` (``etcds://`` for TLS to etcd).

    The port defaults to 2379 and the prefix to :data:`DEFAULT_PREFIX`. Raises ConfigError.
    """
    usage = "expected etcd://HOST:PORT[,HOST:PORT...]/PREFIX (etcds:// for TLS to etcd)"
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in ("etcd", "etcds"):
        raise ConfigError(f"invalid etcd location {text!r}: {usage}")
    if any(c in rest for c in "?#@") or any(c.isspace() or ord(c) < 32 for c in rest):
        raise ConfigError(
            f"invalid etcd location {text!r}: no credentials, query, fragment or spaces allowed"
        )
    netloc, _, path = rest.partition("/")
    if not netloc:
        raise ConfigError(f"invalid etcd location {text!r}: no endpoint; {usage}")
    endpoints = tuple(_parse_endpoint(part, text) for part in netloc.split(","))
    path = path.rstrip("/")
    if any(not segment for segment in path.split("/")) and path:
        raise ConfigError(f"invalid etcd location {text!r}: empty segment in the key prefix")
    prefix = "/" + path if path else DEFAULT_PREFIX
    return EtcdLocation(endpoints, prefix, scheme.lower() == "etcds")


def _parse_endpoint(part: str, text: str) -> tuple[str, int]:
    if part.startswith("["):
        host, bracket, tail = part[1:].partition("]")
        if not bracket or not host or (tail and not tail.startswith(":")):
            raise ConfigError(f"invalid etcd location {text!r}: bad endpoint {part!r}")
        port_text = tail[1:] if tail else None
    else:
        host, colon, port_text_ = part.partition(":")
        port_text = port_text_ if colon else None
        if ":" in port_text_:
            raise ConfigError(
                f"invalid etcd location {text!r}: bad endpoint {part!r} "
                "(an IPv6 address goes in brackets: [::1]:2379)"
            )
    if not host or not all(c.isalnum() or c in ".-_:%" for c in host):
        raise ConfigError(f"invalid etcd location {text!r}: bad host in endpoint {part!r}")
    if port_text is None:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"invalid etcd location {text!r}: bad port in endpoint {part!r}")
    return host, int(port_text)


def key_for(prefix: str, name: str, namespace: str) -> str:
    """The key a plugin announces itself at: ``<prefix>/<namespace>/<name>``."""
    return f"{prefix}/{namespace}/{name}"


def identity_of_key(prefix: str, key: str) -> tuple[str, str] | None:
    """(namespace, name) of an announcement key, or None if ``key`` is not one under ``prefix``."""
    head = prefix + "/"
    if not key.startswith(head):
        return None
    namespace, slash, name = key[len(head) :].partition("/")
    if not slash or not name or "/" in name:
        return None
    return namespace, name


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: BaseException) -> str:
    """One line saying why an etcd call failed (gRPC errors are several lines long)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    text = ""
    details = getattr(exc, "details", None)
    if callable(details):
        with contextlib.suppress(Exception):
            text = str(details() or "")
    if not text:
        text = str(exc).strip()
        cause = exc.__cause__
        if not text and cause is not None:
            return _reason(cause)
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


# -- connections -------------------------------------------------------------------------------


def _import_aetcd() -> Any:
    try:
        import aetcd  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(
            "etcd locations need the aetcd package: pip install 'goplug[etcd]'"
        ) from None
    return aetcd


@functools.cache
def _client_type() -> Any:
    """The client class of aetcd, extended with TLS (aetcd opens plaintext channels only)."""
    base: Any = _import_aetcd().Client
    from aetcd import rpc, watcher

    class Client(base):  # type: ignore[misc]
        def __init__(
            self,
            host: str,
            port: int,
            credentials: Any,
            options: dict[str, Any],
            timeout: float,
        ) -> None:
            super().__init__(host=host, port=port, timeout=timeout, options=options)
            self._credentials = credentials

        async def connect(self) -> None:
            if self._credentials is None:
                await super().connect()
                return
            if self._connected.is_set():
                return
            # What aetcd's connect() does, on a secure channel instead of an insecure one.
            self.channel = rpc.secure_channel(
                f"{self._host}:{self._port}",
                self._credentials,
                options=list(self._options.items()),
            )
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()

    return Client


class _Connector:
    """Makes clients for the endpoints of one location, each in turn."""

    def __init__(self, location: EtcdLocation, tls: TLSConfig | None, rpc_timeout: float) -> None:
        _import_aetcd()
        self.location = location
        self.rpc_timeout = rpc_timeout
        self._next = 0
        self._credentials: Any = None
        if location.secure:
            if tls is None:
                raise ConfigError(
                    f"etcds://{location.hosts()} needs TLS certificates for etcd: "
                    "tls=TLSConfig(ca, cert, key)"
                )
            import grpc  # type: ignore[import-untyped]

            ca, cert, key = tls.pem()
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert
            )
        self._options: dict[str, Any] = {
            # gRPC shares connections between channels by default: a new client would inherit
            # the reconnect backoff of a dead one (up to two minutes) and fail without trying.
            "grpc.use_local_subchannel_pool": 1,
            "grpc.initial_reconnect_backoff_ms": 100,
            "grpc.min_reconnect_backoff_ms": 100,
            "grpc.max_reconnect_backoff_ms": 1000,
            # A silent network (no RST) is otherwise noticed by a watch only when TCP gives up.
            # etcd refuses pings more often than every 5 s, and pings without a call at all.
            "grpc.keepalive_time_ms": 10_000,
            "grpc.keepalive_timeout_ms": 5_000,
            "grpc.keepalive_permit_without_calls": 0,
        }

    def client(self) -> Any:
        """A client for the next endpoint (it connects on its first call)."""
        endpoints = self.location.endpoints
        host, port = endpoints[self._next % len(endpoints)]
        self._next += 1
        host = f"[{host}]" if ":" in host else host
        return _client_type()(host, port, self._credentials, self._options, self.rpc_timeout)


async def _close_client(client: Any) -> None:
    if client is None:
        return
    try:
        await asyncio.wait_for(client.close(), 1.0)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.debug("closing an etcd client failed: %s", _reason(exc))


class _LoopThread:
    """An asyncio event loop running in a daemon thread of its own."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            try:
                tasks = asyncio.all_tasks(self.loop)
                for task in tasks:
                    task.cancel()
                if tasks:
                    self.loop.run_until_complete(asyncio.wait(tasks, timeout=1.0))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            except Exception:
                log.debug("etcd event loop ended untidily", exc_info=True)
            finally:
                self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Run ``coro`` on the loop; the result comes back through the future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the loop soon (nothing if the loop has ended)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn)

    def stop(self) -> None:
        """End the loop once what is running now yields."""
        self.call(self.loop.stop)

    def join(self, timeout: float | None) -> bool:
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)
        return not self.thread.is_alive()


class _Compacted(Exception):
    """The revision to watch from is gone: list again."""


class _Report(NamedTuple):
    changed: list[str]
    removed: list[str]
    done: threading.Event | None


# -- discovery ---------------------------------------------------------------------------------


class EtcdDiscovery:
    """Reports announcement keys appearing, changing and disappearing under an etcd prefix.

    Implements :class:`goplug.discovery.Discovery`. ``on_change(changed, removed)`` receives
    keys (``<prefix>/<namespace>/<name>``); :meth:`read` gives a key's value. The handler and
    ``on_tick`` (about every ``tick_interval`` seconds) run in one thread of their own, one call
    at a time, in the order the changes happened in etcd. Keys under the prefix that are not
    ``<namespace>/<name>`` (deeper or shallower) are not announcements and are ignored.

    ``tls`` is used for ``etcds://`` locations only (with ``etcd://`` the connection to etcd is
    plaintext). While etcd cannot be reached nothing is reported: the watcher retries with a
    growing delay, up to ``reconnect_max_delay`` seconds between attempts. ``start()`` waits up
    to ``start_timeout`` seconds for the first list (so announcements already in etcd are
    reported when it returns), then goes on in the background; :meth:`scan` gives up after
    ``scan_timeout`` seconds.
    """

    def __init__(
        self,
        location: str | EtcdLocation,
        on_change: ChangeHandler,
        on_tick: Callable[[], None] | None = None,
        tick_interval: float = 0.5,
        tls: TLSConfig | None = None,
        reconnect_max_delay: float = 2.0,
        scan_timeout: float = 5.0,
        start_timeout: float = 3.0,
    ) -> None:
        self.location = (
            location if isinstance(location, EtcdLocation) else parse_etcd_location(location)
        )
        self.prefix = self.location.prefix
        self._on_change = on_change
        self._on_tick = on_tick
        self._tick = tick_interval
        self._max_delay = max(reconnect_max_delay, _FIRST_RETRY)
        self._scan_timeout = scan_timeout
        self._start_timeout = start_timeout
        self._connector = _Connector(self.location, tls, rpc_timeout=scan_timeout)
        self._key_start = (self.prefix + "/").encode()

        # State shared by the loop thread and the callers of scan/read/forget; under _lock.
        self._lock = threading.Lock()
        self._values: dict[str, tuple[int, bytes]] = {}  # key -> (mod revision, value)
        self._reported: dict[str, int] = {}  # key -> mod revision last reported
        self._dirty: set[str] = set()  # keys whose report may be out of date
        self._list_rev = 0  # revision of the newest full list applied
        self._rev = 0  # every change up to this revision is applied

        self._queue: queue.SimpleQueue[_Report | None] = queue.SimpleQueue()
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="goplug-etcd-events", daemon=True
        )
        self._loop: _LoopThread | None = None
        self._loop_lock = threading.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        self._live_client: Any = None  # the watcher's connected client, for scan() to reuse
        self._need_list = True
        self._delay = _FIRST_RETRY  # before the next reconnection attempt; reset once watching
        self._first_list = threading.Event()
        self._watching = threading.Event()
        self._stopped = threading.Event()
        self.mode = "stopped"
        """``watching``, ``reconnecting`` (etcd unreachable, or not yet reached) or ``stopped``."""

    # -- Discovery protocol --------------------------------------------------------------------

    def scan(self) -> None:
        """List the prefix now and report every difference (PluginConnectionError: no etcd).

        With watching started, the report goes through the handler thread like the others and
        this returns once it has been handled.
        """
        if self._stopped.is_set():
            return
        future = self._ensure_loop().submit(self._list_once())
        try:
            future.result(self._scan_timeout + 1.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise PluginConnectionError(
                f"etcd at {self.location.hosts()} did not answer within {self._scan_timeout:g} s"
            ) from None
        except concurrent.futures.CancelledError:
            return  # stopped meanwhile
        self._report_now()

    def start(self) -> None:
        """Watch in the background; return once watching, the first list reported.

        If etcd cannot be reached within ``start_timeout``, this logs a warning and returns;
        watching begins when etcd answers.
        """
        if self._dispatcher.is_alive() or self._stopped.is_set():
            return
        self.mode = "reconnecting"
        loop = self._ensure_loop()
        self._dispatcher.start()

        def launch() -> None:
            if not self._stopped.is_set():
                self._watch_task = loop.loop.create_task(self._watch_forever())

        loop.call(launch)
        deadline = time.monotonic() + self._start_timeout
        ready = self._first_list.wait(self._start_timeout) and self._watching.wait(
            max(0.0, deadline - time.monotonic())
        )
        if not ready and not self._stopped.is_set():
            log.warning(
                "etcd at %s not reachable yet; plugins will be discovered when it is",
                self.location.hosts(),
            )

    def stop(self) -> None:
        """Stop watching at once (the watch is cancelled; pending reports are dropped)."""
        self._stopped.set()
        self.mode = "stopped"
        self._queue.put(None)
        with self._loop_lock:
            loop = self._loop
        if loop is not None:
            loop.call(self._cancel_watch)
            loop.stop()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the watching threads to end; return True if they have."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        with self._loop_lock:
            loop = self._loop
        done = loop.join(left()) if loop is not None else True
        if self._dispatcher.is_alive() and threading.current_thread() is not self._dispatcher:
            self._dispatcher.join(left())
        return done and not self._dispatcher.is_alive()

    # -- what was found ------------------------------------------------------------------------

    def read(self, key: str) -> bytes:
        """The latest value of an announcement key (ConfigError if it is gone)."""
        with self._lock:
            entry = self._values.get(key)
        if entry is None:
            raise ConfigError("no longer announced", key)
        return entry[1]

    def forget(self, key: str) -> None:
        """Forget what was reported of ``key`` so the next look reports it again."""
        with self._lock:
            self._reported.pop(key, None)
            self._dirty.add(key)

    def keys(self) -> list[str]:
        """The announcement keys known now."""
        with self._lock:
            return sorted(self._values)

    # -- state ---------------------------------------------------------------------------------

    def _decode(self, raw: bytes) -> str | None:
        if not raw.startswith(self._key_start):
            return None
        try:
            key = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return key if identity_of_key(self.prefix, key) is not None else None

    def _apply_list(self, revision: int, kvs: Iterable[Any]) -> None:
        values: dict[str, tuple[int, bytes]] = {}
        for kv in kvs:
            key = self._decode(kv.key)
            if key is not None:
                values[key] = (kv.mod_revision, bytes(kv.value))
        with self._lock:
            if revision < self._rev:
                return  # a concurrent look already applied newer changes
            self._dirty.update(self._values, values)
            self._values = values
            self._list_rev = self._rev = revision

    def _apply_events(self, events: Iterable[Any]) -> None:
        with self._lock:
            for event in events:
                revision = event.kv.mod_revision
                # A list at _list_rev already holds every change up to it.
                if revision <= self._list_rev:
                    continue
                self._rev = max(self._rev, revision)
                key = self._decode(event.kv.key)
                if key is None:
                    continue
                if event.type == 0:  # PUT
                    self._values[key] = (revision, bytes(event.kv.value))
                else:
                    self._values.pop(key, None)
                self._dirty.add(key)
            self._enqueue_locked(None)

    def _diff_locked(self) -> tuple[list[str], list[str]]:
        changed: list[str] = []
        removed: list[str] = []
        for key in sorted(self._dirty):
            entry = self._values.get(key)
            seen = self._reported.get(key)
            if entry is None:
                if seen is not None:
                    del self._reported[key]
                    removed.append(key)
            elif entry[0] != seen:
                self._reported[key] = entry[0]
                changed.append(key)
        self._dirty.clear()
        return changed, removed

    def _enqueue_locked(self, done: threading.Event | None) -> None:
        # Under _lock, so the queue holds reports in the order the state changed.
        changed, removed = self._diff_locked()
        if changed or removed or done is not None:
            self._queue.put(_Report(changed, removed, done))

    def _report_now(self) -> None:
        done = threading.Event()
        with self._lock:
            via_thread = (
                self._dispatcher.is_alive() and threading.current_thread() is not self._dispatcher
            )
            if via_thread:
                self._enqueue_locked(done)
            else:
                changed, removed = self._diff_locked()
        if via_thread:
            # Bounded: a handler blocked on this caller must not deadlock it; the report stays
            # queued and is handled anyway.
            done.wait(self._scan_timeout)
        elif changed or removed:
            self._call_handler(changed, removed)

    def _call_handler(self, changed: list[str], removed: list[str]) -> None:
        try:
            self._on_change(changed, removed)
        except Exception:
            log.exception("discovery handler failed")

    def _dispatch(self) -> None:
        try:
            self._dispatch_loop()
        finally:
            # Release scan() callers waiting for reports that will not be handled now.
            with contextlib.suppress(queue.Empty):
                while True:
                    report = self._queue.get_nowait()
                    if report is not None and report.done is not None:
                        report.done.set()

    def _dispatch_loop(self) -> None:
        next_tick = time.monotonic() + self._tick
        while True:
            wait = max(0.0, next_tick - time.monotonic()) if self._on_tick is not None else None
            try:
                report = self._queue.get(timeout=wait)
            except queue.Empty:
                report = _Report([], [], None)
            if report is None or self._stopped.is_set():
                return
            if report.changed or report.removed:
                self._call_handler(report.changed, report.removed)
            if report.done is not None:
                report.done.set()
            if self._on_tick is not None and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self._tick
                with self._lock:
                    if self._dirty:  # forgotten keys: the look that reports them again
                        self._enqueue_locked(None)
                try:
                    self._on_tick()
                except Exception:
                    log.exception("periodic health check failed")

    # -- the loop side -------------------------------------------------------------------------

    def _ensure_loop(self) -> _LoopThread:
        with self._loop_lock:
            if self._loop is None:
                self._loop = _LoopThread("goplug-etcd")
            return self._loop

    def _cancel_watch(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()

    async def _list(self, client: Any) -> None:
        result = await asyncio.wait_for(
            client.get_prefix(self._key_start), self._connector.rpc_timeout
        )
        self._apply_list(result.header.revision, result.kvs)

    async def _list_once(self) -> None:
        """One list for scan(): on the watcher's client if it has one, else on new ones."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._scan_timeout
        reason = "no endpoint tried"
        if self._live_client is not None:
            try:
                await asyncio.wait_for(self._list(self._live_client), self._scan_timeout)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = _reason(exc)
        tries = len(self.location.endpoints)
        for attempt in range(tries):
            left = deadline - loop.time()
            if left <= 0:
                break
            client = self._connector.client()
            try:
                # Share what is left between the endpoints not tried yet.
                await asyncio.wait_for(self._list(client), max(left / (tries - attempt), 0.5))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = _reason(exc)
            finally:
                await _close_client(client)
        raise PluginConnectionError(
            f"cannot list plugin announcements in etcd at {self.location.hosts()} "
            f"(prefix {self.prefix}): {reason}"
        )

    async def _watch_forever(self) -> None:
        client: Any = None
        warned = False
        try:
            while True:
                try:
                    if client is None:
                        client = self._connector.client()
                    if self._need_list:
                        await self._list(client)
                        self._need_list = False
                        with self._lock:
                            first = not self._first_list.is_set()
                            self._enqueue_locked(self._first_list if first else None)
                    self._live_client = client
                    await self._watch(client)
                except asyncio.CancelledError:
                    raise
                except _Compacted as exc:
                    log.info("etcd compacted past revision %d (%s): listing again", self._rev, exc)
                    self._need_list = True
                    continue
                except Exception as exc:
                    self._live_client = None
                    await _close_client(client)
                    client = None
                    if self.mode == "watching" or not warned:
                        log.warning(
                            "etcd at %s unreachable (%s); retrying (plugins already found are "
                            "kept)",
                            self.location.hosts(),
                            _reason(exc),
                        )
                        warned = True
                    else:
                        log.debug("etcd still unreachable: %s", _reason(exc))
                    if not self._stopped.is_set():
                        self.mode = "reconnecting"
                    await asyncio.sleep(self._delay)
                    self._delay = min(self._delay * 2, self._max_delay)
        finally:
            self._live_client = None
            await _close_client(client)

    async def _watch(self, client: Any) -> None:
        """Watch the prefix from the revision after the last one applied; raise when it ends."""
        from aetcd import rpc
        from grpc.aio import EOF  # type: ignore[import-untyped]

        await client.connect()
        call = rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
        try:
            start = self._rev + 1
            request = rpc.WatchCreateRequest(
                key=self._key_start,
                range_end=_prefix_end(self._key_start),
                start_revision=start,
            )
            await call.write(rpc.WatchRequest(create_request=request))
            # A server that accepts connections but does not answer must not hold us forever.
            response = await asyncio.wait_for(call.read(), self._connector.rpc_timeout)
            while True:
                if response is EOF:
                    raise ConnectionError("etcd ended the watch")
                if response.created:
                    self._delay = _FIRST_RETRY
                    if self.mode != "watching":
                        log.info(
                            "watching etcd at %s from revision %d",
                            self.location.hosts(),
                            start,
                        )
                    if not self._stopped.is_set():
                        self.mode = "watching"
                    self._watching.set()
                if response.compact_revision:
                    raise _Compacted(f"oldest revision kept: {response.compact_revision}")
                if response.canceled:
                    raise ConnectionError(
                        f"etcd cancelled the watch: {response.cancel_reason or 'no reason given'}"
                    )
                if response.events:
                    self._apply_events(response.events)
                response = await call.read()
        finally:
            call.cancel()


def _prefix_end(prefix: bytes) -> bytes:
    """The end of the key range that holds every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


# -- announcing --------------------------------------------------------------------------------


class EtcdAnnouncer:
    """Keeps one announcement key in etcd, on a lease, for as long as it runs.

    :meth:`start` grants a lease of ``ttl`` seconds (whole seconds, at least 2), puts the key on
    it and returns once that worked (PluginConnectionError after ``start_timeout``). A thread of
    its own then refreshes the lease every third of the TTL: if the process dies, etcd deletes
    the key when the lease runs out. If the lease is found gone (it expired while etcd could not
    be reached), a new one is granted and the key put again; while etcd cannot be reached it
    retries, up to ``reconnect_max_delay`` seconds apart. :meth:`stop` revokes the lease, which
    deletes the key at once. ``tls`` is used for ``etcds://`` locations only.
    """

    def __init__(
        self,
        location: str | EtcdLocation,
        key: str,
        value: bytes,
        ttl: float = 5.0,
        tls: TLSConfig | None = None,
        start_timeout: float = 10.0,
        reconnect_max_delay: float = 2.0,
    ) -> None:
        self.location = (
            location if isinstance(location, EtcdLocation) else parse_etcd_location(location)
        )
        if not ttl >= MIN_LEASE_TTL:
            raise ConfigError(
                f"the etcd lease TTL must be at least {MIN_LEASE_TTL} s (got {ttl:g}): "
                "etcd itself refuses shorter ones"
            )
        self.key = key
        self.ttl = math.ceil(ttl)
        """The lease TTL in whole seconds."""
        self._interval = self.ttl / 3
        self._rpc_timeout = max(1.0, self._interval)
        self._max_delay = max(_FIRST_RETRY, min(reconnect_max_delay, self._interval))
        self._start_timeout = start_timeout
        self._connector = _Connector(self.location, tls, rpc_timeout=self._rpc_timeout)
        self._lock = threading.Condition()
        self._value = bytes(value)
        self._version = 0  # bumped by update(); the loop puts until _put_version catches up
        self._put_version = -1
        self._first_put = threading.Event()
        self._last_error = "not tried yet"
        self._lease_id: int | None = None
        self._loop: _LoopThread | None = None
        self._task: asyncio.Task[None] | None = None  # only touched in the loop thread
        self._wake = asyncio.Event()
        self._client: Any = None
        self._stopped = False
        self.mode = "stopped"
        """``starting``, ``announced``, ``reconnecting`` (etcd unreachable) or ``stopped``."""

    @property
    def lease_id(self) -> int | None:
        """The ID of the lease the key is on now (None before the first grant)."""
        return self._lease_id

    def start(self) -> None:
        """Announce: return once the key is in etcd (PluginConnectionError if it cannot be).

        An announcer runs once: after :meth:`stop`, this does nothing.
        """
        if self._loop is not None or self._stopped:
            return
        self.mode = "starting"
        self._loop = loop = _LoopThread("goplug-etcd-lease")

        def launch() -> None:
            self._task = loop.loop.create_task(self._keep())

        loop.call(launch)
        if not self._first_put.wait(self._start_timeout):
            reason = self._last_error
            self.stop()
            raise PluginConnectionError(
                f"could not announce {self.key} in etcd at {self.location.hosts()} within "
                f"{self._start_timeout:g} s: {reason}"
            )

    def update(self, value: bytes, timeout: float = 5.0) -> bool:
        """Put a new value on the current lease; return False if not done within ``timeout``.

        The value is kept either way: when etcd is back, the latest one is put.
        """
        with self._lock:
            self._version += 1
            version = self._version
            self._value = bytes(value)
        loop = self._loop
        if loop is None:
            return False  # not started: start() puts the latest value
        loop.call(self._wake.set)
        with self._lock:
            self._lock.wait_for(lambda: self._put_version >= version or self._stopped, timeout)
            return self._put_version >= version

    def stop(self) -> None:
        """Revoke the lease (deleting the key) and end the thread; bounded to about 2 s."""
        loop = self._loop
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._lock.notify_all()
        if loop is None:
            self.mode = "stopped"
            return
        future = loop.submit(self._shutdown())
        with contextlib.suppress(Exception):
            future.result(3.0)
        loop.stop()
        loop.join(2.0)
        self.mode = "stopped"

    async def _shutdown(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=1.0)
        lease_id, client = self._lease_id, self._client
        self._client = None
        if lease_id is None:
            await _close_client(client)
            return
        try:
            if client is None:
                client = self._connector.client()
            await asyncio.wait_for(client.revoke_lease(lease_id), 2.0)
            log.debug("revoked lease %x of %s", lease_id, self.key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The TTL removes the key anyway.
            log.debug("could not revoke lease of %s: %s", self.key, _reason(exc))
        finally:
            await _close_client(client)

    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        delay = _FIRST_RETRY
        verify = False  # after a failure, ask etcd whether the lease survived before using it
        next_refresh = loop.time() + self._interval
        warned = False
        try:
            while True:
                try:
                    if self._client is None:
                        self._client = self._connector.client()
                    client = self._client
                    if verify and self._lease_id is not None:
                        await self._refresh(client)
                        next_refresh = loop.time() + self._interval
                    verify = False
                    if self._lease_id is None:
                        lease = await asyncio.wait_for(client.lease(self.ttl), self._rpc_timeout)
                        self._lease_id = lease.id
                        with self._lock:
                            self._put_version = -1
                        next_refresh = loop.time() + self._interval
                    await self._put_if_needed(client)
                    if self.mode != "announced":
                        if warned:
                            log.info("%s announced in etcd again", self.key)
                        self.mode = "announced"
                    warned = False
                    delay = _FIRST_RETRY
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(
                            self._wake.wait(), max(0.0, next_refresh - loop.time())
                        )
                    self._wake.clear()
                    if loop.time() >= next_refresh:
                        next_refresh = loop.time() + self._interval
                        await self._refresh(client)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._last_error = _reason(exc)
                    await _close_client(self._client)
                    self._client = None
                    verify = True
                    if self._first_put.is_set() and not warned:
                        log.warning(
                            "cannot keep %s announced in etcd at %s (%s); retrying",
                            self.key,
                            self.location.hosts(),
                            self._last_error,
                        )
                        warned = True
                    else:
                        log.debug("etcd announcement of %s: %s", self.key, self._last_error)
                    if self._first_put.is_set():
                        self.mode = "reconnecting"
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._max_delay)
        finally:
            if self._lease_id is None:
                await _close_client(self._client)
                self._client = None

    async def _refresh(self, client: Any) -> None:
        reply = await asyncio.wait_for(client.refresh_lease(self._lease_id), self._rpc_timeout)
        if reply is None or reply.TTL <= 0:
            # The lease expired (etcd was out of reach longer than the TTL) or was revoked by
            # someone else: the key went with it. Announce again on a new lease.
            log.warning("etcd lease of %s is gone; announcing it again", self.key)
            self._lease_id = None

    async def _put_if_needed(self, client: Any) -> None:
        with self._lock:
            version, value = self._version, self._value
        if self._put_version == version:
            return
        await asyncio.wait_for(
            client.put(self.key.encode(), value, lease=self._lease_id), self._rpc_timeout
        )
        with self._lock:
            self._put_version = version
            self._lock.notify_all()
        self._first_put.set()
