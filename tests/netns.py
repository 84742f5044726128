"""Several "hosts" on one machine, built from Linux network namespaces, for end-to-end tests.

>>> with network_or_skip() as net:                  # or the ``network`` fixture below
...     etcd, app = net.add_host("etcd"), net.add_host("app")
...     server = etcd.popen([sys.executable, "server.py", etcd.ip], stdout=subprocess.PIPE)
...     port = int(wait_for_line(server, "LISTENING", timeout=10).split()[1])
...     app.run([sys.executable, "client.py", f"{etcd.ip}:{port}"], timeout=10)
...     with net.partitioned(etcd):                 # silently drops etcd off the switch
...         ...

Layout: a "switch" namespace holds a bridge ``br0``; each host is a namespace whose ``eth0``
(address ``10.77.X.N/24``, plus ``lo``) is one end of a veth pair, the other end ``vN`` sits in the
switch namespace on the bridge. The veth pairs are created directly inside the namespaces, never
in the main one, and no address is ever configured in the main namespace: nothing there has a
route to the test subnet, so no packet for it can leave the machine. Every process that talks on
the subnet must be started with ``Host.popen`` / ``Host.run`` (``ip netns exec``).

Everything is removed by ``Network.close()`` (also on ``with`` exit, by the fixture and at
interpreter exit): processes (SIGTERM, SIGKILL after a grace, reaped), whatever else is still
running inside the namespaces, the namespaces (which takes their veths and the bridge with them)
and the stderr files. Names carry the creating pid (``gpt<pid>n<seq>h<i>``), so xdist workers
never collide, and namespaces left by a crashed earlier run, whose creating pid is gone, are
deleted when the next Network is made.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import pytest

NETNS_DIR = Path("/var/run/netns")
"""Where ``ip netns`` names namespaces (iproute2's NETNS_RUN_DIR)."""

IP_TIMEOUT = 10.0
"""Bound on each ``ip`` invocation; they take milliseconds."""

WORK_PARENT = "/tmp"
"""Where each network keeps its processes' stderr files (a short path, like plugin dirs)."""

DEFAULT_GRACE = 3.0
"""Seconds between SIGTERM and SIGKILL when a network closes."""

Match = str | re.Pattern[str] | Callable[[str], object]
"""What ``wait_for_line`` looks for: a prefix, a regex (searched) or a predicate on the line."""

_counter = 0
_counter_lock = threading.Lock()
_open_networks: weakref.WeakSet[Network] = weakref.WeakSet()
_swept_prefixes: set[str] = set()


class NetnsUnavailable(RuntimeError):
    """This machine or user cannot build namespaced networks (not root, no ``ip``, no netns)."""


class NetnsError(RuntimeError):
    """An ``ip`` command failed while building or changing a network."""


class WaitForLineError(AssertionError):
    """The awaited line did not come: the process exited, closed stdout, or the deadline passed."""


# --------------------------------------------------------------------------- ip plumbing


def _ip_binary() -> str:
    found = shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise NetnsUnavailable("the `ip` command (iproute2) is not installed")
    return found


def _ip(*args: str, batch: Sequence[str] = (), check: bool = True) -> str:
    """Run ``ip ARGS`` (with ``-batch -`` fed ``batch`` lines if given); return its stdout."""
    cmd = [_ip_binary(), *args]
    if batch:
        cmd += ["-batch", "-"]
    try:
        result = subprocess.run(
            cmd,
            input="".join(line + "\n" for line in batch),
            capture_output=True,
            text=True,
            timeout=IP_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"{' '.join(cmd)} took more than {IP_TIMEOUT} s") from exc
    if check and result.returncode != 0:
        detail = f" (batch: {list(batch)})" if batch else ""
        raise NetnsError(
            f"{' '.join(cmd)}{detail} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result.stdout


def require_netns() -> None:
    """Raise NetnsUnavailable unless we are root and ``ip`` exists (namespaces are probed later)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)")
    _ip_binary()


def _setpriv_prefix() -> list[str]:
    # The pdeathsig makes a host process die with the test worker even if the worker is
    # SIGKILLed and never runs its cleanup; without setpriv that safety net is simply absent.
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(prefix: str) -> list[str]:
    """Delete namespaces (and /tmp dirs) named ``<prefix><pid>n...`` whose creating pid is gone.

    Only names of exactly this module's shape are touched, and only when their creator is dead,
    so a running worker's networks (its pid is alive) are never affected. Processes still inside
    such a namespace are left alone (they normally died with their parent, by pdeathsig); the
    namespace then lingers unnamed until they exit, still with no route to the main namespace.
    Returns the names deleted.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)n\d+(?:sw|h\d+)$")
    stale = []
    for line in _ip("netns", "list", check=False).splitlines():
        name = line.split(" ", 1)[0]
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            stale.append(name)
    if stale:
        _ip(batch=[f"netns del {name}" for name in stale], check=False)
    # The stderr files of such a run, in directories named after its namespaces.
    workdir = re.compile(rf"^{re.escape(prefix)}(\d+)n\d+-\w+$")
    with contextlib.suppress(OSError):
        for entry in os.scandir(WORK_PARENT):
            m = workdir.match(entry.name)
            pid = int(m.group(1)) if m else os.getpid()
            if pid != os.getpid() and entry.is_dir(follow_symlinks=False) and not _pid_alive(pid):
                shutil.rmtree(entry.path, ignore_errors=True)
    return stale


def _netns_ids(names: Sequence[str]) -> dict[tuple[int, int], str]:
    ids = {}
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(NETNS_DIR / name)
            ids[(st.st_dev, st.st_ino)] = name
    return ids


def _pids_in(ids: dict[tuple[int, int], str]) -> list[int]:
    """Pids of processes whose network namespace is one of ``ids`` (what ``ip netns pids`` does)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{entry}/ns/net")
                if (st.st_dev, st.st_ino) in ids:
                    found.append(int(entry))
    return found


def _kill_in_namespaces(ids: dict[tuple[int, int], str], timeout: float) -> list[int]:
    """SIGKILL every process still inside our namespaces and wait (bounded) for each to exit.

    These can only be descendants of processes the test started there (a plugin's child, a
    shell's background job). The pidfd is opened before the namespace is checked again, so a
    pid reused by an unrelated process in the meantime is never signalled.
    """
    killed = []
    deadline = time.monotonic() + timeout
    for pid in _pids_in(ids):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
            if (st.st_dev, st.st_ino) not in ids:
                continue
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            killed.append(pid)
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll(max(0, int((deadline - time.monotonic()) * 1000)))
        except OSError:
            pass
        finally:
            os.close(fd)
    return killed


# --------------------------------------------------------------------------- stdout lines


class _LineReader:
    """Drains a process's stdout on a thread into a queue of decoded lines."""

    MAX_UNREAD = 100_000  # lines nobody waited for are dropped past this, oldest first

    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        if proc.stdout is None:
            raise TypeError("wait_for_line needs a process started with stdout=subprocess.PIPE")
        self.stream: IO[Any] = proc.stdout
        self.cond = threading.Condition()
        self.unread: deque[str] = deque(maxlen=self.MAX_UNREAD)
        self.tail: deque[str] = deque(maxlen=20)
        self.eof = False
        self.thread = threading.Thread(
            target=self._run, name=f"stdout-{proc.pid}", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        try:
            while raw := self.stream.readline():
                line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
                line = line.rstrip("\r\n")
                with self.cond:
                    self.unread.append(line)
                    self.tail.append(line)
                    self.cond.notify_all()
        except (OSError, ValueError):
            pass  # the stream was closed by the cleanup
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()


_readers: weakref.WeakKeyDictionary[subprocess.Popen[Any], _LineReader] = (
    weakref.WeakKeyDictionary()
)
_readers_lock = threading.Lock()


def _reader(proc: subprocess.Popen[Any]) -> _LineReader:
    with _readers_lock:
        reader = _readers.get(proc)
        if reader is None:
            reader = _readers[proc] = _LineReader(proc)
        return reader


def _matcher(match: Match) -> Callable[[str], object]:
    if isinstance(match, str):
        return lambda line: line.startswith(match)
    if isinstance(match, re.Pattern):
        return match.search
    return match


def stderr_tail(proc: subprocess.Popen[Any], limit: int = 4000) -> str:
    """The last ``limit`` characters the process wrote to stderr, as far as they can be known."""
    path = getattr(proc, "stderr_path", None)
    if path is not None:
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - limit))
                return f.read().decode(errors="replace")
        except OSError as exc:
            return f"(stderr file unreadable: {exc})"
    if proc.stderr is not None and proc.poll() is not None:
        # Only after exit, and never blocking: a grandchild may still hold the pipe open.
        fd = proc.stderr.fileno()
        with contextlib.suppress(OSError, ValueError):
            if select.select([fd], [], [], 0.2)[0]:
                return os.read(fd, 1 << 16)[-limit:].decode(errors="replace")
        return ""
    return "(stderr not captured)"


def wait_for_line(proc: subprocess.Popen[Any], match: Match, timeout: float = 10.0) -> str:
    """Read ``proc``'s stdout until a line matches; return it (without its newline).

    ``match`` is a prefix, a compiled regex (searched) or a predicate. Lines read past are
    consumed; the next call goes on from there. From the first call on, a thread owns
    ``proc.stdout`` and keeps draining it (so the child never blocks on a full pipe): read its
    output only through this function from then on. Raises WaitForLineError, with the last
    stdout lines and the stderr tail, if the process exits (or closes stdout) first or if
    ``timeout`` seconds pass.
    """
    reader = _reader(proc)
    matches = _matcher(match)
    deadline = time.monotonic() + timeout
    with reader.cond:
        while True:
            while reader.unread:
                line = reader.unread.popleft()
                if matches(line):
                    return line
            if reader.eof:
                reason = "closed its stdout"
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = f"printed no such line within {timeout} s"
                break
            reader.cond.wait(remaining)
        tail = list(reader.tail)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(0.5 if reader.eof else 0)
    if proc.returncode is not None:
        reason += f" (exited with {proc.returncode})"
    argv = getattr(proc, "argv", proc.args)
    stdout = "\n".join(tail) or "(nothing)"
    raise WaitForLineError(
        f"{argv} {reason}, waiting for a line matching {match!r}\n"
        f"--- last stdout lines ---\n{stdout}\n--- stderr tail ---\n{stderr_tail(proc)}"
    )


# --------------------------------------------------------------------------- hosts


class HostProcess(subprocess.Popen):  # type: ignore[type-arg]
    """A process running inside a host's namespace: a Popen with a few extras."""

    host: Host
    argv: list[str]
    """The command as given, without the ``ip netns exec`` prefix."""
    stderr_path: Path | None
    """Where stderr goes when the caller did not choose (None if they did)."""

    def wait_for_line(self, match: Match, timeout: float = 10.0) -> str:
        return wait_for_line(self, match, timeout)

    def stderr_tail(self, limit: int = 4000) -> str:
        return stderr_tail(self, limit)


class Host:
    """One namespace on the test network: ``name`` (a label), ``ns``, ``ip``, ``iface``."""

    iface = "eth0"

    def __init__(self, network: Network, name: str, index: int, ns: str, ip: str) -> None:
        self.network = network
        self.name = name
        self.index = index
        self.ns = ns
        self.ip = ip
        self.switch_port = f"v{index}"
        """The veth end in the switch namespace that partition()/heal() detach and attach."""

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.ip} ns={self.ns}>"

    def command(self, argv: Sequence[str | os.PathLike[str]], die_with_parent: bool) -> list[str]:
        """The full command line that runs ``argv`` in this host's namespace."""
        prefix = _setpriv_prefix() if die_with_parent else []
        return [_ip_binary(), "netns", "exec", self.ns, *prefix, *map(os.fspath, argv)]

    def popen(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        die_with_parent: bool = True,
        **kwargs: Any,
    ) -> HostProcess:
        """Start ``argv`` in this host's namespace; it is stopped when the network closes.

        ``kwargs`` go to ``subprocess.Popen`` (stdout=PIPE, text=True, env=..., cwd=...).
        stdin defaults to DEVNULL; stderr, unless given, goes to a file whose tail
        ``wait_for_line`` errors show. ``ip netns exec`` execs the command itself, so
        ``proc.pid`` is the command's pid. With ``die_with_parent`` the process is SIGKILLed
        when the thread that started it dies (PR_SET_PDEATHSIG), so a crashed test leaves
        nothing running; pass False when starting it from a short-lived thread. Give
        ``argv[0]`` as an absolute path (``sys.executable``) if ``env`` has no PATH.
        """
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return self.network._start(self, list(map(os.fspath, argv)), die_with_parent, kwargs)

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        timeout: float = 10.0,
        *,
        die_with_parent: bool = True,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` in this host's namespace to completion (killed after ``timeout`` s).

        Defaults: capture_output=True, text=True, stdin=DEVNULL, check=False.
        """
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("check", False)
        return subprocess.run(self.command(argv, die_with_parent), timeout=timeout, **kwargs)


class Network:
    """A bridge in its own namespace and any number of host namespaces plugged into it.

    ``Network(prefix)`` builds the switch at once and raises NetnsUnavailable if this machine
    cannot (not root, no ``ip``, namespaces or bridges not permitted). ``prefix`` (1-8 lowercase
    letters/digits) starts every namespace name. The subnet is ``10.77.X.0/24``, X taken from
    the pid and a per-process counter so concurrent networks usually differ, though a clash
    would be harmless: each network's stacks are wholly separate from every other's.
    """

    def __init__(self, prefix: str = "gpt", *, grace: float = DEFAULT_GRACE) -> None:
        global _counter
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
            raise ValueError(f"prefix must be 1-8 lowercase letters/digits: {prefix!r}")
        require_netns()
        with _counter_lock:
            seq = _counter
            _counter += 1
            first = prefix not in _swept_prefixes
            _swept_prefixes.add(prefix)
        if first:
            sweep_stale(prefix)
        pid = os.getpid()
        self.base = f"{prefix}{pid}n{seq}"
        self.subnet_octet = (pid * 7 + seq) % 254 + 1
        self.subnet = f"10.77.{self.subnet_octet}.0/24"
        self.switch_ns = f"{self.base}sw"
        self.grace = grace
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []
        self._partitioned: set[str] = set()
        self._procs: list[HostProcess] = []
        self._lock = threading.RLock()
        self._workdir: Path | None = None
        self._closed = False
        _open_networks.add(self)
        try:
            self._add_namespace(self.switch_ns)
            # The veth probe turns a kernel without veth support into a skip, not a failure later.
            _ip(
                "-n",
                self.switch_ns,
                batch=[
                    "link add br0 type bridge stp_state 0",
                    "link set br0 up",
                    "link add probe0 type veth peer name probe1",
                    "link del probe0",
                ],
            )
        except NetnsError as exc:
            self.close()
            raise NetnsUnavailable(f"cannot build a namespaced network here: {exc}") from exc

    def __repr__(self) -> str:
        return f"<Network {self.base} {self.subnet} hosts={list(self.hosts)}>"

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_namespace(self, name: str) -> None:
        self.namespaces.append(name)  # before creating, so a half-made one is still removed
        _ip("netns", "add", name)

    def add_host(self, name: str) -> Host:
        """Create a host namespace, its veth pair and its address, and plug it into the bridge."""
        with self._lock:
            if self._closed:
                raise RuntimeError("network is closed")
            if name in self.hosts:
                raise ValueError(f"host {name!r} already exists")
            index = len(self.hosts) + 1
            if index > 250:
                raise ValueError("at most 250 hosts per network")
            ns = f"{self.base}h{index}"
            host = Host(self, name, index, ns, f"10.77.{self.subnet_octet}.{index}")
            self._add_namespace(ns)
            _ip(
                "-n",
                ns,
                batch=[
                    f"link add {host.iface} type veth peer name {host.switch_port}"
                    f" netns {self.switch_ns}",
                    f"addr add {host.ip}/24 dev {host.iface}",
                    f"link set {host.iface} up",
                    "link set lo up",
                ],
            )
            _ip("-n", self.switch_ns, "link", "set", host.switch_port, "master", "br0", "up")
            self.hosts[name] = host
            return host

    def host(self, name: str) -> Host:
        return self.hosts[name]

    def _host(self, host: Host | str) -> Host:
        return self.hosts[host] if isinstance(host, str) else host

    def partition(self, *hosts: Host | str) -> None:
        """Cut hosts off the switch silently: their link stays up, their packets go nowhere."""
        for h in map(self._host, hosts):
            _ip("-n", self.switch_ns, "link", "set", h.switch_port, "nomaster")
            self._partitioned.add(h.name)

    def heal(self, *hosts: Host | str) -> None:
        """Plug partitioned hosts back into the switch (all of them if none is named)."""
        for h in map(self._host, hosts or tuple(self._partitioned)):
            _ip("-n", self.switch_ns, "link", "set", h.switch_port, "master", "br0", "up")
            self._partitioned.discard(h.name)
        # ARP entries that failed during the partition would otherwise be retried only at the
        # next probe, a second or more later; forgetting them makes the heal take effect now.
        for other in list(self.hosts.values()):
            _ip("-n", other.ns, "neigh", "flush", "dev", other.iface, check=False)

    @contextlib.contextmanager
    def partitioned(self, *hosts: Host | str) -> Iterator[None]:
        """``with net.partitioned(a):`` partition ``a`` for the block, then heal it."""
        self.partition(*hosts)
        try:
            yield
        finally:
            if not self._closed:
                self.heal(*hosts)

    def _stderr_file(self, host: Host) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"{self.base}-", dir=WORK_PARENT))
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", host.name)
        return self._workdir / f"{stem}-{len(self._procs)}.stderr"

    def _start(
        self, host: Host, argv: list[str], die_with_parent: bool, kwargs: dict[str, Any]
    ) -> HostProcess:
        with self._lock:
            if self._closed:
                raise RuntimeError("network is closed")
            stderr_path = None
            if "stderr" not in kwargs:
                stderr_path = self._stderr_file(host)
                kwargs["stderr"] = open(stderr_path, "wb")  # noqa: SIM115 (the child keeps it)
            try:
                proc = HostProcess(host.command(argv, die_with_parent), **kwargs)
            finally:
                if stderr_path is not None:
                    kwargs["stderr"].close()
            proc.host, proc.argv, proc.stderr_path = host, argv, stderr_path
            self._procs.append(proc)
            return proc

    @property
    def processes(self) -> list[HostProcess]:
        """Every process started with ``popen`` on this network (running or not)."""
        return list(self._procs)

    def stop(self, proc: subprocess.Popen[Any], grace: float | None = None) -> int:
        """SIGTERM one process (and SIGCONT, in case a test stopped it), SIGKILL after ``grace``."""
        _terminate([proc], self.grace if grace is None else grace)
        return proc.returncode

    def close(self) -> None:
        """Stop every process, remove every namespace and file; safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs, self._procs = self._procs, []
        errors = []
        _terminate(procs, self.grace)
        ids = _netns_ids(self.namespaces)
        if ids:
            # Before closing streams: a straggler may hold a pipe a reader thread is blocked on.
            _kill_in_namespaces(ids, timeout=5.0)
        for proc in procs:
            _close_streams(proc)
        if self.namespaces:
            _ip(batch=[f"netns del {ns}" for ns in reversed(self.namespaces)], check=False)
            left = [ns for ns in self.namespaces if (NETNS_DIR / ns).exists()]
            if left:
                errors.append(f"namespaces not removed: {left}")
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        _open_networks.discard(self)
        if errors:
            raise NetnsError("; ".join(errors))


def _terminate(procs: Sequence[subprocess.Popen[Any]], grace: float) -> None:
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
            p.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + grace
    for p in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.0, deadline - time.monotonic()))
    for p in live:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)


def _close_streams(proc: subprocess.Popen[Any]) -> None:
    reader = _readers.get(proc)
    if reader is not None:
        # Closing a stream another thread is blocked reading can hang on its lock: let the
        # reader see EOF first (the writers are dead by now), and leave it open if it does not.
        reader.thread.join(1.0)
        if reader.thread.is_alive():
            return
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


@atexit.register
def _close_all() -> None:
    for net in list(_open_networks):
        with contextlib.suppress(Exception):
            net.close()


# --------------------------------------------------------------------------- pytest


@contextlib.contextmanager
def network_or_skip(prefix: str = "gpt", *, grace: float = DEFAULT_GRACE) -> Iterator[Network]:
    """A Network for the block, closed after it; skips the test where namespaces are unavailable."""
    try:
        net = Network(prefix, grace=grace)
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    with net:
        yield net


@pytest.fixture
def network() -> Iterator[Network]:
    """A fresh Network per test, removed after it (skips where namespaces are unavailable)."""
    with network_or_skip() as net:
        yield net
