"""--chown/--chmod/--mkdir: parsing refuses hostile values with hints, rules resolve as
documented, owners reach the tar headers, the customisation layer gets the directories,
--user nobody gets 65534, and an image without contents still has a PATH."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from stowaway.buildkit.context import make_context
from stowaway.errors import StowawayError
from stowaway.image.config import (
    DEFAULT_PATH,
    ImageOptionError,
    ImageOptions,
    bin_dirs_of,
    build_config,
    parse_user,
    plan_customisation,
)
from stowaway.image.model import TarEntry
from stowaway.image.ownership import (
    MAX_ID,
    MkdirSpec,
    OwnershipError,
    RuleSet,
    parse_chmod,
    parse_chown,
    parse_mkdir,
    rules_from,
)
from stowaway.image.tar import write_tar
from stowaway.store.local import LocalStore

APP_VAR = "^/nix/store/[^/]+-app/var(/.*)?$"


@pytest.fixture(scope="module")
def busybox(demo_closure: list[str]) -> str:
    return next(p for p in demo_closure if p.endswith("-busybox"))


def test_chown_and_chmod_parse() -> None:
    rule = parse_chown(f"{APP_VAR}=1000:100")
    assert (rule.kind, rule.pattern, rule.uid, rule.gid) == ("chown", APP_VAR, 1000, 100)
    assert rule.describe() == f"--chown '{APP_VAR}=1000:100'"
    assert parse_chown(f"/a=b=0:{MAX_ID}").pattern == "/a=b"  # the last '=' separates
    mode = parse_chmod("/srv(/.*)?=755")
    assert (mode.kind, mode.mode, mode.value) == ("chmod", 0o755, "0755")
    assert parse_chmod("/tmp/x=1777").mode == 0o1777  # sticky is fine
    assert parse_chmod("/x=4755", allow_setid=True).mode == 0o4755


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("noequals", "must look like REGEX=UID:GID"),
        ("=1:1", "must look like REGEX=UID:GID"),
        ("/x=1000", "must be UID:GID"),
        ("/x=app:app", "is not a number"),
        ("/x=-1:0", "is not a number"),
        (f"/x=0:{MAX_ID + 1}", "is not a number"),
        ("/x=0:99999999999", "is not a number"),
        ("/x=١٢:0", "is not a number"),  # non-ASCII digits
        ("/x(=0:0", "invalid regular expression"),
        ("/x\0=0:0", "contains a NUL"),
        ("x" * 1025 + "=0:0", "longer than 1024"),
    ],
)
def test_chown_refusals(value: str, message: str) -> None:
    with pytest.raises(OwnershipError, match=message) as info:
        parse_chown(value)
    assert info.value.hint or "invalid" not in message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/x", "must look like REGEX=MODE"),
        ("/x=rwx", "is not an octal mode"),
        ("/x=0o755", "is not an octal mode"),
        ("/x=75", "is not an octal mode"),
        ("/x=10755", "is not an octal mode"),
        ("/x=0789", "is not an octal mode"),
        ("/x=4755", "setuid/setgid"),
        ("/x=2775", "setuid/setgid"),
        ("[=0755", "invalid regular expression"),
    ],
)
def test_chmod_refusals(value: str, message: str) -> None:
    with pytest.raises(OwnershipError, match=message) as info:
        parse_chmod(value)
    assert info.value.hint


def test_mkdir_parse() -> None:
    assert parse_mkdir("/var/lib/app") == MkdirSpec("/var/lib/app")
    assert parse_mkdir("/home/app:1000:1000") == MkdirSpec("/home/app", 1000, 1000, None)
    assert parse_mkdir("/srv:0:0:0700") == MkdirSpec("/srv", 0, 0, 0o700)
    assert parse_mkdir("/shared:0:50:2775", allow_setid=True).mode == 0o2775


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("var/lib/app", "not an absolute path"),
        ("/", "not an absolute path"),
        ("/var/../etc", "not normalised"),
        ("/var/./lib", "not normalised"),
        ("/var//lib", "not normalised"),
        ("//var", "not normalised"),
        ("/var/lib/", "not normalised"),
        ("/nix/store/x", "is under /nix"),
        ("/nix", "is under /nix"),
        ("/var:1000", "must look like PATH"),
        ("/var:1:2:3:4", "must look like PATH"),
        ("/var:x:1", "is not a number"),
        ("/var:1:1:999", "is not an octal mode"),
        ("/var:1:1:4755", "setuid/setgid"),
        ("/" + "a" * 4001, "too long"),
        ("/v\0r", "NUL"),
    ],
)
def test_mkdir_refusals(value: str, message: str) -> None:
    with pytest.raises(OwnershipError, match=message) as info:
        parse_mkdir(value)
    assert info.value.hint


def test_first_matching_rule_of_each_kind_wins_on_whole_paths() -> None:
    rules = RuleSet(
        rules_from(
            ["/srv/app/data(/.*)?=2:2", "/srv(/.*)?=1:1", "/srv/app=9:9"],
            ["/srv/app/data/.*=0600", "/srv(/.*)?=0750"],
            allow_setid=False,
        )
    )
    assert rules.resolve(b"srv/app/data/f", "regular", 0o444) == (0o600, 2, 2, {0, 3})
    assert rules.resolve(b"srv/app", "directory", 0o555) == (0o750, 1, 1, {1, 4})  # not 9:9
    assert rules.resolve(b"srv/app/data", "directory", 0o555) == (0o750, 2, 2, {0, 4})
    # a symlink changes owner, never mode
    assert rules.resolve(b"srv/link", "symlink", 0o777) == (0o777, 1, 1, {1})
    # whole-path matching: "srv" alone matches no deeper path and nothing else
    only = RuleSet([parse_chown("srv=5:5"), parse_chown("/srv=5:5")])
    assert only.resolve(b"srv/x", "regular", 0o444) == (0o444, 0, 0, set())
    assert only.resolve(b"srv", "directory", 0o755)[1:] == (5, 5, {1})
    # /nix and /nix/store are in every store layer: never matched
    everything = RuleSet([parse_chown(".*=7:7")])
    for name in (b"nix", b"nix/store"):
        assert everything.resolve(name, "directory", 0o755) == (0o755, 0, 0, set())
    assert everything.resolve(b"nix/store/x-a", "directory", 0o555)[1:3] == (7, 7)


def test_rule_keys_are_canonical_and_ordered() -> None:
    a, b = parse_chown("/a=1:1"), parse_chmod("/b=644")
    one, two = RuleSet([a, b]), RuleSet([parse_chown("/z=3:3"), a, b])
    assert (
        one.key_doc({0, 1})
        == two.key_doc({1, 2})
        == [
            ["chown", "/a", "1:1"],
            ["chmod", "/b", "0644"],
        ]
    )
    assert one.digest({0}) == two.digest({1}) != one.digest({0, 1})
    assert one.unused({1}) == [a]


def _members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_owners_and_modes_reach_the_tar_headers() -> None:
    entries = [
        TarEntry(b"nix", "directory", 0o755),
        TarEntry(b"srv", "directory", 0o555),
        TarEntry(b"srv/f", "regular", 0o444, 2, chunks=iter((b"hi",))),
        TarEntry(b"srv/l", "symlink", 0o777, target=b"f"),
        TarEntry(b"big", "regular", 0o444, 0),
    ]
    rules = RuleSet(rules_from(["/srv(/.*)?=1000:100", f"/big={MAX_ID}:{2**21}"],
                               ["/srv=0750", "/srv/.*=0640"], allow_setid=False))  # fmt: skip
    touched: set[int] = set()
    data = b"".join(write_tar(rules.apply(entries, touched), mtime=1))
    assert touched == {0, 1, 2, 3}
    got = {n: (m.mode, m.uid, m.gid) for n, m in _members(data).items()}
    assert got == {
        "nix": (0o755, 0, 0),
        "srv": (0o750, 1000, 100),
        "srv/f": (0o640, 1000, 100),
        "srv/l": (0o777, 1000, 100),
        "big": (0o444, MAX_ID, 2**21),  # beyond 7 octal digits: base-256, read back right
    }
    plain = b"".join(write_tar(iter([TarEntry(b"srv", "directory", 0o555)]), mtime=1))
    assert plain == b"".join(write_tar(RuleSet().apply([TarEntry(b"srv", "directory", 0o555)],
                                                       set()), mtime=1))  # fmt: skip


def test_nobody_gets_the_conventional_ids(local_store: LocalStore) -> None:
    spec = parse_user("nobody")
    assert (spec.name, spec.uid, spec.group, spec.gid) == ("nobody", 65534, "nogroup", 65534)
    assert parse_user("65534").name == "nobody"
    assert parse_user("65534").group == "nogroup"
    assert parse_user("app:nogroup").gid == 65534
    assert parse_user("app").uid == 1000  # others as before
    custom = plan_customisation(ImageOptions(user="nobody"), local_store)
    files = {m.name: m.data for m in custom.members}
    assert b"nobody:x:65534:65534::/tmp:/bin/sh\n" in files[b"etc/passwd"]
    assert files[b"etc/group"].endswith(b"nogroup:x:65534:\n")
    config = json.loads(build_config(ImageOptions(user="nobody"), [], []))
    assert config["config"]["User"] == "65534:65534"


def test_mkdir_dirs_are_owned_by_the_user_with_their_parents(local_store: LocalStore) -> None:
    options = ImageOptions(
        user="nobody",
        mkdirs=[parse_mkdir("/var/lib/app"), parse_mkdir("/home/app:1000:1000:0700")],
    )
    custom = plan_customisation(options, local_store)
    got = {m.name: (m.kind, m.mode, m.uid, m.gid) for m in custom.members}
    assert got[b"var"] == got[b"var/lib"] == ("directory", 0o755, 0, 0)
    assert got[b"var/lib/app"] == ("directory", 0o755, 65534, 65534)
    assert got[b"home/app"] == ("directory", 0o700, 1000, 1000)
    data = b"".join(write_tar(custom.entries(), mtime=1))
    assert _members(data)["var/lib/app"].uid == 65534
    plain = plan_customisation(ImageOptions(user="nobody"), local_store)
    assert custom.key != plain.key
    # without --user: root's; /tmp may be re-owned; a file in the way is a conflict
    root = plan_customisation(ImageOptions(mkdirs=[parse_mkdir("/srv")]), local_store)
    assert {m.name: m.uid for m in root.members}[b"srv"] == 0
    tmp = plan_customisation(ImageOptions(mkdirs=[parse_mkdir("/tmp:5:5")]), local_store)
    assert {m.name: (m.mode, m.uid) for m in tmp.members}[b"tmp"] == (0o1777, 5)  # mode kept
    tmp = plan_customisation(ImageOptions(mkdirs=[parse_mkdir("/tmp:5:5:0700")]), local_store)
    assert {m.name: (m.mode, m.uid) for m in tmp.members}[b"tmp"] == (0o700, 5)
    with pytest.raises(ImageOptionError, match="already a regular"):
        plan_customisation(ImageOptions(mkdirs=[parse_mkdir("/etc/passwd/x")]), local_store)


def test_rules_apply_to_customisation_members(local_store: LocalStore, busybox: str) -> None:
    options = ImageOptions(
        contents=[busybox],
        mkdirs=[parse_mkdir("/var/lib/app")],
        rules=rules_from(
            ["/var/lib/app=42:42", "/bin/sh=1:1"], ["/etc/passwd=0600"], allow_setid=False
        ),  # fmt: skip
    )
    custom = plan_customisation(options, local_store)
    got = {m.name: (m.mode, m.uid, m.gid) for m in custom.members}
    assert got[b"var/lib/app"] == (0o755, 42, 42)  # rules have the last word
    assert got[b"bin/sh"] == (0o777, 1, 1)  # a link: owner only
    assert got[b"etc/passwd"] == (0o600, 0, 0)
    assert custom.touched == {0, 1, 2}


def test_path_without_contents_lists_the_roots_bin_dirs(
    local_store: LocalStore, demo_app: str, demo_closure: list[str], busybox: str
) -> None:
    greeting = next(p for p in demo_closure if p.endswith("-greeting-data"))
    assert bin_dirs_of(local_store, [demo_app, greeting, busybox, demo_app]) == [
        f"{demo_app}/bin",
        f"{busybox}/bin",
    ]
    doc = json.loads(build_config(ImageOptions(), [], [], bin_dirs=[f"{demo_app}/bin"]))
    assert doc["config"]["Env"] == [f"PATH={demo_app}/bin:{DEFAULT_PATH}"]
    doc = json.loads(build_config(ImageOptions(), [], [], bin_dirs=[]))
    assert doc["config"]["Env"] == [f"PATH={DEFAULT_PATH}"]
    mine = json.loads(build_config(ImageOptions(env=["PATH=/x"]), [], [], bin_dirs=["/y"]))
    assert mine["config"]["Env"] == ["PATH=/x"]


def test_the_buildkit_context_refuses_them_before_any_work(tmp_path: Path) -> None:
    for options in (
        ImageOptions(mkdirs=[parse_mkdir("/var/lib/app")]),
        ImageOptions(rules=[parse_chown("/x=1:1")]),
    ):
        with pytest.raises(StowawayError, match="not supported by the BuildKit frontend"):
            make_context(str(tmp_path / "missing.nix"), [], tmp_path / "ctx", options)
    assert not (tmp_path / "ctx").exists()
