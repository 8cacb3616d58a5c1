"""`stowaway pull`: flags → pull_image → one summary line (or JSON)."""

from __future__ import annotations

import json

import click

from stowaway.cli_options import StowawayCommand, credentials_from_flags, registry_auth_options
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
@registry_auth_options()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pull_command(
    reference: str,
    address: str,
    namespace: str,
    snapshotter: str,
    plain_http: bool,
    creds: str | None,
    authfile: str | None,
    as_json: bool,
) -> None:
    """Pull an image into containerd the way CRI does, so the stowaway snapshotter can skip
    downloading layers whose store paths the node already has (`ctr pull` cannot).

    Credentials: --creds, else --authfile / $REGISTRY_AUTH_FILE, else the podman and
    docker login files (see docs/credentials.md)."""
    lookup = credentials_from_flags(creds, authfile)
    client = ContainerdClient(address, namespace)
    try:
        result = pull_image(
            reference, client, snapshotter=snapshotter, plain_http=plain_http, creds=lookup
        )
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
