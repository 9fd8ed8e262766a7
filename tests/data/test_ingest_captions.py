"""Captioning ingest adapters (r2gen, roco, peir-gross, medicat, caption-csv, webdataset) on their real layouts.

Every fixture is written in the dataset's own on-disk layout with small real PNG/JPEG files, then read
both directly and through `ingest()` + `read_records`, so the Parquet round trip is covered too.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from pathlib import Path

import pytest
from PIL import Image

from galen.flows.ingest import get_format, ingest
from galen.flows.ingest.schema import Record, read_records, split_by_hash, to_row
from galen.model.errors import GalenInputError


def image_bytes(color: tuple[int, int, int], fmt: str = "PNG", size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def read(fmt: str, source: Path, **options) -> list[Record]:
    return list(get_format(fmt).read(source, **options))


def by_id(records: list[Record]) -> dict[str, Record]:
    out = {r.source_id: r for r in records}
    assert len(out) == len(records), "source_ids must be unique"
    return out


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root with its content (to prove an ingest wrote nothing else)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def roundtrip(fmt: str, source: Path, out: Path, rows_per_shard: int = 2048, **options) -> list[Record]:
    """Records through ingest() + read_records; must equal the adapter's own output."""
    result = ingest(fmt, source, out, rows_per_shard=rows_per_shard, **options)
    records = list(read_records(out))
    direct = read(fmt, source, **options)
    assert [to_row(r) for r in records] == [to_row(r) for r in direct]
    assert result["records"] == len(records)
    assert result["with_problems"] == sum(r.problem is not None for r in records)
    return records


# ---------------------------------------------------------------- r2gen

IU_REPORTS = {
    "CXR1_1_IM-0001": "The cardiac silhouette and mediastinum size are within normal limits. No pneumothorax.",
    "CXR2_IM-0652": "Borderline cardiomegaly. Midline sternotomy with XXXX.",
    "CXR3_IM-1384": "No acute cardiopulmonary abnormality.",
}


@pytest.fixture
def iu_xray(tmp_path: Path) -> Path:
    root = tmp_path / "iu_xray"
    colors = {"CXR1_1_IM-0001": [(10, 0, 0), (20, 0, 0)], "CXR2_IM-0652": [(0, 30, 0), (0, 40, 0)],
              "CXR3_IM-1384": [(0, 0, 50)]}
    for sid, cs in colors.items():
        for i, c in enumerate(cs):
            write(root / "images" / sid / f"{i}.png", image_bytes(c))

    def study(sid: str, split: str, n: int) -> dict:
        return {"id": sid, "report": IU_REPORTS[sid], "image_path": [f"{sid}/{i}.png" for i in range(n)],
                "split": split}

    annotation = {
        "train": [study("CXR1_1_IM-0001", "train", 2), study("CXR2_IM-0652", "train", 2)],
        "val": [study("CXR3_IM-1384", "val", 1),
                {"id": "CXR4_IM-2050", "report": "", "image_path": ["CXR4_IM-2050/0.png"], "split": "val"}],
        "test": [{"id": "CXR5_IM-2117", "report": "Normal chest.", "image_path": ["CXR5_IM-2117/0.png"],
                  "split": "test"}],
    }
    write(root / "annotation.json", json.dumps(annotation))
    return root


def test_r2gen_one_record_per_study_with_first_view(iu_xray: Path) -> None:
    recs = by_id(read("r2gen", iu_xray))
    assert set(recs) == {"CXR1_1_IM-0001", "CXR2_IM-0652", "CXR3_IM-1384", "CXR4_IM-2050", "CXR5_IM-2117"}
    r = recs["CXR1_1_IM-0001"]
    assert (r.task, r.split, r.dataset, r.problem) == ("caption", "train", "iu-xray", None)
    assert r.target == IU_REPORTS["CXR1_1_IM-0001"]
    assert r.image == (iu_xray / "images/CXR1_1_IM-0001/0.png").read_bytes()
    assert r.meta["image_paths"] == ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"]
    assert "CC BY-NC-ND 4.0" in r.license and "Open-i" in r.license
    assert recs["CXR3_IM-1384"].split == "val" and recs["CXR5_IM-2117"].split == "test"
    assert recs["CXR4_IM-2050"].problem and "empty caption" in recs["CXR4_IM-2050"].problem
    missing = recs["CXR5_IM-2117"]  # its image was never written
    assert missing.image is None and "not found" in missing.problem and missing.target == "Normal chest."


