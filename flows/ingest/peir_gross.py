"""PEIR Gross (bioCaption layout): gross-pathology photographs with one caption each.

The source is the mapping file or its folder: a TSV (`image<TAB>caption`, `.tsv`/`.txt`), a CSV
(`image,caption`) or a JSON object `{"image_name": "caption"}`; an optional header row is skipped.
Images live in `images/` next to the mapping (else beside it, or `image_root=`). The dataset has no
official split, so each image goes to `split_by_hash(image name)`: stable across runs and machines.
Captions must be text (a JSON null, number, list or a lone surrogate is a problem naming the caption:
schema.py's policy); an image name leaving the image folder is refused unread (paths.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from galen.flows.ingest import register_format
from galen.flows.ingest.captions import caption_record, check_options, iter_csv, iter_lines, single_file
from galen.flows.ingest.paths import read_inside
from galen.flows.ingest.schema import Record, split_by_hash
from galen.model.errors import GalenInputError, read_json

LICENSE = "PEIR Digital Library, educational use"
MAPPING_SUFFIXES = (".json", ".tsv", ".csv", ".txt")
HEADER_IMAGE = {"image", "image_name", "image_id", "filename", "file", "name", "id"}
HEADER_CAPTION = {"caption", "captions", "text", "description"}

Row = tuple[str, Any, str | None, str]  # (image name, caption, problem, where)


def _is_header(cells: list[str]) -> bool:
    return len(cells) >= 2 and cells[0].strip().lower() in HEADER_IMAGE and cells[1].strip().lower() in HEADER_CAPTION


def _json_rows(path: Path) -> Iterator[Row]:
    data = read_json(path, dict, "PEIR Gross JSON is an object {'image_name': 'caption', ...}")
    for name, caption in data.items():
        yield name, caption, None, path.name


def _table_rows(path: Path) -> Iterator[Row]:
    if path.suffix.lower() == ".csv":
        cells_of = ((line, row) for line, row in iter_csv(path))
    else:  # tab-separated: captions may hold quotes, so split on the first tab, no CSV quoting
        cells_of = ((line, text.split("\t", 1)) for line, text in iter_lines(path))
    first = True
    for line, cells in cells_of:
        if not any(c.strip() for c in cells):
            continue
        if first and _is_header(cells):
            first = False
            continue
        first = False
        problem = None if len(cells) <= 2 else f"line {line} has {len(cells)} fields; expected image,caption " \
                                                "(quote captions that contain commas)"
        yield cells[0].strip(), cells[1] if len(cells) > 1 else "", problem, f"{path.name}:{line}"


@register_format("peir-gross", "PEIR Gross (bioCaption): image<TAB>caption TSV/CSV or {image: caption} JSON "
                 "+ images; hash split")
def read(source: Path, **options: Any) -> Iterator[Record]:
    """One caption record per mapped image, split by a hash of the image name."""
    check_options("peir-gross", options, {"image_root"})
    path = single_file(Path(source), MAPPING_SUFFIXES, "PEIR Gross caption mapping")
    if options.get("image_root"):
        image_root = Path(options["image_root"])
    else:
        image_root = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    if not image_root.is_dir():
        raise GalenInputError(f"image folder {image_root} not found; pass image_root=... (the PEIR Gross images)")
    rows = _json_rows(path) if path.suffix.lower() == ".json" else _table_rows(path)
    first_seen: dict[str, str] = {}
    for name, caption, problem, where in rows:
        problems = [problem] if problem else []
        sid = name or where
        if not name:
            problems.append("row has no image name")
        elif name in first_seen:
            problems.append(f"duplicate entry for {name} (first at {first_seen[name]})")
            sid = f"{name}@{where}"
        else:
            first_seen[name] = where
        image, image_problem = read_inside(image_root, name, "image name") if name else (None, None)
        if image_problem:
            problems.append(image_problem)
        yield caption_record("peir-gross", sid, split_by_hash(name or sid), caption, image, LICENSE,
                             "; ".join(problems) or None, {"image_name": name, "captions_file": path.name})
