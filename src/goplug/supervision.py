"""The registry's side of launched plugins: starting them, knowing them, restarting, stopping.

:class:`LaunchingRegistry` holds the part of :class:`~goplug.PluginRegistry` that deals with
plugins the registry starts itself (``registry.launch``); the registry inherits it. The process
mechanics are in :mod:`goplug.process`, the launcher thread and the restart policy in
:mod:`goplug.launcher`, the handshake in docs/PROTOCOL.md §9.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from goplug.client import PluginClient
from goplug.errors import (
    ConfigError,
    GoPlugError,
    PluginAlreadyLoaded,
    PluginStartError,
    RegistryClosed,
)
from goplug.launcher import (
    RESTART_POLICIES,
    Launcher,
    PluginProcess,
    RestartPolicy,
    describe_exit,
)
from goplug.process import Child
from goplug.wire import routes
from goplug.wire.pconf import (
    ENV_DIR,
    ENV_LAUNCH_TOKEN,
    ENV_NAME,
    ENV_NAMESPACE,
    PluginConf,
    check_name,
    file_stem,
    write_atomically,
)

if TYPE_CHECKING:
    from goplug.discovery import Discovery
    from goplug.registry import EventKind, PluginEvent, PluginHandle, RegistrySettings

__all__ = ["LaunchingRegistry"]

log = logging.getLogger("goplug.registry")


class LaunchingRegistry:
    """Launching and supervising plugin processes: the part of a registry that starts them."""

    if TYPE_CHECKING:  # what it uses of the registry that inherits it
        location: str
        _etcd: bool
        auto_discover: bool
        settings: RegistrySettings
        _lock: threading.RLock
        _closed: bool
        _handles: dict[tuple[str, str], PluginHandle]
        _listeners: list[Callable[[PluginEvent], object]]
        _launches: dict[tuple[str, str], PluginProcess]
        _unnamed: list[PluginProcess]
        _launcher: Launcher | None
        _discovery: Discovery

        def is_loaded(self, name: str, namespace: str = "") -> bool:  # noqa: D102
            ...
        def close(self) -> None:  # noqa: D102
            ...

        def _check_open(self) -> None: ...
        def _read_conf(self, path: str) -> PluginConf: ...
        def _lose(self, handle: PluginHandle, reason: str) -> None: ...
        def _emit(
            self,
            kind: EventKind,
            handle: PluginHandle,
            listeners: list[Callable[[PluginEvent], object]],
            reason: str = "",
        ) -> None: ...

    def launch(
        self,
        command: Sequence[str] | str,
        *,
        name: str | None = None,
        namespace: str = "",
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        restart: RestartPolicy = "on-failure",
        max_restarts: int = 5,
        start_timeout: float = 10.0,
    ) -> PluginHandle:
        """Start a plugin process, wait until it announces itself, load it; return its handle.

        ``command`` is an argument list (any executable, any language), or a string naming a
        Python file or ``module:attr`` to run through ``goplug serve``. The process learns where
        to announce itself from the environment (``GOPLUG_DIR``, ``GOPLUG_LAUNCH_TOKEN``, see
        docs/PROTOCOL.md); ``env`` adds variables. It is recognised by the launch token it
        echoes in its `.pconf`, or, for plugins that know nothing of goplug (give ``name``),
        by its socket being served by the launched process or a descendant. With ``name`` the
        plugin must announce exactly that name and namespace.

        The registry keeps it alive: ``restart`` is ``never``, ``on-failure`` (default) or
        ``always``, with exponential backoff and at most ``max_restarts`` restarts within the
        restart window (``settings.launch``); after that a "failed" event is sent. Unloading the
        handle or closing the registry stops the process. Raises PluginStartError (carrying the
        exit code and the last stderr lines) when it exits or stays silent for
        ``start_timeout`` seconds, ConfigError for bad arguments.
        """
        self._check_open()
        if self._etcd:
            raise ConfigError(
                "launch() starts plugins on this host and watches them in a directory: use a "
                "directory registry for launched plugins (plugins in etcd run on their own hosts)"
            )
        argv = _command_line(command)
        if restart not in RESTART_POLICIES:
            raise ConfigError(f"restart must be one of {sorted(RESTART_POLICIES)}, not {restart!r}")
        if max_restarts < 0 or start_timeout <= 0:
            raise ConfigError("max_restarts must be >= 0 and start_timeout > 0")
        if name is not None:
            check_name(name, "name")
            check_name(namespace, "namespace")
        proc = PluginProcess(
            argv,
            dict(env or {}),
            os.fspath(cwd) if cwd is not None else None,
            name,
            namespace,
            restart,
            max_restarts,
            start_timeout,
        )
        with self._lock:
            self._check_open()
            if name is not None:
                identity = (namespace, name)
                other = self._launches.get(identity)
                if other is not None and other.state not in ("stopped", "failed"):
                    raise PluginAlreadyLoaded(f"plugin {proc.label} was launched already")
                if self.is_loaded(name, namespace):
                    raise PluginAlreadyLoaded(f"plugin {proc.label} is already loaded")
                self._launches[identity] = proc
            else:
                self._unnamed.append(proc)
            if self._launcher is None:
                self._launcher = Launcher(self._on_process_exit)
                _LAUNCHING.add(self)
            launcher = self._launcher
        child = None
        try:
            child = self._spawn(launcher, proc)
            return self._await_start(proc, child)
        except BaseException:
            with self._lock:
                with proc.cond:
                    proc.state = "stopping"  # this exit is no crash to restart after
                identity = (proc.namespace, proc.name or "")
                if self._launches.get(identity) is proc:
                    del self._launches[identity]
                with contextlib.suppress(ValueError):
                    self._unnamed.remove(proc)
            if child is not None:
                child.stop(self.settings.launch.stop_grace)
                self._remove_leftovers(proc, child)
            with proc.cond:
                proc.state = "failed"
            raise

    def _refuse_launched(self, conf: PluginConf, reason: str) -> None:
        """A process this registry is starting announced itself unusably: its launch fails now."""
        if not conf.launch:
            return
        with self._lock:
            procs = [*self._launches.values(), *self._unnamed]
        for proc in procs:
            if proc.token == conf.launch and proc.state in ("starting", "restarting"):
                with proc.cond:
                    proc.refusal = reason
                    proc.cond.notify_all()

    def _spawn(self, launcher: Launcher, proc: PluginProcess) -> Child:
        token = proc.new_token()
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")  # its log lines arrive as they are written
        env.update(proc.env)
        env[ENV_DIR] = self.location
        env[ENV_LAUNCH_TOKEN] = token
        if proc.name is not None:
            env[ENV_NAME] = proc.name
            env[ENV_NAMESPACE] = proc.namespace
        try:
            return launcher.spawn(proc, env, token)
        except OSError as exc:
            raise PluginStartError(f"cannot start {proc.label}: {exc}", None) from None

    def _await_start(self, proc: PluginProcess, child: Child) -> PluginHandle:
        """Wait until ``child`` is loaded; raise PluginStartError if it exits or times out."""
        deadline = time.monotonic() + proc.start_timeout
        with proc.cond:
            while True:
                handle = self._handles.get((proc.namespace, proc.name or ""))
                if proc.loaded_child is child and handle is not None:
                    return handle
                if proc.refusal:
                    raise PluginStartError(
                        f"{proc.label}: {proc.refusal}", child.exit_code, list(child.stderr_tail)
                    )
                if child.has_exited():
                    code = child.reap()
                    raise PluginStartError(
                        f"{proc.label} (pid {child.pid}) ended ({describe_exit(code)}) "
                        "before it announced itself",
                        code,
                        list(child.stderr_tail),
                    )
                if self._closed:
                    raise RegistryClosed("the registry was closed while a plugin was starting")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PluginStartError(
                        f"{proc.label} (pid {child.pid}) did not announce itself within "
                        f"{proc.start_timeout:g} s (it must write its .pconf in {self.location})",
                        None,
                        list(child.stderr_tail),
                    )
                if not self.auto_discover:
                    proc.cond.release()  # nobody watches the directory: look ourselves
                    try:
                        self._discovery.scan()
                    finally:
                        proc.cond.acquire()
                    if proc.loaded_child is child or proc.refusal:
                        continue
                # Announcements, loads and exits notify the condition; the bound on the wait
                # only paces the directory scans done without auto discovery.
                proc.cond.wait(min(remaining, 1.0 if self.auto_discover else 0.05))

    def _launch_for(self, conf: PluginConf) -> tuple[PluginProcess | None, str]:
        """Find the launched plugin an announcement belongs to; return it and a refusal."""
        with self._lock:
            proc = self._launches.get(conf.identity)
            if proc is not None and proc.state in ("stopped", "failed", "stopping"):
                proc = None
            if proc is not None:
                if conf.launch and conf.launch != proc.token:
                    return proc, "it does not carry the launch token of the process started"
                return proc, ""
            if not conf.launch:
                return None, ""
            for candidate in [*self._unnamed, *self._launches.values()]:
                if candidate.token != conf.launch:
                    continue
                if candidate.name is not None:
                    refusal = (
                        f"the launched process announced {file_stem(conf.name, conf.namespace)}, "
                        f"not {candidate.label}"
                    )
                    with candidate.cond:
                        candidate.refusal = refusal
                        candidate.cond.notify_all()
                    return None, refusal
                self._unnamed.remove(candidate)
                candidate.name, candidate.namespace = conf.name, conf.namespace
                self._launches[conf.identity] = candidate
                child = candidate.child
                if child is not None:
                    child.logger = logging.getLogger(
                        "goplug.plugin."
                        + (f"{conf.namespace}.{conf.name}" if conf.namespace else conf.name)
                    )
                return candidate, ""
        return None, ""

    def _check_launched_peer(
        self, handle: PluginHandle, conf: PluginConf, client: PluginClient
    ) -> None:
        """A launched plugin without the token must be served by the launched process tree.

        And a plugin that is not one of ours must not be served by a process being launched
        under another name (a launched program announcing the wrong identity, with no token).
        """
        proc = handle.process
        if proc is None or proc.state in ("stopped", "failed"):
            if not conf.launch:
                self._refuse_wrong_name(handle, conf, client)
            return
        if conf.launch and conf.launch == proc.token:
            return
        pid = client.peer_pid()
        if not proc.owns(pid):
            raise ConfigError(
                f"plugin {handle.label} was launched by this registry, but its socket is served "
                f"by pid {pid}, not by the launched pid {proc.pid} or its descendants",
                conf.path or None,
            )

    def _refuse_wrong_name(
        self, handle: PluginHandle, conf: PluginConf, client: PluginClient
    ) -> None:
        with self._lock:
            starting = [
                p
                for p in [*self._launches.values(), *self._unnamed]
                if p.state in ("starting", "restarting")
            ]
        if not starting:
            return  # the usual case: no peer lookup
        pid = client.peer_pid()
        for proc in starting:
            if proc.owns(pid):
                refusal = f"the launched process announced {handle.label}, not {proc.label}"
                with proc.cond:
                    proc.refusal = refusal
                    proc.cond.notify_all()
                raise ConfigError(f"refused {handle.label}: {refusal}", conf.path or None)

    def _on_process_exit(self, proc: PluginProcess, child: Child) -> None:
        """A launched process ended (on its own thread): lose the plugin, restart or give up."""
        code = child.reap()
        with proc.cond:
            proc.cond.notify_all()
            if proc.child is not child or proc.state not in ("running", "restarting"):
                return  # a start in progress reports it; a stop expects it
            proc.reason = f"pid {child.pid} ended ({describe_exit(code)})"
        log.warning("launched plugin %s: %s", proc.label, proc.reason)
        handle = self._handles.get((proc.namespace, proc.name or ""))
        if handle is not None:
            self._lose(handle, proc.reason)
        self._remove_leftovers(proc, child)
        with self._lock:
            if self._closed:
                return
            with proc.cond:
                if proc.child is not child or proc.state not in ("running", "restarting"):
                    return  # unloaded meanwhile: the stop wins over a restart
                delay = proc.next_restart(code, self.settings.launch)
            launcher = self._launcher
        if delay is not None and launcher is not None:
            log.info("restarting %s in %.2f s", proc.label, delay)
            launcher.later(delay, lambda: self._restart(proc))
            return
        if proc.failed:
            reason = (
                f"{proc.reason}; gave up after {proc.max_restarts} restarts in "
                f"{self.settings.launch.restart_window:g} s"
            )
            tail = list(child.stderr_tail)[-5:]
            if tail:
                reason += "; last stderr lines: " + " | ".join(tail)
            self._give_up(proc, reason)
        else:
            self._record_launch(proc)
            with proc.cond:
                proc.cond.notify_all()

    def _give_up(self, proc: PluginProcess, reason: str) -> None:
        """A launched plugin will not be restarted again: say so with a "failed" event."""
        with proc.cond:
            proc.state = "failed"
            proc.reason = reason
            proc.cond.notify_all()
        self._record_launch(proc)
        log.error("launched plugin %s failed: %s", proc.label, reason)
        handle = self._handles.get((proc.namespace, proc.name or ""))
        if handle is not None:
            with self._lock:
                listeners = list(self._listeners)
            self._emit("failed", handle, listeners, reason)

    def _restart(self, proc: PluginProcess) -> None:
        """On the launcher thread: start the next process, then wait for it elsewhere."""
        with self._lock:  # close() either sees the new process, or this sees close()
            launcher = self._launcher
            if self._closed or launcher is None or proc.state != "restarting":
                return
            proc.restarts += 1
            try:
                child = self._spawn(launcher, proc)
            except PluginStartError as exc:
                failure: PluginStartError | None = exc
            else:
                failure = None
        if failure is not None:
            self._give_up(proc, f"restart {proc.restarts} failed: {failure}")
            return

        def wait() -> None:
            try:
                self._await_start(proc, child)
            except GoPlugError as exc:
                log.warning("restart of %s failed: %s", proc.label, exc)
                child.signal_group(signal.SIGKILL)  # its exit brings the policy back in
            else:
                log.info("restarted %s (pid %d)", proc.label, child.pid)

        threading.Thread(target=wait, name="goplug-restart", daemon=True).start()

    def _stop_launched(self, procs: list[PluginProcess]) -> None:
        """Stop launched processes together: SIGTERM, then SIGKILL after the grace period."""
        children: list[tuple[PluginProcess, Child]] = []
        for proc in procs:
            with proc.cond:
                if proc.state in ("stopped", "failed") and (
                    proc.child is None or proc.child.exit_code is not None
                ):
                    continue
                proc.state = "stopping"
                child = proc.child
            if child is not None:
                children.append((proc, child))
                if not child.has_exited():
                    child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.launch.stop_grace
        for _, child in children:
            child.wait_exit(max(0.0, deadline - time.monotonic()))
        for proc, child in children:
            if not child.has_exited():
                log.warning(
                    "launched plugin %s (pid %d) ignored SIGTERM for %g s: killing it",
                    proc.label,
                    child.pid,
                    self.settings.launch.stop_grace,
                )
                child.signal_group(signal.SIGKILL)
        for proc, child in children:
            child.wait_exit(5.0)
            child.reap()
            self._remove_leftovers(proc, child)
            with proc.cond:
                proc.state = "stopped"
                proc.cond.notify_all()
            self._record_launch(proc)

    @staticmethod
    def _send_stop(client: PluginClient, timeout: float) -> None:
        with contextlib.suppress(GoPlugError):
            client.request(routes.STOP, b"", timeout)
        client.close()

    def _record_launch(self, proc: PluginProcess) -> None:
        """Keep ``.<stem>.launch`` up to date, for ``goplug ls`` in other processes."""
        with proc.cond:  # one writer at a time, so the last state written is the last one
            self._write_launch_record(proc)

    def _write_launch_record(self, proc: PluginProcess) -> None:
        if proc.name is None:
            return
        path = os.path.join(self.location, "." + file_stem(proc.name, proc.namespace) + ".launch")
        if proc.state in ("stopping", "stopped") or self._closed:
            with contextlib.suppress(OSError):
                os.unlink(path)
            return
        import json

        record = {
            "Name": proc.name,
            "NameSpace": proc.namespace,
            "Pid": proc.pid,
            "Started": proc.started,
            "Restarts": proc.restarts,
            "State": proc.state,
            "Command": proc.command,
            "Registry": os.getpid(),
        }
        try:
            write_atomically(path, json.dumps(record).encode())
        except OSError as exc:
            log.debug("cannot write %s: %s", path, exc)

    def _remove_leftovers(self, proc: PluginProcess, child: Child) -> None:
        """Remove the announce file and socket a killed launched process could not remove."""
        identity = (proc.namespace, proc.name or "")
        handle = self._handles.get(identity)
        conf = handle.conf if handle is not None else None
        if conf is None or not conf.path:
            return
        try:
            fresh = self._read_conf(conf.path)
        except (ConfigError, OSError):
            return
        if (fresh.launch and fresh.launch == proc.token) or (fresh.pid == child.pid):
            for path, want_socket in ((fresh.sock, True), (fresh.path, False)):
                with contextlib.suppress(OSError):
                    info = os.lstat(path)
                    if stat.S_ISSOCK(info.st_mode) == want_socket and info.st_uid == os.getuid():
                        os.unlink(path)


_LAUNCHING: weakref.WeakSet[LaunchingRegistry] = weakref.WeakSet()
"""Registries with launched plugins: closed at interpreter exit, stopping those plugins."""


@atexit.register
def _close_launching() -> None:
    for registry in list(_LAUNCHING):
        try:
            registry.close()
        except Exception:
            log.exception("closing a registry at exit failed")


def _command_line(command: Sequence[str] | str) -> list[str]:
    if isinstance(command, str):
        if not command:
            raise ConfigError("empty command")
        # A Python file or module:attr, served by goplug serve with this interpreter.
        return [sys.executable, "-m", "goplug", "serve", command]
    argv = [os.fspath(arg) for arg in command]
    if not argv or not argv[0]:
        raise ConfigError("empty command")
    return argv
