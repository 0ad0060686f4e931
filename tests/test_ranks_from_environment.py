"""A Loader's rank and world size when torch.distributed is not initialised: from the
``RANK`` and ``WORLD_SIZE`` that torchrun sets, unless given. (The real torchrun run is in
test_torchrun.py; here the environment is set by hand, in one process.)"""

from __future__ import annotations

import numpy as np
import pytest

import asyncload as al


@pytest.fixture(autouse=True)
def no_ranks_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def share(loader: al.Loader) -> list[int]:
    return [int(x) for batch in loader for x in batch]


def test_without_environment_the_loader_is_rank_0_of_1() -> None:
    loader = al.Loader(al.from_sequence(np.arange(6)), batch_size=2)
    assert (loader.rank, loader.world_size) == (0, 1)
    assert share(loader) == list(range(6))


def test_torchruns_environment_gives_each_process_its_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shares = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        loader = al.Loader(al.from_sequence(np.arange(9)), batch_size=2)
        assert (loader.rank, loader.world_size) == (rank, 3)
        shares.append(share(loader))
    # Dealt as DistributedSampler deals: rank r takes positions r, r + 3, ...
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


def test_keywords_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = al.Loader(al.from_sequence(np.arange(4)), rank=0, world_size=1)
    assert (loader.rank, loader.world_size) == (0, 1)
    assert share(loader) == [0, 1, 2, 3]
    # One keyword given: the other still comes from the environment.
    assert al.Loader(al.from_sequence(np.arange(4)), rank=0).world_size == 2
    assert al.Loader(al.from_sequence(np.arange(4)), world_size=4).rank == 1


def test_the_environment_reaches_dataloader_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read once, as the Loader is built; the workers deal from the rank it read."""
    pytest.importorskip("torch")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = al.Loader(al.from_sequence(np.arange(8)), batch_size=2)
    batches = [b.tolist() for b in loader.to_torch_loader(num_workers=2)]
    assert sorted(x for batch in batches for x in batch) == [1, 3, 5, 7]


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"RANK": "one", "WORLD_SIZE": "2"}, r"RANK='one' is not an int"),
        ({"RANK": "0", "WORLD_SIZE": "2.0"}, r"WORLD_SIZE='2.0' is not an int"),
        (
            {"RANK": "2", "WORLD_SIZE": "2"},
            r"rank=2, world_size=2 \(RANK and WORLD_SIZE from the environment\)",
        ),
        (
            {"WORLD_SIZE": "2"},
            r"world_size=2 \(WORLD_SIZE from the environment\) needs rank= too .*RANK is not set",
        ),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, r"rank must be >= 0"),
    ],
)
def test_a_bad_environment_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], message: str
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        al.Loader(al.from_sequence(np.arange(4)))


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "")
    monkeypatch.setenv("WORLD_SIZE", " ")
    assert al.Loader(al.from_sequence(np.arange(4))).world_size == 1
