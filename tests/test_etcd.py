"""The etcd backend against a real etcd: list and watch, leases, outages, compaction, TLS."""

# The fixtures imported from etcdserver are test parameters of the same name.
# ruff: noqa: F811

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
from conftest import wait_for
from etcdserver import (  # noqa: F401
    EtcdServer,
    TLSFiles,
    etcd_server,
    etcd_tls_server,
    free_port,
)

from goplug.errors import ConfigError, PluginConnectionError
from goplug.etcd import (
    EtcdAnnouncer,
    EtcdDiscovery,
    EtcdLocation,
    identity_of_key,
    is_etcd_location,
    key_for,
    parse_etcd_location,
)

PREFIX = "/gp"


class Recorder:
    """A change handler that remembers every call, and the threads it was called in."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []
        self.threads: set[str] = set()
        self.ticks = 0
        self._lock = threading.Lock()

    def __call__(self, changed: list[str], removed: list[str]) -> None:
        with self._lock:
            self.calls.append((list(changed), list(removed)))
            self.threads.add(threading.current_thread().name)

    def tick(self) -> None:
        with self._lock:
            self.ticks += 1
            self.threads.add(threading.current_thread().name)

    def changed(self) -> list[str]:
        with self._lock:
            return [key for changed, _ in self.calls for key in changed]

    def removed(self) -> list[str]:
        with self._lock:
            return [key for _, removed in self.calls for key in removed]


def k(name: str, namespace: str = "ns") -> str:
    return key_for(PREFIX, name, namespace)


@pytest.fixture
def stoppers() -> Any:
    """Everything a test starts is stopped after it, even when it fails."""
    items: list[Any] = []
    yield items
    for item in reversed(items):
        item.stop()
        if isinstance(item, EtcdDiscovery):
            item.join(5)


def discovery(stoppers: list[Any], location: str, rec: Recorder, **kwargs: Any) -> EtcdDiscovery:
    d = EtcdDiscovery(location, rec, **kwargs)
    stoppers.append(d)
    return d


def announcer(stoppers: list[Any], location: str, key: str, value: bytes, **kw: Any) -> Any:
    a = EtcdAnnouncer(location, key, value, **kw)
    stoppers.append(a)
    return a


# -- locations and keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("etcd://10.0.0.1:2379/apps", EtcdLocation((("10.0.0.1", 2379),), "/apps", False)),
        (
            "etcd://h1:2379,h2:2380/a/b/",
            EtcdLocation((("h1", 2379), ("h2", 2380)), "/a/b", False),
        ),
        ("etcds://etcd.internal/x", EtcdLocation((("etcd.internal", 2379),), "/x", True)),
        ("etcd://h:1", EtcdLocation((("h", 1),), "/goplug", False)),
        ("ETCD://h:1/", EtcdLocation((("h", 1),), "/goplug", False)),
        (
            "etcd://[::1]:2379,[fe80::1]/p",
            EtcdLocation((("::1", 2379), ("fe80::1", 2379)), "/p", False),
        ),
    ],
)
def test_parse_good_locations(text: str, expected: EtcdLocation) -> None:
    assert parse_etcd_location(text) == expected
    assert is_etcd_location(text)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("http://h:2379/p", "expected etcd://"),
        ("etcd:/h/p", "expected etcd://"),
        ("etcd:///p", "no endpoint"),
        ("etcd://h1,,h2/p", "bad host"),
        ("etcd://h:0/p", "bad port"),
        ("etcd://h:99999/p", "bad port"),
        ("etcd://h:abc/p", "bad port"),
        ("etcd://h:/p", "bad port"),
        ("etcd://::1:2379/p", "IPv6"),
        ("etcd://[::1/p", "bad endpoint"),
        ("etcd://user:pw@h/p", "no credentials"),
        ("etcd://h/p?x=1", "query"),
        ("etcd://h/a//b", "empty segment"),
        ("etcd://h/a b", "spaces"),
    ],
)
def test_parse_bad_locations(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_etcd_location(text)
    assert complaint in str(err.value)
    assert repr(text) in str(err.value)


def test_keys_and_identities() -> None:
    assert key_for("/gp", "Do", "Test") == "/gp/Test/Do"
    assert identity_of_key("/gp", "/gp/Test/Do") == ("Test", "Do")
    assert identity_of_key("/gp", key_for("/gp", "Do", "")) == ("", "Do")
    for key in ("/gp/Do", "/gp/a/b/c", "/gpx/a/b", "/gp/a/", "/other/a/b"):
        assert identity_of_key("/gp", key) is None, key
    assert not is_etcd_location("/var/plugins")
    assert not is_etcd_location(None)


def test_settings_refused_before_any_connection() -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        EtcdAnnouncer("etcd://127.0.0.1:1/p", "/p/a/b", b"x", ttl=1.5)
    with pytest.raises(ConfigError, match="needs TLS certificates"):
        EtcdDiscovery("etcds://127.0.0.1:1/p", Recorder())
    with pytest.raises(ConfigError, match="needs TLS certificates"):
        EtcdAnnouncer("etcds://127.0.0.1:1/p", "/p/a/b", b"x")


# -- discovery ---------------------------------------------------------------------------------


def test_list_then_watch_reports_puts_and_deletes(
    etcd_server: EtcdServer, stoppers: list[Any]
) -> None:
    etcd_server.put(k("a"), b"A1")
    etcd_server.put(k("b"), b"B1")
    etcd_server.put(f"{PREFIX}/ns/deeper/c", b"not an announcement")
    etcd_server.put(f"{PREFIX}x/ns/d", b"another prefix")
    rec = Recorder()
    d = discovery(stoppers, etcd_server.location(PREFIX), rec, on_tick=rec.tick)
    d.start()
    # start() returns once what was already there is reported.
    assert rec.calls == [([k("a"), k("b")], [])]
    assert d.mode == "watching"
    assert d.read(k("a")) == b"A1"

    etcd_server.put(k("c", "other"), b"C1")
    etcd_server.put(k("a"), b"A2")
    etcd_server.delete(k("b"))
    wait_for(lambda: k("b") in rec.removed())
    assert rec.changed() == [k("a"), k("b"), k("c", "other"), k("a")]
    assert rec.removed() == [k("b")]
    assert d.read(k("a")) == b"A2"
    with pytest.raises(ConfigError, match="no longer announced"):
        d.read(k("b"))
    assert d.keys() == [k("a"), k("c", "other")]
    wait_for(lambda: rec.ticks >= 1)
    # Changes and ticks come from one thread, which is not the event loop's.
    assert rec.threads == {"goplug-etcd-events"}

    d.stop()
    assert d.join(2)
    assert d.mode == "stopped"


def test_nothing_is_missed_between_list_and_watch(
    etcd_server: EtcdServer, stoppers: list[Any]
) -> None:
    etcd_server.put(k("before"), b"1")

    class PutAfterList(EtcdDiscovery):
        """Puts and deletes keys right after the list, before the watch exists."""

        lists = 0

        async def _list(self, client: Any) -> None:
            await super()._list(client)
            self.lists += 1
            if self.lists == 1:
                await client.put(k("between").encode(), b"2")
                await client.delete(k("before").encode())

    rec = Recorder()
    d = PutAfterList(etcd_server.location(PREFIX), rec)
    stoppers.append(d)
    d.start()
    wait_for(lambda: k("before") in rec.removed())
    assert rec.changed() == [k("before"), k("between")]
    assert d.keys() == [k("between")]


def test_lease_not_kept_alive_expires_and_is_reported_removed(
    etcd_server: EtcdServer, stoppers: list[Any]
) -> None:
    rec = Recorder()
    d = discovery(stoppers, etcd_server.location(PREFIX), rec)
    d.start()
    granted = time.monotonic()
    lease = etcd_server.grant(2)
    etcd_server.put(k("mortal"), b"x", lease=lease)
    wait_for(lambda: k("mortal") in rec.changed())
    wait_for(lambda: k("mortal") in rec.removed(), timeout=2 + 1)
    assert time.monotonic() - granted < 3.0
    assert d.keys() == []


def test_forget_reports_a_key_again(etcd_server: EtcdServer, stoppers: list[Any]) -> None:
    etcd_server.put(k("a"), b"1")
    rec = Recorder()
    d = discovery(stoppers, etcd_server.location(PREFIX), rec, on_tick=rec.tick, tick_interval=0.05)
    d.start()
    assert rec.changed() == [k("a")]
    d.forget(k("a"))
    wait_for(lambda: rec.changed() == [k("a"), k("a")])


def test_scan_without_watching(etcd_server: EtcdServer, stoppers: list[Any]) -> None:
    etcd_server.put(k("a"), b"1")
    rec = Recorder()
    d = discovery(stoppers, etcd_server.location(PREFIX), rec)
    d.scan()
    # Without watching, the report is made in the caller's thread before scan() returns.
    assert rec.calls == [([k("a")], [])]
    assert rec.threads == {threading.current_thread().name}
    d.scan()
    assert len(rec.calls) == 1
    etcd_server.delete(k("a"))
    etcd_server.put(k("b"), b"2")
    d.scan()
    assert rec.calls[1:] == [([k("b")], [k("a")])]


def test_scan_with_etcd_unreachable_raises_within_its_bound(stoppers: list[Any]) -> None:
    rec = Recorder()
    port = free_port()  # nothing listens there
    d = discovery(stoppers, f"etcd://127.0.0.1:{port}{PREFIX}", rec, scan_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(PluginConnectionError) as err:
        d.scan()
    assert time.monotonic() - started < 2.5
    assert f"127.0.0.1:{port}" in str(err.value)
    assert rec.calls == []


def test_endpoints_are_tried_in_turn(etcd_server: EtcdServer, stoppers: list[Any]) -> None:
    location = f"etcd://127.0.0.1:{free_port()},{etcd_server.endpoint}{PREFIX}"
    a = announcer(stoppers, location, k("a"), b"1", ttl=2, start_timeout=5)
    a.start()
    assert etcd_server.get(k("a")) == b"1"
    rec = Recorder()
    d = discovery(stoppers, location, rec, reconnect_max_delay=0.2)
    d.start()
    wait_for(lambda: rec.changed() == [k("a")])
    d.scan()
    assert rec.changed() == [k("a")]


# -- announcing --------------------------------------------------------------------------------


def test_announcer_keeps_its_key_beyond_the_ttl(
    etcd_server: EtcdServer, stoppers: list[Any]
) -> None:
    rec = Recorder()
    d = discovery(stoppers, etcd_server.location(PREFIX), rec)
    d.start()
    a = announcer(stoppers, etcd_server.location(PREFIX), k("alive"), b"v1", ttl=2)
    a.start()
    assert a.mode == "announced"
    assert etcd_server.get(k("alive")) == b"v1"
    wait_for(lambda: rec.changed() == [k("alive")])
    # Observe for well past the TTL: the key must stay, and its lease be renewed.
    until = time.monotonic() + 2 * a.ttl
    while time.monotonic() < until:
        assert etcd_server.get(k("alive")) == b"v1"
        time.sleep(0.2)
    assert etcd_server.lease_ttl(a.lease_id) > 0
    assert rec.removed() == []

    assert a.update(b"v2")
    assert etcd_server.get(k("alive")) == b"v2"
    wait_for(lambda: rec.changed() == [k("alive"), k("alive")])
    assert d.read(k("alive")) == b"v2"


def test_lease_gone_means_a_new_lease_and_the_key_again(
    etcd_server: EtcdServer, stoppers: list[Any]
) -> None:
    rec = Recorder()
    d = discovery(stoppers, etcd_server.location(PREFIX), rec)
    d.start()
    a = announcer(stoppers, etcd_server.location(PREFIX), k("phoenix"), b"v", ttl=3)
    a.start()
    first = a.lease_id
    etcd_server.revoke(first)  # behind its back: its next keepalive is answered with TTL 0
    wait_for(lambda: k("phoenix") in rec.removed())
    wait_for(lambda: a.lease_id not in (first, None) and etcd_server.get(k("phoenix")) == b"v")
    wait_for(lambda: rec.changed() == [k("phoenix"), k("phoenix")])
    assert d.read(k("phoenix")) == b"v"
    assert etcd_server.lease_ttl(a.lease_id) > 0


def test_stop_revokes_the_lease(etcd_server: EtcdServer, stoppers: list[Any]) -> None:
    a = announcer(stoppers, etcd_server.location(PREFIX), k("brief"), b"v", ttl=30)
    a.start()
    lease = a.lease_id
    started = time.monotonic()
    a.stop()
    assert time.monotonic() - started < 2.5
    assert etcd_server.get(k("brief")) is None  # at once, not after the 30 s TTL
    assert etcd_server.lease_ttl(lease) == -1
    assert a.mode == "stopped"


def test_start_without_etcd_fails_clearly_in_time(stoppers: list[Any]) -> None:
    port = free_port()
    a = announcer(stoppers, f"etcd://127.0.0.1:{port}{PREFIX}", k("a"), b"v", start_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(PluginConnectionError) as err:
        a.start()
    assert time.monotonic() - started < 2.5
    assert f"127.0.0.1:{port}" in str(err.value)
    assert "refused" in str(err.value).lower()


# -- outages -----------------------------------------------------------------------------------


def test_etcd_down_removes_nothing_and_watching_resumes(
    etcd_server: EtcdServer, stoppers: list[Any]
) -> None:
    etcd_server.put(k("plain"), b"1")
    rec = Recorder()
    d = discovery(stoppers, etcd_server.location(PREFIX), rec, reconnect_max_delay=0.3)
    d.start()
    a = announcer(
        stoppers, etcd_server.location(PREFIX), k("leased"), b"2", ttl=2, reconnect_max_delay=0.3
    )
    a.start()
    wait_for(lambda: sorted(rec.changed()) == [k("leased"), k("plain")])

    etcd_server.stop()
    wait_for(lambda: d.mode == "reconnecting" and a.mode == "reconnecting")
    # An outage longer than the lease TTL: still nothing may be reported removed.
    until = time.monotonic() + a.ttl + 0.5
    while time.monotonic() < until:
        assert rec.removed() == []
        time.sleep(0.1)
    assert d.read(k("plain")) == b"1"

    etcd_server.restart()
    wait_for(lambda: d.mode == "watching" and a.mode == "announced", timeout=5)
    etcd_server.put(k("new"), b"3")
    wait_for(lambda: k("new") in rec.changed())
    # etcd extends leases when it comes back: the announcer renewed its lease in time.
    assert etcd_server.get(k("leased")) == b"2"
    assert rec.removed() == []
    assert d.keys() == [k("leased"), k("new"), k("plain")]


def test_compacted_while_away_lists_again_and_reconciles(
    etcd_server: EtcdServer, stoppers: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("keep", "change", "gone"):
        etcd_server.put(k(name), b"1")
    lease = etcd_server.grant(2)
    etcd_server.put(k("leased"), b"1", lease=lease)
    rec = Recorder()
    d = discovery(stoppers, etcd_server.location(PREFIX), rec, reconnect_max_delay=0.3)
    d.start()
    assert sorted(rec.changed()) == sorted(k(n) for n in ("keep", "change", "gone", "leased"))

    caplog.set_level(logging.INFO, logger="goplug.etcd")
    with etcd_server.hidden():
        wait_for(lambda: d.mode == "reconnecting")
        etcd_server.delete(k("gone"))
        etcd_server.put(k("change"), b"2")
        etcd_server.put(k("new"), b"1")
        # The lease of a plugin that died during the partition runs out meanwhile.
        wait_for(lambda: etcd_server.get(k("leased")) is None, timeout=5)
        etcd_server.compact()
        assert rec.removed() == []

    wait_for(lambda: d.mode == "watching", timeout=5)
    wait_for(lambda: len(rec.removed()) == 2)
    assert sorted(rec.removed()) == [k("gone"), k("leased")]
    assert sorted(rec.changed()[4:]) == [k("change"), k("new")]
    assert d.keys() == [k("change"), k("keep"), k("new")]
    assert d.read(k("change")) == b"2"
    assert "compacted" in caplog.text


# -- TLS to etcd -------------------------------------------------------------------------------


def test_tls_to_etcd_with_client_certificates(
    etcd_tls_server: EtcdServer, stoppers: list[Any], tmp_path: Any
) -> None:
    tls = etcd_tls_server.tls
    assert tls is not None
    location = etcd_tls_server.location(PREFIX)
    assert location.startswith("etcds://")
    rec = Recorder()
    d = discovery(stoppers, location, rec, tls=tls.client)
    d.start()
    assert d.mode == "watching"
    a = announcer(stoppers, location, k("secure"), b"s", ttl=2, tls=tls.client)
    a.start()
    wait_for(lambda: rec.changed() == [k("secure")])
    assert d.read(k("secure")) == b"s"

    # Certificates from another CA: etcd refuses the handshake, and both sides say so in time.
    stranger = TLSFiles(tmp_path / "stranger").client
    b = announcer(stoppers, location, k("intruder"), b"x", tls=stranger, start_timeout=1.0)
    with pytest.raises(PluginConnectionError, match=etcd_tls_server.endpoint):
        b.start()
    d2 = discovery(stoppers, location, Recorder(), tls=stranger, scan_timeout=1.0)
    with pytest.raises(PluginConnectionError, match=etcd_tls_server.endpoint):
        d2.scan()
    # Plaintext to a TLS etcd fails the same way, not by hanging.
    plain = location.replace("etcds://", "etcd://")
    c = announcer(stoppers, plain, k("plain"), b"x", start_timeout=1.0)
    with pytest.raises(PluginConnectionError, match=etcd_tls_server.endpoint):
        c.start()
    assert d.keys() == [k("secure")]
