"""Watching a run: ``progress=True`` (a tqdm bar) and ``on_statistics`` every N batches."""

from __future__ import annotations

import sys
from typing import Any

import pytest

import asyncload as al

pytestmark = pytest.mark.anyio


def loader(**kwargs: Any) -> al.Loader:
    return al.Loader(al.from_sequence(list(range(1000))), batch_size=10, **kwargs)


async def test_statistics_every_n_batches_and_at_the_end() -> None:
    got: list[dict[str, Any]] = []
    run = loader(on_statistics=got.append, statistics_every=30)
    _ = [b async for b in run]
    assert [s["batches"] for s in got] == [30, 60, 90, 100]
    assert got[-1]["samples"] == 1000


def test_statistics_through_the_sync_bridge_and_a_break() -> None:
    got: list[dict[str, Any]] = []
    run = loader(on_statistics=got.append, statistics_every=40)
    list(run)
    assert [s["batches"] for s in got] == [40, 80, 100]
    got.clear()
    for i, _ in enumerate(run):
        if i == 44:
            break
    assert [s["batches"] for s in got] == [40, 45]  # the last when the loop is left


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    list(loader(progress=True))
    err = capsys.readouterr().err
    assert "100/100" in err
    assert "samples/s" in err


def test_progress_needs_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match="pip install tqdm"):
        list(loader(progress=True))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"statistics_every": 0}, ValueError), ({"on_statistics": 3}, TypeError)],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        loader(**kwargs)
