"""The text diff behind per-character body edits always terminates and converges.

Large texts are diffed by lines and each replaced block refined again; a block sharing no line
with its replacement (a multi-line body saved as one unrelated line) once went back into the line
diff unchanged and recursed until RecursionError, blocking the daemon for ~20 s. A spy on the
recursion catches a call repeated on its own input at once, instead of waiting for that.
"""

import random

import pytest
from modelutil import assert_converged, edit, load, replicas, sync_all

from peerdaemon.model import edits


def apply_hunks(old, hunks):
    """`old` with the hunks applied; they must be in order and must not overlap."""
    out, pos = [], 0
    for start, end, replacement in hunks:
        assert pos <= start <= end <= len(old), (pos, start, end)
        out += [old[pos:start], replacement]
        pos = end
    return "".join(out) + old[pos:]


@pytest.fixture
def no_repeat(monkeypatch):
    """Fails a `_text_hunks` call made, directly or not, from a call with the same arguments."""
    original = edits._text_hunks
    active = []

    def spy(old, new, *args, **kwargs):
        call = (old, new, args, sorted(kwargs.items()))
        assert call not in active, f"recursion on the same call, depth {len(active)}"
        active.append(call)
        try:
            return original(old, new, *args, **kwargs)
        finally:
            active.pop()

    monkeypatch.setattr(edits, "_text_hunks", spy)


def many_lines(n, seed=0):
    rng = random.Random(seed)
    return "".join(f'  "field{i}": "{rng.randrange(10**9)}",\n' for i in range(n))


# (old, new): texts whose product passes _CHAR_DIFF_LIMIT, with no line in common
UNRELATED = {
    "lines to one line": (many_lines(250), "x" * 400),
    "one line to lines": ("x" * 400, many_lines(250)),
    "lines to other lines": (many_lines(250, 1), "".join(f"<{i}>\n" for i in range(300))),
    "lines to one line, same ends": ("{\n" + many_lines(250) + "}", "{" + "y" * 400 + "}"),
}


@pytest.mark.parametrize("old, new", UNRELATED.values(), ids=UNRELATED.keys())
def test_unrelated_large_texts_terminate_and_converge(no_repeat, old, new):
    assert len(old) * len(new) > edits._CHAR_DIFF_LIMIT
    assert apply_hunks(old, edits._text_hunks(old, new)) == new


def test_replaced_block_inside_shared_lines_terminates_and_converges(no_repeat):
    """The unrelated block is in the middle: the shared lines around it stay untouched."""
    head, tail = many_lines(40, 2), many_lines(40, 3)
    old, new = head + many_lines(250, 4) + tail, head + "z" * 400 + "\n" + tail
    hunks = edits._text_hunks(old, new)
    assert apply_hunks(old, hunks) == new
    assert all(len(head) <= start and end <= len(old) - len(tail) for start, end, _ in hunks)


def test_random_large_edits_converge(no_repeat):
    """Lines kept, dropped, changed and added at random, some blocks too large to refine."""
    rng = random.Random(7)
    for _ in range(20):
        old_lines = many_lines(rng.randrange(50, 300), rng.randrange(100)).splitlines(True)
        new_lines = []
        for line in old_lines:
            roll = rng.random()
            if roll < 0.5:
                new_lines.append(line)
            elif roll < 0.7:
                new_lines.append(line.replace("field", "f"))
            elif roll < 0.8:
                new_lines.append("w" * rng.randrange(1, 600))
        old, new = "".join(old_lines), "".join(new_lines)
        assert apply_hunks(old, edits._text_hunks(old, new)) == new


def test_body_replaced_by_unrelated_line_is_applied(no_repeat):
    """The report: a 7 kB multi-line response body saved as a 400-character single line."""
    env = load("test-env.json")
    env["routes"][0]["responses"][0]["body"] = many_lines(200)
    a, b = replicas(env)
    line = '{"status": "' + "ok" * 190 + '"}'

    def replace_body(e):
        e["routes"][0]["responses"][0]["body"] = line

    edit(a, replace_body)
    edit(b, lambda e: e.update(name="renamed"))  # concurrent, elsewhere
    sync_all(a, b)
    merged = assert_converged(a, b)
    assert merged["routes"][0]["responses"][0]["body"] == line
    assert merged["name"] == "renamed"
