"""Generic image-caption formats (`caption-csv`, `webdataset`) and the helpers every captioning adapter shares.

The helpers live here so that R2Gen, ROCO, PEIR Gross, MedICat and the generic formats read images and
caption files the same careful way: an image path that would leave its root (`../`, an absolute path, a
symlink pointing out) becomes a record problem naming the field and is never opened (paths.py, shared
with every adapter), a caption file that is not valid UTF-8/CSV is one clear `GalenInputError`, and a
record with an empty or non-text caption (null, a number, a list, a lone surrogate: schema.py's
policy) is still written with a problem so validation can quarantine it.

WebDataset decision: every shard is checked (headers walked, end-of-archive marker required) before
any sample is yielded, so a truncated or corrupt shard fails the whole ingest with an error naming the
shard instead of silently writing a partial dataset. Python's `tarfile` alone treats a shard cut at a
header as a clean end of archive, hence the explicit end-marker check. Memory stays bounded on any
shard: a member whose declared size is over params.yaml `ingest.limits.max_member_bytes` is never read
(its sample becomes a record whose problem says so), only the members a sample uses (image, .txt,
.json) are read, and those by their declared size, counted.
"""

from __future__ import annotations

import csv
import json
import posixpath
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from galen.flows.ingest import register_format
from galen.flows.ingest.limits import IngestLimits, resolve
from galen.flows.ingest.paths import path_problem, read_inside
from galen.flows.ingest.schema import SPLITS, Record, split_by_hash, text_value
from galen.model.errors import GalenInputError

LICENSE_UNSPECIFIED = "unspecified: see the source dataset's own terms (pass license=... to record them)"
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WDS_READ_EXTS = frozenset((*WDS_IMAGE_EXTS, "txt", "json"))  # the members a sample uses; others are only listed
WDS_LISTED_MEMBERS = 64  # meta["members"] names at most this many members of one sample (then a count)
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_BLOCK = 512


# ---------------------------------------------------------------- shared helpers (all captioning adapters)

def check_options(fmt: str, options: dict[str, Any], allowed: Iterable[str]) -> None:
    """Reject unknown options: a typo (`all_view=true`) must not silently fall back to a default."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise GalenInputError(f"format {fmt!r} has no option(s) {unknown}; its options are {sorted(allowed)}")


def normalize_split(value: Any) -> str | None:
    """`train|val|test` for the usual spellings (validation, dev, ...), None for anything else."""
    return SPLIT_ALIASES.get(str(value).strip().lower()) if value is not None else None


def split_option(fmt: str, value: Any) -> str | None:
    """A `split=` option checked up front (it would otherwise fail on the first record)."""
    if value is None:
        return None
    split = normalize_split(value)
    if split is None:
        raise GalenInputError(f"format {fmt!r}: split={value!r} is not one of {SPLITS}")
    return split


def caption_record(dataset: str, source_id: str, split: str, caption: Any, image: bytes | None, license: str,
                   problem: str | None = None, meta: dict[str, Any] | None = None,
                   field: str = "caption") -> Record:
    """A `task="caption"` record; an empty or non-text caption (named by `field`) adds a problem
    instead of dropping the row."""
    problems = [problem] if problem else []
    if caption is None:
        text: str | None = ""
        problems.append(f"empty caption ({field} is missing or null)")
    else:
        text, why = text_value(caption, field)
        if why:
            problems.append(why)
        elif not text or not text.strip():
            problems.append("empty caption")
    caption = (text or "").strip()
    return Record(task="caption", split=split, dataset=dataset, source_id=source_id, target=caption, image=image,
                  license=license, problem="; ".join(problems) or None, meta=meta or {})


def iter_csv(path: Path, delimiter: str = ",") -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of a CSV file, strictly parsed: bad quoting or encoding is one clear error."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            for row in reader:
                yield reader.line_num, row
    except (csv.Error, UnicodeDecodeError) as e:
        raise GalenInputError(f"{path} is not a valid UTF-8 CSV file ({e}); fix the file (captions holding the "
                              "delimiter must be quoted) or re-export it") from e


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without newline) of a UTF-8 text file such as a tab-separated caption list."""
    try:
        with open(path, encoding="utf-8-sig", newline=None) as f:
            for n, line in enumerate(f, start=1):
                yield n, line.rstrip("\n")
    except UnicodeDecodeError as e:
        raise GalenInputError(f"{path} is not UTF-8 text ({e}); re-download or re-encode it") from e


def column_index(header: list[str], names: Iterable[str]) -> int | None:
    """Index of the first of `names` among the header cells (case- and space-insensitive)."""
    cols = {c.strip().lower(): i for i, c in enumerate(header)}
    return next((cols[n] for n in names if n in cols), None)


