"""Procedural, learnable demo data written in the raw layouts of real datasets.

`write_vqa_rad` writes a VQA-RAD-style dataset (`trainset.json`, `testset.json` and an image
folder of `synpicNNNN.jpg`): radiograph-like textures with bright round "nodules" whose presence,
count, side and size decide the answers, so a model that learns shows it in its accuracy.
`write_demo` writes one folder per ingest format (VQA-RAD, R2Gen IU X-ray, MedMNIST, MedNLI, MeQSum,
caption CSV + WebDataset, DICOM, SLAKE with detection.json boxes for grounding, and a small set of real
images shipped by installed packages), so
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# -- shared helpers: seeded streams, byte-stable writers, shapes ------------------------------------
WORDS = ("no", "one", "two", "three", "four")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold: no clock in the bytes
TAR_MTIME = 946684800             # 2000-01-01T00:00:00Z for every tar member


def _rng(seed: int, name: str) -> np.random.Generator:
    """An independent stream per format, so adding or resizing one format never changes another's data."""
    return np.random.default_rng([zlib.crc32(name.encode()), seed % 2**64])


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column index of every pixel (floats, so shapes can be painted with arithmetic)."""
    yy, xx = np.mgrid[0:size, 0:size]
    return yy.astype(np.float64), xx.astype(np.float64)


def _smooth_noise(rng: np.random.Generator, size: int, cell: int = 8) -> np.ndarray:
    """Unit-variance-ish low-frequency noise: a coarse normal grid upsampled bilinearly."""
    coarse = rng.normal(0, 1, (size // cell + 2, size // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float64)


def _disc(yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _ellipse(yn: np.ndarray, xn: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((xn - cx) / a) ** 2 + ((yn - cy) / b) ** 2 <= 1


def _place_discs(rng: np.random.Generator, count: int, radius: int,
                 centre: Callable[[], tuple[int, int] | None], gap: int,
                 tries: int = 100) -> list[tuple[int, int, int]]:
    """Up to `count` non-touching discs (cx, cy, r); a disc that finds no room is left out, never overlapped,
    because merged blobs would make a count in the text disagree with the image."""
    placed: list[tuple[int, int, int]] = []
    for _ in range(count):
        for _attempt in range(tries):
            c = centre()
            if c is not None and all((c[0] - x) ** 2 + (c[1] - y) ** 2 > (radius + r + gap) ** 2 for x, y, r in placed):
                placed.append((c[0], c[1], radius))
                break
    return placed


def _count_phrase(count: int, large: bool, noun: str) -> str:
    """'no nodules', 'one small nodule', 'three large nodules'."""
    if count == 0:
        return f"no {noun}s"
    return f"{WORDS[count]} {'large' if large else 'small'} {noun}{'s' if count > 1 else ''}"


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _zip_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
    """A deflated zip whose entries carry a fixed time and mode (np.savez and openpyxl stamp the clock)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


# -- chest films (IU X-ray reports, DICOM CR) -------------------------------------------------------
# Geometry in fractions of the image side. Radiological convention: the patient's left is the image's right.
LUNG_CY, LUNG_A, LUNG_B, LUNG_DX = 0.45, 0.17, 0.33, 0.20
HEART_CX, HEART_CY = 0.55, 0.60
HEART_AXES = {False: (0.12, 0.10), True: (0.21, 0.14)}   # cardiomegaly -> big central blob
EFFUSION_TOP = 0.62                                      # effusion: lung below this is fluid-bright
NODULE_Y = (0.16, 0.46)
UPPER_ZONE_Y = 0.31                                      # a nodule centred above this is "upper lobe"
CHEST_NODULE_R = {False: 0.035, True: 0.06}
FILM = {"air": 18.0, "body": 105.0, "lung": 50.0, "mediastinum": 140.0, "effusion": 150.0, "heart": 180.0,
        "nodule": 228.0}


@dataclass
class ChestFindings:
    nodules: list[tuple[int, int, int]]  # (cx, cy, r) on the frontal view, pixels
    side: str                            # patient side of the nodules
    large: bool
    cardiomegaly: bool
    effusion: str | None                 # patient side of the pleural effusion, None if none


def _lung_cx(side: str) -> float:
    return 0.5 + LUNG_DX if side == "left" else 0.5 - LUNG_DX


def sample_chest_findings(rng: np.random.Generator, size: int, count: int | None = None) -> ChestFindings:
    """Random findings, with the frontal nodules already placed inside one lung and apart from each other
    (`count` nodules when given; otherwise a random 0-3, drawn from `rng` as it always was)."""
    count = int(rng.choice(4, p=[0.4, 0.3, 0.2, 0.1])) if count is None else count
    side = "left" if rng.random() < 0.5 else "right"
    large = bool(rng.random() < 0.5)
    cardiomegaly = bool(rng.random() < 0.3)
    effusion = None if rng.random() < 0.7 else ("left" if rng.random() < 0.5 else "right")
    r = max(2, round(CHEST_NODULE_R[large] * size))
    lx, ly = _lung_cx(side) * size, LUNG_CY * size
    a, b = LUNG_A * size - r - 2, LUNG_B * size - r - 2

    def centre() -> tuple[int, int] | None:
        cx = int(rng.integers(int(lx - a), int(lx + a) + 1))
        cy = int(rng.integers(int(NODULE_Y[0] * size), int(NODULE_Y[1] * size) + 1))
        return (cx, cy) if ((cx - lx) / a) ** 2 + ((cy - ly) / b) ** 2 <= 1 else None

    return ChestFindings(_place_discs(rng, count, r, centre, gap=4), side, large, cardiomegaly, effusion)


