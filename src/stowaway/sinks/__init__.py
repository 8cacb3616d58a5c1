"""Where images go: ``oci:``, ``oci-archive:``, ``docker-archive:`` and ``docker://``.

``write_image`` dispatches on the parsed target; the registry push lives in
``stowaway.sinks.registry`` and is imported only when a ``docker://`` target is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stowaway.distribution.credentials import CredentialsLookup
from stowaway.errors import StowawayError
from stowaway.image.index import ImageIndex
from stowaway.image.model import Image
from stowaway.progress import NoProgress, Progress
from stowaway.sinks.targets import (
    FORMS,
    DockerArchiveTarget,
    OciArchiveTarget,
    OciTarget,
    RegistryTarget,
    SinkResult,
    Target,
    TargetError,
    parse_target,
)

__all__ = [
    "FORMS",
    "DockerArchiveTarget",
    "OciArchiveTarget",
    "OciTarget",
    "RegistryTarget",
    "SinkResult",
    "Target",
    "TargetError",
    "parse_target",
    "require_index_support",
    "write_image",
]

_QUIET: Progress = NoProgress()


def write_image(
    image: Image | ImageIndex, target: Target, *, progress: Progress = _QUIET, **push_opts: Any
) -> SinkResult:
    """Write ``image`` (or an image index with its images) to ``target``. ``push_opts``
    (``tls_verify``, ``creds``, ...) are passed to the registry push and ignored by the
    file sinks; ``creds`` may be a ``CredentialsLookup`` (what the command's flags said)."""
    if isinstance(target, OciTarget):
        from stowaway.sinks.oci_layout import write_oci_layout

        return write_oci_layout(image, Path(target.directory), target.tag, progress=progress)
    if isinstance(target, OciArchiveTarget):
        from stowaway.sinks.archives import write_oci_archive

        return write_oci_archive(image, Path(target.file), target.tag, progress=progress)
    if isinstance(target, DockerArchiveTarget):
        from stowaway.sinks.archives import write_docker_archive

        return write_docker_archive(image, Path(target.file), target.reference, progress=progress)
    return _push(image, target, progress, push_opts)


def require_index_support(target: Target) -> None:
    """Fail before any work when ``target`` cannot hold an image index."""
    if isinstance(target, DockerArchiveTarget):
        raise StowawayError(
            f"{target} cannot hold an image index: a docker save archive has one image "
            "per name and no platforms",
            hint="write the index to oci:, oci-archive: or docker://, or build one platform "
            "per docker archive (--platform OS/ARCH)",
        )


def _push(
    image: Image | ImageIndex, target: RegistryTarget, progress: Progress, push_opts: dict[str, Any]
) -> SinkResult:
    from stowaway.sinks.registry import push

    if target.digest is not None and target.digest != image.manifest.digest:
        raise StowawayError(
            f"{target} names digest {target.digest}, but the image's manifest is "
            f"{image.manifest.digest}",
            hint="push by tag, or use the manifest digest the build prints",
        )
    lookup = push_opts.pop("creds", None)
    if isinstance(lookup, CredentialsLookup):  # the lookup needs the registry's name
        push_opts["creds"] = lookup.for_registry(target.registry, target.repository)
    elif lookup is not None:
        push_opts["creds"] = lookup
    pushed = push(
        image, target.api_host, target.repository, target.tag, progress=progress, **push_opts
    )
    return SinkResult(
        target=str(target),
        manifest_digest=pushed.manifest_digest,
        written=pushed.uploaded,
        linked=pushed.mounted,
        skipped=pushed.existing,
        bytes_written=pushed.uploaded_bytes,
    )
