"""Basic (htpasswd, bcrypt) and static bearer-token authentication.

Policy: with no htpasswd and no tokens, everything is open. Otherwise pushes
(any method but GET/HEAD) always need credentials, and reads need them unless
``anonymous_read``. A token may also be given as the password of HTTP basic
auth (any user name), so ``docker login`` works with tokens.

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
import hashlib
import hmac
import re
import secrets
from pathlib import Path

import bcrypt

from stowaway.registry.config import RegistryConfig, RegistryConfigError
from stowaway.registry.errors import ErrorCode, RegistryApiError

READ_METHODS = frozenset({"GET", "HEAD"})
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


class Authenticator:
    def __init__(self, config: RegistryConfig) -> None:
        self.enabled = config.auth_enabled
        self.anonymous_read = config.anonymous_read
        self._tokens = [t.encode() for t in config.tokens]
        self._users = load_htpasswd(config.htpasswd) if config.htpasswd else {}
        self._dummy = dummy_hash(self._users) if self._users else b""
        self._verified: set[tuple[str, bytes]] = set()
        # Always Basic, also with tokens only: a Bearer challenge names a token
        # service URL in its realm, which clients (docker, our own push client) call,
        # and there is none. Tokens work as the basic-auth password instead.
        self.challenge = 'Basic realm="stowaway"'

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

    async def identify(self, authorization: str | None) -> str | None:
        """The authenticated user ("token" for bearer tokens), or None."""
        if authorization is None or self.anonymous(authorization):
            return None
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            return "token" if self._token_ok(value) else None
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not sep:
            return None
        if self._token_ok(password):
            return user or "token"
        return user if await self._password_ok(user, password) else None

    async def check(self, method: str, authorization: str | None) -> str | None:
        """Raise 401 UNAUTHORIZED unless the request may proceed; return the user."""
        if not self.enabled:
            return None
        user = await self.identify(authorization)
        if user is not None:
            return user
        if not self.anonymous(authorization):
            raise RegistryApiError.of(ErrorCode.UNAUTHORIZED, "invalid credentials")
        if method in READ_METHODS and self.anonymous_read:
            return None
        action = "pull" if method in READ_METHODS else "push"
        raise RegistryApiError.of(ErrorCode.UNAUTHORIZED, f"authentication required to {action}")
