"""Side-by-side image-folder benchmark: asyncload's ImageFolder vs a torchvision-style
ImageFolder under torch's DataLoader, on the same folder of small JPEGs::

    .venv/bin/python benchmarks/bench_images.py [--quick] [--out PATH] [--render docs/benchmarks.md]

The folder is generated first, in a temporary directory: 10 classes x 200 JPEGs of 64x64
(quality 90; 10 x 40 with ``--quick``), gradients plus noise, so that they compress like
photos rather than flat colour. Every peer reads it from the page cache and yields
shuffled batches of 32 as torch tensors: ``uint8`` images (32, 64, 64, 3) and ``int64``
labels. Peers:

* ``asyncload-async``: ``al.Loader(al.ImageFolder(root), batch_size=32, concurrency=C,
  shuffle=True, collate_fn=...)`` under ``async for`` on uvloop; the default decoder
  (Pillow -> RGB -> numpy ``uint8`` HWC, in worker threads, a chunk of images per thread
  call), the collate stacks with numpy and wraps in torch tensors (``torch.from_numpy``);
* ``asyncload-sync``: the same loader under ``for batch in loader`` (background loop);
* ``dataloader``: ``torch.utils.data.DataLoader(folder, batch_size=32, shuffle=True,
  num_workers=W, persistent_workers=W > 0)`` over torchvision's ``ImageFolder(root,
  transform=np.array)`` when torchvision imports, else over a faithful minimal equivalent
  written here (torchvision's class and file rules, its ``pil_loader``: open the file,
  ``Image.open``, ``convert("RGB")``; then ``np.array``; torch's default collate). The
  output says which one ran.

Each run is a fresh subprocess that imports torch (as a training process has), runs
several epochs, and checks every image: each carries its index in a flat 16x16 corner
block, so each run must yield every image exactly once per epoch with its right label.
Measured: images/s from the first batch to the last (all epochs), time from building the
dataset to the first batch, peak summed RSS of the process and its children (DataLoader
workers), CPU per image. A separate child measures the per-image costs: decode, read +
decode, a thread hop, and ``getitems`` of a chunk vs one ``await ds[i]`` per image.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    ROOT,
    MiB,
    PeakRSS,
    machine_info,
    median,
    tree_cpu_seconds,
)

BATCH_SIZE = 32
IMAGE_SIZE = 64
QUALITY = 90
CLASSES = 10
BLOCK = 16  # the flat corner block that carries an image's index (one JPEG MCU)
RESULT_PREFIX = "RESULT "
BEGIN = "<!-- images:begin -->"
END = "<!-- images:end -->"

PEER_NAMES = {
    "asyncload-async": "asyncload `ImageFolder`, `async for` (uvloop), concurrency {c}",
    "asyncload-sync": "asyncload `ImageFolder`, `for batch in loader`, concurrency {c}",
    "dataloader": "torch DataLoader, {c} workers, {baseline}",
}


# --------------------------------------------------------------------------- the folder


def index_colour(index: int) -> tuple[int, int, int]:
    """The corner colour that encodes ``index`` (< 4096): a base-16 digit per channel, in
    steps of 16, so JPEG's few levels of error cannot turn one index into another."""
    return (8 + 16 * (index % 16), 8 + 16 * (index // 16 % 16), 8 + 16 * (index // 256))


def decode_indices(images: Any) -> Any:
    """The indices carried by a batch of HWC images (numpy or torch, uint8)."""
    import numpy as np

    block = np.asarray(images)[:, 4:12, 4:12, :].astype(np.float32).mean(axis=(1, 2))
    digits = np.rint((block - 8) / 16).astype(np.int64)
    return digits[:, 0] + 16 * digits[:, 1] + 256 * digits[:, 2]


def make_folder(root: Path, per_class: int, seed: int = 0) -> int:
    """``root/class_CC/IIII.jpg``: ``CLASSES`` x ``per_class`` JPEGs; image ``c * per_class
    + i`` (its index in ImageFolder order) carries that index. Returns the bytes written."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    total = 0
    for c in range(CLASSES):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            base = np.stack(
                [
                    (xx * (c + 1) * 4 + i) % 256,
                    (yy * 3 + c * 20) % 256,
                    ((xx + yy) * 2 + i * 7) % 256,
                ],
                axis=-1,
            )
            pixels = np.clip(base + rng.integers(0, 24, base.shape), 0, 255).astype(np.uint8)
            pixels[:BLOCK, :BLOCK] = index_colour(c * per_class + i)
            path = folder / f"{i:04d}.jpg"
            Image.fromarray(pixels).save(path, quality=QUALITY)
            total += path.stat().st_size
    return total


# --------------------------------------------------------------------------- one run


@dataclass
class Config:
    peer: str  # "asyncload-async" | "asyncload-sync" | "dataloader"
    concurrency: int  # the Loader's concurrency, or the DataLoader's num_workers
    epochs: int
    images: int  # per epoch
    per_class: int

    @property
    def key(self) -> str:
        return f"{self.peer}/{self.concurrency}"


@dataclass
class Result:
    config: Config
    round: int = 0
    ok: bool = False
    error: str | None = None
    images_per_s: float = float("nan")
    first_batch_s: float = float("nan")
    peak_rss_bytes: int = 0
    cpu_us_per_image: float = float("nan")
    wall_s: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)


class Checker:
    """Checks each batch (shapes, dtypes, each image's index and label) and times them."""

    def __init__(self, cfg: Config, cpu_probe: Callable[[], float]) -> None:
        import numpy as np

        self.cfg = cfg
        self.cpu_probe = cpu_probe
        self.seen = np.zeros(cfg.images, dtype=np.int64)  # deliveries per image, all epochs
        self.count = 0
        self.first_count = 0
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.t_last = self.t0
        self.cpu_first = self.cpu_last = 0.0

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def batch(self, images: Any, labels: Any) -> None:
        import numpy as np
        import torch

        now = time.perf_counter()
        if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor)):
            raise TypeError(f"batch is ({type(images).__name__}, {type(labels).__name__})")
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"images are {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or len(labels) != len(images):
            raise ValueError(f"labels are {labels.dtype} {tuple(labels.shape)}")
        indices = decode_indices(images.numpy())
        if indices.min() < 0 or indices.max() >= self.cfg.images:
            raise ValueError(f"an image carries an index out of range: {indices.tolist()}")
        if not np.array_equal(indices // self.cfg.per_class, labels.numpy()):
            raise ValueError("an image came with another class's label")
        np.add.at(self.seen, indices, 1)
        self.count += len(indices)
        if self.t_first is None:
            self.t_first, self.first_count = now, len(indices)
            self.cpu_first = self.cpu_probe()
        self.t_last = now
        if self.count == self.cfg.images * self.cfg.epochs:
            self.cpu_last = self.cpu_probe()  # probing every batch would cost the loader

    def finish(self) -> None:
        if self.t_first is None:
            raise ValueError("no batch arrived")
        if not (self.seen == self.cfg.epochs).all():
            bad = int((self.seen != self.cfg.epochs).sum())
            raise ValueError(f"{bad} images were not delivered exactly once per epoch")

    @property
    def images_per_s(self) -> float:
        assert self.t_first is not None
        span = self.t_last - self.t_first
        return (self.count - self.first_count) / span if span > 0 else float("nan")

    @property
    def cpu_us_per_image(self) -> float:
        measured = self.count - self.first_count
        return (self.cpu_last - self.cpu_first) / measured * 1e6 if measured else float("nan")


def _torch_collate(samples: list[tuple[Any, int]]) -> tuple[Any, Any]:
    """asyncload's default collate (numpy), then torch tensors without a copy."""
    import torch

    import asyncload as al

    images, labels = al.default_collate(samples)
    return torch.from_numpy(images), torch.from_numpy(labels)


def run_asyncload(cfg: Config, root: str, check: Checker, *, sync: bool) -> dict[str, Any]:
    import asyncload as al

    def build() -> Any:
        return al.Loader(
            al.ImageFolder(root),
            batch_size=BATCH_SIZE,
            concurrency=cfg.concurrency,
            shuffle=True,
            collate_fn=_torch_collate,
        )

    if sync:
        check.start()
        with build() as loader:
            for epoch in range(cfg.epochs):
                loader.set_epoch(epoch)
                for images, labels in loader:
                    check.batch(images, labels)
        return {}

    from benchmarks.server import run_event_loop

    async def main() -> None:
        check.start()
        async with build() as loader:
            for epoch in range(cfg.epochs):
                loader.set_epoch(epoch)
                async for images, labels in loader:
                    check.batch(images, labels)

    run_event_loop(main())
    return {}


def folder_dataset(root: str) -> tuple[Any, str]:
    """torchvision's ``ImageFolder(root, transform=np.array)`` when torchvision imports;
    else the faithful equivalent below. Returns (dataset, which one)."""
    import numpy as np

    try:
        import torchvision
        from torchvision.datasets import ImageFolder
    except Exception:  # not installed, or a build that does not match this torch
        return MinimalImageFolder(root, transform=np.array), "minimal ImageFolder equivalent"
    return ImageFolder(
        root, transform=np.array
    ), f"torchvision {torchvision.__version__} ImageFolder"


class MinimalImageFolder:
    """torchvision's ``ImageFolder`` reduced to what this benchmark uses: the same class
    and file rules (``find_classes``, ``make_dataset``) and the same ``pil_loader``."""

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

    def __init__(self, root: str, transform: Callable[[Any], Any]) -> None:
        self.transform = transform
        self.classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for name in self.classes:
            for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
                for file in sorted(files):
                    if file.lower().endswith(self.EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, file), self.class_to_idx[name]))
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        path, target = self.samples[index]
        with open(path, "rb") as f:
            image = Image.open(f)
            image = image.convert("RGB")
        return self.transform(image), target