def chest_film(rng: np.random.Generator, size: int, findings: ChestFindings, view: str = "frontal") -> np.ndarray:
    """A uint8 chest film: dark lungs with rib stripes, a bright heart blob (big with cardiomegaly), a
    fluid-bright band low in one lung for an effusion, and the brightest round nodules."""
    yy, xx = _pixel_grid(size)
    yn, xn = yy / size, xx / size
    img = np.full((size, size), FILM["air"])
    body = _ellipse(yn, xn, 0.5, 0.58, 0.46, 0.52)
    img[body] = FILM["body"]
    ribs = 10 * np.sin(yy * 0.45)
    if view == "frontal":
        img[body & (np.abs(xn - 0.5) < 0.06)] = FILM["mediastinum"]
        for side in ("left", "right"):
            lung = _ellipse(yn, xn, _lung_cx(side), LUNG_CY, LUNG_A, LUNG_B)
            img[lung] = FILM["lung"] + ribs[lung]
            if findings.effusion == side:
                img[lung & (yn >= EFFUSION_TOP)] = FILM["effusion"]
        ha, hb = HEART_AXES[findings.cardiomegaly]
        img[_ellipse(yn, xn, HEART_CX, HEART_CY, ha, hb)] = FILM["heart"]
        nodules = findings.nodules
    else:  # lateral: one lung field, heart anterior (image left), spine posterior, fluid in the posterior angle
        img[body & (xn > 0.80) & (xn < 0.88)] = FILM["mediastinum"]
        lung = _ellipse(yn, xn, 0.52, 0.44, 0.27, 0.32)
        img[lung] = FILM["lung"] + ribs[lung]
        if findings.effusion:
            img[lung & (yn >= 0.64) & (xn > 0.52)] = FILM["effusion"]
        ha, hb = (0.20, 0.16) if findings.cardiomegaly else (0.13, 0.12)
        img[_ellipse(yn, xn, 0.36, 0.62, ha, hb)] = FILM["heart"]
        r = findings.nodules[0][2] if findings.nodules else 2
        a, b = 0.27 * size - r - 2, 0.32 * size - r - 2

        def centre() -> tuple[int, int] | None:
            cx = int(rng.integers(int(0.52 * size - a), int(0.52 * size + a) + 1))
            cy = int(rng.integers(int(NODULE_Y[0] * size), int(NODULE_Y[1] * size) + 1))
            return (cx, cy) if ((cx - 0.52 * size) / a) ** 2 + ((cy - 0.44 * size) / b) ** 2 <= 1 else None

        nodules = _place_discs(rng, len(findings.nodules), r, centre, gap=4)
    for cx, cy, r in nodules:
        img[_disc(yy, xx, cx, cy, r)] = FILM["nodule"]
    img += 4 * _smooth_noise(rng, size)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def chest_report(findings: ChestFindings, size: int) -> str:
    """The templated radiology report that the film shows: heart, nodules, effusion."""
    parts = ["the heart is enlarged." if findings.cardiomegaly else "the heart size is normal."]
    n = len(findings.nodules)
    if n == 0:
        parts.append("no focal nodules are seen.")
    elif n == 1:
        zone = "upper lobe" if findings.nodules[0][1] < UPPER_ZONE_Y * size else "mid lung"
        parts.append(f"there is a {'large' if findings.large else 'small'} nodule in the {findings.side} {zone}.")
    else:
        parts.append(f"there are {_count_phrase(n, findings.large, 'nodule')} in the {findings.side} lung.")
    parts.append(f"there is a {findings.effusion} pleural effusion." if findings.effusion else "no pleural effusion.")
    parts.append("no pneumothorax.")
    return " ".join(parts)


