from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import pytest

from stowaway.errors import NarinfoError, StowawayError
from stowaway.store import nixbase32
from stowaway.store.narinfo import Narinfo, NixCacheInfo, PublicKey, SecretKey, normalise_hash

H = "a8pjhp4s02686g9aga4f1nls8lhm4aj0"
TEXT = f"""StorePath: /nix/store/{H}-app
URL: nar/x.nar.xz
Compression: xz
FileHash: sha256:14ya85lak3fqkdici50dlmkfrx745ddl57s1wzb9bx59zxchnasw
FileSize: 320
NarHash: sha256:09c0b2zdahjy0lw8332vnmrx2pgh4vh0125b8rhbmihpy3c3jjyh
NarSize: 704
References: 55y7j4qz5f8ym71x3ca289zjw7k1bada-busybox {H}-app
Deriver: 1hzms197gmzn38azyzsnswrmyvljyla1-app.drv
"""


def test_parse_and_round_trip() -> None:
    ni = Narinfo.parse(TEXT, "t.narinfo")
    assert ni.compression == "xz" and ni.nar_size == 704 and ni.file_size == 320
    assert ni.to_text() == TEXT
    info = ni.to_path_info()
    assert info.references == (
        "/nix/store/55y7j4qz5f8ym71x3ca289zjw7k1bada-busybox",
        f"/nix/store/{H}-app",
    )
    assert info.deriver == "/nix/store/1hzms197gmzn38azyzsnswrmyvljyla1-app.drv"


def test_fingerprint() -> None:
    ni = Narinfo.parse(TEXT, "t")
    assert ni.fingerprint() == (
        f"1;/nix/store/{H}-app;sha256:09c0b2zdahjy0lw8332vnmrx2pgh4vh0125b8rhbmihpy3c3jjyh;704;"
        f"/nix/store/55y7j4qz5f8ym71x3ca289zjw7k1bada-busybox,/nix/store/{H}-app"
    )


def test_compression_defaults_to_bzip2() -> None:
    assert Narinfo.parse(TEXT.replace("Compression: xz\n", ""), "t").compression == "bzip2"


@pytest.mark.parametrize("key", ["StorePath", "URL", "NarHash", "NarSize"])
def test_missing_required_key(key: str) -> None:
    text = "\n".join(ln for ln in TEXT.splitlines() if not ln.startswith(key + ":"))
    with pytest.raises(NarinfoError, match=f"https://c/x.narinfo: required key '{key}'"):
        Narinfo.parse(text, "https://c/x.narinfo")


def test_errors_name_line() -> None:
    with pytest.raises(NarinfoError, match=r"t:7: NarSize 'big' is not"):
        Narinfo.parse(TEXT.replace("NarSize: 704", "NarSize: big"), "t")
    with pytest.raises(NarinfoError, match=r"t:3: expected 'Key: value'"):
        Narinfo.parse(TEXT.replace("Compression: xz", "garbage"), "t")
    with pytest.raises(NarinfoError, match=r"t:6: NarHash"):
        Narinfo.parse(TEXT.replace("NarHash: sha256:0", "NarHash: sha256:e"), "t")
    with pytest.raises(NarinfoError, match=r"t: store path .*not-a-path"):
        Narinfo.parse(TEXT.replace("busybox", "x not-a-path"), "t")
    with pytest.raises(NarinfoError, match=r"t:3: duplicate key 'URL'"):
        Narinfo.parse(TEXT.replace("Compression: xz", "URL: y"), "t")


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662\u0663"])  # ², Arabic-Indic 123
def test_counts_are_ascii_digits(value: str) -> None:
    for key, line in (("NarSize", 7), ("FileSize", 5)):
        text = re.sub(rf"{key}: \d+", f"{key}: {value}", TEXT)
        with pytest.raises(NarinfoError, match=rf"t:{line}: {key} '{value}' is not"):
            Narinfo.parse(text, "t")
    with pytest.raises(NarinfoError, match="u:1: Priority"):
        NixCacheInfo.parse(f"Priority: {value}\n", "u")


def test_hash_forms_normalise_to_nix32() -> None:
    raw = hashlib.sha256(b"x").digest()
    want = "sha256:" + nixbase32.encode(raw)

    for form in [
        want,
        "sha256:" + raw.hex(),
        "sha256:" + base64.b64encode(raw).decode(),
        "sha256-" + base64.b64encode(raw).decode(),
    ]:
        assert normalise_hash(form) == want
    with pytest.raises(ValueError, match="unknown hash algorithm"):
        normalise_hash("blake9:abc")
    ni = Narinfo.parse(
        TEXT.replace(
            "sha256:09c0b2zdahjy0lw8332vnmrx2pgh4vh0125b8rhbmihpy3c3jjyh",
            "sha256:"
            + nixbase32.decode("09c0b2zdahjy0lw8332vnmrx2pgh4vh0125b8rhbmihpy3c3jjyh").hex(),
        ),
        "t",
    )
    assert ni.nar_hash == "sha256:09c0b2zdahjy0lw8332vnmrx2pgh4vh0125b8rhbmihpy3c3jjyh"


def test_keys_from_nix_sign_and_verify(cache_keys: dict[str, str]) -> None:
    sk = SecretKey.parse(Path(cache_keys["good.sk"]).read_text())
    pk = PublicKey.parse(cache_keys["good"])
    assert sk.public_key() == pk and str(pk) == cache_keys["good"]
    ni = Narinfo.parse(TEXT, "t")
    sig = sk.sign(ni.fingerprint())
    assert pk.verify(ni.fingerprint(), sig)
    assert not pk.verify(ni.fingerprint() + "x", sig)
    assert not PublicKey.parse(cache_keys["other"]).verify(ni.fingerprint(), sig)
    ni.sigs = [sig]
    assert ni.valid_signers([pk]) == ["good-key-1"]
    ni.nar_size += 1  # a tampered narinfo no longer matches its signature
    assert ni.valid_signers([pk]) == []


def test_bad_keys() -> None:
    with pytest.raises(StowawayError, match="expected 'NAME:BASE64'"):
        PublicKey.parse("nocolon")
    with pytest.raises(StowawayError, match="expected 32 bytes"):
        PublicKey.parse("k:YWJj")
    with pytest.raises(StowawayError, match="not valid base64"):
        SecretKey.parse("k:!!!")


def test_nix_cache_info() -> None:
    info = NixCacheInfo.parse("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n", "u")
    assert info == NixCacheInfo("/nix/store", True, 40)
    with pytest.raises(NarinfoError, match="u:1: Priority"):
        NixCacheInfo.parse("Priority: high\n", "u")
