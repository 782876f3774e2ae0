"""The mirror's sans-I/O parts: the link state machine (explicit `now`, no files) and the
Mockoon-style formatter (pure functions)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from modelutil import FIXTURE_DIR

from peerdaemon.mirror.format import (
    format_environment,
    js_number,
    json_hash,
    stringify,
    text_style,
)
from peerdaemon.mirror.link import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    DEBOUNCE,
    MAX_DELAY,
    SETTLE,
    Apply,
    Emit,
    LinkMachine,
    Observation,
    Render,
    Write,
)
from peerdaemon.model.keyorder import order_like

ENV = {"uuid": "e1", "name": "A", "port": 3000, "routes": []}


def obs_for(env, sig=(1, 1, 1), text=None):
    data = (text if text is not None else json.dumps(env)).encode()
    return Observation("file", sig, data, json_hash(env))


def invalid(data=b"{ half", sig=(2, 2, 2)):
    return Observation("file", sig, data, None, "malformed JSON")


def types(actions):
    return [type(a).__name__ + (f":{a.type}" if isinstance(a, Emit) else "") for a in actions]


def started(env=ENV):
    """A resumed link whose file holds `env`, synced: it rendered and found nothing to write."""
    o = obs_for(env)
    m = LinkMachine("e1", "/d/env.json", "/d/env.peerdaemon-conflict.json", synced=o.hash)
    acts = m.observed(0.0, o)
    assert acts == [Render("file")]  # start-up: compare the document with the file
    assert m.rendered(0.0, "file", o.content, json_hash(env)) == []  # same JSON: no write
    assert not m.dirty
    return m


def render_and_write(m, now, env, sig):
    """Drive Render -> Write -> write_done(ok); returns the actions after the write."""
    acts = m.poll(now)
    assert acts == [Render("file")], acts
    content = json.dumps(env).encode()
    acts = m.rendered(now, "file", content, json_hash(env))
    assert len(acts) == 1 and isinstance(acts[0], Write) and acts[0].target == "file"
    return m.write_done(now, "file", "ok", content=content, json_hash=json_hash(env), sig=sig)


# -- document -> file ---------------------------------------------------------------------------


def test_doc_change_is_debounced_then_written_once():
    m = started()
    m.doc_changed(10.0)
    assert m.poll(10.0) == []
    assert m.deadline() == pytest.approx(10.0 + DEBOUNCE)
    m.doc_changed(10.03)  # a burst: the trailing edge moves
    assert m.poll(10.06) == []
    env2 = {**ENV, "name": "B"}
    after = render_and_write(m, 10.03 + DEBOUNCE, env2, (5, 5, 5))
    assert types(after) == ["InSync"]
    assert m.stats["writes"] == 1 and not m.dirty and m.deadline() is None


def test_a_steady_stream_of_edits_is_written_at_least_every_max_delay():
    m = started()
    renders = []
    t = 0.0
    while t < 3.0:
        m.doc_changed(t)
        for a in m.poll(t):
            assert isinstance(a, Render)
            renders.append(t)
            env = {**ENV, "name": f"n{t}"}
            m.rendered(t, "file", b"x%f" % t, json_hash(env))
            m.write_done(
                t,
                "file",
                "ok",
                content=b"x%f" % t,
                json_hash=json_hash(env),
                sig=(int(t * 100), 1, 1),
            )
        t = round(t + 0.02, 4)
    # every change is written at most MAX_DELAY (+ the 20 ms sampling step) after it was made
    gaps = [b - a for a, b in zip(renders, renders[1:], strict=False)]
    assert len(renders) >= 8 and max(gaps) <= MAX_DELAY + 0.02 + 0.021


def test_write_expects_the_sig_last_seen_and_a_moved_file_is_read_first():
    m = started()
    m.doc_changed(1.0)
    (render,) = m.poll(2.0)
    (write,) = m.rendered(2.0, "file", b"new", json_hash({**ENV, "name": "B"}))
    assert write.expect == (1, 1, 1)
    acts = m.write_done(2.0, "file", "changed")
    assert acts == [] and m.want_observe and m.dirty
    assert m.poll(5.0) == [] and m.deadline() is None  # nothing until the file was read
    other = {**ENV, "port": 4000}
    acts = m.observed(5.0, obs_for(other, sig=(9, 9, 9)))
    assert types(acts) == ["Apply"]  # their save is applied, then the merge written back


# -- file -> document ---------------------------------------------------------------------------


def test_own_write_coming_back_is_not_applied():
    m = started()
    m.doc_changed(1.0)
    env2 = {**ENV, "name": "B"}
    render_and_write(m, 2.0, env2, (7, 7, 7))
    # the poller sees the file's new stat (e.g. a watcher touched it): same content as written
    acts = m.observed(2.5, obs_for(env2, sig=(8, 7, 7)))
    assert acts == [] and m.stats["applies"] == 0


def test_external_save_is_applied_once_and_not_written_back():
    m = started()
    env2 = {**ENV, "port": 4000}
    o = obs_for(env2, sig=(3, 3, 3))
    acts = m.observed(1.0, o)
    assert acts == [Apply(o.content)]
    assert m.poll(1.5) == []  # in flight
    m.doc_changed(1.0)  # our own apply changed the document
    acts = m.applied(1.0, o.content)
    assert types(acts) == ["InSync"]
    acts = m.poll(1.0 + MAX_DELAY)
    assert acts == [Render("file")]
    # the document now says exactly what the file says: nothing to write (no reload loop)
    assert m.rendered(1.3, "file", b"formatted differently", json_hash(env2)) == []
    assert m.stats == {"writes": 0, "applies": 1, "conflicts": 0, "errors": 0}
    # the same content again (a touch) is not applied again
    assert m.observed(2.0, obs_for(env2, sig=(4, 3, 3))) == []


def test_merged_concurrent_edit_is_written_back_once():
    m = started()
    env2 = {**ENV, "port": 4000}
    o = obs_for(env2, sig=(3, 3, 3))
    m.observed(1.0, o)
    m.doc_changed(1.0)
    m.applied(1.0, o.content)
    merged = {**env2, "name": "edited elsewhere"}
    assert m.poll(1.3) == [Render("file")]
    (write,) = m.rendered(1.3, "file", json.dumps(merged).encode(), json_hash(merged))
    assert write.expect == (3, 3, 3)
    m.write_done(
        1.3, "file", "ok", content=write.content, json_hash=json_hash(merged), sig=(5, 5, 5)
    )
    assert m.observed(1.5, obs_for(merged, sig=(5, 5, 5), text=write.content.decode())) == []
    assert m.stats["writes"] == 1 and m.stats["applies"] == 1


def test_reformatting_only_is_not_applied():
    m = started()
    o = obs_for(ENV, sig=(3, 3, 3), text=json.dumps(ENV, indent=4))
    assert m.observed(1.0, o) == []
    assert m.stats["applies"] == 0


# -- invalid files and conflicts ----------------------------------------------------------------


def test_half_written_file_that_completes_in_time_is_no_conflict():
    m = started()
    assert m.observed(1.0, invalid()) == []
    assert m.deadline() == pytest.approx(1.0 + SETTLE)
    env2 = {**ENV, "port": 1}
    acts = m.observed(1.2, obs_for(env2, sig=(4, 4, 4)))
    assert types(acts) == ["Apply"]
    assert not m.conflict and m.pending_invalid is None


def test_invalid_file_goes_to_conflict_then_resumes():
    m = started()
    m.observed(1.0, invalid())
    m.doc_changed(1.1)
    assert m.poll(1.2) == []  # waiting for the file to settle, not overwriting it
    acts = m.poll(1.0 + SETTLE)
    assert types(acts) == ["Emit:mirror-conflict", "Render"]
    assert acts[1] == Render("conflict")
    assert acts[0].data["conflict_path"] == "/d/env.peerdaemon-conflict.json"
    assert m.state == "conflict"
    (write,) = m.rendered(1.5, "conflict", b"merged", "h")
    assert write == Write("conflict", b"merged", "any")
    assert m.write_done(1.5, "conflict", "ok") == []
    # more edits elsewhere: the conflict file follows, the linked file is never written
    m.doc_changed(2.0)
    assert m.poll(2.0 + DEBOUNCE) == [Render("conflict")]
    (write,) = m.rendered(2.1, "conflict", b"merged2", "h2")
    assert write.target == "conflict"
    m.write_done(2.1, "conflict", "ok")
    # another invalid save: still in conflict, no new event
    assert m.observed(3.0, invalid(b"{ still", (6, 6, 6))) == []
    # the user fixes the file: applied, mirroring resumes
    fixed = {**ENV, "name": "fixed"}
    acts = m.observed(4.0, obs_for(fixed, sig=(7, 7, 7)))
    assert types(acts) == ["Emit:mirror-resumed", "Apply"]
    m.doc_changed(4.0)
    # the merge (the document had edits from elsewhere meanwhile) is written back if it differs
    assert types(m.applied(4.0, acts[1].content)) == ["InSync", "Render"]
    assert m.state == "syncing"


def test_invalid_file_at_start_is_a_conflict_at_once():
    m = LinkMachine("e1", "/d/x.json", "/d/x.peerdaemon-conflict.json", synced="old", mode="resume")
    acts = m.observed(0.0, invalid())
    assert types(acts) == ["Emit:mirror-conflict", "Render"]


# -- start-up -----------------------------------------------------------------------------------


def test_start_applies_a_file_changed_while_not_running():
    m = LinkMachine("e1", "/d/x.json", "/d/c.json", synced="hash-of-older-content", mode="resume")
    o = obs_for(ENV)
    assert m.observed(0.0, o) == [Apply(o.content)]


def test_start_with_unchanged_file_writes_only_if_the_document_differs():
    o = obs_for(ENV)
    m = LinkMachine("e1", "/d/x.json", "/d/c.json", synced=o.hash, mode="resume")
    assert m.observed(0.0, o) == [Render("file")]
    newer = {**ENV, "name": "newer"}
    (write,) = m.rendered(0.0, "file", b"...", json_hash(newer))
    assert isinstance(write, Write)


def test_start_with_missing_file_rewrites_it_and_says_so():
    m = LinkMachine("e1", "/d/x.json", "/d/c.json", synced="h", mode="resume")
    acts = m.observed(0.0, Observation("missing"))
    assert types(acts) == ["Emit:mirror-file-deleted", "Render"]
    (write,) = m.rendered(0.0, "file", b"{}", "j")
    assert write.expect is None  # only if it is still missing


def test_new_link_adopts_or_overwrites():
    o = obs_for(ENV)
    adopt = LinkMachine("e1", "/d/x.json", "/d/c.json", mode="adopt")
    assert adopt.observed(0.0, o) == [Apply(o.content)]
    over = LinkMachine("e1", "/d/x.json", "/d/c.json", mode="overwrite")
    assert over.observed(0.0, invalid()) == [Render("file")]
    new = LinkMachine("e1", "/d/x.json", "/d/c.json", mode="overwrite")
    assert new.observed(0.0, Observation("missing")) == [Render("file")]  # no event for a new file


# -- bad paths ----------------------------------------------------------------------------------


def test_file_deleted_while_linked_is_written_again():
    m = started()
    assert m.observed(1.0, Observation("missing")) == []
    assert m.deadline() == pytest.approx(1.0 + SETTLE)
    acts = m.poll(1.0 + SETTLE)
    assert types(acts) == ["Emit:mirror-file-deleted", "Render"]
    assert "env unlink e1" in acts[0].data["reason"]


def test_delete_then_quick_recreate_by_an_editor_is_just_a_save():
    m = started()
    m.observed(1.0, Observation("missing"))
    env2 = {**ENV, "name": "vim"}
    assert types(m.observed(1.2, obs_for(env2, sig=(9, 9, 9)))) == ["Apply"]
    assert m.pending_missing is None


def test_write_errors_are_reported_once_and_retried_with_backoff():
    m = started()
    m.doc_changed(1.0)
    m.poll(2.0)
    m.rendered(2.0, "file", b"x", "j")
    acts = m.write_done(2.0, "file", "failed", error="cannot write /d/env.json: permission denied")
    assert types(acts) == ["Emit:mirror-error"]
    assert acts[0].data["reason"].endswith("permission denied")
    assert m.state == "error"
    now, retries = 2.0, []
    for _ in range(8):
        now = m.deadline()
        retries.append(now)
        assert m.poll(now) == [Render("file")]
        m.rendered(now, "file", b"x", "j")
        acts = m.write_done(
            now, "file", "failed", error="cannot write /d/env.json: permission denied"
        )
        assert acts == []  # the same reason is not repeated
    gaps = [b - a for a, b in zip(retries, retries[1:], strict=False)]
    assert gaps == sorted(gaps) and gaps[-1] <= BACKOFF_MAX
    now = m.deadline()
    m.poll(now)
    m.rendered(now, "file", b"x", "j")
    acts = m.write_done(now, "file", "ok", content=b"x", json_hash="j", sig=(1, 2, 3))
    assert types(acts) == ["InSync", "Emit:mirror-resumed"]
    assert m.state == "ok"


def test_file_replaced_by_a_directory():
    m = started()
    m.doc_changed(1.0)
    acts = m.observed(1.0, Observation("dir", (4, 4, 4)))
    assert types(acts) == ["Emit:mirror-error"]
    assert "is a directory" in acts[0].data["reason"]
    assert m.poll(100.0) == []  # never writes onto a directory; looks again at the retry
    assert m.want_observe
    assert m.observed(100.0, Observation("dir", (4, 4, 4))) == []  # same reason: no new event
    acts = m.observed(200.0, Observation("missing"))
    assert types(acts) == ["Emit:mirror-resumed"]
    acts = m.poll(200.0 + SETTLE)
    assert types(acts) == ["Emit:mirror-file-deleted", "Render"]


def test_unreadable_file_is_an_error_until_readable():
    m = started()
    acts = m.observed(
        1.0, Observation("error", (1, 1, 1), error="cannot read /d/env.json: permission denied")
    )
    assert types(acts) == ["Emit:mirror-error"]
    assert m.poll(m.deadline()) == [] and m.want_observe
    acts = m.observed(3.0, obs_for(ENV))
    assert types(acts) == ["Emit:mirror-resumed"]


# -- the formatter ------------------------------------------------------------------------------

MOCKOON_WRITTEN = [
    "basic-folder-2-routes.json",
    "demo-api-generated-commons-9.9.0.json",
    "demo-api-repaired-commons-9.9.0.json",
    "incompatible.json",
    "response-rules.json",
    "test-env.json",
]


@pytest.mark.parametrize("name", MOCKOON_WRITTEN)
def test_format_reproduces_a_file_byte_for_byte(name):
    text = (FIXTURE_DIR / name).read_text(encoding="utf-8")
    assert format_environment(json.loads(text), text) == text


def test_format_keeps_each_entity_key_order_after_a_move():
    text = (FIXTURE_DIR / "test-env.json").read_text(encoding="utf-8")
    env = json.loads(text)
    reordered = json.loads(text, object_pairs_hook=lambda kv: dict(sorted(kv)))
    reordered["routes"].reverse()  # moved routes, and every object's keys shuffled
    out = format_environment(reordered, text)
    back = json.loads(out)
    for route in back["routes"]:
        old = next(r for r in env["routes"] if r["uuid"] == route["uuid"])
        assert list(route) == list(old)
        for resp in route["responses"]:
            old_resp = next(r for r in old["responses"] if r["uuid"] == resp["uuid"])
            assert list(resp) == list(old_resp)
    assert list(back) == list(env)


def test_format_new_objects_in_mockoon_order_unknown_keys_last():
    env = {
        "zzz": 1,
        "routes": [{"responses": [{"body": "{}", "uuid": "r1", "x-future": True}], "uuid": "a"}],
        "name": "n",
        "uuid": "u",
    }
    out = json.loads(format_environment(env))
    assert list(out) == ["uuid", "name", "routes", "zzz"]
    assert list(out["routes"][0]) == ["uuid", "responses"]
    assert list(out["routes"][0]["responses"][0]) == ["uuid", "body", "x-future"]
    assert order_like({"value": 1, "key": 2}, None, "header") == {"key": 2, "value": 1}


def test_format_keeps_layout_conventions():
    env = {"uuid": "u", "name": "n"}
    assert format_environment(env) == '{\n  "uuid": "u",\n  "name": "n"\n}'
    assert format_environment(env, '{"name":"x","uuid":"u"}') == '{"name":"n","uuid":"u"}'
    assert format_environment(env, '{\n  "uuid": "u"\n}\n').endswith("}\n")
    assert text_style(None) == (True, False)


@pytest.mark.parametrize(
    ("value", "js"),
    [
        (0.1, "0.1"),
        (1e-7, "1e-7"),
        (1e-6, "0.000001"),
        (1e21, "1e+21"),
        (1e16 + 2, "10000000000000002"),
        (-2.5, "-2.5"),
        (100.0, "100"),
        (5e-324, "5e-324"),
        (1.5e300, "1.5e+300"),
        (10**22, "1e+22"),
        (123456789.125, "123456789.125"),
        (float("nan"), "null"),
        (0.0, "0"),
        (-0.0, "0"),
    ],
)
def test_numbers_are_written_as_javascript_writes_them(value, js):
    assert js_number(value) == js


def test_stringify_matches_node_json_stringify():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    value = {
        "s": 'é \u2028 \x7f \x01 " \\ \n \t ✓ 😀',
        "n": [0.1, 1e-7, 2.5e-5, 1e21, 123.0, -7, 1.7976931348623157e308, 3e-310],
        "e": [{}, [], None, True, False],
        "nested": {"a": [{"b": {}}]},
    }
    text = json.dumps(value)
    script = (
        "const fs=require('fs');const v=JSON.parse(fs.readFileSync(0,'utf8'));"
        "process.stdout.write(JSON.stringify(v,null,2)+'\\u0000'+JSON.stringify(v))"
    )
    out = subprocess.run(
        [node, "-e", script], input=text, capture_output=True, text=True, check=True
    )
    pretty, compact = out.stdout.split("\0")
    assert stringify(value) == pretty
    assert stringify(value, None) == compact


def test_change_during_a_conflict_file_write_is_not_lost():
    m = started()
    m.observed(1.0, invalid())
    m.poll(1.0 + SETTLE)
    (write,) = m.rendered(1.6, "conflict", b"v1", "h1")
    m.doc_changed(1.61)  # while the conflict file is being written
    assert m.write_done(1.62, "conflict", "ok") == []
    assert m.poll(1.61 + DEBOUNCE) == [Render("conflict")]


# -- leaving a conflict, and links in error -----------------------------------------------------


def written(m, now, env, sig):
    """The document changed to `env` and the link wrote it: -> the bytes now in the file."""
    m.doc_changed(now)
    render_and_write(m, now + MAX_DELAY, env, sig)
    return json.dumps(env).encode()


def test_restoring_exactly_what_the_daemon_wrote_ends_a_conflict():
    """`cp NAME.peerdaemon-conflict.json NAME.json` after an invalid save: the content is what
    the daemon last wrote to the file, yet it is the user's change and brings the link back."""
    m = started()
    env2 = {**ENV, "name": "B"}
    content = written(m, 1.0, env2, (7, 7, 7))
    m.observed(2.0, invalid(b'{"uuid": "e1", "name": ', (8, 8, 8)))
    assert types(m.poll(2.0 + SETTLE)) == ["Emit:mirror-conflict", "Render"]
    m.rendered(2.6, "conflict", content, json_hash(env2))
    m.write_done(2.6, "conflict", "ok")
    acts = m.observed(3.0, Observation("file", (9, 9, 9), content, json_hash(env2)))
    assert types(acts) == ["Emit:mirror-resumed", "Apply"]
    assert m.state != "conflict" and m.reason is None
    m.applied(3.0, content)
    m.doc_changed(4.0)  # later edits go to the file again, not to the conflict file
    assert m.poll(4.0 + DEBOUNCE) == [Render("file")]