def _split_sizes(total: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Train/val/test sizes with at least one of each (so every adapter split is exercised)."""
    total = max(3, total)
    val, test = max(1, round(total * val_fraction)), max(1, round(total * test_fraction))
    return {"train": total - val - test, "val": val, "test": test}


def write_iu_xray(out_dir: str | Path, num_studies: int = 60, image_size: int = 128, seed: int = 0) -> dict[str, int]:
    """R2Gen's IU X-ray layout: `annotation.json` ({split: [{id, report, image_path, split}]}) and
    `images/<study>/{0,1}.png` (frontal and lateral film of the same findings)."""
    out = Path(out_dir)
    rng = _rng(seed, "iu_xray")
    annotation: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    i = 0
    for split, n in _split_sizes(num_studies, 0.1, 0.2).items():
        for _ in range(n):
            study = f"CXR{1000 + i}_IM-{2000 + i}"
            i += 1
            findings = sample_chest_findings(rng, image_size)
            (out / "images" / study).mkdir(parents=True, exist_ok=True)
            for k, view in enumerate(("frontal", "lateral")):
                Image.fromarray(chest_film(rng, image_size, findings, view)).save(out / "images" / study / f"{k}.png")
            annotation[split].append({"id": study, "report": chest_report(findings, image_size),
                                      "image_path": [f"{study}/0.png", f"{study}/1.png"], "split": split})
    _write_json(out / "annotation.json", annotation)
    return {split: len(rows) for split, rows in annotation.items()}


# -- CT slices (captions, DICOM) ------------------------------------------------------------------
CT_LUNGS = ((0.32, 0.48), (0.68, 0.48))
CT_LUNG_AXES = (0.13, 0.20)
CT_NODULE_R = {False: 0.03, True: 0.055}
CT_HU = {"air": -1000.0, "body": 40.0, "lung": -850.0, "bone": 700.0, "nodule": 150.0}


def sample_ct_nodules(rng: np.random.Generator, size: int, count: int, large: bool) -> list[tuple[int, int, int]]:
    """Nodule discs inside either lung of an axial chest slice, apart from each other."""
    r = max(2, round(CT_NODULE_R[large] * size))
    a, b = CT_LUNG_AXES[0] * size - r - 2, CT_LUNG_AXES[1] * size - r - 2

    def centre() -> tuple[int, int] | None:
        lx, ly = CT_LUNGS[int(rng.integers(0, 2))]
        lx, ly = lx * size, ly * size
        cx, cy = int(rng.integers(int(lx - a), int(lx + a) + 1)), int(rng.integers(int(ly - b), int(ly + b) + 1))
        return (cx, cy) if ((cx - lx) / a) ** 2 + ((cy - ly) / b) ** 2 <= 1 else None

    return _place_discs(rng, count, r, centre, gap=4)


def ct_slice_hu(rng: np.random.Generator, size: int, nodules: Sequence[tuple[int, int, float]]) -> np.ndarray:
    """An axial chest slice in Hounsfield units: body, two lungs, a vertebra and soft-tissue nodules."""
    yy, xx = _pixel_grid(size)
    yn, xn = yy / size, xx / size
    hu = np.full((size, size), CT_HU["air"])
    hu[_ellipse(yn, xn, 0.5, 0.5, 0.42, 0.32)] = CT_HU["body"]
    for lx, ly in CT_LUNGS:
        hu[_ellipse(yn, xn, lx, ly, *CT_LUNG_AXES)] = CT_HU["lung"]
    hu[_ellipse(yn, xn, 0.5, 0.72, 0.05, 0.05)] = CT_HU["bone"]
    for cx, cy, r in nodules:
        if r > 0:
            hu[_disc(yy, xx, cx, cy, r)] = CT_HU["nodule"]
    return hu + 8 * _smooth_noise(rng, size) + rng.normal(0, 4, (size, size))


def window_uint8(hu: np.ndarray, center: float = 40.0, width: float = 400.0) -> np.ndarray:
    """Soft-tissue window: lungs black, body grey, nodules bright, bone white."""
    return np.clip(np.round((hu - (center - width / 2)) / width * 255), 0, 255).astype(np.uint8)


# -- SLAKE (VQA + detection.json boxes for grounding) ---------------------------------------------
SLAKE_SPLIT_FILES = {"train": "train.json", "val": "validate.json", "test": "test.json"}


def _ellipse_box(cx: float, cy: float, a: float, b: float, size: int) -> list[float]:
    """[x, y, w, h] of the pixels an `_ellipse` mask of centre (cx, cy) and semi-axes (a, b) (fractions) covers."""
    x0, y0 = max(0, int(np.ceil((cx - a) * size))), max(0, int(np.ceil((cy - b) * size)))
    x1, y1 = min(size, int(np.floor((cx + a) * size)) + 1), min(size, int(np.floor((cy + b) * size)) + 1)
    return [x0, y0, x1 - x0, y1 - y0]


def slake_image(rng: np.random.Generator, size: int, modality: str) -> tuple[np.ndarray, dict[str, list[float]], str]:
    """A chest x-ray or axial CT with exactly one nodule, its SLAKE-style boxes {name: [x, y, w, h]} (the nodule's
    tight box and both lungs', names in SLAKE's capitalisation) and the patient side of the nodule. One nodule
    per image, so the phrase "nodule" names exactly one box."""
    for _attempt in range(20):  # a draw that found no room for the nodule is drawn again: never a nodule-less image
        if modality == "X-Ray":
            findings = sample_chest_findings(rng, size, count=1)
            placed = findings.nodules
        else:
            placed = sample_ct_nodules(rng, size, 1, bool(rng.random() < 0.5))
        if placed:
            break
    else:
        raise ValueError(f"no room for a nodule in a {size}px {modality} image; use a larger image_size")
    nodule = placed[0]
    if modality == "X-Ray":
        pixels = chest_film(rng, size, findings)
        lungs = {side: _ellipse_box(_lung_cx(side), LUNG_CY, LUNG_A, LUNG_B, size) for side in ("left", "right")}
    else:
        pixels = window_uint8(ct_slice_hu(rng, size, [nodule]))
        # radiological convention: the patient's left lung is on the image's right
        lungs = {side: _ellipse_box(CT_LUNGS[k][0], CT_LUNGS[k][1], *CT_LUNG_AXES, size)
                 for k, side in enumerate(("right", "left"))}
    cx, cy, r = nodule
    boxes = {"Left Lung": lungs["left"], "Right Lung": lungs["right"], "Nodule": [cx - r, cy - r, 2 * r + 1, 2 * r + 1]}
    return pixels, boxes, "left" if cx > size // 2 else "right"


def write_slake(out_dir: str | Path, num_images: int = 60, image_size: int = 128, seed: int = 0) -> dict[str, int]:
    """SLAKE 1.0's layout: `train.json`, `validate.json`, `test.json` (English and Chinese questions with
    SLAKE's keys) and `imgs/xmlab<N>/{source.jpg, detection.json}`, where detection.json lists the true
    nodule box and both lung boxes as [{"<name>": [x, y, w, h]}, ...] in pixels of source.jpg."""
    out = Path(out_dir)
    rng = _rng(seed, "slake")
    rows: dict[str, list[dict]] = {split: [] for split in SLAKE_SPLIT_FILES}
    qid, img_id, boxes_written = 0, 0, 0
    for split, n in _split_sizes(num_images, 0.15, 0.15).items():
        for _ in range(n):
            modality = ("X-Ray", "CT")[img_id % 2]
            pixels, boxes, side = slake_image(rng, image_size, modality)
            folder = out / "imgs" / f"xmlab{img_id}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / "source.jpg", quality=95)
            (folder / "detection.json").write_text(json.dumps([{k: v} for k, v in boxes.items()]) + "\n")
            boxes_written += len(boxes)
            questions = [  # (question, answer, answer_type, content_type, lang)
                ("What modality is used to take this image?", modality, "OPEN", "Modality", "en"),
                ("Is there a nodule in this image?", "Yes", "CLOSED", "Abnormality", "en"),
                ("Which side of the lung is the nodule in?", side.capitalize(), "OPEN", "Position", "en"),
                ("这张图片是用什么方式拍摄的?", modality, "OPEN", "Modality", "zh"),
            ]
            for question, answer, answer_type, content_type, lang in questions:
                qid += 1
                rows[split].append({
                    "img_id": img_id, "img_name": f"xmlab{img_id}/source.jpg", "question": question,
                    "answer": answer, "answer_type": answer_type, "q_lang": lang, "modality": modality,
                    "location": "Lung", "content_type": content_type, "base_type": "vqa", "triple": ["vhead", "_", "_"],
                    "qid": qid})
            img_id += 1
    out.mkdir(parents=True, exist_ok=True)
    for split, name in SLAKE_SPLIT_FILES.items():
        (out / name).write_text(json.dumps(rows[split], indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return {**{split: len(r) for split, r in rows.items()}, "images": img_id, "boxes": boxes_written}


# -- histology and fundus photographs (captions) --------------------------------------------------
def histology_image(rng: np.random.Generator, size: int, count: int, large: bool) -> tuple[np.ndarray, int]:
    """An H&E-like RGB section: pink stroma speckled with purple nuclei and round glands (white lumen,
    purple epithelial ring). Returns the image and the number of glands drawn."""
    yy, xx = _pixel_grid(size)
    img = np.empty((size, size, 3))
    img[:] = (232.0, 168.0, 198.0)
    img += _smooth_noise(rng, size, 6)[..., None] * np.array([6.0, 8.0, 6.0])
    nuclei = np.zeros((size, size), bool)
    k = size * size // 90
    nuclei[rng.integers(0, size, k), rng.integers(0, size, k)] = True
    nuclei = nuclei | np.roll(nuclei, 1, 0) | np.roll(nuclei, 1, 1)
    img[nuclei] = (115.0, 60.0, 150.0)
    r = max(3, round((0.12 if large else 0.065) * size))
    glands = _place_discs(rng, count, r, lambda: (int(rng.integers(r + 5, size - r - 5)),
                                                  int(rng.integers(r + 5, size - r - 5))), gap=10)
    for cx, cy, _ in glands:
        img[_disc(yy, xx, cx, cy, r + 3)] = (120.0, 55.0, 160.0)
        img[_disc(yy, xx, cx, cy, r)] = (248.0, 242.0, 248.0)
    img += rng.normal(0, 2, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), len(glands)


FUNDUS_R = 0.46  # the camera's circular field, as a fraction of the side


def fundus_image(rng: np.random.Generator, size: int, count: int, large: bool) -> tuple[np.ndarray, int]:
    """A fundus-photograph-like RGB image: black surround, orange-red retina, pale optic disc, dark-red
    vessels and darker round hemorrhages. Returns the image and the number of hemorrhages drawn."""
    yy, xx = _pixel_grid(size)
    yn, xn = yy / size, xx / size
    d = np.sqrt((xn - 0.5) ** 2 + (yn - 0.5) ** 2) / FUNDUS_R
    inside = d <= 1
    img = np.full((size, size, 3), 4.0)
    img[..., 0] = np.where(inside, 205 - 60 * d ** 2, 4)
    img[..., 1] = np.where(inside, 85 - 25 * d ** 2, 4)
    img[..., 2] = np.where(inside, 35.0, 4)
    odx, ody = 0.72 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.05, 0.05)
    for sign in (-1, 1):
        for _ in range(2):
            c1, c2 = rng.uniform(0.1, 0.4), rng.uniform(0.5, 1.4)
            t = odx - xn
            curve = ody + sign * (c1 * t + c2 * t ** 2)
            img[inside & (t > 0) & (np.abs(yn - curve) < 1.2 / size + 0.004)] = (150.0, 38.0, 28.0)
    img[_ellipse(yn, xn, odx, ody, 0.07, 0.08)] = (245.0, 215.0, 140.0)
    r = max(2, round((0.06 if large else 0.03) * size))

    def centre() -> tuple[int, int] | None:
        cx, cy = int(rng.integers(0, size)), int(rng.integers(0, size))
        far_from_disc = (cx - odx * size) ** 2 + (cy - ody * size) ** 2 > (0.08 * size + r + 4) ** 2
        return (cx, cy) if far_from_disc and np.hypot(cx - size / 2, cy - size / 2) <= 0.36 * size - r else None

    spots = _place_discs(rng, count, r, centre, gap=4)
    for cx, cy, _ in spots:
        img[_disc(yy, xx, cx, cy, r)] = (95.0, 18.0, 12.0)
    img[inside] += rng.normal(0, 3, (int(inside.sum()), 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8), len(spots)


CAPTION_MODALITIES = ("ct", "histology", "fundus")


def caption_image(rng: np.random.Generator, size: int, modality: str) -> tuple[np.ndarray, str]:
    """One image of `modality` and the caption naming its modality and the count/size of its structures."""
    large = bool(rng.random() < 0.5)
    if modality == "ct":
        nodules = sample_ct_nodules(rng, size, int(rng.integers(0, 4)), large)
        pixels = window_uint8(ct_slice_hu(rng, size, nodules))
        n = len(nodules)
        what = f"showing {_count_phrase(n, large, 'nodule')}" if n else "with no nodules"
        return pixels, f"axial ct of the chest {what}"
    if modality == "histology":
        pixels, n = histology_image(rng, size, int(rng.integers(1, 5)), large)
        return pixels, f"h&e stained histology section showing {_count_phrase(n, large, 'gland')}"
    if modality == "fundus":
        pixels, n = fundus_image(rng, size, int(rng.integers(0, 4)), large)
        what = f"showing {_count_phrase(n, large, 'hemorrhage')}" if n else "with no hemorrhages"
        return pixels, f"fundus photograph of the retina {what}"
    raise ValueError(f"unknown caption modality {modality!r}; one of {CAPTION_MODALITIES}")


def _write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> None:
    """A plain tar with members in the order given and no clock, owner or host in the headers."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def write_captions(out_dir: str | Path, num_images: int = 48, num_webdataset: int = 24, image_size: int = 128,
                   seed: int = 0) -> dict[str, int]:
    """`captions.csv` (filepath,caption) + `images/`, and `webdataset/shard-000000.tar` (key.png + key.txt)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = _rng(seed, "captions")
    rows = []
    for i in range(num_images):
        modality = CAPTION_MODALITIES[i % len(CAPTION_MODALITIES)]
        pixels, caption = caption_image(rng, image_size, modality)
        name = f"images/{modality}_{i:04d}.png"
        Image.fromarray(pixels).save(out / name)
        rows.append((name, caption))
    _write_csv(out / "captions.csv", ("filepath", "caption"), rows)
    (out / "webdataset").mkdir(exist_ok=True)
    rng = _rng(seed, "webdataset")
    members = []
    for i in range(num_webdataset):
        pixels, caption = caption_image(rng, image_size, CAPTION_MODALITIES[i % len(CAPTION_MODALITIES)])
        key = f"sample{i:06d}"  # no dots: WebDataset splits key and extension at the first one
        members += [(f"{key}.png", _png_bytes(pixels)), (f"{key}.txt", caption.encode())]
    _write_tar(out / "webdataset" / "shard-000000.tar", sorted(members))
    return {"images": len(rows), "webdataset": num_webdataset}


# -- MedMNIST (PathMNIST) ----------------------------------------------------------------------------
# medmnist.INFO["pathmnist"]["label"], in label order (the adapter takes the names from the package).
PATHMNIST_CLASSES = ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                     "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium")


def _pathmnist_class_count() -> int:
    """The class count the adapter will see: from the installed medmnist package, else the known 9."""
    try:
        from medmnist import INFO  # type: ignore[import-not-found]
    except ImportError:
        return len(PATHMNIST_CLASSES)
    return len(INFO["pathmnist"]["label"])


def _dots(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, n: int, r_lo: float, r_hi: float) -> np.ndarray:
    size = yy.shape[0]
    cx, cy = rng.uniform(0, size, n), rng.uniform(0, size, n)
    r = rng.uniform(r_lo, r_hi, n)
    return ((xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2 <= (r ** 2)[:, None, None]).any(0)


def tissue_patch(rng: np.random.Generator, label: int, size: int = 28) -> np.ndarray:
    """A uint8 RGB histology patch whose class fixes its colour and pattern (fat honeycomb, empty
    background, debris speckle, dense lymphocyte dots, smooth mucus, muscle stripes, glands, wavy
    stroma fibres, crowded tumour clusters), jittered per sample so the class must be learned."""
    yy, xx = _pixel_grid(size)
    name = PATHMNIST_CLASSES[label]
    theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    across = -xx * np.sin(theta) + yy * np.cos(theta)
    bg, noise_amp = {
        "adipose": ((246, 238, 242), 3), "background": ((236, 234, 238), 3), "debris": ((214, 150, 182), 14),
        "lymphocytes": ((205, 160, 205), 6), "mucus": ((196, 188, 226), 5), "smooth muscle": ((226, 118, 150), 5),
        "normal colon mucosa": ((228, 172, 202), 5), "cancer-associated stroma": ((232, 150, 176), 6),
        "colorectal adenocarcinoma epithelium": ((175, 105, 175), 10)}[name]
    img = np.empty((size, size, 3))
    img[:] = np.array(bg, float) + rng.normal(0, 5, 3)
    img += noise_amp * _smooth_noise(rng, size, 4)[..., None]
    if name == "adipose":
        membranes = ((np.abs(np.sin(np.pi * (xx + phase) / 7 + 0.6 * np.sin(yy / 4))) < 0.18)
                     | (np.abs(np.sin(np.pi * (yy + phase) / 7 + 0.6 * np.sin(xx / 4))) < 0.18))
        img[membranes] = (225, 160, 190)
    elif name == "debris":
        img[_dots(rng, yy, xx, 18, 0.6, 1.6)] = (90, 40, 100)
        img[_dots(rng, yy, xx, 10, 0.6, 1.4)] = (180, 80, 120)
    elif name == "lymphocytes":
        img[_dots(rng, yy, xx, 70, 1.0, 1.6)] = (55, 35, 125)
    elif name == "mucus":
        img += (10 * np.sin(0.35 * along + 2 * np.sin(0.2 * across) + phase))[..., None]
    elif name == "smooth muscle":
        img += (22 * np.sin(0.9 * along + phase))[..., None] * np.array([1.0, 0.6, 0.6])
        img[_dots(rng, yy, xx, 4, 0.8, 1.2)] = (120, 50, 130)
    elif name == "normal colon mucosa":
        def anywhere() -> tuple[int, int]:
            return int(rng.integers(5, size - 5)), int(rng.integers(5, size - 5))

        for cx, cy, r in _place_discs(rng, 3, 3, anywhere, gap=5):
            img[_disc(yy, xx, cx, cy, r + 2)] = (95, 45, 140)
            img[_disc(yy, xx, cx, cy, r)] = (244, 236, 244)
    elif name == "cancer-associated stroma":
        img += (14 * np.sin(0.6 * along + 1.5 * np.sin(0.25 * across) + phase))[..., None]
        img[_dots(rng, yy, xx, 5, 0.8, 1.2)] = (130, 60, 140)
    elif name == "colorectal adenocarcinoma epithelium":
        img[_dots(rng, yy, xx, 14, 1.8, 3.2)] = (85, 30, 120)
    img += rng.normal(0, 3, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def write_pathmnist(out_dir: str | Path, per_class: dict[str, int] | None = None, seed: int = 0) -> dict[str, int]:
    """`pathmnist.npz` as MedMNIST ships it: {split}_images (N, 28, 28, 3) uint8, {split}_labels (N, 1) uint8."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_class = per_class or {"train": 100, "val": 20, "test": 30}
    num_classes = _pathmnist_class_count()
    if num_classes != len(PATHMNIST_CLASSES):
        raise RuntimeError(f"medmnist says pathmnist has {num_classes} classes, the demo draws "
                           f"{len(PATHMNIST_CLASSES)}; update PATHMNIST_CLASSES")
    rng = _rng(seed, "medmnist")
    members, counts = [], {}
    for split in ("train", "val", "test"):
        labels = np.repeat(np.arange(num_classes), per_class[split])[rng.permutation(num_classes * per_class[split])]
        images = np.zeros((len(labels), 28, 28, 3), np.uint8)
        for k, y in enumerate(labels):
            images[k] = tissue_patch(rng, int(y))
        members += [(f"{split}_images.npy", _npy_bytes(images)),
                    (f"{split}_labels.npy", _npy_bytes(labels.astype(np.uint8)[:, None]))]
        counts[split] = len(labels)
    (out / "pathmnist.npz").write_bytes(_zip_bytes(members))
    return counts


