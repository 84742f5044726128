"""Plugin-side callback subscriptions: one bounded queue per subscriber, with back-pressure.

A subscriber is one registry handle's interest in one callback name. ``notify`` appends to the
queue of every subscriber of that name and blocks while a queue is full; a long poll takes what
is queued after the sequence number it acknowledges. Notifications stay queued until
acknowledged, so a poll cut in flight loses nothing (docs/PROTOCOL.md §5).

A poll that brings an ``answer`` function is answered by ``notify`` itself, on the notifying
thread: the notification goes out without waking the poll's thread first, which would cost a
thread switch before the application hears of it.
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
# ``notify`` answers a waiting poll itself only when the notification is at most this big, so
# the send always fits the socket's buffer and never makes ``notify`` wait for the network.
_DIRECT_MAX = 8192


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


class Batch(NamedTuple):
    """What one poll answers: notifications numbered from :attr:`first_seq` (0 for legacy)."""

    first_seq: int
    items: list[bytes]
    legacy: bool
    sent: bool = False
    """True when ``notify`` already sent this batch through the poll's ``answer`` function."""


class _Parked:
    """A poll waiting with an ``answer`` function, which ``notify`` may call in its stead."""

    __slots__ = ("answer", "batch", "claimed", "done", "ok")

    def __init__(self, answer: Callable[[Batch], bool]) -> None:
        self.answer = answer
        self.claimed = False  # a notify took it: the poll's thread leaves the answer to it
        self.batch: Batch | None = None  # what that notify sends
        self.done = False  # the notify is through with the connection
        self.ok = False  # and the answer went out


class _Subscriber:
    __slots__ = (
        "key",
        "last_seen",
        "last_seq",
        "legacy",
        "name",
        "parked",
        "queue",
        "waiting",
        "wake",
    )

    def __init__(
        self, key: tuple[str, str], name: str, legacy: bool, wake: threading.Condition
    ) -> None:
        self.key = key
        self.name = name
        self.legacy = legacy
        self.queue: deque[tuple[int, bytes]] = deque()
        self.last_seq = 0
        self.waiting = 0
        self.last_seen = time.monotonic()
        self.wake = wake  # this subscriber's polls wait on it (it shares the hub's lock)
        self.parked: list[_Parked] = []