def test_r2gen_all_views_gives_one_record_per_image(iu_xray: Path) -> None:
    recs = by_id(read("r2gen", iu_xray, all_views=True))
    assert {"CXR1_1_IM-0001/0", "CXR1_1_IM-0001/1", "CXR2_IM-0652/0", "CXR2_IM-0652/1"} <= set(recs)
    assert len(recs) == 7
    front, side = recs["CXR1_1_IM-0001/0"], recs["CXR1_1_IM-0001/1"]
    assert front.image != side.image
    assert side.image == (iu_xray / "images/CXR1_1_IM-0001/1.png").read_bytes()
    assert front.target == side.target == IU_REPORTS["CXR1_1_IM-0001"]
    assert side.meta["view"] == 1 and front.split == side.split == "train"


def test_r2gen_mimic_licence_detected_and_explicit(tmp_path: Path) -> None:
    root = tmp_path / "mimic_cxr"
    rel = "p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    jpg = write(root / "images" / rel, image_bytes((90, 90, 90), "JPEG")).read_bytes()
    write(root / "annotation.json", json.dumps({"train": [
        {"id": "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "study_id": 50414267, "subject_id": 10000032,
         "report": "There is no focal consolidation.", "image_path": [rel], "split": "train"}]}))
    for options in ({}, {"dataset": "mimic-cxr"}):
        (r,) = read("r2gen", root, **options)
        assert r.dataset == "mimic-cxr" and "PhysioNet Credentialed Health Data License 1.5.0" in r.license
        assert r.image == jpg and r.meta["study_id"] == 50414267 and r.problem is None
    with pytest.raises(GalenInputError, match="dataset"):
        read("r2gen", root, dataset="chexpert")


def test_r2gen_undetectable_dataset_needs_the_option(tmp_path: Path) -> None:
    root = tmp_path / "r2"
    write(root / "images/a/0.png", image_bytes((1, 2, 3)))
    write(root / "annotation.json", json.dumps({"train": [{"id": "s1", "report": "ok", "image_path": ["a/0.png"]}]}))
    with pytest.raises(GalenInputError, match="dataset=iu-xray"):
        read("r2gen", root)
    (r,) = read("r2gen", root, dataset="iu-xray")
    assert r.dataset == "iu-xray" and r.problem is None


@pytest.mark.parametrize("content, match", [
    ('{"train": [{"id": "CXR1", ', "not valid JSON"),
    ('[{"id": "CXR1"}]', "JSON object"),
    ('{"training": []}', "keys"),
    ('{"train": {"id": "CXR1"}}', "list of studies"),
])
def test_r2gen_malformed_annotation_is_a_clear_error(tmp_path: Path, content: str, match: str) -> None:
    write(tmp_path / "images/.keep", "")
    write(tmp_path / "annotation.json", content)
    with pytest.raises(GalenInputError, match=match):
        read("r2gen", tmp_path, dataset="iu-xray")


def test_r2gen_structural_problems(tmp_path: Path, iu_xray: Path) -> None:
    with pytest.raises(GalenInputError, match="annotation.json"):
        read("r2gen", tmp_path / "nowhere")
    with pytest.raises(GalenInputError, match="all_view"):
        read("r2gen", iu_xray, all_view=True)  # typo must not silently give the default
    with pytest.raises(GalenInputError, match="image folder"):
        read("r2gen", iu_xray, image_root=str(tmp_path / "no_images"))


def test_r2gen_paths_escaping_the_image_root_are_never_read(tmp_path: Path) -> None:
    root = tmp_path / "iu"
    secret = write(tmp_path / "secret.png", image_bytes((255, 0, 0)))
    write(root / "images/CXR1/0.png", image_bytes((0, 255, 0)))
    (root / "images/CXR2").mkdir()
    os.symlink(secret, root / "images/CXR2/0.png")             # points outside the root
    os.symlink(root / "images/CXR1/0.png", root / "images/CXR3.png")  # points inside: fine
    studies = [("CXR1", "../../secret.png"), ("CXR2", "CXR2/0.png"), ("CXR4", str(secret)), ("CXR3", "CXR3.png")]
    write(root / "annotation.json", json.dumps(
        {"train": [{"id": i, "report": "r", "image_path": [p]} for i, p in studies]}))
    recs = by_id(read("r2gen", root))
    for sid, why in (("CXR1", "'..'"), ("CXR2", "symlink"), ("CXR4", "absolute")):
        assert recs[sid].image is None and why in recs[sid].problem, sid
    assert recs["CXR3"].problem is None and recs["CXR3"].image == (root / "images/CXR1/0.png").read_bytes()


