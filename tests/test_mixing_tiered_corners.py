"""Corners of mix(), TieredCache and ImageFolder (found by helper-56): huge weights, a
dataset not in a list, stream parts shuffled apart, map-style parts fetched concurrently,
every part closed on the way out, tier classes and repeated tiers, local image reads under
the Loader's timeout."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from conftest import BACKENDS
from stuck_files import stuck_fifo
from test_mixing import Letters  # a sized stream that splits by the default stride

import asyncload as al
from asyncload.folders import ImageFolder
from asyncload.streaming import StreamEpoch

pytestmark = pytest.mark.anyio

ANYIO_BACKENDS = [BACKENDS[0], BACKENDS[2]]  # asyncio and trio

# A hang guard, never an ordering device: a correct loader finishes long before it.
HANG_GUARD_S = 5.0


async def collect(loader: al.Loader) -> list[Any]:
    async with loader:
        return [x async for x in loader]


# -- mix -------------------------------------------------------------------------------------


async def test_mix_with_huge_finite_weights_draws_by_them() -> None:
    """Finite weights of 1e308 pass the check, but their sum overflows to inf, so every
    normalised weight is 0 and the first draw fails with numpy's "Probabilities contain
    NaN" (as a SampleError of the whole stream). Equal weights are equal weights."""
    mixed = al.mix([Letters("a", 10), Letters("b", 10)], weights=[1e308, 1e308], stop="all")
    got = await collect(al.Loader(mixed, batch_size=None))
    assert sorted(got) == sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)])


def test_mix_of_one_dataset_not_in_a_list_names_mix() -> None:
    """``al.mix(ds)`` (brackets forgotten) is refused with an error about something else:
    "SequenceDataset is an async dataset: iterate a Loader over it" or "'Letters' object
    is not iterable", naming neither mix nor its datasets argument (ConcatDataset says
    "datasets must be a list of datasets, got one")."""
    for one in (al.from_sequence([1, 2]), Letters("a", 2)):
        with pytest.raises(TypeError, match="mix"):
            al.mix(one)


async def test_stream_parts_of_a_shuffled_mix_are_shuffled_apart() -> None:
    """Map-style parts get a permutation salted by their place in the mix; stream parts all
    get the same StreamEpoch, so two streams of one length are shuffled in exactly the same
    order. Mixing a stream with an augmented view of itself then delivers x_i and aug(x_i)
    in lockstep, for every seed and epoch."""
    stream = Letters("a", 40)
    mixed = al.mix([stream, stream.map(str.upper)], stop="all")
    got = await collect(al.Loader(mixed, batch_size=None, shuffle=True, seed=0, shuffle_buffer=8))
    lower = [int(x[1:]) for x in got if x[0] == "a"]
    upper = [int(x[1:]) for x in got if x[0] == "A"]
    assert sorted(lower) == sorted(upper) == list(range(40))
    assert lower != upper


class _Overlap:
    """Counts fetches in flight; each waits (up to the hang guard) for a second one."""

    def __init__(self) -> None:
        self.in_flight = self.most = 0
        self.two = anyio.Event()
        self.gave_up = False


class _Remote(al.AsyncDataset[int]):
    def __init__(self, n: int, overlap: _Overlap) -> None:
        self.n, self.overlap = n, overlap

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        o = self.overlap
        o.in_flight += 1
        o.most = max(o.most, o.in_flight)
        if o.in_flight >= 2:
            o.two.set()
        try:
            if not o.gave_up:
                with anyio.move_on_after(HANG_GUARD_S):
                    await o.two.wait()
                o.gave_up = not o.two.is_set()
        finally:
            o.in_flight -= 1
        return index


async def test_mix_of_map_style_parts_fetches_concurrently() -> None:
    """A mix pulls its map-style parts one ``await dataset[i]`` at a time from the single
    stream worker, so ``concurrency`` is ignored: one fetch in flight, ever (two 50-sample
    parts with 10 ms fetches: 1.1 s, against 0.05 s for the same 100 samples unmixed at
    concurrency=32). Remote datasets in a mix run at 1 / latency."""
    overlap = _Overlap()
    mixed = al.mix([_Remote(4, overlap), _Remote(4, overlap)], stop="all")
    got = await collect(al.Loader(mixed, batch_size=None, concurrency=8))
    assert sorted(got) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert overlap.most >= 2, "never more than one fetch in flight"


