"""PathVQA as published on the Hugging Face hub (flaviagiammarino/path-vqa): Parquet per split.

Files are named after their split (`data/train-00000-of-00002.parquet`, `validation-*.parquet`,
`test-*.parquet`, or plainly `train.parquet`; a `train/0000.parquet` folder layout also works)
with columns `image` (struct {bytes, path}, the hub's Image feature), `question` and `answer`.
The release carries no answer type, so it is derived the way PathVQA is evaluated: yes/no
answers are CLOSED, everything else OPEN. `question` and `answer` must be text (a column of another
type, e.g. numbers, makes its rows records with a problem naming the field; schema.py states the policy);
images are embedded bytes, so no file outside the Parquet files is ever opened.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from galen.flows.ingest import register_format
from galen.flows.ingest.schema import Fields, Record, describe
from galen.model.errors import GalenInputError

DATASET = "pathvqa"
LICENSE = "MIT (PathVQA, He et al. 2020)"
COLUMNS = ("image", "question", "answer")
CLOSED_ANSWERS = frozenset({"yes", "no"})
BATCH_ROWS = 256  # images are embedded, so a batch is bounded in rows, not bytes; 256 pathology crops is a few MB
_SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}
_SPLIT_RE = re.compile(r"^(train|validation|valid|val|dev|test)(?:[-_.]|$)", re.IGNORECASE)


def split_of(path: Path) -> str | None:
    """Split named by the file (`train-00000-of-00002.parquet`), else by its folder (`train/0000.parquet`)."""
    for name in (path.name, path.parent.name):
        m = _SPLIT_RE.match(name)
        if m:
            return _SPLIT_NAMES[m.group(1).lower()]
    return None


def answer_type(answer: str) -> str:
    """CLOSED for yes/no answers, OPEN otherwise (PathVQA's own evaluation split)."""
    return "CLOSED" if answer.strip().lower() in CLOSED_ANSWERS else "OPEN"


def _open(path: Path) -> pq.ParquetFile:
    """The Parquet file after checking it has PathVQA's columns; anything else is a structural error."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise GalenInputError(f"{path} is not a readable Parquet file ({e}); re-download it from the hub") from e
    schema = pf.schema_arrow
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise GalenInputError(f"{path} lacks columns {missing} (has {schema.names}); PathVQA Parquet files have "
                              f"{list(COLUMNS)} with image as a struct {{bytes, path}}")
    image_type = schema.field("image").type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
            or (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0)):
        raise GalenInputError(f"{path}: column image is {image_type}; expected a struct {{bytes, path}} "
                              "(the hub's Image feature) or raw bytes")
    return pf


def _image(value: Any) -> tuple[bytes | None, str | None]:
    """(encoded bytes, original file name) of one `image` cell, struct or raw bytes."""
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    return value, None


def _record(row: dict[str, Any], split: str, source_id: str, meta: dict[str, Any]) -> Record:
    """One row as a Record: question and answer must be text (a null is "missing"), the image bytes."""
    image, image_name = _image(row["image"])
    missing = [k for k in COLUMNS if (image if k == "image" else row[k]) is None]
    fields = Fields(row)
    question = fields.text("question", required=False)
    answer = fields.text("answer", required=False, default=None)
    problems = [f"missing {missing}"] if missing else []
    if image is not None and not isinstance(image, (bytes, bytearray)):
        problems.append(f"image is {describe(image)}, not image bytes")
        image = None
    if image_name:
        meta["image_path"] = image_name
    target = (answer or "").strip()
    return Record(
        task="vqa", split=split, dataset=DATASET, source_id=source_id, image=image,
        question=(question or "").strip(), target=target,
        answer_type=answer_type(target) if answer is not None else None, license=LICENSE,
        problem=fields.problem(*problems), meta=meta)


def _files(source: Path) -> list[tuple[Path, str]]:
    """(file, split) of every Parquet file under `source`, sorted so ids and order never depend on the filesystem."""
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*.parquet") if p.is_file())
    if not files:
        raise GalenInputError(f"{source} holds no *.parquet files; download flaviagiammarino/path-vqa "
                              "(data/train-*.parquet, validation-*.parquet, test-*.parquet)")
    out, unnamed = [], []
    for f in files:
        split = split_of(f)
        if split is None:
            unnamed.append(f)
        else:
            out.append((f, split))
    if unnamed:
        raise GalenInputError(f"cannot tell the split of {[str(p) for p in unnamed]}: PathVQA files must start with "
                              "train, validation/val or test (e.g. train-00000-of-00002.parquet); rename them")
    return out


@register_format("pathvqa", "PathVQA (hub Parquet): {train,validation,test}[-NNNNN-of-NNNNN].parquet with columns "
                            "image{bytes,path}, question, answer; answer_type CLOSED for yes/no")
def read(source: Path, **unknown: object) -> Iterator[Record]:
    """Records of every split file, streamed in batches so the whole dataset is never in memory."""
    if unknown:
        raise GalenInputError(f"pathvqa: unknown options {sorted(unknown)}; this format takes none")
    source = Path(source)
    files = _files(source)
    base = source if source.is_dir() else source.parent
    for path, split in files:
        pf = _open(path)
        rel = path.relative_to(base).as_posix()
        # split + file name (not the folder given as --source) keeps ids equal whether the repo root or data/ is given
        id_prefix = f"{split}/{path.name}"
        index = 0
        try:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(COLUMNS)):
                for row in batch.to_pylist():
                    yield _record(row, split, f"{id_prefix}:{index}", {"file": rel, "row": index})
                    index += 1
        except pa.ArrowException as e:
            raise GalenInputError(f"{path} is corrupt after row {index} ({e}); re-download it from the hub") from e
