"""Image options, the customisation layer and the image config JSON.

The customisation layer is the only part of an image that is not a store path:
``/tmp``, ``/etc/passwd``/``/etc/group`` and buildEnv-style symlinks that make the
``contents`` paths visible at ``/bin``, ``/etc``, ... It is described first as a
small sorted list of members, so its tar entries and its cache key come from the
same data and the layer is cached like any other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import re
import shlex
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from stowaway.errors import StowawayError
from stowaway.image.model import TarEntry
from stowaway.image.ownership import MkdirSpec, Rule, RuleSet
from stowaway.store.model import STORE_DIR, PathInfo, StoreSource

#: PATH set when the user sets none: with ``contents`` Docker's default, without them
#: the roots' ``bin`` directories first (see ``build_config``).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: CPU names (Python's platform.machine(), the first part of a Nix system) → OCI
#: architectures: the one table builds, pulls and BuildKit platforms share.
OCI_ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
           "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le", "s390x": "s390x",
           "riscv64": "riscv64"}  # fmt: skip
# used with fullmatch: "$" would also accept a trailing newline ("app\n" in /etc/passwd)
_PORT = re.compile(r"([0-9]{1,5})(?:/(tcp|udp|sctp))?")
_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,30}")
_ENV_KEY = re.compile(r"[^=\x00]+")
#: 9999-12-31T23:59:59Z, the last time RFC 3339 can write.
_LAST_CREATED = 253402300799
_UNNAMED_UID = 1000
#: Names with conventional ids (Debian's nobody/nogroup, also Fedora's group nobody).
_NOBODY = 65534
_KNOWN_UIDS = {"root": 0, "nobody": _NOBODY}
_KNOWN_GIDS = {"root": 0, "nogroup": _NOBODY, "nobody": _NOBODY}


class ImageOptionError(StowawayError):
    """An image option (env, expose, user, contents, ...) that cannot be used."""


def default_architecture() -> str:
    """The OCI architecture name of this machine (``amd64`` on x86_64)."""
    machine = platform.machine().lower()
    return OCI_ARCHITECTURES.get(machine, machine)


def rfc3339(epoch: int) -> str:
    """``1`` → ``1970-01-01T00:00:01Z`` (UTC, no fractions: reproducible)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ImageOptions:
    """What the user says about the image beyond its store paths.

    ``user`` is ``NAME``, ``UID``, ``NAME:GROUP`` or ``UID:GID``; ``expose`` items are
    ``PORT[/tcp|udp|sctp]``; ``contents`` are store paths linked into ``/``;
    ``created`` is epoch seconds; ``rules`` (``--chown``/``--chmod``) and ``mkdirs``
    (``--mkdir``) are parsed already (``image.ownership``). Validated on construction.
    """

    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    expose: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    contents: list[str] = field(default_factory=list)
    created: int = 1
    architecture: str = field(default_factory=default_architecture)
    os: str = "linux"
    rules: list[Rule] = field(default_factory=list)
    mkdirs: list[MkdirSpec] = field(default_factory=list)
    variant: str | None = None

    def __post_init__(self) -> None:
        for item in self.env:
            key, sep, _ = item.partition("=")
            if not sep or not _ENV_KEY.fullmatch(key):
                raise ImageOptionError(
                    f"environment entry {item!r} must look like KEY=VALUE with a non-empty KEY"
                )
        for port in self.expose:
            m = _PORT.fullmatch(port)
            if not m or not 1 <= int(m.group(1)) <= 65535:
                raise ImageOptionError(
                    f"exposed port {port!r} must look like PORT[/tcp|/udp|/sctp] "
                    "with PORT in 1..65535"
                )
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise ImageOptionError(f"working directory {self.workdir!r} must be an absolute path")
        if self.user is not None:
            parse_user(self.user)
        if not 0 <= self.created <= _LAST_CREATED:
            raise ImageOptionError(
                f"creation time {self.created} is not between 1970 and the year 9999"
            )
        for path in self.contents:
            if not path.startswith(STORE_DIR + "/") or "/" in path[len(STORE_DIR) + 1 :]:
                raise ImageOptionError(f"contents path {path!r} is not a store path")


