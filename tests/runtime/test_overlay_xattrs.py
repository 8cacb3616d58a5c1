"""Security: an image's own layers cannot carry overlay xattrs into a metacopy mount.

A crafted image: an ordinary parentless layer (applied through a bind mount), a store
layer naming busybox (so the chain is mounted with metacopy over the host store), and
an ordinary layer on top (applied straight into the upper dir). Both ordinary layers
hold a file with ``trusted.overlay.metacopy`` + ``trusted.overlay.redirect`` PAX records
pointing at a host store path *outside* the image's closure. The container must not be
able to read that path's bytes through them.

Observed with containerd 1.6.20 here: its applier does not write these records as
xattrs at all, so this guards the whole path end to end; the snapshotter's own defence
(dropping ``trusted.overlay.*`` at Commit) is proven by
``test_snapshotter.py::test_overlay_xattrs_from_layers_are_dropped_at_commit``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

from daemons import Containerd, Registry
from stowaway.image.layer_cache import LayerCache
from stowaway.image.layers import LayerSettings, build_layers
from stowaway.image.model import Blob, Image, Layer, MediaType
from stowaway.layering.model import PlannedLayer
from stowaway.runtime.containerd_client import ContainerdClient
from stowaway.runtime.pull import pull_image
from stowaway.sinks.registry import push
from stowaway.store.local import LocalStore
from stowaway.store.paths import parse_store_path

NS = "xattrtest"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer(files: dict[str, tuple[int, dict[str, str]]], annotations: dict[str, str]) -> Layer:
    """A gzip layer of zero-filled files of the given sizes with PAX records."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (size, pax) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.pax_headers = size, 0o644, pax
            tar.addfile(info, io.BytesIO(bytes(size)))
    tar_bytes = raw.getvalue()
    data = gzip.compress(tar_bytes, mtime=0)
    return Layer(
        _sha(data),
        len(data),
        MediaType.OCI_LAYER_GZIP,
        data=data,
        diff_id=_sha(tar_bytes),
        annotations=annotations,
    )


def _image(layers: list[Layer]) -> Image:
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [ly.diff_id for ly in layers]},
        }
    ).encode()
    cblob = Blob(_sha(config), len(config), MediaType.OCI_CONFIG, data=config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MediaType.OCI_MANIFEST,
            "config": {"mediaType": cblob.media_type, "digest": cblob.digest, "size": cblob.size},
            "layers": [
                {
                    "mediaType": ly.media_type,
                    "digest": ly.digest,
                    "size": ly.size,
                    **({"annotations": ly.annotations} if ly.annotations else {}),
                }
                for ly in layers
            ],
        }
    ).encode()
    mblob = Blob(_sha(manifest), len(manifest), MediaType.OCI_MANIFEST, data=manifest)
    return Image(layers, cblob, mblob)


def test_layer_xattrs_cannot_redirect_outside_the_closure(
    containerd: Containerd,
    registry: Registry,
    demo_closure: list[str],
    local_store: LocalStore,
    tmp_path: Path,
) -> None:
    busybox = next(p for p in demo_closure if p.endswith("-busybox"))
    greeting = next(p for p in demo_closure if p.endswith("-greeting-data"))
    secret = Path(greeting, "share/greeting/message")  # outside the image's closure
    size = secret.stat().st_size
    redirect = f"/{parse_store_path(greeting).basename}/share/greeting/message"
    attack = {
        "SCHILY.xattr.trusted.overlay.metacopy": "",
        "SCHILY.xattr.trusted.overlay.redirect": redirect,
    }
    # a real store layer (the snapshotter proves its claim before it commits it)
    (store_layer,) = build_layers(
        local_store,
        [PlannedLayer((busybox,), 0)],
        local_store.closure_infos([busybox]),
        LayerSettings(),
        LayerCache(tmp_path / "cache"),
    )
    image = _image(
        [
            _layer({"leak0": (size, attack)}, {}),  # parentless: applied through a bind
            store_layer,
            _layer({"leak2": (size, attack), "dir/plain": (3, {})}, {}),  # into the upper
        ]
    )
    push(image, registry.host, "xattr-attack", "v1", tls_verify=False)
    ref = f"{registry.host}/xattr-attack:v1"
    client = ContainerdClient(containerd.address, namespace=NS)
    try:
        result = pull_image(ref, client, plain_http=True)
    finally:
        client.close()
    assert store_layer.digest not in result.downloaded_layers  # the store chain is in use
    run = ["run", "--rm", "--snapshotter", "stowaway", ref]
    ls = containerd.ctr(*run, "x0", f"{busybox}/bin/ls", "/nix/store", namespace=NS).stdout
    assert ls.split() == [os.path.basename(busybox)]
    for i, name in enumerate(("leak0", "leak2")):
        cat = [f"{busybox}/bin/cat", f"/{name}"]
        out = containerd.ctr(*run, f"c{i}", *cat, namespace=NS).stdout
        assert out != secret.read_text(), f"/{name} read a host store path outside the closure"
        assert out == "\0" * size  # the layer's own (zero) bytes
