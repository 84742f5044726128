"""Unit tests of the sans-IO HTTP/1.1 framing (goplug.wire.http); no sockets.

The fixed byte strings come from GOPLUG-WIRE-TRANSCRIPTS.md (what the original Go library sends).
"""

from __future__ import annotations

import itertools
import random
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from goplug.errors import ProtocolError
from goplug.wire.http import (
    REASONS,
    FramingError,
    Limits,
    Message,
    MessageReader,
    request_head,
    response_head,
)
from goplug.wire.routes import route_of

SINK_MIN = 256 * 1024

# -- the original Go library's bytes -----------------------------------------------------------

DATE = b"Date: Wed, 25 Nov 2026 10:00:12 GMT\r\n"
GO_UA = b"User-Agent: Go-http-client/1.1\r\n"

ACTIVATE_REQ = b"POST /Activate HTTP/1.1\r\nHost: TestDo\r\n" + GO_UA + b"Content-Length: 0\r\n\r\n"
ACTIVATE_REQ_HEX = (
    "504f5354202f416374697661746520485454502f312e310d0a486f73743a2054657374446f0d0a557365722d"
    "4167656e743a20476f2d687474702d636c69656e742f312e310d0a436f6e74656e742d4c656e6774683a2030"
    "0d0a0d0a"
)
ACTIVATE_RESP = (
    b"HTTP/1.1 200 OK\r\n" + DATE + b"Content-Length: 23\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    b'["main.Do","","","",""]'
)
ACTIVATE_RESP_HEX = (
    "485454502f312e3120323030204f4b0d0a446174653a205765642c203235204e6f7620323032362031303a3030"
    "3a313220474d540d0a436f6e74656e742d4c656e6774683a2032330d0a436f6e74656e742d547970653a207465"
    "78742f706c61696e3b20636861727365743d7574662d380d0a0d0a5b226d61696e2e446f222c22222c22222c22"
    "222c22225d"
)
PING_REQ = (
    b"POST /Ping HTTP/1.1\r\nHost: TestDo\r\n" + GO_UA + b"Content-Length: 9\r\n"
    b"Content-Type: application/json\r\n\r\nTest Data"
)
PING_REQ_HEX = (
    "504f5354202f50696e6720485454502f312e310d0a486f73743a2054657374446f0d0a557365722d4167656e74"
    "3a20476f2d687474702d636c69656e742f312e310d0a436f6e74656e742d4c656e6774683a20390d0a436f6e74"
    "656e742d547970653a206170706c69636174696f6e2f6a736f6e0d0a0d0a546573742044617461"
)
PING_RESP = (
    b"HTTP/1.1 200 OK\r\n" + DATE + b"Content-Length: 9\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nTest Data"
)
DO_REQ = b"POST /main.Do HTTP/1.1\r\nHost: TestDo\r\n" + GO_UA + b"Content-Length: 0\r\n\r\n"
DO_REQ_HEX = (
    "504f5354202f6d61696e2e446f20485454502f312e310d0a486f73743a2054657374446f0d0a557365722d4167"
    "656e743a20476f2d687474702d636c69656e742f312e310d0a436f6e74656e742d4c656e6774683a20300d0a0d"
    "0a"
)
DO_RESP = b"HTTP/1.1 200 OK\r\n" + DATE + b"Content-Length: 0\r\n\r\n"
ROOT_REQ = b"POST / HTTP/1.1\r\nHost: TestDo\r\n" + GO_UA + b"Content-Length: 0\r\n\r\n"
BAD_REQUEST_RESP = b"HTTP/1.1 400 Bad Request\r\n" + DATE + b"Content-Length: 0\r\n\r\n"
BAD_REQUEST_HEX = (
    "485454502f312e31203430302042616420526571756573740d0a446174653a205765642c203235204e6f762032"
    "3032362031303a30303a313220474d540d0a436f6e74656e742d4c656e6774683a20300d0a0d0a"
)
CALLBACK_REQ = (
    b"POST /RegisterCallback HTTP/1.1\r\nHost: TestDo\r\n" + GO_UA + b"Content-Length: 15\r\n"
    b'Content-Type: application/json\r\n\r\n"main.callBack"'
)
CALLBACK_REQ_HEX = (
    "504f5354202f526567697374657243616c6c6261636b20485454502f312e310d0a486f73743a2054657374446f"
    "0d0a557365722d4167656e743a20476f2d687474702d636c69656e742f312e310d0a436f6e74656e742d4c656e"
    "6774683a2031350d0a436f6e74656e742d547970653a206170706c69636174696f6e2f6a736f6e0d0a0d0a226d"
    "61696e2e63616c6c4261636b22"
)
CALLBACK_RESP = (
    b"HTTP/1.1 200 OK\r\nDate: Wed, 25 Nov 2026 10:00:13 GMT\r\nContent-Length: 9\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nTest Data"
)
STOP_REQ = b"POST /Stop HTTP/1.1\r\nHost: TestDo\r\n" + GO_UA + b"Content-Length: 0\r\n\r\n"
STOP_REQ_HEX = (
    "504f5354202f53746f7020485454502f312e310d0a486f73743a2054657374446f0d0a557365722d4167656e74"
    "3a20476f2d687474702d636c69656e742f312e310d0a436f6e74656e742d4c656e6774683a20300d0a0d0a"
)
BIG_RESP = (
    b"HTTP/1.1 200 OK\r\n" + DATE + b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n1388\r\n" + b"x" * 5000 + b"\r\n0\r\n\r\n"
)
MISSING_HOST_RESP = (
    b"HTTP/1.1 400 Bad Request: missing required Host header\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"
    b"400 Bad Request: missing required Host header"
)
# Run A of the original example, both directions, all on one connection (transcript section 5).
RUN_A_CLIENT = ACTIVATE_REQ + PING_REQ + DO_REQ + ROOT_REQ * 4 + CALLBACK_REQ * 2 + STOP_REQ
RUN_A_SERVER = ACTIVATE_RESP + PING_RESP + DO_RESP + BAD_REQUEST_RESP * 4 + CALLBACK_RESP


