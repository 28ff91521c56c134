"""Data: IDX parsing with every malformation named, shards disjoint and covering, both batch paths identical."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import idx_bytes, write_mnist
from distmnist.batches import LoaderBatches, ResidentBatches, TrainOrder, eval_batches, eval_shard, train_batches
from distmnist.data import FILES, Split, load_mnist, read_idx, read_split
from distmnist.errors import DistmnistError

CPU = torch.device("cpu")


# ---------------------------------------------------------------- reading IDX files


def test_read_idx_round_trip_plain_and_gz(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    plain, gz = tmp_path / "images-idx3-ubyte", tmp_path / "images-idx3-ubyte.gz"
    plain.write_bytes(idx_bytes(images))
    gz.write_bytes(gzip.compress(idx_bytes(images)))
    for path in (plain, gz):
        got = read_idx(path, 3)
        assert got.dtype == torch.uint8 and tuple(got.shape) == (7, 28, 28)
        assert torch.equal(got, torch.from_numpy(images))


@pytest.mark.parametrize("layout", ["flat", "flat-gz", "raw", "raw-gz"])
def test_load_mnist_finds_every_layout(tmp_path, layout):
    folder = tmp_path / "data"
    target = folder / "MNIST" / "raw" if layout.startswith("raw") else folder
    write_mnist(target, n_train=30, n_test=20, gz=layout.endswith("gz"))
    train, test = load_mnist(folder, allow_download=False)  # no network: the files are there
    assert (len(train), len(test)) == (30, 20)
    assert train.images.dtype == torch.uint8 and tuple(train.images.shape) == (30, 28, 28)
    assert train.labels.dtype == torch.int64 and int(train.labels.max()) <= 9
    # synthetic digits light up band k for class k: pixel rows 2k+4..2k+6 are 255
    for image, label in zip(test.images, test.labels, strict=True):
        assert bool((image[2 * int(label) + 5, 4:24] == 255).all())


def test_gz_and_plain_give_the_same_tensors(tmp_path):
    a = load_mnist(write_mnist(tmp_path / "a", n_train=20, n_test=10, seed=3), allow_download=False)
    b = load_mnist(write_mnist(tmp_path / "b", n_train=20, n_test=10, seed=3, gz=True), allow_download=False)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)


def header(ndim: int, *dims: int, type_byte: int = 0x08, magic: bytes = b"\x00\x00") -> bytes:
    return magic + bytes([type_byte, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)


@pytest.mark.parametrize(
    "raw, ndim, message",
    [
        (header(3, 2, 28, 28, magic=b"\x12\x34") + bytes(2 * 784), 3, "wrong magic number 0x12340803"),
        (header(3, 2, 28, 28, type_byte=0x0D) + bytes(2 * 784), 3, "IDX type 0x0d, expected 0x08"),
        (header(1, 2) + bytes(2), 3, "has 1 dimensions, expected 3"),
        (header(3, 2, 28, 28) + bytes(2 * 784 - 1), 3, "truncated: header says 2 x 28 x 28 = 1568 bytes"),
        (header(3, 2, 28, 28) + bytes(2 * 784 + 5), 3, "has trailing bytes"),
        (header(3, 2, 28, 28)[:9], 3, "truncated IDX header"),
        (b"\x00\x00", 1, "truncated IDX file (2 bytes, no header)"),
        (b"", 1, "truncated IDX file (0 bytes"),
    ],
    ids=["magic", "type", "ndim", "truncated", "trailing", "short-header", "tiny", "empty"],
)
def test_malformed_idx_is_rejected_naming_the_file(tmp_path, raw, ndim, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(raw)
    with pytest.raises(DistmnistError) as err:
        read_idx(path, ndim)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_corrupt_gzip_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(50, np.uint8)))[:-12])  # cut off mid-stream
    with pytest.raises(DistmnistError, match="cannot read") as err:
        read_idx(path, 1)
    assert str(path) in str(err.value)


def write_pair(folder: Path, images: np.ndarray, labels: np.ndarray) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    ip, lp = folder / "train-images-idx3-ubyte", folder / "train-labels-idx1-ubyte"
    ip.write_bytes(idx_bytes(images))
    lp.write_bytes(idx_bytes(labels))
    return ip, lp


def test_read_split_checks_counts_labels_and_shape(tmp_path):
    ok = np.zeros((4, 28, 28), np.uint8)
    ip, lp = write_pair(tmp_path / "count", ok, np.zeros(5, np.uint8))
    with pytest.raises(DistmnistError, match="holds 4 images but .* holds 5 labels") as err:
        read_split(ip, lp)
    assert str(ip) in str(err.value) and str(lp) in str(err.value)

    ip, lp = write_pair(tmp_path / "label", ok, np.array([0, 9, 10, 3], np.uint8))
    with pytest.raises(DistmnistError, match="label 10 outside 0-9") as err:
        read_split(ip, lp)
    assert str(lp) in str(err.value)

    ip, lp = write_pair(tmp_path / "shape", np.zeros((4, 32, 32), np.uint8), np.zeros(4, np.uint8))
    with pytest.raises(DistmnistError, match="32 x 32, expected 28 x 28") as err:
        read_split(ip, lp)
    assert str(ip) in str(err.value)

    ip, lp = write_pair(tmp_path / "empty", np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8))
    with pytest.raises(DistmnistError, match="holds no images"):
        read_split(ip, lp)

    ip, lp = write_pair(tmp_path / "good", ok, np.array([0, 9, 1, 3], np.uint8))
    split = read_split(ip, lp)
    assert split.labels.tolist() == [0, 9, 1, 3] and split.labels.dtype == torch.int64


def test_missing_files_with_no_download_name_the_folder_and_flag(tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    with pytest.raises(DistmnistError) as err:
        load_mnist(empty, allow_download=False)
    message = str(err.value)
    assert str(empty) in message and "--no-download" in message
    assert all(name in message for pair in FILES.values() for name in pair)


def test_failed_download_says_where_the_files_are_expected(tmp_path, monkeypatch):
    """No network: torchvision's error becomes a DistmnistError naming the folder to fill."""
    import urllib.error

    import torchvision.datasets

    class Offline:
        def __init__(self, root, train, download):
            assert download and root == str(tmp_path / "data")
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(DistmnistError) as err:
        load_mnist(tmp_path / "data", allow_download=True)
    message = str(err.value)
    assert "could not download MNIST" in message and "name resolution" in message
    assert str(tmp_path / "data") in message and str(tmp_path / "data" / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message


def test_one_missing_file_is_named(tmp_path):
    folder = write_mnist(tmp_path / "d", n_train=10, n_test=10)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DistmnistError, match="t10k-labels-idx1-ubyte missing in") as err:
        load_mnist(folder, allow_download=False)
    assert "train-images" not in str(err.value)