class _ClosingPart(al.AsyncIterableDataset[str]):
    """A stream whose cleanup awaits (as closing a connection or a shard reader does).
    ``block``: after its samples it waits for ever (a read that hangs)."""

    def __init__(self, name: str, n: int, *, block: bool = False) -> None:
        self.name, self.n, self.block = name, n, block
        self.gens: list[AsyncIterator[str]] = []  # held: no GC finalizer closes them for us
        self.closed = False

    def __aiter__(self) -> AsyncIterator[str]:
        return self.epoch_stream(StreamEpoch())

    def epoch_stream(self, spec: StreamEpoch) -> AsyncIterator[str]:
        gen = self._samples()  # (one share: no striding wrapper, whose GC would warn)
        self.gens.append(gen)
        return gen

    async def _samples(self) -> AsyncIterator[str]:
        try:
            for i in range(self.n):
                yield f"{self.name}{i}"
            if self.block:
                await anyio.sleep_forever()
        finally:
            await anyio.lowlevel.checkpoint()
            self.closed = True


async def test_leaving_a_mix_closes_every_part() -> None:
    """The consumer leaves while the mix waits on one part (``s``): the cancellation
    reaches ``_mixed``'s ``finally``, which closes the parts unshielded, so the first
    part's cleanup is cancelled at its first await and the loop over the parts stops
    there: part ``a``'s cleanup is cut short and part ``b`` is never closed (its
    connection or shard stays open until a GC finalizer gets to it, which trio reports as
    a ResourceWarning for the library's own ``stride`` wrapper)."""
    parts = [_ClosingPart("a", 1000), _ClosingPart("b", 1000), _ClosingPart("s", 1, block=True)]
    loader = al.Loader(al.mix(parts, stop="all"), batch_size=None)
    try:
        async for _ in loader:
            break
        await loader.aclose()
        assert parts[0].gens and parts[1].gens, "both parts were started"
        assert (parts[0].closed, parts[1].closed) == (True, True)
    finally:
        for part in parts:
            for gen in part.gens:
                frame = getattr(gen, "ag_frame", None)
                if frame is not None and not getattr(gen, "ag_running", False):
                    await gen.aclose()  # type: ignore[attr-defined]


# -- TieredCache ------------------------------------------------------------------------------


async def test_tiered_cache_refuses_a_tier_class() -> None:
    """``TieredCache(al.LRUCache, disk)`` (the parentheses forgotten) is accepted, since a
    class has a callable ``get_or_load``; every lookup then fails with "get_or_load()
    missing 1 required positional argument: 'load'", and under ``on_error="skip"`` a
    Loader silently skips every sample. Loader(cache=al.LRUCache) is refused by name."""
    with pytest.raises(TypeError, match="tier 0"):
        al.TieredCache(al.LRUCache, al.LRUCache())  # type: ignore[arg-type]


async def test_tiered_cache_with_one_tier_twice_does_not_hang() -> None:
    """``TieredCache(memory, memory)``: the outer lookup's single flight waits for the
    inner lookup of the same key in the same cache, which waits for the outer flight: the
    first lookup hangs for ever. Refuse it at construction, or serve it."""
    memory = al.LRUCache()
    try:
        tiers = al.TieredCache(memory, memory)
    except ValueError:
        return

    async def load() -> bytes:
        return b"value"

    with anyio.fail_after(HANG_GUARD_S):
        assert await tiers.get_or_load("key", load) == b"value"


# -- ImageFolder --------------------------------------------------------------------------------


async def test_image_folder_local_read_obeys_the_loader_timeout(tmp_path: Path) -> None:
    """A local image whose read hangs (a stuck network mount; here a FIFO nobody writes):
    ImageFolder reads it in a thread that cannot be abandoned, so the Loader's ``timeout``
    never fires and the epoch (or ``aclose()``) waits for the read for ever. FileSource
    reads through ``run_abandonable`` for exactly this, and times out in 0.6 s."""
    root = tmp_path / "root"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.png").write_bytes(b"ok")
    stuck = root / "cat" / "b.png"
    with stuck_fifo(stuck) as fifo:
        folder = ImageFolder(root, decoder=len)  # a stub decoder: Pillow is not the point
        loader = al.Loader(folder, batch_size=None, timeout=0.2, on_error="skip")
        got = await collect(loader)
        stats = loader.statistics()
    assert not fifo.fired, "the read was never timed out: only the hang guard ended it"
    assert got == [(2, 0)]  # a.png, 2 bytes, class 0; b.png skipped as timed out
    assert stats["errors"] == 1 and stats["skipped"] == 1
