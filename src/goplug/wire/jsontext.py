"""Writing the little JSON a plugin sends (names, paths) without importing :mod:`json`.

A plugin writes its `.pconf` and its `/Activate` answer at start-up, where importing the json
package would be a noticeable share of the time a small plugin takes to answer its first call.
Reading JSON (registry side, callbacks) uses :mod:`json` itself.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["json_array", "json_string"]

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def json_string(text: str) -> str:
    """Encode ``text`` as a JSON string.

    UTF-8 is kept as is; quotes, backslashes, control characters and lone surrogates are escaped.
    """
    if text.isprintable() and '"' not in text and "\\" not in text:
        return '"' + text + '"'
    out = []
    for char in text:
        code = ord(char)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def json_array(items: Iterable[str]) -> str:
    """Encode strings as a compact JSON array."""
    return "[" + ",".join(json_string(item) for item in items) + "]"
