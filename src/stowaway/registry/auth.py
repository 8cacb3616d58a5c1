"""Authentication (htpasswd with bcrypt, static tokens, issued bearer tokens) and
per-repository authorization.

Policy: with no htpasswd, tokens or ``[[access]]`` rules, everything is open.
Without rules, pushes (any method but GET/HEAD) need credentials and reads need
them unless ``anonymous_read``; the challenge is Basic, and a static token may be
given as the basic-auth password (any user name), so ``docker login`` works with
tokens. With rules, a caller's rights on a repository come from the rules, and
the challenge is Docker's token auth: ``Bearer realm=<this server>/auth/token``
naming the scope; the token endpoint grants the requested scopes only as far as
the caller's rights go. A missing right is 401 for callers who could do better
(no credentials, or a token lacking a scope the user has) and 403 DENIED for
users who may not.

bcrypt is slow by design (~0.1 s a check), and clients send credentials on
every request, so verified (user, sha256(password)) pairs are remembered. A
failed check costs the same bcrypt work whether or not the user exists (unknown
users are checked against a dummy hash of the file's highest cost), so neither
the status nor the time tells which user names exist. bcrypt reads at most 72
bytes; a longer password is refused (401) rather than silently truncated.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from stowaway.distribution.errors import ErrorCode, RegistryApiError
from stowaway.registry.config import RegistryConfig, RegistryConfigError

READ_METHODS = frozenset({"GET", "HEAD"})
ALL = frozenset({"pull", "push"})
#: seconds an issued bearer token is valid
TOKEN_LIFETIME = 300
#: bcrypt's input limit: longer passwords are refused, never truncated
BCRYPT_MAX = 72


def dummy_hash(users: dict[str, bytes]) -> bytes:
    """A hash of a random password at the highest cost in ``users``: checked for
    unknown users so that they cost as much as known ones."""
    cost = max((int(h[4:6]) for h in users.values()), default=4)
    return bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))


def load_htpasswd(path: Path) -> dict[str, bytes]:
    """Parse ``user:$2y$...`` lines; only bcrypt entries are accepted."""
    users: dict[str, bytes] = {}
    try:
        text = path.read_text()
    except OSError as err:
        raise RegistryConfigError(f"cannot read htpasswd file {path}: {err.strerror}") from err
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not re.fullmatch(r"\$2[aby]\$\d\d\$.{53}", hashed):
            raise RegistryConfigError(
                f"{path} line {lineno}: expected user:<bcrypt hash> (htpasswd -B)"
            )
        # bcrypt (the library) knows $2b$; $2y$ is the same algorithm under PHP's name
        users[user] = b"$2b$" + hashed[4:].encode()
    return users


@dataclass(frozen=True)
class Caller:
    """Who sent a request: ``user`` None is anonymous; ``master`` holds a static
    token (every right); ``scopes`` limits an issued token to what it grants."""

    user: str | None = None
    master: bool = False
    scopes: dict[str, frozenset[str]] | None = None


ANONYMOUS = Caller()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_scope(scope: str) -> tuple[str, frozenset[str]] | None:
    """``repository:NAME:pull,push`` -> (NAME, actions); None for other scopes."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if kind != "repository" or not name:
        return None
    return name, frozenset(actions.split(",")) & ALL


