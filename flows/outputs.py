"""Stage outputs written whole, and only over what the stage itself wrote.

`replacing_output(out, command=..., inputs=..., owned=...)` yields a fresh temporary path beside the
output (same parent, so the final rename stays on one file system): `.<name>.tmp-<random hex>`. The
stage writes everything there; when its `with` block ends without an exception the temporary takes
the output's place, and on any exception it is removed and the previous output is left as it was.

Replacing a folder: the old folder is renamed aside (`.<name>.old-<random hex>`), the new one is
renamed in, then the old one is deleted; a crash at any step leaves the old output or the new one
under the output's name (or, between the two renames, the old one under its `.old-` name), never a
mix of both. A file is replaced by one `os.replace`.

Before anything is written the output is refused (`GalenInputError`) when it is, contains or lies
inside one of the stage's inputs, and when it already exists holding files the stage does not own.
For a folder, `owned` is the stage's file patterns (relative paths, `*` within one path component):
the first is the marker the stage always writes (`ingest.json`, `manifest.json`, ...), and an existing
folder is the stage's only if it has that marker and every file in it matches a pattern. For a file,
`owned` is a function telling whether an existing file is one the stage wrote. An absent output (what
`dvc repro` leaves before it runs a stage) or an empty folder is always fine.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from galen.model.errors import GalenInputError

Owned = Sequence[str] | Callable[[Path], bool]
SHOWN = 5  # foreign file names quoted in a refusal


def refuse_overlap(out: str | Path, inputs: Iterable[str | Path], command: str, flag: str = "--out") -> None:
    """Refuse an output that is one of the inputs, lies inside one, or contains one (replacing it would
    delete or pollute the data the stage reads)."""
    target = Path(out).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            how = "is" if target == source else "is inside" if target.is_relative_to(source) else "contains"
            raise GalenInputError(f"`{command}` {flag} {out} {how} its input {given}: writing it would destroy or "
                                  f"change the input; give {flag} a path outside every input")


def _matches(name: str, pattern: str) -> bool:
    parts, wanted = name.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


def _files(folder: Path) -> list[str]:
    """Every non-folder entry under `folder` (links included, never followed), as sorted relative paths."""
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        found += [(base / n).as_posix() for n in files]
        found += [(base / n).as_posix() for n in dirs if (Path(root) / n).is_symlink()]
    return sorted(found)


def _refuse_foreign(out: Path, command: str, owned: Owned, flag: str) -> None:
    """Refuse an existing output holding anything the stage did not write."""
    if not out.exists() and not out.is_symlink():
        return
    if callable(owned):
        if out.is_symlink() or not out.is_file() or not owned(out):
            raise GalenInputError(f"`{command}` will not replace {out}: it is not a file `{command}` wrote; "
                                  f"choose another {flag} or remove it")
        return
    if out.is_symlink() or not out.is_dir():
        raise GalenInputError(f"`{command}` will not replace {out}: it is not a folder `{command}` wrote; "
                              f"choose another {flag} or remove it")
    files = _files(out)
    if files and owned[0] not in files:
        foreign, why = files, f"no {owned[0]}: not an output of `{command}`"
    else:
        foreign, why = [f for f in files if not any(_matches(f, p) for p in owned)], None
    if foreign:
        names = ", ".join(foreign[:SHOWN]) + (f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else "")
        raise GalenInputError(f"`{command}` will not replace {out}: it holds files `{command}` did not write "
                              f"({why + '; ' if why else ''}{names}); choose another {flag} or remove them")


def _beside(out: Path, kind: str) -> Path:
    """An unused hidden name next to `out`: `.<name>.<kind>-<random hex>`."""
    while True:
        path = out.parent / f".{out.name}.{kind}-{secrets.token_hex(4)}"
        if not path.exists() and not path.is_symlink():
            return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def replacing_output(out: str | Path, *, command: str, inputs: Iterable[str | Path] = (),
                     owned: Owned, flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary folder (or, when `owned` is a function, a temporary file path) to write the
    output of `command` into; it replaces `out` whole when the block succeeds and is removed when it
    raises. See the module's docstring for what is refused; `flag` names the option that chose `out`."""
    out = Path(out)
    if not callable(owned) and not owned:
        raise ValueError("owned needs at least the stage's marker file")
    refuse_overlap(out, inputs, command, flag)
    _refuse_foreign(out, command, owned, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(out, "tmp")
    if not callable(owned):
        tmp.mkdir()
    try:
        yield tmp
        _refuse_foreign(out, command, owned, flag)  # nothing foreign arrived while the stage ran
        if callable(owned) or not out.exists():
            os.replace(tmp, out)
        else:
            old = _beside(out, "old")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old)
    except BaseException:
        _remove(tmp)
        raise
