"""Ownership rules through the composer on the real demo closure: only the layers a rule
touches change, are keyed by those rules and marked for the snapshotter; the rest keep
their digests; a rule matching nothing is refused before any work."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from stowaway.image.annotations import RULES_LABEL, decode_paths, decode_prefetch
from stowaway.image.compose import ComposeResult, compose
from stowaway.image.config import ImageOptions
from stowaway.image.layer_cache import LayerCache
from stowaway.image.layers import LayerSettings
from stowaway.image.model import Layer
from stowaway.image.ownership import OwnershipError, parse_mkdir, rules_from
from stowaway.store.local import LocalStore

GREETING = "/nix/store/[^/]+-greeting-data/share/greeting(/.*)?"
APP_BIN = "/nix/store/[^/]+-stowaway-demo-app/bin/demo"


def run(
    store: LocalStore,
    demo_app: str,
    cache: Path,
    chown: tuple[str, ...] = (),
    chmod: tuple[str, ...] = (),
    **kw: object,
) -> ComposeResult:
    closure = store.closure_infos([demo_app])
    options = ImageOptions(
        entrypoint=[f"{demo_app}/bin/demo"],
        rules=rules_from(chown, chmod, allow_setid=False),
        **kw,  # type: ignore[arg-type]
    )
    return compose(
        store, [demo_app], options, closure=closure, settings=LayerSettings(),
        cache=LayerCache(cache),
    )  # fmt: skip


def by_name(result: ComposeResult) -> dict[str, Layer]:
    """Store layers by the name part of their (single) store path; the demo closure's
    three paths get a layer each."""
    out = {}
    for layer in result.image.layers[:-1]:
        assert len(layer.store_paths) == 1
        out[layer.store_paths[0].split("-", 1)[1]] = layer
    assert set(out) == {"busybox", "greeting-data", "stowaway-demo-app"}
    return out


def members(layer: Layer) -> dict[str, tarfile.TarInfo]:
    assert layer.path is not None
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.path.read_bytes()))) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_rules_rebuild_only_the_layers_they_touch(
    local_store: LocalStore, demo_app: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    plain_result = run(local_store, demo_app, cache)
    plain = by_name(plain_result)
    assert plain_result.image.layers[-2] is not plain["greeting-data"]  # the plan's order
    assert not any(RULES_LABEL in layer.annotations for layer in plain.values())

    chown = (f"{GREETING}=1234:2345",)
    result = run(local_store, demo_app, cache, chown)
    ruled = by_name(result)
    greeting = ruled["greeting-data"]
    # ruled layers go on top (a node unpacks them and downloads all above), the plan too
    assert result.image.layers[-2] is greeting
    assert result.plan.layers[-1].paths == greeting.store_paths
    assert [x.paths for x in result.plan.layers] == [
        x.store_paths for x in result.image.layers[:-1]
    ]
    assert not greeting.reused and greeting.digest != plain["greeting-data"].digest
    for name in ("busybox", "stowaway-demo-app"):  # untouched: same key, blob, paths
        assert ruled[name].reused and ruled[name].digest == plain[name].digest
        assert decode_paths(ruled[name].annotations) == decode_paths(plain[name].annotations)
    assert greeting.annotations[RULES_LABEL].startswith("sha256:")
    assert RULES_LABEL not in result.image.layers[0].annotations
    # a node unpacks a ruled layer, never substitutes it: the prefetch list leaves it out
    assert decode_prefetch(result.image.layers[0].annotations) == [
        Path(p).name for layer in result.image.layers[1:-2] for p in layer.store_paths
    ]
    assert decode_paths(greeting.annotations) == decode_paths(plain["greeting-data"].annotations)
    assert not decode_prefetch(greeting.annotations)
    tar = members(greeting)
    base = greeting.store_paths[0].lstrip("/")
    assert (tar["nix"].uid, tar["nix/store"].uid) == (0, 0)
    assert (tar[base].uid, tar[f"{base}/share"].uid) == (0, 0)
    for name in ("share/greeting", "share/greeting/message"):
        assert (tar[f"{base}/{name}"].uid, tar[f"{base}/{name}"].gid) == (1234, 2345)
    assert tar[f"{base}/share/greeting/message"].mode == 0o444  # no chmod rule

    again = by_name(run(local_store, demo_app, cache, chown))  # same rules: all reused
    assert all(layer.reused for layer in again.values())
    assert again["greeting-data"].digest == greeting.digest

    # a rule for another layer (after an unrelated one): only that layer is built
    more = by_name(run(local_store, demo_app, cache, chown, (f"{APP_BIN}=0750",)))
    assert more["greeting-data"].reused and more["greeting-data"].digest == greeting.digest
    assert more["busybox"].reused and more["busybox"].digest == plain["busybox"].digest
    app = more["stowaway-demo-app"]
    assert not app.reused and RULES_LABEL in app.annotations
    assert app.annotations[RULES_LABEL] != greeting.annotations[RULES_LABEL]
    bin_demo = members(app)[f"{app.store_paths[0].lstrip('/')}/bin/demo"]
    assert (bin_demo.mode, bin_demo.uid) == (0o750, 0)

    # another owner for the same files: a new blob, with its own key
    other = by_name(run(local_store, demo_app, cache, (f"{GREETING}=1:1",)))
    assert not other["greeting-data"].reused
    assert other["greeting-data"].digest not in (greeting.digest, plain["greeting-data"].digest)


def test_customisation_rules_and_dirs_keep_store_layers(
    local_store: LocalStore, demo_app: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    plain = run(local_store, demo_app, cache, user="nobody")
    ruled = run(
        local_store, demo_app, cache, ("/var/lib/app=7:7",), ("/etc/passwd=0600",),
        user="nobody", mkdirs=[parse_mkdir("/var/lib/app"), parse_mkdir("/home/app")],
    )  # fmt: skip
    before, after = plain.image.layers, ruled.image.layers
    assert [x.digest for x in before[:-1]] == [x.digest for x in after[:-1]]
    assert all(x.reused for x in after[:-1])
    custom = members(after[-1])
    assert (custom["var/lib/app"].uid, custom["home/app"].uid) == (7, 65534)
    assert custom["etc/passwd"].mode == 0o600
    config = json.loads(ruled.image.config.data or b"")
    assert config["config"]["User"] == "65534:65534"
    assert config["config"]["Env"][0] == f"PATH={demo_app}/bin:" + (
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    )


def test_a_rule_matching_nothing_is_refused_before_any_build(
    local_store: LocalStore, demo_app: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(OwnershipError, match="greeting-dat/.*matches no file") as info:
        run(local_store, demo_app, cache, ("/nix/store/[^/]+-greeting-dat/share=1:1",))
    assert info.value.hint and "whole absolute path" in info.value.hint
    with pytest.raises(OwnershipError, match="earlier rule"):  # shadowed everywhere
        run(local_store, demo_app, cache, (f"{GREETING}=1:1", f"{GREETING}=2:2"))
    assert not cache.exists() or not any(cache.rglob("*.json"))
