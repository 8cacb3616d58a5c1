"""The ``docker://`` sink: push an image to a registry, sending only missing blobs.

Flow (go-containerregistry's pusher is the model): for every blob, one task per
digest on a bounded pool — HEAD it (present: skip), else try a cross-repository
mount from the repository a base layer came from (``Layer.origin``) or from repos
this machine pushed it to before, else upload it, streaming and verifying the cache
file so a damaged entry is never sent; then PUT the manifest. An index's blobs go up in
one such pass, then each platform's manifest by digest, then the index under the tag (a
registry refuses an index whose manifests it does not have).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

from stowaway.distribution.client import RegistryClient, Response, TransportError
from stowaway.distribution.credentials import CredsSource
from stowaway.distribution.errors import RegistryApiError
from stowaway.errors import RegistryError
from stowaway.fsutil import atomic_write
from stowaway.image.digest import CorruptBlob, VerifyingReader, dropping_corrupt
from stowaway.image.index import ImageIndex
from stowaway.image.model import Blob, Image
from stowaway.parallel import Stop, Stopped, run_all
from stowaway.progress import NoProgress, Progress, blob_label

__all__ = ["PushResult", "PushRecord", "push"]

#: Blobs larger than this go up in PATCH chunks of this size (some registries and
#: proxies cap request bodies); smaller ones in one PUT.
CHUNKED_THRESHOLD = 64 << 20
#: Times one blob upload is restarted after a temporary registry error.
UPLOAD_ATTEMPTS = 3
#: Pause before the first restart of a failed upload, in seconds; doubles each time.
RESTART_BACKOFF = 0.5
#: Mount sources tried per blob (each failed mount costs a round trip).
MAX_MOUNT_SOURCES = 3

_QUIET = NoProgress()

Outcome = Literal["existing", "mounted", "uploaded"]


@dataclass
class PushResult:
    """What a push did, by blob digest: each layer, the config and the manifest's
    blobs are in exactly one of ``uploaded``, ``mounted`` and ``existing``. Whether a
    layer was built or came from the cache is the composer's to say (``Layer.reused``)."""

    uploaded: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0
    mounted: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    manifest_digest: str = ""
    manifest_url: str = ""


def push(
    image: Image | ImageIndex,
    host: str,
    repo: str,
    tag: str | None,
    *,
    tls_verify: bool = True,
    plain_http_hint: str | None = None,
    creds: CredsSource = None,
    progress: Progress = _QUIET,
    mount_from: Sequence[str] = (),
    jobs: int = 4,
    state_dir: Path | None = None,
) -> PushResult:
    """Push ``image`` to ``host``/``repo`` under ``tag`` (or by digest when None).
    ``image`` is only read.

    ``state_dir``, when given, holds ``pushed/<host>.json``: which repos got which
    blobs, read for cross-repository mount sources and updated after the push (the
    CLI passes its cache dir). Without it only ``mount_from`` is tried and nothing is
    written. Raises RegistryError (with a hint) or CorruptBlob.
    """
    record = PushRecord.load(state_dir / "pushed" / f"{_safe(host)}.json") if state_dir else None
    blobs = {b.digest: b for b in image.blobs()}
    sources = {
        d: [
            r
            for r in dict.fromkeys(
                [*_origin(b, host), *(record.repos(d) if record else ()), *mount_from]
            )
            if r != repo
        ][:MAX_MOUNT_SOURCES]
        for d, b in blobs.items()
    }
    client = RegistryClient(
        host, tls_verify=tls_verify, creds=creds, plain_http_hint=plain_http_hint
    )
    try:
        client.ping()
        others = sorted({r for rs in sources.values() for r in rs})
        client.authorize(
            [f"repository:{repo}:pull,push", *(f"repository:{r}:pull" for r in others)]
        )
        outcomes = _push_blobs(client, repo, blobs, sources, progress, jobs)
        result = PushResult()
        for digest, outcome in outcomes.items():
            if outcome == "uploaded":
                result.uploaded.append(digest)
                result.uploaded_bytes += blobs[digest].size
            else:
                getattr(result, outcome).append(digest)
        for _, child in image.images if isinstance(image, ImageIndex) else ():
            _put_manifest(client, repo, None, child.manifest)
        result.manifest_digest, result.manifest_url = _put_manifest(
            client, repo, tag, image.manifest
        )
    finally:
        client.close()
    if record is not None:
        record.add(blobs, repo)
        record.save()
    return result


