"""Ingest adapters for MedMNIST, MedNLI, MeQSum and DICOM folders, on fixtures in the real layouts.

DICOM pixel mapping is checked numerically on small synthetic datasets (known rescale, window,
MONOCHROME1) and on pydicom's shipped test files (CT with rescale, MR with a window, RGB/YBR,
multi-frame, a compressed syntax without its decoder, a report without pixels).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import warnings
from pathlib import Path

import medmnist  # noqa: E402  (a required dependency: never skipped)
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from galen.flows.ingest import get_format, ingest
from galen.flows.ingest.schema import Record, read_records, split_by_hash
from galen.flows.validate import ValidationConfig, check_record
from galen.model.errors import GalenInputError
from galen.model.tasks import NLI_ANSWERS


def read(fmt: str, source: Path, **options) -> list[Record]:
    return list(get_format(fmt).read(source, **options))


def pixels(record: Record) -> np.ndarray:
    with Image.open(io.BytesIO(record.image)) as img:
        return np.asarray(img)


# --- MedMNIST -----------------------------------------------------------------------------------

def write_npz(path: Path, shape: tuple[int, ...], labels: dict[str, np.ndarray], seed: int = 0, **extra) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, y in labels.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(len(y), *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = y
    arrays.update(extra)
    np.savez_compressed(path, **arrays)
    return arrays


PATH_LABELS = {"train": np.array([[0], [8], [3], [5]]), "val": np.array([[1], [2]]), "test": np.array([[6], [7], [4]])}


def test_medmnist_multiclass_targets_candidates_and_pixels(tmp_path):
    arrays = write_npz(tmp_path / "pathmnist.npz", (28, 28, 3), PATH_LABELS)
    records = read("medmnist", tmp_path / "pathmnist.npz")
    names = [medmnist.INFO["pathmnist"]["label"][str(i)] for i in range(9)]
    assert len(records) == 9
    assert [r.split for r in records] == ["train"] * 4 + ["val"] * 2 + ["test"] * 3
    train = [r for r in records if r.split == "train"]
    assert [r.target for r in train] == [names[0], names[8], names[3], names[5]]
    assert train[1].target == "colorectal adenocarcinoma epithelium"
    assert all(r.candidates == names for r in records) and records[0].candidates[1] == "background"
    assert all(r.task == "classification" and r.dataset == "medmnist-pathmnist" and r.problem is None for r in records)
    assert records[1].source_id == "pathmnist:train:1"
    assert "CC BY 4.0" in records[0].license
    np.testing.assert_array_equal(pixels(train[2]), arrays["train_images"][2])  # PNG is lossless
    assert check_record(train[0], ValidationConfig()) is None


def test_medmnist_multi_label_joins_positives_or_says_normal(tmp_path):
    y = np.zeros((3, 14), dtype=np.uint8)
    y[1, [0, 2]] = 1
    y[2, 13] = 1
    write_npz(tmp_path / "chestmnist.npz", (28, 28), {"train": y, "test": y[:1]})
    records = read("medmnist", tmp_path / "chestmnist.npz")
    assert [r.target for r in records] == ["normal", "atelectasis,effusion", "hernia", "normal"]
    assert all(r.candidates is None for r in records)  # a combination is not one of a closed set
    assert records[1].meta["label_names"][:3] == ["atelectasis", "cardiomegaly", "effusion"]
    assert records[1].meta["label"] == [1, 0, 1] + [0] * 11
    assert pixels(records[0]).shape == (28, 28)
    assert all(check_record(r, ValidationConfig()) is None for r in records)  # none quarantined


def test_medmnist_bad_label_is_a_problem_record_not_dropped(tmp_path):
    write_npz(tmp_path / "pathmnist.npz", (28, 28, 3), {"train": np.array([[0], [42], [-1]])})
    records = read("medmnist", tmp_path / "pathmnist.npz")
    assert len(records) == 3
    assert records[0].problem is None
    assert "42" in records[1].problem and "outside 0..8" in records[1].problem
    assert records[2].problem is not None


def test_medmnist_folder_flags_and_size_variant(tmp_path):
    write_npz(tmp_path / "pathmnist.npz", (28, 28, 3), {"train": np.array([[1]])})
    write_npz(tmp_path / "organcmnist_64.npz", (64, 64), {"val": np.array([[0], [10]])})
    (tmp_path / "notes.npz").write_bytes(b"")  # not a MedMNIST flag: skipped with a warning
    everything = read("medmnist", tmp_path)
    assert sorted({r.dataset for r in everything}) == ["medmnist-organcmnist", "medmnist-pathmnist"]
    organ = read("medmnist", tmp_path, flags=["organcmnist"])
    assert [r.target for r in organ] == [medmnist.INFO["organcmnist"]["label"]["0"],
                                         medmnist.INFO["organcmnist"]["label"]["10"]]
    assert organ[0].meta["size"] == 64 and pixels(organ[0]).shape == (64, 64)
    assert organ[1].source_id == "organcmnist_64:val:1"
    with pytest.raises(GalenInputError, match="unknown MedMNIST flags"):
        read("medmnist", tmp_path, flags=["nosuchmnist"])
    with pytest.raises(GalenInputError, match="no .npz file"):
        read("medmnist", tmp_path, flags=["dermamnist"])


@pytest.mark.parametrize("case, message", [
    ("no_labels", "no train_labels"),
    ("float_images", "uint8"),
    ("length", "labels"),
    ("volume", "3D"),
    ("pickled", "object arrays"),
])
def test_medmnist_structural_problems_stop_with_a_clear_error(tmp_path, case, message):
    name = "organmnist3d.npz" if case == "volume" else "pathmnist.npz"
    if case == "no_labels":
        np.savez(tmp_path / name, train_images=np.zeros((2, 28, 28, 3), np.uint8))
    elif case == "float_images":
        np.savez(tmp_path / name, train_images=np.zeros((2, 28, 28, 3)), train_labels=np.zeros((2, 1), int))
    elif case == "length":
        np.savez(tmp_path / name, train_images=np.zeros((2, 28, 28, 3), np.uint8), train_labels=np.zeros((3, 1), int))
    elif case == "volume":
        np.savez(tmp_path / name, train_images=np.zeros((2, 28, 28, 28), np.uint8), train_labels=np.zeros((2, 1), int))
    else:
        labels = np.empty(2, dtype=object)
        labels[:] = [[0], [1]]
        np.savez(tmp_path / name, train_images=np.zeros((2, 28, 28, 3), np.uint8), train_labels=labels)
    with pytest.raises(GalenInputError, match=message):
        read("medmnist", tmp_path / name)


def test_medmnist_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    write_npz(tmp_path / "pathmnist.npz", (28, 28, 3), {"train": np.array([[1]])})
    monkeypatch.setitem(__import__("sys").modules, "medmnist", None)  # makes `import medmnist` fail
    with pytest.raises(GalenInputError, match="pip install medmnist"):
        read("medmnist", tmp_path / "pathmnist.npz")


# --- MedNLI -------------------------------------------------------------------------------------

def write_mednli(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = {
        "mli_train_v1.jsonl": [
            {"sentence1": "Labs were notable for Cr 1.7.", "sentence2": "Patient has elevated Cr",
             "gold_label": "entailment", "pairID": "t-1"},
            {"sentence1": "No history of smoking.", "sentence2": "Patient is a smoker.",
             "gold_label": "contradiction", "pairID": "t-2"},
            {"sentence1": "He was started on heparin.", "sentence2": "He has a DVT.",
             "gold_label": "neutral", "pairID": "t-3"},
            {"sentence1": "BP 120/80.", "sentence2": "Normotensive.", "gold_label": "unsure", "pairID": "t-4"},
        ],
        "mli_dev_v1.jsonl": [{"sentence1": "Afebrile.", "sentence2": "No fever.", "gold_label": "entailment",
                              "pairID": "d-1"}],
        "mli_test_v1.jsonl": [{"sentence1": "CXR clear.", "sentence2": "Pneumonia.", "gold_label": "contradiction",
                               "pairID": "x-1"}],
    }
    for name, items in rows.items():
        lines = [json.dumps(r) for r in items]
        if name == "mli_train_v1.jsonl":
            lines += ["", "{not json", json.dumps({"sentence1": "only a premise", "pairID": "t-6"})]
        (folder / name).write_text("\n".join(lines) + "\n")


def test_mednli_maps_labels_to_answers_and_keeps_bad_lines(tmp_path):
    write_mednli(tmp_path / "mednli")
    records = read("mednli", tmp_path / "mednli")
    by_id = {r.source_id: r for r in records}
    assert len(records) == 8  # the blank line is not a record; the broken ones are
    assert [by_id[i].target for i in ("t-1", "t-2", "t-3")] == ["yes", "no", "maybe"]
    assert by_id["t-1"].premise == "Labs were notable for Cr 1.7."
    assert by_id["t-1"].hypothesis == "Patient has elevated Cr"
    assert all(r.task == "nli" and r.candidates == list(NLI_ANSWERS) for r in records)
    assert by_id["d-1"].split == "val" and by_id["x-1"].split == "test" and by_id["t-1"].split == "train"
    assert "unknown gold_label 'unsure'" in by_id["t-4"].problem
    assert "not valid JSON" in by_id["mli_train_v1.jsonl:6"].problem
    assert "missing keys" in by_id["t-6"].problem
    assert sum(r.problem is not None for r in records) == 3
    assert "PhysioNet Credentialed Health Data License 1.5.0" in records[0].license
    assert check_record(by_id["t-2"], ValidationConfig()) is None


def test_mednli_without_files_says_where_to_get_them(tmp_path):
    with pytest.raises(GalenInputError, match="PhysioNet"):
        read("mednli", tmp_path)
    write_mednli(tmp_path / "m")
    only_dev = read("mednli", tmp_path / "m" / "mli_dev_v1.jsonl")
    assert [r.split for r in only_dev] == ["val"]


# --- MeQSum -------------------------------------------------------------------------------------

def meqsum_frame(n: int = 40) -> pd.DataFrame:
    rows = [{"File": f"{i}-{1000 + i}.txt", "CHQ": f"Dear doctor, question number {i} about my medication dose?",
             "Summary": f"What is the dose of medication {i}?"} for i in range(n)]
    if n > 7:
        rows[5]["Summary"] = ""
        rows[7]["CHQ"] = rows[3]["CHQ"].upper()  # the same question twice (case aside)
    return pd.DataFrame(rows)


def test_meqsum_xlsx_hash_split_and_problems(tmp_path):
    import openpyxl  # noqa: F401  (a required dependency: never skipped)
    frame = meqsum_frame()
    path = tmp_path / "MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx"
    frame.to_excel(path, index=False)
    records = read("meqsum", tmp_path)
    assert len(records) == 40
    first = records[0]
    assert first.task == "summarization" and first.text == frame.CHQ[0] and first.target == frame.Summary[0]
    assert first.source_id == "0-1000.txt" and first.meta["file"] == "0-1000.txt"
    assert "research use" in first.license
    for r, chq in zip(records, frame.CHQ):
        assert r.split == split_by_hash(" ".join(chq.lower().split()))
    assert len({r.split for r in records}) > 1
    assert records[3].split == records[7].split  # duplicate questions never straddle train/test
    assert records[5].problem == "empty Summary"
    assert sum(r.problem is not None for r in records) == 1


def test_meqsum_csv_with_split_column_and_parquet(tmp_path):
    frame = meqsum_frame(6).drop(columns=["File"])
    frame["split"] = ["train", "train", "dev", "test", "validation", "holdout"]
    frame.to_csv(tmp_path / "meqsum.csv", index=False)
    records = read("meqsum", tmp_path / "meqsum.csv")
    assert [r.split for r in records[:5]] == ["train", "train", "val", "test", "val"]
    assert "unknown split 'holdout'" in records[5].problem
    assert records[0].source_id == "meqsum:0"

    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    meqsum_frame(4).to_parquet(pq_dir / "meqsum.parquet")
    assert [r.source_id for r in read("meqsum", pq_dir)] == ["0-1000.txt", "1-1001.txt", "2-1002.txt", "3-1003.txt"]


def test_meqsum_structural_errors(tmp_path):
    pd.DataFrame({"question": ["q"], "answer": ["a"]}).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(GalenInputError, match=r"lacks columns \['CHQ', 'Summary'\]"):
        read("meqsum", tmp_path / "other.csv")
    (tmp_path / "second.csv").write_text("CHQ,Summary\nq,s\n")
    with pytest.raises(GalenInputError, match="exactly one"):
        read("meqsum", tmp_path)


# --- DICOM --------------------------------------------------------------------------------------

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-98765", "PatientBirthDate": "19700101",
           "InstitutionName": "Saint Example Hospital", "AccessionNumber": "ACC-4242"}


def write_dicom(path: Path, array: np.ndarray, *, study: str = "1.2.826.0.1.3680043.99.1", photometric: str =
                "MONOCHROME2", slope: float | None = None, intercept: float | None = None,
                center: float | None = None, width: float | None = None, series_description: str | None = "AX T1",
                instance: int = 1) -> Path:
    """A small uncompressed DICOM with patient identifiers set (they must never reach meta)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    array = np.asarray(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = f"{study}.{instance}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop_uid
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, f"{study}.0"
    ds.Modality, ds.BodyPartExamined, ds.StudyDescription = "CT", "CHEST", "CT CHEST"
    if series_description is not None:
        ds.SeriesDescription = series_description
    ds.Rows, ds.Columns = array.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if array.dtype == np.int16 else 0
    if array.ndim == 3:
        ds.NumberOfFrames = array.shape[0]
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    ds.PixelData = array.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def pydicom_sample(name: str) -> Path:
    """A file shipped inside pydicom's wheel (never one it would have to download)."""
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = get_testdata_file(name)
    if found is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return Path(found)


def one(records: list[Record], source_id: str) -> Record:
    matches = [r for r in records if r.source_id == source_id]
    assert len(matches) == 1, [r.source_id for r in records]
    return matches[0]


def test_dicom_rescale_then_window_numerically(tmp_path):
    raw = np.array([[0, 100], [200, 300]], dtype=np.int16)
    # stored -> slope 2, intercept -100 -> [-100, 100, 300, 500]; window 200/401 spans [-0.5, 399.5]
    write_dicom(tmp_path / "img.dcm", raw, slope=2, intercept=-100, center=200, width=401)
    rec = one(read("dicom", tmp_path), "img.dcm")
    np.testing.assert_array_equal(pixels(rec), [[0, 64], [192, 255]])
    assert rec.meta["mapping"] == "window" and rec.meta["window"] == [200.0, 401.0, "LINEAR"]
    assert rec.meta["RescaleSlope"] == 2.0 and rec.meta["RescaleIntercept"] == -100.0
    assert rec.meta["original_shape"] == [2, 2] and rec.meta["original_dtype"] == "int16"


def test_dicom_min_max_without_window_and_monochrome1_inverted(tmp_path):
    raw = np.array([[10, 20], [30, 40]], dtype=np.uint16)
    write_dicom(tmp_path / "m2.dcm", raw, study="1.2.3.1")
    write_dicom(tmp_path / "m1.dcm", raw, study="1.2.3.2", photometric="MONOCHROME1")
    records = read("dicom", tmp_path)
    np.testing.assert_array_equal(pixels(one(records, "m2.dcm")), [[0, 85], [170, 255]])
    np.testing.assert_array_equal(pixels(one(records, "m1.dcm")), [[255, 170], [85, 0]])
    assert one(records, "m1.dcm").meta["inverted"] is True and one(records, "m1.dcm").meta["mapping"] == "min-max"


def test_dicom_window_functions():
    from galen.model.vision import window

    x = np.array([-1000.0, 39.5, 40.0, 1000.0])
    np.testing.assert_allclose(window(x, 40, 400), [0.0, 0.5, (40 - 39.5) / 399 + 0.5, 1.0])
    np.testing.assert_allclose(window(x, 40, 400, "LINEAR_EXACT"), [0.0, 0.49875, 0.5, 1.0])
    np.testing.assert_allclose(window(np.array([40.0]), 40, 400, "SIGMOID"), [0.5])


def test_dicom_meta_has_no_patient_identifiers(tmp_path):
    study = "1.2.826.0.1.3680043.99.77"
    write_dicom(tmp_path / "a.dcm", np.arange(16, dtype=np.int16).reshape(4, 4), study=study)
    shutil.copy(pydicom_sample("CT_small.dcm"), tmp_path / "ct.dcm")
    records = read("dicom", tmp_path)
    assert len(records) == 2
    for rec in records:
        text = json.dumps(rec.meta) + rec.source_id + rec.target
        for key in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "AccessionNumber",
                    "StudyInstanceUID", "SOPInstanceUID"):
            assert key not in rec.meta
        for value in [*PATIENT.values(), study, "CompressedSamples^CT1", "1CT1"]:
            assert value not in text
    assert {"Modality", "BodyPartExamined", "PhotometricInterpretation"} <= set(one(records, "a.dcm").meta)