class Authenticator:
    def __init__(self, config: RegistryConfig) -> None:
        self.enabled = config.auth_enabled
        self.anonymous_read = config.anonymous_read
        self.rules = config.access
        self._tokens = [t.encode() for t in config.tokens]
        self._users = load_htpasswd(config.htpasswd) if config.htpasswd else {}
        self._dummy = dummy_hash(self._users) if self._users else b""
        self._verified: set[tuple[str, bytes]] = set()
        secret = config.token_secret
        self._secret = secret.encode() if secret else secrets.token_bytes(32)

    def challenge(self, realm_base: str, scope: str | None) -> str:
        """Basic without rules: a Bearer challenge sends clients (docker, our push
        client) to the token endpoint, which only rules need. With rules: Bearer."""
        if not self.rules:
            return 'Basic realm="stowaway"'
        value = f'Bearer realm="{realm_base}/auth/token",service="stowaway"'
        return value + (f',scope="{scope}"' if scope else "")

    def _token_ok(self, token: str) -> bool:
        return any(hmac.compare_digest(token.encode(), t) for t in self._tokens)

    async def _password_ok(self, user: str, password: str) -> bool:
        if not self._users:
            return False
        secret = password.encode()
        key = (user, hashlib.sha256(secret).digest())
        if key in self._verified:
            return True
        hashed = self._users.get(user)
        # the same bcrypt work for unknown users and over-long passwords
        ok = await asyncio.to_thread(bcrypt.checkpw, secret[:BCRYPT_MAX], hashed or self._dummy)
        ok = ok and hashed is not None and len(secret) <= BCRYPT_MAX
        if ok:
            self._verified.add(key)
        return ok

    @staticmethod
    def anonymous(authorization: str | None) -> bool:
        """No credentials, or empty basic ones (containers/image sends ``Basic Og==``
        when it has none)."""
        return not authorization or authorization.strip() in ("Basic Og==", "Basic")

    async def identify(self, authorization: str | None) -> Caller | None:
        """The caller; ANONYMOUS without credentials, None for invalid ones."""
        if authorization is None or self.anonymous(authorization):
            return ANONYMOUS
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            return Caller("token", master=True) if self._token_ok(value) else self._issued(value)
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not sep:
            return None
        if self._token_ok(password):
            return Caller(user or "token", master=True)
        return Caller(user) if await self._password_ok(user, password) else None

    def rights(self, caller: Caller, name: str) -> frozenset[str]:
        """What ``caller`` may do on repository ``name``."""
        if not self.enabled:
            return ALL
        if caller.master:
            granted = ALL
        elif not self.rules:
            granted = ALL if caller.user else frozenset({"pull"} if self.anonymous_read else ())
        else:
            granted = frozenset(
                action
                for rule in self.rules
                if (rule.anonymous if caller.user is None else {caller.user, "*"} & set(rule.users))
                and any(fnmatch.fnmatchcase(name, p) for p in rule.repositories)
                for action in rule.actions
            )
        if caller.scopes is not None:
            granted &= caller.scopes.get(name, frozenset())
        return granted

    def authorize(self, caller: Caller, name: str, action: str) -> None:
        """Raise unless ``caller`` may ``action`` on ``name``: 401 when other
        credentials (or a token with more scope) could help, else 403 DENIED."""
        if action in self.rights(caller, name):
            return
        if caller.user is not None and action not in self.rights(
            Caller(caller.user, caller.master), name
        ):
            raise RegistryApiError.of(
                ErrorCode.DENIED, f"{caller.user} may not {action} repository {name}"
            )
        if caller.user is None:
            raise RegistryApiError.of(
                ErrorCode.UNAUTHORIZED, f"authentication required to {action} {name}"
            )
        raise RegistryApiError.of(
            ErrorCode.UNAUTHORIZED, f"the token does not grant {action} on {name}"
        )

    def issue(self, caller: Caller, scopes: list[str]) -> str:
        """A signed bearer token granting the requested scopes as far as the caller's
        rights go (nothing for scopes it has no right in)."""
        access: dict[str, list[str]] = {}
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is not None:
                name, wanted = parsed
                granted = wanted & self.rights(caller, name)
                access[name] = sorted(granted | set(access.get(name, ())))
        exp = int(time.time()) + TOKEN_LIFETIME
        payload = {"sub": caller.user, "master": caller.master, "access": access, "exp": exp}
        body = _b64(json.dumps(payload).encode())
        return body + "." + _b64(hmac.new(self._secret, body.encode(), "sha256").digest())

    def _issued(self, token: str) -> Caller | None:
        """The caller an issued token names, or None when forged or expired."""
        body, _, signature = token.partition(".")
        expected = _b64(hmac.new(self._secret, body.encode(), "sha256").digest())
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            return None
        try:
            payload = json.loads(_unb64(body))
        except ValueError:
            return None
        if payload["exp"] < time.time():
            return None
        scopes = {n: frozenset(a) for n, a in payload["access"].items()}
        return Caller(payload["sub"], bool(payload["master"]), scopes)
