from __future__ import annotations

import http.server
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from storetest_helpers import events

from stowaway.errors import NarError, NarinfoError, PathNotFound, SignatureError
from stowaway.store.binary_cache import BinaryCache, CacheError, HashMismatch
from stowaway.store.local import LocalStore
from stowaway.store.narinfo import PublicKey

COMPRESSIONS = ["xz", "zstd", "bzip2", "none"]


def cache(url: str, *keys: str, require: bool = True) -> BinaryCache:
    return BinaryCache(url, [PublicKey.parse(k) for k in keys], require_signatures=require)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_signed_cache_matches_local_store(
    compression: str,
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
    demo_closure: list[str],
    local_store: LocalStore,
) -> None:
    c = cache(signed_caches[compression], cache_keys["good"])
    local = local_store
    for path in demo_closure:
        info, want = c.query(path), local.query(path)
        assert info is not None and want is not None
        assert (info.nar_hash, info.nar_size, info.references) == (
            want.nar_hash,
            want.nar_size,
            want.references,
        )
        assert events(c.entries(path)) == events(local.entries(path))


def test_http_cache(
    http_cache: str, cache_keys: dict[str, str], demo_closure: list[str], local_store: LocalStore
) -> None:
    c = cache(http_cache, cache_keys["good"])
    local = local_store
    for path in demo_closure:
        assert events(c.entries(path)) == events(local.entries(path))
    assert c.query("/nix/store/00000000000000000000000000000000-missing") is None


def test_http_unreachable_names_url() -> None:
    c = cache("http://127.0.0.1:9", require=False)
    with pytest.raises(CacheError, match=re.escape("http://127.0.0.1:9/nix-cache-info")):
        c.query("/nix/store/00000000000000000000000000000000-x")
    # not tried again (a timeout is waited for once): the first failure is repeated
    with pytest.raises(CacheError, match=re.escape("http://127.0.0.1:9/nix-cache-info")):
        c.query("/nix/store/11111111111111111111111111111111-y")


def assert_refused(exc: pytest.ExceptionInfo[SignatureError], path: str, url: str) -> str:
    """The refusal names the path and cache, and its hint both ways out; returns the hint."""
    text = str(exc.value)
    assert path in text and url in text
    hint = exc.value.hint or ""
    assert "--trusted-public-key NAME:KEY" in hint and "--no-require-sigs" in hint
    return hint


def test_unsigned_refused_unless_allowed(
    unsigned_cache: str, cache_keys: dict[str, str], demo_app: str
) -> None:
    with pytest.raises(SignatureError, match="unsigned") as exc:
        cache(unsigned_cache, cache_keys["good"]).query(demo_app)
    assert "no signature at all" in assert_refused(exc, demo_app, unsigned_cache)
    assert cache(unsigned_cache, require=False).query(demo_app) is not None


def test_untrusted_key_refused(
    signed_caches: dict[str, str], cache_keys: dict[str, str], demo_app: str
) -> None:
    with pytest.raises(SignatureError, match="signed by good-key-1") as exc:
        cache(signed_caches["xz"], cache_keys["other"]).query(demo_app)
    hint = assert_refused(exc, demo_app, signed_caches["xz"])
    # not "pass a key": the key given is not the signer's, and both are named
    assert "the cache's signer is good-key-1, which none of the keys given matches" in hint
    assert f"--trusted-public-key: {cache_keys['other']}" in hint
    with pytest.raises(SignatureError) as exc:
        cache(signed_caches["xz"]).query(demo_app)
    assert "no key is trusted" in assert_refused(exc, demo_app, signed_caches["xz"])


def test_key_with_the_signers_name_but_other_bytes_refused(
    signed_caches: dict[str, str], cache_keys: dict[str, str], demo_app: str
) -> None:
    impostor = "good-key-1:" + cache_keys["other"].partition(":")[2]
    with pytest.raises(SignatureError) as exc:
        cache(signed_caches["xz"], impostor).query(demo_app)
    hint = assert_refused(exc, demo_app, signed_caches["xz"])
    assert f"the key given as good-key-1 (--trusted-public-key: {impostor})" in hint
    assert "does not verify the signature" in hint


def copy_cache(url: str, dest: Path) -> Path:
    shutil.copytree(url.removeprefix("file://"), dest)
    return dest