def test_dicom_split_follows_the_study(tmp_path):
    studies = [f"1.2.826.0.1.3680043.99.{s}" for s in range(12)]
    for s, study in enumerate(studies):
        for i in range(3):
            write_dicom(tmp_path / f"s{s}" / f"img{i}", np.full((4, 4), i, np.uint16), study=study, instance=i)
    records = read("dicom", tmp_path)
    assert len(records) == 36  # files without .dcm are read (they have the DICM preamble)
    for s, study in enumerate(studies):
        splits = {r.split for r in records if r.source_id.startswith(f"s{s}/")}
        assert splits == {split_by_hash(study)}
    assert len({r.split for r in records}) > 1
    assert all(r.meta["split_key"] == "study" for r in records)


def test_dicom_multi_frame_middle_or_all(tmp_path):
    frames = np.stack([np.full((4, 4), 100 * k, np.uint16) + np.arange(16, dtype=np.uint16).reshape(4, 4)
                       for k in range(5)])
    write_dicom(tmp_path / "cine.dcm", frames, center=250, width=301)  # window spans [99.5, 399.5]
    middle = read("dicom", tmp_path)
    assert [r.source_id for r in middle] == ["cine.dcm"] and middle[0].meta["frame"] == 2
    assert middle[0].meta["frames"] == 5
    every = read("dicom", tmp_path, frames="all")
    assert [r.source_id for r in every] == [f"cine.dcm#frame={k}" for k in range(5)]
    np.testing.assert_array_equal(pixels(every[2]), pixels(middle[0]))
    assert pixels(every[0]).max() == 0 and pixels(every[4]).min() == 255  # below / above the window
    assert 0 < pixels(every[2]).min() < pixels(every[2]).max() < 255  # frames are really different frames


