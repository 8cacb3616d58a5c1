"""Micro benchmark: our tar writer vs Python's tarfile, and our block-parallel gzip
vs ``pigz -p 2 -6``, on the same bytes.

    .venv/bin/python bench/tar_throughput.py [FILE ...]

Defaults to a few large host binaries as gzip input.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stowaway.image.compress import open_compressor
from stowaway.image.model import TarEntry
from stowaway.image.tar import write_tar

DEFAULT_INPUTS = ["/usr/bin/containerd", "/usr/sbin/dockerd", "/usr/bin/skopeo", "/bin/busybox"]


def bench_headers(n: int = 50_000) -> None:
    names = [b"nix/store/%032d-pkg/share/file-%d" % (i % 97, i) for i in range(n)]
    start = time.perf_counter()
    ours = b"".join(
        write_tar(
            (TarEntry(name, "regular", 0o444, size=4, chunks=iter([b"data"])) for name in names),
            mtime=1,
        )
    )
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in names:
            info = tarfile.TarInfo(name.decode())
            info.size, info.mode, info.mtime = 4, 0o444, 1
            tf.addfile(info, io.BytesIO(b"data"))
    t_tarfile = time.perf_counter() - start
    print(f"tar headers: {n} small files  ours {t_ours:.2f}s  tarfile {t_tarfile:.2f}s")
    assert len(ours) > 0


def bench_gzip(paths: list[str]) -> None:
    data = b"".join(Path(p).read_bytes() for p in paths if Path(p).exists())
    mib = len(data) / (1 << 20)
    with ThreadPoolExecutor(2) as pool:
        out = io.BytesIO()
        start = time.perf_counter()
        comp = open_compressor(out, "gzip", 6, executor=pool, threads=2)
        for i in range(0, len(data), 1 << 20):
            comp.write(data[i : i + (1 << 20)])
        comp.close()
        t_ours = time.perf_counter() - start
    start = time.perf_counter()
    pigz = subprocess.run(["pigz", "-p", "2", "-6", "-c"], input=data, capture_output=True)
    t_pigz = time.perf_counter() - start
    print(
        f"gzip -6 of {mib:.0f} MiB: ours {t_ours:.2f}s ({mib / t_ours:.0f} MiB/s, "
        f"{len(out.getvalue())} B)  pigz -p 2 {t_pigz:.2f}s ({len(pigz.stdout)} B)  "
        f"time ratio ours/pigz {t_ours / t_pigz:.2f}"
    )


if __name__ == "__main__":
    bench_headers()
    bench_gzip(sys.argv[1:] or DEFAULT_INPUTS)
