"""Nix derivations → LLB: one ExecOp per derivation, then the image as layered copies.

Each derivation runs like a sandboxed ``nix-build`` would run it: builder + args, the
derivation's env plus Nix's standard build env, ``/build`` (a tmpfs) as working
directory, no network, and every input (derivation output or source) bind-mounted
read-only at its store path. The op's root filesystem starts empty, is writable and is
its single output, so all of a derivation's outputs (directories or single files) come
out of one op and a dependent selects ``/nix/store/<basename>`` from it. That is one
snapshot per derivation: a scratch ``/build`` or ``/nix/store`` mount, or a private copy
of a root FileOp, would each be one more on every derivation's critical path
(docs/buildkit.md has the measurements).
Because BuildKit keys input mounts by the *content* of the selected path, a dependency
rebuilt to the same bytes leaves its dependents cached.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stowaway.buildkit.drv import Derivation
from stowaway.buildkit.llb import Copy, MkDir, MkFile, Mount, Output, Vertex, exec_op, file_op
from stowaway.buildkit.spec import Member, Spec
from stowaway.errors import StowawayError
from stowaway.image.platform import NIX_SYSTEMS
from stowaway.layering import UNKNOWN_SIZE, plan
from stowaway.store.model import STORE_DIR, PathInfo

__all__ = [
    "STORE_PATHS_LABEL",
    "SYSTEMS",
    "BuildGraph",
    "GraphError",
    "build_env",
    "build_llb_graph",
    "image_platform",
    "mode_template",
    "mode_templates",
    "platform_of",
]

BUILD_TOP = "/build"
#: Image config label listing the store path basenames an image holds, so that a later
#: build can substitute them from it (``docker build --cache-from IMAGE``).
STORE_PATHS_LABEL = "stowaway.store-paths"
#: Nix system → (OS, architecture) of the OCI platform the ExecOp asks for.
SYSTEMS = {
    system: (NIX_SYSTEMS[system].os, NIX_SYSTEMS[system].architecture)
    for system in ("x86_64-linux", "aarch64-linux", "i686-linux", "armv7l-linux")
}
#: Where the context holds an empty directory of each mode MkDir cannot make.
MODES_DIR = "modes"


class GraphError(StowawayError):
    """A derivation graph the frontend cannot turn into BuildKit ops."""


@dataclass(frozen=True)
class BuildGraph:
    """The image (``result``) and, per derivation path, the ExecOp that builds it."""

    result: Output
    builders: Mapping[str, Vertex]
    layers: tuple[tuple[str, ...], ...]
    substituted: frozenset[str] = frozenset()


def platform_of(drv: Derivation) -> tuple[str, str]:
    plat = SYSTEMS.get(drv.system)
    if plat is None:
        raise GraphError(
            f"derivation {drv.path} ({drv.name}) is for system {drv.system!r}, which cannot "
            f"run in a BuildKit container (supported: {', '.join(sorted(SYSTEMS))})",
            hint="builtin builders such as builtin:fetchurl have to be realised by nix first",
        )
    return plat


def image_platform(spec: Spec, drvs: Mapping[str, Derivation]) -> tuple[str, str]:
    """The image's (OS, architecture): the first target's derivation's platform."""
    drv = drvs.get(spec.targets[0].drv)
    if drv is None:
        raise GraphError(
            f"target derivation {spec.targets[0].drv} is not in the build context",
            hint="regenerate it with `stowaway buildkit context`",
        )
    return platform_of(drv)


def mode_template(kind: str, mode: int) -> str | None:
    """The context path of an empty directory with ``mode`` that a customisation
    directory is copied from, or None when MkDir makes it as is.

    BuildKit v0.8 creates FileOp directories with ``mode & 0o777`` under its umask
    (0022 in dockerd): ``/tmp`` would come out 0755 instead of 1777. A directory copied
    (not its contents) keeps its mode, so the context (or the eval op's output) holds
    ``modes/<octal>`` directories made with the right mode to copy from."""
    if kind != "directory" or not mode & ~0o755:
        return None
    return f"{MODES_DIR}/{mode:o}"


def mode_templates(members: Sequence[Member]) -> list[str]:
    """The ``modes/<octal>`` directories the customisation layer copies from."""
    return sorted({t for m in members if (t := mode_template(m.kind, m.mode)) is not None})


