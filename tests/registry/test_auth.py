from __future__ import annotations

import base64
import gzip
import hashlib
import json
import time
from pathlib import Path

import bcrypt
import pytest
from registry_harness import Reply, Server

from stowaway.errors import RegistryError
from stowaway.image.model import Blob, Image, Layer, MediaType
from stowaway.registry.auth import load_htpasswd
from stowaway.registry.config import RegistryConfigError
from stowaway.sinks.registry import push


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture()
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"# users\nbob:$2y${hashed[4:]}\n")
    return path


def test_no_auth_configured_everything_open(server: Server) -> None:
    data = b"open"
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    assert server.request("POST", f"/v2/a/blobs/uploads/?digest={d}", data).status == 201


def test_private_registry(make_server: object, htpasswd: Path) -> None:
    server: Server = make_server(htpasswd=htpasswd, tokens=("tok3n",), anonymous_read=False)  # type: ignore[operator]
    r = server.request("GET", "/v2/")
    assert r.status == 401 and r.code == "UNAUTHORIZED"
    assert r.headers["WWW-Authenticate"] == 'Basic realm="stowaway"'
    assert server.request("GET", "/v2/a/tags/list").status == 401
    assert server.request("GET", "/v2/a/tags/list", headers=basic("bob", "nope")).status == 401
    assert server.request("GET", "/v2/a/tags/list", headers=basic("eve", "pw")).status == 401
    assert server.request("GET", "/v2/", headers=basic("bob", "pw")).status == 200
    # authorised: the request goes through to the API (repo unknown)
    r = server.request("GET", "/v2/a/tags/list", headers=basic("bob", "pw"))
    assert r.status == 404 and r.code == "NAME_UNKNOWN"
    r = server.request("GET", "/v2/a/tags/list", headers={"Authorization": "Bearer tok3n"})
    assert r.status == 404
    assert server.request("GET", "/v2/", headers={"Authorization": "Bearer wrong"}).status == 401
    # a token also works as a basic-auth password (docker login with tokens)
    r = server.request("POST", "/v2/a/blobs/uploads/", headers=basic("ci", "tok3n"))
    assert r.status == 202


def test_anonymous_read_but_authenticated_push(make_server: object, htpasswd: Path) -> None:
    server: Server = make_server(htpasswd=htpasswd, anonymous_read=True)  # type: ignore[operator]
    assert server.request("GET", "/v2/a/tags/list").status == 404  # read allowed
    r = server.request("POST", "/v2/a/blobs/uploads/")
    assert r.status == 401 and "push" in r.body.decode()
    # the ping challenges anonymous callers so clients learn to send credentials
    assert server.request("GET", "/v2/").status == 401
    assert server.request("POST", "/v2/a/blobs/uploads/", headers=basic("bob", "pw")).status == 202


def test_tokens_only_challenge_is_basic(make_server: object) -> None:
    # a Bearer challenge would send clients to a token service URL there is none of
    server: Server = make_server(tokens=("t",), anonymous_read=False)  # type: ignore[operator]
    r = server.request("GET", "/v2/")
    assert r.status == 401
    assert r.headers["WWW-Authenticate"] == 'Basic realm="stowaway"'
    assert server.request("GET", "/v2/", headers=basic("anyone", "t")).status == 200


def _tiny_image() -> Image:
    layer_data = gzip.compress(b"not really a tar, the registry does not care", mtime=0)
    layer = Layer(sha256(layer_data), len(layer_data), MediaType.OCI_LAYER_GZIP, data=layer_data)
    config_data = json.dumps({"rootfs": {"type": "layers", "diff_ids": []}}).encode()
    config = Blob(sha256(config_data), len(config_data), MediaType.OCI_CONFIG, data=config_data)
    doc = {
        "schemaVersion": 2,
        "mediaType": MediaType.OCI_MANIFEST.value,
        "config": config.descriptor().to_json(),
        "layers": [layer.descriptor().to_json()],
    }
    data = json.dumps(doc).encode()
    return Image([layer], config, Blob(sha256(data), len(data), MediaType.OCI_MANIFEST, data=data))


