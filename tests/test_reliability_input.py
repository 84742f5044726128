"""Bad input on the socket, both directions: abusive clients of a plugin, rogue plugins.

Every case ends within a bounded time in a status (400/408/413/503), a closed connection or a
typed exception; memory stays bounded and well-behaved peers keep being served meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import wait_for
from faultkit import (
    ROGUE_PLUGIN,
    TUNED_PLUGIN,
    Registries,
    deadline_call,
    loaded_handle,
    raw_connect,
    read_pconf,
    read_until_closed,
    start_plugin,
    status_of,
    vm_rss_kib,
)

from goplug import (
    CallTimeout,
    ClientSettings,
    GoPlugError,
    Limits,
    PluginConnectionError,
    PluginState,
    ProtocolError,
    RegistrySettings,
    ServerSettings,
    aio,
)
from goplug.wire import routes
from goplug.wire.http import Message, MessageReader

pytestmark = pytest.mark.timeout(60)

REQUEST_TIMEOUT = 1.0
MAX_BODY = 1024 * 1024


@pytest.fixture
def registries() -> Iterator[Registries]:
    made = Registries()
    try:
        yield made
    finally:
        made.close_all()


@pytest.fixture(autouse=True)
def enough_fds() -> Iterator[None]:
    """Room for a thousand connections here and in the plugins this test starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 4096))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_limit_defaults_are_documented_values():
    limits = Limits()
    assert (limits.max_head, limits.max_headers, limits.max_body) == (64 * 1024, 100, 64 << 20)
    server = ServerSettings()
    assert server.request_timeout == 10.0 and server.max_connections == 1024
    assert ClientSettings().limits == limits


# -- abusive clients of a plugin ----------------------------------------------------------------


class Target:
    """A tuned plugin under abuse, and a registry handle on it for well-behaved calls."""

    def __init__(self, spawn, plugin_dir, registries, *opts: str) -> None:
        self.plugin = start_plugin(
            spawn,
            plugin_dir,
            "Target",
            "",
            f"--request-timeout={REQUEST_TIMEOUT}",
            f"--max-body={MAX_BODY}",
            *opts,
            script=TUNED_PLUGIN,
        )
        self.sock = read_pconf(self.plugin.pconf)["Sock"]
        self.registry = registries(plugin_dir)
        self.handle = loaded_handle(self.registry, "Target")

    def healthy(self) -> None:
        payload = b"well-behaved %f" % time.monotonic()
        assert self.handle.execute("Echo", payload, timeout=5) == payload

    def rss(self) -> int:
        return vm_rss_kib(self.plugin.pid)


@pytest.fixture
def target(spawn, plugin_dir, registries) -> Target:
    return Target(spawn, plugin_dir, registries)


