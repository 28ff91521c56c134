"""Writing files: atomically (temporary name, fsync, rename), as strict JSON, with the permissions
the umask gives (so teammates on a shared cluster can read a run), and every OS error as one line
naming the path.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import DistmnistError


def finite_or_none(value: Any) -> Any:
    """The same structure with every non-finite float replaced by None: strict JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def json_text(data: Any) -> str:
    """Strict JSON (no NaN or Infinity tokens, which strict parsers reject), indented, one final newline."""
    return json.dumps(finite_or_none(data), indent=2, allow_nan=False) + "\n"


def json_line(data: Any) -> str:
    return json.dumps(finite_or_none(data), allow_nan=False) + "\n"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes, *, atomic: bool = True) -> Path:
    """Write ``data`` to ``path``; atomic: under a temporary name in the same folder, flushed, then renamed.

    Files are created with open()'s mode 0o666 minus the umask (safetensors' own writer leaves 0600).
    """
    path = Path(path)
    target = path.with_name(f".tmp-{path.name}") if atomic else path
    try:
        with open(target, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if atomic:
            os.replace(target, path)
    except OSError as err:
        if atomic:
            try:
                target.unlink()
            except OSError:
                pass
        raise DistmnistError(f"cannot write {path}: {err.strerror or err}") from None
    return path


def write_text(path: str | Path, text: str, *, atomic: bool = True) -> Path:
    return write_bytes(path, text.encode(), atomic=atomic)


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json_text(data))


def make_dirs(path: str | Path, what: str = "folder") -> Path:
    """mkdir -p with one-line errors: a path that is (or lies under) a file, no permission, read-only."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == path else f"lies under {parent}, which is a file"
            raise DistmnistError(f"{what} {path} {where}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DistmnistError(f"cannot create {what} {path}: {err.strerror or err}") from None
    return path
