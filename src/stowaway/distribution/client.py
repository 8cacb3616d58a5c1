"""A small client for the OCI distribution API: scheme discovery, transport and
retries; how the registry wants to be authenticated is ``auth.RegistryAuth``'s.

Blocking ``http.client`` on a thread pool rather than aiohttp: pushes are a handful
of large streaming requests, threads release the GIL on socket I/O and hashing, and
the stdlib keeps the CLI's import cost near zero. One keep-alive connection per
thread and origin.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from email.message import Message
from typing import Protocol
from urllib.parse import urlencode, urljoin, urlsplit

from stowaway.distribution.auth import CREDS_HINT, USER_AGENT, RegistryAuth
from stowaway.distribution.credentials import CredsSource
from stowaway.distribution.errors import RegistryApiError
from stowaway.errors import RegistryError

__all__ = ["RegistryClient", "Response", "TransportError", "CREDS_HINT"]

#: Told when TLS fails and the caller named no flag of its own.
PLAIN_HTTP_HINT = "for a plain-HTTP registry, turn TLS verification off"
#: Read and send size for streamed bodies.
CHUNK = 1 << 20
#: Attempts for one request when the registry answers a temporary error.
ATTEMPTS = 4
#: First backoff delay in seconds; doubles on each retry.
BACKOFF = 0.25


class TransportError(RegistryError):
    """The connection failed (refused, reset, TLS, timeout); the message names the URL."""

    #: A reset or timeout mid-upload is worth restarting the upload for.
    temporary = True


class Readable(Protocol):
    def read(self, n: int = -1) -> bytes: ...


@dataclass
class Response:
    status: int
    headers: Message
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


class RegistryClient:
    """Talks to one registry host; thread-safe (one connection per thread and origin)."""

    def __init__(
        self,
        host: str,
        *,
        tls_verify: bool = True,
        creds: CredsSource = None,
        timeout: float = 120.0,
        plain_http_hint: str | None = None,
    ) -> None:
        """``creds``: credentials, or a lookup run when the registry first asks for
        them. ``plain_http_hint`` is told when TLS fails: how the caller's user turns
        verification off (each command has its own flag)."""
        self.host = host
        self.tls_verify = tls_verify
        self.plain_http_hint = plain_http_hint or PLAIN_HTTP_HINT
        self.timeout = timeout
        self.auth = RegistryAuth(f"https://{host}", creds, self._token_request)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._all_conns: list[http.client.HTTPConnection] = []

    @property
    def base(self) -> str:
        """``scheme://host`` of the registry (the scheme is settled by ``ping``)."""
        return self.auth.base

    # -- setup -----------------------------------------------------------------

    def ping(self) -> None:
        """``GET /v2/``: pick the scheme (https; http only when tls_verify is off)
        and learn how the registry wants us to authenticate."""
        schemes = ["https"] if self.tls_verify else ["https", "http"]
        last: Exception | None = None
        for scheme in schemes:
            self.auth.base = f"{scheme}://{self.host}"
            try:
                resp = self._once("GET", self.base + "/v2/", USER_AGENT, None)
            except (OSError, http.client.HTTPException) as e:  # incl. TLS failures
                last = e
                continue
            if resp.status == 401:
                if self.auth.learn(resp).scheme == "basic" and self.auth.creds is None:
                    raise self.auth.unauthorized(resp, self.base + "/v2/")
            elif resp.status != 200:
                raise RegistryApiError.from_response(resp.status, resp.body)
            return
        err = self._connect_error(f"{schemes[-1]}://{self.host}/v2/", last)
        if isinstance(last, ssl.SSLError):
            err.hint = self.plain_http_hint
        raise err

    def authorize(self, scopes: Sequence[str]) -> None:
        """Scopes to ask a token server for (``repository:<repo>:pull,push``)."""
        self.auth.authorize(scopes)

    def close(self) -> None:
        with self._lock:
            conns, self._all_conns = self._all_conns, []
        for c in conns:
            c.close()

    # -- requests --------------------------------------------------------------

    def url(self, path: str, **query: str) -> str:
        """Absolute URL for a ``/v2/...`` path or a ``Location`` header (relative or not)."""
        url = urljoin(self.base + "/", path)
        if query:
            url += ("&" if urlsplit(url).query else "?") + urlencode(query)
        return url

    def request(
        self,
        method: str,
        url: str,
        *,
        ok: Collection[int],
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        """One request with a replayable body; retries temporary failures with
        backoff and re-authenticates once on 401; raises ``RegistryApiError``."""
        retry = _Retry(self)
        while True:
            try:
                resp = self._once(method, url, self._auth(url, headers), body)
            except (OSError, http.client.HTTPException) as e:
                retry.after_transport_error(url, e)
                continue
            if resp.status in ok:
                return resp
            retry.after_failed_response(resp, url)

    def send_stream(
        self,
        method: str,
        url: str,
        reader: Readable,
        size: int,
        *,
        ok: Collection[int],
        headers: Mapping[str, str] | None = None,
        on_sent: Callable[[int], None] = lambda n: None,
    ) -> Response:
        """Stream ``size`` bytes from ``reader`` as the body (not retried: the caller
        restarts the upload). Each chunk is sent only after the next one was read,
        so a reader that raises at end-of-file (digest mismatch) stops us before
        the request is complete and the registry never commits bad bytes."""
        hdrs = dict(self._auth(url, headers))
        hdrs["Content-Length"] = str(size)
        conn, target = self._conn(url)
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            for k, v in hdrs.items():
                conn.putheader(k, v)
            conn.endheaders()
            pending = reader.read(CHUNK)
            sent = 0
            while pending:
                nxt = reader.read(CHUNK)
                sent += len(pending)
                if sent > size:
                    raise RegistryError(f"{url}: body is longer than the declared {size} bytes")
                conn.send(pending)
                on_sent(len(pending))
                pending = nxt
            if sent != size:
                raise RegistryError(f"{url}: body ended after {sent} of {size} bytes")
            resp = self._read(conn)
        except (OSError, http.client.HTTPException) as e:
            self._drop(url)
            raise self._connect_error(url, e) from e
        except BaseException:
            self._drop(url)
            raise
        if resp.status not in ok:
            raise self.error(resp, url)
        return resp

    def open_stream(self, url: str, *, max_redirects: int = 5) -> _Stream:
        """GET ``url`` and return its body as a stream (close it, or use ``with``).

        Same rules as ``request``: our auth only for the registry's own origin (a
        redirect to a blob store gets none), re-auth once on 401, temporary errors
        retried with backoff, the client's TLS settings; redirects followed. The
        stream has its own connection (the body is read later, maybe on another
        thread). Errors name the URL without its (possibly signed) query.
        """
        retry, hops = _Retry(self), 0
        while True:
            conn = self._new_conn(url)
            parts = urlsplit(url)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request("GET", target, headers=dict(self._auth(url, None)))
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                retry.after_transport_error(url, e)
                continue
            location = resp.getheader("Location")
            if resp.status == 200:
                return _Stream(conn, resp)
            body = resp.read(64 << 10)
            conn.close()
            if resp.status in (301, 302, 303, 307, 308) and location:
                hops += 1
                if hops > max_redirects:
                    raise RegistryError(f"GET {_where(url)}: more than {max_redirects} redirects")
                url = urljoin(url, location)
                continue
            retry.after_failed_response(Response(resp.status, resp.headers, body), url)

    def error(self, resp: Response, url: str) -> RegistryError:
        """The registry's error for a failed response, with a hint where we have one."""
        if resp.status == 401:
            return self.auth.unauthorized(resp, url)
        err = RegistryApiError.from_response(resp.status, resp.body)
        err.message = f"{err.message} ({_where(url)})"
        if resp.status == 403:
            err.hint = f"the credentials lack push access; {CREDS_HINT}"
        return err

    # -- internals -------------------------------------------------------------

    def _once(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> Response:
        conn, target = self._conn(url)
        try:
            conn.request(method, target, body=body, headers=dict(headers))
            return self._read(conn)
        except BaseException:
            self._drop(url)
            raise

    def _read(self, conn: http.client.HTTPConnection) -> Response:
        r = conn.getresponse()
        body = r.read()  # always drain (empty for HEAD) so the connection can be reused
        if r.will_close:
            conn.close()
        return Response(r.status, r.headers, body)

    def _new_conn(self, url: str) -> http.client.HTTPConnection:
        """An unshared connection to ``url``'s origin with our TLS settings."""
        parts = urlsplit(url)
        if parts.scheme == "https":
            return http.client.HTTPSConnection(
                parts.netloc, timeout=self.timeout, context=self._ssl_context()
            )
        if parts.scheme == "http":
            return http.client.HTTPConnection(parts.netloc, timeout=self.timeout)
        raise RegistryError(f"unsupported URL scheme in {_where(url)}")

    def _conn(self, url: str) -> tuple[http.client.HTTPConnection, str]:
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        conns: dict[tuple[str, str], http.client.HTTPConnection] = self._local.__dict__.setdefault(
            "conns", {}
        )
        conn = conns.get(key)
        if conn is None:
            conn = conns[key] = self._new_conn(url)
            with self._lock:
                self._all_conns.append(conn)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return conn, target

    def _drop(self, url: str) -> None:
        parts = urlsplit(url)
        conn = self._local.__dict__.get("conns", {}).pop((parts.scheme, parts.netloc), None)
        if conn is not None:
            conn.close()

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if not self.tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _own_origin(self, url: str) -> bool:
        return urlsplit(url).netloc == urlsplit(self.base).netloc

    def _auth(self, url: str, headers: Mapping[str, str] | None) -> Mapping[str, str]:
        out = dict(headers or {})
        out.update(USER_AGENT)
        if self._own_origin(url):  # never leak credentials to another origin (a blob store)
            out.update(self.auth.header())
        return out

    def _token_request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> Response:
        """A request to a token server, for ``RegistryAuth`` (not retried)."""
        try:
            return self._once(method, url, headers, body)
        except (OSError, http.client.HTTPException) as e:
            raise self._connect_error(url, e) from e

    def _connect_error(self, url: str, e: BaseException | None) -> TransportError:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        return TransportError(f"cannot reach registry at {_where(url)}: {why}")


class _Retry:
    """One request's retry state: temporary failures back off and retry (``ATTEMPTS``
    in all), the first 401 re-authenticates and retries at once; anything else, or a
    failure after the last attempt, raises."""

    #: Transport errors worth another attempt: a keep-alive connection the server
    #: closed, a reset, a timeout. Others (refused, TLS, DNS) fail at once.
    TEMPORARY = (ConnectionResetError, BrokenPipeError, TimeoutError, http.client.HTTPException)

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.attempt = 1
        self.delay = BACKOFF
        self.reauthed = False

    def after_transport_error(self, url: str, e: OSError | http.client.HTTPException) -> None:
        if not isinstance(e, self.TEMPORARY) or self.attempt >= ATTEMPTS:
            raise self.client._connect_error(url, e) from e
        self._back_off()

    def after_failed_response(self, resp: Response, url: str) -> None:
        # a 401 from another origin (a redirect's blob store) is not our registry's
        # challenge: adopting it would send our credentials to that origin's realm
        reauth = resp.status == 401 and not self.reauthed and self.client._own_origin(url)
        if reauth and self.client.auth.reauth(resp):
            self.reauthed = True
            return
        err = self.client.error(resp, url)
        if not isinstance(err, RegistryApiError) or not err.temporary or self.attempt >= ATTEMPTS:
            raise err
        self._back_off()

    def _back_off(self) -> None:
        time.sleep(self.delay)
        self.delay *= 2
        self.attempt += 1


class _Stream:
    """A response body whose ``with`` block (or ``close``) closes its connection too."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        self.conn, self.resp = conn, resp

    def read(self, n: int = -1) -> bytes:
        return self.resp.read(n)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _where(url: str) -> str:
    """The URL without its (long, opaque) query, to name where an error happened."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
