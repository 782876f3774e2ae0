"""Cloud Mock's request gate (peerdaemon/hub/mockgate.py), without I/O.

Covered: `/mock/SPACE/ENV/...` targets (ids, dot segments, bad bytes: never raises, one
not-found answer); the token in each carrier (header, query, urlencoded and multipart form field)
found and removed from all of them, the rest byte for byte, also under hypothesis; spellings the
engine (Mockoon: Express 4 + qs, busboy + append-field) files under `token`, and look-alikes that
stay; malformed multipart left alone; constant-time token check; the per-environment token bucket
with explicit times; the gate's order (404, 401, 413, 429) and its identical 404s; hop-by-hop
headers both ways and the X-Forwarded-* set.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from peerdaemon.hub import mockgate
from peerdaemon.hub.mockgate import (
    NOT_FOUND,
    NOT_FOUND_TARGET,
    Forward,
    MockTarget,
    RateLimiter,
    Respond,
    Stripped,
    check_token,
    decide,
    forward_headers,
    parse_mock_target,
    response_headers,
    strip_token,
)

SPACE = "abcdefgh234567ab"
ENV = "c6199444-5116-490a-99a2-074876253a4a"  # a Mockoon environment uuid
PREFIX = f"/mock/{SPACE}/{ENV}".encode()
TOKEN = "s3cr3t-Mock_token.42"

FORM = (b"content-type", b"application/x-www-form-urlencoded")
BOUNDARY = b"----peerdaemonBoundary7MA4YWxkTrZu0gW"
MULTIPART = (b"content-type", b"multipart/form-data; boundary=" + BOUNDARY)

PROPS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name]


# ------------------------------------------------------------------------------ the target
@pytest.mark.parametrize(
    ("target", "space", "env", "forwarded"),
    [
        (PREFIX + b"/users?id=1", SPACE, ENV, b"/users?id=1"),
        (PREFIX, SPACE, ENV, b"/"),
        (PREFIX + b"/", SPACE, ENV, b"/"),
        (PREFIX + b"?q=1", SPACE, ENV, b"/?q=1"),
        (PREFIX + b"/?", SPACE, ENV, b"/?"),
        (PREFIX + b"/a//b/", SPACE, ENV, b"/a//b/"),  # empty segments are the route's business
        (PREFIX + b"/a/%20b/%2F", SPACE, ENV, b"/a/%20b/%2F"),  # escapes stay as they came
        (PREFIX + b"/a/../b", SPACE, ENV, b"/b"),
        (PREFIX + b"/a/%2E%2e/b", SPACE, ENV, b"/b"),
        (PREFIX + b"/a/.%2E/b", SPACE, ENV, b"/b"),
        (PREFIX + b"/./x/.", SPACE, ENV, b"/x/"),
        (PREFIX + b"/x/y/..", SPACE, ENV, b"/x/"),
        (PREFIX + b"/x?a=../../b", SPACE, ENV, b"/x?a=../../b"),  # the query is not a path
        (PREFIX + b"/..a/b..", SPACE, ENV, b"/..a/b.."),  # not dot segments
        (f"/mock/{SPACE}/{ENV}/../other-env/x".encode(), SPACE, "other-env", b"/x"),
        (f"/mock/{SPACE}/env.v1_2-3/x".encode(), SPACE, "env.v1_2-3", b"/x"),
        (f"/mock/{SPACE}/{'e' * 128}".encode(), SPACE, "e" * 128, b"/"),
        (b"http://hub.example:8443" + PREFIX + b"/x?y", SPACE, ENV, b"/x?y"),  # absolute-form
        (b"HTTPS://hub.example" + PREFIX, SPACE, ENV, b"/"),
    ],
)
def test_mock_targets(target: bytes, space: str, env: str, forwarded: bytes) -> None:
    assert parse_mock_target(target) == MockTarget(space, env, forwarded)
    assert parse_mock_target(target).valid  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "target",
    [b"", b"/", b"*", b"hub.example:443", b"/mock", b"/mock?x=/mock/", b"/mockx/a/b", b"/MOCK/"]
    + [
        b"/yjs/" + SPACE.encode() + b"/doc",
        b"/foo/../mock/" + PREFIX[6:],
        b"http://h/",
        b"?/mock/",
    ],
)
def test_other_routes_are_none(target: bytes) -> None:
    assert parse_mock_target(target) is None


@pytest.mark.parametrize(
    "target",
    [
        b"/mock/",
        b"/mock/" + SPACE.encode(),
        b"/mock/" + SPACE.encode() + b"/",
        b"/mock//" + SPACE.encode() + b"/" + ENV.encode(),
        b"/mock/" + SPACE.encode() + b"//" + ENV.encode(),
        b"/mock/%61bcdefgh234567ab/" + ENV.encode(),  # ids are not decoded
        b"/mock/-team/" + ENV.encode(),  # a space id starts with a letter or digit (docs.py)
        b"/mock/" + b"s" * 65 + b"/" + ENV.encode(),
        b"/mock/" + SPACE.encode() + b"/" + ENV.encode()[:-1] + b"%61",
        b"/mock/" + SPACE.encode() + b"/env%2Fx/y",
        b"/mock/" + SPACE.encode() + b"/env~1",
        b"/mock/" + SPACE.encode() + b"/" + b"e" * 129,
        b"/mock/" + SPACE.encode() + b"/" + ENV.encode() + b"/..",
        b"/mock/" + SPACE.encode() + b"/..",
        b"/mock/..",
        b"/mock/" + SPACE.encode() + b"/" + ENV.encode() + b"/../../../etc/passwd",
        b"/mock/" + SPACE.encode() + b"/" + ENV.encode() + b"/%2e%2e/%2E%2E/x",
        PREFIX + b"/caf\xc3\xa9",  # raw non-ASCII: not a request target
        PREFIX + b"/\xff\xfe",
        PREFIX + b"/a b",
        PREFIX + b"/a\x00",
        PREFIX + b"/a\r\nX-Injected: 1",
        PREFIX + b"/a#frag",
        b"/mock/\xff/\xfe/x",
    ],
)
def test_bad_mock_targets_are_one_not_found(target: bytes) -> None:
    assert parse_mock_target(target) is NOT_FOUND_TARGET
    assert not NOT_FOUND_TARGET.valid


@PROPS
@given(st.binary(max_size=200))
def test_parse_never_raises(raw: bytes) -> None:
    for target in (raw, b"/mock/" + raw, PREFIX + b"/" + raw):
        result = parse_mock_target(target)
        if result is not None and result.valid:
            assert re.fullmatch(r"[a-z2-7]{16}", result.space)
            assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", result.env)
            assert result.target.startswith(b"/")
            path = result.target.partition(b"?")[0]
            assert b".." not in path.split(b"/")


# ------------------------------------------------------------------------ token: the query
@pytest.mark.parametrize(
    ("target", "stripped", "tokens"),
    [
        (b"/x?token=abc", b"/x", ["abc"]),
        (b"/x?a=1&token=abc&b=2", b"/x?a=1&b=2", ["abc"]),
        (b"/x?a=%20%2B&token=abc&b=c+d&e=%E2%9C%93", b"/x?a=%20%2B&b=c+d&e=%E2%9C%93", ["abc"]),
        (b"/x?z=1&y=2&token=t&x=3&w", b"/x?z=1&y=2&x=3&w", ["t"]),  # order kept
        (b"/x?%74oken=abc", b"/x", ["abc"]),  # the engine decodes the key too
        (b"/x?%74%6F%6b%65%6E=abc&a=1", b"/x?a=1", ["abc"]),
        (b"/x?token=a&token=a", b"/x", ["a", "a"]),  # repeated: all go
        (b"/x?token=a&b=1&token=b", b"/x?b=1", ["a", "b"]),
        (b"/x?token[]=a", b"/x", ["a"]),  # qs: req.query.token = ["a"]
        (b"/x?token[a]=b&c=1", b"/x?c=1", ["b"]),  # qs: {a: "b"}
        (b"/x?[token]=a", b"/x", ["a"]),  # qs: req.query.token = "a"
        (b"/x?token%5B%5D=a", b"/x", ["a"]),
        (b"/x?token[a=b]=c", b"/x", ["c"]),  # qs splits at "]="
        (b"/x?token%5b=a", b"/x", ["a"]),  # qs 6.15: an unclosed "[" still files under token
        (b"/x?token[=a&token[x=b", b"/x", ["a", "b"]),
        (b"/x?token[[a]=b", b"/x", ["b"]),
        (b"/x?token", b"/x", [""]),
        (b"/x?token=", b"/x", [""]),
        (b"/x?token=a%2Bb+c", b"/x", ["a+b c"]),
        (b"/x?token=%E2%9C%93", b"/x", ["\u2713"]),
        (b"/x?token=a=b", b"/x", ["a=b"]),
        (b"/x?&token=a", b"/x?", ["a"]),
        (b"/x?a=1&&b=2&token=z&", b"/x?a=1&&b=2&", ["z"]),
        # look-alikes stay
        (b"/x?tokenx=1&xtoken=2&Token=3&TOKEN=4", None, []),
        (b"/x?a=token&b=token%3Dx", None, []),  # "token" as a value
        (b"/x?tok+en=1&token%=1&to%6B=1&x[token=1&token.a=1", None, []),
        (b"/x?[token=1&[[token]]=2&x[token]=3&%5B%5Btoken%5D%5D=4", None, []),
        (b"/x?token;a=1", None, []),  # ";" separates nothing for qs
        (b"/x?", None, []),
        (b"/x", None, []),
        (b"/token/x", None, []),
    ],
)
def test_query_carrier(target: bytes, stripped: bytes | None, tokens: list[str]) -> None:
    result = strip_token(target, [], b"")
    assert result.target == (target if stripped is None else stripped)
    assert result.carriers == ("query",) * len(tokens)
    assert result.token == (tokens[0] if tokens else None)
    assert result.conflict == (len(set(tokens)) > 1)
    assert result.headers == []  # no body, no framing: nothing added


# ---------------------------------------------------------------------- token: the header
@pytest.mark.parametrize(
    "name", [b"X-Mock-Token", b"x-mock-token", b"X-MOCK-TOKEN", b"x-Mock-tOKEN"]
)
def test_header_carrier_any_case(name: bytes) -> None:
    headers = [(b"host", b"hub"), (name, b" " + TOKEN.encode() + b"\t"), (b"accept", b"*/*")]
    result = strip_token(b"/x", headers, b"")
    assert result.token == TOKEN
    assert result.carriers == ("header",)
    assert not result.conflict
    assert result.headers == [(b"host", b"hub"), (b"accept", b"*/*")]


def test_header_look_alikes_stay() -> None:
    headers = [(b"x-mock-tokens", b"a"), (b"x-mock-token-id", b"b"), (b"authorization", b"token")]
    result = strip_token(b"/x", headers, b"")
    assert result.token is None
    assert result.headers == headers


@pytest.mark.parametrize(
    ("headers", "target", "token", "conflict", "carriers"),
    [
        ([(b"x-mock-token", b"a"), (b"X-Mock-Token", b"a")], b"/", "a", False, ("header",) * 2),
        ([(b"x-mock-token", b"a"), (b"x-mock-token", b"b")], b"/", "a", True, ("header",) * 2),
        ([(b"x-mock-token", b"a")], b"/?token=a", "a", False, ("header", "query")),
        ([(b"x-mock-token", b"h")], b"/?token=q", "h", True, ("header", "query")),  # header first
        ([], b"/?token=q&token=", "q", True, ("query",) * 2),
    ],
)
def test_several_carriers(
    headers: list[tuple[bytes, bytes]],
    target: bytes,
    token: str,
    conflict: bool,
    carriers: tuple[str, ...],
) -> None:
    result = strip_token(target, headers, b"")
    assert (result.token, result.conflict, result.carriers) == (token, conflict, carriers)
    assert result.target == b"/"
    assert not header(result.headers, b"x-mock-token")


# ------------------------------------------------------------------ token: urlencoded body
@pytest.mark.parametrize(
    ("body", "stripped", "tokens"),
    [
        (b"a=1&token=t&b=2", b"a=1&b=2", ["t"]),
        (b"token=t", b"", ["t"]),
        (b"note=token&token=t", b"note=token", ["t"]),  # "token" as another field's value stays
        (b"a=token%3Dt&b=x+token", None, []),
        (b"name=J%C3%BCrgen&token=t&x=%2B+", b"name=J%C3%BCrgen&x=%2B+", ["t"]),
        (b"%74oken=t&token[]=t&[token]=t", b"", ["t", "t", "t"]),
        (b"tokenx=1&xtoken=2&Token=3", None, []),
        (b"token=a&token=b", b"", ["a", "b"]),
        (b"", None, []),
        (b"\xff\xfe&token=t&\x00", b"\xff\xfe&\x00", ["t"]),  # bytes that are not UTF-8 stay
    ],
)
def test_urlencoded_body_carrier(body: bytes, stripped: bytes | None, tokens: list[str]) -> None:
    headers = [(b"host", b"hub"), FORM, (b"content-length", str(len(body)).encode())]
    result = strip_token(b"/x", headers, body)
    expected = body if stripped is None else stripped
    assert result.body == expected
    assert result.received == len(body)
    assert result.carriers == ("body",) * len(tokens)
    assert result.token == (tokens[0] if tokens else None)
    assert result.conflict == (len(set(tokens)) > 1)
    assert result.headers == [(b"host", b"hub"), FORM, (b"content-length", b"%d" % len(expected))]


@pytest.mark.parametrize(
    ("content_type", "is_form"),
    [
        (b"application/x-www-form-urlencoded", True),
        (b"application/x-www-form-urlencoded; charset=UTF-8", True),
        (b"Application/X-WWW-Form-Urlencoded", True),
        (b"application/json", False),  # JSON is not a carrier
        (b"application/vnd.api+json", False),
        (b"application/x-www-form-urlencoded; x=application/json", False),  # Mockoon: JSON first
        (b"text/plain", False),
        (b"application/octet-stream", False),
    ],
)
def test_body_kind_follows_the_engine(content_type: bytes, is_form: bool) -> None:
    result = strip_token(b"/x", [(b"content-type", content_type)], b"a=1&token=t")
    assert result.body == (b"a=1" if is_form else b"a=1&token=t")
    assert result.token == ("t" if is_form else None)


def test_no_content_type_no_body_carrier() -> None:
    result = strip_token(b"/x", [], b"token=t")
    assert (result.body, result.token) == (b"token=t", None)
    assert result.headers == [(b"content-length", b"7")]


def test_framing_is_rewritten() -> None:
    headers = [
        (b"transfer-encoding", b"chunked"),
        FORM,
        (b"content-type", b"text/plain"),  # Node keeps the first; the engine sees only that one
        (b"Content-Length", b"999"),
        (b"x-other", b"1"),
    ]
    result = strip_token(b"/x", headers, b"a=1&token=t")
    assert result.headers == [FORM, (b"x-other", b"1"), (b"content-length", b"3")]
    assert result.body == b"a=1"


def test_empty_body_keeps_a_zero_length_only_if_it_had_framing() -> None:
    assert strip_token(b"/x", [(b"content-length", b"0")], b"").headers == [
        (b"content-length", b"0")
    ]
    assert strip_token(b"/x", [(b"accept", b"*/*")], b"").headers == [(b"accept", b"*/*")]


# -------------------------------------------------------------------- token: multipart body
def part(disposition: bytes, content: bytes, *extra: bytes) -> bytes:
    head = b"\r\n".join([b"Content-Disposition: " + disposition, *extra])
    return b"--" + BOUNDARY + b"\r\n" + head + b"\r\n\r\n" + content + b"\r\n"


def multipart(*parts: bytes, preamble: bytes = b"", epilogue: bytes = b"\r\n") -> bytes:
    lead = preamble + b"\r\n" if preamble else b""
    return lead + b"".join(parts) + b"--" + BOUNDARY + b"--" + epilogue


TEXT = part(b'form-data; name="title"', b"hello token=x world")
FILE = part(
    b'form-data; name="upload"; filename="token.bin"',
    b"\x00\x01\xff\r\n--not-the-boundary\r\n\x89PNG",
    b"Content-Type: application/octet-stream",
)
TOKEN_PART = part(b'form-data; name="token"', TOKEN.encode())


@pytest.mark.parametrize(
    "order",
    [(TEXT, FILE, TOKEN_PART), (TOKEN_PART, TEXT, FILE), (TEXT, TOKEN_PART, FILE), (TOKEN_PART,)],
)
def test_multipart_token_part_removed_the_rest_byte_for_byte(order: tuple[bytes, ...]) -> None:
    body = multipart(*order, preamble=b"a preamble", epilogue=b"\r\nan epilogue")
    result = strip_token(b"/upload", [MULTIPART], body)
    kept = tuple(p for p in order if p is not TOKEN_PART)
    expected = multipart(*kept, preamble=b"a preamble", epilogue=b"\r\nan epilogue")
    assert result.body == expected
    assert result.token == TOKEN
    assert result.carriers == ("body",)
    assert not result.body_malformed
    assert result.headers == [MULTIPART, (b"content-length", b"%d" % len(expected))]


@pytest.mark.parametrize(
    ("disposition", "extra", "is_token"),
    [
        (b'form-data; name="token"', (), True),
        (b"form-data; name=token", (), True),
        (b'form-data; NAME="token"', (), True),
        (b'form-data;name="token";filename="t.txt"', (), True),  # a file named token too
        (b'form-data; name="token[]"', (), True),  # append-field: body.token = [...]
        (b'form-data; name="token[a][b]"', (), True),
        # busboy files these two elsewhere, but names are read leniently on purpose (a part that
        # any reader takes for `token` goes: `{{bodyRaw}}` would show it all the same)
        (b"form-data; name*=UTF-8''%74oken", (), True),
        (b'form-data; name="tok\\en"', (), True),
        (b'form-data; name="tokenx"', (), False),
        (b'form-data; name="xtoken"', (), False),
        (b'form-data; name="Token"', (), False),
        (b'form-data; name="file"; filename="token"', (), False),
        (b'form-data; name="note"; x="name=token"', (), False),
    ],
)
def test_multipart_names(disposition: bytes, extra: tuple[bytes, ...], is_token: bool) -> None:
    body = multipart(TEXT, part(disposition, b"t", *extra))
    result = strip_token(b"/", [MULTIPART], body)
    assert result.body == (multipart(TEXT) if is_token else body)
    assert result.token == ("t" if is_token else None)


def test_multipart_header_case_folding_and_padding() -> None:
    folded = (
        b"--" + BOUNDARY + b" \t\r\n"  # transport padding after the delimiter
        b'content-disposition: form-data;\r\n name="token"\r\n\r\nt\r\n'
    )
    body = multipart(TEXT)[: -len(b"--" + BOUNDARY + b"--\r\n")] + folded
    body += b"--" + BOUNDARY + b"--"
    result = strip_token(b"/", [MULTIPART], body)
    assert result.token == "t"
    assert result.body == multipart(TEXT, epilogue=b"")


def test_multipart_boundary_parameters() -> None:
    quoted = b'multipart/form-data; charset=utf-8; boundary="' + BOUNDARY + b'"; boundary=other'
    body = multipart(TEXT, TOKEN_PART)
    result = strip_token(b"/", [(b"Content-Type", quoted)], body)
    assert (result.body, result.token) == (multipart(TEXT), TOKEN)


def test_multipart_several_token_parts() -> None:
    other = part(b'form-data; name="token"', b"other")
    same = strip_token(b"/", [MULTIPART], multipart(TOKEN_PART, TEXT, TOKEN_PART))
    assert (same.body, same.token, same.conflict) == (multipart(TEXT), TOKEN, False)
    differ = strip_token(b"/", [MULTIPART], multipart(TOKEN_PART, TEXT, other))
    assert (differ.body, differ.token, differ.conflict) == (multipart(TEXT), TOKEN, True)


def test_multipart_fake_parts_in_preamble_epilogue_and_content_stay() -> None:
    fake = b'Content-Disposition: form-data; name="token"\r\n\r\nfake'
    inner = part(b'form-data; name="doc"', b"--" + BOUNDARY[:-1] + b"\r\n" + fake)
    body = multipart(inner, preamble=fake, epilogue=b"\r\n" + TOKEN_PART)
    result = strip_token(b"/", [MULTIPART], body)
    assert (result.body, result.token, result.body_malformed) == (body, None, False)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (b"multipart/form-data", multipart(TOKEN_PART)),  # no boundary
        (b"multipart/form-data; boundary=", multipart(TOKEN_PART)),
        (b'multipart/form-data; boundary="unterminated', multipart(TOKEN_PART)),
        (b"multipart/form-data; boundary=nowhere", multipart(TOKEN_PART)),
        (b"text/plain; x=multipart/form-data; boundary=" + BOUNDARY, multipart(TOKEN_PART)),
        (MULTIPART[1], multipart(TOKEN_PART)[: -len(b"--\r\n")]),  # no close delimiter
        (MULTIPART[1], multipart(TOKEN_PART)[:-20]),  # cut short
        (MULTIPART[1], TOKEN_PART + b"--" + BOUNDARY + b"x\r\n"),  # no close delimiter
        (MULTIPART[1], multipart(TOKEN_PART, part(b"form-data\r\nbad header", b"x"))),
        (MULTIPART[1], multipart(TOKEN_PART, b"--" + BOUNDARY + b"\r\n\r\nno headers\r\n")),
        (MULTIPART[1], multipart(TOKEN_PART, b"--" + BOUNDARY + b"junk\r\n")),
        (MULTIPART[1], multipart(TOKEN_PART).replace(b"\r\n", b"\n")),  # LF line ends
        (MULTIPART[1], b"--" + BOUNDARY + b"\r\n--" + BOUNDARY + b"--"),
    ],
)
def test_malformed_multipart_is_left_alone(content_type: bytes, body: bytes) -> None:
    result = strip_token(b"/", [(b"content-type", content_type)], body)
    assert result.body == body
    assert result.token is None
    assert result.carriers == ()
    assert result.body_malformed == (b"multipart/form-data" in content_type)


def test_malformed_multipart_keeps_the_header_token() -> None:
    body = multipart(TOKEN_PART)[:-4]
    result = strip_token(b"/", [MULTIPART, (b"x-mock-token", b"h")], body)
    assert (result.token, result.conflict, result.body, result.body_malformed) == (
        "h",
        False,
        body,
        True,
    )


def test_multipart_without_token_is_untouched() -> None:
    body = multipart(TEXT, FILE)
    result = strip_token(b"/", [MULTIPART], body)
    assert (result.body, result.token, result.body_malformed) == (body, None, False)


# ------------------------------------------------------------------------ properties: strip
# Raw query/form keys, and whether the engine files each under `token`.
KEYS = {
    b"token": True,
    b"%74oken": True,
    b"%74%6f%6B%65%6E": True,
    b"toke%6E": True,
    b"token[]": True,
    b"token[a]": True,
    b"token[0][b]": True,
    b"[token]": True,
    b"token%5B%5D": True,
    b"token%5b": True,
    b"token[": True,
    b"token[[x]": True,
    b"tokenx": False,
    b"xtoken": False,
    b"Token": False,
    b"TOKEN": False,
    b"tok+en": False,
    b"token%": False,
    b"to%6B": False,
    b"x[token]": False,
    b"[token": False,
    b"[[token]]": False,
    b"a": False,
    b"": False,
    b"q%20": False,
}
pieces = st.tuples(
    st.sampled_from(sorted(KEYS)),
    st.one_of(st.none(), st.text(max_size=12)),  # None: a key without "="
)


def encode(key: bytes, value: str | None) -> bytes:
    return key if value is None else key + b"=" + quote(value, safe="").encode()


@PROPS
@given(st.lists(pieces, max_size=8), st.sampled_from([b"/", b"/a/b"]))
def test_query_property(pairs: list[tuple[bytes, str | None]], path: bytes) -> None:
    raw = [encode(k, v) for k, v in pairs]
    target = path + b"?" + b"&".join(raw)
    result = strip_token(target, [], b"")
    kept = [r for r, (k, _) in zip(raw, pairs, strict=True) if not KEYS[k]]
    tokens = [v or "" for k, v in pairs if KEYS[k]]
    if not tokens:
        assert result.target == target
    elif kept:
        assert result.target == path + b"?" + b"&".join(kept)  # every other byte as it came
    else:
        assert result.target == path
    assert list(result.carriers) == ["query"] * len(tokens)
    assert result.token == (tokens[0] if tokens else None)
    assert result.conflict == (len(set(tokens)) > 1)
    again = strip_token(result.target, [], b"")
    assert (again.target, again.token) == (result.target, None)  # nothing left to find


@PROPS
@given(st.lists(pieces, max_size=8))
def test_urlencoded_property(pairs: list[tuple[bytes, str | None]]) -> None:
    raw = [encode(k, v) for k, v in pairs]
    body = b"&".join(raw)
    result = strip_token(b"/", [FORM], body)
    kept = b"&".join(r for r, (k, _) in zip(raw, pairs, strict=True) if not KEYS[k])
    tokens = [v or "" for k, v in pairs if KEYS[k]]
    assert result.body == (kept if tokens else body)
    assert result.token == (tokens[0] if tokens else None)
    length = [b"%d" % len(result.body)] if body else []
    assert header(result.headers, b"content-length") == length
    again = strip_token(b"/", result.headers, result.body)
    assert (again.body, again.token) == (result.body, None)


NAMES = {b"token": True, b"token[]": True, b"token[x]": True}
NAMES |= {n: False for n in (b"tokenx", b"xtoken", b"Token", b"title", b"upload", b"tok")}
DELIMITER = b"\r\n--" + BOUNDARY


@st.composite
def form_parts(draw: st.DrawFn) -> tuple[bytes, bytes, bool]:
    name = draw(st.sampled_from(sorted(NAMES)))
    content = draw(st.binary(max_size=40) | st.text(max_size=20).map(str.encode))
    assume(DELIMITER not in b"\r\n" + content + b"\r\n")
    extra: list[bytes] = []
    disposition = b'form-data; name="' + name + b'"'
    if draw(st.booleans()):  # a file part
        disposition += b'; filename="' + draw(st.sampled_from([b"a.bin", b"token", b"t"])) + b'"'
        extra.append(b"Content-Type: application/octet-stream")
    return part(disposition, content, *extra), content, NAMES[name]


@PROPS
@given(
    st.lists(form_parts(), max_size=6),
    st.binary(max_size=20),
    st.binary(max_size=20),
    st.booleans(),
)
def test_multipart_property(
    parts: list[tuple[bytes, bytes, bool]], preamble: bytes, epilogue: bytes, upper: bool
) -> None:
    assume(DELIMITER not in b"\r\n" + preamble + b"\r\n")
    body = multipart(*(p for p, _, _ in parts), preamble=preamble, epilogue=epilogue)
    content_type = MULTIPART[1].upper().replace(BOUNDARY.upper(), BOUNDARY) if upper else None
    headers = [(b"Content-Type", content_type) if content_type else MULTIPART]
    result = strip_token(b"/", headers, body)
    tokens = [c.decode("utf-8", "replace") for _, c, is_token in parts if is_token]
    kept = [p for p, _, is_token in parts if not is_token]
    assert not result.body_malformed
    assert result.body == multipart(*kept, preamble=preamble, epilogue=epilogue)
    assert result.token == (tokens[0] if tokens else None)
    assert result.conflict == (len(set(tokens)) > 1)
    again = strip_token(b"/", result.headers, result.body)
    assert (again.body, again.token, again.body_malformed) == (result.body, None, False)


@PROPS
@given(
    st.lists(pieces, max_size=4),
    st.lists(
        st.tuples(
            st.sampled_from([b"X-Mock-Token", b"x-mock-token", b"accept"]),
            st.text(
                alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                min_size=1,
                max_size=8,
            ),
        ),
        max_size=4,
    ),
    st.lists(pieces, max_size=4),
)
def test_every_carrier_at_once(
    query: list[tuple[bytes, str | None]],
    fields: list[tuple[bytes, str]],
    form: list[tuple[bytes, str | None]],
) -> None:
    headers = [(n, v.encode()) for n, v in fields] + [FORM]
    target = b"/p?" + b"&".join(encode(k, v) for k, v in query)
    body = b"&".join(encode(k, v) for k, v in form)
    result = strip_token(target, headers, body)
    tokens = [v for n, v in fields if n.lower() == b"x-mock-token"]
    tokens += [v or "" for k, v in query if KEYS[k]]
    tokens += [v or "" for k, v in form if KEYS[k]]
    assert result.token == (tokens[0] if tokens else None)
    assert result.conflict == (len(set(tokens)) > 1)
    assert not header(result.headers, b"x-mock-token")
    again = strip_token(result.target, result.headers, result.body)
    assert again.token is None
    assert (again.target, again.body, again.headers) == (result.target, result.body, result.headers)


CONTENT_TYPES = [FORM[1], MULTIPART[1], b"multipart/form-data; boundary=x", b"text/plain", b""]


@PROPS
@given(
    st.binary(max_size=60),
    st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=12)), max_size=4),
    st.sampled_from(CONTENT_TYPES),
    st.binary(max_size=200),
)
def test_strip_never_raises(
    target: bytes, headers: list[tuple[bytes, bytes]], content_type: bytes, body: bytes
) -> None:
    for content in (body, b"--x\r\n" + body, b"--x\r\n" + body + b"\r\n--x--"):
        result = strip_token(target, [*headers, (b"content-type", content_type)], content)
        assert isinstance(result, Stripped)
        assert header(result.headers, b"content-length") in ([], [b"%d" % len(result.body)])


# -------------------------------------------------------------------------------- check_token
@pytest.mark.parametrize(
    ("expected", "given_", "ok"),
    [
        ("abc", "abc", True),
        ("abc", "abd", False),
        ("abc", "ab", False),
        ("abc", "abc ", False),
        ("abc", "ABC", False),
        ("abc", None, False),
        ("abc", "", False),
        ("", "", False),  # a mock without a token is closed, not open
        ("", None, False),
        ("t\u00f6k\u00e9n", "t\u00f6k\u00e9n", True),
        ("abc", "\ud800", False),  # a lone surrogate does not raise
    ],
)
def test_check_token(expected: str, given_: str | None, ok: bool) -> None:
    assert check_token(expected, given_) is ok


def test_check_token_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = mockgate.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(mockgate.hmac, "compare_digest", spy)
    assert check_token("abc", "abc") and not check_token("abc", "a" * 1000)
    assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)


# -------------------------------------------------------------------------------- RateLimiter
def test_burst_then_refill() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.allow("e", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.retry_after("e", 0.0) == 0.5
    assert limiter.retry_after("e", 0.25) == 0.25
    assert limiter.allow("e", 0.25) is False
    assert limiter.allow("e", 0.5) is True  # one refilled
    assert limiter.allow("e", 0.5) is False
    assert limiter.allow("e", 1.0) is True
    assert [limiter.allow("e", 100.0) for _ in range(4)] == [True, True, True, False]  # capped


def test_keys_are_independent() -> None:
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.allow(("s", "a"), 0.0) and not limiter.allow(("s", "a"), 0.0)
    assert limiter.allow(("s", "b"), 0.0)
    assert limiter.retry_after(("s", "c"), 0.0) == 0.0


def test_clock_going_back_refills_nothing() -> None:
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.allow("e", 10.0)
    assert not limiter.allow("e", 5.0)
    assert not limiter.allow("e", 10.5)
    assert limiter.allow("e", 11.0)


def test_idle_keys_are_forgotten() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)  # full again 1.5 s after the last request
    limiter.allow("a", 0.0)
    limiter.allow("b", 1.0)
    assert limiter.tracked == 2
    limiter.allow("c", 1.5)  # "a" is full again: forgotten, no difference made
    assert limiter.tracked == 2
    limiter.allow("c", 10.0)
    assert limiter.tracked == 1
    for i in range(1000):
        limiter.allow(i, 100.0 + i * 2)
    assert limiter.tracked == 1


def test_rate_and_burst_per_call() -> None:
    limiter = RateLimiter(rate=100.0, burst=100)  # defaults; this space's own limits win
    assert [limiter.allow("e", 0.0, rate=1.0, burst=2) for _ in range(3)] == [True, True, False]
    assert limiter.retry_after("e", 0.0, rate=1.0, burst=2) == 1.0
    assert limiter.retry_after("e", 0.0, rate=4.0, burst=2) == 0.25
    assert limiter.allow("e", 0.25, rate=4.0, burst=2) is True
    assert limiter.allow("other", 0.0) is True  # the defaults for the rest
    with pytest.raises(ValueError):
        limiter.allow("e", 1.0, rate=0.0)
    with pytest.raises(ValueError):
        limiter.allow("e", 1.0, burst=0.5)


def test_memory_bound() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=2)
    assert limiter.allow("a", 0.0) and limiter.allow("b", 0.0) and limiter.allow("c", 0.0)
    assert limiter.tracked == 2
    assert limiter.allow("a", 0.0)  # the least recently used went: a fresh bucket
    assert not limiter.allow("c", 0.0)


@pytest.mark.parametrize(
    ("rate", "burst", "max_keys"),
    [(0, 1, 1), (-1, 1, 1), (float("inf"), 1, 1), (1, 0.5, 1), (1, float("nan"), 1), (1, 1, 0)],
)
def test_limiter_rejects_bad_settings(rate: float, burst: float, max_keys: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, burst, max_keys=max_keys)


def test_limiter_rejects_a_time_that_is_not_one() -> None:
    with pytest.raises(ValueError):
        RateLimiter(1.0, 1).allow("e", float("nan"))


# ---------------------------------------------------------------------------------- decide
@dataclass(frozen=True)
class Setting:
    access: str
    token: str = ""


PUBLIC = Setting("public")
PRIVATE = Setting("token", TOKEN)
TARGET = MockTarget(SPACE, ENV, b"/users")


def gate(
    setting: Setting | None,
    *,
    target: MockTarget | None = TARGET,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    query: bytes = b"",
    limiter: RateLimiter | None = None,
    max_body: int = 1024,
    now: float = 0.0,
) -> Forward | Respond:
    forwarded = (target.target if target else b"/") + query
    stripped = strip_token(forwarded, headers or [], body)
    limiter = RateLimiter(rate=10, burst=10) if limiter is None else limiter
    return decide(target, setting, stripped, max_body=max_body, limiter=limiter, now=now)


def test_not_found_is_one_answer() -> None:
    answers = [
        gate(None),  # mock off, or no such environment
        gate(PRIVATE, target=None),  # not a /mock/ target
        gate(PRIVATE, target=NOT_FOUND_TARGET),  # bad ids
        gate(None, headers=[(b"x-mock-token", TOKEN.encode())]),
        gate(None, body=b"x" * 5000),
    ]
    assert all(a == NOT_FOUND for a in answers)
    assert isinstance(NOT_FOUND, Respond)
    assert (NOT_FOUND.status, NOT_FOUND.headers) == (404, ())
    assert NOT_FOUND.body == b'{"error":"not-found","message":"no such mock"}'


@pytest.mark.parametrize(
    ("setting", "headers", "query", "status"),
    [
        (PUBLIC, [], b"", None),
        (PUBLIC, [(b"x-mock-token", b"wrong")], b"", None),  # ignored, still stripped
        (PRIVATE, [], b"", 401),
        (PRIVATE, [(b"x-mock-token", b"wrong")], b"", 401),
        (PRIVATE, [(b"x-mock-token", TOKEN.encode()[:-1])], b"", 401),
        (PRIVATE, [(b"x-mock-token", TOKEN.encode())], b"", None),
        (PRIVATE, [], b"?token=" + TOKEN.encode(), None),
        (PRIVATE, [(b"x-mock-token", TOKEN.encode())], b"?token=" + TOKEN.encode(), None),
        (PRIVATE, [(b"x-mock-token", TOKEN.encode())], b"?token=other", 401),  # disagree
        (PRIVATE, [(b"x-mock-token", b"")], b"", 401),
        (Setting("token", ""), [(b"x-mock-token", b"")], b"", 401),  # no token set: closed
        (Setting("private", TOKEN), [], b"", 401),  # unknown access: needs the token
        (Setting("private", TOKEN), [(b"x-mock-token", TOKEN.encode())], b"", None),
    ],
)
def test_token_access(
    setting: Setting, headers: list[tuple[bytes, bytes]], query: bytes, status: int | None
) -> None:
    answer = gate(setting, headers=headers, query=query)
    if status is None:
        assert isinstance(answer, Forward)
        assert (answer.space, answer.env, answer.target) == (SPACE, ENV, b"/users")
        assert not header(answer.headers, b"x-mock-token")
    else:
        assert isinstance(answer, Respond)
        assert answer.status == status
        payload = json.loads(answer.body)
        assert payload["error"] == "unauthorized" and payload["message"]
        assert answer.headers == ()  # no WWW-Authenticate


@pytest.mark.parametrize("raw", [False, True])
def test_forwarded_target_is_the_route_whatever_was_stripped(raw: bool) -> None:
    """The target may be stripped raw (`/mock/S/E/...`) or parsed: the engine gets the route."""
    raw_target = PREFIX + b"/a/../orders?x=1&token=" + TOKEN.encode() + b"&y=%20"
    target = parse_mock_target(raw_target)
    assert target is not None
    stripped = strip_token(raw_target if raw else target.target, [], b"")
    answer = decide(target, PRIVATE, stripped, max_body=10, limiter=RateLimiter(1, 1), now=0.0)
    assert isinstance(answer, Forward)
    assert answer.target == b"/orders?x=1&y=%20"


def test_forward_carries_the_stripped_request() -> None:
    body = multipart(TEXT, TOKEN_PART)
    answer = gate(PRIVATE, headers=[MULTIPART], body=body, query=b"?a=1&token=" + TOKEN.encode())
    assert isinstance(answer, Forward)
    assert answer.target == b"/users?a=1"
    assert answer.body == multipart(TEXT)
    assert answer.headers == [MULTIPART, (b"content-length", b"%d" % len(answer.body))]


def test_too_large() -> None:
    ok = gate(PUBLIC, headers=[FORM], body=b"a" * 100, max_body=100)
    assert isinstance(ok, Forward)
    big = gate(PUBLIC, headers=[FORM], body=b"a" * 101, max_body=100)
    assert isinstance(big, Respond) and big.status == 413
    assert json.loads(big.body)["error"] == "too-large"
    # the limit is on what was received, not on what is left after stripping
    stripped = gate(PUBLIC, headers=[FORM], body=b"a=1&token=" + b"t" * 100, max_body=100)
    assert isinstance(stripped, Respond) and stripped.status == 413


def test_order_404_401_413_429() -> None:
    limiter = RateLimiter(rate=1, burst=1)
    limiter.allow((SPACE, ENV), 0.0)  # the bucket is empty
    big = b"x" * 2000
    assert gate(None, body=big, limiter=limiter).status == 404  # type: ignore[union-attr]
    assert gate(PRIVATE, body=big, limiter=limiter).status == 401  # type: ignore[union-attr]
    right = [(b"x-mock-token", TOKEN.encode())]
    assert gate(PRIVATE, headers=right, body=big, limiter=limiter).status == 413  # type: ignore[union-attr]
    assert gate(PRIVATE, headers=right, limiter=limiter).status == 429  # type: ignore[union-attr]


def test_rate_limited_with_retry_after() -> None:
    limiter = RateLimiter(rate=0.25, burst=2)
    right = [(b"x-mock-token", TOKEN.encode())]
    for _ in range(5):  # without the token nothing is spent
        assert gate(PRIVATE, limiter=limiter).status == 401  # type: ignore[union-attr]
    assert gate(PRIVATE, body=b"x" * 5000, headers=right, limiter=limiter).status == 413  # type: ignore[union-attr]
    assert isinstance(gate(PRIVATE, headers=right, limiter=limiter), Forward)
    assert isinstance(gate(PRIVATE, headers=right, limiter=limiter), Forward)
    limited = gate(PRIVATE, headers=right, limiter=limiter, now=1.0)
    assert isinstance(limited, Respond) and limited.status == 429
    assert limited.headers == ((b"retry-after", b"3"),)
    assert json.loads(limited.body)["error"] == "rate-limited"
    assert isinstance(gate(PRIVATE, headers=right, limiter=limiter, now=4.0), Forward)
    other = MockTarget(SPACE, "other-env", b"/")
    assert isinstance(gate(PRIVATE, target=other, headers=right, limiter=limiter), Forward)


def test_decide_takes_a_space_rate() -> None:
    limiter = RateLimiter(rate=1000.0, burst=1000)
    stripped = strip_token(TARGET.target, [], b"")
    answers = [
        decide(TARGET, PUBLIC, stripped, max_body=10, limiter=limiter, now=0.0, rate=0.5, burst=1)
        for _ in range(2)
    ]
    assert isinstance(answers[0], Forward)
    assert isinstance(answers[1], Respond) and answers[1].headers == ((b"retry-after", b"2"),)


def test_retry_after_is_at_least_one_second() -> None:
    limiter = RateLimiter(rate=100, burst=1)
    assert isinstance(gate(PUBLIC, limiter=limiter), Forward)
    limited = gate(PUBLIC, limiter=limiter)
    assert isinstance(limited, Respond) and limited.headers == ((b"retry-after", b"1"),)


# --------------------------------------------------------------------------------- headers
def test_forward_headers() -> None:
    headers = [
        (b"host", b"hub.example"),
        (b"Connection", b"keep-alive, X-Secret, content-length, Host"),
        (b"keep-alive", b"timeout=5"),
        (b"x-secret", b"dropped"),
        (b"te", b"trailers"),
        (b"trailer", b"x"),
        (b"upgrade", b"websocket"),
        (b"transfer-encoding", b"chunked"),
        (b"proxy-authorization", b"Basic x"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"x-forwarded-for", b"6.6.6.6"),
        (b"X-Forwarded-Host", b"evil"),
        (b"forwarded", b"for=6.6.6.6"),
        (b"x-real-ip", b"6.6.6.6"),
        (b"x-mock-token", b"never"),
        (b"expect", b"100-continue"),
        (b"content-length", b"3"),
        (b"accept", b"*/*"),
        (b"cookie", b"a=1"),
    ]
    out = forward_headers(headers, "203.0.113.7", "https", "hub.example:8443")
    assert out == [
        (b"host", b"hub.example"),
        (b"content-length", b"3"),
        (b"accept", b"*/*"),
        (b"cookie", b"a=1"),
        (b"x-forwarded-for", b"203.0.113.7"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"hub.example:8443"),
    ]


@pytest.mark.parametrize(
    ("client", "xff"),
    [
        ("2001:db8::1", b"2001:db8::1"),
        ("fe80::1%eth0", b"fe80::1"),
        ("::ffff:192.0.2.1", b"::ffff:c000:201"),
        ("?", b"unknown"),
        (None, b"unknown"),
        ("1.2.3.4\r\nx: y", b"unknown"),
    ],
)
def test_forwarded_for(client: str | None, xff: bytes) -> None:
    assert header(forward_headers([], client, "HTTP", "h"), b"x-forwarded-for") == [xff]
    assert header(forward_headers([], client, "HTTP", "h"), b"x-forwarded-proto") == [b"http"]


@pytest.mark.parametrize("host", ["", "a b", "h\r\nx: y", "h,evil", "caf\u00e9", "h" * 256])
def test_forwarded_host_only_if_sane(host: str) -> None:
    assert not header(forward_headers([], "127.0.0.1", "http", host), b"x-forwarded-host")


def test_forward_headers_rejects_a_bad_scheme() -> None:
    with pytest.raises(ValueError):
        forward_headers([], "127.0.0.1", "ftp", "h")


def test_response_headers() -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"Connection", b"close, x-hop"),
        (b"x-hop", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"content-length", b"10"),
        (b"proxy-authenticate", b"Basic"),
        (b"upgrade", b"h2c"),
    ]
    assert response_headers(headers) == [
        (b"content-type", b"application/json"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"content-length", b"10"),
    ]
    chunked = [(b"transfer-encoding", b"chunked"), (b"content-length", b"10"), (b"x-a", b"1")]
    assert response_headers(chunked) == [(b"x-a", b"1")]


# ------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize(
    ("query", "headers", "body"),
    [
        (b"?token=" + TOKEN.encode(), [], b""),
        (b"", [(b"X-Mock-Token", TOKEN.encode())], b""),
        (b"", [FORM], b"a=1&token=" + TOKEN.encode()),
        (b"", [MULTIPART], multipart(TEXT, FILE, TOKEN_PART)),
        (
            b"?%74oken=" + TOKEN.encode() + b"&token[]=" + TOKEN.encode(),
            [(b"x-mock-token", TOKEN.encode()), MULTIPART],
            multipart(TOKEN_PART, FILE, TOKEN_PART),
        ),
    ],
)
def test_the_engine_never_sees_the_token(
    query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    raw_target = PREFIX + b"/orders/42" + query
    target = parse_mock_target(raw_target)
    assert target is not None and target.valid
    stripped = strip_token(target.target, [(b"host", b"hub.example"), *headers], body)
    answer = decide(target, PRIVATE, stripped, max_body=1 << 20, limiter=RateLimiter(1, 1), now=0.0)
    assert isinstance(answer, Forward)
    sent = forward_headers(answer.headers, "198.51.100.9", "https", "hub.example")
    wire = answer.target + b"".join(n + b":" + v for n, v in sent) + answer.body
    assert TOKEN.encode() not in wire
    assert answer.target == b"/orders/42"
