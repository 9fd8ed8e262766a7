"""The demo datasets: byte-reproducible, in each dataset's raw layout, and with text that the pixels back up.

Consistency is checked by re-measuring the images (thresholds, connected components, region means)
rather than by asking the generator what it drew, so a generator that writes the wrong answer fails.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from skimage.measure import label, regionprops

from galen.flows.demo_data import DEMO_FORMATS, write_demo

NUMBERS = {"no": 0, "zero": 0, "one": 1, "a": 1, "two": 2, "three": 3, "four": 4}
SCALE = 0.5


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    out = tmp_path_factory.mktemp("demo") / "raw"
    return out, write_demo(out, seed=0, scale=SCALE)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def blobs(mask: np.ndarray, min_area: int) -> list:
    """Connected regions of a mask, ignoring specks smaller than min_area (compression or noise)."""
    return [r for r in regionprops(label(mask)) if r.area >= min_area]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def count_in(text: str, noun: str) -> int:
    """'two large nodules' -> 2, 'no nodules' / 'no focal nodules' -> 0, 'a small nodule' -> 1."""
    m = re.search(rf"\b(no|a|one|two|three|four)\b(?: \w+)? {noun}s?\b", text)
    assert m, f"no {noun} count in {text!r}"
    return NUMBERS[m.group(1)]


# -- reproducibility and layout -----------------------------------------------------------------------
def test_same_seed_is_byte_identical_and_another_seed_differs(demo, tmp_path):
    root, _ = demo
    again, other = tmp_path / "again", tmp_path / "other"
    write_demo(again, seed=0, scale=SCALE)
    write_demo(other, seed=1, scale=SCALE)
    first, second, third = tree_digest(root), tree_digest(again), tree_digest(other)
    assert len(first) > 100
    assert first == second
    assert sorted(first) == sorted(third)
    # everything procedural changes with the seed; only the copied real images stay
    same = {k for k in first if first[k] == third[k]}
    assert same == {k for k in first if k.startswith("real_images/")}


def test_every_format_folder_has_its_raw_layout(demo):
    root, counts = demo
    assert sorted(counts) == sorted(DEMO_FORMATS)
    assert sorted(p.name for p in root.iterdir()) == sorted(DEMO_FORMATS)
    for name in ("trainset.json", "testset.json"):
        assert isinstance(json.loads((root / "vqa_rad" / name).read_text()), list)
    assert len(list((root / "vqa_rad" / "images").glob("synpic*.jpg"))) == counts["vqa_rad"]["images"]

    annotation = json.loads((root / "iu_xray" / "annotation.json").read_text())
    assert sorted(annotation) == ["test", "train", "val"]
    for split, entries in annotation.items():
        assert len(entries) == counts["iu_xray"][split] > 0
        for e in entries:
            assert sorted(e) == ["id", "image_path", "report", "split"] and e["split"] == split
            assert e["image_path"] == [f"{e['id']}/0.png", f"{e['id']}/1.png"]
            assert all((root / "iu_xray" / "images" / p).is_file() for p in e["image_path"])

    with np.load(root / "medmnist" / "pathmnist.npz") as npz:
        assert sorted(npz.files) == sorted(f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels"))

    for split in ("train", "dev", "test"):
        assert (root / "mednli" / f"mli_{split}_v1.jsonl").is_file()
    assert list(read_csv(root / "meqsum" / "meqsum.csv")[0]) == ["CHQ", "Summary"]

    rows = read_csv(root / "captions" / "captions.csv")
    assert list(rows[0]) == ["filepath", "caption"] and len(rows) == counts["captions"]["images"]
    assert all((root / "captions" / r["filepath"]).is_file() for r in rows)
    assert (root / "captions" / "webdataset" / "shard-000000.tar").is_file()

    assert len(list((root / "dicom").glob("*.dcm"))) == counts["dicom"]["files"]
    assert sorted(p.name for p in (root / "real_images" / "dicom").iterdir()) == ["CT_small.dcm", "MR_small.dcm"]

    for name in ("train.json", "validate.json", "test.json"):
        assert isinstance(json.loads((root / "slake" / name).read_text(encoding="utf-8")), list)
    assert len(list((root / "slake" / "imgs").glob("xmlab*/detection.json"))) == counts["slake"]["images"] == 30


# -- VQA-RAD -----------------------------------------------------------------------------------------
def test_vqa_answers_match_the_nodules_found_in_the_images(demo):
    root, _ = demo
    rows = [r for name in ("trainset.json", "testset.json")
            for r in json.loads((root / "vqa_rad" / name).read_text())]
    answers: dict[str, dict[str, str]] = {}
    for r in rows:
        answers.setdefault(r["image_name"], {})[r["question_type"]] = r["answer"]
    assert len(answers) >= 20
    seen_counts = set()
    for name, a in answers.items():
        pixels = np.asarray(Image.open(root / "vqa_rad" / "images" / name).convert("L"), dtype=float)
        size = pixels.shape[1]
        found = blobs(pixels > 200, min_area=30)
        assert len(found) == NUMBERS[a["COUNT"]], name
        assert a["PRES"] == ("yes" if found else "no")
        seen_counts.add(len(found))
        # CT: air around the body is dark; x-ray: the film's edge is mid-grey
        assert a["MODALITY"] == ("ct" if pixels[:6, :6].mean() < 40 else "x-ray"), name
        if found:
            assert a["POS"] == ("left" if found[0].centroid[1] > size / 2 else "right"), name
            assert a["SIZE"] == ("yes" if np.mean([b.area for b in found]) > 250 else "no"), name
    assert seen_counts == {0, 1, 2, 3}


def test_vqa_rad_demo_reads_through_the_real_adapter(demo):
    from galen.flows.ingest import get_format

    root, counts = demo
    records = list(get_format("vqa-rad").read(root / "vqa_rad"))
    assert len(records) == counts["vqa_rad"]["train"] + counts["vqa_rad"]["test"]
    assert all(r.problem is None and r.image for r in records)


# -- IU X-ray ----------------------------------------------------------------------------------------
def read_film(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=float)


def test_iu_xray_reports_describe_what_the_films_show(demo):
    root, _ = demo
    entries = [e for split in json.loads((root / "iu_xray" / "annotation.json").read_text()).values() for e in split]
    kinds = set()
    for e in entries:
        report = e["report"]
        frontal = read_film(root / "iu_xray" / "images" / e["image_path"][0])
        lateral = read_film(root / "iu_xray" / "images" / e["image_path"][1])
        size = frontal.shape[0]
        nodules = blobs(frontal > 205, min_area=10)
        n = count_in(report, "nodule")
        assert len(nodules) == n, (e["id"], report)
        assert len(blobs(lateral > 205, min_area=10)) == n, (e["id"], "lateral view", report)
        if n:
            side = "left" if nodules[0].centroid[1] > size / 2 else "right"
            assert {("left" if b.centroid[1] > size / 2 else "right") for b in nodules} == {side}
            assert f" {side} " in report
            big = np.mean([b.area for b in nodules]) > 110
            assert re.search(r"\b(small|large) nodules?\b", report).group(1) == ("large" if big else "small"), report
        if n == 1:
            zone = "upper lobe" if nodules[0].centroid[0] < 0.31 * size else "mid lung"
            assert zone in report, (e["id"], report)
        # heart: the bright blob's width on a row just above the diaphragm
        row = frontal[int(0.57 * size)]
        enlarged = ((row > 165) & (row < 200)).sum() > 0.31 * size
        assert ("the heart is enlarged." in report) == enlarged, (e["id"], report)
        # effusion: the lower outer part of a lung (clear of even a big heart) is fluid-bright, not air-dark
        lower = slice(int(0.66 * size), int(0.72 * size))
        bright = {side for side, cx in (("right", 0.25), ("left", 0.75))
                  if frontal[lower, int((cx - 0.03) * size):int((cx + 0.03) * size)].mean() > 100}
        expected = {m.group(1) for m in re.finditer(r"there is a (left|right) pleural effusion", report)}
        assert bright == expected, (e["id"], report)
        kinds.add((n > 0, enlarged, bool(bright)))
    assert len(kinds) >= 5  # the findings vary, so the reports are not one template


# -- MedMNIST ----------------------------------------------------------------------------------------
def patch_features(images: np.ndarray) -> np.ndarray:
    x = images.astype(float)
    gray = x.mean(-1)
    return np.column_stack([x.mean((1, 2)), gray.std((1, 2)), np.abs(np.diff(gray, axis=1)).mean((1, 2)),
                            np.abs(np.diff(gray, axis=2)).mean((1, 2)), (gray < 120).mean((1, 2))])


def test_pathmnist_file_is_medmnist_shaped_and_its_classes_are_learnable(demo):
    root, counts = demo
    with np.load(root / "medmnist" / "pathmnist.npz") as npz:
        data = {k: npz[k] for k in npz.files}
    for split in ("train", "val", "test"):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        assert images.dtype == np.uint8 and images.shape == (counts["medmnist"][split], 28, 28, 3)
        assert labels.dtype == np.uint8 and labels.shape == (len(images), 1)
        assert sorted(np.unique(labels)) == list(range(9))
    # a nearest-centroid rule on a handful of colour/texture statistics already separates the classes
    train_x, train_y = patch_features(data["train_images"]), data["train_labels"][:, 0]
    mean, std = train_x.mean(0), train_x.std(0) + 1e-9
    centroids = np.stack([((train_x - mean) / std)[train_y == c].mean(0) for c in range(9)])
    test_x = (patch_features(data["test_images"]) - mean) / std
    predicted = np.argmin(((test_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == data["test_labels"][:, 0]).mean() >= 0.9


# -- MedNLI ------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_mednli_labels_follow_from_the_premise(demo):
    root, counts = demo
    rows = []
    for split in ("train", "dev", "test"):
        split_rows = read_jsonl(root / "mednli" / f"mli_{split}_v1.jsonl")
        assert len(split_rows) == counts["mednli"][split]
        rows += split_rows
    assert all(sorted(r) == ["gold_label", "pairID", "sentence1", "sentence2"] for r in rows)
    assert len({r["pairID"] for r in rows}) == len(rows)
    by_premise: dict[str, list[str]] = {}
    for r in rows:
        by_premise.setdefault(r["sentence1"], []).append(r["gold_label"])
    assert all(len(v) % 3 == 0 and v.count("entailment") == v.count("contradiction") == v.count("neutral")
               for v in by_premise.values())
    checked = 0
    for r in rows:
        premise, hypothesis, gold = r["sentence1"], r["sentence2"], r["gold_label"]
        temp = re.search(r"temperature (?:of|was) (\d+\.\d) c", premise)
        if temp and hypothesis in ("the patient is febrile.", "the patient is afebrile."):
            febrile = float(temp.group(1)) >= 38.0
            claims_fever = hypothesis == "the patient is febrile."
            assert gold == ("entailment" if febrile == claims_fever else "contradiction"), r
            checked += 1
        rate = re.search(r"(?:heart rate was|pulse was) (\d+)", premise)
        if rate and hypothesis in ("the patient is tachycardic.", "the patient is bradycardic."):
            fast = int(rate.group(1)) > 100
            claims_fast = hypothesis == "the patient is tachycardic."
            assert gold == ("entailment" if fast == claims_fast else "contradiction"), r
            checked += 1
    assert checked >= 10
    # a hypothesis alone does not give the label away: the same sentence is entailed and contradicted
    febrile_labels = {r["gold_label"] for r in rows if r["sentence2"] == "the patient is febrile."}
    assert febrile_labels == {"entailment", "contradiction"}


# -- MeQSum ------------------------------------------------------------------------------------------
MEQSUM_CUES = {  # a phrase of the consumer's question -> how its summary starts
    "what foods should": "what foods should be avoided with ", "treatment options": "what are the treatments for ",
    "runs in families": "is ", "side effects": "what are the side effects of ", "caused this": "what causes ",
    "any cure": "is there a cure for ", "to exercise": "is exercise safe with "}


def test_meqsum_summaries_are_determined_by_the_question(demo):
    root, counts = demo
    rows = read_csv(root / "meqsum" / "meqsum.csv")
    assert len(rows) == counts["meqsum"]["rows"] > 0
    for r in rows:
        chq, summary = r["CHQ"], r["Summary"]
        cues = [c for c in MEQSUM_CUES if c in chq]
        assert len(cues) == 1, chq
        assert summary.startswith(MEQSUM_CUES[cues[0]]) and summary.endswith("?"), (chq, summary)
        subject = summary[len(MEQSUM_CUES[cues[0]]):].removesuffix("?").removesuffix(" hereditary")
        assert subject and subject in chq, (chq, summary)  # the condition or drug comes from the question
        assert len(summary) < len(chq)
    xlsx = root / "meqsum" / "MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx"
    assert xlsx.exists()  # openpyxl is a dependency, so the real release's format is written too
    if xlsx.exists():
        import openpyxl
        sheet = openpyxl.load_workbook(xlsx).active
        assert [list(v) for v in sheet.iter_rows(values_only=True)] == [["File", "CHQ", "Summary"]] + [
            [f"demo-{i:05d}.txt", r["CHQ"], r["Summary"]] for i, r in enumerate(rows)]
    else:
        with pytest.raises(ImportError):
            import openpyxl  # noqa: F401


# -- captions and WebDataset -------------------------------------------------------------------------
def modality_of(image: Image.Image) -> str:
    """CT is grayscale; a fundus photo has a black surround and a red retina; H&E is bright pink throughout."""
    if image.mode == "L":
        return "ct"
    x = np.asarray(image, dtype=float)
    return "fundus" if x[:8, :8].mean() < 20 and x[..., 0].mean() > 1.5 * x[..., 2].mean() else "histology"


def structures_in(image: Image.Image, modality: str) -> list:
    x = np.asarray(image, dtype=float)
    size = x.shape[0]
    if modality == "ct":      # soft-tissue window: nodules brighter than the body, darker than bone
        return blobs((x > 170) & (x < 230), min_area=8)
    if modality == "histology":  # gland lumens are the only near-white areas
        return blobs(x.mean(-1) > 238, min_area=12)
    yy, xx = np.mgrid[0:size, 0:size]
    inside = np.hypot(yy - size / 2, xx - size / 2) < 0.42 * size
    return blobs(inside & (x[..., 0] < 120), min_area=6)  # hemorrhages: darker red than the vessels


def check_caption(image: Image.Image, caption: str, where: str) -> str:
    modality = modality_of(image)
    assert caption.startswith({"ct": "axial ct", "histology": "h&e stained histology",
                               "fundus": "fundus photograph"}[modality]), (where, caption)
    noun = {"ct": "nodule", "histology": "gland", "fundus": "hemorrhage"}[modality]
    found = structures_in(image, modality)
    assert len(found) == count_in(caption, noun), (where, caption)
    if found:
        area = np.mean([b.area for b in found])
        threshold = {"ct": 110, "histology": 250, "fundus": 110}[modality]
        assert ("large" in caption) == (area > threshold), (where, caption, area)
    return modality


def test_captions_name_the_modality_and_the_structures_drawn(demo):
    root, _ = demo
    rows = read_csv(root / "captions" / "captions.csv")
    modalities = {check_caption(Image.open(root / "captions" / r["filepath"]), r["caption"], r["filepath"])
                  for r in rows}
    assert modalities == {"ct", "histology", "fundus"}


def test_webdataset_shard_pairs_images_with_their_captions(demo):
    root, counts = demo
    with tarfile.open(root / "captions" / "webdataset" / "shard-000000.tar") as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names) and len(names) == 2 * counts["captions"]["webdataset"]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(946684800, 0, 0, "", "")}
        keys = sorted({n.split(".", 1)[0] for n in names})
        assert names == [f"{k}.{ext}" for k in keys for ext in ("png", "txt")]
        for key in keys:
            image = Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read()))
            check_caption(image, tar.extractfile(f"{key}.txt").read().decode(), key)


# -- DICOM -------------------------------------------------------------------------------------------
def test_dicom_files_load_with_promised_tags_and_no_real_identifiers(demo):
    root, _ = demo
    files = sorted((root / "dicom").glob("*.dcm"))
    photometric, frames = set(), []
    for path in files:
        ds = pydicom.dcmread(path)
        assert str(ds.PatientName) == "Demo^Patient" and ds.PatientID.startswith("DEMO")
        assert not ds.get("PatientBirthDate") and not ds.get("InstitutionName") and not ds.get("OtherPatientIDs")
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert uid.startswith(pydicom.uid.PYDICOM_ROOT_UID)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SeriesDescription and "WindowCenter" in ds and "WindowWidth" in ds
        photometric.add(ds.PhotometricInterpretation)
        pixels = ds.pixel_array.astype(float)
        caption = ds.SeriesDescription
        if ds.PhotometricInterpretation == "MONOCHROME1":  # stored inverted: high values display dark
            assert ds.Modality == "CR"
            found = blobs((4095 - pixels) > 205 * 16, min_area=10)
        else:
            assert ds.Modality == "CT" and ds.RescaleType == "HU"
            hu = pixels * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            if int(ds.get("NumberOfFrames", 1)) > 1:
                assert hu.shape == (int(ds.NumberOfFrames), ds.Rows, ds.Columns)
                frames.append(path.name)
                hu = hu[hu.shape[0] // 2]
            assert np.median(hu[:4, :4]) < -900  # air outside the body reads as air
            found = blobs((hu > 100) & (hu < 400), min_area=6)
        assert len(found) == count_in(caption, "nodule"), (path.name, caption)
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    assert frames == ["ct_multiframe_000.dcm"]
    slopes = {float(pydicom.dcmread(p).get("RescaleSlope", 1)) for p in files}
    assert slopes == {1.0, 2.0}


# -- real images -------------------------------------------------------------------------------------
def test_real_image_set_holds_the_scikit_image_photos_and_pydicom_files(demo):
    from pydicom.data import get_testdata_file

    root, counts = demo
    rows = read_csv(root / "real_images" / "captions.csv")
    assert sorted(r["filepath"] for r in rows) == ["cell.png", "ihc.png", "microaneurysms.png", "retina.png"]
    assert counts["real_images"] == {"images": 4, "dicom": 2}
    for r in rows:
        image = Image.open(root / "real_images" / r["filepath"])
        assert min(image.size) >= 100 and r["caption"]
        assert image.getextrema() != ((0, 0),) and len(set(np.asarray(image).ravel()[:5000])) > 10
    captions = {r["filepath"]: r["caption"] for r in rows}
    assert "fundus" in captions["retina.png"] and "immunohistochemistry" in captions["ihc.png"]
    for name in ("CT_small.dcm", "MR_small.dcm"):
        assert (root / "real_images" / "dicom" / name).read_bytes() == Path(get_testdata_file(name)).read_bytes()


# -- the real adapters, as they land -----------------------------------------------------------------
ADAPTER_SOURCES = {  # format -> (sources to try in order: the dataset folder, then its main file; expected records)
    "r2gen": (("iu_xray", "iu_xray/annotation.json"), lambda c: sum(c["iu_xray"].values())),
    "medmnist": (("medmnist", "medmnist/pathmnist.npz"), lambda c: sum(c["medmnist"].values())),
    "mednli": (("mednli",), lambda c: sum(c["mednli"].values())),
    "meqsum": (("meqsum", "meqsum/meqsum.csv"), lambda c: c["meqsum"]["rows"]),
    "caption-csv": (("captions", "captions/captions.csv"), lambda c: c["captions"]["images"]),
    "webdataset": (("captions/webdataset", "captions/webdataset/shard-000000.tar"),
                   lambda c: c["captions"]["webdataset"]),
    "dicom": (("dicom",), lambda c: c["dicom"]["files"]),
}


@pytest.mark.parametrize("fmt", sorted(ADAPTER_SOURCES))
def test_demo_folder_reads_through_the_format_adapter(demo, fmt):
    from galen.flows.ingest import get_format
    from galen.model.errors import GalenInputError

    root, counts = demo
    sources, expected = ADAPTER_SOURCES[fmt]
    errors = []
    for source in sources:
        try:
            records = list(get_format(fmt).read(root / source))
        except GalenInputError as e:
            errors.append(f"{source}: {e}")
            continue
        assert len(records) == expected(counts)
        assert all(r.problem is None for r in records), [r.problem for r in records if r.problem][:3]
        return
    pytest.fail(f"{fmt} read none of {sources}: {errors}")
