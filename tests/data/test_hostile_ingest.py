"""Hostile input at the ingest edge: paths that leave the dataset, fields of the wrong type, invalid Unicode.

Every dataset is written in tmp_path in its real layout and read by the real adapter through
`ingest()` (and `galen ingest` through the CLI), then validated, so the assertions are about what a
user would get: the hostile row is quarantined with a reason naming the field (and the path), every
other row is still ingested, rows in = valid rows + quarantined rows, and no byte of a file outside
the dataset appears in any output file, the quarantine included (the Parquet files are decompressed
and every cell searched, and the search is shown to find a marker that is legitimately there).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from galen.flows.cli import main
from galen.flows.ingest import ingest
from galen.flows.ingest.medicat import RELEASE_NAME as MEDICAT_NAME
from galen.flows.ingest.schema import Record, from_row, read_records
from galen.flows.validate import ValidationConfig, validate

SECRET = b"GALEN-OUTSIDE-SECRET-" + uuid.uuid4().hex.encode()  # the bytes that must never be ingested
INSIDE = b"GALEN-INSIDE-MARK-" + uuid.uuid4().hex.encode()      # legitimately ingested: proves the search works
COERCED = {"None", "True", "False", "123", "1.5", "['is', 'there']", "['yes']", "{'text': 'q'}", "[1]"}


def png(color: tuple[int, int, int], mark: bytes = b"") -> bytes:
    """A valid 24x24 PNG; `mark` after the IEND chunk is ignored by decoders but travels with the bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, format="PNG")
    return buf.getvalue() + mark


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data, encoding="utf-8")
    return path


def run_validate(ingested: Path, out: Path) -> tuple[dict, list[Record], list[dict]]:
    """(summary, valid records, quarantine rows with their reason) of the real validation stage."""
    summary = validate([ingested], out, ValidationConfig(max_bad_fraction=1.0))
    valid = list(read_records(out)) if list(out.glob("part-*.parquet")) else []
    return summary, valid, pq.read_table(out / "quarantine.parquet").to_pylist()


def _cells(value: Any):
    if isinstance(value, dict):
        for v in value.values():
            yield from _cells(v)
    elif isinstance(value, list):
        for v in value:
            yield from _cells(v)
    else:
        yield value


def occurs(marker: bytes, *folders: Path) -> list[str]:
    """Files under `folders` holding `marker`: Parquet decompressed, every cell searched; other files raw."""
    found = []
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if marker in path.read_bytes():
                found.append(str(path))
            elif path.suffix == ".parquet":
                for row in pq.read_table(path).to_pylist():
                    for cell in _cells(row):
                        if (isinstance(cell, bytes) and marker in cell) or \
                                (isinstance(cell, str) and marker.decode() in cell):
                            found.append(str(path))
    return found


# ------------------------------------------------------------------------------------------ 1. paths

def plant_links(root: Path, secret: Path) -> None:
    """In the folder names are relative to: a good image, a symlink pointing inside (fine), a symlink
    to the outside file and a symlinked folder leading outside."""
    write(root / "good.png", png((10, 200, 10), INSIDE))
    write(root / "sub" / "inner.png", png((10, 10, 200)))
    os.symlink(root / "sub" / "inner.png", root / "link_in.png")
    os.symlink(secret, root / "link_out.png")
    os.symlink(secret.parent, root / "dir_out")


GOOD = ["good.png", "link_in.png"]


def hostile_names(root: Path, secret: Path, json_values: bool) -> list[tuple[Any, str | None]]:
    """(path as the dataset names it, a word the reason must contain) for every hostile case."""
    cases: list[tuple[Any, str | None]] = [
        ("../../../../some/file.png", "'..'"),
        (os.path.relpath(secret, root), "'..'"),           # really reaches the outside file
        (str(secret), "absolute"),
        ("/etc/hostname", "absolute"),
        ("link_out.png", "symlink"),
        ("dir_out/secret.png", "symlink"),
    ]
    if json_values:  # only JSON can spell these
        cases += [("good.png\x00.txt", "NUL"), (7, "number"), (True, "boolean"), (["good.png"], "list"),
                  ({"path": "good.png"}, "object"), (None, None)]
    return cases


def _vqa_rad(base: Path, names: list) -> tuple:
    rows = [{"qid": i, "image_name": n, "question": f"row{i}: is there a mass?", "answer": "yes",
             "answer_type": "CLOSED"} for i, n in enumerate(names)]
    write(base / "vqa" / "trainset.json", json.dumps(rows))
    return "vqa-rad", base / "vqa", {}, "image_name"


