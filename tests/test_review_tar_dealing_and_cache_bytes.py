"""Review of 42acd16/199bb61 (helper-73): tar shards of unknown size dealt to ranks as
DistributedSampler deals samples, and LRUCache counting views by the buffer they keep.
Each test is a bug it found, since fixed: a mix's zero-weight tar part divided by zero,
sparse tensors could not be sized, views of one buffer in one value were each counted as
the whole buffer, and an array over a memoryview of a memmap was counted as the file.
(Two limits it showed are torch's and documented instead: a tensor made by
``torch.from_numpy`` from a memory-mapped array counts its whole mapping, and a
``from_numpy`` crop counts only its own storage, not the image it keeps alive.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_shared_contract import put, write_shard

import asyncload as al
from asyncload.sources import TarShardSource


@pytest.fixture(scope="module")
def seven(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("shards")
    return [write_shard(d / f"{s}.tar", s, 1) for s in range(7)]


def test_mix_with_a_zero_weight_tar_part_on_a_rank_with_nothing_of_its_own(
    seven: list[str],
) -> None:
    """mix([1 item, tar], weights=[1, 0], stop="all") has a size (a weight-0 part is never
    read, so not counted): 1 sample over 2 ranks. Rank 1 has nothing of its own and pads
    from the whole mix (open_whole: slot=0, shares=1), but that spec keeps ranks=2, so the
    tar part's _pieces computes workers = 1 // 2 = 0 and divmod(0, 0) raises."""
    per_rank = []
    for rank in range(2):
        mixed = al.mix([al.from_sequence([b"x"]), TarShardSource(seven[:3])], [1, 0], stop="all")
        loader = al.Loader(mixed, batch_size=None, rank=rank, world_size=2)
        per_rank.append(list(loader))
    assert per_rank == [[b"x"], [b"x"]]


# -- LRUCache sizes -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cache_sparse_tensor_does_not_raise() -> None:
    """A sparse tensor was sized by element_size() * nelement(); now _nbytes calls
    untyped_storage(), which sparse (COO, CSR) tensors do not have: get_or_load raises
    NotImplementedError 'Cannot access storage of SparseTensorImpl'."""
    torch = pytest.importorskip("torch")
    cache = al.LRUCache(max_bytes=10_000)
    sparse = torch.sparse_coo_tensor([[0, 3]], [1.0, 2.0], (10,))
    put(cache, {"coo": sparse, "csr": torch.eye(3).to_sparse_csr()})
    assert cache.statistics()["items"] == 2


def test_cache_two_views_of_one_buffer_in_one_value_count_it_once() -> None:
    """A sample holding several crops of one decoded image (multi-crop augmentation) keeps
    one buffer alive, but each view is now counted by the whole buffer: ten 10-byte
    slices of one 1000-byte array count 10000 bytes, so under max_bytes=5000 the value
    is refused (uncached) though it holds 1000 bytes. The same for tensor views."""
    torch = pytest.importorskip("torch")
    base = np.zeros(1000, np.uint8)
    tbase = torch.zeros(1000, dtype=torch.uint8)
    cache = al.LRUCache(max_bytes=5000)
    put(
        cache,
        {
            "arrays": [base[i * 10 : (i + 1) * 10] for i in range(10)],
            "tensors": [tbase[i * 10 : (i + 1) * 10] for i in range(10)],
            "image_and_crop": {"image": base, "crop": base[:10]},
        },
    )
    stats = cache.statistics()
    assert stats["uncached"] == 0, stats
    assert stats["items"] == 3, stats
    assert stats["bytes"] <= 3 * 1000 + 400, stats  # (+ the dict keys' str objects)


def test_cache_array_through_a_memoryview_of_a_memmap_counts_as_itself(tmp_path: Path) -> None:
    """_array_bytes follows base to a memoryview, takes its .obj, and stops there: when
    that is a np.memmap (an ndarray) it counts the memmap's whole nbytes, the file size,
    instead of following on to the mmap. np.frombuffer(memoryview(mm)[:10]) (10 bytes)
    is counted as 100000."""
    path = tmp_path / "a.npy"
    np.save(path, np.zeros(100_000, np.uint8))
    mm = np.load(path, mmap_mode="r")
    cache = al.LRUCache(max_bytes=1000)
    put(cache, {"row": np.frombuffer(memoryview(mm)[:10], np.uint8)})
    assert cache.statistics()["uncached"] == 0, cache.statistics()
    assert cache.statistics()["bytes"] == 10
