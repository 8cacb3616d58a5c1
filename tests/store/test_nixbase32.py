from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from stowaway.store import nixbase32
from stowaway.store.nixbase32 import Base32Error


def nix_to_base32(hex_digest: str, algo: str = "sha256") -> str:
    out = subprocess.run(
        ["nix-hash", "--type", algo, "--to-base32", hex_digest],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


# Pinned from `nix-hash --type sha256 --to-base32` (nix 2.8).
KNOWN = {
    hashlib.sha256(b"hello").digest(): "094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic",
}


def test_known_vector() -> None:
    for raw, text in KNOWN.items():
        assert nixbase32.encode(raw) == text
        assert nixbase32.decode(text) == raw


@pytest.mark.parametrize("algo,size", [("sha256", 32), ("sha1", 20), ("sha512", 64), ("md5", 16)])
def test_matches_real_nix(have_nix: None, algo: str, size: int) -> None:
    raws = [bytes(size), b"\xff" * size, os.urandom(size), bytes(range(size))]
    for raw in raws:
        assert nixbase32.encode(raw) == nix_to_base32(raw.hex(), algo)


def test_lengths_and_round_trip() -> None:
    assert len(nixbase32.encode(bytes(20))) == 32
    assert len(nixbase32.encode(bytes(32))) == 52
    for n in range(0, 70):
        raw = os.urandom(n)
        assert nixbase32.decode(nixbase32.encode(raw)) == raw


def test_not_rfc4648_order() -> None:
    # the lowest 5 bits of the first byte are emitted last
    assert nixbase32.encode(b"\x01") == "01"
    assert nixbase32.encode(b"\x1f") == "0z"


def test_invalid_character_names_position() -> None:
    with pytest.raises(Base32Error, match=r"'e' at position 3"):
        nixbase32.decode("000e")


def test_excess_bits_rejected() -> None:
    with pytest.raises(Base32Error, match="non-zero bits"):
        nixbase32.decode("z0")  # 2 chars = 1 byte; 'z' sets bits beyond it
