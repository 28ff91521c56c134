"""MNIST files -> uint8 tensors, the same on every rank (batches.py makes the batches).

Files: the four IDX files, gzip-compressed or not, directly in the data folder or in torchvision's
``MNIST/raw/`` layout. If they are missing, torchvision downloads them (checksummed) unless the
caller forbids it. Every malformed file ends in a DistmnistError that names it.
"""

from __future__ import annotations

import gzip
import math
import re
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .distributed import agree, disagreeing_ranks, tensors_digest
from .errors import DistmnistError
from .files import check_file, check_folder

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_UBYTE = 0x08  # IDX type code of unsigned bytes, the only type MNIST uses
DOWNLOAD_TIMEOUT_S = 20  # per socket operation, so an offline machine fails fast
DEFAULT_DIR = "data"  # --data-dir's default (config.py): where a first run downloads to
DOWNLOAD_STALL_S = 15  # give up once no byte has arrived for this long (DNS, connects and retries included)
READ_CHUNK_BYTES = 1 << 20  # IDX data is read (decompressed) this much at a time
DEFLATE_MAX_RATIO = 1032  # deflate's limit: a .gz file decompresses to at most this many times its size
REPLACE_HINT = "replace it with an intact copy (or delete it: a run without --no-download downloads MNIST again)"


@dataclass
class Split:
    """One MNIST split: images uint8 (n, 28, 28), labels int64 (n,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def head(self, n: int | None) -> Split:
        return self if n is None else Split(self.images[:n], self.labels[:n])

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


# ---------------------------------------------------------------- IDX files


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """Read one IDX file of unsigned bytes with exactly ``ndim`` dimensions, checking everything.

    The header is checked first, and the data then read (for .gz: decompressed) in chunks into a
    buffer of exactly the size the header gives: a file that holds more, such as a gzip bomb of zeros
    behind a valid header, is refused after one byte too many instead of being decompressed whole.
    """
    found = check_file(path, "MNIST file", advice="remove it or give another --data-dir")
    if found is None:
        raise DistmnistError(f"{path}: cannot read (no such file)")
    try:
        return _read_idx(path, ndim, found.st_size)
    except DistmnistError as err:  # the file is there, but it is not what MNIST's is
        raise DistmnistError(f"{err}; {REPLACE_HINT}") from None


def _read_idx(path: Path, ndim: int, size: int) -> torch.Tensor:
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as fh:
            shape, header = _read_header(fh, path, ndim)
            expected = math.prod(shape)
            _check_capacity(path, size, header, shape)
            data = _buffer(path, expected)
            got = _read_into(fh, data)
            extra = fh.read(1) if got == expected else b""  # for .gz this also reaches and checks the CRC
    except (OSError, EOFError, zlib.error) as err:  # zlib.error: a corrupt deflate stream inside the .gz
        raise DistmnistError(f"{path}: cannot read ({err})") from None
    if got < expected or extra:
        holds = got if got < expected else "more" if path.suffix == ".gz" else size - header
        raise DistmnistError(f"{path}: {'truncated' if got < expected else 'has trailing bytes'}: header says "
                             f"{' x '.join(map(str, shape))} = {expected} bytes of data, file holds {holds}")
    return data.reshape(shape)


def _read_header(fh, path: Path, ndim: int) -> tuple[list[int], int]:
    """(shape, header size in bytes) of an IDX file of unsigned bytes, after checking its magic and type."""
    magic = fh.read(4)
    if len(magic) < 4:
        raise DistmnistError(f"{path}: truncated IDX file ({len(magic)} bytes, no header)")
    if magic[0] != 0 or magic[1] != 0:
        raise DistmnistError(f"{path}: not an IDX file (wrong magic number 0x{magic.hex()})")
    if magic[2] != IDX_UBYTE:
        raise DistmnistError(f"{path}: IDX type 0x{magic[2]:02x}, expected 0x08 (unsigned bytes)")
    if magic[3] != ndim:
        raise DistmnistError(f"{path}: IDX file has {magic[3]} dimensions, expected {ndim}")
    dims = fh.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DistmnistError(f"{path}: truncated IDX header")
    return [int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(ndim)], 4 + 4 * ndim


def _check_capacity(path: Path, size: int, header: int, shape: list[int]) -> None:
    """Refuse, before allocating anything, a header that promises more data than the file can hold."""
    expected = math.prod(shape)
    gz = path.suffix == ".gz"
    capacity = size * DEFLATE_MAX_RATIO if gz else size - header
    if expected > capacity:
        holds = f"a {size}-byte .gz file can hold at most {capacity}" if gz else f"file holds {capacity}"
        raise DistmnistError(f"{path}: truncated: header says {' x '.join(map(str, shape))} = {expected} bytes of "
                             f"data, {holds}")


def _buffer(path: Path, size: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of ``size`` bytes (pages are only touched as data arrives)."""
    try:
        return torch.empty(size, dtype=torch.uint8)
    except RuntimeError:  # the allocator's "can't allocate memory"
        raise DistmnistError(f"{path}: header says {size} bytes of data, more than this machine can allocate") from None


