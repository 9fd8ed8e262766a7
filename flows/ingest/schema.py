"""The one normalized record every ingest adapter writes, and the Parquet shard writer.

Every dataset format becomes rows of this schema, so validation, tokenizer training, sharding,
training, evaluation and serving see one shape of data. Images travel as their encoded bytes
(PNG/JPEG as the source had them; arrays and DICOM are encoded to PNG by the adapter) and are
decoded by the validation stage, which is where a broken image becomes a quarantined row.
A record the adapter could not complete (a missing image file, say) still gets written, with
`problem` saying why, so nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from galen.model.errors import GalenInputError
from galen.model.tasks import RECORD_TASKS

SPLITS = ("train", "val", "test")
ROW_GROUP_ROWS = 256  # Parquet row groups: the unit of parallel work for later stages
TASKS = RECORD_TASKS


@dataclass
class Record:
    task: str                               # one of TASKS
    split: str                              # train | val | test
    dataset: str                            # e.g. "vqa-rad", "slake"
    source_id: str                          # id in the source dataset (stable across re-ingests)
    target: str = ""                        # answer / caption / class name / NLI answer / summary
    image: bytes | None = None              # encoded image bytes (PNG/JPEG), None for text-only tasks
    question: str | None = None             # VQA question
    text: str | None = None                 # article to summarize, grounding phrase, caption to match
    premise: str | None = None              # NLI
    hypothesis: str | None = None           # NLI
    candidates: list[str] | None = None     # closed answer set (class names, NLI answers), if any
    answer_type: str | None = None          # VQA: CLOSED | OPEN (reported separately)
    boxes: list[list[float]] | None = None  # [[x0, y0, x1, y1], ...] in pixels of `image`
    box_labels: list[str] | None = None
    license: str = ""
    problem: str | None = None              # why this record is incomplete (validation quarantines it)
    meta: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping (JSON-serialisable)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise GalenInputError(f"record {self.source_id}: unknown task {self.task!r}; tasks are {TASKS}")
        if self.split not in SPLITS:
            raise GalenInputError(f"record {self.source_id}: unknown split {self.split!r}; splits are {SPLITS}")


ARROW_SCHEMA = pa.schema([
    ("task", pa.string()), ("split", pa.string()), ("dataset", pa.string()), ("source_id", pa.string()),
    ("target", pa.string()), ("image", pa.binary()), ("image_sha1", pa.string()), ("question", pa.string()),
    ("text", pa.string()), ("premise", pa.string()), ("hypothesis", pa.string()),
    ("candidates", pa.list_(pa.string())), ("answer_type", pa.string()),
    ("boxes", pa.list_(pa.list_(pa.float64()))), ("box_labels", pa.list_(pa.string())), ("license", pa.string()),
    ("problem", pa.string()), ("meta", pa.string()),
])


def image_sha1(data: bytes | None) -> str | None:
    """Content hash of the encoded image: the key for duplicate and train/test leakage checks."""
    return None if data is None else hashlib.sha1(data).hexdigest()


def to_row(record: Record) -> dict[str, Any]:
    row = asdict(record)
    row["image_sha1"] = image_sha1(record.image)
    row["meta"] = json.dumps(record.meta, sort_keys=True, default=str)
    return row


def from_row(row: dict[str, Any]) -> Record:
    fields = {k: v for k, v in row.items() if k != "image_sha1"}
    fields["meta"] = json.loads(fields.get("meta") or "{}")
    return Record(**fields)


class ShardWriter:
    """Writes records to `out_dir/part-NNNNN.parquet`, `rows_per_shard` at a time (never a file per sample)."""

    def __init__(self, out_dir: str | Path, rows_per_shard: int = 2048, prefix: str = "part"):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard, self.prefix = rows_per_shard, prefix
        self.buffer: list[dict[str, Any]] = []
        self.shards: list[Path] = []
        self.count = 0

    def write(self, record: Record) -> None:
        self.buffer.append(to_row(record))
        self.count += 1
        if len(self.buffer) >= self.rows_per_shard:
            self.flush()

    def write_all(self, records: Iterable[Record]) -> int:
        for r in records:
            self.write(r)
        return self.count

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.out / f"{self.prefix}-{len(self.shards):05d}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pylist(self.buffer, schema=ARROW_SCHEMA), tmp, compression="zstd",
                       row_group_size=ROW_GROUP_ROWS)
        tmp.replace(path)  # a crash never leaves a half-written shard under the final name
        self.shards.append(path)
        self.buffer = []

    def close(self) -> list[Path]:
        self.flush()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()


def read_records(path: str | Path) -> Iterator[Record]:
    """Records of one shard file or of every `part-*.parquet` in a folder (sorted)."""
    path = Path(path)
    files = sorted(path.glob("part-*.parquet")) if path.is_dir() else [path]
    if not files:
        raise GalenInputError(f"no Parquet shards in {path}; run the ingest stage first")
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=512):
            for row in batch.to_pylist():
                yield from_row(row)


def split_by_hash(key: str, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """Deterministic split for datasets that ship without one (stable across machines and runs)."""
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test_fraction else "val" if h < test_fraction + val_fraction else "train"


def encode_png(array: Any) -> bytes:
    """A uint8 HxW or HxWx3 array as PNG bytes (MedMNIST arrays, windowed DICOM pixels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
