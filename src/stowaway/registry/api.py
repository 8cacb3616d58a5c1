"""The OCI distribution API: the request handlers, from requests to ``Storage`` calls
and responses (manifest bodies are checked in ``validate``, resolver output goes
through ``resolved``, HTTP mechanics are in ``http_helpers``).

Every ``/v2/`` request goes through one dispatcher that validates the *raw*
path (``validate.parse_route``) before anything else, so a malformed name,
tag, digest or traversal attempt never reaches storage.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from aiohttp import web

from stowaway.distribution.errors import ErrorCode, RegistryApiError
from stowaway.registry.auth import ANONYMOUS, READ_METHODS, TOKEN_LIFETIME, Authenticator, Caller
from stowaway.registry.config import RegistryConfig
from stowaway.registry.http_helpers import (
    API_VERSION,
    CALLER_KEY,
    SCOPE_KEY,
    SentOnceFileResponse,
    chunk_offset,
    paginate,
    read_body,
    unsupported,
)
from stowaway.registry.metrics import Metrics
from stowaway.registry.resolved import ResolvedManifests
from stowaway.registry.resolver import ManifestResolver
from stowaway.registry.storage_api import CHUNK, Storage, too_large
from stowaway.registry.validate import (
    CheckedManifest,
    Route,
    check_digest,
    check_manifest,
    check_name,
    is_digest,
    parse_accept,
    parse_range,
    parse_route,
)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"


class RegistryApi:
    def __init__(
        self,
        config: RegistryConfig,
        storage: Storage,
        resolver: ManifestResolver | None = None,
    ) -> None:
        self.config = config
        self.storage = storage
        self.auth = Authenticator(config)
        self.metrics = Metrics()
        self.resolved = ResolvedManifests(storage, resolver, self.metrics)

    # -- entry point -----------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = parse_route(request.raw_path)
        if route is None:
            return await self.base(request)
        method = request.method
        caller = await self._caller(request)
        action = "pull" if method in READ_METHODS else "push"
        request[SCOPE_KEY] = (
            f"repository:{route.name}:{'pull' if action == 'pull' else 'pull,push'}"
        )
        self.auth.authorize(caller, route.name, action)
        match route.kind, method:
            case "manifest", "GET" | "HEAD":
                return await self.get_manifest(request, route)
            case "manifest", "PUT":
                return await self.put_manifest(request, route)
            case "manifest", "DELETE":
                return await self.delete_manifest(route)
            case "blob", "GET" | "HEAD":
                return await self.get_blob(request, route)
            case "tags", "GET":
                return await self.list_tags(request, route)
            case "referrers", "GET":
                return await self.list_referrers(request, route)
            case "upload_start", "POST":
                return await self.start_upload(request, route)
            case "upload", "GET":
                return await self.upload_status(route)
            case "upload", "PATCH":
                return await self.patch_upload(request, route)
            case "upload", "PUT":
                return await self.finish_upload(request, route)
            case "upload", "DELETE":
                await self.storage.upload_cancel(route.name, route.reference)
                return web.Response(status=204, headers=API_VERSION)
        raise unsupported(f"{method} is not supported on {request.path}")

    async def _caller(self, request: web.Request) -> Caller:
        """Who sent the request (kept on it for later checks); 401 for bad credentials."""
        caller = await self.auth.identify(request.headers.get("Authorization"))
        if caller is None:
            raise RegistryApiError.of(ErrorCode.UNAUTHORIZED, "invalid credentials")
        request[CALLER_KEY] = caller
        return caller

    async def base(self, request: web.Request) -> web.Response:
        # The ping answers 401 to anonymous callers whenever auth is configured,
        # even with anonymous reads: clients learn the challenge here and would
        # otherwise never send credentials for a push.
        if await self._caller(request) is ANONYMOUS and self.auth.enabled:
            raise RegistryApiError.of(ErrorCode.UNAUTHORIZED, "authentication required")
        return web.json_response({}, headers=API_VERSION)

    async def catalog(self, request: web.Request) -> web.Response:
        """The repositories the caller may pull (401 for anonymous callers who may
        pull none)."""
        caller = await self._caller(request)
        repos = [
            r
            for r in await self.storage.list_repositories()
            if "pull" in self.auth.rights(caller, r)
        ]
        if not repos and caller is ANONYMOUS and self.auth.enabled:
            raise RegistryApiError.of(ErrorCode.UNAUTHORIZED, "authentication required to pull")
        return paginate(request, "/v2/_catalog", "repositories", repos, {})

    async def token(self, request: web.Request) -> web.Response:
        """Docker token auth: a bearer token for the requested ``scope``s, granted as
        far as the caller's rights go."""
        caller = await self._caller(request)
        scopes = [s for value in request.query.getall("scope", []) for s in value.split()]
        token = self.auth.issue(caller, scopes)
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {"token": token, "access_token": token, "expires_in": TOKEN_LIFETIME}
        return web.json_response({**body, "issued_at": issued})

    # -- manifests -------------------------------------------------------------
    async def get_manifest(self, request: web.Request, route: Route) -> web.Response:
        name, ref = route.name, route.reference
        accept = parse_accept(request.headers.getall("Accept", []))
        stored_type = None
        if is_digest(ref):
            found = await self.storage.get_manifest(name, ref)
            if found is not None:  # a digest pins the bytes: Accept does not apply
                return self._manifest_response(request, found[0], found[1], ref)
        else:
            digest = await self.storage.get_tag(name, ref)
            found = await self.storage.get_manifest(name, digest) if digest else None
            if found is not None and digest is not None:
                if not accept or found[1] in accept:
                    return self._manifest_response(request, found[0], found[1], digest)
                stored_type = found[1]
        resolved = await self.resolved.resolve(name, ref, accept)
        if resolved is not None:
            return self._manifest_response(request, *resolved)
        if stored_type is not None:
            raise RegistryApiError.of(
                ErrorCode.MANIFEST_UNKNOWN,
                f"{name}:{ref} is stored as {stored_type}, which the client does not accept "
                f"(Accept: {', '.join(sorted(accept))})",
            )
        raise RegistryApiError.of(ErrorCode.MANIFEST_UNKNOWN, f"manifest {name}:{ref} not found")

    def _manifest_response(
        self, request: web.Request, data: bytes, media_type: str, digest: str
    ) -> web.Response:
        headers = {**API_VERSION, "Docker-Content-Digest": digest, "ETag": f'"{digest}"'}
        return web.Response(body=data, content_type=media_type, headers=headers)

    async def put_manifest(self, request: web.Request, route: Route) -> web.Response:
        name, ref = route.name, route.reference
        limit = self.config.max_manifest_size
        if (request.content_length or 0) > limit:
            raise too_large(limit, f"manifest {name}:{ref}")
        data = bytearray()
        async for chunk in read_body(request, self.config.body_timeout):
            data += chunk
            if len(data) > limit:
                raise too_large(limit, f"manifest {name}:{ref}")
        ctype = request.headers.get("Content-Type", "").split(";", 1)[0].strip()
        manifest = check_manifest(bytes(data), ctype)
        await self._check_references(name, manifest)
        digest = manifest.digest
        if is_digest(ref) and ref != digest:
            raise RegistryApiError.of(
                ErrorCode.DIGEST_INVALID, f"manifest digest is {digest}, but it was put as {ref}"
            )
        await self.storage.put_manifest(name, digest, manifest.body, manifest.media_type)
        headers = {
            **API_VERSION,
            "Location": f"/v2/{name}/manifests/{digest}",
            "Docker-Content-Digest": digest,
        }
        subject = manifest.subject
        if subject is not None:  # validated: a descriptor (the manifest need not exist)
            await self.storage.add_referrer(name, subject, digest, manifest.referrer_descriptor())
            headers["OCI-Subject"] = subject
        if not is_digest(ref):
            await self.storage.put_tag(name, ref, digest)
        return web.Response(status=201, headers=headers)

    async def _check_references(self, name: str, manifest: CheckedManifest) -> None:
        """Every blob and manifest ``manifest`` references is in repository ``name``."""
        for digest, size in manifest.blobs:
            # linked here, not merely stored: a manifest is no way to reach
            # another repository's blobs by their digest
            have = await self._linked_size(name, digest)
            if have is None:
                raise RegistryApiError.of(
                    ErrorCode.MANIFEST_BLOB_UNKNOWN, f"blob {digest} is not in repository {name}"
                )
            if have != size:
                raise RegistryApiError.of(
                    ErrorCode.MANIFEST_INVALID,
                    f"blob {digest} has {have} bytes, the manifest says {size}",
                )
        for digest in manifest.manifests:
            if await self.storage.get_manifest(name, digest) is None:
                raise RegistryApiError.of(
                    ErrorCode.MANIFEST_BLOB_UNKNOWN,
                    f"manifest {digest} is not in repository {name}",
                )

    async def delete_manifest(self, route: Route) -> web.Response:
        name, digest = route.name, route.reference
        if not is_digest(digest):
            raise unsupported("manifests are deleted by digest, not by tag")
        self.resolved.forget(name, digest)
        found = await self.storage.get_manifest(name, digest)
        subject = json.loads(found[0]).get("subject") if found is not None else None
        if isinstance(subject, dict):
            # first: a crash in between leaves a manifest unlisted (a push lists it
            # again), never a listed manifest that is gone
            await self.storage.remove_referrer(name, subject["digest"], digest)
        if not await self.storage.delete_manifest(name, digest):
            raise RegistryApiError.of(
                ErrorCode.MANIFEST_UNKNOWN, f"manifest {name}@{digest} not found"
            )
        return web.Response(status=202, headers=API_VERSION)

    async def list_referrers(self, request: web.Request, route: Route) -> web.Response:
        """The OCI 1.1 referrers API: an image index of the manifests in ``name``
        whose ``subject`` is the digest (200 with none, whether or not it exists)."""
        stored = await self.storage.list_referrers(route.name, route.reference)
        found = [json.loads(d) for d in stored]
        headers = {**API_VERSION}
        wanted = request.query.get("artifactType")
        if wanted is not None:
            found = [d for d in found if d.get("artifactType") == wanted]
            headers["OCI-Filters-Applied"] = "artifactType"
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
        body = json.dumps(index).encode()
        return web.Response(body=body, content_type=OCI_INDEX, headers=headers)

    # -- blobs -----------------------------------------------------------------
    async def _linked_size(self, name: str, digest: str) -> int | None:
        """The size of a blob visible in repository ``name``; ``None`` when it is not."""
        if not await self.storage.blob_linked(name, digest):
            return None
        return await self.storage.blob_size(digest)

    async def get_blob(self, request: web.Request, route: Route) -> web.StreamResponse:
        digest = route.reference
        size = await self._linked_size(route.name, digest)
        if size is None:
            raise RegistryApiError.of(
                ErrorCode.BLOB_UNKNOWN, f"blob {digest} is not in repository {route.name}"
            )
        span = parse_range(request.headers["Range"], size) if "Range" in request.headers else None
        headers = {
            **API_VERSION,
            "Docker-Content-Digest": digest,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{digest}"',
        }
        path = self.storage.blob_path(digest)
        if path is not None and not await self.resolved.served_intact(digest, path):
            raise RegistryApiError.of(
                ErrorCode.BLOB_UNKNOWN, f"blob {digest} was damaged; pull the image again"
            )
        if path is not None:
            # sendfile; aiohttp serves the (already validated) Range itself
            return SentOnceFileResponse(path, chunk_size=CHUNK, headers=headers)
        start, end = span if span is not None else (0, size - 1)
        resp = web.StreamResponse(status=206 if span else 200, headers=headers)
        if span:
            resp.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        resp.content_length = end - start + 1
        await resp.prepare(request)
        if request.method != "HEAD" and size > 0:
            async for chunk in self.storage.read_blob(digest, start, end):
                await resp.write(chunk)
        await resp.write_eof()
        return resp

    # -- uploads ---------------------------------------------------------------
    def _upload_headers(self, name: str, upload_id: str, size: int) -> dict[str, str]:
        return {
            **API_VERSION,
            "Location": f"/v2/{name}/blobs/uploads/{upload_id}",
            "Docker-Upload-UUID": upload_id,
            "Range": f"0-{max(size - 1, 0)}",
        }

    async def _blob_created(self, name: str, digest: str) -> web.Response:
        await self.storage.link_blob(name, digest)
        headers = {
            **API_VERSION,
            "Location": f"/v2/{name}/blobs/{digest}",
            "Docker-Content-Digest": digest,
        }
        return web.Response(status=201, headers=headers)

    def _body(self, request: web.Request, already: int = 0) -> AsyncIterator[bytes]:
        limit = self.config.max_upload_size
        if already + (request.content_length or 0) > limit:
            raise too_large(limit, f"upload to {request.path}")
        return read_body(request, self.config.body_timeout)

    async def start_upload(self, request: web.Request, route: Route) -> web.Response:
        name, query = route.name, request.query
        if "mount" in query:
            # only from a named repository the blob is visible in; else (also
            # without from=) the client gets an upload session and pushes the bytes
            digest = check_digest(query["mount"])
            source = check_name(query["from"]) if "from" in query else None
            if (
                source is not None
                and "pull" in self.auth.rights(request[CALLER_KEY], source)
                and await self._linked_size(source, digest) is not None
            ):
                return await self._blob_created(name, digest)
        elif "digest" in query:
            digest = check_digest(query["digest"])
            size = await self.storage.put_blob(
                digest, self._body(request), self.config.max_upload_size
            )
            self.metrics.bytes_received += size
            return await self._blob_created(name, digest)
        upload_id = await self.storage.upload_start(name)
        return web.Response(status=202, headers=self._upload_headers(name, upload_id, 0))

    async def upload_status(self, route: Route) -> web.Response:
        size = await self.storage.upload_size(route.name, route.reference)
        return web.Response(
            status=204, headers=self._upload_headers(route.name, route.reference, size)
        )

    async def patch_upload(self, request: web.Request, route: Route) -> web.Response:
        name, upload_id = route.name, route.reference
        current = await self.storage.upload_size(name, upload_id)
        offset = chunk_offset(request, current)
        body = self._body(request, offset)
        size = await self.storage.upload_append(
            name, upload_id, offset, body, self.config.max_upload_size
        )
        self.metrics.bytes_received += size - current
        return web.Response(status=202, headers=self._upload_headers(name, upload_id, size))

    async def finish_upload(self, request: web.Request, route: Route) -> web.Response:
        name, upload_id = route.name, route.reference
        if "digest" not in request.query:
            raise RegistryApiError.of(ErrorCode.DIGEST_INVALID, "PUT needs a ?digest= parameter")
        digest = check_digest(request.query["digest"])
        current = await self.storage.upload_size(name, upload_id)
        offset = chunk_offset(request, current)
        size = await self.storage.upload_finish(
            name,
            upload_id,
            digest,
            self._body(request, offset),
            self.config.max_upload_size,
            offset,
        )
        self.metrics.bytes_received += size - current
        return await self._blob_created(name, digest)

    # -- listings --------------------------------------------------------------
    async def list_tags(self, request: web.Request, route: Route) -> web.Response:
        tags = await self.storage.list_tags(route.name)
        if tags is None:
            raise RegistryApiError.of(
                ErrorCode.NAME_UNKNOWN, f"repository {route.name} is not known"
            )
        return paginate(request, f"/v2/{route.name}/tags/list", "tags", tags, {"name": route.name})
