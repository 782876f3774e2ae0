"""The status page in a real headless Chromium (Debian's `chromium`, driven by Playwright; no
browser download): it loads and fills its panels, shows a LAN peer connecting and a peer's edit
arriving live, its actions work (a mock started, its URL copied, stopped; an environment shared
and unshared; an invite copied), a linked file's conflict is shown with its conflict file, and
a page on another origin or a rebound DNS name gets nothing.

The daemons run in a trio run of their own, in a thread (`Daemons`), while the test drives the
browser with Playwright's blocking API. PEERDAEMON_SCREENSHOTS=1 saves the panels to
docs/status-page/*.png.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from chromium import CHROMIUM, chromium_args
from daemonutil import (
    Dev,
    base_fixture,  # noqa: F401  (fixture)
    converged,
)
from helpers import LOCAL, free_port, until_sync
from mockutil import request, require_runner, small_env

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

# a DNS rebinding attacker's name, resolved to this machine (the Host check must refuse it)
CHROMIUM_ARGS = chromium_args(maps={"rebind.test": "127.0.0.1"})
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "status-page"
WAIT_MS = 15_000


def screenshot(target: Any, name: str) -> None:
    if os.environ.get("PEERDAEMON_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        target.screenshot(path=str(SHOTS / f"{name}.png"), animations="disabled")


class PageDev(Dev):
    """A LAN test daemon (`Dev`) with its status page on a free loopback port (or none)."""

    def __init__(self, base: Path, name: str, *, status: bool = True) -> None:
        super().__init__(base, name)
        self.status = status

    def config_extra(self) -> dict[str, Any]:
        return {"status": self.status, "status_listen": (LOCAL, 0)}

    @property
    def url(self) -> str:
        return self.daemon.status.url


class Daemons:
    """Whole daemons in a trio run of their own, in a thread: the test's thread blocks in the
    browser meanwhile, and calls into the daemons with `call`."""

    def __init__(self) -> None:
        self._token: Any = None
        self._nursery: trio.Nursery | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="daemons", daemon=True)
        self.devs: list[PageDev] = []

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._ready.set()
                await trio.sleep_forever()

        try:
            trio.run(main)
        except BaseException as exc:  # reported by `close`
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> Daemons:
        self._thread.start()
        self._ready.wait(30)
        assert self._nursery is not None, self._error
        return self

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return trio.from_thread.run(partial(fn, *args, **kwargs), trio_token=self._token)

    def start(self, dev: PageDev, *peers: Dev) -> PageDev:
        self.devs.append(dev)
        return self.call(dev.start, self._nursery, *peers)

    def __exit__(self, *exc: object) -> None:
        for dev in self.devs:
            if dev.running:
                self.call(dev.stop)
        assert self._nursery is not None
        trio.from_thread.run_sync(self._nursery.cancel_scope.cancel, trio_token=self._token)
        self._thread.join(30)
        if self._error is not None and not isinstance(self._error, trio.Cancelled):
            raise self._error


@pytest.fixture(name="daemons")
def daemons_fixture(base: Path) -> Iterator[Daemons]:  # the daemons stop before `base` goes
    with Daemons() as daemons:
        yield daemons


@pytest.fixture(name="browser", scope="module")
def browser_fixture() -> Iterator[Any]:
    """One headless Chromium for the module (a persistent context: its profile in a temp dir)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is not installed: apt-get install -y chromium (.ci/run does)")
    profile = tempfile.mkdtemp(prefix="pd-chromium-")
    try:
        with playwright_api.sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1360, "height": 900},
                color_scheme="light",
            )
            context.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(name="page")
def page_fixture(browser: Any) -> Iterator[Any]:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.close()
    assert not errors, f"the page's script failed: {errors}"


def open_page(page: Any, dev: PageDev) -> None:
    page.goto(dev.url)
    expect(page.locator("body")).to_have_attribute("data-ready", "1")
    expect(page.locator("#live")).to_have_attribute("data-state", "live")


def env_card(page: Any, env_id: str) -> Any:
    return page.locator(f'article.env[data-env="{env_id}"]')


# -- live ---------------------------------------------------------------------------------------