def test_dicom_pydicom_samples_rescale_window_rgb_multiframe(tmp_path):
    for name in ("CT_small.dcm", "MR_small.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_rle_2frame.dcm",
                 "rtdose.dcm"):
        shutil.copy(pydicom_sample(name), tmp_path / name)
    records = read("dicom", tmp_path, caption_from="StudyDescription", frames="all")
    ct = one(records, "CT_small.dcm")
    assert ct.meta["RescaleIntercept"] == -1024.0 and ct.meta["mapping"] == "min-max"
    assert pixels(ct).shape == (128, 128) and pixels(ct).dtype == np.uint8 and ct.target == "e+1"
    mr = one(records, "MR_small.dcm")
    assert mr.meta["window"] == [600.0, 1600.0, "LINEAR"]
    assert "no StudyDescription" in mr.problem and mr.image is not None  # still an image, flagged
    ybr = pixels(one(records, "SC_ybr_full_422_uncompressed.dcm"))
    assert ybr.shape == (100, 100, 3)
    assert np.abs(ybr[0, 0].astype(int) - [255, 0, 0]).max() <= 2  # YBR converted: the top bar is red
    rgb = [r for r in records if r.source_id.startswith("SC_rgb_rle_2frame.dcm#frame=")]
    assert len(rgb) == 2 and pixels(rgb[1]).shape == (100, 100, 3)
    dose = [r for r in records if r.source_id.startswith("rtdose.dcm")]
    assert len(dose) == 15 and dose[7].meta["original_dtype"] == "uint32"
    assert read("dicom", tmp_path / "rtdose.dcm")[0].meta["frame"] == 7  # middle of 15


