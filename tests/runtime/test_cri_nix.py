"""Unit tests for nix:0 references, entrypoints, OCI-layout store paths, and the wire
compatibility of our CRI / containerd protos with the containerd binary installed here."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from stowaway.errors import StowawayError
from stowaway.image.annotations import PREFETCH_PREFIX
from stowaway.image.compose import compose
from stowaway.image.config import ImageOptions
from stowaway.image.digest import chain_ids
from stowaway.image.layer_cache import LayerCache
from stowaway.image.layers import LayerSettings
from stowaway.runtime.cri.nix_images import InvalidNixReference, default_entrypoint, parse_nix_ref
from stowaway.runtime.proto.containerd_api import (
    content_pb2,
    diff_pb2,
    images_pb2,
    leases_pb2,
)
from stowaway.runtime.proto.containerd_api import (
    descriptor_pb2 as ctrd_descriptor_pb2,
)
from stowaway.runtime.proto.cri import api_pb2
from stowaway.sinks.oci_layout import read_layout_image, write_oci_layout
from stowaway.store.local import LocalStore

H = "0" * 32


@pytest.mark.parametrize(
    ("ref", "path"),
    [
        (f"nix:0/nix/store/{H}-app", f"/nix/store/{H}-app"),
        (f"nix:0/nix/store/{H}-app:latest", f"/nix/store/{H}-app"),
        (f"nix:0/nix/store/{H}-a.b+c_1?=x", f"/nix/store/{H}-a.b+c_1?=x"),
        ("docker.io/library/busybox:latest", None),
        ("nix/store/x", None),
        ("nix:1/nix/store/x", None),
    ],
)
def test_parse_nix_ref(ref: str, path: str | None) -> None:
    assert parse_nix_ref(ref) == path


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("nix:0/etc/passwd", "not inside the store directory /nix/store"),
        ("nix:0/nix/store/../../etc/passwd", "not normalised"),
        (f"nix:0/nix/store/{H}-app/../x", "not normalised"),
        (f"nix:0/nix/store//{H}-app", "not normalised"),
        ("nix:0/nix/store/" + "e" * 32 + "-app", "not 32 Nix base-32 characters"),
        (f"nix:0/nix/store/{H}-app/bin/sh", "points below a store path"),
        (f"nix:0/nix/store/{H}-a:b", "name contains ':'"),
        ("nix:0/nix/store/short-app", "expected '<32-char hash>-<name>'"),
        ("nix:0/", "not inside the store directory"),
    ],
)
def test_bad_nix_refs_say_why(ref: str, message: str) -> None:
    with pytest.raises(InvalidNixReference) as info:
        parse_nix_ref(ref)
    assert message in info.value.message and repr(ref) in info.value.message


def test_chain_ids_follow_the_oci_definition() -> None:
    a, b, c = (f"sha256:{x * 64}" for x in "abc")
    ids = chain_ids([a, b, c])
    assert ids[0] == a
    import hashlib

    assert ids[1] == "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert ids[2] == "sha256:" + hashlib.sha256(f"{ids[1]} {c}".encode()).hexdigest()
    assert chain_ids([]) == []


def test_default_entrypoint(tmp_path: Path) -> None:
    sp = f"/nix/store/{H}-x"
    assert default_entrypoint(sp, tmp_path) is None  # no bin/
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "data").write_text("not executable")
    assert default_entrypoint(sp, tmp_path) is None
    (tmp_path / "bin" / "app").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "app").chmod(0o555)
    (tmp_path / "bin" / "dangling").symlink_to("nowhere")
    assert default_entrypoint(sp, tmp_path) == [f"{sp}/bin/app"]
    (tmp_path / "bin" / "other").symlink_to("app")  # a second executable (via a link)
    assert default_entrypoint(sp, tmp_path) is None


def test_default_entrypoint_of_demo_app(demo_app: str) -> None:
    assert default_entrypoint(demo_app, Path(demo_app)) == [f"{demo_app}/bin/demo"]


@pytest.fixture(scope="module")
def layout(
    demo_app: str, tmp_path_factory: pytest.TempPathFactory, local_store: LocalStore
) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("layout")
    store = local_store
    result = compose(
        store,
        [demo_app],
        ImageOptions(entrypoint=[f"{demo_app}/bin/demo"]),
        closure=store.closure_infos([demo_app]),
        settings=LayerSettings(),
        cache=LayerCache(tmp / "cache"),
    )
    write_oci_layout(result.image, tmp / "img", "latest")
    return tmp / "img", result.image.config.digest


def test_read_layout_image(layout: tuple[Path, str]) -> None:
    path, config_digest = layout
    image = read_layout_image(path)
    assert image.config.digest == config_digest
    diff_ids = json.loads(image.config.data or b"")["rootfs"]["diff_ids"]
    assert [layer.diff_id for layer in image.layers] == diff_ids
    assert all(layer.path is not None and layer.path.is_file() for layer in image.layers)
    store_layers = [layer for layer in image.layers if layer.annotations]
    assert store_layers and all(
        k.startswith(("containerd.io/snapshot/stowaway.paths.", PREFETCH_PREFIX))
        for layer in store_layers
        for k in layer.annotations
    )


def test_read_layout_image_rejects_damage(layout: tuple[Path, str], tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "img"
    shutil.copytree(layout[0], bad)
    index = json.loads((bad / "index.json").read_text())
    index["manifests"] = index["manifests"] * 2
    (bad / "index.json").write_text(json.dumps(index))
    with pytest.raises(StowawayError, match="lists 2 manifests"):
        read_layout_image(bad)
    index["manifests"] = index["manifests"][:1]
    (bad / "index.json").write_text(json.dumps(index))
    manifest = bad / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]
    manifest.chmod(0o644)
    manifest.write_bytes(manifest.read_bytes() + b" ")
    with pytest.raises(StowawayError, match="does not match its digest"):
        read_layout_image(bad)
    (bad / "index.json").write_text("{")
    with pytest.raises(StowawayError, match="unreadable index.json"):
        read_layout_image(bad)


def _put_blob(layout: Path, data: bytes) -> str:
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return "sha256:" + digest


def _with_manifest(layout: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    """Rewrite the layout's manifest through ``edit`` (a returned list or bytes replace
    the whole manifest) and point index.json (with the manifest's media type) at it."""
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    doc = json.loads((layout / "blobs" / "sha256" / desc["digest"][7:]).read_bytes())
    out = edit(doc)
    data = out if isinstance(out, bytes) else json.dumps(out if isinstance(out, list) else doc)
    desc.update(digest=_put_blob(layout, data if isinstance(data, bytes) else data.encode()))
    desc.update(size=len(data), mediaType=doc.get("mediaType", desc["mediaType"]))
    (layout / "index.json").write_text(json.dumps(index))


def _config_list(m: dict[str, Any], layout: Path) -> None:
    data = b"[1, 2]"
    m["config"].update(digest=_put_blob(layout, data), size=len(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m, lay: m.update(mediaType="application/x-nonsense"), "is not an image manifest"),
        (lambda m, lay: m.pop("config"), "config descriptor is not a JSON object"),
        (lambda m, lay: m["config"].pop("size"), "config descriptor is malformed"),
        (lambda m, lay: m["config"].update(digest="sha256:zz"), "invalid digest"),
        (_config_list, "config blob .* is not a JSON object"),
        (lambda m, lay: m["layers"][0].update(digest="md5:abc"), "invalid digest 'md5:abc'"),
        (lambda m, lay: m["layers"][0].pop("size"), "malformed image"),
        (lambda m, lay: m["layers"][0].update(annotations=[1]), "annotations are not"),
        (lambda m, lay: m.update(layers={"a": 1}), "is not a list"),
        (lambda m, lay: b"\xff not json", "manifest blob .* is not JSON"),
        (lambda m, lay: [m], "manifest blob .* is not a JSON object"),
    ],
)
def test_malformed_layouts_are_stowaway_errors(
    layout: tuple[Path, str],
    tmp_path: Path,
    damage: Callable[[dict[str, Any], Path], object],
    message: str,
) -> None:
    import shutil

    bad = tmp_path / "img"
    shutil.copytree(layout[0], bad)
    for blob in (bad / "blobs" / "sha256").iterdir():
        blob.chmod(0o644)
    _with_manifest(bad, lambda m: damage(m, bad))
    with pytest.raises(StowawayError, match=message) as e:
        read_layout_image(bad)
    assert str(bad) in str(e.value)


