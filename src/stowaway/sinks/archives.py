"""The ``oci-archive:`` and ``docker-archive:`` sinks: one tarball per image.

Both stream blobs from the layer cache straight into the tar (verifying each
digest on the way, so a damaged cache entry aborts the write instead of being
packed), into a temp file next to the destination that is renamed at the end.
Members come in a fixed order with one mtime: same image, same archive bytes.

The docker archive is ``docker save``'s format: ``manifest.json`` naming the config
and the layer files. Layers stay gzip-compressed (``docker load`` and skopeo
decompress them), and files live under ``blobs/sha256/`` as in an OCI layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from stowaway.errors import StowawayError
from stowaway.fsutil import AtomicFile
from stowaway.image.config import canonical_json
from stowaway.image.digest import CHUNK, VerifyingReader, dropping_corrupt, parse_digest
from stowaway.image.index import ImageIndex
from stowaway.image.model import Blob, Image, MediaType, TarEntry
from stowaway.image.tar import default_mtime, write_tar
from stowaway.progress import NoProgress, Progress, blob_label
from stowaway.sinks.oci_layout import (
    LAYOUT_VERSION,
    empty_index,
    layout_blobs,
    manifest_descriptor,
    require_oci,
    update_index,
)
from stowaway.sinks.targets import SinkResult

_QUIET: Progress = NoProgress()


class ArchiveError(StowawayError):
    """An image that an archive format cannot hold, or an unwritable destination."""


def write_oci_archive(
    image: Image | ImageIndex, file: Path, tag: str | None, *, progress: Progress = _QUIET
) -> SinkResult:
    """Write ``image`` (or an index and its images) as a tarred OCI layout holding just it."""
    require_oci(image, f"oci-archive:{file}")
    index = update_index(empty_index(), manifest_descriptor(image, tag))
    blobs = layout_blobs(image)
    entries = [
        *_dirs(),
        *(_blob_entry(b, progress) for b in sorted(blobs, key=lambda b: b.digest)),
        _file("index.json", canonical_json(index)),
        _file("oci-layout", canonical_json({"imageLayoutVersion": LAYOUT_VERSION})),
    ]
    return _write(file, entries, blobs, image, f"oci-archive:{file}")


def write_docker_archive(
    image: Image | ImageIndex, file: Path, reference: str | None, *, progress: Progress = _QUIET
) -> SinkResult:
    """Write ``image`` in ``docker save`` format, tagged ``reference`` (NAME:TAG) if given."""
    if isinstance(image, ImageIndex):
        raise ArchiveError(
            f"docker-archive:{file} holds one image per name; it cannot hold an image index "
            f"({', '.join(str(p) for p, _ in image.images)})",
            hint="write the index to oci:, oci-archive: or docker://, or build one platform "
            "per docker archive (--platform OS/ARCH)",
        )
    for layer in image.layers:
        if layer.media_type == MediaType.OCI_LAYER_ZSTD:
            raise ArchiveError(
                f"layer {layer.digest} is zstd-compressed; docker load (20.10) cannot read it",
                hint="use --compression gzip for docker-archive destinations",
            )
    manifest = [
        {
            "Config": _name(image.config),
            "RepoTags": [reference] if reference else [],
            "Layers": [_name(layer) for layer in image.layers],
        }
    ]
    blobs = _unique(image.blobs())
    entries = [
        *_dirs(),
        *(_blob_entry(b, progress) for b in sorted(blobs, key=lambda b: b.digest)),
        _file("manifest.json", canonical_json(manifest)),
    ]
    return _write(file, entries, blobs, image, f"docker-archive:{file}")


def _write(
    file: Path, entries: list[TarEntry], blobs: list[Blob], image: Image | ImageIndex, target: str
) -> SinkResult:
    if file.is_dir():
        raise ArchiveError(f"{file} is a directory; an archive destination must be a file")
    if not file.parent.is_dir():
        raise ArchiveError(f"directory {file.parent} of archive {file} does not exist")
    with AtomicFile(file.parent) as t:
        for piece in write_tar(entries, mtime=default_mtime()):
            t.file.write(piece)
        t.commit(file)
    return SinkResult(
        target=target,
        manifest_digest=image.manifest.digest,
        written=[b.digest for b in blobs],
        bytes_written=sum(b.size for b in blobs),
    )


def _unique(blobs: list[Blob]) -> list[Blob]:
    return list({b.digest: b for b in blobs}.values())


def _name(blob: Blob) -> str:
    return "blobs/sha256/" + parse_digest(blob.digest)[1]


def _dirs() -> list[TarEntry]:
    return [TarEntry(b"blobs", "directory", 0o755), TarEntry(b"blobs/sha256", "directory", 0o755)]


def _file(name: str, data: bytes) -> TarEntry:
    return TarEntry(name.encode(), "regular", 0o644, len(data), chunks=iter((data,)))


def _blob_entry(blob: Blob, progress: Progress) -> TarEntry:
    return TarEntry(
        _name(blob).encode(), "regular", 0o644, blob.size, chunks=_verified(blob, progress)
    )


def _verified(blob: Blob, progress: Progress) -> Iterator[bytes]:
    """The blob's bytes in 1 MiB chunks, digest-checked; a damaged cache file is
    unlinked so the next build recreates it."""
    key = f"archive:{blob.digest}"
    progress.start(key, blob_label("pack", blob), blob.size)
    try:
        with dropping_corrupt(blob), blob.open() as f:
            reader = VerifyingReader(f, blob.digest, blob.size)
            while data := reader.read(CHUNK):
                progress.advance(key, len(data))
                yield data
    finally:
        progress.finish(key)