def single_file(source: Path, suffixes: tuple[str, ...], what: str, preferred: Iterable[str] = ()) -> Path:
    """`source` itself, or the one file with one of `suffixes` in the folder `source` (else an error)."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise GalenInputError(f"{source} does not exist; point --source at the {what} or its folder")
    for name in preferred:
        if (source / name).is_file():
            return source / name
    found = sorted(p for p in source.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise GalenInputError(f"{source} must hold exactly one {what} ({'/'.join(suffixes)}), found {listed}; "
                              "point --source at the file itself")
    return found[0]


# ---------------------------------------------------------------- caption-csv

def _cell(row: list[str], index: int | None) -> str:
    return row[index].strip() if index is not None and index < len(row) else ""


@register_format("caption-csv", "generic image-caption CSV: filepath|image,caption[,split,id,...] "
                 "(paths relative to the CSV)")
def read_caption_csv(source: Path, **options: Any) -> Iterator[Record]:
    """Rows of `filepath,caption` (or `image,caption`); extra columns go to meta.

    Captions of the same image share a split (hashed on the path) so no image leaks from train to test.
    `source_id` is the `id` column when present, else the path (`path#N` for its N-th repeat).
    """
    check_options("caption-csv", options, {"dataset", "license"})
    dataset = str(options.get("dataset") or "caption-csv")
    license = str(options.get("license") or LICENSE_UNSPECIFIED)
    path = single_file(Path(source), (".csv",), "caption CSV")
    root = path.parent
    rows = iter_csv(path)
    first = next(rows, None)
    if first is None:
        raise GalenInputError(f"{path} is empty; a caption CSV needs a header row filepath,caption")
    header = first[1]
    path_col = column_index(header, ("filepath", "image"))
    caption_col = column_index(header, ("caption",))
    if path_col is None or caption_col is None:
        raise GalenInputError(f"{path} has columns {header}; a caption CSV needs filepath (or image) and caption")
    split_col = column_index(header, ("split",))
    id_col = column_index(header, ("id",))
    known = {path_col, caption_col, split_col, id_col}
    seen: Counter[str] = Counter()
    for line, row in rows:
        if not any(cell.strip() for cell in row):
            continue  # blank line
        rel = _cell(row, path_col)
        problems = []
        if len(row) != len(header):
            problems.append(f"line {line} has {len(row)} fields, header has {len(header)} "
                            "(quote captions that contain commas)")
        sid = _cell(row, id_col)
        if not sid and rel:
            sid = rel if not seen[rel] else f"{rel}#{seen[rel]}"
            seen[rel] += 1
        sid = sid or f"{path.name}:{line}"
        raw_split = _cell(row, split_col)
        split = normalize_split(raw_split) if raw_split else None
        if raw_split and split is None:
            problems.append(f"unknown split {raw_split!r}")
        image = None
        if rel:
            image, problem = read_inside(root, rel, header[path_col].strip())
            if problem:
                problems.append(problem)
        else:
            problems.append("no image path")
        meta = {"image_path": rel, "csv": path.name, "line": line}
        meta.update({header[i].strip(): row[i] for i in range(min(len(row), len(header))) if i not in known})
        yield caption_record(dataset, sid, split or split_by_hash(rel or sid), _cell(row, caption_col), image, license,
                             "; ".join(problems) or None, meta)


# ---------------------------------------------------------------- webdataset

def _shards(source: Path) -> list[Path]:
    """One shard, or the shards of a folder in name order (shard-000000.tar, shard-000001.tar, ...)."""
    if source.is_file():
        return [source]
    shards = sorted(p for p in source.iterdir() if p.is_file() and p.name.lower().endswith(SHARD_SUFFIXES))
    if not shards:
        raise GalenInputError(f"{source} holds no tar shards ({', '.join(SHARD_SUFFIXES)}); "
                              "point --source at a WebDataset shard or its folder")
    return shards


def _check_shard(shard: Path) -> None:
    """Walk every header and require the end-of-archive marker; raise naming the shard if it is damaged."""
    try:
        with tarfile.open(shard, "r:*") as tar:
            while tar.next() is not None:
                tar.members.clear()  # only the headers matter here; keep memory flat
            tar.fileobj.seek(tar.offset)
            marker = tar.fileobj.read(_BLOCK)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise GalenInputError(f"WebDataset shard {shard} is truncated or corrupt ({e}); re-download or rebuild "
                              "it (no sample was ingested)") from e
    if marker != b"\0" * _BLOCK:
        raise GalenInputError(f"WebDataset shard {shard} is truncated or corrupt (no end-of-archive marker after "
                              f"byte {tar.offset}); re-download or rebuild it (no sample was ingested)")


def _key_ext(name: str) -> tuple[str, str]:
    """WebDataset grouping: the key is the path up to the first dot of the file name, the rest the extension."""
    name = posixpath.normpath(name)
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def _sample_record(key: str, files: dict[str, bytes], problems: list[str], shard: Path, dataset: str, license: str,
                   split: str | None, exts: Iterable[str] | None = None) -> Record:
    image_ext = next((e for e in WDS_IMAGE_EXTS if e in files), None)
    problems = list(problems)
    if image_ext is None:
        problems.append(f"no image member ({'/'.join('.' + e for e in WDS_IMAGE_EXTS)})")
    caption: str | None = None
    if "txt" in files:
        try:
            caption = files["txt"].decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"{key}.txt is not UTF-8")
    else:
        problems.append(f"no caption member {key}.txt")
    members = sorted(f"{key}.{e}" for e in (files if exts is None else exts))
    meta: dict[str, Any] = {"shard": shard.name, "members": members[:WDS_LISTED_MEMBERS]}
    if len(members) > WDS_LISTED_MEMBERS:
        meta["members_not_listed"] = len(members) - WDS_LISTED_MEMBERS
    if "json" in files:
        try:
            meta["json"] = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"{key}.json is not valid JSON ({e})")
    return caption_record(dataset, key, split or split_by_hash(key), caption,
                          files.get(image_ext) if image_ext else None, license, "; ".join(problems) or None, meta)


def _read_shard(shard: Path, dataset: str, license: str, split: str | None,
                limits: IngestLimits | None = None) -> Iterator[Record]:
    """Samples of one shard, read member by member into memory (nothing is ever extracted to disk)."""
    limits = resolve(limits)
    key: str | None = None
    files: dict[str, bytes] = {}
    exts: dict[str, None] = {}  # the extensions of this sample's members, in order (a set that keeps it)
    problems: list[str] = []
    duplicates = 0
    try:
        with tarfile.open(shard, "r:*") as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # keep memory flat on large shards
                if member.isdir():
                    continue
                reason = path_problem(member.name, "tar member name")
                if reason is None and not member.isfile():
                    reason = f"member {member.name!r} is a link or special file; not followed"
                if reason:
                    sid = f"{shard.name}:{member.name}"
                    yield Record(task="caption", split=split or split_by_hash(sid), dataset=dataset, source_id=sid,
                                 license=license, problem=f"unsafe archive member ({reason})",
                                 meta={"shard": shard.name, "member": member.name})
                    continue
                member_key, ext = _key_ext(member.name)
                if member_key != key:
                    if key is not None:
                        yield _sample_record(key, files, _with_duplicates(problems, duplicates), shard, dataset,
                                             license, split, exts)
                    key, files, exts, problems, duplicates = member_key, {}, {}, [], 0
                if ext in exts:
                    duplicates += 1
                    if duplicates == 1:
                        problems.append(f"duplicate member {member.name}")
                    continue
                exts[ext] = None
                if ext not in WDS_READ_EXTS:
                    continue  # listed in meta, never read
                if member.size > limits.max_member_bytes:  # the declared size, before a byte is read
                    problems.append(limits.refusal(f"member {member.name} of {shard} declares a size that",
                                                   member.size, "max_member_bytes") + "; not read")
                    continue
                stream = tar.extractfile(member)  # a regular file: never None
                data = stream.read(member.size + 1)  # type: ignore[union-attr]  # counted: at most declared + 1
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} has {len(data)} of {member.size} bytes")
                files[ext] = data
            if key is not None:
                yield _sample_record(key, files, _with_duplicates(problems, duplicates), shard, dataset, license,
                                     split, exts)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise GalenInputError(f"WebDataset shard {shard} became unreadable while reading ({e}); "
                              "re-download or rebuild it") from e


def _with_duplicates(problems: list[str], duplicates: int) -> list[str]:
    """The problems of a sample, the duplicate members counted in one reason (not one per member)."""
    if duplicates <= 1:
        return problems
    return [f"{p} (and {duplicates - 1} more duplicates)" if p.startswith("duplicate member") else p
            for p in problems]


@register_format("webdataset", "WebDataset tar shards of key.jpg|key.png + key.txt caption [+ key.json]")
def read_webdataset(source: Path, **options: Any) -> Iterator[Record]:
    """Caption samples of `*.tar` shards; `split=` for all of them, else a hash of the sample key."""
    check_options("webdataset", options, {"dataset", "license", "split", "limits"})
    dataset = str(options.get("dataset") or "webdataset")
    license = str(options.get("license") or LICENSE_UNSPECIFIED)
    split = split_option("webdataset", options.get("split"))
    limits = resolve(options.get("limits"))
    shards = _shards(Path(source))
    for shard in shards:  # all shards checked first: a damaged one fails before anything is written
        _check_shard(shard)
    for shard in shards:
        yield from _read_shard(shard, dataset, license, split, limits)
