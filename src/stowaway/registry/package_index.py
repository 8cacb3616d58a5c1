"""Package indexes: which store path a package name stands for.

An index is a JSON file (written atomically, keys sorted, so the same input gives
the same bytes)::

    {"version": 1,
     "packages": {"hello": {"path": "/nix/store/…-hello-2.12", "meta": {"version": "2.12"}}},
     "aliases": {"bashinteractive": "bashInteractive"}}

``aliases`` maps lower-case repository components to keys that are not
lower-case (repository names cannot hold upper case); ``build_index`` derives
one for every such key whose lower-case form is neither a key nor shared by
another key, and a hand-written table adds to it.

Three producers (``stowaway index``): ``nix-env -qaP --out-path --json`` output;
a list of store paths checked against a source (a binary cache), named by the
Nix rule for store path names; a directory of ``result`` links. ``IndexFile``
re-reads the file when it changes, so a running server picks up a new index.
Names missing from it are built Nixery's way by ``nix_build.NixBuild``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stowaway.errors import InvalidStorePath, StowawayError
from stowaway.fsutil import atomic_write
from stowaway.store.model import STORE_DIR, StoreSource
from stowaway.store.paths import parse_store_path

INDEX_VERSION = 1
#: output names nixpkgs gives non-default outputs; ``hello-2.12-man`` is ``hello.man``
OUTPUT_NAMES = frozenset({"bin", "dev", "devdoc", "doc", "info", "lib", "man", "out", "static"})
log = logging.getLogger("stowaway.registry")


class PackageIndexError(StowawayError):
    """A package index (or its input) that cannot be used; says which file and key."""


@dataclass(frozen=True)
class Package:
    path: str
    meta: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PackageIndex:
    packages: Mapping[str, Package]
    aliases: Mapping[str, str] = field(default_factory=dict)

    def lookup(self, name: str) -> str | None:
        """The store path of ``name`` (an index key, else a lower-case alias)."""
        pkg = self.packages.get(name)
        if pkg is None and name in self.aliases:
            pkg = self.packages.get(self.aliases[name])
        return pkg.path if pkg is not None else None

    def names(self) -> list[str]:
        return sorted(self.packages)

    def to_json(self) -> bytes:
        doc = {
            "version": INDEX_VERSION,
            "packages": {
                k: {"path": p.path, **({"meta": dict(p.meta)} if p.meta else {})}
                for k, p in self.packages.items()
            },
            "aliases": dict(self.aliases),
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def build_index(
    packages: Mapping[str, Package], explicit_aliases: Mapping[str, str] | None = None
) -> PackageIndex:
    """An index with the derived lower-case aliases (see module docstring)."""
    by_lower: dict[str, list[str]] = {}
    for key in packages:
        if key != key.lower():
            by_lower.setdefault(key.lower(), []).append(key)
    aliases = {
        low: keys[0] for low, keys in by_lower.items() if len(keys) == 1 and low not in packages
    }
    for alias, target in (explicit_aliases or {}).items():
        if target not in packages:
            raise PackageIndexError(f"alias {alias!r} points at {target!r}, which is not a package")
        aliases[alias] = target
    return PackageIndex(dict(sorted(packages.items())), dict(sorted(aliases.items())))


def _checked_path(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise PackageIndexError(f"{where}: store path must be a string, not {type(value).__name__}")
    try:
        return parse_store_path(value, STORE_DIR).path
    except InvalidStorePath as err:
        raise PackageIndexError(f"{where}: {err.message}") from None


def parse_index(data: bytes, where: str) -> PackageIndex:
    """Parse an index file's bytes; errors name ``where`` and the bad key."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise PackageIndexError(f"{where}: not JSON ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("packages"), dict):
        raise PackageIndexError(f'{where}: expected an object with a "packages" object')
    if doc.get("version", INDEX_VERSION) != INDEX_VERSION:
        raise PackageIndexError(f"{where}: index version {doc.get('version')!r}, expected 1")
    packages: dict[str, Package] = {}
    for key, value in doc["packages"].items():
        at = f"{where}: packages[{key!r}]"
        if isinstance(value, str):
            packages[key] = Package(_checked_path(value, at))
            continue
        if not isinstance(value, dict):
            raise PackageIndexError(f'{at}: expected a store path or an object with "path"')
        meta = value.get("meta", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise PackageIndexError(f"{at}: meta must be an object of strings")
        packages[key] = Package(_checked_path(value.get("path"), at + ".path"), meta)
    aliases = doc.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise PackageIndexError(f"{where}: aliases must be an object of strings")
    try:
        return build_index(packages, aliases)
    except PackageIndexError as err:
        raise PackageIndexError(f"{where}: {err.message}") from None


def load_index(path: Path) -> PackageIndex:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise PackageIndexError(f"cannot read package index {path}: {err.strerror}") from None
    return parse_index(data, str(path))


def write_index(path: Path, index: PackageIndex) -> None:
    """Write atomically (``stowaway.fsutil.atomic_write``)."""
    atomic_write(Path(path), index.to_json())


# -- names and versions of store paths --------------------------------------------


def split_name(name: str) -> tuple[str, str]:
    """Nix's rule for a derivation name: the version starts at the first ``-``
    followed by a character that is not a letter (``hello-2.12`` → hello, 2.12;
    ``greeting-data`` → greeting-data, "")."""
    m = re.search(r"-(?=[^a-zA-Z])", name)
    return (name[: m.start()], name[m.end() :]) if m else (name, "")


def _components(version: str) -> list[str]:
    return re.findall(r"[0-9]+|[^0-9.\-]+", version)


def _component_lt(a: str, b: str) -> bool:
    """Nix's component order: numbers numerically; a missing component sorts
    before a number; ``pre`` before anything else; strings before numbers."""
    if a.isdigit() and b.isdigit():
        return int(a) < int(b)
    if a == "" and b.isdigit():
        return True
    if a == "pre" and b != "pre":
        return True
    if b == "pre":
        return False
    if b.isdigit():
        return True
    if a.isdigit():
        return False
    return a < b


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as ``nix-env --compare-versions`` (``builtins.compareVersions``)."""
    ca, cb = _components(a), _components(b)
    for i in range(max(len(ca), len(cb))):
        x = ca[i] if i < len(ca) else ""
        y = cb[i] if i < len(cb) else ""
        if _component_lt(x, y):
            return -1
        if _component_lt(y, x):
            return 1
    return 0


def package_name(store_path: str) -> tuple[str, str]:
    """Index key and version for a store path: ``…-hello-2.12`` → (hello, 2.12);
    a known output suffix becomes an attribute: ``…-hello-2.12-man`` → (hello.man, 2.12)."""
    sp = parse_store_path(store_path, STORE_DIR)
    pname, version = split_name(sp.name)
    head, _, last = version.rpartition("-")
    if version and head and last in OUTPUT_NAMES:
        return (pname if last == "out" else f"{pname}.{last}"), head
    return pname, version


def _newest(chosen: dict[str, tuple[str, str]], key: str, version: str, path: str) -> None:
    """Keep the newest version per key; equal versions: the smaller path (stable)."""
    old = chosen.get(key)
    if old is None:
        chosen[key] = (version, path)
        return
    order = compare_versions(version, old[0])
    if order > 0 or (order == 0 and path < old[1]):
        chosen[key] = (version, path)


# -- producers --------------------------------------------------------------------


def from_nix_env_json(data: bytes, where: str, strip_prefix: str = "") -> PackageIndex:
    """From ``nix-env -qaP --out-path --json``: attribute path → the output named
    by ``outputName`` (else ``out``); ``strip_prefix`` drops e.g. ``nixpkgs.``."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise PackageIndexError(f"{where}: not JSON ({err})") from None
    if not isinstance(doc, dict):
        raise PackageIndexError(f"{where}: expected the object nix-env -qaP --json prints")
    packages: dict[str, Package] = {}
    for attr, info in doc.items():
        at = f"{where}: {attr!r}"
        if not isinstance(info, dict) or not isinstance(info.get("outputs"), dict):
            raise PackageIndexError(f'{at}: no "outputs" (run nix-env with --out-path)')
        outputs: dict[str, Any] = info["outputs"]
        out_name = info.get("outputName") or "out"
        if out_name not in outputs:
            raise PackageIndexError(f"{at}: output {out_name!r} missing from {sorted(outputs)}")
        key = attr.removeprefix(strip_prefix) if strip_prefix else attr
        meta = {
            k: str(info[k]) for k in ("name", "version") if isinstance(info.get(k), str) and info[k]
        }
        packages[key] = Package(_checked_path(outputs[out_name], f"{at}.outputs"), meta)
    return build_index(packages)


def from_store_paths(paths: Sequence[str], source: StoreSource) -> PackageIndex:
    """From store paths that ``source`` (e.g. a binary cache) must hold; keys by
    ``package_name``; on a clash the newest version wins."""
    chosen: dict[str, tuple[str, str]] = {}
    for raw in paths:
        try:
            path = parse_store_path(raw.strip(), STORE_DIR).path
        except InvalidStorePath as err:
            raise PackageIndexError(err.message) from None
        if source.query(path) is None:
            raise PackageIndexError(f"{path} is not in {source.name}")
        key, version = package_name(path)
        _newest(chosen, key, version, path)
    packages = {k: Package(p, {"version": v} if v else {}) for k, (v, p) in chosen.items()}
    return build_index(packages)


def from_result_links(directory: Path) -> PackageIndex:
    """From a directory of symlinks into the store: link name → target store path.
    Hidden entries are skipped; anything else that is not such a link is an error."""
    packages: dict[str, Package] = {}
    for entry in sorted(Path(directory).iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_symlink():
            raise PackageIndexError(f"{entry}: not a symlink to a store path")
        target = os.path.realpath(entry)
        try:
            sp = parse_store_path(target, STORE_DIR, strict=False)
        except InvalidStorePath as err:
            raise PackageIndexError(f"{entry} -> {target}: {err.message}") from None
        packages[entry.name] = Package(sp.path)
    return build_index(packages)


# -- live files ---------------------------------------------------------------------


class IndexFile:
    """An index file re-read whenever its (mtime, size, inode) change. A broken
    new version is logged and the last good one kept; with none, the error is raised."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._index: PackageIndex | None = None

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self) -> PackageIndex | None:
        """The loaded index if the file has not changed since (no reading)."""
        try:
            stamp = self._stat()
        except OSError:
            return self._index
        return self._index if stamp == self._stamp else None

    def get(self) -> PackageIndex:
        try:
            st = os.stat(self.path)
        except OSError as err:
            if self._index is not None:
                return self._index
            raise PackageIndexError(
                f"cannot read package index {self.path}: {err.strerror}"
            ) from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp and self._index is not None:
            return self._index
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._index = load_index(self.path)
                except PackageIndexError:
                    if self._index is None:
                        raise
                    log.exception("keeping the previous package index")
                self._stamp = stamp
            assert self._index is not None
            return self._index
