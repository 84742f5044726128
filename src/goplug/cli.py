"""The ``goplug`` command: look at, call, watch and serve plugins from a shell.

Subcommands (``goplug SUBCOMMAND --help`` shows each one's options and examples):

- ``ls [DIR]``: every announced plugin, whether it answers, its pid, uptime, methods and socket.
- ``call DIR NAME[@NAMESPACE] METHOD [DATA | -]``: call a method, write its raw output.
- ``ping DIR NAME[@NAMESPACE]``: measure the round-trip time.
- ``watch DIR``: a live view of plugins coming and going.
- ``serve FILE.py | MODULE[:ATTR]``: serve the :class:`~goplug.Plugin` objects a file defines.
- ``run DIR -- COMMAND [ARGS...]``: launch a plugin and keep it running (restarts, its output).
- ``demo``: a tour with a Python and a Node.js plugin, each in its own process.
- ``conformance -- COMMAND [ARGS...]`` or ``conformance DIR NAME[@NAMESPACE]``: check a plugin
  program against the wire protocol (see docs/CONFORMANCE.md).
- ``new NAME --lang python|js|go [DIR]``: write a ready plugin project with its tests.

Looking and calling never unload a plugin (unloading sends ``/Stop``): the command disconnects
with :meth:`PluginRegistry.close`, so plugins keep running. Only ``run`` stops a plugin: the one
it launched, when it is told to end. Errors are one line on stderr,
``goplug: error: ...``; the exit status is 2 for a usage error and 1 for any other failure.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import re
import signal
import stat
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType, ModuleType
from typing import NoReturn, TextIO

from goplug.client import ClientSettings, PluginClient
from goplug.errors import (
    ConfigError,
    GoPlugError,
    MethodNotFound,
    PluginConnectionError,
    PluginStartError,
    RemoteError,
)
from goplug.launcher import LaunchSettings, PluginProcess
from goplug.plugin import Plugin, serve
from goplug.registry import (
    PluginEvent,
    PluginHandle,
    PluginRegistry,
    RegistrySettings,
    transport_for,
)
from goplug.transport import Transport, UnixTransport, check_owner
from goplug.wire import routes
from goplug.wire.pconf import MAX_PCONF_BYTES, PluginConf, file_stem, parse_pconf

__all__ = ["CommandError", "main"]

PROG = "goplug"


class CommandError(Exception):
    """A failure the command reports as one line on stderr, with exit status :attr:`status`."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors in the ``goplug: error: ...`` form (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


# -- argument helpers ------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def _split_identity(text: str) -> tuple[str, str]:
    """Split ``NAME[@NAMESPACE]`` into (name, namespace)."""
    name, _, namespace = text.partition("@")
    if not name:
        raise CommandError(f"invalid plugin {text!r}: expected NAME or NAME@NAMESPACE", 2)
    return name, namespace


def _is_etcd(location: str) -> bool:
    return location.startswith(("etcd://", "etcds://"))


def _plugin_dir(text: str) -> str:
    """Return the absolute plugin directory (or an etcd location as given).

    A registry would create a missing directory; a command that only looks must refuse one.
    """
    if _is_etcd(text):
        return text
    path = os.path.abspath(text)
    if not os.path.isdir(path):
        raise CommandError(f"no such plugin directory: {text}")
    return path


_NETWORK: dict[str, object] = {}  # tls / insecure_loopback / token from the command line


def _network_options(args: argparse.Namespace) -> dict[str, object]:
    """Registry keyword arguments for plugins on TCP, from --tls, --ca/--cert/--key, --token."""
    options: dict[str, object] = {}
    tls_dir = getattr(args, "tls", None)
    ca, cert, key = (getattr(args, n, None) for n in ("ca", "cert", "key"))
    if tls_dir:
        from goplug.tls import dev_configs

        options["tls"] = dev_configs(tls_dir)["registry"]
    elif ca or cert or key:
        if not (ca and cert and key):
            raise CommandError("--ca, --cert and --key go together")
        from goplug.tls import TLSConfig

        options["tls"] = TLSConfig(ca=ca, cert=cert, key=key)
    token = getattr(args, "token", None) or os.environ.get("GOPLUG_TOKEN", "")
    if getattr(args, "insecure_loopback", False):
        options["insecure_loopback"] = True
        options["token"] = token
    return options


def _transport_for(conf: PluginConf) -> Transport:
    """The transport ``goplug ls`` probes a plugin with (the rules of PluginRegistry)."""
    tcp = None
    tls, token = _NETWORK.get("tls"), _NETWORK.get("token")
    if conf.remote and (tls is not None or _NETWORK.get("insecure_loopback")):
        from goplug.tls import TcpTransport, TLSConfig

        tcp = TcpTransport(
            tls if isinstance(tls, TLSConfig) else None,
            insecure_loopback=tls is None,
            token=token if isinstance(token, str) else None,
        )
    return transport_for(conf, UnixTransport(), tcp)


def _client_settings(timeout: float | None) -> ClientSettings:
    if timeout is None:
        return ClientSettings()
    return ClientSettings(
        call_timeout=timeout,
        ping_timeout=timeout,
        activate_timeout=timeout,
        connect_timeout=timeout,
    )


def _configure_logging(
    level: int,
    fmt: str = "goplug: %(levelname)s: %(message)s",
    datefmt: str = "%Y-%m-%d %H:%M:%S",
) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt=datefmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def _describe(exc: GoPlugError) -> str:
    """One line for an error (a remote traceback is left out; ``-v`` shows it)."""
    if isinstance(exc, RemoteError):
        text = exc.remote_type
        if exc.remote_message:
            text += f": {exc.remote_message}"
        return f"the plugin's method raised {text}"
    return " ".join(str(exc).split())


