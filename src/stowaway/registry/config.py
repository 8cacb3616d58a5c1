"""Registry server settings, loadable from a TOML file.

Example (every key optional)::

    listen = "0.0.0.0:5000"
    storage = "/var/lib/stowaway"          # or "s3://bucket/prefix"
    max_upload_size = 10737418240
    upload_max_age = 86400                # seconds an idle upload is kept before purging
    tls_cert = "/etc/stowaway/cert.pem"
    tls_key = "/etc/stowaway/key.pem"
    htpasswd = "/etc/stowaway/htpasswd"   # bcrypt ($2y$/$2b$) entries
    tokens = ["s3cr3t"]                   # static bearer tokens
    anonymous_read = true
    access_log = true
    max_connections = 768                 # open connections; a new one evicts the longest idle
    header_timeout = 30                   # seconds for a request's headers; also keep-alive idle
    body_timeout = 60                     # longest pause within a request body (408, upload kept)
    token_secret = "..."                  # signs issued bearer tokens; same on every replica
                                          # (default: random per process)

    # Per-repository rights. Without any [[access]] table: authenticated users may
    # pull and push everything, anonymous callers pull if anonymous_read. With
    # tables, they alone decide (anonymous_read is ignored): a caller's rights on a
    # repository are the union of the actions of every table matching both.
    # Static tokens keep every right. Clients get a Bearer challenge and ask
    # /auth/token for scopes (docker token auth); basic credentials work as well.
    [[access]]
    repositories = ["team/*", "base"]     # fnmatch patterns (* also crosses /)
    users = ["alice", "bob"]              # htpasswd users; "*" = any authenticated user
    anonymous = false                     # whether callers without credentials match too
    actions = ["pull", "push"]            # pull: read; push: write and delete

    [s3]
    endpoint = "http://127.0.0.1:9000"
    region = "us-east-1"
    access_key = "..."
    secret_key = "..."

    [nix]                                  # images composed on demand (NixResolver)
    enabled = true
    index = "/srv/stowaway/index.json"     # package set of the tag "latest"
    indexes = { stable = "/srv/stowaway/stable.json" }   # other tags
    systems = ["x86_64-linux", "aarch64-linux"]   # answer an image index, one image per
                                           # Nix system; then every index path holds
                                           # "{system}" (one package set per system) and
                                           # nix_build is off
    meta = { shell = ["bashInteractive", "coreutils", "moreutils", "nano"] }
    always = ["cacert"]                    # added to every package image
    env = ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"]
    store = "/nix/store"                   # local store or SAN mount (default: /nix/store)
    substituters = ["https://cache.example.org"]
    trusted_public_keys = ["cache.example.org-1:..."]
    require_sigs = true
    cache_dir = "/var/cache/stowaway"      # default: the storage dir (shared blobs)
    max_layers = 100
    layering = "auto"                      # auto | popularity | dominator
    layer_base = ["shell"]                 # planned apart, at the bottom, in every image
                                           # holding all its packages (meta names too):
                                           # such images share those layers
    compression = "gzip"                   # gzip | zstd | none (OCI clients only)
    nix_build = false                      # resolve names missing from "latest" by nix-build
    nix_expr = "<nixpkgs>"                 # file or <path> given to nix-build
    nix_build_args = ["--option", "substituters", ""]
    # nix-build runs for names clients choose; these bound what that can cost:
    nix_build_allow = ["*"]                # attribute paths clients may have built: "*"
                                           # matches within one segment, "**" any number
                                           # of segments; default: top-level attributes
                                           # only (names in the index are always allowed)
    nix_build_jobs = 2                     # nix-builds running at once (own threads: names
                                           # in an index never wait behind them)
    nix_build_queue = 16                   # builds waiting for a job; when full, a new
                                           # name is answered 429 TOOMANYREQUESTS at once
    nix_build_failure_ttl = 60             # seconds a failed build or unknown attribute
                                           # is answered from memory without running nix
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from stowaway.errors import StowawayError
from stowaway.image.platform import NIX_SYSTEMS, platform_of_system
from stowaway.registry.nix_build import attr_pattern_regex
from stowaway.registry.storage import FilesystemStorage
from stowaway.registry.storage_api import Storage


class RegistryConfigError(StowawayError):
    """A registry configuration file or value that cannot be used."""


@dataclass(frozen=True)
class S3Options:
    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None


def _default_meta() -> dict[str, tuple[str, ...]]:
    return {"shell": ("bashInteractive", "coreutils", "moreutils", "nano")}


@dataclass(frozen=True)
class NixOptions:
    """How names become images (see the module docstring's ``[nix]`` table)."""

    enabled: bool = True
    index: Path | None = None
    indexes: dict[str, Path] = field(default_factory=dict)
    meta: dict[str, tuple[str, ...]] = field(default_factory=_default_meta)
    always: tuple[str, ...] = ()
    env: tuple[str, ...] = ("PATH=/bin:/usr/bin:/sbin:/usr/sbin",)
    store: str | None = None
    substituters: tuple[str, ...] = ()
    trusted_public_keys: tuple[str, ...] = ()
    require_sigs: bool = True
    cache_dir: Path | None = None
    max_layers: int = 100
    layering: str = "auto"
    layer_base: tuple[str, ...] = ()
    compression: str = "gzip"
    nix_build: bool = False
    nix_expr: str = "<nixpkgs>"
    nix_build_args: tuple[str, ...] = ()
    nix_build_allow: tuple[str, ...] = ("*",)
    nix_build_jobs: int = 2
    nix_build_queue: int = 16
    nix_build_failure_ttl: float = 60.0
    systems: tuple[str, ...] = ()


_NIX_TYPES: dict[str, type | tuple[type, ...]] = {
    "enabled": bool,
    "index": str,
    "indexes": dict,
    "meta": dict,
    "always": list,
    "env": list,
    "store": str,
    "substituters": list,
    "trusted_public_keys": list,
    "require_sigs": bool,
    "cache_dir": str,
    "max_layers": int,
    "layering": str,
    "layer_base": list,
    "compression": str,
    "nix_build": bool,
    "nix_expr": str,
    "nix_build_args": list,
    "nix_build_allow": list,
    "nix_build_jobs": int,
    "nix_build_queue": int,
    "nix_build_failure_ttl": (int, float),
    "systems": list,
}


@dataclass(frozen=True)
class AccessRule:
    """One ``[[access]]`` table (see the module docstring)."""

    repositories: tuple[str, ...]
    users: tuple[str, ...] = ()
    anonymous: bool = False
    actions: frozenset[str] = frozenset({"pull"})


def access_rule_from_dict(doc: Any, where: str) -> AccessRule:
    if not isinstance(doc, dict):
        raise RegistryConfigError(f"{where} must be a table")
    unknown = set(doc) - {"repositories", "users", "anonymous", "actions"}
    if unknown:
        raise RegistryConfigError(f"{where} has no key {sorted(unknown)[0]!r}")
    if not isinstance(doc.get("repositories"), list) or not doc["repositories"]:
        raise RegistryConfigError(f"{where} needs repositories = [patterns]")
    if not isinstance(doc.get("anonymous", False), bool):
        raise RegistryConfigError(f"{where}: anonymous must be true or false")
    actions = _strings(doc.get("actions", ["pull"]), f"{where}: actions")
    if not set(actions) <= {"pull", "push"}:
        raise RegistryConfigError(f"{where}: actions are pull and push")
    return AccessRule(
        _strings(doc["repositories"], f"{where}: repositories"),
        _strings(doc.get("users", []), f"{where}: users"),
        doc.get("anonymous", False),
        frozenset(actions),
    )


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RegistryConfigError(f"{where} must be a list of strings")
    return tuple(value)


def nix_options_from_dict(doc: dict[str, Any], where: str) -> NixOptions:
    kwargs: dict[str, Any] = {}
    for key, raw in doc.items():
        value: Any = raw
        at = f"{where}: [nix] {key}"
        want = _NIX_TYPES.get(key)
        if want is None:
            raise RegistryConfigError(f"{where}: [nix] has no key {key!r}")
        if not isinstance(raw, want) or (isinstance(raw, bool) and want is not bool):
            raise RegistryConfigError(f"{at} has the wrong type {type(value).__name__}")
        if key in ("index", "cache_dir"):
            value = Path(value)
        elif key == "indexes":
            if not all(isinstance(v, str) for v in value.values()):
                raise RegistryConfigError(f"{at} must map tags to index files")
            if "latest" in value:
                raise RegistryConfigError(f"{at}: the tag latest is set by [nix] index")
            value = {tag: Path(v) for tag, v in value.items()}
        elif key == "meta":
            value = {
                k: _strings(v if isinstance(v, list) else [None], f"{at}.{k}")
                for k, v in value.items()
            }
        elif isinstance(value, list):
            value = _strings(value, at)
        kwargs[key] = value
    options = NixOptions(**kwargs)
    if options.layering not in ("auto", "popularity", "dominator"):
        raise RegistryConfigError(f"{where}: [nix] layering must be auto, popularity or dominator")
    if options.compression not in ("gzip", "zstd", "none"):
        raise RegistryConfigError(f"{where}: [nix] compression must be gzip, zstd or none")
    if not 2 <= options.max_layers <= 125:
        raise RegistryConfigError(f"{where}: [nix] max_layers must be in 2..125")
    if options.nix_build_jobs < 1:
        raise RegistryConfigError(f"{where}: [nix] nix_build_jobs must be at least 1")
    if options.nix_build_queue < 0:
        raise RegistryConfigError(f"{where}: [nix] nix_build_queue must not be negative")
    if not options.nix_build_failure_ttl > 0:
        raise RegistryConfigError(
            f"{where}: [nix] nix_build_failure_ttl must be a positive number of seconds"
        )
    for pattern in options.nix_build_allow:
        try:
            attr_pattern_regex(pattern)
        except ValueError as err:
            raise RegistryConfigError(f"{where}: [nix] nix_build_allow: {err}") from None
    _check_systems(options, f"{where}: [nix] systems")
    return options


def _check_systems(options: NixOptions, at: str) -> None:
    """``systems``: known Linux systems, each once; every package index per system
    (a ``{system}`` in its path), and no nix-build (it builds for this machine only)."""
    if not options.systems:
        return
    for system in options.systems:
        if platform_of_system(system) is None:
            known = ", ".join(sorted(NIX_SYSTEMS))
            raise RegistryConfigError(f"{at}: {system!r} is not one of {known}")
    if len(set(options.systems)) != len(options.systems):
        raise RegistryConfigError(f"{at} names a system twice")
    paths = [options.index, *options.indexes.values()]
    if any(p is not None and "{system}" not in str(p) for p in paths):
        raise RegistryConfigError(
            f"{at}: every package index path must hold {{system}} (store paths differ "
            'per system), e.g. index = "/srv/stowaway/{system}/index.json"'
        )
    if options.nix_build:
        raise RegistryConfigError(f"{at}: nix_build builds for this machine only; turn it off")


@dataclass(frozen=True)
class RegistryConfig:
    listen: str = "127.0.0.1:5000"
    storage: str = "/var/lib/stowaway/registry"
    s3: S3Options = field(default_factory=S3Options)
    nix: NixOptions = field(default_factory=NixOptions)
    max_upload_size: int = 10 << 30
    max_manifest_size: int = 4 << 20
    #: seconds an upload may sit without new data before it is purged
    upload_max_age: float = 24 * 3600
    tls_cert: Path | None = None
    tls_key: Path | None = None
    htpasswd: Path | None = None
    tokens: tuple[str, ...] = ()
    anonymous_read: bool = True
    access_log: bool = True
    #: open connections at most (each is a file descriptor: keep it under ``ulimit -n``)
    max_connections: int = 768
    header_timeout: float = 30.0
    body_timeout: float = 60.0
    token_secret: str | None = None
    access: tuple[AccessRule, ...] = ()

    @property
    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise RegistryConfigError(f"listen address {self.listen!r} is not HOST:PORT")
        return host.strip("[]") or "0.0.0.0", int(port)

    @property
    def auth_enabled(self) -> bool:
        return self.htpasswd is not None or bool(self.tokens) or bool(self.access)


_TYPES: dict[str, tuple[type, ...]] = {
    "listen": (str,),
    "storage": (str,),
    "max_upload_size": (int,),
    "max_manifest_size": (int,),
    "upload_max_age": (int, float),
    "tls_cert": (str,),
    "tls_key": (str,),
    "htpasswd": (str,),
    "tokens": (list,),
    "anonymous_read": (bool,),
    "access_log": (bool,),
    "max_connections": (int,),
    "header_timeout": (int, float),
    "body_timeout": (int, float),
    "token_secret": (str,),
    "access": (list,),
}


def _convert(key: str, value: Any, where: str) -> Any:
    if key in ("tls_cert", "tls_key", "htpasswd"):
        return Path(value)
    if key == "access":
        return tuple(
            access_rule_from_dict(r, f"{where}: [[access]] #{i + 1}") for i, r in enumerate(value)
        )
    if key == "tokens":
        if not all(isinstance(t, str) and t for t in value):
            raise RegistryConfigError(f"{where}: tokens must be non-empty strings")
        return tuple(value)
    return value


def config_from_dict(doc: dict[str, Any], where: str = "config") -> RegistryConfig:
    """Build a config from parsed TOML, naming the offending key on error."""
    known = {f.name for f in fields(RegistryConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in known:
            raise RegistryConfigError(f"{where}: unknown key {key!r}")
        if key == "s3":
            if not isinstance(value, dict) or set(value) - {f.name for f in fields(S3Options)}:
                raise RegistryConfigError(
                    f"{where}: [s3] takes endpoint, region, access_key, secret_key"
                )
            kwargs["s3"] = S3Options(**{k: str(v) for k, v in value.items()})
            continue
        if key == "nix":
            if not isinstance(value, dict):
                raise RegistryConfigError(f"{where}: nix must be a table")
            kwargs["nix"] = nix_options_from_dict(value, where)
            continue
        if not isinstance(value, _TYPES[key]) or (
            isinstance(value, bool) and bool not in _TYPES[key]
        ):
            raise RegistryConfigError(f"{where}: {key} has the wrong type {type(value).__name__}")
        kwargs[key] = _convert(key, value, where)
    config = RegistryConfig(**kwargs)
    for key in ("upload_max_age", "header_timeout", "body_timeout"):
        if not getattr(config, key) > 0:
            raise RegistryConfigError(f"{where}: {key} must be a positive number of seconds")
    if config.max_connections < 1:
        raise RegistryConfigError(f"{where}: max_connections must be at least 1")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise RegistryConfigError(f"{where}: tls_cert and tls_key go together")
    config.host_port  # noqa: B018 - validate early
    return config


def load_config(path: Path) -> RegistryConfig:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as err:
        raise RegistryConfigError(f"cannot read registry config {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise RegistryConfigError(f"{path}: {err}") from err
    return config_from_dict(doc, str(path))


def open_storage(config: RegistryConfig) -> Storage:
    """The backend named by ``config.storage``: ``s3://bucket/prefix`` or a directory."""
    if config.storage.startswith("s3://"):
        from stowaway.registry.s3 import S3Storage

        return S3Storage(
            config.storage,
            endpoint_url=config.s3.endpoint,
            region=config.s3.region,
            access_key=config.s3.access_key,
            secret_key=config.s3.secret_key,
        )
    return FilesystemStorage(Path(config.storage))