# -- MedNLI ------------------------------------------------------------------------------------------
# (premise templates, (low, high) value range, state) per vital-sign family and direction; each premise
# gets one hypothesis per label, and the same hypothesis is entailed by some premises and contradicted
# by others, so the label can only be read from the premise's number.
VITALS: dict[str, dict[str, Any]] = {
    "temperature": {"premises": ("the patient has a temperature of {v} c on admission.",
                                 "on arrival the temperature was {v} c."),
                    "states": {"febrile": (38.3, 40.2), "afebrile": (36.1, 37.4)}, "decimals": 1,
                    "neutral": ("the patient has pneumonia.", "the patient was started on antibiotics.",
                                "the patient has a urinary tract infection.")},
    "heart rate": {"premises": ("heart rate was {v} beats per minute.", "on exam the pulse was {v}."),
                   "states": {"tachycardic": (115, 160), "bradycardic": (35, 50)}, "decimals": 0,
                   "neutral": ("the patient has atrial fibrillation.", "the patient takes a beta blocker.",
                               "the patient is dehydrated.")},
    "oxygen saturation": {"premises": ("oxygen saturation was {v}% on room air.", "spo2 {v}% on room air."),
                          "states": {"hypoxic": (78, 88), "normoxic": (96, 100)}, "decimals": 0,
                          "neutral": ("the patient has copd.", "the patient is a smoker.",
                                      "the patient has a pulmonary embolism.")},
    "glucose": {"premises": ("blood glucose was {v} mg/dl.", "a fingerstick glucose of {v} was recorded."),
                "states": {"hyperglycemic": (280, 550), "hypoglycemic": (35, 58)}, "decimals": 0,
                "neutral": ("the patient has type 1 diabetes.", "the patient takes insulin.",
                            "the patient skipped a meal.")},
}
HISTORY = (("type 2 diabetes", "metformin"), ("hypertension", "lisinopril"), ("atrial fibrillation", "warfarin"),
           ("hypothyroidism", "levothyroxine"), ("asthma", "albuterol"), ("gout", "allopurinol"),
           ("epilepsy", "levetiracetam"), ("heart failure", "furosemide"))