# -- helpers -----------------------------------------------------------------------------------


def sig(msg: Message, headers: bool = True) -> tuple[object, ...]:
    """Everything a Message carries, comparable."""
    base = (msg.method, msg.target, msg.status, msg.reason, bytes(msg.body), msg.keep_alive)
    return (*base, dict(msg.headers)) if headers else base


def drain(reader: MessageReader) -> list[Message]:
    out = []
    while (msg := reader.next_message()) is not None:
        out.append(msg)
    return out


def parse(
    pieces: list[bytes] | bytes,
    is_response: bool,
    limits: Limits | None = None,
    eof: bool = False,
) -> list[Message]:
    """Feed ``pieces`` one at a time, taking every complete message after each."""
    if isinstance(pieces, bytes):
        pieces = [pieces]
    reader = MessageReader(is_response, limits)
    out: list[Message] = []
    for piece in pieces:
        reader.feed(piece)
        out.extend(drain(reader))
    if eof:
        last = reader.feed_eof()
        if last is not None:
            out.append(last)
    return out


def one(data: bytes, is_response: bool, limits: Limits | None = None) -> Message:
    msgs = parse(data, is_response, limits)
    assert len(msgs) == 1, msgs
    return msgs[0]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def sigs(msgs: list[Message], headers: bool = True) -> list[tuple[object, ...]]:
    return [sig(m, headers) for m in msgs]


# -- the transcript bytes ----------------------------------------------------------------------


def test_transcript_constants_match_the_captured_hex() -> None:
    assert bytes.fromhex(ACTIVATE_REQ_HEX) == ACTIVATE_REQ and len(ACTIVATE_REQ) == 92
    assert bytes.fromhex(ACTIVATE_RESP_HEX) == ACTIVATE_RESP and len(ACTIVATE_RESP) == 140
    assert bytes.fromhex(PING_REQ_HEX) == PING_REQ and len(PING_REQ) == 129
    assert bytes.fromhex(DO_REQ_HEX) == DO_REQ and len(DO_REQ) == 91
    assert bytes.fromhex(CALLBACK_REQ_HEX) == CALLBACK_REQ and len(CALLBACK_REQ) == 148
    assert bytes.fromhex(STOP_REQ_HEX) == STOP_REQ and len(STOP_REQ) == 88
    assert bytes.fromhex(BAD_REQUEST_HEX) == BAD_REQUEST_RESP and len(BAD_REQUEST_RESP) == 84
    assert len(PING_RESP) == 125 and len(DO_RESP) == 75 and len(ROOT_REQ) == 84


def test_go_activate_request() -> None:
    msg = one(ACTIVATE_REQ, is_response=False)
    assert (msg.method, msg.target, msg.status) == ("POST", "/Activate", 0)
    assert msg.headers == {
        b"host": b"TestDo",
        b"user-agent": b"Go-http-client/1.1",
        b"content-length": b"0",
    }
    assert msg.body == b"" and msg.keep_alive
    assert msg.header(b"host") == b"TestDo" and msg.header(b"nope", b"d") == b"d"


def test_go_requests_with_bodies() -> None:
    ping = one(PING_REQ, is_response=False)
    assert ping.target == "/Ping" and ping.body == b"Test Data"
    assert ping.header(b"content-type") == b"application/json"
    cb = one(CALLBACK_REQ, is_response=False)
    assert cb.target == "/RegisterCallback" and cb.body == b'"main.callBack"'
    assert one(STOP_REQ, is_response=False).target == "/Stop"
    assert one(ROOT_REQ, is_response=False).target == "/"


def test_go_200_with_date_content_length_and_content_type() -> None:
    msg = one(ACTIVATE_RESP, is_response=True)
    assert (msg.status, msg.reason, msg.method, msg.target) == (200, "OK", "", "")
    assert msg.body == b'["main.Do","","","",""]'
    assert msg.headers == {
        b"date": b"Wed, 25 Nov 2026 10:00:12 GMT",
        b"content-length": b"23",
        b"content-type": b"text/plain; charset=utf-8",
    }
    assert msg.keep_alive
    empty = one(DO_RESP, is_response=True)
    assert (empty.status, empty.body) == (200, b"")


def test_go_chunked_5000_byte_body() -> None:
    msg = one(BIG_RESP, is_response=True)
    assert msg.status == 200 and msg.body == b"x" * 5000
    assert msg.header(b"transfer-encoding") == b"chunked" and msg.keep_alive


