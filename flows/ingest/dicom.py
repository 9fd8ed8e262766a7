"""A folder of DICOM files (searched recursively, with or without `.dcm`) as captioned or labelled images.

Pixels become display-ready uint8 PNGs the way a viewer shows them: Modality LUT (rescale
slope/intercept to e.g. Hounsfield units), then the VOI window (WindowCenter/Width, the first one
when several are given; else a VOI LUT Sequence; else the frame's min-max), MONOCHROME1 inverted so
that high values are bright, colour (RGB, YBR converted by pydicom, PALETTE COLOR through its LUT)
kept as RGB. Multi-frame files give their middle frame (`frames="middle"`) or one record per frame
(`frames="all"`, source_id `<path>#frame=<i>`).

Targets: `task="caption"` takes the text of `caption_from` (SeriesDescription by default);
`task="classification"` takes `label` from a `labels.csv` (`file,label`; `file` relative to the
folder or a unique file name) inside the folder or beside it, or given with `labels=`.

Privacy: `meta` holds only an allow-list of technical tags (no PatientName/ID/BirthDate or any other
identifier). The split is a hash of StudyInstanceUID, so every image of one study lands in one split;
the UID itself is not stored. `source_id` is the file's path relative to the folder (so a problem
record points at the file): de-identify folder names before ingest if they carry patient names.

A file that cannot become an image is a record with `problem`: a `.dcm` file that is not DICOM, a
DICOM without pixel data, or a compressed transfer syntax whose decoder is not installed (the
message names the transfer syntax and the package to install). Files without a DICOM preamble and
without a `.dcm`/`.dicom` extension (READMEs, thumbnails) are not DICOM data: skipped and counted in
an info log, as is a DICOMDIR index. A file of the folder that is a symlink resolving outside it is a
record with a problem and is never opened (paths.py).

Bounded memory (params.yaml `ingest.limits`, limits.py), checked before any pixel is allocated: the
file's size and, for the Deflated Explicit VR Little Endian transfer syntax, the size its dataset
inflates to (inflated in a stream and counted, since pydicom inflates a whole file in memory) stay
within `max_dicom_bytes`; the header, read with `stop_before_pixels`, must declare at most
`max_frames` frames of at most `max_image_pixels` pixels, and pixel data (Rows x Columns x
SamplesPerPixel x NumberOfFrames x BitsAllocated / 8) within `max_dicom_bytes`. A file over a limit
is one record whose problem names the file, its declared size, the limit and the key to raise.
"""

from __future__ import annotations

import csv
import logging
import math
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from galen.flows.ingest import register_format
from galen.flows.ingest.limits import IngestLimits, resolve
from galen.flows.ingest.paths import resolve_inside
from galen.flows.ingest.schema import Record, encode_png, split_by_hash
from galen.model.errors import GalenInputError
from galen.model.vision import decode_problem, display_pixels, transfer_syntax  # the one DICOM decoder

log = logging.getLogger(__name__)

DEFAULT_LICENSE = "unknown — set license= for your data"
CAPTION_FIELDS = ("StudyDescription", "SeriesDescription", "BodyPartExamined")
DICOM_SUFFIXES = (".dcm", ".dicom")
LABELS_FILE = "labels.csv"
# technical tags only: nothing here identifies a patient, an institution or a date
META_TAGS = ("Modality", "BodyPartExamined", "PhotometricInterpretation", "Rows", "Columns", "SamplesPerPixel",
             "BitsAllocated", "BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
             "BurnedInAnnotation")  # "YES" flags text burned into the pixels (may show identifiers): filter on it
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
DEFLATED_TRANSFER_SYNTAX = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
INFLATE_CHUNK = 1 << 20

def _pydicom() -> Any:
    """pydicom with its v3 `pydicom.pixels` API (frame-wise decoding, LUT functions)."""
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401 - pydicom >= 3.0
    except ImportError as e:
        raise GalenInputError("the dicom format needs pydicom 3 (pydicom.pixels); "
                              "run `pip install 'pydicom>=3'`") from e
    return pydicom


# --- pixels -------------------------------------------------------------------------------------

def _labels(source: Path, labels: str | Path | None) -> dict[str, str]:
    """`file -> label` from labels.csv (given, inside the folder, or beside it)."""
    candidates = [Path(labels)] if labels is not None else [source / LABELS_FILE, source.parent / LABELS_FILE]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise GalenInputError(f"task=classification needs a {LABELS_FILE} (columns file,label); none at "
                              f"{', '.join(str(p) for p in candidates)}; write one or pass labels=PATH")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        if "file" not in fields or "label" not in fields:
            raise GalenInputError(f"{path} must have columns file,label (has {fields})")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    table = {row["file"].replace("\\", "/"): row["label"] for row in rows if row.get("file")}
    if not table:
        raise GalenInputError(f"{path} has no labelled files")
    return table


