"""VQA-RAD: one JSON list per split (`trainset.json`, `testset.json`) plus a folder of images.

Record keys include `qid, image_name, image_organ, question, answer, answer_type (CLOSED|OPEN),
question_type, phrase_type`; images are `synpicNNNN.jpg` in `images/` (the OSF release calls the
folder `VQA_RAD Image Folder`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from galen.flows.ingest import register_format
from galen.flows.ingest.schema import Record
from galen.model.errors import GalenInputError, read_json

REQUIRED_KEYS = ("image_name", "question", "answer")
SPLIT_FILES = {"train": ("trainset.json",), "val": ("valset.json", "validationset.json"), "test": ("testset.json",)}
IMAGE_DIRS = ("images", "VQA_RAD Image Folder", "imgs")
LICENSE = "CC0 1.0 (VQA-RAD, Lau et al. 2018)"


def _load_json_list(path: Path) -> list[dict]:
    return read_json(path, list, "VQA-RAD split files are JSON lists of question records: re-download it")


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
            if not isinstance(row, dict):
                yield Record("vqa", split, "vqa-rad", f"{path.name}:{i}", problem="record is not a JSON object",
                             license=LICENSE)
                continue
            qid = str(row.get("qid", f"{path.name}:{i}"))
            missing = [k for k in REQUIRED_KEYS if k not in row]
            image_path = image_dir / str(row.get("image_name", ""))
            problem = f"missing keys {missing}" if missing else None
            image = None
            if not problem:
                if image_path.is_file():
                    image = image_path.read_bytes()
                else:
                    problem = f"image file {image_path.name} not found in {image_dir}"
            yield Record(
                task="vqa", split=split, dataset="vqa-rad", source_id=qid, image=image,
                question=str(row.get("question", "")), target=str(row.get("answer", "")).strip(),
                answer_type=str(row.get("answer_type", "")).upper() or None, license=LICENSE, problem=problem,
                meta={k: row[k] for k in ("image_name", "image_organ", "question_type", "phrase_type") if k in row})
    if not found:
        raise GalenInputError(f"{source} has none of {[n for ns in SPLIT_FILES.values() for n in ns]}; "
                              "is --source the VQA-RAD folder?")