def test_go_400_response_has_no_body_and_keeps_the_connection() -> None:
    msg = one(BAD_REQUEST_RESP, is_response=True)
    assert (msg.status, msg.reason, msg.body, msg.keep_alive) == (400, "Bad Request", b"", True)


def test_go_missing_host_answer_closes() -> None:
    msg = parse(MISSING_HOST_RESP, is_response=True, eof=True)[0]
    assert msg.status == 400
    assert msg.reason == "Bad Request: missing required Host header"
    assert msg.body == b"400 Bad Request: missing required Host header"
    assert not msg.keep_alive


def test_run_a_transcript_both_directions() -> None:
    requests = parse(RUN_A_CLIENT, is_response=False, eof=True)
    assert [m.target for m in requests] == [
        "/Activate",
        "/Ping",
        "/main.Do",
        "/",
        "/",
        "/",
        "/",
        "/RegisterCallback",
        "/RegisterCallback",
        "/Stop",
    ]
    responses = parse(RUN_A_SERVER, is_response=True, eof=True)
    assert [(m.status, m.body) for m in responses] == [
        (200, b'["main.Do","","","",""]'),
        (200, b"Test Data"),
        (200, b""),
        *[(400, b"")] * 4,
        (200, b"Test Data"),
    ]


def test_two_go_requests_in_one_segment() -> None:
    echo = (
        b"POST /main.Echo HTTP/1.1\r\nHost: TestDo\r\n" + GO_UA + b"Content-Length: 6\r\n"
        b"Content-Type: application/json\r\n\r\nqueued"
    )
    msgs = parse(echo + CALLBACK_REQ, is_response=False)
    assert [(m.target, m.body) for m in msgs] == [
        ("/main.Echo", b"queued"),
        ("/RegisterCallback", b'"main.callBack"'),
    ]


def test_bare_lf_heads() -> None:
    resp = one(b"HTTP/1.1 200 OK\nDate: x\nContent-Length: 5\n\nhello", is_response=True)
    assert (resp.status, resp.body, resp.header(b"date")) == (200, b"hello", b"x")
    req = one(b"POST /Ping HTTP/1.1\nHost: TestDo\nContent-Length: 2\n\nhi", is_response=False)
    assert (req.target, req.body, req.header(b"host")) == ("/Ping", b"hi", b"TestDo")
    chunked = b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n3\nabc\n0\n\n"
    assert one(chunked, is_response=True).body == b"abc"


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nA: 1\nContent-Length: 2\r\n\r\nhi",  # one bare LF among CRLFs
        b"HTTP/1.1 200 OK\nA: 1\r\nContent-Length: 2\n\r\nhi",  # mixed, CRLF blank line
        b"HTTP/1.1 200 OK\r\nA: 1\r\nContent-Length: 2\r\n\nhi",  # CRLF lines, LF blank line
    ],
)
def test_mixed_line_endings(data: bytes) -> None:
    msg = one(data, is_response=True)
    assert (msg.body, msg.header(b"a"), msg.header(b"content-length")) == (b"hi", b"1", b"2")
    assert sigs(parse(bytewise(data), is_response=True)) == [sig(msg)]


def test_mixed_head_with_body_starting_with_crlf() -> None:
    data = b"HTTP/1.1 200 OK\nContent-Length: 2\n\r\n\r\n"
    assert [m.body for m in parse(bytewise(data), is_response=True)] == [b"\r\n"]
    assert one(data, is_response=True).body == b"\r\n"


