"""Plugin-side callback subscriptions: one bounded queue per subscriber, with back-pressure.

A subscriber is one registry handle's interest in one callback name. ``notify`` appends to the
queue of every subscriber of that name and blocks while a queue is full; a long poll takes what
is queued after the sequence number it acknowledges. Notifications stay queued until
acknowledged, so a poll cut in flight loses nothing (docs/PROTOCOL.md §5).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from goplug.errors import CallbackNotFound, NotifyTimeout
from goplug.logs import LazyLogger

__all__ = ["Batch", "CallbackHub", "CallbackSettings"]

log = LazyLogger("goplug.callbacks")

_MAX_ENDED = 4096


class CallbackSettings(NamedTuple):
    """Bounds of the plugin's callback queues."""

    max_queue: int = 10_000
    """Notifications held per subscriber (sent but unacknowledged ones included)."""
    notify_timeout: float = 10.0
    """How long ``notify`` waits for room in a full queue before raising NotifyTimeout."""
    subscriber_expiry: float = 60.0
    """A subscriber with no poll waiting for this long is forgotten with its queue."""
    max_batch: int = 1024
    """Most notifications answered to one poll."""
    max_batch_bytes: int = 4 * 1024 * 1024
    """Most bytes answered to one poll (one notification is always sent, whatever its size)."""


class _Subscriber:
    __slots__ = ("key", "last_seen", "last_seq", "legacy", "name", "queue", "waiting")

    def __init__(self, key: tuple[str, str], name: str, legacy: bool) -> None:
        self.key = key
        self.name = name
        self.legacy = legacy
        self.queue: deque[tuple[int, bytes]] = deque()
        self.last_seq = 0
        self.waiting = 0
        self.last_seen = time.monotonic()


class Batch(NamedTuple):
    """What one poll answers: notifications numbered from :attr:`first_seq` (0 for legacy)."""

    first_seq: int
    items: list[bytes]
    legacy: bool


class CallbackHub:
    """All subscriptions of one plugin, shared by its connection threads."""

    def __init__(self, settings: CallbackSettings | None = None) -> None:
        self.settings = settings or CallbackSettings()
        self._cond = threading.Condition()
        self._subs: dict[tuple[str, str], _Subscriber] = {}
        # Subscribers that unsubscribed: their tokens are never reused, so a poll of theirs
        # still in flight (sent before the unsubscribe, read after it) must not bring them back.
        self._ended: dict[tuple[str, str], None] = {}
        self._closed = False

    def names(self) -> list[str]:
        """Return the callback names that have at least one live subscriber."""
        with self._cond:
            self._expire()
            return sorted({sub.name for sub in self._subs.values()})

    def notify(self, name: str, data: bytes, timeout: float | None = None) -> int:
        """Queue ``data`` for every subscriber of ``name``; return how many there are.

        Raises CallbackNotFound when there is none, NotifyTimeout when a subscriber's queue stays
        full for ``timeout`` seconds (default: the settings' notify timeout).
        """
        data = bytes(data)
        limit = self.settings.max_queue
        with self._cond:
            self._expire()
            targets = [sub for sub in self._subs.values() if sub.name == name]
            if not targets:
                raise CallbackNotFound(f"no application has registered the callback {name!r}")
            deadline = time.monotonic() + (
                self.settings.notify_timeout if timeout is None else timeout
            )
            # Wait until every subscriber has room, then queue for all at once: a timeout
            # never leaves the notification with some subscribers and not others.
            while not self._closed:
                full = [s for s in targets if len(s.queue) >= limit and self._is_live(s)]
                if not full:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NotifyTimeout(
                        f"{len(full)} subscriber(s) of {name!r} have {limit} notifications "
                        "pending and did not catch up in time"
                    )
                self._cond.wait(remaining)
                self._expire()
            waiting = False
            for sub in targets:
                if self._is_live(sub):
                    sub.last_seq += 1
                    sub.queue.append((sub.last_seq, data))
                    waiting = waiting or sub.waiting > 0
            self._cond.notify_all()
        if waiting:
            # A poll is parked on this notification: let its thread take the GIL now rather
            # than when this one next blocks, which cuts notify -> callback latency.
            time.sleep(0)
        return len(targets)

    def poll(
        self,
        subscriber: str | None,
        name: str,
        ack: int,
        cancelled: Callable[[], bool],
        check_every: float = 1.0,
    ) -> Batch | None:
        """Wait for notifications for one subscriber; ``None`` if cancelled or closed.

        ``subscriber`` is None for a GoPlug-style poll (one queue per name, no numbering).
        ``cancelled`` is asked every ``check_every`` seconds (e.g. whether the peer hung up).
        """
        key = (subscriber or "", name)
        with self._cond:
            if self._closed or key in self._ended:
                return None
            sub = self._subs.get(key)
            if sub is None:
                sub = self._subs[key] = _Subscriber(key, name, legacy=subscriber is None)
                # Number on from what the subscriber already has (it may come back after this
                # plugin restarted or forgot it), so an answer lost now is sent again, not
                # dropped as already acknowledged.
                sub.last_seq = ack if subscriber is not None else 0
            sub.waiting += 1
            try:
                queue = sub.queue
                while queue and queue[0][0] <= ack and not sub.legacy:
                    queue.popleft()
                self._cond.notify_all()  # room may have appeared for a blocked notify
                while not queue:
                    if self._closed or self._subs.get(key) is not sub:
                        return None
                    self._cond.wait(check_every)
                    if not queue and cancelled():
                        return None
                if sub.legacy:
                    _, data = queue.popleft()
                    self._cond.notify_all()
                    return Batch(0, [data], legacy=True)
                items: list[bytes] = []
                size = 0
                first = queue[0][0]
                for _, data in queue:
                    if items and (
                        len(items) >= self.settings.max_batch
                        or size + len(data) > self.settings.max_batch_bytes
                    ):
                        break
                    items.append(data)
                    size += len(data)
                return Batch(first, items, legacy=False)
            finally:
                sub.waiting -= 1
                sub.last_seen = time.monotonic()

    def unsubscribe(self, subscriber: str | None, name: str) -> bool:
        """Forget a subscriber and its queue; return whether it existed."""
        key = (subscriber or "", name)
        with self._cond:
            found = self._subs.pop(key, None) is not None
            if subscriber is not None:
                self._ended[key] = None
                if len(self._ended) > _MAX_ENDED:
                    del self._ended[next(iter(self._ended))]
            self._cond.notify_all()
            return found

    def close(self) -> None:
        """Wake every waiting poll and notify; later polls return None at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _is_live(self, sub: _Subscriber) -> bool:
        return self._subs.get(sub.key) is sub

    def _expire(self) -> None:
        now = time.monotonic()
        expiry = self.settings.subscriber_expiry
        stale = [
            key
            for key, sub in self._subs.items()
            if not sub.waiting and now - sub.last_seen > expiry
        ]
        for key in stale:
            log.info("forgetting subscriber of %r: no poll for %.0f s", key[1], expiry)
            del self._subs[key]
