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
    arg_option,
    argstr_option,
    base_image_options,
    credentials_from_flags,
    image_flags,
    image_options_from_flags,
    layer_base_option,
    layering_options,
    option_group,
    registry_auth_options,
    store_options,
)
from stowaway.errors import StowawayError

if TYPE_CHECKING:
    from stowaway.sinks.pipeline import Built, BuiltImage
    from stowaway.store.sources import Sources

#: INSTALLABLES (store paths, ./result links, flake references) and -f FILE.nix with
#: its -A, --arg and --argstr.
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
    arg_option,
    argstr_option,
)


def _roots(
    installables: Sequence[str],
    nix_file: str | None,
    attrs: Sequence[str],
    nix_args: Sequence[tuple[str, str]] = (),
    argstrs: Sequence[tuple[str, str]] = (),
) -> list[str]:
    from stowaway import installables as inst

    roots: list[str] = []
    if nix_file:
        roots += inst.build_nix_file(nix_file, attrs, nix_args, argstrs)
    elif attrs or nix_args or argstrs:
        flag = "-A/--attr" if attrs else "--arg" if nix_args else "--argstr"
        raise StowawayError(
            f"{flag} needs -f FILE.nix",
            hint="for a flake, name the attribute in the reference: .#ATTR",
        )
    roots += inst.resolve(installables)
    if not roots:
        raise StowawayError(
            "nothing to build",
            hint="name store paths, ./result links, flake references (.#app), or -f FILE.nix",
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

    keys_from = "--trusted-public-key"
    if not substituters or not trusted_keys:  # Nix's own settings stand in for the flags
        from stowaway.store.nix_config import nix_cache_settings

        conf = nix_cache_settings()
        substituters = substituters or conf.substituters
        if not trusted_keys:
            trusted_keys = conf.trusted_public_keys
            keys_from = f"trusted-public-keys of {conf.origin}"
    source = open_sources(
        store,
        substituters,
        trusted_keys,
        require_sigs=not no_require_sigs,
        keys_from=keys_from,
    )
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
      stowaway sbom oci:img:latest --format cyclonedx
      stowaway sign docker://localhost:5000/app:1 --key cosign.key --tls-verify=false
      stowaway cache prune --max-size 10G
    """


@main.command()
@installable_options
@store_options
@layering_options
@layer_base_option
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
    metavar="[OS/ARCH=]STOREPATH",
    help="Symlink this store path's tree into / (like buildEnv); repeatable. With an "
    "index, OS/ARCH= gives it to that platform only.",
)
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    metavar="OS/ARCH[/VARIANT][=INSTALLABLE]",
    help="The image's platform (default: its derivations' system, else this machine's). "
    "Repeated with =INSTALLABLE: one image per platform, written as an image index.",
)
@click.option(
    "--dest-tls-verify",
    type=bool,
    default=True,
    show_default=True,
    help="For docker:// targets; false allows plain HTTP (loopback registries).",
)
@registry_auth_options("--dest-creds")
@click.option(
    "--sbom",
    "sbom_format",
    type=click.Choice(["spdx", "cyclonedx"]),
    default=None,
    is_flag=False,
    flag_value="spdx",
    help="Attach an SBOM of the closure (default SPDX): an OCI referrer on docker:// "
    "and oci:, FILE.spdx.json beside an archive.",
)
@click.option(
    "--sign-key",
    default=None,
    metavar="KEY",
    help="Sign the pushed image as cosign does with this key (cosign.key or a PEM EC "
    "P-256 key; password from --sign-password-file, COSIGN_PASSWORD or a prompt).",
)
@click.option("--sign-password-file", default=None, metavar="FILE", help="The key's password.")
@base_image_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for machines.")
def build(
    installables: tuple[str, ...],
    nix_file: str | None,
    attrs: tuple[str, ...],
    nix_args: tuple[tuple[str, str], ...],
    argstrs: tuple[tuple[str, str], ...],
    store: str | None,
    substituters: tuple[str, ...],
    trusted_keys: tuple[str, ...],
    no_require_sigs: bool,
    max_layers: int,
    layering: str,
    layer_base: tuple[str, ...],
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
    platforms: tuple[str, ...],
    created: str | None,
    chown: tuple[str, ...],
    chmod: tuple[str, ...],
    mkdir: tuple[str, ...],
    allow_setid: bool,
    dest_tls_verify: bool,
    creds: str | None,
    authfile: str | None,
    sbom_format: str | None,
    sign_key: str | None,
    sign_password_file: str | None,
    base: str | None,
    src_tls_verify: bool,
    src_creds: str | None,
    as_json: bool,
) -> None:
    """Compose an image from Nix store paths and write it to TARGET.

    Layers are cached by content: a layer is tarred and compressed once, ever.
    Paths missing from the local store come from binary caches: --substituter and
    --trusted-public-key, else Nix's own substituters and trusted-public-keys.

    \b
    Examples:
      stowaway build ./result -o oci:out:latest --entrypoint '["/bin/hello"]'
      stowaway build /nix/store/…-app --contents /nix/store/…-busybox \\
          -o docker-archive:app.tar:app:1 --format docker
      stowaway build ./result --substituter file:///srv/cache \\
          --trusted-public-key cache-1:AbC…= -o oci-archive:app.tar
      stowaway build --platform linux/amd64=./result-amd64 \\
          --platform linux/arm64=./result-arm64 -o docker://localhost:5000/app:1
      COSIGN_PASSWORD=… stowaway build ./result -o docker://localhost:5000/app:1 \\
          --dest-tls-verify=false --sbom --sign-key cosign.key
      stowaway build ./result --from docker://reg.example/debian:12 \\
          -o docker://reg.example/app:1
      stowaway build .#app2 --layer-base .#python3 -o oci:out:app2
          (the base's layers are the same in every image built over it)
    """
    from stowaway._ui import progress_display
    from stowaway.image.layer_cache import LayerCache, default_cache_dir
    from stowaway.image.layers import LayerSettings
    from stowaway.image.tar import default_mtime
    from stowaway.installables import platform_images, resolve
    from stowaway.sinks import RegistryTarget, parse_target, require_index_support
    from stowaway.sinks.pipeline import BaseSpec, build_and_write

    dest = parse_target(target)
    cache = LayerCache(Path(cache_dir) if cache_dir else default_cache_dir())
    cache.check_writable(  # before any work
        hint="pass --cache-dir DIR"
        if cache_dir
        else "pass --cache-dir DIR or set XDG_CACHE_HOME to a writable directory"
    )
    lookup = credentials_from_flags(creds, authfile) if isinstance(dest, RegistryTarget) else None
    key = _signing_key(sign_key, sign_password_file, dest) if sign_key else None
    wanted, as_index = platform_images(
        platforms,
        contents,
        lambda: _roots(installables, nix_file, attrs, nix_args, argstrs),
        arguments=bool(installables or nix_file),
    )
    if as_index:
        require_index_support(dest)
    everything = [p for w in wanted for p in [*w.roots, *w.contents]]
    source, clo = _closure(everything, store, substituters, trusted_keys, no_require_sigs)
    params = click.get_current_context().params
    plain_http_hint = "for a plain-HTTP registry pass --dest-tls-verify=false"
    with source, progress_display(not as_json) as prog:
        if prog:
            prog.phase("layers", sum(info.nar_size for info in clo.values()))
        built = build_and_write(
            wanted,
            as_index=as_index,
            source=source,
            closure=clo,
            options_for=lambda paths: image_options_from_flags(params, contents=paths),
            dest=dest,
            name=target,
            cache=cache,
            settings=LayerSettings(
                compression=compression,  # type: ignore[arg-type]
                level=compression_level,
                mtime=default_mtime(),
            ),
            strategy=layering,
            max_layers=max_layers,
            format=fmt,  # type: ignore[arg-type]
            jobs=jobs,
            base=BaseSpec(base, src_tls_verify, credentials_from_flags(src_creds, authfile))
            if base
            else None,
            layer_base=resolve(layer_base),
            write_opts={
                "tls_verify": dest_tls_verify,
                "plain_http_hint": plain_http_hint,
                "creds": lookup,
                "state_dir": cache.root,  # which repos got which blobs: mount sources
            },
            sbom_format=sbom_format,  # type: ignore[arg-type]
            sign_key=key,
            on_write=lambda: (
                prog.phase("push" if isinstance(dest, RegistryTarget) else "write")
                if prog
                else None
            ),
            **({"progress": prog} if prog else {}),
        )
    _print_build(target, built, registry=isinstance(dest, RegistryTarget), as_json=as_json)


def _print_build(target: str, built: Built, *, registry: bool, as_json: bool) -> None:
    """The summary of `build`: per image its layers, whether each was built or came
    from the layer cache or the base, and what the destination did with it."""
    sink = built.sink
    # per layer: built now or taken from the layer cache, and what the destination got
    # (its bytes written/uploaded, linked/mounted, or nothing: it had the blob already)
    outcome = {d: "written" for d in sink.written}
    outcome |= {d: "linked" for d in sink.linked}
    outcome |= {d: "present" for d in sink.skipped}
    summaries = [_image_summary(one, outcome) for one in built.images]
    summary: dict[str, Any] = {"target": target, **summaries[0]}
    if built.index is not None:
        summary = {
            "target": target,
            "manifest_digest": built.index.manifest.digest,
            "media_type": built.index.manifest.media_type,
            "manifests": summaries,
        }
    extra = getattr(sink, "to_json", None)
    if callable(extra):
        summary["sink"] = extra()
    summary |= built.attached
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    from stowaway._ui import human, layer_table, out

    verbs = ("uploaded", "mounted") if registry else ("written", "linked")
    for one in summaries:
        rows = one["layers"]
        below = sum(1 for r in rows if r.get("base"))
        layer_table(f"{target} ({one['platform']['platform']})", rows)
        out.print(f"manifest {one['manifest_digest']}")
        total = sum(row["size"] for row in rows)
        made = sum(1 for r in rows if r["built"] and not r.get("base"))
        sent = sum(1 for r in rows if r["destination"] == "written")
        linked = sum(1 for r in rows if r["destination"] == "linked")
        from_base = f", {below} from the base" if below else ""
        out.print(
            f"{len(rows)} layers, {human(total)}: {made} built, {len(rows) - made - below} from "
            f"the layer cache{from_base}; {sent} {verbs[0]}, {linked} {verbs[1]}, "
            f"{len(rows) - sent - linked} already there"
        )
    if built.index is not None:
        out.print(f"index {built.index.manifest.digest} ({len(built.images)} platforms)")
    if "sbom" in built.attached:
        out.print(f"sbom {_sbom_where(built.attached['sbom'])}")
    if "signature" in built.attached:
        sig = built.attached["signature"]
        again = " (already signed with this key)" if sig["already_signed"] else ""
        out.print(f"signed: {sig['signature_tag']}{again}")


def _image_summary(one: BuiltImage, outcome: dict[str, str]) -> dict[str, Any]:
    """One image of `build --json`: its platform (and where it came from), digests and
    per layer whether it was built and what the destination did with it."""
    image = one.image
    rows = [
        {
            "digest": layer.digest,
            "diff_id": layer.diff_id,
            "size": layer.size,
            "store_paths": list(layer.store_paths),
            "built": not layer.reused,
            "destination": outcome.get(layer.digest, "present"),
            "reused": layer.reused or outcome.get(layer.digest) == "present",
            **({"base": i < one.base_layers} if one.base_layers else {}),
        }
        for i, layer in enumerate(image.layers)
    ]
    return {
        "platform": one.platform.to_json(),
        "manifest_digest": image.manifest.digest,
        "config_digest": image.config.digest,
        "layers": rows,
    }


def _signing_key(key: str, password_file: str | None, dest: object) -> Any:
    """The private key of --sign-key/--key, read before any work (a wrong password
    fails at once); signatures go where cosign looks: registries only."""
    from stowaway.image.signing_keys import read_signing_key
    from stowaway.sinks import RegistryTarget

    if not isinstance(dest, RegistryTarget):
        raise StowawayError(
            f"{dest} cannot hold a cosign signature",
            hint="sign images pushed to a registry (docker://HOST/REPO:TAG)",
        )

    def password() -> bytes:
        import os
        import sys

        if password_file is not None:
            try:
                with open(password_file, "rb") as f:
                    return f.read().rstrip(b"\r\n")
            except OSError as e:
                raise StowawayError(f"cannot read {password_file}: {e.strerror}") from None
        if "COSIGN_PASSWORD" in os.environ:
            return os.environ["COSIGN_PASSWORD"].encode()
        if sys.stdin is not None and sys.stdin.isatty():
            return str(click.prompt(f"Password for {key}", hide_input=True, err=True)).encode()
        raise StowawayError(
            f"{key} is encrypted and no password was given",
            hint="set COSIGN_PASSWORD or pass a password file",
        )

    return read_signing_key(key, password)


def _sbom_where(done: dict[str, Any]) -> str:
    if done["mode"] == "file":
        return f"written to {done['path']}"
    return f"{done['manifest_digest']} attached ({done['mode']})"


@main.command()
@installable_options
@store_options
@layering_options
@layer_base_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(
    installables: tuple[str, ...],
    nix_file: str | None,
    attrs: tuple[str, ...],
    nix_args: tuple[tuple[str, str], ...],
    argstrs: tuple[tuple[str, str], ...],
    store: str | None,
    substituters: tuple[str, ...],
    trusted_keys: tuple[str, ...],
    no_require_sigs: bool,
    max_layers: int,
    layering: str,
    layer_base: tuple[str, ...],
    as_json: bool,
) -> None:
    """Show how the closure would be split into layers, without building anything.
    (Installables and binary caches as for `stowaway build`.)

    \b
    Examples:
      stowaway plan ./result
      stowaway plan ./result --layering popularity --max-layers 20 --json
      stowaway plan ./result --layer-base /nix/store/…-python3-3.11.9
    """
    from stowaway.image.platform import closure_platform
    from stowaway.installables import resolve
    from stowaway.layering import plan as make_plan

    roots = _roots(installables, nix_file, attrs, nix_args, argstrs)
    source, clo = _closure(roots, store, substituters, trusted_keys, no_require_sigs)
    with source:
        plat = closure_platform(source, roots, clo)
    base = resolve(layer_base)
    result = make_plan(clo, roots, strategy=layering, max_layers=max_layers, base_roots=base)
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
            "platform": plat.to_json(),
            "closure_size": sum(i.nar_size for i in clo.values()),
            "paths": len(clo),
            "layer_base": base,
            "base_layers": result.base_layers,
            "layers": layers,
        }
        click.echo(json.dumps(doc, indent=2))
        return
    from stowaway._ui import human, out, short_paths, table

    # nothing is built: no digests, nothing reused; the customisation layer (config
    # files, --contents links) comes on top at build time and has no store paths
    table(
        f"plan ({result.strategy}): {len(clo)} paths in {len(layers)} store layers "
        "(+ the customisation layer at build time)",
        ["#", "size", "paths", "store paths"],
        [
            [str(i), human(layer.size), str(len(layer.paths)), short_paths(list(layer.paths))]
            for i, layer in enumerate(result.layers)
        ],
        right=3,
    )
    out.print(f"closure: {human(sum(i.nar_size for i in clo.values()))}")
    out.print(f"platform: {plat.platform} (from the {plat.origin})")
    if base:
        out.print(f"layer base: layers 0-{result.base_layers - 1}, planned on their own")


@main.command()
@click.argument("target")
@click.option(
    "--platform",
    default=None,
    is_flag=False,
    flag_value="host",
    metavar="OS/ARCH[/VARIANT]",
    help="Of an image index, show this platform's image; --platform alone: this host's.",
)
@click.option(
    "--tls-verify",
    type=bool,
    default=True,
    show_default=True,
    help="For docker:// targets; false allows plain HTTP (loopback registries).",
)
@registry_auth_options()
@click.option("--json", "as_json", is_flag=True, help="Print the image summary as JSON.")
def inspect(
    target: str,
    platform: str | None,
    tls_verify: bool,
    creds: str | None,
    authfile: str | None,
    as_json: bool,
) -> None:
    """Show an image's config, its layers and the store paths each one holds.

    TARGET is any destination `build` writes: oci:DIR[:TAG], oci-archive:FILE[:TAG],
    docker-archive:FILE[:NAME:TAG] or docker://HOST/REPO[:TAG|@DIGEST]. An image index
    is listed by platform; --platform picks one.

    \b
    Examples:
      stowaway inspect oci:out:latest
      stowaway inspect oci-archive:app.tar --json
      stowaway inspect docker-archive:app.tar:app:1
      stowaway inspect docker://localhost:5000/app:1 --tls-verify=false
      stowaway inspect docker://ghcr.io/org/app:1 --platform linux/arm64 --creds me
    """
    from stowaway.sinks.inspect import read_image_summary

    lookup = credentials_from_flags(creds, authfile) if target.startswith("docker:") else None
    summary = read_image_summary(target, platform=platform, tls_verify=tls_verify, creds=lookup)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    from stowaway._ui import human, key_values, out, short_paths, table

    if summary["index"]:
        table(
            f"{target}: an image index ({summary['media_type']}); pick one with --platform",
            ["platform", "size", "digest"],
            [[p["platform"], human(int(p["size"])), p["digest"]] for p in summary["platforms"]],
        )
        out.print(f"index {summary['manifest_digest']}")
        return
    c = summary["config"]
    platform_name = "/".join(x for x in (c["os"], c["architecture"], c["variant"]) if x)
    key_values(
        [
            ("manifest", summary["manifest_digest"] or "(none: docker save keeps no manifest)"),
            ("index", summary.get("index_digest") or ""),
            ("config", summary["config_digest"]),
            ("tags", " ".join(summary.get("repo_tags", []))),
            ("platform", platform_name),
            ("created", c["created"] or ""),
            ("entrypoint", json.dumps(c["entrypoint"]) if c["entrypoint"] is not None else ""),
            ("cmd", json.dumps(c["cmd"]) if c["cmd"] is not None else ""),
            ("user", c["user"] or ""),
            ("workdir", c["workdir"] or ""),
            ("env", " ".join(c["env"])),
            ("ports", " ".join(c["exposed_ports"])),
            ("labels", " ".join(f"{k}={v}" for k, v in sorted(c["labels"].items()))),
        ]
    )
    layers = summary["layers"]
    ours = any(x["store_paths"] for x in layers)  # else no layer is "(customisation)"
    table(
        f"{target}: {len(layers)} layers, {human(sum(int(x['size']) for x in layers))}",
        ["#", "size", "digest", "media type", "store paths"],
        [
            [
                str(i),
                human(int(x["size"])),
                str(x["digest"])[7:19],
                str(x["media_type"]).removeprefix("application/vnd."),
                short_paths(list(x["store_paths"])) if ours else "-",
            ]
            for i, x in enumerate(layers)
        ],
        right=2,
    )


@main.command()
@click.argument("target", nargs=-1, required=True)
@store_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["spdx", "cyclonedx"]),
    default="spdx",
    show_default=True,
    help="SPDX 2.3 or CycloneDX 1.5 JSON.",
)
@click.option("-o", "--output", default=None, metavar="FILE", help="Write it here, not stdout.")
@click.option("--tls-verify", type=bool, default=True, show_default=True, help="For docker://.")
@registry_auth_options()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (with -o) or errors.")
def sbom(
    target: tuple[str, ...],
    store: str | None,
    substituters: tuple[str, ...],
    trusted_keys: tuple[str, ...],
    no_require_sigs: bool,
    fmt: str,
    output: str | None,
    tls_verify: bool,
    creds: str | None,
    authfile: str | None,
    as_json: bool,
) -> None:
    """Print the SBOM of an image: one package per store path (name, version, NAR
    hash, deriver, references), the image's top paths described.

    TARGET is an image `inspect` reads (its store paths come from stowaway's layer
    annotations), or installables (store paths, ./result, flake references). Path
    details come from the local store and substituters, as for `build`.

    \b
    Examples:
      stowaway sbom oci:out:latest > app.spdx.json
      stowaway sbom docker://localhost:5000/app:1 --tls-verify=false --format cyclonedx
      stowaway sbom ./result -o app.spdx.json
    """
    from stowaway.image.sbom import sbom_document, top_paths
    from stowaway.sinks.inspect import image_store_paths

    if len(target) == 1 and target[0].split(":", 1)[0] in _IMAGE_TRANSPORTS:
        remote = target[0].startswith("docker:")
        lookup = credentials_from_flags(creds, authfile) if remote else None
        paths, created = image_store_paths(target[0], tls_verify=tls_verify, creds=lookup)
        name = target[0]
    else:
        paths, created, name = _roots(target, None, ()), 1, " ".join(target)
    source, clo = _closure(paths, store, substituters, trusted_keys, no_require_sigs)
    source.close()
    doc = sbom_document(clo, top_paths(clo), name=name, created=created, fmt=fmt)  # type: ignore[arg-type]
    if output is None:
        click.echo(doc.decode(), nl=False)
        return
    from stowaway.fsutil import atomic_write
    from stowaway.image.digest import sha256_digest

    atomic_write(Path(output), doc)
    info = {"output": output, "format": fmt, "packages": len(clo), "digest": sha256_digest(doc)}
    click.echo(json.dumps(info, indent=2) if as_json else f"{output}: {len(clo)} packages")


_IMAGE_TRANSPORTS = ("oci", "oci-archive", "docker-archive", "docker")


@main.command()
@click.argument("target")
@click.option("--key", required=True, metavar="KEY", help="cosign.key or a PEM EC P-256 key.")
@click.option("--password-file", default=None, metavar="FILE", help="The key's password.")
@click.option("--tls-verify", type=bool, default=True, show_default=True, help="False: plain HTTP.")
@registry_auth_options()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def sign(
    target: str,
    key: str,
    password_file: str | None,
    tls_verify: bool,
    creds: str | None,
    authfile: str | None,
    as_json: bool,
) -> None:
    """Sign an image in a registry as cosign does (`cosign verify --key cosign.pub`
    checks it): the simple-signing payload signed with ECDSA P-256, pushed to the
    tag sha256-<hex>.sig beside signatures already there.

    \b
    Examples:
      COSIGN_PASSWORD=… stowaway sign docker://localhost:5000/app:1 --key cosign.key
      stowaway sign docker://ghcr.io/org/app@sha256:… --key ec.pem --creds me
    """
    from stowaway.sinks import parse_target
    from stowaway.sinks.attach import sign_image

    dest = parse_target(target)
    private = _signing_key(key, password_file, dest)
    lookup = credentials_from_flags(creds, authfile)
    done = sign_image(
        dest, private, tls_verify=tls_verify, creds=lookup,  # type: ignore[arg-type]
        plain_http_hint="for a plain-HTTP registry pass --tls-verify=false",
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(done, indent=2))
        return
    again = " (already signed with this key)" if done["already_signed"] else ""
    click.echo(f"signed {done['signed_digest']}: {done['signature_tag']}{again}")


cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Layer cache (default: $XDG_CACHE_HOME/stowaway).",
)
cache_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _cache_root(cache_dir: str | None) -> Path:
    from stowaway.image.layer_cache import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir()


@main.group(cls=StowawayGroup, invoke_without_command=True)
@cache_dir_option
@cache_json_option
@click.pass_context
def cache(ctx: click.Context, cache_dir: str | None, as_json: bool) -> None:
    """See and prune the layer cache; alone, `cache info`.

    \b
    Examples:
      stowaway cache
      stowaway cache prune --older-than 30d
      stowaway cache prune --max-size 10G --dry-run --json
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(cache_info_command, cache_dir=cache_dir, as_json=as_json)


@cache.command("info")
@cache_dir_option
@cache_json_option
def cache_info_command(cache_dir: str | None, as_json: bool) -> None:
    """Show the cache directory, its layers and blobs, their size and the oldest and
    newest use of a layer.

    \b
    Examples:
      stowaway cache info
      stowaway cache info --cache-dir /var/cache/stowaway --json
    """
    from stowaway.image.cache_prune import cache_info

    info = cache_info(_cache_root(cache_dir))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    import datetime

    from stowaway._ui import human, key_values

    def when(t: float | None) -> str:
        if t is None:
            return "-"
        return datetime.datetime.fromtimestamp(t).isoformat(" ", "seconds")

    key_values(
        [
            ("directory", info["directory"]),
            ("layers", str(info["layers"])),
            ("blobs", str(info["blobs"])),
            ("size", f"{human(info['size'])} ({human(info['layer_size'])} in layers)"),
            ("oldest use", when(info["oldest_use"])),
            ("newest use", when(info["newest_use"])),
        ]
    )


@cache.command("prune")
@cache_dir_option
@click.option(
    "--older-than", metavar="DURATION", help="Remove layers unused this long (90s, 30m, 12h, 7d)."
)
@click.option(
    "--max-size",
    metavar="SIZE",
    help="Then remove the least recently used until the layers take at most SIZE (500M, 10G).",
)
@click.option(
    "--grace",
    metavar="DURATION",
    default="1h",
    show_default=True,
    help="Never remove a layer used this recently (a build still writing it); "
    "keep it above your longest build.",
)
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@cache_json_option
def cache_prune_command(
    cache_dir: str | None,
    older_than: str | None,
    max_size: str | None,
    grace: str,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Remove the least recently used layers (index entry, blob, diff-id record), safely
    while builds and serve use the cache. A blob another layer still uses, or the
    registry's storage links, stays; files that are not the cache's are never touched.

    \b
    Examples:
      stowaway cache prune --older-than 30d
      stowaway cache prune --max-size 10G
      stowaway cache prune --older-than 7d --max-size 2G --dry-run --json
    """
    from stowaway.image.cache_prune import parse_duration, parse_size, prune

    if older_than is None and max_size is None:
        raise StowawayError(
            "nothing to prune by", hint="give --older-than DURATION and/or --max-size SIZE"
        )
    result = prune(
        _cache_root(cache_dir),
        older_than=parse_duration(older_than) if older_than is not None else None,
        max_size=parse_size(max_size) if max_size is not None else None,
        grace=parse_duration(grace, "--grace"),
        dry_run=dry_run,
    )
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    from stowaway._ui import human, out

    verb = "would remove" if dry_run else "removed"
    out.print(
        f"{verb} {len(result.removed_layers)} layers and {len(result.removed_blobs)} blobs "
        f"({human(result.freed)}); {result.kept_layers} layers kept ({human(result.kept_size)})"
    )
    if result.in_grace:
        out.print(f"{result.in_grace} layers used within --grace {grace} kept")


if __name__ == "__main__":  # pragma: no cover
    main()
