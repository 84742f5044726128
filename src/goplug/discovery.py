"""Watching a place for plugin announcements: a directory of `.pconf` files today.

:class:`DirectoryDiscovery` reports which announce files appeared or changed and which went
away. It waits on inotify (through inotify_simple: no CPU while idle, events within a
millisecond) and falls back to polling where inotify is not available; a slow periodic rescan
catches anything else. Another source of
announcements (a distributed store) implements the same :class:`Discovery` protocol.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable
from typing import Protocol

__all__ = ["ChangeHandler", "DirectoryDiscovery", "Discovery"]

log = logging.getLogger("goplug.discovery")

ChangeHandler = Callable[[list[str], list[str]], None]
"""Called with (paths that appeared or changed, paths that went away)."""

_Signature = tuple[int, int, int, int]


class Discovery(Protocol):
    """A source of announcements, driving a registry through its change handler."""

    def scan(self) -> None:
        """Look at every announcement now and report the differences (synchronous)."""
        ...

    def start(self) -> None:
        """Start watching in the background."""
        ...

    def stop(self) -> None:
        """Stop watching."""
        ...

    def join(self, timeout: float | None = None) -> bool:
        """Wait for watching to end; return True if it has."""
        ...


class DirectoryDiscovery:
    """Reports `.pconf` files appearing, changing and disappearing in one directory.

    ``on_tick`` runs in the watching thread about every ``tick_interval`` seconds (the registry
    uses it to check its plugins' health without a thread of its own).
    """

    def __init__(
        self,
        location: str,
        ext: str,
        on_change: ChangeHandler,
        on_tick: Callable[[], None] | None = None,
        tick_interval: float = 0.5,
        rescan_interval: float = 10.0,
        poll_interval: float = 0.1,
        use_inotify: bool = True,
    ) -> None:
        self.location = location
        self.ext = ext
        self._on_change = on_change
        self._on_tick = on_tick
        self._tick = tick_interval
        self._rescan = rescan_interval
        self._poll = poll_interval
        self._use_inotify = use_inotify
        self._known: dict[str, _Signature] = {}
        self._scan_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_fd = -1
        self._thread = threading.Thread(target=self._run, name="goplug-discovery", daemon=True)
        self.mode = "stopped"
        """``inotify``, ``polling`` or ``stopped``: how the directory is watched."""

    def matches(self, path: str) -> bool:
        """Tell whether ``path`` names an announce file (exact, case-sensitive extension)."""
        base = os.path.basename(path)
        return base.endswith(self.ext) and len(base) > len(self.ext) and not base.startswith(".")

    def scan(self) -> None:
        """List the directory and report every difference from what was seen before."""
        try:
            names = os.listdir(self.location)
        except OSError as exc:
            log.warning("cannot list plugin directory %s: %s", self.location, exc.strerror)
            names = []
        current = {os.path.join(self.location, n) for n in names if self.matches(n)}
        self._report(current | set(self._known))

    def check(self, paths: set[str]) -> None:
        """Report what changed among ``paths`` (from file system events)."""
        self._report({p for p in paths if self.matches(p)})

    def _report(self, paths: set[str]) -> None:
        changed: list[str] = []
        removed: list[str] = []
        with self._scan_lock:
            for path in sorted(paths):
                sig = _signature(path)
                old = self._known.get(path)
                if sig is None:
                    if old is not None:
                        del self._known[path]
                        removed.append(path)
                elif sig != old:
                    self._known[path] = sig
                    changed.append(path)
        if changed or removed:
            try:
                self._on_change(changed, removed)
            except Exception:
                log.exception("discovery handler failed")

    def forget(self, path: str) -> None:
        """Forget what was seen of ``path`` so the next look reports it again."""
        with self._scan_lock:
            self._known.pop(path, None)

    def start(self) -> None:
        """Scan once, then watch in a background thread."""
        self.scan()
        self._thread.start()

    def stop(self) -> None:
        """Ask the watching thread to end (at once when watching with inotify)."""
        self._stop.set()
        fd = self._wake_fd
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.write(fd, b"x")

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the watching thread to end."""
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            if self._use_inotify:
                try:
                    self._watch()
                except Exception as exc:
                    if not self._stop.is_set():
                        log.warning("inotify watching failed (%s); polling instead", exc)
            if not self._stop.is_set():
                self._poll_loop()
        finally:
            self.mode = "stopped"

    def _ticked(self, since: list[float]) -> None:
        import time

        now = time.monotonic()
        if now - since[0] >= self._tick:
            since[0] = now
            if self._on_tick is not None:
                try:
                    self._on_tick()
                except Exception:
                    log.exception("periodic health check failed")
        if now - since[1] >= self._rescan:
            since[1] = now
            self.scan()

    def _watch(self) -> None:
        import select
        import time

        from inotify_simple import INotify, flags  # type: ignore[import-untyped]

        mask = (
            flags.CREATE
            | flags.MODIFY
            | flags.CLOSE_WRITE
            | flags.ATTRIB
            | flags.MOVED_TO
            | flags.MOVED_FROM
            | flags.DELETE
            | flags.DELETE_SELF
            | flags.MOVE_SELF
        )
        inotify = INotify()
        wake_r, wake_w = os.pipe()
        self._wake_fd = wake_w
        try:
            inotify.add_watch(self.location, mask)
            self.mode = "inotify"
            # Files created between the first scan and the watch were missed: look again.
            self.scan()
            poller = select.poll()
            poller.register(inotify.fileno(), select.POLLIN)
            poller.register(wake_r, select.POLLIN)
            since = [time.monotonic(), time.monotonic()]
            tick_ms = max(int(self._tick * 1000), 10)
            while not self._stop.is_set():
                if poller.poll(tick_ms):
                    if self._stop.is_set():
                        return
                    events = inotify.read(timeout=0)
                    paths: set[str] = set()
                    for event in events:
                        if event.mask & (flags.Q_OVERFLOW | flags.DELETE_SELF | flags.MOVE_SELF):
                            self.scan()  # events were lost, or the directory went away
                            if event.mask & flags.Q_OVERFLOW:
                                continue
                            raise OSError(f"plugin directory {self.location} went away")
                        if event.name:
                            paths.add(os.path.join(self.location, event.name))
                    if paths:
                        self.check(paths)
                self._ticked(since)
        finally:
            self._wake_fd = -1
            os.close(wake_w)
            os.close(wake_r)
            inotify.close()

    def _poll_loop(self) -> None:
        import time

        self.mode = "polling"
        since = [time.monotonic(), time.monotonic()]
        while not self._stop.wait(self._poll):
            self.scan()
            self._ticked(since)


def _signature(path: str) -> _Signature | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    kind = stat.S_IFMT(info.st_mode)
    return (info.st_ino, info.st_mtime_ns, info.st_size, kind)
