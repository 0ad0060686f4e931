"""The torch side of ``Loader.to_torch()``; imported only when it is used."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch.utils.data

if TYPE_CHECKING:
    from .loader import Loader


class LoaderIterableDataset(torch.utils.data.IterableDataset[Any]):
    """Each DataLoader worker iterates its own share of the loader's batches (batches
    ``worker, worker + num_workers, ...`` of this rank) in its own event loop.

    Use with ``DataLoader(ds, batch_size=None)``: the loader already batches. numpy arrays
    arrive as torch tensors (DataLoader's ``default_convert``, zero copy).
    """

    def __init__(self, loader: Loader) -> None:
        super().__init__()
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        loader = self.loader if info is None else self.loader.for_worker(info.id, info.num_workers)
        iterator = iter(loader)
        try:
            yield from iterator
        finally:
            iterator.close()  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.loader)
