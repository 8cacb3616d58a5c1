"""`stowaway cri-image-service`: flags → NixImages + ImageServiceProxy → serve until signalled."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import click
import grpc

from stowaway.cli_options import StowawayCommand, cache_options
from stowaway.errors import StowawayError
from stowaway.image.layer_cache import default_cache_dir
from stowaway.runtime.containerd_client import ContainerdClient
from stowaway.runtime.cri.image_service import ImageServiceProxy, serve
from stowaway.runtime.cri.nix_images import NixImages, StoreConfig
from stowaway.runtime.gcroots import GcRoots
from stowaway.store.binary_cache import BinaryCache
from stowaway.store.narinfo import PublicKey

__all__ = ["cri_image_service_command", "make_service"]

log = logging.getLogger(__name__)

DEFAULT_GCROOTS = Path("/nix/var/nix/gcroots/stowaway-cri")


def make_service(
    containerd: str,
    *,
    store: Path = Path("/nix/store"),
    substituters: tuple[str, ...] = (),
    keys: tuple[str, ...] = (),
    require_sigs: bool = True,
    snapshotter: str = "stowaway",
    gcroots: Path = DEFAULT_GCROOTS,
    cache_dir: Path | None = None,
    namespace: str = "k8s.io",
) -> ImageServiceProxy:
    """Wire the service; falls back to containerd's overlayfs snapshotter (and says so)
    when ``snapshotter`` is not available in containerd."""
    client = ContainerdClient(containerd, namespace)
    if not client.snapshotter_available(snapshotter):
        if snapshotter == "overlayfs" or not client.snapshotter_available("overlayfs"):
            raise StowawayError(f"containerd at {containerd} has no snapshotter {snapshotter!r}")
        log.warning(
            "snapshotter %r not available in containerd; unpacking with overlayfs", snapshotter
        )
        snapshotter = "overlayfs"
    public = [PublicKey.parse(k) for k in keys]
    caches = [BinaryCache(u, public, require_signatures=require_sigs) for u in substituters]
    config = StoreConfig(store.absolute(), caches, (cache_dir or default_cache_dir()).absolute())
    nix = NixImages(client, config, GcRoots(gcroots.absolute()), snapshotter)
    nix.reconcile_roots()
    upstream = grpc.insecure_channel(f"unix:{containerd}")
    return ImageServiceProxy(nix, upstream)


@click.command("cri-image-service", cls=StowawayCommand)
@click.option(
    "--socket",
    "socket",
    required=True,
    type=click.Path(path_type=Path),
    help="Unix socket to serve runtime.v1.ImageService on (kubelet --image-service-endpoint).",
)
@click.option(
    "--containerd",
    required=True,
    metavar="SOCK",
    help="containerd's socket (its CRI plugin answers every non-nix call).",
)
@click.option(
    "--store",
    default="/nix/store",
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Store directory; without a Nix database, substituted paths are written here.",
)
@cache_options
@click.option("--no-require-sigs", is_flag=True, help="Accept unsigned binary cache paths.")
@click.option(
    "--snapshotter",
    default="stowaway",
    show_default=True,
    help="Snapshotter to unpack into (must match the CRI config); falls back to overlayfs.",
)
@click.option(
    "--gcroots",
    type=click.Path(path_type=Path, file_okay=False),
    default=str(DEFAULT_GCROOTS),
    show_default=True,
    help="Directory of GC root links for the store paths of nix:0 images.",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Layer cache for composed images (default: the stowaway cache).",
)
@click.option("--namespace", default="k8s.io", show_default=True, help="containerd namespace.")
def cri_image_service_command(
    socket: Path,
    containerd: str,
    store: Path,
    substituters: tuple[str, ...],
    trusted_keys: tuple[str, ...],
    no_require_sigs: bool,
    snapshotter: str,
    gcroots: Path,
    cache_dir: Path | None,
    namespace: str,
) -> None:
    """Serve kubelet's image service: nix:0/nix/store/… references from the Nix store,
    everything else proxied to containerd's CRI."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    proxy = make_service(
        containerd,
        store=store,
        substituters=substituters,
        keys=trusted_keys,
        require_sigs=not no_require_sigs,
        snapshotter=snapshotter,
        gcroots=gcroots,
        cache_dir=cache_dir,
        namespace=namespace,
    )
    if socket.exists():
        socket.unlink()
    server = serve(proxy, str(socket.absolute()))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop(grace=5).wait()
    if os.path.exists(socket):
        socket.unlink()
