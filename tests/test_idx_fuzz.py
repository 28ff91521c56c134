"""Hostile IDX files, fuzzed. Whatever the bytes, the reader ends in DistmnistError naming the file, or
returns exactly what the header promises: never another exception, never a hang, never a silently
shorter data set. Plain files and files inside .gz (also corrupt gzip)."""

from __future__ import annotations

import gzip
import math
import signal
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import idx_bytes, in_process, write_mnist
from distmnist.data import load_mnist, read_idx, read_split
from distmnist.errors import DistmnistError

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
HANG_S = 120  # a whole fuzz test that runs longer than this is a hang


@pytest.fixture(autouse=True)
def no_hang():
    """Fail (not block) if the reader ever hangs: SIGALRM raises in the test."""

    def alarm(*_):
        raise TimeoutError(f"IDX reader still running after {HANG_S} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def write(folder: Path, name: str, payload: bytes, gz: bool) -> Path:
    path = folder / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


def checked_read(path: Path, ndim: int):
    """read_idx, and if it accepts, prove the result is the whole file as its header describes it."""
    try:
        tensor = read_idx(path, ndim)
    except DistmnistError as err:
        assert str(path) in str(err)
        return None
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    assert raw[:4] == bytes([0, 0, 0x08, ndim])
    assert tuple(tensor.shape) == dims and len(raw) == header + math.prod(dims)
    assert tensor.numpy().tobytes() == raw[header:]
    return tensor


def valid_idx(draw, ndim: int) -> bytes:
    n = draw(st.integers(0, 4))
    shape = (n, 28, 28) if ndim == 3 else (n,)
    values = draw(st.binary(min_size=math.prod(shape), max_size=math.prod(shape)))
    return idx_bytes(np.frombuffer(values, dtype=np.uint8).reshape(shape))


@st.composite
def hostile(draw):
    """(payload, ndim, gz, how it was damaged)."""
    ndim = draw(st.sampled_from([1, 3]))
    gz = draw(st.booleans())
    kind = draw(st.sampled_from(["random", "truncate", "header_byte", "dims", "trailing", "valid"]))
    if kind == "random":
        return draw(st.binary(max_size=4000)), ndim, gz, kind
    raw = bytearray(valid_idx(draw, ndim))
    if kind == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif kind == "header_byte":  # magic, type byte or dimension count
        i = draw(st.integers(0, 3))
        raw[i] = draw(st.integers(0, 255).filter(lambda b: b != raw[i]))
    elif kind == "dims":  # counts that disagree with the data
        i = draw(st.integers(0, ndim - 1))
        raw[4 + 4 * i : 8 + 4 * i] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
    elif kind == "trailing":
        raw += draw(st.binary(min_size=1, max_size=50))
    return bytes(raw), ndim, gz, kind


@FUZZ
@given(case=hostile())
def test_hostile_idx_ends_in_distmnist_error_or_reads_exactly(tmp_path, case):
    payload, ndim, gz, kind = case
    path = write(tmp_path, "file-idx-ubyte", payload, gz)
    result = checked_read(path, ndim)
    if kind in ("truncate", "trailing"):
        assert result is None, "a truncated or padded file was accepted"
    if kind == "valid":
        assert result is not None


@FUZZ
@given(payload=st.binary(min_size=1, max_size=3000), cut=st.integers(0, 3000), flip=st.integers(0, 3000),
       ndim=st.sampled_from([1, 3]))
def test_corrupt_or_truncated_gzip_ends_in_distmnist_error(tmp_path, payload, cut, flip, ndim):
    """The .gz container itself damaged: cut short, a byte flipped, or random bytes named .gz."""
    packed = bytes(gzip.compress(payload, mtime=0))
    cut, flip = cut % len(packed), flip % len(packed)
    flipped = packed[:flip] + bytes([packed[flip] ^ 0xFF]) + packed[flip + 1 :]
    for damaged in (packed[:cut], flipped, payload):
        path = tmp_path / "file-idx-ubyte.gz"
        path.write_bytes(bytes(damaged))
        try:
            expected = gzip.decompress(bytes(damaged))
        except (OSError, EOFError, zlib.error):
            with pytest.raises(DistmnistError) as err:
                read_idx(path, ndim)
            assert str(path) in str(err.value)
        else:  # still a valid gzip stream (e.g. the flip hit the header's OS byte): judge the content
            checked_read(path, ndim)
            assert expected is not None


@FUZZ
@given(n_images=st.integers(0, 6), n_labels=st.integers(0, 6), labels=st.lists(st.integers(0, 255), max_size=6),
       side=st.sampled_from([28, 27]), gz=st.booleans())
def test_split_with_disagreeing_counts_or_bad_labels_is_refused(tmp_path, n_images, n_labels, labels, side, gz):
    labels = (labels + [0] * 6)[:n_labels]
    images = write(tmp_path, "images-idx3-ubyte", idx_bytes(np.zeros((n_images, side, 28), np.uint8)), gz)
    label_file = write(tmp_path, "labels-idx1-ubyte", idx_bytes(np.array(labels, np.uint8)), gz)
    # the first check that fails names its file: the images' shape, the counts, an empty set, the labels
    if side != 28:
        expected = f"{images}: images are {side} x 28, expected 28 x 28"
    elif n_images != n_labels:
        expected = f"{images} holds {n_images} images but {label_file} holds {n_labels} labels"
    elif n_images == 0:
        expected = f"{images}: holds no images"
    elif max(labels) > 9:
        expected = f"{label_file}: label {max(labels)} outside 0-9"
    else:
        split = read_split(images, label_file)
        assert len(split) == n_images and split.labels.tolist() == labels
        return
    with pytest.raises(DistmnistError) as err:
        read_split(images, label_file)
    assert str(err.value) == expected


# one named example of every hostile kind, so each is exercised on every run whatever hypothesis draws
GOOD_IMAGES = idx_bytes(np.zeros((2, 28, 28), np.uint8))
CORRUPT_GZIP = bytearray(gzip.compress(bytes(range(256)) * 40, mtime=0))
CORRUPT_GZIP[20] ^= 0xFF  # inside the deflate stream: zlib.error, not an OSError


@pytest.mark.parametrize(
    "payload, gz, words",
    [
        (b"", False, "truncated"),
        (b"\x00\x00", False, "truncated"),
        (b"\x08\x03" + GOOD_IMAGES[2:], False, "magic"),
        (GOOD_IMAGES[:2] + b"\x0d" + GOOD_IMAGES[3:], False, "type"),
        (GOOD_IMAGES[:3] + b"\x02" + GOOD_IMAGES[4:], False, "dimensions"),
        (GOOD_IMAGES[:-1], False, "truncated"),
        (GOOD_IMAGES + b"\x00", False, "trailing"),
        (GOOD_IMAGES[:4] + (3).to_bytes(4, "big") + GOOD_IMAGES[8:], False, "truncated"),
        (GOOD_IMAGES[:4] + (2**32 - 1).to_bytes(4, "big") * 3, False, "truncated"),
        (GOOD_IMAGES[:-1], True, "truncated"),
        (bytes(CORRUPT_GZIP), None, "cannot read"),
        (gzip.compress(GOOD_IMAGES)[:-3], None, "cannot read"),
        (GOOD_IMAGES, None, "cannot read"),  # not gzip at all, named .gz
    ],
    ids=["empty", "short", "magic", "type", "ndim", "truncated", "trailing", "count", "huge-count", "gz-truncated",
         "gz-corrupt-deflate", "gz-cut", "gz-not-gzip"],
)
def test_every_hostile_kind_is_a_distmnist_error(tmp_path, payload, gz, words):
    path = tmp_path / "train-images-idx3-ubyte.gz" if gz is not False else tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(gzip.compress(payload) if gz else payload)
    with pytest.raises(DistmnistError) as err:
        read_idx(path, 3)
    assert str(path) in str(err.value) and words in str(err.value)


def test_labels_outside_0_9_are_refused(tmp_path):
    images = write(tmp_path, "i", GOOD_IMAGES, False)
    labels = write(tmp_path, "l", idx_bytes(np.array([3, 10], np.uint8)), False)
    with pytest.raises(DistmnistError, match="label 10 outside 0-9"):
        read_split(images, labels)


def test_corrupt_gzip_in_the_data_folder_exits_2_naming_the_file(tmp_path):
    """The zlib.error case end to end: the train command exits 2 with one clear line."""
    data = write_mnist(tmp_path / "mnist", n_train=50, n_test=20, gz=True)
    bad = data / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(bad.read_bytes())
    raw[12] ^= 0xFF  # the first byte of the deflate stream
    bad.write_bytes(bytes(raw))
    with pytest.raises(DistmnistError):
        load_mnist(data, allow_download=False)
    result = in_process("train", "--data-dir", data, "--output-dir", tmp_path / "out", "--no-download", timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("distmnist: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert str(bad) in result.stderr