# ---------------------------------------------------------------- roco

@pytest.fixture
def roco_txt(tmp_path: Path) -> Path:
    """The GitHub release: data/<split>/<radiology|non-radiology>/{captions.txt, images/ROCO_xxxxx.jpg}."""
    data = tmp_path / "roco" / "data"
    rows = {("train", "radiology"): [("ROCO_00001", " Computed tomography showing a \"mass\" (arrow). ")],
            ("train", "non-radiology"): [("ROCO_70001", "Histology, H&E stain.")],
            ("validation", "radiology"): [("ROCO_00002", "Chest X-ray with consolidation.")],
            ("test", "radiology"): [("ROCO_00003", "MRI of the knee."), ("ROCO_00004", "")]}
    for (split, subset), items in rows.items():
        folder = data / split / subset
        lines = [f"{rid}\t{cap}" for rid, cap in items] + [""]
        write(folder / "captions.txt", "\n".join(lines))
        for k, (rid, _) in enumerate(items):
            write(folder / "images" / f"{rid}.jpg", image_bytes((k * 40, 100, 7), "JPEG"))
    (data / "test/radiology/images/ROCO_00003.jpg").unlink()
    return tmp_path / "roco"


def test_roco_captions_txt_layout(roco_txt: Path) -> None:
    recs = by_id(read("roco", roco_txt))
    assert set(recs) == {"ROCO_00001", "ROCO_70001", "ROCO_00002", "ROCO_00003", "ROCO_00004"}
    r = recs["ROCO_00001"]
    assert (r.task, r.split, r.dataset, r.problem) == ("caption", "train", "roco", None)
    assert r.target == 'Computed tomography showing a "mass" (arrow).'
    assert r.image == (roco_txt / "data/train/radiology/images/ROCO_00001.jpg").read_bytes()
    assert r.image[:2] == b"\xff\xd8" and r.meta["subset"] == "radiology"
    assert r.license == "CC BY / CC BY-NC (PMC OA subset), see ROCO"
    assert recs["ROCO_70001"].meta["subset"] == "non-radiology"
    assert recs["ROCO_00002"].split == "val" and recs["ROCO_00003"].split == "test"
    assert recs["ROCO_00003"].image is None and "not found" in recs["ROCO_00003"].problem
    assert "empty caption" in recs["ROCO_00004"].problem
    only = by_id(read("roco", roco_txt, subset="non-radiology"))
    assert set(only) == {"ROCO_70001"}


def test_roco_csv_layout(tmp_path: Path) -> None:
    """The CSV re-exports: <split>/{<anything>.csv with id,name,caption, images/<name>}, no subset folders."""
    root = tmp_path / "roco_csv"
    write(root / "train/images/PMC4083729_AMJCaseRep-15-277-g002.jpg", image_bytes((5, 5, 5), "JPEG"))
    write(root / "train/images/ROCO_00011.jpg", image_bytes((6, 6, 6), "JPEG"))
    write(root / "train/traindata.csv",
          'ID,Name,Caption\n'
          'ROCO_00010,PMC4083729_AMJCaseRep-15-277-g002.jpg," Axial CT, contrast enhanced."\n'
          'ROCO_00011,PMC0000000_missing-name.jpg,Ultrasound of the liver.\n'
          'ROCO_00012,PMC1_x.jpg,Angiogram, left side\n')
    write(root / "test/images/.keep", "")
    write(root / "test/testdata.csv", "id,name,caption\nROCO_00020,../../secret.jpg,Escape attempt\n")
    recs = by_id(read("roco", root))
    assert recs["ROCO_00010"].target == "Axial CT, contrast enhanced." and recs["ROCO_00010"].problem is None
    assert recs["ROCO_00010"].image == (root / "train/images/PMC4083729_AMJCaseRep-15-277-g002.jpg").read_bytes()
    assert recs["ROCO_00011"].image == (root / "train/images/ROCO_00011.jpg").read_bytes()  # <id>.jpg fallback
    assert "4 fields" in recs["ROCO_00012"].problem and recs["ROCO_00012"].image is None
    assert recs["ROCO_00020"].split == "test" and "'..'" in recs["ROCO_00020"].problem
    assert recs["ROCO_00020"].image is None


