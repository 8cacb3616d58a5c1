"""No nix on the client: the frontend evaluates the ``.nix`` file in a BuildKit ExecOp.

``docker build -f app.nix --build-arg nix-image=REF …`` gives the frontend the name of a
Nix file in the build context. One ExecOp on the Nix image (the image as a read-only root,
a scratch mount at ``/nix`` as a private store that dies with the op) runs ``nix-instantiate``
with the context mounted read-only at ``/src`` and writes to its output mount what
`stowaway buildkit context` writes on a client: ``drvs/<base>`` (the .drv closure),
``sources/<base>`` (input sources, copied with ``cp -a``: Nix keeps them canonical
already, mtime 1 and 0444/0555), plus ``instantiated`` (nix-instantiate's output lines)
and ``closure`` (``nix-store -qR``). The frontend reads those back and assembles the same
:class:`~stowaway.buildkit.spec.Spec` in memory, so the rest is unchanged: one ExecOp per
derivation, input sources selected from the eval op's output instead of the context.

Building the spec here rather than writing ``stowaway.json`` inside the op keeps the Nix
image free of Python and stowaway: any image with ``nix-instantiate`` and ``nix-store``
works. Stdlib plus ``stowaway.image.config`` only (runs in the frontend image).
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from stowaway.buildkit import llb
from stowaway.buildkit.drv import Derivation
from stowaway.buildkit.llb_graph import mode_templates, platform_of
from stowaway.buildkit.spec import MEMBER_KINDS, Member, Spec, Target
from stowaway.errors import StowawayError
from stowaway.image.config import (
    Customisation,
    ImageOptions,
    build_config,
    parse_created,
    parse_words,
    plan_customisation,
)
from stowaway.store.model import NarEntry, PathInfo

__all__ = [
    "OUT_PLACEHOLDER",
    "EvalError",
    "EvalRequest",
    "NoStore",
    "eval_op",
    "eval_request",
    "parse_instantiated",
    "spec_from_eval",
    "store_paths",
    "targets_of",
]

#: Replaced by the first target's store path in entrypoint, cmd, env and workdir (the
#: client cannot know the path before evaluation). Nix's substituteAll spelling.
OUT_PLACEHOLDER = "@out@"
SRC_DIR = "/src"
OUT_DIR = "/out"
_ARG = "build-arg:"
#: a store path: /nix/store/<32 nix-base32 chars>-<name>
_STORE_PATH = re.compile(r"^/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-._?=]+$")

# Runs in the Nix image with ``sh -ec SCRIPT stowaway-eval ARGS…`` (ARGS: nix-instantiate's).
_SCRIPT = f"""\
cd {SRC_DIR}
nix-instantiate "$@" > {OUT_DIR}/instantiated
nix-store -qR $(sed 's/!.*//' {OUT_DIR}/instantiated) > {OUT_DIR}/closure
mkdir {OUT_DIR}/drvs {OUT_DIR}/sources
while read -r p; do
  case "$p" in
    *.drv) cp "$p" {OUT_DIR}/drvs/ ;;
    *) cp -a "$p" {OUT_DIR}/sources/ ;;
  esac
done < {OUT_DIR}/closure
"""


class EvalError(StowawayError):
    """Bad build args for a ``.nix`` build, or eval output that is not what we wrote."""


@dataclass(frozen=True)
class EvalRequest:
    """What to evaluate (file in the context, attrs, ``--argstr``s), on which image, and
    the image options and layering of the result."""

    nix_file: str
    nix_image: str
    attrs: tuple[str, ...]
    argstrs: tuple[tuple[str, str], ...]
    options: ImageOptions
    layering: str = "auto"
    max_layers: int = 100

    def argv(self) -> list[str]:
        """nix-instantiate's arguments."""
        argv = [f"{SRC_DIR}/{self.nix_file}"]
        for a in self.attrs:
            argv += ["-A", a]
        for k, v in self.argstrs:
            argv += ["--argstr", k, v]
        return argv


def _nix_file(value: str) -> str:
    norm = posixpath.normpath(value)
    if not value or value.startswith("/") or norm == ".." or norm.startswith("../"):
        raise EvalError(
            f"Nix file {value!r} must be a relative path inside the build context",
            hint="pass --build-arg nix-file=PATH (relative to the context) if it is not at "
            "the context's top",
        )
    return norm


