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
from registry_helpers import skopeo

from stowaway.errors import RegistryError
from stowaway.image.model import Blob, Image, Layer, MediaType
from stowaway.registry.auth import load_htpasswd
from stowaway.registry.config import AccessRule, RegistryConfigError, config_from_dict
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


RULES = (
    AccessRule(("team/*", "public/*"), users=("alice",), actions=frozenset({"pull", "push"})),
    AccessRule(("team/*",), users=("bob",)),
    AccessRule(("public/*",), users=("*",), anonymous=True),
    AccessRule(("carol/*",), users=("carol",), actions=frozenset({"pull", "push"})),
)


@pytest.fixture()
def ruled(make_server: object, tmp_path: Path) -> Server:
    path = tmp_path / "htpasswd"
    lines = [
        f"{u}:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
        for u in ("alice", "bob", "carol")
    ]
    path.write_text("\n".join(lines) + "\n")
    return make_server(htpasswd=path, tokens=("master",), access=RULES)  # type: ignore[operator,no-any-return]


def token(server: Server, *scopes: str, creds: tuple[str, str] | None = None) -> str:
    query = "&".join(f"scope={s}" for s in scopes)
    r = server.request("GET", f"/auth/token?service=stowaway&{query}",
                       headers=basic(*creds) if creds else {})  # fmt: skip
    assert r.status == 200, r.body
    return str(json.loads(r.body)["token"])


def test_repository_rules_with_docker_token_auth(ruled: Server) -> None:
    server = ruled
    # anonymous: a Bearer challenge naming the token endpoint and the scope
    r = server.request("GET", "/v2/team/app/tags/list")
    assert r.status == 401 and r.code == "UNAUTHORIZED"
    assert r.headers["WWW-Authenticate"] == (
        f'Bearer realm="http://{server.host}/auth/token",service="stowaway",'
        'scope="repository:team/app:pull"'
    )
    r = server.request("POST", "/v2/public/x/blobs/uploads/")
    assert (
        r.status == 401 and 'scope="repository:public/x:pull,push"' in r.headers["WWW-Authenticate"]
    )
    assert server.request("GET", "/v2/public/x/tags/list").code == "NAME_UNKNOWN"  # may pull
    # basic credentials: authenticated but forbidden is 403 DENIED
    r = server.request("POST", "/v2/team/app/blobs/uploads/", headers=basic("bob", "pw"))
    assert r.status == 403 and r.code == "DENIED" and "bob may not push" in r.body.decode()
    assert (
        server.request("POST", "/v2/team/app/blobs/uploads/", headers=basic("alice", "pw")).status
        == 202
    )
    # the token grants what was asked only as far as the user may
    bob = {
        "Authorization": "Bearer "
        + token(server, "repository:team/app:pull,push", creds=("bob", "pw"))
    }
    assert server.request("GET", "/v2/team/app/tags/list", headers=bob).code == "NAME_UNKNOWN"
    assert server.request("POST", "/v2/team/app/blobs/uploads/", headers=bob).code == "DENIED"
    r = server.request("GET", "/v2/team/other/tags/list", headers=bob)  # not in the token
    assert r.status == 401 and 'scope="repository:team/other:pull"' in r.headers["WWW-Authenticate"]
    alice = {
        "Authorization": "Bearer "
        + token(server, "repository:team/app:pull", creds=("alice", "pw"))
    }
    r = server.request("POST", "/v2/team/app/blobs/uploads/", headers=alice)
    assert r.status == 401 and r.code == "UNAUTHORIZED"  # she may: ask for a wider token
    anon = {"Authorization": "Bearer " + token(server, "repository:team/app:pull")}
    assert server.request("GET", "/v2/team/app/tags/list", headers=anon).status == 401
    forged = bob["Authorization"][:-4] + "AAAA"
    assert server.request("GET", "/v2/", headers={"Authorization": forged}).status == 401
    assert server.request("GET", "/auth/token", headers=basic("bob", "nope")).status == 401
    # a mount needs pull on the source: else an upload session
    d = sha256(b"team secret")
    r = server.request("POST", f"/v2/team/app/blobs/uploads/?digest={d}", b"team secret",
                       headers=basic("alice", "pw"))  # fmt: skip
    assert r.status == 201
    r = server.request("POST", f"/v2/carol/x/blobs/uploads/?mount={d}&from=team/app",
                       headers=basic("carol", "pw"))  # fmt: skip
    assert r.status == 202 and "Docker-Upload-UUID" in r.headers
    assert (
        server.request("GET", f"/v2/carol/x/blobs/{d}", headers=basic("carol", "pw")).status == 404
    )
    r = server.request("POST", f"/v2/public/a/blobs/uploads/?mount={d}&from=team/app",
                       headers=basic("alice", "pw"))  # fmt: skip
    assert r.status == 201
    r = server.request("POST", f"/v2/carol/y/blobs/uploads/?mount={d}&from=team/app",
                       headers={"Authorization": "Bearer master"})  # fmt: skip
    assert r.status == 201  # static tokens keep every right
    # the catalog lists what the caller may pull
    r = server.request("GET", "/v2/_catalog")
    assert r.status == 401  # nothing stored that anonymous may pull (no manifests)


def test_skopeo_with_repository_rules(ruled: Server, oci_layout: Path) -> None:
    """docker token auth as skopeo (containers/image) does it."""
    dest = f"docker://{ruled.host}/team/busybox:1"
    with pytest.raises(AssertionError, match="denied|unauthorized|403"):
        skopeo("copy", "--dest-tls-verify=false", "--dest-creds", "bob:pw",
               f"oci:{oci_layout}:t", dest)  # fmt: skip
    skopeo("copy", "--dest-tls-verify=false", "--dest-creds", "alice:pw",
           f"oci:{oci_layout}:t", dest)  # fmt: skip
    info = json.loads(skopeo("inspect", "--tls-verify=false", "--creds", "bob:pw", dest))
    assert info["Name"].endswith("team/busybox")
    with pytest.raises(AssertionError, match="unauthorized|authentication required"):
        skopeo("inspect", "--tls-verify=false", dest)  # anonymous
    public = f"docker://{ruled.host}/public/busybox:1"
    skopeo("copy", "--dest-tls-verify=false", "--dest-creds", "alice:pw",
           f"oci:{oci_layout}:t", public)  # fmt: skip
    skopeo("inspect", "--tls-verify=false", public)  # anonymous pull of public/*
    r = ruled.request("GET", "/v2/_catalog", headers=basic("bob", "pw"))
    assert json.loads(r.body)["repositories"] == ["public/busybox", "team/busybox"]
    assert json.loads(ruled.request("GET", "/v2/_catalog").body)["repositories"] == [
        "public/busybox"
    ]


def test_access_rules_config() -> None:
    cfg = config_from_dict(
        {"access": [{"repositories": ["a/*"], "users": ["x"], "actions": ["pull", "push"]}]}
    )
    assert cfg.access == (AccessRule(("a/*",), ("x",), False, frozenset({"pull", "push"})),)
    assert cfg.auth_enabled  # rules alone (say, anonymous pull only) close the registry
    for bad, match in (
        ({"repositories": ["a"], "actions": ["delete"]}, "actions are pull and push"),
        ({"users": ["x"]}, "needs repositories"),
        ({"repositories": ["a"], "colour": 1}, "no key 'colour'"),
        ({"repositories": ["a"], "anonymous": "yes"}, "true or false"),
    ):
        with pytest.raises(RegistryConfigError, match=match):
            config_from_dict({"access": [bad]}, "reg.toml")
