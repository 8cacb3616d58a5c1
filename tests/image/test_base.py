"""Building on a base image, the pure parts: a hostile manifest or config is refused
with an error naming what is wrong, configs merge as Docker's FROM does, base layers
keep their blobs, and /etc/passwd is left to the base unless a new user needs it."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

from stowaway.image.base import (
    BaseImage,
    BaseImageError,
    BaseLayer,
    base_accounts,
    base_layers,
    parse_base,
)
from stowaway.image.config import ImageOptions, build_config, plan_customisation
from stowaway.image.layer_cache import LayerCache
from stowaway.image.model import Layer, MediaType
from stowaway.store.local import LocalStore

OCI_GZIP = MediaType.OCI_LAYER_GZIP.value
PLATFORM = ("linux", "amd64")


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_of(files: dict[str, bytes | None]) -> bytes:
    """A tar with these regular files (None: an empty-named whiteout marker file)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data or b"")
            tar.addfile(info, io.BytesIO(data or b""))
    return out.getvalue()


def config_doc(layers: int = 1, **run: Any) -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": [digest(b"%d" % i) for i in range(layers)]},
        "history": [{"created_by": f"step {i}"} for i in range(layers)],
    }


def manifest_doc(config: bytes, layers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "config": {
            "mediaType": MediaType.OCI_CONFIG.value,
            "digest": digest(config),
            "size": len(config),
        },
        "layers": layers,
    }


def layer_desc(data: bytes = b"layer", media_type: str = OCI_GZIP, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest(data), "size": len(data), **extra}


def parse(
    config: dict[str, Any] | bytes,
    layers: list[dict[str, Any]] | None = None,
    media_type: str = MediaType.OCI_MANIFEST.value,
    manifest: dict[str, Any] | None = None,
) -> BaseImage:
    raw = config if isinstance(config, bytes) else json.dumps(config).encode()
    doc = manifest or manifest_doc(raw, [layer_desc()] if layers is None else layers)
    blobs = {digest(raw): raw}
    return parse_base(
        "base image oci:b",
        doc,
        media_type,
        "sha256:" + "0" * 64,
        lambda d, size: blobs[d],
        lambda layer: layer,
        PLATFORM,
    )


def test_a_checked_base_keeps_its_layer_blobs_and_drops_snapshot_annotations() -> None:
    ann = {"containerd.io/snapshot/stowaway.paths.0": "x", "org.example": "kept"}
    base = parse(config_doc(), [layer_desc(annotations=ann)])
    (layer,) = base.layers
    assert (layer.digest, layer.size, layer.media_type) == (digest(b"layer"), 5, OCI_GZIP)
    assert layer.diff_id == digest(b"0") and layer.annotations == {"org.example": "kept"}
    assert base_layers(base, "oci")[0] is layer  # same blob, same descriptor
    docker = base_layers(base, "docker")[0]
    assert docker.media_type == MediaType.DOCKER_LAYER_GZIP and docker.digest == layer.digest


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda m, c: m.update(schemaVersion=1), "schemaVersion 2"),
        (lambda m, c: m.update(layers="x"), "no list of layers"),
        (lambda m, c: m["layers"][0].update(digest="sha256:xyz"), "invalid digest"),
        (lambda m, c: m["layers"][0].update(size=-1), "no valid size"),
        (lambda m, c: m["layers"][0].update(size="5"), "no valid size"),
        (
            lambda m, c: m["layers"][0].update(mediaType="application/x-bzip2"),
            "'application/x-bzip2', which stowaway cannot use",
        ),
        (
            lambda m, c: m["layers"][0].update(
                mediaType="application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
            ),
            "non-distributable",
        ),
        (lambda m, c: m["layers"][0].update(urls=["https://x"]), "non-distributable"),
        (lambda m, c: m["config"].update(mediaType="text/plain"), "not an image config"),
        (lambda m, c: m["config"].update(size=5 << 20), "at most"),
        (lambda m, c: m.update(config=[]), "config descriptor is not a JSON object"),
        (lambda m, c: c.update(architecture="arm64"), "linux/arm64 image; this image is for"),
        (lambda m, c: c["rootfs"].update(diff_ids=[]), "0 diff IDs for 1 layers"),
        (lambda m, c: c["rootfs"].update(diff_ids=["md5:x"]), "invalid digest"),
        (lambda m, c: c.update(rootfs={"type": "x"}), "no rootfs of type layers"),
        (lambda m, c: c.update(config={"Env": "A=1"}), "Env is not a list of strings"),
        (lambda m, c: c.update(config={"Env": ["=1"]}), "is not KEY=VALUE"),
        (lambda m, c: c.update(config={"Cmd": [1]}), "Cmd is not a list of strings"),
        (lambda m, c: c.update(config={"User": 0}), "User is not a string"),
        (lambda m, c: c.update(config={"Labels": {"a": 1}}), "Labels is not a map"),
        (lambda m, c: c.update(config={"ExposedPorts": []}), "ExposedPorts is not a JSON"),
        (lambda m, c: c.update(history=[1]), "history is not a list of objects"),
        (lambda m, c: c.update(history=[{}, {}]), "2 layer entries for 1 layers"),
        (lambda m, c: c.update(config=[]), "'config' is not a JSON object"),
    ],
)
def test_hostile_base_documents_are_refused_naming_what_is_wrong(
    mutate: Callable[[dict[str, Any], dict[str, Any]], None], needle: str
) -> None:
    config = config_doc()
    manifest = manifest_doc(b"", [layer_desc()])
    mutate(manifest, config)
    raw = json.dumps(config).encode()
    if isinstance(manifest.get("config"), dict) and manifest["config"].get("size") == 0:
        manifest["config"].update(digest=digest(raw), size=len(raw))
    with pytest.raises(BaseImageError) as err:
        parse(raw, manifest=manifest)
    assert needle in err.value.message and err.value.message.startswith("base image oci:b")