def _origin(blob: Blob, host: str) -> list[str]:
    """The repository a layer came from, when it is on the registry we push to."""
    origin = getattr(blob, "origin", None)
    return [origin[1]] if origin is not None and origin[0] == host else []


def _push_blobs(
    client: RegistryClient,
    repo: str,
    blobs: dict[str, Blob],
    sources: dict[str, list[str]],
    progress: Progress,
    jobs: int,
) -> dict[str, Outcome]:
    """One task per digest on at most ``jobs`` threads; the first failure, or Ctrl-C,
    stops the uploads under way at their next chunk (their sessions are cancelled)."""
    digests = list(blobs)
    tasks = [partial(_push_blob, client, repo, blobs[d], sources[d], progress) for d in digests]
    outcomes = run_all(tasks, jobs, "stowaway-push")
    return dict(zip(digests, outcomes, strict=True))


def _push_blob(
    client: RegistryClient,
    repo: str,
    blob: Blob,
    sources: Sequence[str],
    progress: Progress,
    stop: Stop,
) -> Outcome:
    key = f"push:{blob.digest}"
    progress.start(key, blob_label("push", blob), blob.size)
    try:
        head = client.request("HEAD", client.url(f"/v2/{repo}/blobs/{blob.digest}"), ok=(200, 404))
        if head.status == 200:
            progress.advance(key, blob.size)
            return "existing"
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            location = None
            for source in sources if attempt == 1 else ():
                if location is not None:
                    _abandon(client, client.url(location))  # Location may be relative
                resp = client.request(
                    "POST",
                    client.url(f"/v2/{repo}/blobs/uploads/", mount=blob.digest, **{"from": source}),
                    ok=(201, 202),
                )
                if resp.status == 201:
                    progress.advance(key, blob.size)
                    return "mounted"
                location = _location(resp, f"mount {blob.digest} from {source}")
            if location is None:
                resp = client.request("POST", client.url(f"/v2/{repo}/blobs/uploads/"), ok=(202,))
                location = _location(resp, f"start upload of {blob.digest}")
            try:
                with dropping_corrupt(blob):  # a damaged cache entry is dropped, rebuilt later
                    _upload(
                        client, client.url(location), blob, lambda n: progress.advance(key, n), stop
                    )
                return "uploaded"
            except (CorruptBlob, Stopped):
                _abandon(client, client.url(location))
                raise
            except (RegistryApiError, TransportError) as e:
                _abandon(client, client.url(location))
                if not e.temporary or attempt == UPLOAD_ATTEMPTS:
                    raise
                time.sleep(RESTART_BACKOFF * 2 ** (attempt - 1))
        raise AssertionError("unreachable")
    finally:
        progress.finish(key)


def _upload(
    client: RegistryClient, url: str, blob: Blob, on_sent: Callable[[int], None], stop: Stop
) -> None:
    """Send the blob's bytes to an upload session and commit it with ``?digest=``."""
    octets = {"Content-Type": "application/octet-stream"}
    with blob.open() as f:
        reader = _Stoppable(VerifyingReader(f, blob.digest, blob.size), stop)
        if blob.size <= CHUNKED_THRESHOLD:
            client.send_stream(
                "PUT", client.url(url, digest=blob.digest), reader, blob.size,
                ok=(201,), headers=octets, on_sent=on_sent,
            )  # fmt: skip
            return
        start = 0
        while start < blob.size:
            n = min(CHUNKED_THRESHOLD, blob.size - start)
            headers = {**octets, "Content-Range": f"{start}-{start + n - 1}"}
            resp = client.send_stream(
                "PATCH", url, _Slice(reader, n), n, ok=(202,), headers=headers, on_sent=on_sent
            )
            url = client.url(_location(resp, f"upload of {blob.digest}"))
            start += n
    client.request("PUT", client.url(url, digest=blob.digest), ok=(201,), body=b"")


