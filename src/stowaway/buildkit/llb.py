"""A small LLB builder: ops as content-addressed vertices, marshalled into a Definition.

BuildKit identifies an op by the sha256 of its marshalled bytes, and caches by that
digest (plus its inputs' cache keys). So every op here is serialised exactly once,
deterministically (map keys sorted), and the same inputs always give the same digest:
that is what lets an unchanged derivation hit BuildKit's cache on the next build.
Only what LLB v0.8 offers is used (ExecOp, SourceOp, FileOp).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stowaway.buildkit.pb import ops
from stowaway.image.digest import sha256_digest

__all__ = [
    "KEEP",
    "SCRATCH",
    "Copy",
    "MkDir",
    "MkFile",
    "Mount",
    "Output",
    "Vertex",
    "exec_op",
    "file_op",
    "image_source",
    "local_source",
    "marshal",
    "normalize_ref",
]

#: Index meaning "no input" (an empty directory) in mounts and file actions.
SCRATCH = -1
#: FileOp mode/timestamp value meaning "keep what the source has" (0 would mean 0).
KEEP = -1


@dataclass(frozen=True, eq=False)
class Vertex:
    """One marshalled op: its bytes, digest, the vertices it reads, and metadata."""

    data: bytes
    digest: str
    deps: tuple[Vertex, ...]
    description: Mapping[str, str] = field(default_factory=dict)
    caps: tuple[str, ...] = ()


@dataclass(frozen=True)
class Output:
    """Output ``index`` of ``vertex`` (an ExecOp has one per output mount)."""

    vertex: Vertex
    index: int = 0


@dataclass(frozen=True)
class Mount:
    """An ExecOp mount: ``source`` None is a fresh empty dir; ``output`` True keeps the
    mount's final state as an output of the op (in mount order). ``tmpfs`` True is a
    tmpfs that dies with the op: no snapshot to create and remove, unlike a scratch dir."""

    dest: str
    source: Output | None = None
    selector: str = ""
    readonly: bool = False
    output: bool = False
    tmpfs: bool = False


@dataclass(frozen=True)
class Copy:
    """Copy ``src`` of ``source`` to ``dest`` (parents created); mtimes set to
    ``timestamp`` so the layer does not depend on when it was built. Modes are kept.

    ``contents`` True copies what is in a directory ``src`` into ``dest``, which BuildKit
    v0.8 creates first (mode 0755, umask applied): ``src``'s own mode is lost. False
    copies the directory itself to a ``dest`` that must not exist yet, with its mode
    (setuid/setgid/sticky bits included, which MkDir cannot set)."""

    source: Output
    src: str
    dest: str
    timestamp: int = 1
    contents: bool = True


@dataclass(frozen=True)
class MkDir:
    path: str
    mode: int
    timestamp: int = 1


@dataclass(frozen=True)
class MkFile:
    path: str
    mode: int
    data: bytes
    timestamp: int = 1


def _vertex(
    op: Any,
    deps: Sequence[Output],
    description: Mapping[str, str] | None,
    caps: Sequence[str] = (),
) -> Vertex:
    for d in deps:
        op.inputs.add(digest=d.vertex.digest, index=d.index)
    data = op.SerializeToString(deterministic=True)
    return Vertex(
        data,
        sha256_digest(data),
        tuple(d.vertex for d in deps),
        dict(description or {}),
        tuple(sorted(caps)),
    )


def _platform(op: Any, platform: tuple[str, str] | None) -> None:
    if platform is not None:
        op.platform.OS, op.platform.Architecture = platform


def local_source(
    name: str,
    *,
    session_id: str,
    include: Sequence[str] = (),
    description: str | None = None,
) -> Output:
    """``local://NAME``: a directory the client sends (``context``, ``dockerfile``)."""
    op = ops.Op()
    op.source.identifier = f"local://{name}"
    attrs = {"local.session": session_id, "local.sharedkeyhint": name}
    if include:
        attrs["local.includepattern"] = json.dumps(list(include))
    op.source.attrs.update(attrs)
    desc = {"llb.customname": description} if description else None
    return Output(_vertex(op, [], desc, ["source.local"]))


def normalize_ref(ref: str) -> str:
    """``app:1`` → ``docker.io/library/app:1``, as Docker reads names: BuildKit parses
    source identifiers as URLs and refuses short names (``app:1`` looks like host:port).
    A first component with ``.`` or ``:``, or ``localhost``, is a registry; no tag or
    digest means ``:latest``."""
    name, at, digest = ref.partition("@")
    first, slash, _ = name.partition("/")
    if not slash or not ("." in first or ":" in first or first == "localhost"):
        name = "docker.io/" + (name if slash else "library/" + name)
    if not at and ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name + at + digest


def image_source(
    ref: str, *, platform: tuple[str, str] | None = None, description: str | None = None
) -> Output:
    """``docker-image://REF``: an image's filesystem (pin REF by digest to be reproducible)."""
    op = ops.Op()
    op.source.identifier = f"docker-image://{normalize_ref(ref)}"
    _platform(op, platform)
    desc = {"llb.customname": description} if description else None
    return Output(_vertex(op, [], desc, ["source.image"]))


