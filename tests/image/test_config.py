"""Image options, customisation layer and config JSON, with a real local store."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nixtools import SANDBOXED_MK
from stowaway.image.config import (
    ImageOptionError,
    ImageOptions,
    UserSpec,
    build_config,
    parse_user,
    plan_customisation,
    rfc3339,
)
from stowaway.image.manifest import ManifestError, build_manifest
from stowaway.image.model import Blob, Layer, MediaType
from stowaway.store.local import LocalStore

CLASH_NIX = f"""{SANDBOXED_MK} "clash" ''
  mkdir -p $out/bin $out/etc; echo x > $out/bin/busybox; echo y > $out/etc/passwd
''
"""


@pytest.fixture(scope="module")
def store(local_store: LocalStore) -> LocalStore:
    return local_store


@pytest.fixture(scope="module")
def busybox(demo_closure: list[str]) -> str:
    return next(p for p in demo_closure if p.endswith("-busybox"))


@pytest.fixture(scope="module")
def clash(have_nix: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store path with bin/busybox and etc/passwd, to collide with."""
    expr = tmp_path_factory.mktemp("clash") / "clash.nix"
    expr.write_text(CLASH_NIX)
    out = subprocess.run(
        ["nix-build", str(expr), "--no-out-link"], check=True, capture_output=True, text=True
    )
    return out.stdout.split()[-1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"env": ["NOEQUALS"]}, "'NOEQUALS' must look like KEY=VALUE"),
        ({"env": ["=value"]}, "non-empty KEY"),
        ({"expose": ["http"]}, "'http' must look like PORT"),
        ({"expose": ["70000/tcp"]}, "1..65535"),
        ({"expose": ["53/icmp"]}, "53/icmp"),
        ({"workdir": "relative/dir"}, "must be an absolute path"),
        ({"user": "Bad User"}, "not a valid user/group name"),
        ({"user": "app:"}, "must look like NAME"),
        ({"contents": ["/usr/bin"]}, "not a store path"),
        ({"user": "app\n"}, "not a valid user/group name"),  # a line of its own in passwd
        ({"user": "\u00b2"}, "not a valid user/group name"),  # isdigit() but not int()
        ({"expose": ["80\n"]}, "must look like PORT"),
        ({"created": 999_999_999_999}, "year 9999"),
        ({"created": -1}, "between 1970"),
    ],
)
def test_bad_options_are_refused_with_the_value(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ImageOptionError, match=match):
        ImageOptions(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("user", "spec"),
    [
        ("app", UserSpec("app", 1000, "app", 1000)),
        ("app:app", UserSpec("app", 1000, "app", 1000)),
        ("app:staff", UserSpec("app", 1000, "staff", 1000)),
        ("1000:1000", UserSpec("user1000", 1000, "user1000", 1000)),
        ("1234:100", UserSpec("user1234", 1234, "group100", 100)),
        ("root", UserSpec("root", 0, "root", 0)),
        ("0:0", UserSpec("root", 0, "root", 0)),
    ],
)
def test_parse_user(user: str, spec: UserSpec) -> None:
    assert parse_user(user) == spec


def test_rfc3339() -> None:
    assert rfc3339(1) == "1970-01-01T00:00:01Z"
    assert rfc3339(1700000000) == "2023-11-14T22:13:20Z"


