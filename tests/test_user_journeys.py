"""End-to-end user journeys, shaped like training scripts (written by helper-63, which
found no bug in them): tar shards over HTTP under DataLoader workers with a mid-epoch save
and a rebuilt resume, a mix of a tar stream and an HTTPSource, a flaky server under retry
and skips, a FileSource under a DiskCache across a restart, the sync loop's progress and
statistics. Each checks every sample exactly once."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from threaded_server import ThreadedServer

import asyncload as al
from asyncload.sources import TarShardSource

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

COUNTS = (5, 6, 7, 8)


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def shard_bytes(shard: int, n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            key = f"s{shard:02d}/{i:04d}"
            _member(tar, f"{key}.cls", str(shard * 100 + i).encode())
            _member(tar, f"{key}.npy", np.full(3, shard * 100 + i, np.int64).tobytes())
    return buf.getvalue()


ALL_KEYS = sorted(f"s{s:02d}/{i:04d}" for s, n in enumerate(COUNTS) for i in range(n))


class FileServer(ThreadedServer):
    """Serves ``files[name]`` at ``/{name}`` from its own thread; counts requests."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: dict[str, int] = {}
        self.fail: dict[str, int] = {}  # name -> answer 503 this many more times
        self.cut: dict[str, int] = {}  # name -> cut this many more bodies off half-way
        super().__init__("journey-files")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests[name] = self.requests.get(name, 0) + 1
        if self.fail.get(name, 0) > 0:
            self.fail[name] -= 1
            return web.Response(status=503)
        if name not in self.files:
            return web.Response(status=404)
        data = self.files[name]
        if self.cut.get(name, 0) > 0:
            self.cut[name] -= 1
            response = web.StreamResponse()
            response.content_length = len(data)
            await response.prepare(request)
            await response.write(data[: len(data) // 2 + 700])
            assert request.transport is not None
            request.transport.close()
            return response
        return web.Response(body=data)

    async def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{name}", self._handle)
        return app


@pytest.fixture
def tar_server() -> Any:
    files = {f"shard-{s}.tar": shard_bytes(s, n) for s, n in enumerate(COUNTS)}
    with FileServer(files) as server:
        yield server


def tar_urls(server: FileServer) -> list[str]:
    return [f"{server.base_url}/shard-{s}.tar" for s in range(len(COUNTS))]


def decode(sample: dict[str, Any]) -> dict[str, Any]:
    return {
        "__key__": sample["__key__"],
        "label": int(sample["cls"]),
        "x": np.frombuffer(sample["npy"], np.int64).copy(),
    }


def keys_of(batches: list[Any]) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def build_tar_loader(server: FileServer, **kw: Any) -> al.Loader:
    kw.setdefault("batch_size", 4)
    return al.Loader(
        TarShardSource(tar_urls(server), samples_per_shard=list(COUNTS)),
        shuffle=True,
        seed=3,
        shuffle_buffer=8,
        transform=decode,
        **kw,
    )


# -- journey 1: tar shards over HTTP, DataLoader workers, save/resume ------------------------


def test_tar_http_dataloader_two_workers_every_sample_once(tar_server: FileServer) -> None:
    loader = build_tar_loader(tar_server)
    dl = torch.utils.data.DataLoader(loader.to_torch(), batch_size=None, num_workers=2)
    batches = list(dl)
    assert sorted(keys_of(batches)) == ALL_KEYS
    assert len(batches) == len(dl)
    assert isinstance(batches[0]["x"], torch.Tensor)


def cut_and_resume(
    build: Callable[[], al.Loader], workers: int, cut: int, *, epoch: int = 0
) -> tuple[list[Any], list[Any], al.Loader]:
    """The first ``cut`` batches of epoch ``epoch`` through to_torch_loader(), then the
    rest of it from a new loader resumed from the state saved there (and that loader)."""
    loader = build()
    loader.set_epoch(epoch)
    seen: list[Any] = []
    for batch in loader.to_torch_loader(num_workers=workers):
        seen.append(batch)
        if len(seen) == cut:
            break
    state = loader.state_dict()
    loader.close()
    again = build()
    again.load_state_dict(state)
    return seen, list(again.to_torch_loader(num_workers=workers)), again


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("cut", [1, 3, 5])
def test_tar_http_to_torch_loader_resume_every_sample_once(
    tar_server: FileServer, workers: int, cut: int
) -> None:
    seen, rest, again = cut_and_resume(lambda: build_tar_loader(tar_server), workers, cut, epoch=1)
    got = keys_of(seen) + keys_of(rest)
    assert sorted(got) == ALL_KEYS
    # and after the resumed epoch, a state that starts a full new pass
    again.set_epoch(2)
    assert sorted(keys_of(list(again.to_torch_loader(num_workers=workers)))) == ALL_KEYS


# -- journey 2: a mix of a tar stream and a map-style HTTPSource ---------------------------

N_HTTP = 10


@pytest.fixture
def mix_server() -> Any:
    files = {f"shard-{s}.tar": shard_bytes(s, n) for s, n in enumerate(COUNTS)}
    files.update({f"item-{i}": f"item {i}".encode() for i in range(N_HTTP)})
    with FileServer(files) as server:
        yield server


def _decode_any(sample: Any) -> Any:
    if isinstance(sample, dict):
        return sample["__key__"]
    return sample.decode()


def build_mix_loader(server: FileServer, **kw: Any) -> al.Loader:
    tar = TarShardSource(tar_urls(server), samples_per_shard=list(COUNTS))
    http = al.sources.HTTPSource([f"{server.base_url}/item-{i}" for i in range(N_HTTP)])
    kw.setdefault("batch_size", 3)
    return al.Loader(
        al.mix([tar, http], [2.0, 1.0], stop="all"),
        shuffle=True,
        seed=1,
        shuffle_buffer=4,
        transform=_decode_any,
        **kw,
    )


MIX_ALL = sorted(ALL_KEYS + [f"item {i}" for i in range(N_HTTP)])


def flat(batches: list[Any]) -> list[str]:
    return [x for b in batches for x in b]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cut", [1, 4])
def test_mix_tar_and_http_resume_every_sample_once(
    mix_server: FileServer, workers: int, cut: int
) -> None:
    full = flat(list(build_mix_loader(mix_server).to_torch_loader(num_workers=workers)))
    assert sorted(full) == MIX_ALL
    seen, rest, _ = cut_and_resume(lambda: build_mix_loader(mix_server), workers, cut)
    assert sorted(flat(seen) + flat(rest)) == MIX_ALL


def test_mix_sync_loop_resume_every_sample_once(mix_server: FileServer) -> None:
    full = flat(list(build_mix_loader(mix_server)))
    assert sorted(full) == MIX_ALL
    loader = build_mix_loader(mix_server)
    seen: list[Any] = []
    for batch in loader:
        seen.append(batch)
        if len(seen) == 3:
            break
    state = loader.state_dict()
    loader.close()
    again = build_mix_loader(mix_server)
    again.load_state_dict(state)
    rest = list(again)
    assert flat(seen) + flat(rest) == full


# -- journey 3: a flaky server, retry, on_error="skip", max_errors --------------------------


def fast_retry(attempts: int = 3) -> al.Retry:
    return al.Retry(attempts=attempts, initial_delay=0.0, max_delay=0.0)


def test_flaky_http_retry_and_skip_in_a_dataloader(mix_server: FileServer) -> None:
    # item-3 answers 503 once (retried), item-7 never exists (404: skipped).
    mix_server.fail = {"item-3": 1}
    urls = [f"{mix_server.base_url}/item-{i}" for i in range(N_HTTP)] + [
        f"{mix_server.base_url}/missing"
    ]
    loader = al.Loader(
        al.sources.HTTPSource(urls),
        batch_size=4,
        transform=lambda b: b.decode(),
        retry=fast_retry(),
        on_error="skip",
        max_errors=1,
    )
    got = flat(list(loader.to_torch_loader(num_workers=2)))
    assert sorted(got) == sorted(f"item {i}" for i in range(N_HTTP))
    assert mix_server.requests["item-3"] == 2


def test_flaky_tar_shard_skipped_with_samples_per_shard(tar_server: FileServer) -> None:
    # shard-1 answers 404 for ever: its 6 samples are 6 failed positions, skipped.
    del tar_server.files["shard-1.tar"]
    loader = build_tar_loader(tar_server, retry=fast_retry(), on_error="skip", max_errors=6)
    got = keys_of(list(loader))
    assert sorted(got) == [k for k in ALL_KEYS if not k.startswith("s01/")]
    assert loader.statistics()["skipped"] == 6


def test_flaky_tar_shard_past_max_errors_raises(tar_server: FileServer) -> None:
    del tar_server.files["shard-1.tar"]
    loader = build_tar_loader(tar_server, retry=fast_retry(), on_error="skip", max_errors=5)
    with pytest.raises(
        al.AsyncloadError, match=r"6 samples failed this epoch, more than max_errors=5"
    ):
        list(loader)
