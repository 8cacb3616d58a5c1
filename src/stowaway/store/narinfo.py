"""narinfo and nix-cache-info files, fingerprints and ed25519 signatures.

A narinfo is what a binary cache says about a store path; the signature over its
fingerprint is the only thing that makes that claim trustworthy, so parsing is
strict and hashes are normalised to the one form Nix signs (``sha256:<nix32>``).
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from stowaway.errors import InvalidStorePath, NarinfoError, StowawayError
from stowaway.store import nixbase32
from stowaway.store.model import STORE_DIR, PathInfo
from stowaway.store.paths import parse_basename, parse_store_path

__all__ = ["NixCacheInfo", "Narinfo", "PublicKey", "SecretKey", "normalise_hash"]

_DIGEST_SIZES = {"sha256": 32, "sha512": 64, "sha1": 20, "md5": 16}


def normalise_hash(value: str) -> str:
    """``algo:<nix32>`` from ``algo:<nix32|hex|base64>`` or SRI ``algo-<base64>``.

    Raises ValueError with a short reason (callers add where it came from).
    """
    if ":" in value:
        algo, _, digest = value.partition(":")
    else:
        algo, _, digest = value.partition("-")
        if not digest:
            raise ValueError(f"hash {value!r} has no 'algo:' prefix")
    size = _DIGEST_SIZES.get(algo)
    if size is None:
        raise ValueError(f"unknown hash algorithm {algo!r} in {value!r}")
    raw: bytes
    try:
        if len(digest) == nixbase32.encoded_length(size):
            raw = nixbase32.decode(digest)
        elif len(digest) == 2 * size:
            raw = bytes.fromhex(digest)
        else:
            raw = base64.b64decode(digest, validate=True)
    except (StowawayError, ValueError, binascii.Error):
        raise ValueError(f"hash {value!r} is not valid nix32, hex or base64") from None
    if len(raw) != size:
        raise ValueError(f"hash {value!r} has {len(raw)} bytes, {algo} needs {size}")
    return f"{algo}:{nixbase32.encode(raw)}"


def _b64(text: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise StowawayError(f"{what}: not valid base64") from None
    if len(raw) != size:
        raise StowawayError(f"{what}: expected {size} bytes after base64, got {len(raw)}")
    return raw


def _split_key(text: str, what: str) -> tuple[str, str]:
    name, sep, data = text.strip().partition(":")
    if not sep or not name or not data:
        raise StowawayError(f"{what} {text.strip()[:40]!r}: expected 'NAME:BASE64'")
    return name, data


@dataclass(frozen=True)
class PublicKey:
    """A trusted key: ``name:base64(32 bytes)`` as in Nix's trusted-public-keys."""

    name: str
    key: bytes

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        name, data = _split_key(text, "public key")
        return cls(name, _b64(data, 32, f"public key {name!r}"))

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"

    def verify(self, fingerprint: str, sig: str) -> bool:
        """True if ``sig`` (``name:base64``) is this key's signature of ``fingerprint``."""
        name, _, data = sig.partition(":")
        if name != self.name:
            return False
        try:
            raw = base64.b64decode(data, validate=True)
            Ed25519PublicKey.from_public_bytes(self.key).verify(raw, fingerprint.encode())
        except (binascii.Error, InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class SecretKey:
    """A signing key: ``name:base64(seed + public key)`` (64 bytes), as Nix writes it."""

    name: str
    key: bytes = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        name, data = _split_key(text, "secret key")
        return cls(name, _b64(data, 64, f"secret key {name!r}"))

    def public_key(self) -> PublicKey:
        return PublicKey(self.name, self.key[32:])

    def sign(self, fingerprint: str) -> str:
        sig = Ed25519PrivateKey.from_private_bytes(self.key[:32]).sign(fingerprint.encode())
        return f"{self.name}:{base64.b64encode(sig).decode()}"


def _lines(text: str, where: str) -> list[tuple[int, str, str]]:
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep or not key:
            raise NarinfoError(f"{where}:{no}: expected 'Key: value', found {line[:80]!r}")
        out.append((no, key, value.strip()))
    return out


def _check_url(url: str, where: str) -> None:
    """A narinfo's URL must name a file inside its cache: a relative path without dot
    segments, query or fragment. The URL is not covered by the signature, so a cache (or
    anyone between it and us) could otherwise make us read ``../../etc/passwd`` or fetch
    from another origin."""
    parts = urllib.parse.urlsplit(url)
    path = urllib.parse.unquote(parts.path)
    segments = path.split("/")
    if (
        parts.scheme
        or parts.netloc
        or parts.query
        or parts.fragment
        or "?" in url
        or "#" in url
        or not path
        or path.startswith("/")
        or "\\" in path
        or "\0" in path
        or any(seg in ("", ".", "..") for seg in segments)
    ):
        raise NarinfoError(
            f"{where}: URL {url!r} leaves the cache: a NAR's URL must be a relative path "
            "inside the binary cache (like nar/<hash>.nar.xz)"
        )


@dataclass
class Narinfo:
    """One ``<hash>.narinfo``. References are basenames, as in the file."""

    store_path: str
    url: str
    nar_hash: str
    nar_size: int
    compression: str = "bzip2"
    file_hash: str | None = None
    file_size: int | None = None
    references: list[str] = field(default_factory=list)
    deriver: str | None = None
    system: str | None = None
    sigs: list[str] = field(default_factory=list)
    ca: str | None = None

    @classmethod
    def parse(cls, text: str, where: str, store_dir: str = STORE_DIR) -> Narinfo:
        """Parse ``text``; ``where`` (URL or file) and line numbers appear in errors."""
        fields: dict[str, str] = {}
        sigs: list[str] = []
        line_of: dict[str, int] = {}
        for no, key, value in _lines(text, where):
            if key == "Sig":
                sigs.append(value)
                continue
            if key in fields:
                raise NarinfoError(f"{where}:{no}: duplicate key {key!r}")
            fields[key] = value
            line_of[key] = no
        for key in ("StorePath", "URL", "NarHash", "NarSize"):
            if not fields.get(key):
                raise NarinfoError(f"{where}: required key {key!r} is missing")

        def at(key: str) -> str:
            return f"{where}:{line_of[key]}"

        def hash_of(key: str) -> str:
            try:
                return normalise_hash(fields[key])
            except ValueError as e:
                raise NarinfoError(f"{at(key)}: {key}: {e}") from None

        def int_of(key: str) -> int:
            v = fields[key]
            if not (v.isascii() and v.isdigit()):
                raise NarinfoError(f"{at(key)}: {key} {v!r} is not a non-negative integer")
            return int(v)

        try:
            store_path = parse_store_path(fields["StorePath"], store_dir).path
            refs = fields.get("References", "").split()
            for ref in refs:
                parse_basename(ref)
            deriver = fields.get("Deriver")
            if deriver and deriver != "unknown-deriver":
                parse_basename(deriver)
        except InvalidStorePath as e:
            raise NarinfoError(f"{where}: {e.message}") from None
        nar_hash = hash_of("NarHash")
        if not nar_hash.startswith("sha256:"):
            raise NarinfoError(f"{at('NarHash')}: NarHash must be sha256, got {nar_hash}")
        _check_url(fields["URL"], at("URL"))
        return cls(
            store_path=store_path,
            url=fields["URL"],
            nar_hash=nar_hash,
            nar_size=int_of("NarSize"),
            compression=fields.get("Compression") or "bzip2",
            file_hash=hash_of("FileHash") if "FileHash" in fields else None,
            file_size=int_of("FileSize") if "FileSize" in fields else None,
            references=refs,
            deriver=deriver if deriver and deriver != "unknown-deriver" else None,
            system=fields.get("System"),
            sigs=sigs,
            ca=fields.get("CA") or None,
        )

    @property
    def store_dir(self) -> str:
        return self.store_path.rsplit("/", 1)[0]

    def to_text(self) -> str:
        lines = [
            f"StorePath: {self.store_path}",
            f"URL: {self.url}",
            f"Compression: {self.compression}",
        ]
        if self.file_hash:
            lines.append(f"FileHash: {self.file_hash}")
        if self.file_size is not None:
            lines.append(f"FileSize: {self.file_size}")
        lines += [f"NarHash: {self.nar_hash}", f"NarSize: {self.nar_size}"]
        lines.append(f"References: {' '.join(self.references)}")
        if self.deriver:
            lines.append(f"Deriver: {self.deriver}")
        if self.system:
            lines.append(f"System: {self.system}")
        lines += [f"Sig: {s}" for s in self.sigs]
        if self.ca:
            lines.append(f"CA: {self.ca}")
        return "\n".join(lines) + "\n"

    def reference_paths(self) -> list[str]:
        return sorted(f"{self.store_dir}/{r}" for r in self.references)

    def fingerprint(self) -> str:
        """The string Nix signs: ``1;path;sha256:nix32;size;sorted,full,refs``."""
        refs = ",".join(self.reference_paths())
        return f"1;{self.store_path};{self.nar_hash};{self.nar_size};{refs}"

    def valid_signers(self, keys: list[PublicKey] | tuple[PublicKey, ...]) -> list[str]:
        """Names of the trusted ``keys`` that validly signed this narinfo."""
        fp = self.fingerprint()
        return [k.name for k in keys if any(k.verify(fp, s) for s in self.sigs)]

    def to_path_info(self) -> PathInfo:
        return PathInfo(
            path=self.store_path,
            nar_hash=self.nar_hash,
            nar_size=self.nar_size,
            references=tuple(self.reference_paths()),
            deriver=f"{self.store_dir}/{self.deriver}" if self.deriver else None,
            sigs=tuple(self.sigs),
            ca=self.ca,
        )


@dataclass(frozen=True)
class NixCacheInfo:
    """``nix-cache-info``: which store a cache serves and how eager clients may be."""

    store_dir: str = STORE_DIR
    want_mass_query: bool = False
    priority: int = 50

    @classmethod
    def parse(cls, text: str, where: str) -> NixCacheInfo:
        store_dir, mass, priority = STORE_DIR, False, 50
        for no, key, value in _lines(text, where):
            if key == "StoreDir":
                store_dir = value
            elif key == "WantMassQuery":
                mass = value == "1"
            elif key == "Priority":
                if not (value.isascii() and value.isdigit()):
                    raise NarinfoError(f"{where}:{no}: Priority {value!r} is not an integer")
                priority = int(value)
        return cls(store_dir, mass, priority)