def test_restoring_what_the_daemon_wrote_while_an_invalid_save_settles_is_no_conflict():
    m = started()
    content = written(m, 1.0, {**ENV, "name": "B"}, (7, 7, 7))
    m.observed(2.0, invalid(b"", (8, 8, 8)))  # an editor truncates, then writes
    m.observed(2.1, Observation("file", (9, 9, 9), content, json_hash({**ENV, "name": "B"})))
    assert m.poll(2.0 + SETTLE) == [] and m.state != "conflict"


def test_undoing_a_save_back_to_what_the_daemon_wrote_is_applied():
    m = started()
    env2 = {**ENV, "name": "B"}
    content = written(m, 1.0, env2, (7, 7, 7))
    assert types(m.observed(2.0, obs_for({**ENV, "name": "C"}, sig=(8, 8, 8)))) == ["Apply"]
    m.applied(2.0, json.dumps({**ENV, "name": "C"}).encode())
    acts = m.observed(3.0, Observation("file", (9, 9, 9), content, json_hash(env2)))
    assert acts == [Apply(content)]


def test_a_conflict_says_why_in_env_links():
    m = started()
    m.observed(1.0, invalid(b"{ half", (2, 2, 2)))
    assert m.reason is None  # not settled yet: not a conflict
    m.poll(1.0 + SETTLE)
    assert m.state == "conflict"
    assert m.reason is not None and "/d/env.json cannot be applied (malformed JSON)" in m.reason
    m.observed(2.0, Observation("file", (3, 3, 3), b"[]", None, "not an object"))
    assert "(not an object)" in m.reason  # the latest reason


