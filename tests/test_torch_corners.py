"""Corners of the PyTorch integration (found by helper-55): samplers giving other than
integer indices, and from_torch's max_threads when timeouts abandon reads (run_abandonable,
which every thread-backed read uses)."""

from __future__ import annotations

from typing import Any

import pytest

import asyncload as al

torch = pytest.importorskip("torch")


def flat(batches: list[Any]) -> list[int]:
    return [int(x) for batch in batches for x in batch]


def data_loader(loader: al.Loader, num_workers: int, **kwargs: Any) -> Any:
    if num_workers:
        kwargs.setdefault("multiprocessing_context", "fork")
    return torch.utils.data.DataLoader(
        loader.to_torch(), batch_size=None, num_workers=num_workers, **kwargs
    )


# -- samplers -------------------------------------------------------------------------------


def test_a_sampler_of_non_integer_indices_is_refused_not_truncated() -> None:
    """sampling.epoch_order takes each index with int(), which truncates: a sampler that
    gives 0.9, 1.5, 2.99 (an np.linspace, say) silently read samples 0, 1, 2. torch's
    own DataLoader would pass 0.9 to the dataset, which refuses it; so should this."""
    loader = al.Loader(al.from_sequence(list("abcdef")), batch_size=None, sampler=[0.9, 1.5, 2.99])
    with pytest.raises(TypeError, match="sampler"):
        list(loader)


def test_a_batch_sampler_as_sampler_is_refused_naming_the_sampler() -> None:
    """A torch BatchSampler gives lists of indices: the error was int()'s own
    ("int() argument must be ... not 'list'"), naming neither the sampler nor what it gave."""
    sampler = torch.utils.data.BatchSampler(
        torch.utils.data.SequentialSampler(range(10)), batch_size=4, drop_last=False
    )
    loader = al.Loader(al.from_sequence(list(range(10))), batch_size=4, sampler=sampler)
    with pytest.raises(TypeError, match="sampler"):
        list(loader)


# -- drop_last under DataLoader workers -----------------------------------------------------


# -- from_torch -----------------------------------------------------------------------------


class Hanging(torch.utils.data.Dataset):  # type: ignore[misc]
    """Every __getitem__ blocks until ``release`` is set; counts the calls inside at once."""

    def __init__(self, n: int) -> None:
        import threading

        self.n = n
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.inside = 0
        self.most_inside = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            self.release.wait(60)
        finally:
            with self._lock:
                self.inside -= 1
        return index


def test_from_torch_max_threads_holds_when_a_timeout_abandons_a_read() -> None:
    """from_torch: "__getitem__ runs in worker threads, at most max_threads at once". A read
    abandoned by the per-attempt timeout keeps its thread busy, but anyio's
    run_sync(abandon_on_cancel=True) gives its limiter token back at once: each timed-out
    sample started one more thread, and a stalled store (NFS) piled up blocked threads
    without bound (6 here, with max_threads=1)."""
    torch_dataset = Hanging(6)
    loader = al.Loader(
        al.from_torch(torch_dataset, max_threads=1),
        batch_size=None,
        concurrency=1,
        timeout=0.05,
        on_error="skip",
    )
    try:
        assert list(loader) == []
        assert loader.statistics()["skipped"] == 6
        assert torch_dataset.most_inside <= 1
    finally:
        torch_dataset.release.set()
        loader.close()


def test_a_read_abandoned_by_a_timeout_keeps_its_thread_token() -> None:
    """run_abandonable, which FileSource, NpySource and ImageFolder read through too: a read
    left by its timeout holds its token until its thread returns, and a call abandoned
    before its thread began never runs."""
    import threading

    import anyio
    import anyio.to_thread

    from asyncload._threads import run_abandonable

    release = threading.Event()
    ran: list[int] = []

    def stuck(i: int) -> int:
        ran.append(i)
        release.wait(60)
        return i

    async def main() -> None:
        limiter = anyio.CapacityLimiter(1)
        with anyio.move_on_after(0.05):
            await run_abandonable(stuck, 1, limiter=limiter)
        assert limiter.borrowed_tokens == 1  # the thread still runs: its token is held
        with anyio.move_on_after(0.05):
            await run_abandonable(stuck, 2, limiter=limiter)  # waits for the token
        assert ran == [1]  # the second never began
        release.set()
        with anyio.fail_after(10):
            async with limiter:  # the first thread gives its token back as it ends
                pass
        assert await run_abandonable(lambda: 3, limiter=limiter) == 3
        assert limiter.borrowed_tokens == 0

    try:
        anyio.run(main)
    finally:
        release.set()
