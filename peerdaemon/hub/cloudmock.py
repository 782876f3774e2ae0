"""The Cloud Mock, loaded on first use (issue 13: the hub's idle memory).

A hub that hosts no mock does not keep the Cloud Mock's machinery in memory: `HostedMocks`
(mocks.py), `MockProxy` (mockproxy.py, mockgate.py), the mock runner's supervisor and, behind
it, the device's registry and the document model. `CloudMock` stands in for `HostedMocks` from
the start, as one that hosts nothing, and loads it when a space document first turns a mock on
(found at start, or by its listener on HubDocs) or when the first `/mock/...` request arrives
(`MockDoor`, the port's side). From then on everything is `HostedMocks`' and `MockProxy`'s: the
load starts `HostedMocks.run`, whose first reconcile reads every space document, so a change
made while loading is not missed.

A cluster's process loads it at once (`eager`): it follows the documents of every hosted mock
of the cluster (`ClusterMocks.rooms`), which it would otherwise never hear of.

`MockConfig` (`[mock]` in the config file) is here so a hub's config does not load the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..core.events import EventLog
from ..spaces import SpaceDoc
from .accounts import Accounts
from .docs import SPACE_PREFIX, HubDocs, StoreUnavailable

if TYPE_CHECKING:
    from .mockproxy import MockProxy
    from .mocks import HostedMocks
    from .transport import HttpExchange, Request

__all__ = ["CloudMock", "MockConfig", "MockDoor", "MocksFactory"]

log = logging.getLogger("peerdaemon.hub.mocks")


@dataclass
class MockConfig:
    """`[mock]` in the hub's config file (docs/hub.md)."""

    enabled: bool = True
    max_hosted: int = 200  # Cloud Mocks on this hub in all
    allow_hosts: list[str] = field(default_factory=list)  # proxy and callback destinations
    request_timeout: float = 30.0  # a mock request not answered by then: 504
    max_in_flight: int = 32  # requests one Cloud Mock serves at once; more: 503
    max_connections: int = 1024  # mock connections open at once on the hub
    faker_seed: int | None = None  # faker.js repeatable (tests; as mockoon-cli --faker-seed)


MocksFactory = Callable[[HubDocs, "Accounts | None", EventLog, Path, MockConfig], "HostedMocks"]
"""`HostedMocks`, or a cluster's `ClusterNode.mocks_for`."""


