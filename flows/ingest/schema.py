"""The one normalized record every ingest adapter writes, and the Parquet shard writer.

Every dataset format becomes rows of this schema, so validation, tokenizer training, sharding,
training, evaluation and serving see one shape of data. Images travel as their encoded bytes
(PNG/JPEG as the source had them; arrays and DICOM are encoded to PNG by the adapter) and are
decoded by the validation stage, which is where a broken image becomes a quarantined row.
A record the adapter could not complete (a missing image file, say) still gets written, with
`problem` saying why, so nothing is dropped silently.

Types and text at the edge. Adapters read each field with the type the release uses, through
`text_value`: text is a string, except where the release itself writes JSON integers (VQA-RAD's
counting answers `1`, `2`; numeric ids), which are accepted and kept as the text of the integer
(`"2"`). Anything else (null, a boolean, a list, an object, a float, a number where only text makes
sense such as a question `123`) makes the row a record with a `problem` naming the field, never a
coerced string like "None", "True" or "['is', 'there']".

Invalid Unicode policy: files are decoded as strict UTF-8 and text is never repaired or replaced
(no U+FFFD substitution, no dropped characters), so what is trained on is what the release says.
A whole-document file (a JSON list, a CSV) whose bytes are not UTF-8 is an error naming the file;
in line-delimited files (JSONL, OFA TSV) each line stands alone, so a bad line becomes a record with
a problem. Text that decodes but is not valid Unicode (a lone surrogate from a JSON escape such as
`"\\ud800"`, which cannot be written as UTF-8) makes its row a record with a problem naming the
field. As a last line of defence a `Record` checks its own text fields: a value that is not text or
not valid Unicode becomes a problem on the record (the quarantine keeps a backslash-escaped copy),
so no row can crash the Parquet writer.
"""

from __future__ import annotations

import hashlib
import io
import json
import numbers
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
            raise GalenInputError(f"record {self.source_id!r}: unknown task {self.task!r}; tasks are {TASKS}")
        if self.split not in SPLITS:
            raise GalenInputError(f"record {self.source_id!r}: unknown split {self.split!r}; splits are {SPLITS}")
        self._check_text()

    def _check_text(self) -> None:
        """The last line of defence of the text policy (module docstring): text fields that are not
        text, or not valid Unicode, become a problem instead of a crash in the Parquet writer."""
        problems = []
        for name in _TEXT_ATTRS:
            value = getattr(self, name)
            if value is None and name not in _REQUIRED_TEXT:
                continue
            if not isinstance(value, str):
                problems.append(f"{name} is {describe(value)}, not text")
                setattr(self, name, "" if name in _REQUIRED_TEXT else None)
            elif not value.isascii() and (why := unicode_problem(value, name)):
                problems.append(why)
                setattr(self, name, escape_invalid(value))
        for name in _TEXT_LIST_ATTRS:
            values = getattr(self, name)
            if values is None:
                continue
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                problems.append(f"{name} is not a list of text")
                setattr(self, name, None)
            elif any(unicode_problem(v, name) for v in values):
                problems.append(f"{name} holds invalid Unicode")
                setattr(self, name, [escape_invalid(v) for v in values])
        if problems:
            self.problem = "; ".join(([self.problem] if self.problem else []) + problems)


_REQUIRED_TEXT = ("dataset", "source_id", "target", "license")
_TEXT_ATTRS = ("dataset", "source_id", "target", "question", "text", "premise", "hypothesis", "answer_type",
               "license", "problem")
_TEXT_LIST_ATTRS = ("candidates", "box_labels")


def describe(value: Any, limit: int = 40) -> str:
    """What a value is, in the words of the formats it comes from: "null", "a boolean (true)",
    "a number (123)", "a list", "an object" (for messages naming a field of the wrong type)."""
    if value is None:
        return "null"
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy's from Parquet/pandas too
        return f"a boolean ({str(bool(value)).lower()})"
    if isinstance(value, numbers.Number):  # numpy scalars from Parquet/pandas too
        text = repr(value)
        return f"a number ({text if len(text) <= limit else text[:limit] + '...'})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    return f"a {type(value).__name__}"


def unicode_problem(text: str, field: str) -> str | None:
    """Why `text` cannot be stored as UTF-8 (a lone surrogate, e.g. from a JSON "\\ud800"), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"{field} is not valid Unicode (lone surrogate {text[e.start]!r} at character {e.start}); "
                "text is never repaired")
    return None


def escape_invalid(text: str) -> str:
    """`text` with lone surrogates written as backslash escapes: storable, for the quarantine only."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def text_value(value: Any, field: str, *, ints: bool = False) -> tuple[str | None, str | None]:
    """(text, None) when `value` of `field` is text, or with `ints=True` (where the release writes
    JSON integers) an integer, kept as its decimal text; else (None, reason naming the field).

    Booleans, floats, null, lists and objects are never text; neither is a string holding a lone
    surrogate (see the module docstring for the policy)."""
    if isinstance(value, str):
        why = None if value.isascii() else unicode_problem(value, field)
        return (None, why) if why else (value, None)
    if ints and isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    return None, f"{field} is {describe(value)}, not text"


class Fields:
    """Reads the text fields of one source row and collects what is wrong with them.

    `Fields(row).text("question")` is the field's text (or "" / `default` with a problem recorded);
    `problems` lists every missing or mistyped field by name, for the record's `problem`."""

    def __init__(self, row: dict[str, Any]):
        self.row = row
        self.problems: list[str] = []

    def text(self, key: str, *, ints: bool = False, required: bool = True, default: str | None = "",
             label: str | None = None) -> str | None:
        """The text of `key`. Absent (or null, when not `required`) gives `default`; absent or null
        when `required`, or of any other type, also records a problem naming `label or key`."""
        name = label or key
        if key not in self.row or (self.row[key] is None and not required):
            if required:
                self.problems.append(f"missing {name}")
            return default
        text, why = text_value(self.row[key], name, ints=ints)
        if why:
            self.problems.append(why)
            return default
        return text

    def problem(self, *more: str | None) -> str | None:
        """The collected problems (and `more`) as one `problem` string, None when there are none."""
        found = [p for p in (*more, *self.problems) if p]
        return "; ".join(found) or None


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
    # surrogatepass: the same bytes as UTF-8 for valid text, and no crash on a hostile key
    h = int(hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test_fraction else "val" if h < test_fraction + val_fraction else "train"


def encode_png(array: Any) -> bytes:
    """A uint8 HxW or HxWx3 array as PNG bytes (MedMNIST arrays, windowed DICOM pixels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
