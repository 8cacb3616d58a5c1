"""Pushing and pulling with the credentials docker, podman and skopeo leave behind, against
real registries: docker-registry 2.8 with htpasswd (Basic) and our own server with
``[[access]]`` rules and token auth (Bearer). Credentials come from a docker config written
the way `docker login` writes it, an auth.json written by `skopeo login`, the real
``docker-credential-pass`` (throwaway GnuPG home and password store) and a
protocol-conforming helper script. Every test points DOCKER_CONFIG, REGISTRY_AUTH_FILE and
XDG_RUNTIME_DIR at its own temp dirs."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
from registry_harness import Server
from registry_helpers import skopeo

from daemons import Registry
from stowaway.distribution.credentials import CredentialsLookup
from stowaway.errors import RegistryError, StowawayError
from stowaway.image.model import Blob, Image, Layer, MediaType
from stowaway.registry.config import AccessRule
from stowaway.sinks import parse_target, write_image

SRC = Path(__file__).resolve().parents[2] / "src"
PASSWORD = "correct-horse-battery"
RULES = (
    AccessRule(("team/*",), users=("alice",), actions=frozenset({"pull", "push"})),
    AccessRule(("team/*",), users=("bob",)),
    AccessRule(("carol/*",), users=("carol",), actions=frozenset({"pull", "push"})),
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tiny_image(salt: str = "") -> Image:
    layer_data = gzip.compress(f"not really a tar {salt}".encode(), mtime=0)
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


def push(ref: str, lookup: CredentialsLookup | None = None, salt: str = "") -> str:
    image = tiny_image(salt)
    result = write_image(
        image,
        parse_target(f"docker://{ref}"),
        tls_verify=False,
        creds=lookup or CredentialsLookup(),
    )
    assert result.manifest_digest == image.manifest.digest
    return result.manifest_digest


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's docker config dir, runtime dir and no REGISTRY_AUTH_FILE."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    return tmp_path


def docker_config(home: Path, doc: object) -> Path:
    path = home / "docker" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent="\t"))
    path.chmod(0o600)
    return path


def docker_login_entry(user: str, password: str) -> dict[str, str]:
    """An ``auths`` entry as `docker login` writes it without a credential store."""
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("basic"), htpasswd={"alice": PASSWORD}) as reg:
        yield reg


@pytest.fixture()
def ruled(make_server: object, tmp_path: Path) -> Server:
    path = tmp_path / "htpasswd"
    path.write_text(
        "".join(
            f"{u}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()}\n"
            for u in ("alice", "bob", "carol")
        )
    )
    return make_server(htpasswd=path, access=RULES)  # type: ignore[operator,no-any-return]


@pytest.fixture()
def pass_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`pass` with a throwaway GnuPG key (no passphrase) for docker-credential-pass."""
    if not shutil.which("docker-credential-pass") or not shutil.which("pass"):
        pytest.fail("docker-credential-pass and pass are needed: run scripts/setup.sh")
    gnupg = tmp_path / "gnupg"
    gnupg.mkdir(mode=0o700)
    monkeypatch.setenv("GNUPGHOME", str(gnupg))
    monkeypatch.setenv("PASSWORD_STORE_DIR", str(tmp_path / "password-store"))
    sh("gpg", "--batch", "--passphrase", "", "--quick-generate-key",
       "stowaway test <test@invalid>", "default", "default", "never")  # fmt: skip
    keys = sh("gpg", "--list-keys", "--with-colons")
    fpr = next(line.split(":")[9] for line in keys.splitlines() if line.startswith("fpr"))
    sh("pass", "init", fpr)
    try:
        yield
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], check=False, capture_output=True)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


def pass_store_creds(server: str, user: str, secret: str) -> None:
    """What `docker login` does with ``"credsStore": "pass"`` (after `docker logout`:
    the helper keeps one entry per user and answers with the first)."""
    subprocess.run(["docker-credential-pass", "erase"], input=server.encode(), check=False,
                   capture_output=True, timeout=60)  # fmt: skip
    doc = json.dumps({"ServerURL": server, "Username": user, "Secret": secret})
    subprocess.run(["docker-credential-pass", "store"], input=doc.encode(), check=True,
                   capture_output=True, timeout=60)  # fmt: skip


# -- Basic auth: docker-registry 2.8 with htpasswd ---------------------------------------