def _read_into(fh, data: torch.Tensor) -> int:
    """Fill the uint8 tensor ``data`` from ``fh`` in chunks; how many bytes there were (at most its size)."""
    view = data.numpy().data  # the tensor's bytes as a writable memoryview
    got = 0
    while got < len(view):
        n = fh.readinto(view[got : got + READ_CHUNK_BYTES])
        if not n:
            break
        got += n
    return got


def read_split(images_path: Path, labels_path: Path) -> Split:
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if tuple(images.shape[1:]) != (28, 28):
        raise DistmnistError(f"{images_path}: images are {images.shape[1]} x {images.shape[2]}, expected 28 x 28")
    if images.shape[0] != labels.shape[0]:
        raise DistmnistError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    if images.shape[0] == 0:
        raise DistmnistError(f"{images_path}: holds no images")
    if labels.numel() and int(labels.max()) > 9:
        raise DistmnistError(f"{labels_path}: label {int(labels.max())} outside 0-9")
    return Split(images, labels.long())


def find_file(data_dir: Path, name: str) -> Path | None:
    """IDX file ``name`` (or ``name``.gz) in data_dir or data_dir/MNIST/raw, if there; something else by
    that name (a folder, a named pipe, a device) is refused at once rather than taken for a missing file."""
    for folder in (data_dir, data_dir / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if check_file(candidate, "MNIST file", advice="remove it or give another --data-dir") is not None:
                return candidate
    return None


def required_file(data_dir: Path, name: str) -> Path:
    """find_file for a file that must be there (after the download)."""
    path = find_file(data_dir, name)
    if path is None:
        raise DistmnistError(f"MNIST file {name} not found in {data_dir} (or {data_dir / 'MNIST' / 'raw'})")
    return path


def missing_files(data_dir: Path) -> list[str]:
    return [name for pair in FILES.values() for name in pair if find_file(data_dir, name) is None]


def download(data_dir: Path) -> None:
    """Fetch MNIST with torchvision (it verifies each file's MD5) into data_dir/MNIST/raw.

    torchvision tries every mirror and every address of each with the socket timeout, so where packets
    are silently dropped it could wait minutes. The fetch runs in a daemon thread instead, and gives up
    as soon as no byte has arrived for DOWNLOAD_STALL_S seconds; a slow but live link is never cut.
    A failed download leaves nothing behind: the files it wrote (possibly partial) and the folders
    it created are removed, so a mistyped --data-dir does not turn into an empty folder tree.
    """
    from torchvision.datasets import MNIST

    raw = data_dir / "MNIST" / "raw"
    existed = data_dir.is_dir()
    new_folders = [p for p in (raw, *raw.parents) if not p.exists()]  # what makedirs will create, deepest first
    old_files = set(raw.iterdir()) if raw.is_dir() else set()
    failure: list[BaseException] = []

    def fetch() -> None:
        try:
            for train in (True, False):
                MNIST(str(data_dir), train=train, download=True)
        except Exception as err:  # torchvision raises RuntimeError/URLError/OSError: all mean "no data"
            failure.append(err)

    def received() -> int:
        try:
            return sum(f.stat().st_size for f in raw.iterdir())
        except OSError:  # no folder yet, or a file renamed while we looked
            return -1

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        worker = threading.Thread(target=fetch, name="mnist-download", daemon=True)
        worker.start()
        size, changed = received(), time.monotonic()
        while worker.is_alive():
            worker.join(0.5)
            now = received()
            if now != size:
                size, changed = now, time.monotonic()
            elif time.monotonic() - changed > DOWNLOAD_STALL_S:
                failure.append(TimeoutError(f"no data from any mirror for {DOWNLOAD_STALL_S} s"))
                break
    finally:
        socket.setdefaulttimeout(previous)
    if failure:
        remove_new(raw, old_files, new_folders)
        raise DistmnistError(offline_message(data_dir, download_failure(failure[0]), existed))


def remove_new(raw: Path, old_files: set[Path], new_folders: list[Path]) -> None:
    """Undo a failed download: files that were not there before, then the folders it created, if empty."""
    try:
        for path in set(raw.iterdir()) - old_files:
            if path.is_file():
                path.unlink(missing_ok=True)
    except OSError:
        pass
    for folder in new_folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (something else put files there) or already gone
            pass


def download_failure(err: BaseException) -> str:
    """One line for why a download failed. torchvision's message lists every mirror on several lines
    ("Error downloading ...:\nTried URL, got:\n<reason>\n..."); its last reason is kept."""
    text = str(err).strip()
    reasons = [line for line in text.splitlines() if line.strip() and not line.startswith(("Error downloading",
                                                                                             "Tried "))]
    reason = reasons[-1] if reasons else text.splitlines()[0] if text else type(err).__name__
    match = re.fullmatch(r"<urlopen error (.*)>", reason.strip())  # URLError's own wrapping
    return (match.group(1) if match else reason).strip()


def offline_message(data_dir: Path, reason: str, existed: bool) -> str:
    where = f"{data_dir} (or {data_dir / 'MNIST' / 'raw'})"
    names = ", ".join(n for pair in FILES.values() for n in pair)
    start = f"could not download MNIST ({reason})"
    if not existed and data_dir != Path(DEFAULT_DIR):
        start += f" into {data_dir}, which did not exist (is --data-dir mistyped?)"
    return (f"{start}. Put the four IDX files ({names}, .gz or not) in {where}, "
            "or point --data-dir at a folder that holds them")


def load_mnist(data_dir: str | Path, allow_download: bool = True) -> tuple[Split, Split]:
    """Return (train, test) from local IDX files, downloading them first only if they are missing."""
    data_dir = Path(data_dir)
    # a file there would pass for a folder without MNIST, then fail as a place to download into
    check_folder(data_dir, "--data-dir", advice="give the folder that holds the four MNIST IDX files")
    missing = missing_files(data_dir)
    if missing and not allow_download:
        raise DistmnistError(
            f"MNIST not found: {', '.join(missing)} missing in {data_dir} (or {data_dir / 'MNIST' / 'raw'}); "
            "--no-download forbids fetching it. Put the four IDX files (.gz or not) there, or drop --no-download"
        )
    if missing:
        download(data_dir)
    train, test = (read_split(*(required_file(data_dir, n) for n in FILES[s])) for s in ("train", "test"))
    return train, test


def load_data(accelerator, data_dir: str | Path, no_download: bool, limit_train: int | None = None,
              limit_test: int | None = None) -> tuple[Split, Split]:
    """(train, test) on every rank, the same everywhere, or every rank exits with the reason.

    On each machine the local main process downloads what is missing (unless no_download) while
    the machine's other ranks wait; every rank runs the same collectives whatever its local files
    hold, so a machine without data fails cleanly instead of pairing collectives wrongly. Then the
    ranks compare a digest of the decoded tensors: a machine with a different copy of MNIST ends
    the run with exit 2, naming its rank and host.
    """
    data_dir = Path(data_dir)
    error, splits = None, None
    with accelerator.local_main_process_first():  # a barrier on every rank, before and after the local main's turn
        try:
            if accelerator.is_local_main_process:
                splits = load_mnist(data_dir, allow_download=not no_download)
            else:
                missing = missing_files(data_dir)
                if missing:
                    raise DistmnistError(f"MNIST not found: {', '.join(missing)} missing in {data_dir} on this "
                                         "machine after its first process looked for it (is the folder local to each "
                                         "process?)")
                splits = load_mnist(data_dir, allow_download=False)
        except DistmnistError as err:
            error = err
    agree(accelerator, error)
    assert splits is not None  # else this rank met an error, and agree() raised it
    train, test = splits[0].head(limit_train), splits[1].head(limit_test)
    digest = tensors_digest([train.images, train.labels, test.images, test.labels])
    different = disagreeing_ranks(accelerator, digest)
    if different:
        names = ", ".join(f"rank {rank} on {host}" for rank, host in different)
        raise DistmnistError(f"{names} read different MNIST data from {data_dir} than rank 0 (a digest of the "
                             "decoded images and labels differs): give every machine the same files",
                             silent=not accelerator.is_main_process)
    return train, test
