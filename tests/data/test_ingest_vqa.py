"""Ingest adapters of the VQA/caption sources beyond VQA-RAD: SLAKE JSON, PathVQA Parquet, OFA/BiomedGPT TSV.

Each fixture is written in the dataset's real layout with small real JPEG/PNG images, so the
tests check what a download would give: fields, splits, licences, image bytes kept verbatim,
record-level problems instead of crashes, and structural errors that say what to fix.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from galen.flows.ingest import ingest, ofa_tsv, pathvqa, slake
from galen.flows.ingest.schema import Record, read_records
from galen.model.errors import GalenInputError


def image_bytes(color: tuple[int, int, int], fmt: str = "JPEG", size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


def by_id(records: list[Record]) -> dict[str, Record]:
    return {r.source_id: r for r in records}


# ---------------------------------------------------------------------------------------------- SLAKE

def slake_row(qid: int, img: int, question: str, answer: str, lang: str = "en", answer_type: str = "OPEN") -> dict:
    return {"img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": question, "answer": answer,
            "q_lang": lang, "location": "Lung", "modality": "CT", "answer_type": answer_type, "base_type": "vqa",
            "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": qid}


@pytest.fixture
def slake_dir(tmp_path: Path) -> Path:
    root = tmp_path / "Slake1.0"
    for i, color in enumerate([(200, 10, 10), (10, 200, 10), (10, 10, 200)]):
        (root / "imgs" / f"xmlab{i}").mkdir(parents=True)
        (root / "imgs" / f"xmlab{i}" / "source.jpg").write_bytes(image_bytes(color))
    (root / "train.json").write_text(json.dumps([
        slake_row(0, 0, "Which organ is shown?", "Lung"),
        slake_row(1, 0, "图中是什么器官?", "肺", lang="zh"),
        slake_row(2, 1, "Is this a CT image?", "Yes", answer_type="CLOSED"),
    ], ensure_ascii=False), encoding="utf-8")
    (root / "validate.json").write_text(json.dumps([slake_row(3, 1, "Where is the lesion?", "Left Lung ")]))
    (root / "test.json").write_text(json.dumps([
        slake_row(4, 2, "What modality is used?", "CT"),
        slake_row(5, 2, "这是什么模态?", "CT", lang="zh"),
    ], ensure_ascii=False), encoding="utf-8")
    return root


def test_slake_reads_english_records_with_splits_fields_and_image_bytes(slake_dir: Path) -> None:
    records = by_id(list(slake.read(slake_dir)))
    assert sorted(records) == ["0", "2", "3", "4"]  # Chinese questions 1 and 5 left out by default
    assert {r.split for r in records.values()} == {"train", "val", "test"}
    assert records["3"].split == "val" and records["4"].split == "test" and records["0"].split == "train"
    r = records["2"]
    assert (r.task, r.dataset, r.question, r.target, r.answer_type) == \
        ("vqa", "slake", "Is this a CT image?", "Yes", "CLOSED")
    assert r.image == (slake_dir / "imgs" / "xmlab1" / "source.jpg").read_bytes()
    assert r.license == "CC BY 4.0 (SLAKE, Liu et al. 2021)" and r.problem is None
    assert r.meta == {"img_id": 1, "img_name": "xmlab1/source.jpg", "q_lang": "en", "modality": "CT",
                      "location": "Lung", "content_type": "Organ", "base_type": "vqa", "triple": ["vhead", "_", "_"],
                      "qid": 2}
    assert records["3"].target == "Left Lung"  # stray whitespace trimmed
    assert records["0"].answer_type == "OPEN"


@pytest.mark.parametrize("language,expected", [("zh", ["1", "5"]), ("all", ["0", "1", "2", "3", "4", "5"]),
                                               ("EN", ["0", "2", "3", "4"])])
def test_slake_language_option(slake_dir: Path, language: str, expected: list[str]) -> None:
    records = list(slake.read(slake_dir, language=language))
    assert sorted(r.source_id for r in records) == expected
    if language == "zh":
        assert by_id(records)["1"].question == "图中是什么器官?" and by_id(records)["1"].target == "肺"


def test_slake_rejects_unknown_language_and_options(slake_dir: Path) -> None:
    with pytest.raises(GalenInputError, match="language must be one of"):
        list(slake.read(slake_dir, language="fr"))
    with pytest.raises(GalenInputError, match="unknown options"):
        list(slake.read(slake_dir, langauge="zh"))


def test_slake_through_ingest_matches_direct_read(slake_dir: Path, tmp_path: Path) -> None:
    result = ingest("slake", slake_dir, tmp_path / "out")
    assert result == {"format": "slake", "records": 4, "with_problems": 0,
                      "by_task_split": {"vqa/train": 2, "vqa/val": 1, "vqa/test": 1}}
    stored = by_id(list(read_records(tmp_path / "out")))
    direct = by_id(list(slake.read(slake_dir)))
    assert stored == direct
    assert stored["4"].image == (slake_dir / "imgs" / "xmlab2" / "source.jpg").read_bytes()


def test_slake_missing_image_and_missing_keys_are_problems(slake_dir: Path, tmp_path: Path) -> None:
    rows = json.loads((slake_dir / "train.json").read_text(encoding="utf-8"))
    rows.append(slake_row(10, 99, "Is there a tumor?", "No", answer_type="CLOSED"))  # imgs/xmlab99 does not exist
    rows.append({"qid": 11, "img_name": "xmlab0/source.jpg", "q_lang": "en", "question": "No answer here?"})
    rows.append(["not", "an", "object"])
    (slake_dir / "train.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    result = ingest("slake", slake_dir, tmp_path / "out")
    assert result["records"] == 7 and result["with_problems"] == 3
    stored = by_id(list(read_records(tmp_path / "out")))
    assert "img_name 'xmlab99/source.jpg': file not found" in stored["10"].problem and stored["10"].image is None
    assert stored["10"].question == "Is there a tumor?"  # the rest of the record is still kept
    assert "missing keys ['answer']" in stored["11"].problem
    assert stored["train.json:5"].problem == "record is not a JSON object"


def test_slake_path_traversal_is_a_problem_and_the_file_is_not_read(slake_dir: Path) -> None:
    secret = slake_dir / "secret.jpg"  # inside the source, but outside imgs/
    secret.write_bytes(image_bytes((1, 2, 3)))
    rows = [slake_row(20, 0, "q?", "a"), slake_row(21, 0, "q?", "a"), slake_row(22, 0, "q?", "a")]
    rows[0]["img_name"] = "../../etc/passwd"
    rows[1]["img_name"] = "../secret.jpg"
    rows[2]["img_name"] = str(secret)  # absolute path
    (slake_dir / "train.json").write_text(json.dumps(rows))
    records = by_id(list(slake.read(slake_dir)))
    for qid, why in (("20", "'..'"), ("21", "'..'"), ("22", "absolute path")):
        assert records[qid].image is None
        assert records[qid].problem.startswith("img_name ") and why in records[qid].problem


def test_slake_structural_errors_say_what_to_fix(slake_dir: Path, tmp_path: Path) -> None:
    (slake_dir / "validate.json").write_text('[{"qid": 1, "question": ')
    with pytest.raises(GalenInputError, match=r"validate\.json is not valid JSON.*re-download"):
        list(slake.read(slake_dir))
    (slake_dir / "validate.json").write_text('{"qid": 1}')
    with pytest.raises(GalenInputError, match="must hold a JSON list"):
        list(slake.read(slake_dir))
    empty = tmp_path / "empty"
    (empty / "imgs").mkdir(parents=True)
    with pytest.raises(GalenInputError, match="has none of.*train.json"):
        list(slake.read(empty))
    (tmp_path / "noimgs").mkdir()
    (tmp_path / "noimgs" / "train.json").write_text("[]")
    with pytest.raises(GalenInputError, match="no imgs/ folder"):
        list(slake.read(tmp_path / "noimgs"))


# ---------------------------------------------------------------------------------------------- PathVQA

PATH_IMAGES = [image_bytes((120, 40, 90)), image_bytes((90, 120, 40), "PNG"), image_bytes((40, 90, 120))]


def write_pathvqa(path: Path, rows: list[tuple[bytes | None, str | None, str | None]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([None if b is None else {"bytes": b, "path": f"img{i}.jpg"}
                           for i, (b, _, _) in enumerate(rows)], type=image_type),
        "question": pa.array([q for _, q, _ in rows], type=pa.string()),
        "answer": pa.array([a for _, _, a in rows], type=pa.string()),
    })
    pq.write_table(table, path)


@pytest.fixture
def pathvqa_dir(tmp_path: Path) -> Path:
    root = tmp_path / "path-vqa"
    write_pathvqa(root / "data" / "train-00000-of-00002.parquet", [
        (PATH_IMAGES[0], "is this a carcinoma?", "yes"),
        (PATH_IMAGES[1], "what are the cells arranged in?", "nests"),
    ])
    write_pathvqa(root / "data" / "train-00001-of-00002.parquet", [(PATH_IMAGES[2], "is there necrosis?", "No")])
    write_pathvqa(root / "data" / "validation-00000-of-00001.parquet", [(PATH_IMAGES[0], "what is shown?", "liver")])
    write_pathvqa(root / "data" / "test-00000-of-00001.parquet", [(PATH_IMAGES[1], "does this show fibrosis?", "no")])
    return root


def test_pathvqa_reads_splits_answer_types_and_embedded_images(pathvqa_dir: Path) -> None:
    records = by_id(list(pathvqa.read(pathvqa_dir)))
    assert sorted(records) == ["test/test-00000-of-00001.parquet:0", "train/train-00000-of-00002.parquet:0",
                               "train/train-00000-of-00002.parquet:1", "train/train-00001-of-00002.parquet:0",
                               "val/validation-00000-of-00001.parquet:0"]
    r = records["train/train-00000-of-00002.parquet:1"]
    assert (r.task, r.split, r.dataset, r.question, r.target, r.answer_type) == \
        ("vqa", "train", "pathvqa", "what are the cells arranged in?", "nests", "OPEN")
    assert r.image == PATH_IMAGES[1]
    assert r.license == "MIT (PathVQA, He et al. 2020)" and r.problem is None
    assert r.meta == {"file": "data/train-00000-of-00002.parquet", "row": 1, "image_path": "img1.jpg"}
    assert records["train/train-00000-of-00002.parquet:0"].answer_type == "CLOSED"
    assert records["train/train-00001-of-00002.parquet:0"].answer_type == "CLOSED"  # "No": case does not matter
    assert records["val/validation-00000-of-00001.parquet:0"].split == "val"
    assert records["test/test-00000-of-00001.parquet:0"].answer_type == "CLOSED"
    assert records["test/test-00000-of-00001.parquet:0"].image == PATH_IMAGES[1]


def test_pathvqa_streams_in_batches_across_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [(image_bytes((i * 20, 0, 0)), f"question {i}?", "yes" if i % 2 else f"answer {i}") for i in range(7)]
    write_pathvqa(tmp_path / "pv" / "train.parquet", rows)
    monkeypatch.setattr(pathvqa, "BATCH_ROWS", 3)
    seen_batch_sizes: list[int] = []
    real_iter = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in real_iter(self, *args, **kwargs):
            seen_batch_sizes.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    records = list(pathvqa.read(tmp_path / "pv"))
    assert seen_batch_sizes == [3, 3, 1]
    assert [r.question for r in records] == [f"question {i}?" for i in range(7)]
    assert [r.image for r in records] == [b for b, _, _ in rows]
    assert [r.answer_type for r in records] == ["OPEN", "CLOSED"] * 3 + ["OPEN"]
    assert [r.source_id for r in records] == [f"train/train.parquet:{i}" for i in range(7)]


def test_pathvqa_split_from_plain_names_and_folders(tmp_path: Path) -> None:
    write_pathvqa(tmp_path / "a" / "train.parquet", [(PATH_IMAGES[0], "q?", "yes")])
    write_pathvqa(tmp_path / "a" / "val.parquet", [(PATH_IMAGES[0], "q?", "yes")])
    write_pathvqa(tmp_path / "a" / "test.parquet", [(PATH_IMAGES[0], "q?", "yes")])
    assert sorted(r.split for r in pathvqa.read(tmp_path / "a")) == ["test", "train", "val"]
    write_pathvqa(tmp_path / "b" / "validation" / "0000.parquet", [(PATH_IMAGES[0], "q?", "no")])
    write_pathvqa(tmp_path / "b" / "test" / "0000.parquet", [(PATH_IMAGES[0], "q?", "no")])
    records = list(pathvqa.read(tmp_path / "b"))
    assert sorted((r.split, r.source_id) for r in records) == [("test", "test/0000.parquet:0"),
                                                                ("val", "val/0000.parquet:0")]
    assert [r.split for r in pathvqa.read(tmp_path / "a" / "test.parquet")] == ["test"]  # a single file


def test_pathvqa_through_ingest_with_missing_image_problem(pathvqa_dir: Path, tmp_path: Path) -> None:
    write_pathvqa(pathvqa_dir / "data" / "test-00000-of-00001.parquet",
                  [(None, "is this benign?", "yes"), (PATH_IMAGES[2], "what organ?", None)])
    result = ingest("pathvqa", pathvqa_dir, tmp_path / "out")
    assert result["records"] == 6 and result["with_problems"] == 2
    assert result["by_task_split"] == {"vqa/train": 3, "vqa/val": 1, "vqa/test": 2}
    stored = by_id(list(read_records(tmp_path / "out")))
    assert stored == by_id(list(pathvqa.read(pathvqa_dir)))
    no_image = stored["test/test-00000-of-00001.parquet:0"]
    assert no_image.image is None and no_image.problem == "missing ['image']" and no_image.target == "yes"
    no_answer = stored["test/test-00000-of-00001.parquet:1"]
    assert no_answer.problem == "missing ['answer']" and no_answer.answer_type is None
    assert no_answer.image == PATH_IMAGES[2]


def test_pathvqa_structural_errors(tmp_path: Path) -> None:
    bad = tmp_path / "cols"
    bad.mkdir()
    pq.write_table(pa.table({"image": [b"x"], "question": ["q"], "label": ["yes"]}), bad / "train.parquet")
    with pytest.raises(GalenInputError, match=r"lacks columns \['answer'\].*has \['image', 'question', 'label'\]"):
        list(pathvqa.read(bad))
    notpq = tmp_path / "notpq"
    notpq.mkdir()
    (notpq / "train-00000-of-00001.parquet").write_text("this is not parquet")
    with pytest.raises(GalenInputError, match="not a readable Parquet file"):
        list(pathvqa.read(notpq))
    unnamed = tmp_path / "unnamed"
    write_pathvqa(unnamed / "shard-0.parquet", [(PATH_IMAGES[0], "q?", "yes")])
    with pytest.raises(GalenInputError, match="cannot tell the split.*shard-0.parquet"):
        list(pathvqa.read(unnamed))
    (tmp_path / "none").mkdir()
    with pytest.raises(GalenInputError, match="no \\*.parquet files"):
        list(pathvqa.read(tmp_path / "none"))


# ---------------------------------------------------------------------------------------------- OFA TSV

OFA_IMAGES = [image_bytes((250, 128, 3)), image_bytes((3, 128, 250), "PNG"), image_bytes((128, 250, 3))]


def b64(data: bytes, urlsafe: bool = True) -> str:
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()


def write_tsv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def ofa_vqa_dir(tmp_path: Path) -> Path:
    root = tmp_path / "slake_ofa"
    write_tsv(root / "slake_train.tsv", [
        ["101", "img7", "is this a ct scan?", "1.0|!+yes", "", b64(OFA_IMAGES[0])],
        ["102", "img7", "which side is the lesion on?", "0.4|!+left&&0.6|!+right", "lung&&heart",
         b64(OFA_IMAGES[1], urlsafe=False)],
    ])
    write_tsv(root / "slake_val.tsv", [["201", "img8", "what organ is this?", "0.5|!+liver&&0.5|!+spleen", "",
                                       b64(OFA_IMAGES[2])]])
    write_tsv(root / "slake_test.tsv", [["301", "img9", "is there a tumor?", "1.0|!+no", "", b64(OFA_IMAGES[0])]])
    return root


def test_ofa_vqa_folder_splits_answers_and_images(ofa_vqa_dir: Path) -> None:
    records = by_id(list(ofa_tsv.read(ofa_vqa_dir, dataset="slake", license="CC BY 4.0 (SLAKE, Liu et al. 2021)")))
    assert sorted(records) == ["slake_test:301", "slake_train:101", "slake_train:102", "slake_val:201"]
    splits = [records[k].split for k in ("slake_train:101", "slake_val:201", "slake_test:301")]
    assert splits == ["train", "val", "test"]
    r = records["slake_train:102"]
    assert (r.task, r.dataset, r.question, r.target, r.answer_type) == \
        ("vqa", "slake", "which side is the lesion on?", "right", "OPEN")
    assert r.image == OFA_IMAGES[1]  # standard-alphabet base64 decodes too
    assert r.license == "CC BY 4.0 (SLAKE, Liu et al. 2021)" and r.problem is None
    assert r.meta == {"image_id": "img7", "answer_type_derived": True, "object_labels": ["lung", "heart"],
                      "answers": [{"answer": "left", "confidence": 0.4}, {"answer": "right", "confidence": 0.6}],
                      "line": 2}
    first = records["slake_train:101"]
    assert (first.target, first.answer_type, first.image) == ("yes", "CLOSED", OFA_IMAGES[0])
    assert "object_labels" not in first.meta
    tie = records["slake_val:201"]
    assert tie.target == "liver"  # equal confidence: the first listed wins
    assert [a["answer"] for a in tie.meta["answers"]] == ["liver", "spleen"]
    assert records["slake_test:301"].answer_type == "CLOSED"


def test_ofa_default_dataset_and_license(ofa_vqa_dir: Path) -> None:
    r = next(iter(ofa_tsv.read(ofa_vqa_dir / "slake_train.tsv")))
    assert r.dataset == "ofa-tsv" and "source dataset" in r.license


def test_parse_answers_and_best_answer() -> None:
    answers = ofa_tsv.parse_answers("0.3|!+no&&0.9|!+yes&&0.3|!+maybe")
    assert answers == [("no", 0.3), ("yes", 0.9), ("maybe", 0.3)]
    assert ofa_tsv.best_answer(answers) == "yes"
    assert ofa_tsv.best_answer([("a", 0.5), ("b", 0.5)]) == "a"
    for bad in ("yes", "high|!+yes", "1.0|!+"):
        with pytest.raises(ValueError):
            ofa_tsv.parse_answers(bad)


def test_ofa_caption_inferred_from_five_columns(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "peir_test.tsv", [
        ["1", "p1", "gross specimen of the liver with metastases", "", b64(OFA_IMAGES[2])],
        ["2", "p2", "first reference&&second reference", "liver", b64(OFA_IMAGES[0])],
    ])
    records = list(ofa_tsv.read(path))
    assert [(r.task, r.split, r.source_id) for r in records] == [("caption", "test", "peir_test:1"),
                                                                 ("caption", "test", "peir_test:2")]
    assert records[0].target == "gross specimen of the liver with metastases" and records[0].image == OFA_IMAGES[2]
    assert records[0].question is None and records[0].answer_type is None
    assert records[1].target == "first reference"
    assert records[1].meta == {"image_id": "p2", "object_labels": ["liver"],
                               "references": ["first reference", "second reference"], "line": 2}


def test_ofa_single_file_split_option_and_default(tmp_path: Path) -> None:
    row = [["1", "i", "q?", "1.0|!+yes", "", b64(OFA_IMAGES[0])]]
    plain = write_tsv(tmp_path / "vqa.tsv", row)
    assert [r.split for r in ofa_tsv.read(plain)] == ["train"]
    assert [r.split for r in ofa_tsv.read(plain, split="test")] == ["test"]
    assert [r.split for r in ofa_tsv.read(plain, split="validation")] == ["val"]
    named = write_tsv(tmp_path / "rad_test.tsv", row)
    assert [r.split for r in ofa_tsv.read(named)] == ["test"]  # the name wins over the train default
    with pytest.raises(GalenInputError, match="split must be one of"):
        list(ofa_tsv.read(plain, split="holdout"))
    with pytest.raises(GalenInputError, match="applies to a single .tsv file"):
        list(ofa_tsv.read(tmp_path, split="train"))


def test_ofa_through_ingest_counts_bad_base64_and_bad_rows(ofa_vqa_dir: Path, tmp_path: Path) -> None:
    with (ofa_vqa_dir / "slake_train.tsv").open("a", encoding="utf-8") as f:
        f.write("\t".join(["103", "img9", "is it normal?", "1.0|!+yes", "", "%%%not base64%%%"]) + "\n")
        f.write("\t".join(["104", "img9", "what is it?", "liver", "", b64(OFA_IMAGES[0])]) + "\n")
        f.write("\t".join(["105", "img9", "too few columns", b64(OFA_IMAGES[0])]) + "\n")
        f.write("\t".join(["106", "img9", "empty image?", "1.0|!+no", "", ""]) + "\n")
        # a lenient decoder would drop the stray "*" and return b"hello": corrupt data must not pass as an image
        f.write("\t".join(["107", "img9", "stray char?", "1.0|!+no", "", "aGVs*bG8="]) + "\n")
    result = ingest("ofa-tsv", ofa_vqa_dir, tmp_path / "out", task="vqa")
    assert result["records"] == 9 and result["with_problems"] == 5
    assert result["by_task_split"] == {"vqa/train": 7, "vqa/val": 1, "vqa/test": 1}
    stored = by_id(list(read_records(tmp_path / "out")))
    assert stored == by_id(list(ofa_tsv.read(ofa_vqa_dir, task="vqa")))
    bad_b64 = stored["slake_train:103"]
    assert bad_b64.image is None and "not valid base64" in bad_b64.problem and bad_b64.target == "yes"
    assert "bad answer field" in stored["slake_train:104"].problem and stored["slake_train:104"].image == OFA_IMAGES[0]
    assert stored["slake_train:105"].problem == "line 5 has 4 columns, vqa rows have 6"
    assert stored["slake_train:106"].problem == "empty image field"
    assert stored["slake_train:107"].image is None and "not valid base64" in stored["slake_train:107"].problem
    assert stored["slake_train:102"].image == OFA_IMAGES[1] and stored["slake_train:102"].target == "right"


def test_ofa_crlf_lines_and_a_missing_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "rad_val.tsv"
    rows = [["1", "i1", "is it left?", "1.0|!+yes", "", b64(OFA_IMAGES[0])],
            ["2", "i2", "what organ?", "0.7|!+lung&&0.3|!+heart", "", b64(OFA_IMAGES[1])]]
    path.write_bytes(("\t".join(rows[0]) + "\r\n\r\n" + "\t".join(rows[1])).encode())
    records = list(ofa_tsv.read(path))
    assert [(r.source_id, r.split, r.target, r.problem) for r in records] == \
        [("rad_val:1", "val", "yes", None), ("rad_val:2", "val", "lung", None)]
    assert [r.image for r in records] == OFA_IMAGES[:2]
    assert records[1].meta["answers"][-1] == {"answer": "heart", "confidence": 0.3}


def test_ofa_structural_errors(tmp_path: Path, ofa_vqa_dir: Path) -> None:
    four = write_tsv(tmp_path / "x_train.tsv", [["1", "i", "q?", b64(OFA_IMAGES[0])]])
    with pytest.raises(GalenInputError, match="has 4 tab-separated columns.*6 for VQA.*5 for captions"):
        list(ofa_tsv.read(four))
    with pytest.raises(GalenInputError, match="has 6 columns but task=caption rows have 5"):
        list(ofa_tsv.read(ofa_vqa_dir / "slake_train.tsv", task="caption"))
    with pytest.raises(GalenInputError, match="task must be one of"):
        list(ofa_tsv.read(ofa_vqa_dir, task="grounding"))
    write_tsv(ofa_vqa_dir / "slake_extra.tsv", [["1", "i", "q?", "1.0|!+yes", "", b64(OFA_IMAGES[0])]])
    with pytest.raises(GalenInputError, match=r"cannot tell the split of \['slake_extra.tsv'\]"):
        list(ofa_tsv.read(ofa_vqa_dir))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GalenInputError, match="no \\*.tsv files"):
        list(ofa_tsv.read(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------- all three

@pytest.mark.parametrize("fmt,fixture", [("slake", "slake_dir"), ("pathvqa", "pathvqa_dir"),
                                         ("ofa-tsv", "ofa_vqa_dir")])
def test_ingest_is_deterministic(fmt: str, fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    source = request.getfixturevalue(fixture)
    first = ingest(fmt, source, tmp_path / "a", rows_per_shard=2)
    second = ingest(fmt, source, tmp_path / "b", rows_per_shard=2)
    assert first == second and first["records"] >= 4
    shards_a, shards_b = sorted((tmp_path / "a").glob("*.parquet")), sorted((tmp_path / "b").glob("*.parquet"))
    assert [p.name for p in shards_a] == [p.name for p in shards_b] and len(shards_a) >= 2
    for a, b in zip(shards_a, shards_b):
        assert pq.read_table(a).equals(pq.read_table(b))
        assert all(row["image_sha1"] for row in pq.read_table(a).to_pylist())


def test_unknown_options_are_rejected(pathvqa_dir: Path, ofa_vqa_dir: Path) -> None:
    with pytest.raises(GalenInputError, match="pathvqa: unknown options"):
        list(pathvqa.read(pathvqa_dir, language="en"))
    with pytest.raises(GalenInputError, match="ofa-tsv: unknown options"):
        list(ofa_tsv.read(ofa_vqa_dir, tsk="vqa"))