def test_a_peer_connecting_and_an_edit_arriving_live(daemons, base, page):
    a = daemons.start(PageDev(base, "alpha"))
    space = daemons.call(a.op, "space.create", name="Team")["id"]
    env_id = daemons.call(a.import_env, name="Orders API")
    daemons.call(a.op, "env.share", id=env_id, space=space)

    open_page(page, a)
    expect(page.locator("#device-name")).to_have_text("alpha")
    expect(page.locator("#device-id")).to_have_text(a.device)
    expect(env_card(page, env_id).locator(".env-name")).to_have_text("Orders API")
    expect(env_card(page, env_id).locator(".space-name")).to_have_text("Team")
    expect(page.locator("#peers-empty")).to_be_visible()

    # a second daemon on the LAN joins the space: the page shows it connecting, live
    b = daemons.start(PageDev(base, "beta", status=False), a)
    code = daemons.call(a.op, "space.invite", space=space)["code"]
    daemons.call(b.op, "space.join", code=code)
    row = page.locator(f'.peer-row[data-device="{b.device}"]')
    expect(row).to_have_attribute("data-state", "connected")
    expect(row).to_contain_text("beta")
    expect(page.locator(f'#space-list li[data-device="{b.device}"]')).to_contain_text("connected")
    expect(page.locator('#event-list li[data-type="peer-connected"]').first).to_be_visible()

    # beta edits the environment: the edit reaches the page through alpha, live
    daemons.call(converged, [a, b], env_id)
    daemons.call(b.patch, env_id, {"op": "replace", "path": "/name", "value": "Orders API v2"})
    expect(env_card(page, env_id).locator(".env-name")).to_have_text("Orders API v2")
    changed = page.locator('#event-list li[data-type="environment-changed"]').first
    expect(changed).to_contain_text("from peer")

    screenshot(page, "overview")
    screenshot(page.locator("#peers-panel"), "peers")
    screenshot(page.locator("#spaces-panel"), "spaces")
    screenshot(page.locator("#events-panel"), "events")

    # the peer goes away: the row says so, with the reason
    daemons.call(b.stop)
    expect(row).to_have_attribute("data-state", "disconnected")


# -- actions ------------------------------------------------------------------------------------


def test_start_copy_and_stop_a_mock_share_unshare_and_invite(daemons, base, page, monkeypatch):
    require_runner(monkeypatch)
    a = daemons.start(PageDev(base, "alpha"))
    port = free_port()
    env = small_env(name="Served", port=port)
    env_id = daemons.call(a.client.import_env, env)["id"]
    space = daemons.call(a.op, "space.create", name="Team")["id"]
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=a.url[:-1])

    open_page(page, a)
    card = env_card(page, env_id)
    expect(card.locator(".env-name")).to_have_text("Served")

    # start the mock from the page: it serves, and its URL is shown and copied
    card.locator('button[data-action="mock-start"]').click()
    url = f"http://127.0.0.1:{port}/"
    expect(card.locator(".mock-url")).to_have_text(url)
    expect(card.locator(".badge.running").first).to_be_visible()
    status, _, body = request(port, "/hello")
    assert (status, body) == (200, b"hello v1")
    card.locator('button[data-action="copy-url"]').click()
    expect(page.locator("#toast")).to_have_text("Mock URL copied")
    assert page.evaluate("navigator.clipboard.readText()") == url
    assert daemons.call(a.op, "mock.list")[0]["state"] == "running"

    # share it into the space, then make it local again
    card.locator('button[data-action="share"]').click()
    expect(card.locator(".space-name")).to_have_text("Team")
    assert daemons.call(a.op, "space.list")[0]["environments"][0]["id"] == env_id
    screenshot(page.locator("#envs-panel"), "environments")
    card.locator('button[data-action="unshare"]').click()
    expect(card.locator('button[data-action="share"]')).to_be_visible()
    assert daemons.call(a.op, "space.list")[0]["environments"] == []

    # stop the mock
    card.locator('button[data-action="mock-stop"]').click()
    expect(card.locator('button[data-action="mock-start"]')).to_be_visible()
    assert daemons.call(a.op, "mock.list") == []

    # an invite code, copied
    page.locator(f'[data-space="{space}"] button[data-action="invite"]').click()
    code = page.locator(f'[data-space="{space}"] .invite-code')
    expect(code).to_be_visible()
    assert code.input_value().startswith("pd1-")
    assert page.evaluate("navigator.clipboard.readText()") == code.input_value()


