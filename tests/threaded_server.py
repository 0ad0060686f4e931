"""An aiohttp app served on 127.0.0.1 (ephemeral port) from its own thread and event loop,
so that synchronous tests, the sync bridge and other event loops can all talk to it.

Subclasses build the app in :meth:`ThreadedServer._app` and release what they hold in
:meth:`ThreadedServer._cleanup` (which runs in the server's loop before it stops).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web


class ThreadedServer:
    def __init__(self, name: str, **runner_options: Any) -> None:
        self.port = 0
        self.base_url = ""
        self._runner_options = runner_options
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    async def _app(self) -> web.Application:
        raise NotImplementedError

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # reported to the test thread
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        runner = web.AppRunner(
            await self._app(), access_log=None, shutdown_timeout=1.0, **self._runner_options
        )
        self._runner = runner
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.port = runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self) -> None:
        """Release what the server holds, close every connection and stop the thread."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._cleanup(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
