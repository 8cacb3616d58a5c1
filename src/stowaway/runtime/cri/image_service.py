"""The CRI ImageService (runtime.v1) kubelet talks to via ``--image-service-endpoint``.

Requests are handled as raw bytes: every call and every non-``nix:0`` reference is
forwarded byte for byte to containerd's CRI on the containerd socket (so fields this
module's protos leave out survive), and only the image reference is decoded to decide.
``nix:0`` references are answered here (see ``nix_images``). ListImages merges: containerd's
CRI answers, and our references are added as repo tags of the matching image IDs (CRI
cannot show them: ``nix:0/…`` without a tag is neither a tag nor a digest to it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from stowaway.errors import StowawayError
from stowaway.runtime.containerd_client import ContainerdError
from stowaway.runtime.cri.nix_images import (
    NIX_PREFIX,
    InvalidNixReference,
    NixImages,
    image_name,
    parse_nix_ref,
)
from stowaway.runtime.proto.cri import api_pb2 as cri

__all__ = ["ImageServiceProxy", "serve"]

log = logging.getLogger(__name__)

SERVICE = "runtime.v1.ImageService"
METHODS = ("ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo")

#: grpc reports "no deadline" as an enormous time_remaining().
_NO_DEADLINE = 10**8

Handler = Callable[[bytes, grpc.ServicerContext], bytes]


class ImageServiceProxy:
    """Routes each ImageService call to the nix handler or to containerd's CRI."""

    def __init__(self, nix: NixImages, upstream: grpc.Channel) -> None:
        self.nix = nix
        self._upstream = {
            m: upstream.unary_unary(f"/{SERVICE}/{m}") for m in METHODS
        }  # no (de)serializers: bytes in, bytes out

    # ------------------------------------------------------------------ plumbing

    def forward(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        remaining = context.time_remaining()
        if remaining is not None and remaining > _NO_DEADLINE:  # the caller set none
            remaining = None
        try:
            return bytes(self._upstream[method](request, timeout=remaining))
        except grpc.RpcError as e:
            if isinstance(e, grpc.Call):
                context.abort(e.code(), e.details() or "")
            context.abort(grpc.StatusCode.UNAVAILABLE, f"containerd CRI: {e}")
        raise AssertionError("unreachable")

    def _nix_ref(self, ref: str, context: grpc.ServicerContext) -> str | None:
        try:
            return parse_nix_ref(ref)
        except InvalidNixReference as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
        raise AssertionError("unreachable")

    def _guard(self, what: str, context: grpc.ServicerContext, fn: Callable[[], bytes]) -> bytes:
        try:
            return fn()
        except InvalidNixReference as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
        except ContainerdError as e:
            log.error("%s: %s", what, e)
            context.abort(grpc.StatusCode.UNAVAILABLE if e.code is None else e.code, f"{what}: {e}")
        except StowawayError as e:
            log.error("%s: %s", what, e)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{what}: {e}")
        raise AssertionError("unreachable")

    def handlers(self) -> grpc.GenericRpcHandler:
        table: dict[str, Handler] = {
            "ListImages": self.list_images,
            "ImageStatus": self.image_status,
            "PullImage": self.pull_image,
            "RemoveImage": self.remove_image,
            "ImageFsInfo": lambda req, ctx: self.forward("ImageFsInfo", req, ctx),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE, {m: grpc.unary_unary_rpc_method_handler(fn) for m, fn in table.items()}
        )

    # ------------------------------------------------------------------ calls

    def pull_image(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        req = cri.PullImageRequest.FromString(request)
        ref = req.image.image
        path = self._nix_ref(ref, context)
        if path is None:
            return self.forward("PullImage", request, context)
        started = time.monotonic()

        def pull() -> bytes:
            image_id = self.nix.pull(path)
            log.info("pulled %s as %s in %.1fs", ref, image_id, time.monotonic() - started)
            return bytes(cri.PullImageResponse(image_ref=image_id).SerializeToString())

        return self._guard(f"pulling {ref}", context, pull)

    def image_status(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        req = cri.ImageStatusRequest.FromString(request)
        path = self._nix_ref(req.image.image, context)
        if path is None:
            return self.forward("ImageStatus", request, context)

        def status() -> bytes:
            image = self._cri_image(path)
            resp = cri.ImageStatusResponse(image=image) if image else cri.ImageStatusResponse()
            return bytes(resp.SerializeToString())

        return self._guard(f"status of {req.image.image}", context, status)

    def remove_image(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        req = cri.RemoveImageRequest.FromString(request)
        ref = req.image.image
        path = self._nix_ref(ref, context)
        if path is None:
            out = self.forward("RemoveImage", request, context)
            # Removing by ID drops nix:0 records too (CRI deletes every name of the image).
            self._guard("reconciling GC roots", context, lambda: self._reconcile())
            return out

        def remove() -> bytes:
            self.nix.remove(path)
            return bytes(cri.RemoveImageResponse().SerializeToString())

        return self._guard(f"removing {ref}", context, remove)

    def list_images(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        req = cri.ListImagesRequest.FromString(request)
        wanted = req.filter.image.image if req.HasField("filter") else ""
        path = self._nix_ref(wanted, context) if wanted else None
        if path is not None:

            def one() -> bytes:
                image = self._cri_image(path)
                return bytes(
                    cri.ListImagesResponse(images=[image] if image else []).SerializeToString()
                )

            return self._guard(f"listing {wanted}", context, one)
        upstream = cri.ListImagesResponse.FromString(self.forward("ListImages", request, context))
        if wanted:
            return bytes(upstream.SerializeToString())
        return self._guard("listing images", context, lambda: self._merge(upstream))

    # ------------------------------------------------------------------ helpers

    def _reconcile(self) -> bytes:
        self.nix.reconcile_roots()
        return b""

    def _merge(self, upstream: Any) -> bytes:
        by_id = {img.id: img for img in upstream.images}
        for rec in self.nix.nix_records():
            image_id, config, size = self.nix.config_of(rec)
            img = by_id.get(image_id)
            if img is None:
                img = upstream.images.add()
                _fill(img, image_id, config, size, rec.name)
                by_id[image_id] = img
            elif rec.name not in img.repo_tags:
                img.repo_tags.append(rec.name)
        return bytes(upstream.SerializeToString())

    def _cri_image(self, path: str) -> Any:
        rec = self.nix.record(path)
        if rec is None:
            return None
        image_id, config, size = self.nix.config_of(rec)
        img = cri.Image()
        _fill(img, image_id, config, size, image_name(path))
        return img


def _fill(img: Any, image_id: str, config: dict[str, Any], size: int, name: str) -> None:
    """An Image as containerd's CRI describes one (id, tags, size, user)."""
    img.id = image_id
    img.repo_tags.append(name)
    img.size = size
    img.spec.image = image_id
    user = str(config.get("config", {}).get("User", ""))
    uid, _, _ = user.partition(":")
    if uid.isdigit():
        img.uid.value = int(uid)
    elif uid:
        img.username = uid


def serve(proxy: ImageServiceProxy, socket_path: str, workers: int = 8) -> grpc.Server:
    """Start the gRPC server on a unix socket; the caller waits and stops it."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((proxy.handlers(),))
    if server.add_insecure_port(f"unix:{socket_path}") == 0:
        raise StowawayError(f"cannot listen on unix socket {socket_path}")
    server.start()
    log.info("CRI image service on %s (nix references: %s/…)", socket_path, NIX_PREFIX)
    return server