def run_dataloader(cfg: Config, root: str, check: Checker) -> dict[str, Any]:
    import torch.utils.data

    warnings.filterwarnings("ignore", message=".*suggested max number of worker")
    check.start()
    dataset, baseline = folder_dataset(root)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        shuffle=True,
        num_workers=cfg.concurrency,
        persistent_workers=cfg.concurrency > 0,
    )
    for epoch in range(cfg.epochs):
        torch.manual_seed(epoch)
        for images, labels in loader:
            check.batch(images, labels)
    del loader  # stops persistent workers before the RSS sampler's last reading
    return {"baseline": baseline}


def run_one(cfg: Config, root: str) -> Result:
    """One configuration in this process (the subprocess side)."""
    import torch  # a training process has torch loaded: the same baseline RSS for all

    import asyncload

    del torch, asyncload
    rss = PeakRSS(0.05)
    check = Checker(cfg, cpu_probe=lambda: tree_cpu_seconds() - rss.cpu_s)
    wall0 = time.perf_counter()
    with rss:
        if cfg.peer == "dataloader":
            extra = run_dataloader(cfg, root, check)
        else:
            extra = run_asyncload(cfg, root, check, sync=cfg.peer == "asyncload-sync")
    check.finish()
    assert check.t_first is not None
    return Result(
        config=cfg,
        ok=True,
        images_per_s=check.images_per_s,
        first_batch_s=check.t_first - check.t0,
        peak_rss_bytes=rss.peak,
        cpu_us_per_image=check.cpu_us_per_image,
        wall_s=time.perf_counter() - wall0,
        extra=extra,
    )