def parse_words(value: str, what: str) -> list[str]:
    """``--entrypoint``/``--cmd`` style text: a JSON array of strings or shell words.
    ``what`` names the flag or build arg in errors."""
    value = value.strip()
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError as e:
            raise ImageOptionError(f"{what}: invalid JSON array {value!r}: {e}") from None
        if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
            raise ImageOptionError(f"{what}: {value!r} must be a JSON array of strings")
        return parsed
    try:
        return shlex.split(value)
    except ValueError as e:
        raise ImageOptionError(f"{what}: {value!r}: {e}") from None


def parse_created(value: str, what: str = "--created") -> int:
    """Creation time as epoch seconds, from epoch seconds, RFC 3339 or ``now``; a time
    without an offset is UTC (never this machine's zone: same input, same digest)."""
    if value.isascii() and value.isdigit():
        return int(value)
    if value == "now":
        return int(datetime.now(UTC).timestamp())
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())
    except ValueError:
        raise ImageOptionError(
            f"{what} {value!r} is neither epoch seconds, RFC 3339 nor 'now'"
        ) from None


def parse_labels(values: Sequence[str], what: str = "--label") -> dict[str, str]:
    """``KEY=VALUE`` strings as a label mapping."""
    labels: dict[str, str] = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key:
            raise ImageOptionError(f"{what} {v!r} must look like KEY=VALUE")
        labels[key] = val
    return labels


@dataclass(frozen=True)
class UserSpec:
    """The passwd/group entries a ``--user`` value implies."""

    name: str
    uid: int
    group: str
    gid: int


def parse_user(value: str) -> UserSpec:
    """``app`` → app 1000:1000; ``1000:100`` → user1000/group100; ``root`` → 0:0;
    ``nobody`` (or ``65534``) → nobody/nogroup 65534:65534, the conventional ids.

    Other named users get uid 1000 (the first regular uid) so files stay writable to
    them in volumes; numeric ids get a synthetic name so ``getpwuid`` works in the image.
    """
    user, sep, group = value.partition(":")
    if not user or (sep and not group):
        raise ImageOptionError(f"user {value!r} must look like NAME, UID, NAME:GROUP or UID:GID")
    uid = _id_or_none(user, value)
    if uid is None:
        name = user
        uid = _KNOWN_UIDS.get(user, _UNNAMED_UID)
    else:
        name = {0: "root", _NOBODY: "nobody"}.get(uid, f"user{uid}")
    if not sep:
        return UserSpec(name, uid, "nogroup" if uid == _NOBODY else name, uid)
    gid = _id_or_none(group, value)
    if gid is None:
        return UserSpec(name, uid, group, _KNOWN_GIDS.get(group, uid or _UNNAMED_UID))
    gname = {0: "root", _NOBODY: "nogroup"}.get(gid, name if gid == uid else f"group{gid}")
    return UserSpec(name, uid, gname, gid)


def _id_or_none(part: str, whole: str) -> int | None:
    if part.isascii() and part.isdigit():
        if int(part) > 2**31 - 1:
            raise ImageOptionError(f"id {part} in user {whole!r} is out of range")
        return int(part)
    if not _NAME.fullmatch(part):
        raise ImageOptionError(
            f"name {part!r} in user {whole!r} is not a valid user/group name "
            "(lowercase letters, digits, '_' and '-', at most 31 characters)"
        )
    return None


@dataclass(frozen=True)
class _Member:
    name: bytes
    kind: Literal["regular", "directory", "symlink"]
    mode: int
    data: bytes = b""
    target: bytes = b""
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Customisation:
    """The customisation layer's members (sorted) and a stable cache key for them;
    ``touched``: the indexes of the image's rules that changed a member."""

    members: tuple[_Member, ...]
    touched: frozenset[int] = frozenset()

    @property
    def key(self) -> str:
        """sha256 over a canonical description of every member: same contents, same key
        (owners appear only when not root, so layers without rules keep their keys)."""
        desc: list[list[object]] = []
        for m in self.members:
            row: list[object] = [
                m.name.hex(),
                m.kind,
                m.mode,
                hashlib.sha256(m.data).hexdigest(),
                m.target.hex(),
            ]
            if m.uid or m.gid:
                row.append([m.uid, m.gid])
            desc.append(row)
        digest = hashlib.sha256(json.dumps(desc, separators=(",", ":")).encode()).hexdigest()
        return f"customisation-v1:{digest}"

    def entries(self) -> Iterator[TarEntry]:
        for m in self.members:
            yield TarEntry(
                m.name, m.kind, m.mode, len(m.data), m.target, iter((m.data,)), m.uid, m.gid
            )


