"""`stowaway buildkit context`: evaluate a Nix file locally and write a BuildKit context.

The context holds everything the frontend needs and nothing it would have to fetch:
``drvs/<basename>`` (every .drv of the closure), ``sources/<basename>`` (every input
source, copied in canonical form: mtime 1, modes 0444/0555), ``modes/<octal>`` (empty
directories the customisation layer's ``/tmp`` is copied from, see graph.mode_template)
and ``stowaway.json`` (targets with their expected store paths, where each file lives,
the image config for the derivations' platform).

References of outputs are only known after building. When the targets are already valid
in the local store (built by nix before), their exact closure and sizes are recorded;
otherwise the frontend falls back to the build-time closure (see graph._closure).
The directory is assembled next to ``out_dir`` and renamed into place, so a crash never
leaves a half-written context behind.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stowaway.buildkit.drv import Derivation, parse_drv
from stowaway.buildkit.evaluate import NoStore, for_platform, members_of, targets_of
from stowaway.buildkit.llb_graph import mode_templates
from stowaway.buildkit.spec import Spec
from stowaway.errors import StowawayError
from stowaway.image.config import ImageOptions, build_config, plan_customisation
from stowaway.store.local import LocalStore
from stowaway.store.model import PathInfo

__all__ = ["ContextResult", "make_context"]


@dataclass(frozen=True)
class ContextResult:
    """What was written: the directory, its spec, and whether references are exact."""

    path: Path
    spec: Spec
    derivations: int
    sources: int


def _run(cmd: Sequence[str], what: str) -> str:
    if shutil.which(cmd[0]) is None:
        raise StowawayError(
            f"cannot {what}: {cmd[0]} is not installed",
            hint="install nix (Debian: apt-get install nix-bin)",
        )
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise StowawayError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def _instantiate(
    nix_file: str, attrs: Sequence[str], argstrs: Mapping[str, str]
) -> list[tuple[str, str | None]]:
    """(drv path, output name or None for the default) per instantiated attribute."""
    if not os.path.exists(nix_file):
        raise StowawayError(f"Nix file {nix_file!r} does not exist")
    cmd = ["nix-instantiate", nix_file]
    for a in attrs:
        cmd += ["-A", a]
    for k, v in sorted(argstrs.items()):
        cmd += ["--argstr", k, v]
    out: list[tuple[str, str | None]] = []
    for line in _run(cmd, f"evaluate {nix_file}").split():
        drv, _, output = line.partition("!")
        out.append((drv, output or None))
    if not out:
        raise StowawayError(f"nix-instantiate {nix_file} produced no derivation")
    return out


def _copy_canonical(src: str, dest: Path) -> None:
    """Copy a store path as Nix keeps it: mtime 1, files 0444/0555, dirs 0555."""
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dest)
        os.utime(dest, (1, 1), follow_symlinks=False)
    elif stat.S_ISDIR(st.st_mode):
        dest.mkdir()
        for name in sorted(os.listdir(src)):
            _copy_canonical(os.path.join(src, name), dest / name)
        os.chmod(dest, 0o555)
        os.utime(dest, (1, 1))
    else:
        shutil.copyfile(src, dest)
        os.chmod(dest, 0o555 if st.st_mode & 0o100 else 0o444)
        os.utime(dest, (1, 1))


def _runtime_closure(roots: Sequence[str], store: LocalStore | None) -> dict[str, PathInfo] | None:
    """The roots' closure from the local store, or None when any path is not valid."""
    if store is None:
        return None
    closure: dict[str, PathInfo] = {}
    todo = list(roots)
    while todo:
        p = todo.pop()
        if p in closure:
            continue
        info = store.query(p)
        if info is None:
            return None
        closure[p] = info
        todo.extend(r for r in info.references if r not in closure)
    return closure


def _open_store() -> LocalStore | None:
    try:
        return LocalStore()
    except StowawayError:
        return None


def make_context(
    nix_file: str,
    attrs: Sequence[str],
    out_dir: str | os.PathLike[str],
    options: ImageOptions,
    *,
    layering: str = "auto",
    max_layers: int = 100,
    argstrs: Mapping[str, str] | None = None,
) -> ContextResult:
    """Instantiate ``nix_file`` (``argstrs`` as ``--argstr``) and write the build context
    to ``out_dir`` (replacing it)."""
    if options.rules or options.mkdirs:  # BuildKit's layers carry the store's owners
        raise StowawayError(
            "--chown, --chmod and --mkdir are not supported by the BuildKit frontend yet",
            hint="build the image with `stowaway build`, which supports them",
        )
    selected = _instantiate(nix_file, attrs, argstrs or {})
    drv_paths = [d for d, _ in selected]
    closure_paths = _run(["nix-store", "-qR", *drv_paths], "query the derivation closure").split()
    drvs: dict[str, Derivation] = {}
    texts: dict[str, bytes] = {}
    for p in closure_paths:
        if p.endswith(".drv"):
            texts[p] = Path(p).read_bytes()
            drvs[p] = parse_drv(texts[p], p)
    sources = sorted(p for p in closure_paths if not p.endswith(".drv"))
    targets = targets_of(selected, drvs)
    options = for_platform(options, drvs[targets[0].drv])
    roots = [t.path for t in targets]
    store = _open_store()
    try:
        closure = _runtime_closure([*roots, *options.contents], store)
        if options.contents and closure is None:
            raise StowawayError(
                "--contents needs the outputs built locally first (their files are linked into /)",
                hint=f"run nix-build {nix_file} first, or drop --contents",
            )
        custom = (
            plan_customisation(options, store, closure)
            if store is not None
            else plan_customisation(options, NoStore())
        )
    finally:
        if store is not None:
            store.close()
    spec = Spec(
        targets=tuple(targets),
        drv_files={p: f"drvs/{p.rsplit('/', 1)[-1]}" for p in drvs},
        source_dirs={p: f"sources/{p.rsplit('/', 1)[-1]}" for p in sources},
        outputs={p: {o.name: o.path for o in d.outputs} for p, d in drvs.items()},
        references=None
        if closure is None
        else {p: tuple(r for r in i.references if r != p) for p, i in closure.items()},
        nar_sizes={} if closure is None else {p: i.nar_size for p, i in closure.items()},
        layering=layering,
        max_layers=max_layers,
        customisation=members_of(custom),
        config=build_config(options, [], []),
    )
    if any(m.kind == "symlink" for m in custom.members):
        raise StowawayError("--contents links are not supported by the BuildKit frontend yet")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "drvs").mkdir()
        (tmp / "sources").mkdir()
        for p, data in sorted(texts.items()):
            (tmp / "drvs" / p.rsplit("/", 1)[-1]).write_bytes(data)
        for p in sources:
            _copy_canonical(p, tmp / "sources" / p.rsplit("/", 1)[-1])
        for template in mode_templates(spec.customisation):
            (tmp / template).mkdir(parents=True)
            os.chmod(tmp / template, int(template.rsplit("/", 1)[-1], 8))
            os.utime(tmp / template, (1, 1))
        (tmp / "stowaway.json").write_bytes(spec.to_json())
        os.chmod(tmp, 0o755)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "ctx")
        os.replace(tmp, out)
        if old is not None:
            _rmtree(old)
    except BaseException:
        _rmtree(tmp)
        raise
    return ContextResult(out, spec, len(drvs), len(sources))


def _rmtree(path: Path) -> None:
    """Remove a tree whose directories may be read-only (canonical store copies)."""
    os.chmod(path, 0o755)
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            full = os.path.join(root, d)
            if not os.path.islink(full):
                os.chmod(full, 0o755)
    shutil.rmtree(path)
