"""containerd snapshots v1 gRPC over a unix socket: a thin adapter over a Snapshotter.

Why thin: all semantics live in the Snapshotter; this module only converts messages
and maps NotFound/AlreadyExists/FailedPrecondition/InvalidArgument to the status codes
containerd's proxy client turns back into its errdefs (ALREADY_EXISTS is how a remote
snapshotter tells containerd a layer needs no download).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from stowaway.errors import StowawayError
from stowaway.runtime.containerd_client import mount_to_pb
from stowaway.runtime.proto import snapshots_pb2 as pb
from stowaway.runtime.proto import snapshots_pb2_grpc as pb_grpc
from stowaway.runtime.snapshotter.contract import (
    AlreadyExists,
    FailedPrecondition,
    Info,
    InvalidArgument,
    Kind,
    Mount,
    NotFound,
    Snapshotter,
)
from stowaway.runtime.snapshotter.state import SnapshotterConfig
from stowaway.runtime.snapshotter.store_snapshotter import StoreSnapshotter

__all__ = ["SnapshotterServer", "SnapshotsServicer", "serve_snapshotter"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_CODES: list[tuple[type[StowawayError], grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
]


def _mounts(ms: list[Mount]) -> list[Any]:
    return [mount_to_pb(m) for m in ms]


def _ts(ns: int) -> Any:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def _info_pb(i: Info) -> Any:
    return pb.Info(
        name=i.name,
        parent=i.parent,
        kind=i.kind.name,
        created_at=_ts(i.created_ns),
        updated_at=_ts(i.updated_ns),
        labels=dict(i.labels),
    )


class SnapshotsServicer(pb_grpc.SnapshotsServicer):  # type: ignore[misc]
    """Each RPC calls one Snapshotter method; errors become status codes."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.s = snapshotter

    def _call(self, context: Any, what: str, fn: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        try:
            return fn()
        except StowawayError as e:
            code = next((c for t, c in _CODES if isinstance(e, t)), grpc.StatusCode.UNKNOWN)
            if code not in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND):
                log.warning("%s: %s", what, e)
            context.abort(code, str(e))
            raise  # abort raises; this line is never reached
        except Exception as e:
            log.exception("%s failed", what)
            context.abort(grpc.StatusCode.INTERNAL, f"{what}: {e}")
            raise
        finally:  # server-side time per call: what profiling a pull starts from
            log.debug("%s: %.1f ms", what, (time.perf_counter() - t0) * 1000)

    def Prepare(self, req: Any, context: Any) -> Any:
        ms = self._call(
            context, f"prepare {req.key}", lambda: self.s.prepare(req.key, req.parent, req.labels)
        )
        return pb.PrepareSnapshotResponse(mounts=_mounts(ms))

    def View(self, req: Any, context: Any) -> Any:
        ms = self._call(
            context, f"view {req.key}", lambda: self.s.view(req.key, req.parent, req.labels)
        )
        return pb.ViewSnapshotResponse(mounts=_mounts(ms))

    def Mounts(self, req: Any, context: Any) -> Any:
        ms = self._call(context, f"mounts {req.key}", lambda: self.s.mounts(req.key))
        return pb.MountsResponse(mounts=_mounts(ms))

    def Commit(self, req: Any, context: Any) -> Any:
        self._call(
            context, f"commit {req.key}", lambda: self.s.commit(req.name, req.key, req.labels)
        )
        return empty_pb2.Empty()

    def Remove(self, req: Any, context: Any) -> Any:
        self._call(context, f"remove {req.key}", lambda: self.s.remove(req.key))
        return empty_pb2.Empty()

    def Stat(self, req: Any, context: Any) -> Any:
        info = self._call(context, f"stat {req.key}", lambda: self.s.stat(req.key))
        return pb.StatSnapshotResponse(info=_info_pb(info))

    def Update(self, req: Any, context: Any) -> Any:
        i = req.info
        info = Info(i.name, i.parent, Kind(i.kind), 0, 0, dict(i.labels))
        paths = list(req.update_mask.paths)
        new = self._call(context, f"update {i.name}", lambda: self.s.update(info, paths))
        return pb.UpdateSnapshotResponse(info=_info_pb(new))

    def List(self, req: Any, context: Any) -> Iterator[Any]:
        infos = self._call(context, "list", lambda: list(self.s.walk(list(req.filters))))
        for start in range(0, len(infos), 100):
            yield pb.ListSnapshotsResponse(info=[_info_pb(i) for i in infos[start : start + 100]])

    def Usage(self, req: Any, context: Any) -> Any:
        u = self._call(context, f"usage {req.key}", lambda: self.s.usage(req.key))
        return pb.UsageResponse(size=u.size, inodes=u.inodes)

    def Cleanup(self, req: Any, context: Any) -> Any:
        self._call(context, "cleanup", self.s.cleanup)
        return empty_pb2.Empty()


class SnapshotterServer:
    """The snapshotter served on a unix socket; ``start()``/``stop()`` or a ``with`` block."""

    def __init__(self, config: SnapshotterConfig, socket: Path, *, workers: int = 8) -> None:
        self.config = config
        self.socket = socket
        self.workers = workers
        self.snapshotter: StoreSnapshotter | None = None
        self._server: Any = None

    def start(self) -> None:
        self.snapshotter = StoreSnapshotter(self.config)
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        if self.socket.is_socket():
            self.socket.unlink()  # stale socket of a previous run
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers))
        pb_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(self.snapshotter), server)
        if server.add_insecure_port(f"unix:{self.socket}") == 0:
            raise StowawayError(f"cannot listen on unix socket {self.socket}")
        server.start()
        os.chmod(self.socket, 0o600)
        self._server = server
        log.info("stowaway snapshotter listening on %s", self.socket)

    def stop(self, grace: float = 2.0) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        if self.snapshotter is not None:
            self.snapshotter.close()
            self.snapshotter = None

    def __enter__(self) -> SnapshotterServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_snapshotter(config: SnapshotterConfig, socket: Path) -> None:
    """Serve until SIGINT/SIGTERM (the CLI's entry point)."""
    done = threading.Event()
    server = SnapshotterServer(config, socket)
    server.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        done.wait()
    finally:
        server.stop()
