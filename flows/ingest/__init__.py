"""Readers of real dataset layouts, one module per format, all writing `schema.Record`s.

An adapter is a function `read(source: Path, **options) -> Iterator[Record]` registered under its
format name with `@register_format`. `galen ingest --format NAME --source PATH --out DIR` runs it
and writes Parquet shards; `galen ingest --list-formats` prints the registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from galen.flows.ingest.schema import Record
from galen.model.errors import GalenInputError

Reader = Callable[..., Iterator[Record]]


@dataclass
class Format:
    name: str
    read: Reader
    description: str
    module: str


FORMATS: dict[str, Format] = {}
# format name -> module defining it (imported on first use, so one broken optional reader never
# breaks the others)
FORMAT_MODULES: dict[str, str] = {
    "vqa-rad": "galen.flows.ingest.vqa_rad",
    "slake": "galen.flows.ingest.slake",
    "pathvqa": "galen.flows.ingest.pathvqa",
    "ofa-tsv": "galen.flows.ingest.ofa_tsv",
    "r2gen": "galen.flows.ingest.r2gen",
    "roco": "galen.flows.ingest.roco",
    "peir-gross": "galen.flows.ingest.peir_gross",
    "medicat": "galen.flows.ingest.medicat",
    "caption-csv": "galen.flows.ingest.captions",
    "webdataset": "galen.flows.ingest.captions",
    "medmnist": "galen.flows.ingest.medmnist",
    "mednli": "galen.flows.ingest.mednli",
    "meqsum": "galen.flows.ingest.meqsum",
    "dicom": "galen.flows.ingest.dicom",
}


def register_format(name: str, description: str) -> Callable[[Reader], Reader]:
    def wrap(fn: Reader) -> Reader:
        FORMATS[name] = Format(name, fn, description, fn.__module__)
        return fn
    return wrap


def get_format(name: str) -> Format:
    if name not in FORMAT_MODULES:
        raise GalenInputError(f"unknown dataset format {name!r}; known formats: {', '.join(sorted(FORMAT_MODULES))} "
                              "(`galen ingest --list-formats` describes them)")
    if name not in FORMATS:
        importlib.import_module(FORMAT_MODULES[name])
    return FORMATS[name]


def all_formats() -> list[Format]:
    return [get_format(n) for n in sorted(FORMAT_MODULES)]


INGEST_JSON = "ingest.json"  # the counts of an ingested folder, and the mark that `galen ingest` wrote it
INGEST_FILES = (INGEST_JSON, "part-*.parquet")  # everything `ingest()` writes into its folder


def ingest(fmt: str, source: str | Path, out_dir: str | Path, rows_per_shard: int = 2048, **options) -> dict:
    """Run one adapter and write its records as Parquet shards and `ingest.json` (the returned counts
    per task/split). The folder is written whole (`galen.flows.outputs.replacing_output`): a used one
    is replaced, never added to, and one holding anything else is refused."""
    import json
    from collections import Counter

    from galen.flows.ingest.schema import ShardWriter
    from galen.flows.outputs import replacing_output

    source = Path(source)
    if not source.exists():
        raise GalenInputError(f"source {source} does not exist; point --source at the dataset's folder or file")
    reader = get_format(fmt).read
    counts: Counter = Counter()
    problems = 0
    with replacing_output(out_dir, command="galen ingest", inputs=[source], owned=INGEST_FILES) as tmp:
        with ShardWriter(tmp, rows_per_shard) as writer:
            for record in reader(source, **options):
                writer.write(record)
                counts[f"{record.task}/{record.split}"] += 1
                problems += record.problem is not None
        result = {"format": fmt, "records": sum(counts.values()), "with_problems": problems,
                  "by_task_split": dict(counts)}
        (tmp / INGEST_JSON).write_text(json.dumps(result, indent=2) + "\n")
    return result