def build_env(drv: Derivation, cores: int = 1) -> dict[str, str]:
    """The environment Nix gives a sandboxed builder (Nix 2.8 ``initEnv``): defaults,
    then the derivation's own env, then the build-directory variables."""
    env = {
        "PATH": "/path-not-set",
        "HOME": "/homeless-shelter",
        "NIX_STORE": STORE_DIR,
        "NIX_BUILD_CORES": str(cores),
    }
    pass_as_file = dict(drv.env).get("passAsFile", "").split()
    if pass_as_file:
        raise GraphError(
            f"derivation {drv.path} ({drv.name}) uses passAsFile ({', '.join(pass_as_file)}), "
            "which the stowaway BuildKit frontend does not support yet"
        )
    env.update(drv.env)
    for key in ("NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"):
        env[key] = BUILD_TOP
    if drv.fixed_output:
        env["NIX_OUTPUT_CHECKED"] = "1"
    env["NIX_LOG_FD"] = "2"
    env["TERM"] = "xterm-256color"
    return env


def _base(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _build_order(
    drvs: Mapping[str, Derivation], roots: Sequence[str], leaves: frozenset[str] = frozenset()
) -> list[str]:
    """Derivations reachable from ``roots``, dependencies first (iterative, cycle-checked);
    the inputs of ``leaves`` (substituted derivations) are not needed, so not visited."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for root in roots:
        stack: list[tuple[str, bool]] = [(root, False)]
        while stack:
            path, leaving = stack.pop()
            if leaving:
                state[path] = 2
                order.append(path)
                continue
            if state.get(path) == 2:
                continue
            if state.get(path) == 1:
                raise GraphError(f"derivation {path} depends on itself")
            drv = drvs.get(path)
            if drv is None:
                raise GraphError(
                    f"derivation {path} is not in the build context",
                    hint="regenerate it with `stowaway buildkit context`",
                )
            state[path] = 1
            stack.append((path, True))
            for dep, _ in () if path in leaves else reversed(drv.input_drvs):
                if state.get(dep) != 2:
                    if state.get(dep) == 1:
                        raise GraphError(f"derivation {path} and {dep} depend on each other")
                    stack.append((dep, False))
    return order


def build_llb_graph(
    spec: Spec,
    drvs: Mapping[str, Derivation],
    context: Output,
    substitutes: Mapping[str, Output] | None = None,
) -> BuildGraph:
    """LLB for the whole build. ``context`` is the build context holding input sources
    at ``spec.source_dirs[path]``. ``substitutes`` maps store paths to an image that
    holds them at their store path (an earlier build's image): a derivation whose
    outputs are all there is taken from it, like Nix substituting from a binary cache,
    instead of being built; ``builders`` and ``substituted`` tell which was which."""
    subs = substitutes or {}
    providers: dict[str, tuple[Output, str]] = {
        src: (context, "/" + rel.strip("/")) for src, rel in spec.source_dirs.items()
    }
    providers.update((p, (image, p)) for p, image in subs.items())
    builders: dict[str, Vertex] = {}
    substitutable = frozenset(
        p for p, d in drvs.items() if d.outputs and all(o.path in subs for o in d.outputs)
    )
    order = _build_order(drvs, [t.drv for t in spec.targets], substitutable)
    substituted: set[str] = set()
    for path in order:
        drv = drvs[path]
        if path in substitutable:
            substituted.add(path)
            continue
        vertex = _derivation_op(drv, drvs, providers)
        builders[path] = vertex
        for out in drv.outputs:
            providers[out.path] = (Output(vertex, 0), out.path)
    for t in spec.targets:
        if drvs[t.drv].output(t.output).path != t.path:
            raise GraphError(
                f"target {t.drv}!{t.output}: the .drv says {drvs[t.drv].output(t.output).path}, "
                f"stowaway.json says {t.path}"
            )
    closure = _closure(spec, drvs, subs)
    roots = [t.path for t in spec.targets]
    layer_plan = plan(closure, roots, strategy=spec.layering, max_layers=spec.max_layers)
    plat = image_platform(spec, drvs)
    # The customisation layer goes first: it never depends on what was built, so it
    # stays cached (and its layer blob the same) however the store layers change; last,
    # every rebuild ran it again on top of the new store layers.
    image: Output | None = None
    if spec.customisation:
        custom: list[Copy | MkDir | MkFile] = []
        for m in spec.customisation:
            template = mode_template(m.kind, m.mode)
            if template is not None:
                custom.append(Copy(context, "/" + template, "/" + m.name, contents=False))
            elif m.kind == "directory":
                custom.append(MkDir("/" + m.name, m.mode))
            else:
                custom.append(MkFile("/" + m.name, m.mode, m.data))
        image = file_op(image, custom, platform=plat, description="stowaway customisation layer")
    layers: list[tuple[str, ...]] = []
    for i, layer in enumerate(layer_plan.layers):
        actions: list[Copy | MkDir | MkFile] = []
        if not layers:
            actions.append(MkDir(STORE_DIR, 0o755))
        for p in layer.paths:
            if p not in providers:
                raise GraphError(
                    f"store path {p} is in the image but nothing in the context makes it"
                )
            source, selector = providers[p]
            actions.append(Copy(source, selector, p))
        names = " ".join(_base(p).split("-", 1)[-1] for p in layer.paths)
        desc = f"stowaway layer {i + 1}/{len(layer_plan.layers)}: {names}"
        image = file_op(image, actions, platform=plat, description=desc[:200])
        layers.append(layer.paths)
    assert image is not None  # a plan always has a layer: the targets are in it
    return BuildGraph(image, builders, tuple(layers), frozenset(substituted))


def _derivation_op(
    drv: Derivation,
    drvs: Mapping[str, Derivation],
    providers: Mapping[str, tuple[Output, str]],
) -> Vertex:
    inputs: list[str] = list(drv.input_srcs)
    for dep, outs in drv.input_drvs:
        inputs += [drvs[dep].output(o).path for o in outs]
    mounts = [
        # The root is the op's output: an empty writable snapshot of its own, where the
        # builder writes /nix/store/<out> and runc makes its mount points (which
        # dependents never select). Empty, not on a FileOp holding the mount points: a
        # snapshot without parent is mounted as a plain directory, not an overlay.
        # Never a writable root without output: that is the one cached snapshot, shared
        # by every op running at once, and BuildKit v0.8 in dockerd 20.10 failed such
        # ops now and then with "no such file or directory" on /etc/hosts.
        Mount("/", None, output=True),
        Mount(BUILD_TOP, tmpfs=True),
    ]
    for path in sorted(set(inputs)):
        if path not in providers:
            raise GraphError(
                f"derivation {drv.path} ({drv.name}) needs {path}, which the build context "
                "does not provide"
            )
        source, selector = providers[path]
        mounts.append(Mount(path, source, selector=selector, readonly=True))
    return exec_op(
        [drv.builder, *drv.args],
        build_env(drv),
        mounts,
        cwd=BUILD_TOP,
        platform=platform_of(drv),
        description=f"nix-build {drv.name} {drv.path}",
    )


def _closure(
    spec: Spec, drvs: Mapping[str, Derivation], subs: Mapping[str, Output]
) -> dict[str, PathInfo]:
    """The targets' runtime closure as PathInfos for the layer planner.

    With references recorded at context time (outputs built locally) this is exact.
    Otherwise outputs' references are unknown until built, so each output is assumed to
    reference every input of its derivation: the build-time closure, a superset. A
    substituted output came from an image holding its whole runtime closure, so its
    references are among the inputs that image holds.
    """
    refs: dict[str, tuple[str, ...]] = {}
    if spec.references is not None:
        refs = dict(spec.references)
    else:
        for drv in drvs.values():
            deps: set[str] = set(drv.input_srcs)
            for dep, outs in drv.input_drvs:
                deps.update(drvs[dep].output(o).path for o in outs)
            for out in drv.outputs:
                held = deps if out.path not in subs else {d for d in deps if d in subs}
                refs[out.path] = tuple(sorted(held))
    closure: dict[str, PathInfo] = {}
    todo = [t.path for t in spec.targets]
    while todo:
        p = todo.pop()
        if p in closure:
            continue
        r = refs.get(p, ())
        closure[p] = PathInfo(p, "", spec.nar_sizes.get(p, UNKNOWN_SIZE), tuple(sorted(r)))
        todo.extend(x for x in r if x not in closure)
    return closure
