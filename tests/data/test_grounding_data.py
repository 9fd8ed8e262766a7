"""Grounding data: SLAKE detection.json boxes -> grounding records -> validation -> shards -> location bins."""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from galen.flows.demo_data import write_slake
from galen.flows.ingest import get_format, ingest, slake
from galen.flows.ingest.schema import Record, ShardWriter, read_records
from galen.flows.shards import ShardConfig, build_shards, scale_boxes, shard_paths
from galen.flows.train.examples import grounding_example, make_example
from galen.flows.validate import ValidationConfig, validate
from galen.model.errors import GalenInputError
from galen.model.sentencepiece_text import train_sentencepiece
from galen.model.tasks import build_prompt
from galen.model.vocabulary import GalenTokenizer

NUM_BINS = 1000


def jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def qa(qid: int, img: int, question: str, answer: str, lang: str = "en") -> dict:
    return {"img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": question, "answer": answer,
            "answer_type": "OPEN", "q_lang": lang, "modality": "CT", "location": "Abdomen",
            "content_type": "Organ", "base_type": "vqa", "triple": ["vhead", "_", "_"], "qid": qid}


def make_slake(root: Path, detections: dict[int, list], sizes: dict[int, tuple[int, int]],
               splits: dict[str, list[dict]]) -> Path:
    """A SLAKE folder: split files, imgs/xmlabN/source.jpg of the given (width, height), detection.json where given."""
    for img, size in sizes.items():
        folder = root / "imgs" / f"xmlab{img}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "source.jpg").write_bytes(jpeg(size, img))
        if img in detections:
            (folder / "detection.json").write_text(json.dumps(detections[img]))
    for name, rows in splits.items():
        (root / name).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return root


@pytest.fixture
def slake_boxes(tmp_path: Path) -> Path:
    return make_slake(
        tmp_path / "slake",
        detections={0: [{"Liver": [10, 20, 30, 40]}, {"Left  Kidney": [150.5, 60, 40, 50]}],
                     1: [{"Heart": [0, 0, 200, 120]}],
                     2: [{"Kidney": [5, 5, 10, 10]}, {"Kidney": [50, 5, 10, 10]}, {"Spleen": [80, 40, 20, 20]}]},
        sizes={0: (200, 150), 1: (200, 120), 2: (128, 128), 3: (64, 64)},
        splits={"train.json": [qa(1, 0, "Which organ is the largest?", "Liver"),
                               qa(2, 0, "最大的器官?", "肝", "zh"),
                               qa(3, 1, "Is this a CT?", "Yes"), qa(4, 3, "What is shown?", "Brain")],
                "validate.json": [qa(5, 2, "How many kidneys?", "2")],
                "test.json": [qa(6, 1, "Where is the heart?", "Center")]})


def by_source(records: list[Record]) -> dict[str, Record]:
    return {r.source_id: r for r in records}


# -- the adapter ------------------------------------------------------------------------------------
def test_slake_detection_boxes_become_grounding_records(slake_boxes: Path) -> None:
    records = list(slake.read(slake_boxes))
    vqa = [r for r in records if r.task == "vqa"]
    grounding = by_source([r for r in records if r.task == "grounding"])
    # the VQA records are exactly what the adapter gives without the boxes
    without = list(slake.read(slake_boxes, grounding=False))
    assert [(r.source_id, r.question, r.target, r.split) for r in vqa] == \
           [(r.source_id, r.question, r.target, r.split) for r in without]
    assert all(r.task == "vqa" for r in without) and len(vqa) == 5  # the Chinese row is filtered as before

    assert sorted(grounding) == ["xmlab0/detection.json:0", "xmlab0/detection.json:1", "xmlab1/detection.json:0",
                                 "xmlab2/detection.json:0", "xmlab2/detection.json:1", "xmlab2/detection.json:2"]
    liver = grounding["xmlab0/detection.json:0"]
    assert (liver.split, liver.dataset, liver.text, liver.target) == ("train", "slake", "liver", "liver")
    assert liver.boxes == [[10.0, 20.0, 40.0, 60.0]] and liver.box_labels == ["liver"]  # [x, y, w, h] -> corners
    assert liver.image == (slake_boxes / "imgs" / "xmlab0" / "source.jpg").read_bytes()
    assert liver.meta["object_name"] == "Liver" and liver.meta["box_xywh"] == [10.0, 20.0, 30.0, 40.0]
    assert liver.problem is None
    kidney = grounding["xmlab0/detection.json:1"]
    assert kidney.text == "left kidney" and kidney.boxes == [[150.5, 60.0, 190.5, 110.0]]
    # a box filling the whole image is inside it; the image named by train and test is grounded in test
    heart = grounding["xmlab1/detection.json:0"]
    assert heart.boxes == [[0.0, 0.0, 200.0, 120.0]] and heart.split == "test"
    # validate.json -> val; a name that occurs twice cannot identify one box: flagged, the other box is fine
    assert {r.split for k, r in grounding.items() if k.startswith("xmlab2")} == {"val"}
    assert "names 2 boxes" in grounding["xmlab2/detection.json:0"].problem
    assert "names 2 boxes" in grounding["xmlab2/detection.json:1"].problem
    assert grounding["xmlab2/detection.json:2"].problem is None
    # xmlab3 has no detection.json: its question stands alone