#: The base image's /etc/passwd and /etc/group (None: it has none), read when needed.
BaseAccounts = Callable[[], tuple[bytes | None, bytes | None]]


def plan_customisation(
    options: ImageOptions,
    source: StoreSource,
    closure: Mapping[str, PathInfo] | None = None,
    *,
    base_accounts: BaseAccounts | None = None,
) -> Customisation:
    """Describe the customisation layer; with ``closure``, check ``contents`` are in it.
    With a base image (``base_accounts``), /etc/passwd and /etc/group are the base's
    unless ``--user`` names a user it lacks (``_base_account_files``)."""
    members: dict[bytes, _Member] = {}
    owner: dict[bytes, str] = {}
    for name in (b"etc", b"tmp"):
        members[name] = _Member(name, "directory", 0o1777 if name == b"tmp" else 0o755)
        owner[name] = "the image's /" + name.decode()
    if base_accounts is None:
        accounts: tuple[bytes | None, bytes | None] = _account_files(options.user)
    else:
        accounts = _base_account_files(options.user, base_accounts)
    for name, data in zip((b"etc/passwd", b"etc/group"), accounts, strict=True):
        if data is not None:
            members[name] = _Member(name, "regular", 0o644, data)
            owner[name] = "the image's /" + name.decode()
    for path in options.contents:
        if closure is not None and path not in closure:
            raise ImageOptionError(
                f"contents path {path} is not in the image's closure",
                hint="pass it as a root too, or build it first",
            )
        _link_contents(source, path, members, owner)
    for spec in options.mkdirs:
        _make_dir(spec, options.user, members, owner)
    return _apply_rules(RuleSet(options.rules), [members[k] for k in sorted(members)])


def _make_dir(
    spec: MkdirSpec, user: str | None, members: dict[bytes, _Member], owner: dict[bytes, str]
) -> None:
    """``--mkdir``: the directory (owned by the ``--user`` unless ids are given) and any
    missing parents (root's, 0755). A file or symlink in the way is a conflict."""
    parts = spec.path.lstrip("/").encode().split(b"/")
    what = f"--mkdir {spec.path}"
    for depth in range(1, len(parts) + 1):
        name = b"/".join(parts[:depth])
        old = members.get(name)
        if old is not None and old.kind != "directory":
            raise ImageOptionError(
                f"{what}: /{name.decode(errors='replace')} is already a {old.kind} "
                f"(from {owner[name]})",
                hint="choose a directory that no --contents path provides as a file or link",
            )
        if depth < len(parts):
            if old is None:
                members[name] = _Member(name, "directory", 0o755)
                owner[name] = what
            continue
        if spec.uid is not None and spec.gid is not None:
            uid, gid = spec.uid, spec.gid
        elif user is not None:
            found = parse_user(user)
            uid, gid = found.uid, found.gid
        else:
            uid = gid = 0
        mode = spec.mode if spec.mode is not None else (old.mode if old else 0o755)
        members[name] = _Member(name, "directory", mode, uid=uid, gid=gid)
        owner[name] = what


def _apply_rules(rules: RuleSet, members: list[_Member]) -> Customisation:
    """The members with ``--chown``/``--chmod`` applied (after ``--mkdir``: rules have the
    last word), and which rules that used."""
    if not rules:
        return Customisation(tuple(members))
    touched: set[int] = set()
    out = []
    for m in members:
        mode, uid, gid, used = rules.resolve(m.name, m.kind, m.mode, m.uid, m.gid)
        touched |= used
        out.append(dataclasses.replace(m, mode=mode, uid=uid, gid=gid) if used else m)
    return Customisation(tuple(out), frozenset(touched))


