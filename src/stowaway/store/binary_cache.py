"""Binary caches (``file://`` and ``http(s)://``) as a store source.

Trust comes only from signatures: a narinfo is accepted when a trusted key signed
its fingerprint (or when the user turned the check off). NARs are streamed:
download → decompress → hash → decode, never unpacked to disk; the hashes are
checked when the stream ends, so a consumer must not publish anything it built from
``entries`` before the iterator is exhausted.

Download, decompression and both hashes run in a reader thread of their own, a few
MiB ahead of the NAR decoder (``_ReadAhead``): zstd, lzma and hashlib release the GIL,
so one NAR keeps two cores busy (decode and file writes on one, the rest on the other)
while memory stays bounded.
"""

from __future__ import annotations

import bz2
import hashlib
import http.client
import lzma
import queue
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from stowaway.errors import NarError, NarinfoError, PathNotFound, SignatureError, StowawayError
from stowaway.store import nixbase32
from stowaway.store.model import STORE_DIR, NarEntry, PathInfo
from stowaway.store.nar import CHUNK_SIZE, Readable, read_nar
from stowaway.store.narinfo import Narinfo, NixCacheInfo, PublicKey
from stowaway.store.paths import parse_store_path

__all__ = ["BinaryCache", "CacheError", "HashMismatch"]


class CacheError(StowawayError):
    """A binary cache that cannot be reached or answers nonsense."""


class HashMismatch(StowawayError):
    """Downloaded data whose hash or size differs from what the narinfo promised."""


class _Hashing:
    """Pass-through reader that hashes and counts what flows through it, and stops as soon
    as more than ``limit`` bytes came (a tiny compressed NAR can expand to gigabytes: the
    narinfo's sizes bound the work before the hashes can be checked at the end)."""

    def __init__(self, inner: Readable, limit: int | None = None, what: str = "") -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0
        self.limit = limit
        self.what = what

    def read(self, n: int = -1, /) -> bytes:
        data = self.inner.read(n)
        self.sha.update(data)
        self.size += len(data)
        if self.limit is not None and self.size > self.limit:
            raise HashMismatch(f"{self.what}: more than the {self.limit} bytes its narinfo says")
        return data

    def drain(self) -> None:
        while self.read(CHUNK_SIZE):
            pass

    def check(self, want_hash: str | None, want_size: int | None, what: str) -> None:
        got = "sha256:" + nixbase32.encode(self.sha.digest())
        if want_size is not None and self.size != want_size:
            raise HashMismatch(f"{what}: expected {want_size} bytes, got {self.size}")
        if want_hash is not None and want_hash.startswith("sha256:") and got != want_hash:
            raise HashMismatch(f"{what}: expected hash {want_hash}, got {got}")


#: Decompressed chunks the reader thread may run ahead of the decoder (1 MiB each).
READ_AHEAD = 4


