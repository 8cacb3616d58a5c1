"""The `stowaway` command line: flag parsing and printing only; the work is library calls.

Imports of heavy modules happen inside commands so `stowaway build` on a warm cache
starts fast.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from stowaway import __version__
from stowaway.cli_options import (
    StowawayGroup,
    credentials_from_flags,
    image_flags,
    image_options_from_flags,
    layering_options,
    option_group,
    registry_auth_options,
    store_options,
)
from stowaway.errors import StowawayError

if TYPE_CHECKING:
    from stowaway.store.sources import Sources

installable_options = option_group(
    click.argument("installables", nargs=-1),
    click.option(
        "-f",
        "--file",
        "nix_file",
        metavar="FILE.nix",
        help="Build FILE.nix with nix-build and use its outputs.",
    ),
    click.option("-A", "--attr", "attrs", multiple=True, help="Attribute of -f FILE to build."),
)


def _roots(installables: Sequence[str], nix_file: str | None, attrs: Sequence[str]) -> list[str]:
    from stowaway import installables as inst

    roots: list[str] = []
    if nix_file:
        roots += inst.build_nix_file(nix_file, attrs)
    elif attrs:
        raise StowawayError("-A/--attr needs -f FILE.nix")
    roots += inst.resolve(installables)
    if not roots:
        raise StowawayError(
            "nothing to build", hint="name store paths, ./result links, or -f FILE.nix"
        )
    return list(dict.fromkeys(roots))


def _closure(
    roots: Sequence[str],
    store: str | None,
    substituters: Sequence[str],
    trusted_keys: Sequence[str],
    no_require_sigs: bool,
) -> tuple[Sources, dict[str, Any]]:
    from stowaway.store.sources import closure, open_sources

    source = open_sources(store, substituters, trusted_keys, require_sigs=not no_require_sigs)
    try:
        return source, closure(source, roots)
    except BaseException:
        source.close()
        raise


#: Faces that live in their own packages, imported only when invoked (they pull in
#: gRPC, aiohttp, ...), so `stowaway build` on a warm cache starts fast.
LAZY_COMMANDS = {
    "snapshotter": "stowaway.runtime.cli_snapshotter:snapshotter_command",
    "cri-image-service": "stowaway.runtime.cri.cli_cri:cri_image_service_command",
    "serve": "stowaway.registry.cli_serve:serve_command",
    "index": "stowaway.registry.cli_serve:index_command",
    "pull": "stowaway.runtime.cli_pull:pull_command",
    "buildkit": "stowaway.buildkit.cli_buildkit:buildkit_group",
    "frontend": "stowaway.buildkit.cli_buildkit:frontend_command",
}


class LazyGroup(StowawayGroup):
    """A click group whose listed subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            import importlib

            module, _, attr = LAZY_COMMANDS[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="stowaway")
def main() -> None:
    """stowaway — Nix store paths as container images.

    \b
    Examples:
      stowaway build ./result -o oci:img:latest --entrypoint /bin/app
      stowaway build -f app.nix -A server -o docker://localhost:5000/app:1 --dest-tls-verify=false
      stowaway plan ./result --json
      stowaway inspect oci:img:latest
    """


