"""The .drv ATerm parser: real derivations from nix-instantiate, escapes, multiple and
fixed outputs, structured attrs, malformed input with offsets."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from stowaway.buildkit.drv import DrvError, parse_drv

GRAPH = Path(__file__).resolve().parents[2] / "fixtures" / "buildkit" / "graph.nix"


def _instantiate(attr: str) -> str:
    out = subprocess.run(
        ["nix-instantiate", str(GRAPH), "-A", attr], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def _show(drv: str) -> dict[str, object]:
    """Nix's own reading of the .drv (JSON), to compare field by field."""
    out = subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "show-derivation", drv],
        check=True,
        capture_output=True,
        text=True,
    )
    doc: dict[str, dict[str, object]] = json.loads(out.stdout)
    return doc[drv]


@pytest.mark.parametrize("attr", ["alpha", "split", "pinned", "core"])
def test_real_derivations_match_nix(have_nix: None, attr: str) -> None:
    path = _instantiate(attr)
    drv = parse_drv(Path(path).read_bytes(), path)
    nix = _show(path)
    assert drv.builder == nix["builder"]
    assert list(drv.args) == nix["args"]
    assert dict(drv.env) == nix["env"]
    assert drv.system == nix["system"]
    srcs = nix["inputSrcs"]
    assert isinstance(srcs, list)
    assert sorted(drv.input_srcs) == sorted(srcs)
    inputs = nix["inputDrvs"]
    assert isinstance(inputs, dict)
    # Nix 2.8 lists an input's output names; newer Nix (2.26) an object with "outputs"
    # (and "dynamicOutputs")
    want = {d: sorted(o["outputs"] if isinstance(o, dict) else o) for d, o in inputs.items()}
    assert {d: sorted(o) for d, o in drv.input_drvs} == want
    outputs = nix["outputs"]
    assert isinstance(outputs, dict)
    assert {o.name: o.path for o in drv.outputs} == {n: v["path"] for n, v in outputs.items()}
    assert drv.name == dict(drv.env)["name"]


def test_escapes_and_multiple_outputs(have_nix: None) -> None:
    alpha = parse_drv(Path(_instantiate("alpha")).read_bytes())
    assert "printf 'tab\\there \"quoted\" back\\\\slash\\n'" in alpha.args[3]
    assert "\n" in alpha.args[3]
    split = parse_drv(Path(_instantiate("split")).read_bytes())
    assert [o.name for o in split.outputs] == ["doc", "out"]
    assert split.output("doc").path.endswith("-split-doc")
    with pytest.raises(DrvError, match="no output 'lib'"):
        split.output("lib")


def test_fixed_output(have_nix: None) -> None:
    pinned = parse_drv(Path(_instantiate("pinned")).read_bytes())
    assert pinned.fixed_output
    assert pinned.outputs[0].hash_algo == "sha256"
    assert len(pinned.outputs[0].hash) == 64
    assert not parse_drv(Path(_instantiate("beta")).read_bytes()).fixed_output


MINIMAL = (
    'Derive([("out","/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x","","")],[],[],'
    '"x86_64-linux","/bin/sh",["-c","echo \\"hi\\"\\r\\t"],'
    '[("name","x"),("out","/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x")])'
)


def test_minimal_text() -> None:
    drv = parse_drv(MINIMAL, "/nix/store/bbbb-x.drv")
    assert drv.args == ("-c", 'echo "hi"\r\t')
    assert drv.input_drvs == () and drv.input_srcs == ()
    assert drv.name == "x"


def test_structured_attrs_rejected_naming_the_drv() -> None:
    text = MINIMAL.replace('[("name","x")', '[("__json","{}"),("name","x")')
    with pytest.raises(DrvError, match=r"/nix/store/bbbb-x\.drv \(x\) uses structured attrs"):
        parse_drv(text, "/nix/store/bbbb-x.drv")


@pytest.mark.parametrize(
    ("text", "offset", "what"),
    [
        ("Derivx", 0, "expected 'Derive('"),
        (MINIMAL[:40], 16, "unterminated string"),
        (MINIMAL.replace('\\"hi', "\\qhi"), MINIMAL.index('\\"hi'), "unknown escape \\q"),
        (MINIMAL + "junk", len(MINIMAL), "trailing data"),
        (MINIMAL.replace('"","")]', '"")]', 1), 65, "expected ','"),
    ],
)
def test_malformed_input_names_offset(text: str, offset: int, what: str) -> None:
    with pytest.raises(DrvError) as e:
        parse_drv(text, "/nix/store/c-bad.drv")
    assert f"/nix/store/c-bad.drv at offset {offset}" in str(e.value)
    assert what in str(e.value)


def test_not_utf8() -> None:
    with pytest.raises(DrvError, match="offset 8: not UTF-8"):
        parse_drv(b"Derive([\xff", "/nix/store/c-bad.drv")