def exec_op(
    args: Sequence[str],
    env: Mapping[str, str],
    mounts: Sequence[Mount],
    *,
    cwd: str = "/",
    network_none: bool = True,
    platform: tuple[str, str] | None = None,
    description: str | None = None,
) -> Vertex:
    """A process run in a container of ``mounts``; env is passed sorted by key.

    The returned vertex has one output per mount with ``output=True``, in mount order.
    """
    op = ops.Op()
    ex = op.exec
    ex.meta.args.extend(args)
    ex.meta.env.extend(f"{k}={v}" for k, v in sorted(env.items()))
    ex.meta.cwd = cwd
    if network_none:
        ex.network = ops.NONE
    deps: list[Output] = []
    index: dict[tuple[str, int], int] = {}
    outputs = 0
    for m in mounts:
        pm = ex.mounts.add(dest=m.dest, selector=m.selector, readonly=m.readonly)
        if m.tmpfs:
            if m.source is not None or m.output:
                raise ValueError(f"tmpfs mount {m.dest} cannot have a source or be an output")
            pm.mountType = ops.TMPFS
        if m.source is None:
            pm.input = SCRATCH
        else:
            key = (m.source.vertex.digest, m.source.index)
            if key not in index:
                index[key] = len(deps)
                deps.append(m.source)
            pm.input = index[key]
        if m.output:
            pm.output = outputs
            outputs += 1
        else:
            pm.output = -1
    _platform(op, platform)
    desc = {"llb.customname": description} if description else None
    caps = ["exec.meta.base", "exec.mount.bind", "exec.mount.selector"]
    if any(m.tmpfs for m in mounts):
        caps.append("exec.mount.tmpfs")
    if network_none:
        caps.append("exec.meta.network")
    return _vertex(op, deps, desc, caps)


def file_op(
    base: Output | None,
    actions: Sequence[Copy | MkDir | MkFile],
    *,
    platform: tuple[str, str] | None = None,
    description: str | None = None,
) -> Output:
    """Apply ``actions`` in order on ``base`` (None: an empty filesystem); one output."""
    if not actions:
        raise ValueError("a file op needs at least one action")
    op = ops.Op()
    deps: list[Output] = []
    index: dict[tuple[str, int], int] = {}

    def dep(o: Output) -> int:
        key = (o.vertex.digest, o.index)
        if key not in index:
            index[key] = len(deps)
            deps.append(o)
        return index[key]

    base_input = SCRATCH if base is None else dep(base)
    secondary = [dep(a.source) if isinstance(a, Copy) else SCRATCH for a in actions]
    n_inputs = len(deps)
    for i, a in enumerate(actions):
        fa = op.file.actions.add()
        fa.input = base_input if i == 0 else n_inputs + i - 1
        fa.secondaryInput = secondary[i]
        fa.output = 0 if i == len(actions) - 1 else -1
        if isinstance(a, Copy):
            c = fa.copy
            c.src, c.dest = a.src, a.dest
            c.mode = KEEP
            c.dirCopyContents = a.contents
            c.createDestPath = True
            c.timestamp = a.timestamp
        elif isinstance(a, MkDir):
            fa.mkdir.path, fa.mkdir.mode = a.path, a.mode
            fa.mkdir.makeParents = True
            fa.mkdir.timestamp = a.timestamp
        else:
            fa.mkfile.path, fa.mkfile.mode = a.path, a.mode
            fa.mkfile.data = a.data
            fa.mkfile.timestamp = a.timestamp
    _platform(op, platform)
    desc = {"llb.customname": description} if description else None
    return Output(_vertex(op, deps, desc, ["file.base"]))


def marshal(result: Output | None) -> Any:
    """The Definition BuildKit solves: every op reachable from ``result``, inputs first,
    then a bare op whose single input is the result (None: an empty definition)."""
    definition = ops.Definition()
    if result is None:
        return definition
    order: list[Vertex] = []
    seen: set[str] = set()
    stack: list[tuple[Vertex, bool]] = [(result.vertex, False)]
    while stack:  # iterative DFS post-order: deep graphs must not hit the recursion limit
        v, expanded = stack.pop()
        if expanded:
            if v.digest not in seen:
                seen.add(v.digest)
                order.append(v)
            continue
        if v.digest in seen:
            continue
        stack.append((v, True))
        stack.extend((d, False) for d in reversed(v.deps) if d.digest not in seen)
    for v in order:
        meta = definition.metadata[v.digest]
        meta.description.update(v.description)
        for cap in v.caps:
            meta.caps[cap] = True
    tail = ops.Op()
    tail.inputs.add(digest=result.vertex.digest, index=result.index)
    ops_list = getattr(definition, "def")  # `def` is a Python keyword
    ops_list.extend([v.data for v in order])
    ops_list.append(tail.SerializeToString(deterministic=True))
    return definition
