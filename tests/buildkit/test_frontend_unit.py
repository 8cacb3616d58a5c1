"""Frontend pieces that need no daemon: options, the spec file, the import graph."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from stowaway.buildkit.frontend import CacheImport, FrontendError, cache_imports, frontend_options
from stowaway.buildkit.spec import SPEC_VERSION, Member, Spec, SpecError, Target

ROOT = Path(__file__).resolve().parents[2]


def test_frontend_options_from_env() -> None:
    env = {
        "BUILDKIT_FRONTEND_OPT_0": "filename=stowaway.json",
        "BUILDKIT_FRONTEND_OPT_1": "build-arg:X=a=b",
        "PATH": "/usr/bin",
    }
    assert frontend_options(env) == {"filename": "stowaway.json", "build-arg:X": "a=b"}


def _spec() -> Spec:
    return Spec(
        targets=(Target("/nix/store/a-x.drv", "out", "/nix/store/b-x"),),
        drv_files={"/nix/store/a-x.drv": "drvs/a-x.drv"},
        source_dirs={},
        outputs={"/nix/store/a-x.drv": {"out": "/nix/store/b-x"}},
        references={"/nix/store/b-x": ()},
        nar_sizes={"/nix/store/b-x": 10},
        customisation=(Member("etc/passwd", "regular", 0o644, b"root:x:0:0::/:/bin/sh\n"),),
        config=b'{"architecture":"amd64"}',
    )


def test_spec_round_trip_is_byte_stable() -> None:
    data = _spec().to_json()
    again = Spec.from_json(data)
    assert again == _spec()
    assert again.to_json() == data


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.replace(b'"version": %d' % SPEC_VERSION, b'"version": 9'), "spec version 9"),
        (lambda s: s.replace(b'"targets"', b'"targetz"'), "missing field 'targets'"),
        (lambda s: s.replace(b'"maxLayers": 100', b'"maxLayers": "x"'), "'maxLayers' must be"),
        (lambda s: s[:20], "is not JSON"),
    ],
)
def test_spec_errors_name_the_field(mutate: object, message: str) -> None:
    data = mutate(_spec().to_json())  # type: ignore[operator]
    with pytest.raises(SpecError, match=message):
        Spec.from_json(data, where="ctx/stowaway.json")


def _set_member(key: str, value: object) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        doc["customisation"][0][key] = value

    return mutate


def _drop_target_drv(doc: dict[str, Any]) -> None:
    doc["derivations"] = {}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set_member("data", "abc"), r"customisation\[0\]\.data is not base64"),
        (_set_member("data", "@@@"), r"customisation\[0\]\.data is not base64"),
        (_set_member("kind", "symlink"), r"customisation\[0\]\.kind is 'symlink', expected one"),
        (_set_member("mode", 0o10000), r"customisation\[0\]\.mode 4096 is not a file mode"),
        (_set_member("mode", -1), r"customisation\[0\]\.mode -1 is not a file mode"),
        (_drop_target_drv, r"target /nix/store/a-x\.drv!out names a derivation that is not in"),
    ],
)
def test_spec_values_are_checked(mutate: Any, message: str) -> None:
    """Every bad value is a SpecError naming the field: nothing reaches the frontend as a
    binascii.Error/KeyError or is read as something else ("@@@" as b"", a symlink as a
    regular file)."""
    doc = json.loads(_spec().to_json())
    mutate(doc)
    with pytest.raises(SpecError, match=message):
        Spec.from_json(json.dumps(doc).encode(), where="ctx/stowaway.json")


@pytest.mark.parametrize("size", ["12k", None, 1.9, -1, True, "10"])
def test_nar_sizes_must_be_non_negative_integers(size: object) -> None:
    doc = json.loads(_spec().to_json())
    doc["narSizes"]["/nix/store/b-x"] = size
    with pytest.raises(SpecError, match=r"narSizes\./nix/store/b-x must be a non-negative int"):
        Spec.from_json(json.dumps(doc).encode())


def test_spec_keeps_special_modes_and_empty_data() -> None:
    spec = _spec()
    doc = json.loads(spec.to_json())
    doc["customisation"].append({"name": "tmp", "kind": "directory", "mode": 0o1777, "data": ""})
    got = Spec.from_json(json.dumps(doc).encode()).customisation
    assert got == (*spec.customisation, Member("tmp", "directory", 0o1777))


def test_frontend_imports_nothing_beyond_grpc_protobuf_stdlib() -> None:
    """What the frontend image has: Debian's python3 + grpcio + protobuf, the modules
    scripts/frontend-image.sh lists."""
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        BLOCKED = {"click", "rich", "zstandard", "aiohttp", "cryptography", "yarl"}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("frontend must not import " + name)
        sys.meta_path.insert(0, Block())
        import stowaway.buildkit.frontend
        mods = sorted(m for m in sys.modules if m.startswith("stowaway."))
        print(" ".join(mods))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "stowaway.buildkit.frontend" in r.stdout
    script = (ROOT / "scripts" / "frontend-image.sh").read_text()
    files = script.split("FILES=(", 1)[1].split(")", 1)[0].split()
    shipped = {
        str(p.relative_to(ROOT / "src").with_suffix("")).replace("/", ".").removesuffix(".__init__")
        for pattern in files
        for p in ROOT.glob(pattern)
    }
    assert set(r.stdout.split()) <= shipped, set(r.stdout.split()) - shipped
    assert "stowaway.store.nar" not in r.stdout and "stowaway.image.compose" not in r.stdout


def test_cache_imports_from_both_options() -> None:
    opts = {
        "cache-imports": '[{"Type": "local", "Attrs": {"src": "/c"}},'
        ' {"Type": "registry", "Attrs": {"ref": "r:5000/a:c"}}]',
        "cache-from": "r:5000/a:c, r:5000/b:c",
    }
    assert cache_imports(opts) == [
        CacheImport("local", {"src": "/c"}),
        CacheImport("registry", {"ref": "r:5000/a:c"}),
        CacheImport("registry", {"ref": "r:5000/b:c"}),
    ]
    assert cache_imports({}) == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [("[", "not JSON"), ('{"Type": "x"}', "must be a JSON list"), ('[{"Attrs": {}}]', "entry 0")],
)
def test_bad_cache_imports_are_clear_errors(raw: str, message: str) -> None:
    with pytest.raises(FrontendError, match=message):
        cache_imports({"cache-imports": raw})
