"""`stowaway pull`: flags → pull_image → one summary line (or JSON)."""

from __future__ import annotations

import json

import click

from stowaway.cli_options import StowawayCommand
from stowaway.runtime.containerd_client import ContainerdClient
from stowaway.runtime.pull import pull_image

__all__ = ["pull_command"]


@click.command("pull", cls=StowawayCommand)
@click.argument("reference", metavar="HOST/REPO[:TAG|@DIGEST]")
@click.option(
    "--containerd",
    "address",
    default="/run/containerd/containerd.sock",
    show_default=True,
    help="containerd's gRPC socket.",
)
@click.option("--namespace", default="default", show_default=True, help="containerd namespace.")
@click.option(
    "--snapshotter",
    default="stowaway",
    show_default=True,
    help="Snapshotter to unpack with (stowaway skips layers it has in the Nix store).",
)
@click.option("--plain-http", is_flag=True, help="Talk to the registry over plain HTTP.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pull_command(
    reference: str, address: str, namespace: str, snapshotter: str, plain_http: bool, as_json: bool
) -> None:
    """Pull an image into containerd the way CRI does, so the stowaway snapshotter can skip
    downloading layers whose store paths the node already has (`ctr pull` cannot)."""
    client = ContainerdClient(address, namespace)
    try:
        result = pull_image(reference, client, snapshotter=snapshotter, plain_http=plain_http)
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    skipped = len(result.layers) - len(result.downloaded_layers)
    click.echo(
        f"{result.name}: {len(result.layers)} layers, {skipped} without download, "
        f"{result.bytes_downloaded} bytes downloaded (manifest {result.manifest_digest})"
    )
