"""The routes a plugin serves and the bodies they carry (see docs/PROTOCOL.md §4-§6)."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

from goplug.errors import (
    CallbackNotFound,
    GoPlugError,
    MethodNotFound,
    PluginConnectionError,
    ProtocolError,
    RemoteError,
)
from goplug.wire.http import Message
from goplug.wire.jsontext import json_array, json_string

__all__ = [
    "ACTIVATE",
    "PING",
    "REGISTER_CALLBACK",
    "RESERVED",
    "STOP",
    "UNSUBSCRIBE",
    "callback_name_body",
    "decode_batch",
    "encode_batch",
    "error_body",
    "error_from_response",
    "parse_activation",
    "parse_callback_name",
    "route_of",
    "valid_subscriber",
]

ACTIVATE: Final = "Activate"
PING: Final = "Ping"
REGISTER_CALLBACK: Final = "RegisterCallback"
UNSUBSCRIBE: Final = "Unsubscribe"
STOP: Final = "Stop"
RESERVED: Final = frozenset({ACTIVATE, PING, REGISTER_CALLBACK, UNSUBSCRIBE, STOP})

SUBSCRIBER_HEADER: Final = b"x-goplug-subscriber"
ACK_HEADER: Final = b"x-goplug-ack"
SEQ_HEADER: Final = b"x-goplug-seq"
COUNT_HEADER: Final = b"x-goplug-count"

_SUBSCRIBER_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_LEN: Final = struct.Struct(">I")


def route_of(target: str, prefix: str = "") -> str:
    """Return the route a request target selects: its first path segment, %-decoded.

    ``prefix`` (the path of the plugin's Url) is skipped when the target starts with it.
    """
    path = target.split("?", 1)[0]
    if prefix and path.startswith(prefix + "/"):
        path = path[len(prefix) :]
    segment = path[1:].split("/", 1)[0] if path.startswith("/") else path.split("/", 1)[0]
    if "%" not in segment:
        return segment
    from urllib.parse import unquote

    return unquote(segment)


def valid_subscriber(token: bytes) -> bool:
    """Tell whether ``token`` is an acceptable ``X-Goplug-Subscriber`` value."""
    return 0 < len(token) <= 64 and _SUBSCRIBER_CHARS.issuperset(token)


def activation_body(methods: Iterable[str], extra: bytes | None) -> bytes:
    """Build the `/Activate` answer: a JSON array of method names, then the activator's bytes."""
    body = json_array(methods).encode("utf-8", "surrogateescape")
    return body + extra if extra else body


def parse_activation(body: bytes) -> tuple[list[str], bytes]:
    """Parse an `/Activate` answer into (method names, bytes after the array).

    Empty names and ``null`` (GoPlug pads its array with one ``""`` per built-in route) are
    skipped; anything after the array is returned as the activator's output.
    """
    # surrogateescape round-trips every byte, so the activator's output comes back unchanged.
    stripped = body.decode("utf-8", "surrogateescape").lstrip()
    try:
        import json

        value, end = json.JSONDecoder().raw_decode(stripped)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"/Activate did not answer a JSON array: {exc!r:.200}") from None
    if value is None:
        return [], b""
    if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
        raise ProtocolError("/Activate did not answer a JSON array of strings")
    rest = stripped[end:].encode("utf-8", "surrogateescape")
    return [v for v in value if v], rest


def parse_callback_name(body: bytes) -> str:
    """Decode the JSON string a `/RegisterCallback` or `/Unsubscribe` request carries."""
    try:
        import json

        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError("the callback name must be a JSON string") from None
    if not isinstance(value, str) or not value:
        raise ProtocolError("the callback name must be a non-empty JSON string")
    return value


def callback_name_body(name: str) -> bytes:
    """Encode a callback name as the JSON string `/RegisterCallback` and `/Unsubscribe` carry."""
    return json_string(name).encode("utf-8", "surrogateescape")


def encode_batch(items: Iterable[bytes]) -> list[bytes]:
    """Frame notifications as records: a 4-byte big-endian length, then the bytes."""
    out: list[bytes] = []
    for item in items:
        out.append(_LEN.pack(len(item)))
        out.append(item)
    return out


def decode_batch(body: bytes, count: int) -> list[bytes]:
    """Split a batch answer into its ``count`` notifications."""
    items: list[bytes] = []
    pos = 0
    view = memoryview(body)
    for _ in range(count):
        if pos + 4 > len(body):
            raise ProtocolError("truncated notification batch")
        (n,) = _LEN.unpack_from(body, pos)
        pos += 4
        if pos + n > len(body):
            raise ProtocolError("truncated notification batch")
        items.append(bytes(view[pos : pos + n]))
        pos += n
    if pos != len(body):
        raise ProtocolError("bytes after the notification batch")
    return items


def error_body(exc_type: str, message: str, traceback: str = "") -> bytes:
    """Build the JSON body that describes a failure."""
    fields = (("type", exc_type), ("message", message), ("traceback", traceback))
    text = "{" + ",".join(f"{json_string(k)}:{json_string(v)}" for k, v in fields) + "}"
    return text.encode("utf-8", "surrogateescape")


def error_from_response(response: Message, route: str) -> GoPlugError:
    """Turn a non-200 response into the matching typed exception."""
    status = response.status
    info: dict[str, str] = {}
    if response.body and response.header(b"content-type").startswith(b"application/json"):
        try:
            import json

            decoded = json.loads(response.body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            decoded = None
        if isinstance(decoded, dict):
            info = {k: str(v) for k, v in decoded.items() if isinstance(v, str | int)}
    kind = info.get("type", "")
    message = info.get("message", "") or f"{status} {response.reason}".strip()
    if status == 404 or (status == 400 and not info and route not in RESERVED):
        # A GoPlug plugin answers an unknown route with 400 and no body.
        return MethodNotFound(f"the plugin has no method {route!r}")
    if status == 401:
        return PluginConnectionError(f"/{route}: the plugin refused this registry: {message}")
    if status == 500 or (kind and status not in (400, 408, 413, 503)):
        return RemoteError(
            kind or "Error", info.get("message", ""), info.get("traceback", ""), status
        )
    if status == 503:
        return PluginConnectionError(f"/{route}: plugin unavailable: {message}")
    if kind == "CallbackNotFound":
        return CallbackNotFound(message)
    return ProtocolError(f"/{route} answered {status} {response.reason}: {message}")
