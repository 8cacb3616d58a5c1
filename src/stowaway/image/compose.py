"""The composer pipeline: closure → layer plan → cached layers → config + manifest.

Nothing here touches a sink: the result is an ``Image`` whose layers live in the
layer cache and whose config and manifest are small in-memory blobs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from stowaway import layering
from stowaway.errors import PlanError, StowawayError
from stowaway.image.base import BaseImage, base_accounts, base_layers
from stowaway.image.config import ImageOptions, bin_dirs_of, build_config, plan_customisation
from stowaway.image.digest import sha256_digest
from stowaway.image.layer_cache import LayerCache
from stowaway.image.layers import (
    LayerSettings,
    build_entries_layer,
    build_layers,
    rules_touching,
)
from stowaway.image.manifest import (
    build_manifest,
    config_media_type,
    layer_media_type,
    manifest_media_type,
)
from stowaway.image.model import Blob, Image, Layer
from stowaway.image.ownership import OwnershipError, RuleSet
from stowaway.layering.model import LayerPlan
from stowaway.progress import NoProgress, Progress
from stowaway.store.model import PathInfo, StoreSource

_QUIET: Progress = NoProgress()


@dataclass
class ComposeResult:
    image: Image
    plan: LayerPlan
    closure: dict[str, PathInfo]


def compose(
    source: StoreSource,
    roots: Sequence[str],
    options: ImageOptions,
    *,
    closure: Mapping[str, PathInfo],
    strategy: str = "auto",
    max_layers: int = 100,
    settings: LayerSettings,
    cache: LayerCache,
    format: Literal["oci", "docker"] = "oci",
    progress: Progress = _QUIET,
    jobs: int | None = None,
    base: BaseImage | None = None,
    layer_base: Sequence[str] = (),
) -> ComposeResult:
    """Compose the image of ``roots`` (whose full ``closure`` the caller computed).

    Store-path layers come first in plan order, the customisation layer last, so
    images of related closures share their bottom layers (Docker's ChainIDs). ``jobs``
    layers are built at a time (default: one per core). With ``base``, its layers
    come first, as they are, and its config is merged with ours (``image.base``).
    ``layer_base`` (store paths in the closure) is planned apart, at the bottom
    (``layering.plan``'s ``base_roots``), so images over it share those layers.
    """
    if format not in ("oci", "docker"):
        raise StowawayError(f"unknown image format {format!r} (expected oci or docker)")
    if format == "docker" and settings.compression != "gzip":
        raise StowawayError(
            f"Docker schema 2 images need gzip layers, not {settings.compression}",
            hint="use --compression gzip, or --format oci",
        )
    below = len(base.layers) if base else 0
    if max_layers - below < 2:
        raise PlanError(
            f"max_layers must be at least 2 (one store layer + the customisation layer), "
            f"got {max_layers}" + (f" on top of the base's {below} layers" if below else ""),
            hint="raise --max-layers" if below else None,
        )
    missing = [r for r in roots if r not in closure]
    if missing:
        raise StowawayError(f"root {missing[0]} is not in the closure computed for the image")
    accounts = (lambda: base_accounts(base.where, base.layers)) if base else None
    custom = plan_customisation(options, source, closure, base_accounts=accounts)
    layer_plan = layering.plan(
        closure, roots, strategy=strategy, max_layers=max_layers - below, base_roots=layer_base
    )
    rules = RuleSet(options.rules)
    touched = rules_touching(source, layer_plan.layers, rules)
    _check_all_used(rules, [*touched, custom.touched])
    if any(touched):
        layer_plan, touched = _ruled_on_top(layer_plan, touched)
    layers = build_layers(
        source,
        layer_plan.layers,
        closure,
        settings,
        cache,
        progress=progress,
        jobs=jobs,
        rules=rules,
        touched=touched,
    )
    layers.append(build_entries_layer(custom.entries(), custom.key, settings, cache))
    comments = [_comment(layer) for layer in layers]
    config_bytes = build_config(
        options,
        [layer.diff_id for layer in layers],
        comments,
        format,
        base.config if base else None,
        bin_dirs=None if _path_given(options) else bin_dirs_of(source, roots),
    )
    layers = [*(base_layers(base, format) if base else ()), *layers]
    if format == "docker":
        layers = [_as_docker(layer) for layer in layers]
    config = _blob(config_bytes, config_media_type(format))
    manifest = _blob(build_manifest(config, layers, format), manifest_media_type(format))
    image = Image(layers=layers, config=config, manifest=manifest, format=format)
    return ComposeResult(image=image, plan=layer_plan, closure=dict(closure))


def _ruled_on_top(
    plan: LayerPlan, touched: list[frozenset[int]]
) -> tuple[LayerPlan, list[frozenset[int]]]:
    """The plan with the layers rules touch moved on top (order kept otherwise). A node
    must download and unpack those (the store's files are not theirs), and containerd
    fetches every layer above the first one it unpacks: below them, the untouched
    layers still come from the node's store. Store layers share only ``/nix/store``
    itself, so their order does not change the root filesystem."""
    order = sorted(range(len(touched)), key=lambda i: bool(touched[i]))
    layers = tuple(plan.layers[i] for i in order)
    return dataclasses.replace(plan, layers=layers), [touched[i] for i in order]


def _check_all_used(rules: RuleSet, touched: Sequence[frozenset[int]]) -> None:
    """A rule that changes nothing is a mistake (a typo in a hash-prefixed path): say so
    before any layer is built."""
    unused = rules.unused(frozenset().union(*touched))
    if unused:
        raise OwnershipError(
            f"{unused[0].describe()} matches no file in the image"
            + (
                " (or only files an earlier rule of its kind decides)"
                if len(rules.rules) > 1
                else ""
            ),
            hint="REGEX must match the whole absolute path, e.g. "
            "'^/nix/store/[^/]+-app/var(/.*)?$'; `stowaway inspect` lists the store paths",
        )


def _as_docker(layer: Layer) -> Layer:
    return dataclasses.replace(layer, media_type=layer_media_type(layer.media_type, "docker"))


def _comment(layer: Layer) -> str:
    if not layer.store_paths:
        return "stowaway customisation layer"
    names = " ".join(p.rsplit("/", 1)[-1] for p in layer.store_paths)
    return f"store paths: {names}"


def _blob(data: bytes, media_type: str) -> Blob:
    return Blob(digest=sha256_digest(data), size=len(data), media_type=media_type, data=data)


def _path_given(options: ImageOptions) -> bool:
    """Whether the config's PATH is settled without the roots' ``bin`` dirs (linked
    ``contents``, or a PATH of the user's), so they need not be read."""
    return bool(options.contents) or any(e.startswith("PATH=") for e in options.env)