def test_not_a_manifest_and_not_json_are_refused() -> None:
    with pytest.raises(BaseImageError, match="schema 2"):
        parse(config_doc(), media_type="application/vnd.docker.distribution.manifest.v1+json")
    with pytest.raises(BaseImageError, match="is not JSON"):
        parse(b"{nope")


def test_docker_output_refuses_a_zstd_base_layer_with_a_hint() -> None:
    base = parse(config_doc(), [layer_desc(media_type=MediaType.OCI_LAYER_ZSTD.value)])
    assert base_layers(base, "oci")[0].media_type == MediaType.OCI_LAYER_ZSTD
    with pytest.raises(BaseImageError) as err:
        base_layers(base, "docker")
    assert "gzip layers only" in err.value.message and err.value.hint
    assert "--format oci" in err.value.hint


def test_history_is_kept_and_padded_to_one_entry_per_layer() -> None:
    doc = config_doc(2)
    doc["history"] = [{"created_by": "a", "empty_layer": True, "junk": 1}, {"created_by": "b"}]
    base = parse(doc, [layer_desc(b"x"), layer_desc(b"y")])
    assert base.config.history == (
        {"created_by": "a", "empty_layer": True},
        {"created_by": "b"},
        {"created_by": "base layer (no history)"},
    )


def merged(options: ImageOptions, **run: Any) -> dict[str, Any]:
    base = parse(config_doc(**run))
    doc = json.loads(build_config(options, [digest(b"ours")], ["ours"], "oci", base.config))
    assert doc["rootfs"]["diff_ids"] == [digest(b"0"), digest(b"ours")]
    assert [h.get("comment", h.get("created_by")) for h in doc["history"]] == ["step 0", "ours"]
    return dict(doc["config"])


