"""Repository links for stores written before blobs were scoped to repositories.

Blobs are served under a repository only where they were pushed, mounted or composed,
which storage records as a link per (repository, blob). A store written by an earlier
stowaway has blobs and manifests but no links, so at start-up every blob that a tagged
manifest (or an index's manifests) of a repository references is linked there: what
clients could pull before stays pullable, and only there.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from stowaway.registry.storage_api import Storage

__all__ = ["link_tagged_blobs"]

log = logging.getLogger("stowaway.registry")


def _references(data: bytes) -> tuple[list[str], list[str]]:
    """(blob digests, child manifest digests) a stored manifest names; a document that
    is no manifest names nothing (it was validated when it was stored)."""
    try:
        doc: Any = json.loads(data)
    except ValueError:
        return [], []
    if not isinstance(doc, dict):
        return [], []

    def digests(items: Any) -> list[str]:
        if not isinstance(items, list):
            return []
        return [
            d["digest"] for d in items if isinstance(d, dict) and isinstance(d.get("digest"), str)
        ]

    return digests([doc.get("config"), *(doc.get("layers") or [])]), digests(doc.get("manifests"))


async def link_tagged_blobs(storage: Storage) -> int:
    """Link, in each repository, the blobs its tagged manifests reference; returns how
    many links were missing."""
    made = 0
    for name in await storage.list_repositories():
        seen: set[str] = set()
        todo = [
            d for t in await storage.list_tags(name) or [] if (d := await storage.get_tag(name, t))
        ]
        while todo:
            digest = todo.pop()
            if digest in seen:
                continue
            seen.add(digest)
            got = await storage.get_manifest(name, digest)
            if got is None:
                continue
            blobs, children = _references(got[0])
            todo += children
            for blob in blobs:
                if await storage.blob_linked(name, blob) or await storage.blob_size(blob) is None:
                    continue
                await storage.link_blob(name, blob)
                made += 1
    if made:
        log.info("linked %d blobs to the repositories whose tagged manifests use them", made)
    return made
