"""The `.nix` build path without a daemon: build args → EvalRequest, and the Spec the
frontend assembles from nix-instantiate's output equals the one a client context holds."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from stowaway.buildkit import llb
from stowaway.buildkit.context import make_context
from stowaway.buildkit.drv import parse_drv
from stowaway.buildkit.evaluate import (
    EvalError,
    eval_op,
    eval_request,
    parse_instantiated,
    spec_from_eval,
    store_paths,
)
from stowaway.buildkit.pb import ops
from stowaway.errors import StowawayError
from stowaway.image.config import ImageOptions

ROOT = Path(__file__).resolve().parents[2]
GRAPH = ROOT / "fixtures" / "buildkit" / "graph.nix"


def test_request_from_build_args() -> None:
    req = eval_request(
        {
            "filename": "app.nix",
            "build-arg:nix-image": "stowaway-nix:1",
            "build-arg:attr": "app  docs",
            "build-arg:argstr:salt": "x y",
            "build-arg:entrypoint": '["@out@/bin/app", "-v"]',
            "build-arg:env": "A=1 'B=two words'",
            "build-arg:label:org.x": "1",
            "build-arg:expose": "80 53/udp",
            "build-arg:created": "1970-01-01T00:00:10Z",
            "build-arg:max-layers": "7",
        }
    )
    assert req is not None
    assert req.argv() == ["/src/app.nix", "-A", "app", "-A", "docs", "--argstr", "salt", "x y"]
    assert req.options.entrypoint == ["@out@/bin/app", "-v"]
    assert req.options.env == ["A=1", "B=two words"]
    assert req.options.labels == {"org.x": "1"} and req.options.expose == ["80", "53/udp"]
    assert req.options.created == 10 and req.max_layers == 7
    assert eval_request({"filename": "stowaway.json"}) is None
    sub = eval_request(
        {"filename": "a.nix", "build-arg:nix-image": "n", "build-arg:nix-file": "x/y.nix"}
    )
    assert sub is not None and sub.nix_file == "x/y.nix"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "--build-arg nix-image=REF"),
        ({"build-arg:nix-file": "../up.nix"}, "inside the build context"),
        ({"build-arg:nix-file": "/abs.nix"}, "inside the build context"),
        ({"build-arg:max-layers": "many"}, "max-layers='many' is not a number"),
        ({"build-arg:layering": "random"}, "layering='random'"),
        ({"build-arg:cmd": "[1]"}, "build arg cmd"),
        ({"build-arg:created": "yesterday"}, "build arg created 'yesterday'"),
        ({"build-arg:env": "NOEQUALS"}, "KEY=VALUE"),
    ],
)
def test_bad_build_args_are_clear_errors(args: dict[str, str], message: str) -> None:
    opts = {"filename": "app.nix", "build-arg:nix-image": "n", **args}
    if not args:
        del opts["build-arg:nix-image"]
    with pytest.raises(StowawayError, match=message.replace("[", r"\[")):
        eval_request(opts)


def test_eval_output_is_checked() -> None:
    with pytest.raises(EvalError, match="line 2: 'oops' is not a store path"):
        store_paths(b"/nix/store/" + b"a" * 32 + b"-x\noops\n", "closure")
    with pytest.raises(EvalError, match="no derivation"):
        parse_instantiated(b"\n", "instantiated")
    d = "/nix/store/" + "b" * 32 + "-x.drv"
    assert parse_instantiated(f"{d}!doc\n{d}\n".encode(), "i") == [(d, "doc"), (d, None)]


def test_eval_op_runs_nix_instantiate_on_the_image() -> None:
    req = eval_request({"filename": "g.nix", "build-arg:nix-image": "nix:1", "build-arg:attr": "a"})
    assert req is not None
    ctx = llb.local_source("context", session_id="s")
    out = eval_op(req, ctx)
    again = eval_op(req, ctx)
    assert out.vertex.digest == again.vertex.digest  # same request, same op: cacheable
    image = out.vertex.deps[0]
    assert b"docker-image://docker.io/library/nix:1" in image.data
    assert b"/src/g.nix" in out.vertex.data and b"nix-instantiate" in out.vertex.data
    op = ops.Op.FromString(out.vertex.data)
    root = op.exec.mounts[0]
    assert (root.dest, root.readonly) == ("/", True)  # a private snapshot per op (graph.py)
    # the directory the image's /tmp is copied from (graph.mode_template), as a context
    # made by `stowaway buildkit context` holds it
    assert "mkdir -m 1777 /out/modes/1777\n" in op.exec.meta.args[2]


def test_spec_from_eval_equals_the_client_context(tmp_path: Path, have_nix: None) -> None:
    """What the eval op would write (nix-instantiate + nix-store -qR here, with the same
    nix) gives the same spec as `stowaway buildkit context`."""
    inst = subprocess.run(
        ["nix-instantiate", str(GRAPH), "-A", "app"], check=True, capture_output=True
    ).stdout
    closure = subprocess.run(
        ["nix-store", "-qR", inst.decode().strip()], check=True, capture_output=True
    ).stdout
    drvs = {
        p: parse_drv(Path(p).read_bytes(), p)
        for p in closure.decode().split()
        if p.endswith(".drv")
    }
    req = eval_request(
        {
            "filename": "graph.nix",
            "build-arg:nix-image": "n",
            "build-arg:entrypoint": "@out@/bin/app",
            "build-arg:env": "GREETING=hi",
        }
    )
    assert req is not None
    spec = spec_from_eval(req, inst, closure, drvs)
    app = spec.targets[0].path
    opts = ImageOptions(entrypoint=[app + "/bin/app"], env=["GREETING=hi"])
    want = make_context(str(GRAPH), ["app"], tmp_path / "ctx", opts).spec
    assert spec.targets == want.targets
    assert spec.drv_files == want.drv_files and spec.source_dirs == want.source_dirs
    assert spec.outputs == want.outputs and spec.customisation == want.customisation
    assert spec.config == want.config
    assert spec.references is None


FOREIGN = """
derivation {
  name = "foreign";
  system = "aarch64-linux";
  builder = "/bin/sh";
  args = [ "-c" "echo hi > $out" ];
}
"""


def test_image_platform_is_the_derivations(tmp_path: Path, have_nix: None) -> None:
    """The image config names the platform the derivations build for, not the client's
    machine, in a client context as in a `.nix` build."""
    nix = tmp_path / "foreign.nix"
    nix.write_text(FOREIGN)
    spec = make_context(str(nix), [], tmp_path / "ctx", ImageOptions()).spec
    config = json.loads(spec.config)
    assert (config["os"], config["architecture"]) == ("linux", "arm64")
    drv = spec.targets[0].drv
    req = eval_request({"filename": "foreign.nix", "build-arg:nix-image": "n"})
    assert req is not None
    evaluated = spec_from_eval(
        req, f"{drv}\n".encode(), f"{drv}\n".encode(), {drv: parse_drv(Path(drv).read_bytes(), drv)}
    )
    assert evaluated.config == spec.config
