"""A misbehaving plugin for the registry's input tests (standard library only).

    python rogue_plugin.py DIR NAME [NAMESPACE] [--user=UID] [--activate=BEHAVIOUR]

It listens on ``DIR/<stem>.sock``, announces itself with a valid `.pconf` (so a registry loads
it) and then answers each route with the behaviour of that name (see ``BEHAVIOURS``): ``Echo``
and ``Ping`` behave; every other route breaks the protocol in its own way. A long poll is
answered as its callback's name says (see ``answer_poll``); ``PollCount`` (input: a callback
name) tells how many polls for it arrived. ``--activate=X``
makes `/Activate` itself behave as X. ``--user=UID`` (when started as root) drops to that uid
and its primary group before creating anything, so the socket and the `.pconf` belong to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import socket
import sys
import threading
import time

CRLF = b"\r\n"


def _response(status: str, body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\n\r\n%s" % (
        status.encode(),
        extra,
        len(body),
        body,
    )


def _trickle(conn: socket.socket, head: bytes, chunk: bytes, pause: float) -> None:
    """Send ``head`` then ``chunk`` every ``pause`` seconds until the peer goes away."""
    conn.sendall(head)
    while True:
        conn.sendall(chunk)
        if pause:
            time.sleep(pause)


def b_garbage(conn: socket.socket, body: bytes) -> bool:
    conn.sendall(b"\x00\x01\x02\xff this is not HTTP at all\r\n\r\n")
    return True


def b_bad_status(conn: socket.socket, body: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok")
    return True


def b_truncated(conn: socket.socket, body: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
    return False  # cut: close the connection


def b_truncated_open(conn: socket.socket, body: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
    _hold(conn)
    return False


def b_short_length(conn: socket.socket, body: bytes) -> bool:
    # Announces 5 bytes and sends 11: the 6 extra bytes must never be taken for another answer.
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello world")
    return True


def b_smuggled_answer(conn: socket.socket, body: bytes) -> bool:
    # A whole second answer after the first, in the same write: it answers nothing that was
    # asked, so it must never be taken for the answer to the next request.
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
    )
    return True


def b_never_ends(conn: socket.socket, body: bytes) -> bool:
    _trickle(conn, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\nx\r\n", 0.05)
    return False


def b_never_ends_length(conn: socket.socket, body: bytes) -> bool:
    _trickle(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", b"x", 0.05)
    return False


def b_flood(conn: socket.socket, body: bytes) -> bool:
    chunk = b"%x\r\n%s\r\n" % (65536, b"f" * 65536)
    _trickle(conn, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", chunk, 0)
    return False


def b_close_delimited_flood(conn: socket.socket, body: bytes) -> bool:
    _trickle(conn, b"HTTP/1.1 200 OK\r\n\r\n", b"c" * 65536, 0)
    return False


def b_huge(conn: socket.socket, body: bytes) -> bool:
    # 10 GB announced; a few bytes sent slowly, so a reader that waits for them would hang.
    _trickle(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 10737418240\r\n\r\n", b"h", 0.05)
    return False


def b_huge_chunk(conn: socket.socket, body: bytes) -> bool:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n280000000\r\n"
    _trickle(conn, head, b"h", 0.05)
    return False


def b_negative_length(conn: socket.socket, body: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n")
    _hold(conn)
    return False


def b_headers(conn: socket.socket, body: bytes) -> bool:
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Flood: y\r\n" * 10_000
    _trickle(conn, head, b"X-More: z\r\n", 0.05)
    return False


def b_long_status(conn: socket.socket, body: bytes) -> bool:
    _trickle(conn, b"HTTP/1.1 200 " + b"O" * (1024 * 1024), b"K", 0.05)
    return False


def b_close(conn: socket.socket, body: bytes) -> bool:
    return False


def b_hang(conn: socket.socket, body: bytes) -> bool:
    _hold(conn)
    return False


def _hold(conn: socket.socket) -> None:
    """Keep the connection open, answering nothing, until the peer closes it."""
    conn.settimeout(None)
    with contextlib.suppress(OSError):
        while conn.recv(65536):
            pass


BEHAVIOURS = {
    "Garbage": b_garbage,
    "BadStatus": b_bad_status,
    "Truncated": b_truncated,
    "TruncatedOpen": b_truncated_open,
    "ShortLength": b_short_length,
    "SmuggledAnswer": b_smuggled_answer,
    "NeverEnds": b_never_ends,
    "NeverEndsLength": b_never_ends_length,
    "Flood": b_flood,
    "CloseDelimitedFlood": b_close_delimited_flood,
    "Huge": b_huge,
    "HugeChunk": b_huge_chunk,
    "NegativeLength": b_negative_length,
    "Headers": b_headers,
    "LongStatus": b_long_status,
    "Close": b_close,
    "Hang": b_hang,
}


# -- long polls: the callback named in a /RegisterCallback says how to answer it --------------

_POLLS: dict[str, int] = {}  # polls seen per callback name (``PollCount`` tells)
_POLLS_LOCK = threading.Lock()


def _batch(seq: int, items: list[bytes], count: int | None = None) -> bytes:
    body = b"".join(len(i).to_bytes(4, "big") + i for i in items)
    extra = b"X-Goplug-Seq: %d\r\nX-Goplug-Count: %d\r\n" % (
        seq,
        len(items) if count is None else count,
    )
    return _response("200 OK", body, extra)


def answer_poll(conn: socket.socket, name: str) -> bool:
    """Answer a long poll for callback ``name`` (a behaviour); False when the connection ends."""
    with _POLLS_LOCK:
        seen = _POLLS[name] = _POLLS.get(name, 0) + 1
    if name == "Numbered" and seen == 1:
        conn.sendall(_batch(1, [b"one", b"two"]))
    elif name == "Garbage":
        conn.sendall(b"\x00\x01 not an answer\r\n\r\n")
    elif name == "BadRecords":  # counts two records, carries one
        conn.sendall(_batch(1, [b"only"], count=2))
    elif name == "HugeBatch":
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nX-Goplug-Seq: 1\r\nX-Goplug-Count: 1\r\n"
            b"Content-Length: 10737418240\r\n\r\n"
        )
    elif name == "SmuggledBatch":  # a second, unasked batch in the same write
        conn.sendall(_batch(1, [b"x"]) + _batch(2, [b"y"]))
    elif name == "StalledHead":  # an answer that starts and never ends, in its head
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Goplug-Seq: 1\r\n")
        _hold(conn)
        return False
    elif name == "StalledBody":  # the same in its body
        conn.sendall(_batch(1, [b"s" * 100_000])[:1000])
        _hold(conn)
        return False
    elif name == "CutBatch":
        conn.sendall(_batch(1, [b"z" * 1000])[:200])
        return False
    else:
        _hold(conn)
        return False
    return True


def _read_request(conn: socket.socket, buf: bytearray) -> tuple[str, bytes] | None:
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(CRLF)
    target = lines[0].split(b" ")[1].decode()
    length = 0
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        data = conn.recv(65536)
        if not data:
            return None
        rest += data
    body, remainder = rest[:length], rest[length:]
    buf[:] = remainder
    route = target.lstrip("/").split("/", 1)[0].split("?", 1)[0]
    return route, body


def serve_connection(conn: socket.socket, activate: str) -> None:
    buf = bytearray()
    try:
        while True:
            request = _read_request(conn, buf)
            if request is None:
                return
            route, body = request
            if route == "Activate" and not activate:
                names = ["Echo", "PollCount", *BEHAVIOURS]
                conn.sendall(_response("200 OK", json.dumps(names).encode()))
                continue
            if route == "Activate":
                route = activate
            if route in ("Echo", "Ping"):
                conn.sendall(_response("200 OK", body))
                continue
            if route == "RegisterCallback":
                if not answer_poll(conn, json.loads(body)):
                    return
                continue
            if route == "PollCount":
                with _POLLS_LOCK:
                    conn.sendall(_response("200 OK", b"%d" % _POLLS.get(body.decode(), 0)))
                continue
            if route == "Stop":
                conn.sendall(_response("200 OK", b""))
                continue
            behaviour = BEHAVIOURS.get(route)
            if behaviour is None:
                conn.sendall(_response("404 Not Found", b""))
                continue
            if not behaviour(conn, body):
                return
    except OSError:
        return
    finally:
        with contextlib.suppress(OSError):
            conn.close()


def drop_to(uid: int) -> None:
    """Become ``uid`` (with its primary group and no supplementary groups)."""
    gid = pwd.getpwuid(uid).pw_gid
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    opts = dict(a[2:].partition("=")[::2] for a in sys.argv[1:] if a.startswith("--"))
    location, name = args[0], args[1]
    namespace = args[2] if len(args) > 2 else ""
    if "user" in opts:
        drop_to(int(opts["user"]))
    os.umask(0o077)
    stem = f"{name}@{namespace}" if namespace else name
    sock_path = os.path.join(location, stem + ".sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(128)
    conf = {
        "Name": name,
        "NameSpace": namespace,
        "Url": f"unix://{namespace}{name}",
        "Sock": sock_path,
        "LazyLoad": False,
        "Pid": os.getpid(),
        "Protocol": "goplug/1",
    }
    pconf = os.path.join(location, stem + ".pconf")
    tmp = os.path.join(location, f".{stem}.tmp")
    with open(tmp, "w") as f:
        json.dump(conf, f)
    os.replace(tmp, pconf)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    activate = opts.get("activate", "")
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_connection, args=(conn, activate), daemon=True).start()


if __name__ == "__main__":
    main()