def measure_costs(root: str, repeats: int) -> dict[str, float]:
    """Per-image costs on this folder, single-threaded where it says so (µs): decode from
    bytes; read + decode; one thread hop (asyncio, uvloop); ``getitems`` of 32 images per
    call vs one ``await ds[i]`` (one thread hop) per image, in sequence."""
    import anyio
    import anyio.to_thread

    import asyncload as al

    ds = al.ImageFolder(root)
    paths = list(ds.keys)
    blobs = []
    for path in paths:
        with open(path, "rb") as f:
            blobs.append(f.read())

    def per_image(fn: Callable[[], object]) -> Callable[[], float]:
        def one_pass() -> float:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) / len(paths) * 1e6

        return one_pass

    def decode_all() -> None:
        for blob in blobs:
            al.decode_image(blob)

    def read_decode_all() -> None:
        for path in paths:
            with open(path, "rb") as f:
                al.decode_image(f.read())

    def hop(backend_options: dict[str, Any]) -> Callable[[], float]:
        async def main() -> float:
            def noop() -> None:
                return None

            for _ in range(200):
                await anyio.to_thread.run_sync(noop)
            t = time.perf_counter()
            for _ in range(2000):
                await anyio.to_thread.run_sync(noop)
            return (time.perf_counter() - t) / 2000 * 1e6

        return lambda: anyio.run(main, backend_options=backend_options)

    def chunked() -> None:
        async def main() -> None:
            for start in range(0, len(ds), BATCH_SIZE):
                await ds.getitems(range(start, min(start + BATCH_SIZE, len(ds))))

        anyio.run(main, backend_options={"use_uvloop": True})

    def one_by_one() -> None:
        async def main() -> None:
            for i in range(len(ds)):
                await ds[i]

        anyio.run(main, backend_options={"use_uvloop": True})

    measures = {
        "decode_us": per_image(decode_all),
        "read_decode_us": per_image(read_decode_all),
        "hop_asyncio_us": hop({}),
        "hop_uvloop_us": hop({"use_uvloop": True}),
        "getitems_chunk_of_32_us": per_image(chunked),
        "getitem_one_by_one_us": per_image(one_by_one),
    }
    best = dict.fromkeys(measures, math.inf)
    # Round-robin passes, the best of each kept: other load on the machine slows some
    # passes, never speeds one up. The first pass also warms up.
    for _ in range(1 + repeats):
        for name, one_pass in measures.items():
            best[name] = min(best[name], one_pass())
    return {**best, "passes": 1 + repeats}