def eval_request(opts: Mapping[str, str]) -> EvalRequest | None:
    """The evaluation the frontend options ask for, or None for a prepared context
    (``filename`` not ending in ``.nix``). Build args: ``nix-image`` (required),
    ``nix-file``, ``attr`` (space separated), ``argstr:NAME``, ``entrypoint``, ``cmd``,
    ``env`` (words ``K=V``), ``workdir``, ``user``, ``expose``, ``label:KEY``,
    ``created``, ``layering``, ``max-layers``."""
    filename = opts.get("filename", "")
    if not filename.endswith(".nix"):
        return None
    args = {k[len(_ARG) :]: v for k, v in opts.items() if k.startswith(_ARG)}
    image = args.get("nix-image", "").strip()
    if not image:
        raise EvalError(
            f"{filename} is a Nix file, but no image to evaluate it in was given",
            hint="pass --build-arg nix-image=REF (an image with nix-instantiate, e.g. the one "
            "scripts/nix-image.sh builds)",
        )
    try:
        max_layers = int(args.get("max-layers", "100"))
    except ValueError:
        raise EvalError(f"build arg max-layers={args['max-layers']!r} is not a number") from None
    layering = args.get("layering", "auto")
    if layering not in ("auto", "popularity", "dominator"):
        raise EvalError(f"build arg layering={layering!r}: expected auto, popularity or dominator")
    options = ImageOptions(
        entrypoint=parse_words(args["entrypoint"], "build arg entrypoint")
        if "entrypoint" in args
        else None,
        cmd=parse_words(args["cmd"], "build arg cmd") if "cmd" in args else None,
        env=parse_words(args.get("env", ""), "build arg env"),
        workdir=args.get("workdir") or None,
        user=args.get("user") or None,
        expose=parse_words(args.get("expose", ""), "build arg expose"),
        labels={k[len("label:") :]: v for k, v in sorted(args.items()) if k.startswith("label:")},
        created=parse_created(args["created"], "build arg created") if "created" in args else 1,
    )
    return EvalRequest(
        nix_file=_nix_file(args.get("nix-file", posixpath.basename(filename))),
        nix_image=image,
        attrs=tuple(args.get("attr", "").split()),
        argstrs=tuple(
            (k[len("argstr:") :], v) for k, v in sorted(args.items()) if k.startswith("argstr:")
        ),
        options=options,
        layering=layering,
        max_layers=max_layers,
    )


def eval_op(req: EvalRequest, context: llb.Output) -> llb.Output:
    """The ExecOp that evaluates on ``req.nix_image``; its output is ``/out``.

    The network is BuildKit's default, like a ``RUN`` step, so ``fetchTarball`` and
    friends work; the result is cached by the context's content, so pin what you fetch.
    """
    image = llb.image_source(req.nix_image, description=f"[stowaway] nix image {req.nix_image}")
    # the directories the customisation layer copies modes from (see graph.mode_template)
    script = _SCRIPT + "".join(
        f"mkdir -p {OUT_DIR}/{posixpath.dirname(t)}\n"
        f"mkdir -m {posixpath.basename(t)} {OUT_DIR}/{t}\n"
        for t in mode_templates(_members(req.options))
    )
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        # the op's store is private and nothing is built in it: no build users, no caches
        "NIX_CONFIG": "build-users-group =\nsubstituters =",
    }
    vertex = llb.exec_op(
        ["/bin/sh", "-ec", script, "stowaway-eval", *req.argv()],
        env,
        [
            llb.Mount("/", image, readonly=True),  # a private snapshot (see graph.py)
            llb.Mount("/nix", None),  # the private store, a scratch mount that dies with the op
            llb.Mount("/tmp", None),
            llb.Mount(SRC_DIR, context, readonly=True),
            llb.Mount(OUT_DIR, output=True),
        ],
        cwd=SRC_DIR,
        network_none=False,
        description=f"nix-instantiate {shlex.join([req.nix_file, *req.argv()[1:]])}"[:200],
    )
    return llb.Output(vertex, 0)


def store_paths(text: bytes, where: str) -> list[str]:
    """Store paths, one per line (``nix-store -qR`` output); anything else is an error."""
    out: list[str] = []
    for n, line in enumerate(text.decode(errors="replace").splitlines(), 1):
        if not _STORE_PATH.match(line):
            raise EvalError(f"{where} line {n}: {line!r} is not a store path")
        out.append(line)
    return out