def test_dicom_compressed_without_decoder_names_syntax_and_package(tmp_path):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    shutil.copy(pydicom_sample("MR_small_jpeg_ls_lossless.dcm"), tmp_path / "ls.dcm")
    rec = one(read("dicom", tmp_path), "ls.dcm")
    assert rec.image is None
    assert "JPEG-LS Lossless Image Compression" in rec.problem and "1.2.840.10008.1.2.4.80" in rec.problem
    assert "pip install" in rec.problem and "pylibjpeg-libjpeg" in rec.problem


def test_dicom_non_dicom_files_reports_and_captions(tmp_path, caplog):
    write_dicom(tmp_path / "good.dcm", np.ones((4, 4), np.uint16), series_description="  Axial   T2 FLAIR ")
    write_dicom(tmp_path / "nodesc.dcm", np.ones((4, 4), np.uint16), series_description=None, instance=2)
    (tmp_path / "broken.dcm").write_text("this is not DICOM")
    (tmp_path / "README").write_text("a readme")
    (tmp_path / "thumb.png").write_bytes(b"\x89PNG")
    shutil.copy(pydicom_sample("test-SR.dcm"), tmp_path / "report.dcm")
    with caplog.at_level(logging.INFO, logger="galen.flows.ingest.dicom"):
        records = read("dicom", tmp_path)
    assert sorted(r.source_id for r in records) == ["broken.dcm", "good.dcm", "nodesc.dcm", "report.dcm"]
    assert one(records, "good.dcm").target == "Axial T2 FLAIR" and one(records, "good.dcm").problem is None
    assert "no SeriesDescription" in one(records, "nodesc.dcm").problem
    assert "not a DICOM file" in one(records, "broken.dcm").problem
    assert "no pixel data" in one(records, "report.dcm").problem
    assert "ignored 2 files" in caplog.text
    body = read("dicom", tmp_path, caption_from="BodyPartExamined")
    assert one(body, "nodesc.dcm").target == "CHEST" and one(body, "nodesc.dcm").problem is None


