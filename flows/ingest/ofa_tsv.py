"""BiomedGPT/OFA preprocessed TSVs: one sample per line, the image inline as base64.

VQA rows have 6 tab-separated columns `qid, img_id, question, answers, object_labels, base64`,
where `answers` is `conf|!+answer` items joined by `&&` (`1.0|!+yes`, `0.6|!+left&&0.4|!+right`).
Caption rows have 5: `uniq_id, image_id, caption, predicted_object_labels, base64` (evaluation
files may join several reference captions with `&&`). The source is one `.tsv` file or a folder
of `*_train.tsv` / `*_val.tsv` / `*_test.tsv`. Files reach gigabytes, so they are streamed line by
line and each image is only base64-decoded, never opened (validation decodes it).

Text policy (schema.py): each line is decoded on its own as strict UTF-8, so a line with bytes that
are not UTF-8 is a record with a problem and the rest of the file is ingested; every cell of a decoded
line is text by construction (UTF-8 decoding never yields lone surrogates), so there are no other
types to check. Images are inline, so no file named by the TSV is ever opened.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from galen.flows.ingest import register_format
from galen.flows.ingest.schema import SPLITS, Record
from galen.model.errors import GalenInputError

DEFAULT_DATASET = "ofa-tsv"
# the TSVs repackage other datasets, so the real licence is the source dataset's; say so unless told
DEFAULT_LICENSE = "licence of the source dataset (BiomedGPT/OFA preprocessed TSV; set option license=...)"
COLUMNS = {"vqa": 6, "caption": 5}
ANSWER_SEP, CONF_SEP = "&&", "|!+"
CLOSED_ANSWERS = frozenset({"yes", "no"})
_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
_SPLIT_RE = re.compile(r"(?:^|[_\-.])(train|validation|valid|val|dev|test)$", re.IGNORECASE)
_URLSAFE = str.maketrans("-_", "+/")


def split_of(path: Path) -> str | None:
    """Split named by the file (`vqa_rad_test.tsv` -> test, `val.tsv` -> val), or None."""
    m = _SPLIT_RE.search(path.stem)
    return _SPLIT_NAMES[m.group(1).lower()] if m else None


def parse_answers(field: str) -> list[tuple[str, float]]:
    """`conf|!+answer&&...` as [(answer, confidence)], in file order; ValueError if an item is malformed."""
    out = []
    for item in field.split(ANSWER_SEP):
        conf, sep, answer = item.partition(CONF_SEP)
        if not sep:
            raise ValueError(f"answer item {item[:60]!r} is not conf|!+answer")
        out.append((answer.strip(), float(conf)))
    if not out or not any(a for a, _ in out):
        raise ValueError("no answer in the answer field")
    return out


def best_answer(answers: list[tuple[str, float]]) -> str:
    """The highest-confidence answer; on a tie the one listed first (OFA lists the majority first)."""
    return max(answers, key=lambda ac: ac[1])[0]  # max keeps the first of equal keys


def decode_base64(text: str) -> bytes:
    """Image bytes of a base64 field; OFA writes the URL-safe alphabet, some tools the standard one."""
    text = text.strip()
    if not text:
        raise ValueError("empty image field")
    text = text.translate(_URLSAFE)
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error as e:
        raise ValueError(f"image field is not valid base64 ({e})") from e


def _labels(field: str) -> list[str]:
    return [x.strip() for x in field.split(ANSWER_SEP) if x.strip()]


def _vqa(cols: list[str], base: dict[str, Any]) -> Record:
    qid, img_id, question, answer_field, objects, b64 = cols
    meta: dict[str, Any] = {"image_id": img_id, "answer_type_derived": True}
    if objects.strip():
        meta["object_labels"] = _labels(objects)
    problems, target, image = [], "", None
    try:
        answers = parse_answers(answer_field)
        meta["answers"] = [{"answer": a, "confidence": c} for a, c in answers]
        target = best_answer(answers)
    except ValueError as e:
        problems.append(f"bad answer field: {e}")
        meta["answer_field"] = answer_field[:200]
    try:
        image = decode_base64(b64)
    except ValueError as e:
        problems.append(str(e))
    return Record(task="vqa", image=image, question=question.strip(), target=target,
                  answer_type=("CLOSED" if target.lower() in CLOSED_ANSWERS else "OPEN") if target else None,
                  problem="; ".join(problems) or None, meta=meta, **base)


def _caption(cols: list[str], base: dict[str, Any]) -> Record:
    _, image_id, caption, objects, b64 = cols
    meta: dict[str, Any] = {"image_id": image_id}
    if objects.strip():
        meta["object_labels"] = _labels(objects)
    references = _labels(caption)
    if len(references) > 1:
        meta["references"] = references
    problems, image = [], None
    if not references:
        problems.append("empty caption")
    try:
        image = decode_base64(b64)
    except ValueError as e:
        problems.append(str(e))
    return Record(task="caption", image=image, target=references[0] if references else "",
                  problem="; ".join(problems) or None, meta=meta, **base)


def _check_first_row(path: Path, lineno: int, ncols: int, task: str | None) -> str:
    """The file's task from its first row's column count; a mismatch means the whole file is not what was asked."""
    if task is None:
        inferred = next((t for t, n in COLUMNS.items() if n == ncols), None)
        if inferred is None:
            raise GalenInputError(
                f"{path} line {lineno} has {ncols} tab-separated columns; OFA TSVs have 6 for VQA "
                "(qid, img_id, question, answers, object_labels, base64) or 5 for captions "
                "(uniq_id, image_id, caption, object_labels, base64); is this an OFA/BiomedGPT TSV?")
        return inferred
    if ncols != COLUMNS[task]:
        raise GalenInputError(f"{path} has {ncols} columns but task={task} rows have {COLUMNS[task]}; "
                              "pass the right task= or leave it out to infer it from the columns")
    return task


def _read_file(path: Path, split: str, task: str | None, dataset: str, license: str) -> Iterator[Record]:
    """Records of one TSV, streamed; the first line fixes (or checks) the task, later bad lines become problems."""
    checked = False
    with path.open("rb") as f:  # binary: split on \n only, and a bad UTF-8 line is one problem, not a crash
        for lineno, raw in enumerate(f, start=1):
            base = {"split": split, "dataset": dataset, "license": license}
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield Record(task=task or "vqa", source_id=f"{path.stem}:line{lineno}",
                             problem=f"line {lineno} is not UTF-8 ({e.reason})", **base)
                continue
            if not line.strip():
                continue
            cols = line.split("\t")
            if not checked:  # the first row decides the task (or must match the one asked for)
                task = _check_first_row(path, lineno, len(cols), task)
                checked = True
            source_id = f"{path.stem}:{cols[0].strip() or f'line{lineno}'}"
            if len(cols) != COLUMNS[task]:
                yield Record(task=task, source_id=source_id,
                             problem=f"line {lineno} has {len(cols)} columns, {task} rows have {COLUMNS[task]}", **base)
                continue
            record = (_vqa if task == "vqa" else _caption)(cols, {"source_id": source_id, **base})
            record.meta["line"] = lineno
            yield record


def _files(source: Path, split: str | None) -> list[tuple[Path, str]]:
    """(file, split) pairs: one file takes `split` (else its name, else train); in a folder, each file's name."""
    if source.is_file():
        if split is not None:
            name = _SPLIT_NAMES.get(str(split).lower())
            if name is None:
                raise GalenInputError(f"ofa-tsv: split must be one of {SPLITS}, got {split!r}")
            return [(source, name)]
        return [(source, split_of(source) or "train")]
    if split is not None:
        raise GalenInputError("ofa-tsv: option split applies to a single .tsv file; in a folder each file's name "
                              "(*_train.tsv, *_val.tsv, *_test.tsv) gives its split")
    files = sorted(p for p in source.glob("*.tsv") if p.is_file())
    if not files:
        raise GalenInputError(f"{source} holds no *.tsv files; expected *_train.tsv, *_val.tsv, *_test.tsv")
    unnamed = [p.name for p in files if split_of(p) is None]
    if unnamed:
        raise GalenInputError(f"cannot tell the split of {unnamed} in {source}: name them *_train.tsv, *_val.tsv or "
                              "*_test.tsv, or ingest each file on its own with split=...")
    return [(p, split_of(p) or "train") for p in files]


@register_format("ofa-tsv", "BiomedGPT/OFA TSV with base64 images: one .tsv (option split, default from the name or "
                            "train) or a folder of *_{train,val,test}.tsv; option task=vqa|caption (6 or 5 columns)")
def read(source: Path, task: str | None = None, split: str | None = None, dataset: str = DEFAULT_DATASET,
         license: str = DEFAULT_LICENSE, **unknown: object) -> Iterator[Record]:
    """Records of every TSV in the source; `dataset`/`license` name what the TSV repackages (e.g. slake, CC BY 4.0)."""
    if unknown:
        raise GalenInputError(f"ofa-tsv: unknown options {sorted(unknown)}; options are task, split, dataset, license")
    if task is not None and task not in COLUMNS:
        raise GalenInputError(f"ofa-tsv: task must be one of {sorted(COLUMNS)}, got {task!r}")
    source = Path(source)
    for path, file_split in _files(source, split):
        yield from _read_file(path, file_split, task, str(dataset), str(license))
