"""The hub's `/metrics`: the exposition format (version 0.0.4) the renderer writes, read back by
a strict parser written here from the format's description (not the module's own `parse`);
a running hub's figures after a y-websocket client connects, an update is relayed, a limit
refuses one and a Cloud Mock serves a request; who may scrape it (a token, else loopback only);
its config keys; and `hub status` beside a running hub."""

from __future__ import annotations

import json
import math
import secrets
import time

import pytest
import trio
from helpers import SPACE, client, running_hub, setup_accounts, until
from mockutil import request, require_runner, small_env
from trio_websocket import ConnectionClosed

import peerdaemon.hub.http as hub_http
from peerdaemon.cli import main as cli_main
from peerdaemon.hub import metrics
from peerdaemon.hub.accounts import Accounts
from peerdaemon.hub.http import HttpConfig
from peerdaemon.hub.metrics import EventCounts, Family, Histogram, hub_families, render
from peerdaemon.hub.server import RUNTIME_NAME, ConfigError, build_config, hub_status
from peerdaemon.hub.transport import Request
from peerdaemon.model import import_environment
from peerdaemon.spaces import SpaceDoc

P = "peerdaemon_hub_"


# --------------------------------------------------------------- a strict exposition parser
def _unescape(text: str, *, quote: bool) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1]  # an IndexError is a malformed escape
            escapes = {"\\": "\\", "n": "\n", '"': '"'} if quote else {"\\": "\\", "n": "\n"}
            assert nxt in escapes, f"bad escape \\{nxt} in {text!r}"
            out.append(escapes[nxt])
            i += 2
        else:
            assert not (quote and c in '"\n'), f"unescaped {c!r} in a label value"
            out.append(c)
            i += 1
    return "".join(out)


def _labels(text: str) -> tuple[tuple[str, str], ...]:
    """`a="x",b="y"` (label values escaped) -> pairs, read character by character."""
    pairs, i = [], 0
    while i < len(text):
        eq = text.index("=", i)
        name = text[i:eq]
        assert name.isidentifier() and not name.startswith("__"), name
        assert text[eq + 1] == '"'
        j = eq + 2
        while text[j] != '"':
            j += 2 if text[j] == "\\" else 1
        pairs.append((name, _unescape(text[eq + 2 : j], quote=True)))
        i = j + 1
        if i < len(text):
            assert text[i] == ",", text
            i += 1
    assert len({n for n, _ in pairs}) == len(pairs), "a label twice"
    return tuple(sorted(pairs))  # (the order of labels carries no meaning)


def _value(text: str) -> float:
    special = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    return special[text] if text in special else float(text)


