"""Pipeline steps for image-infilling targets: train a k-means patch codebook, then encode images.

`train_image_codes` fits `KMeansPatchCodes` on the middle crops of the training images (the
region OFA's image infilling masks: resize to 2*crop square, keep the central crop x crop) and
writes the tokenizer, a JSON report and a preview PNG (originals above their reconstructions)
so a person can judge what the codes keep. `encode_image_codes` writes `image_sha1 -> codes`
as Parquet, which `PrecomputedCodes.from_file` reads back, so training looks codes up instead
of re-encoding. Images are deduplicated by hash (VQA repeats an image per question), and the
split/selection is deterministic by seed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from galen.flows.ingest.schema import image_sha1, read_records
from galen.flows.outputs import replacing_output
from galen.model.errors import GalenConfigError, GalenInputError
from galen.model.image_code_files import PARQUET_META_KEY, load_image_codes
from galen.model.image_codebook import (
    CODEBOOK_FILE,
    IMAGE_CODES_JSON,
    PATCH_SIZE,
    KMeansPatchCodes,
    middle_crop,
    patchify,
    to_uint8,
)

REPORT_FILE = "report.json"
PREVIEW_FILE = "preview.png"
# what `train_image_codes` writes into its folder, the marker first (galen.flows.outputs)
CODEBOOK_FILES = (REPORT_FILE, IMAGE_CODES_JSON, CODEBOOK_FILE, PREVIEW_FILE)
MAX_EVAL_IMAGES = 256
PREVIEW_IMAGES = 8


def _image_records(shards_dir: str | Path, splits: Sequence[str]) -> Iterator[tuple[str, bytes]]:
    """(sha1, bytes) of every usable image record in `splits`, first occurrence of each image only."""
    seen: set[str] = set()
    for rec in read_records(shards_dir):
        if rec.split not in splits or rec.image is None or rec.problem:
            continue
        sha = image_sha1(rec.image)
        assert sha is not None
        if sha not in seen:
            seen.add(sha)
            yield sha, rec.image


def _crop(data: bytes, crop: int) -> np.ndarray | str:
    """The middle crop, or the reason the bytes could not be decoded."""
    try:
        return middle_crop(data, crop)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"undecodable ({type(exc).__name__})"


def _select(keys: Sequence[str], max_images: int | None, seed: int) -> set[str]:
    """A seeded, order-independent subset: the max_images keys with the smallest salted hash."""
    if max_images is None or len(keys) <= max_images:
        return set(keys)
    ranked = sorted(keys, key=lambda k: hashlib.sha1(f"{seed}:{k}".encode()).hexdigest())
    return set(ranked[:max_images])


def _to_float(crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _reconstruction(tok: KMeansPatchCodes, crops: list[np.ndarray]) -> tuple[float | None, float | None, np.ndarray]:
    """(mse, pixel variance, reconstructions) of crops in [-1, 1] units; variance = a 1-code baseline."""
    if not crops:
        return None, None, np.zeros((0,), np.uint8)
    x = _to_float(np.stack(crops))
    y = torch.cat([tok.decode_float(tok.encode(x[i:i + 64])).cpu() for i in range(0, len(x), 64)])
    return float(((y - x) ** 2).mean()), float(((x - x.mean((0, 2, 3), keepdim=True)) ** 2).mean()), to_uint8(y)


def _write_preview(path: Path, originals: list[np.ndarray], recon: np.ndarray) -> None:
    n = min(PREVIEW_IMAGES, len(originals))
    if n == 0:
        return
    top = np.concatenate(originals[:n], axis=1)
    bottom = np.concatenate(list(recon[:n]), axis=1)
    Image.fromarray(np.concatenate([top, bottom], axis=0)).save(path)


def train_image_codes(
    shards_dir: str | Path,
    out_dir: str | Path,
    num_codes: int = 8192,
    crop: int = 128,
    patches_per_image: int | None = 64,
    max_images: int | None = None,
    seed: int = 0,
    *,
    splits: Sequence[str] = ("train",),
    normalize: bool = True,
    projection_dim: int | None = None,
    epochs: int = 10,
    batch_size: int = 4096,
    device: str = "cpu",
) -> dict[str, Any]:
    """Fit and save a KMeansPatchCodes on the middle crops of the training images; returns the report.

    patches_per_image (None = all (crop/8)^2) bounds memory: patches are kept as uint8 until the
    fit. Reconstruction MSE is measured on up to 256 of the training crops and, when the shards
    have one, 256 val crops the codebook never saw.
    """
    if isinstance(crop, bool) or not isinstance(crop, int) or crop <= 0 or crop % PATCH_SIZE:
        raise GalenConfigError(f"crop={crop!r} must be a positive multiple of the {PATCH_SIZE}-pixel patch")
    grid = crop // PATCH_SIZE
    if patches_per_image is not None and not 1 <= patches_per_image:
        raise GalenConfigError(f"patches_per_image must be >= 1 or None (all), got {patches_per_image}")
    if max_images is not None and max_images < 1:
        raise GalenConfigError(f"max_images must be >= 1 or None (all), got {max_images}")
    per_image = grid * grid if patches_per_image is None else min(patches_per_image, grid * grid)
    # written whole into a temporary folder that replaces out_dir at the end (galen.flows.outputs)
    with replacing_output(out_dir, command="galen image-codes train", inputs=[shards_dir],
                          owned=CODEBOOK_FILES) as out:
        start = time.perf_counter()

        train_keys = [sha for sha, _ in _image_records(shards_dir, splits)]
        if not train_keys:
            raise GalenInputError(f"no usable images in the {'/'.join(splits)} split(s) of {shards_dir}; "
                                  "image codes are trained on image records (run ingest and validate first)")
        chosen = _select(train_keys, max_images, seed)
        gen = torch.Generator().manual_seed(int(seed))
        skipped: Counter[str] = Counter()
        patches: list[torch.Tensor] = []
        eval_crops: list[np.ndarray] = []
        for sha, data in _image_records(shards_dir, splits):
            if sha not in chosen:
                continue
            img = _crop(data, crop)
            if isinstance(img, str):
                skipped[img] += 1
                continue
            p = patchify(torch.from_numpy(img).permute(2, 0, 1)[None], PATCH_SIZE).reshape(grid * grid, -1)
            if per_image < grid * grid:
                p = p[torch.randperm(grid * grid, generator=gen)[:per_image]]
            patches.append(p.clone())
            if len(eval_crops) < MAX_EVAL_IMAGES:
                eval_crops.append(img)
        if not patches:
            raise GalenInputError(f"none of the {len(chosen)} selected images in {shards_dir} could be decoded "
                                  f"({dict(skipped)})")
        x = torch.cat(patches).float() / 127.5 - 1.0
        tok = KMeansPatchCodes.fit(x, num_codes, grid=grid, normalize=normalize, projection_dim=projection_dim,
                                   seed=seed, epochs=epochs, batch_size=batch_size, device=device)
        tok.save(out)

        train_mse, variance, recon = _reconstruction(tok, eval_crops)
        _write_preview(out / PREVIEW_FILE, eval_crops, recon)
        train_set = set(train_keys)
        val_crops: list[np.ndarray] = []
        if "val" not in splits:
            for sha, data in _image_records(shards_dir, ("val",)):
                if sha in train_set:
                    continue
                img = _crop(data, crop)
                if not isinstance(img, str):
                    val_crops.append(img)
                if len(val_crops) >= MAX_EVAL_IMAGES:
                    break
        val_mse, _, _ = _reconstruction(tok, val_crops)
        report = {
            "kind": tok.kind, "num_codes": tok.num_codes, "codes_used": tok.stats["codes_used"],
            "crop": crop, "grid": grid, "splits": list(splits), "seed": seed,
            "images_available": len(train_keys), "images_used": len(patches),
            "images_skipped": dict(skipped), "patches": int(x.shape[0]), "patches_per_image": per_image,
            "normalize": normalize, "projection_dim": projection_dim, "epochs": epochs,
            "init_inertia": tok.stats["init_inertia"], "inertia": tok.stats["inertia"],
            "inertia_per_patch": tok.stats["inertia"] / x.shape[0],
            "reconstruction_mse": train_mse, "reconstruction_psnr_db": _psnr(train_mse),
            "pixel_variance": variance, "eval_images": len(eval_crops),
            "val_reconstruction_mse": val_mse, "val_reconstruction_psnr_db": _psnr(val_mse),
            "val_images": len(val_crops), "seconds": round(time.perf_counter() - start, 3),
        }
        (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _psnr(mse: float | None) -> float | None:
    """PSNR in dB for pixels in [-1, 1] (peak-to-peak 2)."""
    if mse is None:
        return None
    return float("inf") if mse == 0 else float(10 * np.log10(4.0 / mse))


def encode_image_codes(
    shards_dir: str | Path,
    tokenizer_dir: str | Path,
    out_path: str | Path,
    *,
    splits: Sequence[str] = ("train",),
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """Write Parquet `image_sha1, codes` (row-major grid^2 ints) for the middle crops of the images.

    The file's schema metadata records kind/num_codes/grid, so `PrecomputedCodes.from_file`
    reports the codebook's real size. Written to a temp name beside it and renamed (galen.flows.outputs):
    never half a file, never over a file that is not an image-code table, never inside an input.
    """
    with replacing_output(out_path, command="galen image-codes encode", inputs=[shards_dir, tokenizer_dir],
                          owned=_is_code_table) as tmp:
        summary = _encode(shards_dir, tokenizer_dir, tmp, splits=splits, batch_size=batch_size, device=device)
    return {**summary, "out": str(out_path)}


def _is_code_table(path: Path) -> bool:
    """Whether an existing file is a table `encode_image_codes` wrote (its schema carries the codebook's meta)."""
    try:
        return PARQUET_META_KEY in (pq.read_schema(path).metadata or {})
    except (OSError, pa.ArrowException):
        return False


def _encode(shards_dir: str | Path, tokenizer_dir: str | Path, out: Path, *, splits: Sequence[str], batch_size: int,
            device: str) -> dict[str, Any]:
    tok = load_image_codes(tokenizer_dir)
    if not isinstance(tok, KMeansPatchCodes):
        raise GalenConfigError(f"{tokenizer_dir} holds a {tok.kind!r} image tokenizer, which cannot encode pixels; "
                               "precomputed codes are already a lookup table")
    tok.to(device)
    keys: list[str] = []
    codes: list[np.ndarray] = []
    skipped: Counter[str] = Counter()
    batch_keys: list[str] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            c = tok.encode(np.stack(batch)).reshape(len(batch), -1).cpu().numpy().astype(np.int32)
            codes.extend(c)
            keys.extend(batch_keys)
            batch.clear()
            batch_keys.clear()

    for sha, data in _image_records(shards_dir, splits):
        img = _crop(data, tok.image_size)
        if isinstance(img, str):
            skipped[img] += 1
            continue
        batch.append(img)
        batch_keys.append(sha)
        if len(batch) >= batch_size:
            flush()
    flush()
    if not keys:
        raise GalenInputError(f"no decodable images in the {'/'.join(splits)} split(s) of {shards_dir}")
    meta = {"kind": tok.kind, "num_codes": tok.num_codes, "grid": tok.grid, "patch_size": tok.patch_size,
            "crop": tok.image_size, "splits": list(splits)}
    schema = pa.schema([("image_sha1", pa.string()), ("codes", pa.list_(pa.int32()))],
                       metadata={PARQUET_META_KEY: json.dumps(meta).encode()})
    table = pa.Table.from_pydict({"image_sha1": keys, "codes": [c.tolist() for c in codes]}, schema=schema)
    pq.write_table(table, out, compression="zstd")
    return {"images": len(keys), "images_skipped": dict(skipped), "num_codes": tok.num_codes, "grid": tok.grid}
