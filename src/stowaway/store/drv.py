"""Parser for Nix ``.drv`` files (the ATerm ``Derive(...)`` form Nix writes to the store).

Why our own parser: the format is tiny and fixed (Nix writes it, never a human), and the
BuildKit frontend must run on a bare Debian python3 with no other packages; the composer
reads a root's ``system`` from it (``image.platform``). Strings are scanned
with ``str.find`` rather than char by char, so large env values cost little.

    Derive([outputs],[inputDrvs],[inputSrcs],system,builder,[args],[env])
    outputs   = ("name","path","hashAlgo","hash")        hash fields empty unless fixed
    inputDrvs = ("/nix/store/...drv",["out",...])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from stowaway.errors import StowawayError

__all__ = ["Derivation", "DrvError", "DrvOutput", "parse_drv"]

T = TypeVar("T")
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


class DrvError(StowawayError):
    """A .drv file that is not a derivation we can build; names the file and offset."""


@dataclass(frozen=True)
class DrvOutput:
    """One output: its name, store path and, for fixed-output derivations, the hash."""

    name: str
    path: str
    hash_algo: str = ""
    hash: str = ""


@dataclass(frozen=True)
class Derivation:
    """A parsed derivation; ``env`` keeps the file's (sorted) order."""

    path: str
    outputs: tuple[DrvOutput, ...]
    input_drvs: tuple[tuple[str, tuple[str, ...]], ...]
    input_srcs: tuple[str, ...]
    system: str
    builder: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        """The derivation's name (``env.name``, else the .drv basename without hash)."""
        for key, value in self.env:
            if key == "name":
                return value
        base = self.path.rsplit("/", 1)[-1]
        return base.split("-", 1)[-1].removesuffix(".drv")

    @property
    def structured_attrs(self) -> bool:
        """Whether the derivation passes its attributes as JSON (``__structuredAttrs``)."""
        return any(key == "__json" for key, _ in self.env)

    @property
    def fixed_output(self) -> bool:
        return any(o.hash for o in self.outputs)

    def output(self, name: str) -> DrvOutput:
        for o in self.outputs:
            if o.name == name:
                return o
        raise DrvError(f"derivation {self.path} has no output {name!r}")


class _Parser:
    def __init__(self, text: str, where: str) -> None:
        self.s = text
        self.i = 0
        self.where = where

    def fail(self, what: str) -> DrvError:
        return DrvError(f"malformed derivation {self.where} at offset {self.i}: {what}")

    def lit(self, token: str) -> None:
        if not self.s.startswith(token, self.i):
            got = self.s[self.i : self.i + 10] or "end of file"
            raise self.fail(f"expected {token!r}, found {got!r}")
        self.i += len(token)

    def peek(self, token: str) -> bool:
        return self.s.startswith(token, self.i)

    def string(self) -> str:
        self.lit('"')
        parts: list[str] = []
        s = self.s
        while True:
            q = s.find('"', self.i)
            b = s.find("\\", self.i, q if q >= 0 else len(s))
            if q < 0:
                raise self.fail("unterminated string")
            if b < 0:
                parts.append(s[self.i : q])
                self.i = q + 1
                return "".join(parts)
            parts.append(s[self.i : b])
            esc = s[b + 1 : b + 2]
            if esc not in _ESCAPES:
                self.i = b
                raise self.fail(f"unknown escape \\{esc}")
            parts.append(_ESCAPES[esc])
            self.i = b + 2

    def list_of(self, item: Callable[[], T]) -> list[T]:
        self.lit("[")
        out: list[T] = []
        if self.peek("]"):
            self.i += 1
            return out
        while True:
            out.append(item())
            if self.peek(","):
                self.i += 1
                continue
            self.lit("]")
            return out

    def output(self) -> DrvOutput:
        self.lit("(")
        name = self.string()
        fields = []
        for _ in range(3):
            self.lit(",")
            fields.append(self.string())
        self.lit(")")
        return DrvOutput(name, *fields)

    def input_drv(self) -> tuple[str, tuple[str, ...]]:
        self.lit("(")
        path = self.string()
        self.lit(",")
        outs = tuple(self.list_of(self.string))
        self.lit(")")
        return path, outs

    def pair(self) -> tuple[str, str]:
        self.lit("(")
        key = self.string()
        self.lit(",")
        value = self.string()
        self.lit(")")
        return key, value


def parse_drv(text: str | bytes, path: str = "<drv>") -> Derivation:
    """Parse ``.drv`` text; ``path`` is the derivation's store path (used in messages)."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError as e:
            raise DrvError(f"malformed derivation {path} at offset {e.start}: not UTF-8") from None
    p = _Parser(text, path)
    p.lit("Derive(")
    outputs = p.list_of(p.output)
    p.lit(",")
    input_drvs = p.list_of(p.input_drv)
    p.lit(",")
    input_srcs = p.list_of(p.string)
    p.lit(",")
    system = p.string()
    p.lit(",")
    builder = p.string()
    p.lit(",")
    args = p.list_of(p.string)
    p.lit(",")
    env = p.list_of(p.pair)
    p.lit(")")
    if text[p.i :].strip():
        raise p.fail("trailing data after Derive(...)")
    if not outputs:
        raise DrvError(f"derivation {path} has no outputs")
    return Derivation(
        path=path,
        outputs=tuple(outputs),
        input_drvs=tuple(input_drvs),
        input_srcs=tuple(input_srcs),
        system=system,
        builder=builder,
        args=tuple(args),
        env=tuple(env),
    )