def test_a_document_that_cannot_be_rendered_is_the_links_error_until_it_can():
    """The shell could not render (an export that raises, a bug): the link is in error with the
    reason, retries with backoff, never writes, and resumes once a render succeeds."""
    m = started()
    m.doc_changed(1.0)
    assert m.poll(1.0 + DEBOUNCE) == [Render("file")]
    acts = m.failed(1.1, "the environment cannot be written: ValueError: boom")
    assert types(acts) == ["Emit:mirror-error"]
    assert m.state == "error" and m.reason.endswith("boom")
    assert m.deadline() == pytest.approx(1.1 + BACKOFF_MIN)
    assert m.poll(1.2) == []
    assert m.poll(1.1 + BACKOFF_MIN) == [Render("file")]
    assert m.failed(1.7, "the environment cannot be written: ValueError: boom") == []
    assert m.deadline() == pytest.approx(1.7 + 2 * BACKOFF_MIN)
    assert m.poll(1.7 + 2 * BACKOFF_MIN) == [Render("file")]
    # the document is readable again and the file already says it: nothing to write, resumed
    acts = m.rendered(3.0, "file", json.dumps(ENV).encode(), json_hash(ENV))
    assert types(acts) == ["Emit:mirror-resumed"]
    assert m.state == "ok" and m.reason is None


def test_a_failure_while_a_write_was_outstanding_reads_the_file_then_writes_again():
    """Whether the write happened is not known: the file is read (and applied, a three-way
    merge) before the document is rendered and written again."""
    m = started()
    m.doc_changed(1.0)
    m.poll(1.0 + DEBOUNCE)
    m.rendered(1.1, "file", b"x", "j")  # a Write is outstanding
    assert m.in_flight
    m.failed(1.2, "internal error: RuntimeError: bug")
    assert not m.in_flight and m.rendering is None and m.want_observe
    assert m.poll(5.0) == []  # nothing before the file is read
    o = obs_for(ENV, sig=(1, 1, 1))
    assert m.observed(5.0, o) == [Apply(o.content)]
    assert types(m.applied(5.0, o.content)) == ["InSync", "Emit:mirror-resumed", "Render"]