def parse_exposition(text: str) -> dict[str, dict]:
    """name -> {"help", "type", "samples": {(sample name, label pairs): value}}; asserts the
    rules: every family has HELP then TYPE before its samples, once; samples belong to the
    family just described (a histogram's `_bucket`, `_sum`, `_count`); the text ends with a
    line feed."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    current: str | None = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP ") :].partition(" ")
            assert name not in families, f"{name} described twice"
            families[name] = {"help": _unescape(help_text, quote=False), "type": None}
            families[name]["samples"] = {}
            current = name
        elif line.startswith("# TYPE "):
            name, kind = line[len("# TYPE ") :].split(" ")
            assert name == current and families[name]["type"] is None
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            families[name]["type"] = kind
        else:
            assert not line.startswith("#") and line, f"unexpected line {line!r}"
            assert current is not None and families[current]["type"] is not None
            head, _, value = line.rpartition(" ")
            if "{" in head:
                name, _, rest = head.partition("{")
                assert rest.endswith("}")
                labels = _labels(rest[:-1])
            else:
                name, labels = head, ()
            family = families[current]
            if family["type"] == "histogram":
                assert name in (current + "_bucket", current + "_sum", current + "_count")
            else:
                assert name == current, f"{name} under {current}"
            key = (name, labels)
            assert key not in family["samples"], f"{key} twice"
            family["samples"][key] = _value(value)
    for name, family in families.items():
        if family["type"] == "histogram":
            check_histogram(name, family["samples"])
    return families


def check_histogram(name: str, samples: dict) -> None:
    """Buckets increase with `le` and never decrease; `+Inf` is the count."""
    buckets = sorted(
        (_value(dict(labels)["le"]), value)
        for (sample, labels), value in samples.items()
        if sample == name + "_bucket"
    )
    assert buckets and buckets[-1][0] == math.inf
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)
    assert buckets[-1][1] == samples[(name + "_count", ())]
    assert (name + "_sum", ()) in samples


def value_of(families: dict, name: str, **labels: str) -> float:
    """A sample's value (a histogram's `_count`, `_sum` or `_bucket` too)."""
    family = families.get(name) or families[name.rsplit("_", 1)[0]]
    return family["samples"][(name, tuple(sorted(labels.items())))]


# --------------------------------------------------------------------------- the renderer
def test_renders_help_type_and_samples_of_each_kind():
    text = render(
        [
            Family("demo_total", "counter", "Things done.", [({}, 3)]),
            Family(
                "demo_open",
                "gauge",
                "Open things, by kind.",
                metrics.by_label("kind", {"b": 2, "a": 1.5}),
            ),
            Family(
                "demo_seconds",
                "histogram",
                "Durations.",
                [({}, Histogram((0.1, 1.0), [2, 1, 4], 7, 9.25))],
            ),
        ]
    )
    assert text == (
        "# HELP demo_total Things done.\n"
        "# TYPE demo_total counter\n"
        "demo_total 3\n"
        "# HELP demo_open Open things, by kind.\n"
        "# TYPE demo_open gauge\n"
        'demo_open{kind="a"} 1.5\n'
        'demo_open{kind="b"} 2\n'
        "# HELP demo_seconds Durations.\n"
        "# TYPE demo_seconds histogram\n"
        'demo_seconds_bucket{le="0.1"} 2\n'
        'demo_seconds_bucket{le="1.0"} 3\n'
        'demo_seconds_bucket{le="+Inf"} 7\n'
        "demo_seconds_sum 9.25\n"
        "demo_seconds_count 7\n"
    )
    families = parse_exposition(text)
    assert families["demo_seconds"]["type"] == "histogram"
    assert value_of(families, "demo_open", kind="a") == 1.5
    assert render([]) == ""


def test_label_values_and_help_are_escaped_and_read_back():
    awkward = 'back\\slash "quoted"\nnew line, {braces}=, unicode é'
    text = render(
        [
            Family(
                "x_total",
                "counter",
                "Help with \\ and\na line feed.",
                [({"reason": awkward, "b": ""}, 1)],
            ),
            Family(
                "special",
                "gauge",
                "Non-finite.",
                [({"v": "inf"}, math.inf), ({"v": "nan"}, math.nan), ({"v": "neg"}, -math.inf)],
            ),
        ]
    )
    assert '\\"quoted\\"' in text and "\\\\slash" in text and "\\nnew line" in text
    assert "# HELP x_total Help with \\\\ and\\na line feed.\n" in text
    assert text.count("\n") == 8  # nothing broke a line
    families = parse_exposition(text)
    assert families["x_total"]["help"] == "Help with \\ and\na line feed."
    assert value_of(families, "x_total", reason=awkward, b="") == 1
    assert value_of(families, "special", v="inf") == math.inf
    assert math.isnan(value_of(families, "special", v="nan"))
    # the module's own reader (`hub status` uses it) agrees
    parsed = metrics.parse(text)
    assert parsed[("x_total", (("b", ""), ("reason", awkward)))] == 1
    assert parsed[("special", (("v", "neg"),))] == -math.inf


def test_bad_names_kinds_and_values_are_refused():
    for family in (
        Family("bad-name", "gauge", "", [({}, 1)]),
        Family("ok", "summary", "", [({}, 1)]),
        Family("ok", "gauge", "", [({"bad-label": "x"}, 1)]),
        Family("ok", "gauge", "", [({"__reserved": "x"}, 1)]),
        Family("ok", "gauge", "", [({}, Histogram((1.0,), [1], 1, 1.0))]),
        Family("ok", "histogram", "", [({}, 1)]),
        Family("ok", "histogram", "", [({"le": "1"}, Histogram((1.0,), [1], 1, 1.0))]),
        Family("ok", "histogram", "", [({}, Histogram((1.0, 2.0), [1], 1, 1.0))]),
    ):
        with pytest.raises(ValueError):
            render([family])
    with pytest.raises(ValueError):
        render([Family("twice", "gauge", "", []), Family("twice", "gauge", "", [])])


def test_the_hubs_families_are_named_described_and_typed():
    snapshot = {
        "version": "1.2.3",
        "start_time": 1700000000.5,
        "connections": {"yjs": 2, "peer": 1, "mock": 0},
        "half_open": 3,
        "busy_refusals": 4,
        "rooms": 2,
        "spaces": 1,
        "documents": 5,
        "documents_loaded": 2,
        "documents_evicted": 3,
        "stored_bytes": 1234,
        "relay_queued": 0,
        "updates_relayed": 10,
        "relayed_bytes": 999,
        "store_commit": Histogram((0.001, 0.01), [1, 2, 1], 4, 0.05),
        "limit_refusals": {"quota-exceeded": 2},
        "mock_requests": 7,
        "hosted_mocks": {"running": 1},
    }
    families = parse_exposition(render(hub_families(snapshot)))
    for name, family in families.items():
        assert name.startswith(P) and family["help"] and family["samples"]
        assert (family["type"] == "counter") == name.endswith("_total"), name
    assert value_of(families, P + "info", version="1.2.3") == 1
    assert value_of(families, P + "connections", kind="peer") == 1
    assert value_of(families, P + "limit_refusals_total", reason="quota-exceeded") == 2
    assert value_of(families, P + "limit_refusals_total", reason="environment-too-large") == 0
    assert value_of(families, P + "hosted_mocks", state="running") == 1
    assert value_of(families, P + "hosted_mocks", state="error") == 0
    assert value_of(families, P + "documents_loaded") == 2
    assert value_of(families, P + "documents_evicted_total") == 3
    commits = families[P + "store_commit_seconds"]["samples"]
    assert commits[(P + "store_commit_seconds_bucket", (("le", "0.01"),))] == 3
    assert commits[(P + "store_commit_seconds_count", ())] == 4
    assert hub_families({}) == []  # only what the snapshot holds


def test_event_counts_count_one_type_by_one_field():
    counts = EventCounts("limit-exceeded", "reason")
    counts({"type": "limit-exceeded", "data": {"reason": "quota-exceeded"}})
    counts({"type": "limit-exceeded", "data": {"reason": "quota-exceeded"}})
    counts({"type": "hub-doc-created", "data": {"reason": "nope"}})
    assert counts.counts == {"quota-exceeded": 2}


# ----------------------------------------------------------------------- a running hub
async def scrape(port: int, token: str | None = None, path: str = "/metrics", method: str = "GET"):
    """(status, lower-case headers, body) of one request on its own connection."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    data = b""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    pairs = (line.split(": ", 1) for line in lines[1:])
    headers = {name.lower(): value for name, value in pairs}
    return int(lines[0].split(" ")[1]), headers, body


