"""Elastic resume for map-style loaders: the states of every rank, merged, resume the rest
of the epoch on another world size (and another number of DataLoader workers): each
remaining sample once across the new world."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncload as al

N = 61


def build(rank: int, world: int, **kwargs: Any) -> al.Loader:
    return al.Loader(
        al.from_sequence(np.arange(N)),
        batch_size=4,
        shuffle=True,
        seed=3,
        rank=rank,
        world_size=world,
        **kwargs,
    )


def flat(batches: list[Any]) -> list[int]:
    return [int(x) for batch in batches for x in batch]


def take(loader: al.Loader, batches: int) -> list[int]:
    got = []
    for batch in loader:
        got.append(batch)
        if len(got) == batches:
            break
    return flat(got)


@settings(max_examples=20, deadline=None)
@given(
    before=st.integers(1, 4),
    after=st.integers(1, 5),
    cuts=st.lists(st.integers(0, 6), min_size=4, max_size=4),
)
def test_merged_states_resume_on_another_world_size(
    before: int, after: int, cuts: list[int]
) -> None:
    seen: list[int] = []
    states = []
    for rank in range(before):
        loader = build(rank, before)
        seen += take(loader, cuts[rank]) if cuts[rank] else []
        states.append(loader.state_dict())
        loader.close()
    merged = build(0, after).merge_states(states)
    rest: list[int] = []
    for rank in range(after):
        loader = build(rank, after)
        loader.load_state_dict(merged)
        rest += flat(list(loader))
    if merged["finished"]:  # every rank had ended its epoch: a full new pass
        assert set(rest) == set(range(N))
        return
    # Every sample of the epoch is seen; nothing seen before the restart comes again; the
    # new world repeats only the padding that makes its shares equal.
    assert set(seen + rest) == set(range(N))
    assert not set(seen) & set(rest)
    assert len(rest) - len(set(rest)) <= after - 1


def test_merged_state_resumes_under_a_different_number_of_workers() -> None:
    states = []
    seen: list[int] = []
    for rank in range(2):
        loader = build(rank, 2)
        seen += take(loader, 3)
        states.append(loader.state_dict())
        loader.close()
    resumed = build(0, 1)
    resumed.load_state_dict(resumed.merge_states(states))
    rest = flat(list(resumed.to_torch_loader(num_workers=2)))
    assert sorted(seen + rest) == list(range(N))


def test_elastic_resume_can_be_saved_and_merged_again() -> None:
    states = [build(r, 3).state_dict() for r in range(3)]  # nothing delivered yet
    first_seen: list[int] = []
    second_states = []
    for rank in range(3):
        loader = build(rank, 3)
        first_seen += take(loader, 2)
        second_states.append(loader.state_dict())
        loader.close()
    del states
    middle: list[int] = []
    third_states = []
    merged = build(0, 2).merge_states(second_states)
    for rank in range(2):
        loader = build(rank, 2)
        loader.load_state_dict(merged)
        middle += take(loader, 2)
        third_states.append(loader.state_dict())
        loader.close()
    final = build(0, 1)
    final.load_state_dict(final.merge_states(third_states))
    rest = flat(list(final))
    assert sorted(first_seen + middle + rest) == list(range(N))


def test_a_finished_epoch_merges_to_a_finished_state() -> None:
    states = []
    for rank in range(2):
        loader = build(rank, 2)
        list(loader)
        states.append(loader.state_dict())
    merged = build(0, 3).merge_states(states)
    assert merged["finished"]


def test_a_rank_state_refuses_another_rank() -> None:
    state = build(0, 2).state_dict()
    with pytest.raises(ValueError, match="merge_states"):
        build(1, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="merge_states"):
        build(0, 3).load_state_dict(state)


def test_merge_needs_every_rank() -> None:
    with pytest.raises(ValueError, match="one state per rank"):
        build(0, 1).merge_states([build(0, 2).state_dict()])


def test_every_sample_delivered_before_any_loop_ended_merges_to_nothing_left() -> None:
    """Each rank checkpoints just after its last batch (its loop has not ended): the merged
    state resumes with nothing, as each rank's own would, not with the epoch again."""
    states = []
    for rank in range(2):
        loader = build(rank, 2)
        take(loader, len(loader))
        states.append(loader.state_dict())
        loader.close()
    assert not any(state["finished"] for state in states)
    resumed = build(0, 3)
    resumed.load_state_dict(resumed.merge_states(states))
    assert flat(list(resumed)) == []


def test_finished_ranks_with_drop_last_merge_to_a_finished_state() -> None:
    """drop_last trims a sample that no rank delivers: every rank finished all the same."""
    states = []
    for rank in range(2):
        loader = build(rank, 2, drop_last=True)
        list(loader)
        states.append(loader.state_dict())
    merged = build(0, 1, drop_last=True).merge_states(states)
    assert merged["finished"] and merged["excluded"] == []


def test_a_second_hop_merges_a_finished_rank_with_an_unfinished_one() -> None:
    seen: list[int] = []
    states = []
    for rank in range(2):
        loader = build(rank, 2)
        seen += take(loader, 2)
        states.append(loader.state_dict())
        loader.close()
    merged = build(0, 2).merge_states(states)
    hop = []
    for rank, cut in ((0, None), (1, 1)):  # rank 0 finishes, and drops the exclusions
        loader = build(rank, 2)
        loader.load_state_dict(merged)
        seen += flat(list(loader)) if cut is None else take(loader, cut)
        hop.append(loader.state_dict())
        loader.close()
    assert [state["finished"] for state in hop] == [True, False]
    final = build(0, 1)
    final.load_state_dict(final.merge_states(hop))
    assert sorted(seen + flat(list(final))) == list(range(N))


def test_states_that_are_not_one_ranks_are_refused_by_name() -> None:
    state = build(0, 1).state_dict()
    merged = build(0, 1).merge_states([state])
    for bad in ([merged], [{k: v for k, v in state.items() if k != "rank"}]):
        with pytest.raises(ValueError, match=r"one rank's Loader\.state_dict"):
            build(0, 1).merge_states(bad)
    loader = build(0, 1)
    for key, value, match in (
        ("progress", {}, "state\\['progress'\\]"),
        ("progress", None, "state\\['progress'\\]"),
        ("excluded", 5, "state\\['excluded'\\]"),
        ("epoch", -1, "state\\['epoch'\\]"),
    ):
        with pytest.raises(ValueError, match=match):
            loader.load_state_dict({**state, key: value})
    assert loader.state_dict() == state  # a refused state changes nothing
