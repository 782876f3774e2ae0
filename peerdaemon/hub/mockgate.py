"""Cloud Mock's request gate, without I/O: what the hub does with a request to
`/mock/SPACE_ID/ENV_ID/<route path>` before (and instead of) forwarding it to the environment's
local Mockoon engine over loopback HTTP.

The steps, for the caller (which does the I/O):

    target = parse_mock_target(request.target)          # None: not a /mock/ path at all
    setting = lookup(target.space, target.env) if target and target.valid else None
    stripped = strip_token(request.target, raw_headers, body)  # or target.target
    decision = decide(target, setting, stripped, max_body=..., limiter=..., now=...)
    Forward: send decision.target, forward_headers(decision.headers, ...), decision.body
             to the engine; relay its answer with response_headers(...)
    Respond: answer decision.status, decision.headers, decision.body (JSON)

The token is accepted where Apidog's Cloud Mock accepts it (query parameter `token`, header
`X-Mock-Token`, form field `token`) and removed from every one of them, so the engine never sees
it: no rule on that header, no `{{queryParam 'token'}}`, `{{body 'token'}}` or `{{bodyRaw}}`
shows it. "Removed" is judged the way the engine parses: Mockoon runs on Express 4, whose query
parser is `qs` (`token[]=`, `token[a]=`, `[token]=`, `%74oken=`, even an unclosed `token[=` all
reach `req.query.token`), parses urlencoded bodies with `qs` too, and multipart bodies with
busboy + append-field; every one of those spellings is stripped. Other bytes are left exactly as
they came. (Checked against qs 6.15.3 and 6.13.0, Node's querystring, busboy 1.6.0 and
append-field 1.0.0, the versions Mockoon's lockfile and older installs carry.)
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import re
import string
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeAlias
from urllib.parse import unquote_to_bytes

__all__ = [
    "MOCK_PREFIX",
    "NOT_FOUND",
    "NOT_FOUND_TARGET",
    "TOKEN_FIELD",
    "TOKEN_HEADER",
    "Forward",
    "GateDecision",
    "MockSetting",
    "MockTarget",
    "RateLimiter",
    "Respond",
    "Stripped",
    "check_token",
    "decide",
    "forward_headers",
    "parse_mock_target",
    "response_headers",
    "strip_token",
]

MOCK_PREFIX = b"/mock/"
TOKEN_HEADER = b"x-mock-token"
TOKEN_FIELD = "token"

Headers: TypeAlias = list[tuple[bytes, bytes]]

# ------------------------------------------------------------------------------------ target
_SPACE_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # the hub's space ids (docs.py)
_ENV_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")  # Mockoon's uuids, and any such id
_VISIBLE = re.compile(rb"[\x21-\x7e]*")  # what a request target may hold (RFC 9112), less "#"
_ABSOLUTE = re.compile(rb"https?://[^/?]*", re.IGNORECASE)
_DOT = {b".", b"%2e"}
_DOT_DOT = {b"..", b".%2e", b"%2e.", b"%2e%2e"}


@dataclass(frozen=True, slots=True)
class MockTarget:
    """A `/mock/` request target: whose environment, and the target the engine is sent.

    `valid` is False for a `/mock/` path that names no environment (bad ids, too few segments,
    bytes no target may hold): the caller answers it exactly like an unknown environment."""

    space: str
    env: str
    target: bytes  # the rest of the path (at least "/") and the query, as they came

    @property
    def valid(self) -> bool:
        return bool(self.space and self.env)


NOT_FOUND_TARGET = MockTarget("", "", b"/")
"""Every `/mock/` target that names no environment: one value, so none can be told apart."""


def parse_mock_target(target: bytes) -> MockTarget | None:
    """`/mock/SPACE/ENV/rest?query` -> MockTarget(SPACE, ENV, b"/rest?query"); None when the
    path does not start with `/mock/` (another route's business); `NOT_FOUND_TARGET` for
    anything else under `/mock/`. Never raises.

    Dot segments (`.`, `..` and their `%2e` spellings, as WHATWG URL parsers read them) are
    resolved over the whole path first, as any client or proxy in front would: the ids are then
    taken from the same path everyone else sees, and the engine never gets a `..` to climb with.
    Ids are matched as they are spelt (no percent-decoding): ids never need escaping, so an
    escaped one is a different, unknown id."""
    target = bytes(target)
    absolute = _ABSOLUTE.match(target)  # absolute-form: RFC 9112 says servers accept it
    if absolute is not None:
        target = target[absolute.end() :]
    path, sep, query = target.partition(b"?")
    if not path.startswith(MOCK_PREFIX):
        return None
    if not _VISIBLE.fullmatch(target) or b"#" in target:
        return NOT_FOUND_TARGET
    path = _remove_dot_segments(path)
    if not path.startswith(MOCK_PREFIX):
        return NOT_FOUND_TARGET
    parts = path[len(MOCK_PREFIX) :].split(b"/", 2)
    if len(parts) < 2:
        return NOT_FOUND_TARGET
    space, env = parts[0], parts[1]
    if not _SPACE_ID.fullmatch(space) or not _ENV_ID.fullmatch(env) or env in (b".", b".."):
        return NOT_FOUND_TARGET
    rest = b"/" + (parts[2] if len(parts) == 3 else b"")
    return MockTarget(space.decode("ascii"), env.decode("ascii"), rest + sep + query)


def _remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 section 5.2.4 on an absolute path, clamped at the root; empty segments kept."""
    segments = path[1:].split(b"/")
    out: list[bytes] = []
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        lowered = segment.lower()
        if lowered in _DOT_DOT:
            if out:
                out.pop()
        elif lowered not in _DOT:
            out.append(segment)
            continue
        if i == last:  # "/a/b/.." is "/a/": the trailing slash stays
            out.append(b"")
    return b"/" + b"/".join(out)


# ------------------------------------------------------------------------------------- token
@dataclass(frozen=True, slots=True)
class Stripped:
    """A request with every token carrier removed, and the token it carried.

    `token` is the first one found (header, then query, then body field); `conflict` is True
    when the carriers do not all hold the same value (then no token is right). `carriers` names
    where each was found, in that order. `received` is the body's length as it came (the size
    limit applies to that). `body_malformed`: a multipart body that could not be parsed, left
    as it came, and no token taken from it."""

    target: bytes
    headers: Headers
    body: bytes
    token: str | None
    conflict: bool
    carriers: tuple[str, ...]
    received: int
    body_malformed: bool = False


def strip_token(target: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> Stripped:
    """Find the mock token and remove every carrier of it: `token` query parameters from
    `target`, `X-Mock-Token` headers, `token` fields from an urlencoded or multipart body; the
    rest byte for byte. `Content-Length` is set to the new body's length and `Transfer-Encoding`
    dropped (the body is given whole). A second `Content-Type` is dropped too: Node keeps the
    first, so the engine parses the body as it was judged here. Never raises."""
    target, body = bytes(target), bytes(body)
    received = len(body)
    values: list[str] = []
    carriers: list[str] = []

    out: Headers = []
    content_type: bytes | None = None
    framed = False
    for raw_name, raw_value in headers:
        name, value = bytes(raw_name), bytes(raw_value)
        lowered = name.lower()
        if lowered == TOKEN_HEADER:
            values.append(value.strip(b" \t").decode("utf-8", "replace"))
            carriers.append("header")
            continue
        if lowered in (b"content-length", b"transfer-encoding"):
            framed = True
            continue
        if lowered == b"content-type":
            if content_type is not None:
                continue
            content_type = value
        out.append((name, value))

    path, sep, query = target.partition(b"?")
    if sep:
        kept, found = _strip_form(query)
        if found:
            values += found
            carriers += ["query"] * len(found)
            target = path + b"?" + kept if kept is not None else path

    malformed = False
    kind = _body_kind(content_type)
    if kind == "urlencoded":
        kept, found = _strip_form(body)
        if found:
            body = kept or b""
    elif kind == "multipart":
        assert content_type is not None
        body, found, malformed = _strip_multipart(body, content_type)
    else:
        found = []
    values += found
    carriers += ["body"] * len(found)

    if body or received or framed:  # a body that came, even if all token, stays framed
        out.append((b"content-length", str(len(body)).encode("ascii")))
    token = values[0] if values else None
    return Stripped(
        target=target,
        headers=out,
        body=body,
        token=token,
        conflict=any(v != token for v in values),
        carriers=tuple(carriers),
        received=received,
        body_malformed=malformed,
    )


def check_token(expected: str, given: str | None) -> bool:
    """Whether `given` is the mock's token, in time independent of where they differ (and of
    their lengths: the digests are compared). An empty expected token matches nothing."""
    e = hashlib.sha256(expected.encode("utf-8", "surrogatepass")).digest()
    g = hashlib.sha256((given or "").encode("utf-8", "surrogatepass")).digest()
    same = hmac.compare_digest(e, g)
    return same and bool(expected) and given is not None


# Form fields (query strings and urlencoded bodies), as the engine reads them ---------------
_BRACKETS = re.compile(r"\[[^\[\]]*\]")


def _decode(raw: bytes) -> str:
    """`+` and percent escapes, as form decoders do; invalid escapes and UTF-8 left readable."""
    return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8", "replace")


def _qs_tops(key: str) -> tuple[str, str]:
    """The top-level key `qs` files `key` under, as qs 6.15 (what Mockoon pins) and as earlier
    versions read it: `token[a][]`, `[token]`, and for 6.15 even an unclosed `token[`, all go
    to `token`."""
    # 6.15: the parent is what precedes the first "["; a key starting with "[" is filed under
    # its first balanced group's content (an unclosed one is kept whole, brackets and all).
    first = key.find("[")
    if first < 0:
        current = key
    elif first > 0:
        current = key[:first]
    else:
        level, close = 0, -1
        for i, char in enumerate(key):
            level += (char == "[") - (char == "]")
            if level == 0:
                close = i
                break
        current = key[1:close] if close > 0 else key
    # Up to 6.14: the parent is what precedes the first "[...]" with no bracket inside.
    match = _BRACKETS.search(key)
    if match is None:
        earlier = key
    elif match.start() > 0:
        earlier = key[: match.start()]
    else:
        earlier = match.group()[1:-1]
    return current, earlier


def _form_carrier(piece: bytes) -> str | None:
    """The token in one `&`-separated `piece`, or None if the engine would not file it under
    `token`. Both splits are tried: at the first `=` (Node's querystring) and at `]=` (qs); and
    both decodings: qs leaves a key with a bad escape undecoded, others decode what they can."""
    name, eq, value = piece.partition(b"=")
    if _decode(name) == TOKEN_FIELD:
        return _decode(value)
    bracket = piece.find(b"]=")
    qs_name, qs_value = (
        (piece[: bracket + 1], piece[bracket + 2 :]) if bracket >= 0 else (name, value)
    )
    for raw in {name, qs_name}:
        for key in (_decode(raw), raw.replace(b"+", b" ").decode("utf-8", "replace")):
            if key == TOKEN_FIELD or TOKEN_FIELD in _qs_tops(key):
                return _decode(qs_value)
    return None


def _strip_form(form: bytes) -> tuple[bytes | None, list[str]]:
    """`form` without its token pairs (None if nothing is left), and their tokens."""
    kept: list[bytes] = []
    found: list[str] = []
    for piece in form.split(b"&"):
        value = _form_carrier(piece)
        if value is None:
            kept.append(piece)
        else:
            found.append(value)
    return (b"&".join(kept) if kept else None), found


def _body_kind(content_type: bytes | None) -> str | None:
    """How Mockoon reads a body with this Content-Type (server.ts, processRawBody): JSON if it
    mentions a JSON type, else a form if it mentions one. Substrings, as it does."""
    if content_type is None:
        return None
    text = content_type.decode("latin-1").lower()
    if "application/json" in text or re.search(r"application/.*\+json", text):
        return None
    if "application/x-www-form-urlencoded" in text:
        return "urlencoded"
    if "multipart/form-data" in text:
        return "multipart"
    return None


# Multipart bodies, as busboy splits them ----------------------------------------------------
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~" + (string.digits + string.ascii_letters).encode("ascii"))
_QDTEXT = frozenset([0x09, 0x20, 0x21, *range(0x23, 0x5C), *range(0x5D, 0x7F), *range(0x80, 0x100)])
_HEADER_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ \t]*[\t\x20-\x7e\x80-\xff]*")
_FOLDED_LINE = re.compile(rb"[ \t][\t\x20-\x7e\x80-\xff]*")
MAX_PART_HEAD = 16 * 1024
"""busboy's bound on one part's header block (Node's own default for a request head)."""


def _boundary(content_type: bytes) -> bytes | None:
    """The boundary busboy would use (utils.js, parseContentType: `multipart/form-data`, the
    first `boundary` parameter), or None where busboy refuses the Content-Type (then the
    engine parses nothing and neither does the gate)."""
    s = content_type
    n = len(s)
    i = 0
    while i < n and s[i] in _TCHAR:
        i += 1
    if i == 0 or i == n or s[i] != 0x2F:  # "/"
        return None
    kind = s[:i].lower()
    i += 1
    start = i
    while i < n and s[i] in _TCHAR:
        i += 1
    if i == start or kind != b"multipart" or s[start:i].lower() != b"form-data":
        return None
    params: dict[bytes, bytes] = {}
    while i < n:
        while i < n and s[i] in b" \t":
            i += 1
        if i == n:
            break
        if s[i] != 0x3B:  # ";"
            return None
        i += 1
        while i < n and s[i] in b" \t":
            i += 1
        start = i
        while i < n and s[i] in _TCHAR:
            i += 1
        if i == n or i == start or s[i] != 0x3D:  # "="
            return None
        name = s[start:i].lower()
        i += 1
        if i == n:
            return None
        if s[i] == 0x22:  # quoted: only \\ and \" are escapes, as in busboy
            i += 1
            value = bytearray()
            while True:
                if i == n:
                    return None
                c = s[i]
                if c == 0x5C and i + 1 < n and s[i + 1] in b'\\"':
                    value.append(s[i + 1])
                    i += 2
                    continue
                if c == 0x22:
                    i += 1
                    break
                if c not in _QDTEXT and c != 0x5C:
                    return None
                value.append(c)
                i += 1
        else:
            start = i
            while i < n and s[i] in _TCHAR:
                i += 1
            if i == start:
                return None
            value = bytearray(s[start:i])
        params.setdefault(name, bytes(value))
    boundary = params.get(b"boundary")
    if not boundary or not boundary.isascii():  # busboy searches for it UTF-8 encoded
        return None
    return boundary


def _part_head(segment: bytes) -> tuple[list[tuple[bytes, bytes]], int] | None:
    """A part's header fields and where its content starts, or None where busboy would report
    a malformed part header (it needs at least one field, CRLF line ends, field syntax)."""
    end = segment.find(b"\r\n\r\n")
    if end <= 0 or end + 4 > MAX_PART_HEAD:
        return None
    fields: list[tuple[bytes, bytes]] = []
    for line in segment[:end].split(b"\r\n"):
        if _HEADER_LINE.fullmatch(line):
            name, _, value = line.partition(b":")
            fields.append((name.lower(), value.lstrip(b" \t")))
        elif fields and _FOLDED_LINE.fullmatch(line):
            name, value = fields[-1]
            fields[-1] = (name, value + line)
        else:
            return None
    return fields, end + 4


def _disposition_names(value: bytes) -> list[str]:
    """Every `name` (and `name*`) parameter of a Content-Disposition value, read leniently:
    a part the engine might file under `token` must not slip through a stricter reading."""
    text = value.decode("latin-1")
    names: list[str] = []
    n = len(text)
    i = text.find(";")
    while 0 <= i < n:
        i += 1
        eq = text.find("=", i)
        semi = text.find(";", i)
        if eq < 0 or (0 <= semi < eq):
            i = semi
            continue
        param = text[i:eq].strip().lower()
        i = eq + 1
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == '"':
            i += 1
            chars: list[str] = []
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(text[i])
                i += 1
            raw = "".join(chars)
            i = text.find(";", i)
        else:
            semi = text.find(";", i)
            raw = (text[i:] if semi < 0 else text[i:semi]).strip()
            i = semi
        if param == "name":
            names.append(raw.encode("latin-1").decode("utf-8", "replace"))
            names.append(raw)
        elif param == "name*":  # RFC 8187: charset'language'percent-encoded
            charset, _, rest = raw.partition("'")
            encoded = rest.partition("'")[2]
            data = unquote_to_bytes(encoded)
            try:
                names.append(data.decode(charset or "utf-8", "replace"))
            except LookupError:
                names.append(data.decode("utf-8", "replace"))
    return names


def _is_token_part(fields: list[tuple[bytes, bytes]]) -> bool:
    """append-field files `token[...]` under `token` too."""
    for name, value in fields:
        if name == b"content-disposition":
            for field_name in _disposition_names(value):
                if field_name == TOKEN_FIELD or field_name.startswith(TOKEN_FIELD + "["):
                    return True
    return False


def _strip_multipart(body: bytes, content_type: bytes) -> tuple[bytes, list[str], bool]:
    """The body without its `token` parts (the others, the preamble and the epilogue byte for
    byte, same boundary), their contents, and whether the body was malformed (then it is
    returned as it came, and no token is taken from it).

    Delimiters are found as busboy finds them: every `CRLF--boundary` in CRLF + body, left to
    right, not overlapping. Each must be followed by `--` (the close delimiter; the epilogue
    after it is ignored), or by optional blanks and CRLF (a part: its header block, then its
    content up to the next delimiter). Anything else, no close delimiter, or a bad part header
    is malformed."""
    boundary = _boundary(content_type)
    if boundary is None:
        return body, [], True
    delimiter = b"\r\n--" + boundary
    data = b"\r\n" + body
    first = data.find(delimiter)
    if first < 0:
        return body, [], True
    spans: list[tuple[int, int, bool]] = []  # a part's [start, end) in data, is it a token part
    found: list[str] = []
    at = first
    while True:
        after = at + len(delimiter)
        following = data.find(delimiter, after)
        segment = data[after:] if following < 0 else data[after:following]
        if segment.startswith(b"--"):
            break  # the close delimiter
        lead = len(segment) - len(segment.lstrip(b" \t"))
        if following < 0 or not segment.startswith(b"\r\n", lead):
            return body, [], True
        content = segment[lead + 2 :]
        head = _part_head(content)
        if head is None:
            return body, [], True
        fields, offset = head
        token_part = _is_token_part(fields)
        if token_part:
            found.append(content[offset:].decode("utf-8", "replace"))
        spans.append((at, following, token_part))
        at = following
    if not found:
        return body, [], False
    pieces = [data[:first]]
    pieces += [data[start:end] for start, end, token_part in spans if not token_part]
    pieces.append(data[at:])
    return b"".join(pieces)[2:], found, False


# ------------------------------------------------------------------------------------- limits
class RateLimiter:
    """A token bucket per key (an environment): `burst` requests at once, then `rate` a second.

    Sans-I/O: the time is given. `rate` and `burst` may be given per call too (a space's own
    limits); a bucket refills at the rate of the call that reads it. Memory stays bounded: a
    bucket left alone for `burst / rate` seconds is full again, the same as a new one, so it is
    forgotten; past `max_keys` buckets the least recently used is forgotten even if not full
    (that key gets a fresh burst: the bound wins over exactness, and keys are environments that
    exist, so few)."""

    EPSILON = 1e-9
    """Refills that fall short of a whole request by float rounding still count."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 10_000) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number of requests a second, not {rate!r}")
        if not (math.isfinite(burst) and burst >= 1):
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        # key -> (level, counted from, when it is full again if left alone)
        self._buckets: OrderedDict[Hashable, tuple[float, float, float]] = OrderedDict()

    @property
    def tracked(self) -> int:
        """Buckets held now (not `__len__`: an empty limiter must not be falsy)."""
        return len(self._buckets)

    def allow(
        self, key: Hashable, now: float, *, rate: float | None = None, burst: float | None = None
    ) -> bool:
        """Take one request from `key`'s bucket at time `now`, if there is one to take."""
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite time, not {now!r}")
        rate, burst = self._settings(rate, burst)
        self._forget_idle(now)
        level, at = self._level(key, now, rate, burst)
        allowed = level >= 1 - self.EPSILON
        if allowed:
            level = max(0.0, level - 1)
        self._buckets[key] = (level, at, at + burst / rate)  # full by then, even from empty
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def retry_after(
        self, key: Hashable, now: float, *, rate: float | None = None, burst: float | None = None
    ) -> float:
        """Seconds from `now` until `key` may send again (0 if it may now)."""
        rate, burst = self._settings(rate, burst)
        level, _ = self._level(key, now, rate, burst)
        return 0.0 if level >= 1 - self.EPSILON else (1 - level) / rate

    def _settings(self, rate: float | None, burst: float | None) -> tuple[float, float]:
        rate = self.rate if rate is None else float(rate)
        burst = self.burst if burst is None else float(burst)
        if not (math.isfinite(rate) and rate > 0) or not (math.isfinite(burst) and burst >= 1):
            raise ValueError(f"rate {rate!r} and burst {burst!r}: need rate > 0 and burst >= 1")
        return rate, burst

    def _level(self, key: Hashable, now: float, rate: float, burst: float) -> tuple[float, float]:
        """The bucket's level at `now`, and the time it is counted from (a clock that steps
        back refills nothing)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return burst, now
        level, at, _ = bucket
        if now <= at:
            return min(level, burst), at
        return min(burst, level + (now - at) * rate), now

    def _forget_idle(self, now: float) -> None:
        """Forget buckets full again, from the least recently used on; the first that is not
        stops the sweep (with one rate and burst for all, none behind it is full either)."""
        buckets = self._buckets
        while buckets:
            key, (_, _, full) = next(iter(buckets.items()))
            if now < full:
                break
            del buckets[key]


# ----------------------------------------------------------------------------------- decision
class MockSetting(Protocol):
    """An environment's Cloud Mock setting, as the caller looks it up (None: off or unknown)."""

    @property
    def access(self) -> str: ...  # "public" | "token"; anything else is treated as "token"

    @property
    def token(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Forward:
    """Send this to the environment's engine (after `forward_headers`)."""

    space: str
    env: str
    target: bytes
    headers: Headers
    body: bytes


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer the client with this, without asking the engine. `headers` are the ones to add
    besides Content-Type (application/json) and Content-Length."""

    status: int
    payload: Mapping[str, str]
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def body(self) -> bytes:
        return json.dumps(dict(self.payload), separators=(",", ":")).encode("utf-8")


GateDecision: TypeAlias = Forward | Respond

NOT_FOUND = Respond(404, {"error": "not-found", "message": "no such mock"})
"""Mock off, unknown ids, a target naming no environment: one answer, so an outsider cannot
tell which environments exist (or have a mock turned off)."""
_MISSING = Respond(
    401,
    {
        "error": "unauthorized",
        "message": "this mock needs its token: query parameter token, header X-Mock-Token, "
        "or form field token",
    },
)
_WRONG = Respond(401, {"error": "unauthorized", "message": "wrong mock token"})
_CONFLICT = Respond(
    401, {"error": "unauthorized", "message": "the request carries different mock tokens"}
)


def decide(
    target: MockTarget | None,
    setting: MockSetting | None,
    request: Stripped,
    *,
    max_body: int,
    limiter: RateLimiter,
    now: float,
    rate: float | None = None,
    burst: float | None = None,
) -> GateDecision:
    """Forward the stripped request, or answer it: 404, then 401, then 413, then 429.

    404 first, identical for every reason, so existence shows only as 401 to those who name an
    environment with token access (expected: its ids are long random strings). 401 before 413
    and 429, so without the token nothing more is learnt, and nobody without it can spend the
    environment's rate. The rate is counted per environment, only for requests let through
    (`rate`, `burst`: this environment's own, else the limiter's).

    The forwarded target is `target`'s path (ids and `/mock/` prefix gone, dot segments
    resolved) and `request`'s query (the token gone), so `request` may be stripped from either
    the raw request target or `target.target`."""
    if target is None or not target.valid or setting is None:
        return NOT_FOUND
    if setting.access != "public":
        if request.conflict:
            return _CONFLICT
        if request.token is None:
            return _MISSING
        if not check_token(setting.token, request.token):
            return _WRONG
    if request.received > max_body:
        return Respond(
            413,
            {"error": "too-large", "message": f"the request body is over {max_body} bytes"},
        )
    key = (target.space, target.env)
    if not limiter.allow(key, now, rate=rate, burst=burst):
        wait = max(1, math.ceil(limiter.retry_after(key, now, rate=rate, burst=burst)))
        return Respond(
            429,
            {
                "error": "rate-limited",
                "message": f"too many requests to this mock; retry in {wait} s",
            },
            ((b"retry-after", str(wait).encode("ascii")),),
        )
    path = target.target.partition(b"?")[0]
    _, sep, query = request.target.partition(b"?")
    forwarded = path + sep + query
    return Forward(target.space, target.env, forwarded, list(request.headers), request.body)


# ------------------------------------------------------------------------------------ headers
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",  # websockets to a mock are not forwarded by this path
        b"http2-settings",
    }
)
_KEEP = frozenset({b"content-length", b"host"})
"""Never dropped because a Connection header names them: the hub owns the framing."""
_FORWARDED = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-real-ip",
    }
)
_HOST = re.compile(r"[A-Za-z0-9._~!$&'()*+;=:%\[\]-]{1,255}")


def _end_to_end(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """`headers` without the hop-by-hop ones: the fixed list, `Proxy-*`, and those a
    `Connection` header names."""
    fields = [(bytes(n), bytes(v)) for n, v in headers]
    named = {
        option.strip().lower()
        for name, value in fields
        if name.lower() == b"connection"
        for option in value.split(b",")
    }
    named -= _KEEP
    return [
        (name, value)
        for name, value in fields
        if (lowered := name.lower()) not in _HOP_BY_HOP
        and lowered not in named
        and not lowered.startswith(b"proxy-")
    ]


def forward_headers(
    headers: Iterable[tuple[bytes, bytes]], client_addr: str | None, scheme: str, host: str
) -> Headers:
    """The headers to send the engine: end-to-end ones only, the token header never, no
    `Expect` (the hub already has the whole body), and X-Forwarded-For/-Proto/-Host set by the
    hub (any a client sent are dropped: the hub is the edge, so they would be its word)."""
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme must be http or https, not {scheme!r}")
    try:
        client = str(ipaddress.ip_address((client_addr or "").split("%")[0]))
    except ValueError:
        client = "unknown"
    out = [
        (name, value)
        for name, value in _end_to_end(headers)
        if (lowered := name.lower()) not in _FORWARDED
        and lowered != TOKEN_HEADER
        and lowered != b"expect"
    ]
    out.append((b"x-forwarded-for", client.encode("ascii")))
    out.append((b"x-forwarded-proto", scheme.encode("ascii")))
    if _HOST.fullmatch(host):
        out.append((b"x-forwarded-host", host.encode("ascii")))
    return out


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The engine's response headers to relay: end-to-end ones only (the hub frames the
    answer itself). Beside a Transfer-Encoding, a Content-Length means nothing (RFC 9112,
    6.3), so it goes too rather than mis-frame the relayed body."""
    fields = [(bytes(n), bytes(v)) for n, v in headers]
    chunked = any(name.lower() == b"transfer-encoding" for name, _ in fields)
    out = _end_to_end(fields)
    if chunked:
        out = [(name, value) for name, value in out if name.lower() != b"content-length"]
    return out