def _account_files(user: str | None) -> tuple[bytes, bytes]:
    passwd = ["root:x:0:0:root:/root:/bin/sh"]
    group = ["root:x:0:"]
    if user is not None:
        spec = parse_user(user)
        if spec.uid != 0:
            passwd.append(f"{spec.name}:x:{spec.uid}:{spec.gid}::/tmp:/bin/sh")
        if spec.gid != 0:
            group.append(f"{spec.group}:x:{spec.gid}:")
    return ("\n".join(passwd) + "\n").encode(), ("\n".join(group) + "\n").encode()


def _base_account_files(
    user: str | None, base_accounts: BaseAccounts
) -> tuple[bytes | None, bytes | None]:
    """Files to write over a base image's accounts: none for no ``--user``, a numeric
    one or root (ids need no entry; every base has root); for a new name, the base's
    files plus its entries (a base without them gets ours alone, as with no base)."""
    if user is None:
        return None, None
    spec = parse_user(user)
    if user.partition(":")[0] in ("root", str(spec.uid)):
        return None, None
    passwd, group = base_accounts()
    if passwd is None:
        return _account_files(user)
    out_passwd = (
        None
        if _has_entry(passwd, spec.name)
        else _appended(passwd, f"{spec.name}:x:{spec.uid}:{spec.gid}::/tmp:/bin/sh")
    )
    group = group or b"root:x:0:\n"
    out_group = (
        None
        if spec.gid == 0 or _has_entry(group, spec.group)
        else _appended(group, f"{spec.group}:x:{spec.gid}:")
    )
    if out_passwd is None and out_group is None:
        return None, None
    return out_passwd, out_group


def _has_entry(table: bytes, name: str) -> bool:
    return any(line.split(b":", 1)[0] == name.encode() for line in table.splitlines())


def _appended(table: bytes, line: str) -> bytes:
    return table + (b"" if not table or table.endswith(b"\n") else b"\n") + line.encode() + b"\n"


def _link_contents(
    source: StoreSource, path: str, members: dict[bytes, _Member], owner: dict[bytes, str]
) -> None:
    """Mirror ``path``'s directories as real dirs and link every other node (buildEnv
    at leaf level), so several contents paths can share ``bin/`` or ``etc/``."""
    entries = source.entries(path)
    root = next(entries, None)
    if root is None or root.kind != "directory":
        raise ImageOptionError(f"contents path {path} is not a directory")
    store_prefix = path.encode()
    for entry in entries:
        name = entry.path
        if name.split(b"/", 1)[0] == b"nix":
            raise ImageOptionError(
                f"contents path {path} provides /{name.decode(errors='replace')}, "
                "which would clash with the image's /nix/store"
            )
        if entry.kind == "directory":
            new = _Member(name, "directory", 0o755)
        else:
            new = _Member(name, "symlink", 0o777, target=store_prefix + b"/" + name)
        old = members.get(name)
        if old is not None:
            if old.kind == "directory" and new.kind == "directory":
                continue
            raise ImageOptionError(
                f"contents conflict at /{name.decode(errors='replace')}: "
                f"provided by both {owner[name]} and {path}"
            )
        members[name] = new
        owner[name] = path


def bin_dirs_of(source: StoreSource, roots: Sequence[str]) -> list[str]:
    """``<root>/bin`` of each root that has one (read up to that name: store paths
    list their entries sorted, so ``bin`` comes early)."""
    found = []
    for root in dict.fromkeys(roots):
        for entry in source.entries(root):
            if not entry.path:
                if entry.kind != "directory":
                    break
                continue
            if b"/" in entry.path:
                continue
            if entry.path == b"bin":
                if entry.kind != "regular":  # a directory, or a link to one
                    found.append(root + "/bin")
                break
            if entry.path > b"bin":
                break
    return found


@dataclass(frozen=True)
class BaseConfig:
    """What the config of a base image contributes, already checked
    (``image.base.parse_base_config``): its run settings, history and variant."""

    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    user: str = ""
    workdir: str = ""
    exposed_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    stop_signal: str = ""
    history: tuple[Mapping[str, object], ...] = ()
    diff_ids: tuple[str, ...] = ()
    variant: str = ""