async def families_of(server, token: str | None = None) -> dict:
    status, headers, body = await scrape(server.port, token)
    assert status == 200, body
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse_exposition(body.decode("utf-8"))


async def test_a_running_hub_counts_clients_updates_and_refusals(tmp_path):
    tokens = setup_accounts(tmp_path, "alice")
    with Accounts.open(tmp_path) as accounts:
        accounts.set_limit("envs_per_space", 1, "alice")
        accounts.set_limit("devices_per_user", 10, "alice")
    async with running_hub(tmp_path) as server:
        before = await families_of(server)
        assert value_of(before, P + "connections", kind="yjs") == 0
        assert value_of(before, P + "half_open_connections") == 0  # the scrape is not counted
        assert value_of(before, P + "updates_relayed_total") == 0
        async with client(server, SPACE, "env-1", tokens["alice"]) as alice:
            now = await families_of(server)
            assert value_of(now, P + "connections", kind="yjs") == 1
            assert value_of(now, P + "rooms") == 1
            await alice.edit("key", "value")
            relayed = await until(lambda: server.docs.relayed, what="the update relayed")
            now = await families_of(server)
            assert value_of(now, P + "updates_relayed_total") == relayed >= 1
            assert value_of(now, P + "relayed_bytes_total") > 0
            assert value_of(now, P + "documents") == value_of(now, P + "documents_loaded") == 1
            stored = value_of(now, P + "stored_bytes")
            assert stored == server.docs.size(SPACE, "env-1") > 0
            assert value_of(now, P + "store_commit_seconds_count") >= 1

            async with client(server, SPACE, "env-2", tokens["alice"]) as over:
                await over.edit("second", 2)  # a second environment: quota-exceeded
                with pytest.raises(ConnectionClosed):
                    with trio.fail_after(5):
                        while True:
                            await over.recv()
            now = await families_of(server)
            assert value_of(now, P + "limit_refusals_total", reason="quota-exceeded") == 1
            assert value_of(now, P + "limit_refusals_total", reason="environment-too-large") == 0
            assert value_of(now, P + "documents") == 1
            assert value_of(now, P + "stored_bytes") == stored
        await until(lambda: server.rooms.clients == 0, what="the client gone")
        after = await families_of(server)
        assert value_of(after, P + "connections", kind="yjs") == 0
        assert value_of(after, P + "rooms") == 0
        await server.docs.wait_durable(SPACE, "env-1")
        with trio.fail_after(5):
            while server.docs.sweep() == 0:  # two idle checkpoints: out of memory, still stored
                await trio.sleep(0.01)
        after = await families_of(server)
        assert value_of(after, P + "documents_loaded") == 0
        assert (
            value_of(after, P + "documents") == value_of(after, P + "documents_evicted_total") == 1
        )
        start = value_of(after, P + "start_time_seconds")
        assert start == server.http.started
        status, headers, body = await scrape(server.port, method="HEAD")  # the head alone
        assert (status, body) == (200, b"") and int(headers["content-length"]) > 0
        assert (await scrape(server.port, method="POST"))[0] == 404


