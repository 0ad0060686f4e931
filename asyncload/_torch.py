"""The torch side of ``Loader.to_torch()``; imported only when it is used."""

from __future__ import annotations

from collections.abc import Iterator
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.utils.data
from torch.multiprocessing.reductions import reduce_tensor

from ._fetch import map_leaves
from .datasets import AsyncIterableDataset
from .progress import Reporter

if TYPE_CHECKING:
    from .loader import Loader


# A worker hands its batches to the training loop through a pipe. torch's default for a
# tensor is to move its storage into shared memory and pass a file descriptor instead,
# which cost about 0.5 ms of CPU on each side per tensor on the benchmark machine: a
# batch of 32 samples of 1 KiB crossed 4x faster copied through the pipe. Copying costs
# more than the descriptor past 512 KiB - 1 MiB there, so larger tensors keep torch's way.
BY_VALUE_BYTES = 256 * 1024


def _tensor_from_numpy(array: np.ndarray[Any, Any]) -> torch.Tensor:
    return torch.from_numpy(array)


def reduce_small_tensor(tensor: torch.Tensor) -> tuple[Any, tuple[Any, ...]]:
    """Pickle ``tensor`` for another process: by value (as a numpy array) when it is a
    dense CPU tensor of at most :data:`BY_VALUE_BYTES` not already in shared memory;
    torch's shared-memory reduction otherwise, and for dtypes numpy lacks (``bfloat16``)."""
    try:
        array = _small_array(tensor)
    except Exception:
        # Whatever this tensor is, torch's reduction knows it. An error here would reach
        # the worker's queue feeder thread, which drops the batch, and the DataLoader
        # would wait for it forever.
        array = None
    if array is not None:
        return _tensor_from_numpy, (array,)
    reduced: tuple[Any, tuple[Any, ...]] = reduce_tensor(tensor)  # type: ignore[no-untyped-call]
    return reduced


def _small_array(tensor: torch.Tensor) -> np.ndarray[Any, Any] | None:
    if (
        tensor.layout != torch.strided  # (sparse tensors have no nbytes)
        or tensor.device.type != "cpu"
        or tensor.is_quantized
        or tensor.requires_grad
        or tensor.nbytes > BY_VALUE_BYTES
        or tensor.is_shared()  # type: ignore[no-untyped-call]
    ):
        return None
    # A conjugate or negative view holds its values lazily; numpy needs them made.
    return tensor.resolve_conj().resolve_neg().numpy()  # (bfloat16: TypeError)


class LoaderIterableDataset(torch.utils.data.IterableDataset[Any]):
    """Each DataLoader worker iterates its own share of the loader's batches (batches
    ``worker, worker + num_workers, ...`` of this rank) in its own event loop.

    Use with ``DataLoader(ds, batch_size=None)``: the loader already batches. numpy arrays
    arrive as torch tensors (DataLoader's ``default_convert``, zero copy). In a worker
    process, tensors of at most :data:`BY_VALUE_BYTES` go to the training loop by value
    (see :func:`reduce_small_tensor`), larger ones through shared memory as torch sends
    them.
    """

    def __init__(self, loader: Loader, *, tagged: bool = False) -> None:
        super().__init__()
        self.loader = loader
        # Tagged: yield (batch, (worker, positions)) for TorchLoader to keep state exact.
        self.tagged = tagged
        # The loader (or copy) last iterated in this process: whether its epoch ended.
        self.iterated: Loader | None = None
        self._iterated_in_worker = False  # (set in a worker's own copy only)

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            if self._iterated_in_worker:
                raise RuntimeError(
                    "to_torch() under DataLoader(persistent_workers=True): each worker keeps "
                    "its copy of the loader from the first epoch, so set_epoch() and "
                    "load_state_dict() cannot reach it; use persistent_workers=False"
                )
            self._iterated_in_worker = True
            # This process is the DataLoader's worker: everything it pickles for another
            # process is the DataLoader's traffic to the training loop.
            ForkingPickler.register(torch.Tensor, reduce_small_tensor)
            loader = self.loader.for_worker(info.id, info.num_workers)
            loader._paced = True
        else:
            # In this process: untagged, the loader itself (its own state counts); tagged,
            # a copy resuming from its part of the state (TorchLoader counts).
            loader = self.loader.for_worker(0, 1) if self.tagged else self.loader
            self.iterated = loader
        iterator = iter(loader)
        if loader is not self.loader:
            # In this process: the loader's close() must reach the copy's thread too.
            self.loader._iterators.add(iterator)
        # Single samples from a cache are the cache's own arrays, read-only: DataLoader's
        # default_convert would wrap them in writable tensors over the cache's memory.
        if loader.batch_size is None and loader.cache is not None:
            iterator_out: Iterator[Any] = (map_leaves(s, _writable) for s in iterator)
        else:
            iterator_out = iterator
        try:
            if not self.tagged:
                yield from iterator_out
                return
            for batch in iterator_out:
                yield batch, loader._tag(iterator.last_positions)  # type: ignore[attr-defined]
        finally:
            iterator.close()  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.loader)


def _writable(value: Any) -> Any:
    """A read-only numpy array copied; anything else as it is."""
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        return value.copy()
    return value


