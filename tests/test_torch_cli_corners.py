"""Corners of to_torch_loader, progress and the command line: close() stops the thread of
an in-process run, a bar closes when the last statistics callback raises, and a bad
--json or --endpoint-url is a bad argument, before any run."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

import asyncload as al
from asyncload._cli import main as cli_main
from asyncload._cli import runner
from asyncload._cli.measure import Measurement

torch = pytest.importorskip("torch")


class Numbers(al.AsyncDataset[Any]):
    """Not in memory: a plain ``for`` runs it through the sync bridge's loop thread."""

    def __len__(self) -> int:
        return 400

    async def __getitem__(self, index: int) -> Any:
        return np.full(2, index)


def test_close_stops_the_thread_of_an_in_process_torch_loader() -> None:
    """api.md: ``loader.close()`` releases connections and threads. Under
    ``to_torch_loader()`` without workers the epoch runs in this process, in a copy of the
    loader (``_detached``/``for_worker``) whose sync iterator the original loader does not
    know, so ``close()`` (and ``with loader:``) leaves its event-loop thread running.
    (``DataLoader(loader.to_torch())`` iterates the loader itself, and is stopped.)"""
    loader = al.Loader(Numbers(), batch_size=4)
    before = set(threading.enumerate())
    batches = iter(loader.to_torch_loader(num_workers=0))
    next(batches)
    loader.close()
    left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert left == [], f"threads still running after loader.close(): {left}"
    del batches


class FakeBar:
    """A stand-in for ``tqdm.auto.tqdm`` that records whether it was closed."""

    made: ClassVar[list[FakeBar]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.closed = False
        FakeBar.made.append(self)

    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_the_bar_closes_when_the_last_statistics_callback_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """progress.py ``Reporter.end``: the last ``on_statistics`` snapshot is sent before the
    bar is closed, with no ``finally``; a metrics backend that fails there leaves the bar
    open (until the exception and its traceback are collected)."""
    pytest.importorskip("tqdm")
    monkeypatch.setattr("tqdm.auto.tqdm", FakeBar)
    FakeBar.made.clear()

    def backend(snapshot: dict[str, Any]) -> None:
        if snapshot["batches"] == 10:  # the end-of-epoch snapshot
            raise ConnectionError("metrics backend down")

    loader = al.Loader(
        al.from_sequence(np.arange(100)),
        batch_size=10,
        progress=True,
        on_statistics=backend,
        statistics_every=3,
    )
    with pytest.raises(ConnectionError, match="backend down"):
        for _ in loader:
            pass
    assert len(FakeBar.made) == 1
    assert FakeBar.made[0].closed, "the progress bar was left open"


def fake_run_all(spec: Any, configs: Any, *, on_result: Any = None) -> list[Any]:
    n = len(spec.keys)
    return [
        runner.Result(
            config=cfg,
            measurement=Measurement(samples=n, bytes=n, batches=1, samples_per_s=1.0),
            peak_rss_bytes=None,
        )
        for cfg in configs
    ]


@pytest.mark.parametrize("json_path", ["", "{tmp}/no-such-folder/"], ids=["empty", "slash"])
def test_an_unwritable_json_path_is_a_bad_argument(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    json_path: str,
) -> None:
    """cli.md: a bad argument exits 2 with a message naming it. ``_check_json_path``
    accepts ``--json ''`` and ``--json DIR/`` (a folder that does not exist): every
    configuration runs, then ``write_json`` crashes with a FileNotFoundError traceback
    (and leaves its ``.tmpPID`` file behind)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    calls: list[int] = []

    def counting_run_all(spec: Any, configs: Any, *, on_result: Any = None) -> list[Any]:
        calls.append(len(configs))
        return fake_run_all(spec, configs, on_result=on_result)

    monkeypatch.setattr(runner, "run_all", counting_run_all)
    argv = ["bench", str(data), "--workers", "0", "--json", json_path.format(tmp=tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(argv)
    assert exit_info.value.code == 2
    assert "argument --json" in capsys.readouterr().err
    assert calls == []  # refused before any configuration ran


def test_a_malformed_endpoint_url_is_a_bad_argument(capsys: pytest.CaptureFixture[str]) -> None:
    """cli.md: a bad argument exits 2 and names it. ``--endpoint-url`` is only checked for
    its ``http(s)://`` prefix; ``http://[::1`` reaches ``S3Source.from_prefix``, which
    ``_list_keys`` calls outside its ``try``: a ValueError traceback (exit 1)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["bench", "s3://bucket/prefix", "--endpoint-url", "http://[::1"])
    assert exit_info.value.code == 2
    assert "argument --endpoint-url" in capsys.readouterr().err
