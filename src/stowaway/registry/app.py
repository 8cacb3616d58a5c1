"""The aiohttp application (``make_app``) kept apart from the process that runs
it (``start`` / ``serve``): tests and embedders build the app, ``stowaway serve``
runs it with TLS, JSON access logs and graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

from stowaway.distribution.errors import ErrorCode, RegistryApiError
from stowaway.errors import StowawayError
from stowaway.registry.api import RegistryApi
from stowaway.registry.config import RegistryConfig, open_storage
from stowaway.registry.guard import ConnectionGuard
from stowaway.registry.http_helpers import API_VERSION, SCOPE_KEY
from stowaway.registry.landing import ComposeRules, PackageSets, Rules, render_landing
from stowaway.registry.links import link_tagged_blobs
from stowaway.registry.resolver import ManifestResolver
from stowaway.registry.storage_api import Storage

API_KEY = web.AppKey("registry_api", RegistryApi)
GUARD_KEY = web.AppKey("connection_guard", ConnectionGuard)
access_log = logging.getLogger("stowaway.registry.access")
log = logging.getLogger("stowaway.registry")


def _error_response(request: web.Request, err: RegistryApiError) -> web.Response:
    headers = dict(API_VERSION)
    if err.status == 401:
        realm_base = f"{request.scheme}://{request.host}"
        auth = request.app[API_KEY].auth
        headers["WWW-Authenticate"] = auth.challenge(realm_base, request.get(SCOPE_KEY))
    resp = web.Response(
        status=err.status, body=err.to_json(), content_type="application/json", headers=headers
    )
    if not request.content.at_eof():
        # an unread (possibly huge) body: close instead of draining it
        resp.force_close()
    return resp


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every failure as the spec's error JSON; never leak a traceback."""
    try:
        return await handler(request)
    except RegistryApiError as err:
        return _error_response(request, err)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        failure = RegistryApiError.of(ErrorCode.UNKNOWN, "internal server error")
        return _error_response(request, failure)


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Mark the connection busy until the response is sent (prepared here, not
    after the middleware, so a long download is never taken for an idle client)."""
    with request.app[GUARD_KEY].busy(request.transport):
        resp = await handler(request)
        if not resp.prepared:
            await resp.prepare(request)
            await resp.write_eof()
        return resp


def access_logger_for(api: RegistryApi) -> type[AbstractAccessLogger]:
    """An access logger class bound to ``api``: one JSON line per request (when
    ``access_log`` is on) and the request/bytes metrics. Bound rather than found
    through ``request.app``, which is unset for requests that failed to parse."""

    class JsonAccessLogger(AbstractAccessLogger):
        def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
            sent = 0 if request.method == "HEAD" else (response.content_length or 0)
            api.metrics.observe(request.method, response.status, sent)
            if not api.config.access_log:
                return
            line = {
                "method": request.method,
                "path": request.raw_path,
                "status": response.status,
                "bytes": sent,
                "duration_ms": round(time * 1000, 3),
                "remote": request.remote,
            }
            self.logger.info(json.dumps(line))

        @property
        def enabled(self) -> bool:
            return True

    return JsonAccessLogger


#: Longest pause between two purges of abandoned uploads, in seconds.
PURGE_INTERVAL = 3600.0


def _while_running(
    work: Callable[[], Coroutine[Any, Any, None]],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that runs ``work()`` as a task while the app runs."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(work())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx


async def purge_uploads_forever(storage: Storage, max_age: float) -> None:
    """Purge abandoned uploads now, then every ``max_age / 4`` (at most hourly), so
    an upload is gone at most a quarter of ``max_age`` after it became stale."""
    while True:
        try:
            purged = await storage.purge_uploads(max_age)
            if purged:
                log.info("purged %d abandoned uploads (idle over %gs)", purged, max_age)
        except Exception:
            log.exception("purging abandoned uploads failed; retrying later")
        await asyncio.sleep(min(PURGE_INTERVAL, max_age / 4))


def make_app(
    config: RegistryConfig,
    *,
    storage: Storage | None = None,
    resolver: ManifestResolver | None = None,
    landing: PackageSets | None = None,
) -> web.Application:
    """The registry app; ``landing`` (default: the resolver, if it can) lists the
    package sets on the page at ``/``."""
    if landing is None and isinstance(resolver, PackageSets):
        landing = resolver
    # the pull examples follow the composer's own options (meta, always, nix-build)
    if isinstance(landing, ComposeRules):
        rules = Rules.of(landing.options)
    else:
        rules = Rules.of(config.nix if resolver is not None else None)
    api = RegistryApi(config, storage or open_storage(config), resolver)
    app = web.Application(middlewares=[guard_middleware, errors_middleware])
    app[API_KEY] = api
    guard = app[GUARD_KEY] = ConnectionGuard(config.max_connections, config.header_timeout)

    async def linking(app: web.Application) -> None:
        await link_tagged_blobs(api.storage)  # before the first request is served

    app.on_startup.append(linking)

    app.cleanup_ctx.append(
        _while_running(lambda: purge_uploads_forever(api.storage, config.upload_max_age))
    )
    app.cleanup_ctx.append(_while_running(guard.sweep_forever))

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=api.metrics.render(), content_type="text/plain", charset="utf-8")

    async def index_page(request: web.Request) -> web.Response:
        sets = landing.package_sets() if landing is not None else {}
        text = render_landing(request.host, sets, rules)
        return web.Response(text=text, content_type="text/html", charset="utf-8")

    app.router.add_get("/", index_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v2/_catalog", api.catalog)
    if config.access:  # only then do challenges name the token endpoint
        app.router.add_get("/auth/token", api.token)
    app.router.add_route("*", "/v2", api.handle)
    app.router.add_route("*", "/v2/{tail:.*}", api.handle)
    return app


@dataclass
class RunningServer:
    runner: web.AppRunner
    listener: asyncio.Server
    host: str
    port: int
    scheme: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host or '127.0.0.1'}:{self.port}"

    async def stop(self) -> None:
        self.listener.close()
        await self.runner.cleanup()


class ListenError(StowawayError):
    """The address to listen on cannot be bound (in use, not ours, not permitted)."""

    def __init__(self, host: str, port: int, err: OSError) -> None:
        address = f"[{host}]:{port}" if ":" in host else f"{host or '0.0.0.0'}:{port}"
        why = "address in use" if err.errno == errno.EADDRINUSE else err.strerror or str(err)
        super().__init__(
            f"cannot listen on {address}: {why}",
            hint="pick another address with --listen HOST:PORT (or listen in the config file)",
        )


def ssl_context(config: RegistryConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    return ctx


async def start(config: RegistryConfig, app: web.Application | None = None) -> RunningServer:
    """Bind and start serving (port 0 picks a free port); returns at once."""
    host, port = config.host_port
    app = app or make_app(config)
    runner = web.AppRunner(
        app,
        access_log_class=access_logger_for(app[API_KEY]),
        access_log=access_log,
        handle_signals=False,
        shutdown_timeout=10.0,
        # after an early error answer (e.g. 413) read and discard the rest of the
        # body for at most 2 s, so the client sees the answer instead of a reset
        lingering_time=2.0,
    )
    await runner.setup()
    tls = ssl_context(config)
    # our own listener rather than a web.TCPSite: connections go through the guard
    assert runner.server is not None
    try:
        listener = await asyncio.get_running_loop().create_server(
            app[GUARD_KEY].factory(runner.server), host, port, ssl=tls, backlog=128
        )
    except OSError as err:
        await runner.cleanup()
        raise ListenError(host, port, err) from None
    bound = listener.sockets[0].getsockname()[1]
    return RunningServer(runner, listener, host, bound, "https" if tls else "http")


async def serve(
    config: RegistryConfig,
    resolver: ManifestResolver | None = None,
    *,
    storage: Storage | None = None,
    landing: PackageSets | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then finish in-flight requests and stop."""
    app = make_app(config, storage=storage, resolver=resolver, landing=landing)
    running = await start(config, app)
    log.info("stowaway registry listening on %s", running.url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await running.stop()
