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
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from galen.flows.ingest import register_format
from galen.flows.ingest.schema import SPLITS, Record, encode_png
from galen.model.errors import GalenInputError

log = logging.getLogger(__name__)

LICENSE = "CC BY 4.0 (MedMNIST v2, Yang et al. 2023; the licence of each source dataset also applies)"
MULTI_LABEL_TASK = "multi-label, binary-class"
NO_FINDING = "normal"
_SIZE_SUFFIX = re.compile(r"^(?P<flag>[a-z0-9]+?)(?:_(?P<size>\d+))?$")


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


def read_npz(path: Path, info: dict[str, dict]) -> Iterator[Record]:
    """Records of one MedMNIST .npz; structural problems (keys, dtype, shapes) stop with an error."""
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
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise GalenInputError(f"{path} is not a readable .npz archive ({e}); re-download it") from e
    with data:
        present = [s for s in SPLITS if f"{s}_images" in data.files]
        if not present:
            raise GalenInputError(f"{path.name} has none of train_images/val_images/test_images "
                                  f"(keys: {data.files}); is it a MedMNIST v2 file?")
        for split in present:
            key = f"{split}_labels"
            if key not in data.files:
                raise GalenInputError(f"{path.name} has {split}_images but no {key}; re-download the file")
            try:
                images, labels = data[f"{split}_images"], data[key]
            except ValueError as e:  # object arrays need pickle, which we never unpickle from a download
                raise GalenInputError(f"{path.name}:{split} holds object arrays ({e}); MedMNIST files hold plain "
                                      "uint8/int arrays: re-download the original file") from e
            if images.dtype != np.uint8:
                raise GalenInputError(f"{path.name}:{split}_images is {images.dtype}, MedMNIST images are uint8")
            if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))):
                raise GalenInputError(f"{path.name}:{split}_images has shape {images.shape}; "
                                      "expected (N,H,W) or (N,H,W,3)")
            if len(labels) != len(images):
                raise GalenInputError(f"{path.name}: {len(images)} {split} images but {len(labels)} labels")
            for i in range(len(images)):
                target, problem, values = _target(labels[i], names, multi_label)
                meta: dict[str, Any] = {"flag": flag, "size": size or 28, "label": values,
                                        "medmnist_task": flag_info["task"]}
                if multi_label:
                    meta["label_names"] = names
                yield Record(task="classification", split=split, dataset=dataset, source_id=f"{path.stem}:{split}:{i}",
                             target=target, image=encode_png(_image(images[i])),
                             candidates=None if multi_label else list(names), license=LICENSE, problem=problem,
                             meta=meta)


@register_format("medmnist", "MedMNIST v2: <flag>.npz / <flag>_<size>.npz (or a folder of them; option flags=[...])")
def read(source: Path, flags: list[str] | str | None = None, **_: object) -> Iterator[Record]:
    source = Path(source)
    if isinstance(flags, str):
        flags = [f.strip() for f in flags.split(",") if f.strip()]
    info = _info()
    for path in _files(source, flags, info):
        yield from read_npz(path, info)
