"""Writing files: atomically (temporary name, fsync, rename), as strict JSON, with the permissions
the umask gives (so teammates on a shared cluster can read a run), and every OS error as one line
naming the path. And what a path is: where a file is expected, a folder, a named pipe (opening one
waits for a writer that never comes) or a device (/dev/zero never ends) is refused at once, by name.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
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


# ---------------------------------------------------------------- what a path is


def kind(mode: int) -> str:
    """What an os.stat() st_mode says the path is, as words for a message."""
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def lookup(path: str | Path, what: str) -> os.stat_result | None:
    """os.stat(path), symlinks followed; None where nothing is (also under a file); another error (no
    permission, a symlink loop) as one line that starts with ``what``."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise DistmnistError(f"{what} {path}: {err.strerror or err}") from None


def check_file(path: str | Path, what: str, *, folder: bool = False, advice: str = "") -> os.stat_result | None:
    """Refuse at once whatever is at ``path`` unless it is a regular file (with ``folder``: or a folder).
    Returns its stat, or None where nothing is. ``what`` names the path for the user (a flag, a role);
    ``advice`` ends the message (what to give instead)."""
    found = lookup(path, what)
    if found is None or stat.S_ISREG(found.st_mode) or (folder and stat.S_ISDIR(found.st_mode)):
        return found
    wanted = "a file or a folder" if folder else "a file"
    raise DistmnistError(f"{what} {path} is {kind(found.st_mode)}, not {wanted}{': ' + advice if advice else ''}")


def check_folder(path: str | Path, what: str, *, advice: str = "") -> os.stat_result | None:
    """Refuse at once a ``path`` that is something other than a folder, or lies under a file (``advice``
    as for check_file). Returns its stat, or None where nothing is."""
    path = Path(path)
    found = lookup(path, what)
    end = f": {advice}" if advice else ""
    if found is not None and not stat.S_ISDIR(found.st_mode):
        raise DistmnistError(f"{what} {path} is {kind(found.st_mode)}, not a folder{end}")
    if found is None:
        for parent in path.parents:
            above = lookup(parent, what)
            if above is not None and not stat.S_ISDIR(above.st_mode):
                raise DistmnistError(f"{what} {path} lies under {parent}, which is {kind(above.st_mode)}{end}")
    return found


# ---------------------------------------------------------------- writing


def remedy(err: OSError, what: str) -> str:
    """What to do about a failed write or mkdir, for the end of its message (``what``: the flag that chose
    the path, if one did)."""
    elsewhere = f"give another {what}" if what.startswith("--") else "write elsewhere"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"; free space there or {elsewhere}"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"; {elsewhere}"
    return ""


def write_bytes(path: str | Path, data: bytes, *, atomic: bool = True, what: str = "") -> Path:
    """Write ``data`` to ``path``; atomic: under a temporary name in the same folder, flushed, then renamed.

    Files are created with open()'s mode 0o666 minus the umask (safetensors' own writer leaves 0600).
    Only a regular file is ever replaced: the rename would swap a folder's name, a named pipe or a
    device (/dev/null, as root) for a file. ``what``: the flag that chose the path, named in the advice.
    """
    path = Path(path)
    found = lookup(path, "cannot write")
    if found is not None and not stat.S_ISREG(found.st_mode):
        raise DistmnistError(f"cannot write {path}: it is {kind(found.st_mode)}, not a file"
                             f"{'; give another ' + what if what else ''}")
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
        raise DistmnistError(f"cannot write {path}: {err.strerror or err}{remedy(err, what)}") from None
    return path


def write_text(path: str | Path, text: str, *, atomic: bool = True, what: str = "") -> Path:
    return write_bytes(path, text.encode(), atomic=atomic, what=what)


def write_json(path: str | Path, data: Any, what: str = "") -> Path:
    return write_text(path, json_text(data), what=what)


def make_dirs(path: str | Path, what: str = "folder") -> Path:
    """mkdir -p with one-line errors: a path that is (or lies under) a file, no permission, read-only."""
    path = Path(path)
    check_folder(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DistmnistError(f"cannot create {what} {path}: {err.strerror or err}{remedy(err, what)}") from None
    return path