def _slake(base: Path, names: list) -> tuple:
    rows = [{"qid": i, "img_name": n, "question": f"row{i}: which organ?", "answer": "Lung", "q_lang": "en",
             "answer_type": "OPEN"} for i, n in enumerate(names)]
    write(base / "slake" / "train.json", json.dumps(rows))
    return "slake", base / "slake", {}, "img_name"


def _caption_csv(base: Path, names: list) -> tuple:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["filepath", "caption"])
    writer.writerows([n, f"row{i}: an axial slice."] for i, n in enumerate(names))
    write(base / "cap" / "pairs.csv", buf.getvalue())
    return "caption-csv", base / "cap", {}, "filepath"


def _r2gen(base: Path, names: list) -> tuple:
    studies = [{"id": f"CXR{i}_IM-{i}", "report": f"row{i}: the heart is normal.", "image_path": [n]}
               for i, n in enumerate(names)]
    write(base / "iu" / "annotation.json", json.dumps({"train": studies}))
    return "r2gen", base / "iu", {"dataset": "iu-xray"}, "image_path[0]"


def _roco(base: Path, names: list) -> tuple:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["id", "name", "caption"])
    writer.writerows([f"ROCO_{i:05d}", n, f"row{i}: computed tomography."] for i, n in enumerate(names))
    write(base / "roco" / "train" / "captions.csv", buf.getvalue())
    return "roco", base / "roco", {}, "name"


def _medicat(base: Path, names: list) -> tuple:
    lines = [json.dumps({"pdf_hash": f"paper{i}", "fig_uri": n, "s2_caption": f"row{i}: Figure 1."})
             for i, n in enumerate(names)]
    write(base / "medicat" / MEDICAT_NAME, "\n".join(lines) + "\n")
    return "medicat", base / "medicat", {}, "fig_uri"


def _peir_gross(base: Path, names: list) -> tuple:
    write(base / "peir" / "peir_gross.json", json.dumps({n: f"row{i}: gross specimen." for i, n in enumerate(names)}))
    return "peir-gross", base / "peir", {}, "image name"


# adapter -> (writer of the dataset, folder the names are relative to, whether JSON types can be written)
PATH_ADAPTERS: dict[str, tuple[Callable, str, bool]] = {
    "vqa-rad": (_vqa_rad, "vqa/images", True),
    "slake": (_slake, "slake/imgs", True),
    "caption-csv": (_caption_csv, "cap", False),
    "r2gen": (_r2gen, "iu/images", True),
    "roco": (_roco, "roco/train/images", False),
    "medicat": (_medicat, "medicat/figures", True),
    "peir-gross": (_peir_gross, "peir/images", False),
}


def row_of(rows: list, i: int) -> list:
    """The rows (Records or quarantine dicts) whose text carries the builder's `row{i}:` tag."""
    def text(r: Any) -> str:
        get = r.get if isinstance(r, dict) else lambda k: getattr(r, k)
        return f"{get('question') or ''} {get('target') or ''}"
    return [r for r in rows if text(r).startswith(f"row{i}:") or f" row{i}:" in text(r)]


@pytest.mark.parametrize("adapter", sorted(PATH_ADAPTERS))
def test_paths_that_leave_the_dataset_are_quarantined_and_never_read(tmp_path: Path, adapter: str) -> None:
    build, rel_root, json_values = PATH_ADAPTERS[adapter]
    secret = write(tmp_path / "outside" / "secret.png", png((200, 10, 10), SECRET))  # a valid image: would pass
    base = tmp_path / "src"
    root = base / rel_root
    plant_links(root, secret)
    cases = hostile_names(root, secret, json_values)
    names = GOOD + [name for name, _ in cases]
    fmt, source, options, field = build(base, names)

    result = ingest(fmt, source, tmp_path / "ingested", **options)
    summary, valid, quarantine = run_validate(tmp_path / "ingested", tmp_path / "validated")

    # the outside file's bytes are nowhere: ingested shards, validated shards, quarantine, reports
    assert occurs(SECRET, tmp_path / "ingested", tmp_path / "validated") == []
    assert occurs(INSIDE, tmp_path / "ingested") and occurs(INSIDE, tmp_path / "validated")  # the search sees bytes
    assert result["records"] == summary["rows"] == len(names)                      # rows in = rows out
    assert summary["valid"] + summary["quarantined"] == len(names)
    assert summary["valid"] == len(GOOD) and summary["quarantined"] == len(cases)  # the good rows survive
    assert {bytes(r.image) for r in valid} == {(root / "good.png").read_bytes(), (root / "sub/inner.png").read_bytes()}
    for i, (name, word) in enumerate(cases, start=len(GOOD)):
        [row] = row_of(quarantine, i)
        reason = row["reason"]
        assert reason.startswith("ingest: ") and field in reason, (name, reason)
        if word:
            assert word in reason, (name, reason)
        if isinstance(name, str):
            assert repr(name) in reason, (name, reason)                            # names the path
        assert row["image"] is None, name


