"""containerd list filters for snapshots, the subset containerd itself sends.

containerd's metadata layer finds a snapshot committed by a remote snapshotter with
``labels."containerd.io/snapshot.ref"==<chain id>,parent==<key>`` (it re-checks the
results, but answering precisely keeps List cheap). Syntax: filters are OR-ed; within
one, comma-separated conditions are AND-ed; a condition is ``field``, ``field==value``,
``field!=value`` or ``field~=regex``; fields are ``name``, ``parent``, ``kind`` and
``labels.<key>`` (the key may be double-quoted); values may be double-quoted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

from stowaway.runtime.snapshotter.contract import Info, InvalidArgument

__all__ = ["compile_filters", "required_labels"]

Predicate = Callable[[Info], bool]

_QUOTED = r'"(?:[^"\\]|\\.)*"'
_COND = re.compile(
    rf"(?P<field>(?:labels\.(?:{_QUOTED}|[^,=!~\"]+))|name|parent|kind)"
    rf"(?:(?P<op>==|!=|~=)(?P<value>{_QUOTED}|[^,]*))?(?:,|$)"
)


def _unquote(s: str) -> str:
    return str(json.loads(s)) if s.startswith('"') else s


def _field(info: Info, field: str) -> str | None:
    if field.startswith("labels."):
        return info.labels.get(_unquote(field[len("labels.") :]))
    if field == "kind":
        return info.kind.name.lower()
    return str(getattr(info, field))


def _condition(field: str, op: str | None, value: str, where: str) -> Predicate:
    if op is None:
        return lambda i: _field(i, field) is not None
    if op == "~=":
        try:
            rx = re.compile(value)
        except re.error as e:
            raise InvalidArgument(f"filter {where!r}: bad regular expression: {e}") from None
        return lambda i: (v := _field(i, field)) is not None and rx.search(v) is not None
    if op == "==":
        return lambda i: _field(i, field) == value
    return lambda i: _field(i, field) != value


Condition = tuple[str, str | None, str]  # (field, op or None, unquoted value)


def _parse(text: str) -> list[Condition]:
    conds: list[Condition] = []
    pos = 0
    while pos < len(text):
        m = _COND.match(text, pos)
        if m is None or m.end() == pos:
            raise InvalidArgument(f"filter {text!r}: cannot parse at offset {pos}")
        value = _unquote(m["value"]) if m["value"] is not None else ""
        conds.append((m["field"], m["op"], value))
        pos = m.end()
    return conds


def _compile_one(text: str) -> Predicate:
    conds = [_condition(field, op, value, text) for field, op, value in _parse(text)]
    return lambda i: all(c(i) for c in conds)


def compile_filters(filters: Sequence[str]) -> Predicate:
    """One predicate for ``filters`` (OR of each; everything matches when empty)."""
    preds = [_compile_one(f) for f in filters if f]
    if not preds:
        return lambda i: True
    return lambda i: any(p(i) for p in preds)


def required_labels(filters: Sequence[str]) -> dict[str, str]:
    """Labels every match must carry with exactly these values (``labels.K==V`` in
    the only filter), so a store can pre-select rows; empty when nothing is implied."""
    texts = [f for f in filters if f]
    if len(texts) != 1:
        return {}
    return {
        _unquote(field[len("labels.") :]): value
        for field, op, value in _parse(texts[0])
        if op == "==" and field.startswith("labels.")
    }
