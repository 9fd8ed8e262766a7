"""MedNLI (Romanov & Shivade 2018): `mli_{train,dev,test}_v1.jsonl`, one premise/hypothesis pair a line.

Each line holds `sentence1` (premise, from MIMIC-III notes), `sentence2` (hypothesis), `gold_label`
(entailment | contradiction | neutral) and `pairID`. The gold label becomes the model's answer
through `NLI_LABEL_TO_ANSWER` (yes / no / maybe), so NLI shares the closed answer set of the
other yes/no tasks. MedNLI is credentialed (PhysioNet): this adapter only reads a local copy.
Each line is decoded on its own as strict UTF-8 (a bad line is a record with a problem); the three
fields must be text (null, numbers, lists or a lone surrogate are a problem naming the field, never
"None" or "123" as a sentence: schema.py states the policy).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from galen.flows.ingest import register_format
from galen.flows.ingest.schema import Fields, Record
from galen.model.errors import GalenInputError
from galen.model.tasks import NLI_ANSWERS, NLI_LABEL_TO_ANSWER

LICENSE = "PhysioNet Credentialed Health Data License 1.5.0 (MedNLI v1.0.0)"
SPLIT_FILES = {"train": "mli_train_v1.jsonl", "val": "mli_dev_v1.jsonl", "test": "mli_test_v1.jsonl"}
REQUIRED_KEYS = ("sentence1", "sentence2", "gold_label")


def _split_files(source: Path) -> list[tuple[str, Path]]:
    if source.is_file():
        split = next((s for s, name in SPLIT_FILES.items() if source.name == name), None)
        if split is None:
            raise GalenInputError(f"{source.name} is not one of {list(SPLIT_FILES.values())}; the split is taken "
                                  "from the file name, so keep MedNLI's names or point --source at the folder")
        return [(split, source)]
    found = [(s, source / n) for s, n in SPLIT_FILES.items() if (source / n).is_file()]
    if not found:
        raise GalenInputError(f"{source} has none of {list(SPLIT_FILES.values())}; MedNLI is credentialed: "
                              "download it from PhysioNet (physionet.org/content/mednli) and point --source "
                              "at the folder holding the .jsonl files")
    return found


def _record(split: str, path: Path, line_no: int, raw: bytes) -> Record:
    """One pair; a malformed line, a field that is not text or an unknown label is a record with `problem`."""
    fallback_id = f"{path.name}:{line_no}"

    def bad(problem: str) -> Record:
        return Record("nli", split, "mednli", fallback_id, candidates=list(NLI_ANSWERS), license=LICENSE,
                      problem=problem, meta={"line": line_no})

    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return bad(f"line is not UTF-8 ({e.reason} at byte {e.start})")
    except json.JSONDecodeError as e:
        return bad(f"line is not valid JSON ({e})")
    if not isinstance(row, dict):
        return bad("line is not a JSON object")
    fields = Fields(row)
    source_id = fields.text("pairID", ints=True, required=False) or fallback_id
    missing = [k for k in REQUIRED_KEYS if k not in row]
    premise = fields.text("sentence1", required="sentence1" not in missing) or ""
    hypothesis = fields.text("sentence2", required="sentence2" not in missing) or ""
    raw_label = fields.text("gold_label", required="gold_label" not in missing, default=None)
    label = (raw_label or "").strip().lower()
    problem = None
    if missing:
        problem = f"missing keys {missing}"
    elif raw_label is not None and label not in NLI_LABEL_TO_ANSWER:
        problem = f"unknown gold_label {raw_label!r}; expected one of {sorted(NLI_LABEL_TO_ANSWER)}"
    meta = {"gold_label": label, "line": line_no}
    return Record(task="nli", split=split, dataset="mednli", source_id=source_id,
                  premise=premise.strip(), hypothesis=hypothesis.strip(),
                  target=NLI_LABEL_TO_ANSWER.get(label, ""), candidates=list(NLI_ANSWERS),
                  license=LICENSE, problem=fields.problem(problem), meta=meta)


@register_format("mednli", "MedNLI: mli_{train,dev,test}_v1.jsonl (local copy; credentialed on PhysioNet)")
def read(source: Path, **_: object) -> Iterator[Record]:
    source = Path(source)
    for split, path in _split_files(source):
        with path.open("rb") as f:  # bytes: each line is decoded on its own, so one bad byte stays in its row
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    yield _record(split, path, line_no, line)