def test_docker_login_config_with_basic_auth(basic_registry: Registry, home: Path) -> None:
    host = basic_registry.host
    with pytest.raises(RegistryError) as info:
        push(f"{host}/private:v1")
    assert "no credentials were given or found" in info.value.message
    assert info.value.hint and "--creds" in info.value.hint and "docker login" in info.value.hint

    config = docker_config(home, {"auths": {host: docker_login_entry("alice", "wrong")}})
    with pytest.raises(RegistryError) as info:
        push(f"{host}/private:v1")
    assert f"'alice' from {config} were refused" in info.value.message
    assert "wrong" not in str(info.value)

    docker_config(home, {"auths": {host: docker_login_entry("alice", PASSWORD)}})
    digest = push(f"{host}/private:v1")
    out = skopeo("inspect", "--tls-verify=false", f"--creds=alice:{PASSWORD}",
                 f"docker://{host}/private:v1")  # fmt: skip
    assert json.loads(out)["Digest"] == digest


def test_skopeo_login_authfile(basic_registry: Registry, home: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    host = basic_registry.host
    authfile = home / "auth.json"
    subprocess.run(["skopeo", "login", "--tls-verify=false", "--authfile", str(authfile),
                    "--username", "alice", "--password-stdin", host],
                   input=PASSWORD.encode(), check=True, capture_output=True)  # fmt: skip
    push(f"{host}/viafile:v1", CredentialsLookup(authfile=str(authfile)))
    docker_config(home, {"auths": {host: docker_login_entry("alice", "stale")}})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(authfile))  # read first, and alone
    push(f"{host}/viaenv:v1")
    monkeypatch.delenv("REGISTRY_AUTH_FILE")
    runtime = home / "run" / "containers" / "auth.json"  # podman's default: before docker's
    runtime.parent.mkdir(parents=True)
    shutil.copy(authfile, runtime)
    push(f"{host}/viaruntime:v1")


# -- token auth: our own registry with [[access]] rules ---------------------------------


def test_docker_credential_pass_with_token_auth(
    ruled: Server, home: Path, pass_store: None
) -> None:
    pass_store_creds(ruled.host, "alice", PASSWORD)
    docker_config(home, {"auths": {ruled.host: {}}, "credsStore": "pass"})
    push(f"{ruled.host}/team/app:v1")
    pass_store_creds(ruled.host, "bob", PASSWORD)  # bob may pull team/*, not push
    with pytest.raises(RegistryError) as info:
        push(f"{ruled.host}/team/app:v2", salt="bob")
    assert "DENIED" in str(info.value) and PASSWORD not in str(info.value)


def test_helper_script_with_token_auth(ruled: Server, home: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-script"
    helper.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"STORE = {{{ruled.host!r}: ('carol', {PASSWORD!r})}}\n"
        "server = sys.stdin.read().strip()\n"
        "if sys.argv[1:] != ['get'] or server not in STORE:\n"
        "    print('credentials not found in native keychain')\n"
        "    sys.exit(1)\n"
        "print(json.dumps({'ServerURL': server, 'Username': STORE[server][0],\n"
        "                  'Secret': STORE[server][1]}))\n"
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    docker_config(home, {"credHelpers": {ruled.host: "script"}})
    push(f"{ruled.host}/carol/x:v1")
    with pytest.raises(RegistryError):  # carol may not touch team/*
        push(f"{ruled.host}/team/app:v9", salt="carol")
    docker_config(home, {"credHelpers": {ruled.host: "gone"}})
    with pytest.raises(StowawayError) as err:
        push(f"{ruled.host}/carol/x:v2", salt="gone")
    assert "docker-credential-gone" in err.value.message and err.value.hint


# -- the CLI: --creds USER with the password on stdin -------------------------------------


def stowaway(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from stowaway.cli import main; main()", *args],
        input=stdin, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )  # fmt: skip


def test_pull_creds_password_from_stdin(basic_registry: Registry, home: Path) -> None:
    host = basic_registry.host
    docker_config(home, {"auths": {host: docker_login_entry("alice", PASSWORD)}})
    push(f"{host}/pullme:v1")
    docker_config(home, {})
    pull = ["pull", "--plain-http", "--containerd", str(home / "no.sock"), f"{host}/pullme:v1"]
    r = stowaway(*pull)
    assert r.returncode == 1 and "no credentials were given or found" in r.stderr, r.stderr
    assert "hint:" in r.stderr and "--creds" in r.stderr
    r = stowaway(*pull, "--creds", "alice", stdin="wr0ng\n")
    assert "'alice' from --creds were refused" in r.stderr and "wr0ng" not in r.stderr
    # the right password lets us read the manifest and the config (whose missing diff
    # IDs stop the pull of this tiny image before containerd is needed)
    r = stowaway(*pull, "--creds", "alice", stdin=PASSWORD + "\n")
    assert "config lists 0 diff IDs for 1 layers" in r.stderr, r.stderr
    assert PASSWORD not in r.stderr + r.stdout