def test_slake_grounding_through_ingest_and_validation(slake_boxes: Path, tmp_path: Path) -> None:
    result = ingest("slake", slake_boxes, tmp_path / "ingested")
    assert result["by_task_split"] == {"vqa/train": 3, "vqa/val": 1, "vqa/test": 1, "grounding/train": 2,
                                       "grounding/val": 3, "grounding/test": 1}
    assert result["with_problems"] == 2
    summary = validate([tmp_path / "ingested"], tmp_path / "validated", ValidationConfig(max_bad_fraction=0.5))
    assert summary["valid_by_task_split"]["grounding/train"] == 2
    # the ambiguous kidneys; and xmlab1's train question (its image is also in test), while its box, grounded
    # in test, is not leaked
    assert summary["quarantined_by_task_split_reason"] == {"grounding/val/ingest": 2, "vqa/train/leakage": 1}
    assert summary["valid_by_task_split"]["grounding/test"] == 1


def test_slake_grounding_option_must_be_a_bool(slake_boxes: Path) -> None:
    with pytest.raises(GalenInputError, match="grounding must be true or false"):
        list(slake.read(slake_boxes, grounding="no"))


BAD_DETECTIONS = [
    ('[{"Liver": [10, 20, 30, 40]}', "is not valid JSON"),
    ('{"Liver": [10, 20, 30, 40]}', "must hold a JSON list"),
    ('[["Liver", 10, 20, 30, 40]]', r"entry 0 is \['Liver'.*not an object"),
    ('[{"Liver": [10, 20, 30]}]', r"entry 0 \('Liver'\) is \[10, 20, 30\]; a box is 4 finite numbers"),
    ('[{"Liver": "10 20 30 40"}]', "a box is 4 finite numbers"),
    ('[{"Liver": [10, 20, 0, 40]}]', r"width 0 and height 40; both must be > 0"),
    ('[{"Liver": [1, 1, 1, 1]}, {"Lung": [10, 20, 30, -5]}]', r"entry 1 \('Lung'\) has width 30 and height -5"),
    ('[{"Liver": [180, 20, 30, 40]}]', r"reaches \[180, 20\]\.\.\[210, 60\], outside the 200x150 image"),
    ('[{"Liver": [-1, 20, 30, 40]}]', "outside the 200x150 image"),
    ('[{"Liver": [10, 120, 30, 40]}]', "outside the 200x150 image"),
    ('[{"": [10, 20, 30, 40]}]', "empty object name"),
]


@pytest.mark.parametrize("content,message", BAD_DETECTIONS)
def test_bad_detection_json_stops_ingest_naming_the_file(slake_boxes: Path, content: str, message: str) -> None:
    path = slake_boxes / "imgs" / "xmlab0" / "detection.json"  # xmlab0/source.jpg is 200x150
    path.write_text(content)
    with pytest.raises(GalenInputError, match=message) as err:
        list(slake.read(slake_boxes))
    assert str(path) in str(err.value)


def test_grounding_record_of_a_missing_image_is_a_problem_not_a_crash(slake_boxes: Path) -> None:
    (slake_boxes / "imgs" / "xmlab0" / "source.jpg").unlink()
    grounding = [r for r in slake.read(slake_boxes)
                 if r.task == "grounding" and r.meta["img_name"] == "xmlab0/source.jpg"]
    assert len(grounding) == 2 and all("not found" in r.problem for r in grounding)


