"""Paths a dataset names (an image file in a JSON record, a CSV cell, a tar member): the one gate.

Every adapter that opens a file named by the dataset goes through `read_inside` (or
`resolve_inside` when it only needs the location), with the folder the name is relative to as the
root (the image folder, the CSV's folder, `image_root=`). A name is refused, and its file never
opened, when it is

  - not a string (null, a number, a list, ...), empty, or holds a NUL byte or invalid Unicode;
  - absolute: POSIX `/etc/x`, Windows `C:\\x` or `C:x`, `\\\\server\\share`, `\\x`;
  - escaping by `..` components (in either slash direction);
  - or resolves, after following every symlink, to a place outside the resolved root (a symlink in
    `images/` pointing elsewhere). The root itself may be a symlink: it is resolved first, so a
    dataset whose `images/` folder lives on another disk still works.

A refusal is a reason naming the field and the path (`image_name '../x.png' has '..' components ...;
not read`) that the adapter puts into the record's `problem`: validation then quarantines the row
with that reason, the other rows are ingested, and no byte of a file outside the dataset reaches
the shards or `quarantine.parquet`. The final open uses O_NOFOLLOW and checks for a regular file,
so a symlink swapped in after the check, a FIFO or a device is refused too.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from galen.flows.ingest.schema import describe, unicode_problem

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def path_problem(name: Any, field: str) -> str | None:
    """Why `name` (the value of `field`) cannot be a path inside the dataset, judged from the name
    alone (nothing on disk is touched); None when it may be resolved."""
    if not isinstance(name, str):
        return f"{field} is {describe(name)}, not a path; not read"
    if not name.strip():
        return f"{field} is empty"
    if "\x00" in name:
        return f"{field} {name!r} contains a NUL byte; not read"
    bad_text = unicode_problem(name, field)
    if bad_text:
        return f"{bad_text}; not read"
    win = PureWindowsPath(name)
    if PurePosixPath(name).is_absolute() or win.is_absolute() or win.drive or name.startswith("\\"):
        return f"{field} {name!r} is an absolute path (paths are relative to the dataset); not read"
    if ".." in re.split(r"[\\/]", name):
        return f"{field} {name!r} has '..' components (it would leave the dataset); not read"
    return None


def resolve_inside(root: str | Path, name: Any, field: str) -> tuple[Path | None, str | None]:
    """(the real path of `root/name`, None) when it lies inside `root` after resolving symlinks,
    else (None, why). The file need not exist; `read_inside` says so when it does not."""
    why = path_problem(name, field)
    if why:
        return None, why
    try:
        real_root = Path(root).resolve()
        real = (real_root / name).resolve()
    except (OSError, RuntimeError) as e:  # symlink loops (RuntimeError before Python 3.13)
        return None, f"{field} {name!r} cannot be resolved ({e}); not read"
    if real == real_root or not real.is_relative_to(real_root):
        return None, f"{field} {name!r} is a symlink pointing outside {root}; not followed"
    return real, None


def read_inside(root: str | Path, name: Any, field: str) -> tuple[bytes | None, str | None]:
    """(bytes of the regular file `root/name`, None) when it lies inside `root`, else (None, why)."""
    real, why = resolve_inside(root, name, field)
    if real is None:
        return None, why
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None, f"{field} {name!r}: file not found in {root}"
    except OSError as e:  # ELOOP: the last component became a symlink after the check
        return None, f"{field} {name!r} cannot be opened ({e.strerror}); not read"
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None, f"{field} {name!r} is not a regular file in {root}; not read"
        try:
            return f.read(), None
        except OSError as e:
            return None, f"{field} {name!r} cannot be read ({e.strerror})"
