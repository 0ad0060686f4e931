"""Corners of this session's newest code (found by helper-62): a failed shard's error
clipped to a padded share's length and split at a worker run's edges, the end of an epoch
under to_torch_loader() without workers recorded from the copy that ran it, PadCollate
keeping bool and string rows with pad values they hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_tar_and_mix_edges import collect, write_shard

import asyncload as al
from asyncload.sources import TarShardSource

pytestmark = pytest.mark.anyio
ANYIO_BACKENDS = ["asyncio"]


class Numbers(al.AsyncDataset[Any]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> Any:
        return np.int64(index)


def _substitute(index: int, exc: Exception) -> dict[str, Any]:
    return {"__key__": f"sub{index}", "txt": b""}


def _keys(batch: list[dict[str, Any]]) -> list[str]:
    return [sample["__key__"] for sample in batch]


# -- StreamError.count across the end of a share or a worker's run ----------------------------


async def test_a_failed_shard_padding_a_short_share_does_not_overshoot_its_length(
    tmp_path: Path,
) -> None:
    """mix([tar], stop="all") of one shard of 5 (samples_per_shard=5) over 2 ranks: each
    rank yields 3 (len(loader)). Rank 1's share is 2 samples, padded by equal_length
    reading its stream again. The shard is missing: its StreamError stands for 2 samples,
    and the repeat's StreamError(count=2) is yielded whole though only 1 position was left,
    so rank 1 yields 4 (substituted) samples where rank 0 and len(loader) say 3: the
    ranks fall out of step."""
    shards = [str(tmp_path / "missing.tar")]
    counts = []
    for rank in range(2):
        source = TarShardSource(shards, samples_per_shard=5)
        loader = al.Loader(
            al.mix([source], stop="all"),
            batch_size=None,
            rank=rank,
            world_size=2,
            on_error=_substitute,
        )
        counts.append((len(await collect(loader)), len(loader)))
    assert counts == [(3, 3), (3, 3)]


async def test_a_failed_shard_spanning_a_worker_run_boundary_is_split_between_runs(
    tmp_path: Path,
) -> None:
    """Shards of 1, 4 (missing) and 1 samples in a mix, batch_size=2, 2 DataLoader workers
    (for_worker, what each worker iterates): runs of 4 and 2 positions, 3 batches. The
    failed shard (positions 1-4) spans the runs' boundary. take_run yields its StreamError
    whole to worker 0 (5 positions, 3 batches, where len() says 2) and drops it for worker
    1 (position 4 lost; its sample s2 moves into it): 4 batches where len(loader) says 3,
    and each worker's positions are not those of its run."""
    shards = [
        write_shard(tmp_path / "s0.tar", 0, 1),
        str(tmp_path / "missing.tar"),
        write_shard(tmp_path / "s2.tar", 2, 1),
    ]
    source = TarShardSource(shards, samples_per_shard=[1, 4, 1])
    loader = al.Loader(
        al.mix([source], stop="all"), batch_size=2, on_error=_substitute, collate_fn=_keys
    )
    runs = []
    for worker in range(2):
        part = loader.for_worker(worker, 2)
        runs.append(await collect(part))
        assert len(runs[-1]) == len(part)
    keys = [k if not k.startswith("sub") else "sub" for run in runs for b in run for k in b]
    assert keys == ["s0/000", "sub", "sub", "sub", "sub", "s2/000"]


# -- TorchLoader without workers: the end of the epoch ---------------------------------------


def test_a_full_epoch_under_to_torch_loader_without_workers_is_recorded_as_ended() -> None:
    """TorchLoader.__iter__ decides whether the epoch ended or was closed by
    ``detached._finished``, but the epoch runs on ``detached.for_worker(0, 1)``, a copy
    (LoaderIterableDataset.__iter__, tagged): ``detached._finished`` is whatever the loader
    had before the epoch began. A fresh loader's full epoch is therefore recorded as not
    ended (state_dict()['finished'] False), and a resume from that state yields nothing
    where load_state_dict promises the epoch again in full."""
    pytest.importorskip("torch")
    loader = al.Loader(Numbers(6), batch_size=2)
    assert len(list(loader.to_torch_loader(num_workers=0))) == 3
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["finished"]
    resumed = al.Loader(Numbers(6), batch_size=2)
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == [[0, 1], [2, 3], [4, 5]]


def test_closing_mid_epoch_under_to_torch_loader_without_workers_after_an_ended_epoch() -> None:
    """The other side of the same check: a loader whose last epoch ended (_finished True)
    runs another under to_torch_loader(num_workers=0) and is closed after one batch. The
    copy's _finished is True, so the closed epoch is recorded as ended: a resume from
    that state yields the whole epoch again, batch [0, 1] twice."""
    pytest.importorskip("torch")
    loader = al.Loader(Numbers(6), batch_size=2)
    list(loader)  # one whole epoch: _finished
    iterator = iter(loader.to_torch_loader(num_workers=0))
    assert next(iterator).tolist() == [0, 1]
    loader.close()
    assert list(iterator) == []
    state = loader.state_dict()
    assert not state["finished"]
    resumed = al.Loader(Numbers(6), batch_size=2)
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == [[2, 3], [4, 5]]


# -- PadCollate's dtype with pad_value ---------------------------------------------------------


def test_pad_collate_pads_string_arrays_with_a_string_pad_value() -> None:
    """Token strings padded with "<pad>" (or ""): np.result_type(dtype, pad_value) reads
    a str pad_value as a dtype name, so this raises TypeError "data type '<pad>' not
    understood" (it padded before pad_value joined the dtype); and a one-letter
    pad_value is taken for a dtype code ("f": float32)."""
    padded, lengths = al.PadCollate("<pad>")([np.array(["a"]), np.array(["b", "c"])])
    assert padded.tolist() == [["a", "<pad>"], ["b", "c"]]
    assert lengths.tolist() == [1, 2]
    padded, _ = al.PadCollate("")([["a"], ["b", "c"]])
    assert padded.tolist() == [["a", ""], ["b", "c"]]


def test_pad_collate_keeps_bool_arrays_bool_with_the_default_pad_value() -> None:
    """Boolean rows (masks) padded with the default pad_value=0: np.result_type(bool, 0)
    is int64 under NumPy 2, so the batch comes back int64 where it was bool before
    pad_value joined the dtype (0 is False, as the commit keeps uint8 for 0)."""
    padded, _ = al.PadCollate()([np.array([True]), np.array([True, False])])
    assert padded.dtype == np.bool_
    assert padded.tolist() == [[True, False], [True, False]]
