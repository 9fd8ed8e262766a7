"""MeQSum (Ben Abacha & Demner-Fushman 2019): consumer health questions and their expert summaries.

The release is one spreadsheet, `MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx`, with columns
`File`, `CHQ` (the consumer health question) and `Summary`; Parquet and CSV copies with the same
columns are read too. The source has no split, so records are split by a hash of the question text
(duplicate questions land in one split, never leaking train into test) unless a `split` column exists.
Spreadsheet and CSV cells are read as text; a Parquet cell of another type (a number, a boolean) is a
record with a problem naming the column, never its str() (schema.py states the policy).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from galen.flows.ingest import register_format
from galen.flows.ingest.schema import SPLITS, Record, split_by_hash, text_value
from galen.model.errors import GalenInputError

LICENSE = "MeQSum (Ben Abacha & Demner-Fushman 2019), research use"
RELEASE_NAME = "MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx"
SUFFIXES = (".xlsx", ".parquet", ".csv")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test"}


def _find_table(source: Path) -> Path:
    if source.is_file():
        if source.suffix.lower() not in SUFFIXES:
            raise GalenInputError(f"{source.name}: MeQSum is read from {', '.join(SUFFIXES)} files")
        return source
    if (source / RELEASE_NAME).is_file():
        return source / RELEASE_NAME
    tables = sorted(p for p in source.iterdir() if p.suffix.lower() in SUFFIXES and not p.name.startswith("~$"))
    if len(tables) != 1:
        found = [p.name for p in tables] or "none"
        raise GalenInputError(f"{source} must hold {RELEASE_NAME} or exactly one .xlsx/.parquet/.csv table "
                              f"(found: {found}); point --source at the file")
    return tables[0]


def _load(path: Path) -> Any:
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".xlsx":
            try:
                import openpyxl  # noqa: F401 - pandas needs it for .xlsx
            except ImportError as e:
                raise GalenInputError("reading MeQSum's .xlsx needs openpyxl; run `pip install openpyxl` "
                                      "(or convert the sheet to CSV/Parquet)") from e
            frame = pd.read_excel(path, dtype=str, keep_default_na=False)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except GalenInputError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser failure means the file is not a readable table
        raise GalenInputError(f"{path} is not a readable {suffix} table ({type(e).__name__}: {e})") from e
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _cell(value: Any, column: str, problems: list[str] | None = None) -> str:
    """A cell as stripped text; NaN/None (Parquet nulls, empty cells) become "". Any other non-text
    value (a number or boolean in a Parquet column) is "" with a problem naming the column."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    text, why = text_value(value, column)
    if why and problems is not None:
        problems.append(why)
    return (text or "").strip()


@register_format("meqsum", "MeQSum: MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx (or .parquet/.csv) with CHQ, Summary")
def read(source: Path, **_: object) -> Iterator[Record]:
    path = _find_table(Path(source))
    frame = _load(path)
    missing = [c for c in ("CHQ", "Summary") if c not in frame.columns]
    if missing:
        raise GalenInputError(f"{path.name} lacks columns {missing} (has {list(frame.columns)}); "
                              "MeQSum tables have CHQ and Summary")
    has_split = "split" in frame.columns
    files = [_cell(v, "File") for v in frame["File"]] if "File" in frame.columns else []
    unique_files = bool(files) and all(files) and len(set(files)) == len(files)
    for i, row in enumerate(frame.to_dict("records")):
        problems: list[str] = []
        cells = {}
        for column in ("CHQ", "Summary"):
            column_problems: list[str] = []
            cells[column] = _cell(row[column], column, column_problems)
            problems += column_problems or ([] if cells[column] else [f"empty {column}"])
        question, summary = cells["CHQ"], cells["Summary"]
        source_id = files[i] if unique_files else f"{path.stem}:{i}"
        split = split_by_hash(" ".join(question.lower().split()) or source_id)
        if has_split:
            split_problems: list[str] = []
            given = _cell(row["split"], "split", split_problems).lower()
            if given in SPLIT_ALIASES:
                split = SPLIT_ALIASES[given]
            else:
                problems += split_problems or [f"unknown split {given!r}; expected one of {SPLITS}"]
        meta: dict[str, Any] = {"row": i}
        if files:
            meta["file"] = files[i]
        yield Record(task="summarization", split=split, dataset="meqsum", source_id=source_id, text=question,
                     target=summary, license=LICENSE, problem="; ".join(problems) or None, meta=meta)
