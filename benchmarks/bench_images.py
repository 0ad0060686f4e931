"""Side-by-side image-folder benchmark: asyncload's ImageFolder vs a torchvision-style
ImageFolder under torch's DataLoader, on the same folder of small JPEGs.

    .venv/bin/python benchmarks/bench_images.py [--quick] [--rounds R] [--out PATH] [--render docs/benchmarks.md]
    .venv/bin/python benchmarks/bench_images.py --from benchmarks/results/images.json --render docs/benchmarks.md

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

Each run is a fresh child process that imports torch (as a training process has), runs
several epochs, and checks every image: each carries its index in a flat 16x16 corner
block, so each run must yield every image exactly once per epoch with its right label.
First batch counts from building the dataset (directory walk included). A separate child
measures the per-image costs: decode, read + decode, a thread hop, and ``getitems`` of a
chunk vs one ``await ds[i]`` per image. With ``--quick`` every peer runs in one child
process (one torch import instead of four), so their RSS figures are not comparable.
What is measured, and the options, are the harness's (``benchmarks/harness.py``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness
from benchmarks.common import RunConfig, RunResult, Tally, package_versions
from benchmarks.page import command_block, failed_runs, results_table, run_line
from benchmarks.server import run_event_loop

BATCH_SIZE = 32
IMAGE_SIZE = 64
QUALITY = 90
CLASSES = 10
BLOCK = 16  # the flat corner block that carries an image's index (one JPEG MCU)

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


class ImageChecker:
    """Checks batches of ``(images, labels)`` tensors: shapes, dtypes, each image's index
    and label; :meth:`finish` checks that every image came exactly once per epoch."""

    def __init__(self, images: int, per_class: int, epochs: int) -> None:
        import numpy as np

        self.images = images
        self.per_class = per_class
        self.epochs = epochs
        self.seen = np.zeros(images, dtype=np.int64)  # deliveries per image, all epochs

    def __call__(self, batch: Any) -> int:
        import numpy as np
        import torch

        images, labels = batch
        if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor)):
            raise TypeError(f"batch is ({type(images).__name__}, {type(labels).__name__})")
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"images are {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or len(labels) != len(images):
            raise ValueError(f"labels are {labels.dtype} {tuple(labels.shape)}")
        indices = decode_indices(images.numpy())
        if indices.min() < 0 or indices.max() >= self.images:
            raise ValueError(f"an image carries an index out of range: {indices.tolist()}")
        if not np.array_equal(indices // self.per_class, labels.numpy()):
            raise ValueError("an image came with another class's label")
        np.add.at(self.seen, indices, 1)
        return len(indices)

    def finish(self) -> None:
        if not (self.seen == self.epochs).all():
            bad = int((self.seen != self.epochs).sum())
            raise ValueError(f"{bad} images were not delivered exactly once per epoch")


def _torch_collate(samples: list[tuple[Any, int]]) -> tuple[Any, Any]:
    """asyncload's default collate (numpy), then torch tensors without a copy."""
    import torch

    import asyncload as al

    images, labels = al.default_collate(samples)
    return torch.from_numpy(images), torch.from_numpy(labels)


def run_asyncload(cfg: RunConfig, root: str, tally: Tally, *, sync: bool) -> dict[str, Any]:
    import asyncload as al

    epochs = cfg.params["epochs"]

    def build() -> Any:
        return al.Loader(
            al.ImageFolder(root),
            batch_size=BATCH_SIZE,
            concurrency=cfg.in_flight,
            shuffle=True,
            collate_fn=_torch_collate,
        )

    if sync:
        tally.start()
        with build() as loader:
            for epoch in range(epochs):
                loader.set_epoch(epoch)
                for batch in loader:
                    tally.batch(batch)
        return {}

    async def main() -> None:
        tally.start()
        async with build() as loader:
            for epoch in range(epochs):
                loader.set_epoch(epoch)
                async for batch in loader:
                    tally.batch(batch)

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
            image: Any = Image.open(f)
            image = image.convert("RGB")
        return self.transform(image), target


def run_dataloader(cfg: RunConfig, root: str, tally: Tally) -> dict[str, Any]:
    import torch.utils.data

    warnings.filterwarnings("ignore", message=".*suggested max number of worker")
    tally.start()
    dataset, baseline = folder_dataset(root)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        shuffle=True,
        num_workers=cfg.in_flight,
        persistent_workers=cfg.in_flight > 0,
    )
    for epoch in range(cfg.params["epochs"]):
        torch.manual_seed(epoch)
        for batch in loader:
            tally.batch(batch)
    del loader  # stops persistent workers before the RSS sampler's last reading
    return {"baseline": baseline}


def run_one(cfg: RunConfig, context: dict[str, Any]) -> RunResult:
    """Measure one configuration in this (child) process."""
    root = context["root"]

    def run(tally: Tally) -> dict[str, Any]:
        if cfg.peer == "dataloader":
            return run_dataloader(cfg, root, tally)
        return run_asyncload(cfg, root, tally, sync=cfg.peer == "asyncload-sync")

    params = cfg.params
    check = ImageChecker(params["images"], params["per_class"], params["epochs"])
    # torch: a training process has it loaded, the same baseline RSS for all.
    return harness.measure(cfg, run, check, preload=("torch", "asyncload"))


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


def costs_task(args: dict[str, Any]) -> dict[str, Any]:
    """The child task behind ``measure_costs``."""
    return measure_costs(args["root"], args["repeats"])


# --------------------------------------------------------------------------- the run


