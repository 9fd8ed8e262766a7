"""ROCO (Radiology Objects in COntext): PubMed Central figures with their captions.

Layout: one folder per split (`train/`, `validation/`, `test/`), each either holding the files itself
or split into `radiology/` and `non-radiology/` (option `subset=` keeps one). A split folder has
`images/` and a captions file: the release's `captions.txt` (`ROCO_00001<TAB>caption`, image
`images/ROCO_00001.jpg`) or the CSV re-exports' `id,name,caption` (image `images/<name>`, falling back
to `<id>.jpg`). `source_id` is the ROCO id; images keep their PMC OA licences, recorded collectively.
Captions files are strict UTF-8 text (a bad byte is an error naming the file: schema.py's policy), so
every cell is text; an image name leaving `images/` (`..`, absolute, a symlink out) is refused unread.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from galen.flows.ingest import register_format
from galen.flows.ingest.captions import caption_record, check_options, column_index, iter_csv, iter_lines
from galen.flows.ingest.paths import read_inside, resolve_inside
from galen.flows.ingest.schema import Record
from galen.model.errors import GalenInputError

LICENSE = "CC BY / CC BY-NC (PMC OA subset), see ROCO"
SPLIT_DIRS = {"train": "train", "validation": "val", "val": "val", "valid": "val", "test": "test"}
SUBSETS = ("radiology", "non-radiology")

Row = tuple[str, str | None, str, str | None, str]  # (roco id, image name, caption, problem, where)


def _split_folders(source: Path, subset: str | None) -> list[tuple[str, str | None, Path]]:
    """(split, subset, folder) for every split folder, in a fixed order."""
    root = source
    if not any((source / d).is_dir() for d in SPLIT_DIRS) and (source / "data").is_dir():
        root = source / "data"  # the GitHub release nests everything under data/
    found = []
    for name in sorted(SPLIT_DIRS):
        folder = root / name
        if not folder.is_dir():
            continue
        subs = [s for s in SUBSETS if (folder / s).is_dir()]
        found += [(SPLIT_DIRS[name], s, folder / s) for s in subs] if subs else [(SPLIT_DIRS[name], None, folder)]
    if not found:
        raise GalenInputError(f"{source} has no ROCO split folder ({', '.join(sorted(SPLIT_DIRS))}); "
                              "point --source at the ROCO data folder")
    if subset is not None:
        found = [f for f in found if f[1] == subset]
        if not found:
            raise GalenInputError(f"{source} has no {subset}/ folder under its split folders")
    return found


def _txt_rows(path: Path) -> Iterator[Row]:
    for line, text in iter_lines(path):
        if not text.strip():
            continue
        rid, _, caption = text.partition("\t")
        yield rid.strip(), None, caption, None, f"{path.name}:{line}"


def _csv_rows(path: Path) -> Iterator[Row]:
    rows = iter_csv(path)
    first = next(rows, None)
    header = first[1] if first else []
    cols = [column_index(header, (c,)) for c in ("id", "name", "caption")]
    if None in cols:
        raise GalenInputError(f"{path} has columns {header}; ROCO CSVs need id, name, caption")
    id_col, name_col, caption_col = cols
    for line, row in rows:
        if not any(c.strip() for c in row):
            continue
        cell = [row[i].strip() if i < len(row) else "" for i in (id_col, name_col, caption_col)]
        problem = None if len(row) == len(header) else \
            f"line {line} has {len(row)} fields, header has {len(header)} (quote captions that contain commas)"
        yield cell[0], cell[1] or None, cell[2], problem, f"{path.name}:{line}"


def _folder_records(split: str, subset: str | None, folder: Path) -> Iterator[Record]:
    images = folder / "images"
    if not images.is_dir():
        raise GalenInputError(f"{folder} has no images/ folder; download the ROCO images into it")
    csvs = sorted(folder.glob("*.csv"))
    if (folder / "captions.txt").is_file():
        path, rows = folder / "captions.txt", _txt_rows(folder / "captions.txt")
    elif len(csvs) == 1:
        path, rows = csvs[0], _csv_rows(csvs[0])
    else:
        raise GalenInputError(f"{folder} needs captions.txt or exactly one id,name,caption CSV "
                              f"(found {[p.name for p in csvs] or 'none'})")
    for rid, name, caption, problem, where in rows:
        problems = [problem] if problem else []
        if not rid:
            problems.append("row has no ROCO id")
        image_name, field = (name, "name") if name else (f"{rid}.jpg", "id")
        if name and rid:
            real, _ = resolve_inside(images, name, "name")
            by_id, _ = resolve_inside(images, f"{rid}.jpg", "id")
            if real is not None and not real.exists() and by_id is not None and by_id.exists():
                image_name, field = f"{rid}.jpg", "id"  # some exports name the images by id
        image, image_problem = read_inside(images, image_name, field) if (name or rid) else \
            (None, "row has no image name")
        if image_problem:
            problems.append(image_problem)
        meta = {"subset": subset, "image_name": image_name, "captions_file": path.name}
        yield caption_record("roco", rid or where, split, caption, image, LICENSE, "; ".join(problems) or None, meta)


@register_format("roco", "ROCO: train/validation/test[/radiology|non-radiology] with captions.txt or "
                 "id,name,caption CSV + images/")
def read(source: Path, **options: Any) -> Iterator[Record]:
    """Caption records of every split (and subset) folder; `subset=radiology|non-radiology` keeps one."""
    check_options("roco", options, {"subset"})
    subset = options.get("subset")
    if subset is not None and subset not in SUBSETS:
        raise GalenInputError(f"roco: subset={subset!r}; use one of {SUBSETS}")
    source = Path(source)
    if not source.is_dir():
        raise GalenInputError(f"{source} is not a folder; point --source at the ROCO data folder")
    for split, sub, folder in _split_folders(source, subset):
        yield from _folder_records(split, sub, folder)
