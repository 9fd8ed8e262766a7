"""SLAKE 1.0: `train.json`, `validate.json`, `test.json` (JSON lists) plus an `imgs/` folder.

Each record has `img_id, img_name ("xmlab102/source.jpg"), question, answer, answer_type
(CLOSED|OPEN), q_lang (en|zh), modality, location, content_type, base_type, triple, qid`; the
image lives at `imgs/<img_name>` (a name leaving `imgs/`, by `..`, an absolute path or a symlink, is
refused unread: paths.py). Text fields are strings (`answer` may also be a JSON integer, kept as its
text); any other type or a lone surrogate makes the row a record with a problem naming the field
(schema.py states the policy). SLAKE is bilingual, and a model trained on English prompts
should not silently see Chinese ones, so only English is kept unless `language` says otherwise.

Each image folder also holds `detection.json`: a JSON list of single-key objects
`{"<organ or finding>": [x, y, w, h]}` in pixels of `source.jpg` (top-left corner, width, height).
Every box becomes a `grounding` record (phrase = the object name, lower-cased; box as
[x0, y0, x1, y1]) in the split of the QA file that names the image (an image named by several
files goes to the evaluation split, as validation's leakage rule would). A name that occurs twice
in one image cannot identify one box, so those records carry a `problem` (quarantined, counted).
A malformed file, or a box that is empty or leaves the image, stops ingest naming the file: that
is a broken annotation to fix at the source, not one bad row. `grounding=false` skips the boxes.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from galen.flows.ingest import register_format
from galen.flows.ingest.paths import read_inside, resolve_inside
from galen.flows.ingest.schema import Fields, Record, text_value, unicode_problem
from galen.model.errors import GalenInputError, read_json

DATASET = "slake"
LICENSE = "CC BY 4.0 (SLAKE, Liu et al. 2021)"
REQUIRED_KEYS = ("img_name", "question", "answer", "q_lang")
# split -> file names, first found wins (`validation.json` is how some mirrors rename validate.json)
SPLIT_FILES = {"train": ("train.json",), "val": ("validate.json", "validation.json"), "test": ("test.json",)}
IMAGE_DIR = "imgs"
DETECTION_FILE = "detection.json"
SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2}  # an image in several split files is grounded in the first
LANGUAGES = ("en", "zh", "all")
META_KEYS = ("img_id", "img_name", "q_lang", "modality", "location", "content_type", "base_type", "triple", "qid")


def _load_json_list(path: Path) -> list[Any]:
    """The split file's records; a file that is not a JSON list is a broken download, not a bad record."""
    return read_json(path, list, "SLAKE split files are JSON lists of question records: re-download SLAKE")


def _record(row: Any, split: str, key: str, image_dir: Path) -> Record:
    """One question as a Record; anything wrong with this row alone goes into `problem`."""
    if not isinstance(row, dict):
        return Record("vqa", split, DATASET, key, license=LICENSE, problem="record is not a JSON object")
    fields = Fields(row)
    source_id = fields.text("qid", ints=True, required=False, default=None) or key
    missing = [k for k in REQUIRED_KEYS if row.get(k) is None]
    question = fields.text("question", required=False)
    answer = fields.text("answer", ints=True, required=False)  # counting answers may be JSON integers
    fields.text("q_lang", required=False)
    answer_type = fields.text("answer_type", required=False)
    image, image_problem = None, None
    if "img_name" not in missing:
        image, image_problem = read_inside(image_dir, row["img_name"], "img_name")
    return Record(
        task="vqa", split=split, dataset=DATASET, source_id=source_id, image=image,
        question=(question or "").strip(), target=(answer or "").strip(),
        answer_type=(answer_type or "").strip().upper() or None, license=LICENSE,
        problem=fields.problem(f"missing keys {missing}" if missing else None, image_problem),
        meta={k: row[k] for k in META_KEYS if k in row})


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header, None when PIL cannot read it (validation says why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # noqa: BLE001 - an unreadable image is the validation stage's reason to give
        return None


def read_detection(path: Path, size: tuple[int, int] | None = None) -> list[tuple[str, list[float]]]:
    """(object name, [x0, y0, x1, y1]) of every box in a SLAKE `detection.json`, in file order.

    Raises GalenInputError naming the file and the entry for anything that is not a list of
    `{"name": [x, y, w, h]}` objects with w, h > 0 and, when `size` (width, height) is given,
    the box inside the image."""
    hint = ('SLAKE detection.json is a JSON list of objects {"<object name>": [x, y, w, h]} in pixels of '
            "source.jpg; fix or re-download this file")
    data = read_json(path, list, hint)
    boxes = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not entry:
            raise GalenInputError(f"{path}: entry {i} is {json_repr(entry)}, not an object "
                                  f'{{"<object name>": [x, y, w, h]}}; {hint}')
        for name, value in entry.items():
            if not str(name).strip():
                raise GalenInputError(f"{path}: entry {i} has an empty object name; give every box its name")
            numbers = value if isinstance(value, list) else None
            if (numbers is None or len(numbers) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in numbers)):
                raise GalenInputError(f"{path}: entry {i} ({name!r}) is {json_repr(value)}; a box is 4 finite "
                                      f"numbers [x, y, w, h] (top-left corner, width, height in pixels); {hint}")
            x, y, w, h = (float(v) for v in numbers)
            if w <= 0 or h <= 0:
                raise GalenInputError(f"{path}: entry {i} ({name!r}) has width {w:g} and height {h:g}; both must "
                                      "be > 0 (the format is [x, y, w, h], not [x0, y0, x1, y1]): fix or drop this box")
            box = [x, y, x + w, y + h]
            if size is not None and (x < 0 or y < 0 or box[2] > size[0] or box[3] > size[1]):
                raise GalenInputError(f"{path}: entry {i} ({name!r}) box [x, y, w, h] = {numbers} reaches "
                                      f"[{x:g}, {y:g}]..[{box[2]:g}, {box[3]:g}], outside the {size[0]}x{size[1]} "
                                      "image; boxes are in pixels of source.jpg: fix the box or the image")
            boxes.append((str(name), box))
    return boxes