def _put_manifest(
    client: RegistryClient, repo: str, tag: str | None, manifest: Blob
) -> tuple[str, str]:
    with manifest.open() as f:
        body = VerifyingReader(f, manifest.digest, manifest.size).read()
    url = client.url(f"/v2/{repo}/manifests/{tag or manifest.digest}")
    resp = client.request(
        "PUT", url, ok=(201,), headers={"Content-Type": manifest.media_type}, body=body
    )
    answered = resp.header("Docker-Content-Digest")
    if answered is not None and answered != manifest.digest:
        raise RegistryError(
            f"{url}: registry stored the manifest as {answered}, expected {manifest.digest}",
            hint="the registry rewrote the manifest; pull by tag, not by digest",
        )
    loc = resp.header("Location")
    return manifest.digest, client.url(loc) if loc else client.url(
        f"/v2/{repo}/manifests/{manifest.digest}"
    )


def _location(resp: Response, what: str) -> str:
    loc = resp.header("Location")
    if not loc:
        raise RegistryError(f"registry answered {what} without a Location header")
    return loc


def _abandon(client: RegistryClient, url: str) -> None:
    """Cancel an upload session, best effort (the registry purges stale ones anyway)."""
    with contextlib.suppress(RegistryError, OSError):
        client.request("DELETE", url, ok=(204, 404))


class _Stoppable:
    """A reader that raises ``Stopped`` once the push is stopped: ``send_stream`` reads
    the next chunk before sending one, so the request never completes and the
    registry commits nothing."""

    def __init__(self, reader: VerifyingReader, stop: Stop) -> None:
        self._reader = reader
        self._stop = stop

    def read(self, n: int = -1) -> bytes:
        self._stop.check()
        return self._reader.read(n)


class _Slice:
    """At most ``n`` bytes of a reader, for one PATCH chunk."""

    def __init__(self, reader: _Stoppable, n: int) -> None:
        self._reader = reader
        self._left = n

    def read(self, n: int = -1) -> bytes:
        want = self._left if n < 0 else min(n, self._left)
        data = self._reader.read(want) if want else b""
        self._left -= len(data)
        return data


class PushRecord:
    """Which repos of one registry host this machine pushed each blob to: the
    candidates for cross-repository mounts. A hint only, so a damaged file is
    ignored; writes are atomic; a concurrent push may lose an entry, never corrupt."""

    REPOS_PER_BLOB = 5
    MAX_BLOBS = 50_000

    def __init__(self, path: Path, blobs: dict[str, list[str]] | None = None) -> None:
        self.path = path
        self.blobs = blobs or {}

    @classmethod
    def load(cls, path: Path) -> PushRecord:
        return cls(path, _read_record(path))

    def repos(self, digest: str) -> list[str]:
        return list(self.blobs.get(digest, ()))

    def add(self, digests: Iterable[str], repo: str) -> None:
        for d in digests:
            repos = [repo, *(r for r in self.blobs.pop(d, ()) if r != repo)]
            self.blobs[d] = repos[: self.REPOS_PER_BLOB]  # re-insert: newest last

    def save(self) -> None:
        merged = _read_record(self.path)
        for d, repos in self.blobs.items():
            old = merged.pop(d, [])
            merged[d] = list(dict.fromkeys([*repos, *old]))[: self.REPOS_PER_BLOB]
        keep = dict(list(merged.items())[-self.MAX_BLOBS :])
        doc = {"version": 1, "blobs": keep}
        atomic_write(self.path, json.dumps(doc, separators=(",", ":")).encode())
        self.blobs = keep


def _read_record(path: Path) -> dict[str, list[str]]:
    try:
        doc = json.loads(path.read_bytes())
        blobs = doc["blobs"]
        return {str(d): [str(r) for r in rs] for d, rs in blobs.items() if isinstance(rs, list)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _safe(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", host)