async def test_the_token_guards_metrics_and_loopback_is_the_rule_without_one(tmp_path, monkeypatch):
    token = secrets.token_urlsafe(24)
    async with running_hub(tmp_path, http=HttpConfig(metrics_token=token)) as server:
        for given in (None, "wrong", token + "x", token[:-1]):
            status, headers, body = await scrape(server.port, given)
            assert status == 401 and headers["www-authenticate"].startswith("Bearer")
            assert json.loads(body)["error"] == "unauthorized"
        await families_of(server, token)
        # the scheme is case-insensitive, as HTTP says
        raw = await raw_get(server.port, f"Authorization: bearer {token}\r\n")
        assert raw.startswith(b"HTTP/1.1 200 ")
        # with a token, an address elsewhere is served too
        with monkeypatch.context() as patch:
            patch.setattr(hub_http, "remote_address", lambda stream: ("192.0.2.7", 4000))
            await families_of(server, token)
            assert (await scrape(server.port))[0] == 401
            assert (await scrape(server.port, path="/health"))[0] == 200  # /health stays open

    async with running_hub(tmp_path / "open") as server:
        await families_of(server)  # loopback, no token needed (and one given is ignored)
        monkeypatch.setattr(hub_http, "remote_address", lambda stream: ("192.0.2.7", 4000))
        status, _, body = await scrape(server.port)
        assert status == 403 and json.loads(body)["error"] == "forbidden"
        assert (await scrape(server.port, "anything"))[0] == 403
        assert (await scrape(server.port, path="/health"))[0] == 200