@main.command()
@installable_options
@store_options
@layering_options
@click.option(
    "-o",
    "--output",
    "target",
    required=True,
    metavar="TARGET",
    help="oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG] "
    "or docker://HOST/REPO[:TAG].",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["oci", "docker"]),
    default="oci",
    show_default=True,
    help="OCI or Docker schema 2 media types.",
)
@click.option(
    "--compression", type=click.Choice(["gzip", "zstd", "none"]), default="gzip", show_default=True
)
@click.option(
    "--compression-level",
    type=int,
    default=None,
    help="Level for the compressor (gzip 1-9, default 6; zstd 1-19, default 3).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Layer cache (default: $XDG_CACHE_HOME/stowaway).",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Layers built at a time (default: one per core).",
)
@image_flags
@click.option(
    "--contents",
    multiple=True,
    metavar="STOREPATH",
    help="Symlink this store path's tree into / (like buildEnv); repeatable.",
)
@click.option(
    "--dest-tls-verify",
    type=bool,
    default=True,
    show_default=True,
    help="For docker:// targets; false allows plain HTTP (loopback registries).",
)
@registry_auth_options("--dest-creds")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for machines.")
def build(
    installables: tuple[str, ...],
    nix_file: str | None,
    attrs: tuple[str, ...],
    store: str | None,
    substituters: tuple[str, ...],
    trusted_keys: tuple[str, ...],
    no_require_sigs: bool,
    max_layers: int,
    layering: str,
    target: str,
    fmt: str,
    compression: str,
    compression_level: int | None,
    cache_dir: str | None,
    jobs: int | None,
    entrypoint: str | None,
    cmd: str | None,
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    expose: tuple[str, ...],
    labels: tuple[str, ...],
    contents: tuple[str, ...],
    created: str | None,
    dest_tls_verify: bool,
    creds: str | None,
    authfile: str | None,
    as_json: bool,
) -> None:
    """Compose an image from Nix store paths and write it to TARGET.

    Layers are cached by content: a layer is tarred and compressed once, ever.

    \b
    Examples:
      stowaway build ./result -o oci:out:latest --entrypoint '["/bin/hello"]'
      stowaway build /nix/store/…-app --contents /nix/store/…-busybox \\
          -o docker-archive:app.tar:app:1 --format docker
      stowaway build ./result --substituter file:///srv/cache \\
          --trusted-public-key cache-1:AbC…= -o oci-archive:app.tar
    """
    from stowaway.image.compose import compose
    from stowaway.image.layer_cache import LayerCache, default_cache_dir
    from stowaway.image.layers import LayerSettings
    from stowaway.image.tar import default_mtime
    from stowaway.sinks import RegistryTarget, parse_target, write_image

    dest = parse_target(target)
    lookup = credentials_from_flags(creds, authfile) if isinstance(dest, RegistryTarget) else None
    roots = _roots(installables, nix_file, attrs)
    from stowaway.installables import resolve

    contents_paths = resolve(contents)
    source, clo = _closure(
        [*roots, *contents_paths], store, substituters, trusted_keys, no_require_sigs
    )
    options = image_options_from_flags(click.get_current_context().params, contents=contents_paths)
    settings = LayerSettings(
        compression=compression,  # type: ignore[arg-type]
        level=compression_level,
        mtime=default_mtime(),
    )
    cache = LayerCache(Path(cache_dir) if cache_dir else default_cache_dir())
    from stowaway._ui import progress_display

    with source, progress_display(not as_json) as prog:
        kwargs: dict[str, Any] = {"progress": prog} if prog else {}
        result = compose(
            source,
            [*roots, *contents_paths],
            options,
            closure=clo,
            strategy=layering,
            max_layers=max_layers,
            settings=settings,
            cache=cache,
            format=fmt,  # type: ignore[arg-type]
            jobs=jobs,
            **kwargs,
        )
        sink_result = write_image(
            result.image,
            dest,
            tls_verify=dest_tls_verify,
            plain_http_hint="for a plain-HTTP registry pass --dest-tls-verify=false",
            creds=lookup,
            state_dir=cache.root,  # which repos got which blobs: mount sources
            **kwargs,
        )
    image = result.image
    # reused: taken from the layer cache, or (pushing) not sent because the registry had it
    sent = set(sink_result.written) if isinstance(dest, RegistryTarget) else None
    rows = [
        {
            "digest": layer.digest,
            "diff_id": layer.diff_id,
            "size": layer.size,
            "store_paths": list(layer.store_paths),
            "reused": layer.reused or (sent is not None and layer.digest not in sent),
        }
        for layer in image.layers
    ]
    summary: dict[str, Any] = {
        "target": target,
        "manifest_digest": image.manifest.digest,
        "config_digest": image.config.digest,
        "layers": rows,
    }
    extra = getattr(sink_result, "to_json", None)
    if callable(extra):
        summary["sink"] = extra()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    from stowaway._ui import human, layer_table, out

    layer_table(target, rows)
    out.print(f"manifest {image.manifest.digest}")
    built = sum(1 for r in rows if not r["reused"])
    total = sum(layer.size for layer in image.layers)
    out.print(
        f"{len(rows)} layers, {human(total)}; {built} built or uploaded, {len(rows) - built} reused"
    )


@main.command()
@installable_options
@store_options
@layering_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(
    installables: tuple[str, ...],
    nix_file: str | None,
    attrs: tuple[str, ...],
    store: str | None,
    substituters: tuple[str, ...],
    trusted_keys: tuple[str, ...],
    no_require_sigs: bool,
    max_layers: int,
    layering: str,
    as_json: bool,
) -> None:
    """Show how the closure would be split into layers, without building anything.

    \b
    Examples:
      stowaway plan ./result
      stowaway plan ./result --layering popularity --max-layers 20 --json
    """
    from stowaway.layering import plan as make_plan

    roots = _roots(installables, nix_file, attrs)
    source, clo = _closure(roots, store, substituters, trusted_keys, no_require_sigs)
    source.close()
    result = make_plan(clo, roots, strategy=layering, max_layers=max_layers)
    layers = [
        {
            "paths": list(layer.paths),
            "size": layer.size,
            "sizes": {p: clo[p].nar_size for p in layer.paths},
        }
        for layer in result.layers
    ]
    if as_json:
        doc = {
            "strategy": result.strategy,
            "roots": roots,
            "closure_size": sum(i.nar_size for i in clo.values()),
            "paths": len(clo),
            "layers": layers,
        }
        click.echo(json.dumps(doc, indent=2))
        return
    from stowaway._ui import human, layer_table, out

    layer_table(
        f"plan ({result.strategy}): {len(clo)} paths in {len(layers)} store layers + customisation",
        [{"size": layer["size"], "store_paths": layer["paths"]} for layer in layers],
    )
    out.print(f"closure: {human(sum(i.nar_size for i in clo.values()))}")


@main.command()
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def inspect(target: str, as_json: bool) -> None:
    """Show an image's layers and the store paths each one holds.

    TARGET is oci:DIR[:TAG] or oci-archive:FILE[:TAG].

    \b
    Examples:
      stowaway inspect oci:out:latest
      stowaway inspect oci-archive:app.tar --json
    """
    from stowaway.sinks.inspect import read_image_summary

    summary = read_image_summary(target)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    from stowaway._ui import layer_table, out

    layer_table(target, summary["layers"])
    out.print(f"manifest {summary['manifest_digest']}")


if __name__ == "__main__":  # pragma: no cover
    main()