def test_a_linked_files_conflict_is_shown_with_its_conflict_file(daemons, base, page, tmp_path):
    a = daemons.start(PageDev(base, "alpha"))
    env_id = daemons.call(a.import_env, name="Linked")
    path = tmp_path / "linked.json"
    link = daemons.call(a.op, "env.link", id=env_id, path=str(path))
    open_page(page, a)
    card = env_card(page, env_id)
    expect(card).to_contain_text(str(path))
    expect(card.locator(".conflict-note")).to_have_count(0)

    path.write_text('{"uuid": "' + env_id + '", "name": "half-typed', encoding="utf-8")
    conflict = card.locator(".conflict-note")
    expect(conflict).to_contain_text(link["conflict_path"])
    expect(conflict).to_contain_text("no resolve button")
    expect(card.locator(".badge.conflict").first).to_be_visible()
    screenshot(card, "conflict")

    # fixed by copying the conflict file over it, as the page says: the conflict goes
    shutil.copyfile(link["conflict_path"], path)
    expect(card.locator(".conflict-note")).to_have_count(0)


# -- what another origin gets -------------------------------------------------------------------


def test_another_origin_and_a_rebound_name_get_nothing(daemons, base, page):
    a = daemons.start(PageDev(base, "alpha"))
    env_id = daemons.call(a.import_env, name="Target")
    port = a.daemon.status.port

    # DNS rebinding: rebind.test resolves to 127.0.0.1; the Host check refuses the page
    response = page.goto(f"http://rebind.test:{port}/")
    assert response is not None and response.status == 403
    assert "api-key" not in page.content()

    # a page on another origin tries a simple POST (no preflight) and a JSON one, without the key
    page.route(
        "http://attacker.test/",
        lambda route: route.fulfill(content_type="text/html", body="<p>attacker</p>"),
    )
    page.goto("http://attacker.test/")
    outcome = page.evaluate(
        """async ([base, id]) => {
            const out = [];
            for (const [type, body] of [["text/plain", JSON.stringify({id})],
                                        ["application/json", JSON.stringify({id})]]) {
                try {
                    const r = await fetch(base + "/api/mocks/start", {method: "POST",
                        headers: {"Content-Type": type}, body, mode: "no-cors"});
                    out.push(r.type);
                } catch (e) { out.push("blocked"); }
            }
            try {
                const r = await fetch(base + "/api/overview");
                out.push(await r.text());
            } catch (e) { out.push("blocked"); }
            return out;
        }""",
        [f"http://127.0.0.1:{port}", env_id],
    )
    assert len(outcome) == 3 and env_id not in outcome[2], outcome
    assert daemons.call(a.op, "mock.list") == []  # nothing was started

    # the same page opened as itself works, also by the name localhost
    page.goto(f"http://localhost:{port}/")
    expect(page.locator("body")).to_have_attribute("data-ready", "1")
    expect(env_card(page, env_id).locator(".env-name")).to_have_text("Target")


def test_a_page_without_the_key_asks_for_it(daemons, base, page):
    """Off loopback the page carries no key: it asks (or takes `#key=` from the address)."""
    a = daemons.start(PageDev(base, "alpha"))
    port = a.daemon.status.port
    a.daemon.status.app.check_user = lambda client, server: 4242  # as if another user's
    response = page.goto(f"http://127.0.0.1:{port}/")
    assert response is not None and response.status == 403
    assert a.daemon.status.key not in page.content()
    a.daemon.status.app.check_user = lambda client, server: False  # a client we cannot place
    page.goto(f"http://127.0.0.1:{port}/")
    expect(page.locator("#key-form")).to_be_visible()
    page.fill("#key-input", "wrong-key-wrong-key")
    page.click("#key-form button")
    expect(page.locator("#key-error")).to_contain_text("X-API-Key")
    page.fill("#key-input", a.daemon.status.key)
    page.click("#key-form button")
    expect(page.locator("body")).to_have_attribute("data-ready", "1")
    expect(page.locator("#device-name")).to_have_text("alpha")
    # `#key=` in the address works too, and leaves the address bar at once
    page2 = page.context.new_page()
    page2.goto(f"http://127.0.0.1:{port}/#key={a.daemon.status.key}")
    expect(page2.locator("body")).to_have_attribute("data-ready", "1")
    assert "#key" not in page2.url
    app = a.daemon.status.app
    until_sync(lambda: app.streams == 2, what="both pages following the events")
    page2.close()  # a closed page's stream ends on the daemon too
    until_sync(lambda: app.streams == 1, what="the closed page's stream to end")