def test_config_json_is_canonical_and_complete() -> None:
    options = ImageOptions(
        entrypoint=["/bin/app"],
        cmd=["--serve"],
        env=["B=2", "A=1"],
        workdir="/srv",
        user="app",
        expose=["8080", "53/udp"],
        labels={"z": "1", "a": "2"},
        created=1700000000,
        architecture="arm64",
    )
    raw = build_config(options, ["sha256:" + "1" * 64], ["store paths: x"], "oci")
    assert raw == build_config(options, ["sha256:" + "1" * 64], ["store paths: x"], "docker")
    doc = json.loads(raw)
    assert raw == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert doc["created"] == "2023-11-14T22:13:20Z"
    assert (doc["architecture"], doc["os"]) == ("arm64", "linux")
    assert doc["config"] == {
        "Entrypoint": ["/bin/app"],
        "Cmd": ["--serve"],
        "Env": ["B=2", "A=1"],  # order kept: later entries may refer to earlier ones
        "WorkingDir": "/srv",
        "User": "1000:1000",  # numeric: kubelet's runAsNonRoot checks only numbers
        "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
        "Labels": {"a": "2", "z": "1"},
    }
    assert doc["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]}
    assert doc["history"] == [
        {"created": "2023-11-14T22:13:20Z", "created_by": "stowaway", "comment": "store paths: x"}
    ]


def test_default_path_only_with_contents_and_never_over_the_users(busybox: str) -> None:
    def env(**kw: object) -> list[str] | None:
        doc = json.loads(build_config(ImageOptions(**kw), [], [], "oci"))  # type: ignore[arg-type]
        return doc["config"].get("Env")  # type: ignore[no-any-return]

    assert env() is None
    with_contents = env(contents=[busybox])
    assert with_contents is not None and with_contents[0].startswith("PATH=")
    assert ":/bin" in with_contents[0]
    assert env(contents=[busybox], env=["PATH=/mine"]) == ["PATH=/mine"]


def test_customisation_layer_contents(store: LocalStore, busybox: str, demo_app: str) -> None:
    options = ImageOptions(user="app", contents=[busybox, demo_app])
    custom = plan_customisation(options, store)
    members = {m.name: m for m in custom.members}
    names = [m.name for m in custom.members]
    assert names == sorted(names)
    assert members[b"tmp"].mode == 0o1777 and members[b"tmp"].kind == "directory"
    assert members[b"etc"].mode == 0o755
    assert members[b"etc/passwd"].data == (
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/tmp:/bin/sh\n"
    )
    assert members[b"etc/group"].data == b"root:x:0:\napp:x:1000:\n"
    assert members[b"etc/passwd"].mode == 0o644
    assert members[b"bin"].kind == "directory"  # merged from busybox and the app
    assert members[b"bin/sh"].target == f"{busybox}/bin/sh".encode()
    assert members[b"bin/demo"].target == f"{demo_app}/bin/demo".encode()
    assert members[b"bin/demo"].mode == 0o777
    entries = list(custom.entries())
    assert [e.name for e in entries] == names
    assert b"".join(next(iter([e for e in entries if e.name == b"etc/group"])).chunks) == (
        members[b"etc/group"].data
    )


def test_customisation_key_follows_the_contents(store: LocalStore, busybox: str) -> None:
    def key(**kw: object) -> str:
        return plan_customisation(ImageOptions(**kw), store).key  # type: ignore[arg-type]

    assert key(user="app") == key(user="app")
    assert key(user="app") != key(user="other")
    assert key(user="app") != key(user="app", contents=[busybox])
    assert key(user="app", entrypoint=["/x"]) == key(user="app")  # config-only options


def test_contents_conflicts_name_both_sides(store: LocalStore, busybox: str, clash: str) -> None:
    with pytest.raises(ImageOptionError) as err:
        plan_customisation(ImageOptions(contents=[busybox, clash]), store)
    assert "/bin/busybox" in str(err.value)
    assert busybox in str(err.value) and clash in str(err.value)
    with pytest.raises(ImageOptionError, match="/etc/passwd: provided by both the image's"):
        plan_customisation(ImageOptions(contents=[clash]), store)


def test_contents_must_be_in_the_closure(
    store: LocalStore, busybox: str, demo_closure: list[str]
) -> None:
    closure = {p: store.query(p) for p in demo_closure if p != busybox}
    with pytest.raises(ImageOptionError, match=f"{busybox} is not in the image's closure"):
        plan_customisation(ImageOptions(contents=[busybox]), store, closure)  # type: ignore[arg-type]


def _layer(media_type: MediaType, n: int) -> Layer:
    return Layer(
        digest=f"sha256:{n:064x}",
        size=n,
        media_type=media_type,
        diff_id=f"sha256:{n + 100:064x}",
        annotations={"containerd.io/snapshot/stowaway.paths.0": f"p{n}"},
        path=Path("/nonexistent"),
    )


def test_manifests_for_both_formats() -> None:
    layers = [_layer(MediaType.OCI_LAYER_GZIP, 1), _layer(MediaType.OCI_LAYER_GZIP, 2)]
    config = Blob("sha256:" + "c" * 64, 10, MediaType.OCI_CONFIG, data=b"x")
    oci = json.loads(build_manifest(config, layers, "oci"))
    assert oci["schemaVersion"] == 2 and oci["mediaType"] == MediaType.OCI_MANIFEST
    assert [entry["digest"] for entry in oci["layers"]] == [layer.digest for layer in layers]
    assert oci["layers"][1]["annotations"] == {"containerd.io/snapshot/stowaway.paths.0": "p2"}
    assert oci["config"] == {"mediaType": MediaType.OCI_CONFIG, "digest": config.digest, "size": 10}
    docker_config = Blob(config.digest, 10, MediaType.DOCKER_CONFIG, data=b"x")
    docker = json.loads(build_manifest(docker_config, layers, "docker"))
    assert docker["mediaType"] == MediaType.DOCKER_MANIFEST
    assert {entry["mediaType"] for entry in docker["layers"]} == {MediaType.DOCKER_LAYER_GZIP}
    assert docker["layers"][0]["annotations"] == oci["layers"][0]["annotations"]
    with pytest.raises(ManifestError, match="zstd"):
        build_manifest(docker_config, [_layer(MediaType.OCI_LAYER_ZSTD, 3)], "docker")
    with pytest.raises(ManifestError, match="needs application/vnd.docker.container"):
        build_manifest(config, layers, "docker")


def test_text_parsers_for_flags_and_build_args() -> None:
    from stowaway.image.config import parse_created, parse_labels, parse_words

    assert parse_words('["/bin/app", "-v x"]', "--cmd") == ["/bin/app", "-v x"]
    assert parse_words("/bin/app -v 'a b'", "--cmd") == ["/bin/app", "-v", "a b"]
    assert parse_created("1700000000") == 1700000000
    assert parse_created("1970-01-01T00:01:00Z") == 60
    assert parse_labels(["a=b", "c=d=e"]) == {"a": "b", "c": "d=e"}
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: parse_created("\u00b2"), "neither epoch seconds"),
        (lambda: parse_words("[1]", "--entrypoint"), "--entrypoint"),
        (lambda: parse_words("'unterminated", "build arg cmd"), "build arg cmd"),
        (lambda: parse_created("yesterday"), "'yesterday'"),
        (lambda: parse_labels(["novalue"]), "KEY=VALUE"),
    ]
    for call, message in cases:
        with pytest.raises(ImageOptionError, match=message):
            call()


def test_a_creation_time_without_offset_is_utc_whatever_the_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same --created text, same digest on every machine: no local time zone."""
    from stowaway.image.config import parse_created

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_created("2024-01-01T00:00:00") == parse_created("2024-01-01T00:00:00Z")
        assert parse_created("2024-01-01") == 1704067200
    finally:
        monkeypatch.undo()
        time.tzset()