def _lookup(table: dict[str, str], rel: str) -> str | None:
    if rel in table:
        return table[rel]
    name = rel.rsplit("/", 1)[-1]
    matches = [v for k, v in table.items() if k.rsplit("/", 1)[-1] == name]
    return matches[0] if len(matches) == 1 else None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _inflated_problem(path: Path, rel: str, has_preamble: bool, limits: IngestLimits) -> str | None:
    """For a deflated transfer syntax: why its dataset is too big to inflate, found by inflating it in
    a stream and counting (pydicom would inflate it whole in memory); None when it fits or is not
    deflated (a file pydicom cannot parse is left to pydicom to say why)."""
    from pydicom import filereader

    limit = limits.max_dicom_bytes
    with path.open("rb") as fp:
        try:  # the steps of pydicom's read_partial up to the deflated data
            filereader.read_preamble(fp, not has_preamble)
            meta = filereader._read_file_meta_info(fp)
            if str(meta.get("TransferSyntaxUID") or "") != DEFLATED_TRANSFER_SYNTAX:
                return None
            filereader._read_command_set_elements(fp)
        except Exception:  # noqa: BLE001 - not parseable here: the real read reports it
            return None
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        try:
            while (chunk := fp.read(INFLATE_CHUNK)) and not inflater.eof:
                total += len(inflater.decompress(chunk, INFLATE_CHUNK))
                while inflater.unconsumed_tail and total <= limit:
                    total += len(inflater.decompress(inflater.unconsumed_tail, INFLATE_CHUNK))
                if total > limit:
                    return limits.refusal(f"{rel}: its deflated DICOM dataset inflates to a size that",
                                          f"more than {limit:,} bytes (counted while inflating)",
                                          "max_dicom_bytes") + "; not read"
        except zlib.error:
            return None  # corrupt deflate data: pydicom's read says so
    return None


def _header_problem(rel: str, ds: Any, limits: IngestLimits) -> str | None:
    """Why the pixel data a header declares is too big to decode (frames, pixels per frame, bytes)."""
    frames = _int(ds.get("NumberOfFrames") or 1)
    if frames is not None and frames > limits.max_frames:
        return limits.refusal(f"{rel}: NumberOfFrames", frames, "max_frames", "frames") + "; not decoded"
    rows, columns = _int(ds.get("Rows")), _int(ds.get("Columns"))
    if not rows or not columns or rows < 0 or columns < 0:
        return None  # no image (or a broken header): the decoder says why
    if rows * columns > limits.max_image_pixels:
        return limits.refusal(f"{rel}: each frame ({columns}x{rows})", rows * columns, "max_image_pixels",
                              "pixels") + "; not decoded"
    samples = max(_int(ds.get("SamplesPerPixel")) or 1, 1)
    bits = max(_int(ds.get("BitsAllocated")) or 8, 1)
    declared = math.ceil(rows * columns * samples * max(frames or 1, 1) * bits / 8)
    if declared > limits.max_dicom_bytes:
        return limits.refusal(f"{rel}: the pixel data its header declares (Rows x Columns x SamplesPerPixel x "
                              f"NumberOfFrames x BitsAllocated/8 = {rows}x{columns}x{samples}x{frames}x{bits}/8)",
                              declared, "max_dicom_bytes") + "; not decoded"
    return None


def _open(path: Path, pydicom: Any, rel: str | None = None, limits: IngestLimits | None = None
          ) -> tuple[Any | None, str | None]:
    """(dataset, None), (None, problem), or (None, None) for a file that is not DICOM data at all.

    The limits are checked before pydicom reads the file: its size, the inflated size of a deflated
    one, then the header (read without the pixel data)."""
    limits = resolve(limits)
    rel = rel or path.name
    has_preamble = pydicom.misc.is_dicom(path)
    if not has_preamble and path.suffix.lower() not in DICOM_SUFFIXES:
        return None, None
    size = path.stat().st_size
    if size > limits.max_dicom_bytes:
        return None, limits.refusal(f"{rel}: the file", size, "max_dicom_bytes") + "; not read"
    too_big = _inflated_problem(path, rel, has_preamble, limits)
    if too_big:
        return None, too_big
    try:
        header = pydicom.dcmread(path, force=not has_preamble, stop_before_pixels=True)
        too_big = _header_problem(rel, header, limits)
        if too_big:
            return None, too_big
        ds = pydicom.dcmread(path, force=not has_preamble)
    except Exception as e:  # noqa: BLE001 - any parse failure is this file's problem, not the run's
        return None, f"not a readable DICOM file: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    if not has_preamble and "PixelData" not in ds and "SOPClassUID" not in ds:
        return None, "not a DICOM file (no DICM preamble and no DICOM elements)"
    return ds, None


def _is_directory_index(path: Path, ds: Any) -> bool:
    meta = getattr(ds, "file_meta", None)
    sop = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    return path.name.upper() == "DICOMDIR" or sop == MEDIA_STORAGE_DIRECTORY


