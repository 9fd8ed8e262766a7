"""MedMNIST v2: one `<flag>.npz` per subset (`pathmnist.npz`; size variants `pathmnist_64.npz`, ...).

Each file holds `train_images, train_labels, val_images, val_labels, test_images, test_labels`:
uint8 images (N,H,W) or (N,H,W,3) and integer labels (N,1), or (N,C) 0/1 for the multi-label
ChestMNIST. Class names come from the `medmnist` package's `INFO[flag]["label"]` (no download).

Multi-label flags ("multi-label, binary-class", i.e. chestmnist): the target is the comma-joined
positive class names in label-index order, or "normal" when none is positive (the NIH ChestX-ray14
"No Finding" case). Such a target is a combination, not one of a closed set, so these records carry
`candidates=None` (validation would quarantine a target missing from `candidates`) and the class
names go to `meta["label_names"]` instead. Every other flag gets `candidates` = all class names in
label-index order. 3D flags (`*mnist3d`) are volumes, which this 2D image schema cannot hold.

Bounded memory: the arrays are never loaded whole (pathmnist_224's train_images alone is 12.6 GiB).
Each array's `.npy` header (shape, dtype) is read from its zip member first and checked against
params.yaml `ingest.limits` (max_array_bytes, max_image_pixels) and against the bytes the member
really holds, for every split before any record is made; then the rows are streamed a chunk at a
time. An over-limit, truncated or pickled array is one GalenInputError naming the file.
"""

from __future__ import annotations

import logging
import math
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galen.flows.ingest import register_format
from galen.flows.ingest.limits import IngestLimits, resolve
from galen.flows.ingest.schema import SPLITS, Record, encode_png
from galen.model.errors import GalenInputError

log = logging.getLogger(__name__)

LICENSE = "CC BY 4.0 (MedMNIST v2, Yang et al. 2023; the licence of each source dataset also applies)"
MULTI_LABEL_TASK = "multi-label, binary-class"
NO_FINDING = "normal"
_SIZE_SUFFIX = re.compile(r"^(?P<flag>[a-z0-9]+?)(?:_(?P<size>\d+))?$")
CHUNK_BYTES = 8 << 20  # rows are read from the .npz this many bytes at a time


def _info() -> dict[str, dict[str, Any]]:
    """`medmnist.INFO`: class names per flag, without downloading any data."""
    try:
        import medmnist
    except ImportError as e:
        raise GalenInputError("the medmnist format needs the class names of the `medmnist` package; "
                              "run `pip install medmnist`") from e
    return medmnist.INFO


def parse_flag(path: Path) -> tuple[str, int | None]:
    """(flag, size) from a file name: `pathmnist_64.npz` -> ("pathmnist", 64); size None means 28."""
    m = _SIZE_SUFFIX.match(path.stem.lower())
    if m is None:
        return path.stem.lower(), None
    return m["flag"], int(m["size"]) if m["size"] else None


def class_names(info: dict[str, Any]) -> list[str]:
    """Class names sorted by their integer label index (INFO keys are strings "0", "1", ..., "10")."""
    return [str(name) for _, name in sorted(info["label"].items(), key=lambda kv: int(kv[0]))]


def _files(source: Path, flags: list[str] | None, info: dict[str, dict]) -> list[Path]:
    if flags is not None:
        unknown = sorted(set(flags) - set(info))
        if unknown:
            raise GalenInputError(f"unknown MedMNIST flags {unknown}; known flags: {', '.join(info)}")
    if source.is_file():
        if flags is not None and parse_flag(source)[0] not in flags:
            raise GalenInputError(f"{source.name} is not one of the requested flags {flags}")
        return [source]
    files = []
    for path in sorted(source.glob("*.npz")):
        flag, _ = parse_flag(path)
        if flag not in info:
            log.warning("skipping %s: %r is not a MedMNIST flag", path.name, flag)
        elif flags is None or flag in flags:
            files.append(path)
    if not files:
        wanted = f"any of {flags}" if flags else "a MedMNIST <flag>.npz"
        raise GalenInputError(f"{source} holds no .npz file for {wanted} (e.g. pathmnist.npz, pathmnist_64.npz); "
                              "download them from Zenodo (record 10519652) or point --source at one file")
    return files


