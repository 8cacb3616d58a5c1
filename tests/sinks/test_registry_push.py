"""Pushing to a real private docker-registry 2.8 (and pulling back with skopeo)."""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import re
import signal
import socket
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from daemons import wait_for
from stowaway.distribution.credentials import find_credentials
from stowaway.errors import RegistryError
from stowaway.image.digest import CorruptBlob
from stowaway.image.layer_cache import default_cache_dir
from stowaway.image.model import Blob, Image, Layer, MediaType
from stowaway.sinks import registry as sink
from stowaway.sinks.registry import PushRecord, push

USER, PASSWORD = "alice", "s3cret-pw"
REFRESH_TOKEN = "identity-token-of-alice"
ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[\d.]+" (?P<status>\d+)')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Request:
    method: str
    uri: str
    status: int


class Registry:
    """A private docker-registry on a loopback port; its access log is stdout."""

    def __init__(
        self, root: Path, *, htpasswd: bool = False, auth: str = "", relative: bool = False
    ) -> None:
        self.root = root
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.data = root / "data"
        self.access = root / "access.log"
        if htpasswd:
            entry = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()
            (root / "htpasswd").write_text(f"{USER}:{entry}\n")
            auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {root / 'htpasswd'}\n"
        config = root / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: info\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.data}\n"
            f"http:\n  addr: {self.host}\n  secret: test-secret\n"
            f"  relativeurls: {'true' if relative else 'false'}\n{auth}"
        )
        with open(self.access, "wb") as out, open(root / "registry.log", "wb") as err:
            self.proc = subprocess.Popen(
                ["docker-registry", "serve", str(config)], stdout=out, stderr=err
            )

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError((root / "registry.log").read_text())
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True

        try:
            wait_for(listening, 10, "the registry to listen", ignore=(OSError,))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def mark(self) -> int:
        """Position in the access log; pass to ``requests`` to see what came after."""
        time.sleep(0.05)  # let the registry flush lines of requests already answered
        return self.access.stat().st_size

    def requests(self, since: int) -> list[Request]:
        time.sleep(0.05)
        with open(self.access, "rb") as f:
            f.seek(since)
            text = f.read().decode()
        return [
            Request(m["method"], m["uri"], int(m["status"]))
            for m in map(ACCESS.search, text.splitlines())
            if m
        ]

    def blob_file(self, digest: str) -> Path:
        hexpart = digest.split(":")[1]
        return self.data / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"


def blob_uploads(reqs: list[Request]) -> list[Request]:
    """Requests that carry blob bytes (monolithic PUT or chunk PATCH)."""
    return [r for r in reqs if r.method in ("PUT", "PATCH") and "/blobs/uploads/" in r.uri]


def committed_digests(reqs: list[Request]) -> set[str]:
    out = set()
    for r in blob_uploads(reqs):
        m = re.search(r"[?&]digest=sha256(?::|%3A)([0-9a-f]{64})", r.uri)
        if r.method == "PUT" and m and r.status == 201:
            out.add("sha256:" + m[1])
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("auth-registry"), htpasswd=True)
    yield reg
    reg.stop()


@pytest.fixture()
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


# -- test images from real bytes ---------------------------------------------------

REAL_FILES = [Path("/bin/busybox"), *sorted(Path("/usr/share/common-licenses").iterdir())[:6]]


def _layer(blobs: Path, files: list[tuple[str, bytes]]) -> Layer:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1, 0o444
            tar.addfile(info, io.BytesIO(data))
    tarbytes = raw.getvalue()
    gz = gzip.compress(tarbytes, compresslevel=1, mtime=0)
    digest = "sha256:" + hashlib.sha256(gz).hexdigest()
    path = blobs / digest.split(":")[1]
    path.write_bytes(gz)
    return Layer(
        digest=digest,
        size=len(gz),
        media_type=MediaType.OCI_LAYER_GZIP,
        path=path,
        diff_id="sha256:" + hashlib.sha256(tarbytes).hexdigest(),
    )


def _json_blob(doc: object, media_type: str) -> Blob:
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return Blob("sha256:" + hashlib.sha256(data).hexdigest(), len(data), media_type, data=data)


