"""Validation stage: every ingested row is checked; bad rows go to a quarantine file with a reason.

Checks: the adapter's own `problem`, image presence for image tasks, image decoding (PIL loads the
pixels, so truncated files fail here), image size and mode, empty and over-long text, label sets
(class name among the candidates, NLI answer among maybe/yes/no), boxes present for grounding and
detection (with a phrase, or one label per box) and inside the image,
duplicates within a split, and leakage (an image of the val/test split that also appears in
train: the train copies are quarantined, the evaluation split stays intact). Nothing is dropped
silently: every row ends up either in the validated shards or in `quarantine.parquet` with its
reason, and `report.json` (a DVC metric) counts them per task/split/reason. The stage fails, after
writing all of that, when the bad fraction exceeds the threshold from params.yaml.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from galen.flows.ingest.schema import ARROW_SCHEMA, Record, ShardWriter, image_sha1, read_records, to_row
from galen.model.errors import GalenInputError
from galen.model.tasks import BOX_TASKS, IMAGE_TASKS, NLI_ANSWERS

TEXT_FIELDS = ("question", "text", "premise", "hypothesis")
SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2}  # which copy of a leaked image survives


@dataclass
class ValidationConfig:
    """Limits from params.yaml `validate:`."""

    min_image_side: int = 16
    max_image_pixels: int = 40_000_000
    allowed_modes: tuple[str, ...] = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F")
    max_text_words: int = 1024
    max_target_words: int = 256
    max_bad_fraction: float = 0.05

    @classmethod
    def from_params(cls, params: dict) -> ValidationConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(params) - known)
        if unknown:
            raise GalenInputError(f"unknown validate params {unknown}; known: {sorted(known)}")
        if "allowed_modes" in params:
            params = {**params, "allowed_modes": tuple(params["allowed_modes"])}
        return cls(**params)


class DataQualityError(GalenInputError):
    """Too many bad rows: the stage stops, after writing the report and the quarantine."""


def reason_kind(reason: str) -> str:
    """The category of a reason for the report ("duplicate of q7" -> "duplicate")."""
    return reason.split(":")[0].split(" of ")[0].strip()


def check_image(data: bytes, cfg: ValidationConfig) -> tuple[str | None, tuple[int, int] | None]:
    """(reason or None, (width, height)) after fully decoding the image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            size, mode = img.size, img.mode
            if size[0] * size[1] > cfg.max_image_pixels:
                return f"image too large: {size[0]}x{size[1]} pixels > {cfg.max_image_pixels}", size
            img.load()  # decodes all pixels: truncated files fail here, not in training
    except Exception as e:  # noqa: BLE001 - any decoder failure is a quarantine reason, not a crash
        return f"undecodable image: {type(e).__name__}: {str(e)[:120]}", None
    if min(size) < cfg.min_image_side:
        return f"image too small: {size[0]}x{size[1]} < {cfg.min_image_side} px", size
    if mode not in cfg.allowed_modes:
        return f"unsupported image mode {mode}", size
    return None, size


