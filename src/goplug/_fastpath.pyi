"""A goplug call and a callback's long poll in C (``_fastpath.c``); wire.http is the protocol."""

from collections.abc import Callable
from typing import Any

EOF = 0
"""serve(): the peer closed the connection."""
IDLE = 1
"""serve(): nothing arrived within the socket's receive timeout."""
DATA = 2
"""serve(): ``(DATA, served, received)``: a request for the Python parser."""
RAISED = 3
"""serve(): ``(RAISED, served, target, exception)``: the method raised."""
RESULT = 4
"""serve(): ``(RESULT, served, target, result)``: the method returned something not bytes."""
SLOW = 5
"""serve(): a request body did not arrive within the timeout."""

def exchange(
    fd: int,
    prefix: bytes,
    data: bytes,
    timeout: float,
    max_body: int,
    tune: Callable[[], object] | None,
    /,
) -> bytes | tuple[bytes, bool]:
    """Send ``prefix + len(data) + CRLFCRLF + data`` and read the answer.

    Returns the body of a plain ``200 OK`` with a Content-Length, else ``(received, eof)`` for
    the Python parser to finish. ``tune`` is called before a body of 256 KiB or more is
    allocated. OSError as from ``socket.recv``/``sendall``; TimeoutError when a trickling
    answer outlives ``timeout``.
    """

def serve(
    fd: int,
    targets: dict[bytes, Callable[[bytes], Any]],
    max_body: int,
    timeout: float,
    tune: Callable[[], object] | None,
    /,
) -> tuple[Any, ...]:
    """Answer requests whose target is a key of ``targets`` until one needs the Python side.

    Returns ``(code, served, ...)``: see the codes above; ``served`` counts the requests
    answered in this call.
    """

def ok_body(data: bytes, max_body: int, /) -> bytes | None:
    """The body if ``data`` is exactly one whole plain ``200 OK`` with a Content-Length."""

def request_of(data: bytes, max_body: int, /) -> tuple[bytes, bytes] | None:
    """``(target, body)`` if ``data`` is exactly one whole call request.

    That is a POST whose only headers are Host and Content-Length, as a goplug registry sends.
    """

def notifications(
    fd: int,
    request: bytes,
    max_body: int,
    timeout: float,
    tune: Callable[[], object] | None,
    /,
) -> tuple[int, list[bytes]] | tuple[bytes, bool]:
    """Send ``request`` (a long poll; may be empty) and wait for its answer.

    The wait for the answer to start has no bound (the socket has no receive timeout); once its
    head has come, the rest must come within ``timeout`` seconds (TimeoutError otherwise).
    Returns ``(first_seq, notifications)`` if the answer is a batch as goplug plugins send it
    (``200 OK`` with X-Goplug-Seq, X-Goplug-Count and Content-Length, in that order, and an
    exactly framed body), else ``(received, eof)`` for the Python parser to finish.
    """

def poll_of(data: bytes, max_body: int, /) -> tuple[bytes, bytes, int, bytes] | None:
    """``(target, subscriber, ack, body)`` if ``data`` is exactly one whole long poll.

    That is a POST with Host, X-Goplug-Subscriber, X-Goplug-Ack and Content-Length, in that
    order, as a goplug registry sends it.
    """
