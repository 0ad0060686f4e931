"""A local HTTP server of deterministic samples behind a fixed latency, for ``demo``.

``GET /sample/{i}`` waits ``latency_ms`` (an ``asyncio.sleep``: the server itself stays
idle, as slow storage does from the client's side), then answers :func:`sample_bytes`
``(i, size)`` with its Content-Length. It binds 127.0.0.1 on an ephemeral port and runs
in a daemon thread with its own event loop (uvloop where installed), so it needs no
network and cannot outlive the process.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from aiohttp import web

HOST = "127.0.0.1"


def sample_bytes(index: int, size: int) -> bytes:
    """The body of ``/sample/{index}``: the index as 8 little-endian bytes, then the byte
    ``index % 251`` up to ``size`` bytes (cut to ``size`` when it is under 8)."""
    head = index.to_bytes(8, "little")
    return (head + bytes((index % 251,)) * max(0, size - 8))[:size]


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class DemoServer:
    """``with DemoServer(latency_ms=20, size=16384, count=2048) as server:`` serves
    ``server.urls()`` until the block ends (whichever way it ends).

    ``count`` samples exist (``/sample/0`` to ``/sample/{count-1}``; others answer 404).
    :meth:`start` raises whatever kept the server from binding; :meth:`stop` is idempotent
    and waits for the thread to end.
    """

    def __init__(self, *, latency_ms: float, size: int, count: int) -> None:
        if latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms}")
        if size < 1 or count < 1:
            raise ValueError(f"size and count must be >= 1, got {size} and {count}")
        self.latency_s = latency_ms / 1000.0
        self.size = size
        self.count = count
        self.base_url = ""
        self._loop = _new_loop()
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._main, name="asyncload-demo-server", daemon=True
        )

    def urls(self) -> list[str]:
        """One URL per sample, in index order."""
        return [f"{self.base_url}/sample/{i}" for i in range(self.count)]

    def start(self) -> None:
        """Bind and start serving; returns once ``base_url`` is set."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._loop.close()
            raise self._error

    def stop(self) -> None:
        """Close every connection and stop the thread."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._cleanup(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        if not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> DemoServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- server thread -----------------------------------------------------------------------

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # handed to start(), in the caller's thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/sample/{index}", self._sample)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        # A deep backlog: hundreds of clients may connect at the same moment.
        await web.TCPSite(self._runner, HOST, 0, backlog=4096).start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://{HOST}:{port}"

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        # Handlers still answering (a client stopped mid-request, by Ctrl-C) outlive the
        # runner's shutdown: cancelled here, or the closed loop reports each as destroyed.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _sample(self, request: web.Request) -> web.Response:
        try:
            index = int(request.match_info["index"])
        except ValueError:
            raise web.HTTPBadRequest(text="index must be an integer") from None
        if not 0 <= index < self.count:
            raise web.HTTPNotFound(text=f"no sample {index}")
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        return web.Response(
            body=sample_bytes(index, self.size), content_type="application/octet-stream"
        )