def test_config_merge_rules() -> None:
    base_run = {
        "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "A=base"],
        "Entrypoint": ["/entry"],
        "Cmd": ["bash"],
        "User": "daemon",
        "WorkingDir": "/srv",
        "ExposedPorts": {"80/tcp": {}},
        "Volumes": {"/data": {}},
        "Labels": {"l": "base", "m": "base"},
        "StopSignal": "SIGQUIT",
        "Healthcheck": {"Test": ["CMD", "x"]},
    }
    # nothing of ours: the base's settings, unknown keys dropped
    assert merged(ImageOptions(), **base_run) == {k: v for k, v in base_run.items() if k[0] != "H"}
    ours = ImageOptions(
        env=["A=ours", "B=1"], user="1000", workdir="/app", expose=["8080"], labels={"m": "ours"}
    )
    conf = merged(ours, **base_run)
    assert conf["Env"] == ["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "A=ours", "B=1"]
    assert (conf["User"], conf["WorkingDir"]) == ("1000", "/app")
    assert conf["ExposedPorts"] == {"80/tcp": {}, "8080/tcp": {}}
    assert conf["Labels"] == {"l": "base", "m": "ours"}
    assert (conf["Entrypoint"], conf["Cmd"]) == (["/entry"], ["bash"])
    # our Cmd replaces the base's; our Entrypoint clears the base's Cmd (as Docker does)
    assert merged(ImageOptions(cmd=["-v"]), **base_run)["Cmd"] == ["-v"]
    conf = merged(ImageOptions(entrypoint=["/nix/store/x/bin/app"]), **base_run)
    assert conf["Entrypoint"] == ["/nix/store/x/bin/app"] and "Cmd" not in conf
    # PATH: ours if given, else the base's, even with contents linked into /
    contents = ImageOptions(contents=["/nix/store/" + "a" * 32 + "-x"])
    assert merged(contents, **base_run)["Env"][0] == "PATH=/usr/bin:/bin"
    assert merged(ImageOptions(env=["PATH=/nix/bin"]), **base_run)["Env"][0] == "PATH=/nix/bin"
    assert merged(contents)["Env"][0].startswith("PATH=/usr/local/sbin:")


def test_config_of_a_variant_base_keeps_its_variant() -> None:
    doc = config_doc() | {"variant": "v8"}
    base = parse(doc)
    out = json.loads(build_config(ImageOptions(), [], [], "oci", base.config))
    assert out["variant"] == "v8" and out["rootfs"]["diff_ids"] == [digest(b"0")]


def gz_layer(
    tmp_path: Path, name: str, files: dict[str, bytes | None], zstd: bool = False
) -> Layer:
    data = tar_of(files)
    blob = zstandard.ZstdCompressor().compress(data) if zstd else gzip.compress(data, mtime=0)
    path = tmp_path / name
    path.write_bytes(blob)
    mt = MediaType.OCI_LAYER_ZSTD.value if zstd else OCI_GZIP
    return Layer(digest(blob), len(blob), mt, path=path, cached=False, diff_id=digest(data))


def test_base_accounts_come_from_the_topmost_layer_and_whiteouts(tmp_path: Path) -> None:
    low = gz_layer(tmp_path, "low", {"etc/passwd": b"root:x:0:0::/:/bin/sh\n", "etc/group": b"g1"})
    mid = gz_layer(tmp_path, "mid", {"./etc/passwd": b"root:x:0:0::/:/bin/sh\nbob:x:5:5::/:\n"})
    top = gz_layer(tmp_path, "top", {"usr/bin/x": b"x"}, zstd=True)
    assert base_accounts("b", [low, mid, top]) == (
        b"root:x:0:0::/:/bin/sh\nbob:x:5:5::/:\n",
        b"g1",
    )
    gone = gz_layer(tmp_path, "gone", {"etc/.wh.group": None})
    assert base_accounts("b", [low, gone]) == (b"root:x:0:0::/:/bin/sh\n", None)
    opaque = gz_layer(tmp_path, "opq", {"etc/.wh..wh..opq": None, "etc/group": b"g2"})
    assert base_accounts("b", [low, opaque]) == (None, b"g2")


def test_customisation_leaves_accounts_to_the_base_unless_a_new_user_needs_them(
    local_store: LocalStore,
) -> None:
    passwd = b"root:x:0:0:root:/root:/bin/bash\nbob:x:1000:1000::/home/bob:/bin/sh\n"
    group = b"root:x:0:\nbob:x:1000:\n"
    calls: list[int] = []

    def accounts() -> tuple[bytes | None, bytes | None]:
        calls.append(1)
        return passwd, group

    def files(
        user: str | None, acc: Callable[[], tuple[bytes | None, bytes | None]] = accounts
    ) -> dict[bytes, bytes]:
        custom = plan_customisation(ImageOptions(user=user), local_store, base_accounts=acc)
        return {m.name: m.data for m in custom.members if m.name.startswith(b"etc/")}

    for user in (None, "root", "0", "1000:1000", "65534"):
        assert files(user) == {}, user  # ids need no entry; root is in every base
    assert calls == []  # and the base's layers were not read for them
    assert files("bob") == {}  # the base has bob (and its group)
    out = files("app")
    assert out[b"etc/passwd"] == passwd + b"app:x:1000:1000::/tmp:/bin/sh\n"
    assert out[b"etc/group"] == group + b"app:x:1000:\n"
    assert files("bob:staff") == {b"etc/group": group + b"staff:x:1000:\n"}
    # a base without /etc/passwd gets ours, as an image without a base does
    no_accounts = files("app", lambda: (None, None))
    assert no_accounts[b"etc/passwd"].startswith(b"root:x:0:0:")


def test_a_fetched_base_layer_is_verified_and_cached(tmp_path: Path) -> None:
    blob = gzip.compress(b"not really a tar", mtime=0)
    fetched: list[int] = []

    def fetch() -> io.BytesIO:
        fetched.append(1)
        return io.BytesIO(blob)

    cache = LayerCache(tmp_path / "cache")

    def layer(data: bytes = blob) -> BaseLayer:
        return BaseLayer(
            digest(data), len(data), OCI_GZIP, diff_id=digest(b"d"),
            fetch=fetch, cache=cache, where="base image x",
        )  # fmt: skip

    good = layer()
    assert good.path is None  # nothing read until a sink needs the bytes
    with good.open() as f:
        assert f.read() == blob
    assert good.path is not None and good.path.parent == tmp_path / "cache/blobs/sha256"
    again = layer()
    with again.open() as f:
        assert f.read() == blob
    assert fetched == [1]  # the second one came from the layer cache
    bad = layer(blob + b"x")  # the registry sends other bytes than the digest names
    with pytest.raises(BaseImageError) as err:
        bad.open()
    assert "does not match its digest" in err.value.message and bad.path is None
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "cache/blobs/sha256").iterdir())
