"""Image destinations named the way skopeo names them, and what writing one did.

``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]``, ``docker-archive:FILE[:NAME[:TAG]]``
and ``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]``. As in skopeo, the path of the
file forms ends at the first ``:``; everything after it is the tag or reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from stowaway.errors import StowawayError

FORMS = (
    "oci:DIR[:TAG]",
    "oci-archive:FILE[:TAG]",
    "docker-archive:FILE[:NAME[:TAG]]",
    "docker://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]",
)

DEFAULT_REGISTRY = "docker.io"
#: Other names of Docker Hub in references, read as ``docker.io`` (as Docker does).
HUB_ALIASES = frozenset({"docker.io", "index.docker.io"})
#: Docker Hub's API host; ``docker.io`` is only its name in references.
HUB_API = "registry-1.docker.io"

# OCI layout ref names (image-spec annotation rules, as skopeo checks them).
_OCI_REF = re.compile(r"^[A-Za-z0-9_.\-]+(?:[:/@+][A-Za-z0-9_.\-]+)*$")
# Docker reference grammar (distribution/reference), without the digest part.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?"  # noqa: E501
_TAG = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
_REPO = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN_RE = re.compile(rf"^{_DOMAIN}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class TargetError(StowawayError):
    """A destination string none of the supported forms accepts."""

    def __init__(self, value: str, why: str) -> None:
        super().__init__(
            f"invalid destination {value!r}: {why}",
            hint="accepted forms: " + ", ".join(FORMS),
        )


@dataclass(frozen=True)
class OciTarget:
    directory: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"oci:{self.directory}" + (f":{self.tag}" if self.tag else "")


@dataclass(frozen=True)
class OciArchiveTarget:
    file: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"oci-archive:{self.file}" + (f":{self.tag}" if self.tag else "")


@dataclass(frozen=True)
class DockerArchiveTarget:
    file: str
    #: ``NAME:TAG`` as written into manifest.json's RepoTags (tag defaults to latest).
    reference: str | None = None

    def __str__(self) -> str:
        return f"docker-archive:{self.file}" + (f":{self.reference}" if self.reference else "")


@dataclass(frozen=True)
class RegistryTarget:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        ref = f"@{self.digest}" if self.digest else f":{self.tag}" if self.tag else ""
        return f"docker://{self.registry}/{self.repository}{ref}"

    @property
    def api_host(self) -> str:
        """The host to send API requests to (Docker Hub's ``registry-1.docker.io``
        for ``docker.io``)."""
        return HUB_API if self.registry == DEFAULT_REGISTRY else self.registry


Target = OciTarget | OciArchiveTarget | DockerArchiveTarget | RegistryTarget


@dataclass
class SinkResult:
    """What a sink did with each blob: bytes ``written``, ``linked`` without copying
    (hard link, registry mount) or ``skipped`` because the destination had it."""

    target: str
    manifest_digest: str
    written: list[str] = field(default_factory=list)
    linked: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_written: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "target": self.target,
            "manifest_digest": self.manifest_digest,
            "written": self.written,
            "linked": self.linked,
            "skipped": self.skipped,
            "bytes_written": self.bytes_written,
        }


def parse_target(value: str) -> Target:
    """Parse a skopeo-style destination; raise TargetError naming the accepted forms."""
    transport, sep, rest = value.partition(":")
    if not sep:
        raise TargetError(value, "no transport prefix")
    if transport == "docker":
        return _parse_registry(value, rest)
    path, _, ref = rest.partition(":")
    if not path:
        raise TargetError(value, f"{transport}: needs a path")
    if transport in ("oci", "oci-archive"):
        if ref and not _OCI_REF.fullmatch(ref):
            raise TargetError(value, f"{ref!r} is not a valid OCI reference name")
        if transport == "oci":
            return OciTarget(path, ref or None)
        return OciArchiveTarget(path, ref or None)
    if transport == "docker-archive":
        return DockerArchiveTarget(path, _docker_archive_ref(value, ref) if ref else None)
    raise TargetError(value, f"unknown transport {transport!r}")


def _docker_archive_ref(value: str, ref: str) -> str:
    """``NAME[:TAG]`` where NAME may start with ``host:port/``; tag defaults to latest."""
    if "@" in ref:
        raise TargetError(value, "docker-archive references cannot carry a digest")
    name, tag = ref, "latest"
    last = ref.rfind(":")
    if last > ref.rfind("/"):
        name, tag = ref[:last], ref[last + 1 :]
    _split_name(value, name)
    if not _TAG.fullmatch(tag):
        raise TargetError(value, f"{tag!r} is not a valid tag")
    return f"{name}:{tag}"


def _split_name(value: str, name: str) -> tuple[str | None, str]:
    """Split a Docker image name into (domain or None, repository path)."""
    first, slash, remainder = name.partition("/")
    domain = None
    if slash and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        domain, name = first, remainder
        if not _DOMAIN_RE.fullmatch(domain):
            raise TargetError(value, f"{domain!r} is not a valid registry host")
    if not _REPO.fullmatch(name):
        raise TargetError(
            value,
            f"{name!r} is not a valid repository name (lowercase letters, digits, "
            "separators '.', '_', '-', components joined by '/')",
        )
    return domain, name


def _parse_registry(value: str, rest: str) -> RegistryTarget:
    if not rest.startswith("//") or len(rest) == 2:
        raise TargetError(value, "docker: must be followed by //HOST/REPO")
    ref = rest[2:]
    digest = tag = None
    if "@" in ref:
        ref, _, digest = ref.partition("@")
        if not _DIGEST.fullmatch(digest):
            raise TargetError(value, f"{digest!r} is not a sha256:<64 hex> digest")
    last = ref.rfind(":")
    if last > ref.rfind("/"):
        ref, tag = ref[:last], ref[last + 1 :]
        if not _TAG.fullmatch(tag):
            raise TargetError(value, f"{tag!r} is not a valid tag")
    domain, repo = _split_name(value, ref)
    if domain is None or domain in HUB_ALIASES:  # Docker Hub, as Docker names it
        domain = DEFAULT_REGISTRY
        if "/" not in repo:
            repo = "library/" + repo
    if tag is None and digest is None:
        tag = "latest"
    return RegistryTarget(domain, repo, tag, digest)