IMAGING_NEGATIVES = ("pneumothorax", "pleural effusion", "pulmonary edema", "consolidation")


def nli_triple(rng: np.random.Generator) -> tuple[str, dict[str, str]]:
    """A clinical premise and its entailed, contradicted and neutral hypotheses."""
    family = int(rng.integers(0, len(VITALS) + 2))
    if family < len(VITALS):
        spec = VITALS[list(VITALS)[family]]
        states = list(spec["states"])
        state = states[int(rng.integers(0, 2))]
        other = states[1 - states.index(state)]
        lo, hi = spec["states"][state]
        value = round(float(rng.uniform(lo, hi)), spec["decimals"])
        text = f"{value:.{spec['decimals']}f}"
        premise = spec["premises"][int(rng.integers(0, len(spec["premises"])))].format(v=text)
        hyp = (lambda s: "the patient has normal oxygen saturation." if s == "normoxic" else f"the patient is {s}.")
        neutral = spec["neutral"][int(rng.integers(0, len(spec["neutral"])))]
        return premise, {"entailment": hyp(state), "contradiction": hyp(other), "neutral": neutral}
    if family == len(VITALS):
        condition, drug = HISTORY[int(rng.integers(0, len(HISTORY)))]
        return (f"the patient has a history of {condition} treated with {drug}.",
                {"entailment": f"the patient has {condition}.",
                 "contradiction": f"the patient has no history of {condition}.",
                 "neutral": f"the patient's {condition} is poorly controlled."})
    finding = IMAGING_NEGATIVES[int(rng.integers(0, len(IMAGING_NEGATIVES)))]
    return (f"chest x-ray showed no evidence of {finding}.",
            {"entailment": f"the chest x-ray did not show {finding}.",
             "contradiction": f"the chest x-ray showed {finding}.",
             "neutral": "the patient has shortness of breath."})