def test_push_client_with_user_and_token_on_tokens_only_server(
    make_server: object, tmp_path: Path
) -> None:
    """``stowaway build -o docker://... --dest-creds USER:TOKEN`` against ``tokens = [...]``."""
    server: Server = make_server(tokens=("t0k3n",), anonymous_read=False)  # type: ignore[operator]
    image = _tiny_image()
    with pytest.raises(RegistryError):
        push(image, server.host, "ci/app", "v1", tls_verify=False, state_dir=tmp_path)
    result = push(
        image,
        server.host,
        "ci/app",
        "v1",
        tls_verify=False,
        creds=("ci", "t0k3n"),
        state_dir=tmp_path,
    )
    assert sorted(result.uploaded) == sorted(b.digest for b in image.blobs())
    r = server.request("GET", "/v2/ci/app/manifests/v1", headers=basic("ci", "t0k3n"))
    assert r.status == 200 and r.body == image.manifest.data


def test_bad_htpasswd_lines_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(
        "ok:$2y$04$abcdefghijklmnopqrstuu5B3X0Q0sT5o1m0tJ6b2m0Kb5JjJ5Wxi\nmd5:$apr1$x$y\n"
    )
    with pytest.raises(RegistryConfigError, match="line 2"):
        load_htpasswd(path)
    with pytest.raises(RegistryConfigError, match="cannot read"):
        load_htpasswd(tmp_path / "missing")


def test_password_over_bcrypts_72_bytes_is_a_plain_401(make_server: object, tmp_path: Path) -> None:
    """bcrypt refuses more than 72 bytes (ValueError); that must not become a 500.
    htpasswd silently truncates such passwords, we refuse them whole."""
    path = tmp_path / "htpasswd"
    long_pw = "p" * 80
    path.write_text(
        "bob:" + bcrypt.hashpw(long_pw[:72].encode(), bcrypt.gensalt(4)).decode() + "\n"
    )
    server: Server = make_server(htpasswd=path, anonymous_read=False)  # type: ignore[operator]
    for user, password in (("bob", long_pw), ("bob", "q" * 100), ("nobody", long_pw)):
        r = server.request("GET", "/v2/a/tags/list", headers=basic(user, password))
        assert r.status == 401 and r.code == "UNAUTHORIZED", (user, password, r.body)
    assert server.request("GET", "/v2/", headers=basic("bob", long_pw[:72])).status == 200


def test_unknown_users_cost_a_bcrypt_check_and_get_the_same_answer(
    make_server: object, tmp_path: Path
) -> None:
    """Neither the answer nor the time tells whether a user exists: an unknown user
    is checked against a dummy hash of the same cost. Only lower bounds are timed:
    a slow machine cannot make a check that is skipped look expensive."""
    rounds = 11  # ~0.1-0.2 s a check: far above a request's own cost
    path = tmp_path / "htpasswd"
    path.write_text("bob:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds)).decode() + "\n")
    server: Server = make_server(htpasswd=path, anonymous_read=False)  # type: ignore[operator]
    hashed = bcrypt.hashpw(b"x", bcrypt.gensalt(rounds))
    one_check = min(_timed(lambda: bcrypt.checkpw(b"y", hashed)) for _ in range(3))

    def login(user: str) -> tuple[int, bytes, float]:
        out: list[Reply] = []
        took = _timed(lambda: out.append(server.request("GET", "/v2/", headers=basic(user, "no"))))
        return out[0].status, out[0].body, took

    known = [login("bob") for _ in range(3)]
    unknown = [login(f"ghost{i}") for i in range(3)]
    assert {(s, b) for s, b, _ in known + unknown} == {(known[0][0], known[0][1])}
    assert known[0][0] == 401
    assert min(t for *_, t in unknown) > one_check / 2
    assert min(t for *_, t in known) > one_check / 2


def _timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start
