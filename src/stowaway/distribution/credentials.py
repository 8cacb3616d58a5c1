"""Registry credentials found where docker, podman and skopeo keep them.

Sources, first found wins (the order of containers/image, which podman, skopeo and
buildah share; docker itself reads only the last one):

1. the caller's explicit credentials (``--creds``), never looked up;
2. ``--authfile FILE``, else ``$REGISTRY_AUTH_FILE``: that file alone, as in podman;
3. otherwise ``$XDG_RUNTIME_DIR/containers/auth.json``, then
   ``$XDG_CONFIG_HOME/containers/auth.json`` (``~/.config/…``), then docker's
   ``$DOCKER_CONFIG/config.json`` (``~/.docker/config.json``).

In each file: ``credHelpers[<registry>]``, then an ``auths`` entry (``auth`` = base64
``user:password``, or ``username``/``password``, or ``identitytoken``), then
``credsStore``. A helper is ``docker-credential-<name> get`` with the server URL on
stdin, answering ``{"ServerURL", "Username", "Secret"}``; the username ``<token>``
means the secret is an identity (refresh) token. Docker Hub's key is
``https://index.docker.io/v1/`` in docker's files and ``docker.io`` in podman's; both
are read. Secrets never appear in messages or reprs.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stowaway.errors import RegistryError

__all__ = [
    "Credentials",
    "CredentialsError",
    "CredsSource",
    "CredentialsLookup",
    "HUB_KEY",
    "auth_files",
    "find_credentials",
]

#: Docker Hub's key in docker's config.json (and what its helpers are asked for).
HUB_KEY = "https://index.docker.io/v1/"
_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
#: What docker-credential-helpers print when they hold nothing for a server.
_NOT_FOUND = "credentials not found"
#: Seconds a helper may take (gpg or a keyring may be slow, but never forever).
HELPER_TIMEOUT = 60.0


class CredentialsError(RegistryError):
    """A credentials file or helper that cannot be used; names the file or helper."""


@dataclass(frozen=True)
class Credentials:
    """A username and its secret (a password, or with ``identity_token`` a refresh
    token to trade for access tokens); ``source`` says where they came from."""

    username: str
    secret: str = field(repr=False)
    identity_token: bool = False
    source: str = "--creds"

    def __repr__(self) -> str:  # never the secret
        return f"Credentials(username={self.username!r}, source={self.source!r})"


#: What a registry client accepts: credentials, a (user, password) pair, a lookup
#: run the first time the registry asks for credentials, or nothing.
CredsSource = Credentials | tuple[str, str] | Callable[[], "Credentials | None"] | None


@dataclass(frozen=True)
class CredentialsLookup:
    """What a command was told about credentials (``--creds``, ``--authfile``): its
    ``for_registry`` is the explicit credentials, or a lookup in the files."""

    explicit: Credentials | None = None
    authfile: str | None = None

    def for_registry(self, registry: str, repository: str = "") -> CredsSource:
        if self.explicit is not None:
            return self.explicit
        authfile = self.authfile
        return lambda: find_credentials(registry, repository, authfile=authfile)


def auth_files(
    authfile: str | Path | None = None, env: Mapping[str, str] | None = None
) -> list[Path]:
    """The files read, in order (see the module docstring)."""
    env = os.environ if env is None else env
    if authfile:
        return [Path(authfile)]
    if env.get("REGISTRY_AUTH_FILE"):
        return [Path(env["REGISTRY_AUTH_FILE"])]
    home = Path(env.get("HOME") or Path.home())
    files = []
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    files.append(Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "containers" / "auth.json")
    files.append(Path(env.get("DOCKER_CONFIG") or home / ".docker") / "config.json")
    return list(dict.fromkeys(files))


def find_credentials(
    registry: str,
    repository: str = "",
    *,
    authfile: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Credentials | None:
    """The credentials for ``registry`` (as references name it: ``docker.io`` for
    Docker Hub) and ``repository``, or None. A missing ``authfile`` is an error; a
    missing default file is skipped. Raises CredentialsError naming the file or helper."""
    env = os.environ if env is None else env
    if authfile and not Path(authfile).is_file():
        raise CredentialsError(
            f"--authfile {authfile}: no such file",
            hint="write one with `podman login --authfile FILE` or `skopeo login --authfile FILE`",
        )
    for path in auth_files(authfile, env):
        found = _from_file(path, registry, repository, env)
        if found is not None:
            return found
    return None


def _from_file(
    path: Path, registry: str, repository: str, env: Mapping[str, str]
) -> Credentials | None:
    doc = _load(path)
    if doc is None:
        return None
    helpers = doc.get("credHelpers") or {}
    for key in _keys(registry, ""):
        if isinstance(helpers.get(key), str) and helpers[key]:
            return _from_helper(helpers[key], registry, path, env)
    auths = doc.get("auths") or {}
    for key, entry in _matching(auths, registry, repository):
        found = _from_entry(entry, path, key)
        if found is not None:
            return found
    store = doc.get("credsStore")
    if isinstance(store, str) and store:
        return _from_helper(store, registry, path, env)
    return None


def _load(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CredentialsError(f"cannot read credentials file {path}: {e.strerror}") from None
    if not text.strip():
        return None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise CredentialsError(
            f"credentials file {path} is not valid JSON ({e})",
            hint="fix or remove it, or log in again (`docker login` / `podman login`)",
        ) from None
    if not isinstance(doc, dict) or not all(
        isinstance(doc.get(k, {}), dict) for k in ("auths", "credHelpers")
    ):
        raise CredentialsError(
            f'credentials file {path}: expected an object with "auths" and "credHelpers" objects',
            hint="fix or remove it, or log in again (`docker login` / `podman login`)",
        )
    return doc


def _canonical(host: str) -> str:
    return "docker.io" if host in _HUB_NAMES else host


def _keys(registry: str, repository: str) -> list[str]:
    """Keys naming ``registry`` (and its repository, most specific first), as written
    by docker (``https://index.docker.io/v1/``) and podman (``host[/repo]``)."""
    host = _canonical(registry)
    parts = repository.split("/") if repository else []
    keys = [f"{host}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)]
    keys.append(host)
    if host == "docker.io":
        keys += [HUB_KEY, "index.docker.io", "registry-1.docker.io"]
    return keys


def _key_host(key: str) -> str:
    """The host of a legacy key (``https://host/v1/``, ``http://host``)."""
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme) :]
    return _canonical(key.split("/", 1)[0])


