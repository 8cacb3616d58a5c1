"""Store sources: where store paths and their bytes come from (local store database,
plain store directories, binary caches), and the formats they speak (NAR, narinfo).

The names below are imported on first use (PEP 562): importing ``stowaway.store.model``
must not load the binary cache's cryptography and zstandard, so the BuildKit frontend
image (python3 + grpcio + protobuf) can ship this file as it is.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names for type checkers (`as`: re-exported)
    from stowaway.store.binary_cache import BinaryCache as BinaryCache
    from stowaway.store.local import DirectoryStore as DirectoryStore
    from stowaway.store.local import LocalStore as LocalStore
    from stowaway.store.model import STORE_DIR as STORE_DIR
    from stowaway.store.model import NarEntry as NarEntry
    from stowaway.store.model import PathInfo as PathInfo
    from stowaway.store.model import StoreSource as StoreSource
    from stowaway.store.nar import dump_path as dump_path
    from stowaway.store.nar import nar_hash_and_size as nar_hash_and_size
    from stowaway.store.nar import read_nar as read_nar
    from stowaway.store.nar import walk_path as walk_path
    from stowaway.store.nar import write_nar as write_nar
    from stowaway.store.narinfo import Narinfo as Narinfo
    from stowaway.store.narinfo import NixCacheInfo as NixCacheInfo
    from stowaway.store.narinfo import PublicKey as PublicKey
    from stowaway.store.narinfo import SecretKey as SecretKey
    from stowaway.store.paths import StorePath as StorePath
    from stowaway.store.paths import parse_basename as parse_basename
    from stowaway.store.paths import parse_store_path as parse_store_path
    from stowaway.store.sources import Sources as Sources
    from stowaway.store.sources import closure as closure
    from stowaway.store.sources import open_sources as open_sources

#: Exported name → the module of this package that defines it.
_HOMES = {
    "BinaryCache": "binary_cache",
    "DirectoryStore": "local",
    "LocalStore": "local",
    "STORE_DIR": "model",
    "NarEntry": "model",
    "PathInfo": "model",
    "StoreSource": "model",
    "dump_path": "nar",
    "nar_hash_and_size": "nar",
    "read_nar": "nar",
    "walk_path": "nar",
    "write_nar": "nar",
    "Narinfo": "narinfo",
    "NixCacheInfo": "narinfo",
    "PublicKey": "narinfo",
    "SecretKey": "narinfo",
    "StorePath": "paths",
    "parse_basename": "paths",
    "parse_store_path": "paths",
    "Sources": "sources",
    "closure": "sources",
    "open_sources": "sources",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
