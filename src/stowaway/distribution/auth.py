"""How a registry wants to be authenticated: ``WWW-Authenticate`` challenges, Basic
credentials, Bearer tokens fetched from the challenge's realm (once per realm, service
and scopes, shared across threads), and the error a refusal becomes. The requests
themselves are ``client.RegistryClient``'s; this module only decides the headers."""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit

from stowaway.distribution.errors import RegistryApiError
from stowaway.errors import RegistryError

if TYPE_CHECKING:
    from stowaway.distribution.client import Response

__all__ = ["CREDS_HINT", "Challenge", "RegistryAuth", "parse_challenge"]

#: Told to the user whenever a registry refuses us for lack of credentials.
CREDS_HINT = "pass --dest-creds USER:PASS (or a token the registry accepts)"

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


def basic(creds: tuple[str, str]) -> str:
    """The ``Authorization`` value for Basic credentials."""
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


class RegistryAuth:
    """One registry's challenge, the scopes asked for and the tokens fetched for them.

    ``get(url, headers)`` performs a GET for the token server (the client's transport,
    which turns connection failures into ``TransportError``)."""

    def __init__(
        self,
        base: str,
        creds: tuple[str, str] | None,
        get: Callable[[str, Mapping[str, str]], Response],
    ) -> None:
        self.base = base
        self.creds = creds
        self.challenge: Challenge | None = None
        self._get = get
        self._scopes: tuple[str, ...] = ()
        self._tokens: dict[tuple[str, ...], str] = {}
        self._lock = threading.Lock()

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
        if challenge.scheme == "basic" and self.creds is not None:
            return {"Authorization": basic(self.creds)}
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
        how = "the credentials were refused" if self.creds else "no credentials were given"
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
        url = realm + ("&" if urlsplit(realm).query else "?") + urlencode(query)
        headers = dict(USER_AGENT)
        if self.creds is not None:
            headers["Authorization"] = basic(self.creds)
        resp = self._get(url, headers)
        if resp.status == 401:
            raise self.unauthorized(resp, url)
        if resp.status != 200:
            raise RegistryApiError.from_response(resp.status, resp.body)
        try:
            doc = json.loads(resp.body)
            return str(doc.get("token") or doc["access_token"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RegistryError(f"token server {realm} answered no token") from e
