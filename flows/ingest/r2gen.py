"""IU X-ray and MIMIC-CXR in the R2Gen layout: report generation as a captioning task.

`annotation.json` is `{"train": [...], "val": [...], "test": [...]}`; each study is
`{"id", "report", "image_path": ["CXR1_1_IM-0001/0.png", ...], "split"}` (MIMIC-CXR studies also carry
`study_id`, `subject_id`) and the paths are relative to `images/` next to the file (`image_root=`).
A study has several views (frontal, lateral): by default one record per study with the first view,
which is what R2Gen-style single-image models train on, and every path kept in meta; `all_views=True`
gives one record per image (`source_id` `ID/N`). The split is the annotation key the study sits under.
`report` must be text and every `image_path` a path inside the image root (refused unread otherwise:
paths.py); a wrong type or a lone surrogate is a record with a problem naming the field (schema.py).

`dataset=` picks the name and licence. Without it the layout is recognised (MIMIC paths look like
`p10/p10000032/s50414267/...jpg`, IU ids like `CXR1_1_IM-0001`) and anything else is an error: guessing
wrong would label credentialed MIMIC data with IU X-ray's licence.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from galen.flows.ingest import register_format
from galen.flows.ingest.captions import caption_record, check_options
from galen.flows.ingest.paths import read_inside
from galen.flows.ingest.schema import Fields, Record, describe
from galen.model.errors import GalenInputError, read_json

LICENSES = {
    "iu-xray": "CC BY-NC-ND 4.0 (Indiana University Chest X-ray Collection, Open-i)",
    "mimic-cxr": "PhysioNet Credentialed Health Data License 1.5.0 (MIMIC-CXR; credentialed access, DUA required)",
}
SPLIT_KEYS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
MIMIC_PATH = re.compile(r"^p\d+/p\d+/s\d+/")
IU_ID = re.compile(r"^CXR\d+", re.IGNORECASE)


def _load(path: Path) -> dict[str, list]:
    """The annotation file, checked for the R2Gen shape (split name -> list of studies)."""
    data = read_json(path, dict, "R2Gen's annotation.json is {'train': [...], 'val': [...], 'test': [...]}")
    if not data:
        raise GalenInputError(f"{path} must be a JSON object {{'train': [...], 'val': [...], 'test': [...]}} "
                              "(R2Gen layout)")
    unknown = [k for k in data if k not in SPLIT_KEYS]
    if unknown:
        raise GalenInputError(f"{path} has keys {unknown}; R2Gen annotation keys are {sorted(SPLIT_KEYS)}")
    bad = [k for k, v in data.items() if not isinstance(v, list)]
    if bad:
        raise GalenInputError(f"{path}: {bad} must each be a list of studies (R2Gen layout)")
    return data


def _guess_dataset(path: Path, data: dict[str, list]) -> str:
    """iu-xray or mimic-cxr from the first study that says which; an error when none does."""
    for entries in data.values():
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            paths = entry.get("image_path")
            first = str(paths[0] if isinstance(paths, list) and paths else paths or "")
            if "study_id" in entry or "subject_id" in entry or MIMIC_PATH.match(first):
                return "mimic-cxr"
            if IU_ID.match(str(entry.get("id", ""))) or IU_ID.match(first):
                return "iu-xray"
    raise GalenInputError(f"cannot tell whether {path} is IU X-ray or MIMIC-CXR; pass dataset=iu-xray or "
                          "dataset=mimic-cxr (it sets the licence)")


def _study_records(entry: Any, key: str, index: int, image_root: Path, dataset: str,
                   all_views: bool) -> Iterator[Record]:
    license = LICENSES[dataset]
    split = SPLIT_KEYS[key]
    if not isinstance(entry, dict):
        yield caption_record(dataset, f"{key}:{index}", split, "", None, license, "study is not a JSON object")
        return
    problems = []
    fields = Fields(entry)
    sid = (fields.text("id", ints=True, required=False) or "").strip()
    if not sid:
        if not fields.problems:
            problems.append("study has no id")
        sid = f"{key}:{index}"
    paths = entry.get("image_path")
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not paths:
        problems.append("study has no image_path" if paths in (None, [], "")
                        else f"image_path is {describe(paths)}, not a path or a list of paths")
        paths = []
    meta: dict[str, Any] = {"image_paths": paths, "annotation_split": key}
    meta.update({k: entry[k] for k in ("study_id", "subject_id") if k in entry})
    if "split" in entry and entry["split"] != key:
        meta["entry_split"] = entry["split"]  # the key wins; keep the disagreement visible
    views = list(enumerate(paths)) if all_views else list(enumerate(paths[:1]))
    problem = fields.problem(*problems)
    if not views:
        yield caption_record(dataset, sid, split, entry.get("report"), None, license, problem, meta, field="report")
        return
    for view, rel in views:
        image, image_problem = read_inside(image_root, rel, f"image_path[{view}]")
        yield caption_record(dataset, f"{sid}/{view}" if all_views else sid, split, entry.get("report"), image,
                             license, "; ".join(p for p in (problem, image_problem) if p) or None,
                             {**meta, "view": view, "image_path": rel}, field="report")


@register_format("r2gen", "IU X-ray / MIMIC-CXR (R2Gen layout): annotation.json {train,val,test: [studies]} "
                 "+ images/; report generation as captioning")
def read(source: Path, **options: Any) -> Iterator[Record]:
    """One caption record per study (first view) or per image (`all_views=True`), target = the report."""
    check_options("r2gen", options, {"image_root", "all_views", "dataset"})
    source = Path(source)
    path = source / "annotation.json" if source.is_dir() else source
    if not path.is_file():
        raise GalenInputError(f"{path} not found; point --source at the R2Gen folder holding annotation.json")
    all_views = options.get("all_views", False)
    if not isinstance(all_views, bool):
        raise GalenInputError(f"r2gen: all_views must be true or false, got {all_views!r}")
    data = _load(path)
    dataset = options.get("dataset") or _guess_dataset(path, data)
    if dataset not in LICENSES:
        raise GalenInputError(f"r2gen: dataset={dataset!r}; use one of {sorted(LICENSES)}")
    image_root = Path(options["image_root"]) if options.get("image_root") else path.parent / "images"
    if not image_root.is_dir():
        raise GalenInputError(f"image folder {image_root} not found; R2Gen keeps images in images/ next to "
                              "annotation.json (or pass image_root=...)")
    for key, entries in data.items():
        for index, entry in enumerate(entries):
            yield from _study_records(entry, key, index, image_root, dataset, all_views)
