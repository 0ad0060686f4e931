"""Corners of resume through to_torch_loader() (found by helper-61): close() mid-epoch
without workers keeps the epoch unfinished, and a sized stream's per-worker state is
refused under another batch size."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_tar_and_mix_edges import write_shard

import asyncload as al
from asyncload.sources import TarShardSource

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def flat(batches: list[Any]) -> list[int]:
    return [int(x) for batch in batches for x in batch]


def tar_keys(batches: list[Any]) -> list[str]:
    return [k for batch in batches for k in batch["__key__"]]


def forked(workers: int) -> dict[str, Any]:
    return {"num_workers": workers, "multiprocessing_context": "fork"} if workers else {}


# -- to_torch_loader: an epoch cut short by close() is not a finished epoch ---------------------


def test_close_mid_epoch_under_to_torch_loader_does_not_finish_the_epoch() -> None:
    """A training loop stopped by ``loader.close()`` (a preemption handler, say) under
    ``to_torch_loader()`` without workers: the DataLoader's iteration just ends, and
    TorchLoader took that for the end of the epoch, so ``state_dict()`` said
    ``finished=True``. Resumed, that state gives the whole epoch again (the batches taken
    come twice); merged for an elastic resume, the rank's untaken samples count as
    delivered (lost). A plain ``for`` over the same loader saves ``finished=False``."""
    loader = al.Loader(al.from_sequence(np.arange(40)), batch_size=2, rank=0, world_size=2)
    iterator = iter(loader.to_torch_loader())
    taken = [next(iterator), next(iterator)]
    loader.close()
    taken += list(iterator)  # nothing more comes after close()
    state = loader.state_dict()
    assert not state["finished"], "an epoch cut short by close() was recorded as finished"
    resumed = al.Loader(al.from_sequence(np.arange(40)), batch_size=2, rank=0, world_size=2)
    resumed.load_state_dict(state)
    rest = flat(list(resumed))
    assert not set(flat(taken)) & set(rest)
    assert sorted(flat(taken) + rest) == list(range(0, 40, 2))


# -- a sized stream's per-worker state and batch_size -------------------------------------------


def test_sized_stream_state_under_workers_resumes_with_another_batch_size(tmp_path: Path) -> None:
    """docs/distributed.md: "batch_size, ordered, concurrency and the number of workers may
    change" on resume, and Loader._plan_state leaves batch_size out because "a saved
    position means the same sample under any of them". Not for a stream of known size
    under DataLoader workers: each worker reads a run of whole batches of the rank's share
    (worker_run(length, workers, worker, batch_size)), and its saved positions are
    positions in that run. 10 samples in batches of 4 over 2 workers: runs of 8 and 2;
    in batches of 3: runs of 6 and 4. Resumed with batch_size=3, worker 1's two saved
    positions mean samples 6-7 instead of 8-9: 8-9 come twice, 6-7 never. Either the
    resume is exact or it is refused naming batch_size."""
    shards = [write_shard(tmp_path / f"s{s}.tar", s, 5) for s in range(2)]
    everything = {f"s{s}/{i:03d}" for s in range(2) for i in range(5)}

    def build(batch_size: int) -> al.Loader:
        return al.Loader(TarShardSource(shards, samples_per_shard=5), batch_size=batch_size)

    first = build(4)
    before: list[Any] = []
    for batch in first.to_torch_loader(**forked(2)):
        before.append(batch)
        if len(before) == 2:  # one batch from each worker
            break
    state = first.state_dict()
    first.close()

    resumed = build(3)
    try:
        resumed.load_state_dict(state)
        after = list(resumed.to_torch_loader(**forked(2)))
    except ValueError as exc:
        assert "batch_size" in str(exc)
        return
    got = tar_keys(before) + tar_keys(after)
    repeated = sorted(k for k, n in collections.Counter(got).items() if n > 1)
    assert repeated == [], f"delivered twice: {repeated}"
    assert set(got) == everything, f"never delivered: {sorted(everything - set(got))}"
