"""goplug for asyncio: the same names as the sync API, awaitable where they do I/O.

Calls (``execute``, ``ping``) run natively on the event loop over pooled connections driven by
asyncio protocols and the shared sans-IO reader. Discovery, loading and unloading reuse the sync
registry's machinery (they are rare and may block briefly) through worker threads; its events
and callbacks are handed to the loop, in order.

>>> async def main() -> None:
...     async with aio.PluginRegistry("plugins") as registry:
...         plugin = await registry.load_plugin("Do", "Test")
...         print(await plugin.execute("Do", b"hi"))
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import cast

from goplug import memory
from goplug import plugin as _plugin
from goplug import registry as _registry
from goplug.client import PluginClient, Subscription
from goplug.errors import (
    CallTimeout,
    NotifyTimeout,
    PluginConnectionError,
    PluginNotLoaded,
    ProtocolError,
    RegistryClosed,
)
from goplug.launcher import PluginProcess, RestartPolicy
from goplug.registry import PluginEvent, PluginState, RegistrySettings
from goplug.transport import Transport, fastpath
from goplug.wire import routes
from goplug.wire.http import FramingError, Limits, Message, MessageReader

TYPE_CHECKING = False  # typing.TYPE_CHECKING
if TYPE_CHECKING:
    from goplug.tls import TLSConfig

__all__ = ["Plugin", "PluginHandle", "PluginRegistry"]

Callback = Callable[[bytes], object]

# Most connections one event loop opens to one plugin; more concurrent calls wait for one.
_MAX_CONNECTIONS = 64
_WRITE_PIECE = 256 * 1024
_RECV = 65536
_ok_body = fastpath.ok_body if fastpath is not None else None
_BIG_RECV = 1024 * 1024  # receive size while a large body is coming


class _Connection(asyncio.Protocol):
    """One persistent connection; at most one request in flight."""

    def __init__(self, limits: Limits) -> None:
        self.reader = MessageReader(True, limits)
        self.max_body = limits.max_body
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[bytes | Message] | None = None
        self.deadline = 0.0  # loop time by which the call in flight must be answered
        self.lost = False
        self._partial = False  # the reader holds part of an answer: the C recogniser must wait
        self._sized = False  # the transport's receive size can be set
        self._big = False  # it is set for a large body
        self._paused = False
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        # asyncio's own transports receive into a new 256 KiB buffer each time, which glibc
        # serves with an mmap and munmap per answer; small pieces until a large body comes.
        self._sized = hasattr(transport, "max_size")
        if self._sized:
            transport.max_size = _RECV  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def send_large(
        self, head: bytes, data: bytes, answered: asyncio.Future[bytes | Message]
    ) -> None:
        """Write a large body in pieces, waiting whenever the transport's buffer is full.

        Handing asyncio the whole body at once makes it buffer and trim it from the front
        (quadratic in the body size on Python 3.11).
        """
        transport = self.transport
        assert transport is not None
        transport.write(head)
        view = memoryview(data)
        for start in range(0, len(view), _WRITE_PIECE):
            if answered.done() or self.lost:
                return  # answered early (e.g. 413) or gone: the rest is not wanted
            transport.write(view[start : start + _WRITE_PIECE])
            if self._paused:
                self._drained = asyncio.get_running_loop().create_future()
                await self._drained

    def data_received(self, data: bytes) -> None:
        waiter = self.waiter
        msg: bytes | Message | None = None
        if _ok_body is not None and not self._partial:
            msg = _ok_body(data, self.max_body)  # the usual answer, parsed in C
        try:
            if msg is None:
                msg = self.reader.receive(data)
                self._partial = self.reader.in_message
        except FramingError as exc:
            self._fail(ProtocolError(str(exc)))
            return
        if msg is None:
            if self._sized:
                self._size_receives(self.reader.body_wanted())
            return
        if self._big:
            self._size_receives(0)
        if waiter is None or waiter.done():
            self._fail(ProtocolError("unsolicited response"))
            return
        self.waiter = None
        waiter.set_result(msg)
        if self._partial:
            # Bytes after the answer answer nothing that was asked: were the connection used
            # again, they would be taken for the next call's answer.
            self._fail(ProtocolError("unsolicited response"))

    def _size_receives(self, wanted: int) -> None:
        """Receive a large body in large pieces (kept as they come), anything else in small."""
        self._big = wanted > 0
        if wanted and not memory.tuned:
            memory.tune_malloc()
        self.transport.max_size = min(wanted, _BIG_RECV) if wanted else _RECV  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        try:
            msg = self.reader.feed_eof()
        except FramingError as exc:
            self._fail(PluginConnectionError(f"the plugin closed the connection: {exc}"))
            return False
        waiter = self.waiter
        if msg is not None and waiter is not None and not waiter.done():
            self.waiter = None
            waiter.set_result(msg)
        self._fail(PluginConnectionError("the plugin closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._fail(PluginConnectionError(f"connection to the plugin lost{reason}"))

    def _fail(self, error: Exception) -> None:
        self.lost = True
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()


class _Pool:
    """Connections to one loaded plugin instance, used from one event loop."""

    def __init__(self, client: PluginClient, limits: Limits, connect_timeout: float) -> None:
        self.client = client
        self._limits = limits
        self._connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._waiting: collections.deque[asyncio.Future[_Connection]] = collections.deque()
        self._prefixes: dict[str, bytes] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # One timer for the pool's calls, at the earliest deadline it knows of; a timer per
        # call would cost a scheduling and a cancellation each.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    async def _acquire(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.lost:
                return conn
        if len(self._busy) + len(self._waiting) < _MAX_CONNECTIONS:
            return await self._connect()
        # Enough connections are open: wait for one to come back rather than open more.
        waiter: asyncio.Future[_Connection] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            return await waiter
        finally:
            if waiter in self._waiting:
                self._waiting.remove(waiter)

    def _release(self, conn: _Connection) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    async def call(self, route: str, data: bytes, timeout: float) -> bytes | Message:
        """Send one request; return the body of a plain 200 answer, else the response."""
        prefix = self._prefixes.get(route)
        if prefix is None:
            prefix = self._prefixes[route] = self.client._prefix(route, b"")
        idle = self._idle
        conn = idle.pop() if idle else None
        if conn is None or conn.lost:
            conn = await self._acquire()
            if conn.lost:
                raise PluginConnectionError("the connection to the plugin was lost")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bytes | Message] = loop.create_future()
        conn.waiter = waiter
        transport = conn.transport
        assert transport is not None
        self._busy.add(conn)
        deadline = conn.deadline = loop.time() + timeout
        if self._timer is None or deadline < self._timer_at:
            self._watch(loop, deadline)
        try:
            if len(data) < 65536:
                transport.write(b"%s%d\r\n\r\n%s" % (prefix, len(data), data))
            else:
                await conn.send_large(b"%s%d\r\n\r\n" % (prefix, len(data)), data, waiter)
            msg = await waiter
        except asyncio.CancelledError:
            conn.close()
            self._replace_for_waiter(loop)
            if waiter.cancelled() and deadline <= loop.time():
                raise CallTimeout(f"/{route} did not answer within {timeout:g} s") from None
            raise
        except BaseException:
            conn.close()
            self._replace_for_waiter(loop)
            raise
        finally:
            self._busy.discard(conn)
        if (type(msg) is bytes or msg.keep_alive) and not conn.lost:  # type: ignore[union-attr]
            if self._waiting:
                self._release(conn)
            else:
                self._idle.append(conn)
        else:
            conn.close()
            self._replace_for_waiter(loop)
        return msg

    def _watch(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = loop.call_at(deadline, self._expire_overdue, loop)

    def _expire_overdue(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel the waiters of calls past their deadline; watch the next deadline."""
        self._timer = None
        now = loop.time()
        earliest = 0.0
        for conn in self._busy:
            if conn.deadline <= now:
                waiter = conn.waiter
                if waiter is not None and not waiter.done():
                    waiter.cancel()
            elif not earliest or conn.deadline < earliest:
                earliest = conn.deadline
        if earliest:
            self._watch(loop, earliest)

    def _replace_for_waiter(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                task = loop.create_task(self._hand_new(waiter))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _hand_new(self, waiter: asyncio.Future[_Connection]) -> None:
        try:
            conn = await self._connect()
        except PluginConnectionError as exc:
            if not waiter.done():
                waiter.set_exception(exc)
            return
        if waiter.done():
            self._release(conn)
        else:
            waiter.set_result(conn)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        client = self.client
        transport, protocol = await client.transport.connect_async(
            loop, lambda: _Connection(self._limits), client.conf.address, self._connect_timeout
        )
        conn = cast(_Connection, protocol)
        # uvloop may call connection_made only after returning the pair.
        conn.transport = transport
        return conn

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        for conn in list(self._busy):
            conn._fail(RegistryClosed("the registry was closed during the call"))
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(RegistryClosed("the registry was closed during the call"))


class PluginHandle:
    """The asyncio face of :class:`goplug.PluginHandle`."""

    def __init__(self, registry: PluginRegistry, sync: _registry.PluginHandle) -> None:
        self._registry = registry
        self.sync = sync
        """The underlying sync handle."""
        self._pool: _Pool | None = None

    @property
    def name(self) -> str:
        """The plugin's name."""
        return self.sync.name

    @property
    def namespace(self) -> str:
        """The plugin's namespace."""
        return self.sync.namespace

    @property
    def state(self) -> PluginState:
        """Where the plugin is in its lifecycle."""
        return self.sync.state

    @property
    def methods(self) -> list[str]:
        """Method names the plugin announced."""
        return self.sync.methods

    @property
    def process(self) -> PluginProcess | None:
        """The process behind the plugin when the registry launched it (else None)."""
        return self.sync.process

    def _current_pool(self) -> _Pool:
        client = self.sync._client
        if client is None:
            raise PluginNotLoaded(f"plugin {self.sync.label} is not loaded ({self.state.value})")
        pool = self._pool
        if pool is None or pool.client is not client:
            if pool is not None:
                pool.close()
            settings = self._registry.settings.client
            pool = self._pool = _Pool(client, settings.limits, settings.connect_timeout)
        return pool

    async def _call(self, route: str, data: bytes, timeout: float) -> bytes | Message:
        pool = self._current_pool()
        try:
            return await pool.call(route, data, timeout)
        except PluginConnectionError:
            await self._connection_lost(pool)
            raise

    async def _connection_lost(self, pool: _Pool) -> None:
        """Raise RegistryClosed if that is why; else let the registry check the plugin."""
        if self._registry._closed:
            raise RegistryClosed("the registry was closed during the call") from None
        await asyncio.to_thread(self._registry.sync._check_alive, self.sync, pool.client)

    async def execute(
        self, method: str, data: bytes = b"", *, timeout: float | None = None
    ) -> bytes:
        """Call ``method`` with ``data`` and return its output (errors as in the sync API)."""
        if timeout is None:
            timeout = self._registry.settings.client.call_timeout
        # _call inlined: one coroutine less per call is a measurable part of a 64-byte call.
        pool = self._current_pool()
        try:
            msg = await pool.call(method, data, timeout)
        except PluginConnectionError:
            await self._connection_lost(pool)
            raise
        if type(msg) is bytes:
            return msg
        assert isinstance(msg, Message)
        if msg.status == 200:
            return msg.body
        raise routes.error_from_response(msg, method)

    async def ping(self, *, timeout: float | None = None) -> float:
        """Check the plugin answers; return the round-trip time in seconds."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        settings = self._registry.settings.client
        msg = await self._call(
            routes.PING, b"Test Data", settings.ping_timeout if timeout is None else timeout
        )
        if not isinstance(msg, bytes):
            if msg.status != 200:
                raise routes.error_from_response(msg, routes.PING)
            msg = msg.body
        if msg != b"Test Data":
            raise PluginConnectionError(
                f"plugin {self.sync.label} answered the ping with other bytes"
            )
        return loop.time() - started

    def register_callback(self, fn: Callback, name: str | None = None) -> Subscription:
        """Deliver every ``notify(name, ...)`` to ``fn(bytes)`` on the loop, in order.

        ``fn`` may be a plain function or ``async def``; each call finishes before the next
        starts. An exception it raises is logged and delivery goes on.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        cb_name = name or getattr(fn, "__name__", "")

        async def consume() -> None:
            while True:
                data = await queue.get()
                try:
                    result = fn(data)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    _registry.log.exception("callback %r raised; delivery goes on", cb_name)

        task = loop.create_task(consume(), name=f"goplug-callback-{cb_name}")
        self._registry._tasks.add(task)
        task.add_done_callback(self._registry._tasks.discard)

        def hand_over(data: bytes) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to deliver to
                loop.call_soon_threadsafe(queue.put_nowait, data)

        sub = self.sync.register_callback(hand_over, cb_name)
        sub_tasks = self._registry._callback_tasks
        sub_tasks[sub] = task
        return sub

    def __repr__(self) -> str:
        return f"<aio.PluginHandle {self.sync.label} {self.state.value}>"


class PluginRegistry:
    """The asyncio face of :class:`goplug.PluginRegistry`; use ``async with``."""

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
        self.sync = _registry.PluginRegistry(
            location,
            auto_discover,
            conf_ext,
            settings=settings,
            transport=transport,
            tls=tls,
            insecure_loopback=insecure_loopback,
            token=token,
            etcd_tls=etcd_tls,
        )
        """The underlying sync registry."""
        self.settings = self.sync.settings
        self._handles: dict[int, PluginHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._callback_tasks: dict[Subscription, asyncio.Task[None]] = {}
        self._closed = False

    def _wrap(self, handle: _registry.PluginHandle) -> PluginHandle:
        wrapped = self._handles.get(id(handle))
        if wrapped is None:
            wrapped = self._handles[id(handle)] = PluginHandle(self, handle)
        return wrapped

    async def load_plugin(self, name: str, namespace: str = "") -> PluginHandle:
        """Load a discovered plugin (see :meth:`goplug.PluginRegistry.load_plugin`)."""
        return self._wrap(await asyncio.to_thread(self.sync.load_plugin, name, namespace))

    async def launch(
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
        """Start a plugin process and load it (see :meth:`goplug.PluginRegistry.launch`)."""
        start = functools.partial(
            self.sync.launch,
            command,
            name=name,
            namespace=namespace,
            env=env,
            cwd=cwd,
            restart=restart,
            max_restarts=max_restarts,
            start_timeout=start_timeout,
        )
        return self._wrap(await asyncio.to_thread(start))

    def get_plugin(self, name: str, namespace: str = "") -> PluginHandle | None:
        """Return the handle of a loaded plugin, or None."""
        handle = self.sync.get_plugin(name, namespace)
        return self._wrap(handle) if handle is not None else None

    def is_discovered(self, name: str, namespace: str = "") -> bool:
        """Tell whether the plugin is announced."""
        return self.sync.is_discovered(name, namespace)

    def is_loaded(self, name: str, namespace: str = "") -> bool:
        """Tell whether the plugin is loaded."""
        return self.sync.is_loaded(name, namespace)

    def discovered(self) -> list[PluginHandle]:
        """Handles of every announced plugin."""
        return [self._wrap(h) for h in self.sync.discovered()]

    def loaded(self) -> list[PluginHandle]:
        """Handles of every loaded plugin."""
        return [self._wrap(h) for h in self.sync.loaded()]

    def add_listener(self, fn: Callable[[PluginEvent], object]) -> None:
        """Call ``fn(event)`` on the loop for every event; ``fn`` may be ``async def``."""
        loop = asyncio.get_running_loop()

        def run(event: PluginEvent) -> None:
            result = fn(event)
            if inspect.isawaitable(result):
                task = loop.create_task(_await(result))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        def hand_over(event: PluginEvent) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(run, event)

        self.sync.add_listener(hand_over)

    async def unload_plugin(self, handle: PluginHandle) -> None:
        """End callbacks, send `/Stop` and disconnect."""
        subs = list(handle.sync._subscriptions)
        if handle._pool is not None:
            handle._pool.close()
            handle._pool = None
        await asyncio.to_thread(self.sync.unload_plugin, handle.sync)
        for sub in subs:
            task = self._callback_tasks.pop(sub, None)
            if task is not None:
                task.cancel()

    def stop(self) -> None:
        """End discovery."""
        self.sync.stop()

    async def wait_for_stop(self, timeout: float | None = None) -> bool:
        """Wait until discovery has ended."""
        return await asyncio.to_thread(self.sync.wait_for_stop, timeout)

    async def close(self) -> None:
        """End discovery, disconnect from every plugin and end callback delivery."""
        if self._closed:
            return
        self._closed = True
        for handle in self._handles.values():
            if handle._pool is not None:
                handle._pool.close()
                handle._pool = None
        await asyncio.to_thread(self.sync.close)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._callback_tasks.clear()

    async def __aenter__(self) -> PluginRegistry:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def _await(result: Awaitable[object]) -> None:
    try:
        await result
    except Exception:
        _registry.log.exception("registry listener raised")


class Plugin(_plugin.Plugin):
    """A plugin whose ``async def`` methods run on the application's own event loop.

    Plain methods run on the connection threads, so they never block the loop. ``start``,
    ``stop`` and ``notify`` are awaitable.
    """

    async def start(self) -> None:  # type: ignore[override]
        """Listen, then publish the `.pconf`; async methods will run on the running loop."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(super().start)

    async def stop(self) -> None:  # type: ignore[override]
        """Withdraw the `.pconf`, close the socket and remove the socket file."""
        await asyncio.to_thread(super().stop)

    async def notify(  # type: ignore[override]
        self, name: str, data: bytes = b"", *, timeout: float | None = None
    ) -> int:
        """Send ``data`` to every subscriber of ``name``.

        While a subscriber's queue is full it waits without blocking the loop.
        """
        try:
            return self._hub.notify(name, data, 0.0)
        except NotifyTimeout:
            return await asyncio.to_thread(self._hub.notify, name, data, timeout)

    async def serve_forever(self) -> None:  # type: ignore[override]
        """Start (if needed) and serve until the task is cancelled, then stop."""
        if not self.running:
            await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self.stop())

    async def __aenter__(self) -> Plugin:
        if not self.running:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
