"""One rank of a real multi-rank training run, launched by ``tests/test_torchrun.py``::

    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        tests/torchrun_train.py MANIFEST OUT_DIR

``MANIFEST`` is a JSON file ``{"n": N, "shards": [paths], "counts": [samples per shard]}``.
Every rank joins a gloo process group, builds its loaders *without* ``rank=`` or
``world_size=`` (so asyncload must read them from ``torch.distributed``), and trains a
``DistributedDataParallel`` linear model on batches from ``loader.to_torch_loader(
num_workers=2)`` over two datasets:

* ``map``: ``al.from_sequence(range(N))`` with ``N`` not a multiple of ``2 * batch_size``,
  so the last batch is short and one rank's share is padded;
* ``tar``: ``TarShardSource`` over local shards of unequal sizes with
  ``samples_per_shard`` given, so that every rank yields the same number of batches.

Both shuffle, over epochs 0 and 1 (``set_epoch``). Then epoch 1 again: break after a few
batches, save ``state_dict()``, and let a fresh loader resume from it. DDP all-reduces the
gradients in every backward pass, so a rank with fewer batches than the other would hang
the run: the launcher's timeout turns that into a test failure.

Each rank writes ``OUT_DIR/rank{r}.json`` with what it saw; the test checks it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import asyncload as al
from asyncload.sources import TarShardSource

BATCH_SIZE = 4
SEED = 11
EPOCHS = (0, 1)
RESUME_EPOCH = 1
BREAK_AFTER = 2  # batches taken before the state is saved
NUM_WORKERS = 2


def build_map(n: int) -> al.Loader:
    return al.Loader(al.from_sequence(np.arange(n)), batch_size=BATCH_SIZE, shuffle=True, seed=SEED)


BUDGET = 20


def costs(n: int) -> list[int]:
    """Sample ``i``'s cost (as a token count known from an index file): uneven on purpose."""
    return [(i * 7) % 13 + 1 for i in range(n)]


def build_budget(n: int) -> al.Loader:
    # Planned budget batches: the costs are known per index, so every rank yields as many.
    return al.Loader(
        al.from_sequence(np.arange(n)),
        batch_size=6,
        batch_budget=BUDGET,
        batch_cost=costs(n),
        bucket=16,
        shuffle=True,
        seed=SEED,
    )


def build_tar(shards: list[str], counts: list[int]) -> al.Loader:
    # A small buffer: with the default 1000 the whole share would fit, and the shuffle
    # would not be a streaming one.
    return al.Loader(
        TarShardSource(shards, samples_per_shard=counts, prefetch_shards=2),
        batch_size=BATCH_SIZE,
        shuffle=True,
        seed=SEED,
        shuffle_buffer=8,
    )


def map_ids(batch: Any) -> list[int]:
    return [int(x) for x in batch]


def map_features(batch: Any) -> torch.Tensor:
    return torch.as_tensor(batch, dtype=torch.float32).reshape(-1, 1) / 50.0


def tar_ids(batch: Any) -> list[str]:
    return list(batch["__key__"])


def tar_features(batch: Any) -> torch.Tensor:
    return torch.tensor([float(c) for c in batch["cls"]]).reshape(-1, 1) / 10.0


class Trainer:
    """A DDP-wrapped ``Linear(1, 1)`` fitted to ``y = 3x + 1``, one step per batch."""

    def __init__(self) -> None:
        torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts)
        self.model = DistributedDataParallel(torch.nn.Linear(1, 1))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.steps = 0

    def step(self, x: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(self.model(x), 3 * x + 1)
        loss.backward()  # all-reduces the gradients: both ranks must get here
        self.optimizer.step()
        self.steps += 1

    def weights(self) -> list[float]:
        return [float(v) for p in self.model.parameters() for v in p.detach().flatten()]


def run_dataset(
    build: Callable[[], al.Loader],
    ids: Callable[[Any], list[Any]],
    features: Callable[[Any], torch.Tensor],
    trainer: Trainer,
) -> dict[str, Any]:
    """Train over the epochs, then break mid-epoch and resume; return what was seen."""
    loader = build()
    record: dict[str, Any] = {
        "rank": loader.rank,
        "world_size": loader.world_size,
        "len": len(loader),
        "epochs": {},
    }
    for epoch in EPOCHS:
        loader.set_epoch(epoch)
        batches = []
        for batch in loader.to_torch_loader(num_workers=NUM_WORKERS):
            batches.append(ids(batch))
            trainer.step(features(batch))
        record["epochs"][str(epoch)] = batches
    loader.close()

    first = build()
    first.set_epoch(RESUME_EPOCH)
    before: list[list[Any]] = []
    iterator = iter(first.to_torch_loader(num_workers=NUM_WORKERS))
    for batch in iterator:
        before.append(ids(batch))
        trainer.step(features(batch))
        if len(before) == BREAK_AFTER:
            break
    state = first.state_dict()
    iterator.close()  # shuts the DataLoader's workers down now, not at garbage collection
    first.close()

    resumed = build()  # a fresh loader, as after a restart: no set_epoch, the state has it
    resumed.load_state_dict(state)
    after = []
    for batch in resumed.to_torch_loader(num_workers=NUM_WORKERS):
        after.append(ids(batch))
        trainer.step(features(batch))
    resumed.close()
    record["resume"] = {"epoch": RESUME_EPOCH, "state": state, "before": before, "after": after}
    return record


def main(argv: list[str]) -> int:
    manifest_path, out_dir = Path(argv[0]), Path(argv[1])
    manifest = json.loads(manifest_path.read_text())
    # Built before the process group exists: its rank comes from torchrun's environment.
    early = build_map(manifest["n"])
    early_share = [map_ids(batch) for batch in early]
    dist.init_process_group("gloo")
    try:
        trainer = Trainer()
        n: int = manifest["n"]
        shards: list[str] = manifest["shards"]
        counts: list[int] = manifest["counts"]
        result = {
            "rank": dist.get_rank(),
            "world_size": dist.get_world_size(),
            "early": {"rank": early.rank, "world_size": early.world_size, "ids": early_share},
            "map": run_dataset(lambda: build_map(n), map_ids, map_features, trainer),
            "budget": run_dataset(lambda: build_budget(n), map_ids, map_features, trainer),
            "tar": run_dataset(lambda: build_tar(shards, counts), tar_ids, tar_features, trainer),
        }
        result["steps"] = trainer.steps
        result["weights"] = trainer.weights()
        # Everyone has finished training before anyone reports.
        dist.barrier()
        out = out_dir / f"rank{dist.get_rank()}.json"
        out.write_text(json.dumps(result, indent=1))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
