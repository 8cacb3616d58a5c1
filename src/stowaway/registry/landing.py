"""The small static HTML page at ``/``: how to pull, and the package sets.

No JavaScript, no templates: a handful of lines built with ``html.escape`` on
every value (host names, tags and package names all come from outside).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Protocol, runtime_checkable

SAMPLE = 12  # package names shown per set


@runtime_checkable
class PackageSets(Protocol):
    def package_sets(self) -> Mapping[str, Sequence[str]]:
        """Tag → package names (meta-packages first)."""
        ...


def render_landing(host: str, sets: Mapping[str, Sequence[str]]) -> str:
    h = escape(host or "HOST")
    example = next((n for names in sets.values() for n in names), "hello")
    rows = []
    for tag, names in sorted(sets.items()):
        shown = ", ".join(f"<code>{escape(n)}</code>" for n in names[:SAMPLE])
        more = f" and {len(names) - SAMPLE} more" if len(names) > SAMPLE else ""
        rows.append(
            f"<tr><td><code>:{escape(tag)}</code></td><td>{len(names)}</td>"
            f"<td>{shown or '(empty)'}{more}</td></tr>"
        )
    table = (
        "<table><tr><th>tag</th><th>packages</th><th>for example</th></tr>"
        + "".join(rows)
        + "</table>"
        if rows
        else "<p>No package sets are configured; <code>store/</code> names still work.</p>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>stowaway registry</title>
<style>body{{font-family:sans-serif;max-width:50em;margin:2em auto}}
td,th{{text-align:left;padding:.2em .8em}}</style></head>
<body><h1>stowaway registry</h1>
<p>Images are composed on request from Nix packages; every layer is built once.</p>
<h2>Pull</h2>
<pre>docker pull {h}/shell/{escape(example)}
docker pull {h}/{escape(example)}:latest
docker pull {h}/store/&lt;32-char hash&gt;[/&lt;hash&gt;...]</pre>
<p>Each name component is a package; the order does not matter. The tag picks the
package set. Packages are linked into <code>/</code>, so their <code>bin/</code> is on
<code>PATH</code>.</p>
<h2>Package sets</h2>
{table}
<p><a href="/healthz">health</a> &middot; <a href="/metrics">metrics</a></p>
</body></html>
"""