async def raw_get(port: int, extra: str) -> bytes:
    data = b""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(f"GET /metrics HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


@pytest.mark.parametrize(
    ("host", "served"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("192.0.2.7", False),
        ("::ffff:10.0.0.1", False),
        ("2001:db8::1", False),
        ("not an address", False),
    ],
)
def test_which_addresses_are_loopback(host, served):
    class Fake:
        config = HttpConfig()
        metrics_refusal = hub_http.HubHttp.metrics_refusal

    get = Request("GET", "/metrics", {}, {})
    refusal = Fake().metrics_refusal(get, (host, 1))
    assert (refusal is None) == served
    assert Fake().metrics_refusal(get, None) is not None  # an unknown address is not loopback


# ----------------------------------------------------------------------- a Cloud Mock
ME = "TESTDEV"


async def test_mock_requests_and_hosted_mocks_by_state(tmp_path, monkeypatch):
    require_runner(monkeypatch)
    setup_accounts(tmp_path, "alice")
    async with running_hub(tmp_path) as server:
        space_doc = SpaceDoc()
        space_doc.init("Team", ME, "test")
        env = small_env()
        env_id = env["uuid"]
        doc, _, _ = import_environment(env, env_id)
        server.docs.apply(SPACE, env_id, doc.get_update(), "test")
        space_doc.set_state(env_id, "shared", ME)
        space_doc.set_mock(env_id, True, "public", secrets.token_urlsafe(24), ME)
        server.docs.apply(SPACE, "space:" + SPACE, space_doc.doc.get_update(), "test")

        path = f"/mock/{SPACE}/{env_id}/hello"

        async def served() -> bool:
            status, _, body = await trio.to_thread.run_sync(lambda: request(server.port, path))
            return status == 200 and body == b"hello v1"

        await until(served, what="the Cloud Mock serving")
        families = await until(lambda: _mocks_counted(server), what="the mock request in /metrics")
        assert value_of(families, P + "hosted_mocks", state="running") == 1
        assert value_of(families, P + "hosted_mocks", state="starting") == 0
        assert value_of(families, P + "connections", kind="mock") == 0  # the request is over
        assert value_of(families, P + "mock_requests_total") == server.mocks.requests >= 1


async def _mocks_counted(server) -> dict | None:
    families = await families_of(server)
    return families if value_of(families, P + "mock_requests_total") >= 1 else None


# ----------------------------------------------------------------------- config, status
def test_metrics_and_log_keys_in_the_config_file(tmp_path):
    path = tmp_path / "hub.toml"
    path.write_text(
        '[metrics]\ntoken = "s3cret-Token_1"\n[log]\nlevel = "DEBUG"\nformat = "json"\n'
    )
    config = build_config(config_file=path)
    assert config.http.metrics_token == "s3cret-Token_1"
    assert (config.log_level, config.log_format) == ("debug", "json")
    assert build_config(environ={}).http.metrics_token is None
    assert (build_config(environ={}).log_level, build_config(environ={}).log_format) == (
        "info",
        "text",
    )
    for bad in (
        '[metrics]\ntoken = "has space"\n',
        "[metrics]\ntoken = 12\n",
        '[log]\nlevel = "loud"\n',
        '[log]\nformat = "xml"\n',
    ):
        path.write_text(bad)
        with pytest.raises(ConfigError, match=f"^{path}:2: "):
            build_config(config_file=path)
    for unknown in ('[metrics]\nuser = "x"\n', '[log]\ncolour = "yes"\n'):  # warned about
        path.write_text(unknown)
        (warning,) = build_config(config_file=path).warnings
        assert warning.startswith(f"{path}:2: unknown key")


async def test_hub_status_reports_what_a_running_hub_answers(tmp_path, capsys):
    tokens = setup_accounts(tmp_path, "alice", "bob")
    with Accounts.open(tmp_path) as accounts:
        accounts.add_member(SPACE, "bob")
    token = secrets.token_urlsafe(16)
    config = tmp_path / "hub.toml"
    config.write_text(f'[metrics]\ntoken = "{token}"\n')
    async with running_hub(tmp_path, http=HttpConfig(metrics_token=token)) as server:
        assert json.loads((tmp_path / RUNTIME_NAME).read_text())["port"] == server.port
        async with client(server, SPACE, "env-1", tokens["alice"]) as alice:
            await alice.edit("key", "value")
            await until(lambda: server.docs.relayed, what="relayed")
            # the relay does not wait for the disk, and `hub status` reads the store's file
            await server.docs.wait_durable(SPACE, "env-1")
            status = await trio.to_thread.run_sync(
                lambda: hub_status(tmp_path, metrics_token=token)
            )
            assert status["running"] and status["address"] == f"ws://127.0.0.1:{server.port}"
            assert status["hub_key"] and status["users"] == 2
            team = next(sp for sp in status["spaces"] if sp["id"] == SPACE)
            assert (team["owner"], team["members"], team["documents"]) == ("alice", ["bob"], 1)
            assert team["stored_bytes"] == status["stored_bytes"] > 0
            live = status["live"]
            assert live["health"]["status"] == "ok"
            assert live["metrics"]["connections"]["yjs"] == 1
            assert live["metrics"]["updates_relayed_total"] >= 1
            # without the token, the health only, and why
            status = await trio.to_thread.run_sync(lambda: hub_status(tmp_path))
            assert "metrics" not in status["live"] and "401" in status["live"]["metrics_error"]
            # the command, text and JSON (its config file gives it the token)
            argv = ["hub", "status", "--data-dir", str(tmp_path), "--config", str(config)]
            assert await trio.to_thread.run_sync(cli_main, argv) == 0
            text = capsys.readouterr().out
            assert "running: yes" in text and "connections: 1 y-websocket" in text
            assert "users: 2" in text and "documents: 1," in text
            assert await trio.to_thread.run_sync(cli_main, [*argv, "--json"]) == 0
            assert json.loads(capsys.readouterr().out)["live"]["metrics"]["rooms"] == 1
    assert not (tmp_path / RUNTIME_NAME).exists()  # removed at the hub's end
    status = hub_status(tmp_path)
    assert not status["running"] and "live" not in status and status["documents"] == 1


def test_hub_status_of_a_dir_no_hub_ran_on(tmp_path):
    status = hub_status(tmp_path / "new")
    assert status["running"] is False and status["hub_key"]
    assert (status["users"], status["spaces"], status["documents"]) == (0, [], 0)
    assert status["stored_bytes"] == 0


def test_store_commit_times_fill_the_buckets():
    from peerdaemon.store.sqlite import CommitTimes

    times = CommitTimes()
    for seconds in (0.0005, 0.001, 0.003, 20.0):
        times.observe(seconds)
    assert times.count == 4 and times.counts[0] == 2 and times.counts[-1] == 1
    assert sum(times.counts) == 4
    families = parse_exposition(
        render(
            [
                Family(
                    "t",
                    "histogram",
                    "t",
                    [({}, Histogram(times.bounds, times.counts, times.count, times.sum))],
                )
            ]
        )
    )
    assert families["t"]["samples"][("t_bucket", (("le", "10.0"),))] == 3
    assert families["t"]["samples"][("t_bucket", (("le", "+Inf"),))] == 4


async def test_the_hub_dates_its_answers_so_doctor_can_read_its_clock(tmp_path):
    from email.utils import parsedate_to_datetime

    from peerdaemon.cli.doctor import hub_clock

    async with running_hub(tmp_path) as server:
        status, headers, _ = await scrape(server.port, path="/health")
        assert status == 200
        assert abs(parsedate_to_datetime(headers["date"]).timestamp() - time.time()) < 3
        skew, seen = await trio.to_thread.run_sync(hub_clock, f"http://127.0.0.1:{server.port}")
        assert skew is not None and abs(skew) < 3, seen
