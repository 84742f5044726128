"""Unit tests of routes, bodies and error mapping (goplug.wire.routes); no sockets."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from goplug.errors import (
    CallbackNotFound,
    GoPlugError,
    MethodNotFound,
    PluginConnectionError,
    ProtocolError,
    RemoteError,
)
from goplug.wire.http import Message, MessageReader
from goplug.wire.routes import (
    RESERVED,
    activation_body,
    decode_batch,
    encode_batch,
    error_body,
    error_from_response,
    parse_activation,
    parse_callback_name,
    route_of,
    valid_subscriber,
)

# -- route_of ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "route"),
    [
        ("/Activate", "Activate"),
        ("/main.Do", "main.Do"),
        ("/main.Echo/extra/x?q=1", "main.Echo"),  # only the first segment counts
        ("/main.Echo?q=1/2", "main.Echo"),
        ("/%50ing", "Ping"),  # %-decoded
        ("/main%2EDo", "main.Do"),
        ("/a%20b", "a b"),
        ("/caf%C3%A9", "caf\xe9"),
        ("/100%25", "100%"),
        ("/a%3Fb?c", "a?b"),
        ("/ping", "ping"),  # case is kept: routes are case-sensitive
        ("/", ""),
        ("", ""),
        ("/?x=1", ""),
        ("//Ping", ""),
        ("Ping", "Ping"),
    ],
)
def test_route_of(target: str, route: str) -> None:
    assert route_of(target) == route


@pytest.mark.parametrize(
    ("target", "prefix", "route"),
    [
        ("/base/Ping", "/base", "Ping"),
        ("/base/main.Do/extra?q", "/base", "main.Do"),
        ("/base/%50ing", "/base", "Ping"),
        ("/Ping", "/base", "Ping"),  # a route without the prefix is accepted too
        ("/base", "/base", "base"),  # the prefix alone is not stripped
        ("/base?x", "/base", "base"),
        ("/basement/Ping", "/base", "basement"),
        ("/a/b/Ping", "/a/b", "Ping"),
        ("/a/Ping", "/a/b", "a"),
        ("/base/", "/base", ""),
    ],
)
def test_route_of_with_prefix(target: str, prefix: str, route: str) -> None:
    assert route_of(target, prefix) == route


@settings(max_examples=200, deadline=None)
@given(
    route=st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/"),
        min_size=1,
        max_size=30,
    ),
    prefix=st.sampled_from(["", "/base", "/x/y"]),
    tail=st.sampled_from(["", "/extra", "?q=1", "/a?b=/c"]),
)
def test_route_of_inverts_the_client_quoting(route: str, prefix: str, tail: str) -> None:
    target = prefix + "/" + quote(route, safe="!$&'()*+,;=:@") + tail
    assert route_of(target, prefix) == route


# -- parse_activation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "methods", "rest"),
    [
        (b'["main.Do","","","",""]', ["main.Do"], b""),
        (
            b'["main.Nil","main.Slow","main.Echo","main.Big","main.Panic","","","",""]',
            ["main.Nil", "main.Slow", "main.Echo", "main.Big", "main.Panic"],
            b"",
        ),
        (b'["m",null]', ["m"], b""),
        (b'[null,"m",""]', ["m"], b""),
        (b"null", [], b""),
        (b"[]", [], b""),
        (b'["", ""]', [], b""),
        (b'["main.Do","","","",""]HELLO', ["main.Do"], b"HELLO"),
        (b'["a","b"]{"json":"too"}', ["a", "b"], b'{"json":"too"}'),
        (b'["caf\xc3\xa9"]HELLO', ["caf\xe9"], b"HELLO"),
        (b'["\\u00e9"]\xc3\xa9', ["\xe9"], b"\xc3\xa9"),
    ],
)
def test_parse_activation(body: bytes, methods: list[str], rest: bytes) -> None:
    assert parse_activation(body) == (methods, rest)


def test_parse_activation_whitespace() -> None:
    methods, rest = parse_activation(b' \r\n\t["m", "n" ,""] \n')
    assert methods == ["m", "n"] and rest.strip() == b""


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"HELLO",
        b'{"m":1}',
        b'"m"',
        b"42",
        b"true",
        b'["m",1]',
        b'["m",["n"]]',
        b'["m",',
        b"\xff\xfe",
    ],
)
def test_parse_activation_garbage(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_activation(body)


def test_parse_activation_keeps_binary_activator_output_raw() -> None:
    assert parse_activation(b'["m"]\xff\x00\x80') == (["m"], b"\xff\x00\x80")


@settings(max_examples=150, deadline=None)
@given(
    methods=st.lists(st.text(min_size=1, max_size=12), max_size=8),
    extra=st.one_of(st.none(), st.text(max_size=40).map(str.encode)),
)
def test_activation_body_round_trip(methods: list[str], extra: bytes | None) -> None:
    body = activation_body(methods, extra)
    assert body.startswith(b"[")
    if not extra:
        assert json.loads(body) == methods  # strict JSON: the Go registry can parse it
    assert parse_activation(body) == (methods, extra or b"")


# -- parse_callback_name and subscribers ---------------------------------------------------------


def test_parse_callback_name() -> None:
    assert parse_callback_name(b'"main.callBack"') == "main.callBack"
    assert parse_callback_name(b' "cb" \n') == "cb"
    assert parse_callback_name(b'"caf\\u00e9"') == "caf\xe9"
    for bad in (b"notjson", b"", b'""', b"123", b'["cb"]', b"null", b'"cb" x', b"\xff"):
        with pytest.raises(ProtocolError):
            parse_callback_name(bad)


DEEP = b"[" * 100_000


def _deep_error_response() -> GoPlugError:
    resp = Message(status=500, headers={b"content-type": b"application/json"}, body=DEEP)
    return error_from_response(resp, "main.Do")


@pytest.mark.parametrize(
    "call",
    [
        lambda: parse_callback_name(DEEP),
        lambda: parse_activation(DEEP),
        _deep_error_response,
    ],
    ids=["parse_callback_name", "parse_activation", "error_from_response"],
)
def test_deep_nesting_is_a_protocol_error(call: Callable[[], object]) -> None:
    try:
        result = call()
    except ProtocolError:
        return
    assert isinstance(result, RemoteError)


def test_valid_subscriber() -> None:
    assert valid_subscriber(b"a")
    assert valid_subscriber(b"A-z_09" * 10 + b"abcd")  # 64 characters
    for bad in (b"", b"a" * 65, b"a b", b"a/b", b"caf\xc3\xa9", b"a\n", b"a.b"):
        assert not valid_subscriber(bad)


# -- batches -------------------------------------------------------------------------------------


def test_encode_batch_layout() -> None:
    assert encode_batch([]) == []
    assert b"".join(encode_batch([b"ab", b"", b"c"])) == (
        b"\x00\x00\x00\x02ab\x00\x00\x00\x00\x00\x00\x00\x01c"
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_batch_round_trip(items: list[bytes]) -> None:
    body = b"".join(encode_batch(items))
    assert len(body) == sum(4 + len(i) for i in items)
    decoded = decode_batch(body, len(items))
    assert decoded == items and all(type(i) is bytes for i in decoded)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=50), min_size=1, max_size=8), st.data())
def test_truncated_or_padded_batches_are_errors(items: list[bytes], data: st.DataObject) -> None:
    body = b"".join(encode_batch(items))
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(ProtocolError, match="truncated"):
        decode_batch(body[:cut], len(items))
    with pytest.raises(ProtocolError, match="after"):
        decode_batch(body + data.draw(st.binary(min_size=1, max_size=5)), len(items))
    with pytest.raises(ProtocolError):
        decode_batch(body, len(items) + 1)
    with pytest.raises(ProtocolError, match="after"):
        decode_batch(body, len(items) - 1)


def test_batch_edge_cases() -> None:
    assert decode_batch(b"", 0) == []
    with pytest.raises(ProtocolError):
        decode_batch(b"\x00\x00", 1)  # a cut length field
    with pytest.raises(ProtocolError, match="truncated"):
        decode_batch(struct.pack(">I", 0xFFFFFFFF) + b"abc", 1)  # absurd length, no allocation


# -- error_from_response -------------------------------------------------------------------------

JSON = b"Content-Type: application/json\r\n"


def response(raw: bytes) -> Message:
    reader = MessageReader(True)
    reader.feed(raw)
    msg = reader.next_message()
    assert msg is not None
    return msg


def json_response(status: int, reason: bytes, body: bytes) -> Message:
    head = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    return response(head + JSON + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def test_404_is_method_not_found() -> None:
    body = error_body("MethodNotFound", "no method 'Nope'")
    err = error_from_response(json_response(404, b"Not Found", body), "Nope")
    assert isinstance(err, MethodNotFound) and "Nope" in str(err)
    bare = response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(error_from_response(bare, "Nope"), MethodNotFound)


def test_go_400_with_an_empty_body_on_a_method_is_method_not_found() -> None:
    go_400 = response(
        b"HTTP/1.1 400 Bad Request\r\nDate: Wed, 25 Nov 2026 10:01:08 GMT\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    for route in ("Nope", "main.Do", "ping"):
        err = error_from_response(go_400, route)
        assert isinstance(err, MethodNotFound) and repr(route) in str(err)


@pytest.mark.parametrize("route", sorted(RESERVED))
def test_go_400_on_a_reserved_route_is_a_protocol_error(route: str) -> None:
    go_400 = response(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    err = error_from_response(go_400, route)
    assert type(err) is ProtocolError and "400" in str(err) and route in str(err)


def test_goplug_400_with_a_json_body_is_a_protocol_error() -> None:
    body = error_body("ProtocolError", "the callback name must be a JSON string")
    err = error_from_response(json_response(400, b"Bad Request", body), "main.Do")
    assert type(err) is ProtocolError and "JSON string" in str(err)


def test_500_json_is_a_remote_error() -> None:
    tb = 'Traceback (most recent call last):\n  File "x.py", line 1\nZeroDivisionError\n'
    body = error_body("ZeroDivisionError", "division by zero", tb)
    err = error_from_response(json_response(500, b"Internal Server Error", body), "div")
    assert isinstance(err, RemoteError)
    assert (err.remote_type, err.remote_message, err.remote_traceback, err.status) == (
        "ZeroDivisionError",
        "division by zero",
        tb,
        500,
    )
    assert "remote traceback" in str(err) and "division by zero" in str(err)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops",
        # JSON text without the JSON content type is not interpreted
        b'HTTP/1.1 500 X\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\n{"type":"E"}\n',
        b"HTTP/1.1 500 X\r\n" + JSON + b"Content-Length: 9\r\n\r\nnot json!",
        b"HTTP/1.1 500 X\r\n" + JSON + b"Content-Length: 7\r\n\r\n[1,2,3]",
    ],
)
def test_500_without_usable_details_is_a_generic_remote_error(raw: bytes) -> None:
    err = error_from_response(response(raw), "m")
    assert isinstance(err, RemoteError)
    assert (err.remote_type, err.remote_message, err.remote_traceback, err.status) == (
        "Error",
        "",
        "",
        500,
    )


def test_other_statuses_with_a_type_are_remote_errors() -> None:
    err = error_from_response(json_response(418, b"Teapot", error_body("ValueError", "v")), "m")
    assert isinstance(err, RemoteError) and err.status == 418 and err.remote_type == "ValueError"


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\n"
        + JSON
        + b"Content-Length: %d\r\n\r\n" % len(error_body("ServiceUnavailable", "stopping"))
        + error_body("ServiceUnavailable", "stopping"),
    ],
)
def test_503_is_a_connection_error(raw: bytes) -> None:
    err = error_from_response(response(raw), "main.Do")
    assert isinstance(err, PluginConnectionError) and "unavailable" in str(err)


@pytest.mark.parametrize(("status", "reason"), [(413, b"Content Too Large"), (408, b"Timeout")])
def test_413_and_408_are_protocol_errors(status: int, reason: bytes) -> None:
    body = error_body("ProtocolError", "body exceeds the limit")
    err = error_from_response(json_response(status, reason, body), "main.Do")
    assert type(err) is ProtocolError and str(status) in str(err)
    bare = response(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\n\r\n" % (status, reason))
    assert type(error_from_response(bare, "main.Do")) is ProtocolError


def test_callback_not_found() -> None:
    body = error_body("CallbackNotFound", "no application has registered 'cb'")
    err = error_from_response(json_response(400, b"Bad Request", body), "RegisterCallback")
    assert isinstance(err, CallbackNotFound) and "cb" in str(err)


def test_unexpected_statuses_are_protocol_errors() -> None:
    for raw in (
        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 Ok\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n",
    ):
        assert type(error_from_response(response(raw), "Ping")) is ProtocolError


def test_error_body_shape() -> None:
    assert json.loads(error_body("E", "m", "tb")) == {
        "type": "E",
        "message": "m",
        "traceback": "tb",
    }
    assert json.loads(error_body("E", "m")) == {"type": "E", "message": "m", "traceback": ""}


@settings(max_examples=200, deadline=None)
@given(
    status=st.integers(100, 599),
    body=st.one_of(
        st.binary(max_size=60),
        st.dictionaries(
            st.sampled_from(["type", "message", "traceback", "x"]),
            st.one_of(st.text(max_size=10), st.integers(), st.none(), st.booleans()),
        ).map(lambda d: json.dumps(d).encode()),
    ),
    json_type=st.booleans(),
    route=st.sampled_from(["main.Do", "Ping", "RegisterCallback", ""]),
)
def test_error_from_response_always_returns_a_goplug_error(
    status: int, body: bytes, json_type: bool, route: str
) -> None:
    headers = {b"content-type": b"application/json"} if json_type else {}
    err = error_from_response(Message(status=status, reason="R", headers=headers, body=body), route)
    assert isinstance(err, GoPlugError)
    if status == 404:
        assert isinstance(err, MethodNotFound)
    if status == 503:
        assert isinstance(err, PluginConnectionError)
    if status == 500:
        assert isinstance(err, RemoteError)