@pytest.mark.parametrize("csv_text, match", [
    ("id,caption\nROCO_1,x\n", "id, name, caption"),
    ('id,name,caption\nROCO_1,a.jpg,"unterminated caption\n', "not a valid UTF-8 CSV"),
])
def test_roco_malformed_csv_is_a_clear_error(tmp_path: Path, csv_text: str, match: str) -> None:
    write(tmp_path / "train/images/.keep", "")
    write(tmp_path / "train/data.csv", csv_text)
    with pytest.raises(GalenInputError, match=match):
        read("roco", tmp_path)


def test_roco_structural_problems(tmp_path: Path, roco_txt: Path) -> None:
    with pytest.raises(GalenInputError, match="no ROCO split folder"):
        read("roco", tmp_path / "roco/data/train")
    with pytest.raises(GalenInputError, match="subset"):
        read("roco", roco_txt, subset="pathology")
    write(tmp_path / "bare/train/images/.keep", "")
    with pytest.raises(GalenInputError, match="captions.txt"):
        read("roco", tmp_path / "bare")


# ---------------------------------------------------------------- peir-gross

PEIR = {f"PEIR_GROSS_{i:03d}.jpg": f"gross specimen number {i}: liver with nodules" for i in range(40)}


@pytest.fixture
def peir_tsv(tmp_path: Path) -> Path:
    root = tmp_path / "peir_gross"
    for k, name in enumerate(PEIR):
        write(root / "images" / name, image_bytes((k, 2 * k, 3 * k), "JPEG"))
    write(root / "peir_gross.tsv", "image\tcaption\n" + "".join(f"{n}\t{c}\n" for n, c in PEIR.items()) +
          "PEIR_GROSS_999.jpg\tan image that is missing\nPEIR_GROSS_000.jpg\tduplicate caption\n")
    return root


def test_peir_gross_tsv_hash_split(peir_tsv: Path) -> None:
    recs = read("peir-gross", peir_tsv)
    ids = by_id(recs[:-1])
    assert set(ids) == set(PEIR) | {"PEIR_GROSS_999.jpg"}  # header skipped, nothing dropped
    r = ids["PEIR_GROSS_007.jpg"]
    assert (r.task, r.dataset, r.problem, r.target) == ("caption", "peir-gross", None, PEIR["PEIR_GROSS_007.jpg"])
    assert r.image == (peir_tsv / "images/PEIR_GROSS_007.jpg").read_bytes()
    assert r.license == "PEIR Digital Library, educational use"
    assert all(x.split == split_by_hash(x.source_id) for x in ids.values())
    assert {x.split for x in ids.values()} == {"train", "val", "test"}  # 41 names: all three splits appear
    assert "not found" in ids["PEIR_GROSS_999.jpg"].problem
    dup = recs[-1]
    assert "duplicate" in dup.problem and dup.split == ids["PEIR_GROSS_000.jpg"].split


def test_peir_gross_split_is_stable_under_reordering(peir_tsv: Path, tmp_path: Path) -> None:
    before = {r.meta["image_name"]: r.split for r in read("peir-gross", peir_tsv / "peir_gross.tsv")}
    lines = (peir_tsv / "peir_gross.tsv").read_text().splitlines()
    write(peir_tsv / "peir_gross.tsv", "\n".join([lines[0]] + lines[1:][::-1]) + "\n")
    after = {r.meta["image_name"]: r.split for r in read("peir-gross", peir_tsv)}
    assert before == after and len(after) == len(PEIR) + 1


