"""How a registry wants to be authenticated: ``WWW-Authenticate`` challenges, Basic
credentials, Bearer tokens fetched from the challenge's realm (once per realm, service
and scopes, shared across threads; an identity token is traded with OAuth2's
``refresh_token`` grant, as docker does), and the error a refusal becomes. The requests
themselves are ``client.RegistryClient``'s; this module only decides the headers. The
credentials are looked up (``credentials.find_credentials``) only when the registry
first asks for them."""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit

from stowaway.distribution.credentials import Credentials, CredsSource, resolve
from stowaway.distribution.errors import RegistryApiError
from stowaway.errors import RegistryError

if TYPE_CHECKING:
    from stowaway.distribution.client import Response

__all__ = ["CREDS_HINT", "Challenge", "RegistryAuth", "parse_challenge"]

#: Told to the user whenever a registry refuses us for lack of credentials.
CREDS_HINT = (
    "log in with `docker login HOST` or `podman login HOST`, or pass --creds USER[:PASS] "
    "or --authfile FILE"
)
#: OAuth2 client id sent with an identity token (docker sends its own name).
CLIENT_ID = "stowaway"

USER_AGENT = {"User-Agent": "stowaway"}
_PARAM = re.compile(r'([A-Za-z_]+)=(?:"([^"]*)"|([^,\s]*))')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer"
    params: Mapping[str, str]


def parse_challenge(value: str) -> Challenge:
    """Parse one ``WWW-Authenticate`` value (``Bearer realm="…",service="…"``)."""
    scheme, _, rest = value.strip().partition(" ")
    params = {m[1].lower(): m[2] if m[2] or not m[3] else m[3] for m in _PARAM.finditer(rest)}
    return Challenge(scheme.lower(), params)


def challenge_of(resp: Response) -> Challenge:
    """The first Basic or Bearer challenge of a 401 (Basic when it names none)."""
    for value in resp.headers.get_all("WWW-Authenticate") or []:
        challenge = parse_challenge(value)
        if challenge.scheme in ("basic", "bearer"):
            return challenge
    return Challenge("basic", {})


def basic(creds: Credentials) -> str:
    """The ``Authorization`` value for Basic credentials."""
    return "Basic " + base64.b64encode(f"{creds.username}:{creds.secret}".encode()).decode()


#: ``fetch(method, url, headers, body)``: one request to a token server.
Fetch = Callable[[str, str, Mapping[str, str], "bytes | None"], "Response"]


class RegistryAuth:
    """One registry's challenge, the scopes asked for and the tokens fetched for them.

    ``fetch`` performs a request to the token server (the client's transport, which
    turns connection failures into ``TransportError``). ``creds`` may be a lookup, run
    once, the first time credentials are needed."""

    def __init__(self, base: str, creds: CredsSource, fetch: Fetch) -> None:
        self.base = base
        self._creds_source = creds
        self._creds: Credentials | None = None
        self._looked_up = False
        self.challenge: Challenge | None = None
        self._fetch = fetch
        self._scopes: tuple[str, ...] = ()
        self._tokens: dict[tuple[str, ...], str] = {}
        self._lock = threading.Lock()
        self._lookup_lock = threading.Lock()

    @property
    def creds(self) -> Credentials | None:
        """The credentials, looked up on first use (a lookup's error propagates)."""
        if not self._looked_up:
            with self._lookup_lock:
                if not self._looked_up:
                    self._creds = resolve(self._creds_source)
                    self._looked_up = True
        return self._creds

    def learn(self, resp: Response) -> Challenge:
        """Adopt the challenge of the 401 that ``GET /v2/`` answered."""
        self.challenge = challenge_of(resp)
        return self.challenge

    def authorize(self, scopes: Sequence[str]) -> None:
        """Scopes to ask a token server for (``repository:<repo>:pull,push``)."""
        self._scopes = tuple(scopes)

    def header(self) -> dict[str, str]:
        """The ``Authorization`` header for a request to the registry's own origin
        (none before a challenge, or for Basic without credentials)."""
        challenge = self.challenge
        if challenge is None:
            return {}
        if challenge.scheme == "basic" and (creds := self.creds) is not None:
            return {"Authorization": basic(creds)}
        if challenge.scheme == "bearer":
            return {"Authorization": "Bearer " + self._token(challenge, self._scopes)}
        return {}

    def reauth(self, resp: Response) -> bool:
        """A 401 after ping: for Bearer, fetch a token for the challenge's scope."""
        challenge = challenge_of(resp)
        if challenge.scheme != "bearer":
            return False
        extra = challenge.params.get("scope", "").split()
        with self._lock:  # the token may have expired: forget it, fetch afresh
            self.challenge = challenge
            self._scopes = tuple(dict.fromkeys([*self._scopes, *extra]))
            self._tokens.clear()
        return True

    def unauthorized(self, resp: Response, url: str) -> RegistryError:
        """The error for a 401 we cannot answer, with the credentials hint."""
        detail = RegistryApiError.from_response(resp.status, resp.body).message
        creds = self.creds
        how = (
            f"the credentials of {creds.username!r} from {creds.source} were refused"
            if creds
            else "no credentials were given or found"
        )
        return RegistryError(f"{url}: unauthorized ({how}): {detail}", hint=CREDS_HINT)

    def _token(self, challenge: Challenge, scopes: tuple[str, ...]) -> str:
        key = (challenge.params.get("realm", ""), challenge.params.get("service", ""), *scopes)
        with self._lock:  # single flight: concurrent uploads share one token
            token = self._tokens.get(key)
            if token is None:
                token = self._tokens[key] = self._fetch_token(challenge, scopes)
            return token

    def _fetch_token(self, challenge: Challenge, scopes: tuple[str, ...]) -> str:
        realm = challenge.params.get("realm")
        if not realm:
            raise RegistryError(f"{self.base}/v2/: Bearer challenge without a realm")
        query = [("scope", s) for s in scopes]
        if "service" in challenge.params:
            query.insert(0, ("service", challenge.params["service"]))
        creds = self.creds
        if creds is not None and creds.identity_token:
            resp = self._refresh(realm, challenge, scopes, creds)
            url = realm
        else:
            url = realm + ("&" if urlsplit(realm).query else "?") + urlencode(query)
            headers = dict(USER_AGENT)
            if creds is not None:
                headers["Authorization"] = basic(creds)
            resp = self._fetch("GET", url, headers, None)
        if resp.status == 401:
            raise self.unauthorized(resp, url)
        if resp.status != 200:
            raise RegistryApiError.from_response(resp.status, resp.body)
        try:
            doc = json.loads(resp.body)
            return str(doc.get("token") or doc["access_token"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RegistryError(f"token server {realm} answered no token") from e

    def _refresh(
        self, realm: str, challenge: Challenge, scopes: tuple[str, ...], creds: Credentials
    ) -> Response:
        """OAuth2 ``refresh_token`` grant: an identity token for an access token."""
        form = [("grant_type", "refresh_token"), ("refresh_token", creds.secret)]
        form += [("client_id", CLIENT_ID)]
        if "service" in challenge.params:
            form.append(("service", challenge.params["service"]))
        if scopes:
            form.append(("scope", " ".join(scopes)))
        headers = {**USER_AGENT, "Content-Type": "application/x-www-form-urlencoded"}
        return self._fetch("POST", realm, headers, urlencode(form).encode())