class CallbackHub:
    """All subscriptions of one plugin, shared by its connection threads."""

    def __init__(self, settings: CallbackSettings | None = None) -> None:
        self.settings = settings or CallbackSettings()
        self._lock = threading.RLock()
        self._room = self._condition()  # notifies wait on it for room in full queues
        self._subs: dict[tuple[str, str], _Subscriber] = {}
        self._by_name: dict[str, list[_Subscriber]] = {}
        # Subscribers that unsubscribed: their tokens are never reused, so a poll of theirs
        # still in flight (sent before the unsubscribe, read after it) must not bring them back.
        self._ended: dict[tuple[str, str], None] = {}
        self._closed = False
        self._next_expiry = 0.0

    def _condition(self) -> threading.Condition:
        return threading.Condition(self._lock)

    def names(self) -> list[str]:
        """Return the callback names that have at least one live subscriber."""
        with self._lock:
            self._expire()
            return sorted(self._by_name)

    def notify(self, name: str, data: bytes, timeout: float | None = None) -> int:
        """Queue ``data`` for every subscriber of ``name``; return how many there are.

        Raises CallbackNotFound when there is none, NotifyTimeout when a subscriber's queue stays
        full for ``timeout`` seconds (default: the settings' notify timeout).
        """
        data = bytes(data)
        limit = self.settings.max_queue
        claimed: list[tuple[_Subscriber, _Parked]] = []
        with self._lock:
            if time.monotonic() >= self._next_expiry:
                self._expire()
            targets = self._by_name.get(name)
            if not targets:
                raise CallbackNotFound(f"no application has registered the callback {name!r}")
            targets = list(targets)
            for sub in targets:
                if len(sub.queue) >= limit:
                    self._wait_for_room(name, targets, timeout)
                    break
            for sub in targets:
                if not self._is_live(sub):
                    continue  # forgotten while this notify waited for room
                sub.last_seq += 1
                sub.queue.append((sub.last_seq, data))
                if sub.parked and len(data) <= _DIRECT_MAX:
                    # Its queue was empty: the batch is this one notification.
                    batch = Batch(sub.last_seq, [data], False, sent=True)
                    for parked in sub.parked:
                        parked.claimed = True
                        parked.batch = batch
                        claimed.append((sub, parked))
                    sub.parked.clear()
                elif sub.waiting:
                    sub.wake.notify_all()
        for sub, parked in claimed:
            self._answer(sub, parked)
        return len(targets)

    def _wait_for_room(self, name: str, targets: list[_Subscriber], timeout: float | None) -> None:
        # Wait until every subscriber has room, then queue for all at once: a timeout never
        # leaves the notification with some subscribers and not others.
        limit = self.settings.max_queue
        self._expire()  # a full queue may belong to a subscriber that is gone
        deadline = time.monotonic() + (self.settings.notify_timeout if timeout is None else timeout)
        while not self._closed:
            full = [s for s in targets if len(s.queue) >= limit and self._is_live(s)]
            if not full:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotifyTimeout(
                    f"{len(full)} subscriber(s) of {name!r} have {limit} notifications "
                    "pending and did not catch up in time"
                )
            self._room.wait(remaining)
            self._expire()

    def _answer(self, sub: _Subscriber, parked: _Parked) -> None:
        """Send a claimed poll's answer (outside the lock), then let its thread go on."""
        assert parked.batch is not None
        ok = False
        try:
            ok = parked.answer(parked.batch)
        except Exception:
            log.exception("answering a poll of %r failed", sub.name)
        finally:
            # The notifications stay queued until acknowledged: if this answer was lost, the
            # subscriber's next poll gets them again.
            with self._lock:
                parked.ok = ok
                parked.done = True
                sub.wake.notify_all()

    def poll(
        self,
        subscriber: str | None,
        name: str,
        ack: int,
        cancelled: Callable[[], bool],
        check_every: float = 1.0,
        answer: Callable[[Batch], bool] | None = None,
    ) -> Batch | None:
        """Wait for notifications for one subscriber; ``None`` if cancelled or closed.

        ``subscriber`` is None for a GoPlug-style poll (one queue per name, no numbering).
        ``cancelled`` is asked every ``check_every`` seconds (e.g. whether the peer hung up).

        ``answer``, if given, sends a batch on the poll's connection and tells whether it went
        out. A notification that arrives while this poll waits is then sent by ``notify`` through
        it, and this returns that batch with ``sent`` set (or ``None`` if sending failed), so
        the caller must not send it again. The caller's thread does not touch the connection
        meanwhile, so ``answer`` never runs alongside it.
        """
        key = (subscriber or "", name)
        with self._lock:
            if self._closed or key in self._ended:
                return None
            sub = self._subs.get(key)
            if sub is None:
                sub = self._add(key, name, subscriber is None)
                # Number on from what the subscriber already has (it may come back after this
                # plugin restarted or forgot it), so an answer lost now is sent again, not
                # dropped as already acknowledged.
                sub.last_seq = ack if subscriber is not None else 0
            sub.waiting += 1
            parked: _Parked | None = None
            try:
                queue = sub.queue
                if not sub.legacy:
                    while queue and queue[0][0] <= ack:
                        queue.popleft()
                    self._room.notify_all()  # room may have appeared for a blocked notify
                if not queue:
                    if answer is not None and not sub.legacy:
                        parked = _Parked(answer)
                        sub.parked.append(parked)
                    while True:
                        if parked is not None and parked.claimed:
                            # A notify is sending the answer; its send is bounded by the
                            # socket's timeout, and the connection is ours again after it.
                            while not parked.done:
                                sub.wake.wait()
                            return parked.batch if parked.ok else None
                        if queue:
                            break
                        if self._closed or self._subs.get(key) is not sub:
                            return None
                        sub.wake.wait(check_every)
                        if not queue and not (parked and parked.claimed) and cancelled():
                            return None
                if sub.legacy:
                    _, data = queue.popleft()
                    self._room.notify_all()
                    return Batch(0, [data], legacy=True)
                return self._batch(queue)
            finally:
                if parked is not None and not parked.claimed:
                    sub.parked.remove(parked)
                sub.waiting -= 1
                sub.last_seen = now = time.monotonic()
                if not sub.waiting:
                    self._next_expiry = min(
                        self._next_expiry, now + self.settings.subscriber_expiry
                    )

    def _batch(self, queue: deque[tuple[int, bytes]]) -> Batch:
        items: list[bytes] = []
        size = 0
        first = queue[0][0]
        max_batch = self.settings.max_batch
        max_bytes = self.settings.max_batch_bytes
        for _, data in queue:
            if items and (len(items) >= max_batch or size + len(data) > max_bytes):
                break
            items.append(data)
            size += len(data)
        return Batch(first, items, legacy=False)

    def unsubscribe(self, subscriber: str | None, name: str) -> bool:
        """Forget a subscriber and its queue; return whether it existed."""
        key = (subscriber or "", name)
        with self._lock:
            sub = self._subs.get(key)
            if sub is not None:
                self._remove(sub)
            if subscriber is not None:
                self._ended[key] = None
                if len(self._ended) > _MAX_ENDED:
                    del self._ended[next(iter(self._ended))]
            return sub is not None

    def close(self) -> None:
        """Wake every waiting poll and notify; later polls return None at once."""
        with self._lock:
            self._closed = True
            for sub in self._subs.values():
                sub.wake.notify_all()
            self._room.notify_all()

    def _add(self, key: tuple[str, str], name: str, legacy: bool) -> _Subscriber:
        sub = self._subs[key] = _Subscriber(key, name, legacy, self._condition())
        self._by_name.setdefault(name, []).append(sub)
        return sub

    def _remove(self, sub: _Subscriber) -> None:
        del self._subs[sub.key]
        peers = self._by_name[sub.name]
        peers.remove(sub)
        if not peers:
            del self._by_name[sub.name]
        sub.wake.notify_all()  # its polls end
        self._room.notify_all()  # a notify waiting for room in its queue goes on

    def _is_live(self, sub: _Subscriber) -> bool:
        return self._subs.get(sub.key) is sub

    def _expire(self) -> None:
        now = time.monotonic()
        expiry = self.settings.subscriber_expiry
        stale = []
        soonest = float("inf")  # nothing expires before then (notify checks only after it)
        for sub in self._subs.values():
            if not sub.waiting:
                if now - sub.last_seen > expiry:
                    stale.append(sub)
                else:
                    soonest = min(soonest, sub.last_seen + expiry)
        self._next_expiry = soonest
        for sub in stale:
            log.info("forgetting subscriber of %r: no poll for %.0f s", sub.name, expiry)
            self._remove(sub)