def build_config(
    options: ImageOptions,
    diff_ids: Sequence[str],
    history_comments: Sequence[str],
    format: Literal["oci", "docker"] = "oci",
    base: BaseConfig | None = None,
    *,
    bin_dirs: Sequence[str] | None = None,
) -> bytes:
    """The image config as canonical JSON bytes. The same JSON serves both formats
    (only the config blob's media type differs), so ``format`` is checked, not used.
    With ``base``, ``diff_ids`` and ``history_comments`` are those of our layers, put
    on top of the base's, and the run settings are merged (``_run_config``); the
    roots' ``bin_dirs`` (``compose`` passes them when no ``contents`` are linked) lead
    PATH unless ``env`` sets one."""
    if format not in ("oci", "docker"):
        raise ImageOptionError(f"unknown image format {format!r} (expected oci or docker)")
    if len(history_comments) != len(diff_ids):
        raise ValueError("one history comment per layer is required")
    base = base or BaseConfig()
    created = rfc3339(options.created)
    doc: dict[str, object] = {
        "created": created,
        "architecture": options.architecture,
        "os": options.os,
        "config": _run_config(options, base, bin_dirs),
        "rootfs": {"type": "layers", "diff_ids": [*base.diff_ids, *diff_ids]},
        "history": [
            *(dict(h) for h in base.history),
            *(
                {"created": created, "created_by": "stowaway", "comment": c}
                for c in history_comments
            ),
        ],
    }
    if options.variant or base.variant:
        doc["variant"] = options.variant or base.variant
    return canonical_json(doc)


def _run_config(
    options: ImageOptions, base: BaseConfig, bin_dirs: Sequence[str] | None
) -> dict[str, object]:
    """Ours over the base's, as Docker's FROM does: Env by key (a PATH of ours wins;
    else the roots' ``bin_dirs`` (when given, even none) lead the base's PATH or
    Docker's default; with
    ``contents`` linked, the base's PATH or Docker's default); Entrypoint and Cmd ours
    when given, an Entrypoint of ours clearing the base's Cmd; WorkingDir ours when
    given; User ours when given, as numeric ``UID:GID`` (kubelet's ``runAsNonRoot``
    checks only numbers) except over a base, whose /etc/passwd decides what a name
    is; ports, volumes and labels merged (ours win)."""
    env = {e.partition("=")[0]: e for e in base.env}
    ours = {e.partition("=")[0]: e for e in options.env}
    if "PATH" not in ours:
        fallback = env.get("PATH", f"PATH={DEFAULT_PATH}").partition("=")[2]
        if options.contents:
            ours["PATH"] = f"PATH={fallback}"
        elif bin_dirs is not None:
            ours["PATH"] = "PATH=" + ":".join([*dict.fromkeys(bin_dirs), fallback])
    env = {**({"PATH": ours["PATH"]} if "PATH" in ours and "PATH" not in env else {}), **env}
    env |= ours
    entrypoint: Sequence[str] | None = options.entrypoint
    cmd: Sequence[str] | None = options.cmd
    if entrypoint is None:
        entrypoint = base.entrypoint
        cmd = base.cmd if cmd is None else cmd
    conf: dict[str, object] = {}
    if entrypoint is not None:
        conf["Entrypoint"] = list(entrypoint)
    if cmd is not None:
        conf["Cmd"] = list(cmd)
    if env:
        conf["Env"] = list(env.values())
    if options.workdir or base.workdir:
        conf["WorkingDir"] = options.workdir or base.workdir
    if options.user:
        spec = parse_user(options.user)
        conf["User"] = options.user if base.diff_ids else f"{spec.uid}:{spec.gid}"
    elif base.user:
        conf["User"] = base.user
    ports = [*base.exposed_ports, *(_normal_port(p) for p in options.expose)]
    if ports:
        conf["ExposedPorts"] = {p: {} for p in ports}
    if base.volumes:
        conf["Volumes"] = {v: {} for v in base.volumes}
    labels = {**base.labels, **options.labels}
    if labels:
        conf["Labels"] = labels
    if base.stop_signal:
        conf["StopSignal"] = base.stop_signal
    return conf


def _normal_port(port: str) -> str:
    return port if "/" in port else port + "/tcp"


def canonical_json(doc: object) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8: one document, one byte string."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