def test_peir_gross_json_mapping(tmp_path: Path) -> None:
    root = tmp_path / "peir"
    write(root / "a.jpg", image_bytes((1, 1, 1), "JPEG"))
    write(root / "b.png", image_bytes((2, 2, 2)))
    write(root / "captions.json", json.dumps({"a.jpg": "Kidney: polycystic.", "b.png": 42}))
    recs = by_id(read("peir-gross", root))  # images beside the mapping (no images/ folder)
    assert recs["a.jpg"].target == "Kidney: polycystic." and recs["a.jpg"].image == (root / "a.jpg").read_bytes()
    assert recs["b.png"].image is not None and "not text" in recs["b.png"].problem


@pytest.mark.parametrize("name, content, match", [
    ("captions.json", '{"a.jpg": "x",', "not valid JSON"),
    ("captions.json", '[["a.jpg", "x"]]', "JSON list"),
    ("captions.csv", 'image,caption\na.jpg,"open quote\n', "not a valid UTF-8 CSV"),
])
def test_peir_gross_malformed_mapping_is_a_clear_error(tmp_path: Path, name: str, content: str, match: str) -> None:
    write(tmp_path / name, content)
    with pytest.raises(GalenInputError, match=match):
        read("peir-gross", tmp_path)


def test_peir_gross_ambiguous_folder(tmp_path: Path) -> None:
    write(tmp_path / "a.tsv", "a.jpg\tx\n")
    write(tmp_path / "b.json", "{}")
    with pytest.raises(GalenInputError, match="exactly one"):
        read("peir-gross", tmp_path)


# ---------------------------------------------------------------- medicat

MEDICAT_NAME = "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"


def medicat_line(pdf: str, fig: str, caption: str, **extra) -> str:
    return json.dumps({"pdf_hash": pdf, "fig_uri": fig, "s2_caption": caption, **extra})


@pytest.fixture
def medicat(tmp_path: Path) -> Path:
    root = tmp_path / "medicat" / "release"
    papers = [f"{uuid.UUID(int=i).hex}" for i in range(30)]
    lines = []
    for i, pdf in enumerate(papers):
        for f in range(2):
            fig = f"{pdf}_Figure{f + 1}.png"
            write(root / "figures" / fig, image_bytes((i, f, 9)))
            lines.append(medicat_line(pdf, fig, f"Figure {f + 1}. Findings of paper {i}.",
                                      inline_references=[{"text": f"as shown in Fig. {f + 1}"}],
                                      s2orc_references=["Fig. 1"]))
    lines.insert(5, '{"pdf_hash": "cut-off line", "fig_uri": ')            # corrupt line in the middle
    lines.append(medicat_line("p-missing", "p-missing_Figure1.png", "A figure whose file is absent."))
    write(root / "figures/p-nocap_Figure1.png", image_bytes((3, 3, 3)))
    lines.append(json.dumps({"pdf_hash": "p-nocap", "fig_uri": "p-nocap_Figure1.png"}))
    lines.append(medicat_line("p-evil", "../../../etc/passwd", "escape"))
    write(root / MEDICAT_NAME, "\n".join(lines) + "\n\n")
    return root


def test_medicat_figures_of_a_paper_share_a_split(medicat: Path) -> None:
    recs = read("medicat", medicat)
    ids = by_id(recs)
    assert len(recs) == 60 + 4  # every line, bad ones included
    pdf = uuid.UUID(int=3).hex
    f1, f2 = ids[f"{pdf}_Figure1.png"], ids[f"{pdf}_Figure2.png"]
    assert (f1.task, f1.dataset, f1.problem) == ("caption", "medicat", None)
    assert f1.target == "Figure 1. Findings of paper 3."
    assert f1.image == (medicat / "figures" / f"{pdf}_Figure1.png").read_bytes()
    assert f1.meta["inline_references"] == [{"text": "as shown in Fig. 1"}] and f1.meta["pdf_hash"] == pdf
    assert "research use" in f1.license
    assert f2.split == f1.split and f2.problem is None  # two figures of one paper, one split
    good = [r for r in recs if r.problem is None]
    for r in good:
        assert r.split == split_by_hash(r.meta["pdf_hash"])
    by_paper: dict[str, set] = {}
    for r in good:
        by_paper.setdefault(r.meta["pdf_hash"], set()).add(r.split)
    assert all(len(s) == 1 for s in by_paper.values()) and len({r.split for r in good}) >= 2
    # hashing figures instead of papers would have split at least one paper across splits
    assert any(len({split_by_hash(r.source_id) for r in good if r.meta["pdf_hash"] == p}) > 1 for p in by_paper)