def test_index_entry_not_an_object(layout: tuple[Path, str], tmp_path: Path) -> None:
    bad = tmp_path / "img"
    bad.mkdir()
    (bad / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (bad / "index.json").write_text('{"manifests": ["x"]}')
    with pytest.raises(StowawayError, match="manifest descriptor is not a JSON object"):
        read_layout_image(bad)


# ---------------------------------------------------------------- wire compatibility

CONTAINERD = Path("/usr/bin/containerd")


# FileDescriptorProto's fields and their wire types (1-9, 12, 15: bytes; 10, 11, 14: varint)
_FD_WIRE = {1: 2, 2: 2, 3: 2, 4: 2, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2, 10: 0, 11: 0, 12: 2, 14: 0, 15: 2}


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def _raw_descriptor_end(data: bytes, start: int) -> int:
    """Where the raw FileDescriptorProto starting at ``start`` ends: its fields are read
    until the first one a FileDescriptorProto cannot have (the bytes after it)."""
    i = start
    while i < len(data):
        tag, j = _varint(data, i)
        if _FD_WIRE.get(tag >> 3) != tag & 7:
            return i
        n, j = _varint(data, j)
        i = j if tag & 7 == 0 else j + n
    return len(data)


def _candidates(data: bytes) -> Iterator[bytes]:
    """Serialized FileDescriptorProtos in a Go binary: gzip-compressed (gogo/golang
    protobuf v1: containerd 1.6, the CRI API) or raw (protobuf-go v2's rawDesc:
    containerd 1.7), the latter found by their name field, `\n <len> <...>.proto`."""
    for m in re.finditer(re.escape(b"\x1f\x8b\x08\x00\x00\x00\x00\x00"), data):
        try:
            yield zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[m.start() :][: 1 << 21])
        except zlib.error:
            continue
    for m in re.finditer(rb"\n([\x01-\x7f])([\x20-\x7e]+?\.proto)\x12", data):
        if len(m.group(2)) == m.group(1)[0]:
            yield data[m.start() : _raw_descriptor_end(data, m.start())]