def json_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _grounding_records(image_dir: Path, image_splits: dict[str, str]) -> Iterator[Record]:
    """A grounding record per box of every `imgs/<folder>/detection.json` whose image the QA files name."""
    seen: set[Path] = set()
    for name, split in image_splits.items():
        path, _ = resolve_inside(image_dir, name, "img_name")
        if path is None or path in seen:
            continue  # an escaping name is the VQA rows' problem; two spellings of one file give one set of boxes
        seen.add(path)
        folder = path.parent.relative_to(image_dir.resolve()).as_posix()
        detection, refused = resolve_inside(image_dir, f"{folder}/{DETECTION_FILE}", DETECTION_FILE)
        if detection is None:  # a detection.json symlinked out of the dataset: one record says so, nothing read
            yield Record(task="grounding", split=split, dataset=DATASET, source_id=f"{folder}/{DETECTION_FILE}",
                         license=LICENSE, problem=refused, meta={"img_name": name})
            continue
        if not detection.is_file():
            continue  # not every mirror ships the boxes; the VQA records stand on their own
        image, image_problem = read_inside(image_dir, name, "img_name")
        size = _image_size(image) if image is not None else None
        problem = (None if size is not None else image_problem if image is None else
                   f"image file {name} could not be read, so its boxes cannot be checked")
        boxes = read_detection(detection, size)
        phrases = [" ".join(obj.split()).lower() for obj, _ in boxes]
        counts = Counter(phrases)
        for k, ((obj, box), phrase) in enumerate(zip(boxes, phrases)):
            ambiguous = (f"object name {phrase!r} names {counts[phrase]} boxes in {folder}/{DETECTION_FILE}; "
                         "a grounding phrase must identify one box") if counts[phrase] > 1 else None
            ambiguous = unicode_problem(obj, f"{DETECTION_FILE} object name") or ambiguous
            yield Record(
                task="grounding", split=split, dataset=DATASET, source_id=f"{folder}/{DETECTION_FILE}:{k}",
                image=image, text=phrase, target=phrase, boxes=[box], box_labels=[phrase], license=LICENSE,
                problem=problem or ambiguous,
                meta={"img_name": name, "object_name": obj, "box_xywh": [box[0], box[1], box[2] - box[0],
                                                                          box[3] - box[1]]})


@register_format("slake", "SLAKE 1.0: train.json/validate.json/test.json (JSON lists) + imgs/<xmlabN>/source.jpg "
                          "(+ detection.json boxes -> grounding records); options language=en|zh|all (default en), "
                          "grounding=true|false (default true)")
def read(source: Path, language: str = "en", grounding: bool = True, **unknown: object) -> Iterator[Record]:
    """VQA records of every split file found, in file order, keeping questions in `language`; then,
    unless `grounding` is false, a grounding record per detection.json box of the images they name."""
    if unknown:
        raise GalenInputError(f"slake: unknown options {sorted(unknown)}; the options are language={LANGUAGES} "
                              "and grounding=true|false")
    language = str(language).lower()
    if language not in LANGUAGES:
        raise GalenInputError(f"slake: language must be one of {LANGUAGES}, got {language!r}")
    if not isinstance(grounding, bool):
        raise GalenInputError(f"slake: grounding must be true or false, got {grounding!r}")
    source = Path(source)
    if not source.is_dir():
        raise GalenInputError(f"{source} is not a folder; point --source at the SLAKE folder "
                              "holding train.json and imgs/")
    image_dir = source / IMAGE_DIR
    if not image_dir.is_dir():
        raise GalenInputError(f"{source} has no {IMAGE_DIR}/ folder; unpack SLAKE's imgs.zip next to the JSON files")
    paths = {split: next((source / n for n in names if (source / n).is_file()), None)
             for split, names in SPLIT_FILES.items()}
    if not any(paths.values()):
        raise GalenInputError(f"{source} has none of {[n for ns in SPLIT_FILES.values() for n in ns]}; "
                              "is --source the SLAKE folder?")
    image_splits: dict[str, str] = {}  # img_name -> split of its grounding records
    for split, path in paths.items():
        if path is None:
            continue
        for i, row in enumerate(_load_json_list(path)):
            if isinstance(row, dict) and isinstance(row.get("img_name"), str) and row["img_name"]:
                name = row["img_name"]
                if name not in image_splits or SPLIT_PRIORITY[split] < SPLIT_PRIORITY[image_splits[name]]:
                    image_splits[name] = split
            lang, _ = text_value(row.get("q_lang"), "q_lang") if isinstance(row, dict) else (None, None)
            # rows without a (textual) language are kept, with a problem, so a malformed row is never
            # filtered away unseen
            if language != "all" and lang and lang.lower() != language:
                continue
            yield _record(row, split, f"{path.name}:{i}", image_dir)
    if grounding:
        yield from _grounding_records(image_dir, image_splits)
