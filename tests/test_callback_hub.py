"""Unit tests of the plugin-side callback queues (goplug.callbacks.CallbackHub).

Threads and events only, no sockets. Where a test must know that another thread is blocked
inside the hub, it watches the hub's condition variable (``SpyCondition``) instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from goplug import callbacks
from goplug.callbacks import Batch, CallbackHub, CallbackSettings
from goplug.errors import CallbackNotFound, GoPlugError, NotifyTimeout

WAIT = 5.0  # generous bound for things that should happen at once


class Spy:
    """Records each time a thread other than the test's starts waiting in the hub.

    The event is set while the waiter still holds the hub's lock, so once the test sees it,
    anything the test does under that lock happens after the waiter is really waiting.
    """

    def __init__(self) -> None:
        self.waiting = threading.Event()

    def expect_wait(self) -> None:
        assert self.waiting.wait(WAIT), "no thread started waiting in the hub"
        self.waiting.clear()


class SpyCondition(threading.Condition):
    """A condition of the hub (they all share its lock) that reports waits to a Spy."""

    def __init__(self, lock: threading.RLock, spy: Spy) -> None:
        super().__init__(lock)
        self.spy = spy

    def wait(self, timeout: float | None = None) -> bool:
        if threading.current_thread() is not threading.main_thread():
            self.spy.waiting.set()
        return super().wait(timeout)


class SpyHub(CallbackHub):
    """A hub whose condition variables (its own and each subscriber's) report to a Spy."""

    def __init__(self, settings: CallbackSettings, spy: Spy) -> None:
        self.spy = spy
        super().__init__(settings)

    def _condition(self) -> threading.Condition:
        return SpyCondition(self._lock, self.spy)


def make_hub(**settings: Any) -> tuple[CallbackHub, Spy]:
    spy = Spy()
    return SpyHub(CallbackSettings(**settings), spy), spy


def never() -> bool:
    return False


def poll_now(hub: CallbackHub, subscriber: str | None, name: str, ack: int) -> Batch | None:
    """Poll without waiting: what is queued now, or None (this also subscribes)."""
    return hub.poll(subscriber, name, ack, lambda: True, check_every=0.001)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def poll_async(
    pool: ThreadPoolExecutor, hub: CallbackHub, subscriber: str | None, name: str, ack: int
) -> Future[Batch | None]:
    # check_every is long: a poll that returns did so because the hub woke it.
    return pool.submit(hub.poll, subscriber, name, ack, never, 60.0)


# -- subscribing and notifying ---------------------------------------------------------------------


def test_notify_without_subscribers() -> None:
    hub = CallbackHub()
    with pytest.raises(CallbackNotFound, match="cb"):
        hub.notify("cb", b"x")
    assert poll_now(hub, "s", "other", 0) is None
    with pytest.raises(CallbackNotFound):
        hub.notify("cb", b"x")
    assert hub.names() == ["other"]


def test_a_waiting_poll_gets_the_next_notification(pool: ThreadPoolExecutor) -> None:
    hub, spy = make_hub()
    fut = poll_async(pool, hub, "s", "cb", 0)
    spy.expect_wait()
    assert not fut.done()
    assert hub.notify("cb", bytearray(b"first")) == 1
    assert fut.result(WAIT) == Batch(1, [b"first"], legacy=False)


def test_order_numbering_ack_and_resend() -> None:
    hub = CallbackHub()
    assert poll_now(hub, "s", "cb", 0) is None
    for item in (b"a", b"b", b"c"):
        hub.notify("cb", item)
    assert poll_now(hub, "s", "cb", 0) == Batch(1, [b"a", b"b", b"c"], False)
    # The answer was lost on the way: the same poll again gets the same batch.
    assert poll_now(hub, "s", "cb", 0) == Batch(1, [b"a", b"b", b"c"], False)
    # Acknowledging 2 drops a and b only.
    assert poll_now(hub, "s", "cb", 2) == Batch(3, [b"c"], False)
    assert poll_now(hub, "s", "cb", 3) is None
    hub.notify("cb", b"d")
    assert poll_now(hub, "s", "cb", 3) == Batch(4, [b"d"], False)
    # An old acknowledgement does not bring back what a later one dropped.
    assert poll_now(hub, "s", "cb", 0) == Batch(4, [b"d"], False)


def test_unacknowledged_notifications_count_against_the_bound() -> None:
    hub = CallbackHub(CallbackSettings(max_queue=2))
    poll_now(hub, "s", "cb", 0)
    hub.notify("cb", b"a")
    hub.notify("cb", b"b")
    assert poll_now(hub, "s", "cb", 0) == Batch(1, [b"a", b"b"], False)  # sent, not acked
    with pytest.raises(NotifyTimeout):
        hub.notify("cb", b"c", timeout=0)
    assert poll_now(hub, "s", "cb", 1) == Batch(2, [b"b"], False)
    assert hub.notify("cb", b"c", timeout=0) == 1
    assert poll_now(hub, "s", "cb", 1) == Batch(2, [b"b", b"c"], False)


def test_two_subscribers_of_one_name_each_get_everything() -> None:
    hub = CallbackHub()
    poll_now(hub, "app1", "cb", 0)
    poll_now(hub, "app2", "cb", 0)
    poll_now(hub, "app3", "other", 0)
    assert hub.notify("cb", b"a") == 2
    assert hub.notify("cb", b"b") == 2
    assert poll_now(hub, "app1", "cb", 0) == Batch(1, [b"a", b"b"], False)
    assert poll_now(hub, "app1", "cb", 2) is None
    # app1's acknowledgement is its own: app2 still has both.
    assert poll_now(hub, "app2", "cb", 0) == Batch(1, [b"a", b"b"], False)
    assert poll_now(hub, "app3", "other", 0) is None
    assert hub.names() == ["cb", "other"]


def test_one_subscriber_of_two_names_has_two_queues() -> None:
    hub = CallbackHub()
    poll_now(hub, "app", "cb1", 0)
    poll_now(hub, "app", "cb2", 0)
    hub.notify("cb1", b"one")
    hub.notify("cb2", b"two")
    hub.notify("cb2", b"three")
    assert poll_now(hub, "app", "cb1", 0) == Batch(1, [b"one"], False)
    assert poll_now(hub, "app", "cb2", 0) == Batch(1, [b"two", b"three"], False)


def test_concurrent_notifiers_keep_one_gapless_numbering(pool: ThreadPoolExecutor) -> None:
    hub = CallbackHub()
    poll_now(hub, "s", "cb", 0)
    start = threading.Barrier(4)

    def burst(tag: int) -> None:
        start.wait(WAIT)
        for i in range(200):
            hub.notify("cb", b"%d-%d" % (tag, i))

    for fut in [pool.submit(burst, t) for t in range(4)]:
        fut.result(WAIT)
    batch = poll_now(hub, "s", "cb", 0)
    assert batch is not None and batch.first_seq == 1 and len(batch.items) == 800
    for tag in range(4):  # each notifier's own items stay in its order
        mine = [x for x in batch.items if x.startswith(b"%d-" % tag)]
        assert mine == [b"%d-%d" % (tag, i) for i in range(200)]


# -- legacy (GoPlug) polls -------------------------------------------------------------------------


def test_legacy_poll_pops_one_item_per_poll(pool: ThreadPoolExecutor) -> None:
    hub, spy = make_hub()
    fut = poll_async(pool, hub, None, "main.callBack", 0)
    spy.expect_wait()
    hub.notify("main.callBack", b"Test Data")
    assert fut.result(WAIT) == Batch(0, [b"Test Data"], legacy=True)
    for item in (b"N1", b"N2", b"N3"):
        hub.notify("main.callBack", item)
    # One per answer, in order, no numbering; the ack value means nothing here.
    assert poll_now(hub, None, "main.callBack", 99) == Batch(0, [b"N1"], True)
    assert poll_now(hub, None, "main.callBack", 0) == Batch(0, [b"N2"], True)
    assert poll_now(hub, None, "main.callBack", 0) == Batch(0, [b"N3"], True)
    assert poll_now(hub, None, "main.callBack", 0) is None


def test_legacy_and_reliable_subscribers_side_by_side() -> None:
    hub = CallbackHub()
    poll_now(hub, None, "cb", 0)
    poll_now(hub, "tok", "cb", 0)
    assert hub.notify("cb", b"x") == 2
    assert poll_now(hub, None, "cb", 0) == Batch(0, [b"x"], True)
    assert poll_now(hub, "tok", "cb", 0) == Batch(1, [b"x"], False)


def test_legacy_queue_is_bounded_too(pool: ThreadPoolExecutor) -> None:
    hub, spy = make_hub(max_queue=1)
    poll_now(hub, None, "cb", 0)
    hub.notify("cb", b"a")
    spy.waiting.clear()
    blocked = pool.submit(hub.notify, "cb", b"b", 60.0)
    spy.expect_wait()
    assert not blocked.done()
    assert poll_now(hub, None, "cb", 0) == Batch(0, [b"a"], True)  # popping makes room
    assert blocked.result(WAIT) == 1
    assert poll_now(hub, None, "cb", 0) == Batch(0, [b"b"], True)


# -- back-pressure -------------------------------------------------------------------------------


def test_notify_blocks_while_full_and_proceeds_on_ack(pool: ThreadPoolExecutor) -> None:
    hub, spy = make_hub(max_queue=2)
    poll_now(hub, "s", "cb", 0)
    hub.notify("cb", b"a")
    hub.notify("cb", b"b")
    spy.waiting.clear()
    blocked = pool.submit(hub.notify, "cb", b"c", 60.0)
    spy.expect_wait()  # the notify is waiting for room
    assert not blocked.done()
    # A poll that acknowledges nothing makes no room: the notify wakes, looks, waits again.
    assert poll_now(hub, "s", "cb", 0) == Batch(1, [b"a", b"b"], False)
    spy.expect_wait()
    assert not blocked.done()
    # A poll that acknowledges both lets it through, and gets c itself.
    assert poll_async(pool, hub, "s", "cb", 2).result(WAIT) == Batch(3, [b"c"], False)
    assert blocked.result(WAIT) == 1


def test_notify_times_out_when_nobody_catches_up() -> None:
    hub = CallbackHub(CallbackSettings(max_queue=1, notify_timeout=0.05))
    poll_now(hub, "s", "cb", 0)
    hub.notify("cb", b"a")
    started = time.monotonic()
    with pytest.raises(NotifyTimeout, match="cb"):
        hub.notify("cb", b"b")  # the settings' timeout
    assert time.monotonic() - started >= 0.05
    started = time.monotonic()
    with pytest.raises(NotifyTimeout):
        hub.notify("cb", b"b", timeout=0)
    assert time.monotonic() - started < 1.0
    assert poll_now(hub, "s", "cb", 0) == Batch(1, [b"a"], False)  # nothing was dropped


def test_a_timed_out_notify_leaves_no_subscriber_with_the_item() -> None:
    hub = CallbackHub(CallbackSettings(max_queue=1))
    poll_now(hub, "slow", "cb", 0)
    poll_now(hub, "fast", "cb", 0)
    hub.notify("cb", b"a")
    assert poll_now(hub, "fast", "cb", 1) is None  # fast has caught up; slow is full
    with pytest.raises(NotifyTimeout):
        hub.notify("cb", b"b", timeout=0.05)
    assert poll_now(hub, "fast", "cb", 1) is None  # all or nothing: fast did not get b
    assert poll_now(hub, "slow", "cb", 0) == Batch(1, [b"a"], False)
    # The failed notify used no number: the next one is 2 for both.
    assert poll_now(hub, "slow", "cb", 1) is None
    assert hub.notify("cb", b"c") == 2
    assert poll_now(hub, "fast", "cb", 1) == Batch(2, [b"c"], False)
    assert poll_now(hub, "slow", "cb", 1) == Batch(2, [b"c"], False)


def test_notify_waits_for_every_subscriber(pool: ThreadPoolExecutor) -> None:
    hub, spy = make_hub(max_queue=1)
    poll_now(hub, "s1", "cb", 0)
    poll_now(hub, "s2", "cb", 0)
    hub.notify("cb", b"a")
    spy.waiting.clear()
    blocked = pool.submit(hub.notify, "cb", b"b", 60.0)
    spy.expect_wait()
    assert poll_now(hub, "s1", "cb", 1) is None  # room for s1 only
    spy.expect_wait()  # the notify woke, found s2 still full, and waits again
    assert not blocked.done()
    assert poll_async(pool, hub, "s2", "cb", 1).result(WAIT) == Batch(2, [b"b"], False)
    assert blocked.result(WAIT) == 2
    assert poll_now(hub, "s1", "cb", 1) == Batch(2, [b"b"], False)


# -- unsubscribe, expiry, close ------------------------------------------------------------------


def test_unsubscribe() -> None:
    hub = CallbackHub()
    poll_now(hub, "s", "cb", 0)
    hub.notify("cb", b"a")
    assert hub.unsubscribe("s", "cb") is True
    assert hub.unsubscribe("s", "cb") is False
    assert hub.names() == []
    with pytest.raises(CallbackNotFound):
        hub.notify("cb", b"b")
    # The subscriber is gone for good: a late poll of its own does not bring it back...
    assert poll_now(hub, "s", "cb", 0) is None
    assert hub.names() == []
    # ...while a new subscriber starts afresh: the queue went with the old one.
    assert poll_now(hub, "s2", "cb", 0) is None
    hub.notify("cb", b"c")
    assert poll_now(hub, "s2", "cb", 0) == Batch(1, [b"c"], False)
    poll_now(hub, None, "legacy", 0)
    assert hub.unsubscribe(None, "legacy") is True


def test_unsubscribe_wakes_a_waiting_poll(pool: ThreadPoolExecutor) -> None:
    hub, spy = make_hub()
    fut = poll_async(pool, hub, "s", "cb", 0)
    spy.expect_wait()
    assert hub.unsubscribe("s", "cb")
    assert fut.result(WAIT) is None


def test_unsubscribe_releases_a_blocked_notify(pool: ThreadPoolExecutor) -> None:
    hub, spy = make_hub(max_queue=1)
    poll_now(hub, "s", "cb", 0)
    hub.notify("cb", b"a")
    spy.waiting.clear()
    blocked = pool.submit(hub.notify, "cb", b"b", 60.0)
    spy.expect_wait()
    hub.unsubscribe("s", "cb")
    assert blocked.exception(WAIT) is None


def test_a_poll_in_flight_does_not_revive_an_unsubscribed_subscriber(
    pool: ThreadPoolExecutor,
) -> None:
    # A registry's poll may be read after its /Unsubscribe (different connections): it must
    # end at once instead of creating the subscriber again, which would then linger listed.
    hub, spy = make_hub()
    old = poll_async(pool, hub, "s", "cb", 0)
    spy.expect_wait()
    try:
        with hub._lock:  # nothing else runs between these two steps
            hub.unsubscribe("s", "cb")
            assert poll_now(hub, "s", "cb", 3) is None  # the late poll
        assert old.result(1.0) is None  # the forgotten subscriber's waiting poll ended too
        assert hub.names() == []
        with pytest.raises(CallbackNotFound):
            hub.notify("cb", b"new")
    finally:
        hub.close()


def test_ended_subscribers_are_remembered_within_a_bound() -> None:
    hub = CallbackHub()
    for i in range(5000):
        hub.unsubscribe(f"s{i}", "cb")
    assert len(hub._ended) == 4096
    assert poll_now(hub, "s4999", "cb", 0) is None  # the newest are remembered
    assert hub.names() == []
    poll_now(hub, "s0", "cb", 0)  # the oldest fell out of memory: it is a new subscriber
    assert hub.names() == ["cb"]


class FakeClock:
    """The time module for goplug.callbacks, its monotonic clock moved forward by hand."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(callbacks, "time", fake)
    return fake


def test_idle_subscriber_expires(clock: FakeClock) -> None:
    hub = CallbackHub(CallbackSettings(subscriber_expiry=1.0))
    poll_now(hub, "s", "cb", 0)
    hub.notify("cb", b"a")
    clock.offset += 0.6
    assert hub.names() == ["cb"]
    assert poll_now(hub, "s", "cb", 0) == Batch(1, [b"a"], False)  # a poll refreshes it
    clock.offset += 0.6
    assert hub.notify("cb", b"b") == 1
    clock.offset += 2.0
    assert hub.names() == []
    with pytest.raises(CallbackNotFound):
        hub.notify("cb", b"c")
    # Gone with its queue: a new poll starts a new numbering.
    assert poll_now(hub, "s", "cb", 0) is None
    hub.notify("cb", b"d")
    assert poll_now(hub, "s", "cb", 0) == Batch(1, [b"d"], False)


def test_a_subscriber_with_a_poll_waiting_never_expires(
    clock: FakeClock, pool: ThreadPoolExecutor
) -> None:
    hub, spy = make_hub(subscriber_expiry=0.05)
    fut = poll_async(pool, hub, "s", "cb", 0)
    spy.expect_wait()
    clock.offset += 3600
    assert hub.names() == ["cb"]
    assert hub.notify("cb", b"late") == 1
    assert fut.result(WAIT) == Batch(1, [b"late"], False)


def test_expiry_with_real_time() -> None:
    hub = CallbackHub(CallbackSettings(subscriber_expiry=0.01))
    poll_now(hub, "s", "cb", 0)
    deadline = time.monotonic() + WAIT
    while hub.names() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert hub.names() == []


def test_close_wakes_a_waiting_poll(pool: ThreadPoolExecutor) -> None:
    hub, spy = make_hub()
    fut = poll_async(pool, hub, "s", "cb", 0)
    spy.expect_wait()
    hub.close()
    assert fut.result(WAIT) is None
    started = time.monotonic()
    assert hub.poll("s2", "cb", 0, never, 60.0) is None  # later polls: at once
    assert time.monotonic() - started < WAIT


def test_close_releases_a_blocked_notify(pool: ThreadPoolExecutor) -> None:
    hub, spy = make_hub(max_queue=1)
    poll_now(hub, "s", "cb", 0)
    hub.notify("cb", b"a")
    spy.waiting.clear()
    blocked = pool.submit(hub.notify, "cb", b"b", 60.0)
    spy.expect_wait()
    hub.close()
    exc = blocked.exception(WAIT)  # returns or fails at once, never hangs
    assert exc is None or isinstance(exc, GoPlugError)


def test_polls_after_close_return_none_even_with_items_queued() -> None:
    hub = CallbackHub()
    poll_now(hub, "s", "cb", 0)
    hub.notify("cb", b"a")
    hub.close()
    assert hub.poll("s", "cb", 0, never, 60.0) is None


def test_cancelled_poll_returns_none() -> None:
    hub = CallbackHub()
    asked = threading.Event()

    def cancelled() -> bool:
        asked.set()
        return True

    assert hub.poll("s", "cb", 0, cancelled, check_every=0.01) is None
    assert asked.is_set()


# -- batch bounds --------------------------------------------------------------------------------


def test_max_batch() -> None:
    hub = CallbackHub(CallbackSettings(max_batch=3))
    poll_now(hub, "s", "cb", 0)
    for i in range(1, 6):
        hub.notify("cb", b"%d" % i)
    assert poll_now(hub, "s", "cb", 0) == Batch(1, [b"1", b"2", b"3"], False)
    assert poll_now(hub, "s", "cb", 3) == Batch(4, [b"4", b"5"], False)


def test_max_batch_bytes() -> None:
    hub = CallbackHub(CallbackSettings(max_batch_bytes=10))
    poll_now(hub, "s", "cb", 0)
    for item in (b"aaaa", b"bbbb", b"cccc", b"dd", b"x" * 100, b"e", b"fffff", b"ggggg"):
        hub.notify("cb", item)
    assert poll_now(hub, "s", "cb", 0) == Batch(1, [b"aaaa", b"bbbb"], False)  # 12 > 10
    assert poll_now(hub, "s", "cb", 2) == Batch(3, [b"cccc", b"dd"], False)
    assert poll_now(hub, "s", "cb", 4) == Batch(5, [b"x" * 100], False)  # always one
    assert poll_now(hub, "s", "cb", 5) == Batch(6, [b"e", b"fffff"], False)
    assert poll_now(hub, "s", "cb", 7) == Batch(8, [b"ggggg"], False)


def test_batch_bounds_together() -> None:
    hub = CallbackHub(CallbackSettings(max_batch=2, max_batch_bytes=1000))
    poll_now(hub, "s", "cb", 0)
    for _ in range(5):
        hub.notify("cb", b"")
    sizes = []
    ack = 0
    while (batch := poll_now(hub, "s", "cb", ack)) is not None:
        assert batch.first_seq == ack + 1
        sizes.append(len(batch.items))
        ack += len(batch.items)
    assert sizes == [2, 2, 1]


# -- numbering across a restart ------------------------------------------------------------------


def test_an_ack_the_hub_never_issued_drops_nothing() -> None:
    hub = CallbackHub()
    # A registry that saw 5 notifications from an earlier plugin process subscribes again;
    # its first poll is cut before anything arrives.
    assert poll_now(hub, "s", "cb", 5) is None
    hub.notify("cb", b"a")  # numbered on from the subscriber's Ack: 6
    assert poll_now(hub, "s", "cb", 5) == Batch(6, [b"a"], False)


# -- polls answered by notify itself ---------------------------------------------------------------


class Answers:
    """An ``answer`` function for polls: records each batch and the thread that sent it."""

    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.sent: list[tuple[Batch, int]] = []

    def __call__(self, batch: Batch) -> bool:
        self.sent.append((batch, threading.get_ident()))
        return self.ok


def poll_answered(
    pool: ThreadPoolExecutor, hub: CallbackHub, ack: int, answer: Answers
) -> Future[Batch | None]:
    return pool.submit(hub.poll, "s", "cb", ack, never, 60.0, answer)


def test_notify_answers_a_waiting_poll_on_its_own_thread(pool: ThreadPoolExecutor) -> None:
    hub, spy = make_hub()
    answer = Answers()
    fut = poll_answered(pool, hub, 0, answer)
    spy.expect_wait()
    assert hub.notify("cb", b"first") == 1
    # Sent before notify returned, by the notifying thread, exactly once.
    expected = Batch(1, [b"first"], False, sent=True)
    assert answer.sent == [(expected, threading.get_ident())]
    assert fut.result(WAIT) == expected
    # Still queued until acknowledged, numbered on.
    hub.notify("cb", b"second")
    assert poll_now(hub, "s", "cb", 0) == Batch(1, [b"first", b"second"], False)
    assert poll_now(hub, "s", "cb", 1) == Batch(2, [b"second"], False)


def test_a_failed_answer_ends_the_poll_and_loses_nothing(pool: ThreadPoolExecutor) -> None:
    hub, spy = make_hub()
    answer = Answers(ok=False)
    fut = poll_answered(pool, hub, 0, answer)
    spy.expect_wait()
    hub.notify("cb", b"lost in transit")
    assert fut.result(WAIT) is None
    assert len(answer.sent) == 1
    assert poll_now(hub, "s", "cb", 0) == Batch(1, [b"lost in transit"], False)


def test_an_answer_that_raises_counts_as_failed(pool: ThreadPoolExecutor) -> None:
    hub, spy = make_hub()

    def broken(batch: Batch) -> bool:
        raise OSError("connection reset")

    fut = pool.submit(hub.poll, "s", "cb", 0, never, 60.0, broken)
    spy.expect_wait()
    assert hub.notify("cb", b"x") == 1  # notify itself does not fail
    assert fut.result(WAIT) is None
    assert poll_now(hub, "s", "cb", 0) == Batch(1, [b"x"], False)


def test_a_large_notification_is_sent_by_the_polls_thread(pool: ThreadPoolExecutor) -> None:
    hub, spy = make_hub()
    answer = Answers()
    fut = poll_answered(pool, hub, 0, answer)
    spy.expect_wait()
    big = bytes(callbacks._DIRECT_MAX + 1)
    hub.notify("cb", big)
    assert fut.result(WAIT) == Batch(1, [big], False)  # not sent: the caller sends it
    assert answer.sent == []


def test_polls_already_answered_do_not_get_the_next_notification(
    pool: ThreadPoolExecutor,
) -> None:
    hub, spy = make_hub()
    answer = Answers()
    fut = poll_answered(pool, hub, 0, answer)
    spy.expect_wait()
    hub.notify("cb", b"a")
    hub.notify("cb", b"b")
    assert fut.result(WAIT) == Batch(1, [b"a"], False, sent=True)
    assert [batch for batch, _ in answer.sent] == [Batch(1, [b"a"], False, sent=True)]
    # The next poll acknowledges a and gets b at once, from its own thread.
    assert poll_answered(pool, hub, 1, answer).result(WAIT) == Batch(2, [b"b"], False)
    assert len(answer.sent) == 1


def test_legacy_polls_are_never_answered_by_notify(pool: ThreadPoolExecutor) -> None:
    hub, spy = make_hub()
    answer = Answers()
    fut = pool.submit(hub.poll, None, "cb", 0, never, 60.0, answer)
    spy.expect_wait()
    hub.notify("cb", b"a")
    assert fut.result(WAIT) == Batch(0, [b"a"], True)
    assert answer.sent == []
