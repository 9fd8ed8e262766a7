"""How big one piece of a dataset may be, checked before it is allocated (params.yaml `ingest.limits`).

A dataset is hostile input: a 2 MB `.tar.gz` can hold a 2 GiB member, a 3 MB `.npz` can declare a
3 GiB array, a 137 KB deflated DICOM can inflate to 2.9 GB, a DICOM header can claim 10^9 frames.
Every adapter that decompresses or allocates checks the *declared* size against these limits first
and counts the bytes it actually reads (a gzip or deflate stream's declared size can lie), so the
memory of an ingest stays bounded whatever the input says:

  max_member_bytes   one decompressed archive member: `galen download` extraction (tar, zip) and a
                     WebDataset shard's member (held in memory as one sample's bytes)
  max_members        members of one archive to extract (the list is held before anything is written)
  max_array_bytes    one array of a MedMNIST `.npz` as its header declares it (shape x dtype); images
                     are streamed row by row, so memory is one chunk of rows, not this
  max_dicom_bytes    one DICOM file in memory: the file, the inflated dataset of a deflated transfer
                     syntax, and the pixel data its header declares (Rows x Columns x SamplesPerPixel x
                     NumberOfFrames x BitsAllocated / 8); pydicom holds a file's pixel data whole
  max_image_pixels   width x height of one image or frame (a MedMNIST image, a DICOM frame)
  max_frames         NumberOfFrames of one DICOM file

Over a limit, a whole unusable file is a `GalenInputError` naming the file, the declared size, the limit
and the params key to raise; one member or file of many (a WebDataset sample, one DICOM file of a folder)
is a record with that reason as its problem, which validation quarantines.

Where the limits come from: the limits made active with `use_limits(...)` (what `galen ingest --params
FILE` does), else `ingest.limits` of `./params.yaml`, else the defaults below (the same numbers as the
project's params.yaml); an adapter's `limits=` option (a mapping, e.g. in a dataset's `options:` in
params.yaml, for the dicom, medmnist and webdataset formats) overrides the keys it names.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from galen.model.errors import GalenInputError

PARAMS_KEY = "params.yaml ingest.limits"
MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class IngestLimits:
    max_member_bytes: int = 256 * MiB
    max_members: int = 200_000
    max_array_bytes: int = 16 * GiB
    max_dicom_bytes: int = 2 * GiB
    max_image_pixels: int = 40_000_000
    max_frames: int = 10_000

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GalenInputError(f"{PARAMS_KEY}.{f.name} must be a positive whole number, not {value!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, where: str = PARAMS_KEY) -> IngestLimits:
        """Limits from a mapping (params.yaml `ingest.limits`); unset keys keep their defaults."""
        return cls().updated(values, where)

    def updated(self, values: Mapping[str, Any] | None, where: str = PARAMS_KEY) -> IngestLimits:
        """These limits with the keys of `values` replaced (unknown keys and non-numbers are errors)."""
        if values is None:
            return self
        if not isinstance(values, Mapping):
            raise GalenInputError(f"{where} must be a mapping of limits, not {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise GalenInputError(f"{where} has unknown keys {unknown}; the limits are {sorted(known)}")
        return dataclasses.replace(self, **{k: _number(v, f"{where}.{k}") for k, v in values.items()})

    def refusal(self, what: str, size: int | str, key: str, unit: str = "bytes") -> str:
        """`<what> is <size> <unit>, over the limit of <limit> <unit> (params.yaml ingest.limits.<key>; ...)`;
        `size` as a string is said as given ("more than 1,048,576 bytes")."""
        limit = getattr(self, key)
        said = size if isinstance(size, str) else f"{size:,} {unit}"
        return (f"{what} is {said}, over the limit of {limit:,} {unit} ({PARAMS_KEY}.{key}; "
                "raise it there if this input is genuine)")


def _number(value: Any, where: str) -> int:
    """An int from YAML: 268435456, 2.5e8 or a float of a whole number; anything else is an error."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise GalenInputError(f"{where} must be a positive whole number, not {value!r}")
    return value


def limits_from_params(path: str | Path = "params.yaml") -> IngestLimits:
    """`ingest.limits` of a params file; the defaults when the file or the section is absent."""
    from galen.flows.params import load_params

    if not Path(path).is_file():
        return IngestLimits()
    ingest = load_params(path).get("ingest")
    if ingest is None:
        return IngestLimits()
    if not isinstance(ingest, dict):
        raise GalenInputError(f"{path}: `ingest:` must be a section (a mapping)")
    return IngestLimits.from_mapping(ingest.get("limits"), f"{path} ingest.limits")


_ACTIVE: ContextVar[IngestLimits | None] = ContextVar("galen_ingest_limits", default=None)


@contextlib.contextmanager
def use_limits(limits: IngestLimits | Mapping[str, Any] | str | Path) -> Iterator[IngestLimits]:
    """Make `limits` (or those of a params file) the ones every adapter uses inside the block."""
    if isinstance(limits, (str, Path)):
        limits = limits_from_params(limits)
    elif not isinstance(limits, IngestLimits):
        limits = IngestLimits.from_mapping(limits)
    token = _ACTIVE.set(limits)
    try:
        yield limits
    finally:
        _ACTIVE.reset(token)


def resolve(limits: IngestLimits | Mapping[str, Any] | None = None) -> IngestLimits:
    """The limits an adapter applies: its `limits=` option (a mapping overrides only the keys it
    names), over the active ones, else over ./params.yaml's."""
    if isinstance(limits, IngestLimits):
        return limits
    active = _ACTIVE.get()
    base = active if active is not None else limits_from_params()
    return base.updated(limits, "the limits= option")
