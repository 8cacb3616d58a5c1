"""A small client for containerd's own gRPC API: what importing and unpacking an image
needs (content, images, leases, diff, snapshots), nothing more.

Why not shell out to ``ctr``: ``ctr import`` unpacks without the layer annotations and
chain-ID refs a proxy snapshotter needs to skip layers, and we want errors as values.
Every call carries the namespace (and, inside ``lease()``, the lease) as gRPC metadata,
the way containerd's Go client does. A lease belongs to the thread that took it: one
client serves concurrent pulls (the CRI service's worker threads), each under its own.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

import grpc
from google.protobuf import field_mask_pb2

from stowaway.errors import StowawayError
from stowaway.image.digest import CHUNK, VerifyingReader
from stowaway.image.model import Blob, Descriptor
from stowaway.runtime.proto import snapshots_mount_pb2 as mount_pb
from stowaway.runtime.proto import snapshots_pb2 as snap_pb
from stowaway.runtime.proto import snapshots_pb2_grpc as snap_grpc
from stowaway.runtime.proto.containerd_api import content_pb2 as content_pb
from stowaway.runtime.proto.containerd_api import content_pb2_grpc as content_grpc
from stowaway.runtime.proto.containerd_api import descriptor_pb2 as desc_pb
from stowaway.runtime.proto.containerd_api import diff_pb2 as diff_pb
from stowaway.runtime.proto.containerd_api import diff_pb2_grpc as diff_grpc
from stowaway.runtime.proto.containerd_api import images_pb2 as images_pb
from stowaway.runtime.proto.containerd_api import images_pb2_grpc as images_grpc
from stowaway.runtime.proto.containerd_api import leases_pb2 as leases_pb
from stowaway.runtime.proto.containerd_api import leases_pb2_grpc as leases_grpc
from stowaway.runtime.snapshotter.contract import Mount

__all__ = ["ContainerdClient", "ContainerdError", "ImageRecord", "mount_from_pb", "mount_to_pb"]

#: gRPC messages may carry this much (a content write chunk is 1 MiB).
MAX_MESSAGE = 16 << 20
#: A lease protects fresh content/snapshots this long if we crash before deleting it.
LEASE_TTL = timedelta(hours=1)


class ContainerdError(StowawayError):
    """A containerd call that failed; says which call, on which socket, and why."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImageRecord:
    """containerd's image record: a name pointing at a manifest descriptor."""

    name: str
    target: Descriptor
    labels: dict[str, str]


def _descriptor_pb(d: Descriptor) -> Any:
    return desc_pb.Descriptor(
        media_type=d.media_type, digest=d.digest, size=d.size, annotations=d.annotations
    )


