"""Which parts of an environment a change touched, as JSON Pointers for subscribers."""

from __future__ import annotations

from typing import Any

MAX_PATHS = 64


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def changed_paths(old: Any, new: Any, limit: int = MAX_PATHS) -> list[str]:
    """The deepest differing JSON Pointers between two JSON values (`[""]`: the whole value).

    Lists of different lengths are reported whole; past `limit` paths the parent is reported.
    """
    out: list[str] = []
    _walk(old, new, "", out)
    if len(out) > limit:
        return _collapse(out, limit)
    return out


def _walk(old: Any, new: Any, path: str, out: list[str]) -> None:
    if type(old) is type(new) and old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old.keys() | new.keys():
            sub = f"{path}/{_escape(key)}"
            if key not in old or key not in new:
                out.append(sub)
            else:
                _walk(old[key], new[key], sub, out)
        return
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            _walk(a, b, f"{path}/{i}", out)
        return
    out.append(path)


def _collapse(paths: list[str], limit: int) -> list[str]:
    depth = max(p.count("/") for p in paths)
    while depth > 0:
        depth -= 1
        cut = sorted({"/".join(p.split("/")[: depth + 1]) for p in paths})
        if len(cut) <= limit:
            return cut
    return [""]