def test_dicom_classification_from_labels_beside_the_folder(tmp_path):
    folder = tmp_path / "scans"
    write_dicom(folder / "a" / "1.dcm", np.ones((4, 4), np.uint16), study="1.2.3.10")
    write_dicom(folder / "b" / "2.dcm", np.ones((4, 4), np.uint16), study="1.2.3.11")
    write_dicom(folder / "c" / "3.dcm", np.ones((4, 4), np.uint16), study="1.2.3.12")
    (tmp_path / "labels.csv").write_text("file,label\na/1.dcm,pneumonia\n2.dcm,normal\n")
    records = read("dicom", folder, task="classification")
    assert [(r.source_id, r.target) for r in records] == [("a/1.dcm", "pneumonia"), ("b/2.dcm", "normal"),
                                                          ("c/3.dcm", "")]
    assert all(r.task == "classification" and r.candidates == ["normal", "pneumonia"] for r in records)
    assert "no label for c/3.dcm" in records[2].problem
    assert records[0].license.startswith("unknown")
    assert read("dicom", folder, task="classification", license="CC BY 4.0")[0].license == "CC BY 4.0"


@pytest.mark.parametrize("options, message", [
    ({"task": "classification"}, "labels.csv"),
    ({"frames": "first"}, "frames"),
    ({"caption_from": "PatientName"}, "caption_from"),
    ({"task": "vqa"}, "caption or classification"),
])
def test_dicom_option_and_folder_errors(tmp_path, options, message):
    write_dicom(tmp_path / "x.dcm", np.ones((4, 4), np.uint16))
    with pytest.raises(GalenInputError, match=message):
        read("dicom", tmp_path, **options)