def test_vqa_rad_symlinked_image_folder_still_works(tmp_path: Path) -> None:
    """The root itself may live elsewhere (a symlinked images/): names resolve against the real root."""
    elsewhere = tmp_path / "disk2" / "images"
    write(elsewhere / "a.png", png((1, 2, 3)))
    (tmp_path / "vqa").mkdir()
    os.symlink(elsewhere, tmp_path / "vqa" / "images")
    write(tmp_path / "vqa" / "trainset.json", json.dumps([{"qid": 1, "image_name": "a.png", "question": "q?",
                                                           "answer": "yes"}]))
    [record] = list(read_records_of("vqa-rad", tmp_path / "vqa", tmp_path / "out"))
    assert record.problem is None and record.image == (elsewhere / "a.png").read_bytes()


def read_records_of(fmt: str, source: Path, out: Path, **options: Any) -> list[Record]:
    ingest(fmt, source, out, **options)
    return list(read_records(out))


def test_slake_detection_json_symlinked_outside_is_not_read(tmp_path: Path) -> None:
    outside = write(tmp_path / "outside" / "detection.json", json.dumps([{"SECRET-ORGAN": [1, 1, 4, 4]}]))
    root = tmp_path / "slake"
    write(root / "imgs" / "xmlab0" / "source.png", png((5, 5, 5)))
    os.symlink(outside, root / "imgs" / "xmlab0" / "detection.json")
    write(root / "train.json", json.dumps([{"qid": 1, "img_name": "xmlab0/source.png", "question": "q?",
                                            "answer": "a", "q_lang": "en"}]))
    records = read_records_of("slake", root, tmp_path / "out")
    grounding = [r for r in records if r.task == "grounding"]
    assert [r.problem for r in records if r.task == "vqa"] == [None]
    assert len(grounding) == 1 and "detection.json" in grounding[0].problem and "symlink" in grounding[0].problem
    assert occurs(b"SECRET-ORGAN", tmp_path / "out") == []


def test_dicom_file_symlinked_outside_the_folder_is_not_read(tmp_path: Path) -> None:
    import numpy as np

    from tests.data.test_ingest_misc import write_dicom

    pixels = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)
    secret = write_dicom(tmp_path / "outside" / "secret.dcm", pixels, series_description="SECRET SERIES")
    folder = tmp_path / "dicoms"
    write_dicom(folder / "a.dcm", pixels, series_description="AX T1")
    os.symlink(secret, folder / "evil.dcm")
    result = ingest("dicom", folder, tmp_path / "ingested")
    summary, valid, quarantine = run_validate(tmp_path / "ingested", tmp_path / "validated")
    assert result["records"] == 2 and (summary["valid"], summary["quarantined"]) == (1, 1)
    assert quarantine[0]["source_id"] == "evil.dcm" and "file 'evil.dcm' is a symlink" in quarantine[0]["reason"]
    assert occurs(b"SECRET SERIES", tmp_path / "ingested", tmp_path / "validated") == []


# ------------------------------------------------------------------------------------------ 4. types

SURROGATE = "is there \ud800 a mass?"  # JSON "\ud800": a lone surrogate, not writable as UTF-8
# (field, value, accepted text or None for "quarantined, naming the field")
VQA_CASES = [("question", None, None), ("question", 123, None), ("question", True, None),
             ("question", ["is", "there"], None), ("question", {"text": "q"}, None), ("question", SURROGATE, None),
             ("answer", None, None), ("answer", True, None), ("answer", ["yes"], None), ("answer", 1.5, None),
             ("answer", "y\udfffes", None), ("answer", 2, "2"), ("answer", 0, "0"), ("answer_type", ["OPEN"], None)]


def with_cases(base_row: Callable[[int], dict], cases: list) -> list[dict]:
    """Row 0 clean, row i (from 1) the clean row with case i-1's field set to its hostile value."""
    rows = [base_row(0)]
    for i, (field, value, _) in enumerate(cases, start=1):
        row = base_row(i)
        row[field] = value
        rows.append(row)
    return rows