def _add_network(p: argparse.ArgumentParser) -> None:
    """Options for plugins on other hosts (docs/MULTIHOST.md)."""
    group = p.add_argument_group("plugins on TCP")
    group.add_argument(
        "--tls", metavar="CERTDIR", help="certificates made by 'goplug tls init CERTDIR'"
    )
    group.add_argument("--ca", metavar="PEM", help="CA certificate (with --cert and --key)")
    group.add_argument("--cert", metavar="PEM", help="this side's certificate")
    group.add_argument("--key", metavar="PEM", help="this side's private key")
    group.add_argument(
        "--insecure-loopback",
        action="store_true",
        help="allow plaintext plugins on loopback (token from --token or $GOPLUG_TOKEN)",
    )
    group.add_argument("--token", help="shared token of plaintext loopback plugins")


def cmd_tls_init(args: argparse.Namespace) -> int:
    """``goplug tls init``: make a development CA and certificates."""
    from goplug.tls import make_dev_certs

    made = make_dev_certs(args.certdir, args.host or None)
    root = os.path.abspath(args.certdir)
    print(f"wrote a development CA and certificates in {root}")
    for side, config in made.items():
        print(f"  {side}: TLSConfig(ca={config.ca!r}, cert={config.cert!r}, key={config.key!r})")
    print(
        "  the plugin certificate names: "
        + ", ".join(args.host or ["localhost", "127.0.0.1", "::1"])
    )
    return 0


# -- goplug ls -------------------------------------------------------------------------------------


@dataclass
class _Entry:
    """One row of ``goplug ls``."""

    file: str
    name: str = ""
    namespace: str = ""
    state: str = ""
    methods: list[str] | None = None
    sock: str = ""
    pid: int | None = None
    lazy: bool = False
    launched: bool = False
    uptime: float | None = None
    restarts: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _inspect(path: str, timeout: float, activate_lazy: bool) -> _Entry:
    """Read one announce file and ask the plugin for its methods, without unloading it."""
    entry = _Entry(file=os.path.basename(path))
    allowed = frozenset({os.getuid()})
    try:
        check_owner(path, allowed, "announce file", want_socket=False)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            data = os.read(fd, MAX_PCONF_BYTES + 1)
        finally:
            os.close(fd)
        conf = parse_pconf(data, path)
    except ConfigError as exc:
        entry.state = f"broken: {exc.reason}"
        return entry
    except OSError as exc:
        entry.state = f"broken: cannot read: {exc.strerror or exc}"
        return entry
    entry.name, entry.namespace, entry.sock = conf.name, conf.namespace, conf.sock
    entry.pid, entry.lazy = conf.pid, conf.lazy_load
    record = _launch_record(os.path.dirname(path), conf)
    if record is not None:
        entry.launched = True
        entry.uptime, entry.restarts = max(0.0, time.time() - record.started), record.restarts
        if entry.pid is None:  # a plugin that does not write Pid (GoPlug 0.1.0): the launcher knows
            entry.pid = record.pid
    if conf.remote:
        entry.sock = conf.url
    elif not os.path.lexists(conf.sock):
        entry.state = "stale"
        entry.extra["reason"] = "the socket file is missing"
        return entry
    else:
        try:
            check_owner(conf.sock, allowed, "socket", want_socket=True)
        except ConfigError as exc:
            entry.state = f"broken: {exc.reason}"
            return entry
    entry.state, entry.methods = _probe(conf, timeout, activate=activate_lazy or not conf.lazy_load)
    return entry


def _inspect_conf(key: str, data: bytes, timeout: float, activate_lazy: bool) -> _Entry:
    """Parse one announcement read from etcd and probe its plugin."""
    entry = _Entry(file=key)
    try:
        conf = parse_pconf(data, key)
    except ConfigError as exc:
        entry.state = f"broken: {exc.reason}"
        return entry
    entry.name, entry.namespace, entry.sock = conf.name, conf.namespace, conf.url
    entry.pid, entry.lazy = conf.pid, conf.lazy_load
    entry.state, entry.methods = _probe(conf, timeout, activate=activate_lazy or not conf.lazy_load)
    return entry


def _etcd_announcements(location: str, timeout: float) -> list[tuple[str, bytes]]:
    """Every (key, document) under an etcd location, read once."""
    from goplug.etcd import EtcdDiscovery, parse_etcd_location

    keys: list[str] = []
    tls = _NETWORK.get("etcd_tls") or _NETWORK.get("tls")
    discovery = EtcdDiscovery(
        parse_etcd_location(location),
        lambda changed, removed: keys.extend(changed),
        tls=tls,  # type: ignore[arg-type]
    )
    try:
        discovery.scan()
        found = []
        for key in sorted(keys):
            with contextlib.suppress(ConfigError):
                found.append((key, discovery.read(key)))
        return found
    finally:
        discovery.stop()
        discovery.join(timeout)


@dataclass(frozen=True)
class _LaunchRecord:
    """What ``DIR/.<stem>.launch`` says about a plugin a registry launched."""

    pid: int | None
    started: float
    restarts: int


_MAX_LAUNCH_RECORD = 64 * 1024


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _launch_record(directory: str, conf: PluginConf) -> _LaunchRecord | None:
    """Return the live launch record of the plugin ``conf`` announces, or None.

    A registry that launched a plugin keeps ``.<stem>.launch`` while the plugin runs. The record
    counts only while that registry lives and names this very process: its ``Pid`` equals the
    announced pid (or the plugin announced none).
    """
    path = os.path.join(directory, "." + file_stem(conf.name, conf.namespace) + ".launch")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return None
        data = os.read(fd, _MAX_LAUNCH_RECORD)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        record = json.loads(data)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    registry, pid = record.get("Registry"), record.get("Pid")
    started, restarts = record.get("Started"), record.get("Restarts")
    if (
        record.get("Name") != conf.name
        or record.get("NameSpace", "") != conf.namespace
        or not isinstance(registry, int)
        or not isinstance(restarts, int)
        or not isinstance(started, int | float)
        or not (pid is None or isinstance(pid, int))
        or any(isinstance(v, bool) for v in (registry, restarts, started, pid))
    ):
        return None
    if registry <= 0 or not _pid_alive(registry):
        return None  # the registry is gone (killed): the record is left over
    if conf.pid is not None and pid != conf.pid:
        return None  # another process announces the plugin now
    return _LaunchRecord(pid, float(started), restarts)


