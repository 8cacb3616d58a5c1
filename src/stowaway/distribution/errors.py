"""The one registry error type, as the OCI distribution spec writes it:
``{"errors": [{"code": ..., "message": ..., "detail": ...}]}``.

Used both ways: the server raises and serialises it, the push client parses it
from responses; ``temporary`` tells the client whether a retry can help.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum

from stowaway.errors import RegistryError


class ErrorCode(StrEnum):
    BLOB_UNKNOWN = "BLOB_UNKNOWN"
    BLOB_UPLOAD_INVALID = "BLOB_UPLOAD_INVALID"
    BLOB_UPLOAD_UNKNOWN = "BLOB_UPLOAD_UNKNOWN"
    DIGEST_INVALID = "DIGEST_INVALID"
    MANIFEST_BLOB_UNKNOWN = "MANIFEST_BLOB_UNKNOWN"
    MANIFEST_INVALID = "MANIFEST_INVALID"
    MANIFEST_UNKNOWN = "MANIFEST_UNKNOWN"
    NAME_INVALID = "NAME_INVALID"
    NAME_UNKNOWN = "NAME_UNKNOWN"
    SIZE_INVALID = "SIZE_INVALID"
    UNAUTHORIZED = "UNAUTHORIZED"
    DENIED = "DENIED"
    UNSUPPORTED = "UNSUPPORTED"
    TOOMANYREQUESTS = "TOOMANYREQUESTS"
    RANGE_INVALID = "RANGE_INVALID"
    UNKNOWN = "UNKNOWN"


#: HTTP status the spec (and distribution) uses for each code.
STATUS: dict[ErrorCode, int] = {
    ErrorCode.BLOB_UNKNOWN: 404,
    ErrorCode.BLOB_UPLOAD_INVALID: 400,
    ErrorCode.BLOB_UPLOAD_UNKNOWN: 404,
    ErrorCode.DIGEST_INVALID: 400,
    ErrorCode.MANIFEST_BLOB_UNKNOWN: 400,
    ErrorCode.MANIFEST_INVALID: 400,
    ErrorCode.MANIFEST_UNKNOWN: 404,
    ErrorCode.NAME_INVALID: 400,
    ErrorCode.NAME_UNKNOWN: 404,
    ErrorCode.SIZE_INVALID: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.DENIED: 403,
    ErrorCode.UNSUPPORTED: 415,
    ErrorCode.TOOMANYREQUESTS: 429,
    ErrorCode.RANGE_INVALID: 416,
    ErrorCode.UNKNOWN: 500,
}


@dataclass
class RegistryApiError(RegistryError):
    """One or more errors answered by a registry, with the HTTP status."""

    status: int
    errors: list[tuple[str, str]] = field(default_factory=list)  # (code, message)

    def __post_init__(self) -> None:
        text = "; ".join(f"{c}: {m}" for c, m in self.errors) or f"HTTP {self.status}"
        RegistryError.__init__(self, f"registry answered {self.status}: {text}")

    @classmethod
    def of(cls, code: ErrorCode, message: str) -> RegistryApiError:
        return cls(STATUS[code], [(code.value, message)])

    @property
    def code(self) -> str:
        return self.errors[0][0] if self.errors else ErrorCode.UNKNOWN.value

    @property
    def temporary(self) -> bool:
        """Worth retrying: throttling and server-side failures."""
        return self.status in (408, 429, 500, 502, 503, 504) or self.code == "TOOMANYREQUESTS"

    def to_json(self) -> bytes:
        return json.dumps(
            {"errors": [{"code": c, "message": m, "detail": None} for c, m in self.errors]}
        ).encode()

    @classmethod
    def from_response(cls, status: int, body: bytes) -> RegistryApiError:
        """Parse an error body; tolerate bodies that are not the spec's JSON."""
        try:
            doc = json.loads(body or b"{}")
            items = [
                (str(e.get("code", "UNKNOWN")), str(e.get("message", ""))) for e in doc["errors"]
            ]
        except (ValueError, KeyError, TypeError, AttributeError):
            snippet = body[:200].decode("utf-8", "replace").strip()
            items = [("UNKNOWN", snippet)] if snippet else []
        return cls(status, items)
