"""Store sources: where store paths and their bytes come from (local store database,
plain store directories, binary caches), and the formats they speak (NAR, narinfo)."""

from stowaway.store.binary_cache import BinaryCache
from stowaway.store.local import DirectoryStore, LocalStore
from stowaway.store.model import STORE_DIR, NarEntry, PathInfo, StoreSource
from stowaway.store.nar import dump_path, nar_hash_and_size, read_nar, walk_path, write_nar
from stowaway.store.narinfo import Narinfo, NixCacheInfo, PublicKey, SecretKey
from stowaway.store.paths import StorePath, parse_basename, parse_store_path
from stowaway.store.sources import Sources, closure, open_sources

__all__ = [
    "STORE_DIR",
    "BinaryCache",
    "DirectoryStore",
    "LocalStore",
    "NarEntry",
    "Narinfo",
    "NixCacheInfo",
    "PathInfo",
    "PublicKey",
    "SecretKey",
    "StorePath",
    "StoreSource",
    "Sources",
    "closure",
    "dump_path",
    "nar_hash_and_size",
    "open_sources",
    "parse_basename",
    "parse_store_path",
    "read_nar",
    "walk_path",
    "write_nar",
]