def write_mednli(out_dir: str | Path, premises: dict[str, int] | None = None, seed: int = 0) -> dict[str, int]:
    """`mli_{train,dev,test}_v1.jsonl` with sentence1, sentence2, gold_label, pairID (three pairs per premise)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    premises = premises or {"train": 150, "dev": 30, "test": 30}
    rng = _rng(seed, "mednli")
    counts = {}
    seen: set[str] = set()  # every premise once across all splits: no duplicates, no train/test overlap
    for split, n in premises.items():
        rows = []
        for _ in range(n):
            for _attempt in range(1000):
                premise, hypotheses = nli_triple(rng)
                if premise not in seen:
                    break
            seen.add(premise)
            for label, hypothesis in hypotheses.items():
                pair_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
                rows.append({"sentence1": premise, "sentence2": hypothesis, "gold_label": label, "pairID": pair_id})
        rows = [rows[k] for k in rng.permutation(len(rows))]
        (out / f"mli_{split}_v1.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows),
                                                   encoding="utf-8")
        counts[split] = len(rows)
    return counts


# -- MeQSum ------------------------------------------------------------------------------------------
MEQSUM_CONDITIONS = (("type 2 diabetes", "metformin"), ("high blood pressure", "amlodipine"),
                     ("rheumatoid arthritis", "methotrexate"), ("celiac disease", "prednisone"),
                     ("migraine", "sumatriptan"), ("psoriasis", "adalimumab"), ("gout", "allopurinol"),
                     ("hypothyroidism", "levothyroxine"), ("crohn's disease", "mesalamine"),
                     ("atrial fibrillation", "apixaban"), ("osteoporosis", "alendronate"), ("asthma", "montelukast"))
# person, subject pronoun, object pronoun
MEQSUM_PEOPLE = (("my mother", "she", "her"), ("my father", "he", "him"), ("my wife", "she", "her"),
                 ("my husband", "he", "him"), ("my son", "he", "him"), ("my daughter", "she", "her"), ("i", "i", "me"))
# question in the consumer's words -> summary; {s}/{o} pronouns, {c} condition, {d} drug
MEQSUM_QUESTIONS = (("what foods should {s} avoid?", "what foods should be avoided with {c}?"),
                    ("what are the treatment options for this?", "what are the treatments for {c}?"),
                    ("is this something that runs in families? could my children get it?", "is {c} hereditary?"),
                    ("the doctor prescribed {d}. what side effects should we watch for?",
                     "what are the side effects of {d}?"),
                    ("what could have caused this?", "what causes {c}?"),
                    ("is there any cure for it?", "is there a cure for {c}?"),
                    ("is it safe for {o} to exercise?", "is exercise safe with {c}?"))


def meqsum_pair(rng: np.random.Generator) -> tuple[str, str]:
    """A wordy consumer health question and the one-line question it boils down to."""
    def pick(options: Sequence[Any]) -> Any:
        return options[int(rng.integers(0, len(options)))]

    condition, drug = pick(MEQSUM_CONDITIONS)
    person, subj, obj = pick(MEQSUM_PEOPLE)
    question, summary = pick(MEQSUM_QUESTIONS)
    has = "have" if subj == "i" else "has"
    parts = [pick(("hi,", "hello.", "dear doctor,", "")),
             f"{person} was diagnosed with {condition} {pick(('last year', 'two months ago', 'recently', 'in 2015'))}.",
             pick((f"{subj} {has} been feeling tired and we are worried.",
                   "i have read a lot online and i am confused.", "our family doctor did not explain much.", "")),
             question.format(s=subj, o=obj, d=drug),
             pick(("thank you.", "thanks in advance!", "any advice is appreciated.", ""))]
    return " ".join(p for p in parts if p), summary.format(c=condition, d=drug)


def _normalise_xlsx(data: bytes) -> bytes:
    """openpyxl stamps the save time into docProps/core.xml and every zip entry; pin both."""
    src = zipfile.ZipFile(io.BytesIO(data))
    members = []
    for info in src.infolist():
        content = src.read(info)
        if info.filename == "docProps/core.xml":
            content = re.sub(rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*(<)", rb"\g<1>2000-01-01T00:00:00Z\g<2>",
                             content)
        members.append((info.filename, content))
    return _zip_bytes(members)


MEQSUM_RELEASE_NAME = "MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx"


def write_meqsum(out_dir: str | Path, num_rows: int = 200, seed: int = 0) -> dict[str, int]:
    """`meqsum.csv` (CHQ, Summary), and when openpyxl is installed the release's own spreadsheet
    (File, CHQ, Summary) under the release's name, which the adapter prefers when given the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed, "meqsum")
    rows = [meqsum_pair(rng) for _ in range(num_rows)]
    _write_csv(out / "meqsum.csv", ("CHQ", "Summary"), rows)
    counts = {"rows": len(rows)}
    try:
        from openpyxl import Workbook  # type: ignore[import-untyped]
    except ImportError:
        return counts
    wb = Workbook()
    ws = wb.active
    ws.append(["File", "CHQ", "Summary"])
    for i, row in enumerate(rows):
        ws.append([f"demo-{i:05d}.txt", *row])
    buf = io.BytesIO()
    wb.save(buf)
    (out / MEQSUM_RELEASE_NAME).write_bytes(_normalise_xlsx(buf.getvalue()))
    counts["xlsx"] = len(rows)
    return counts


