"""Hostile input, bounded memory: decompression and allocation bombs at the ingest edge.

Each bomb is built small on disk in tmp_path: a gzip of zeros whose member inflates past the limit, an
`.npz` whose header declares a huge array over tiny (truncated) data, a DICOM claiming 10^9 frames, a
deflated DICOM whose dataset inflates far beyond its file. The real adapters run with a low limit from
the test's params.yaml (`ingest.limits`), and the assertions are what a user gets: a whole unusable
file is a GalenInputError naming the file, the declared size, the limit and the params key, with no
shard written; one member or file of many is a record whose problem says the same.

The last tests run `galen ingest` in a subprocess whose address space is capped (RLIMIT_AS: its own
size after a warm-up ingest + HEADROOM) on bombs that declare or inflate to 1-3 GiB: before the limits,
each of these raised MemoryError (or worse); now each ends with Galen's error or a problem row. A
control ingest under the same cap shows the cap leaves room for real work.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import textwrap
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from galen.flows.ingest import ingest
from galen.flows.ingest.download import extract
from galen.flows.ingest.limits import IngestLimits, limits_from_params, use_limits
from galen.flows.ingest.schema import Record, read_records
from galen.model.errors import GalenInputError

MiB = 1 << 20
GiB = 1 << 30
LOW = {"max_member_bytes": MiB, "max_array_bytes": MiB, "max_dicom_bytes": MiB}  # the tests' limits
REPO = Path(__file__).resolve().parents[2]


def params_with(tmp_path: Path, **limits: int) -> Path:
    """A params.yaml whose `ingest.limits` holds `limits` (other keys keep their defaults)."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"ingest": {"limits": limits}}))
    return path


def run_ingest(tmp_path: Path, fmt: str, source: Path, limits: dict[str, int] | None = None,
               **options: Any) -> tuple[dict, list[Record], Path]:
    """(summary, records, out folder) of the real `ingest()` under the limits of a test params.yaml."""
    out = tmp_path / "out"
    with use_limits(params_with(tmp_path, **(LOW if limits is None else limits))):
        summary = ingest(fmt, source, out, **options)
    return summary, list(read_records(out)), out


def refused(message: str, size: str, limit: str, key: str) -> None:
    assert size in message and f"over the limit of {limit}" in message, message
    assert f"params.yaml ingest.limits.{key}" in message, message


def no_shards(out: Path) -> None:
    assert not list(out.glob("**/*.parquet")), sorted(out.rglob("*"))


# ------------------------------------------------------------------------------------------ builders

def deflate_zeros(prefix: bytes, zeros: int, suffix: bytes = b"", block: int = MiB) -> bytes:
    """Raw deflate of prefix + `zeros` zero bytes + suffix, built in time proportional to its output:
    after a full flush, deflating the same block again gives the same bytes, so they are repeated."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [c.compress(prefix), c.flush(zlib.Z_FULL_FLUSH)]
    count, rest = divmod(zeros, block)
    if count:
        zero = bytes(block)
        parts.append(c.compress(zero) + c.flush(zlib.Z_FULL_FLUSH))
        if count > 1:
            again = c.compress(zero) + c.flush(zlib.Z_FULL_FLUSH)
            assert c.compress(zero) + c.flush(zlib.Z_FULL_FLUSH) == again  # the repetition is exact
            parts.append(again * (count - 1))
    parts.append(c.compress(bytes(rest) + suffix) + c.flush())
    return b"".join(parts)


def tar_member(name: str, data: bytes | None = None, size: int | None = None) -> bytes:
    """A tar header (and, with `data`, its padded data) as bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(data) if data is not None else size or 0
    block = info.tobuf(tarfile.GNU_FORMAT)
    if data is not None:
        block += data + bytes(-len(data) % 512)
    return block


def gzip_tar_of_zeros(path: Path, member: str, zeros: int, tail: bytes = b"") -> Path:
    """A .tar.gz whose member `member` is `zeros` zero bytes (then `tail` members): a gzip bomb."""
    assert zeros % 512 == 0
    header, end = tar_member(member, size=zeros), tail + bytes(1024)
    crc = zlib.crc32(header)
    for _ in range(zeros // MiB):
        crc = zlib.crc32(bytes(MiB), crc)
    crc = zlib.crc32(end, zlib.crc32(bytes(zeros % MiB), crc))
    total = len(header) + zeros + len(end)
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + deflate_zeros(header, zeros, end)
                     + struct.pack("<II", crc, total & 0xFFFFFFFF))
    return path


