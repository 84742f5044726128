"""The announce file (`.pconf`): tolerant parsing, validation, atomic writing.

Parsing accepts what GoPlug plugins write and what the seed README shows (case-insensitive keys,
unknown keys, ``null`` values, a trailing comma, bytes after the object, a BOM); everything else is
a :class:`~goplug.errors.ConfigError` that names the file and the problem.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from typing import Any, Final, NamedTuple

from goplug.errors import ConfigError
from goplug.wire.jsontext import json_string

__all__ = [
    "ENV_DIR",
    "ENV_LAUNCH_TOKEN",
    "ENV_NAME",
    "ENV_NAMESPACE",
    "MAX_PCONF_BYTES",
    "PROTOCOL_VERSION",
    "SUPPORTED_PROTOCOLS",
    "PluginConf",
    "check_name",
    "check_protocol",
    "dump_pconf",
    "file_stem",
    "parse_pconf",
    "write_atomically",
]

MAX_PCONF_BYTES: Final = 64 * 1024
PROTOCOL_VERSION: Final = "goplug/1"
SUPPORTED_PROTOCOLS: Final = frozenset({PROTOCOL_VERSION})
"""Protocol versions a registry speaks; a `.pconf` without one is GoPlug 0.1.0 (also spoken)."""

# The launch handshake: a registry that starts a plugin process passes these variables; the
# plugin announces itself in ENV_DIR and echoes ENV_LAUNCH_TOKEN in its `.pconf` (key Launch).
ENV_DIR: Final = "GOPLUG_DIR"
ENV_LAUNCH_TOKEN: Final = "GOPLUG_LAUNCH_TOKEN"
ENV_NAME: Final = "GOPLUG_NAME"
ENV_NAMESPACE: Final = "GOPLUG_NAMESPACE"

# A JSON string, or a comma right before a closing bracket (strings are matched so that commas
# inside them are left alone).
_STRING_OR_TRAILING_COMMA = r'"(?:\\.|[^"\\])*"|,(\s*[}\]])'
_URL_SAFE = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@"
)
_temp_names = itertools.count()


def check_name(value: str, what: str, *, plugin_side: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a safe plugin name or namespace.

    Both sides refuse ``/``, NUL, control characters, ``.`` and ``..``: names become file names.
    A plugin also refuses ``@`` (the separator in its file names) and an empty name.
    """
    control = any(c < " " or c == "\x7f" for c in value)
    if control or "/" in value or value in (".", ".."):
        raise ConfigError(f"invalid {what} {value!r}: no '/', '.', '..' or control characters")
    if plugin_side and "@" in value:
        raise ConfigError(f"invalid {what} {value!r}: '@' separates name and namespace")
    if what == "name" and not value:
        raise ConfigError("the plugin name must not be empty")


def file_stem(name: str, namespace: str) -> str:
    """Return the file name stem a goplug plugin uses: ``Name@NameSpace`` or ``Name``."""
    return f"{name}@{namespace}" if namespace else name


class PluginConf(NamedTuple):
    """The contents of one `.pconf` file."""

    name: str
    namespace: str
    url: str
    sock: str
    lazy_load: bool = False
    pid: int | None = None
    protocol: str = ""
    version: str = ""
    """The goplug version of the plugin's library ('' if it did not say)."""
    launch: str = ""
    """The launch token the plugin echoes when a registry started it ('' otherwise)."""
    path: str = ""
    """The file this configuration was read from ('' if it was not read from a file)."""

    @property
    def identity(self) -> tuple[str, str]:
        """The pair (namespace, name) that identifies the plugin."""
        return (self.namespace, self.name)

    @property
    def host(self) -> str:
        """The value for the ``Host`` header: the host part of :attr:`url`."""
        from urllib.parse import urlsplit

        return urlsplit(self.url).netloc

    @property
    def remote(self) -> bool:
        """True when the plugin is reached over TCP (``Url`` is ``https://`` or ``http://``)."""
        return self.url.startswith(("https://", "http://"))

    @property
    def address(self) -> str:
        """Where to connect: the socket path, or ``host:port`` for a plugin reached over TCP."""
        return self.host if self.remote else self.sock

    @property
    def path_prefix(self) -> str:
        """The path part of :attr:`url`, put in front of every route."""
        from urllib.parse import urlsplit

        return urlsplit(self.url).path.rstrip("/")


def default_url(name: str, namespace: str) -> str:
    """Return GoPlug's default Url for a plugin: ``unix://<NameSpace><Name>``.

    Characters a URL host cannot hold are %-encoded, so any valid name gives a valid Url.
    """
    text = namespace + name
    if not _URL_SAFE.issuperset(text):
        from urllib.parse import quote

        text = quote(text, safe="!$&'()*+,;=:@~")
    return "unix://" + text


_FIELDS: Final = {
    "name": ("name", str),
    "namespace": ("namespace", str),
    "url": ("url", str),
    "sock": ("sock", str),
    "lazyload": ("lazy_load", bool),
    "pid": ("pid", int),
    "protocol": ("protocol", str),
    "version": ("version", str),
    "launch": ("launch", str),
}


def _drop_trailing_commas(text: str) -> str:
    import re

    return re.sub(
        _STRING_OR_TRAILING_COMMA,
        lambda m: m.group(1) if m.group(1) is not None else m.group(0),
        text,
    )