def parse_instantiated(text: bytes, where: str) -> list[tuple[str, str | None]]:
    """nix-instantiate's lines ``DRV`` or ``DRV!OUTPUT`` as (drv, output or None)."""
    out: list[tuple[str, str | None]] = []
    for n, line in enumerate(text.decode(errors="replace").split(), 1):
        drv, _, output = line.partition("!")
        if not _STORE_PATH.match(drv) or not drv.endswith(".drv"):
            raise EvalError(f"{where} line {n}: {line!r} is not a derivation")
        out.append((drv, output or None))
    if not out:
        raise EvalError(f"{where}: nix-instantiate produced no derivation")
    return out


def targets_of(
    selected: Sequence[tuple[str, str | None]], drvs: Mapping[str, Derivation]
) -> list[Target]:
    """Targets for the instantiated (drv, output) pairs; no output means ``out`` (or the
    first output when there is none called ``out``), as nix-build picks it."""
    targets = []
    for drv_path, output in selected:
        drv = drvs.get(drv_path)
        if drv is None:
            raise EvalError(f"instantiated derivation {drv_path} is not in its own closure")
        name = output or (
            "out" if any(o.name == "out" for o in drv.outputs) else drv.outputs[0].name
        )
        targets.append(Target(drv_path, name, drv.output(name).path))
    return targets


class NoStore:
    """A store source that has nothing: the customisation layer without ``contents``
    never asks it for anything."""

    name = "no store"

    def query(self, path: str) -> PathInfo | None:
        return None

    def entries(self, path: str) -> Iterator[NarEntry]:
        raise StowawayError(f"{path} is not available without a local store")


def _with_out(options: ImageOptions, out: str) -> ImageOptions:
    def sub(words: list[str] | None) -> list[str] | None:
        return None if words is None else [w.replace(OUT_PLACEHOLDER, out) for w in words]

    workdir = options.workdir.replace(OUT_PLACEHOLDER, out) if options.workdir else None
    return replace(
        options,
        entrypoint=sub(options.entrypoint),
        cmd=sub(options.cmd),
        env=sub(options.env) or [],
        workdir=workdir,
    )


def members_of(custom: Customisation) -> tuple[Member, ...]:
    """A customisation layer as spec members: the kinds a BuildKit image can hold."""
    return tuple(
        Member(m.name.decode(), m.kind, m.mode, m.data)
        for m in custom.members
        if m.kind in MEMBER_KINDS
    )


def _members(options: ImageOptions) -> tuple[Member, ...]:
    """The customisation layer (no ``contents`` in ``.nix`` builds: no symlinks)."""
    return members_of(plan_customisation(options, NoStore()))


def for_platform(options: ImageOptions, drv: Derivation) -> ImageOptions:
    """The image is for the platform ``drv`` builds on, not the client's machine."""
    os_name, arch = platform_of(drv)
    return replace(options, os=os_name, architecture=arch)


def spec_from_eval(
    req: EvalRequest,
    instantiated: bytes,
    closure: bytes,
    drvs: Mapping[str, Derivation],
) -> Spec:
    """The Spec `stowaway buildkit context` would have written, from the eval op's files.
    References stay unknown (nothing is built yet): the frontend uses the build-time
    closure, as for a context made without a local build."""
    selected = parse_instantiated(instantiated, "eval output 'instantiated'")
    paths = store_paths(closure, "eval output 'closure'")
    missing = sorted(p for p in paths if p.endswith(".drv") and p not in drvs)
    if missing:
        raise EvalError(f"derivation {missing[0]} of the closure was not read back")
    targets = targets_of(selected, drvs)
    options = for_platform(_with_out(req.options, targets[0].path), drvs[targets[0].drv])
    return Spec(
        targets=tuple(targets),
        drv_files={p: f"drvs/{p.rsplit('/', 1)[-1]}" for p in drvs},
        source_dirs={p: f"sources/{p.rsplit('/', 1)[-1]}" for p in paths if p not in drvs},
        outputs={p: {o.name: o.path for o in d.outputs} for p, d in drvs.items()},
        references=None,
        layering=req.layering,
        max_layers=req.max_layers,
        customisation=_members(options),
        config=build_config(options, [], []),
    )