def write_npz_declaring(path: Path, shape: tuple[int, ...], data: bytes = b"\x00" * 16) -> Path:
    """A MedMNIST-named .npz whose train_images header declares `shape` (uint8) over only `data`."""
    def npy(shape: tuple[int, ...], payload: bytes) -> bytes:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
        return buf.getvalue() + payload
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train_images.npy", npy(shape, data))
        zf.writestr("train_labels.npy", npy((shape[0], 1), data))
    return path


def dicom_dataset(rows: int = 2, columns: int = 2, frames: int | None = None, uid: str = "1.2.3.4",
                  transfer_syntax: str | None = None) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, uid
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = f"{uid}.1", f"{uid}.2", "OT"
    ds.SeriesDescription = "synthetic"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames is not None:
        ds.NumberOfFrames = frames
    return ds


def write_dicom(path: Path, ds: Any, pixels: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.PixelData = pixels
    ds.save_as(path, enforce_file_format=True)
    return path


def deflated_dicom_bomb(path: Path, zeros: int, rows: int = 2, columns: int = 2) -> Path:
    """A Deflated Explicit VR Little Endian DICOM whose header declares rows x columns pixels but whose
    PixelData, once inflated, is `zeros` zero bytes: the file stays ~zeros/1000 bytes."""
    from pydicom import filereader
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    write_dicom(path, dicom_dataset(rows, columns, transfer_syntax=DeflatedExplicitVRLittleEndian, uid="1.2.3.9"),
                bytes(rows * columns))
    raw = path.read_bytes()
    with io.BytesIO(raw) as fp:
        filereader.read_preamble(fp, False)
        filereader._read_file_meta_info(fp)
        start = fp.tell()
    body = zlib.decompress(raw[start:], -zlib.MAX_WBITS)
    pixel_tag = struct.pack("<HH", 0x7FE0, 0x0010)
    body = body[:body.index(pixel_tag)]  # the dataset up to its (small) PixelData, replaced below
    pixel_header = pixel_tag + b"OB\x00\x00" + struct.pack("<I", zeros)
    path.write_bytes(raw[:start] + deflate_zeros(body + pixel_header, zeros))
    return path


# ------------------------------------------------------------------------------------------ limits config

def test_project_params_hold_the_defaults_and_bad_limits_are_refused(tmp_path: Path) -> None:
    assert limits_from_params(REPO / "params.yaml") == IngestLimits()  # the documented numbers are the code's
    partial = limits_from_params(params_with(tmp_path, max_frames=50))
    assert partial.max_frames == 50 and partial.max_member_bytes == IngestLimits().max_member_bytes
    for bad, message in (({"max_frame": 5}, "unknown keys"), ({"max_frames": 0}, "positive whole number"),
                         ({"max_frames": "lots"}, "positive whole number"), ({"max_frames": True}, "positive")):
        with pytest.raises(GalenInputError, match=message):
            limits_from_params(params_with(tmp_path, **bad))


# ------------------------------------------------------------------------------------------ archives

def test_extract_refuses_a_gzip_member_inflating_past_the_limit_before_writing(tmp_path: Path) -> None:
    archive = gzip_tar_of_zeros(tmp_path / "bomb.tar.gz", "data/zeros.bin", 4 * MiB,
                                tail=tar_member("data/note.txt", b"written only if the archive is fine"))
    assert archive.stat().st_size < 64 * 1024  # 4 MiB inflated from a few KB
    dest = tmp_path / "raw"
    with pytest.raises(GalenInputError) as e:
        extract(archive, dest, IngestLimits(max_member_bytes=MiB))
    assert "bomb.tar.gz" in str(e.value) and "'data/zeros.bin'" in str(e.value)
    refused(str(e.value), "4,194,304 bytes", "1,048,576", "max_member_bytes")
    assert not [p for p in dest.rglob("*") if p.is_file()]  # checked before anything was written
    extract(archive, dest, IngestLimits(max_member_bytes=8 * MiB))  # raising the limit lets it through
    assert (dest / "data" / "zeros.bin").stat().st_size == 4 * MiB


def test_extract_counts_bytes_when_a_zip_member_lies_about_its_size(tmp_path: Path) -> None:
    """A zip member declaring 1,000 bytes whose deflate data holds 4 MiB: the declared size passes the
    check, reading stops at 1,000 bytes (never 4 MiB), the CRC fails, and the error is Galen's with the
    partial file removed. Too many members are refused before anything is written."""
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(4 * MiB))
    raw = bytearray(archive.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size: local, central
        at = raw.index(signature) + offset
        raw[at:at + 4] = struct.pack("<I", 1000)
    archive.write_bytes(bytes(raw))
    dest = tmp_path / "raw"
    with pytest.raises(GalenInputError, match="liar.zip.*zeros.bin.*corrupt"):
        extract(archive, dest, IngestLimits(max_member_bytes=MiB))
    assert not (dest / "zeros.bin").exists()
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(3):
            zf.writestr(f"f{i}.txt", b"x")
    with pytest.raises(GalenInputError) as e:
        extract(many, dest, IngestLimits(max_members=2))
    refused(str(e.value), "more than 2 members", "2", "max_members")
    assert not list(dest.rglob("*.txt"))


def test_webdataset_gzip_member_over_the_limit_is_one_problem_row(tmp_path: Path) -> None:
    shards = tmp_path / "wds"
    shards.mkdir()
    ok = tar_member("ok.txt", b"A fine caption.") + tar_member("ok.png", b"\x89PNG small")
    gzip_tar_of_zeros(shards / "shard-000000.tar.gz", "bomb.png", 4 * MiB,
                      tail=tar_member("bomb.txt", b"A bomb's caption.") + ok)
    summary, records, _ = run_ingest(tmp_path, "webdataset", shards, split="train")
    by_id = {r.source_id: r for r in records}
    assert summary["records"] == 2 and set(by_id) == {"bomb", "ok"}
    bomb = by_id["bomb"]
    assert bomb.image is None and bomb.target == "A bomb's caption."
    assert "member bomb.png of" in bomb.problem and "shard-000000.tar.gz" in bomb.problem
    refused(bomb.problem, "4,194,304 bytes", "1,048,576", "max_member_bytes")
    assert by_id["ok"].problem is None and by_id["ok"].image == b"\x89PNG small"


# ------------------------------------------------------------------------------------------ MedMNIST

@pytest.mark.parametrize("shape, data", [
    ((10**7, 28, 28), b"\x00" * 16),          # 7.8 GB declared over 16 bytes of data
    ((8192, 28, 28), bytes(8192 * 28 * 28)),  # 6.4 MB really there (deflated to a few KB): still over 1 MiB
])
def test_npz_array_declared_over_the_limit_is_refused_before_loading(tmp_path: Path, shape, data) -> None:
    npz = write_npz_declaring(tmp_path / "pathmnist.npz", shape, data)
    declared = f"{shape[0] * 28 * 28:,} bytes"
    with pytest.raises(GalenInputError) as e:
        run_ingest(tmp_path, "medmnist", npz)
    assert f"{npz}:train_images declares shape {shape} uint8" in str(e.value)
    refused(str(e.value), declared, "1,048,576", "max_array_bytes")
    no_shards(tmp_path / "out")


def test_npz_truncated_array_and_oversized_images_are_refused(tmp_path: Path) -> None:
    npz = write_npz_declaring(tmp_path / "pathmnist.npz", (1000, 28, 28))  # 784,000 bytes: under the limit
    with pytest.raises(GalenInputError, match=r"declares shape \(1000, 28, 28\) uint8 \(784,000 bytes\) but its "
                                              r"zip member holds only 16 bytes.*truncated"):
        run_ingest(tmp_path, "medmnist", npz)
    no_shards(tmp_path / "out")
    big = write_npz_declaring(tmp_path / "pathmnist_224.npz", (2, 224, 224), bytes(2 * 224 * 224))
    with pytest.raises(GalenInputError) as e:
        run_ingest(tmp_path, "medmnist", big, {"max_image_pixels": 10_000})
    refused(str(e.value), "50,176 pixels", "10,000", "max_image_pixels")


def test_npz_rows_are_streamed_in_chunks_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from galen.flows.ingest import medmnist

    monkeypatch.setattr(medmnist, "CHUNK_BYTES", 5000)  # 2 RGB 28x28 images a chunk: rows cross chunk edges
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28, 3), dtype=np.uint8)
    labels = np.arange(7).reshape(7, 1) % 9
    np.savez_compressed(tmp_path / "pathmnist.npz", train_images=images, train_labels=labels)
    _, records, _ = run_ingest(tmp_path, "medmnist", tmp_path / "pathmnist.npz")
    assert [r.meta["label"] for r in records] == [[int(v)] for v in labels[:, 0]]
    for record, image in zip(records, images):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(record.image))), image)