def _plain(value: Any) -> int | float | str:
    """pydicom's IS/DS/MultiValue as plain JSON values for `meta`."""
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def _meta(ds: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in META_TAGS:
        value = ds.get(tag)
        if value is not None and value != "":
            out[tag] = _plain(value)
    ts = transfer_syntax(ds)
    if ts is not None:
        out["TransferSyntax"] = ts.name
    return out


@register_format("dicom", "DICOM folder (recursive): caption from a description tag, or labels.csv classification")
def read(source: Path, task: str = "caption", caption_from: str = "SeriesDescription", frames: str = "middle",
         labels: str | Path | None = None, license: str = DEFAULT_LICENSE,
         limits: IngestLimits | Mapping[str, Any] | None = None, **_: object) -> Iterator[Record]:
    pydicom = _pydicom()
    checked = resolve(limits)
    from pydicom.pixels import pixel_array

    source = Path(source)
    if task not in ("caption", "classification"):
        raise GalenInputError(f"dicom task must be caption or classification, not {task!r}")
    if caption_from not in CAPTION_FIELDS:
        raise GalenInputError(f"caption_from must be one of {CAPTION_FIELDS}, not {caption_from!r}")
    if frames not in ("middle", "all"):
        raise GalenInputError(f"frames must be 'middle' or 'all', not {frames!r}")
    root = source if source.is_dir() else source.parent
    table = _labels(root, labels) if task == "classification" else {}
    candidates = sorted(set(table.values())) if table else None
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    ignored = 0
    for path in files:
        rel = path.relative_to(root).as_posix()
        if path.name == LABELS_FILE or path.name.startswith("."):
            ignored += 1
            continue
        if source.is_dir():  # a symlink in the folder pointing out of it is refused, never read
            real, refused = resolve_inside(root, rel, "file")
            if real is None:
                yield Record(split=split_by_hash(rel), source_id=rel, problem=refused, task=task, dataset="dicom",
                             license=license, candidates=candidates)
                continue
        ds, problem = _open(path, pydicom, rel, checked)
        if ds is None and problem is None:
            ignored += 1
            continue
        if ds is not None and _is_directory_index(path, ds):
            ignored += 1
            continue
        base = dict(task=task, dataset="dicom", license=license, candidates=candidates)
        if ds is None:
            yield Record(split=split_by_hash(rel), source_id=rel, problem=problem, **base)
            continue
        split_key = str(ds.get("StudyInstanceUID") or ds.get("SeriesInstanceUID") or rel)
        split = split_by_hash(split_key)
        meta = _meta(ds)
        meta["split_key"] = ("study" if ds.get("StudyInstanceUID") else
                             "series" if ds.get("SeriesInstanceUID") else "file")
        target, problems = "", []
        if task == "caption":
            target = " ".join(str(ds.get(caption_from) or "").split())
            if not target:
                problems.append(f"no {caption_from} in this file; choose another caption_from "
                                f"({', '.join(CAPTION_FIELDS)})")
        else:
            target = _lookup(table, rel) or ""
            if not target:
                problems.append(f"no label for {rel} in {LABELS_FILE}")
        if "PixelData" not in ds:
            kind = ds.get("Modality") or "unknown modality"
            yield Record(split=split, source_id=rel, target=target, meta=meta,
                         problem=f"DICOM file has no pixel data ({kind}; e.g. a report or plan)", **base)
            continue
        n_frames = _int(ds.get("NumberOfFrames") or 1)
        if n_frames is None or n_frames < 1:
            yield Record(split=split, source_id=rel, target=target, meta=meta,
                         problem=f"invalid NumberOfFrames {ds.get('NumberOfFrames')!r}", **base)
            continue
        indices = [n_frames // 2] if frames == "middle" else range(n_frames)  # n_frames <= max_frames (_open)
        for index in indices:
            source_id = f"{rel}#frame={index}" if frames == "all" and n_frames > 1 else rel
            try:
                frame = pixel_array(ds, index=index)
                pixels, mapping = display_pixels(frame, ds)
            except Exception as e:  # noqa: BLE001 - a file pydicom cannot decode is a problem record
                first = index == indices[0]
                yield Record(split=split, source_id=rel if first else source_id, target=target, meta=meta,
                             problem=decode_problem(ds, e), **base)
                if first:
                    break  # a missing decoder fails on every frame: one record for the file says it
                continue
            frame_meta = {**meta, **mapping, "frame": index, "frames": n_frames,
                          "original_shape": list(frame.shape), "original_dtype": str(frame.dtype)}
            yield Record(split=split, source_id=source_id, target=target, image=encode_png(pixels), meta=frame_meta,
                         problem="; ".join(problems) or None, **base)
    if ignored:
        log.info("dicom: ignored %d files under %s that are not DICOM images (no DICM preamble, no .dcm "
                 "extension, or a DICOMDIR index)", ignored, source)
    if ignored == len(files):
        raise GalenInputError(f"{source} holds no DICOM files ({len(files)} other files); point --source at a "
                              "folder of DICOM files (with a DICM preamble or a .dcm extension)")
