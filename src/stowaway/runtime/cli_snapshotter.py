"""`stowaway snapshotter`: flags → SnapshotterConfig → serve_snapshotter (nothing else)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from stowaway.cli_options import StowawayCommand, cache_options
from stowaway.runtime.snapshots_service import serve_snapshotter
from stowaway.runtime.snapshotter.state import SnapshotterConfig

__all__ = ["snapshotter_command"]


@click.command("snapshotter", cls=StowawayCommand)
@click.option(
    "--socket",
    "socket",
    required=True,
    type=click.Path(path_type=Path),
    help="Unix socket containerd's proxy plugin connects to.",
)
@click.option(
    "--store",
    default="/nix/store",
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Nix store directory (may be a read-only SAN/NFS mount).",
)
@click.option(
    "--root",
    "root",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="State directory: metadata, snapshots, stub trees.",
)
@click.option(
    "--local-store",
    type=click.Path(path_type=Path, file_okay=False),
    help="Writable directory for store paths substituted from binary caches; the "
    "snapshotter's own: Cleanup (after containerd's GC) deletes paths no snapshot uses.",
)
@cache_options
@click.option(
    "--gcroots",
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory for GC roots [default: /nix/var/nix/gcroots/stowaway for "
    "/nix/store, else ROOT/gcroots].",
)
@click.option(
    "--mode",
    type=click.Choice(["auto", "overlay", "bind", "hardlink", "copy"]),
    default="auto",
    show_default=True,
    help="Rootfs strategy; auto probes at start-up (overlay, else bind on containerd "
    ">= 1.7, else hardlink, else copy).",
)
@click.option(
    "--containerd-version",
    metavar="X.Y",
    help="containerd's version [default: `containerd --version` on PATH, else 1.6]; "
    "bind mode needs >= 1.7.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning"]),
    default="info",
    show_default=True,
    help="debug also logs the time spent in every gRPC call.",
)
def snapshotter_command(
    socket: Path,
    store: Path,
    root: Path,
    local_store: Path | None,
    substituters: tuple[str, ...],
    trusted_keys: tuple[str, ...],
    gcroots: Path | None,
    mode: str,
    containerd_version: str | None,
    log_level: str,
) -> None:
    """Serve a containerd proxy snapshotter that composes root filesystems from a Nix store."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    config = SnapshotterConfig(
        root=root.absolute(),
        store=store.absolute(),
        local_store=local_store.absolute() if local_store else None,
        substituters=substituters,
        trusted_public_keys=trusted_keys,
        gcroots=gcroots.absolute() if gcroots else None,
        mode=None if mode == "auto" else mode,  # type: ignore[arg-type]
        containerd_version=containerd_version,
    )
    serve_snapshotter(config, socket.absolute())
