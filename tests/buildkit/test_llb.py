"""LLB marshalling (stable digests, Definition layout, FileOp chaining) and the
derivation graph → ExecOp mapping on the real fixture graph."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from pathlib import Path

import pytest

from stowaway.buildkit import llb
from stowaway.buildkit.context import make_context
from stowaway.buildkit.drv import parse_drv
from stowaway.buildkit.llb_graph import GraphError, build_env, build_llb_graph, image_platform
from stowaway.buildkit.pb import ops
from stowaway.buildkit.spec import Spec
from stowaway.image.config import ImageOptions
from stowaway.layering import UNKNOWN_SIZE
from stowaway.layering.auto import SOLO_MIN, TINY

GRAPH = Path(__file__).resolve().parents[2] / "fixtures" / "buildkit" / "graph.nix"


def _ctx() -> llb.Output:
    return llb.local_source("context", session_id="s1", include=["sources"])


def test_exec_op_digest_is_stable_and_env_order_free() -> None:
    mounts = [llb.Mount("/"), llb.Mount("/nix/store", output=True)]
    a = llb.exec_op(["/bin/sh", "-c", "true"], {"B": "1", "A": "2"}, mounts, cwd="/build")
    b = llb.exec_op(["/bin/sh", "-c", "true"], {"A": "2", "B": "1"}, mounts, cwd="/build")
    assert a.digest == b.digest == "sha256:" + hashlib.sha256(a.data).hexdigest()
    # Pinned: a change here means every user's BuildKit cache is invalidated.
    assert a.digest == "sha256:1c988267cbd019f090934f8b35b6ec35540a2c0f6caed8c577f8a99cdb418413"
    c = llb.exec_op(["/bin/sh", "-c", "false"], {"A": "2", "B": "1"}, mounts, cwd="/build")
    assert c.digest != a.digest


def test_exec_op_fields() -> None:
    src = _ctx()
    v = llb.exec_op(
        ["/x/sh"],
        {"K": "V"},
        [
            llb.Mount("/"),
            llb.Mount("/nix/store", output=True),
            llb.Mount("/nix/store/a", src, selector="/sources/a", readonly=True),
            llb.Mount("/nix/store/b", src, selector="/sources/b", readonly=True),
        ],
        cwd="/build",
        platform=("linux", "amd64"),
        description="nix-build x",
    )
    op = ops.Op.FromString(v.data)
    assert [i.digest for i in op.inputs] == [src.vertex.digest]  # one input, shared
    assert op.exec.network == ops.NONE
    assert op.exec.meta.cwd == "/build" and list(op.exec.meta.env) == ["K=V"]
    m = op.exec.mounts
    assert (m[0].input, m[0].output) == (-1, -1)
    assert (m[1].dest, m[1].input, m[1].output, m[1].readonly) == ("/nix/store", -1, 0, False)
    assert (m[2].input, m[2].selector, m[2].output, m[2].readonly) == (0, "/sources/a", -1, True)
    assert m[3].input == 0
    assert (op.platform.OS, op.platform.Architecture) == ("linux", "amd64")


def test_tmpfs_mount_has_no_input_and_asks_for_its_cap() -> None:
    v = llb.exec_op(["/x/sh"], {}, [llb.Mount("/", output=True), llb.Mount("/b", tmpfs=True)])
    root, tmp = ops.Op.FromString(v.data).exec.mounts
    assert (root.mountType, root.input, root.output) == (ops.BIND, -1, 0)
    assert (tmp.mountType, tmp.input, tmp.output) == (ops.TMPFS, -1, -1)
    assert "exec.mount.tmpfs" in v.caps
    assert "exec.mount.tmpfs" not in llb.exec_op(["/x/sh"], {}, [llb.Mount("/")]).caps
    with pytest.raises(ValueError, match="tmpfs mount /b cannot have a source"):
        llb.exec_op(["/x/sh"], {}, [llb.Mount("/b", _ctx(), tmpfs=True)])


def test_file_op_chains_actions_and_keeps_modes() -> None:
    src = _ctx()
    out = llb.file_op(
        None,
        [
            llb.MkDir("/nix/store", 0o755),
            llb.Copy(src, "/sources/a", "/nix/store/a"),
            llb.MkFile("/etc/passwd", 0o644, b"root:x:0:0::/:/bin/sh\n"),
        ],
    )
    op = ops.Op.FromString(out.vertex.data)
    acts = op.file.actions
    assert [a.input for a in acts] == [-1, 1, 2]  # scratch, then previous action results
    assert [a.secondaryInput for a in acts] == [-1, 0, -1]
    assert [a.output for a in acts] == [-1, -1, 0]
    assert acts[1].copy.mode == -1 and acts[1].copy.timestamp == 1
    assert acts[1].copy.dirCopyContents and acts[1].copy.createDestPath
    with pytest.raises(ValueError):
        llb.file_op(None, [])


def test_marshal_orders_inputs_first_and_ends_with_bare_result() -> None:
    src = _ctx()
    e = llb.exec_op(["/sh"], {}, [llb.Mount("/", src), llb.Mount("/o", output=True)])
    top = llb.file_op(None, [llb.Copy(llb.Output(e, 0), "/", "/r")], description="layer")
    d = llb.marshal(top)
    blobs = list(getattr(d, "def"))
    digests = ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs]
    assert digests[:3] == [src.vertex.digest, e.digest, top.vertex.digest]
    tail = ops.Op.FromString(blobs[-1])
    assert [(i.digest, i.index) for i in tail.inputs] == [(top.vertex.digest, 0)]
    assert d.metadata[top.vertex.digest].description["llb.customname"] == "layer"
    assert d.metadata[top.vertex.digest].caps["file.base"]
    assert llb.marshal(top).SerializeToString(deterministic=True) == d.SerializeToString(
        deterministic=True
    )


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ctx")
    opts = ImageOptions(entrypoint=["/bin/app"])
    return {
        salt: make_context(
            str(GRAPH), ["app"], base / (salt or "plain"), opts, argstrs={"salt": salt}
        ).path
        for salt in ("", "x")
    }


def _graph(ctx: Path) -> tuple[Spec, dict[str, llb.Vertex], llb.Output]:
    spec = Spec.from_json((ctx / "stowaway.json").read_bytes())
    drvs = {p: parse_drv((ctx / rel).read_bytes(), p) for p, rel in spec.drv_files.items()}
    g = build_llb_graph(spec, drvs, _ctx())
    named = {drvs[p].name: v for p, v in g.builders.items()}
    return spec, named, g.result


def test_one_exec_op_per_derivation(have_nix: None, contexts: dict[str, Path]) -> None:
    spec, named, _ = _graph(contexts[""])
    assert len(named) == len(spec.drv_files) == 12
    op = ops.Op.FromString(named["core"].data)
    env = dict(e.split("=", 1) for e in op.exec.meta.env)
    for key, value in {
        "HOME": "/homeless-shelter",
        "NIX_BUILD_TOP": "/build",
        "TMPDIR": "/build",
        "NIX_STORE": "/nix/store",
        "NIX_LOG_FD": "2",
        "TERM": "xterm-256color",
    }.items():
        assert env[key] == value
    assert env["out"].endswith("-core") and env["PATH"].endswith("-tools/bin")
    dests = [m.dest for m in op.exec.mounts]
    assert dests[:2] == ["/", "/build"]
    # the root is the op's only output: one snapshot of its own per derivation (not the
    # shared cached one a writable root without output would be)
    root, build = op.exec.mounts[:2]
    assert (root.input, root.readonly, root.output, root.mountType) == (-1, False, 0, ops.BIND)
    assert (build.mountType, build.input, build.output) == (ops.TMPFS, -1, -1)
    assert [m.output for m in op.exec.mounts[1:]] == [-1] * (len(op.exec.mounts) - 1)
    inputs = [m for m in op.exec.mounts[2:]]
    for m in inputs:
        base = m.dest.rsplit("/", 1)[1]
        assert m.readonly and m.mountType == ops.BIND
        # sources from the context, outputs from their op's root at their store path
        assert m.selector == ("/sources/" + base if base.endswith("-busybox-static") else m.dest)
    assert {m.dest.split("-", 1)[1] for m in inputs} == {
        "busybox-static", "tools", "lib-ab", "lib-bc", "split", "settings", "pinned"
    }  # fmt: skip
    assert op.exec.network == ops.NONE


def test_leaf_change_changes_only_it_and_dependents(
    have_nix: None, contexts: dict[str, Path]
) -> None:
    _, before, _ = _graph(contexts[""])
    _, after, _ = _graph(contexts["x"])
    changed = {n for n in before if before[n].digest != after[n].digest}
    assert changed == {"alpha", "lib-ab", "core", "docs", "app"}


def _ops(result: llb.Output) -> dict[str, ops.Op]:
    """Every op of the marshalled Definition (the bare result op left out), by digest."""
    d = llb.marshal(result)
    return {
        "sha256:" + hashlib.sha256(b).hexdigest(): ops.Op.FromString(b)
        for b in getattr(d, "def")[:-1]
    }


def test_graph_shape_one_op_per_derivation_and_per_layer(
    have_nix: None, contexts: dict[str, Path]
) -> None:
    """What BuildKit is asked to run for graph.nix: one ExecOp per derivation (each with
    a single snapshot, its root, empty at the start; /build a tmpfs), one FileOp per
    image layer plus the customisation layer, and the context source."""
    spec = Spec.from_json((contexts[""] / "stowaway.json").read_bytes())
    drvs = {p: parse_drv((contexts[""] / r).read_bytes(), p) for p, r in spec.drv_files.items()}
    g = build_llb_graph(spec, drvs, _ctx())
    kinds: dict[str, int] = {}
    for op in _ops(g.result).values():
        kind = op.WhichOneof("op")
        assert kind is not None
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "exec":
            snapshots = [m for m in op.exec.mounts if m.mountType == ops.BIND and not m.readonly]
            assert [m.dest for m in snapshots] == ["/"]
    assert kinds == {"exec": 12, "file": len(g.layers) + 1, "source": 1}


def test_leaf_change_changes_only_the_ops_that_depend_on_it(
    have_nix: None, contexts: dict[str, Path]
) -> None:
    """Across the whole Definition: the ExecOps of alpha and its dependents change, the
    layers from the first one holding a changed path on (each layer is a FileOp on the
    one before), nothing else: the other 7 ExecOps, the customisation layer and the
    context source are byte-identical, so BuildKit finds them cached."""
    graphs = {}
    for salt in ("", "x"):
        spec = Spec.from_json((contexts[salt] / "stowaway.json").read_bytes())
        # both planned the same way (the plain context may know references: built locally)
        spec = dataclasses.replace(spec, references=None, nar_sizes={})
        drvs = {
            p: parse_drv((contexts[salt] / r).read_bytes(), p) for p, r in spec.drv_files.items()
        }
        graphs[salt] = build_llb_graph(spec, drvs, _ctx())

    def described(g: llb.Output) -> dict[str, str]:
        d = llb.marshal(g)
        return {k: v.description.get("llb.customname", "") for k, v in d.metadata.items()}

    before, after = described(graphs[""].result), described(graphs["x"].result)
    assert len(before) == len(after)
    changed = sorted(name for digest, name in after.items() if digest not in before)
    rebuilt = {n.split()[1] for n in changed if n.startswith("nix-build ")}
    assert rebuilt == {"alpha", "lib-ab", "core", "docs", "app"}
    layers = graphs[""].layers
    first = min(
        i
        for i, layer in enumerate(layers)
        if any(p.split("-", 1)[1] in rebuilt | {"alpha"} for p in layer)
    )
    relayered = [n for n in changed if n.startswith("stowaway layer ")]
    assert len(relayered) == len(layers) - first
    # the customisation layer is the bottom one: unchanged
    assert set(changed) == set(relayered) | {n for n in changed if n.startswith("nix-build ")}
    assert "stowaway customisation layer" in before.values()


def test_pinned_output_gets_nix_checked_flag(have_nix: None, contexts: dict[str, Path]) -> None:
    spec = Spec.from_json((contexts[""] / "stowaway.json").read_bytes())
    drvs = [parse_drv((contexts[""] / rel).read_bytes(), p) for p, rel in spec.drv_files.items()]
    pinned = next(d for d in drvs if d.name == "pinned")
    assert build_env(pinned)["NIX_OUTPUT_CHECKED"] == "1"
    assert "NIX_OUTPUT_CHECKED" not in build_env(next(d for d in drvs if d.name == "beta"))


def test_missing_derivation_is_a_clear_error(have_nix: None, contexts: dict[str, Path]) -> None:
    spec = Spec.from_json((contexts[""] / "stowaway.json").read_bytes())
    drvs = {
        p: parse_drv((contexts[""] / rel).read_bytes(), p)
        for p, rel in spec.drv_files.items()
        if not p.endswith("-beta.drv")
    }
    with pytest.raises(GraphError, match=r"-beta\.drv is not in the build context"):
        build_llb_graph(spec, drvs, _ctx())


def test_missing_target_derivation_is_a_clear_error(
    have_nix: None, contexts: dict[str, Path]
) -> None:
    """The frontend asks for the image's platform before build_llb_graph runs: a target
    whose .drv is missing must be a GraphError there too, not a KeyError."""
    spec = Spec.from_json((contexts[""] / "stowaway.json").read_bytes())
    drvs = {
        p: parse_drv((contexts[""] / rel).read_bytes(), p)
        for p, rel in spec.drv_files.items()
        if p != spec.targets[0].drv
    }
    with pytest.raises(GraphError, match=r"target derivation .*-app\.drv is not in the build"):
        image_platform(spec, drvs)


def test_unknown_sizes_plan_by_closure_structure(have_nix: None, contexts: dict[str, Path]) -> None:
    """Without NAR sizes (no local build, `.nix` builds) the closure is still split into
    layers by its structure, and a leaf change leaves the layers it does not touch alone
    (with size 0 every group was "tiny" and the planner merged all into a layer or two)."""
    assert UNKNOWN_SIZE < SOLO_MIN and 2 * UNKNOWN_SIZE >= TINY
    layers = {}
    for salt in ("", "x"):
        spec = Spec.from_json((contexts[salt] / "stowaway.json").read_bytes())
        spec = dataclasses.replace(spec, references=None, nar_sizes={})
        drvs = {
            p: parse_drv((contexts[salt] / r).read_bytes(), p) for p, r in spec.drv_files.items()
        }
        layers[salt] = build_llb_graph(spec, drvs, _ctx()).layers
    paths = [p for layer in layers[""] for p in layer]
    assert len(paths) == 14 and len(layers[""]) >= 5, layers[""]
    changed = {"alpha", "lib-ab", "core", "docs", "app"}
    untouched = [ls for ls in layers[""] if not {p.split("-", 1)[1] for p in ls} & changed]
    assert untouched and set(untouched) <= set(layers["x"])


def test_tmp_is_copied_with_its_mode(have_nix: None, contexts: dict[str, Path]) -> None:
    """BuildKit v0.8's mkdir drops the sticky bit and applies its umask (an image's /tmp
    came out 0755): /tmp is copied, as a directory, from modes/1777 in the context."""
    mode = os.stat(contexts[""] / "modes" / "1777").st_mode
    assert stat.S_ISDIR(mode) and stat.S_IMODE(mode) == 0o1777
    spec = Spec.from_json((contexts[""] / "stowaway.json").read_bytes())
    drvs = {p: parse_drv((contexts[""] / r).read_bytes(), p) for p, r in spec.drv_files.items()}
    ctx = _ctx()
    g = build_llb_graph(spec, drvs, ctx)
    (op,) = [
        o
        for o in _ops(g.result).values()
        if o.WhichOneof("op") == "file" and o.file.actions[0].input == -1 and len(o.inputs) == 1
    ]  # the customisation layer, the bottom one: on scratch, reading only the context
    made = {a.mkdir.path: a.mkdir.mode for a in op.file.actions if a.HasField("mkdir")}
    assert made == {"/etc": 0o755}
    (tmp,) = [a for a in op.file.actions if a.HasField("copy")]
    assert (tmp.copy.src, tmp.copy.dest, tmp.copy.dirCopyContents) == ("/modes/1777", "/tmp", False)
    assert tmp.copy.mode == -1  # keep the template's mode
    assert op.inputs[tmp.secondaryInput].digest == ctx.vertex.digest


def test_substituted_derivations_get_no_exec_op(have_nix: None, contexts: dict[str, Path]) -> None:
    """Store paths held by a cache image replace their derivations' ExecOps; only what
    changed (alpha and its dependents) and build-only inputs that the image lacks run."""
    spec = Spec.from_json((contexts["x"] / "stowaway.json").read_bytes())
    drvs = {p: parse_drv((contexts["x"] / r).read_bytes(), p) for p, r in spec.drv_files.items()}
    old = Spec.from_json((contexts[""] / "stowaway.json").read_bytes())
    image = llb.image_source("127.0.0.1:5000/app:cache@sha256:" + "0" * 64)
    held = {p for o in old.outputs.values() for p in o.values()}  # every old output
    g = build_llb_graph(spec, drvs, _ctx(), {p: image for p in held})
    built = {drvs[p].name for p in g.builders}
    assert built == {"alpha", "lib-ab", "core", "docs", "app"}
    # gamma is not even visited: only lib-bc needed it, and lib-bc is substituted
    assert {drvs[p].name for p in g.substituted} == {
        "tools", "beta", "lib-bc", "split", "settings", "pinned"
    }  # fmt: skip
    core = ops.Op.FromString(next(v for p, v in g.builders.items() if drvs[p].name == "core").data)
    lib_bc = next(m for m in core.exec.mounts if m.dest.endswith("-lib-bc"))
    assert lib_bc.selector == lib_bc.dest  # from the image, at its store path
    lib_ab = next(m for m in core.exec.mounts if m.dest.endswith("-lib-ab"))
    assert lib_ab.selector == lib_ab.dest  # from its op's root, at its store path too
    assert core.inputs[lib_bc.input].digest == image.vertex.digest


@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ("app", "docker.io/library/app:latest"),
        ("app:1", "docker.io/library/app:1"),
        ("user/app:1", "docker.io/user/app:1"),
        ("localhost/app", "localhost/app:latest"),
        ("reg:5000/a/b@sha256:" + "0" * 64, "reg:5000/a/b@sha256:" + "0" * 64),
        ("reg.io/app:2", "reg.io/app:2"),
    ],
)
def test_image_refs_are_normalised_as_docker_reads_them(ref: str, want: str) -> None:
    assert llb.normalize_ref(ref) == want
    assert f"docker-image://{want}".encode() in llb.image_source(ref).vertex.data