def _format_uptime(seconds: float) -> str:
    """``5s``, ``3m12s``, ``2h05m``, ``3d04h``."""
    total = int(seconds)
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


def _probe(conf: PluginConf, timeout: float, activate: bool) -> tuple[str, list[str] | None]:
    """Return (state, methods): `/Activate` the plugin, or only connect if ``activate`` is False."""
    try:
        transport = _transport_for(conf)
    except ConfigError as exc:
        return f"unreachable: {exc.reason}", None
    client = PluginClient(conf, transport, _client_settings(timeout))
    try:
        if not activate:
            client.connect().close()
            return "live", None
        body = client.request(routes.ACTIVATE, b"", timeout)
        methods, _ = routes.parse_activation(body)
        return "live", methods
    except PluginConnectionError:
        return "stale", None
    except GoPlugError as exc:
        return f"error: {_describe(exc)}", None
    finally:
        client.close()  # never /Stop: the plugin is not ours to unload


def _announce_files(directory: str, ext: str) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise CommandError(f"cannot list {directory}: {exc.strerror or exc}") from None
    return sorted(
        os.path.join(directory, n)
        for n in names
        if n.endswith(ext) and len(n) > len(ext) and not n.startswith(".")
    )


def _format_table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip(), file=out)


def cmd_ls(args: argparse.Namespace) -> int:
    """``goplug ls``: list the plugins announced in a directory."""
    directory = _plugin_dir(args.dir)
    _NETWORK.update(_network_options(args))
    with ThreadPoolExecutor(max_workers=8) as pool:
        if _is_etcd(directory):
            found = _etcd_announcements(directory, args.timeout)
            entries = list(
                pool.map(
                    lambda kd: _inspect_conf(kd[0], kd[1], args.timeout, args.activate_lazy),
                    found,
                )
            )
        else:
            paths = _announce_files(directory, args.ext)
            entries = list(pool.map(lambda p: _inspect(p, args.timeout, args.activate_lazy), paths))
    entries.sort(key=lambda e: (e.name == "", e.namespace, e.name, e.file))
    if args.json:
        items = [
            {
                "file": e.file,
                "name": e.name,
                "namespace": e.namespace,
                "state": e.state,
                "methods": e.methods,
                "sock": e.sock,
                "pid": e.pid,
                "launched": e.launched,
                "uptime": None if e.uptime is None else round(e.uptime, 3),
                "restarts": e.restarts,
                "lazy_load": e.lazy,
                **e.extra,
            }
            for e in entries
        ]
        json.dump(items, sys.stdout, indent=2)
        print()
        return 0
    if not entries:
        print(f"no plugin announce files (*{args.ext}) in {directory}", file=sys.stderr)
        return 0
    rows = [["NAMESPACE", "NAME", "STATE", "PID", "UPTIME", "RESTARTS", "METHODS", "SOCKET"]]
    for e in entries:
        if e.methods is not None:
            methods = ",".join(e.methods) or "(none)"
        elif e.lazy and e.state == "live":
            methods = "(lazy)"
        else:
            methods = "-"
        name = e.name or f"({e.file})"
        pid = "-" if e.pid is None else str(e.pid)
        uptime = "-" if e.uptime is None else _format_uptime(e.uptime)
        restarts = "-" if e.restarts is None else str(e.restarts)
        row = [e.namespace or "-", name, e.state, pid, uptime, restarts, methods, e.sock or "-"]
        rows.append(row)
    _format_table(rows, sys.stdout)
    return 0


# -- goplug call / ping ----------------------------------------------------------------------------


def _load(
    directory: str, target: str, timeout: float | None
) -> tuple[PluginRegistry, PluginHandle]:
    """Open a registry without auto discovery and load one plugin (close it, never unload)."""
    name, namespace = _split_identity(target)
    settings = RegistrySettings(client=_client_settings(timeout))
    registry = PluginRegistry(
        directory,
        auto_discover=False,
        settings=settings,
        **_NETWORK,  # type: ignore[arg-type]
    )
    try:
        return registry, registry.load_plugin(name, namespace)
    except BaseException:
        registry.close()
        raise


def _read_input(args: argparse.Namespace) -> bytes:
    if args.data is None:
        return b""
    if args.data == "-":
        return sys.stdin.buffer.read()
    data: str = args.data
    return data.encode("utf-8", errors="surrogateescape")


def cmd_call(args: argparse.Namespace) -> int:
    """``goplug call``: call one method and write its raw output to stdout."""
    directory = _plugin_dir(args.dir)
    _NETWORK.update(_network_options(args))
    data = _read_input(args)
    registry, handle = _load(directory, args.plugin, args.timeout)
    try:
        try:
            result = handle.execute(args.method, data, timeout=args.timeout)
        except MethodNotFound as exc:
            known = ", ".join(handle.methods) or "none"
            raise CommandError(f"{handle.label}: {_describe(exc)} (methods: {known})") from None
        except RemoteError as exc:
            if args.verbose and exc.remote_traceback:
                print(exc.remote_traceback.rstrip(), file=sys.stderr)
            raise CommandError(f"{handle.label}.{args.method}: {_describe(exc)}") from None
    finally:
        registry.close()
    out = sys.stdout.buffer
    out.write(result)
    if sys.stdout.isatty() and result and not result.endswith(b"\n"):
        out.write(b"\n")
    out.flush()
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    """``goplug ping``: measure the round-trip time to a plugin."""
    directory = _plugin_dir(args.dir)
    _NETWORK.update(_network_options(args))
    registry, handle = _load(directory, args.plugin, args.timeout)
    times: list[float] = []
    try:
        for _ in range(args.count):
            rtt = handle.ping(timeout=args.timeout)
            times.append(rtt)
            print(f"{handle.label}: reply in {rtt * 1000:.3f} ms", flush=True)
    finally:
        registry.close()
    if len(times) > 1:
        ms = [t * 1000 for t in times]
        print(
            f"{len(ms)} pings: min {min(ms):.3f} ms, avg {sum(ms) / len(ms):.3f} ms, "
            f"max {max(ms):.3f} ms"
        )
    return 0