# -- DICOM ---------------------------------------------------------------------------------------------
SOP_CLASSES = {"ct": "1.2.840.10008.5.1.4.1.1.2", "cr": "1.2.840.10008.5.1.4.1.1.1",
               "multiframe": "1.2.840.10008.5.1.4.1.1.7.3"}  # CT, CR, multi-frame grayscale word SC


def _dicom_dataset(kind: str, index: int, seed: int, description: str, pixels: np.ndarray,
                   photometric: str = "MONOCHROME2") -> Any:
    """A DICOM dataset of synthetic content only: demo patient, fixed dates, UIDs hashed from the seed."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def uid(role: str) -> str:
        return generate_uid(entropy_srcs=["galen-demo", str(seed), kind, str(index), role])

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[kind]
    ds.file_meta.MediaStorageSOPInstanceUID = uid("instance")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASSES[kind], ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uid("study"), uid("series"), uid("frame")
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Demo^Patient", f"DEMO{index:04d}", "", "O"
    ds.StudyDate, ds.StudyTime, ds.SeriesDate, ds.SeriesTime = "20000101", "000000", "20000101", "000000"
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
    ds.Manufacturer, ds.StudyDescription = "Galen synthetic demo", "synthetic demo study"
    ds.Modality = "CR" if kind == "cr" else "CT"
    ds.SeriesDescription, ds.BodyPartExamined = description, "CHEST"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    frames = pixels if pixels.ndim == 3 else pixels[None]
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.7, 0.7]
    ds.PixelData = np.ascontiguousarray(frames.astype("<u2")).tobytes()
    return ds


def _save_dicom(ds: Any, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)


def _to_stored(hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    return np.clip(np.round((hu - intercept) / slope), 0, 4095).astype(np.uint16)


def write_dicom(out_dir: str | Path, num_ct: int = 6, num_cr: int = 2, image_size: int = 128, seed: int = 0,
                frames: int = 5) -> dict[str, int]:
    """CT slices (RescaleSlope/Intercept, WindowCenter/Width; one with two windows, one with slope 2), CR chest
    films stored MONOCHROME1 (inverted), and one multi-frame CT series; SeriesDescription is the caption."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed, "dicom")
    for i in range(num_ct):
        large = bool(rng.random() < 0.5)
        nodules = sample_ct_nodules(rng, image_size, int(rng.integers(0, 4)), large)
        hu = ct_slice_hu(rng, image_size, nodules)
        slope, intercept = (2.0, -2048.0) if i == 2 else (1.0, -1024.0)
        n = len(nodules)
        caption = f"axial ct of the chest {'showing ' + _count_phrase(n, large, 'nodule') if n else 'with no nodules'}"
        ds = _dicom_dataset("ct", i, seed, caption, _to_stored(hu, slope, intercept))
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
        if i == 1:
            ds.WindowCenter, ds.WindowWidth = [40, -600], [400, 1500]
            ds.WindowCenterWidthExplanation = ["SOFT TISSUE", "LUNG"]
        else:
            ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.SliceThickness, ds.KVP = 5.0, 120
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [-45.0, -45.0, -10.0 * i], [1, 0, 0, 0, 1, 0]
        _save_dicom(ds, out / f"ct_{i:03d}.dcm")
    for i in range(num_cr):
        findings = sample_chest_findings(rng, image_size)
        film = chest_film(rng, image_size, findings).astype(np.uint16)
        n = len(findings.nodules)
        caption = (f"chest radiograph showing {_count_phrase(n, findings.large, 'nodule')} in the {findings.side} lung"
                   if n else "chest radiograph with no nodules")
        ds = _dicom_dataset("cr", i, seed, caption, 4095 - film * 16, photometric="MONOCHROME1")
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.ViewPosition = "PA"
        _save_dicom(ds, out / f"cr_{i:03d}.dcm")
    # multi-frame: spherical nodules, so each frame cuts them at a different radius (largest in the middle)
    large = bool(rng.random() < 0.5)
    nodules = sample_ct_nodules(rng, image_size, int(rng.integers(1, 4)), large)
    mid = frames // 2
    volume = []
    for z in range(frames):
        dz = (z - mid) * 0.6
        cut = [(cx, cy, float(np.sqrt(max(0.0, r * r - (dz * r) ** 2)))) for cx, cy, r in nodules]
        volume.append(_to_stored(ct_slice_hu(rng, image_size, cut), 1.0, -1024.0))
    caption = f"ct chest series of {frames} slices showing {_count_phrase(len(nodules), large, 'nodule')}"
    ds = _dicom_dataset("multiframe", 0, seed, caption, np.stack(volume))
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00182005  # Slice Location Vector
    ds.SliceLocationVector = [float(5 * (z - mid)) for z in range(frames)]
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1.0, -1024.0, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.ConversionType = "WSD"
    _save_dicom(ds, out / "ct_multiframe_000.dcm")
    return {"ct": num_ct, "cr": num_cr, "multiframe": 1, "files": num_ct + num_cr + 1}


