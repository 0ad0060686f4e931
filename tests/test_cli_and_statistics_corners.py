"""Corners of the command line (``python -m asyncload bench``) and of statistics (found
by helper-57): a stray ``$AWS_ENDPOINT_URL`` outside S3, URL lists from a pipe or with a
BOM, ``buffered`` after a break, the error log's last entry.

The command-line tests run ``main()`` in-process with a fake ``run_all`` (no child
processes), or call ``resolve()`` directly: no configuration is timed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from test_torch_cli_corners import fake_run_all

import asyncload as al
from asyncload._cli import main as cli_main
from asyncload._cli import runner
from asyncload._cli.sources import S3Options, resolve

ANYIO_BACKENDS = ["asyncio"]


# -- the command line ---------------------------------------------------------------------


def test_a_stray_aws_endpoint_url_does_not_break_a_directory_bench(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--endpoint-url``'s default is ``$AWS_ENDPOINT_URL`` *with* ``type=_endpoint_url``:
    argparse runs the type on a string default, so an environment value the S3 check
    dislikes (``localhost:9000``, set for some other tool) makes ``bench /local/dir`` exit
    2 with "argument --endpoint-url: must be an http(s) URL" although no S3 is involved
    and the user never typed --endpoint-url."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"abc")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "localhost:9000")
    monkeypatch.setattr(runner, "run_all", fake_run_all)
    try:
        status = cli_main.main(["bench", str(data), "--workers", "0", "--concurrency", "2"])
    except SystemExit as exc:  # the bug: argparse refuses the environment's default
        status = exc.code
    assert status == 0, capsys.readouterr().err


def test_a_url_list_from_process_substitution_is_read(tmp_path: Path) -> None:
    """``bench <(grep ... urls.txt)`` passes ``/dev/fd/N``, a pipe: ``resolve`` only takes
    ``os.path.isfile`` paths, so it answers "no such file or directory" for a file that is
    there and readable (the same for ``--urls /dev/fd/N``)."""
    urls = ["http://127.0.0.1:1/a", "http://127.0.0.1:1/b"]
    r, w = os.pipe()
    try:
        os.write(w, ("\n".join(urls) + "\n").encode())
        os.close(w)
        w = -1
        spec = resolve(f"/dev/fd/{r}", urls_file=None, limit=10, s3=S3Options())
    finally:
        os.close(r)
        if w != -1:
            os.close(w)
    assert spec.kind == "http" and spec.keys == urls


def test_a_url_list_with_a_utf8_bom_is_read(tmp_path: Path) -> None:
    """A URL list saved as "UTF-8 with BOM" (PowerShell's ``Out-File -Encoding utf8``,
    Excel's CSV export, older Notepad) starts with U+FEFF: read as ``utf-8`` the first line
    is ``'\\ufeffhttp://...'`` and the list is refused as "not an http(s) URL"."""
    urls = ["http://127.0.0.1:1/a", "http://127.0.0.1:1/b"]
    path = tmp_path / "urls.txt"
    path.write_text("\n".join(urls) + "\n", encoding="utf-8-sig")
    spec = resolve(str(path), urls_file=None, limit=10, s3=S3Options())
    assert spec.keys == urls


# -- statistics() --------------------------------------------------------------------------


class Numbers(al.AsyncDataset[Any]):
    """Not in memory: its epochs run as background tasks."""

    def __len__(self) -> int:
        return 100

    async def __getitem__(self, index: int) -> Any:
        await anyio.lowlevel.checkpoint()
        return np.int64(index)


@pytest.mark.anyio
async def test_buffered_returns_to_zero_after_a_break_under_async_for() -> None:
    """After ``break`` out of ``async for`` the epoch is discarded (its task cancelled, its
    receive stream closed), but ``statistics()["buffered"]`` still reports the batches that
    were in the closed stream, until ``aclose()``: a gauge fed from it (observability.md's
    Prometheus example) shows batches "waiting for the consumer" of a dead epoch."""
    loader = al.Loader(Numbers(), batch_size=5, concurrency=4, prefetch=2)
    async for _batch in loader:
        for _ in range(1000):  # let the epoch fill its buffer (no real sleep)
            if loader.statistics()["buffered"] == 2:
                break
            await anyio.lowlevel.checkpoint()
        assert loader.statistics()["buffered"] == 2
        break
    for _ in range(10):  # the cancelled epoch's task runs its cancellation
        await anyio.lowlevel.checkpoint()
    stats = loader.statistics()
    try:
        assert (stats["buffered"], stats["in_flight"]) == (0, 0)
    finally:
        await loader.aclose()


def test_error_log_names_the_sample_that_failed_the_epoch() -> None:
    """``errors`` counts every failed sample, but ``ErrorPolicy.failed`` returns before
    ``log_error`` when the sample tips ``max_errors`` or when the ``on_error`` callable
    itself raises: ``error_log`` (api.md: "the first 100 failed samples of the epoch")
    misses exactly the sample that made the epoch raise."""

    def check(x: int) -> int:
        if x % 10 == 3:
            raise ValueError(f"bad value {x}")
        return x

    data = al.from_sequence(np.arange(40)).map(check)
    over_budget = al.Loader(data, batch_size=10, on_error="skip", max_errors=2, concurrency=1)
    with pytest.raises(al.AsyncloadError):
        for _ in over_budget:
            pass
    stats = over_budget.statistics()
    assert stats["errors"] == 3
    assert [e["index"] for e in stats["error_log"]] == [3, 13, 23]

    def broken_handler(index: int, exc: BaseException) -> Any:
        raise RuntimeError("the handler failed too")

    handled = al.Loader(data, batch_size=10, on_error=broken_handler, concurrency=1)
    with pytest.raises(al.SampleError):
        for _ in handled:
            pass
    stats = handled.statistics()
    assert stats["errors"] == 1
    assert [e["index"] for e in stats["error_log"]] == [3]


def test_a_bad_aws_endpoint_url_is_named_for_an_s3_source(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """For an ``s3://`` source the environment's endpoint is still checked, before any
    request, and the error says where the value came from."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "localhost:9000")
    with pytest.raises(SystemExit) as exited:
        cli_main.main(["bench", "s3://bucket/prefix"])
    assert exited.value.code == 2
    assert "--endpoint-url: (from $AWS_ENDPOINT_URL)" in capsys.readouterr().err


def test_an_epoch_ends_when_its_last_statistics_call_raises() -> None:
    """The end-of-epoch snapshot's on_statistics raising skipped recording the end: the
    state said the epoch was unfinished, so a resume delivered an empty pass of it."""

    def callback(snapshot: dict[str, Any]) -> None:
        if snapshot["samples"] == 4:
            raise RuntimeError("logger down")

    loader = al.Loader(al.from_sequence(list(range(4))), batch_size=2, on_statistics=callback)
    with pytest.raises(RuntimeError, match="logger down"):
        list(loader)
    assert loader.state_dict()["finished"] is True


def test_an_installed_asyncload_puts_nothing_before_the_standard_library(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The measure child got the package's parent folder first on PYTHONPATH; installed,
    that is site-packages, which then came before the standard library in the child."""
    import site

    parent = str(Path(runner.__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert runner._child_env()["PYTHONPATH"] == os.pathsep.join([parent, "/elsewhere"])
    monkeypatch.setattr(site, "getsitepackages", lambda: [parent])
    assert runner._child_env()["PYTHONPATH"] == "/elsewhere"