def test_status_lines_and_reasons() -> None:
    assert one(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", True).reason == ""
    assert one(b"HTTP/1.1 200 Ok\r\nContent-Length: 0\r\n\r\n", True).reason == "Ok"
    fine = one(b"HTTP/1.1 200 Fine  and  dandy\r\nContent-Length: 0\r\n\r\n", True)
    assert fine.reason == "Fine  and  dandy"
    latin = one(b"HTTP/1.1 201 \xe9t\xe9\r\nContent-Length: 0\r\n\r\n", True)
    assert (latin.status, latin.reason) == (201, "\xe9t\xe9")


@pytest.mark.parametrize(
    "line",
    [
        b"HTTP/2 200 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 abc OK",
        b"ICY 200 OK",
        b"HTTP/1.1",
        b"",
    ],
)
def test_bad_status_lines(line: bytes) -> None:
    with pytest.raises(FramingError) as info:
        parse(line + b"\r\nContent-Length: 0\r\n\r\n", is_response=True)
    assert info.value.status == 400


def test_request_lines() -> None:
    get = one(b"GET /main.Echo/extra/x?q=1 HTTP/1.1\r\nHost: a\r\n\r\n", False)
    assert (get.method, get.target, get.body) == ("GET", "/main.Echo/extra/x?q=1", b"")
    opts = one(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", False)
    assert (opts.method, opts.target) == ("OPTIONS", "*")


@pytest.mark.parametrize(
    "line",
    [
        b"POST /Ping",
        b"POST  /Ping HTTP/1.1",
        b"POST /Ping HTTP/1.1 extra",
        b"POST /Ping SPDY/3",
        b"POST /P\xc3\xafng HTTP/1.1",
        b" /Ping HTTP/1.1",
    ],
)
def test_bad_request_lines(line: bytes) -> None:
    with pytest.raises(FramingError) as info:
        parse(line + b"\r\nHost: a\r\n\r\n", is_response=False)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "header", [b"NoColon", b"Name : x", b"Name\t: x", b": empty", b" folded: x"]
)
def test_bad_header_lines(header: bytes) -> None:
    with pytest.raises(FramingError):
        parse(b"POST / HTTP/1.1\r\nHost: a\r\n" + header + b"\r\n\r\n", is_response=False)


def test_header_names_are_lowercased_and_values_stripped() -> None:
    msg = one(b"POST / HTTP/1.1\r\nX-GoPlug-Ack:   7 \t\r\nHOST:a\r\n\r\n", False)
    assert msg.headers == {b"x-goplug-ack": b"7", b"host": b"a"}


# -- bodies --------------------------------------------------------------------------------------


def test_chunked_with_extensions_trailers_and_uppercase_hex() -> None:
    data = (
        b"POST /m HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    msg = one(data, is_response=False)
    assert msg.body == b"hello0123456789"
    assert sigs(parse(bytewise(data), False)) == [sig(msg)]


@pytest.mark.parametrize(
    "chunks",
    [
        b"zz\r\nab\r\n0\r\n\r\n",  # not hex
        b"\r\nab\r\n0\r\n\r\n",  # empty size
        b"2\r\nabX\r\n0\r\n\r\n",  # data longer than announced
        b"-2\r\nab\r\n0\r\n\r\n",
        b"1234567890123456\r\n",  # size over 15 hex digits
    ],
)
def test_bad_chunk_framing(chunks: bytes) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    with pytest.raises(FramingError) as info:
        parse(head + chunks, is_response=True)
    assert info.value.status == 400


def test_request_without_length_has_an_empty_body() -> None:
    msgs = parse(b"POST /a HTTP/1.1\r\nHost: a\r\n\r\nPOST /b HTTP/1.1\r\n\r\n", False)
    assert [(m.target, m.body) for m in msgs] == [("/a", b""), ("/b", b"")]


@pytest.mark.parametrize("status", [204, 304, 100])
def test_responses_without_a_body(status: int) -> None:
    msg = one(b"HTTP/1.1 %d X\r\n\r\n" % status, is_response=True)
    assert (msg.status, msg.body, msg.keep_alive) == (status, b"", True)


def test_close_delimited_response_completed_by_eof() -> None:
    reader = MessageReader(True)
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhel")
    assert reader.next_message() is None
    reader.feed(b"lo")
    assert reader.next_message() is None and reader.in_message
    msg = reader.feed_eof()
    assert msg is not None and (msg.status, msg.body, msg.keep_alive) == (200, b"hello", False)
    assert not reader.in_message and reader.next_message() is None


def test_close_delimited_http10_and_empty_bodies() -> None:
    msgs = parse(b"HTTP/1.0 200 OK\r\n\r\n", True, eof=True)
    assert [(m.status, m.body, m.keep_alive) for m in msgs] == [(200, b"", False)]
    msgs = parse(bytewise(b"HTTP/1.1 500 Oops\r\n\r\nboom"), True, eof=True)
    assert [(m.status, m.body, m.keep_alive) for m in msgs] == [(500, b"boom", False)]


def test_close_delimited_body_over_the_limit() -> None:
    reader = MessageReader(True, Limits(max_body=10))
    reader.feed(b"HTTP/1.1 200 OK\r\n\r\n0123456789")
    assert reader.next_message() is None
    reader.feed(b"!")
    with pytest.raises(FramingError) as info:
        reader.next_message()
    assert info.value.status == 413


def test_eof_between_messages_is_clean() -> None:
    reader = MessageReader(False)
    reader.feed(PING_REQ)
    assert reader.next_message() is not None
    assert not reader.in_message and reader.buffered == 0
    assert reader.feed_eof() is None
    with pytest.raises(FramingError):
        reader.feed(b"more")


@pytest.mark.parametrize(
    ("data", "is_response"),
    [
        (PING_REQ[:10], False),  # inside the request line
        (PING_REQ[:-1], False),  # one body byte short
        (PING_REQ[: PING_REQ.index(b"\r\n\r\n") + 4], False),  # head only
        (ACTIVATE_RESP[:-5], True),
        (BIG_RESP[:200], True),  # inside a chunk
        (BIG_RESP[:-2], True),  # the final CRLF missing
        (BIG_RESP[:-5], True),  # inside the last-chunk line
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhell", True),  # fast-path shape
    ],
)
def test_truncated_message_raises_on_eof(data: bytes, is_response: bool) -> None:
    reader = MessageReader(is_response)
    reader.feed(data)
    assert drain(reader) == []
    assert reader.in_message
    with pytest.raises(FramingError):
        reader.feed_eof()


def test_truncated_message_raises_on_eof_when_fed_byte_by_byte() -> None:
    for cut in range(1, len(PING_RESP)):
        reader = MessageReader(True)
        for piece in bytewise(PING_RESP[:cut]):
            reader.feed(piece)
            assert reader.next_message() is None
        with pytest.raises(FramingError):
            reader.feed_eof()


# -- pipelining and splitting --------------------------------------------------------------------


def test_pipelined_responses_in_one_feed() -> None:
    stream = DO_RESP + BIG_RESP + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + PING_RESP
    msgs = parse(stream, is_response=True)
    assert [m.body for m in msgs] == [b"", b"x" * 5000, b"ok", b"Test Data"]


def test_empty_lines_between_messages_are_skipped() -> None:
    stream = b"\r\n" + DO_REQ + b"\r\n\n" + PING_REQ
    msgs = parse(stream, is_response=False, eof=True)
    assert [m.target for m in msgs] == ["/main.Do", "/Ping"]
    assert sigs(parse(bytewise(stream), False, eof=True)) == sigs(msgs)


STREAMS = {
    "run-a-requests": (RUN_A_CLIENT, False),
    "run-a-responses": (RUN_A_SERVER, True),
    "big-chunked": (BIG_RESP + PING_RESP, True),
    "bare-lf": (b"HTTP/1.1 200 OK\nA: b\nContent-Length: 3\n\nabcHTTP/1.1 400 Bad\n\n", True),
    "chunked-request": (
        b"POST /m HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x\r\nabc\r\n0\r\nT: 1\r\n\r\n"
        + PING_REQ,
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_every_split_point_gives_the_same_messages(name: str) -> None:
    data, is_response = STREAMS[name]
    expected = sigs(parse(data, is_response, eof=True))
    assert expected
    for cut in range(len(data) + 1):
        got = parse([data[:cut], data[cut:]], is_response, eof=True)
        assert sigs(got) == expected, cut
    assert sigs(parse(bytewise(data), is_response, eof=True)) == expected


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_pieces_give_the_same_messages(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(STREAMS)))
    stream, is_response = STREAMS[name]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    expected = sigs(parse(stream, is_response, eof=True))
    assert sigs(parse(split_at(stream, cuts), is_response, eof=True)) == expected


def test_seeded_random_pieces_of_the_big_chunked_response() -> None:
    rng = random.Random(1234)
    expected = sigs(parse(BIG_RESP * 3, True))
    for _ in range(50):
        cuts = [rng.randrange(len(BIG_RESP) * 3) for _ in range(rng.randrange(1, 40))]
        assert sigs(parse(split_at(BIG_RESP * 3, cuts), True)) == expected


# -- the 200 OK fast path --------------------------------------------------------------------------


def _general_path(data: bytes) -> Message:
    """Parse ``data`` so that the fast path cannot apply (the last body byte comes late)."""
    reader = MessageReader(True)
    reader.feed(data[:-1])
    assert reader.next_message() is None
    reader.feed(data[-1:])
    msg = reader.next_message()
    assert msg is not None and reader.next_message() is None
    return msg


@pytest.mark.parametrize("size", [1, 9, 2048, 100_000])
def test_fast_path_and_general_path_agree(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    data = response_head(200, len(body)) + body
    assert data.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: ")
    fast = one(data, is_response=True)
    general = _general_path(data)
    assert sig(fast, headers=False) == sig(general, headers=False)
    assert fast.body == body and fast.status == 200 and fast.reason == "OK" and fast.keep_alive


def test_fast_path_keeps_the_content_length_header() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    assert sig(one(data, is_response=True)) == sig(_general_path(data))


def test_fast_path_pipelined_and_mixed_with_general_responses() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    stream = ok + ok + BAD_REQUEST_RESP + ok + BIG_RESP + ok
    msgs = parse(stream, is_response=True)
    assert [(m.status, len(m.body)) for m in msgs] == [
        (200, 2),
        (200, 2),
        (400, 0),
        (200, 2),
        (200, 5000),
        (200, 2),
    ]
    assert sigs(parse(bytewise(stream), True), headers=False) == sigs(msgs, headers=False)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Goplug-Seq: 3\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length:  5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0005\r\n\r\nhello",
    ],
)
def test_near_fast_path_shapes(data: bytes) -> None:
    msg = one(data, is_response=True)
    assert msg.body == b"hello"
    assert sigs(parse(bytewise(data), True), headers=False) == [sig(msg, headers=False)]


def test_fast_path_shape_with_bad_length_goes_to_the_general_path() -> None:
    for cl in (b"-5", b"5x", b"123456789012345678901"):
        with pytest.raises(FramingError) as info:
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: " + cl + b"\r\n\r\nhello", True)
        assert info.value.status == 400


# -- limits ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("is_response", [False, True])
def test_head_too_large(is_response: bool) -> None:
    start = b"HTTP/1.1 200 OK\r\n" if is_response else b"POST / HTTP/1.1\r\n"
    limits = Limits(max_head=200)
    big = start + b"X-Big: " + b"a" * 300 + b"\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(FramingError) as info:
        parse(big, is_response, limits)
    assert info.value.status == 400
    # No end of head in sight: refused as soon as more than the limit is buffered.
    reader = MessageReader(is_response, limits)
    reader.feed(start + b"X-Big: " + b"a" * 150)
    assert reader.next_message() is None
    reader.feed(b"a" * 100)
    with pytest.raises(FramingError) as info:
        reader.next_message()
    assert info.value.status == 400
    ok = start + b"X-Big: " + b"a" * 100 + b"\r\nContent-Length: 0\r\n\r\n"
    assert one(ok, is_response, limits).header(b"x-big") == b"a" * 100


@pytest.mark.parametrize("is_response", [False, True])
def test_too_many_header_lines(is_response: bool) -> None:
    start = b"HTTP/1.1 200 OK\r\n" if is_response else b"POST / HTTP/1.1\r\n"
    limits = Limits(max_headers=3)
    three = start + b"A: 1\r\nB: 2\r\nContent-Length: 0\r\n\r\n"
    assert len(one(three, is_response, limits).headers) == 3
    four = start + b"A: 1\r\nB: 2\r\nC: 3\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(FramingError) as info:
        parse(four, is_response, limits)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "head",
    [
        b"POST /m HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n",  # fast-path shape
        b"HTTP/1.1 200 OK\r\nDate: x\r\nContent-Length: 10000000000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1001\r\n\r\n",
    ],
)
def test_content_length_over_the_limit_is_refused_before_the_body(head: bytes) -> None:
    reader = MessageReader(head.startswith(b"HTTP/"), Limits(max_body=1000))
    reader.feed(head)  # not one body byte
    with pytest.raises(FramingError) as info:
        reader.next_message()
    assert info.value.status == 413


def test_content_length_at_the_limit_is_accepted() -> None:
    limits = Limits(max_body=1000)
    assert len(one(response_head(200, 1000) + b"b" * 1000, True, limits).body) == 1000
    assert len(one(request_head("/m", "h", 1000) + b"b" * 1000, False, limits).body) == 1000


def test_chunked_total_over_the_limit() -> None:
    limits = Limits(max_body=10)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert one(head + b"5\r\nabcde\r\n5\r\nfghij\r\n0\r\n\r\n", True, limits).body == b"abcdefghij"
    reader = MessageReader(True, limits)
    reader.feed(head + b"8\r\nabcdefgh\r\n8\r\n")  # the second size line alone is enough
    with pytest.raises(FramingError) as info:
        reader.next_message()
    assert info.value.status == 413
    with pytest.raises(FramingError) as info:
        parse(head + b"ffffffffffff\r\n", True, limits)
    assert info.value.status == 413


@pytest.mark.parametrize(
    "value",
    [
        b"-1",
        b"abc",
        b"1e3",
        b"+5",
        b"0x10",
        b"5 5",
        b"5,5",
        b"",
        b"\xd9\xa3",
        b"12345678901234567890",
    ],
)
@pytest.mark.parametrize("is_response", [False, True])
def test_garbage_content_length(value: bytes, is_response: bool) -> None:
    start = b"HTTP/1.1 200 OK\r\n" if is_response else b"POST / HTTP/1.1\r\n"
    with pytest.raises(FramingError) as info:
        parse(start + b"Content-Length: " + value + b"\r\n\r\n", is_response)
    assert info.value.status == 400


def test_both_content_length_and_transfer_encoding() -> None:
    both = b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    with pytest.raises(FramingError) as info:
        parse(b"POST / HTTP/1.1\r\n" + both, is_response=False)
    assert info.value.status == 400
    # A response with both is framed by the transfer coding (RFC 9112 section 6.3).
    assert one(b"HTTP/1.1 200 OK\r\n" + both, is_response=True).body == b"abc"


@pytest.mark.parametrize("te", [b"gzip", b"identity", b"chunked, gzip", b"chunkedx", b""])
@pytest.mark.parametrize("is_response", [False, True])
def test_unsupported_transfer_encoding(te: bytes, is_response: bool) -> None:
    start = b"HTTP/1.1 200 OK\r\n" if is_response else b"POST / HTTP/1.1\r\n"
    with pytest.raises(FramingError):
        parse(start + b"Transfer-Encoding: " + te + b"\r\n\r\n0\r\n\r\n", is_response)


def test_transfer_encoding_is_case_insensitive() -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n1\r\na\r\n0\r\n\r\n"
    assert one(data, True).body == b"a"


def test_conflicting_content_lengths_are_rejected() -> None:
    with pytest.raises(FramingError):
        parse(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 3\r\n\r\nabc", False)


# -- large bodies received in big pieces ------------------------------------------------------


def _in_big_pieces(head_and_start: bytes, rest: bytes, cap: int) -> tuple[Message, int]:
    """Feed the first bytes, then the rest in pieces as large as body_wanted() asks (<= cap)."""
    reader = MessageReader(False)
    reader.feed(head_and_start)
    assert reader.next_message() is None
    big = 0
    pos = 0
    while pos < len(rest):
        wanted = reader.body_wanted()
        size = min(wanted, cap) if wanted else 65536
        big += bool(wanted)
        reader.feed(rest[pos : pos + size])
        pos = min(pos + size, len(rest))
        msg = reader.next_message()
        if msg is not None:
            assert pos == len(rest)
            return msg, big
    raise AssertionError("no message")


@pytest.mark.parametrize("already", [0, 1, 1000, 70_000])
@pytest.mark.parametrize("cap", [65536, 100_003, 1 << 20])
def test_big_pieces_give_the_same_body_as_small_ones(already: int, cap: int) -> None:
    body = random.Random(already).randbytes(SINK_MIN + 100_000)
    data = request_head("/Big", "TestDo", len(body)) + body
    head_len = len(data) - len(body)
    expected = one(data, is_response=False)
    assert expected.body == body
    msg, big = _in_big_pieces(data[: head_len + already], data[head_len + already :], cap)
    assert big > 0
    assert sig(msg) == sig(expected)
    assert type(msg.body) is bytes


def test_body_wanted_only_for_large_bodies_with_nothing_buffered() -> None:
    reader = MessageReader(False)
    assert reader.body_wanted() == 0  # no message
    reader.feed(request_head("/m", "h", SINK_MIN - 1))
    assert reader.next_message() is None and reader.body_wanted() == 0  # too small
    reader = MessageReader(False)
    reader.feed(request_head("/m", "h", SINK_MIN + 3) + b"abc")
    assert reader.body_wanted() == 0  # head not parsed yet, bytes buffered
    assert reader.next_message() is None
    assert reader.body_wanted() == SINK_MIN
    reader = MessageReader(False)
    reader.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % SINK_MIN)
    assert reader.next_message() is None and reader.body_wanted() == 0  # chunked


def test_big_piece_then_a_pipelined_message() -> None:
    body = b"\x01\x02" * (SINK_MIN // 2 + 10)
    data = request_head("/Big", "h", len(body)) + body
    head_len = len(data) - len(body)
    reader = MessageReader(False)
    reader.feed(data[: head_len + 10])
    assert reader.next_message() is None
    assert reader.body_wanted() == len(body) - 10
    reader.feed(body[10 : 10 + SINK_MIN])
    assert reader.next_message() is None
    assert reader.body_wanted() == 0  # what is left is under the threshold
    reader.feed(body[10 + SINK_MIN :] + PING_REQ)
    first = reader.next_message()
    assert first is not None and first.body == body and first.target == "/Big"
    second = reader.next_message()
    assert second is not None and second.body == b"Test Data"
    assert reader.next_message() is None and not reader.in_message


def test_big_pieces_on_a_response_reader() -> None:
    body = bytes(range(256)) * (SINK_MIN // 256 + 1)
    data = response_head(200, len(body)) + body
    reader = MessageReader(True)
    reader.feed(data[:100])
    assert reader.next_message() is None
    assert reader.body_wanted() == len(data) - 100
    reader.feed(data[100:])
    msg = reader.next_message()
    assert msg is not None and msg.body == body


# -- keep-alive ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "keep_alive"),
    [
        (b"POST / HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"POST / HTTP/1.1\r\nConnection: close\r\n\r\n", False),
        (b"POST / HTTP/1.1\r\nConnection: Close\r\n\r\n", False),
        (b"POST / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n", True),
        (b"POST / HTTP/1.0\r\n\r\n", False),
        (b"POST / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
        (b"POST / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", True),
    ],
)
def test_request_keep_alive(data: bytes, keep_alive: bool) -> None:
    assert one(data, is_response=False).keep_alive is keep_alive


@pytest.mark.parametrize(
    ("data", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        (
            b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            False,
        ),
    ],
)
def test_response_keep_alive(data: bytes, keep_alive: bool) -> None:
    assert one(data, is_response=True).keep_alive is keep_alive


def test_connection_close_in_a_token_list() -> None:
    assert not one(b"POST / HTTP/1.1\r\nConnection: TE, close\r\n\r\n", False).keep_alive


# -- building heads --------------------------------------------------------------------------------


def test_request_head_bytes() -> None:
    assert request_head("/Ping", "TestDo", 9) == (
        b"POST /Ping HTTP/1.1\r\nHost: TestDo\r\nContent-Length: 9\r\n\r\n"
    )
    extra = b"X-Goplug-Subscriber: abc\r\nX-Goplug-Ack: 0\r\n"
    assert request_head("/base/RegisterCallback", "otherhost:99", 15, extra) == (
        b"POST /base/RegisterCallback HTTP/1.1\r\nHost: otherhost:99\r\n"
        + extra
        + b"Content-Length: 15\r\n\r\n"
    )


def test_response_head_bytes() -> None:
    assert response_head(200, 5) == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert response_head(413, 0) == b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n"
    assert response_head(299, 0).startswith(b"HTTP/1.1 299 Unknown\r\n")
    json_ct = b"Content-Type: application/json\r\n"
    assert response_head(500, 2, json_ct) == (
        b"HTTP/1.1 500 Internal Server Error\r\n" + json_ct + b"Content-Length: 2\r\n\r\n"
    )


def test_reader_state_properties() -> None:
    reader = MessageReader(False)
    assert not reader.in_message and reader.buffered == 0
    reader.feed(PING_REQ[:20])
    assert reader.in_message and reader.buffered == 20
    reader.feed(PING_REQ[20:] + DO_REQ[:5])
    assert reader.next_message() is not None
    assert reader.in_message and reader.buffered == 5
    assert repr(Message(status=200, reason="OK", body=b"ab")) == "<Message 200 OK 2 bytes>"
    assert repr(Message(method="POST", target="/Ping")) == "<Message POST /Ping 0 bytes>"


# -- properties ----------------------------------------------------------------------------------

FRAGMENTS = [
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: ",
    b"HTTP/1.0 404 Not Found\n",
    b"POST /Ping HTTP/1.1\r\n",
    b"GET / HTTP/1.0\n",
    b"Content-Length: ",
    b"Transfer-Encoding: chunked\r\n",
    b"Connection: close\r\n",
    b"Host: x\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b":",
    b" ",
    b"0",
    b"5",
    b"ff",
    b"10000000000",
    b"-1",
    b"hello",
    b";ext",
]

pieces_of_bytes = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=12)), max_size=40
).map(b"".join)


def _feed_all_and_eof(data: bytes, cuts: list[int], is_response: bool, limits: Limits) -> None:
    reader = MessageReader(is_response, limits)
    try:
        for piece in split_at(data, cuts):
            reader.feed(piece)
            drain(reader)
        reader.feed_eof()
        drain(reader)
        reader.feed(b"x")  # after end of stream: always a FramingError
    except FramingError as exc:
        assert isinstance(exc, ProtocolError)
        assert exc.status in (400, 413)
    else:
        raise AssertionError("feed after feed_eof must raise")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(pieces_of_bytes, st.binary(max_size=200)),
    cuts=st.lists(st.integers(0, 400), max_size=12),
    is_response=st.booleans(),
    small=st.booleans(),
)
def test_arbitrary_bytes_raise_only_framing_errors(
    data: bytes, cuts: list[int], is_response: bool, small: bool
) -> None:
    limits = Limits(max_head=64, max_headers=4, max_body=32) if small else Limits()
    _feed_all_and_eof(data, [c for c in cuts if c <= len(data)], is_response, limits)


