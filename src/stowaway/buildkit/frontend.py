"""`stowaway frontend`: the BuildKit gateway client run as the frontend image's entrypoint.

BuildKit starts the frontend with the LLBBridge gRPC connection on stdin/stdout, which
:mod:`stowaway.buildkit.gateway` relays and wraps in typed calls. The build itself: read
``stowaway.json`` (the ``filename`` option) and the .drv files from the client's
context, or evaluate the ``.nix`` file named by ``filename`` in an ExecOp
(:mod:`stowaway.buildkit.evaluate`), turn them into LLB (:mod:`stowaway.buildkit.llb_graph`),
solve, and return the result with the image config.

Imports stay within grpc, protobuf and the stdlib-only parts of stowaway: this module
runs on Debian's python3 inside the frontend image.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from collections.abc import Mapping

import grpc

from stowaway.buildkit import llb
from stowaway.buildkit.drv import Derivation, parse_drv
from stowaway.buildkit.evaluate import (
    EvalError,
    EvalRequest,
    eval_op,
    eval_request,
    spec_from_eval,
    store_paths,
)
from stowaway.buildkit.gateway import CacheImport, FrontendError, Gateway, stdio_gateway
from stowaway.buildkit.llb_graph import (
    STORE_PATHS_LABEL,
    build_llb_graph,
    image_platform,
    mode_templates,
)
from stowaway.buildkit.spec import Spec
from stowaway.errors import StowawayError
from stowaway.store.model import STORE_DIR

__all__ = [
    "CacheImport",
    "FrontendError",
    "Gateway",
    "cache_imports",
    "frontend_options",
    "main",
    "run",
]

_REQUIRED_CAPS = ("solve.base", "readfile")
_REQUIRED_LLB_CAPS = (
    "source.local",
    "exec.meta.base",
    "exec.mount.selector",
    "exec.mount.tmpfs",
    "file.base",
)


def frontend_options(environ: Mapping[str, str]) -> dict[str, str]:
    """``BUILDKIT_FRONTEND_OPT_<i>=key=value`` variables as a dict."""
    opts: dict[str, str] = {}
    for name, value in environ.items():
        if name.startswith("BUILDKIT_FRONTEND_OPT_"):
            key, _, val = value.partition("=")
            opts[key] = val
    return opts


def cache_imports(opts: Mapping[str, str]) -> list[CacheImport]:
    """The caches the client asked to import, as the Dockerfile frontend reads them.

    ``cache-imports`` is JSON ``[{"Type": …, "Attrs": {…}}]`` (buildx, BuildKit >= v0.4);
    ``cache-from`` is the older comma-separated list of registry refs that dockerd 20.10
    passes for ``docker build --cache-from REF``. BuildKit only applies imports named in
    each Solve request, so the frontend must forward them or nothing is reused.
    """
    out: list[CacheImport] = []
    raw = opts.get("cache-imports", "")
    if raw:
        try:
            entries = json.loads(raw)
        except ValueError as e:
            raise FrontendError(f"frontend option cache-imports is not JSON: {e}") from None
        if not isinstance(entries, list):
            raise FrontendError("frontend option cache-imports must be a JSON list")
        for i, entry in enumerate(entries):
            typ = entry.get("Type") if isinstance(entry, dict) else None
            attrs = entry.get("Attrs") or {} if isinstance(entry, dict) else None
            if (
                not isinstance(typ, str)
                or not isinstance(attrs, dict)
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in attrs.items())
            ):
                raise FrontendError(
                    f"frontend option cache-imports: entry {i} must be "
                    '{"Type": string, "Attrs": {string: string}}'
                )
            out.append(CacheImport(typ, dict(attrs)))
    for ref in opts.get("cache-from", "").split(","):
        if ref.strip():
            out.append(CacheImport("registry", {"ref": ref.strip()}))
    unique: list[CacheImport] = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


def _read_inputs(
    gw: Gateway, opts: Mapping[str, str], session: str
) -> tuple[Spec, list[Derivation], llb.Output]:
    """The spec, the derivations, and the context source the graph reads input sources
    and mode templates from: one source for both, so BuildKit transfers the context
    once (the graph's solve finds the same op already solved)."""
    filename = opts.get("filename", "stowaway.json")
    name = os.path.basename(filename)
    spec_src = llb.local_source(
        "dockerfile",
        session_id=session,
        include=[name],
        description=f"[internal] load build definition from {name}",
    )
    ref = gw.solve(llb.marshal(spec_src))
    spec = Spec.from_json(gw.read_file(ref, name), where=name)
    wanted = set(spec.drv_files.values()) | set(spec.source_dirs.values())
    context = llb.local_source(
        "context",
        session_id=session,
        include=sorted(wanted | set(mode_templates(spec.customisation))),
        description="[internal] load build context",
    )
    ctx = gw.solve(llb.marshal(context))
    files = sorted(spec.drv_files.items())
    texts = gw.read_files(ctx, [rel for _, rel in files])
    drvs = [parse_drv(text, path) for (path, _), text in zip(files, texts, strict=True)]
    return spec, drvs, context


def _evaluate(
    gw: Gateway, req: EvalRequest, session: str
) -> tuple[Spec, list[Derivation], llb.Output]:
    """Evaluate the Nix file in an ExecOp on the Nix image (see evaluate.py) and read
    back the spec and derivations; the op's output also holds the input sources."""
    context = llb.local_source(
        "context", session_id=session, description="[internal] load build context"
    )
    out = eval_op(req, context)
    try:
        ref = gw.solve(llb.marshal(out))
    except grpc.RpcError as e:
        detail = str(e.details())
        code = re.search(r"exit code: \d+", detail)
        raise EvalError(
            f"evaluating {req.nix_file} in {req.nix_image} failed "
            f"({code.group(0) if code else detail}); nix-instantiate's error is in the log "
            "of the step `nix-instantiate …` above"
        ) from None
    instantiated = gw.read_file(ref, "instantiated")
    closure = gw.read_file(ref, "closure")
    paths = [p for p in store_paths(closure, "eval output 'closure'") if p.endswith(".drv")]
    texts = gw.read_files(ref, ["drvs/" + p.rsplit("/", 1)[-1] for p in paths])
    drvs = [parse_drv(text, p) for p, text in zip(paths, texts, strict=True)]
    spec = spec_from_eval(req, instantiated, closure, {d.path: d for d in drvs})
    return spec, drvs, out


def _substitutes(gw: Gateway, platform: tuple[str, str]) -> dict[str, llb.Output]:
    """Store paths held by the images named as caches (earlier stowaway builds carry
    the label STORE_PATHS_LABEL), each from its image pinned by digest.

    BuildKit v0.8 (dockerd 20.10) exports only an inline cache, which holds results of
    the image's layers but not of the ExecOps that built them; taking unchanged store
    paths from the previous image is what saves rebuilding them on a fresh builder. An
    image that cannot be resolved is skipped, as BuildKit skips a missing cache.
    """
    subs: dict[str, llb.Output] = {}
    for cache in gw.caches:
        ref = cache.attrs.get("ref", "")
        if cache.type != "registry" or not ref:
            continue
        try:
            digest, config = gw.resolve_image_config(ref, platform)
            labels = json.loads(config).get("config", {}).get("Labels") or {}
        except grpc.RpcError as e:
            print(f"stowaway frontend: cache image {ref} skipped: {e.details()}", file=sys.stderr)
            continue
        except (ValueError, AttributeError):
            print(f"stowaway frontend: cache image {ref} has no JSON config", file=sys.stderr)
            continue
        names = str(labels.get(STORE_PATHS_LABEL, "")).split()
        if not names:
            continue
        image = llb.image_source(
            f"{ref.split('@', 1)[0]}@{digest}",
            platform=platform,
            description=f"[stowaway] substitute {len(names)} store paths from {ref}",
        )
        for name in names:
            subs.setdefault(f"{STORE_DIR}/{name}", image)
    return subs


def _labelled(config: bytes, layers: tuple[tuple[str, ...], ...]) -> bytes:
    """``config`` with STORE_PATHS_LABEL naming every store path of the image."""
    doc = json.loads(config)
    names = sorted(p.rsplit("/", 1)[-1] for layer in layers for p in layer)
    doc.setdefault("config", {}).setdefault("Labels", {})[STORE_PATHS_LABEL] = " ".join(names)
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def run(gw: Gateway, opts: Mapping[str, str], session: str) -> None:
    """Build the image the context describes and Return it (errors Return an error)."""
    try:
        caps, llb_caps = gw.ping()
        missing = [c for c in _REQUIRED_CAPS if c not in caps]
        missing += [c for c in _REQUIRED_LLB_CAPS if c not in llb_caps]
        if missing:
            raise FrontendError(f"this BuildKit lacks capabilities {', '.join(missing)}")
        gw.caches = tuple(cache_imports(opts))
        gw.typed_caches = "importcaches" in caps
        req = eval_request(opts)
        if req is not None:
            spec, drv_list, context = _evaluate(gw, req, session)
        else:
            spec, drv_list, context = _read_inputs(gw, opts, session)
        drvs = {d.path: d for d in drv_list}
        subs: dict[str, llb.Output] = {}
        if "resolveimage" in caps and "source.image" in llb_caps:
            subs = _substitutes(gw, image_platform(spec, drvs))
        graph = build_llb_graph(spec, drvs, context, subs)
        ref = gw.solve(llb.marshal(graph.result), use_caches=True)
        config = _labelled(spec.config, graph.layers)
    except StowawayError as e:
        gw.ret(None, {}, str(e))
        return
    except grpc.RpcError as e:
        gw.ret(None, {}, f"stowaway frontend: {e.details()}")
        return
    except Exception as e:
        # A bug or an input nothing checked: BuildKit must still get an error through
        # Return (a frontend that just dies is reported as a vague gateway failure).
        traceback.print_exc()  # stderr: shown in the build log
        gw.ret(None, {}, f"stowaway frontend: internal error: {type(e).__name__}: {e}")
        return
    gw.ret(ref, {"containerimage.config": config}, None)


def main() -> int:
    """Entrypoint: relay stdio, run the build, exit 0 once the result (or error) is
    returned; anything else is a crash reported on stderr."""
    opts = frontend_options(os.environ)
    session = os.environ.get("BUILDKIT_SESSION_ID", "")
    with stdio_gateway() as gw:
        run(gw, opts, session)
    return 0


if __name__ == "__main__":
    sys.exit(main())