def plan(quick: bool, per_class: int) -> list[RunConfig]:
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
    params = {"epochs": epochs, "images": images, "per_class": per_class}
    return [
        RunConfig(
            peer,
            c,
            images * epochs - BATCH_SIZE,  # every image of every epoch but the first batch
            BATCH_SIZE,
            IMAGE_SIZE * IMAGE_SIZE * 3,
            params=params,
        )
        for peer, c in grid
    ]


def run(args: argparse.Namespace) -> harness.Report:
    """Make the folder, run every configuration over the rounds, then the per-image costs."""
    per_class = 40 if args.quick else 200
    configs = plan(args.quick, per_class)
    timeout = 180.0 if args.quick else 600.0
    with tempfile.TemporaryDirectory(prefix="asyncload-images-") as tmp:
        root = Path(tmp) / "folder"
        folder_bytes = make_folder(root, per_class)
        print(
            f"{CLASSES * per_class} images in {root} ({folder_bytes / 1024**2:.1f} MiB); "
            f"{len(configs)} configs x {args.rounds} rounds",
            file=sys.stderr,
        )
        results = harness.run_rounds(
            BENCH.script,
            configs,
            {"root": str(root)},
            rounds=args.rounds,
            timeout=timeout,
            unit="image",
            one_process=args.quick,
        )
        repeats = 1 if args.quick else 7
        costs = harness.run_task(
            BENCH.script, "costs", {"root": str(root), "repeats": repeats}, timeout
        )
    return {
        "meta": {
            "one_process": args.quick,
            "classes": CLASSES,
            "per_class": per_class,
            "image_size": IMAGE_SIZE,
            "quality": QUALITY,
            "batch_size": BATCH_SIZE,
            "epochs": configs[0].params["epochs"],
            "folder_bytes": folder_bytes,
            "versions": package_versions(["pillow"]),
        },
        "summary": harness.summarize(results, configs, _baseline),
        "costs": costs,
        "runs": results,
        "errors": [] if costs["ok"] else [f"costs: {costs.get('error')}"],
    }


def _baseline(cfg: RunConfig, good: list[RunResult]) -> harness.Row:
    """Which ImageFolder the DataLoader ran over (torchvision's or the equivalent)."""
    baselines = sorted({str(r.extra["baseline"]) for r in good if "baseline" in r.extra})
    return {"baseline": baselines[0] if baselines else None}


# --------------------------------------------------------------------------- output


def label(row: harness.Row) -> str:
    return PEER_NAMES[row["peer"]].format(
        c=row["in_flight"], baseline=row.get("baseline") or "ImageFolder"
    )


def _costs_line(costs: dict[str, Any]) -> str:
    return (
        "per image, µs: decode {decode_us:.0f}, read+decode {read_decode_us:.0f}; thread "
        "hop {hop_asyncio_us:.0f} (asyncio) / {hop_uvloop_us:.0f} (uvloop); getitems of "
        "32 {getitems_chunk_of_32_us:.0f} vs await ds[i] {getitem_one_by_one_us:.0f}".format(
            **costs
        )
    )


def console(report: harness.Report) -> str:
    """The summary, which ImageFolder the DataLoader used, the per-image costs."""
    lines = [
        harness.console_table(report["summary"], lambda r: f"{r['peer']} {r['in_flight']}", "image")
    ]
    baselines = {row["baseline"] for row in report["summary"] if row["baseline"]}
    lines.append(f"DataLoader baseline: {', '.join(sorted(baselines)) or 'n/a'}")
    costs = report.get("costs") or {}
    if costs.get("ok"):
        lines.append(_costs_line(costs))
    return "\n".join(lines)


def render(report: harness.Report) -> str:
    """The image-folder section of ``docs/benchmarks.md``."""
    meta = report["meta"]
    machine = meta["machine"]
    baselines = sorted({row["baseline"] for row in report["summary"] if row["baseline"]})
    minimal = any(b.startswith("minimal") for b in baselines)
    what = (
        "every peer in one process (RSS not comparable)"
        if meta.get("one_process")
        else "each run a fresh process"
    )
    lines = [
        "## Image folder (local JPEGs, decoded with Pillow)",
        "",
        f"{meta['classes']} classes x {meta['per_class']} JPEGs of {IMAGE_SIZE}x{IMAGE_SIZE} "
        f"(quality {QUALITY}, {meta['folder_bytes'] / 1024**2:.1f} MiB) in a temporary "
        "directory, read from the page cache: this measures decoding and the loader, not "
        f"the disk. Every peer yields shuffled batches of {BATCH_SIZE} as torch tensors "
        f"(`uint8` images {BATCH_SIZE}x{IMAGE_SIZE}x{IMAGE_SIZE}x3 and `int64` labels), "
        f"{meta['epochs']} epoch(s) per run; every image is checked (it carries its index) "
        "to come exactly once per epoch with its label. First batch counts from building the "
        f"dataset, directory walk included. Pillow {meta.get('versions', {}).get('pillow')}.",
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
        "",
        *command_block(meta),
        "",
        run_line(meta, what) + " CPU per image, which contention disturbs less than "
        "images/s, is the steadier figure.",
        "",
        *results_table(report["summary"], label, unit="image"),
        "",
    ]
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
    lines += failed_runs(report["summary"], label)
    return "\n".join(lines)


BENCH = harness.Benchmark(
    name="images",
    file=__file__,
    doc=__doc__,
    run=run,
    render=render,
    child=run_one,
    tasks={"costs": costs_task},
    label=label,
    unit="image",
    console=console,
)

if __name__ == "__main__":
    sys.exit(harness.main(BENCH))
