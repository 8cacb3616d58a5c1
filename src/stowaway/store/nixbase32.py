"""Nix's base-32: its own alphabet (no e, o, u, t) and bit order.

Nix emits the most significant 5-bit group first while reading the digest as a
little-endian number, so this is not RFC 4648 and ``base64.b32encode`` cannot be used.
Treating the whole digest as one Python int keeps it to a few big-int operations
instead of a per-bit loop.
"""

from __future__ import annotations

from stowaway.errors import StowawayError

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_DIGIT = {c: i for i, c in enumerate(ALPHABET)}

__all__ = ["ALPHABET", "Base32Error", "decode", "encode", "encoded_length"]


class Base32Error(StowawayError):
    """A string that is not valid Nix base-32."""


def encoded_length(n_bytes: int) -> int:
    """Characters needed for ``n_bytes`` bytes (20 → 32, 32 → 52)."""
    return (n_bytes * 8 + 4) // 5


def encode(data: bytes) -> str:
    """Encode ``data`` the way ``nix-hash --to-base32`` does."""
    value = int.from_bytes(data, "little")
    n = encoded_length(len(data))
    return "".join(ALPHABET[(value >> (5 * i)) & 31] for i in range(n - 1, -1, -1))


def decode(text: str) -> bytes:
    """Decode Nix base-32; raises Base32Error naming the bad character and position."""
    value = 0
    for pos, ch in enumerate(text):
        digit = _DIGIT.get(ch)
        if digit is None:
            raise Base32Error(
                f"invalid character {ch!r} at position {pos} in Nix base-32 string {text!r}"
            )
        value = (value << 5) | digit
    n_bytes = len(text) * 5 // 8
    if value >> (8 * n_bytes):
        raise Base32Error(f"Nix base-32 string {text!r} has non-zero bits beyond {n_bytes} bytes")
    return value.to_bytes(n_bytes, "little")