def test_medicat_bad_lines_become_problem_records(medicat: Path) -> None:
    recs = read("medicat", medicat)
    problems = {r.source_id: r.problem for r in recs if r.problem}
    cut = next(v for k, v in problems.items() if k.startswith(MEDICAT_NAME + ":"))
    assert "not valid JSON" in cut
    assert "not found" in problems["p-missing_Figure1.png"]
    assert "s2_caption" in problems["p-nocap_Figure1.png"] and "empty caption" in problems["p-nocap_Figure1.png"]
    assert "'..'" in problems["../../../etc/passwd"]
    assert len(problems) == 4


def test_medicat_not_jsonl_is_a_clear_error(tmp_path: Path) -> None:
    write(tmp_path / "figures/.keep", "")
    write(tmp_path / "medicat.jsonl", json.dumps([{"pdf_hash": "a", "fig_uri": "b", "s2_caption": "c"}], indent=1))
    with pytest.raises(GalenInputError, match="JSON Lines"):
        read("medicat", tmp_path)
    with pytest.raises(GalenInputError, match="figure folder"):
        read("medicat", tmp_path, image_root=str(tmp_path / "nope"))


# ---------------------------------------------------------------- caption-csv

def test_caption_csv_columns_paths_and_splits(tmp_path: Path) -> None:
    root = tmp_path / "captions"
    a = write(root / "imgs/a.png", image_bytes((1, 2, 3))).read_bytes()
    b = write(root / "imgs/sub/b.jpg", image_bytes((4, 5, 6), "JPEG")).read_bytes()
    write(tmp_path / "outside.png", image_bytes((7, 7, 7)))
    write(root / "pairs.csv",
          "FilePath,Caption,Split,modality\n"
          "imgs/a.png,An axial CT slice.,validation,CT\n"
          "imgs/a.png,Second caption of the same image.,,CT\n"
          "imgs/sub/b.jpg,\"Fundus photo, left eye.\",test,fundus\n"
          "\n"
          "imgs/c.png,Missing image.,train,CT\n"
          "../outside.png,Escapes.,train,CT\n"
          "imgs/a.png,Bad split.,holdout,CT\n")
    recs = by_id(read("caption-csv", root, dataset="my-captions", license="CC BY 4.0"))
    assert list(recs)[:3] == ["imgs/a.png", "imgs/a.png#1", "imgs/sub/b.jpg"]
    first = recs["imgs/a.png"]
    assert (first.task, first.split, first.dataset, first.license, first.problem) == \
        ("caption", "val", "my-captions", "CC BY 4.0", None)
    assert first.image == a and first.meta["modality"] == "CT"
    assert recs["imgs/a.png#1"].split == split_by_hash("imgs/a.png")  # no split cell: hash of the path
    assert recs["imgs/sub/b.jpg"].target == "Fundus photo, left eye." and recs["imgs/sub/b.jpg"].image == b
    assert "not found" in recs["imgs/c.png"].problem
    assert "'..'" in recs["../outside.png"].problem and recs["../outside.png"].image is None
    assert "unknown split 'holdout'" in recs["imgs/a.png#2"].problem


def test_caption_csv_image_column_and_defaults(tmp_path: Path) -> None:
    write(tmp_path / "x.png", image_bytes((3, 3, 3)))
    csv_path = write(tmp_path / "data.csv", "image,caption\nx.png,Dermoscopy of a naevus.\nx.png,a, b\n")
    recs = read("caption-csv", csv_path)
    assert recs[0].dataset == "caption-csv" and recs[0].license.startswith("unspecified")
    assert recs[0].split == split_by_hash("x.png") and recs[0].problem is None
    assert "3 fields" in recs[1].problem


@pytest.mark.parametrize("files, match", [
    ({"a.csv": "path,text\nx.png,y\n"}, "filepath"),
    ({"a.csv": 'filepath,caption\nx.png,"never closed\n'}, "not a valid UTF-8 CSV"),
    ({"a.csv": ""}, "empty"),
    ({"a.csv": "filepath,caption\n", "b.csv": "filepath,caption\n"}, "exactly one"),
    ({}, "exactly one"),
])
def test_caption_csv_structural_errors(tmp_path: Path, files: dict[str, str], match: str) -> None:
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(GalenInputError, match=match):
        read("caption-csv", tmp_path)