# -- goplug watch ----------------------------------------------------------------------------------


class _Watcher:
    """Prints one line per registry event; shows plugins already present when it starts."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._loaded_seen: set[tuple[str, str]] = set()

    def line(self, kind: str, handle: PluginHandle, detail: str = "") -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        text = f"{stamp}  {kind:<10}  {handle.label}"
        if detail:
            text += f"  {detail}"
        with self._lock:
            print(text, file=self._out, flush=True)

    def on_event(self, event: PluginEvent) -> None:
        handle = event.handle
        if event.kind == "loaded":
            with self._lock:
                self._loaded_seen.add((handle.namespace, handle.name))
            methods = ",".join(handle.methods) or "(none)"
            self.line("loaded", handle, f"methods={methods}")
        elif event.kind == "discovered":
            conf = handle.conf
            detail = ""
            if conf is not None:
                detail = f"sock={conf.sock}" + (f" pid={conf.pid}" if conf.pid else "")
                if conf.lazy_load:
                    detail += " lazy"
            self.line("discovered", handle, detail)
        elif event.kind == "lost":
            self.line("lost", handle, event.reason)
        else:
            self.line(event.kind, handle, event.reason)

    def show_present(self, registry: PluginRegistry) -> None:
        """Print plugins the registry found before the listener was added."""
        for handle in registry.discovered():
            self.on_event(PluginEvent("discovered", handle.name, handle.namespace, handle))
            with self._lock:
                seen = (handle.namespace, handle.name) in self._loaded_seen
            if registry.is_loaded(handle.name, handle.namespace) and not seen:
                self.on_event(PluginEvent("loaded", handle.name, handle.namespace, handle))


def cmd_watch(args: argparse.Namespace) -> int:
    """``goplug watch``: print plugins coming and going until Ctrl-C."""
    directory = _plugin_dir(args.dir)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    watcher = _Watcher(sys.stdout)
    registry = PluginRegistry(
        directory,
        auto_discover=True,
        conf_ext=args.ext,
        **_network_options(args),  # type: ignore[arg-type]
    )
    try:
        registry.add_listener(watcher.on_event)
        watcher.show_present(registry)
        print(f"watching {directory} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        while not stop.wait(3600):
            pass
    finally:
        registry.close()  # never unload: the plugins keep running
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


# -- goplug serve ----------------------------------------------------------------------------------


def _import_file(path: str) -> ModuleType:
    if not os.path.isfile(path):
        raise CommandError(f"no such file: {path}")
    full = os.path.abspath(path)
    stem = os.path.splitext(os.path.basename(full))[0]
    module_name = stem if stem.isidentifier() else "goplug_served_plugin"
    spec = importlib.util.spec_from_file_location(module_name, full)
    if spec is None or spec.loader is None:
        raise CommandError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(full))
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except CommandError:
        raise
    except (Exception, SystemExit) as exc:
        raise CommandError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(name: str) -> ModuleType:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise CommandError(f"no module named {name!r}") from None
        raise CommandError(f"importing {name} failed: {exc}") from exc
    except (Exception, SystemExit) as exc:
        raise CommandError(f"importing {name} failed: {type(exc).__name__}: {exc}") from exc


def _plugins_in(value: object) -> list[Plugin]:
    if isinstance(value, Plugin):
        return [value]
    if isinstance(value, list | tuple):
        found = [v for v in value if isinstance(v, Plugin)]
        if len(found) == len(value):
            return found
    return []


def _find_plugins(target: str) -> list[Plugin]:
    """Import ``FILE.py`` or ``MODULE[:ATTR]`` and return the plugins it names or defines."""
    if target.endswith(".py") or os.sep in target or os.path.isfile(target):
        module, attr = _import_file(target), ""
    else:
        module_name, _, attr = target.partition(":")
        if not module_name:
            raise CommandError(f"invalid target {target!r}: expected FILE.py or MODULE[:ATTR]", 2)
        module = _import_module(module_name)
    if attr:
        value: object = module
        for part in attr.split("."):
            try:
                value = getattr(value, part)
            except AttributeError:
                raise CommandError(f"{module.__name__} has no attribute {attr!r}") from None
        plugins = _plugins_in(value)
        if not plugins:
            kind = type(value).__name__
            raise CommandError(f"{target} is a {kind}, not a goplug.Plugin (or a list of them)")
        return plugins
    plugins = []
    for value in vars(module).values():
        if isinstance(value, Plugin) and all(value is not p for p in plugins):
            plugins.append(value)
    if not plugins:
        raise CommandError(f"{target} defines no goplug.Plugin at module level")
    return plugins


class _Interrupted(Exception):
    pass


def cmd_serve(args: argparse.Namespace) -> int:
    """``goplug serve``: serve the plugins a file or module defines until SIGINT or SIGTERM."""
    _configure_logging(
        logging.DEBUG if args.verbose else logging.INFO,
        "%(asctime)s.%(msecs)03d %(name)s: %(message)s",
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted

    # Until goplug.serve takes over the signals, one ends the start-up cleanly.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    plugins: list[Plugin] = []
    try:
        plugins = _find_plugins(args.target)
        for plugin in plugins:
            if not plugin.running:
                try:
                    plugin.start()
                except GoPlugError as exc:
                    if "already started" not in str(exc):
                        raise
                    raise CommandError(
                        f"{exc}: {args.target} must not start its plugins when imported; "
                        'guard serve_forever() with  if __name__ == "__main__":'
                    ) from None
            print(
                f"{PROG}: serving {plugin.label} on {plugin.sock_path} "
                f"(announced in {plugin.pconf_path})",
                file=sys.stderr,
                flush=True,
            )
        serve(*plugins)
    except _Interrupted:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for plugin in plugins:
            with contextlib.suppress(GoPlugError, OSError):
                plugin.stop()
    return 0


# -- goplug run -----------------------------------------------------------------------------------

_MODULE_ATTR = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def _run_target(argv: list[str]) -> list[str] | str:
    """A lone ``FILE.py`` or ``MODULE:ATTR`` is served by ``goplug serve``; else run ``argv``."""
    if len(argv) == 1 and (argv[0].endswith(".py") or _MODULE_ATTR.fullmatch(argv[0])):
        return argv[0]
    return list(argv)


class _RunPrinter:
    """Prints the events of the launched plugin, one line each, and notes a "failed" one."""

    def __init__(self, out: TextIO, wake: threading.Event) -> None:
        self._out = out
        self._wake = wake
        self._lock = threading.Lock()
        self.failed = threading.Event()
        self.failure = ""

    def line(self, kind: str, label: str, proc: PluginProcess, detail: str = "") -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        text = f"{stamp}  {kind:<10}  {label}  pid={proc.pid or '-'} restarts={proc.restarts}"
        if detail:
            text += f"  {detail}"
        with self._lock:
            print(text, file=self._out, flush=True)

    def on_event(self, event: PluginEvent) -> None:
        handle = event.handle
        proc = handle.process
        if proc is None:
            return  # another plugin announced in the directory (goplug watch shows those)
        detail = event.reason
        if event.kind == "loaded":
            detail = "methods=" + (",".join(handle.methods) or "(none)")
        self.line(event.kind, handle.label, proc, detail)
        if event.kind == "failed":
            self.failure = event.reason
            self.failed.set()
            self._wake.set()


def _launch(
    registry: PluginRegistry, args: argparse.Namespace, wake: threading.Event
) -> tuple[threading.Thread, list[PluginHandle], list[BaseException]]:
    """Launch the command on a thread of its own (a signal must not wait for its start)."""
    handles: list[PluginHandle] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            handles.append(
                registry.launch(
                    _run_target(args.command),
                    name=args.name,
                    namespace=args.namespace,
                    restart=args.restart,
                    max_restarts=args.max_restarts,
                    start_timeout=args.start_timeout,
                )
            )
        except BaseException as exc:
            errors.append(exc)
        finally:
            wake.set()

    thread = threading.Thread(target=run, name="goplug-run-launch", daemon=True)
    thread.start()
    return thread, handles, errors


def _supervise(
    proc: PluginProcess,
    label: str,
    printer: _RunPrinter,
    wake: threading.Event,
    signalled: list[int],
) -> int:
    """Wait until a signal (0) or until the plugin ended for good (its status, or raise)."""
    while not signalled:
        if printer.failed.is_set():
            raise CommandError(f"{label} failed: {printer.failure}")
        state = proc.state
        if state == "failed":
            # The "failed" event follows the state change (none comes if no restart could
            # even be started): give it a moment to be printed.
            printer.failed.wait(2.0)
            raise CommandError(f"{label} failed: {printer.failure or proc.reason}")
        if state == "stopped":  # the restart policy says no more (no event tells of it)
            detail = f"{proc.reason}; restart policy {proc.restart_policy}: not restarted"
            printer.line("stopped", label, proc, detail)
            if proc.exit_code == 0:
                return 0
            raise CommandError(f"{label}: {detail}")
        # Polled: the end of a plugin that is not restarted is told by no event.
        wake.wait(0.1)
        wake.clear()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``goplug run``: launch a plugin, print its events and output until a signal or its end."""
    directory = os.path.abspath(args.dir)
    if args.namespace and args.name is None:
        raise CommandError("--namespace needs --name", 2)
    _configure_logging(
        logging.INFO if args.verbose else logging.WARNING,
        "%(asctime)s.%(msecs)03d %(name)s: %(message)s",
    )
    # Everything the plugin writes: stdout lines at INFO, stderr lines at WARNING.
    logging.getLogger("goplug.plugin").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    wake = threading.Event()
    signalled: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signalled.append(signum)
        wake.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    printer = _RunPrinter(sys.stdout, wake)
    settings = RegistrySettings(launch=LaunchSettings(stop_grace=args.stop_grace))
    thread: threading.Thread | None = None
    try:
        try:
            registry = PluginRegistry(directory, auto_discover=True, settings=settings)
        except OSError as exc:
            raise CommandError(f"cannot use {args.dir}: {exc.strerror or exc}") from None
        try:
            registry.add_listener(printer.on_event)
            thread, handles, errors = _launch(registry, args, wake)
            while not (handles or errors or signalled):
                wake.wait(0.5)
                wake.clear()
            if signalled:
                return 0  # closing the registry below ends a start in progress
            thread.join()
            if errors:
                if isinstance(errors[0], PluginStartError):
                    raise CommandError(str(errors[0])) from None
                raise errors[0]
            handle = handles[0]
            proc = handle.process
            assert proc is not None
            return _supervise(proc, handle.label, printer, wake, signalled)
        finally:
            registry.close()  # stops the plugin: SIGTERM, then SIGKILL after --stop-grace
            if thread is not None:
                thread.join(args.stop_grace + 5.0)  # a start the close interrupted cleans up
            if signalled:
                name = signal.Signals(signalled[0]).name
                print(f"{PROG}: {name} received: plugin stopped", file=sys.stderr, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- goplug conformance ---------------------------------------------------------------------------


def cmd_conformance(args: argparse.Namespace) -> int:
    """``goplug conformance``: run the conformance suite against a plugin, print the results."""
    from goplug import conformance

    targets: list[str] = list(args.target)
    if not targets:
        raise CommandError("expected DIR NAME[@NAMESPACE], or -- COMMAND [ARGS...]", 2)
    command: list[str] | None = targets
    directory: str | None = None
    name: str | None = None
    namespace = ""
    if os.path.isdir(targets[0]):  # a directory is no command: attach to a running plugin
        if len(targets) != 2:
            raise CommandError("to attach, give DIR NAME[@NAMESPACE]", 2)
        command, directory = None, targets[0]
        name, namespace = _split_identity(targets[1])

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # the suite's own cleanup stops the plugin, removes its dir

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        report = conformance.run(
            command,
            directory=directory,
            name=name,
            namespace=namespace,
            echo=args.echo,
            notify=args.notify,
            fail=args.fail,
            sleep=args.sleep,
            sleep_unit=args.sleep_unit,
            rules=args.rule or None,
            rule_timeout=args.timeout,
            start_timeout=args.start_timeout,
        )
    except ConfigError as exc:
        raise CommandError(str(exc), 2) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.json:
        print(report.to_json())
    else:
        how = "launched by the suite" if report.launched else "attached"
        print(f"conformance of {report.plugin} ({how}), checked at level {args.level}\n")
        print(report.format_table())
    return 0 if report.passed(args.level) else 1


# -- goplug new ------------------------------------------------------------------------------------


def cmd_new(args: argparse.Namespace) -> int:
    """``goplug new``: write a plugin project (see :mod:`goplug.scaffold`)."""
    from goplug.scaffold import create_project

    try:
        target = create_project(args.name, args.lang, args.namespace, args.dir or "")
    except ConfigError as exc:
        raise CommandError(str(exc), 2) from None
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    print(f"created {target}: {', '.join(files)}")
    first = {
        "python": "pytest",
        "js": "npm install && npm test",
        "go": "go test ./...",
    }[args.lang]
    print(f"next: cd {target} && {first}   (see its README.md)")
    return 0


# -- goplug demo -----------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """``goplug demo``: run the guided tour (see :mod:`goplug.demo`)."""
    from goplug.demo import main as demo_main

    return demo_main()


# -- the parser ------------------------------------------------------------------------------------

_DESCRIPTION = """\
Look at, call, watch, serve and run goplug plugins. A plugin is a process that
serves HTTP/1.1 on a Unix socket and announces itself with a .pconf file in a
plugin directory. Only run stops a plugin (the one it launched); everything else
disconnects and the plugin keeps running.
"""

_EPILOG = """\
examples:
  goplug ls ./plugins
  goplug call ./plugins Do@Test Do "hello"
  echo -n hello | goplug call ./plugins Echo@Node Upper -
  goplug ping ./plugins Do@Test --count 5
  goplug watch ./plugins
  GOPLUG_DIR=./plugins goplug serve examples/python/do_plugin.py
  goplug run ./plugins -- examples/python/do_plugin.py
  goplug run ./plugins --name Worker -- ./worker --verbose
  goplug conformance -- node examples/node/plugin.js
  goplug demo

exit status: 0 on success, 1 on a failure, 2 on a usage error.
"""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``goplug`` command."""
    common = _Parser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log what goplug does (and show remote tracebacks)",
    )
    parser = _Parser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    from goplug import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help_text: str, description: str, epilog: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )

    p = add(
        "ls",
        "list the plugins announced in a directory",
        "List every plugin announced in DIR: its namespace, name, state, pid, methods and\n"
        "socket. STATE is 'live' (it answered), 'stale' (its file is there but nobody listens)\n"
        "or 'broken: <reason>' (the .pconf file is refused). UPTIME and RESTARTS are shown for\n"
        "plugins a running registry launched (goplug run, PluginRegistry.launch). Methods are\n"
        "read with /Activate; the plugin is never sent /Stop. Lazy plugins are only probed\n"
        "unless --activate-lazy.",
        "examples:\n  goplug ls\n  goplug ls ./plugins --json",
    )
    p.add_argument(
        "dir", nargs="?", default=".", metavar="DIR", help="plugin directory (.), or etcd://..."
    )
    p.add_argument("--ext", default=".pconf", help="announce file extension (.pconf)")
    p.add_argument("--timeout", type=_positive_float, default=2.0, help="seconds per plugin (2)")
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    p.add_argument(
        "--activate-lazy",
        action="store_true",
        help="also send /Activate to lazy plugins to list their methods",
    )
    _add_network(p)
    p.set_defaults(func=cmd_ls)

    p = add(
        "tls",
        "make development certificates for plugins on TCP",
        "'goplug tls init CERTDIR' makes a development CA (ca.pem, ca.key) and two\n"
        "certificates signed by it: plugin.pem/plugin.key, naming every --host (default\n"
        "localhost, 127.0.0.1 and ::1), and registry.pem/registry.key. Existing files are never\n"
        "overwritten. Keep ca.key away from production: anyone holding it can join.",
        "examples:\n  goplug tls init ./certs\n"
        "  goplug tls init ./certs --host 10.0.0.5 --host plugins.lan",
    )
    p.add_argument("action", choices=["init"], help="what to do (init)")
    p.add_argument("certdir", metavar="CERTDIR", help="where to write the files")
    p.add_argument(
        "--host", action="append", metavar="NAME", help="a name or address plugins announce"
    )
    p.set_defaults(func=cmd_tls_init)

    p = add(
        "call",
        "call a method and write its output",
        "Load NAME[@NAMESPACE] from DIR, call METHOD with DATA and write the raw output bytes\n"
        "to stdout. DATA is UTF-8 text; '-' reads the input bytes from stdin; without DATA\n"
        "the input is empty. The plugin stays running (it is not sent /Stop).",
        "examples:\n"
        "  goplug call ./plugins Do@Test Do hello\n"
        "  goplug call ./plugins Echo@Node Reverse - < input.bin > output.bin\n"
        "  goplug call ./plugins Worker Crunch '{\"n\": 3}' --timeout 120",
    )
    p.add_argument("dir", metavar="DIR", help="plugin directory, or etcd://HOST:PORT/PREFIX")
    p.add_argument("plugin", metavar="NAME[@NAMESPACE]", help="the plugin")
    p.add_argument("method", metavar="METHOD", help="the method to call")
    p.add_argument("data", nargs="?", metavar="DATA", help="input text, or - for stdin")
    p.add_argument(
        "--timeout", type=_positive_float, default=None, help="seconds to wait per step (30)"
    )
    _add_network(p)
    p.set_defaults(func=cmd_call)

    p = add(
        "ping",
        "measure a plugin's round-trip time",
        "Load NAME[@NAMESPACE] from DIR and ping it (/Ping); print each round-trip time.",
        "examples:\n  goplug ping ./plugins Do@Test\n  goplug ping ./plugins Echo@Node -c 10",
    )
    p.add_argument("dir", metavar="DIR", help="plugin directory, or etcd://HOST:PORT/PREFIX")
    p.add_argument("plugin", metavar="NAME[@NAMESPACE]", help="the plugin")
    p.add_argument("-c", "--count", type=_positive_int, default=1, help="number of pings (1)")
    p.add_argument("--timeout", type=_positive_float, default=2.0, help="seconds per ping (2)")
    _add_network(p)
    p.set_defaults(func=cmd_ping)

    p = add(
        "watch",
        "print plugins coming and going",
        "Watch DIR and print a timestamped line for every plugin discovered, loaded, lost\n"
        "or unloaded, until Ctrl-C. Plugins that are not lazy are loaded (/Activate) to list\n"
        "their methods; on exit the command disconnects without unloading them.",
        "examples:\n  goplug watch ./plugins",
    )
    p.add_argument("dir", metavar="DIR", help="plugin directory, or etcd://HOST:PORT/PREFIX")
    p.add_argument("--ext", default=".pconf", help="announce file extension (.pconf)")
    _add_network(p)
    p.set_defaults(func=cmd_watch)

    p = add(
        "serve",
        "serve the plugins a Python file defines",
        "Import FILE.py (or MODULE[:ATTR]) and serve its goplug.Plugin objects until SIGINT or\n"
        "SIGTERM; then each plugin removes its .pconf and socket. MODULE:ATTR names one plugin\n"
        "(or a list of them); a file or a bare MODULE serves every Plugin defined at module\n"
        "level. The file is imported, not run as __main__, so it must not start its plugins\n"
        'on import: guard plugin.serve_forever() with  if __name__ == "__main__":',
        "examples:\n"
        "  GOPLUG_DIR=./plugins goplug serve examples/python/do_plugin.py\n"
        "  goplug serve myapp.plugins:translator",
    )
    p.add_argument("target", metavar="FILE.py|MODULE[:ATTR]", help="where the plugins are")
    p.set_defaults(func=cmd_serve)

    p = add(
        "run",
        "launch a plugin and keep it running",
        "Launch COMMAND as a plugin announcing itself in DIR (it gets GOPLUG_DIR and\n"
        "GOPLUG_LAUNCH_TOKEN), wait until it is loaded and supervise it in the foreground:\n"
        "restart it when it ends (--restart), print every event of it (loaded, lost, failed,\n"
        "with its pid and restart count) on stdout and every line it writes on stderr, with\n"
        "a timestamp and its logger name (goplug.plugin.[NAMESPACE.]NAME). A lone FILE.py or\n"
        "MODULE:ATTR is served with goplug serve. SIGINT or SIGTERM stops the plugin (SIGTERM,\n"
        "SIGKILL after --stop-grace) and exits 0. Exit status 1 when it cannot start, when\n"
        "it is given up (failed) or when it ends unsuccessfully and is not restarted; a\n"
        "successful end that is not restarted exits 0.",
        "examples:\n"
        "  goplug run ./plugins -- examples/python/do_plugin.py\n"
        "  goplug run ./plugins -- myapp.plugins:translator\n"
        "  goplug run ./plugins --name Worker --namespace Jobs -- ./worker --threads 4\n"
        "  goplug run ./plugins --restart always --max-restarts 10 -- node plugin.js",
    )
    p.usage = (
        "%(prog)s [-h] [-v] [--name NAME] [--namespace NS] [--restart POLICY]\n"
        "       [--max-restarts N] [--start-timeout S] [--stop-grace S] DIR -- COMMAND [ARGS...]"
    )
    p.add_argument("dir", metavar="DIR", help="plugin directory (created if missing)")
    p.add_argument("--name", help="the name the plugin must announce (default: any)")
    p.add_argument(
        "--namespace",
        default="",
        metavar="NS",
        help="the namespace it must announce (with --name)",
    )
    p.add_argument(
        "--restart",
        choices=["never", "on-failure", "always"],
        default="on-failure",
        metavar="POLICY",
        help="when to restart it after it ends: never, on-failure (default) or always",
    )
    p.add_argument(
        "--max-restarts",
        type=_non_negative_int,
        default=5,
        metavar="N",
        help="restarts allowed within 60 s before it is given up (5)",
    )
    p.add_argument(
        "--start-timeout",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="seconds a start may take, until the plugin is loaded (10)",
    )
    p.add_argument(
        "--stop-grace",
        type=_positive_float,
        default=LaunchSettings.stop_grace,
        metavar="S",
        help="seconds between SIGTERM and SIGKILL when stopping it (3)",
    )
    p.add_argument(
        "command",
        nargs="+",
        metavar="COMMAND [ARGS...]",
        help="after --: the command and its arguments, or one FILE.py or MODULE:ATTR",
    )
    p.set_defaults(func=cmd_run)

    p = add(
        "new",
        "write a ready plugin project",
        "Write a plugin project for NAME into DIR (default ./NAME): the plugin (methods Hello,\n"
        "Echo, Upper, Fail, Notify), a test that runs the conformance suite on it, and a README.\n"
        "The project passes its own test as generated. JavaScript and Go projects point at the\n"
        "libraries in this checkout's sdk/ directory.",
        "examples:\n"
        "  goplug new Greeter --lang python\n"
        "  goplug new Greeter --lang js --namespace Tools ./greeter-js\n"
        "  goplug new Greeter --lang go",
    )
    p.add_argument("name", metavar="NAME", help="the plugin's name (an identifier)")
    p.add_argument("dir", metavar="DIR", nargs="?", help="where to write it (default ./NAME)")
    p.add_argument("--lang", choices=["python", "js", "go"], required=True, help="its language")
    p.add_argument("--namespace", default="", metavar="NS", help="its namespace (default none)")
    p.set_defaults(func=cmd_new)

    p = add(
        "conformance",
        "check a plugin against the wire protocol",
        "Run the conformance suite (docs/CONFORMANCE.md) against a plugin and print one line\n"
        "per rule: its id, level, result (pass, fail or skip), time and reason.\n"
        "With -- COMMAND [ARGS...] the plugin is launched with GOPLUG_DIR set to a private\n"
        "temporary directory and a GOPLUG_LAUNCH_TOKEN ({dir} in an argument is replaced by\n"
        "that directory), and stopped at the end. With DIR NAME[@NAMESPACE] the suite attaches\n"
        "to a plugin already running (rules that need to launch it are skipped). Rules that\n"
        "need a method of the plugin use --echo, --notify, --fail and --sleep, or the usual\n"
        "names in its /Activate list; without one they are skipped. Skips never fail a level.\n"
        "Exit status 0 when no rule of --level or below fails, 1 otherwise, 2 on a usage error.",
        "examples:\n"
        "  goplug conformance -- node examples/node/plugin.js\n"
        "  goplug conformance --level goplug-0.1 --echo main.Echo --notify main.Notify \\\n"
        "      -- ./my-go-plugin {dir}\n"
        "  goplug conformance --sleep Sleep --sleep-unit ms -- ./c_plugin\n"
        "  goplug conformance ./plugins Do@Test --json",
    )
    p.usage = (
        "%(prog)s [-h] [-v] [--level LEVEL] [--json] [--echo M] [--notify M] [--fail M]\n"
        "       [--sleep M] [--sleep-unit s|ms] [--rule ID] [--timeout S] [--start-timeout S]\n"
        "       (-- COMMAND [ARGS...] | DIR NAME[@NAMESPACE])"
    )
    p.add_argument(
        "--level",
        choices=["goplug-0.1", "goplug"],
        default="goplug",
        help="fail (exit 1) if a rule of this level or below fails (goplug)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--echo", metavar="M", help="a method returning its input (Echo, main.Echo)")
    p.add_argument(
        "--notify",
        metavar="M",
        help="a method whose body NAME\\nDATA notifies NAME with DATA (Notify, main.Notify)",
    )
    p.add_argument("--fail", metavar="M", help="a method that fails (Fail, main.Fail, main.Panic)")
    p.add_argument("--sleep", metavar="M", help="a method that sleeps as its body says (Sleep)")
    p.add_argument(
        "--sleep-unit",
        choices=["s", "ms"],
        default="s",
        help="the sleep method's body is seconds (s, default) or milliseconds (ms)",
    )
    p.add_argument("--rule", action="append", metavar="ID", help="run only this rule (repeatable)")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="seconds each rule may take (10; the 16 MiB echo gets 3x)",
    )
    p.add_argument(
        "--start-timeout",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="seconds a launched plugin may take to announce itself (10)",
    )
    p.add_argument(
        "target",
        nargs="*",
        metavar="COMMAND | DIR NAME",
        help="after --: the command and its arguments; or DIR NAME[@NAMESPACE] to attach",
    )
    p.set_defaults(func=cmd_conformance)

    p = add(
        "demo",
        "run the guided tour",
        "Launch the example plugins (Python, and Node.js if node is installed) as separate\n"
        "processes in a temporary directory, then call, ping and subscribe to them, kill one\n"
        "and watch the registry restart it, and stop them all, printing each step with its\n"
        "timing. Runs from a source checkout.",
        "examples:\n  goplug demo",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``goplug`` command with ``argv`` (default: the process's arguments)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse does not take a positional after an option (goplug new NAME --lang go DIR).
        late_dir = getattr(args, "command", "") == "new" and args.dir is None
        if late_dir and len(extra) == 1 and not extra[0].startswith("-"):
            args.dir = extra[0]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not hasattr(args, "verbose"):
        args.verbose = False
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command not in ("serve", "run"):
        _configure_logging(logging.INFO if args.verbose else logging.ERROR)
        if args.command == "watch" and not args.verbose:
            # Show why a plugin is skipped or cannot be loaded, next to the events.
            _configure_logging(logging.WARNING, "%(asctime)s.%(msecs)03d  warning     %(message)s")
    try:
        status: int = args.func(args)
        return status
    except CommandError as exc:
        if exc.status == 2:
            parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.status
    except GoPlugError as exc:
        print(f"{PROG}: error: {_describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (goplug ls | head): not an error worth a traceback.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
