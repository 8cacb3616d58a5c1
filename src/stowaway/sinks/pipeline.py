"""What ``stowaway build`` does once it knows its store paths: compose one image per
platform (each on its base, when there is one), make them an index when there are
several, write that to the target, then attach the SBOM and the signature.

The library side of the command, so ``cli.build`` only turns flags into these arguments
and prints the outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from stowaway.distribution.credentials import CredentialsLookup
from stowaway.errors import PlanError
from stowaway.image.compose import compose
from stowaway.image.config import ImageOptions
from stowaway.image.index import ImageIndex, build_index
from stowaway.image.layer_cache import LayerCache
from stowaway.image.layers import LayerSettings
from stowaway.image.model import Image
from stowaway.image.platform import ClosurePlatform, Platform, closure_platform, with_platform
from stowaway.progress import NoProgress, Progress
from stowaway.sinks import SinkResult, Target, write_image
from stowaway.sinks.attach import attach_to_image
from stowaway.sinks.base import open_base
from stowaway.sinks.targets import RegistryTarget
from stowaway.store.model import PathInfo, StoreSource, sub_closure

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["BaseSpec", "BuiltImage", "Built", "Wanted", "build_and_write"]

_QUIET: Progress = NoProgress()


@dataclass(frozen=True)
class Wanted:
    """One image to compose: its ``roots`` and ``contents`` (linked into /), for
    ``platform`` (None: the one the roots' derivations are for)."""

    platform: Platform | None
    roots: Sequence[str]
    contents: Sequence[str]


@dataclass(frozen=True)
class BaseSpec:
    """``--from``: the base image's target and how to reach its registry."""

    target: str
    tls_verify: bool = True
    creds: CredentialsLookup | None = None


@dataclass
class BuiltImage:
    platform: ClosurePlatform
    image: Image
    #: how many of the image's bottom layers are the base's
    base_layers: int = 0


@dataclass
class Built:
    images: list[BuiltImage]
    index: ImageIndex | None
    sink: SinkResult
    #: ``sbom`` and ``signature``, when asked for (``sinks.attach.attach_to_image``)
    attached: dict[str, Any] = field(default_factory=dict)

    @property
    def written(self) -> Image | ImageIndex:
        return self.index or self.images[0].image


def build_and_write(
    wanted: Sequence[Wanted],
    *,
    as_index: bool,
    source: StoreSource,
    closure: Mapping[str, PathInfo],
    options_for: Callable[[Sequence[str]], ImageOptions],
    dest: Target,
    name: str,
    cache: LayerCache,
    settings: LayerSettings,
    strategy: str,
    max_layers: int,
    format: Literal["oci", "docker"],
    jobs: int | None,
    base: BaseSpec | None = None,
    layer_base: Sequence[str] = (),
    write_opts: Mapping[str, Any] | None = None,
    sbom_format: Literal["spdx", "cyclonedx"] | None = None,
    sign_key: ec.EllipticCurvePrivateKey | None = None,
    progress: Progress = _QUIET,
    on_write: Callable[[], None] = lambda: None,
) -> Built:
    """Compose ``wanted`` (``as_index``: an index of them; ``closure`` holds them all), write to
    ``dest`` and attach. ``options_for(contents)`` gives one image's options before its
    platform is set; ``write_opts`` are the registry push's (``tls_verify``, ``creds``,
    ``plain_http_hint``, ``state_dir``); ``on_write`` runs between composing and writing
    (the CLI's next progress stage). ``layer_base`` (``--layer-base``) is planned apart
    in each image; with an index, in each image whose closure holds it."""
    if as_index:  # a base path is for one platform: it must be in some image
        reach = {p for w in wanted for p in sub_closure(closure, [*w.roots, *w.contents])}
        for b in layer_base:
            if b not in reach:
                raise PlanError(
                    f"layer base {b} is in no image's closure",
                    hint="name as the base a package the images depend on (or drop it)",
                )
    images: list[BuiltImage] = []
    with open_base(
        base.target if base else None,
        cache=cache,
        tls_verify=base.tls_verify if base else True,
        creds=base.creds if base else None,
    ) as base_for:
        for want in wanted:
            roots = [*want.roots, *want.contents]
            own = sub_closure(closure, roots) if as_index else dict(closure)
            plat = closure_platform(
                source, roots, own, explicit=want.platform, check_explicit=as_index
            )
            options = with_platform(options_for(want.contents), plat.platform)
            on_base = base_for(options) if base_for else None
            result = compose(
                source, roots, options, closure=own, strategy=strategy, max_layers=max_layers,
                settings=settings, cache=cache, format=format, progress=progress, jobs=jobs,
                base=on_base,
                layer_base=[b for b in layer_base if b in own] if as_index else layer_base,
            )  # fmt: skip
            below = len(on_base.layers) if on_base else 0
            images.append(BuiltImage(plat, result.image, below))
        index = build_index([(b.platform.platform, b.image) for b in images]) if as_index else None
        on_write()
        opts = dict(write_opts or {})
        sink = write_image(index or images[0].image, dest, progress=progress, **opts)
    built = Built(images, index, sink)
    if sbom_format is not None or sign_key is not None:
        built.attached = attach_to_image(
            dest, built.written.manifest, closure, name=name, sbom_format=sbom_format,
            key=sign_key, created=options.created, tls_verify=opts.get("tls_verify", True),
            creds=opts.get("creds") if isinstance(dest, RegistryTarget) else None,
            plain_http_hint=opts.get("plain_http_hint"),
        )  # fmt: skip
    return built