# ---------------------------------------------------------------- webdataset

def add_member(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE,
               link: str = "") -> None:
    info = tarfile.TarInfo(name)  # TarInfo keeps the name verbatim (absolute, "..")
    info.size, info.type, info.linkname, info.mtime = (len(data) if kind == tarfile.REGTYPE else 0), kind, link, 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


ABS_NAME = f"/tmp/galen-test-{uuid.uuid4().hex}.jpg"


@pytest.fixture
def wds(tmp_path: Path) -> Path:
    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "shard-000000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "000000.jpg", image_bytes((200, 0, 0), "JPEG"))
        add_member(tar, "000000.txt", b"A chest radiograph.\n")
        add_member(tar, "000000.json", json.dumps({"source": "pmc", "width": 8}).encode())
        add_member(tar, "../evil.txt", b"pwned")
        add_member(tar, ABS_NAME, image_bytes((1, 1, 1), "JPEG"))
        add_member(tar, "000001.png", image_bytes((0, 200, 0)))
        add_member(tar, "000001.txt", b"Skin lesion, dermoscopy.")
        add_member(tar, "000002.jpg", image_bytes((0, 0, 200), "JPEG"))  # no caption
    with tarfile.open(root / "shard-000001.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "000003.txt", b"Caption without an image.")
        add_member(tar, "000004.jpg", b"\xff\xd8 not really decoded here")
        add_member(tar, "000004.txt", b"Bytes kept as stored.")
        add_member(tar, "000004.json", b"{broken")
        add_member(tar, "000006.png", image_bytes((6, 6, 6)))
        add_member(tar, "000006.txt", b"first caption")
        add_member(tar, "000006.txt", b"second member with the same name")
        add_member(tar, "000005.jpg", b"", kind=tarfile.SYMTYPE, link="/etc/passwd")
    write(root / "README.md", "not a shard")
    return root


def test_webdataset_samples(wds: Path) -> None:
    recs = by_id(read("webdataset", wds))
    assert set(recs) == {"000000", "000001", "000002", "000003", "000004", "000006", "shard-000000.tar:../evil.txt",
                         f"shard-000000.tar:{ABS_NAME}", "shard-000001.tar:000005.jpg"}
    r = recs["000000"]
    assert (r.task, r.dataset, r.target, r.problem) == ("caption", "webdataset", "A chest radiograph.", None)
    assert r.image == image_bytes((200, 0, 0), "JPEG") and r.meta["json"] == {"source": "pmc", "width": 8}
    assert r.meta["shard"] == "shard-000000.tar" and r.split == split_by_hash("000000")
    assert recs["000001"].image[:8] == b"\x89PNG\r\n\x1a\n" and recs["000001"].problem is None
    assert "no caption member" in recs["000002"].problem and "no image member" in recs["000003"].problem
    assert recs["000004"].image == b"\xff\xd8 not really decoded here"
    assert "not valid JSON" in recs["000004"].problem
    assert "duplicate member 000006.txt" in recs["000006"].problem and recs["000006"].target == "first caption"
    assert "'..'" in recs["shard-000000.tar:../evil.txt"].problem
    assert "absolute" in recs[f"shard-000000.tar:{ABS_NAME}"].problem
    assert "link" in recs["shard-000001.tar:000005.jpg"].problem
    assert all(recs[k].image is None for k in recs if ":" in k)


def test_webdataset_split_option_and_single_shard(wds: Path) -> None:
    recs = read("webdataset", wds / "shard-000001.tar", split="validation", dataset="pmc-oa", license="CC BY")
    assert {r.split for r in recs} == {"val"} and {r.dataset for r in recs} == {"pmc-oa"}
    assert {r.source_id for r in recs} == {"000003", "000004", "000006", "shard-000001.tar:000005.jpg"}
    with pytest.raises(GalenInputError, match="split"):
        read("webdataset", wds, split="holdout")


def test_webdataset_never_writes_outside_the_output(wds: Path, tmp_path: Path) -> None:
    before = tree(tmp_path)
    out = tmp_path / "out"
    recs = roundtrip("webdataset", wds, out)
    assert len(recs) == 9
    after = tree(tmp_path)
    created = set(after) - set(before)
    assert created and all(p.startswith("out/") and p.endswith((".parquet", "/ingest.json")) for p in created), created
    assert all(after[p] == before[p] for p in before)
    assert not (tmp_path / "evil.txt").exists() and not (wds.parent / "evil.txt").exists()
    assert not Path(ABS_NAME).exists() and not Path.cwd().joinpath("evil.txt").exists()


@pytest.mark.parametrize("cut", ["mid_data", "mid_header", "no_end_marker", "garbage_header"])
def test_webdataset_truncated_shard_is_an_error_naming_it(wds: Path, tmp_path: Path, cut: str) -> None:
    shard = wds / "shard-000001.tar"
    raw = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    last = members[-1].offset  # header of the last member
    damaged = {"mid_data": raw[:members[1].offset_data + 10], "mid_header": raw[:last + 100],
               "no_end_marker": raw[:last], "garbage_header": raw[:last] + b"\x07" * 1024}[cut]
    shard.write_bytes(damaged)
    with pytest.raises(GalenInputError, match="shard-000001.tar.*truncated or corrupt"):
        read("webdataset", wds)
    out = tmp_path / "out"
    with pytest.raises(GalenInputError, match="shard-000001.tar"):
        ingest("webdataset", wds, out)
    assert not list(out.glob("*.parquet"))  # checked before anything is written


def test_webdataset_gzipped_shard(tmp_path: Path) -> None:
    shard = tmp_path / "shard-000000.tar.gz"
    with tarfile.open(shard, "w:gz") as tar:
        add_member(tar, "a.png", image_bytes((8, 8, 8)))
        add_member(tar, "a.txt", b"Gzipped sample.")
    (r,) = read("webdataset", tmp_path)
    assert r.target == "Gzipped sample." and r.image == image_bytes((8, 8, 8)) and r.problem is None
    shard.write_bytes(shard.read_bytes()[:-30])
    with pytest.raises(GalenInputError, match="shard-000000.tar.gz"):
        read("webdataset", tmp_path)


def test_webdataset_not_a_tar(tmp_path: Path) -> None:
    write(tmp_path / "shard-000000.tar", b"this is not a tar archive" * 40)
    with pytest.raises(GalenInputError, match="shard-000000.tar"):
        read("webdataset", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(GalenInputError, match="no tar shards"):
        read("webdataset", tmp_path / "empty")


# ---------------------------------------------------------------- all formats

def test_every_caption_format_is_registered() -> None:
    for name in ("r2gen", "roco", "peir-gross", "medicat", "caption-csv", "webdataset"):
        fmt = get_format(name)
        assert fmt.name == name and fmt.description and callable(fmt.read)


@pytest.fixture
def all_sources(iu_xray: Path, roco_txt: Path, peir_tsv: Path, medicat: Path, wds: Path,
                tmp_path: Path) -> dict[str, Path]:
    write(tmp_path / "csv/img.png", image_bytes((9, 9, 9)))
    write(tmp_path / "csv/captions.csv", "filepath,caption\nimg.png,Retinal OCT.\n")
    return {"r2gen": iu_xray, "roco": roco_txt, "peir-gross": peir_tsv, "medicat": medicat,
            "caption-csv": tmp_path / "csv", "webdataset": wds}


def test_ingest_roundtrip_is_deterministic_and_stays_in_out_dir(all_sources: dict[str, Path], tmp_path: Path) -> None:
    before = tree(tmp_path)
    for fmt, source in all_sources.items():
        first = roundtrip(fmt, source, tmp_path / "out" / fmt / "a")
        second = roundtrip(fmt, source, tmp_path / "out" / fmt / "b", rows_per_shard=3)
        assert [to_row(r) for r in first] == [to_row(r) for r in second], fmt
        assert first and all(r.task == "caption" and r.license for r in first), fmt
        assert any(r.problem is None and r.image and r.target for r in first), fmt
    after = tree(tmp_path)
    assert all(after[p] == before[p] for p in before)
    assert all(p.startswith("out/") and p.endswith((".parquet", "/ingest.json")) for p in set(after) - set(before))