def _vqa_rad_types(base: Path, cases: list) -> tuple:
    write(base / "images" / "a.png", png((9, 9, 9)))
    rows = with_cases(lambda i: {"qid": i, "image_name": "a.png", "question": f"is there a mass {i}?",
                                 "answer": "yes", "answer_type": "OPEN", "question_type": f"row{i}"}, cases)
    write(base / "trainset.json", json.dumps(rows))
    return "vqa-rad", base, {}, lambda r: r.meta["question_type"]


def _slake_types(base: Path, cases: list) -> tuple:
    write(base / "imgs" / "xmlab0" / "source.png", png((9, 9, 9)))
    rows = with_cases(lambda i: {"qid": i, "img_name": "xmlab0/source.png", "question": f"which organ {i}?",
                                 "answer": "Lung", "q_lang": "en", "answer_type": "OPEN", "location": f"row{i}"},
                      cases)
    write(base / "train.json", json.dumps(rows))
    return "slake", base, {}, lambda r: r.meta["location"]


def _mednli_types(base: Path, cases: list) -> tuple:
    rows = with_cases(lambda i: {"sentence1": f"The patient is afebrile {i}.", "sentence2": f"No fever {i}.",
                                 "gold_label": "entailment", "pairID": f"p{i}"}, cases)
    lines = [json.dumps(row).encode() for row in rows]
    lines.append(b'{"sentence1": "bad byte \xff here", "sentence2": "x", "gold_label": "neutral"}')
    write(base / "mli_train_v1.jsonl", b"\n".join(lines) + b"\n")
    return "mednli", base, {}, lambda r: f"row{r.meta['line'] - 1}"


def _r2gen_types(base: Path, cases: list) -> tuple:
    for i in range(len(cases) + 1):
        write(base / "images" / f"CXR{i}" / "0.png", png((i * 7 % 256, 40, 90)))
    studies = with_cases(lambda i: {"id": f"CXR{i}_IM-{i}", "report": f"The heart is normal in size {i}.",
                                    "image_path": [f"CXR{i}/0.png"]}, cases)
    write(base / "annotation.json", json.dumps({"train": studies}))
    return "r2gen", base, {"dataset": "iu-xray"}, lambda r: f"row{r.meta['image_path'].split('/')[0][3:]}"


def _medicat_types(base: Path, cases: list) -> tuple:
    for i in range(len(cases) + 1):
        write(base / "figures" / f"fig{i}.png", png((i * 7 % 256, 90, 40)))
    rows = with_cases(lambda i: {"pdf_hash": f"paper{i}", "fig_uri": f"fig{i}.png",
                                 "s2_caption": f"Figure {i}. A finding.", "row": f"row{i}"}, cases)
    write(base / MEDICAT_NAME, "\n".join(json.dumps(row) for row in rows) + "\n")
    return "medicat", base, {}, lambda r: r.meta["row"]


def _peir_types(base: Path, cases: list) -> tuple:
    for i in range(len(cases) + 1):
        write(base / "images" / f"img{i}.png", png((i * 7 % 256, 20, 160)))
    rows = with_cases(lambda i: {"caption": f"A gross specimen of the liver {i}."}, cases)
    write(base / "peir.json", json.dumps({f"img{i}.png": row["caption"] for i, row in enumerate(rows)}))
    return "peir-gross", base, {}, lambda r: f"row{r.meta['image_name'][3:-4]}"


TEXT = [(None, None), (123, None), (True, None), (["is", "there"], None), ({"text": "q"}, None), (SURROGATE, None)]
TYPE_ADAPTERS: dict[str, tuple[Callable, list]] = {
    "vqa-rad": (_vqa_rad_types, VQA_CASES + [("qid", [1], None)]),
    "slake": (_slake_types, VQA_CASES[:11] + [("answer", 3, "3"), ("q_lang", ["en"], None), ("q_lang", 1, None)]),
    "mednli": (_mednli_types, [("sentence1", v, a) for v, a in TEXT] + [("sentence2", ["no", "fever"], None),
                                                                       ("gold_label", True, None),
                                                                       ("gold_label", None, None),
                                                                       ("pairID", [1], None)]),
    "r2gen": (_r2gen_types, [("report", v, a) for v, a in TEXT] + [("id", ["CXR"], None)]),
    "medicat": (_medicat_types, [("s2_caption", v, a) for v, a in TEXT] + [("pdf_hash", 5, None),
                                                                          ("fig_uri", 7, None)]),
    "peir-gross": (_peir_types, [("caption", v, a) for v, a in TEXT]),
}