# -- real images shipped by installed packages -------------------------------------------------------
SKIMAGE_IMAGES = (("retina", "retina.png", "fundus photograph of a human retina"),
                  ("immunohistochemistry", "ihc.png", "immunohistochemistry stained tissue section of colonic glands"),
                  ("microaneurysms", "microaneurysms.png", "grayscale retinal image crop showing microaneurysms"),
                  ("cell", "cell.png", "quantitative phase microscopy image of a single cell"))
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm")
REAL_IMAGE_MAX_SIDE = 512  # the retina photograph is 1411 px; the smoke set stays small


def write_real_images(out_dir: str | Path) -> dict[str, int]:
    """scikit-image's sample photographs as PNG + `captions.csv`, and pydicom's test DICOMs in `dicom/`;
    a package that is missing is skipped with a warning and counted as 0."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"images": 0, "dicom": 0}
    try:
        from skimage import data as skdata
    except ImportError:
        warnings.warn("scikit-image is not installed: the real-image smoke set has no photographs", stacklevel=2)
    else:
        rows = []
        for loader, name, caption in SKIMAGE_IMAGES:
            image = Image.fromarray(np.asarray(getattr(skdata, loader)()))
            if max(image.size) > REAL_IMAGE_MAX_SIDE:
                scale = REAL_IMAGE_MAX_SIDE / max(image.size)
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
            image.save(out / name)
            rows.append((name, caption))
        _write_csv(out / "captions.csv", ("filepath", "caption"), rows)
        counts["images"] = len(rows)
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        warnings.warn("pydicom is not installed: the real-image smoke set has no DICOM files", stacklevel=2)
        return counts
    (out / "dicom").mkdir(exist_ok=True)
    for name in PYDICOM_FILES:
        src = get_testdata_file(name)
        if src is None:
            warnings.warn(f"pydicom does not ship {name}; skipped", stacklevel=2)
            continue
        shutil.copyfile(src, out / "dicom" / name)
        counts["dicom"] += 1
    return counts


# -- everything ----------------------------------------------------------------------------------------
DEMO_FORMATS = ("vqa_rad", "iu_xray", "medmnist", "mednli", "meqsum", "captions", "dicom", "real_images", "slake")


def write_demo(out_dir: str | Path, seed: int = 0, scale: float = 1.0, *, image_size: int = 128,
               vqa_num_images: int | None = None) -> dict[str, dict]:
    """Write every demo dataset, one subfolder per format in that dataset's raw layout, and return the
    counts per folder. `scale` multiplies the number of samples (0.25 for a quick test set)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def n(default: int, minimum: int = 1) -> int:
        return max(minimum, round(default * scale))

    vqa_images = vqa_num_images if vqa_num_images is not None else n(96, 4)
    counts: dict[str, dict] = {}
    counts["vqa_rad"] = {"images": vqa_images, **write_vqa_rad(out / "vqa_rad", vqa_images, image_size, seed=seed)}
    counts["iu_xray"] = write_iu_xray(out / "iu_xray", n(60, 3), image_size, seed)
    counts["medmnist"] = write_pathmnist(out / "medmnist", {"train": n(100), "val": n(20), "test": n(30)}, seed)
    counts["mednli"] = write_mednli(out / "mednli", {"train": n(150), "dev": n(30), "test": n(30)}, seed)
    counts["meqsum"] = write_meqsum(out / "meqsum", n(200), seed)
    counts["captions"] = write_captions(out / "captions", n(48, 3), n(24, 3), image_size, seed)
    counts["dicom"] = write_dicom(out / "dicom", n(6, 3), n(2), image_size, seed)
    counts["real_images"] = write_real_images(out / "real_images")
    counts["slake"] = write_slake(out / "slake", n(60, 3), image_size, seed)
    return counts