class CloudMock:
    """`HostedMocks`, once loaded; before, one that hosts nothing. Its other attributes
    (`engine`, `shell`, ...) are the loaded one's."""

    def __init__(
        self,
        docs: HubDocs,
        accounts: Accounts | None,
        events: EventLog,
        data_dir: Path,
        config: MockConfig,
        *,
        tls: bool = False,
        factory: MocksFactory | None = None,
        eager: bool = False,
    ) -> None:
        self.docs = docs
        self.accounts = accounts
        self.events = events
        self.data_dir = data_dir
        self.config = config
        self.tls = tls
        self.factory = factory
        self.mocks: HostedMocks | None = None
        self.proxy: MockProxy | None = None
        self._nursery: trio.Nursery | None = None
        self._loading = False
        self._ready = trio.Event()  # set once loaded and running, or once loading failed
        self._listener: int | None = None  # on HubDocs, until loaded
        if eager:
            self._make()

    # -- reading: as a HostedMocks that hosts nothing, until loaded ------------------------------

    @property
    def loaded(self) -> bool:
        return self.mocks is not None

    @property
    def hosted(self) -> dict[str, Any]:
        return self.mocks.hosted if self.mocks is not None else {}

    @property
    def requests(self) -> int:
        return self.mocks.requests if self.mocks is not None else 0

    def lookup(self, space: str, env: str) -> Any:
        return self.mocks.lookup(space, env) if self.mocks is not None else None

    def describe(self) -> list[dict[str, Any]]:
        return self.mocks.describe() if self.mocks is not None else []

    async def wait_running(self, space: str, env: str, timeout: float) -> int | None:
        if self.mocks is None:
            return None
        return await self.mocks.wait_running(space, env, timeout)

    def __getattr__(self, name: str) -> Any:
        mocks = self.__dict__.get("mocks")
        if mocks is None:
            raise AttributeError(f"{name!r}: the Cloud Mock is not loaded (no mock hosted yet)")
        return getattr(mocks, name)

    # -- running ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the Cloud Mock once something asks for it (at once if a space hosts a mock)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.mocks is not None or any(map(self._hosts, self.docs.spaces())):
                    self._loading = True
                    await self._load()  # as the hub always did: a failure here stops the start
                else:
                    self._listener = self.docs.add_listener(self._on_change)
                task_status.started()
                await trio.sleep_forever()  # keeps the nursery open for a later load
        finally:
            self._nursery = None
            self._stop_listening()

    async def ready(self) -> MockProxy | None:
        """The loaded proxy, loading it first if need be (None: it cannot be loaded)."""
        if not self._ready.is_set():
            self._start_loading()
            if not self._loading:  # not running (yet, or any more)
                return None
            await self._ready.wait()
        return self.proxy

    def _hosts(self, space: str) -> bool:
        if not self.config.enabled:
            return False
        try:
            doc = self.docs.get_doc(space, SPACE_PREFIX + space)
        except StoreUnavailable:  # it may host some: load the mocks (memory, not correctness)
            return True
        return doc is not None and bool(SpaceDoc(doc).hosted())

    def _on_change(self, space: str, doc_id: str, update: bytes, origin: str) -> None:
        if doc_id == SPACE_PREFIX + space and not self._loading and self._hosts(space):
            self._start_loading()

    def _start_loading(self) -> None:
        if self._loading or self._nursery is None:
            return
        self._loading = True
        self._nursery.start_soon(self._load_later)

    async def _load_later(self) -> None:
        """A load after the start: a failure is the Cloud Mock's only, logged, and the next
        trigger tries again."""
        try:
            await self._load()
        except Exception as exc:
            log.exception("cloud mock: cannot start")
            self.events.emit("mock-error", id="", code="START", message=str(exc))
            self.mocks = self.proxy = None
            self._loading = False
            ready, self._ready = self._ready, trio.Event()
            ready.set()  # the requests waiting are answered (503)

    async def _load(self) -> None:
        mocks = self.mocks or self._make()
        assert self._nursery is not None
        await self._nursery.start(mocks.run)
        self._stop_listening()  # HostedMocks' own listener follows the space documents now
        self._ready.set()
        log.debug("cloud mock: loaded")

    def _stop_listening(self) -> None:
        if self._listener is not None:
            self.docs.remove_listener(self._listener)
            self._listener = None

    def _make(self) -> HostedMocks:
        # here, not at the top: a hub that hosts no mock does not keep these loaded
        from .mockproxy import MockProxy
        from .mocks import HostedMocks

        make = self.factory or HostedMocks
        mocks = make(self.docs, self.accounts, self.events, self.data_dir, self.config)
        self.proxy = MockProxy(mocks, tls=self.tls)
        self.mocks = mocks
        return mocks


class MockDoor:
    """`/mock/...` on the hub's port (`HubHttp.mocks`): the first request loads the Cloud Mock,
    then each goes to `MockProxy`, whose other attributes (`in_flight`, ...) are handed out."""

    def __init__(self, cloud: CloudMock) -> None:
        self.cloud = cloud

    @property
    def connections(self) -> int:
        proxy = self.cloud.proxy
        return proxy.connections if proxy is not None else 0

    async def handle(
        self,
        exchange: HttpExchange,
        request: Request,
        remote: tuple[str, int] | None,
        body_deadline: float,
        admitted: Callable[[], None],
    ) -> None:
        proxy = await self.cloud.ready()
        if proxy is None:
            message = "the Cloud Mock cannot start; see the hub's log"
            await exchange.respond_json(503, {"error": "unavailable", "message": message})
            return
        await proxy.handle(exchange, request, remote, body_deadline, admitted)

    def __getattr__(self, name: str) -> Any:
        proxy = self.__dict__["cloud"].proxy
        if proxy is None:
            raise AttributeError(f"{name!r}: the Cloud Mock is not loaded (no mock hosted yet)")
        return getattr(proxy, name)
