"""Registry server settings, loadable from a TOML file.

Example (every key optional)::

    listen = "0.0.0.0:5000"
    storage = "/var/lib/stowaway"          # or "s3://bucket/prefix"
    max_upload_size = 10737418240
    tls_cert = "/etc/stowaway/cert.pem"
    tls_key = "/etc/stowaway/key.pem"
    htpasswd = "/etc/stowaway/htpasswd"   # bcrypt ($2y$/$2b$) entries
    tokens = ["s3cr3t"]                   # static bearer tokens
    anonymous_read = true
    access_log = true

    [s3]
    endpoint = "http://127.0.0.1:9000"
    region = "us-east-1"
    access_key = "..."
    secret_key = "..."
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from stowaway.errors import StowawayError
from stowaway.registry.storage import FilesystemStorage, Storage


class RegistryConfigError(StowawayError):
    """A registry configuration file or value that cannot be used."""


@dataclass(frozen=True)
class S3Options:
    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None


@dataclass(frozen=True)
class RegistryConfig:
    listen: str = "127.0.0.1:5000"
    storage: str = "/var/lib/stowaway/registry"
    s3: S3Options = field(default_factory=S3Options)
    max_upload_size: int = 10 << 30
    max_manifest_size: int = 4 << 20
    tls_cert: Path | None = None
    tls_key: Path | None = None
    htpasswd: Path | None = None
    tokens: tuple[str, ...] = ()
    anonymous_read: bool = True
    access_log: bool = True

    @property
    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise RegistryConfigError(f"listen address {self.listen!r} is not HOST:PORT")
        return host.strip("[]") or "0.0.0.0", int(port)

    @property
    def auth_enabled(self) -> bool:
        return self.htpasswd is not None or bool(self.tokens)


_TYPES: dict[str, tuple[type, ...]] = {
    "listen": (str,),
    "storage": (str,),
    "max_upload_size": (int,),
    "max_manifest_size": (int,),
    "tls_cert": (str,),
    "tls_key": (str,),
    "htpasswd": (str,),
    "tokens": (list,),
    "anonymous_read": (bool,),
    "access_log": (bool,),
}


def _convert(key: str, value: Any, where: str) -> Any:
    if key in ("tls_cert", "tls_key", "htpasswd"):
        return Path(value)
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
        if not isinstance(value, _TYPES[key]) or (
            isinstance(value, bool) and bool not in _TYPES[key]
        ):
            raise RegistryConfigError(f"{where}: {key} has the wrong type {type(value).__name__}")
        kwargs[key] = _convert(key, value, where)
    config = RegistryConfig(**kwargs)
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