def _send(sock: socket.socket, data: bytes) -> None:
    """Send, tolerating a server that has already answered and closed."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def _abuse(path: str, data: bytes, within: float = 3.0) -> tuple[bytes, float]:
    """Send ``data`` on a fresh connection; return (everything answered, seconds to close)."""
    started = time.monotonic()
    with raw_connect(path) as sock:
        _send(sock, data)
        answer = read_until_closed(sock, started + within)
    return answer, time.monotonic() - started


HEAD = b"POST /Echo HTTP/1.1\r\nHost: Target\r\n"

ABUSE = {
    "garbage": (b"\x00\x01\x02\xff\xfe garbage \x7f\r\n\r\n", {400}),
    "not-http": (b"GET\r\n\r\n", {400}),
    "request-line-1MB": (b"POST /" + b"a" * (1024 * 1024) + b" HTTP/1.1\r\n\r\n", {400, None}),
    "10000-headers": (HEAD + b"X-H: v\r\n" * 10_000 + b"\r\n", {400, None}),
    "negative-length": (HEAD + b"Content-Length: -1\r\n\r\n", {400}),
    "absurd-length": (HEAD + b"Content-Length: 99999999999999999999999\r\n\r\n", {400}),
    "10GB-length": (HEAD + b"Content-Length: 10737418240\r\n\r\n", {413}),
    "over-limit": (HEAD + b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1), {413}),
    "huge-chunk": (HEAD + b"Transfer-Encoding: chunked\r\n\r\n280000000\r\n", {413}),
    "bad-chunk": (HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", {400}),
    "both-framings": (
        HEAD + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        {400},
    ),
    "bad-header": (HEAD + b"no colon here\r\n\r\n", {400}),
}


@pytest.mark.parametrize("case", list(ABUSE))
def test_plugin_answers_bad_requests_with_an_error_and_closes(target, case):
    data, statuses = ABUSE[case]
    rss_before = target.rss()
    answer, elapsed = _abuse(target.sock, data)
    assert status_of(answer) in statuses, answer[:200]
    assert elapsed < 2.0
    target.healthy()
    assert target.rss() - rss_before < 32 * 1024  # KiB: nothing of the announced size
    assert target.plugin.proc.poll() is None


def test_body_over_the_limit_is_refused_before_it_is_sent(target):
    with raw_connect(target.sock) as sock:
        sock.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % (50 * MAX_BODY))
        # Not one byte of the body was sent: the answer comes from the announced length.
        answer = read_until_closed(sock, time.monotonic() + 2)
    assert status_of(answer) == 413


def test_slowloris_gets_408_and_others_are_served_meanwhile(target):
    request = HEAD + b"Content-Length: 5\r\n\r\nhello"
    result: dict[str, object] = {}

    def slow() -> None:
        started = time.monotonic()
        with raw_connect(target.sock) as sock:
            for byte in request:  # one byte at a time, each well within the receive timeout
                try:
                    sock.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                if _readable(sock, 0.4):
                    break
            result["answer"] = read_until_closed(sock, started + 5)
        result["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=slow)
    thread.start()
    while thread.is_alive():
        target.healthy()
        thread.join(0.05)
    assert status_of(result["answer"]) == 408  # type: ignore[arg-type]
    assert REQUEST_TIMEOUT <= result["elapsed"] < REQUEST_TIMEOUT + 1.5  # type: ignore[operator]


def _readable(sock: socket.socket, seconds: float) -> bool:
    """Wait up to ``seconds`` for the peer to send something (or close)."""
    import select

    return bool(select.select([sock], [], [], seconds)[0])


def test_silent_client_is_closed_after_the_request_timeout(target):
    started = time.monotonic()
    with raw_connect(target.sock) as sock:
        target.healthy()
        answer = read_until_closed(sock, started + REQUEST_TIMEOUT + 2)
    assert answer == b""
    assert time.monotonic() - started >= REQUEST_TIMEOUT * 0.9


def test_thousand_idle_connections_are_closed_and_others_served(target):
    rss_before = target.rss()
    conns = [raw_connect(target.sock) for _ in range(1000)]
    try:
        opened = time.monotonic()
        target.healthy()
        for _ in range(20):
            target.healthy()
        # Every idle connection is closed by the plugin, within the request timeout plus slack.
        deadline = opened + REQUEST_TIMEOUT + 5
        for sock in conns:
            assert read_until_closed(sock, deadline) == b""
        assert target.rss() - rss_before < 64 * 1024  # KiB
    finally:
        for sock in conns:
            sock.close()
    target.healthy()
    wait_for(lambda: int(target.handle.execute("Threads")) < 50, timeout=5)


def test_connections_over_the_limit_get_503(spawn, plugin_dir, registries):
    target = Target(spawn, plugin_dir, registries, "--max-connections=20")
    conns = [raw_connect(target.sock) for _ in range(25)]
    try:
        answers = []
        for sock in conns[20:]:
            answers.append(read_until_closed(sock, time.monotonic() + 3))
        assert all(status_of(a) == 503 for a in answers), answers
    finally:
        for sock in conns:
            sock.close()
    wait_for(lambda: _healthy(target), timeout=5)


def _healthy(target: Target) -> bool:
    try:
        target.healthy()
    except GoPlugError:
        return False
    return True


def test_mixed_abuse_keeps_memory_bounded_and_serving(target):
    rss_before = target.rss()
    cases = [ABUSE[c][0] for c in ABUSE] * 5
    threads = [threading.Thread(target=_abuse, args=(target.sock, data)) for data in cases]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        target.healthy()
        for thread in threads:
            thread.join(0.01)
    target.healthy()
    assert target.rss() - rss_before < 64 * 1024  # KiB


def test_ever_new_long_targets_do_not_make_the_plugin_grow(target):
    # What a plugin remembers of the targets it met is bounded in count and length: 2000
    # different 60 KB targets (query strings on a real method) would hold 240 MB otherwise.
    rss_before = target.rss()
    reader = MessageReader(True)
    deadline = time.monotonic() + 30
    with raw_connect(target.sock) as sock:
        for i in range(2000):
            query = b"%d-" % i + b"q" * 60_000
            sock.sendall(
                b"POST /Echo?%s HTTP/1.1\r\nHost: Target\r\nContent-Length: 1\r\n\r\nx" % query
            )
            answer = None
            while answer is None:
                data = sock.recv(65536)
                assert data, "the plugin closed the connection"
                answer = reader.receive(data)
            assert (answer.status, answer.body) == (200, b"x")
            assert time.monotonic() < deadline
    target.healthy()
    assert target.rss() - rss_before < 32 * 1024  # KiB


# -- limits per registry and per plugin ------------------------------------------------------------


def test_registry_limit_refuses_a_large_answer(spawn, plugin_dir, registries):
    start_plugin(spawn, plugin_dir, "Big")
    settings = RegistrySettings(client=ClientSettings(limits=Limits(max_body=1000)))
    registry = registries(plugin_dir, settings)
    handle = loaded_handle(registry, "Big")
    assert handle.execute("Big", b"1000") == b"x" * 1000
    with pytest.raises(ProtocolError, match="limit"):
        handle.execute("Big", b"1001")
    assert handle.execute("Big", b"10") == b"x" * 10
    assert handle.state is PluginState.LOADED


def test_plugin_limit_refuses_a_large_request(spawn, plugin_dir, registries):
    target = Target(spawn, plugin_dir, registries, "--max-body=1000")
    assert target.handle.execute("Echo", b"y" * 1000) == b"y" * 1000
    with pytest.raises(ProtocolError, match="413"):
        target.handle.execute("Echo", b"y" * 1001)


def test_call_after_a_refused_request_succeeds(spawn, plugin_dir, registries):
    target = Target(spawn, plugin_dir, registries, "--max-body=1000")
    for _ in range(3):
        with pytest.raises(ProtocolError, match="413"):
            target.handle.execute("Echo", b"y" * 1001)
        target.healthy()


def test_plugin_limit_refuses_a_much_larger_request_with_protocol_error(
    spawn, plugin_dir, registries
):
    target = Target(spawn, plugin_dir, registries)
    result, _ = deadline_call(
        lambda: target.handle.execute("Echo", b"y" * (16 * MAX_BODY), timeout=5), 6
    )
    assert isinstance(result, ProtocolError), result
    target.healthy()


# -- a rogue plugin answering the registry --------------------------------------------------------

CALL_TIMEOUT = 2.0
ROGUE_LIMIT = 1024 * 1024

# behaviour -> exceptions it may end in (the first is the expected one)
ROGUE = {
    "Garbage": (ProtocolError,),
    "BadStatus": (ProtocolError,),
    "Truncated": (PluginConnectionError, ProtocolError),
    "TruncatedOpen": (CallTimeout,),
    "NeverEnds": (CallTimeout, ProtocolError),
    "NeverEndsLength": (CallTimeout, ProtocolError),
    "Flood": (ProtocolError,),
    "CloseDelimitedFlood": (ProtocolError,),
    "Huge": (ProtocolError,),
    "HugeChunk": (ProtocolError,),
    "NegativeLength": (ProtocolError,),
    "Headers": (ProtocolError,),
    "LongStatus": (ProtocolError,),
    "Close": (PluginConnectionError,),
    "Hang": (CallTimeout,),
}
FAST = {"Garbage", "BadStatus", "Truncated", "Huge", "HugeChunk", "NegativeLength", "Close"}


@pytest.fixture
def rogue(spawn, plugin_dir, registries):
    start_plugin(spawn, plugin_dir, "Rogue", script=ROGUE_PLUGIN)
    limits = Limits(max_body=ROGUE_LIMIT)
    settings = RegistrySettings(client=ClientSettings(call_timeout=CALL_TIMEOUT, limits=limits))
    registry = registries(plugin_dir, settings)
    return loaded_handle(registry, "Rogue")


@pytest.mark.parametrize("behaviour", list(ROGUE))
def test_rogue_answer_raises_typed_error_within_the_timeout(rogue, behaviour):
    rss_before = vm_rss_kib()
    result, elapsed = deadline_call(lambda: rogue.execute(behaviour), CALL_TIMEOUT + 2)
    assert isinstance(result, ROGUE[behaviour]), result
    assert elapsed < CALL_TIMEOUT + 0.5
    if behaviour in FAST:
        assert elapsed < 1.0
    assert vm_rss_kib() - rss_before < 3 * ROGUE_LIMIT // 1024 + 16 * 1024  # KiB
    # The broken connection was discarded: the next call gets its own answer.
    assert rogue.execute("Echo", b"after " + behaviour.encode()) == b"after " + behaviour.encode()
    assert rogue.state is PluginState.LOADED


async def _loaded_rogue(registry: aio.PluginRegistry) -> aio.PluginHandle:
    deadline = time.monotonic() + 10
    while not registry.is_loaded("Rogue"):
        assert time.monotonic() < deadline, "the rogue plugin was not loaded"
        await asyncio.sleep(0.01)
    handle = registry.get_plugin("Rogue")
    assert handle is not None
    return handle


def test_rogue_answers_raise_the_same_typed_errors_through_aio(spawn, plugin_dir):
    start_plugin(spawn, plugin_dir, "Rogue", script=ROGUE_PLUGIN)
    limits = Limits(max_body=ROGUE_LIMIT)
    settings = RegistrySettings(client=ClientSettings(call_timeout=CALL_TIMEOUT, limits=limits))

    async def main() -> None:
        async with aio.PluginRegistry(plugin_dir, settings=settings) as registry:
            handle = await _loaded_rogue(registry)
            for behaviour, errors in ROGUE.items():
                started = time.monotonic()
                with pytest.raises(errors):
                    await asyncio.wait_for(handle.execute(behaviour), CALL_TIMEOUT + 2)
                elapsed = time.monotonic() - started
                assert elapsed < CALL_TIMEOUT + 0.5, behaviour
                if behaviour in FAST:
                    assert elapsed < 1.0, behaviour
                payload = b"after " + behaviour.encode()
                assert await handle.execute("Echo", payload) == payload, behaviour
                assert handle.state is PluginState.LOADED

    asyncio.run(main())


@pytest.mark.parametrize(
    "name",
    [
        "Garbage",
        "BadRecords",
        "HugeBatch",
        "SmuggledBatch",
        "CutBatch",
        "StalledHead",
        "StalledBody",
    ],
)
def test_rogue_poll_answers_deliver_nothing_and_the_subscription_lives_on(rogue, name):
    rss_before = vm_rss_kib()
    got: list[bytes] = []
    subscription = rogue.register_callback(got.append, name)
    # Each broken answer ends that poll; the subscription polls again (with backoff). An answer
    # that stalls once started ends after the call timeout (2 s here).
    wait_for(lambda: int(rogue.execute("PollCount", name.encode())) >= 3, timeout=15)
    assert subscription.alive
    assert got == []
    assert vm_rss_kib() - rss_before < 16 * 1024  # KiB: nothing of an announced 10 GB
    assert rogue.execute("Echo", b"still") == b"still"
    assert rogue.state is PluginState.LOADED


def test_rogue_poll_answer_in_goplug_form_is_delivered_once(rogue):
    got: list[bytes] = []
    rogue.register_callback(got.append, "Numbered")
    wait_for(lambda: int(rogue.execute("PollCount", b"Numbered")) >= 2, timeout=10)
    # The second poll (acknowledging both) is held open: nothing more comes.
    assert got == [b"one", b"two"]


def test_rogue_announcing_10gb_allocates_nothing_with_default_limits(spawn, plugin_dir, registries):
    start_plugin(spawn, plugin_dir, "Rogue", script=ROGUE_PLUGIN)
    registry = registries(plugin_dir)
    handle = loaded_handle(registry, "Rogue")
    rss_before = vm_rss_kib()
    for behaviour in ("Huge", "HugeChunk"):
        result, elapsed = deadline_call(lambda b=behaviour: handle.execute(b, timeout=5), 6)
        assert isinstance(result, ProtocolError), result
        assert elapsed < 1.0
    assert vm_rss_kib() - rss_before < 16 * 1024  # KiB


def test_rogue_smuggled_answer_is_never_taken_for_the_next_one(rogue):
    for extra in ("ShortLength", "SmuggledAnswer"):
        assert rogue.execute(extra) == b"hello"
        # The connection that brought more than its answer is not used again.
        assert [rogue.execute("Echo", b"echo %d" % i) for i in range(5)] == [
            b"echo %d" % i for i in range(5)
        ]


def test_rogue_smuggled_answer_is_never_taken_for_the_next_one_by_aio(spawn, plugin_dir):
    start_plugin(spawn, plugin_dir, "Rogue", script=ROGUE_PLUGIN)
    settings = RegistrySettings(client=ClientSettings(call_timeout=CALL_TIMEOUT))

    async def main() -> None:
        async with aio.PluginRegistry(plugin_dir, settings=settings) as registry:
            handle = await _loaded_rogue(registry)
            for extra in ("ShortLength", "SmuggledAnswer"):
                assert await handle.execute(extra) == b"hello"
                # The connection that brought more than its answer is not used again.
                for i in range(5):
                    assert await handle.execute("Echo", b"echo %d" % i) == b"echo %d" % i

    asyncio.run(main())


def test_rogue_extra_bytes_are_never_taken_for_the_next_answer(rogue):
    assert rogue.execute("ShortLength") == b"hello"
    for i in range(5):
        payload = b"echo %d" % i
        try:
            answer = rogue.execute("Echo", payload)
        except ProtocolError:
            continue  # the leftover bytes were detected: fine, that connection is dropped
        assert answer == payload


def test_rogue_breaking_activation_fails_the_load_with_protocol_error(
    spawn, plugin_dir, registries
):
    start_plugin(spawn, plugin_dir, "Rogue", "", "--activate=Garbage", script=ROGUE_PLUGIN)
    registry = registries(plugin_dir, auto_discover=False)
    result, elapsed = deadline_call(lambda: registry.load_plugin("Rogue"), 7)
    assert isinstance(result, ProtocolError), result
    assert elapsed < 1.0


def test_rogue_hanging_activation_fails_the_load_within_its_timeout(spawn, plugin_dir, registries):
    start_plugin(spawn, plugin_dir, "Rogue", "", "--activate=Hang", script=ROGUE_PLUGIN)
    settings = RegistrySettings(client=ClientSettings(activate_timeout=0.5))
    registry = registries(plugin_dir, settings, auto_discover=False)
    result, elapsed = deadline_call(lambda: registry.load_plugin("Rogue"), 3)
    assert isinstance(result, CallTimeout), result
    assert elapsed < 1.5


# -- long polls sent by hand --------------------------------------------------------------------


def _poll(token: bytes, ack: bytes, body: bytes = b'"raw"') -> bytes:
    """A long poll in the exact form a registry sends (which the plugin parses in C)."""
    return (
        b"POST /RegisterCallback HTTP/1.1\r\nHost: Target\r\nX-Goplug-Subscriber: %s\r\n"
        b"X-Goplug-Ack: %s\r\nContent-Length: %d\r\n\r\n%s" % (token, ack, len(body), body)
    )


def _read_answer(sock: socket.socket, within: float = 5.0) -> Message:
    reader = MessageReader(True)
    sock.settimeout(within)
    while True:
        data = sock.recv(65536)
        assert data, "the plugin closed the connection"
        msg = reader.receive(data)
        if msg is not None:
            return msg


@pytest.mark.parametrize(
    "poll",
    [
        _poll(b"not a token!", b"0"),
        _poll(b"t" * 65, b"0"),
        _poll(b"tok", b"x1"),
        _poll(b"tok", b"-1"),
        _poll(b"tok", b"0", b"not json"),
        _poll(b"tok", b"0", b'""'),
    ],
)
def test_long_polls_with_bad_headers_are_refused(target, poll):
    with raw_connect(target.sock) as sock:
        sock.sendall(poll)
        answer = _read_answer(sock)
    assert answer.status == 400
    assert b"ProtocolError" in answer.body
    target.healthy()


def test_a_long_poll_sent_by_hand_gets_numbered_batches(target):
    with raw_connect(target.sock) as sock:
        sock.sendall(_poll(b"hand_1", b"0"))
        wait_for(lambda: b"raw" in target.handle.execute("Callbacks"), timeout=5)
        assert json.loads(target.handle.execute("NotifyN", b"raw\n3"))["accepted"] == 3
        received: list[bytes] = []
        while len(received) < 3:
            answer = _read_answer(sock)
            assert answer.status == 200
            seq = int(answer.header(b"x-goplug-seq"))
            assert seq == len(received) + 1  # numbered on from what was acknowledged
            received += routes.decode_batch(answer.body, int(answer.header(b"x-goplug-count")))
            if len(received) < 3:
                sock.sendall(_poll(b"hand_1", b"%d" % len(received)))
        assert received == [b"0", b"1", b"2"]