# --------------------------------------------------------------------------- orchestration


def plan(quick: bool, per_class: int) -> list[Config]:
    images = CLASSES * per_class
    epochs = 1 if quick else 5
    grid = (
        # DataLoader first: its workers fork from a process where no loader thread ran yet.
        [("dataloader", 0), ("dataloader", 2), ("asyncload-async", 64), ("asyncload-sync", 64)]
        if quick
        else [
            ("asyncload-async", 32),
            ("asyncload-async", 64),
            ("asyncload-async", 128),
            ("asyncload-sync", 64),
            ("dataloader", 0),
            ("dataloader", 2),
            ("dataloader", 4),
        ]
    )
    return [Config(peer, c, epochs, images, per_class) for peer, c in grid]


def run_child(payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``payload`` in a fresh interpreter (see :func:`child_main`); returns its answer,
    or ``{"error": ...}`` when it gave none."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(payload)]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            answer: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return answer
    return {
        "error": f"exit status {proc.returncode}, no result: {_tail(proc.stderr or proc.stdout)}"
    }


def child_main(payload: dict[str, Any]) -> int:
    """Run ``payload``'s configurations in order in this process, then (with ``repeats``)
    measure the per-image costs; print one result line."""
    answer: dict[str, Any] = {"results": [], "costs": None}
    status = 0
    for spec in payload["configs"]:
        cfg = Config(**spec)
        try:
            result = run_one(cfg, payload["root"])
        except Exception as exc:
            where = traceback.format_exc().strip().splitlines()[-3:-1]
            result = Result(
                config=cfg,
                error=f"{type(exc).__name__}: {exc} [{' / '.join(w.strip() for w in where)}]",
            )
            status = 1
        answer["results"].append(_clean(asdict(result)))
    if payload.get("repeats"):
        try:
            answer["costs"] = {"ok": True, **measure_costs(payload["root"], payload["repeats"])}
        except Exception as exc:
            answer["costs"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            status = 1
    print(RESULT_PREFIX + json.dumps(answer), flush=True)
    return status


def _results(answer: dict[str, Any], configs: list[Config], round_: int) -> list[Result]:
    """The child's results for ``configs`` (failed ones where it gave none), logged."""
    got = answer.get("results") or []
    out = []
    for i, cfg in enumerate(configs):
        if i < len(got):
            fields = {k: v for k, v in got[i].items() if k not in ("config", "round")}
            result = Result(config=cfg, round=round_, **fields)
        else:
            result = Result(config=cfg, round=round_, error=answer.get("error") or "no result")
        for name in ("images_per_s", "first_batch_s", "cpu_us_per_image", "wall_s"):
            if getattr(result, name) is None:
                setattr(result, name, float("nan"))
        status = (
            f"{result.images_per_s:8,.0f} images/s  first {result.first_batch_s:6.3f} s  "
            f"rss {result.peak_rss_bytes / MiB:6,.0f} MiB"
            if result.ok
            else f"FAILED: {result.error}"
        )
        print(f"[round {round_ + 1}] {cfg.key:<20} {status}", file=sys.stderr, flush=True)
        out.append(result)
    return out


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def summarize(results: list[Result], configs: list[Config]) -> list[dict[str, Any]]:
    """Medians over rounds, one row per configuration, in plan order."""
    rows = []
    for cfg in configs:
        runs = [r for r in results if r.config.key == cfg.key]
        good = [r for r in runs if r.ok]
        baselines = sorted({str(r.extra.get("baseline")) for r in good if "baseline" in r.extra})
        rows.append(
            {
                "peer": cfg.peer,
                "concurrency": cfg.concurrency,
                "baseline": baselines[0] if baselines else None,
                "images_per_epoch": cfg.images,
                "epochs": cfg.epochs,
                "runs": len(runs),
                "ok_runs": len(good),
                "images_per_s": _finite(median(r.images_per_s for r in good)),
                "images_per_s_all": [_finite(r.images_per_s) for r in good],
                "first_batch_s": _finite(median(r.first_batch_s for r in good)),
                "peak_rss_mib": _finite(median(r.peak_rss_bytes / MiB for r in good)),
                "cpu_us_per_image": _finite(median(r.cpu_us_per_image for r in good)),
                "errors": [r.error for r in runs if not r.ok],
            }
        )
    return rows


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def _clean(obj: Any) -> Any:
    """NaN to None, recursively, so the JSON is standard."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def _loads(values: list[float] | None) -> str:
    return "n/a" if not values else ", ".join(f"{v:.2f}" for v in values)


def _num(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def peer_name(row: dict[str, Any]) -> str:
    return PEER_NAMES[row["peer"]].format(
        c=row["concurrency"], baseline=row.get("baseline") or "ImageFolder"
    )


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{'peer':<17} {'conc/W':>6} {'images/s':>9} {'1st batch s':>11} "
        f"{'peak RSS MiB':>12} {'CPU us/img':>10} {'ok':>5}"
    ]
    for row in report["summary"]:
        lines.append(
            f"{row['peer']:<17} {row['concurrency']:>6} {_num(row['images_per_s'], ',.0f'):>9} "
            f"{_num(row['first_batch_s'], '.3f'):>11} {_num(row['peak_rss_mib'], ',.0f'):>12} "
            f"{_num(row['cpu_us_per_image'], '.0f'):>10} {row['ok_runs']}/{row['runs']:<3}"
        )
    baselines = {row["baseline"] for row in report["summary"] if row["baseline"]}
    lines.append(f"DataLoader baseline: {', '.join(sorted(baselines)) or 'n/a'}")
    costs = report.get("costs") or {}
    if costs.get("ok"):
        lines.append(
            "per image, µs: decode {decode_us:.0f}, read+decode {read_decode_us:.0f}; thread "
            "hop {hop_asyncio_us:.0f} (asyncio) / {hop_uvloop_us:.0f} (uvloop); getitems of "
            "32 {getitems_chunk_of_32_us:.0f} vs await ds[i] {getitem_one_by_one_us:.0f}".format(
                **costs
            )
        )
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """The "Image folder" section of docs/benchmarks.md, between its markers."""
    meta = report["meta"]
    machine = meta["machine"]
    mode = (
        "quick smoke mode (small folder, one epoch, every peer in one process: RSS not comparable)"
        if meta["quick"]
        else "full mode"
    )
    baselines = sorted({row["baseline"] for row in report["summary"] if row["baseline"]})
    minimal = any(b.startswith("minimal") for b in baselines)
    lines = [
        BEGIN,
        "",
        "## Image folder (local JPEGs, decoded with Pillow)",
        "",
        f"{meta['classes']} classes x {meta['per_class']} JPEGs of {IMAGE_SIZE}x{IMAGE_SIZE} "
        f"(quality {QUALITY}, {meta['folder_bytes'] / 1024**2:.1f} MiB) in a temporary "
        "directory, read from the page cache: this measures decoding and the loader, not "
        f"the disk. Every peer yields shuffled batches of {BATCH_SIZE} as torch tensors "
        f"(`uint8` images {BATCH_SIZE}x{IMAGE_SIZE}x{IMAGE_SIZE}x3 and `int64` labels), "
        f"{meta['epochs']} epoch(s) per run; every image is checked (it carries its index) "
        "to come exactly once per epoch with its label.",
        "",
        "- asyncload: `al.Loader(al.ImageFolder(root), batch_size=32, concurrency=C, "
        "shuffle=True, collate_fn=...)`; the default decoder (Pillow, RGB, numpy `uint8` "
        f"HWC) runs in worker threads (at most {machine['cpu_count']}, one per CPU), a chunk "
        "of min(32, C) images read and decoded per thread call; the collate stacks with "
        "numpy and wraps in tensors with `torch.from_numpy`.",
        "- DataLoader: `torch.utils.data.DataLoader(folder, batch_size=32, shuffle=True, "
        "num_workers=W, persistent_workers=W > 0)`, torch's default collate, with "
        + (
            "**a faithful minimal equivalent of torchvision's `ImageFolder`, not torchvision "
            "itself**: no torchvision build for this CPU-only torch could be installed here "
            "(PyPI's wheel is a CUDA build that fails to load without CUDA libraries). It "
            "keeps torchvision's class and file rules and its `pil_loader` (open, "
            "`Image.open`, `convert('RGB')`), then `np.array`; see `MinimalImageFolder` in "
            "`benchmarks/bench_images.py`."
            if minimal
            else f"`{', '.join(baselines) or 'ImageFolder'}` and `transform=np.array`."
        ),
        f"- Machine: {machine['cpu_count']} cores ({machine['cpu_model']}), Python "
        f"{machine['python']}, torch {machine.get('torch')}, Pillow {meta.get('pillow')}, "
        f"numpy {machine.get('numpy')}. Load average (1, 5, 15 min) before the run: "
        f"{_loads(meta.get('loadavg_before'))}; after: {_loads(meta.get('loadavg_after'))}. "
        "On a machine shared with other work figures are noisy (±20 % or worse): compare "
        "rows of this run only, and CPU per image, which contention disturbs less.",
        "",
        "```sh",
        f".venv/bin/python {meta['command']} --render docs/benchmarks.md",
        "```",
        "",
        f"This section: {mode}, {meta['rounds']} interleaved round(s), each run a fresh "
        f"process, run on {meta['started']}, {meta['duration_s']:.0f} s in all; medians. "
        "images/s counts from the first batch to the last; first batch is from building "
        "the dataset (directory walk included) to the first batch; peak RSS sums the "
        "process and its DataLoader workers; CPU per image counts all of them.",
        "",
        "| loader | images/s | images/s range | first batch (s) | peak RSS (MiB) "
        "| CPU µs/image | runs ok |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["summary"]:
        runs = [x for x in row["images_per_s_all"] if x is not None]
        spread = f"{min(runs):,.0f} to {max(runs):,.0f}" if len(runs) > 1 else "n/a"
        lines.append(
            f"| {peer_name(row)} | {_num(row['images_per_s'], ',.0f')} | {spread} "
            f"| {_num(row['first_batch_s'], '.3f')} | {_num(row['peak_rss_mib'], ',.0f')} "
            f"| {_num(row['cpu_us_per_image'], '.0f')} | {row['ok_runs']}/{row['runs']} |"
        )
    lines.append("")
    costs = report.get("costs") or {}
    if costs.get("ok"):
        lines += [
            "Per-image costs on the same folder (best of "
            f"{costs.get('passes', 'several')} interleaved passes, one image after the "
            "other, no parallelism): decode from bytes "
            f"{costs['decode_us']:.0f} µs, read + decode {costs['read_decode_us']:.0f} µs; "
            f"one thread hop {costs['hop_asyncio_us']:.0f} µs (asyncio), "
            f"{costs['hop_uvloop_us']:.0f} µs (uvloop); `ImageFolder.getitems` of 32 images "
            f"(one thread call) {costs['getitems_chunk_of_32_us']:.0f} µs per image, against "
            f"{costs['getitem_one_by_one_us']:.0f} µs per image for one `await ds[i]` (one "
            "thread call) per image.",
            "",
        ]
    errors = [
        (row["peer"], row["concurrency"], e) for row in report["summary"] for e in row["errors"]
    ]
    if errors:
        lines += ["Failed runs:", ""]
        lines += [f"- {peer} / {c}: `{e}`" for peer, c, e in errors]
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def splice(page: str, section: str) -> str:
    """``page`` with its image section replaced by ``section``, or ``section`` appended;
    the rest of the page (other benchmarks' sections) is kept as it is."""
    start, end = page.find(BEGIN), page.find(END)
    if start != -1 and end > start:
        return page[:start] + section + page[end + len(END) :]
    return page.rstrip("\n") + ("\n\n" if page.strip() else "") + section + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: a few seconds")
    parser.add_argument("--out", type=Path, default=None, help="JSON results path")
    parser.add_argument("--rounds", type=int, default=None, help="default: 3 (1 with --quick)")
    parser.add_argument(
        "--render", type=Path, default=None, help="splice the section into this page"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))

    import PIL

    rounds = args.rounds or (1 if args.quick else 3)
    per_class = 40 if args.quick else 200
    out = args.out or ROOT / "benchmarks" / "results" / (
        "images-quick.json.tmp" if args.quick else "images.json"
    )
    configs = plan(args.quick, per_class)
    timeout = 120.0 if args.quick else 600.0
    started = time.time()
    load_before = list(os.getloadavg())
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="asyncload-images-") as tmp:
        root = Path(tmp) / "folder"
        folder_bytes = make_folder(root, per_class)
        print(
            f"{CLASSES * per_class} images in {root} ({folder_bytes / 1024**2:.1f} MiB); "
            f"{len(configs)} configs x {rounds} rounds",
            file=sys.stderr,
        )
        if args.quick:
            # One process for everything (one torch import instead of five): a smoke test
            # of every peer, whose RSS figures are not comparable with each other.
            answer = run_child(
                {"configs": [asdict(c) for c in configs], "root": str(root), "repeats": 1},
                timeout,
            )
            results += _results(answer, configs, 0)
            costs = answer.get("costs") or {"ok": False, "error": answer.get("error")}
        else:
            for round_ in range(rounds):
                # Interleave: every round runs every config, starting at a different one.
                shift = (round_ * len(configs)) // rounds
                for cfg in itertools.islice(itertools.cycle(configs), shift, shift + len(configs)):
                    payload = {"configs": [asdict(cfg)], "root": str(root)}
                    results += _results(run_child(payload, timeout), [cfg], round_)
            answer = run_child({"configs": [], "root": str(root), "repeats": 7}, timeout)
            costs = answer.get("costs") or {"ok": False, "error": answer.get("error")}

    report = {
        "meta": {
            "command": "benchmarks/bench_images.py" + (" --quick" if args.quick else ""),
            "quick": args.quick,
            "one_process": args.quick,
            "rounds": rounds,
            "classes": CLASSES,
            "per_class": per_class,
            "image_size": IMAGE_SIZE,
            "quality": QUALITY,
            "batch_size": BATCH_SIZE,
            "epochs": configs[0].epochs,
            "folder_bytes": folder_bytes,
            "pillow": PIL.__version__,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "machine": machine_info(),
            "loadavg_before": load_before,
            "loadavg_after": list(os.getloadavg()),
        },
        "summary": summarize(results, configs),
        "costs": costs,
        "runs": [_clean(asdict(r)) for r in results],
    }
    report = _clean(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(report))
    print(f"wrote {out} in {report['meta']['duration_s']} s")
    if args.render:
        page = args.render.read_text() if args.render.exists() else ""
        args.render.write_text(splice(page, render(report)))
        print(f"wrote the image-folder section of {args.render}")
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAILED {r.config.key} round {r.round + 1}: {r.error}", file=sys.stderr)
    if not costs.get("ok"):
        print(f"FAILED costs: {costs.get('error')}", file=sys.stderr)
    return 1 if failed or not costs.get("ok") else 0


if __name__ == "__main__":
    sys.exit(main())
