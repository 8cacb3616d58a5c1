"""The small static HTML page at ``/``: how to pull, and the package sets.

The pull examples are only those that work with the running configuration: a
package name from a set that has packages, a meta-package only when the set holds
every one of its members (the default ``shell`` needs ``bashInteractive``,
``coreutils``, ``moreutils`` and ``nano``), no package names at all when a set
lacks an ``always`` package, ``store/<hash>`` names whenever images are composed,
and for a plain registry (``--no-compose``) pushing and pulling.

No JavaScript, no templates: a handful of lines built with ``html.escape`` on
every value (host names, tags and package names all come from outside).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Protocol, runtime_checkable

from stowaway.registry.config import NixOptions
from stowaway.registry.validate import NAME_RE

SAMPLE = 12  # package names shown per set
DEFAULT_TAG = "latest"


@runtime_checkable
class PackageSets(Protocol):
    def package_sets(self) -> Mapping[str, Sequence[str]]:
        """Tag → package names (meta-packages first)."""
        ...


@runtime_checkable
class ComposeRules(Protocol):
    """What a resolver composes with (``NixResolver.options``): the meta-packages,
    the ``always`` packages and whether missing names are built."""

    options: NixOptions


@dataclass(frozen=True)
class Rules:
    """The parts of the ``[nix]`` options the examples depend on."""

    compose: bool = True
    meta: Mapping[str, Sequence[str]] = field(default_factory=dict)
    always: Sequence[str] = ()
    nix_build: bool = False

    @classmethod
    def of(cls, options: NixOptions | None) -> Rules:
        if options is None or not options.enabled:
            return cls(compose=False)
        return cls(True, options.meta, options.always, options.nix_build)


def _has(names: set[str], lowered: set[str], want: str) -> bool:
    return want in names or want.lower() in lowered  # the index's lower-case aliases


def _pullable(packages: Sequence[str]) -> str | None:
    """A package name a client can put in a repository name: a key the name grammar
    accepts (lower case), else the lower-case alias of one."""
    fits = [n for n in packages if "/" not in n and NAME_RE.fullmatch(n)]
    if fits:
        return fits[0]
    taken = set(packages)
    aliases = [n.lower() for n in packages if "/" not in n and n.lower() not in taken]
    return next((a for a in aliases if NAME_RE.fullmatch(a)), None)


def pull_examples(
    host: str, sets: Mapping[str, Sequence[str]], rules: Rules
) -> tuple[list[str], list[str]]:
    """``(commands, notes)``: pull commands that work as configured, and plain-text
    notes on why the others do not (not escaped: the caller escapes)."""
    if not rules.compose:
        return (
            [
                f"skopeo copy --dest-tls-verify=false oci:DIR:TAG docker://{host}/NAME:TAG",
                f"docker pull {host}/NAME:TAG",
            ],
            ["Images are not composed here (a plain registry): push an image, then pull it."],
        )
    commands: list[str] = []
    notes: list[str] = []
    for tag in sorted(sets, key=lambda t: (t != DEFAULT_TAG, t)):
        packages = [n for n in sets[tag] if n not in rules.meta]
        names, lowered = set(packages), {n.lower() for n in packages}
        built = rules.nix_build and tag == DEFAULT_TAG
        missing = [a for a in rules.always if not _has(names, lowered, a)]
        if missing and not built:
            notes.append(
                f"The package set :{tag} lacks the always-included "
                f"{', '.join(missing)}: its package names cannot be pulled."
            )
            continue
        example = _pullable(packages) or ("hello" if built else None)
        if example is None:
            continue
        suffix = "" if tag == DEFAULT_TAG else f":{tag}"
        commands.append(f"docker pull {host}/{example}{suffix}")
        for meta, members in sorted(rules.meta.items()):
            complete = built or all(_has(names, lowered, m) for m in members)
            if complete and NAME_RE.fullmatch(meta):
                commands.append(f"docker pull {host}/{meta}/{example}{suffix}")
                break
        else:
            if rules.meta:
                notes.append(
                    f"Meta-packages ({', '.join(sorted(rules.meta))}) need all their "
                    f"members in the package set :{tag}."
                )
        if built and not packages:
            notes.append("Names not in the index are built by nix-build on first pull.")
        break  # one set's examples are enough
    if not commands:
        notes.append(
            "No package index is configured (or it is empty), so package names do not "
            "resolve; write one with `stowaway index` and pass it as --index."
        )
    commands.append(f"docker pull {host}/store/<32-char hash>[/<hash>...]")
    return commands, notes


def render_landing(host: str, sets: Mapping[str, Sequence[str]], rules: Rules | None = None) -> str:
    rules = rules if rules is not None else Rules()
    commands, notes = pull_examples(host or "HOST", sets, rules)
    rows = []
    for tag, names in sorted(sets.items()):
        shown = ", ".join(f"<code>{escape(n)}</code>" for n in names[:SAMPLE])
        more = f" and {len(names) - SAMPLE} more" if len(names) > SAMPLE else ""
        rows.append(
            f"<tr><td><code>:{escape(tag)}</code></td><td>{len(names)}</td>"
            f"<td>{shown or '(empty)'}{more}</td></tr>"
        )
    if not rules.compose:
        table = ""
    elif rows:
        table = (
            "<h2>Package sets</h2>\n<table><tr><th>tag</th><th>packages</th>"
            "<th>for example</th></tr>" + "".join(rows) + "</table>"
        )
    else:
        table = "<h2>Package sets</h2>\n<p>No package sets are configured.</p>"
    pre = "\n".join(escape(c) for c in commands)
    about = "".join(f"<p>{escape(n)}</p>\n" for n in notes)
    intro = (
        "Images are composed on request from Nix packages; every layer is built once."
        if rules.compose
        else "A plain OCI registry."
    )
    names = (
        "<p>Each name component is a package; the order does not matter. The tag picks "
        "the package set. Packages are linked into <code>/</code>, so their "
        "<code>bin/</code> is on <code>PATH</code>. A <code>store/</code> name takes "
        "store paths by the 32 characters after <code>/nix/store/</code>.</p>\n"
        if rules.compose
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>stowaway registry</title>
<style>body{{font-family:sans-serif;max-width:50em;margin:2em auto}}
td,th{{text-align:left;padding:.2em .8em}}</style></head>
<body><h1>stowaway registry</h1>
<p>{intro}</p>
<h2>Pull</h2>
<pre>{pre}</pre>
{about}{names}{table}
<p><a href="/healthz">health</a> &middot; <a href="/metrics">metrics</a></p>
</body></html>
"""
