"""The ``oci:`` sink: an OCI image layout directory.

Blobs go to ``blobs/sha256/<hex>``; a blob already there with the right size is
left alone (its bytes are never read). New layer blobs are hard-linked from the
layer cache when it is on the same filesystem, else copied. Before linking, the
cache file is hashed once: linking is meant to be cheap, but a link would hand out
a damaged cache entry as is, and one sequential read is far cheaper than the
copy it saves. Every file appears by rename (``stowaway.fsutil``: synced, mode
0644 whether linked or copied); ``index.json`` is written last, so a crash leaves
either the old image list or the new one, never a broken one.

Reading back (``LayoutReader``, ``read_layout_image``) is here too, for ``inspect``
and for store paths that hold an image: one idea of what a layout looks like.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import tarfile
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import IO, Any, Literal

from stowaway.errors import StowawayError
from stowaway.fsutil import FILE_MODE, AtomicFile, atomic_write, fsync_dir
from stowaway.image.config import canonical_json
from stowaway.image.digest import (
    CHUNK,
    VerifyingReader,
    copy_verified,
    dropping_corrupt,
    parse_digest,
    sha256_digest,
)
from stowaway.image.index import ImageIndex
from stowaway.image.model import Blob, Descriptor, Image, Layer, MediaType
from stowaway.parallel import Stop, run_all
from stowaway.progress import NoProgress, Progress, blob_label
from stowaway.sinks.targets import SinkResult

_QUIET: Progress = NoProgress()

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = "1.0.0"
#: Blobs copied or linked at once: hashing and copying release the GIL.
JOBS = 4

Outcome = Literal["written", "linked", "skipped"]


class LayoutError(StowawayError):
    """A directory or index.json that is not a usable OCI image layout."""


def write_oci_layout(
    image: Image | ImageIndex, directory: Path, tag: str | None, *, progress: Progress = _QUIET
) -> SinkResult:
    """Add ``image`` to the layout at ``directory`` (created if needed), under ``tag``.
    An index is one entry of index.json (named ``tag``) pointing at the index blob,
    which lists its platforms' manifests."""
    require_oci(image, f"oci:{directory}")
    _prepare(directory)
    blobs_dir = directory / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    result = SinkResult(target=f"oci:{directory}", manifest_digest=image.manifest.digest)
    todo = layout_blobs(image)
    tasks = [partial(put_blob, b, blobs_dir, progress) for b in todo]
    outcomes = run_all(tasks, JOBS, "stowaway-write")
    for blob, outcome in zip(todo, outcomes, strict=True):
        getattr(result, outcome).append(blob.digest)
        if outcome == "written":
            result.bytes_written += blob.size
    index_path = directory / "index.json"
    with _locked(directory):  # writers to one layout merge their entries, none is lost
        index = update_index(read_index(index_path), manifest_descriptor(image, tag))
        atomic_write(index_path, canonical_json(index))
    return result


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on the layout directory itself for a read-modify-write of its
    index.json (a lock on index.json would be lost when the file is replaced; the
    directory needs no extra file, which other tools would see)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def require_oci(image: Image | ImageIndex, target: str) -> None:
    """OCI layouts list OCI manifests and indexes only: skopeo and umoci skip any other
    media type, so a Docker-format image written there would be invisible."""
    if image.manifest.media_type not in (MediaType.OCI_MANIFEST, MediaType.OCI_INDEX):
        raise LayoutError(
            f"{target}: an OCI layout cannot hold a {image.manifest.media_type} manifest",
            hint="use --format oci for oci: and oci-archive: destinations",
        )


def layout_blobs(image: Image | ImageIndex) -> list[Blob]:
    """What a layout's blobs/ holds for ``image``: config and layers, then manifests
    (an index's platform manifests and the index itself), each once."""
    manifests = image.manifests() if isinstance(image, ImageIndex) else [image.manifest]
    return list({b.digest: b for b in [*image.blobs(), *manifests]}.values())


def manifest_descriptor(image: Image | ImageIndex, tag: str | None) -> Descriptor:
    """The index entry for ``image``: its manifest, named ``tag`` if given."""
    return image.manifest.descriptor({REF_NAME: tag} if tag else None)


def empty_index() -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX.value, "manifests": []}


def update_index(index: dict[str, Any], desc: Descriptor) -> dict[str, Any]:
    """Add ``desc`` to ``index``, dropping the entry that had the same tag (or, for an
    untagged image, the same untagged digest); other images are kept in order."""
    name = desc.annotations.get(REF_NAME)

    def replaced(entry: Any) -> bool:
        ann = entry.get("annotations") or {}
        if name is not None:
            return bool(ann.get(REF_NAME) == name)
        return REF_NAME not in ann and entry.get("digest") == desc.digest

    manifests = [m for m in index.get("manifests", []) if not replaced(m)]
    return {**index, "manifests": [*manifests, desc.to_json()]}