def make_image(root: Path, layers: list[list[tuple[str, bytes]]]) -> Image:
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    built = [_layer(blobs, files) for files in layers]
    config = _json_blob(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/busybox", "sh"]},
            "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in built]},
        },
        MediaType.OCI_CONFIG,
    )
    manifest = _json_blob(
        {
            "schemaVersion": 2,
            "mediaType": MediaType.OCI_MANIFEST,
            "config": config.descriptor().to_json(),
            "layers": [la.descriptor().to_json() for la in built],
        },
        MediaType.OCI_MANIFEST,
    )
    return Image(built, config, manifest)


def base_files() -> list[list[tuple[str, bytes]]]:
    return [
        [("bin/busybox", REAL_FILES[0].read_bytes())],
        [(f"licenses/{p.name}", p.read_bytes()) for p in REAL_FILES[1:]],
    ]


@pytest.fixture()
def image(tmp_path: Path) -> Image:
    return make_image(tmp_path / "img", base_files())


def pull_oci(
    reg: Registry, ref: str, dest: Path, *creds: str
) -> tuple[dict[str, object], set[str]]:
    """skopeo copy the pushed image into an OCI layout; return its manifest and blob digests."""
    cmd = ["skopeo", "copy", "--src-tls-verify=false", *creds]
    subprocess.run([*cmd, f"docker://{reg.host}/{ref}", f"oci:{dest}"], check=True,
                   capture_output=True)  # fmt: skip
    index = json.loads((dest / "index.json").read_text())
    mdigest = index["manifests"][0]["digest"]
    manifest = json.loads((dest / "blobs/sha256" / mdigest.split(":")[1]).read_bytes())
    blobs = {"sha256:" + p.name for p in (dest / "blobs/sha256").iterdir()}
    return {"digest": mdigest, **manifest}, blobs


def _status(req: urllib.request.Request | str) -> int:
    try:
        with urllib.request.urlopen(req) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        e.close()
        return e.code


def all_digests(img: Image) -> set[str]:
    return {b.digest for b in img.blobs()}


class Recorder:
    """A Progress that adds up what was reported per key, and checks it finished."""

    def __init__(self) -> None:
        self.totals: dict[str, int | None] = {}
        self.sent: dict[str, int] = {}
        self.done: dict[str, int] = {}

    def start(self, key: str, description: str, total: int | None) -> None:
        self.totals[key], self.sent[key] = total, 0

    def advance(self, key: str, amount: int) -> None:
        self.sent[key] += amount

    def finish(self, key: str) -> None:
        assert self.sent[key] == self.totals[key]
        self.done[key] = self.sent[key]


# -- tests -------------------------------------------------------------------------


def test_push_then_pull_back_with_skopeo(registry: Registry, image: Image, state: Path,
                                         tmp_path: Path) -> None:  # fmt: skip
    mark = registry.mark()
    progress = Recorder()
    result = push(image, registry.host, "demo/app", "v1", tls_verify=False, state_dir=state,
                  progress=progress)  # fmt: skip
    assert progress.done == {f"push:{b.digest}": b.size for b in image.blobs()}

    assert set(result.uploaded) == all_digests(image)
    assert result.uploaded_bytes == sum(b.size for b in image.blobs())
    assert result.existing == [] and result.mounted == []
    assert result.manifest_digest == image.manifest.digest
    assert result.manifest_url.endswith(f"/v2/demo/app/manifests/{image.manifest.digest}")
    assert committed_digests(registry.requests(mark)) == all_digests(image)

    manifest, blobs = pull_oci(registry, "demo/app:v1", tmp_path / "pulled")
    assert manifest["digest"] == image.manifest.digest  # byte-identical manifest
    assert blobs == all_digests(image) | {image.manifest.digest}
    for layer in image.layers:  # and byte-identical layers
        got = tmp_path / "pulled/blobs/sha256" / layer.digest.split(":")[1]
        assert got.read_bytes() == layer.path.read_bytes()  # type: ignore[union-attr]