# ------------------------------------------------------------------------------------------ DICOM

def test_dicom_claiming_a_billion_frames_is_one_problem_row(tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    write_dicom(folder / "bomb.dcm", dicom_dataset(frames=10**9, uid="1.2.3.1"), bytes(4))
    write_dicom(folder / "fine.dcm", dicom_dataset(frames=2, uid="1.2.3.2"), bytes(8))
    summary, records, _ = run_ingest(tmp_path, "dicom", folder, frames="all")
    by_id = {r.source_id: r for r in records}
    assert set(by_id) == {"bomb.dcm", "fine.dcm#frame=0", "fine.dcm#frame=1"}
    bomb = by_id["bomb.dcm"]
    assert bomb.image is None and bomb.problem.startswith("bomb.dcm: NumberOfFrames")
    refused(bomb.problem, "1,000,000,000 frames", "10,000", "max_frames")
    assert all(by_id[f"fine.dcm#frame={i}"].problem is None for i in (0, 1))


def test_dicom_header_declaring_too_many_pixels_or_bytes_is_not_decoded(tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    write_dicom(folder / "wide.dcm", dicom_dataset(rows=2048, columns=1024, uid="1.2.3.3"), bytes(4))
    write_dicom(folder / "long.dcm", dicom_dataset(rows=256, columns=256, frames=64, uid="1.2.3.4"), bytes(4))
    _, records, _ = run_ingest(tmp_path, "dicom", folder, {**LOW, "max_image_pixels": MiB})
    by_id = {r.source_id: r for r in records}
    refused(by_id["wide.dcm"].problem, "2,097,152 pixels", "1,048,576", "max_image_pixels")
    assert "each frame (1024x2048)" in by_id["wide.dcm"].problem
    refused(by_id["long.dcm"].problem, "4,194,304 bytes", "1,048,576", "max_dicom_bytes")
    assert "256x256x1x64x8/8" in by_id["long.dcm"].problem


def test_deflated_dicom_is_counted_while_inflating(tmp_path: Path) -> None:
    """The header declares 2x2 pixels; the deflated dataset inflates to 4 MiB of PixelData."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    folder = tmp_path / "dicom"
    bomb = deflated_dicom_bomb(folder / "bomb.dcm", 4 * MiB)
    assert bomb.stat().st_size < 64 * 1024
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    write_dicom(folder / "fine.dcm", dicom_dataset(8, 8, uid="1.2.3.5", transfer_syntax=DeflatedExplicitVRLittleEndian),
                pixels.tobytes())
    _, records, _ = run_ingest(tmp_path, "dicom", folder)
    by_id = {r.source_id: r for r in records}
    assert by_id["bomb.dcm"].image is None and by_id["bomb.dcm"].problem.startswith("bomb.dcm: its deflated")
    refused(by_id["bomb.dcm"].problem, "more than 1,048,576 bytes (counted while inflating)", "1,048,576",
            "max_dicom_bytes")
    fine = by_id["fine.dcm"]  # a genuine deflated file still decodes
    assert fine.problem is None and fine.meta["TransferSyntax"] == "Deflated Explicit VR Little Endian"
    from PIL import Image

    assert np.asarray(Image.open(io.BytesIO(fine.image))).shape == (8, 8)


# ------------------------------------------------------------------------------------------ peak memory

HEADROOM = 512 * MiB  # above the child's own size once warmed up; every bomb below needs more than this
CHILD = textwrap.dedent('''
    import contextlib, io, json, resource, sys

    spec = json.loads(sys.argv[1])
    from galen.flows.cli import main
    import galen.flows.ingest.captions, galen.flows.ingest.dicom, galen.flows.ingest.medmnist  # noqa: F401

    def run(argv):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                return {"rc": main(argv), "stderr": err.getvalue()}
        except BaseException as e:  # MemoryError is what these bombs raised before the limits
            return {"rc": None, "exception": type(e).__name__, "stderr": err.getvalue()}

    warm = {name: run(argv) for name, argv in spec["controls"].items()}  # imports, thread pools, codecs
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    cap = size + spec["headroom"]
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    results = {name: run(argv) for name, argv in spec["bombs"].items()}
    controls = {name: run(argv + ["--out", argv[-1] + "-capped"]) for name, argv in spec["controls"].items()}
    with open(spec["report"], "w") as f:
        json.dump({"warm": warm, "size": size, "cap": cap, "bombs": results, "controls": controls}, f)
''')


@pytest.fixture(scope="module")
def capped_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One `galen ingest` child, address space capped, run on every bomb (and on small controls)."""
    if sys.platform != "linux":
        pytest.skip("RLIMIT_AS and /proc/self/status are Linux's")
    root = tmp_path_factory.mktemp("capped")
    params_with(root, max_member_bytes=64 * MiB, max_array_bytes=64 * MiB, max_dicom_bytes=64 * MiB)

    wds = root / "wds"  # a plain tar whose 1 GiB member is a hole on disk: instant to skip, 1 GiB to read
    wds.mkdir()
    with (wds / "shard-000000.tar").open("wb") as f:
        f.write(tar_member("big.png", size=GiB))
        f.seek(GiB, os.SEEK_CUR)
        f.write(tar_member("big.txt", b"A 1 GiB image.") + tar_member("ok.png", b"\x89PNG")
                + tar_member("ok.txt", b"fine") + bytes(1024))
    (root / "npz").mkdir()
    npz = write_npz_declaring(root / "npz" / "pathmnist.npz", (4 * 10**6, 28, 28))  # 3.1 GB declared, 16 B there
    frames = write_dicom(root / "frames" / "bomb.dcm", dicom_dataset(frames=10**9, uid="1.2.3.6"), bytes(4))
    deflated = deflated_dicom_bomb(root / "deflated" / "bomb.dcm", GiB)
    assert max(p.stat().st_blocks * 512 for p in (wds / "shard-000000.tar", npz, frames, deflated)) < 4 * MiB

    ctl = root / "control"  # small genuine inputs of each format
    (ctl / "wds").mkdir(parents=True)
    with tarfile.open(ctl / "wds" / "shard-000000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (("a.png", b"\x89PNG"), ("a.txt", b"caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (ctl / "npz").mkdir()
    np.savez_compressed(ctl / "npz" / "pathmnist.npz", train_images=np.zeros((3, 28, 28, 3), np.uint8),
                        train_labels=np.zeros((3, 1), np.uint8))
    write_dicom(ctl / "dicom" / "a.dcm", dicom_dataset(16, 16, frames=2, uid="1.2.3.7"), bytes(512))

    def cli(fmt: str, source: Path, out: str, *options: str) -> list[str]:
        return ["ingest", "--format", fmt, "--source", str(source), *options, "--out", str(root / "out" / out)]

    spec = {"headroom": HEADROOM, "report": str(root / "report.json"),
            "bombs": {"webdataset": cli("webdataset", wds, "webdataset"),
                      "npz": cli("medmnist", npz, "npz"),
                      "frames": cli("dicom", frames.parent, "frames", "--option", "frames=all"),
                      "deflated": cli("dicom", deflated.parent, "deflated")},
            "controls": {"webdataset": cli("webdataset", ctl / "wds", "ctl-webdataset"),
                         "npz": cli("medmnist", ctl / "npz", "ctl-npz"),
                         "dicom": cli("dicom", ctl / "dicom", "ctl-dicom", "--option", "frames=all")}}
    script = root / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), json.dumps(spec)], cwd=root, env=env,  # ./params.yaml
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])  # not killed
    report = json.loads((root / "report.json").read_text())
    assert all(r["rc"] == 0 for r in report["warm"].values()), report["warm"]
    assert all(r["rc"] == 0 for r in report["controls"].values()), report["controls"]  # the cap leaves room
    report["out"] = root / "out"
    return report


