"""SLAKE 1.0: `train.json`, `validate.json`, `test.json` (JSON lists) plus an `imgs/` folder.

Each record has `img_id, img_name ("xmlab102/source.jpg"), question, answer, answer_type
(CLOSED|OPEN), q_lang (en|zh), modality, location, content_type, base_type, triple, qid`; the
image lives at `imgs/<img_name>`. SLAKE is bilingual, and a model trained on English prompts
should not silently see Chinese ones, so only English is kept unless `language` says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from flows.ingest import register_format
from flows.ingest.schema import Record
from model.errors import GalenInputError, read_json

DATASET = "slake"
LICENSE = "CC BY 4.0 (SLAKE, Liu et al. 2021)"
REQUIRED_KEYS = ("img_name", "question", "answer", "q_lang")
# split -> file names, first found wins (`validation.json` is how some mirrors rename validate.json)
SPLIT_FILES = {"train": ("train.json",), "val": ("validate.json", "validation.json"), "test": ("test.json",)}
IMAGE_DIR = "imgs"
LANGUAGES = ("en", "zh", "all")
META_KEYS = ("img_id", "img_name", "q_lang", "modality", "location", "content_type", "base_type", "triple", "qid")


def _load_json_list(path: Path) -> list[Any]:
    """The split file's records; a file that is not a JSON list is a broken download, not a bad record."""
    return read_json(path, list, "SLAKE split files are JSON lists of question records: re-download SLAKE")


def safe_image_path(image_dir: Path, name: str) -> Path | None:
    """`image_dir/name` if it stays inside `image_dir` (no `..` or absolute escapes), else None."""
    if not name:
        return None
    root = image_dir.resolve()
    candidate = (root / name).resolve()
    return candidate if candidate.is_relative_to(root) and candidate != root else None


def _record(row: Any, split: str, key: str, image_dir: Path) -> Record:
    """One question as a Record; anything wrong with this row alone goes into `problem`."""
    if not isinstance(row, dict):
        return Record("vqa", split, DATASET, key, license=LICENSE, problem="record is not a JSON object")
    source_id = str(row["qid"]) if row.get("qid") is not None else key
    missing = [k for k in REQUIRED_KEYS if row.get(k) is None]
    problem = f"missing keys {missing}" if missing else None
    image = None
    if problem is None:
        name = str(row["img_name"])
        path = safe_image_path(image_dir, name)
        if path is None:
            problem = f"image path {name!r} escapes the image folder {image_dir}"
        elif not path.is_file():
            problem = f"image file {name} not found in {image_dir}"
        else:
            image = path.read_bytes()
    answer_type = str(row.get("answer_type") or "").strip().upper() or None
    return Record(
        task="vqa", split=split, dataset=DATASET, source_id=source_id, image=image,
        question=str(row.get("question") or "").strip(), target=str(row.get("answer") or "").strip(),
        answer_type=answer_type, license=LICENSE, problem=problem,
        meta={k: row[k] for k in META_KEYS if k in row})


@register_format("slake", "SLAKE 1.0: train.json/validate.json/test.json (JSON lists) + imgs/<xmlabN>/source.jpg; "
                          "option language=en|zh|all (default en)")
def read(source: Path, language: str = "en", **unknown: object) -> Iterator[Record]:
    """Records of every split file found, in file order, keeping questions in `language`."""
    if unknown:
        raise GalenInputError(f"slake: unknown options {sorted(unknown)}; the only option is language={LANGUAGES}")
    language = str(language).lower()
    if language not in LANGUAGES:
        raise GalenInputError(f"slake: language must be one of {LANGUAGES}, got {language!r}")
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
    for split, path in paths.items():
        if path is None:
            continue
        for i, row in enumerate(_load_json_list(path)):
            lang = str(row.get("q_lang") or "").lower() if isinstance(row, dict) else ""
            # rows without a language are kept (with a problem) so a malformed row is never filtered away unseen
            if language != "all" and lang and lang != language:
                continue
            yield _record(row, split, f"{path.name}:{i}", image_dir)