def _target(label: np.ndarray, names: list[str], multi_label: bool) -> tuple[str, str | None, list[int]]:
    """(target, problem, label indices) of one label row."""
    values = [int(v) for v in np.asarray(label).reshape(-1)]
    if multi_label:
        if len(values) != len(names) or any(v not in (0, 1) for v in values):
            return "", f"multi-label row {values} is not {len(names)} values of 0/1", values
        positives = [names[i] for i, v in enumerate(values) if v == 1]
        return (",".join(positives) if positives else NO_FINDING), None, values
    if len(values) != 1:
        return "", f"expected one class index, got {values}", values
    if not 0 <= values[0] < len(names):
        return "", f"class index {values[0]} outside 0..{len(names) - 1}", values
    return names[values[0]], None, values


def _image(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 1:
        return array[..., 0]
    return array


@dataclass(frozen=True)
class NpyMember:
    """One array of an .npz as its header declares it, before any of its data is read."""
    path: Path
    key: str
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def where(self) -> str:
        return f"{self.path}:{self.key}"


def _header(path: Path, zf: zipfile.ZipFile, key: str, limits: IngestLimits) -> NpyMember:
    """The header of array `key`, checked: no pickled objects, within max_array_bytes, and not
    declaring more data than its member holds (a truncated or forged file)."""
    info = zf.getinfo(f"{key}.npy")
    fmt = np.lib.format
    try:
        with zf.open(info) as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {version} (MedMNIST files use 1.0)")
            offset = f.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise GalenInputError(f"{path}:{key} is not a readable .npy array ({type(e).__name__}: {e}); "
                              "re-download the file") from e
    member = NpyMember(path, key, info, tuple(int(n) for n in shape), np.dtype(dtype), bool(fortran_order), offset)
    if member.dtype.hasobject:  # object arrays need pickle, which we never unpickle from a download
        raise GalenInputError(f"{member.where} holds object arrays (dtype {member.dtype}, stored with pickle); "
                              "MedMNIST files hold plain uint8/int arrays: re-download the original file")
    if not member.shape:
        raise GalenInputError(f"{member.where} is a single value, not an array of rows; re-download the file")
    if member.nbytes > limits.max_array_bytes:
        raise GalenInputError(limits.refusal(f"{member.where} declares shape {member.shape} {member.dtype}, which",
                                             member.nbytes, "max_array_bytes") + "; nothing was read")
    held = info.file_size - offset
    if held < member.nbytes:
        raise GalenInputError(f"{member.where} declares shape {member.shape} {member.dtype} ({member.nbytes:,} "
                              f"bytes) but its zip member holds only {max(held, 0):,} bytes of data: the file is "
                              "truncated or forged; re-download it (nothing was read)")
    return member


def _rows(zf: zipfile.ZipFile, member: NpyMember, limits: IngestLimits) -> Iterator[np.ndarray]:
    """The rows (axis 0) of an array, read CHUNK_BYTES at a time and counted: never the whole array."""
    rows, row_shape = member.shape[0], member.shape[1:]
    row_bytes = math.prod(row_shape) * member.dtype.itemsize
    try:
        with zf.open(member.info) as f:
            f.seek(member.data_offset)
            if member.fortran_order and len(row_shape) > 0:  # column-major: rows are not contiguous
                if member.nbytes > limits.max_member_bytes:
                    raise GalenInputError(limits.refusal(f"{member.where} is stored in Fortran order (read whole), "
                                                         "and its size", member.nbytes, "max_member_bytes")
                                          + "; re-save it in C order")
                data = f.read(member.nbytes)
                if len(data) != member.nbytes:
                    raise EOFError(f"{len(data):,} of {member.nbytes:,} bytes")
                yield from np.frombuffer(data, member.dtype).reshape(member.shape[::-1]).T
                return
            per_chunk = max(1, CHUNK_BYTES // max(row_bytes, 1))
            done = 0
            while done < rows:
                count = min(per_chunk, rows - done)
                data = f.read(count * row_bytes)
                if len(data) != count * row_bytes:
                    raise EOFError(f"row {done + len(data) // max(row_bytes, 1):,} of {rows:,} is cut short")
                yield from np.frombuffer(data, member.dtype).reshape((count, *row_shape))
                done += count
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise GalenInputError(f"{member.where} became unreadable while reading ({type(e).__name__}: {e}); the file "
                              "is truncated or corrupt: re-download it") from e


def _split_arrays(path: Path, zf: zipfile.ZipFile, keys: list[str], limits: IngestLimits
                  ) -> list[tuple[str, NpyMember, NpyMember]]:
    """(split, images, labels) headers of every split, all checked before any row is read."""
    present = [s for s in SPLITS if f"{s}_images" in keys]
    if not present:
        raise GalenInputError(f"{path.name} has none of train_images/val_images/test_images "
                              f"(keys: {keys}); is it a MedMNIST v2 file?")
    out = []
    for split in present:
        key = f"{split}_labels"
        if key not in keys:
            raise GalenInputError(f"{path.name} has {split}_images but no {key}; re-download the file")
        images, labels = _header(path, zf, f"{split}_images", limits), _header(path, zf, key, limits)
        if images.dtype != np.uint8:
            raise GalenInputError(f"{path.name}:{split}_images is {images.dtype}, MedMNIST images are uint8")
        shape = images.shape
        if not (len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3))):
            raise GalenInputError(f"{path.name}:{split}_images has shape {shape}; expected (N,H,W) or (N,H,W,3)")
        if shape[1] * shape[2] > limits.max_image_pixels:
            raise GalenInputError(limits.refusal(f"{path}:{split}_images: each image ({shape[2]}x{shape[1]})",
                                                 shape[1] * shape[2], "max_image_pixels", "pixels"))
        if labels.shape[0] != shape[0]:
            raise GalenInputError(f"{path.name}: {shape[0]} {split} images but {labels.shape[0]} labels")
        out.append((split, images, labels))
    return out