def test_dicom_folder_without_dicom_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(GalenInputError, match="no DICOM files"):
        read("dicom", tmp_path)


# --- through the registry and the shard writer ---------------------------------------------------

def test_every_format_round_trips_through_ingest(tmp_path):
    sources = tmp_path / "src"
    for folder in ("mnist", "meqsum", "dicom"):
        (sources / folder).mkdir(parents=True)
    write_npz(sources / "mnist" / "pathmnist.npz", (28, 28, 3), PATH_LABELS)
    write_mednli(sources / "mednli")
    meqsum_frame(5).to_csv(sources / "meqsum" / "meqsum.csv", index=False)
    write_dicom(sources / "dicom" / "a.dcm", np.arange(256, dtype=np.int16).reshape(16, 16), slope=1.5,
                intercept=-10, center=100, width=200)
    for fmt, folder, n in (("medmnist", "mnist", 9), ("mednli", "mednli", 8), ("meqsum", "meqsum", 5),
                           ("dicom", "dicom", 1)):
        out = tmp_path / "out" / fmt
        summary = ingest(fmt, sources / folder, out, rows_per_shard=4)
        assert summary["records"] == n
        back = list(read_records(out))
        assert len(back) == n and back[0].meta  # meta survives the JSON round trip
    dicom_back = list(read_records(tmp_path / "out" / "dicom"))[0]
    assert dicom_back.meta["RescaleSlope"] == 1.5 and pixels(dicom_back).shape == (16, 16)
