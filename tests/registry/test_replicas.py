"""Scale-out: two real ``stowaway serve`` processes on one S3 bucket (moto).

An image pushed through one is pulled through the other; both compose the same
on-demand Nix name at once into the same manifest; one is killed (SIGKILL) in the
middle of a chunked blob upload and the other keeps serving everything, never the
half-written blob, and takes the push over."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import boto3  # type: ignore[import-untyped]
import pytest
from registry_harness import Reply, http_request
from registry_helpers import OCI, demo_packages, layout_manifest, skopeo, write_demo_index

from daemons import free_port
from nixtools import SANDBOXED_MK
from s3_fixtures import CREDS

BOTO_CREDS = {
    "aws_access_key_id": CREDS["access_key"],
    "aws_secret_access_key": CREDS["secret_key"],
    "region_name": CREDS["region"],
}


@dataclass
class Replica:
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        return http_request(self.port, method, path, body, headers)


@pytest.fixture()
def replicas(
    tmp_path: Path,
    demo_closure: list[str],
    moto_endpoint: str,  # noqa: F811
    bucket: str,  # noqa: F811
) -> Iterator[list[Replica]]:
    """Two ``python -m stowaway serve`` processes, each with its own layer cache and
    nix roots (as on two machines), on one bucket; nix-build on, one Nix expression."""
    index = write_demo_index(tmp_path / "index.json", demo_packages(demo_closure))
    expr = tmp_path / "pkgs.nix"
    stamp = time.time_ns()
    expr.write_text(
        f'let mk = {SANDBOXED_MK}; in {{ ondemand = mk "ondemand-{stamp}" '
        f'"sleep 1; mkdir -p $out/bin; echo {stamp} > $out/bin/ondemand"; }}\n'
    )
    started: list[Replica] = []
    try:
        for i in range(2):
            port = free_port()
            config = tmp_path / f"replica{i}.toml"
            config.write_text(
                f'listen = "127.0.0.1:{port}"\nstorage = "s3://{bucket}/reg"\n'
                f"max_upload_size = {64 << 20}\n"
                f'[s3]\nendpoint = "{moto_endpoint}"\nregion = "{CREDS["region"]}"\n'
                f'access_key = "{CREDS["access_key"]}"\nsecret_key = "{CREDS["secret_key"]}"\n'
                f'[nix]\nindex = "{index}"\ncache_dir = "{tmp_path / f"cache{i}"}"\n'
                f'nix_build = true\nnix_expr = "{expr}"\n'
                'nix_build_args = ["--option", "substituters", ""]\n'
            )
            log = tmp_path / f"replica{i}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "stowaway", "serve", "--config", str(config)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            started.append(Replica(f"127.0.0.1:{port}", port, proc, log))
        for r in started:
            for _ in range(300):
                try:
                    if r.request("GET", "/healthz").status == 200:
                        break
                except OSError:
                    time.sleep(0.05)
            else:
                pytest.fail(f"replica did not start: {r.log.read_text()}")
        yield started
    finally:
        for r in started:
            if r.proc.poll() is None:
                os.kill(r.proc.pid, signal.SIGTERM)
                r.proc.wait(20)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def send_partial_patch(
    replica: Replica, location: str, data: bytes, offset: int, sent: int
) -> socket.socket:
    """Start a PATCH of ``data`` at ``offset`` but send only ``sent`` bytes of it;
    returns the socket with the request still open (the server inside the upload)."""
    sock = socket.create_connection(("127.0.0.1", replica.port))
    head = (
        f"PATCH {location} HTTP/1.1\r\nHost: {replica.host}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n"
        f"Content-Range: {offset}-{offset + len(data) - 1}\r\n\r\n"
    )
    sock.sendall(head.encode() + data[:sent])
    return sock


def test_two_replicas_share_one_bucket(
    replicas: list[Replica],
    oci_layout: Path,
    tmp_path: Path,
    moto_endpoint: str,  # noqa: F811
    bucket: str,  # noqa: F811
) -> None:
    a, b = replicas
    # pushed through one, pulled through the other
    skopeo("copy", "--dest-tls-verify=false", f"oci:{oci_layout}:t",
           f"docker://{a.host}/rep/busybox:1")  # fmt: skip
    src = layout_manifest(oci_layout)
    skopeo("copy", "--src-tls-verify=false", f"docker://{b.host}/rep/busybox:1",
           f"oci:{tmp_path / 'from-b'}:p")  # fmt: skip
    assert layout_manifest(tmp_path / "from-b", "p")["digest"] == src["digest"]

    # the first pulls of one on-demand name, on both at once: the same image
    def pull(r: Replica, name: str) -> Reply:
        return r.request("GET", f"/v2/{name}/manifests/latest", headers={"Accept": OCI})

    with ThreadPoolExecutor(4) as pool:
        firsts = list(pool.map(pull, [a, b, a, b], ["ondemand", "ondemand", "demo", "demo"]))
    assert [r.status for r in firsts] == [200] * 4, [r.body for r in firsts]
    for x, y in (firsts[:2], firsts[2:]):
        assert x.headers["Docker-Content-Digest"] == y.headers["Docker-Content-Digest"]
        assert x.body == y.body
    built = json.loads(firsts[0].body)
    for d in [built["config"], *built["layers"]]:  # every blob, through either replica
        for replica in (a, b):
            blob = replica.request("GET", f"/v2/ondemand/blobs/{d['digest']}")
            assert blob.status == 200 and sha(blob.body) == d["digest"]

    # a chunked upload through a, killed (SIGKILL) in the middle of its second chunk
    big = os.urandom(1 << 20) * 20
    first = 9 << 20
    loc = a.request("POST", "/v2/rep/big/blobs/uploads/").headers["Location"]
    r = a.request("PATCH", loc, big[:first], {"Content-Range": f"0-{first - 1}"})
    assert r.status == 202, r.body
    sock = send_partial_patch(a, loc, big[first:], first, 10 << 20)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, **BOTO_CREDS)
    deadline = time.monotonic() + 20
    parts: list[object] = []
    while not parts and time.monotonic() < deadline:  # a's first S3 part of the chunk is up
        for up in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            if "/_uploads/" in up["Key"]:
                got = s3.list_parts(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                parts = got.get("Parts", [])
        time.sleep(0.05)
    assert parts, "the second chunk was being written when a was killed"
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait(10)
    sock.close()

    # b serves everything intact, and never the interrupted blob
    skopeo("copy", "--src-tls-verify=false", f"docker://{b.host}/rep/busybox:1",
           f"oci:{tmp_path / 'after-kill'}:p")  # fmt: skip
    assert layout_manifest(tmp_path / "after-kill", "p")["digest"] == src["digest"]
    again = pull(b, "ondemand")
    assert again.status == 200 and again.body == firsts[0].body
    r = b.request("GET", f"/v2/rep/big/blobs/{sha(big)}")
    assert r.status == 404 and r.code == "BLOB_UNKNOWN", r.body
    assert b.request("HEAD", f"/v2/rep/big/blobs/{sha(big)}").status == 404
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    r = b.request("POST", f"/v2/rep/big/blobs/uploads/?digest={sha(config)}", config)
    assert r.status == 201, r.body
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": sha(big),
                    "size": len(big),
                }
            ],
        }
    ).encode()
    r = b.request("PUT", "/v2/rep/big/manifests/v1", manifest, {"Content-Type": OCI})
    assert r.status == 400 and r.code == "MANIFEST_BLOB_UNKNOWN", r.body

    # the push is taken over by b: the upload kept what a stored (the first chunk)
    status = b.request("GET", loc)
    assert status.status == 204 and status.headers["Range"] == f"0-{first - 1}"
    r = b.request("PATCH", loc, big[first:], {"Content-Range": f"{first}-{len(big) - 1}"})
    assert r.status == 202, r.body
    r = b.request("PUT", f"{loc}?digest={sha(big)}")
    assert r.status == 201, r.body
    r = b.request("PUT", "/v2/rep/big/manifests/v1", manifest, {"Content-Type": OCI})
    assert r.status == 201, r.body
    assert sha(b.request("GET", f"/v2/rep/big/blobs/{sha(big)}").body) == sha(big)
    # and a whole retried push with a client through b
    skopeo("copy", "--dest-tls-verify=false", f"oci:{oci_layout}:t",
           f"docker://{b.host}/rep/busybox:2")  # fmt: skip
    tags = json.loads(skopeo("list-tags", "--tls-verify=false", f"docker://{b.host}/rep/busybox"))
    assert tags["Tags"] == ["1", "2"]
