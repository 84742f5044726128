"""Unit tests of the `.pconf` announce file (goplug.wire.pconf): parsing, dumping, writing."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from goplug.discovery import DirectoryDiscovery
from goplug.errors import ConfigError
from goplug.transport import check_owner
from goplug.wire import pconf
from goplug.wire.pconf import (
    MAX_PCONF_BYTES,
    PluginConf,
    check_name,
    default_url,
    dump_pconf,
    file_stem,
    parse_pconf,
    write_atomically,
)

# The file the Go example plugin wrote (GOPLUG-WIRE-TRANSCRIPTS.md section 1), 110 bytes.
GO_PCONF_HEX = (
    "7b224e616d65223a22446f222c224e616d65537061636522"
    "3a2254657374222c2255726c223a22756e69783a2f2f5465"
    "7374446f222c22536f636b223a222f746d702f677072756e"
    "2f412f7265616c2f54657374446f2e736f636b222c224c61"
    "7a794c6f6164223a66616c73657d"
)
GO_PCONF = bytes.fromhex(GO_PCONF_HEX)

# The example in the seed README (spaces, a lower-case "sock", a trailing comma).
SEED_README_EXAMPLE = b"""{
"Name" : "NameOfPlugin",
"NameSpace" : "NamespaceOfPlugin",
"Url" : "unix://PluginUrl",
"sock" : "unixSockLocation.sock",
"LazyLoad" : false,
}
"""

BASE = {"Name": "Do", "NameSpace": "Test", "Url": "unix://TestDo", "Sock": "/run/TestDo.sock"}


def obj(**changes: Any) -> bytes:
    """BASE with keys changed (None) or removed (pass ``drop=[...]``)."""
    drop = changes.pop("drop", [])
    value = {k: v for k, v in BASE.items() if k not in drop}
    value.update(changes)
    return json.dumps(value).encode()


def test_the_go_written_file() -> None:
    assert len(GO_PCONF) == 110
    assert GO_PCONF.startswith(b'{"Name":"Do","NameSpace":"Test","Url":"unix://TestDo"')
    conf = parse_pconf(GO_PCONF, "/tmp/gprun/A/real/TestDo.pconf")
    assert conf == PluginConf(
        name="Do",
        namespace="Test",
        url="unix://TestDo",
        sock="/tmp/gprun/A/real/TestDo.sock",
        lazy_load=False,
        pid=None,
        protocol="",
        path="/tmp/gprun/A/real/TestDo.pconf",
    )
    assert conf.identity == ("Test", "Do")
    assert conf.host == "TestDo" and conf.path_prefix == ""
    # goplug writes exactly what the Go plugin wrote.
    assert dump_pconf(conf) == GO_PCONF


# -- the transcripts' acceptance table, as goplug documents it (PROTOCOL.md section 2) ------------


def test_row_seed_readme_example_is_accepted() -> None:
    # Go rejects it (trailing comma); goplug deliberately accepts it.
    conf = parse_pconf(SEED_README_EXAMPLE, "/plugins/Example.pconf")
    assert conf.identity == ("NamespaceOfPlugin", "NameOfPlugin")
    assert conf.url == "unix://PluginUrl" and conf.host == "PluginUrl"
    assert conf.sock == "/plugins/unixSockLocation.sock"  # relative: next to the file
    assert conf.lazy_load is False


def test_row_all_keys_lower_case() -> None:
    data = b'{"name":"Do","namespace":"Test","url":"unix://TestDo","sock":"/s","lazyload":true}'
    conf = parse_pconf(data)
    assert (conf.name, conf.namespace, conf.url, conf.sock, conf.lazy_load) == (
        "Do",
        "Test",
        "unix://TestDo",
        "/s",
        True,
    )


@pytest.mark.parametrize(
    "keys",
    [
        ("NAME", "NAMESPACE", "URL", "SOCK", "LAZYLOAD", "PID", "PROTOCOL"),
        ("nAmE", "nameSPACE", "uRl", "sOcK", "lazyLoad", "pId", "protoCOL"),
    ],
)
def test_keys_are_case_insensitive(keys: tuple[str, ...]) -> None:
    values = ["Do", "Test", "unix://x/base", "/s", True, 42, "goplug/1"]
    conf = parse_pconf(json.dumps(dict(zip(keys, values, strict=True))).encode())
    assert (conf.name, conf.namespace, conf.url, conf.sock) == ("Do", "Test", "unix://x/base", "/s")
    assert (conf.lazy_load, conf.pid, conf.protocol) == (True, 42, "goplug/1")


def test_row_extra_unknown_key_is_ignored() -> None:
    assert parse_pconf(obj(Extra=[1, 2])) == parse_pconf(obj())


def test_row_garbage_after_the_object_is_ignored() -> None:
    assert parse_pconf(obj() + b"garbage!!") == parse_pconf(obj())
    assert parse_pconf(obj() + b"\n{also ignored") == parse_pconf(obj())
    assert parse_pconf(obj() + b'{"Name":"Other","Sock":"/o"}').name == "Do"


def test_non_utf8_garbage_after_the_object_is_ignored() -> None:
    assert parse_pconf(obj() + b"\xff\xfe").name == "Do"


def test_row_lazyload_as_a_string_is_rejected() -> None:
    with pytest.raises(ConfigError, match="LazyLoad"):
        parse_pconf(obj(LazyLoad="false"))


def test_row_nulls_mean_defaults() -> None:
    conf = parse_pconf(obj(Url=None, LazyLoad=None, NameSpace=None, Pid=None, Protocol=None))
    assert conf.url == "unix://Do"  # the namespace became "" too
    assert (conf.namespace, conf.lazy_load, conf.pid, conf.protocol) == ("", False, None, "")
    conf = parse_pconf(obj(Url=None, LazyLoad=None))
    assert conf.url == "unix://TestDo" and conf.host == "TestDo" and conf.lazy_load is False


def test_row_no_url_key_gives_the_default_url() -> None:
    conf = parse_pconf(obj(drop=["Url"]))
    assert conf.url == "unix://TestDo" and conf.host == "TestDo" and conf.path_prefix == ""
    assert parse_pconf(obj(Url="")).url == "unix://TestDo"


def test_row_url_with_another_host_and_a_path() -> None:
    conf = parse_pconf(obj(Url="http://otherhost:99/base"))
    assert conf.host == "otherhost:99" and conf.path_prefix == "/base"
    assert conf.sock == "/run/TestDo.sock"  # the socket still comes from Sock
    assert parse_pconf(obj(Url="unix://x/base/")).path_prefix == "/base"
    assert parse_pconf(obj(Url="unix://x/a/b")).path_prefix == "/a/b"
    assert parse_pconf(obj(Url="unix://x/")).path_prefix == ""


@pytest.mark.parametrize("url", ["unix://Test Do%zz", "unix://x/a b", "http://[::1", "unix://é"])
def test_row_url_that_does_not_parse_is_rejected(url: str) -> None:
    # Go discovers such a plugin and then fails every request; goplug refuses the file.
    with pytest.raises(ConfigError, match="Url"):
        parse_pconf(obj(Url=url), "/d/x.pconf")


def test_row_missing_sock_is_rejected() -> None:
    with pytest.raises(ConfigError, match="Sock"):
        parse_pconf(obj(drop=["Sock"]))
    with pytest.raises(ConfigError, match="Sock"):
        parse_pconf(obj(Sock=""))
    with pytest.raises(ConfigError, match="Sock"):
        parse_pconf(obj(Sock=None))


def test_row_bom_is_accepted() -> None:
    assert parse_pconf(b"\xef\xbb\xbf" + GO_PCONF) == parse_pconf(GO_PCONF)
    assert parse_pconf(b"\xef\xbb\xbf \n\t" + GO_PCONF + b"\n") == parse_pconf(GO_PCONF)


@pytest.mark.parametrize("data", [b"", b"   \n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n"])
def test_row_empty_file_is_rejected(data: bytes) -> None:
    with pytest.raises(ConfigError, match="empty") as info:
        parse_pconf(data, "/d/TestDo.pconf")
    assert info.value.path == "/d/TestDo.pconf"


def test_row_identity_comes_from_the_contents() -> None:
    conf = parse_pconf(GO_PCONF, "/d/whatever.pconf")
    assert conf.identity == ("Test", "Do") and conf.path == "/d/whatever.pconf"


@pytest.mark.parametrize(
    ("name", "matches"),
    [
        ("TestDo.pconf", True),
        ("TestDo.json.pconf", True),  # only the last extension counts
        ("Do@Test.pconf", True),
        ("TestDo.PCONF", False),  # case-sensitive
        ("TestDo.pconf.bak", False),
        ("TestDo.pconfx", False),
        (".pconf", False),
        (".Do.tmp", False),  # write_atomically's temporary names
        (".hidden.pconf", False),
    ],
)
def test_rows_on_file_names(tmp_path: Path, name: str, matches: bool) -> None:
    watcher = DirectoryDiscovery(str(tmp_path), ".pconf", lambda changed, removed: None)
    assert watcher.matches(str(tmp_path / name)) is matches


def test_row_a_directory_named_pconf_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "dir.pconf").mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        check_owner(str(tmp_path / "dir.pconf"), frozenset({os.getuid()}), "announce file", False)


# -- wrong types, missing keys, invalid names ------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"Name": 5},
        {"Name": ["Do"]},
        {"NameSpace": 0},
        {"Url": True},
        {"Sock": {"path": "/s"}},
        {"LazyLoad": 0},
        {"LazyLoad": "true"},
        {"Pid": "4242"},
        {"Pid": 42.0},
        {"Pid": True},
        {"Protocol": 1},
    ],
)
def test_wrong_types_are_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="must be a") as info:
        parse_pconf(obj(**changes), "/d/x.pconf")
    assert info.value.path == "/d/x.pconf"


@pytest.mark.parametrize("drop", [["Name"], ["Name", "NameSpace"]])
def test_missing_name_is_rejected(drop: list[str]) -> None:
    with pytest.raises(ConfigError, match="Name"):
        parse_pconf(obj(drop=drop))
    with pytest.raises(ConfigError, match="Name"):
        parse_pconf(obj(Name=""))


@pytest.mark.parametrize(
    "bad",
    ["a/b", "/", "..", ".", "a\x00b", "\x00", "a\nb", "a\x1fb", "tab\there", "del\x7f"],
)
@pytest.mark.parametrize("key", ["Name", "NameSpace"])
def test_invalid_names_are_rejected(key: str, bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_pconf(obj(**{key: bad}))


def test_invalid_name_error_names_the_file() -> None:
    with pytest.raises(ConfigError) as info:
        parse_pconf(obj(Name="a/b"), "/d/x.pconf")
    assert info.value.path == "/d/x.pconf"


def test_names_a_registry_accepts() -> None:
    for name in ("main.Do", "Do@Test", "...", "a.b", "é", "a b", "x" * 300):
        assert parse_pconf(obj(Name=name)).name == name
    assert parse_pconf(obj(NameSpace="")).identity == ("", "Do")


def test_sock_with_nul_is_rejected_and_relative_sock_is_resolved() -> None:
    with pytest.raises(ConfigError, match="NUL"):
        parse_pconf(obj(Sock="/run/a\x00b"))
    assert parse_pconf(obj(Sock="sub/Do.sock"), "/plugins/Do.pconf").sock == "/plugins/sub/Do.sock"


@pytest.mark.parametrize(
    "data",
    [
        b"[]",
        b'"Name"',
        b"null",
        b"42",
        b"{",
        b'{"Name":"Do",',
        b"\xff\xfe{}",
        b"{'Name': 'Do'}",
        b'{"Name":"Do","Sock":"/s",,}',
    ],
)
def test_not_an_object_is_rejected(data: bytes) -> None:
    with pytest.raises(ConfigError):
        parse_pconf(data, "/d/x.pconf")


@pytest.mark.parametrize(
    "data",
    [
        b'{"Name":"Do","Sock":"/s",}',
        b'{"Name":"Do","Sock":"/s" , \n }',
        b'{"Name":"Do","Sock":"/s","Extra":[1,2,],}',
    ],
)
def test_trailing_commas_are_tolerated(data: bytes) -> None:
    conf = parse_pconf(data)
    assert (conf.name, conf.sock) == ("Do", "/s")


def test_trailing_comma_repair_leaves_strings_alone() -> None:
    assert parse_pconf(b'{"Name":"Do","Sock":"/tmp/a,]b",}').sock == "/tmp/a,]b"


def test_deeply_nested_json_is_a_config_error() -> None:
    data = b'{"Name":"Do","Sock":"/s","Extra":' + b"[" * 5000
    assert len(data) < MAX_PCONF_BYTES
    with pytest.raises(ConfigError):
        parse_pconf(data, "/d/x.pconf")


def test_size_limit() -> None:
    at_limit = GO_PCONF + b" " * (MAX_PCONF_BYTES - len(GO_PCONF))
    assert len(at_limit) == MAX_PCONF_BYTES
    assert parse_pconf(at_limit).name == "Do"
    with pytest.raises(ConfigError, match="larger") as info:
        parse_pconf(at_limit + b" ", "/d/big.pconf")
    assert info.value.path == "/d/big.pconf"


def test_error_messages_name_the_file() -> None:
    with pytest.raises(ConfigError) as info:
        parse_pconf(b"{", "/d/x.pconf")
    assert str(info.value).startswith("/d/x.pconf: ") and info.value.reason
    with pytest.raises(ConfigError) as info:
        parse_pconf(b"{")
    assert info.value.path is None or info.value.path == ""


# -- check_name and file names ---------------------------------------------------------------------


def test_check_name_registry_and_plugin_side() -> None:
    check_name("Do", "name")
    check_name("", "namespace")
    check_name("Do@Test", "name")  # a registry allows '@'
    with pytest.raises(ConfigError, match="@"):
        check_name("Do@Test", "name", plugin_side=True)
    with pytest.raises(ConfigError, match="@"):
        check_name("a@b", "namespace", plugin_side=True)
    with pytest.raises(ConfigError, match="empty"):
        check_name("", "name")
    check_name("", "namespace", plugin_side=True)
    for bad in ("a/b", ".", "..", "a\x00", "\x01", "\x7f"):
        for side in (False, True):
            with pytest.raises(ConfigError):
                check_name(bad, "name", plugin_side=side)


def test_file_stem() -> None:
    assert file_stem("Do", "Test") == "Do@Test"
    assert file_stem("Do", "") == "Do"


# -- dump_pconf ----------------------------------------------------------------------------------


def test_dump_key_order_and_compactness() -> None:
    conf = PluginConf(
        "Do", "Test", "unix://TestDo", "/abs/dir/Do@Test.sock", False, 4242, "goplug/1"
    )
    assert dump_pconf(conf) == (
        b'{"Name":"Do","NameSpace":"Test","Url":"unix://TestDo",'
        b'"Sock":"/abs/dir/Do@Test.sock","LazyLoad":false,"Pid":4242,"Protocol":"goplug/1"}'
    )
    bare = PluginConf("Do", "", "unix://Do", "/s", True)
    assert dump_pconf(bare) == (
        b'{"Name":"Do","NameSpace":"","Url":"unix://Do","Sock":"/s","LazyLoad":true}'
    )
    assert b"\n" not in dump_pconf(conf) and b" " not in dump_pconf(conf)


def test_dump_parse_round_trip_of_examples() -> None:
    for data in (GO_PCONF, SEED_README_EXAMPLE, obj(Url="http://otherhost:99/base", Pid=7)):
        conf = parse_pconf(data, "/plugins/x.pconf")
        again = parse_pconf(dump_pconf(conf), "/plugins/x.pconf")
        assert again == conf


names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/"),
    min_size=1,
    max_size=20,
).filter(lambda s: s not in (".", ".."))


@settings(max_examples=150, deadline=None)
@given(
    name=names,
    namespace=st.one_of(st.just(""), names),
    url=st.sampled_from(["unix://TestDo", "http://otherhost:99/base", "unix://x/a/b/"]),
    sock=st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s).map(lambda s: "/" + s),
    lazy=st.booleans(),
    pid=st.one_of(st.none(), st.integers(-(2**63), 2**63)),
    protocol=st.sampled_from(["", "goplug/1", "x"]),
)
def test_dump_parse_round_trip(
    name: str, namespace: str, url: str, sock: str, lazy: bool, pid: int | None, protocol: str
) -> None:
    first = parse_pconf(
        json.dumps(
            {
                "Name": name,
                "NameSpace": namespace,
                "Url": url,
                "Sock": sock,
                "LazyLoad": lazy,
                "Pid": pid,
                "Protocol": protocol,
            }
        ).encode()
    )
    assert (first.name, first.namespace, first.sock, first.lazy_load) == (
        name,
        namespace,
        sock,
        lazy,
    )
    assert (first.pid, first.protocol) == (pid, protocol)
    dumped = dump_pconf(first)
    assert parse_pconf(dumped) == first
    assert dump_pconf(parse_pconf(dumped)) == dumped
    assert list(json.loads(dumped))[:5] == ["Name", "NameSpace", "Url", "Sock", "LazyLoad"]


safe_names = st.text(alphabet="abcXYZ019._-@:~!$&'()*+,;=", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)


@settings(max_examples=100, deadline=None)
@given(name=safe_names, namespace=st.one_of(st.just(""), safe_names))
def test_default_url_round_trip(name: str, namespace: str) -> None:
    conf = parse_pconf(json.dumps({"Name": name, "NameSpace": namespace, "Sock": "/s"}).encode())
    assert conf.url == default_url(name, namespace) == f"unix://{namespace}{name}"
    assert parse_pconf(dump_pconf(conf)) == conf


@pytest.mark.parametrize("name", ["my plugin", "caf\xe9", "a[b"])
def test_names_check_name_accepts_survive_the_default_url(name: str) -> None:
    check_name(name, "name", plugin_side=True)
    conf = PluginConf(name, "", default_url(name, ""), "/run/x.sock")
    assert parse_pconf(dump_pconf(conf)) == conf


# -- write_atomically ----------------------------------------------------------------------------


def test_write_atomically_mode_and_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "Do@Test.pconf"
    old_umask = os.umask(0)
    try:
        write_atomically(str(target), GO_PCONF)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == GO_PCONF
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["Do@Test.pconf"]
    write_atomically(str(target), b"{}", mode=0o640)
    assert target.read_bytes() == b"{}" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["Do@Test.pconf"]


def test_write_atomically_replaces_by_rename(tmp_path: Path) -> None:
    target = tmp_path / "Do.pconf"
    target.write_bytes(b"old contents")
    with open(target, "rb") as reader:  # a reader that opened the old file keeps seeing it whole
        write_atomically(str(target), GO_PCONF)
        assert reader.read() == b"old contents"
    assert target.read_bytes() == GO_PCONF


def test_write_atomically_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_atomically("Do.pconf", b"x")
    assert os.listdir(".") == ["Do.pconf"]


def test_temporary_name_is_never_an_announce_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(pconf.os, "replace", spy)
    target = tmp_path / "Do.pconf"
    write_atomically(str(target), GO_PCONF)
    ((src, dst),) = seen
    assert dst == str(target)
    assert os.path.dirname(src) == str(tmp_path)  # same directory: rename is atomic
    base = os.path.basename(src)
    assert base.startswith(".") and base.endswith(".tmp")
    watcher = DirectoryDiscovery(str(tmp_path), ".pconf", lambda changed, removed: None)
    assert not watcher.matches(src)


def test_data_that_cannot_be_written_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "Do.pconf"
    with pytest.raises(TypeError):
        write_atomically(str(target), object())  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []
    target.write_bytes(GO_PCONF)
    with pytest.raises(TypeError):
        write_atomically(str(target), "not bytes")  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == ["Do.pconf"] and target.read_bytes() == GO_PCONF


def test_crash_mid_write_never_leaves_a_partial_pconf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "Do.pconf"
    target.write_bytes(GO_PCONF)
    real_write = os.write
    calls = []

    def half_then_fail(fd: int, data: Any) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pconf.os, "write", half_then_fail)
    new = obj(Name="New")
    with pytest.raises(OSError, match="No space"):
        write_atomically(str(target), new)
    monkeypatch.undo()
    assert len(calls) == 2  # the first write was short, the loop continued
    assert os.listdir(tmp_path) == ["Do.pconf"] and target.read_bytes() == GO_PCONF


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def three_bytes(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[:3]))

    monkeypatch.setattr(pconf.os, "write", three_bytes)
    write_atomically(str(tmp_path / "Do.pconf"), GO_PCONF)
    monkeypatch.undo()
    assert (tmp_path / "Do.pconf").read_bytes() == GO_PCONF


def test_failed_rename_leaves_no_temp_file(tmp_path: Path) -> None:
    (tmp_path / "Do.pconf").mkdir()  # rename over a directory fails
    with pytest.raises(OSError):
        write_atomically(str(tmp_path / "Do.pconf"), GO_PCONF)
    assert os.listdir(tmp_path) == ["Do.pconf"]


def test_interrupt_mid_write_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(fd: int, data: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(pconf.os, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(str(tmp_path / "Do.pconf"), GO_PCONF)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


# -- properties ----------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
pconf_keys = st.one_of(
    st.sampled_from(
        [
            "Name",
            "name",
            "NAME",
            "NameSpace",
            "Url",
            "url",
            "Sock",
            "sock",
            "LazyLoad",
            "lazyload",
            "Pid",
            "Protocol",
            "Extra",
        ]
    ),
    st.text(max_size=10),
)
pconf_values = st.one_of(
    json_values,
    st.sampled_from(["Do", "Test", "/s", "unix://TestDo", "http://h:1/b", "", "..", "a/b"]),
)


def _parse_or_config_error(data: bytes) -> None:
    try:
        conf = parse_pconf(data, "/d/x.pconf")
    except ConfigError as exc:
        assert exc.reason
        return
    assert isinstance(conf, PluginConf)
    assert conf.name and conf.sock.startswith("/")
    check_name(conf.name, "name")
    check_name(conf.namespace, "namespace")
    assert isinstance(conf.lazy_load, bool) and isinstance(conf.url, str) and conf.host.isascii()


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=30).map(lambda b: GO_PCONF[:50] + b)))
def test_arbitrary_bytes_give_a_conf_or_a_config_error(data: bytes) -> None:
    _parse_or_config_error(data)


@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(st.dictionaries(pconf_keys, pconf_values, max_size=8), json_values),
    trailer=st.sampled_from([b"", b"\n", b"garbage", b",}", b"\xef\xbb\xbf"]),
    bom=st.booleans(),
    indent=st.sampled_from([None, 1]),
)
def test_arbitrary_json_gives_a_conf_or_a_config_error(
    value: Any, trailer: bytes, bom: bool, indent: int | None
) -> None:
    data = json.dumps(value, indent=indent).encode() + trailer
    _parse_or_config_error((b"\xef\xbb\xbf" if bom else b"") + data)