def test_second_push_sends_only_the_manifest(registry: Registry, image: Image,
                                             state: Path) -> None:  # fmt: skip
    push(image, registry.host, "again", "v1", tls_verify=False, state_dir=state)
    built = [layer.reused for layer in image.layers]
    mark = registry.mark()
    result = push(image, registry.host, "again", "v1", tls_verify=False, state_dir=state)

    assert result.uploaded == [] and result.uploaded_bytes == 0
    assert set(result.existing) == all_digests(image)
    assert [layer.reused for layer in image.layers] == built  # the result says, not the image
    reqs = registry.requests(mark)
    assert blob_uploads(reqs) == []
    assert not any(r.method == "POST" for r in reqs)
    assert [r.method for r in reqs if "/manifests/" in r.uri] == ["PUT"]


def test_changed_layer_uploads_exactly_that_layer(registry: Registry, state: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    first = make_image(tmp_path / "a", base_files())
    push(first, registry.host, "changing", "v1", tls_verify=False, state_dir=state)
    files = base_files()
    files[1].append(("licenses/EXTRA", b"one more real byte string\n"))
    second = make_image(tmp_path / "b", files)
    changed = {second.layers[1].digest, second.config.digest}
    assert second.layers[0].digest == first.layers[0].digest

    mark = registry.mark()
    result = push(second, registry.host, "changing", "v2", tls_verify=False, state_dir=state)

    assert set(result.uploaded) == changed
    assert result.uploaded_bytes == second.layers[1].size + second.config.size
    assert result.existing == [second.layers[0].digest]
    assert second.layers[1].digest in result.uploaded
    reqs = registry.requests(mark)
    assert committed_digests(reqs) == changed
    assert len(blob_uploads(reqs)) == 2
    stored = sum(registry.blob_file(d).stat().st_size for d in committed_digests(reqs))
    assert stored == result.uploaded_bytes


def test_cross_repo_mount_from_push_record(registry: Registry, image: Image,
                                           state: Path) -> None:  # fmt: skip
    push(image, registry.host, "team/one", "v1", tls_verify=False, state_dir=state)
    record = json.loads((state / "pushed" / f"127.0.0.1_{registry.port}.json").read_text())
    assert all(record["blobs"][d] == ["team/one"] for d in all_digests(image))

    mark = registry.mark()
    result = push(image, registry.host, "team/two", "v1", tls_verify=False, state_dir=state)

    assert set(result.mounted) == all_digests(image)
    assert result.uploaded == [] and result.uploaded_bytes == 0
    reqs = registry.requests(mark)
    mounts = [r for r in reqs if r.method == "POST" and "mount=" in r.uri]
    assert len(mounts) == 3 and all(r.status == 201 and "from=team%2Fone" in r.uri for r in mounts)
    assert blob_uploads(reqs) == []
    record = json.loads((state / "pushed" / f"127.0.0.1_{registry.port}.json").read_text())
    assert all(record["blobs"][d] == ["team/two", "team/one"] for d in all_digests(image))


def test_explicit_mount_from_and_failed_mount_falls_back(registry: Registry, image: Image,
                                                         tmp_path: Path) -> None:  # fmt: skip
    push(image, registry.host, "origin", "v1", tls_verify=False, state_dir=tmp_path / "s1")
    # A fresh machine (no record) told where to mount from; one source has nothing.
    mark = registry.mark()
    result = push(image, registry.host, "copy", "v1", tls_verify=False,
                  state_dir=tmp_path / "s2", mount_from=["nowhere", "origin"])  # fmt: skip
    assert set(result.mounted) == all_digests(image) and result.uploaded == []
    reqs = registry.requests(mark)
    assert sum(1 for r in reqs if "from=nowhere" in r.uri and r.status == 202) == 3
    assert sum(1 for r in reqs if "from=origin" in r.uri and r.status == 201) == 3
    assert blob_uploads(reqs) == []


def test_without_state_dir_nothing_is_recorded(
    registry: Registry, image: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # a default cache of its own
    push(image, registry.host, "stateless", "v1", tls_verify=False)
    assert not (default_cache_dir() / "pushed").exists()  # no hidden writes to the cache
    result = push(image, registry.host, "stateless-copy", "v1", tls_verify=False)
    assert result.mounted == []  # and no record to mount from


def test_failed_mount_session_is_deleted_with_relative_locations(
    tmp_path: Path, image: Image
) -> None:
    """A registry answering relative Locations (relativeurls, stowaway's own): the
    session a failed mount opened is deleted before the next source is tried."""
    (tmp_path / "rel").mkdir()
    reg = Registry(tmp_path / "rel", relative=True)
    try:
        push(image, reg.host, "origin", "v1", tls_verify=False, state_dir=tmp_path / "s1")
        mark = reg.mark()
        result = push(image, reg.host, "copy", "v1", tls_verify=False,
                      state_dir=tmp_path / "s2", mount_from=["nowhere", "origin"])  # fmt: skip
        assert set(result.mounted) == all_digests(image)
        reqs = reg.requests(mark)
        deletes = [r for r in reqs if r.method == "DELETE" and "/blobs/uploads/" in r.uri]
        assert len(deletes) == 3 and {r.status for r in deletes} == {204}
    finally:
        reg.stop()


def test_push_by_digest_without_tag(registry: Registry, image: Image, state: Path) -> None:
    result = push(image, registry.host, "untagged", None, tls_verify=False, state_dir=state)
    url = f"http://{registry.host}/v2/untagged/manifests/{image.manifest.digest}"
    req = urllib.request.Request(url, method="GET", headers={"Accept": MediaType.OCI_MANIFEST})
    with urllib.request.urlopen(req) as resp:
        assert resp.read() == image.manifest.data
    assert result.manifest_url == url


def test_chunked_upload_of_large_blobs(
    registry: Registry, image: Image, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = image.layers[0]
    monkeypatch.setattr(sink, "CHUNKED_THRESHOLD", big.size // 3 + 1)
    mark = registry.mark()
    push(image, registry.host, "chunked", "v1", tls_verify=False, state_dir=state)
    patches = [r for r in registry.requests(mark) if r.method == "PATCH"]
    assert len(patches) >= 3 and all(r.status == 202 for r in patches)
    manifest, blobs = pull_oci(registry, "chunked:v1", tmp_path / "pulled")
    assert manifest["digest"] == image.manifest.digest
    assert (tmp_path / "pulled/blobs/sha256" / big.digest[7:]).read_bytes() == big.path.read_bytes()  # type: ignore[union-attr]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_cache_blob_is_never_stored(registry: Registry, state: Path, tmp_path: Path,
                                            damage: str) -> None:  # fmt: skip
    files = base_files()
    files[0].append(("etc/unique", f"only in the {damage} test\n".encode()))  # a new digest
    image = make_image(tmp_path / "img", files)
    bad = image.layers[0]
    assert bad.path is not None
    data = bytearray(bad.path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    else:
        del data[-100:]
    bad.path.write_bytes(bytes(data))
    repo = f"corrupt-{damage}"

    with pytest.raises(CorruptBlob) as info:
        push(image, registry.host, repo, "v1", tls_verify=False, state_dir=state, jobs=1)

    assert bad.digest in str(info.value)
    assert not bad.path.exists()  # the damaged cache entry is dropped so it gets rebuilt
    assert not registry.blob_file(bad.digest).exists()
    head = urllib.request.Request(
        f"http://{registry.host}/v2/{repo}/blobs/{bad.digest}", method="HEAD"
    )
    assert _status(head) == 404
    assert _status(f"http://{registry.host}/v2/{repo}/manifests/v1") == 404
    assert not (state / "pushed").exists()  # a failed push records nothing


def test_basic_auth_needs_creds(auth_registry: Registry, image: Image, state: Path,
                                tmp_path: Path) -> None:  # fmt: skip
    with pytest.raises(RegistryError) as info:
        push(image, auth_registry.host, "private", "v1", tls_verify=False, state_dir=state)
    assert "--creds" in str(info.value) and auth_registry.host in str(info.value)
    with pytest.raises(RegistryError) as info:
        push(image, auth_registry.host, "private", "v1", tls_verify=False, state_dir=state,
             creds=(USER, "wrong"))  # fmt: skip
    assert "--creds" in str(info.value) and "refused" in str(info.value)

    result = push(image, auth_registry.host, "private", "v1", tls_verify=False,
                  state_dir=state, creds=(USER, PASSWORD))  # fmt: skip
    assert set(result.uploaded) == all_digests(image)
    manifest, _ = pull_oci(auth_registry, "private:v1", tmp_path / "pulled",
                           f"--src-creds={USER}:{PASSWORD}")  # fmt: skip
    assert manifest["digest"] == image.manifest.digest


def test_connection_refused_names_the_url(image: Image, state: Path) -> None:
    port = _free_port()
    with pytest.raises(RegistryError) as info:
        push(image, f"127.0.0.1:{port}", "x", "v1", tls_verify=False, state_dir=state)
    assert f"http://127.0.0.1:{port}/v2/" in str(info.value)
    assert "refused" in str(info.value).lower()


def test_tls_verify_refuses_plain_http(registry: Registry, image: Image, state: Path) -> None:
    with pytest.raises(RegistryError) as info:
        push(image, registry.host, "tls", "v1", state_dir=state)
    assert f"https://{registry.host}/v2/" in str(info.value)
    assert "turn TLS verification off" in str(info.value)
    with pytest.raises(RegistryError) as info:  # the caller's flag, when it names one
        push(image, registry.host, "tls", "v1", plain_http_hint="pass --x=false")
    assert info.value.hint == "pass --x=false"


def test_push_record_ignores_damage_and_caps(tmp_path: Path) -> None:
    path = tmp_path / "pushed" / "h.json"
    path.parent.mkdir()
    path.write_text('{"version": 1, "blobs": {"sha256:aa": ["r1"]')  # torn write
    record = PushRecord.load(path)
    assert record.repos("sha256:aa") == []
    for i in range(PushRecord.REPOS_PER_BLOB + 2):
        record.add(["sha256:aa"], f"r{i}")
    record.save()
    again = PushRecord.load(path)
    assert again.repos("sha256:aa")[0] == f"r{PushRecord.REPOS_PER_BLOB + 1}"
    assert len(again.repos("sha256:aa")) == PushRecord.REPOS_PER_BLOB
    assert [p.name for p in path.parent.iterdir()] == ["h.json"]  # no temp files left


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_push_composed_demo_image(registry: Registry, demo_app: str, state: Path,
                                  tmp_path: Path, fmt: str, make_demo: Any) -> None:  # fmt: skip
    image = make_demo(demo_app, tmp_path / "cache", format=fmt).image
    result = push(image, registry.host, f"demo-{fmt}", "v1", tls_verify=False, state_dir=state)
    assert set(result.uploaded) | set(result.existing) == all_digests(image)

    ref = f"docker://{registry.host}/demo-{fmt}:v1"
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", ref],
                         check=True, capture_output=True).stdout  # fmt: skip
    assert raw == image.manifest.data
    dest = tmp_path / "pulled"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", ref, f"dir:{dest}"],
                   check=True, capture_output=True)  # fmt: skip
    for layer in image.layers:  # dir: keeps blobs as pushed, named by hex digest
        assert layer.path is not None
        assert (dest / layer.digest[7:]).read_bytes() == layer.path.read_bytes()

    again = push(image, registry.host, f"demo-{fmt}", "v1", tls_verify=False, state_dir=state)
    assert again.uploaded == [] and set(again.existing) == all_digests(image)


# -- Bearer tokens: the real registry verifying tokens from a small token server ------


class TokenServer:
    """The Docker token protocol on a loopback port: checks Basic credentials and
    signs ES256 JWTs (certificate in ``x5c``) granting every requested scope."""

    def __init__(self, root: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stowaway test tokens")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(1)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = root / "token-ca.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[dict[str, list[str]]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                server.requests.append(query)
                expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    body = b'{"details":"bad credentials"}'
                else:
                    self.send_response(200)
                    body = json.dumps({"token": server.token(query.get("scope", []))}).encode()
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - OAuth2 refresh_token grant
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                server.requests.append(form)
                if form.get("grant_type") != ["refresh_token"] or form.get("refresh_token") != [
                    REFRESH_TOKEN
                ]:
                    self.send_response(401)
                    body = b'{"error":"invalid_grant"}'
                else:
                    self.send_response(200)
                    scopes = " ".join(form.get("scope", [])).split()
                    body = json.dumps({"access_token": server.token(scopes)}).encode()
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def token(self, scopes: list[str]) -> str:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode()]}
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {"iss": "stowaway-test", "sub": USER, "aud": "test-registry", "iat": now,
                  "nbf": now - 60, "exp": now + 600, "jti": str(now), "access": access}  # fmt: skip
        signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Registry, TokenServer]]:
    root = tmp_path_factory.mktemp("token-registry")
    tokens = TokenServer(root)
    auth = (f"auth:\n  token:\n    realm: {tokens.realm}\n    service: test-registry\n"
            f"    issuer: stowaway-test\n    rootcertbundle: {tokens.bundle}\n")  # fmt: skip
    reg = Registry(root, auth=auth)
    yield reg, tokens
    reg.stop()
    tokens.stop()