def _row_problem(out: Path, source_id: str) -> str:
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    return next(r["problem"] for r in rows if r["source_id"] == source_id)


def test_capped_npz_bomb_is_galens_error_not_memory_error(capped_run: dict) -> None:
    result = capped_run["bombs"]["npz"]
    assert result.get("exception") is None and result["rc"] == 2, result
    assert result["stderr"].startswith("galen: error: ") and "pathmnist.npz:train_images" in result["stderr"]
    refused(result["stderr"], "3,136,000,000 bytes", "67,108,864", "max_array_bytes")
    no_shards(capped_run["out"] / "npz")


def test_capped_webdataset_member_of_1_gib_is_a_row_not_memory_error(capped_run: dict) -> None:
    result = capped_run["bombs"]["webdataset"]
    assert result.get("exception") is None and result["rc"] == 0, result
    refused(_row_problem(capped_run["out"] / "webdataset", "big"), "1,073,741,824 bytes", "67,108,864",
            "max_member_bytes")


def test_capped_billion_frame_dicom_is_a_row_not_memory_error(capped_run: dict) -> None:
    result = capped_run["bombs"]["frames"]
    assert result.get("exception") is None and result["rc"] == 0, result
    refused(_row_problem(capped_run["out"] / "frames", "bomb.dcm"), "1,000,000,000 frames", "10,000", "max_frames")


def test_capped_deflated_dicom_of_1_gib_is_a_row_not_memory_error(capped_run: dict) -> None:
    result = capped_run["bombs"]["deflated"]
    assert result.get("exception") is None and result["rc"] == 0, result
    problem = _row_problem(capped_run["out"] / "deflated", "bomb.dcm")
    assert "MemoryError" not in problem
    refused(problem, "more than 67,108,864 bytes", "67,108,864", "max_dicom_bytes")

