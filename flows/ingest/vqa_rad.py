"""VQA-RAD: one JSON list per split (`trainset.json`, `testset.json`) plus a folder of images."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from model.errors import GalenInputError

REQUIRED_KEYS = ("image_name", "question", "answer")


@dataclass
class VQARecord:
    qid: str
    image_path: Path
    question: str
    answer: str
    answer_type: str  # CLOSED | OPEN


def read_vqa_rad(json_path: str | Path, image_dir: str | Path) -> list[VQARecord]:
    """Records of one VQA-RAD split; every problem is reported with the record it is in."""
    path, images = Path(json_path), Path(image_dir)
    if not path.is_file():
        raise GalenInputError(f"{path} not found; point to VQA-RAD's trainset.json/testset.json")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GalenInputError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(rows, list):
        raise GalenInputError(f"{path} must hold a JSON list of question records (VQA-RAD layout)")
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise GalenInputError(f"{path} record {i} lacks {missing}; VQA-RAD records have {REQUIRED_KEYS}")
        image = images / str(row["image_name"])
        if not image.is_file():
            raise GalenInputError(f"{path} record {i}: image {image} not found; is --images the image folder?")
        out.append(VQARecord(str(row.get("qid", i)), image, str(row["question"]), str(row["answer"]).strip().lower(),
                             str(row.get("answer_type", "OPEN")).upper()))
    return out