@pytest.mark.parametrize("adapter", sorted(TYPE_ADAPTERS))
def test_fields_of_the_wrong_type_or_invalid_unicode_are_quarantined_naming_the_field(tmp_path: Path,
                                                                                      adapter: str) -> None:
    build, cases = TYPE_ADAPTERS[adapter]
    fmt, source, options, row_key = build(tmp_path / "src", cases)
    extra = 1 if adapter == "mednli" else 0  # the line with a byte that is not UTF-8
    n_rows = 1 + len(cases) + extra

    result = ingest(fmt, source, tmp_path / "ingested", **options)  # must not crash on the lone surrogates
    summary, valid, quarantine = run_validate(tmp_path / "ingested", tmp_path / "validated")
    assert result["records"] == summary["rows"] == n_rows == summary["valid"] + summary["quarantined"]

    ingested = {row_key(r): r for r in read_records(tmp_path / "ingested")}
    valid_keys = {row_key(r) for r in valid}
    reasons = {row_key(from_row({k: v for k, v in q.items() if k != "reason"})): q["reason"] for q in quarantine}
    assert len(ingested) == n_rows and len(reasons) == summary["quarantined"]   # one row per key
    assert "row0" in valid_keys                                                     # the clean row is ingested
    for i, (field, value, accepted) in enumerate(cases, start=1):
        key = f"row{i}"
        if accepted is not None:                                                    # release ints: their text
            assert key in valid_keys, (field, value, reasons.get(key))
            assert ingested[key].target == accepted
        else:
            assert key in reasons, (field, value)
            assert reasons[key].startswith("ingest: ") and field in reasons[key], (field, value, reasons[key])
    if extra:
        assert "not UTF-8" in reasons[f"row{n_rows - 1}"]
    for r in read_records(tmp_path / "ingested"):  # never a coerced string, never an unwritable one
        for text in (r.question, r.target, r.premise, r.hypothesis, r.text, r.answer_type):
            assert text not in COERCED, (r.source_id, text, r.problem)
            assert text is None or ("\ud800" not in text and "\udfff" not in text)


def test_lone_surrogate_reason_says_what_and_where(tmp_path: Path) -> None:
    fmt, source, options, _ = _vqa_rad_types(tmp_path / "src", [("question", SURROGATE, None)])
    ingest(fmt, source, tmp_path / "out", **options)
    bad = [r for r in read_records(tmp_path / "out") if r.problem]
    assert len(bad) == 1 and bad[0].question == ""
    assert bad[0].problem == ("question is not valid Unicode (lone surrogate '\\ud800' at character 9); "
                              "text is never repaired")


def test_pathvqa_column_of_numbers_is_not_text(tmp_path: Path) -> None:
    image = {"bytes": png((3, 3, 3)), "path": "a.png"}
    (tmp_path / "pv").mkdir()
    pq.write_table(pa.table({"image": [image, image], "question": [123, 456], "answer": ["yes", "no"]}),
                   tmp_path / "pv" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"image": [{"bytes": png((4, 4, 4)), "path": "b.png"}], "question": ["what is it?"],
                             "answer": ["yes"]}), tmp_path / "pv" / "test-00000-of-00001.parquet")
    result = ingest("pathvqa", tmp_path / "pv", tmp_path / "ingested")
    summary, valid, quarantine = run_validate(tmp_path / "ingested", tmp_path / "validated")
    assert result["records"] == 3 and (summary["valid"], summary["quarantined"]) == (1, 2)
    assert valid[0].question == "what is it?"
    assert all(q["reason"].startswith("ingest: question is a number") and q["question"] == "" for q in quarantine)


def test_meqsum_parquet_numbers_are_not_text(tmp_path: Path) -> None:
    pd.DataFrame({"CHQ": ["Is aspirin safe in pregnancy?", "What is a normal pulse?"],
                  "Summary": [123, 456]}).to_parquet(tmp_path / "meqsum.parquet")
    result = ingest("meqsum", tmp_path / "meqsum.parquet", tmp_path / "ingested")
    summary, valid, quarantine = run_validate(tmp_path / "ingested", tmp_path / "validated")
    assert result["records"] == 2 == summary["quarantined"] and valid == []
    assert all("Summary is a number" in q["reason"] and q["target"] == "" for q in quarantine)


