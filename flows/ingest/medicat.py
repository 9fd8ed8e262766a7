"""MedICat: medical figures from open-access papers with their captions and inline references.

The source is the JSON Lines file (`s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl`) or
its folder; each line is one figure with at least `pdf_hash`, `fig_uri`, `s2_caption` (often also
`inline_references`, `s2orc_references`, kept in meta with every other key). Images are
`figures/<fig_uri>` next to the file (or `image_root=`). The split hashes `pdf_hash`, so all figures of
one paper land in the same split and no paper leaks from train to test.

Bad lines: the first non-blank line must be a JSON object, otherwise the file is not MedICat JSONL and
that is an error. After that, a line that is not a JSON object (a corrupt or cut line in a 200k-line
file) becomes a record with a problem, like any other broken figure: one bad line neither stops the
ingest nor disappears silently, and validation quarantines it. Each line is decoded on its own as
strict UTF-8; `pdf_hash`, `fig_uri` and `s2_caption` must be text (another type or a lone surrogate is
a problem naming the field: schema.py's policy) and `fig_uri` a path inside the figure folder (paths.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from galen.flows.ingest import register_format
from galen.flows.ingest.captions import caption_record, check_options, single_file
from galen.flows.ingest.paths import read_inside
from galen.flows.ingest.schema import Record, split_by_hash, text_value
from galen.model.errors import GalenInputError

LICENSE = "MedICat terms (allenai/medicat): research use only; figures from open-access papers (S2ORC, PMC OA)"
RELEASE_NAME = "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"
REQUIRED = ("pdf_hash", "fig_uri", "s2_caption")


def _lines(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, object or None, why not) per non-blank line; decoding is per line so one bad byte stays local."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield n, None, f"line {n} is not valid JSON ({e})"
                continue
            yield (n, row, None) if isinstance(row, dict) else (n, None, f"line {n} is a JSON {type(row).__name__}, "
                                                                        "not an object")


@register_format("medicat", "MedICat: JSONL of {pdf_hash, fig_uri, s2_caption, ...} + figures/; split by paper hash")
def read(source: Path, **options: Any) -> Iterator[Record]:
    """One caption record per figure line (bad later lines become records with a problem)."""
    check_options("medicat", options, {"image_root"})
    path = single_file(Path(source), (".jsonl",), "MedICat JSONL file", preferred=(RELEASE_NAME,))
    image_root = Path(options["image_root"]) if options.get("image_root") else path.parent / "figures"
    if not image_root.is_dir():
        raise GalenInputError(f"figure folder {image_root} not found; MedICat keeps figures in figures/ next to "
                              f"{path.name} (or pass image_root=...)")
    first = True
    for n, row, why in _lines(path):
        if row is None:
            if first:
                raise GalenInputError(f"{path}: {why}; MedICat is JSON Lines, one figure object per line")
            sid = f"{path.name}:{n}"
            yield caption_record("medicat", sid, split_by_hash(sid), "", None, LICENSE, why, {"line": n})
            continue
        first = False
        yield _record(row, path, n, image_root)


def _record(row: dict[str, Any], path: Path, n: int, image_root: Path) -> Record:
    """One figure line as a caption record: the required fields must be text, `fig_uri` a path inside the root."""
    fields = {k: text_value(row.get(k), k) for k in REQUIRED}
    missing = [k for k in REQUIRED if row.get(k) is None or (fields[k][0] is not None and not fields[k][0].strip())]
    problems = [f"missing or empty {missing}"] if missing else []
    problems += [why for k, (_, why) in fields.items() if why and k not in missing]
    fig_uri = fields["fig_uri"][0] or ""
    sid = fig_uri or f"{path.name}:{n}"
    paper = fields["pdf_hash"][0] or sid
    image = None
    if fig_uri:
        image, problem = read_inside(image_root, fig_uri, "fig_uri")
        if problem:
            problems.append(problem)
    meta = {k: v for k, v in row.items() if k != "s2_caption"}
    return caption_record("medicat", sid, split_by_hash(paper), fields["s2_caption"][0] or "", image, LICENSE,
                          "; ".join(problems) or None, meta, field="s2_caption")
