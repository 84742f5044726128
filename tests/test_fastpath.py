"""The C fast path of a call and of a callback's long poll (goplug/_fastpath.c), on socket pairs.

Each case drives one side with the fast path and plays the other side by hand, byte for byte,
so what the fast path must hand back to the Python parser is checked as precisely as what it
answers by itself. The whole suite runs on the fast path too; test_pure_python.py runs the
wire-level suites without it.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sysconfig
import threading
import time
from collections.abc import Iterator

import pytest

from goplug import transport
from goplug.transport import set_timeouts

fastpath = transport.fastpath
pytestmark = pytest.mark.skipif(
    fastpath is None, reason="goplug._fastpath is not built (no C compiler) or is turned off"
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: "
PREFIX = b"POST /plugins/p/Echo HTTP/1.1\r\nHost: plugin\r\nContent-Length: "
MAX = 64 * 1024 * 1024


def test_extension_is_built_where_a_compiler_is() -> None:
    if os.environ.get("GOPLUG_PURE_PYTHON") == "1":
        pytest.skip("GOPLUG_PURE_PYTHON=1 turns the fast path off")
    if not sysconfig.get_config_var("CC"):
        pytest.skip("no C compiler known to this Python")
    assert importlib.util.find_spec("goplug._fastpath") is not None


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    set_timeouts(a, 2.0)
    set_timeouts(b, 2.0)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def read_request(sock: socket.socket, expected: int) -> bytes:
    data = b""
    while len(data) < expected:
        chunk = sock.recv(expected - len(data))
        assert chunk, "the fast path closed early"
        data += chunk
    return data


def in_thread(fn: object) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


# ----------------------------------------------------------------------------- exchange


def test_exchange_sends_the_request_and_returns_a_plain_ok_body(pair) -> None:
    a, b = pair
    request = PREFIX + b"5\r\n\r\nhello"

    def plugin() -> None:
        assert read_request(b, len(request)) == request
        b.sendall(OK + b"3\r\n\r\nabc")

    thread = in_thread(plugin)
    assert fastpath.exchange(a.fileno(), PREFIX, b"hello", 2.0, MAX, None) == b"abc"
    thread.join(5)


def test_exchange_sends_an_empty_body_and_accepts_one(pair) -> None:
    a, b = pair

    def plugin() -> None:
        assert read_request(b, len(PREFIX) + 5) == PREFIX + b"0\r\n\r\n"
        b.sendall(OK + b"0\r\n\r\n")

    thread = in_thread(plugin)
    assert fastpath.exchange(a.fileno(), PREFIX, b"", 2.0, MAX, None) == b""
    thread.join(5)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno",
        b"HTTP/1.1 200 OK\r\nX-Goplug-Seq: 1\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcEXTRA",  # bytes nobody asked for
        b"HTTP/1.1 200 OK\r\nContent-Length: 3",  # the head arrives in pieces
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",  # over max_body
        b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",
    ],
)
def test_exchange_hands_anything_else_back_untouched(pair, answer: bytes) -> None:
    a, b = pair
    b.sendall(answer)
    received, eof = fastpath.exchange(a.fileno(), PREFIX, b"x", 2.0, MAX, None)
    assert (received, eof) == (answer, False)


def test_exchange_reports_the_peer_closing_before_an_answer(pair) -> None:
    a, b = pair
    b.shutdown(socket.SHUT_WR)
    assert fastpath.exchange(a.fileno(), PREFIX, b"x", 2.0, MAX, None) == (b"", True)


def test_exchange_hands_back_a_body_cut_short_with_eof(pair) -> None:
    a, b = pair
    head = OK + b"200000\r\n\r\n"
    b.sendall(head + b"y" * 1000)
    b.shutdown(socket.SHUT_WR)
    received, eof = fastpath.exchange(a.fileno(), PREFIX, b"x", 2.0, MAX, None)
    assert eof is True
    assert received == head + b"y" * 1000


def test_exchange_receives_a_large_body_in_pieces_and_tunes_once(pair) -> None:
    a, b = pair
    body = bytes(range(256)) * 4096  # 1 MiB
    tuned: list[int] = []

    def plugin() -> None:
        read_request(b, len(PREFIX) + 5)
        b.sendall(OK + b"%d\r\n\r\n" % len(body) + body[:1000])
        for i in range(1000, len(body), 300_000):
            b.sendall(body[i : i + 300_000])

    thread = in_thread(plugin)
    got = fastpath.exchange(a.fileno(), PREFIX, b"", 5.0, MAX, lambda: tuned.append(1))
    thread.join(5)
    assert got == body
    assert tuned == [1]


def test_exchange_sends_a_large_request_whole(pair) -> None:
    a, b = pair
    data = os.urandom(3 * 1024 * 1024)
    head = PREFIX + b"%d\r\n\r\n" % len(data)

    def plugin() -> None:
        assert read_request(b, len(head) + len(data)) == head + data
        b.sendall(OK + b"2\r\n\r\nok")

    thread = in_thread(plugin)
    assert fastpath.exchange(a.fileno(), PREFIX, data, 5.0, MAX, None) == b"ok"
    thread.join(5)


def test_exchange_times_out_on_a_silent_peer(pair) -> None:
    a, _b = pair
    set_timeouts(a, 0.2)
    with pytest.raises(BlockingIOError):
        fastpath.exchange(a.fileno(), PREFIX, b"x", 0.2, MAX, None)


def test_exchange_bounds_a_trickling_body_by_the_call_timeout(pair) -> None:
    a, b = pair
    set_timeouts(a, 0.3)
    stop = threading.Event()

    def plugin() -> None:
        b.sendall(OK + b"1000000\r\n\r\n")
        while not stop.wait(0.05):  # a byte every 50 ms: each recv succeeds, the call must not
            b.sendall(b"z")

    thread = in_thread(plugin)
    try:
        with pytest.raises((TimeoutError, BlockingIOError)):
            fastpath.exchange(a.fileno(), PREFIX, b"x", 0.3, MAX, None)
    finally:
        stop.set()
        thread.join(5)


def test_exchange_raises_the_errors_socket_calls_raise(pair) -> None:
    a, b = pair
    b.close()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        fastpath.exchange(a.fileno(), PREFIX, b"x" * 100_000, 2.0, MAX, None)


def test_exchange_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        fastpath.exchange(-1, PREFIX, b"", 1.0, MAX, None)
    with pytest.raises(TypeError):
        fastpath.exchange(0, "text", b"", 1.0, MAX, None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- serve


def request(body: bytes, target: bytes = b"/plugins/p/Echo") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: plugin\r\nContent-Length: %d\r\n\r\n%s" % (
        target,
        len(body),
        body,
    )


def answer_of(sock: socket.socket, body: bytes) -> bytes:
    expected = OK + b"%d\r\n\r\n" % len(body) + body
    return read_request(sock, len(expected))


def test_serve_answers_known_targets_until_the_peer_closes(pair) -> None:
    a, b = pair
    targets = {b"/plugins/p/Echo": lambda data: data[::-1]}

    def registry() -> None:
        for body in (b"abc", b"", b"x" * 70_000):
            a.sendall(request(body))
            assert answer_of(a, body[::-1]) == OK + b"%d\r\n\r\n" % len(body) + body[::-1]
        a.shutdown(socket.SHUT_WR)

    thread = in_thread(registry)
    assert fastpath.serve(b.fileno(), targets, MAX, 2.0, None) == (fastpath.EOF, 3)
    thread.join(5)


@pytest.mark.parametrize(
    "data",
    [
        request(b"x", b"/plugins/p/Other"),  # not a target the Python side has met yet
        b"POST /plugins/p/Echo HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer t\r\n"
        b"Content-Length: 1\r\n\r\nx",
        b"POST /plugins/p/Echo HTTP/1.1\r\nHost: p\r\nContent-Length: 1\r\n\r\nx" + request(b"y"),
        b"POST /plugins/p/Echo HTTP/1.1\nHost: p\nContent-Length: 1\n\nx",
        b"GET /plugins/p/Echo HTTP/1.1\r\nHost: p\r\n\r\n",
        b"POST /plugins/p/Echo HTTP/1.1\r\nHost: p\r\nContent-Length: 99999999\r\n\r\n",
        b"POST /plugins/p/Echo HTTP/1.1\r\nHost: p\r\nContent-Le",
        b"garbage\r\n\r\n",
    ],
)
def test_serve_hands_anything_else_back_untouched(pair, data: bytes) -> None:
    a, b = pair
    a.sendall(data)
    targets = {b"/plugins/p/Echo": lambda d: d}
    assert fastpath.serve(b.fileno(), targets, 1_000_000, 2.0, None) == (fastpath.DATA, 0, data)


def test_serve_returns_what_a_method_raised(pair) -> None:
    a, b = pair

    def boom(data: bytes) -> bytes:
        raise ValueError(data.decode())

    a.sendall(request(b"bad input"))
    code, served, target, exc = fastpath.serve(
        b.fileno(), {b"/plugins/p/Echo": boom}, MAX, 2.0, None
    )
    assert (code, served, target) == (fastpath.RAISED, 0, b"/plugins/p/Echo")
    assert isinstance(exc, ValueError)
    assert str(exc) == "bad input"
    assert exc.__traceback__ is not None


def test_serve_lets_keyboard_interrupt_through(pair) -> None:
    a, b = pair

    def interrupted(data: bytes) -> bytes:
        raise KeyboardInterrupt

    a.sendall(request(b"x"))
    with pytest.raises(KeyboardInterrupt):
        fastpath.serve(b.fileno(), {b"/plugins/p/Echo": interrupted}, MAX, 2.0, None)


def test_serve_returns_results_that_are_not_bytes(pair) -> None:
    a, b = pair
    a.sendall(request(b"x"))
    outcome = fastpath.serve(b.fileno(), {b"/plugins/p/Echo": lambda d: None}, MAX, 2.0, None)
    assert outcome == (fastpath.RESULT, 0, b"/plugins/p/Echo", None)


def test_serve_reports_an_idle_connection(pair) -> None:
    _a, b = pair
    set_timeouts(b, 0.1)
    assert fastpath.serve(b.fileno(), {}, MAX, 0.1, None) == (fastpath.IDLE, 0)


def test_serve_receives_a_large_body_in_pieces(pair) -> None:
    a, b = pair
    body = os.urandom(2 * 1024 * 1024)
    tuned: list[int] = []
    got: list[bytes] = []

    def registry() -> None:
        data = request(body)
        for i in range(0, len(data), 500_000):
            a.sendall(data[i : i + 500_000])
        answer_of(a, b"%d" % len(body))
        a.shutdown(socket.SHUT_WR)

    def method(data: bytes) -> bytes:
        got.append(data)
        return b"%d" % len(data)

    thread = in_thread(registry)
    outcome = fastpath.serve(
        b.fileno(), {b"/plugins/p/Echo": method}, MAX, 5.0, lambda: tuned.append(1)
    )
    thread.join(5)
    assert outcome == (fastpath.EOF, 1)
    assert got == [body]
    assert tuned == [1]


def test_serve_gives_up_on_a_body_that_trickles_past_the_timeout(pair) -> None:
    a, b = pair
    set_timeouts(b, 0.3)
    stop = threading.Event()

    a.sendall(b"POST /plugins/p/Echo HTTP/1.1\r\nHost: p\r\nContent-Length: 1000000\r\n\r\nz")

    def trickle() -> None:
        while not stop.wait(0.05):
            a.sendall(b"z")

    thread = in_thread(trickle)
    try:
        outcome = fastpath.serve(b.fileno(), {b"/plugins/p/Echo": lambda d: d}, MAX, 0.3, None)
    finally:
        stop.set()
        thread.join(5)
    assert outcome == (fastpath.SLOW, 0)


def test_serve_reports_a_body_cut_short(pair) -> None:
    a, b = pair
    a.sendall(b"POST /plugins/p/Echo HTTP/1.1\r\nHost: p\r\nContent-Length: 10\r\n\r\nabc")
    a.shutdown(socket.SHUT_WR)
    outcome = fastpath.serve(b.fileno(), {b"/plugins/p/Echo": lambda d: d}, MAX, 2.0, None)
    assert outcome == (fastpath.EOF, 0)


# ----------------------------------------------------------------------------- ok_body


@pytest.mark.parametrize(
    ("data", "body"),
    [
        (OK + b"3\r\n\r\nabc", b"abc"),
        (OK + b"0\r\n\r\n", b""),
        (OK + b"3\r\n\r\nab", None),  # not all there yet
        (OK + b"3\r\n\r\nabcd", None),  # more than one answer
        (OK + b"3\r\nX-Goplug-Seq: 1\r\n\r\nabc", None),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 1\r\n\r\nx", None),
        (OK + b"99\r\n\r\n" + b"x" * 99, None),  # over max_body
        (OK + b"x\r\n\r\n", None),
    ],
)
def test_ok_body_takes_exactly_one_whole_plain_answer(data: bytes, body: bytes | None) -> None:
    assert fastpath.ok_body(data, 50) == body


# ----------------------------------------------------------------------------- request_of


@pytest.mark.parametrize(
    ("data", "call"),
    [
        (request(b"abc"), (b"/plugins/p/Echo", b"abc")),
        (request(b""), (b"/plugins/p/Echo", b"")),
        (request(b"abc")[:-1], None),  # not all there yet
        (request(b"abc") + b"x", None),  # more than one request
        (request(b"x" * 99), None),  # over max_body
        (b"POST /p/E HTTP/1.1\r\nHost: h\r\nX: y\r\nContent-Length: 1\r\n\r\nx", None),
        (b"POST /p/E HTTP/1.0\r\nHost: h\r\nContent-Length: 1\r\n\r\nx", None),
        (b"PUT /p/E HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx", None),
    ],
)
def test_request_of_takes_exactly_one_whole_call(data: bytes, call: object) -> None:
    assert fastpath.request_of(data, 50) == call


# ----------------------------------------------------------------------------- poll_of

POLL = b"POST /plugins/p/RegisterCallback HTTP/1.1\r\nHost: plugin\r\n"


def poll(token: bytes = b"tok_1", ack: bytes = b"7", body: bytes = b'"cb"') -> bytes:
    return POLL + b"X-Goplug-Subscriber: %s\r\nX-Goplug-Ack: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        token,
        ack,
        len(body),
        body,
    )


@pytest.mark.parametrize(
    ("data", "parsed"),
    [
        (poll(), (b"/plugins/p/RegisterCallback", b"tok_1", 7, b'"cb"')),
        (poll(ack=b"0"), (b"/plugins/p/RegisterCallback", b"tok_1", 0, b'"cb"')),
        (
            poll(ack=b"123456789012345678"),
            (b"/plugins/p/RegisterCallback", b"tok_1", 123456789012345678, b'"cb"'),
        ),
        (poll(token=b""), (b"/plugins/p/RegisterCallback", b"", 7, b'"cb"')),  # Python refuses it
        (poll()[:-1], None),  # not all there yet
        (poll() + b"x", None),  # more than one request
        (poll(body=b'"' + b"x" * 60 + b'"'), None),  # over max_body
        (poll(ack=b""), None),
        (poll(ack=b"-1"), None),
        (poll(ack=b"1234567890123456789"), None),  # more digits than a sequence number has
        (POLL + b"X-Goplug-Ack: 7\r\nX-Goplug-Subscriber: t\r\nContent-Length: 1\r\n\r\nx", None),
        (POLL + b"X-Goplug-Subscriber: t\r\nContent-Length: 1\r\n\r\nx", None),  # no ack
        (request(b"abc"), None),  # a call
        (poll().replace(b"HTTP/1.1", b"HTTP/1.0"), None),
    ],
)
def test_poll_of_takes_exactly_one_whole_long_poll(data: bytes, parsed: object) -> None:
    assert fastpath.poll_of(data, 50) == parsed


# ----------------------------------------------------------------------------- notifications


def batch(first: int, items: list[bytes], extra: bytes = b"") -> bytes:
    body = b"".join(len(i).to_bytes(4, "big") + i for i in items)
    return (
        b"HTTP/1.1 200 OK\r\nX-Goplug-Seq: %d\r\nX-Goplug-Count: %d\r\nContent-Length: %d\r\n\r\n"
        % (first, len(items), len(body))
        + body
        + extra
    )


def test_notifications_sends_the_poll_and_splits_the_batch(pair) -> None:
    a, b = pair
    items = [b"one", b"", b"three" * 100]

    def plugin() -> None:
        assert read_request(b, len(poll())) == poll()
        b.sendall(batch(41, items))

    thread = in_thread(plugin)
    assert fastpath.notifications(a.fileno(), poll(), MAX, 5.0, None) == (41, items)
    thread.join(5)


def test_notifications_with_an_empty_request_only_waits(pair) -> None:
    a, b = pair
    b.sendall(batch(1, [b"x"]))
    assert fastpath.notifications(a.fileno(), b"", MAX, 5.0, None) == (1, [b"x"])
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(1)  # nothing was sent


def test_notifications_waits_without_a_timeout(pair) -> None:
    a, b = pair
    set_timeouts(a, 0)  # as a long poll's connection is
    sent = threading.Event()

    def plugin() -> None:
        # Longer than a call's receive timeout would allow, were one set.
        sent.wait(0.3)
        b.sendall(batch(5, [b"late"]))

    thread = in_thread(plugin)
    assert fastpath.notifications(a.fileno(), b"", MAX, 5.0, None) == (5, [b"late"])
    thread.join(5)


def test_notifications_receives_a_large_batch_in_pieces_and_tunes_once(pair) -> None:
    a, b = pair
    items = [bytes([i]) * 300_000 for i in range(4)]
    tuned: list[int] = []

    def plugin() -> None:
        data = batch(9, items)
        for i in range(0, len(data), 50_000):
            b.sendall(data[i : i + 50_000])

    thread = in_thread(plugin)
    assert fastpath.notifications(a.fileno(), b"", MAX, 5.0, lambda: tuned.append(1)) == (9, items)
    assert tuned == [1]
    thread.join(5)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",  # a GoPlug plugin's answer
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\nno",
        b"HTTP/1.1 200 OK\r\nX-Goplug-Count: 1\r\nX-Goplug-Seq: 1\r\nContent-Length: 5\r\n\r\n"
        b"\x00\x00\x00\x01x",  # other order
        batch(1, [b"x"], extra=b"E"),  # bytes nobody asked for
        batch(1, [b"x"])[:-1].replace(b"Content-Length: 5", b"Content-Length: 4"),  # short record
        batch(1, [b"xy"]).replace(b"Count: 1", b"Count: 2"),  # fewer records than counted
        batch(1, [b"x", b"y"]).replace(b"Count: 2", b"Count: 1"),  # bytes after the records
        batch(1, [b"x"] * 20).replace(b"Count: 20", b"Count: 9999"),  # an absurd count
        batch(1, [b"x"]).replace(b"Seq: 1", b"Seq: 1x"),
        batch(1, [b"x"]).replace(b"Content-Length: 5", b"Content-Length: 99999999999"),
    ],
)
def test_notifications_hands_anything_else_back_untouched(pair, answer: bytes) -> None:
    a, b = pair
    b.sendall(answer)
    assert fastpath.notifications(a.fileno(), b"", MAX, 5.0, None) == (answer, False)


def test_notifications_hands_back_a_batch_with_bad_records_after_receiving_it_whole(pair) -> None:
    a, b = pair
    answer = batch(1, [b"x" * 100_000]).replace(b"Count: 1", b"Count: 2")

    def plugin() -> None:
        for i in range(0, len(answer), 30_000):
            b.sendall(answer[i : i + 30_000])

    thread = in_thread(plugin)
    assert fastpath.notifications(a.fileno(), b"", MAX, 5.0, None) == (answer, False)
    thread.join(5)


def test_notifications_reports_the_peer_closing(pair) -> None:
    a, b = pair
    b.shutdown(socket.SHUT_WR)
    assert fastpath.notifications(a.fileno(), b"", MAX, 5.0, None) == (b"", True)


def test_notifications_hands_back_a_batch_cut_short_with_eof(pair) -> None:
    a, b = pair
    answer = batch(3, [b"z" * 200_000])
    b.sendall(answer[:1000])
    b.shutdown(socket.SHUT_WR)
    assert fastpath.notifications(a.fileno(), b"", MAX, 5.0, None) == (answer[:1000], True)


def test_notifications_ends_when_another_thread_shuts_the_socket_down(pair) -> None:
    a, _ = pair
    set_timeouts(a, 0)
    results: list[object] = []
    thread = in_thread(
        lambda: results.append(fastpath.notifications(a.fileno(), b"", MAX, 5.0, None))
    )
    # Closing a subscription shuts its socket down; the waiting receive must end.
    while thread.is_alive():
        a.shutdown(socket.SHUT_RDWR)
        thread.join(0.05)
    assert results == [(b"", True)]


def test_notifications_raises_the_errors_socket_calls_raise(pair) -> None:
    a, b = pair
    b.close()
    with pytest.raises(OSError):
        fastpath.notifications(a.fileno(), poll(), MAX, 5.0, None)


def _receive_timeout(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)


def test_notifications_bounds_the_rest_of_a_started_answer_by_the_timeout(pair) -> None:
    a, b = pair
    set_timeouts(a, 0)  # as a long poll's connection is
    b.sendall(batch(1, [b"w" * 200_000])[:5000])  # the head and a little: then nothing
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        fastpath.notifications(a.fileno(), b"", MAX, 0.3, None)
    assert 0.25 < time.monotonic() - started < 3.0
    assert _receive_timeout(a) == bytes(16)  # the long poll's socket waits without a bound again


def test_notifications_leaves_the_socket_without_a_receive_timeout(pair) -> None:
    a, b = pair
    set_timeouts(a, 0)
    items = [b"v" * 300_000]

    def plugin() -> None:
        data = batch(2, items)
        for i in range(0, len(data), 40_000):
            b.sendall(data[i : i + 40_000])

    thread = in_thread(plugin)
    assert fastpath.notifications(a.fileno(), b"", MAX, 5.0, None) == (2, items)
    thread.join(5)
    assert _receive_timeout(a) == bytes(16)


def test_notifications_rejects_a_timeout_that_is_not_positive(pair) -> None:
    a, _ = pair
    with pytest.raises(ValueError):
        fastpath.notifications(a.fileno(), b"", MAX, 0.0, None)