class ContainerdClient:
    """containerd's API on ``address`` (a unix socket path) in one ``namespace``."""

    def __init__(self, address: str, namespace: str = "k8s.io", timeout: float = 120.0) -> None:
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self.channel = grpc.insecure_channel(
            f"unix:{address}",
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        self._content = content_grpc.ContentStub(self.channel)
        self._images = images_grpc.ImagesStub(self.channel)
        self._leases = leases_grpc.LeasesStub(self.channel)
        self._diff = diff_grpc.DiffStub(self.channel)
        self._snapshots = snap_grpc.SnapshotsStub(self.channel)
        self._leases_held = threading.local()  # .id: this thread's lease, if any

    def close(self) -> None:
        self.channel.close()

    # ------------------------------------------------------------------ plumbing

    def _md(self) -> list[tuple[str, str]]:
        md = [("containerd-namespace", self.namespace)]
        lease: str | None = getattr(self._leases_held, "id", None)
        if lease:
            md.append(("containerd-lease", lease))
        return md

    def _call(self, what: str, fn: Any, request: Any) -> Any:
        try:
            return fn(request, metadata=self._md(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._error(what, e) from None

    def _error(self, what: str, e: grpc.RpcError) -> ContainerdError:
        code = e.code() if isinstance(e, grpc.Call) else None
        details = e.details() if isinstance(e, grpc.Call) else str(e)
        name = code.name if code else "error"
        return ContainerdError(
            f"containerd {what} failed ({name}: {details}) on {self.address}", code
        )

    @contextlib.contextmanager
    def lease(self) -> Iterator[str]:
        """Hold a lease (with an expiry, in case we die) for the calls this thread makes
        inside."""
        expire = (datetime.now(UTC) + LEASE_TTL).strftime("%Y-%m-%dT%H:%M:%SZ")
        lease_id = f"stowaway-cri-{uuid.uuid4().hex}"
        req = leases_pb.CreateRequest(id=lease_id, labels={"containerd.io/gc.expire": expire})
        self._call("lease create", self._leases.Create, req)
        previous = getattr(self._leases_held, "id", None)
        self._leases_held.id = lease_id
        try:
            yield lease_id
        finally:
            self._leases_held.id = previous
            with contextlib.suppress(ContainerdError):
                self._call(
                    "lease delete", self._leases.Delete, leases_pb.DeleteRequest(id=lease_id)
                )

    # ------------------------------------------------------------------ content

    def content_labels(self, digest: str) -> dict[str, str] | None:
        """Labels of a committed blob, or None when containerd does not have it."""
        try:
            resp = self._call(
                "content info", self._content.Info, content_pb.InfoRequest(digest=digest)
            )
        except ContainerdError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return dict(resp.info.labels)

    def set_content_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        """Set (add or overwrite) just these labels on a committed blob."""
        if not labels:
            return
        info = content_pb.Info(digest=digest, labels=dict(labels))
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in sorted(labels)])
        req = content_pb.UpdateRequest(info=info, update_mask=mask)
        self._call(f"content update of {digest}", self._content.Update, req)

    def read_content(self, digest: str) -> bytes:
        """A whole (small) blob: manifests and configs."""
        req = content_pb.ReadContentRequest(digest=digest)
        try:
            stream = self._content.Read(req, metadata=self._md(), timeout=self.timeout)
            return b"".join(r.data for r in stream)
        except grpc.RpcError as e:
            raise self._error(f"content read of {digest}", e) from None

    def put_blob(
        self,
        blob: Blob,
        labels: Mapping[str, str] | None = None,
        source: Callable[[], BinaryIO] | None = None,
    ) -> bool:
        """Make sure containerd holds ``blob`` (with ``labels``); True if bytes were sent.

        The bytes come from ``source()`` (e.g. a registry response), by default from
        ``blob.open()``; it is called only when containerd lacks the blob. Bytes are
        streamed in 1 MiB chunks and hashed on the way (a damaged cache entry or
        download fails here, not in containerd), and containerd checks size and digest
        at commit.
        """
        labels = dict(labels or {})
        have = self.content_labels(blob.digest)
        if have is not None:
            missing = {k: v for k, v in labels.items() if have.get(k) != v}
            self.set_content_labels(blob.digest, missing)
            return False
        ref = f"stowaway-{blob.digest}"
        try:
            responses = self._content.Write(
                self._write_requests(blob, source or blob.open, ref, labels),
                metadata=self._md(),
                timeout=self.timeout,
            )
            for _ in responses:
                pass
        except grpc.RpcError as e:
            err = self._error(f"content write of {blob.digest} ({blob.media_type})", e)
            if err.code == grpc.StatusCode.ALREADY_EXISTS:  # a concurrent writer won
                self.set_content_labels(blob.digest, labels)
                return False
            with contextlib.suppress(ContainerdError):
                self._call("content abort", self._content.Abort, content_pb.AbortRequest(ref=ref))
            raise err from None
        return True

    def _write_requests(
        self, blob: Blob, source: Callable[[], BinaryIO], ref: str, labels: dict[str, str]
    ) -> Iterator[Any]:
        with source() as f:
            reader = VerifyingReader(f, blob.digest, blob.size)
            offset = 0
            while chunk := reader.read(CHUNK):
                yield content_pb.WriteContentRequest(
                    action=content_pb.WRITE, ref=ref, offset=offset, data=chunk, total=blob.size
                )
                offset += len(chunk)
        yield content_pb.WriteContentRequest(
            action=content_pb.COMMIT,
            ref=ref,
            offset=offset,
            total=blob.size,
            expected=blob.digest,
            labels=labels,
        )

    # ------------------------------------------------------------------ images

    def get_image(self, name: str) -> ImageRecord | None:
        try:
            resp = self._call("image get", self._images.Get, images_pb.GetImageRequest(name=name))
        except ContainerdError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return _record(resp.image)

    def list_images(self, filters: Sequence[str] = ()) -> list[ImageRecord]:
        req = images_pb.ListImagesRequest(filters=list(filters))
        resp = self._call("image list", self._images.List, req)
        return [_record(i) for i in resp.images]

    def put_image(self, name: str, target: Descriptor, labels: Mapping[str, str]) -> None:
        """Create the image record, or point an existing one at ``target``."""
        img = images_pb.Image(name=name, target=_descriptor_pb(target), labels=dict(labels))
        try:
            self._call(
                f"image create {name}", self._images.Create, images_pb.CreateImageRequest(image=img)
            )
            return
        except ContainerdError as e:
            if e.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
        paths = ["target", *(f"labels.{k}" for k in sorted(labels))]
        req = images_pb.UpdateImageRequest(
            image=img, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        self._call(f"image update {name}", self._images.Update, req)

    def delete_image(self, name: str) -> bool:
        """Delete an image record; False if there was none (idempotent)."""
        try:
            self._call(
                f"image delete {name}", self._images.Delete, images_pb.DeleteImageRequest(name=name)
            )
        except ContainerdError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    # ------------------------------------------------------------------ snapshots and diff

    def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        req = snap_pb.StatSnapshotRequest(snapshotter=snapshotter, key=key)
        try:
            self._call(f"snapshot stat {key}", self._snapshots.Stat, req)
        except ContainerdError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    def snapshotter_available(self, snapshotter: str) -> bool:
        """Whether containerd knows a snapshotter of this name (and it answers)."""
        req = snap_pb.StatSnapshotRequest(snapshotter=snapshotter, key="stowaway-cri-probe")
        try:
            self._call("snapshot stat", self._snapshots.Stat, req)
        except ContainerdError as e:
            return bool(e.code == grpc.StatusCode.NOT_FOUND)
        return True

    def prepare(
        self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[Mount] | None:
        """Prepare an active snapshot; None when the snapshotter answers ALREADY_EXISTS
        (a remote snapshotter that already has the committed layer)."""
        req = snap_pb.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels)
        )
        try:
            resp = self._call(f"snapshot prepare {key!r}", self._snapshots.Prepare, req)
        except ContainerdError as e:
            if e.code == grpc.StatusCode.ALREADY_EXISTS:
                return None
            raise
        return [mount_from_pb(m) for m in resp.mounts]

    def commit(self, snapshotter: str, name: str, key: str, labels: Mapping[str, str]) -> None:
        req = snap_pb.CommitSnapshotRequest(
            snapshotter=snapshotter, name=name, key=key, labels=dict(labels)
        )
        try:
            self._call(f"snapshot commit {name}", self._snapshots.Commit, req)
        except ContainerdError as e:
            if e.code != grpc.StatusCode.ALREADY_EXISTS:  # someone unpacked it meanwhile
                raise

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        req = snap_pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        with contextlib.suppress(ContainerdError):
            self._call(f"snapshot remove {key!r}", self._snapshots.Remove, req)

    def apply(self, layer: Descriptor, mounts: Sequence[Mount]) -> str:
        """Unpack a layer blob onto ``mounts``; returns the diff ID containerd computed."""
        req = diff_pb.ApplyRequest(
            diff=_descriptor_pb(layer),
            mounts=[mount_to_pb(m) for m in mounts],
        )
        resp = self._call(f"diff apply of {layer.digest}", self._diff.Apply, req)
        return str(resp.applied.digest)


def mount_from_pb(m: mount_pb.Mount) -> Mount:
    """All four fields: bind mode's store-path mounts (containerd ≥ 1.7) need ``target``."""
    return Mount(m.type, m.source, tuple(m.options), m.target)


def mount_to_pb(m: Mount) -> mount_pb.Mount:
    return mount_pb.Mount(type=m.type, source=m.source, options=m.options, target=m.target)


def _record(img: Any) -> ImageRecord:
    t = img.target
    target = Descriptor(t.media_type, t.digest, t.size, dict(t.annotations))
    return ImageRecord(name=img.name, target=target, labels=dict(img.labels))
