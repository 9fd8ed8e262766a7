"""Reading untrusted `torch.save` files (released checkpoints, open_clip `.bin` weights) without running
code and without letting the file decide how much memory is spent.

Before anything is unpickled the zip directory is checked: `torch.save` writes one *stored* (never
compressed) record per tensor storage, so a compressed record is a file torch did not write and could
inflate far beyond its size (a zip bomb) — it is refused, as are records that claim more bytes than
the file holds, so what is read is bounded by the file's own size. The pickle then goes through
torch's weights-only unpickler. The storages are read, not memory-mapped: a caller may save over the
file it loaded (load, edit, `torch.save` to the same path), which truncates a mapped file under the
tensors still using it (SIGBUS).

The legacy (pre-1.6, non-zip) format is refused: its storage sizes are declared inside the pickle
stream and allocated as they are read, so they cannot be checked first.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from galen.model.errors import GalenCheckpointError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER, the first object of a legacy file
CORRUPT = "the file is truncated or corrupt — download it again"


def _said(error: BaseException) -> str:
    """An exception's text, one line, without torch's advice to turn the weights-only unpickler off."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and "arbitrary code" not in line]
    picked = next((line for line in useful if "WeightsUnpickler error" in line), useful[0] if useful else "")
    return picked[:200] or type(error).__name__


def _is_legacy(head: bytes) -> bool:
    """A legacy torch file starts with the pickled magic number: PROTO 2, LONG1 of 10 bytes."""
    return len(head) >= 14 and head[:4] == b"\x80\x02\x8a\x0a" and int.from_bytes(head[4:14], "little") == LEGACY_MAGIC


def check_torch_zip(path: Path) -> None:
    """GalenCheckpointError unless `path` is a torch.save zip whose records are stored, uncompressed,
    and fit inside the file (so no record can make a reader allocate more than the file's size)."""
    size = path.stat().st_size
    if size == 0:
        raise GalenCheckpointError(f"{path} is empty (0 bytes); the download or copy did not finish — fetch it again")
    with path.open("rb") as f:
        head = f.read(16)
    if _is_legacy(head):
        raise GalenCheckpointError(
            f"{path} is in the legacy (non-zip) torch format, whose tensor sizes cannot be checked before they are "
            "allocated, so Galen does not read it: load it in a trusted environment and re-save it with "
            "torch.save(obj, path) (torch >= 1.6 writes the zip format), then use that file")
    if head[:1] == b"\x80":
        raise GalenCheckpointError(f"{path} is a plain Python pickle, not a torch.save checkpoint; Galen does not "
                                   "unpickle arbitrary files. Re-save its tensors with torch.save or safetensors")
    try:
        with zipfile.ZipFile(path) as z:
            records = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        kind = "a truncated or damaged zip" if head[:2] == b"PK" else "neither torch.save's zip format nor a pickle"
        raise GalenCheckpointError(f"{path} is not a readable PyTorch checkpoint ({kind}: {_said(e)}); {CORRUPT}") \
            from e
    if not any(r.filename.endswith("data.pkl") for r in records):
        raise GalenCheckpointError(f"{path} is a zip file but not a torch.save checkpoint (it has no data.pkl)")
    for r in records:
        if r.compress_type != zipfile.ZIP_STORED:
            raise GalenCheckpointError(
                f"{path} refused: its record {r.filename} is compressed ({r.compress_size:,} bytes that inflate to "
                f"{r.file_size:,}). torch.save never compresses, so this file was not written by torch.save and could "
                "expand far beyond its size; re-save the tensors with torch.save or safetensors")
        if r.file_size != r.compress_size or r.header_offset + r.file_size > size:
            raise GalenCheckpointError(f"{path}: record {r.filename} declares {r.file_size:,} bytes, more than the "
                                       f"{size:,}-byte file holds; {CORRUPT}")
    if sum(r.file_size for r in records) > size:
        raise GalenCheckpointError(f"{path}: its records declare more bytes than the {size:,}-byte file holds; "
                                   f"{CORRUPT}")


def read_torch_file(path: str | Path, allowed_globals: Sequence[Any] = (), what: str = "checkpoint") -> Any:
    """torch.load of an untrusted file: the zip checked first, then the weights-only unpickler with
    `allowed_globals` added (e.g. the config classes a fairseq checkpoint pickles). Never runs code;
    every problem is a GalenCheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise GalenCheckpointError(f"{what} file {path} not found")
    check_torch_zip(path)
    allowed = list(allowed_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - unreadable in another way: fall through to the generic message
            names = []
        allowed_names = {f"{g.__module__}.{g.__qualname__}" for g in allowed if hasattr(g, "__qualname__")}
        extra = [n for n in names if n not in allowed_names]
        if extra:
            raise GalenCheckpointError(
                f"{path} refused: unpickling it would import {', '.join(extra)}, which could run arbitrary code. "
                "Galen reads tensors, plain containers" + (" and the config classes fairseq pickles (argparse."
                                                           "Namespace, omegaconf containers)" if allowed else "")
                + " only. If you trust the file, re-save its state dict with plain tensors and use that.") from e
        raise GalenCheckpointError(f"{path} cannot be read ({_said(e)}); {CORRUPT}") from e
    except Exception as e:  # noqa: BLE001 - whatever an untrusted file makes the reader raise is a bad file
        raise GalenCheckpointError(f"{path} is not a readable PyTorch checkpoint ({_said(e)}); {CORRUPT}") from e
