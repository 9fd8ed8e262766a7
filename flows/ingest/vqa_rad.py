"""VQA-RAD: one JSON list per split (`trainset.json`, `testset.json`) plus a folder of images.

Record keys include `qid, image_name, image_organ, question, answer, answer_type (CLOSED|OPEN),
question_type, phrase_type`; images are `synpicNNNN.jpg` in `images/` (the OSF release calls the
folder `VQA_RAD Image Folder`).

Types as the release has them: `question`, `image_name` and `answer_type` are strings; `answer` is a
string or, for counting questions, a JSON integer (kept as its text, `2` -> "2"); `qid` an integer
or a string. Any other type, or a lone surrogate in the text, makes the row a record with a problem
naming the field (schema.py states the policy). `image_name` is a path inside the image folder: an
absolute path, a `..` escape or a symlink leading outside it is refused and never read (paths.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from galen.flows.ingest import register_format
from galen.flows.ingest.paths import read_inside
from galen.flows.ingest.schema import Fields, Record
from galen.model.errors import GalenInputError, read_json

REQUIRED_KEYS = ("image_name", "question", "answer")
SPLIT_FILES = {"train": ("trainset.json",), "val": ("valset.json", "validationset.json"), "test": ("testset.json",)}
IMAGE_DIRS = ("images", "VQA_RAD Image Folder", "imgs")
LICENSE = "CC0 1.0 (VQA-RAD, Lau et al. 2018)"


def _load_json_list(path: Path) -> list[dict]:
    return read_json(path, list, "VQA-RAD split files are JSON lists of question records: re-download it")


def _record(row: Any, split: str, key: str, image_dir: Path) -> Record:
    """One question as a Record; anything wrong with this row alone goes into `problem`."""
    if not isinstance(row, dict):
        return Record("vqa", split, "vqa-rad", key, problem="record is not a JSON object", license=LICENSE)
    fields = Fields(row)
    qid = fields.text("qid", ints=True, required=False, default=None) or key
    missing = [k for k in REQUIRED_KEYS if k not in row]
    question = fields.text("question", required="question" not in missing)
    answer = fields.text("answer", ints=True, required="answer" not in missing)
    answer_type = fields.text("answer_type", required=False)
    image, image_problem = None, None
    if "image_name" not in missing:
        image, image_problem = read_inside(image_dir, row["image_name"], "image_name")
    return Record(
        task="vqa", split=split, dataset="vqa-rad", source_id=qid, image=image, question=question or "",
        target=(answer or "").strip(), answer_type=(answer_type or "").upper() or None, license=LICENSE,
        problem=fields.problem(f"missing keys {missing}" if missing else None, image_problem),
        meta={k: row[k] for k in ("image_name", "image_organ", "question_type", "phrase_type") if k in row})


@register_format("vqa-rad", "VQA-RAD: trainset.json/testset.json (JSON lists) + images/ (synpicNNNN.jpg)")
def read(source: Path, **_: object) -> Iterator[Record]:
    source = Path(source)
    image_dir = next((source / d for d in IMAGE_DIRS if (source / d).is_dir()), None)
    if image_dir is None:
        raise GalenInputError(f"{source} has no image folder (looked for {', '.join(IMAGE_DIRS)})")
    found = False
    for split, names in SPLIT_FILES.items():
        path = next((source / n for n in names if (source / n).is_file()), None)
        if path is None:
            continue
        found = True
        for i, row in enumerate(_load_json_list(path)):
            yield _record(row, split, f"{path.name}:{i}", image_dir)
    if not found:
        raise GalenInputError(f"{source} has none of {[n for ns in SPLIT_FILES.values() for n in ns]}; "
                              "is --source the VQA-RAD folder?")