class TorchLoader:
    """``torch.utils.data.DataLoader(loader.to_torch(), batch_size=None, **kwargs)`` whose
    batches also update ``loader``'s progress in this process, so that
    ``loader.state_dict()`` (and this object's) counts exactly the batches taken here,
    whichever worker made them. Resume: ``loader.load_state_dict(state)``, then iterate a
    new ``TorchLoader`` (a map-style loader may change its number of workers; a stream
    needs the same number once a batch was taken, as its positions are per worker).
    """

    def __init__(self, loader: Loader, **dataloader_kwargs: Any) -> None:
        if "batch_size" in dataloader_kwargs and dataloader_kwargs["batch_size"] is None:
            # (What it passes itself: the Loader makes the batches.)
            dataloader_kwargs = {k: v for k, v in dataloader_kwargs.items() if k != "batch_size"}
        for name in ("dataset", "batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
            if name in dataloader_kwargs:
                raise TypeError(
                    f"TorchLoader: {name}= is the asyncload Loader's job, not DataLoader's"
                )
        if dataloader_kwargs.get("persistent_workers"):
            raise ValueError(
                "TorchLoader: persistent_workers=True would keep each worker's first epoch "
                "and state; workers are started per epoch"
            )
        collate = dataloader_kwargs.get("collate_fn")
        if collate is not None:
            # Each item from the workers is (batch, tag): the function converts the batch.
            dataloader_kwargs = {**dataloader_kwargs, "collate_fn": _OnBatch(collate)}
        self.loader = loader
        self.num_workers = int(dataloader_kwargs.get("num_workers", 0))
        self.kwargs = dataloader_kwargs

    def __len__(self) -> int:
        # What the workers will yield, each its own share (buckets cut within it).
        workers = max(1, self.num_workers)
        return sum(len(self.loader.for_worker(w, workers)) for w in range(workers))

    def __iter__(self) -> Iterator[Any]:
        # Kept with the loader's iterators, so that loader.close() also stops this epoch's
        # DataLoader (its worker processes), not only a loader iterated in this process.
        epoch = self._epoch()
        self.loader._iterators.add(epoch)
        return epoch

    def _epoch(self) -> Iterator[Any]:
        from .sampling import Progress, WorkerProgress

        loader = self.loader
        resume = loader._resume
        workers = max(1, self.num_workers)
        # Checked here, before the resume point is handed over (a worker would raise it
        # only once this loader had let go of it).
        if loader.is_streaming and isinstance(resume, Progress) and workers > 1:
            raise ValueError(
                "this stream's state was saved without DataLoader workers; it resumes only "
                "without them"
            )
        if loader.is_streaming and isinstance(resume, WorkerProgress):
            if resume.workers != workers:
                raise ValueError(
                    f"this stream's state was saved with {resume.workers} DataLoader workers; "
                    f"it resumes only with as many, not {workers}"
                )
            loader._check_run_unit(resume)
        # The workers (or, without workers, this process) iterate a copy that carries the
        # resume point; this loader only keeps count of what the training loop takes.
        detached = loader._detached()
        # Iterated in this process (no workers), the copy's iterators are the loader's own,
        # for close() (pickled into workers, a copy gets its own again).
        detached._iterators = loader._iterators
        bar = None
        if loader.progress and self.num_workers > 0:
            # One bar, here, for the batches the training loop takes: not one per worker
            # (each drew its own share's on the shared terminal line).
            detached.progress = False
            bar = Reporter(
                loader.statistics,
                bar=True,
                total=len(self),
                on_statistics=None,
                every=1,
                details=False,
            )
        dataset = LoaderIterableDataset(detached, tagged=True)
        data_loader = torch.utils.data.DataLoader(dataset, batch_size=None, **self.kwargs)
        progress: Progress | WorkerProgress
        if isinstance(resume, WorkerProgress):
            progress = resume
        elif isinstance(loader.dataset, AsyncIterableDataset):
            sized = workers > 1 and loader.dataset.num_samples() is not None
            unit = loader._run_unit() if sized else None
            progress = WorkerProgress(
                workers, {0: resume} if resume is not None else None, unit=unit
            )
        else:
            progress = Progress() if resume is None else resume.copy()
        iterator = iter(data_loader)
        loader._resume, loader._progress, loader._finished = None, progress, False
        try:
            for batch, (worker, positions) in iterator:
                if isinstance(progress, WorkerProgress):
                    progress.mark(worker, positions)
                else:
                    progress.mark(positions)
                if bar is not None:
                    bar.batch()
                yield batch
        finally:
            if bar is not None:
                bar.end()
            # Stop the workers on every way out (a worker's error, close(), a break), not
            # when the DataLoader's iterator is collected: an error's traceback keeps it in
            # a reference cycle, and when the collector finally takes the cycle, the index
            # queues' finalizers have stopped their feeder threads before the iterator's
            # own finalizer asks the workers to exit, so it waits out a 5 s join per worker
            # (in whatever code is running at the time) and then kills them.
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        ran = dataset.iterated
        if self.num_workers == 0 and not (ran is not None and ran._finished):
            return  # closed mid-epoch (loader.close()): the state keeps what was taken
        loader._epoch_done()


class _OnBatch:
    """A ``collate_fn`` given to :class:`TorchLoader`, applied to the batch of each
    ``(batch, tag)`` item (picklable, for spawned workers)."""

    def __init__(self, fn: Any) -> None:
        if not callable(fn):
            raise TypeError(f"TorchLoader: collate_fn must be callable, got {fn!r}")
        self.fn = fn

    def __call__(self, item: tuple[Any, Any]) -> tuple[Any, Any]:
        batch, tag = item
        return self.fn(batch), tag
