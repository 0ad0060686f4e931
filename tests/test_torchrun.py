"""Real ranks: ``torchrun --standalone --nproc_per_node=2`` with the gloo backend.

``tests/torchrun_train.py`` trains a ``DistributedDataParallel`` model on two ranks, each
building its ``al.Loader`` without ``rank=``/``world_size=`` and iterating it through
``loader.to_torch_loader(num_workers=2)``, over a map-style dataset and over tar shards
of unequal sizes. Each rank writes what it saw to a JSON file; the tests below check those
files. The run is launched twice (with different ``PYTHONHASHSEED``s) to check that the
epochs repeat exactly across runs.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import psutil
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(180)

SCRIPT = Path(__file__).with_name("torchrun_train.py")
WORLD = 2
N = 45  # not a multiple of WORLD * batch size (8): a short last batch and one padded sample
COUNTS = [7, 3, 11, 5, 9, 2, 6, 4]  # samples per shard, unequal on purpose: 47 in all
ALL_KEYS = [f"s{shard:02d}/{i:04d}" for shard, n in enumerate(COUNTS) for i in range(n)]
LAUNCH_TIMEOUT = 85.0  # about 8 s on an idle machine; a DDP hang would wait forever

Record = dict[str, Any]


def write_shards(directory: Path) -> list[str]:
    """WebDataset-layout shards: sample ``sNN/IIII`` is a ``.bin`` and a ``.cls`` member."""
    paths = []
    for shard, n in enumerate(COUNTS):
        path = directory / f"shard-{shard:02d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                key = f"s{shard:02d}/{i:04d}"
                for ext, data in (
                    ("bin", bytes([shard, i]) * 64),
                    ("cls", str((shard + i) % 10).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def launch(manifest: Path, out: Path, hash_seed: int) -> list[Record]:
    """Run the training script on two ranks; return each rank's record, by rank."""
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED=str(hash_seed))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        str(SCRIPT),
        str(manifest),
        str(out),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        output = kill(proc)
        pytest.fail(
            f"torchrun did not finish in {LAUNCH_TIMEOUT:.0f} s (ranks out of step hang in "
            f"DDP's all-reduce):\n{output.decode(errors='replace')[-4000:]}"
        )
    except BaseException:  # pytest-timeout, Ctrl-C: leave no rank behind
        kill(proc)
        raise
    text = output.decode(errors="replace")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{text[-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def kill(proc: subprocess.Popen[bytes]) -> bytes:
    """Stop the launcher and every process under it; return its output.

    torchrun starts each rank in a session of its own (out of reach of ``killpg``) and
    stops them when it gets SIGTERM; whatever of the tree is left after that is killed,
    by process id. The ranks hold the output pipe, so they must be gone before reading it.
    """
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    output, _ = proc.communicate()
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[list[Record]]:
    """Two launches of the same training run: ``runs[launch][rank]``."""
    base = tmp_path_factory.mktemp("torchrun")
    manifest = base / "manifest.json"
    manifest.write_text(
        json.dumps({"n": N, "shards": write_shards(base), "counts": COUNTS}, indent=1)
    )
    return [launch(manifest, base / f"run{i}", hash_seed=i + 1) for i in range(2)]


def flat(batches: list[list[Any]]) -> list[Any]:
    return [x for batch in batches for x in batch]


def interleave(a: list[Any], b: list[Any]) -> list[Any]:
    return [x for pair in zip(a, b, strict=True) for x in pair]


DATASETS = ["map", "budget", "tar"]


# -- ranks ------------------------------------------------------------------------------------


def test_loaders_take_their_rank_from_torch_distributed(runs: list[list[Record]]) -> None:
    for ranks in runs:
        for r, record in enumerate(ranks):
            assert record["rank"] == r
            for name in DATASETS:
                assert (record[name]["rank"], record[name]["world_size"]) == (r, WORLD)


def test_a_loader_built_before_the_process_group_takes_its_rank_from_torchrun(
    runs: list[list[Record]],
) -> None:
    """Built before init_process_group, a loader used to be rank 0 of 1 on every rank:
    each trained on the whole dataset, silently. torchrun's RANK and WORLD_SIZE say."""
    for ranks in runs:
        shares = []
        for r, record in enumerate(ranks):
            assert (record["early"]["rank"], record["early"]["world_size"]) == (r, WORLD)
            shares.append([i for batch in record["early"]["ids"] for i in batch])
        # Each rank its own ceil(N / WORLD) samples (one padded), together the whole epoch.
        assert [len(share) for share in shares] == [-(-N // WORLD)] * WORLD
        assert set(shares[0]) | set(shares[1]) == set(range(N))


@pytest.mark.parametrize("name", DATASETS)
def test_every_rank_takes_the_same_number_of_batches(runs: list[list[Record]], name: str) -> None:
    for ranks in runs:
        for epoch in ("0", "1"):
            per_rank = [record[name]["epochs"][epoch] for record in ranks]
            assert [len(batches) for batches in per_rank] == [ranks[0][name]["len"]] * WORLD
            if name != "budget":  # budget batches hold as many samples as fit
                assert len(flat(per_rank[0])) == len(flat(per_rank[1]))


def test_ddp_ran_in_lockstep(runs: list[list[Record]]) -> None:
    """Every step all-reduced the gradients: both ranks took as many steps and ended with
    the same weights (a rank with an extra batch would have hung the run instead)."""
    for ranks in runs:
        assert ranks[0]["steps"] == ranks[1]["steps"] > 0
        assert ranks[0]["weights"] == ranks[1]["weights"]


# -- map-style ----------------------------------------------------------------------------------


@pytest.mark.parametrize("epoch", ["0", "1"])
def test_map_style_ranks_split_the_epoch_as_distributed_sampler(
    runs: list[list[Record]], epoch: str
) -> None:
    """Rank ``r`` takes positions ``r, r + 2, ...`` of the epoch's permutation, padded by
    wrapping around to ``2 * ceil(N / 2)`` samples: what torch's DistributedSampler gives
    over the same permutation."""
    a, b = (flat(record["map"]["epochs"][epoch]) for record in runs[0])
    share = math.ceil(N / WORLD)
    assert len(a) == len(b) == share
    padded = interleave(a, b)
    permutation, padding = padded[:N], padded[N:]
    assert sorted(permutation) == list(range(N))  # every sample, once, before the padding
    assert padding == permutation[: len(padding)] and len(padding) == WORLD * share - N
    # The ranks overlap only in the padding.
    assert set(a) & set(b) == set(padding)
    sampler = torch.utils.data.DistributedSampler
    for r, got in enumerate((a, b)):
        expected = sampler(range(N), num_replicas=WORLD, rank=r, shuffle=False)
        assert got == [permutation[i] for i in expected]
    # Batches of 4, the rank's last one short.
    sizes = [len(batch) for batch in runs[0][0]["map"]["epochs"][epoch]]
    assert sizes == [4] * (share // 4) + [share % 4]


# -- planned budget batches ----------------------------------------------------------------------


@pytest.mark.parametrize("epoch", ["0", "1"])
def test_budget_batches_fit_and_cover_the_epoch(runs: list[list[Record]], epoch: str) -> None:
    """Batches planned from per-index costs: each within the budget (or a single sample),
    and together the ranks' batches hold every sample, repeats only from the padding."""
    costs = [(i * 7) % 13 + 1 for i in range(N)]  # as tests/torchrun_train.py's costs(N)
    per_rank = [record["budget"]["epochs"][epoch] for record in runs[0]]
    for batches in per_rank:
        for batch in batches:
            assert sum(costs[i] for i in batch) <= 20 and 1 <= len(batch) <= 6
    assert set(flat(per_rank[0]) + flat(per_rank[1])) == set(range(N))


# -- tar shards ---------------------------------------------------------------------------------


@pytest.mark.parametrize("epoch", ["0", "1"])
def test_tar_ranks_yield_equal_counts(runs: list[list[Record]], epoch: str) -> None:
    a, b = (flat(record["tar"]["epochs"][epoch]) for record in runs[0])
    # As many samples as DistributedSampler would give each rank, from uneven shards.
    assert len(a) == len(b) == math.ceil(len(ALL_KEYS) / WORLD)
    assert set(a) | set(b) <= set(ALL_KEYS)


@pytest.mark.parametrize("epoch", ["0", "1"])
def test_tar_ranks_together_read_every_sample_once(runs: list[list[Record]], epoch: str) -> None:
    """Each sample is read by exactly one rank, except the few repeated to pad the ranks
    to equal counts: none lost, and no more repeats than the padding needs."""
    a, b = (flat(record["tar"]["epochs"][epoch]) for record in runs[0])
    seen = collections.Counter(a + b)
    assert set(seen) == set(ALL_KEYS)  # none lost
    padding = WORLD * math.ceil(len(ALL_KEYS) / WORLD) - len(ALL_KEYS)
    repeated = {key for key, count in seen.items() if count > 1}
    assert sum(seen.values()) - len(seen) == padding
    assert set(a) & set(b) <= repeated  # the ranks share only padding


# -- epochs and re-runs --------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS)
def test_epochs_differ_and_repeat_exactly_across_runs(runs: list[list[Record]], name: str) -> None:
    first, second = runs
    for r in range(WORLD):
        epochs = first[r][name]["epochs"]
        assert flat(epochs["0"]) != flat(epochs["1"])  # set_epoch reshuffles
        # Same seed, another process and hash seed: the same batches, in the same order.
        assert epochs == second[r][name]["epochs"]
        assert first[r][name]["resume"] == second[r][name]["resume"]
    if name == "map":  # each epoch, whatever its order, still covers the dataset
        for epoch in ("0", "1"):
            assert set().union(*(flat(rank["map"]["epochs"][epoch]) for rank in first)) == set(
                range(N)
            )


# -- resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS)
def test_resume_mid_epoch_yields_exactly_the_rest(runs: list[list[Record]], name: str) -> None:
    """Batches seen before the break, then those of a fresh loader resumed from the saved
    state: the uninterrupted epoch, none twice, none lost, on every rank."""
    for r, record in enumerate(runs[0]):
        resume = record[name]["resume"]
        state = resume["state"]
        assert (state["epoch"], state["rank"], state["world_size"]) == (1, r, WORLD)
        assert not state["finished"]
        full = record[name]["epochs"][str(resume["epoch"])]
        assert resume["before"] and resume["after"]
        got = flat(resume["before"]) + flat(resume["after"])
        assert collections.Counter(got) == collections.Counter(flat(full))
        # DataLoader hands batches out in order: the very same batches, in the same order.
        assert resume["before"] + resume["after"] == full