def _embedded_descriptors() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """FileDescriptorProtos the containerd binary registers, merged by package (several
    files may share one, e.g. images.v1 service and events; runtime.v1 and v1alpha2
    share a file name)."""
    data = CONTAINERD.read_bytes()
    out: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for raw in _candidates(data):
        try:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
        except Exception:  # not a descriptor after all: skip it
            continue
        if fd.name.endswith(".proto") and fd.package:
            merged = out.setdefault(fd.package, descriptor_pb2.FileDescriptorProto())
            merged.package = fd.package
            merged.message_type.extend(fd.message_type)
            merged.service.extend(fd.service)
            merged.enum_type.extend(fd.enum_type)
    return out


def _fields(
    fd: descriptor_pb2.FileDescriptorProto,
) -> dict[str, dict[int, tuple[str, int, int, str]]]:
    def walk(prefix: str, msgs: object) -> dict[str, dict[int, tuple[str, int, int, str]]]:
        res: dict[str, dict[int, tuple[str, int, int, str]]] = {}
        for m in msgs:  # type: ignore[attr-defined]
            name = f"{prefix}.{m.name}"
            res[name] = {f.number: (f.name, f.type, f.label, f.type_name) for f in m.field}
            res.update(walk(name, m.nested_type))
        return res

    return walk("." + fd.package, fd.message_type)


@pytest.mark.skipif(not CONTAINERD.exists(), reason="containerd binary not installed")
@pytest.mark.parametrize(
    "ours",
    [api_pb2, content_pb2, images_pb2, leases_pb2, diff_pb2, ctrd_descriptor_pb2],
    ids=lambda m: m.__name__.rsplit(".", 1)[-1],
)
def test_protos_match_containerd_binary(ours: object) -> None:
    upstream = _embedded_descriptors()
    mine = descriptor_pb2.FileDescriptorProto()
    ours.DESCRIPTOR.CopyToProto(mine)  # type: ignore[attr-defined]
    theirs = upstream[mine.package]
    up_fields, my_fields = _fields(theirs), _fields(mine)
    for msg, fields in my_fields.items():
        assert msg in up_fields, f"{msg} is not a message of containerd's {mine.package}"
        for number, field in fields.items():
            assert up_fields[msg].get(number) == field, f"{msg} field {number}"
    up_services = {s.name: s for s in theirs.service}
    for svc in mine.service:
        up_methods = {m.name: m for m in up_services[svc.name].method}
        for m in svc.method:
            u = up_methods[m.name]
            assert (m.input_type, m.output_type, m.client_streaming, m.server_streaming) == (
                u.input_type,
                u.output_type,
                u.client_streaming,
                u.server_streaming,
            ), f"{svc.name}.{m.name}"
    up_enums = {e.name: [(v.name, v.number) for v in e.value] for e in theirs.enum_type}
    for e in mine.enum_type:
        assert [(v.name, v.number) for v in e.value] == up_enums[e.name]
