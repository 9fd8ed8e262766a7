"""MedNLI (Romanov & Shivade 2018): `mli_{train,dev,test}_v1.jsonl`, one premise/hypothesis pair a line.

Each line holds `sentence1` (premise, from MIMIC-III notes), `sentence2` (hypothesis), `gold_label`
(entailment | contradiction | neutral) and `pairID`. The gold label becomes the model's answer
through `NLI_LABEL_TO_ANSWER` (yes / no / maybe), so NLI shares the closed answer set of the
other yes/no tasks. MedNLI is credentialed (PhysioNet): this adapter only reads a local copy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from galen.flows.ingest import register_format
from galen.flows.ingest.schema import Record
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


def _record(split: str, path: Path, line_no: int, line: str) -> Record:
    """One pair; a malformed line or an unknown label is a record with `problem`, never dropped."""
    fallback_id = f"{path.name}:{line_no}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return Record("nli", split, "mednli", fallback_id, candidates=list(NLI_ANSWERS), license=LICENSE,
                      problem=f"line is not valid JSON ({e})")
    if not isinstance(row, dict):
        return Record("nli", split, "mednli", fallback_id, candidates=list(NLI_ANSWERS), license=LICENSE,
                      problem="line is not a JSON object")
    source_id = str(row.get("pairID") or fallback_id)
    missing = [k for k in REQUIRED_KEYS if k not in row]
    label = str(row.get("gold_label", "")).strip().lower()
    problem = None
    if missing:
        problem = f"missing keys {missing}"
    elif label not in NLI_LABEL_TO_ANSWER:
        problem = f"unknown gold_label {row.get('gold_label')!r}; expected one of {sorted(NLI_LABEL_TO_ANSWER)}"
    meta = {"gold_label": label, "line": line_no}
    return Record(task="nli", split=split, dataset="mednli", source_id=source_id,
                  premise=str(row.get("sentence1", "")).strip(), hypothesis=str(row.get("sentence2", "")).strip(),
                  target=NLI_LABEL_TO_ANSWER.get(label, ""), candidates=list(NLI_ANSWERS),
                  license=LICENSE, problem=problem, meta=meta)


@register_format("mednli", "MedNLI: mli_{train,dev,test}_v1.jsonl (local copy; credentialed on PhysioNet)")
def read(source: Path, **_: object) -> Iterator[Record]:
    source = Path(source)
    for split, path in _split_files(source):
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    yield _record(split, path, line_no, line)