def read_npz(path: Path, info: dict[str, dict], limits: IngestLimits | None = None) -> Iterator[Record]:
    """Records of one MedMNIST .npz; structural problems (keys, dtype, shapes, sizes) stop with an
    error before the first record."""
    limits = resolve(limits)
    flag, size = parse_flag(path)
    if flag not in info:
        raise GalenInputError(f"{path.name}: {flag!r} is not a MedMNIST flag (known: {', '.join(info)}); "
                              "keep the original file names (<flag>.npz or <flag>_<size>.npz)")
    if flag.endswith("3d"):
        raise GalenInputError(f"{path.name} holds 3D volumes ({flag}); the medmnist format reads the 2D subsets only")
    flag_info = info[flag]
    names = class_names(flag_info)
    multi_label = flag_info["task"] == MULTI_LABEL_TASK
    dataset = f"medmnist-{flag}"
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise GalenInputError(f"{path} is not a readable .npz archive ({e}); re-download it") from e
    with zf:
        keys = [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
        for split, images, labels in _split_arrays(path, zf, keys, limits):
            for i, (image, label) in enumerate(zip(_rows(zf, images, limits), _rows(zf, labels, limits))):
                target, problem, values = _target(label, names, multi_label)
                meta: dict[str, Any] = {"flag": flag, "size": size or 28, "label": values,
                                        "medmnist_task": flag_info["task"]}
                if multi_label:
                    meta["label_names"] = names
                yield Record(task="classification", split=split, dataset=dataset, source_id=f"{path.stem}:{split}:{i}",
                             target=target, image=encode_png(_image(image)),
                             candidates=None if multi_label else list(names), license=LICENSE, problem=problem,
                             meta=meta)


@register_format("medmnist", "MedMNIST v2: <flag>.npz / <flag>_<size>.npz (or a folder of them; option flags=[...])")
def read(source: Path, flags: list[str] | str | None = None, limits: IngestLimits | Mapping[str, Any] | None = None,
         **_: object) -> Iterator[Record]:
    source = Path(source)
    if isinstance(flags, str):
        flags = [f.strip() for f in flags.split(",") if f.strip()]
    checked = resolve(limits)
    info = _info()
    for path in _files(source, flags, info):
        yield from read_npz(path, info, checked)