def _matching(
    auths: Mapping[str, Any], registry: str, repository: str
) -> Iterator[tuple[str, Any]]:
    """``auths`` entries for the registry: exact keys first, then any key whose host
    (scheme and path dropped) is the registry's."""
    keys = _keys(registry, repository)
    for key in keys:
        if key in auths:
            yield key, auths[key]
    host = _canonical(registry)
    for key, entry in auths.items():
        if key not in keys and "://" in key and _key_host(key) == host:
            yield key, entry


def _from_entry(entry: Any, path: Path, key: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise CredentialsError(f"credentials file {path}: auths[{key!r}] is not an object")
    source = str(path)
    if entry.get("identitytoken"):
        return Credentials(
            str(entry.get("username") or "<token>"),
            str(entry["identitytoken"]),
            identity_token=True,
            source=source,
        )
    if entry.get("auth"):
        try:
            user, sep, password = (
                base64.b64decode(str(entry["auth"]), validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError, ValueError):
            sep = ""
        if not sep:
            raise CredentialsError(
                f"credentials file {path}: auths[{key!r}].auth is not base64 of USER:PASSWORD",
                hint=f"log in to {key} again",
            )
        return Credentials(user, password, source=source)
    if entry.get("username") and "password" in entry:
        return Credentials(str(entry["username"]), str(entry["password"]), source=source)
    return None  # `{}`: docker login's marker that a credsStore holds them


def _from_helper(
    name: str, registry: str, path: Path, env: Mapping[str, str]
) -> Credentials | None:
    """Ask ``docker-credential-<name>`` for the registry's credentials."""
    helper = f"docker-credential-{name}"
    server = HUB_KEY if _canonical(registry) == "docker.io" else registry
    try:
        proc = subprocess.run(
            [helper, "get"],
            input=server.encode(),
            capture_output=True,
            env=dict(env),
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise CredentialsError(
            f"credential helper {helper} (named in {path}) is not installed",
            hint=f"install {helper}, or remove {name!r} from {path}",
        ) from None
    except subprocess.TimeoutExpired:
        raise CredentialsError(
            f"credential helper {helper} (named in {path}) gave no answer in {HELPER_TIMEOUT:.0f}s"
        ) from None
    except OSError as e:
        raise CredentialsError(f"cannot run credential helper {helper}: {e.strerror}") from None
    said = (proc.stdout or proc.stderr).decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        if _NOT_FOUND in said.lower():
            return None
        first = said.splitlines()[0][:200] if said else f"exit status {proc.returncode}"
        raise CredentialsError(
            f"credential helper {helper} (named in {path}) failed for {server}: {first}",
            hint=f"check it with `echo {server} | {helper} get`",
        )
    try:
        doc = json.loads(proc.stdout)
        user, secret = str(doc.get("Username") or ""), str(doc.get("Secret") or "")
    except (ValueError, AttributeError):
        raise CredentialsError(
            f"credential helper {helper} (named in {path}) answered no JSON object for {server}"
        ) from None
    if not user and not secret:
        return None  # older helpers answer empty fields for an unknown server
    if user == "<token>":
        return Credentials(user, secret, identity_token=True, source=helper)
    return Credentials(user, secret, source=helper)


def resolve(creds: CredsSource) -> Credentials | None:
    """Credentials from whatever a client was given (runs a lookup)."""
    if creds is None or isinstance(creds, Credentials):
        return creds
    if isinstance(creds, tuple):
        return Credentials(creds[0], creds[1])
    return creds()
