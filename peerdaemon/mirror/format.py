"""Environment JSON as Mockoon writes it, so that a mirrored file diffs small in git.

Mockoon saves `JSON.stringify(environment, null, 2)` (or without indent when pretty printing is
off). Two things decide the bytes: the key order of every object and the number format. Key order
comes from the file's previous content wherever it holds the same object (entities matched by
uuid, other list items by index), so a one-field change is a one-line diff; new objects get
Mockoon's canonical order (@mockoon/commons 9.9.0, `environment-schema.constants`). Numbers are
written as JavaScript writes them (`1e-7`, `0.00001`, `1e+21`), not as Python does.
"""

from __future__ import annotations

import decimal
import hashlib
import json
import math
import re
from typing import Any

from ..model.keyorder import order_like
from ..model.layout import js_value, normalize

# -- JSON.stringify ---------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


def js_number(value: int | float) -> str:
    """ECMAScript Number::toString: what JSON.stringify writes for a number."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and abs(value) < 10**21:
        return str(value)
    x = float(value)
    if not math.isfinite(x):
        return "null"
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    _, digits_t, exp = decimal.Decimal(repr(abs(x))).as_tuple()
    digits = "".join(map(str, digits_t)).rstrip("0") or "0"
    assert isinstance(exp, int)
    k = len(digits)
    # repr's digits may carry trailing zeros we stripped: n is where the decimal point goes
    n = exp + len(digits_t)
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
        text = f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + text


def _js_string(s: str) -> str:
    text = json.dumps(s, ensure_ascii=False)
    if _SURROGATE.search(text):  # JSON.stringify escapes lone surrogates (well-formed stringify)
        text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


def stringify(value: Any, indent: int | None = 2) -> str:
    """`JSON.stringify(value, null, indent)` for JSON values (no trailing newline)."""
    parts: list[str] = []
    _emit(
        value, parts, "\n" if indent else "", " " * (indent or 0), indent is not None and indent > 0
    )
    return "".join(parts)


def _emit(value: Any, out: list[str], nl: str, step: str, pretty: bool) -> None:
    if isinstance(value, str):
        out.append(_js_string(value))
    elif value is None:
        out.append("null")
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    elif isinstance(value, int | float):
        out.append(js_number(value))
    elif isinstance(value, dict):
        if not value:
            out.append("{}")
            return
        inner = nl + step
        sep = ": " if pretty else ":"
        out.append("{")
        first = True
        for k, v in value.items():
            out.append(inner if first else "," + inner)
            first = False
            out.append(_js_string(str(k)))
            out.append(sep)
            _emit(v, out, inner, step, pretty)
        out.append(nl + "}")
    elif isinstance(value, list | tuple):
        if not value:
            out.append("[]")
            return
        inner = nl + step
        out.append("[")
        for i, v in enumerate(value):
            out.append(inner if i == 0 else "," + inner)
            _emit(v, out, inner, step, pretty)
        out.append(nl + "]")
    else:
        raise TypeError(f"not a JSON value: {type(value).__name__}")


# -- the file as a whole --------------------------------------------------------------------


def parse_previous(text: str | None) -> Any:
    """The previous file content as a template, or None when it is not JSON."""
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def text_style(text: str | bytes | None) -> tuple[bool, bool]:
    """(pretty printed, ends with a newline) of a file's text; Mockoon's default for a new file."""
    if not text:
        return True, False
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    stripped = text.strip()
    pretty = (
        "\n" in stripped or len(stripped) <= 2
    )  # Mockoon's "pretty print" setting off: one line
    return pretty, text.endswith("\n")


def format_environment(
    env: dict[str, Any],
    previous: str | None = None,
    *,
    template: Any = None,
    style: tuple[bool, bool] | None = None,
) -> str:
    """The file text for `env`, shaped like `previous` (key order, indent, trailing newline).

    Callers that keep the previous content parsed pass `template` and `style` instead.
    """
    if template is None:
        template = parse_previous(previous)
    pretty, newline = style if style is not None else text_style(previous)
    text = stringify(order_like(env, template), 2 if pretty else None)
    return text + "\n" if newline else text


def content_hash(data: bytes) -> str:
    """The identity of file content: how a link recognises its own writes."""
    return hashlib.sha256(data).hexdigest()


def json_hash(value: Any) -> str:
    """The identity of a JSON value whatever its formatting and key order."""
    canon = json.dumps(
        normalize(js_value(value)), sort_keys=True, ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canon.encode("utf-8", "surrogatepass")).hexdigest()