# -- the demo writer --------------------------------------------------------------------------------
def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_slake_is_byte_stable_and_seeded(tmp_path: Path) -> None:
    counts = write_slake(tmp_path / "a", num_images=8, image_size=96, seed=0)
    write_slake(tmp_path / "b", num_images=8, image_size=96, seed=0)
    write_slake(tmp_path / "c", num_images=8, image_size=96, seed=1)
    a, b, c = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b"), tree_digest(tmp_path / "c")
    assert a == b
    assert sorted(a) == sorted(c) and all(a[k] != c[k] for k in a if k.endswith(".jpg"))
    assert sorted(k for k in a if "/" not in k) == ["test.json", "train.json", "validate.json"]
    assert counts["images"] == 8 and counts["boxes"] == 24
    assert sum(k.endswith("source.jpg") for k in a) == sum(k.endswith("detection.json") for k in a) == 8


NODULE_THRESHOLD = {"X-Ray": 205, "CT": 160}  # nodule 228 on the film (heart 180); 198 in the CT window (body 127)


def test_demo_slake_boxes_are_the_true_nodule_and_phrases_are_unique(tmp_path: Path) -> None:
    write_slake(tmp_path, num_images=30, image_size=128, seed=3)
    rows = [r for n in ("train.json", "validate.json", "test.json") for r in json.loads((tmp_path / n).read_text())]
    modality = {r["img_name"]: r["modality"] for r in rows}
    side = {r["img_name"]: r["answer"].lower() for r in rows if r["question"].startswith("Which side")}
    assert sorted(set(modality.values())) == ["CT", "X-Ray"] and len(modality) == 30
    for name, mod in modality.items():
        folder = tmp_path / "imgs" / Path(name).parent
        entries = json.loads((folder / "detection.json").read_text())
        names = [k for e in entries for k in e]
        assert sorted(names) == ["Left Lung", "Nodule", "Right Lung"]  # one box per phrase
        boxes = {k: v for e in entries for k, v in e.items()}
        pixels = np.asarray(Image.open(folder / "source.jpg").convert("L"), dtype=int)
        x, y, w, h = boxes["Nodule"]
        # the bright blob around the box: its extent is the box (JPEG may blur an edge by a pixel)
        x0, y0 = max(0, x - 3), max(0, y - 3)
        ys, xs = np.nonzero(pixels[y0:y + h + 3, x0:x + w + 3] > NODULE_THRESHOLD[mod])
        found = [xs.min() + x0, ys.min() + y0, xs.max() + x0 + 1, ys.max() + y0 + 1]
        assert np.abs(np.array(found) - [x, y, x + w, y + h]).max() <= 1, (name, found, boxes["Nodule"])
        # the patient's left lung is on the image's right, and the nodule sits in the lung the VQA answer names
        assert boxes["Left Lung"][0] > boxes["Right Lung"][0]
        lx, ly, lw, lh = boxes[f"{side[name].capitalize()} Lung"]
        assert lx <= x and x + w <= lx + lw and ly <= y and y + h <= ly + lh


def test_demo_slake_reads_through_the_adapter_without_problems(tmp_path: Path) -> None:
    counts = write_slake(tmp_path, num_images=9, image_size=64, seed=0)
    records = list(get_format("slake").read(tmp_path))
    english = sum(r["q_lang"] == "en" for n in ("train.json", "validate.json", "test.json")
                  for r in json.loads((tmp_path / n).read_text()))
    assert len(records) == english + counts["boxes"] and all(r.problem is None for r in records)
    grounding = [r for r in records if r.task == "grounding"]
    assert {r.text for r in grounding} == {"left lung", "right lung", "nodule"}
    assert {r.split for r in grounding} == {"train", "val", "test"}


# -- validation and shards --------------------------------------------------------------------------
def png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 90, 90)).save(buf, format="PNG")
    return buf.getvalue()


def test_validation_quarantines_grounding_and_detection_records_it_cannot_train(tmp_path: Path) -> None:
    def g(i: int, **kw) -> Record:
        fields = dict(task="grounding", split="train", dataset="demo", source_id=f"g{i}", image=png((64 + i, 48)),
                      text="nodule", target="nodule", boxes=[[1.0, 2.0, 30.0, 40.0]], box_labels=["nodule"])
        return Record(**{**fields, **kw})

    rows = [g(0), g(1, boxes=None), g(2, text=None, box_labels=None), g(3, text=None),
            g(4, task="detection", box_labels=["a", "b"]), g(5, task="detection", box_labels=[" "]),
            g(6, task="detection")]
    with ShardWriter(tmp_path / "in", rows_per_shard=10) as w:
        w.write_all(rows)
    validate([tmp_path / "in"], tmp_path / "out", ValidationConfig(max_bad_fraction=1.0))
    import pyarrow.parquet as pq

    reasons = {r["source_id"]: r["reason"] for r in pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()}
    assert reasons == {"g1": "grounding record without boxes",
                       "g2": "empty grounding phrase (text, or the first box label)",
                       "g4": "detection needs one non-empty label per box (1 boxes, 2 labels)",
                       "g5": "detection needs one non-empty label per box (1 boxes, 1 labels)"}
    assert {r.source_id for r in read_records(tmp_path / "out")} == {"g0", "g3", "g6"}


