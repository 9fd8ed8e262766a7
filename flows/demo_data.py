"""Procedural, learnable demo data written in the raw layouts of real datasets.

`write_vqa_rad` writes a VQA-RAD-style dataset (`trainset.json`, `testset.json` and an image
folder of `synpicNNNN.jpg`): radiograph-like textures with bright round "nodules" whose presence,
count, side and size decide the answers, so a model that learns shows it in its accuracy.
`write_demo` writes one folder per ingest format (VQA-RAD, R2Gen IU X-ray, MedMNIST, MedNLI, MeQSum,
caption CSV + WebDataset, DICOM, and a small set of real images shipped by installed packages), so
the demo pipeline runs through the real adapters. Everything is reproducible from the seed, down
to the bytes: fixed encoder settings, zip/tar timestamps, sorted JSON keys and seed-derived UIDs.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import tarfile
import uuid
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

NUMBER_WORDS = ("zero", "one", "two", "three")


@dataclass
class DemoImage:
    pixels: np.ndarray          # uint8 HxW
    modality: str               # "x-ray" | "ct"
    nodules: list[tuple[int, int, int]]  # (cx, cy, radius) in pixels


def _texture(rng: np.random.Generator, size: int, modality: str) -> np.ndarray:
    """Smooth low-contrast background: a chest-film-like gradient (x-ray) or a round body section (ct)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    noise = rng.normal(0, 1, (size // 8, size // 8))
    noise = np.kron(noise, np.ones((8, 8)))[:size, :size]
    if modality == "x-ray":
        base = 70 + 40 * np.cos((xx - 0.5) * np.pi) ** 2 + 8 * noise
    else:
        body = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.16
        base = np.where(body, 90 + 6 * noise, 15 + 3 * noise)
    return base


def make_image(rng: np.random.Generator, size: int) -> DemoImage:
    modality = "x-ray" if rng.random() < 0.5 else "ct"
    img = _texture(rng, size, modality)
    count = int(rng.integers(0, 4))
    side = "left" if rng.random() < 0.5 else "right"
    nodules = []
    yy, xx = np.mgrid[0:size, 0:size]
    large = rng.random() < 0.5
    for _ in range(count):
        r = int(size * (0.09 if large else 0.05))
        # radiological convention: the patient's left is on the image's right
        lo, hi = (size // 2 + r + 2, size - r - 6) if side == "left" else (r + 6, size // 2 - r - 2)
        # overlapping nodules would merge into one visible blob and make the count answer wrong, so
        # redraw the position (the first draw is the one older versions used, keeping most images as they were)
        for _attempt in range(50):
            cx, cy = int(rng.integers(lo, hi)), int(rng.integers(r + 8, size - r - 8))
            if all((cx - ox) ** 2 + (cy - oy) ** 2 > (r + orad + 4) ** 2 for ox, oy, orad in nodules):
                break
        else:
            continue  # no room left: fewer nodules, and the answers follow the nodules actually drawn
        img = np.where((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r, 220.0, img)
        nodules.append((cx, cy, r))
    return DemoImage(np.clip(img, 0, 255).astype(np.uint8), modality, nodules)


def questions_for(image: DemoImage, size: int) -> list[tuple[str, str, str, str]]:
    """(question, answer, answer_type, question_type) pairs that the image's content decides."""
    n = len(image.nodules)
    qs = [("is there a nodule in this image?", "yes" if n else "no", "CLOSED", "PRES"),
          ("how many nodules are there?", NUMBER_WORDS[n], "OPEN", "COUNT"),
          ("what imaging modality is this?", image.modality, "OPEN", "MODALITY")]
    if n:
        side = "left" if image.nodules[0][0] > size // 2 else "right"
        big = image.nodules[0][2] >= size * 0.07
        qs.append(("which side is the nodule on?", side, "OPEN", "POS"))
        qs.append(("are the nodules large?", "yes" if big else "no", "CLOSED", "SIZE"))
    return qs


def write_vqa_rad(out_dir: str | Path, num_images: int = 48, image_size: int = 128, test_fraction: float = 0.25,
                  seed: int = 0) -> dict[str, int]:
    """Write `out_dir/{trainset,testset}.json` and `out_dir/images/` in the VQA-RAD layout."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    qid = 0
    num_test = int(round(num_images * test_fraction))
    for i in range(num_images):
        image = make_image(rng, image_size)
        name = f"synpic{10000 + i}.jpg"
        Image.fromarray(image.pixels).save(out / "images" / name, quality=95)
        split = "test" if i < num_test else "train"
        for question, answer, answer_type, question_type in questions_for(image, image_size):
            qid += 1
            splits[split].append({
                "qid": qid, "image_name": name, "image_organ": "CHEST", "question": question, "answer": answer,
                "answer_type": answer_type, "question_type": question_type, "phrase_type": "freeform",
            })
    (out / "trainset.json").write_text(json.dumps(splits["train"], indent=1))
    (out / "testset.json").write_text(json.dumps(splits["test"], indent=1))
    return {split: len(rows) for split, rows in splits.items()}
