"""Credentials read as docker, podman and skopeo read them: the files, their order, the
credential-helper protocol (with a protocol-conforming helper script written here; the
real ``docker-credential-pass`` is in tests/registry/test_login_credentials.py) and
the errors. Each test passes its own environment: no real user's file is read."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest

from stowaway.distribution.credentials import (
    HUB_KEY,
    Credentials,
    CredentialsError,
    CredentialsLookup,
    auth_files,
    find_credentials,
)

SECRET = "pa55-w0rd-never-printed"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    """A private home: docker config, containers config and runtime dirs, a PATH for
    helpers written by the tests."""
    (tmp_path / "bin").mkdir()
    return {
        "HOME": str(tmp_path / "home"),
        "DOCKER_CONFIG": str(tmp_path / "docker"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
    }


def write(path: str | Path, doc: object) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


def docker_config(env: dict[str, str]) -> Path:
    return Path(env["DOCKER_CONFIG"]) / "config.json"


def helper(env: dict[str, str], name: str, store: dict[str, tuple[str, str]]) -> Path:
    """A ``docker-credential-<name>`` speaking the protocol: ``get`` reads the server
    URL on stdin, answers ``{"ServerURL","Username","Secret"}`` or, for an unknown
    server, exits 1 saying "credentials not found in native keychain". It logs what it
    was asked to ``<bin>/<name>.log``."""
    bin_dir = Path(env["PATH"].split(":")[0])
    path = bin_dir / f"docker-credential-{name}"
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"STORE = {store!r}\n"
        "assert sys.argv[1:] == ['get'], sys.argv\n"
        "server = sys.stdin.read().strip()\n"
        f"open({str(bin_dir / (name + '.log'))!r}, 'a').write(server + '\\n')\n"
        "if server not in STORE:\n"
        "    print('credentials not found in native keychain')\n"
        "    sys.exit(1)\n"
        "user, secret = STORE[server]\n"
        "print(json.dumps({'ServerURL': server, 'Username': user, 'Secret': secret}))\n"
    )
    path.chmod(0o755)
    return bin_dir / f"{name}.log"


def test_no_files_no_credentials(env: dict[str, str]) -> None:
    assert find_credentials("registry.example", "app", env=env) is None


def test_docker_login_auths(env: dict[str, str]) -> None:
    """What `docker login` writes: base64 USER:PASS under the host, Docker Hub under its
    legacy URL."""
    write(docker_config(env), {"auths": {
        "registry.example:5000": {"auth": b64(f"alice:{SECRET}")},
        HUB_KEY: {"auth": b64("hubuser:hubpass")},
        "https://legacy.example/v1/": {"username": "bob", "password": "pw"},
    }})  # fmt: skip
    found = find_credentials("registry.example:5000", "team/app", env=env)
    assert found == Credentials("alice", SECRET, source=str(docker_config(env)))
    hub = find_credentials("docker.io", "library/busybox", env=env)
    assert hub is not None and (hub.username, hub.secret) == ("hubuser", "hubpass")
    legacy = find_credentials("legacy.example", "x", env=env)
    assert legacy is not None and legacy.username == "bob"
    assert SECRET not in repr(found) and SECRET not in str(found)


def test_identity_token(env: dict[str, str]) -> None:
    write(docker_config(env), {"auths": {"reg.example": {"identitytoken": "refresh-me"}}})
    found = find_credentials("reg.example", env=env)
    assert found is not None and found.identity_token and found.secret == "refresh-me"


def test_order_containers_auth_json_before_docker(env: dict[str, str]) -> None:
    write(docker_config(env), {"auths": {"reg.example": {"auth": b64("docker:d")}}})
    config = write(Path(env["XDG_CONFIG_HOME"]) / "containers/auth.json",
                   {"auths": {"reg.example": {"auth": b64("config:c")}}})  # fmt: skip
    runtime = write(Path(env["XDG_RUNTIME_DIR"]) / "containers/auth.json",
                    {"auths": {"reg.example/team": {"auth": b64("runtime:r")}}})  # fmt: skip

    def user(repo: str, **kw: str) -> str | None:
        found = find_credentials("reg.example", repo, env=env, **kw)
        return found.username if found else None

    assert user("team/app") == "runtime"  # the runtime file, its repository-scoped key
    assert user("other/app") == "config"  # the runtime file has none for it
    runtime.unlink()
    config.unlink()
    assert user("team/app") == "docker"
    # REGISTRY_AUTH_FILE, like --authfile, is the only file read
    only = write(Path(env["HOME"]) / "only.json", {"auths": {}})
    assert user("team/app", authfile=str(only)) is None
    assert user("team/app", authfile="") == "docker"
    env["REGISTRY_AUTH_FILE"] = str(only)
    assert auth_files(env=env) == [only] and user("team/app") is None


def test_credential_helpers(env: dict[str, str]) -> None:
    """credHelpers for one registry, credsStore for the rest (with the `{}` markers
    docker login leaves in auths); Docker Hub is asked for under its legacy URL."""
    log = helper(env, "test", {"reg.example": ("alice", SECRET), HUB_KEY: ("<token>", "idt")})
    other_log = helper(env, "other", {"special.example": ("carol", "c")})
    write(docker_config(env), {
        "auths": {"reg.example": {}, HUB_KEY: {}},
        "credsStore": "test",
        "credHelpers": {"special.example": "other"},
    })  # fmt: skip
    found = find_credentials("reg.example", "app", env=env)
    assert found == Credentials("alice", SECRET, source="docker-credential-test")
    hub = find_credentials("docker.io", "library/busybox", env=env)
    assert hub is not None and hub.identity_token and hub.secret == "idt"
    special = find_credentials("special.example", env=env)
    assert special is not None and special.username == "carol"
    assert find_credentials("unknown.example", env=env) is None  # "not found": no error
    assert log.read_text().split() == ["reg.example", HUB_KEY, "unknown.example"]
    assert other_log.read_text().split() == ["special.example"]


def test_missing_helper_is_named_with_its_file(env: dict[str, str]) -> None:
    config = write(docker_config(env), {"credsStore": "nonexistent-xyz"})
    with pytest.raises(CredentialsError) as info:
        find_credentials("reg.example", env=env)
    assert "docker-credential-nonexistent-xyz" in info.value.message
    assert str(config) in info.value.message and info.value.hint


def test_failing_helper(env: dict[str, str]) -> None:
    bad = Path(env["PATH"].split(":")[0]) / "docker-credential-broken"
    bad.write_text("#!/bin/sh\necho 'keyring is locked' >&2\nexit 3\n")
    bad.chmod(0o755)
    write(docker_config(env), {"credHelpers": {"reg.example": "broken"}})
    with pytest.raises(CredentialsError) as info:
        find_credentials("reg.example", env=env)
    assert "docker-credential-broken" in info.value.message
    assert "keyring is locked" in info.value.message
    assert info.value.hint and "get" in info.value.hint


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{not json", "not valid JSON"),
        ('{"auths": []}', "expected an object"),
        ('{"auths": {"reg.example": {"auth": "%%%"}}}', "not base64"),
        ('{"auths": {"reg.example": "x"}}', "is not an object"),
    ],
)
def test_malformed_config_names_the_file(env: dict[str, str], content: str, says: str) -> None:
    config = write(docker_config(env), content)
    with pytest.raises(CredentialsError) as info:
        find_credentials("reg.example", env=env)
    assert str(config) in info.value.message and says in info.value.message


def test_missing_authfile_is_an_error(env: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(CredentialsError) as info:
        find_credentials("reg.example", authfile=tmp_path / "nope.json", env=env)
    assert "nope.json" in info.value.message and info.value.hint


def test_lookup_prefers_explicit_credentials(env: dict[str, str]) -> None:
    explicit = Credentials("me", "pw")
    assert CredentialsLookup(explicit).for_registry("reg.example") is explicit
    lookup = CredentialsLookup().for_registry("reg.example")
    assert callable(lookup)
