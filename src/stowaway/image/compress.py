"""Layer compression: block-parallel gzip, multi-threaded zstd, or none.

All three are streaming writers (``write`` then ``close``) into a binary sink, with
bounded memory, and produce bytes that depend only on the input and the level —
never on the number of threads.

gzip is written here because ``gzip``/``zlib`` compress one stream on one core, so a
single large layer would leave the other cores idle. Following pigz's scheme, the
input is cut into fixed 128 KiB blocks; each block is raw-deflated independently
with the previous 32 KiB of input as preset dictionary and ends with a sync flush
(the last one with a finish), so the concatenation is one valid deflate stream.
zlib releases the GIL while deflating, so a thread pool spreads blocks over cores.
"""

from __future__ import annotations

import struct
import zlib
from collections import deque
from concurrent.futures import Executor, Future
from typing import Literal, Protocol

import zstandard

Compression = Literal["gzip", "zstd", "none"]

GZIP_BLOCK = 128 * 1024
_WINDOW = 32 * 1024
DEFAULT_LEVEL: dict[str, int] = {"gzip": 6, "zstd": 3, "none": 0}
#: gzip header: magic, deflate, no flags, mtime 0, no extra flags, OS "unknown".
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


class Writable(Protocol):
    """Where compressed bytes go: a file, or a hashing wrapper around one."""

    def write(self, data: bytes | bytearray | memoryview, /) -> object: ...


class StreamCompressor(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def close(self) -> None: ...


def _deflate_block(block: bytes, dictionary: bytes, level: int, last: bool) -> bytes:
    if dictionary:
        comp = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, dictionary)
    else:
        comp = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY)
    return comp.compress(block) + comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class ParallelGzipWriter:
    """pigz-style gzip: blocks deflated on ``executor`` (or inline when None), written
    in order; at most ``max_inflight`` blocks are held in memory."""

    def __init__(
        self, out: Writable, level: int, executor: Executor | None, max_inflight: int = 8
    ) -> None:
        self._out = out
        self._level = level
        self._executor = executor
        self._max_inflight = max(1, max_inflight)
        self._pending = bytearray()
        self._previous = b""
        self._inflight: deque[Future[bytes] | bytes] = deque()
        self._crc = 0
        self._length = 0
        out.write(_GZIP_HEADER)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._pending += data
        if len(self._pending) <= GZIP_BLOCK:
            return
        view = memoryview(self._pending)
        start = 0
        # Keep a non-empty remainder: the final block is only known at close().
        while len(view) - start > GZIP_BLOCK:
            self._submit(bytes(view[start : start + GZIP_BLOCK]), last=False)
            start += GZIP_BLOCK
        rest = bytes(view[start:])
        view.release()
        self._pending = bytearray(rest)

    def close(self) -> None:
        self._submit(bytes(self._pending), last=True)
        self._pending = bytearray()
        while self._inflight:
            self._drain_one()
        self._out.write(struct.pack("<II", self._crc, self._length & 0xFFFFFFFF))

    def _submit(self, block: bytes, *, last: bool) -> None:
        self._crc = zlib.crc32(block, self._crc)
        self._length += len(block)
        if self._executor is None:
            self._inflight.append(_deflate_block(block, self._previous, self._level, last))
        else:
            fut = self._executor.submit(_deflate_block, block, self._previous, self._level, last)
            self._inflight.append(fut)
        self._previous = block[-_WINDOW:]
        while len(self._inflight) >= self._max_inflight:
            self._drain_one()

    def _drain_one(self) -> None:
        item = self._inflight.popleft()
        self._out.write(item if isinstance(item, bytes) else item.result())


class ZstdWriter:
    """zstd in libzstd's multi-threaded mode. Its output is identical for any
    number of workers ≥ 1 and any split of the input into writes (but differs from
    single-threaded mode, which we never use), so ``threads`` only changes speed."""

    def __init__(self, out: Writable, level: int, threads: int) -> None:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=max(1, threads), write_checksum=True
        )
        self._out = out
        self._comp = zstandard.ZstdCompressor(compression_params=params).compressobj()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        produced = self._comp.compress(data)
        if produced:
            self._out.write(produced)

    def close(self) -> None:
        self._out.write(self._comp.flush())


def zstd_worker_memory(level: int) -> int:
    """Rough bytes one zstd worker needs at ``level``: its match-finder context plus
    in-flight job buffers (libzstd cuts jobs of 4 windows, at least 1 MiB). Used to
    keep a build within its memory budget; high levels get fewer workers."""
    params = zstandard.ZstdCompressionParameters.from_level(level)
    job = 1 << max(20, params.window_log + 2)
    return int(params.estimated_compression_context_size()) + 3 * job


class PlainWriter:
    """No compression: bytes go straight through."""

    def __init__(self, out: Writable) -> None:
        self._out = out

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._out.write(data)

    def close(self) -> None:
        pass


def open_compressor(
    out: Writable,
    compression: Compression,
    level: int | None = None,
    *,
    executor: Executor | None = None,
    threads: int = 1,
) -> StreamCompressor:
    """A streaming compressor writing into ``out``. ``executor`` runs gzip blocks
    (None = inline); ``threads`` is the zstd worker count."""
    effective = DEFAULT_LEVEL[compression] if level is None else level
    if compression == "gzip":
        # A deep queue (16 blocks = 2 MiB of input per layer) keeps both cores busy when
        # block costs vary; with 4 blocks the producer stalled on the slowest one.
        return ParallelGzipWriter(out, effective, executor, max_inflight=max(16, 4 * threads))
    if compression == "zstd":
        return ZstdWriter(out, effective, threads)
    return PlainWriter(out)