def check_record(rec: Record, cfg: ValidationConfig) -> str | None:
    """The first reason this row cannot be trained or evaluated on, or None."""
    if rec.problem:
        return f"ingest: {rec.problem}"
    size = None
    if rec.task in IMAGE_TASKS:
        if not rec.image:
            return "missing image"
        reason, size = check_image(rec.image, cfg)
        if reason:
            return reason
    if not rec.target.strip():
        return "empty target"
    if len(rec.target.split()) > cfg.max_target_words:
        return f"target longer than {cfg.max_target_words} words"
    if rec.task == "vqa" and not (rec.question or "").strip():
        return "empty question"
    if rec.task == "nli" and (not (rec.premise or "").strip() or not (rec.hypothesis or "").strip()):
        return "empty premise or hypothesis"
    if rec.task == "summarization" and not (rec.text or "").strip():
        return "empty text to summarize"
    for name in TEXT_FIELDS:
        value = getattr(rec, name)
        if value and len(value.split()) > cfg.max_text_words:
            return f"{name} longer than {cfg.max_text_words} words"
    if rec.task == "nli" and rec.target not in NLI_ANSWERS:
        return f"NLI answer {rec.target!r} not in {NLI_ANSWERS}"
    if rec.candidates is not None:
        if len(set(rec.candidates)) != len(rec.candidates):
            return "duplicate labels in the candidate set"
        if rec.target not in rec.candidates:
            return f"label {rec.target!r} is not in the candidate set"
    if rec.task in BOX_TASKS and not rec.boxes:
        return f"{rec.task} record without boxes"
    labels = [" ".join(str(x or "").split()) for x in rec.box_labels or []]
    if rec.task == "grounding" and not (rec.text or "").strip() and not (labels and labels[0]):
        return "empty grounding phrase (text, or the first box label)"
    if rec.task == "detection" and (len(labels) != len(rec.boxes or []) or not all(labels)):
        return f"detection needs one non-empty label per box ({len(rec.boxes or [])} boxes, {len(labels)} labels)"
    if rec.boxes:
        if size is None:
            return "boxes without an image"
        w, h = size
        for box in rec.boxes:
            if len(box) != 4 or not (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
                return f"box {box} is not inside the {w}x{h} image"
    return None


def _dedup_key(rec: Record) -> tuple:
    return (rec.dataset, rec.task, image_sha1(rec.image), rec.question, rec.text, rec.premise, rec.hypothesis,
            rec.target)


QUARANTINE = "quarantine.parquet"  # always written: the mark of a folder `galen validate` wrote
REPORT = "report.json"  # the report's place when no --report is given


def _is_report(path: Path) -> bool:
    """Whether an existing --report file is one this stage wrote (so it may be replaced)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"rows", "valid", "quarantined", "max_bad_fraction"} <= set(report)


def validate(sources: Iterable[str | Path], out_dir: str | Path, cfg: ValidationConfig,
             rows_per_shard: int = 2048, report_path: str | Path | None = None) -> dict:
    """Validate ingested shards into `out_dir/{part-*.parquet, quarantine.parquet}` and a report
    (`out_dir/report.json` unless `report_path` says where: DVC metrics live outside outputs).

    The folder (and a report outside it) is written whole (`galen.flows.outputs.replacing_output`):
    an `out_dir` that is, holds or lies in an input is refused, as is one holding files this stage
    does not write; a run that fails leaves the previous output as it was."""
    from galen.flows.outputs import refuse_overlap, replacing_output

    sources = [Path(s) for s in sources]
    out = Path(out_dir)
    report_file = Path(report_path) if report_path else out / REPORT
    try:  # a report inside the folder is written with it; one outside is an output of its own
        report_in_out: str | None = report_file.resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        report_in_out = None
    owned = [QUARANTINE, "part-*.parquet", REPORT]
    if report_in_out not in (None, "."):
        owned.append(glob.escape(report_in_out))
    else:
        report_in_out = None
        refuse_overlap(report_file, [*sources, out], "galen validate", "--report")
    with contextlib.ExitStack() as stack:  # exits in reverse: the folder is renamed into place, then the report
        report_tmp = None if report_in_out is not None else stack.enter_context(
            replacing_output(report_file, command="galen validate", inputs=sources, owned=_is_report,
                             flag="--report"))
        tmp = stack.enter_context(replacing_output(out, command="galen validate", inputs=sources, owned=owned))
        summary, failure = _validate_into(sources, tmp, out, cfg, rows_per_shard, report_file)
        if report_tmp is None:
            report_tmp = tmp / str(report_in_out)
        report_tmp.parent.mkdir(parents=True, exist_ok=True)
        report_tmp.write_text(json.dumps(summary, indent=2) + "\n")
    if failure:  # raised once the folder and the report are in place, for a person to read
        raise DataQualityError(failure)
    return summary


def _validate_into(sources: list[Path], tmp: Path, out: Path, cfg: ValidationConfig, rows_per_shard: int,
                   report_file: Path) -> tuple[dict, str | None]:
    """Write the validated shards and the quarantine into `tmp` (the folder that becomes `out`);
    returns the report and, when too many rows are bad, the error to raise."""
    records = [r for src in sources for r in read_records(src)]
    if not records:
        raise GalenInputError("no records to validate; did the ingest stage write any?")

    # pass 1: row checks and duplicates
    reasons: list[str | None] = []
    seen: dict[tuple, str] = {}
    for rec in records:
        reason = check_record(rec, cfg)
        if reason is None:
            key = (rec.split, *_dedup_key(rec))
            if key in seen:
                reason = f"duplicate of {seen[key]}"
            else:
                seen[key] = rec.source_id
        reasons.append(reason)

    # pass 2: leakage — an image in an evaluation split must not be trained on
    best_split: dict[str, str] = {}
    for rec, reason in zip(records, reasons):
        sha = image_sha1(rec.image)
        if reason is None and sha is not None:
            current = best_split.get(sha)
            if current is None or SPLIT_PRIORITY[rec.split] < SPLIT_PRIORITY[current]:
                best_split[sha] = rec.split
    for i, rec in enumerate(records):
        sha = image_sha1(rec.image)
        if reasons[i] is None and sha is not None and rec.split == "train" and best_split[sha] != "train":
            reasons[i] = f"leakage: the same image is in the {best_split[sha]} split"

    quarantined, report = [], Counter()
    by_task_split: Counter = Counter()
    with ShardWriter(tmp, rows_per_shard) as writer:
        for rec, reason in zip(records, reasons):
            if reason is None:
                writer.write(rec)
                by_task_split[f"{rec.task}/{rec.split}"] += 1
            else:
                row = to_row(rec)
                row["reason"] = reason
                quarantined.append(row)
                report[f"{rec.task}/{rec.split}/{reason_kind(reason)}"] += 1
    schema = ARROW_SCHEMA.append(pa.field("reason", pa.string()))
    pq.write_table(pa.Table.from_pylist(quarantined, schema=schema), tmp / QUARANTINE)

    bad_fraction = len(quarantined) / len(records)
    summary = {"rows": len(records), "valid": len(records) - len(quarantined), "quarantined": len(quarantined),
               "bad_fraction": round(bad_fraction, 6), "max_bad_fraction": cfg.max_bad_fraction,
               "valid_by_task_split": dict(sorted(by_task_split.items())),
               "quarantined_by_task_split_reason": dict(sorted(report.items()))}
    failure = None
    if bad_fraction > cfg.max_bad_fraction:
        top = ", ".join(f"{k} ({v})" for k, v in report.most_common(5))
        failure = (
            f"{len(quarantined)} of {len(records)} rows ({bad_fraction:.1%}) failed validation, above "
            f"validate.max_bad_fraction={cfg.max_bad_fraction:.1%}. Most common: {top}. The rows and their reasons "
            f"are in {out / QUARANTINE}, counts in {report_file}; fix the source data or raise the threshold in params.yaml.")
    return summary, failure