# ---------------------------------------------------------------- training shards


def rank_orders(n: int, world: int, seed: int = 1, epoch: int = 0) -> list[list[int]]:
    orders = []
    for rank in range(world):
        order = TrainOrder(n, world, rank, seed, batch_size=1)
        order.set_epoch(epoch)
        orders.append(list(order.sampler))
    return orders


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [600, 251])
def test_train_shards_are_disjoint_and_cover(n, world):
    orders = rank_orders(n, world)
    per_rank = -(-n // world)  # DistributedSampler pads to a multiple of the world size
    assert [len(o) for o in orders] == [per_rank] * world
    counts = Counter(i for o in orders for i in o)
    assert set(counts) == set(range(n))  # covering
    padding = per_rank * world - n
    assert sum(c - 1 for c in counts.values()) == padding  # disjoint apart from the padding duplicates
    assert all(len(set(o)) == len(o) for o in orders)  # no index twice within one rank


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), world=st.integers(1, 5), seed=st.integers(0, 2**31), epoch=st.integers(0, 50))
def test_train_shards_cover_for_any_size(n, world, seed, epoch):
    orders = rank_orders(n, world, seed, epoch)
    counts = Counter(i for o in orders for i in o)
    assert set(counts) == set(range(n))
    total = -(-n // world) * world
    assert sum(counts.values()) == total
    assert max(counts.values()) <= -(-total // n)  # padding repeats the order as little as it can


def test_shuffle_differs_between_epochs_and_repeats_for_same_seed_and_epoch():
    e0, e1 = rank_orders(600, 2, epoch=0), rank_orders(600, 2, epoch=1)
    assert e0[0] != e1[0] and e0[1] != e1[1]
    assert e0 == rank_orders(600, 2, epoch=0)  # a fresh sampler, same seed and epoch: same order
    assert e0 != rank_orders(600, 2, seed=2, epoch=0)
    assert sorted(e0[0]) != list(range(300)) and e0[0] != sorted(e0[0])  # shuffled, not strided slices


# ---------------------------------------------------------------- evaluation shards


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [251, 250, 10000, 2])
def test_eval_shards_count_every_image_exactly_once(n, world):
    shards = [eval_shard(n, world, rank).tolist() for rank in range(world)]
    flat = [i for s in shards for i in s]
    assert len(flat) == n and sorted(flat) == list(range(n))


def test_eval_batches_hold_each_test_image_once(tmp_path):
    _, test = load_mnist(write_mnist(tmp_path / "d", n_train=10, n_test=251), allow_download=False)
    for world in (1, 2, 3):
        labels = []
        for rank in range(world):
            batches = eval_batches(test, world, rank, 40, CPU)
            assert all(len(lb) <= 40 for _, lb in batches)
            labels += [lb for _, lb in batches]
        assert sum(len(lb) for lb in labels) == 251
        assert sorted(torch.cat(labels).tolist()) == sorted(test.labels.tolist())


# ---------------------------------------------------------------- the two batch paths


def random_split(n: int, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("global_batch", [None, 120])
def test_resident_and_loader_batches_are_identical(world, global_batch):
    split = random_split(251)
    batch = 40  # 251 / world is never a multiple of 40: every rank ends in a partial batch
    for rank in range(world):
        resident_order, loader_order = (TrainOrder(len(split), world, rank, 7, batch, global_batch) for _ in range(2))
        resident = train_batches(split, resident_order, CPU, resident=True)
        loader = train_batches(split, loader_order, CPU, resident=False)
        assert isinstance(resident, ResidentBatches) and isinstance(loader, LoaderBatches)
        expected_steps = -(-251 // global_batch) if global_batch else -(-len(resident_order.sampler) // batch)
        assert len(resident) == len(loader) == expected_steps
        for epoch in (0, 1):
            resident_order.set_epoch(epoch)
            loader_order.set_epoch(epoch)
            a, b = list(resident), list(loader)
            assert len(a) == len(b) == len(resident)
            for (ia, la), (ib, lb) in zip(a, b, strict=True):
                assert ia.dtype == ib.dtype == torch.uint8 and la.dtype == lb.dtype == torch.int64
                assert torch.equal(ia, ib) and torch.equal(la, lb)
            # and the batches are exactly the order's
            order = torch.cat(resident_order.steps())
            assert torch.equal(torch.cat([lb for _, lb in a]), split.labels[order])
            assert torch.equal(torch.cat([ib for ib, _ in a]), split.images[order])
            # from a step in the middle, the same batches as an uninterrupted epoch, minus the first ones
            for later, whole in zip(list(loader.epoch(2)), a[2:], strict=True):
                assert torch.equal(later[1], whole[1])
        if not global_batch:
            assert len(a[-1][1]) == len(resident_order.sampler) % batch > 0  # the partial last batch


def test_batch_paths_leave_the_global_rng_alone():
    """Dropout draws from the global RNG: iterating batches must not, or the two paths would train differently
    (also when an epoch resumes in its middle)."""
    split = random_split(120)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for resident in (True, False):
        order = TrainOrder(len(split), 2, 0, seed=1, batch_size=32)
        order.set_epoch(3)
        batches = train_batches(split, order, CPU, resident)
        list(batches)
        list(batches.epoch(1))
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------- the global batch


def global_steps(n: int, world: int, global_batch: int, seed: int = 3, epoch: int = 2) -> list[list[int]]:
    """Every step's global batch as the ranks take it, in position order (rank r holds positions r, r + N ...)."""
    per_rank = []
    for rank in range(world):
        order = TrainOrder(n, world, rank, seed, batch_size=1, global_batch=global_batch)
        order.set_epoch(epoch)
        per_rank.append([s.tolist() for s in order.steps()])
    steps = []
    for k in range(len(per_rank[0])):
        rows = [per_rank[r][k] for r in range(world)]
        size = sum(len(r) for r in rows)
        steps.append([rows[p % world][p // world] for p in range(size)])
    return steps


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), world=st.sampled_from([1, 2, 3, 4]), per_rank=st.integers(1, 40),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 20))
def test_a_global_batch_is_the_same_for_any_number_of_processes(n, world, per_rank, seed, epoch):
    g = world * per_rank
    single = global_steps(n, 1, g, seed, epoch)
    assert global_steps(n, world, g, seed, epoch) == single  # the same images at the same positions
    flat = [i for step in single for i in step]
    assert sorted(flat) == list(range(n))  # every image once per epoch: no padding, no image dropped
    assert [len(step) for step in single] == [g] * (n // g) + ([n % g] if n % g else [])
    order = TrainOrder(n, world, 0, seed, batch_size=1, global_batch=g)
    assert [order.step_images(k) for k in range(len(order))] == [len(step) for step in single]


def test_the_order_digest_changes_with_what_changes_the_batches():
    def digest(epoch=1, **kw):
        args = dict(n=600, world=2, rank=0, seed=1, batch_size=50, global_batch=None, data_key=b"data")
        order = TrainOrder(**{**args, **kw})
        order.set_epoch(epoch)
        return order.digest()

    base = digest()
    assert digest(rank=1) == base  # every rank computes the same digest
    for changed in (dict(seed=2), dict(n=599), dict(batch_size=60), dict(world=4, batch_size=25),
                    dict(data_key=b"other"), dict(global_batch=100), dict(epoch=2)):
        assert digest(**changed) != base, changed
    assert digest(global_batch=100, world=1) == digest(global_batch=100, world=4)  # the global batch: any world
