"""The HTTP side of the distribution API that is no endpoint's own: the headers and
request keys every handler uses, reading a request body against a time-out, an
upload chunk's place, list pagination and a file response that survives being
prepared twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from stowaway.distribution.errors import ErrorCode, RegistryApiError
from stowaway.registry.auth import Caller
from stowaway.registry.storage_api import CHUNK
from stowaway.registry.validate import parse_content_range

#: who sent a request, and the scope a 401 challenge names
CALLER_KEY = web.RequestKey("caller", Caller)
SCOPE_KEY = web.RequestKey("auth_scope", str)
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


def unsupported(message: str) -> RegistryApiError:
    return RegistryApiError(405, [(ErrorCode.UNSUPPORTED.value, message)])


class SentOnceFileResponse(web.FileResponse):
    """A FileResponse that may be prepared twice: the guard middleware sends responses
    itself (so a long download counts as busy), then aiohttp prepares what the handler
    returned again, which for a plain FileResponse would open and send the file anew
    after its end (an AssertionError in aiohttp, no access-log line)."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return None
        return await super().prepare(request)


async def read_body(request: web.Request, timeout: float) -> AsyncIterator[bytes]:
    """The request body; a pause over ``timeout`` seconds ends the request (408; a
    chunked upload keeps what it had, to be resumed)."""
    while True:
        try:
            async with asyncio.timeout(timeout):
                chunk = await request.content.read(CHUNK)
        except TimeoutError:
            raise RegistryApiError(
                408,
                [
                    (
                        ErrorCode.BLOB_UPLOAD_INVALID.value,
                        f"no request body data for {timeout:g} s",
                    )
                ],
            ) from None
        if not chunk:
            return
        yield chunk


def chunk_offset(request: web.Request, current: int) -> int:
    """Where the body goes: ``Content-Range``'s start (checked against
    Content-Length), else the upload's current end."""
    if "Content-Range" not in request.headers:
        return current
    offset, end = parse_content_range(request.headers["Content-Range"])
    length = request.content_length
    if length is not None and length != end - offset + 1:
        raise RegistryApiError.of(
            ErrorCode.BLOB_UPLOAD_INVALID,
            f"Content-Range {offset}-{end} does not match Content-Length {length}",
        )
    return offset


def paginate(
    request: web.Request, path: str, key: str, items: list[str], extra: dict[str, str]
) -> web.Response:
    """Apply ``n``/``last`` and add a ``Link: <...>; rel="next"`` when cut."""
    last = request.query.get("last")
    if last:
        items = [i for i in items if i > last]
    headers = dict(API_VERSION)
    n_param = request.query.get("n")
    if n_param is not None:
        if not (n_param.isascii() and n_param.isdigit()):  # isdigit alone takes '²'
            raise RegistryApiError(  # a bad query value: 400, as distribution answers
                400, [(ErrorCode.UNSUPPORTED.value, f"n={n_param!r} is not a count")]
            )
        n = int(n_param)
        if len(items) > n:
            items = items[:n]
            if items:
                headers["Link"] = f'<{path}?n={n}&last={items[-1]}>; rel="next"'
    return web.json_response({**extra, key: items}, headers=headers)
