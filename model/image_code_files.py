"""Image codes read from files: codes a real VQGAN made elsewhere, and saved image-tokenizer folders.

`PrecomputedCodes` ("precomputed") looks codes up by the SHA-1 of an image's encoded bytes (OFA's
pretraining `image.tsv` ships such codes), read from a .parquet table (what
`galen.flows.codebook.encode_image_codes` writes), .npz or .jsonl; every reader checks keys,
shapes and ranges, so a bad file fails with its name. `load_image_codes` rebuilds whichever kind
saved an `image_codes.json` folder, so the kinds registry lives here, beside the last kind. The
`ImageCodeTokenizer` interface, the pixel helpers and the k-means codebook are in
galen.model.image_codebook.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from galen.model.errors import GalenConfigError, GalenInputError, read_json
from galen.model.image_codebook import (
    DEFAULT_GRID,
    DEFAULT_NUM_CODES,
    FORMAT_VERSION,
    IMAGE_CODES_JSON,
    PATCH_SIZE,
    TRAIN_HINT,
    ImageCodeTokenizer,
    ImageInput,
    KMeansPatchCodes,
    check_grid,
    load_tensors,
)

CODES_FILE = "codes.safetensors"
PARQUET_META_KEY = b"galen.image_codes"

_SHA1_RE = re.compile(r"[0-9a-f]{40}")


# ----------------------------------------------------------------------------- precomputed


class PrecomputedCodes(ImageCodeTokenizer):
    """Codes made elsewhere (a real VQGAN), looked up by the SHA-1 of the image's encoded bytes.

    The key is `flows.ingest.schema.image_sha1(record.image)`, so records find their codes
    without re-encoding anything. `encode` on pixels is refused: there is no model to run.
    """

    kind: ClassVar[str] = "precomputed"

    def __init__(self, keys: Sequence[str], codes: torch.Tensor | np.ndarray, *, num_codes: int = DEFAULT_NUM_CODES,
                 grid: int = DEFAULT_GRID, patch_size: int = PATCH_SIZE, source: str = "codes") -> None:
        check_grid(grid, patch_size)
        if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
            raise GalenConfigError(f"num_codes must be a positive integer, got {num_codes!r}")
        arr = np.asarray(codes)
        n = len(keys)
        if arr.size == 0 and n == 0:
            arr = arr.reshape(0, grid * grid)
        if arr.ndim != 2 or arr.shape[0] != n:
            raise GalenInputError(f"{source}: codes must be one row per key ({n} keys), got shape {arr.shape}")
        if arr.shape[1] != grid * grid:
            raise GalenInputError(f"{source}: each image needs {grid}x{grid} = {grid * grid} codes, got {arr.shape[1]}")
        if arr.dtype.kind not in "iu":
            raise GalenInputError(f"{source}: codes must be integers, got {arr.dtype}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_codes):
            bad = int(np.argmax((arr < 0).any(1) | (arr >= num_codes).any(1)))
            raise GalenInputError(f"{source}: codes of image {keys[bad]} are outside 0..{num_codes - 1} "
                                  f"(range {int(arr.min())}..{int(arr.max())}); pass the quantizer's num_codes")
        index: dict[str, int] = {}
        rows: list[int] = []
        for i, key in enumerate(keys):
            key = _norm_sha1(key, source)
            j = index.get(key)
            if j is None:
                index[key] = len(rows)
                rows.append(i)
            elif not np.array_equal(arr[rows[j]], arr[i]):
                raise GalenInputError(f"{source}: image {key} appears twice with different codes")
        self._index = index
        self._codes = torch.from_numpy(arr[rows].astype(np.int64)).reshape(len(rows), grid, grid)
        self.num_codes, self.grid, self.patch_size = num_codes, grid, patch_size

    # construction from files
    @classmethod
    def from_mapping(cls, mapping: dict[str, Sequence[int]], **kwargs: Any) -> PrecomputedCodes:
        """From {image_sha1: codes}; every code list must have grid*grid entries."""
        grid = kwargs.get("grid", DEFAULT_GRID)
        keys = list(mapping)
        rows = [_int_list(mapping[k], f"image {k}") for k in keys]
        _check_lengths(keys, rows, grid, "codes")
        return cls(keys, np.array(rows, dtype=np.int64).reshape(len(rows), grid * grid), **kwargs)

    @classmethod
    def from_file(cls, path: str | Path, *, num_codes: int | None = None, grid: int | None = None) -> PrecomputedCodes:
        """Read `image_sha1 -> codes` from .parquet, .npz (arrays image_sha1, codes) or .jsonl.

        num_codes and grid default to what the file says (Parquet written by
        `flows.codebook.encode_image_codes` records them), else OFA's 8192 and 16.
        """
        path = Path(path)
        if not path.is_file():
            raise GalenConfigError(f"precomputed codes file {path} does not exist")
        suffix = path.suffix.lower()
        file_meta: dict[str, Any] = {}
        if suffix == ".parquet":
            keys, rows, file_meta = _read_parquet_codes(path)
        elif suffix == ".npz":
            keys, rows = _read_npz_codes(path)
        elif suffix in (".jsonl", ".ndjson"):
            keys, rows = _read_jsonl_codes(path)
        else:
            raise GalenConfigError(f"{path}: unknown codes file type {suffix!r}; use .parquet, .npz or .jsonl")
        grid = int(grid if grid is not None else file_meta.get("grid", DEFAULT_GRID))
        num_codes = int(num_codes if num_codes is not None else file_meta.get("num_codes", DEFAULT_NUM_CODES))
        if isinstance(rows, list):
            _check_lengths(keys, rows, grid, str(path))
            arr = np.array(rows, dtype=np.int64).reshape(len(rows), grid * grid)
        elif rows.shape[1] != grid * grid:
            raise GalenInputError(f"{path}: rows have {rows.shape[1]} codes, expected {grid}x{grid} = {grid * grid}")
        else:
            arr = rows
        return cls(keys, arr, num_codes=num_codes, grid=grid, source=str(path))

    # lookups
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sha1: object) -> bool:
        return isinstance(sha1, str) and sha1.lower() in self._index

    def keys(self) -> list[str]:
        return list(self._index)

    def encode_by_key(self, sha1: str) -> torch.Tensor:
        """LongTensor (grid, grid) of the image whose encoded bytes hash to `sha1`."""
        j = self._index.get(sha1.lower()) if isinstance(sha1, str) else None
        if j is None:
            raise GalenInputError(f"no precomputed codes for image sha1 {sha1!r} ({len(self)} images have codes); "
                                  "encode it with the same VQGAN, or train a kmeans image tokenizer")
        return self._codes[j].clone()

    def encode_by_keys(self, sha1s: Iterable[str]) -> torch.Tensor:
        """LongTensor (B, grid, grid) for several hashes."""
        rows = [self.encode_by_key(s) for s in sha1s]
        if not rows:
            raise GalenInputError("no image hashes given")
        return torch.stack(rows)

    def encode_by_image_bytes(self, data: bytes) -> torch.Tensor:
        """Codes of an encoded image (PNG/JPEG bytes as stored in the records)."""
        import hashlib

        return self.encode_by_key(hashlib.sha1(data).hexdigest())

    def encode(self, images: ImageInput) -> torch.Tensor:
        raise GalenInputError("precomputed image codes are looked up by image hash, not computed from pixels: "
                              "use encode_by_key(image_sha1) (the sha1 of the record's encoded image bytes) or "
                              "encode_by_image_bytes(data)")

    def _save_files(self, directory: Path) -> tuple[list[str], dict[str, Any]]:
        from safetensors.torch import save_file

        keys = np.frombuffer(b"".join(bytes.fromhex(k) for k in self._index), dtype=np.uint8).reshape(len(self), 20)
        save_file({"sha1": torch.from_numpy(keys.copy()),
                   "codes": self._codes.reshape(len(self), -1).to(torch.int32).contiguous()},
                  str(directory / CODES_FILE))
        return [CODES_FILE], {"num_images": len(self)}

    @classmethod
    def _from_files(cls, directory: Path, meta: dict[str, Any]) -> PrecomputedCodes:
        path = directory / meta["files"][0]
        t = load_tensors(path)
        if "sha1" not in t or "codes" not in t or t["sha1"].ndim != 2 or t["sha1"].shape[1] != 20:
            raise GalenConfigError(f"{path} is not a precomputed-codes table (needs sha1 (N, 20) and codes)")
        keys = [bytes(row).hex() for row in t["sha1"].numpy()]
        return cls(keys, t["codes"].numpy(), num_codes=meta["num_codes"], grid=meta["grid"],
                   patch_size=meta["patch_size"], source=str(path))


def _norm_sha1(key: Any, source: str) -> str:
    if not isinstance(key, str) or not _SHA1_RE.fullmatch(key.lower()):
        raise GalenInputError(f"{source}: key {key!r} is not a SHA-1 hex digest (40 hex characters); precomputed "
                              "codes are keyed by the sha1 of the image's encoded bytes")
    return key.lower()


def _check_lengths(keys: Sequence[Any], rows: Sequence[Sequence[int]], grid: int, source: str) -> None:
    for k, r in zip(keys, rows):
        if len(r) != grid * grid:
            raise GalenInputError(f"{source}: image {k} has {len(r)} codes, expected {grid}x{grid} = {grid * grid}")


def _int_list(values: Any, what: str) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise GalenInputError(f"{what}: codes must be a list of integers, got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise GalenInputError(f"{what}: code {v!r} is not an integer")
        out.append(int(v))
    return out


def _read_parquet_codes(path: Path) -> tuple[list[str], Any, dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise GalenConfigError(f"{path} is not a readable Parquet file ({exc})") from exc
    missing = {"image_sha1", "codes"} - set(table.column_names)
    if missing:
        raise GalenInputError(f"{path} lacks column(s) {sorted(missing)}; precomputed codes need image_sha1 and codes")
    meta: dict[str, Any] = {}
    raw = (table.schema.metadata or {}).get(PARQUET_META_KEY)
    if raw:
        meta = json.loads(raw)
    col = table.column("codes").combine_chunks()
    if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
        raise GalenInputError(f"{path}: column codes must be a list of integers, got {col.type}")
    if not pa.types.is_integer(col.type.value_type):
        raise GalenInputError(f"{path}: codes must be integers, got {col.type.value_type}")
    if col.null_count:
        raise GalenInputError(f"{path}: {col.null_count} rows have no codes")
    keys = table.column("image_sha1").to_pylist()
    lengths = pc.list_value_length(col).to_numpy()
    values = col.flatten().to_numpy()
    if len(set(lengths.tolist())) > 1 or len(keys) == 0:
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return keys, [values[offsets[i]:offsets[i + 1]].tolist() for i in range(len(keys))], meta
    return keys, values.reshape(len(keys), int(lengths[0])).astype(np.int64), meta


def _read_npz_codes(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "image_sha1" not in data or "codes" not in data:
                raise GalenInputError(f"{path} must hold arrays 'image_sha1' and 'codes', has {sorted(data.files)}")
            keys = [str(k) for k in data["image_sha1"]]
            codes = np.asarray(data["codes"])
    except ValueError as exc:
        if isinstance(exc, GalenInputError):
            raise
        raise GalenInputError(f"{path}: cannot read arrays without pickle ({exc}); store image_sha1 as a "
                              "fixed-width string array, codes as an (N, grid*grid) integer array") from exc
    if codes.ndim != 2:
        raise GalenInputError(f"{path}: codes must be an (N, grid*grid) array, got shape {codes.shape}")
    if codes.dtype.kind not in "iu":
        raise GalenInputError(f"{path}: codes must be integers, got {codes.dtype}")
    return keys, codes.astype(np.int64)


def _read_jsonl_codes(path: Path) -> tuple[list[str], list[list[int]]]:
    keys, rows = [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GalenInputError(f"{path}:{n}: not valid JSON ({exc})") from exc
            if not isinstance(obj, dict) or "image_sha1" not in obj or "codes" not in obj:
                raise GalenInputError(f'{path}:{n}: expected {{"image_sha1": ..., "codes": [...]}}')
            rows.append(_int_list(obj["codes"], f"{path}:{n}"))
            keys.append(obj["image_sha1"])
    return keys, rows


# ----------------------------------------------------------------------------- registry and files


IMAGE_CODE_KINDS: dict[str, type[ImageCodeTokenizer]] = {
    KMeansPatchCodes.kind: KMeansPatchCodes,
    PrecomputedCodes.kind: PrecomputedCodes,
}


def load_image_codes(directory: str | Path) -> ImageCodeTokenizer:
    """Rebuild the image tokenizer saved in `directory`, whatever its kind."""
    directory = Path(directory)
    meta_path = directory / IMAGE_CODES_JSON
    if not meta_path.is_file():
        raise GalenConfigError(f"{meta_path} is missing: {TRAIN_HINT}")
    meta = read_json(meta_path, dict, TRAIN_HINT, GalenConfigError)
    if meta.get("format_version") != FORMAT_VERSION:
        raise GalenConfigError(f"{meta_path} has format_version {meta.get('format_version')!r}; this Galen reads "
                               f"{FORMAT_VERSION}: upgrade Galen or re-save the image tokenizer")
    kind = meta.get("kind")
    if kind not in IMAGE_CODE_KINDS:
        raise GalenConfigError(f"{meta_path} names image tokenizer kind {kind!r}; known kinds: "
                               f"{sorted(IMAGE_CODE_KINDS)}")
    files = meta.get("files")
    if not (isinstance(files, list) and files and all(isinstance(f, str) and f and Path(f).name == f
                                                       and f not in (".", "..") for f in files)):
        raise GalenConfigError(f"{meta_path}: files must list plain file names in the same folder, got {files!r}")
    for key in ("num_codes", "grid", "patch_size"):
        if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), int):
            raise GalenConfigError(f"{meta_path}: {key} must be an integer, got {meta.get(key)!r}")
    return IMAGE_CODE_KINDS[kind]._from_files(directory, meta)
