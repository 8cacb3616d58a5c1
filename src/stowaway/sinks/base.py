"""Reading a base image (``stowaway build --from``) from ``oci:``, ``oci-archive:`` or
``docker://``, through the image readers ``stowaway inspect`` uses (``sinks.inspect``).

An index is resolved to the manifest of the build's platform. Where the layers' bytes
come from: an OCI layout directory's blob files, read in place (never linked, never
removed); an archive's or a registry's blobs, fetched into the layer cache only when a
sink needs their bytes (``image.base.BaseLayer``). A registry base's layers remember
their repository (``Layer.origin``), so a push to the same registry mounts them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

from stowaway.distribution.credentials import CredentialsLookup
from stowaway.image.base import BaseImage, BaseImageError, BaseLayer, parse_base
from stowaway.image.config import ImageOptions
from stowaway.image.layer_cache import LayerCache
from stowaway.image.model import Layer
from stowaway.sinks.inspect import (
    ImageReader,
    InspectError,
    fetch_manifest,
    is_index,
    open_image,
    pick_platform,
)
from stowaway.sinks.oci_layout import LayoutError
from stowaway.sinks.targets import DockerArchiveTarget, OciTarget, TargetError, parse_target

__all__ = ["open_base"]

#: The flag a user turns TLS verification off with for the base's registry.
PLAIN_HTTP_HINT = "for a plain-HTTP registry pass --src-tls-verify=false"


@contextlib.contextmanager
def open_base(
    spec: str | None,
    *,
    cache: LayerCache,
    tls_verify: bool = True,
    creds: CredentialsLookup | None = None,
) -> Iterator[Callable[[ImageOptions], BaseImage] | None]:
    """For the base image ``spec`` names (``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]``,
    ``docker://HOST/REPO[:TAG|@DIGEST]``): a function giving it, checked, for the
    platform of an image's options (its OS and architecture). The image is opened once
    for the ``with`` block (one registry session for every platform of an index), in
    which its layers' bytes can be read. No ``spec``: None (no base)."""
    if spec is None:
        yield None
        return
    try:
        dest = parse_target(spec)
    except TargetError as e:
        raise BaseImageError(
            f"invalid base image {spec!r}: {e.message.split(': ', 1)[-1]}",
            hint="--from takes oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker://HOST/REPO[:TAG]",
        ) from None
    if isinstance(dest, DockerArchiveTarget):
        raise BaseImageError(
            f"{spec}: a docker archive cannot be a base image (it keeps no manifests)",
            hint=f"convert it first: skopeo copy {spec} oci:DIR:TAG, then --from oci:DIR:TAG",
        )
    where = f"base image {spec}"
    with contextlib.ExitStack() as stack:
        try:
            reader = stack.enter_context(
                open_image(
                    dest, tls_verify=tls_verify, creds=creds, plain_http_hint=PLAIN_HTTP_HINT
                )
            )
        except (InspectError, LayoutError) as e:
            raise _base_error(where, e) from None

        def for_platform(options: ImageOptions) -> BaseImage:
            platform = (options.os, options.architecture)
            try:
                return _read(where, reader, platform, cache, in_place=isinstance(dest, OciTarget))
            except (InspectError, LayoutError) as e:
                raise _base_error(where, e) from None

        yield for_platform  # the reader stays open: layers are fetched while images are written


def _base_error(where: str, e: InspectError | LayoutError) -> BaseImageError:
    message = e.message if e.message.startswith(where) else f"{where}: {e.message}"
    hint = e.hint or "check that BASE names an existing image (skopeo inspect BASE)"
    return BaseImageError(message, hint=hint)


def _read(
    where: str, reader: ImageReader, platform: tuple[str, str], cache: LayerCache, *, in_place: bool
) -> BaseImage:
    doc, digest, media_type = fetch_manifest(where, reader.reference, reader.fetch)
    if is_index(doc, media_type):
        entry, listed = pick_platform(where, doc, (*platform, None))
        doc, digest, media_type = fetch_manifest(where, entry, reader.fetch)
        media_type = media_type or listed  # the manifest may not say it itself

    def make_layer(layer: Layer) -> Layer:
        if in_place:  # a layout directory's own file: read in place, never dropped
            path = reader.blob_file(layer.digest)
            if path is None:
                raise BaseImageError(f"{where}: layer {layer.digest} is missing from the layout")
            return dataclasses.replace(layer, path=path, cached=False)
        fields = {f.name: getattr(layer, f.name) for f in dataclasses.fields(Layer)}
        fields["origin"] = reader.origin
        return BaseLayer(
            **fields, fetch=lambda: reader.open_blob(layer.digest), cache=cache, where=where
        )

    return parse_base(where, doc, media_type, digest, reader.blob, make_layer, platform)
