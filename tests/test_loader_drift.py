"""Drift monitoring and schema validation through the Loader: ``Loader(drift=monitor)``
observes each sample after ``validate``, reports in ``statistics()["drift"]`` and judges
the epoch at its end; ``Loader(validate=al.Schema(...))`` turns bad samples into sample
errors under ``on_error``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import asyncload as al

pytestmark = pytest.mark.anyio

EDGES = np.linspace(-5, 5, 21)


def samples(n: int, shift: float, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"x": float(v), "label": int(i % 3)} for i, v in enumerate(rng.normal(shift, 1, n))]


def reference() -> dict[str, Any]:
    monitor = al.DriftMonitor(["x"], bins=EDGES)
    for sample in samples(2000, 0.0, seed=1):
        monitor.observe(sample)
    return monitor.to_dict()


async def epoch(loader: al.Loader) -> list[Any]:
    return [batch async for batch in loader]


async def test_same_distribution_reports_and_stays_quiet() -> None:
    monitor = al.DriftMonitor(["x"], reference=reference(), action="raise")
    loader = al.Loader(al.from_sequence(samples(500, 0.0, seed=2)), batch_size=50, drift=monitor)
    batches = await epoch(loader)
    assert sum(len(b["x"]) for b in batches) == 500
    report = loader.statistics()["drift"]["x"]
    assert report["count"] == 500
    assert not report["drifted"]
    assert report["psi"] < 0.1


async def test_shifted_data_raises_at_the_end_of_the_epoch() -> None:
    monitor = al.DriftMonitor(["x"], reference=reference(), action="raise")
    loader = al.Loader(al.from_sequence(samples(500, 1.5, seed=3)), batch_size=50, drift=monitor)
    got: list[Any] = []
    with pytest.raises(al.DriftError, match="'x'"):
        async for batch in loader:
            got.append(batch)
    assert len(got) == 10  # every batch arrived; the verdict comes after the last
    assert loader.statistics()["drift"]["x"]["drifted"]


async def test_shifted_data_warns_and_each_epoch_is_judged_alone() -> None:
    shifted = samples(300, 2.0, seed=4)
    monitor = al.DriftMonitor(["x"], reference=reference())
    loader = al.Loader(al.from_sequence(shifted), batch_size=30, drift=monitor)
    with pytest.warns(al.DriftWarning):
        await epoch(loader)
    with pytest.warns(al.DriftWarning):
        await epoch(loader)
    assert loader.statistics()["drift"]["x"]["count"] == 300  # reset per epoch


def test_drift_through_the_sync_bridge() -> None:
    monitor = al.DriftMonitor(["x"], reference=reference(), action="raise")
    loader = al.Loader(al.from_sequence(samples(300, 2.0, seed=5)), batch_size=30, drift=monitor)
    with pytest.raises(al.DriftError):
        list(loader)


def test_drift_must_be_a_monitor() -> None:
    with pytest.raises(TypeError, match="drift"):
        al.Loader(al.from_sequence([1]), drift="x")  # type: ignore[arg-type]


async def test_schema_as_validate_skips_bad_samples() -> None:
    data = [{"image": np.zeros((2, 2), np.uint8), "label": i % 12} for i in range(24)]
    schema = al.Schema(
        {"image": al.Array(dtype="uint8", shape=(2, 2)), "label": al.Int(min=0, max=9)}
    )
    loader = al.Loader(al.from_sequence(data), batch_size=4, validate=schema, on_error="skip")
    labels = [int(x) for batch in await epoch(loader) for x in batch["label"]]
    assert labels == [i % 12 for i in range(24) if i % 12 <= 9]
    stats = loader.statistics()
    assert stats["skipped"] == 4
    assert "label" in stats["error_log"][0]["error"]
    assert "max=9" in stats["error_log"][0]["error"]
