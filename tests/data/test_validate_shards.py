"""Data tier: validation quarantines every bad row with its reason; shards are what training reads."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from galen.flows.ingest.schema import Record, ShardWriter, read_records
from galen.flows.shards import ShardConfig, build_shards, shard_paths
from galen.flows.validate import DataQualityError, ValidationConfig, validate


def png(color=(120, 30, 30), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def vqa(i, split="train", image=None, **kw) -> Record:
    fields = dict(task="vqa", split=split, dataset="demo", source_id=f"q{i}", question=f"question {i}?",
                  target="yes", image=image if image is not None else png((i * 7 % 255, 10, 10)))
    fields.update(kw)
    return Record(**fields)


def write(tmp_path, records, name="ingested"):
    with ShardWriter(tmp_path / name, rows_per_shard=3) as w:
        w.write_all(records)
    return tmp_path / name


def test_every_bad_row_is_quarantined_with_its_reason(tmp_path):
    good = [vqa(i) for i in range(20)]
    truncated = png()[:40]
    bad = [
        vqa(100, image=truncated),
        vqa(101, image=b"not an image at all"),
        vqa(102, image=png(size=(8, 8))),
        vqa(103, target=" "),
        vqa(104, question=""),
        vqa(105, problem="image file x.jpg not found"),
        Record(task="vqa", split="train", dataset="demo", source_id="q106", question="q?", target="yes"),
        Record(task="classification", split="train", dataset="demo", source_id="c1", image=png(),
               target="tumour", candidates=["normal", "adipose"]),
        Record(task="nli", split="train", dataset="demo", source_id="n1", premise="a", hypothesis="b",
               target="entailment"),
        Record(task="grounding", split="train", dataset="demo", source_id="g1", image=png(size=(64, 48)),
               text="the nodule", target="<bin_1>", boxes=[[10, 10, 80, 20]]),
        vqa(0, source_id="q0-copy"),                       # duplicate of q0 (same image, question, answer)
        vqa(200, split="test", image=png((1, 2, 3))),       # fine: the test copy is kept
        vqa(201, split="train", image=png((1, 2, 3))),      # leakage: same image as a test row
    ]
    cfg = ValidationConfig(max_bad_fraction=0.9, min_image_side=16)
    summary = validate([write(tmp_path, good + bad)], tmp_path / "validated", cfg)

    quarantine = pq.read_table(tmp_path / "validated" / "quarantine.parquet").to_pylist()
    reasons = {row["source_id"]: row["reason"] for row in quarantine}
    assert reasons["q100"].startswith("undecodable image")
    assert reasons["q101"].startswith("undecodable image")
    assert reasons["q102"].startswith("image too small")
    assert reasons["q103"] == "empty target"
    assert reasons["q104"] == "empty question"
    assert reasons["q105"] == "ingest: image file x.jpg not found"
    assert reasons["q106"] == "missing image"
    assert "not in the candidate set" in reasons["c1"]
    assert "not in ('maybe', 'yes', 'no')" in reasons["n1"]
    assert "is not inside the 64x48 image" in reasons["g1"]
    assert reasons["q0-copy"] == "duplicate of q0"
    assert reasons["q201"] == "leakage: the same image is in the test split"
    assert len(quarantine) == 12 and all(row["image"] is not None or row["source_id"] in {"q106"}
                                         for row in quarantine if row["source_id"] != "n1")

    valid = list(read_records(tmp_path / "validated"))
    assert len(valid) + len(quarantine) == len(good) + len(bad)  # nothing dropped silently
    assert {r.source_id for r in valid} == {f"q{i}" for i in range(20)} | {"q200"}
    report = json.loads((tmp_path / "validated" / "report.json").read_text())
    assert report["quarantined"] == 12 and report["valid_by_task_split"] == {"vqa/test": 1, "vqa/train": 20}
    assert report["quarantined_by_task_split_reason"]["vqa/train/undecodable image"] == 2
    assert summary == report


def test_too_many_bad_rows_fail_after_writing_the_report(tmp_path):
    rows = [vqa(i) for i in range(8)] + [vqa(50 + i, target="") for i in range(2)]
    with pytest.raises(DataQualityError, match=r"2 of 10 rows \(20.0%\) failed validation, above "
                                               r"validate.max_bad_fraction=5.0%.*empty target \(2\)"):
        validate([write(tmp_path, rows)], tmp_path / "validated", ValidationConfig(max_bad_fraction=0.05))
    assert (tmp_path / "validated" / "report.json").is_file()
    assert pq.read_table(tmp_path / "validated" / "quarantine.parquet").num_rows == 2


def test_unknown_params_are_named():
    with pytest.raises(ValueError, match="unknown validate params"):
        ValidationConfig.from_params({"max_bad_frac": 0.1})


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_per_task_and_split_with_resized_images(tmp_path, workers):
    rows = [vqa(i, split="train" if i < 10 else "test", target=["yes", "no", "left"][i % 3]) for i in range(14)]
    rows += [Record(task="classification", split="train", dataset="mnist", source_id=f"c{i}",
                    image=png((i * 20, 0, 0), size=(28, 28)), target=["adipose", "tumour"][i % 2],
                    candidates=["adipose", "tumour"]) for i in range(4)]
    rows += [Record(task="nli", split="train", dataset="mednli", source_id="n1", premise="p", hypothesis="h",
                    target="yes", candidates=["maybe", "yes", "no"])]
    validate([write(tmp_path, rows)], tmp_path / "validated", ValidationConfig())
    cfg = ShardConfig(models={"generalist": 32, "clip": 16}, rows_per_shard=4, workers=workers,
                      mixture={"vqa": 2.0})
    manifest = build_shards(tmp_path / "validated", tmp_path / "shards", cfg)
    assert manifest["by_task_split"] == {"classification/train": 4, "nli/train": 1, "vqa/test": 4, "vqa/train": 10}
    assert manifest["mixture"] == {"classification": 1.0, "nli": 1.0, "vqa": 2.0}
    # one size for every task, the largest model's input (the smaller model's preprocessing resizes down)
    assert manifest["image_size"] == 32 and manifest["models"] == {"clip": 16, "generalist": 32}
    train = [r for f in shard_paths(tmp_path / "shards", "vqa", "train") for r in read_records(f)]
    assert len(train) == 10 and all(Image.open(io.BytesIO(r.image)).size == (32, 32) for r in train)
    cls = [r for f in shard_paths(tmp_path / "shards", "classification", "train") for r in read_records(f)]
    assert all(Image.open(io.BytesIO(r.image)).size == (32, 32) for r in cls)
    candidates = json.loads((tmp_path / "shards" / "candidates.json").read_text())
    assert candidates["demo"]["vqa"] == ["left", "no", "yes"]  # training answers only
    assert candidates["mnist"]["classification"] == ["adipose", "tumour"]
    assert candidates["mednli"]["nli"] == ["maybe", "no", "yes"]


def test_ray_data_reads_the_shards(tmp_path):
    import ray  # a dependency: never skipped
    rows = [vqa(i) for i in range(6)]
    validate([write(tmp_path, rows)], tmp_path / "validated", ValidationConfig())
    build_shards(tmp_path / "validated", tmp_path / "shards", ShardConfig(models={"generalist": 32}))
    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        ds = ray.data.read_parquet(shard_paths(tmp_path / "shards", "vqa", "train"))
        rows_read = ds.take_all()
        assert len(rows_read) == 6 and {r["source_id"] for r in rows_read} == {f"q{i}" for i in range(6)}
        assert all(isinstance(r["image"], bytes) for r in rows_read)
    finally:
        ray.shutdown()