def test_scale_boxes_follows_a_non_square_resize() -> None:
    scaled = scale_boxes([[10.0, 20.0, 200.0, 120.0]], (200, 120), 64)
    assert scaled == [pytest.approx([3.2, 64 * 20 / 120, 64.0, 64.0])]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> GalenTokenizer:
    rng = random.Random(0)
    words = "which region does the text describe nodule left right lung liver heart kidney spleen".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(200)]
    lines.append(build_prompt("grounding", text="left lung"))
    return GalenTokenizer(train_sentencepiece(lines, tmp_path_factory.mktemp("spm"), vocab_size=295),
                          num_codes=64, num_bins=NUM_BINS)


def shard_rows(shards: Path, split: str) -> list[Record]:
    return [r for f in shard_paths(shards, "grounding", split) for r in read_records(f)]


@pytest.mark.parametrize("shard_size", [64, 160])  # shrink and enlarge
def test_shard_row_grounding_example_bins_decode_to_the_true_box(slake_boxes: Path, tmp_path: Path, tok,
                                                                 shard_size: int) -> None:
    """Non-square sources (200x150, 200x120) resized to a square shard image: x and y scale differently,
    and the bins of the example built from the shard row must still be the source box's."""
    ingest("slake", slake_boxes, tmp_path / "ingested")
    validate([tmp_path / "ingested"], tmp_path / "validated", ValidationConfig(max_bad_fraction=0.5))
    manifest = build_shards(tmp_path / "validated", tmp_path / "shards",
                            ShardConfig(models={"generalist": shard_size}))
    assert manifest["image_size"] == shard_size
    truth = {r.source_id: r for r in slake.read(slake_boxes) if r.task == "grounding" and r.problem is None}
    rows = shard_rows(tmp_path / "shards", "train") + shard_rows(tmp_path / "shards", "val") + \
        shard_rows(tmp_path / "shards", "test")
    assert sorted(r.source_id for r in rows) == sorted(truth)
    for row in rows:
        assert Image.open(io.BytesIO(row.image)).size == (shard_size, shard_size)
        source = truth[row.source_id]
        w, h = Image.open(io.BytesIO(source.image)).size
        assert row.meta["original_size"] == [w, h] and row.meta["original_boxes"] == source.boxes
        ex = grounding_example(row, tok, 32)
        assert ex is not None and make_example(row, tok, 32).target == ex.target
        assert ex.source == tok.encode_prompt(build_prompt("grounding", text=source.text))
        assert ex.target[4:] == [tok.eos_id] and all(tok.is_bin(i) for i in ex.target[:4])
        decoded = tok.tokens_to_box(ex.target[:4], w, h)  # bins are fractions of the side: decode in source pixels
        one_bin = np.array([w, h, w, h]) / (NUM_BINS - 1)
        assert (np.abs(np.array(decoded) - source.boxes[0]) <= one_bin).all(), (row.source_id, decoded, source.boxes)
        # the same bins as the example built from the source record itself
        assert ex.target == grounding_example(source, tok, 32).target


def test_demo_slake_shard_rows_ground_the_nodule(tmp_path: Path, tok) -> None:
    write_slake(tmp_path / "raw", num_images=6, image_size=128, seed=0)
    ingest("slake", tmp_path / "raw", tmp_path / "ingested")
    summary = validate([tmp_path / "ingested"], tmp_path / "validated", ValidationConfig())
    assert summary["quarantined"] == 0
    build_shards(tmp_path / "validated", tmp_path / "shards", ShardConfig(models={"generalist": 48}))
    nodules = [r for split in ("train", "val", "test") for r in shard_rows(tmp_path / "shards", split)
               if r.text == "nodule"]
    assert len(nodules) == 6
    for row in nodules:
        folder = tmp_path / "raw" / "imgs" / Path(row.meta["img_name"]).parent
        (x, y, w, h), = [v for e in json.loads((folder / "detection.json").read_text()) for k, v in e.items()
                         if k == "Nodule"]
        decoded = tok.tokens_to_box(grounding_example(row, tok, 32).target[:4], 128, 128)
        assert np.abs(np.array(decoded) - [x, y, x + w, y + h]).max() <= 128 / (NUM_BINS - 1)