def test_bad_signature_refused(
    tmp_path: Path, signed_caches: dict[str, str], cache_keys: dict[str, str], demo_app: str
) -> None:
    root = copy_cache(signed_caches["xz"], tmp_path / "c")
    ni = root / (Path(demo_app).name[:32] + ".narinfo")
    # a tampered reference list keeps the signature but breaks it
    text = ni.read_text()
    ni.write_text(re.sub(r"References: \S+ ", "References: ", text))
    with pytest.raises(SignatureError) as exc:
        cache(f"file://{root}", cache_keys["good"]).query(demo_app)
    assert_refused(exc, demo_app, f"file://{root}")


def test_corrupt_nar_detected_at_end(
    tmp_path: Path,
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
    demo_closure: list[str],
) -> None:
    root = copy_cache(signed_caches["none"], tmp_path / "c")
    busybox = next(p for p in demo_closure if p.endswith("-busybox"))
    ni = (root / (Path(busybox).name[:32] + ".narinfo")).read_text()
    nar = root / re.search(r"URL: (\S+)", ni).group(1)  # type: ignore[union-attr]
    data = bytearray(nar.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside busybox's contents: still a well-formed NAR
    nar.chmod(0o644)
    nar.write_bytes(bytes(data))
    c = cache(f"file://{root}", cache_keys["good"])
    with pytest.raises(HashMismatch, match=re.escape(str(nar.name))):
        events(c.entries(busybox))
    (root / (Path(busybox).name[:32] + ".narinfo")).write_text(
        re.sub(r"FileHash: .*\n", "", ni)  # without FileHash the NarHash still catches it
    )
    c = cache(f"file://{root}", require=False)
    with pytest.raises(HashMismatch, match="NAR of " + re.escape(busybox)):
        events(c.entries(busybox))


def test_truncated_compressed_nar(
    tmp_path: Path, signed_caches: dict[str, str], cache_keys: dict[str, str], demo_app: str
) -> None:
    root = copy_cache(signed_caches["zstd"], tmp_path / "c")
    ni = (root / (Path(demo_app).name[:32] + ".narinfo")).read_text()
    nar = root / re.search(r"URL: (\S+)", ni).group(1)  # type: ignore[union-attr]
    nar.chmod(0o644)
    nar.write_bytes(nar.read_bytes()[:-20])
    with pytest.raises((CacheError, NarError, HashMismatch), match=re.escape(str(root))):
        events(cache(f"file://{root}", cache_keys["good"]).entries(demo_app))


def test_store_dir_mismatch_and_missing(
    tmp_path: Path, signed_caches: dict[str, str], demo_app: str
) -> None:
    root = copy_cache(signed_caches["xz"], tmp_path / "c")
    (root / "nix-cache-info").write_text("StoreDir: /gnu/store\n")
    with pytest.raises(CacheError, match="serves store /gnu/store"):
        cache(f"file://{root}", require=False).query(demo_app)
    with pytest.raises(CacheError, match="not found; is .* a Nix binary cache"):
        cache(f"file://{tmp_path}", require=False).query(demo_app)


def test_absent_path_and_unknown_compression(
    tmp_path: Path, signed_caches: dict[str, str], demo_app: str
) -> None:
    root = copy_cache(signed_caches["xz"], tmp_path / "c")
    c = cache(f"file://{root}", require=False)
    assert c.query("/nix/store/00000000000000000000000000000000-missing") is None
    with pytest.raises(PathNotFound, match="00000000000000000000000000000000-missing"):
        c.entries("/nix/store/00000000000000000000000000000000-missing")
    ni = root / (Path(demo_app).name[:32] + ".narinfo")
    ni.write_text(ni.read_text().replace("Compression: xz", "Compression: lz4"))
    with pytest.raises(CacheError, match="unsupported compression 'lz4'"):
        events(cache(f"file://{root}", require=False).entries(demo_app))


@pytest.fixture()
def cutting_server(
    tmp_path: Path, signed_caches: dict[str, str]
) -> Iterator[tuple[str, Path, set[str]]]:
    """A copy of the xz cache over HTTP on a loopback port; files whose name is in the
    returned set are sent chunked and cut off in their one chunk's middle."""
    root = copy_cache(signed_caches["xz"], tmp_path / "c")
    cut: set[str] = set()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = root / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            self.send_response(200)
            if path.name in cut:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"%x\r\n" % len(data) + data[: len(data) // 2])
                return
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, cut
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_http_body_cut_short_is_a_cache_error(
    cutting_server: tuple[str, Path, set[str]], cache_keys: dict[str, str], demo_app: str
) -> None:
    """A body cut short (http.client's IncompleteRead, not an OSError) is reported as
    a CacheError naming the URL."""
    url, root, cut = cutting_server
    narinfo = Path(demo_app).name[:32] + ".narinfo"
    cut.add(narinfo)
    with pytest.raises(CacheError, match=re.escape(f"{url}/{narinfo}: read failed")):
        cache(url, cache_keys["good"]).query(demo_app)
    cut.clear()
    nar = re.search(r"URL: (\S+)", (root / narinfo).read_text()).group(1)  # type: ignore[union-attr]
    cut.add(Path(nar).name)
    with pytest.raises(CacheError, match=re.escape(f"{url}/{nar}: download")):
        events(cache(url, cache_keys["good"]).entries(demo_app))


@pytest.mark.parametrize(
    "url",
    [
        "../../../../etc/passwd",
        "nar/../../secret.nar",
        "nar/%2e%2e/%2e%2e/secret.nar",
        "/etc/passwd",
        "file:///etc/passwd",
        "http://127.0.0.1:1/nar/x.nar",
        "//127.0.0.1/nar/x.nar",
        "nar/x.nar?y=1",
        "nar//x.nar",
    ],
)
def test_narinfo_url_must_stay_inside_the_cache(
    tmp_path: Path,
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
    demo_app: str,
    url: str,
) -> None:
    """The URL is not signed: a signed narinfo whose URL leaves the cache is refused before
    anything is read from that URL."""
    root = copy_cache(signed_caches["xz"], tmp_path / "c")
    ni = root / (Path(demo_app).name[:32] + ".narinfo")
    ni.write_text(re.sub(r"URL: .*\n", f"URL: {url}\n", ni.read_text()))
    c = cache(f"file://{root}", cache_keys["good"])
    with pytest.raises(NarinfoError, match=r"leaves the cache") as e:
        c.query(demo_app)
    assert f"{ni.name}:" in str(e.value) and repr(url) in str(e.value)


def _nar_of_one_file(size: int) -> bytes:
    """A well-formed NAR holding one regular file of ``size`` zero bytes."""

    def s(b: bytes) -> bytes:
        return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)

    head = b"".join(s(t) for t in (b"nix-archive-1", b"(", b"type", b"regular", b"contents"))
    return head + size.to_bytes(8, "little") + b"\0" * size + b"\0" * (-size % 8) + s(b")")


def test_decompression_stops_at_the_narinfo_sizes(
    tmp_path: Path, signed_caches: dict[str, str], demo_app: str
) -> None:
    """A tiny compressed NAR that expands far beyond NarSize (a decompression bomb) fails
    as soon as NarSize is exceeded, not after decompressing everything; the same for
    FileSize on the compressed side."""
    root = copy_cache(signed_caches["zstd"], tmp_path / "c")
    ni_file = root / (Path(demo_app).name[:32] + ".narinfo")
    ni = ni_file.read_text()
    nar = root / re.search(r"URL: (\S+)", ni).group(1)  # type: ignore[union-attr]
    nar.chmod(0o644)
    big = 256 << 20
    nar.write_bytes(zstandard.ZstdCompressor(level=1).compress(_nar_of_one_file(big)))
    assert nar.stat().st_size < 1 << 20  # a quarter GiB from well under a MiB
    # the compressed side first: the narinfo's FileSize is the real file's, far smaller
    size = re.search(r"FileSize: (\d+)", ni).group(1)  # type: ignore[union-attr]
    with pytest.raises(HashMismatch, match=rf"compressed file\): more than the {size} bytes"):
        events(cache(f"file://{root}", require=False).entries(demo_app))
    # without FileSize/FileHash (optional in narinfos), NarSize bounds the expansion
    ni_file.write_text(re.sub(r"File(Size|Hash): .*\n", "", ni))
    with pytest.raises(HashMismatch, match=r"NAR of .*: more than the \d+ bytes its narinfo says"):
        events(cache(f"file://{root}", require=False).entries(demo_app))
