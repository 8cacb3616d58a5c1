"""Command-line faces of the BuildKit frontend (registered in ``stowaway.cli``):

``stowaway buildkit context`` (``buildkit_group``) writes a build context on the client;
``stowaway frontend`` (``frontend_command``) is the frontend image's entrypoint.
"""

from __future__ import annotations

import click

from stowaway.cli_options import (
    StowawayCommand,
    StowawayGroup,
    argstr_option,
    image_flags,
    image_options_from_flags,
    layering_options,
)

__all__ = ["buildkit_group", "frontend_command"]


@click.group("buildkit", cls=StowawayGroup)
def buildkit_group() -> None:
    """Nix builds inside `docker build`: one derivation, one BuildKit step.

    \b
    Example:
      stowaway buildkit context app.nix -A app --entrypoint /nix/store/…/bin/app -o ctx
      DOCKER_BUILDKIT=1 docker build -f ctx/stowaway.json \\
          --build-arg BUILDKIT_SYNTAX=stowaway-frontend:latest -t app ctx
    """


@buildkit_group.command("context")
@click.argument("nix_file", metavar="FILE.nix")
@click.option("-A", "--attr", "attrs", multiple=True, help="Attribute of FILE.nix; repeatable.")
@argstr_option
@click.option("-o", "--output", "out_dir", required=True, metavar="CTXDIR", help="Context dir.")
@layering_options
@image_flags
def context_command(
    nix_file: str,
    attrs: tuple[str, ...],
    argstrs: tuple[tuple[str, str], ...],
    out_dir: str,
    max_layers: int,
    layering: str,
    entrypoint: str | None,
    cmd: str | None,
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    expose: tuple[str, ...],
    labels: tuple[str, ...],
    created: str | None,
    chown: tuple[str, ...],
    chmod: tuple[str, ...],
    mkdir: tuple[str, ...],
    allow_setid: bool,
) -> None:
    """Evaluate FILE.nix (nix-instantiate) and write a BuildKit context to CTXDIR:
    the .drv closure, its input sources and stowaway.json (targets, image config)."""
    from stowaway.buildkit.context import make_context

    options = image_options_from_flags(click.get_current_context().params)
    result = make_context(
        nix_file,
        attrs,
        out_dir,
        options,
        layering=layering,
        max_layers=max_layers,
        argstrs=dict(argstrs),
    )
    refs = "exact (outputs built locally)" if result.spec.references is not None else "build-time"
    click.echo(
        f"{result.path}: {result.derivations} derivations, {result.sources} sources, "
        f"references {refs}; targets: " + " ".join(t.path for t in result.spec.targets)
    )


@click.command("frontend", cls=StowawayCommand)
def frontend_command() -> None:
    """BuildKit frontend entrypoint: speaks the gateway API on stdin/stdout."""
    from stowaway.buildkit.frontend import main

    click.get_current_context().exit(main())