route_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/"),
    min_size=1,
    max_size=24,
)


def _target(prefix: str, route: str) -> str:
    # As goplug.client builds it.
    return prefix + "/" + quote(route, safe="!$&'()*+,;=:@")


@settings(max_examples=150, deadline=None)
@given(
    route=route_text,
    prefix=st.sampled_from(["", "/base", "/a/b"]),
    body=st.binary(max_size=4096),
    extra=st.sampled_from([b"", b"X-Goplug-Subscriber: s_1\r\nX-Goplug-Ack: 12\r\n"]),
    data=st.data(),
)
def test_request_round_trip(
    route: str, prefix: str, body: bytes, extra: bytes, data: st.DataObject
) -> None:
    target = _target(prefix, route)
    wire = request_head(target, "TestDo", len(body), extra) + body
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    for pieces in ([wire], split_at(wire, cuts), [wire, wire]):
        msgs = parse(pieces, is_response=False, eof=True)
        assert msgs
        for msg in msgs:
            assert (msg.method, msg.target, msg.body) == ("POST", target, body)
            assert msg.header(b"host") == b"TestDo" and msg.keep_alive
            assert route_of(msg.target, prefix) == route


@settings(max_examples=150, deadline=None)
@given(
    status=st.one_of(st.sampled_from(sorted(REASONS)), st.integers(100, 599)),
    body=st.binary(max_size=4096),
    chunked=st.booleans(),
    data=st.data(),
)
def test_response_round_trip(status: int, body: bytes, chunked: bool, data: st.DataObject) -> None:
    if status < 200 or status in (204, 304):
        body = b""
    if chunked and body:
        sizes = data.draw(st.lists(st.integers(1, 600), min_size=1, max_size=10))
        chunks = []
        pos = 0
        while pos < len(body):
            size = sizes[len(chunks) % len(sizes)]
            chunks.append(body[pos : pos + size])
            pos += size
        wire = b"HTTP/1.1 %d X\r\nTransfer-Encoding: chunked\r\n\r\n" % status
        wire += b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        reason = "X"
    else:
        wire = response_head(status, len(body)) + body
        reason = REASONS.get(status, b"Unknown").decode()
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    for pieces in ([wire], split_at(wire, cuts), [wire + wire]):
        msgs = parse(pieces, is_response=True, eof=True)
        assert msgs
        for msg in msgs:
            assert (msg.status, msg.reason, msg.body, msg.keep_alive) == (
                status,
                reason,
                body,
                True,
            )


def _outcome(pieces: list[bytes], is_response: bool) -> tuple[list[tuple[object, ...]], bool]:
    """(messages taken, whether it ended in a FramingError), one message at a time."""
    reader = MessageReader(is_response)
    out: list[tuple[object, ...]] = []
    try:
        for piece in pieces:
            reader.feed(piece)
            while (msg := reader.next_message()) is not None:
                out.append(sig(msg, headers=False))
        last = reader.feed_eof()
        if last is not None:
            out.append(sig(last, headers=False))
    except FramingError:
        return out, True
    return out, False


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=pieces_of_bytes, cuts=st.lists(st.integers(0, 400), max_size=12), resp=st.booleans())
def test_how_bytes_are_split_never_changes_the_outcome(
    data: bytes, cuts: list[int], resp: bool
) -> None:
    whole = _outcome([data], resp)
    assert _outcome(split_at(data, [c for c in cuts if c <= len(data)]), resp) == whole
    assert _outcome(bytewise(data), resp) == whole