def test_bearer_token_auth_and_mount_scopes(token_registry: tuple[Registry, TokenServer],
                                            image: Image, state: Path) -> None:  # fmt: skip
    reg, tokens = token_registry
    with pytest.raises(RegistryError) as info:
        push(image, reg.host, "tok/one", "v1", tls_verify=False, state_dir=state)
    assert "--creds" in str(info.value) and tokens.realm in str(info.value)

    tokens.requests.clear()
    result = push(image, reg.host, "tok/one", "v1", tls_verify=False, state_dir=state,
                  creds=(USER, PASSWORD))  # fmt: skip
    assert set(result.uploaded) == all_digests(image)
    assert tokens.requests == [  # one token, cached for every request of the push
        {"service": ["test-registry"], "scope": ["repository:tok/one:pull,push"]}
    ]

    tokens.requests.clear()
    result = push(image, reg.host, "tok/two", "v1", tls_verify=False, state_dir=state,
                  creds=(USER, PASSWORD))  # fmt: skip
    assert set(result.mounted) == all_digests(image)
    assert tokens.requests[0]["scope"] == [
        "repository:tok/two:pull,push",
        "repository:tok/one:pull",
    ]


def test_identity_token_from_docker_config_is_traded_for_access_tokens(
    token_registry: tuple[Registry, TokenServer], image: Image, state: Path, tmp_path: Path
) -> None:
    """`docker login` against an OAuth2 registry stores an ``identitytoken``: the push
    trades it with the refresh_token grant (POST to the realm), never as a password."""
    reg, tokens = token_registry
    env = {"DOCKER_CONFIG": str(tmp_path / "docker"), "HOME": str(tmp_path)}
    (tmp_path / "docker").mkdir()
    doc = {"auths": {reg.host: {"identitytoken": REFRESH_TOKEN}}}
    (tmp_path / "docker" / "config.json").write_text(json.dumps(doc))
    found = find_credentials(reg.host, env=env)
    assert found is not None and found.identity_token
    tokens.requests.clear()
    result = push(image, reg.host, "tok/refresh", "v1", tls_verify=False, state_dir=state,
                  creds=found)  # fmt: skip
    assert set(result.uploaded) | set(result.mounted) == all_digests(image)
    assert tokens.requests[0]["grant_type"] == ["refresh_token"]
    assert tokens.requests[0]["refresh_token"] == [REFRESH_TOKEN]
    assert tokens.requests[0]["scope"][0].split()[0] == "repository:tok/refresh:pull,push"
    assert all("grant_type" in r for r in tokens.requests)  # no Basic GET was tried

    doc = {"auths": {reg.host: {"identitytoken": "revoked"}}}
    (tmp_path / "docker" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(RegistryError) as info:
        push(image, reg.host, "tok/refresh", "v2", tls_verify=False, state_dir=state,
             creds=find_credentials(reg.host, env=env))  # fmt: skip
    assert tokens.realm in str(info.value)


class FlakyProxy:
    """A loopback HTTP proxy in front of the real registry that answers the first
    ``fail`` blob PUTs with 503 (after reading their bodies), to exercise retries."""

    def __init__(self, upstream: Registry, fail: int) -> None:
        self.left = fail
        self.failed: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "PUT" and "/blobs/uploads/" in self.path and proxy.left > 0:
                    proxy.left -= 1
                    proxy.failed.append(self.path)
                    self._answer(503, {}, b'{"errors":[{"code":"UNAVAILABLE","message":"busy"}]}')
                    return
                conn = http.client.HTTPConnection(upstream.host, timeout=30)
                conn.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)  # fmt: skip
                for k, v in self.headers.items():
                    conn.putheader(k, v)  # Host stays ours: Locations point back here
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                skip = {"content-length", "connection", "transfer-encoding"}
                headers = {k: v for k, v in resp.getheaders() if k.lower() not in skip}
                self._answer(resp.status, headers, data)

            def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def test_temporary_errors_restart_the_upload(registry: Registry, state: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(sink, "RESTART_BACKOFF", 0.01)
    files = base_files()
    files[1].append(("etc/flaky", b"only in the retry test\n"))
    image = make_image(tmp_path / "img", files)
    proxy = FlakyProxy(registry, fail=2)
    try:
        mark = registry.mark()
        result = push(image, proxy.host, "flaky", "v1", tls_verify=False, state_dir=state, jobs=1)
    finally:
        proxy.stop()
    assert len(proxy.failed) == 2
    assert set(result.uploaded) | set(result.existing) == all_digests(image)
    reqs = registry.requests(mark)
    # each failed session was cancelled, then a fresh upload started and committed
    assert sum(1 for r in reqs if r.method == "DELETE" and "/blobs/uploads/" in r.uri) == 2
    assert set(result.uploaded) <= committed_digests(reqs)
    manifest, _ = pull_oci(registry, "flaky:v1", tmp_path / "pulled")
    assert manifest["digest"] == image.manifest.digest


def test_too_many_temporary_errors_give_up(registry: Registry, image: Image, state: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(sink, "RESTART_BACKOFF", 0.01)
    proxy = FlakyProxy(registry, fail=100)
    try:
        with pytest.raises(RegistryError) as info:
            push(image, proxy.host, "given-up", "v1", tls_verify=False, state_dir=state, jobs=1)
    finally:
        proxy.stop()
    assert "503" in str(info.value) and "UNAVAILABLE" in str(info.value)
    assert f"http://{proxy.host}/v2/given-up/blobs/uploads/" in str(info.value)


class _InterruptOnFirstBytes:
    """Progress that sends this process SIGINT (Ctrl-C) once the big blob's upload has
    sent its first bytes, and counts what was sent."""

    def __init__(self, digest: str) -> None:
        self.key = f"push:{digest}"
        self.sent = 0
        self.interrupted_at: float | None = None

    def start(self, key: str, description: str, total: int | None) -> None:
        pass

    def advance(self, key: str, amount: int) -> None:
        if key != self.key:
            return
        self.sent += amount
        if self.interrupted_at is None:
            self.interrupted_at = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)

    def finish(self, key: str) -> None:
        pass


def test_ctrl_c_stops_uploads_under_way_and_commits_nothing(
    registry: Registry, state: Path, tmp_path: Path
) -> None:
    """Ctrl-C while a 96 MiB layer is being sent: the push raises KeyboardInterrupt
    within moments, the upload stops after a small part of the blob (its session is
    cancelled) and the registry has no such blob afterwards."""
    files = base_files()
    files[1].append(("big.bin", os.urandom(96 << 20)))
    image = make_image(tmp_path / "img", files)
    big = max(image.layers, key=lambda la: la.size)
    progress = _InterruptOnFirstBytes(big.digest)
    mark = registry.mark()
    # Python's own Ctrl-C handler, even where the runner ignores SIGINT (a background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            push(image, registry.host, "interrupted", "v1", tls_verify=False, state_dir=state,
                 progress=progress, jobs=4)  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    assert progress.interrupted_at is not None
    took = time.monotonic() - progress.interrupted_at
    assert took < 1.0, f"push went on for {took:.1f}s after Ctrl-C"
    assert progress.sent < big.size // 4, f"sent {progress.sent} of {big.size} bytes"
    reqs = registry.requests(mark)
    assert big.digest not in committed_digests(reqs)
    assert not any(r.method == "PUT" and "/manifests/" in r.uri for r in reqs)
    head = urllib.request.Request(
        f"http://{registry.host}/v2/interrupted/blobs/{big.digest}", method="HEAD"
    )
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(head, timeout=10)
    missing.value.close()
    assert missing.value.code == 404
