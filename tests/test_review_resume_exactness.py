"""Review (helper-77): what a training run sees across an interruption (state_dict /
load_state_dict) with the Loader's batching options, samplers and mixes. Each test here
failed before its fix."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import pytest

import asyncload as al

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def _take(loader: al.Loader, k: int) -> list[Any]:
    got: list[Any] = []
    if k == 0:
        return got
    for batch in loader:
        got.append(batch)
        if len(got) == k:
            break
    return got


def _ints(batches: list[Any]) -> list[list[int]]:
    return [[int(x) for x in batch] for batch in batches]


def test_resume_with_another_batch_size_under_torch_workers_keeps_the_loaders_order() -> None:
    """distributed.md: a map-style state may be resumed with another ``batch_size`` and
    any number of DataLoader workers; dataloader.md: a map-style loader's batches come
    through the workers "in the loader's own order". Saved after 3 batches of 4, resumed
    with batch_size=3 through ``to_torch_loader(num_workers=2)``: the batches come
    pairwise swapped ([15,16,17], [12,13,14], [21,22,23], [18,19,20]) where the same
    resumed loader iterated directly gives [12,13,14], [15,16,17], ... (Was:
    ``Loader.for_worker`` rotated the workers by ``resume.batches``, batches of the old
    size, instead of by the rank batch that holds the next position in the new size.)"""
    pytest.importorskip("torch")

    def build(batch_size: int) -> al.Loader:
        return al.Loader(al.from_sequence(np.arange(24)), batch_size=batch_size, collate_fn=list)

    first = build(4)
    assert _ints(_take(first, 3)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    state = first.state_dict()
    first.close()

    direct = build(3)
    direct.load_state_dict(state)
    expected = _ints(list(direct))
    assert expected == [[12, 13, 14], [15, 16, 17], [18, 19, 20], [21, 22, 23]]

    resumed = build(3)
    resumed.load_state_dict(state)
    got = _ints(list(resumed.to_torch_loader(num_workers=2)))
    assert got == expected


def _mix_loader(first_part: int, weights: list[float], stop: str) -> al.Loader:
    parts = [
        al.from_sequence(list(range(first_part))),
        al.from_sequence(list(range(1000, 1030))),
    ]
    return al.Loader(
        al.mix(parts, weights, stop=stop), batch_size=4, shuffle=True, seed=1, collate_fn=list
    )


@pytest.mark.parametrize(
    ("changed", "saved", "loaded"),
    [
        # a sample added to a part (a file added to its directory), stop="first": the
        # mix's num_samples() is None, so the plan records no length at all
        ("part length", (40, [1.0, 1.0], "first"), (41, [1.0, 1.0], "first")),
        # the mixing weights changed (stop="all": the same total length)
        ("weights", (40, [1.0, 1.0], "all"), (40, [3.0, 1.0], "all")),
    ],
)
def test_a_mid_epoch_mix_state_is_refused_by_a_mix_of_another_plan(
    changed: str, saved: tuple[Any, ...], loaded: tuple[Any, ...]
) -> None:
    """distributed.md: a mid-epoch state loaded into a loader of another plan ("a file
    added to the dataset's directory") is refused with a ValueError naming the setting;
    "resumed anyway, it would repeat some samples and never yield others". For an
    ``al.mix`` of map-style parts, a part's length (stop="first") or the weights may
    change and the state loads silently: the resumed epoch repeats samples the saved run
    had already delivered (shown below before the refusal is asserted). (Was:
    ``Loader._plan_state`` recorded only ``dataset.num_samples()`` for a stream, None for
    a stop="first" mix and the same sum for other weights; now the plan holds the mix's
    ``dataset_plan``: weights, stop and part sizes.)"""
    first = _mix_loader(*saved)
    taken = _take(first, 3)
    state = first.state_dict()
    first.close()

    resumed = _mix_loader(*loaded)
    try:
        resumed.load_state_dict(state)
    except ValueError:
        return  # refused: what is expected
    rest = list(resumed)
    counts = collections.Counter(int(x) for batch in taken + rest for x in batch)
    repeated = sorted(x for x, c in counts.items() if c > 1)
    pytest.fail(
        f"a mid-epoch state of a mix whose {changed} changed was accepted; the resumed "
        f"epoch delivered again {repeated} (already taken before the save)"
    )