def _decode_object(data: bytes, path: str) -> dict[str, Any]:
    raw = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    # surrogateescape keeps undecodable bytes after the object from failing the whole file;
    # the object itself is checked to be UTF-8 below.
    text = raw.decode("utf-8", "surrogateescape").strip()
    if not text:
        raise ConfigError("the file is empty", path)
    import json

    decoder = json.JSONDecoder()
    candidates = [text]
    if "," in text:
        candidates.append(_drop_trailing_commas(text))
    error: Exception | None = None
    for candidate in candidates:
        try:
            value, end = decoder.raw_decode(candidate)
        except (ValueError, RecursionError) as exc:
            error = error or exc
            continue
        try:
            candidate[:end].encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError("not UTF-8 text", path) from None
        if not isinstance(value, dict):
            raise ConfigError(f"expected a JSON object, found {type(value).__name__}", path)
        return value
    if isinstance(error, RecursionError):
        raise ConfigError("JSON nested too deeply", path)
    raise ConfigError(f"not valid JSON: {error}", path)


def parse_pconf(data: bytes, path: str = "") -> PluginConf:
    """Parse the bytes of a `.pconf` file; ``path`` is used in error messages."""
    if len(data) > MAX_PCONF_BYTES:
        raise ConfigError(f"file is larger than {MAX_PCONF_BYTES} bytes", path)
    raw = _decode_object(data, path)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        field_spec = _FIELDS.get(key.lower())
        if field_spec is None or value is None:
            continue
        attr, kind = field_spec
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(
                f"key {key!r} must be a {kind.__name__}, found {type(value).__name__}", path
            )
        values[attr] = value
    name = values.get("name", "")
    namespace = values.get("namespace", "")
    if not name:
        raise ConfigError("missing key 'Name'", path)
    sock = values.get("sock", "")
    url = values.get("url", "")
    remote = url.startswith(("https://", "http://"))
    if not sock and not remote:
        raise ConfigError("missing key 'Sock'", path)
    try:
        check_name(name, "name")
        check_name(namespace, "namespace")
    except ConfigError as exc:
        raise ConfigError(exc.reason, path) from None
    if "\x00" in sock:
        raise ConfigError("'Sock' contains a NUL byte", path)
    if sock and not os.path.isabs(sock):
        # GoPlug writes absolute paths; a relative one is taken relative to the file.
        sock = os.path.join(os.path.dirname(os.path.abspath(path)) if path else "", sock)
    url = url or default_url(name, namespace)
    try:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        host = parts.netloc
    except ValueError as exc:
        raise ConfigError(f"invalid 'Url' {url!r}: {exc}", path) from None
    if not host.isascii() or any(c in host for c in " \t\r\n/") or not parts.path.isascii():
        raise ConfigError(f"invalid 'Url' {url!r}: the host must be plain ASCII", path)
    if any(c in parts.path for c in " \t\r\n"):
        raise ConfigError(f"invalid 'Url' {url!r}: spaces in the path", path)
    if remote:
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None or port == 0:
            raise ConfigError(f"invalid 'Url' {url!r}: expected http(s)://HOST:PORT", path)
    return PluginConf(
        name=name,
        namespace=namespace,
        url=url,
        sock=sock,
        lazy_load=values.get("lazy_load", False),
        pid=values.get("pid"),
        protocol=values.get("protocol", ""),
        version=values.get("version", ""),
        launch=values.get("launch", ""),
        path=path,
    )


def check_protocol(conf: PluginConf) -> None:
    """Raise :class:`ConfigError` unless this side speaks the protocol ``conf`` announces."""
    if conf.protocol and conf.protocol not in SUPPORTED_PROTOCOLS:
        spoken = ", ".join(sorted(SUPPORTED_PROTOCOLS))
        raise ConfigError(
            f"the plugin speaks protocol {conf.protocol!r}"
            + (f" (goplug {conf.version})" if conf.version else "")
            + f"; this registry speaks {spoken} and GoPlug 0.1.0",
            conf.path or None,
        )


def dump_pconf(conf: PluginConf) -> bytes:
    """Serialise ``conf`` the way GoPlug does: compact JSON, GoPlug's keys first, in its order."""
    fields = [
        f'"Name":{json_string(conf.name)}',
        f'"NameSpace":{json_string(conf.namespace)}',
        f'"Url":{json_string(conf.url)}',
        f'"Sock":{json_string(conf.sock)}',
        f'"LazyLoad":{"true" if conf.lazy_load else "false"}',
    ]
    if conf.pid is not None:
        fields.append(f'"Pid":{int(conf.pid)}')
    if conf.protocol:
        fields.append(f'"Protocol":{json_string(conf.protocol)}')
    if conf.version:
        fields.append(f'"Version":{json_string(conf.version)}')
    if conf.launch:
        fields.append(f'"Launch":{json_string(conf.launch)}')
    return ("{" + ",".join(fields) + "}").encode("utf-8", "surrogateescape")


def write_atomically(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place.

    The temporary name starts with a dot and does not end with the extension, so a watching
    registry never reads a partial file.
    """
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}.{os.getpid()}.{next(_temp_names)}.tmp"
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