class _ReadAhead:
    """``read`` of ``inner`` (which must release the GIL to gain anything) done by a
    thread of its own, ``depth`` chunks ahead. Its errors are raised by ``read`` in the
    consumer; ``close`` stops the thread and waits for it, so the caller may close the
    underlying file afterwards."""

    def __init__(self, inner: Readable, depth: int = READ_AHEAD) -> None:
        self._inner = inner
        self._q: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._stop = threading.Event()
        self._buf = memoryview(b"")
        self._done = False
        self._thread = threading.Thread(target=self._run, name="stowaway-nar-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        item: bytes | BaseException
        while not self._stop.is_set():
            try:
                item = self._inner.read(CHUNK_SIZE)
            except BaseException as e:  # handed to the consumer, which raises it
                item = e
            while not self._stop.is_set():
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(item, bytes) or not item:
                return

    def read(self, n: int = -1, /) -> bytes:
        if not self._buf:
            if self._done:
                return b""
            item = self._q.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if not item:
                self._done = True
                return b""
            if n < 0 or n >= len(item):
                return item
            self._buf = memoryview(item)
        out = self._buf[:n] if n >= 0 else self._buf
        self._buf = self._buf[len(out) :]
        return bytes(out)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _decompressor(compression: str, raw: Readable, where: str) -> Readable:
    if compression == "none":
        return raw
    if compression == "xz":
        return lzma.LZMAFile(cast(BinaryIO, raw))
    if compression == "bzip2":
        return bz2.BZ2File(cast(BinaryIO, raw))
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(
            cast(BinaryIO, raw), read_size=CHUNK_SIZE, read_across_frames=True
        )
    raise CacheError(
        f"{where}: unsupported compression {compression!r} (supported: xz, zstd, bzip2, none)"
    )


class BinaryCache:
    """A Nix binary cache; see the module docstring for the trust policy."""

    def __init__(
        self,
        url: str,
        trusted_keys: Sequence[PublicKey],
        *,
        require_signatures: bool = True,
        store_dir: str = STORE_DIR,
        timeout: float = 30.0,
        keys_from: str = "--trusted-public-key",
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("file", "http", "https"):
            raise CacheError(f"binary cache {url!r}: only file://, http:// and https:// work")
        # Query parameters (?compression=…, ?secret-key=…) configure writers, not readers.
        self.url = urllib.parse.urlunsplit(parsed._replace(query="", fragment="")).rstrip("/")
        self.name = f"binary cache {self.url}"
        self.trusted_keys = tuple(trusted_keys)
        self.keys_from = keys_from  # where the keys came from, for the refusal's hint
        self.require_signatures = require_signatures
        self.store_dir = store_dir
        self.timeout = timeout
        self._scheme = parsed.scheme
        self._narinfos: dict[str, Narinfo | None] = {}
        self._info: NixCacheInfo | None = None
        self._lock = threading.Lock()
        self._unreachable: str | None = None

    # ------------------------------------------------------------------ transport

    def _open(self, rel: str) -> Readable | None:
        """Open ``<url>/<rel>`` for reading; None if the cache says it does not exist."""
        url = f"{self.url}/{rel}"
        if self._scheme == "file":
            try:
                return open(Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)), "rb")
            except FileNotFoundError:
                return None
            except OSError as e:
                raise CacheError(f"{url}: {e.strerror}") from None
        if self._unreachable is not None:
            raise CacheError(self._unreachable)
        req = urllib.request.Request(url, headers={"User-Agent": "stowaway"})
        try:
            return cast(http.client.HTTPResponse, urllib.request.urlopen(req, timeout=self.timeout))
        except urllib.error.HTTPError as e:
            if e.code in (404, 403):
                e.close()
                return None
            raise CacheError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            # as Nix does, an unreachable cache is not tried again (in this process): a
            # timeout is waited for once, not once per path
            self._unreachable = f"{url}: cannot connect ({reason})"
            raise CacheError(self._unreachable) from None

    def _text(self, rel: str) -> str | None:
        f = self._open(rel)
        if f is None:
            return None
        try:
            data = f.read()
        except (OSError, http.client.HTTPException) as e:  # e.g. IncompleteRead: cut short
            raise CacheError(f"{self.url}/{rel}: read failed ({e})") from None
        finally:
            cast(BinaryIO, f).close()
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise CacheError(f"{self.url}/{rel}: not UTF-8 text") from None

    # ------------------------------------------------------------------ metadata

    def cache_info(self) -> NixCacheInfo:
        """The cache's nix-cache-info; its StoreDir must be ours."""
        if self._info is None:
            where = f"{self.url}/nix-cache-info"
            text = self._text("nix-cache-info")
            if text is None:
                raise CacheError(f"{where}: not found; is {self.url} a Nix binary cache?")
            info = NixCacheInfo.parse(text, where)
            if info.store_dir != self.store_dir:
                raise CacheError(
                    f"{where}: cache serves store {info.store_dir}, we need {self.store_dir}"
                )
            self._info = info
        return self._info

    def narinfo(self, path: str) -> Narinfo | None:
        """The verified narinfo of ``path`` or None; raises SignatureError if untrusted."""
        sp = parse_store_path(path, self.store_dir)
        with self._lock:
            if sp.path in self._narinfos:
                return self._narinfos[sp.path]
        self.cache_info()
        rel = f"{sp.hash_part}.narinfo"
        text = self._text(rel)
        ni = None
        if text is not None:
            ni = Narinfo.parse(text, f"{self.url}/{rel}", self.store_dir)
            if ni.store_path != sp.path:
                raise NarinfoError(f"{self.url}/{rel}: describes {ni.store_path}, not {sp.path}")
            self._check_trust(ni)
        with self._lock:
            self._narinfos[sp.path] = ni
        return ni

    def path_for_hash(self, hash_part: str) -> str | None:
        """The store path the cache's ``<hash_part>.narinfo`` describes, or None.
        Trust is not checked here: ``query``/``narinfo`` of the path does that."""
        rel = f"{hash_part}.narinfo"
        text = self._text(rel)
        if text is None:
            return None
        return Narinfo.parse(text, f"{self.url}/{rel}", self.store_dir).store_path

    def _check_trust(self, ni: Narinfo) -> None:
        if not self.require_signatures or ni.valid_signers(list(self.trusted_keys)):
            return
        signers = sorted({s.partition(":")[0] for s in ni.sigs})
        trusted = ", ".join(k.name for k in self.trusted_keys) or "none"
        signed = f"signed by {', '.join(signers)}" if signers else "unsigned"
        raise SignatureError(
            f"{ni.store_path} from binary cache {self.url} has no valid signature from a "
            f"trusted key ({signed}; trusted keys: {trusted})",
            hint=self._trust_hint(signers),
        )

    def _trust_hint(self, signers: list[str]) -> str:
        """What to do about a refused narinfo: which key the cache signs with and why the
        keys given (``keys_from`` says where they came from) are not it."""
        or_unsigned = "or --no-require-sigs to accept unsigned paths from this cache"
        if not signers:
            return (
                "the path carries no signature at all: sign the cache (nix store sign) "
                "and pass --trusted-public-key NAME:KEY, or pass --no-require-sigs to "
                "accept unsigned paths from this cache (trusting the transport)"
            )
        names = {k.name for k in self.trusted_keys}
        signer = ", ".join(signers)
        if not self.trusted_keys:
            return (
                f"no key is trusted: pass --trusted-public-key NAME:KEY with the public key "
                f"of {signer} (the cache's signer), {or_unsigned}"
            )
        given = ", ".join(str(k) for k in self.trusted_keys)
        same_name = sorted(names & set(signers))
        if same_name:
            return (
                f"the key given as {', '.join(same_name)} ({self.keys_from}: {given}) does "
                "not verify the signature: it is not the public key of the cache's signer "
                f"of that name, or the narinfo was altered; pass --trusted-public-key "
                f"NAME:KEY with the right public key, {or_unsigned}"
            )
        return (
            f"the cache's signer is {signer}, which none of the keys given matches "
            f"({self.keys_from}: {given}); pass --trusted-public-key NAME:KEY with the "
            f"public key of {signer}, {or_unsigned}"
        )

    def query(self, path: str) -> PathInfo | None:
        ni = self.narinfo(path)
        return ni.to_path_info() if ni else None

    # ------------------------------------------------------------------ contents

    def entries(self, path: str) -> Iterator[NarEntry]:
        """Stream the NAR of ``path``; hashes are verified when the stream ends."""
        ni = self.narinfo(path)
        if ni is None:
            raise PathNotFound(f"{path}: not in {self.name}")
        return self._stream(ni)

    def _stream(self, ni: Narinfo) -> Iterator[NarEntry]:
        url = f"{self.url}/{ni.url}"
        raw_f = self._open(ni.url)
        if raw_f is None:
            raise CacheError(f"{url}: NAR for {ni.store_path} is missing from the cache")
        ahead: _ReadAhead | None = None
        try:
            raw = _Hashing(raw_f, ni.file_size, f"{url} (compressed file)")
            nar_what = f"{url} (NAR of {ni.store_path})"
            nar = _Hashing(_decompressor(ni.compression, raw, url), ni.nar_size, nar_what)
            try:
                ahead = _ReadAhead(nar)
                yield from read_nar(ahead)
                ahead.close()  # it read the end of the NAR: the hashes are complete
                raw.drain()
            except NarError as e:
                detail = e.message.split(": ", 1)[-1]
                raise NarError(f"{detail} (NAR of {ni.store_path} from {url})", e.offset) from None
            except (
                OSError,
                EOFError,
                http.client.HTTPException,  # e.g. IncompleteRead: the body was cut short
                lzma.LZMAError,
                zstandard.ZstdError,
            ) as e:
                raise CacheError(f"{url}: download or decompression failed: {e}") from None
            raw.check(ni.file_hash, ni.file_size, raw.what)
            nar.check(ni.nar_hash, ni.nar_size, nar_what)
        finally:
            if ahead is not None:  # the thread reads raw_f: stop it first
                ahead.close()
            cast(BinaryIO, raw_f).close()
