"""Compressors: real decompressors accept the output, and the bytes depend only on
the input and level (not on threads or on how the input was split into writes)."""

from __future__ import annotations

import gzip
import io
import os
import random
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stowaway.image.compress import GZIP_BLOCK, Compression, open_compressor

BUSYBOX = Path("/bin/busybox").read_bytes()


def sample(size: int) -> bytes:
    """Compressible but not trivial data: busybox bytes interleaved with random runs."""
    rng = random.Random(size)
    out = bytearray()
    while len(out) < size:
        start = rng.randrange(len(BUSYBOX))
        out += BUSYBOX[start : start + rng.randrange(1, 50_000)]
        out += rng.randbytes(rng.randrange(0, 2_000))
    return bytes(out[:size])


def compress(
    data: bytes,
    compression: Compression,
    *,
    level: int | None = None,
    jobs: int = 1,
    step: int = 1 << 20,
) -> bytes:
    out = io.BytesIO()
    with ThreadPoolExecutor(jobs) as pool:
        comp = open_compressor(
            out, compression, level, executor=pool if jobs > 1 else None, threads=jobs
        )
        for i in range(0, len(data), step):
            comp.write(data[i : i + step])
        comp.close()
    return out.getvalue()


SIZES = [0, 1, GZIP_BLOCK - 1, GZIP_BLOCK, GZIP_BLOCK + 1, 3 * GZIP_BLOCK, 2_000_000]


@pytest.mark.parametrize("size", SIZES)
def test_gzip_decompresses_with_gzip_and_python(size: int) -> None:
    data = sample(size)
    blob = compress(data, "gzip", jobs=2)
    assert gzip.decompress(blob) == data
    out = subprocess.run(["gzip", "-dc"], input=blob, check=True, capture_output=True).stdout
    assert out == data


def test_gzip_header_has_no_name_and_no_time() -> None:
    blob = compress(b"hello", "gzip")
    assert blob[:4] == b"\x1f\x8b\x08\x00"  # deflate, no FNAME/FEXTRA/FCOMMENT flags
    assert blob[4:8] == b"\0\0\0\0"  # mtime 0


def test_gzip_independent_of_threads_and_write_sizes() -> None:
    data = sample(1_500_000)
    reference = compress(data, "gzip")
    assert compress(data, "gzip", jobs=2) == reference
    assert compress(data, "gzip", jobs=3, step=7_777) == reference
    assert compress(data, "gzip", jobs=2, step=GZIP_BLOCK) == reference


def test_gzip_level_changes_output_and_still_decodes() -> None:
    data = sample(1_000_000)
    fast, best = compress(data, "gzip", level=1, jobs=2), compress(data, "gzip", level=9, jobs=2)
    assert fast != best and len(best) < len(fast)
    assert gzip.decompress(fast) == gzip.decompress(best) == data


def test_zstd_decompresses_with_zstd_cli_and_is_thread_independent() -> None:
    data = sample(2_000_000)
    one = compress(data, "zstd", jobs=1)
    assert compress(data, "zstd", jobs=2, step=12_345) == one
    out = subprocess.run(["zstd", "-dc"], input=one, check=True, capture_output=True).stdout
    assert out == data
    assert compress(data, "zstd", level=1) != one


def test_zstd_empty_input() -> None:
    blob = compress(b"", "zstd")
    assert (
        subprocess.run(["zstd", "-dc"], input=blob, check=True, capture_output=True).stdout == b""
    )


def test_none_passes_bytes_through() -> None:
    data = os.urandom(100_000)
    assert compress(data, "none", step=999) == data