def test_ofa_tsv_line_that_is_not_utf8_is_one_quarantined_row(tmp_path: Path) -> None:
    import base64

    b64 = base64.urlsafe_b64encode(png((5, 6, 7))).decode()
    good = f"1\timg1\twhat organ is this?\t1.0|!+lung\t\t{b64}\n".encode()
    bad = f"2\timg2\twhat \xff is this?\t1.0|!+lung\t\t{b64}\n".encode("latin-1")
    write(tmp_path / "x_train.tsv", good + bad)
    result = ingest("ofa-tsv", tmp_path / "x_train.tsv", tmp_path / "ingested")
    summary, valid, quarantine = run_validate(tmp_path / "ingested", tmp_path / "validated")
    assert result["records"] == 2 and (summary["valid"], summary["quarantined"]) == (1, 1)
    assert "line 2 is not UTF-8" in quarantine[0]["reason"]


def test_webdataset_member_name_that_is_not_utf8_does_not_crash(tmp_path: Path) -> None:
    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "shard-000000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (("000000.png", png((1, 1, 1))), ("000000.txt", b"A chest film."),
                           ("\udcff\udcfe.png", png((2, 2, 2)))):  # surrogateescape: raw bytes ff fe
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = ingest("webdataset", root, tmp_path / "ingested", split="train")
    summary, valid, quarantine = run_validate(tmp_path / "ingested", tmp_path / "validated")
    assert result["records"] == 2 and (summary["valid"], summary["quarantined"]) == (1, 1)
    assert "tar member name" in quarantine[0]["reason"] and "not valid Unicode" in quarantine[0]["reason"]


# ------------------------------------------------------------------------------------------ CLI

def test_cli_row_level_problems_are_quarantine_not_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "vqa"
    secret = write(tmp_path / "outside" / "secret.png", png((200, 10, 10), SECRET))
    write(src / "images" / "a.png", png((1, 2, 3)))
    os.symlink(secret, src / "images" / "evil.png")
    rows = [{"qid": 1, "image_name": "a.png", "question": "is there a mass?", "answer": "yes"},
            {"qid": 2, "image_name": "evil.png", "question": "q?", "answer": "no"},
            {"qid": 3, "image_name": "a.png", "question": SURROGATE, "answer": "no"},
            {"qid": 4, "image_name": "a.png", "question": "how many?", "answer": 2}]
    write(src / "trainset.json", json.dumps(rows))
    rc = main(["ingest", "--format", "vqa-rad", "--source", str(src), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 0 and captured.err == ""
    assert "ingested 4 records" in captured.out and "2 with problems" in captured.out
    stored = {r.source_id: r for r in read_records(tmp_path / "out")}
    assert stored["1"].problem is None and stored["4"].problem is None and stored["4"].target == "2"
    assert "image_name 'evil.png' is a symlink" in stored["2"].problem and "question" in stored["3"].problem
    assert occurs(SECRET, tmp_path / "out") == []


def test_cli_mednli_line_with_a_bad_byte_is_a_row_not_a_traceback(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    write(tmp_path / "src" / "mli_train_v1.jsonl", b'{"sentence1": "a", "sentence2": "b", "gold_label": "neutral"}\n'
                                                   b'{"sentence1": "\xff", "sentence2": "b", "gold_label": "neutral"}\n')
    rc = main(["ingest", "--format", "mednli", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    assert rc == 0 and capsys.readouterr().err == ""
    assert [r.problem is None for r in read_records(tmp_path / "out")] == [True, False]


@pytest.mark.parametrize("fmt, files, message", [
    ("vqa-rad", {"images/a.png": png((1, 1, 1)), "trainset.json": '{"questions": []}'}, "must hold a JSON list"),
    ("vqa-rad", {"images/a.png": png((1, 1, 1)), "trainset.json": b'[{"question": "\xff"}]'}, "not valid JSON"),
    ("vqa-rad", {"trainset.json": "[]"}, "has no image folder"),
    ("caption-csv", {"a.png": png((1, 1, 1)), "pairs.csv": b"filepath,caption\na.png,caf\xe9\n"},
     "not a valid UTF-8 CSV"),
    ("slake", {"imgs/x/source.png": png((1, 1, 1)), "train.json": "[1, 2"}, "not valid JSON"),
])
def test_cli_unusable_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, fmt: str,
                                                  files: dict, message: str) -> None:
    for name, data in files.items():
        write(tmp_path / "src" / name, data)
    rc = main(["ingest", "--format", fmt, "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("galen: error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err and not list((tmp_path / "out").glob("part-*.parquet"))