def read_index(path: Path) -> dict[str, Any]:
    """The layout's index.json, or an empty index when there is none yet."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return empty_index()
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise LayoutError(f"{path} is not valid JSON: {e}") from None
    manifests = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
        raise LayoutError(f"{path} is not an OCI image index (no 'manifests' list)")
    return dict(doc)


def _prepare(directory: Path) -> None:
    """Create the layout or check that an existing directory is one."""
    if directory.exists() and not directory.is_dir():
        raise LayoutError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / LAYOUT_FILE
    try:
        doc = json.loads(marker.read_bytes())
    except FileNotFoundError:
        if any(p.name not in ("blobs", "index.json") for p in directory.iterdir()):
            raise LayoutError(
                f"{directory} is not empty and holds no {LAYOUT_FILE} file",
                hint="choose an empty or new directory, or an existing OCI layout",
            ) from None
        atomic_write(marker, canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))
        return
    except ValueError as e:
        raise LayoutError(f"{marker} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("imageLayoutVersion") != LAYOUT_VERSION:
        raise LayoutError(f"{marker}: unsupported layout version (expected {LAYOUT_VERSION})")


def put_blob(
    blob: Blob, blobs_dir: Path, progress: Progress = _QUIET, stop: Stop | None = None
) -> Outcome:
    """Place one blob in ``blobs_dir`` unless it is already there with the right size;
    a copy under way ends at the next chunk once ``stop`` is set, its temp file removed."""
    _, hexpart = parse_digest(blob.digest)
    dest = blobs_dir / hexpart
    try:
        if dest.stat().st_size == blob.size:
            return "skipped"
    except FileNotFoundError:
        pass
    key = f"oci:{blob.digest}"
    progress.start(key, blob_label("write", blob), blob.size)
    try:
        if blob.path is not None and blob.cached and _link_verified(blob, dest):
            progress.advance(key, blob.size)
            return "linked"
        with AtomicFile(dest.parent) as t:
            copy_verified(blob, t.file, stop)
            t.commit(dest)
        progress.advance(key, blob.size)
        return "written"
    finally:
        progress.finish(key)


def _link_verified(blob: Blob, dest: Path) -> bool:
    """Hard-link the cache file to ``dest`` after checking its digest; False when the
    two are on different filesystems, links are refused, or the file does not have
    mode 0644 and is not ours to change (an old cache entry), so the caller copies."""
    assert blob.path is not None
    tmp = dest.with_name(f".link-{dest.name}-{os.getpid()}-{id(blob)}")
    try:
        os.link(blob.path, tmp)
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            return False
        raise
    try:
        verify_file(blob, tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != FILE_MODE:
            try:
                os.chmod(tmp, FILE_MODE)  # the same inode: the cache file is fixed too
            except PermissionError:
                os.unlink(tmp)
                return False
        os.replace(tmp, dest)  # not publish: chmod needs ownership even to keep the mode
        # rename(2) does nothing when both names are links to one inode (another writer
        # linked the same cache file first): then the temp name is still there
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


def verify_file(blob: Blob, path: Path) -> None:
    """Hash ``path`` against ``blob``; on mismatch drop the cache entry, raise CorruptBlob."""
    with dropping_corrupt(blob), open(path, "rb") as f:
        reader = VerifyingReader(f, blob.digest, blob.size)
        while reader.read(CHUNK):
            pass


# ------------------------------------------------------------------ reading


class LayoutReader:
    """Files of an OCI layout by name (``index.json``, ``blobs/<algo>/<hex>``), from a
    directory or from an oci-archive tarball: the one way layouts are read back. A
    context manager, so the tarball is closed."""

    def __init__(self, location: Path, *, archive: bool = False) -> None:
        self.location = location
        self.where = f"{'oci-archive' if archive else 'oci'}:{location}"
        self._tar: tarfile.TarFile | None = None
        self._lock = threading.Lock()
        if archive:
            try:
                self._tar = tarfile.open(location)
            except (OSError, tarfile.TarError) as e:
                raise LayoutError(f"cannot read OCI archive {location}: {e}") from None

    def __enter__(self) -> LayoutReader:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tar is not None:
            self._tar.close()

    def read(self, name: str) -> bytes:
        try:
            if self._tar is not None:
                member = self._tar.extractfile(name)
                if member is None:
                    raise KeyError(name)
                return member.read()
            return (self.location / name).read_bytes()
        except (KeyError, OSError):
            raise LayoutError(f"{self.where} has no {name}") from None

    def open(self, name: str) -> AbstractContextManager[IO[bytes]]:
        """A stream of one file (unverified: callers hash while copying). Streams of an
        archive are read one at a time (members share the tarball's file position)."""
        if self._tar is None:
            try:
                return open(self.location / name, "rb")
            except OSError:
                raise LayoutError(f"{self.where} has no {name}") from None
        return self._member(name)

    @contextlib.contextmanager
    def _member(self, name: str) -> Iterator[IO[bytes]]:
        assert self._tar is not None
        with self._lock:
            try:
                member = self._tar.extractfile(name)
            except KeyError:
                member = None
            if member is None:
                raise LayoutError(f"{self.where} has no {name}")
            with member:
                yield member

    def file(self, name: str) -> Path | None:
        """The file ``name`` of a layout directory (None in an archive, or if missing)."""
        path = self.location / name
        return path if self._tar is None and path.is_file() else None

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except ValueError as e:
            raise LayoutError(f"{self.where}: {name} is not JSON: {e}") from None


def blob_name(digest: str) -> str:
    """``blobs/<algo>/<hex>`` of a digest, which is checked first: it names a file."""
    algo, hexpart = parse_digest(digest)
    return f"blobs/{algo}/{hexpart}"


def read_layout_image(layout: Path) -> Image:
    """The single image of an OCI layout directory (blobs stay on disk).

    A store path is input like any other: every way it can be malformed (bad JSON, a
    missing key, a wrong type, an unknown media type, a bad digest) is a StowawayError
    naming the layout and the document.
    """
    where = f"OCI layout {layout}"
    try:
        return _read_layout(LayoutReader(layout), where)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StowawayError(f"{where}: malformed image ({type(e).__name__}: {e})") from None


def _digest(where: str, value: object, what: str) -> tuple[str, str]:
    try:
        return parse_digest(str(value))
    except StowawayError as e:
        raise StowawayError(f"{where}: {what}: {e.message}") from None


def _blob_name(where: str, digest: object) -> str:
    return "blobs/{}/{}".format(*_digest(where, digest, "blob digest"))


def _load(reader: LayoutReader, where: str, desc: object, what: str) -> tuple[Blob, dict[str, Any]]:
    """A small blob (manifest, config) checked against its descriptor, and its JSON."""
    if not isinstance(desc, dict):
        raise StowawayError(f"{where}: {what} descriptor is not a JSON object")
    try:
        digest, size, mt = str(desc["digest"]), int(desc["size"]), str(desc["mediaType"])
    except (KeyError, TypeError, ValueError) as e:
        raise StowawayError(f"{where}: {what} descriptor is malformed ({e!r})") from None
    name = _blob_name(where, digest)
    try:
        data = reader.read(name)
    except LayoutError:
        raise StowawayError(f"{where}: {what} blob {digest} missing ({name})") from None
    if len(data) != size or sha256_digest(data) != digest:
        raise StowawayError(f"{where}: {what} blob {digest} does not match its digest/size")
    doc = json_object(data, f"{where}: {what} blob {digest}", StowawayError)
    return Blob(digest, size, mt, data=data), doc


def json_object(data: bytes, what: str, error: type[StowawayError]) -> dict[str, Any]:
    """``data`` parsed as a JSON object, else ``error`` saying ``what`` is not one."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise error(f"{what} is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise error(f"{what} is not a JSON object")
    return doc


def _read_layout(reader: LayoutReader, where: str) -> Image:
    try:
        manifests = reader.json("index.json")["manifests"]
    except (LayoutError, KeyError, TypeError) as e:
        raise StowawayError(f"{where}: unreadable index.json ({e})") from None
    if not isinstance(manifests, list) or len(manifests) != 1:
        n = len(manifests) if isinstance(manifests, list) else "no list of"
        raise StowawayError(
            f"{where}: index.json lists {n} manifests; an image store path must hold exactly one"
        )
    manifest, mdoc = _load(reader, where, manifests[0], "manifest")
    try:
        is_manifest = MediaType(manifest.media_type).is_manifest
    except ValueError:
        is_manifest = False
    if not is_manifest:
        raise StowawayError(f"{where}: {manifest.media_type!r} is not an image manifest")
    config, cdoc = _load(reader, where, mdoc.get("config"), "config")
    rootfs = cdoc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    ldescs = mdoc.get("layers")
    if not isinstance(diff_ids, list) or not isinstance(ldescs, list):
        raise StowawayError(f"{where}: manifest layers or config rootfs.diff_ids is not a list")
    if len(diff_ids) != len(ldescs):
        raise StowawayError(
            f"{where}: config lists {len(diff_ids)} diff IDs for {len(ldescs)} layers"
        )
    layers = []
    for i, (ldesc, diff_id) in enumerate(zip(ldescs, diff_ids, strict=True)):
        if not isinstance(ldesc, dict):
            raise StowawayError(f"{where}: layer {i} descriptor is not a JSON object")
        digest = str(ldesc.get("digest"))
        path = reader.location / _blob_name(where, digest)
        if not path.is_file():
            raise StowawayError(f"{where}: layer {i} blob {digest} is missing")
        _digest(where, diff_id, f"diff ID of layer {i}")
        annotations = ldesc.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise StowawayError(f"{where}: layer {i} annotations are not a JSON object")
        layers.append(
            Layer(
                digest=digest,
                size=int(ldesc["size"]),
                media_type=str(ldesc["mediaType"]),
                path=path,
                diff_id=str(diff_id),
                annotations={str(k): str(v) for k, v in annotations.items()},
            )
        )
    docker = manifest.media_type == MediaType.DOCKER_MANIFEST
    return Image(layers, config, manifest, format="docker" if docker else "oci")
