"""kmock, the stand-in Kubernetes API server, for the synchronous platform code under test.

kmock is asyncio; `KubernetesPlatform` and `ClusterPlatformServices` are synchronous. `KmockServer`
runs the emulator on 127.0.0.1 in a thread with its own event loop, so the official `kubernetes`
client sends real HTTP to it, and `run(fn)` reads its state on that loop (never racing a request).
`Emulator` answers create with 201, as a real API server does (kmock answers 200).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

import attrs
import kmock


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """kmock's stateful emulator, answering create with 201."""

    async def _serve_create(self, request: kmock.Request) -> kmock.Response:
        return kmock.Response(status=201, payload=await super()._serve_create(request))


class KmockServer:
    """An emulator from `make_api()` with `resources` (resource -> kind) served in a background thread."""

    def __init__(self, make_api: Callable[[], Emulator], resources: dict | None = None) -> None:
        self._make_api, self._resources = make_api, resources or {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kmock", daemon=True)
        self._stack = contextlib.AsyncExitStack()

    def __enter__(self):
        self._thread.start()

        async def start():
            api = self._make_api()
            for resource, kind in self._resources.items():  # discovery lists them
                api.resources[resource] = kmock.ResourceInfo(namespaced=True, kind=kind)
            await self._stack.enter_async_context(api)
            server = await self._stack.enter_async_context(kmock.Server(api))
            return api, str(server.url).rstrip("/")

        self.api, self.url = self._await(start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._await(self._stack.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def _await(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def run(self, fn: Callable[[Emulator], object]):
        """Run `fn(api)` on the server's loop, so reads never race a request being handled."""

        async def call():
            return fn(self.api)

        return self._await(call())
