"""``stowaway serve`` and ``stowaway index``: flag parsing only (registered lazily
in ``stowaway.cli``); the work is ``registry.app.serve``, ``NixResolver`` and
``registry.package_index``."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import click

from stowaway.cli_options import StowawayCommand, store_options
from stowaway.errors import StowawayError


@click.command("serve", cls=StowawayCommand)
@click.option(
    "--listen", metavar="HOST:PORT", help="Address to listen on (default 127.0.0.1:5000)."
)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file.")
@store_options
@click.option("--index", type=click.Path(dir_okay=False), help="Package index of the tag latest.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Layer cache directory.")
@click.option("--storage", metavar="DIR|s3://BUCKET/PREFIX", help="Where blobs and manifests live.")
@click.option("--s3-endpoint", metavar="URL")
@click.option("--s3-region")
@click.option("--s3-access-key")
@click.option("--s3-secret-key")
@click.option("--tls-cert", type=click.Path(dir_okay=False))
@click.option("--tls-key", type=click.Path(dir_okay=False))
@click.option("--no-compose", is_flag=True, help="A plain registry: no images built on demand.")
def serve_command(
    listen: str | None,
    config_file: str | None,
    store: str | None,
    substituters: tuple[str, ...],
    trusted_keys: tuple[str, ...],
    no_require_sigs: bool,
    index: str | None,
    cache_dir: str | None,
    storage: str | None,
    s3_endpoint: str | None,
    s3_region: str | None,
    s3_access_key: str | None,
    s3_secret_key: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    no_compose: bool,
) -> None:
    """Serve the OCI distribution API, composing images of Nix packages on demand.

    \b
    Pull names (Nixery-style):
      HOST/shell/git/htop:latest   packages git, htop + meta-package shell
      HOST/store/<hash>[/<hash>]   store paths by their 32-char hash part
    Flags override the config file (see docs/registry.md).
    """
    from stowaway.image.layer_cache import LayerCache, default_cache_dir
    from stowaway.registry.app import serve
    from stowaway.registry.config import RegistryConfig, load_config, open_storage
    from stowaway.registry.nix_resolver import NixResolver
    from stowaway.registry.package_index import PackageIndexError
    from stowaway.registry.storage import FilesystemStorage

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    resolver = None
    try:
        config = load_config(Path(config_file)) if config_file else RegistryConfig()
        top: dict[str, Any] = {"listen": listen, "storage": storage}
        top |= {"tls_cert": tls_cert and Path(tls_cert), "tls_key": tls_key and Path(tls_key)}
        s3 = {"endpoint": s3_endpoint, "region": s3_region}
        s3 |= {"access_key": s3_access_key, "secret_key": s3_secret_key}
        nix: dict[str, Any] = {"store": store, "index": index and Path(index)}
        nix["cache_dir"] = cache_dir and Path(cache_dir)
        if substituters:
            nix["substituters"] = substituters
        if trusted_keys:
            nix["trusted_public_keys"] = trusted_keys
        if no_require_sigs:
            nix["require_sigs"] = False
        if no_compose:
            nix["enabled"] = False
        config = dataclasses.replace(
            config,
            **{k: v for k, v in top.items() if v is not None},
            s3=dataclasses.replace(config.s3, **{k: v for k, v in s3.items() if v is not None}),
            nix=dataclasses.replace(config.nix, **{k: v for k, v in nix.items() if v is not None}),
        )
        if (config.tls_cert is None) != (config.tls_key is None):
            raise StowawayError("--tls-cert and --tls-key go together")
        config.host_port  # noqa: B018 - validate before binding
        try:
            backend = open_storage(config)
        except OSError as err:
            raise StowawayError(
                f"cannot use the storage directory {config.storage}: {err.strerror}"
                + (f" ({err.filename})" if err.filename else ""),
                hint="pass --storage DIR (or storage in the config file) naming a writable "
                "directory",
            ) from None
        if config.nix.enabled:
            # the filesystem storage root is the layer cache: composed blobs are
            # already in storage; with S3 the cache stays local and blobs are uploaded
            root = config.nix.cache_dir
            if root is None:
                fs = backend.root if isinstance(backend, FilesystemStorage) else None
                root = fs or default_cache_dir()
            cache = LayerCache(root)
            cache.check_writable(  # before listening, not at the first pull
                hint="pass --cache-dir DIR (or cache_dir in the [nix] table of the config), "
                "or --no-compose to serve only what is pushed"
            )
            resolver = NixResolver(config.nix, cache)
            try:
                resolver.check_indexes()
            except PackageIndexError as err:
                raise StowawayError(
                    err.message,
                    hint="check --index (or index/indexes in the [nix] table of the config); "
                    "`stowaway index -o FILE` writes one",
                ) from None
        asyncio.run(serve(config, resolver, storage=backend, landing=resolver))
    finally:
        if resolver is not None:
            resolver.close()


@click.command("index", cls=StowawayCommand)
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="Index file to write."
)
@click.option(
    "--from-nix-env",
    "nix_env",
    type=click.File("rb"),
    help="Output of `nix-env -qaP --out-path --json` (FILE, or - for stdin).",
)
@click.option("--strip-prefix", default="", help="Drop this attribute prefix (e.g. nixpkgs.).")
@click.option("--from-cache", "cache_url", metavar="URL", help="Binary cache holding PATHS.")
@click.option(
    "--paths-from",
    type=click.File("r"),
    help="Store paths, one a line (FILE or -), with --from-cache.",
)
@click.option("--trusted-public-key", "trusted_keys", multiple=True, metavar="NAME:BASE64")
@click.option("--no-require-sigs", is_flag=True)
@click.option(
    "--from-links",
    "links",
    type=click.Path(file_okay=False, exists=True),
    help="Directory of symlinks into the store (link name = package name).",
)
@click.argument("paths", nargs=-1)
def index_command(
    output: str,
    nix_env: Any,
    strip_prefix: str,
    cache_url: str | None,
    paths_from: Any,
    trusted_keys: tuple[str, ...],
    no_require_sigs: bool,
    links: str | None,
    paths: tuple[str, ...],
) -> None:
    """Write a package index (name → store path) for `stowaway serve`.

    \b
    Examples:
      nix-env -f '<nixpkgs>' -qaP --out-path --json | stowaway index -o idx.json --from-nix-env -
      stowaway index -o idx.json --from-cache https://cache.example --trusted-public-key K PATH...
      stowaway index -o idx.json --from-links ./results
    Store path names map to package names by Nix's rule: hello-2.12 -> hello,
    hello-2.12-man -> hello.man; with several versions the newest wins.
    """
    from stowaway.registry import package_index as pi

    chosen = [x for x in (nix_env, cache_url, links) if x]
    if len(chosen) != 1:
        raise StowawayError("give exactly one of --from-nix-env, --from-cache, --from-links")
    if (paths or paths_from) and not cache_url:
        raise StowawayError("store paths are only read with --from-cache")
    if nix_env is not None:
        index = pi.from_nix_env_json(
            nix_env.read(), getattr(nix_env, "name", "<stdin>"), strip_prefix
        )
    elif cache_url is not None:
        from stowaway.store.binary_cache import BinaryCache
        from stowaway.store.narinfo import PublicKey

        keys = [PublicKey.parse(k) for k in trusted_keys]
        cache = BinaryCache(cache_url, keys, require_signatures=not no_require_sigs)
        listed = [*paths, *(ln for ln in (paths_from or []) if ln.strip())]
        if not listed:
            raise StowawayError("--from-cache needs store paths (arguments or --paths-from)")
        index = pi.from_store_paths(listed, cache)
    else:
        assert links is not None
        index = pi.from_result_links(Path(links))
    pi.write_index(Path(output), index)
    click.echo(f"wrote {len(index.packages)} packages to {output}", err=True)
