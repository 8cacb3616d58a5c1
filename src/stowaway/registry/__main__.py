"""``python -m stowaway.registry``: run the registry server. The flags mirror
``stowaway serve`` (the CLI may call ``main`` directly); flags override the
config file."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from pathlib import Path

from stowaway.errors import StowawayError
from stowaway.registry.app import serve
from stowaway.registry.config import RegistryConfig, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stowaway-serve", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML config file")
    parser.add_argument("--listen", help="HOST:PORT")
    parser.add_argument("--storage", help="directory or s3://bucket/prefix")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        config = load_config(args.config) if args.config else RegistryConfig()
        overrides = {
            k: v
            for k, v in vars(args).items()
            if k in ("listen", "storage", "tls_cert", "tls_key") and v is not None
        }
        config = dataclasses.replace(config, **overrides)
        config.host_port  # noqa: B018 - validate before binding
        asyncio.run(serve(config))
    except StowawayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
