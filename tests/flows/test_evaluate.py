"""galen evaluate: the metric functions against hand-computed cases, then the whole stage on the demo
shards (real ingest -> validate -> shards) with a random nano model, logged to a local MLflow store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from galen.flows.cli import main
from galen.flows.evaluate import (
    caption_metrics,
    classification_metrics,
    evaluate,
    flat_metrics,
    grounding_metrics,
    summarization_metrics,
    vqa_metrics,
)
from galen.flows.paths import tracking_uri
from galen.model.checkpoint import folder_digest
from galen.model.errors import GalenInputError
from galen.model.predict import PredictConfig

# short searches keep a random model's free-text answers (which never stop on their own) quick
SHORT = PredictConfig.from_dict({"vqa": {"beam_size": 2, "max_length": 6}, "caption": {"beam_size": 2, "max_length": 8},
                                 "summarization": {"beam_size": 2, "max_length": 8, "length_penalty": 0.7}})


# --------------------------------------------------------------------------------------------------
# Metric values
# --------------------------------------------------------------------------------------------------

def test_vqa_accuracy_overall_closed_and_open():
    m = vqa_metrics(["yes", "no", "left", "two", "Right "], ["yes", "yes", "left", "three", "right"],
                    ["CLOSED", "CLOSED", "OPEN", "OPEN", "open"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["closed_accuracy"] == pytest.approx(1 / 2) and m["closed_count"] == 2
    assert m["open_accuracy"] == pytest.approx(2 / 3) and m["open_count"] == 3
    untyped = vqa_metrics(["a"], ["a"], [None])
    assert untyped["accuracy"] == 1.0 and "closed_accuracy" not in untyped and untyped["closed_count"] == 0


def test_caption_metrics_match_hand_computed_values():
    refs = [["the lung is clear today"], ["a large nodule sits apex"]]
    same = caption_metrics(["the lung is clear today", "a large nodule sits apex"], refs)
    assert same["bleu_4"] == pytest.approx(1.0) and same["meteor"] == pytest.approx(1.0)
    assert same["rouge_l"] == pytest.approx(1.0)
    # CIDEr-D: the n-grams of each image occur in one of 2 reference sets: idf log(2) for all, cosine 1 per n, x10
    assert same["cider"] == pytest.approx(10.0)

    one_word_off = caption_metrics(["the lung is clear now", "a large nodule sits apex"], refs)
    # corpus BLEU-4: clipped n-gram precisions 9/10, 7/8, 5/6, 3/4, no brevity penalty
    assert one_word_off["bleu_4"] == pytest.approx((9 / 10 * 7 / 8 * 5 / 6 * 3 / 4) ** 0.25, rel=1e-6)
    # ROUGE-L (beta 1.2): LCS 4 of 5 words both ways -> F = 0.8; the exact caption 1.0; mean 0.9
    assert one_word_off["rouge_l"] == pytest.approx(0.9)
    # CIDEr-D: image 1 has cosines 4/5, 3/4, 2/3, 1/2 for n = 1..4 (equal idf), image 2 is exact (10)
    assert one_word_off["cider"] == pytest.approx((10 * (4 / 5 + 3 / 4 + 2 / 3 + 1 / 2) / 4 + 10) / 2)
    assert 0 < one_word_off["meteor"] < 1

    nothing = caption_metrics(["", "zebra zebra"], refs)              # an empty caption scores, it does not crash
    assert nothing["rouge_l"] == 0 and nothing["cider"] == 0 and nothing["meteor"] == 0
    assert nothing["bleu_4"] == pytest.approx(0.0, abs=1e-9)


def test_summarization_rouge_uses_stemming():
    m = summarization_metrics(["patients are taking aspirin", "no fever"], ["patient took aspirin daily", "no fever"])
    # stemmed: [patient, are, take, aspirin] vs [patient, took, aspirin, daili]: 2 of 4 unigrams (F 0.5), no
    # bigram, LCS 2 (F 0.5); the second pair is exact (1.0) -> means 0.75, 0.5, 0.75
    assert m["rouge_1"] == pytest.approx(0.75) and m["rouge_2"] == pytest.approx(0.5)
    assert m["rouge_l"] == pytest.approx(0.75) and m["count"] == 2


def test_classification_accuracy_macro_f1_and_auc():
    refs, preds = ["a", "a", "b", "b", "c"], ["a", "b", "b", "b", "a"]
    probs = [[0.90, 0.05, 0.05], [0.60, 0.30, 0.10], [0.10, 0.80, 0.10], [0.20, 0.70, 0.10], [0.70, 0.10, 0.20]]
    m = classification_metrics(refs, preds, ["a", "b", "c"], probs)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # per-class F1: a P=1/2 R=1/2 -> 0.5; b P=2/3 R=1 -> 0.8; c 0 -> macro 1.3/3
    assert m["macro_f1"] == pytest.approx(1.3 / 3)
    # one-vs-rest AUC: a: 5 of 6 (pos, neg) pairs ordered right; b and c: all -> mean (5/6 + 1 + 1) / 3
    assert m["auc"] == pytest.approx((5 / 6 + 2) / 3)
    # a label no reference has cannot have an AUC and is left out of the mean
    extra = classification_metrics(refs, preds, ["a", "b", "c", "d"], [p + [0.0] for p in probs])
    assert extra["auc"] == pytest.approx(m["auc"])
    assert "auc" not in classification_metrics(refs, preds, ["a", "b", "c"])
    with pytest.raises(GalenInputError, match="one column per label"):
        classification_metrics(refs, preds, ["a", "b"], probs)


def test_grounding_accuracy_at_iou_half():
    pred = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]]
    ref = [[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 10, 20]]        # IoU 1, 1/3, 1/2 (counts: >= 0.5)
    m = grounding_metrics(pred, ref)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["mean_iou"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)


def test_flat_metrics_are_the_mlflow_keys():
    nested = {"run_id": "x", "vqa": {"accuracy": 0.5, "by_dataset": {"slake": {"accuracy": 1.0}}, "auc": math.nan}}
    assert flat_metrics(nested) == {"vqa.accuracy": 0.5, "vqa.by_dataset.slake.accuracy": 1.0}


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh local sqlite store: what tracking_uri() gives in a project without MLFLOW_TRACKING_URI."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text("demo: {}\n")
    monkeypatch.chdir(tmp_path)
    return tracking_uri()


@pytest.mark.timeout(600)
def test_evaluate_every_task_of_the_demo_shards_into_json_and_mlflow(tmp_path, store, demo_shards, demo_model_dir):
    out, preds_file, plots = tmp_path / "metrics" / "eval.json", tmp_path / "pred.jsonl", tmp_path / "plots"
    report = evaluate(demo_model_dir, demo_shards, out, limit=3, predict_config=SHORT, predictions_path=preds_file,
                      plots_dir=plots, samples=2)
    assert json.loads(out.read_text()) == report
    tasks = ["vqa", "caption", "classification", "nli", "summarization", "grounding"]
    assert [k for k in report if k != "run_id"] == tasks
    expected_keys = {"vqa": {"accuracy", "closed_accuracy", "open_accuracy"},
                     "caption": {"bleu_4", "meteor", "rouge_l", "cider"},
                     "classification": {"accuracy", "macro_f1"}, "nli": {"accuracy", "macro_f1"},
                     "summarization": {"rouge_1", "rouge_2", "rouge_l"}, "grounding": {"accuracy", "mean_iou"}}
    for task in tasks:
        assert report[task]["count"] == 3
        assert expected_keys[task] <= set(report[task]), (task, report[task])
        for key in expected_keys[task] - {"closed_accuracy", "open_accuracy"}:
            assert 0.0 <= report[task][key] <= (10.0 if key == "cider" else 1.0)

    # every prediction is on file, and the metrics are those of these predictions
    rows = [json.loads(line) for line in preds_file.read_text().splitlines()]
    assert [r["task"] for r in rows] == [t for t in tasks for _ in range(3)]
    nli = [r for r in rows if r["task"] == "nli"]
    assert {r["prediction"]["answer"] for r in nli} <= {"maybe", "yes", "no"}
    assert report["nli"]["accuracy"] == pytest.approx(sum(r["prediction"]["answer"] == r["reference"] for r in nli) / 3)
    cls = [r for r in rows if r["task"] == "classification"]
    assert report["classification"]["accuracy"] == pytest.approx(
        sum(r["prediction"]["answer"] == r["reference"] for r in cls) / 3)
    ground = [r for r in rows if r["task"] == "grounding"]
    assert report["grounding"] == pytest.approx(grounding_metrics([r["prediction"]["box"] for r in ground],
                                                                  [r["reference"] for r in ground]))
    vqa = [r for r in rows if r["task"] == "vqa"]
    candidates = json.loads((demo_shards / "candidates.json").read_text())
    for r in vqa:  # closed-set decoding over the dataset's answer list
        assert r["prediction"]["answer"] in candidates[r["dataset"]]["vqa"]

    # MLflow: metrics, lineage/model tags, sample tables with images, plots, predictions
    client = MlflowClient(store)
    run = client.get_run(report["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics == pytest.approx(flat_metrics(report))
    assert run.data.tags["galen.model_sha256"] == folder_digest(demo_model_dir)
    assert json.loads(run.data.tags["galen.predict_config"]) == SHORT.to_dict()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {f"eval/samples_{t}.json" for t in tasks} | {"eval/predictions.jsonl", "eval/plots"} <= artifacts
    plot_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "eval/plots")}
    assert {"task_metrics.png", "confusion_classification_medmnist-pathmnist.png",
            "confusion_nli_mednli.png"} == plot_files == {p.name for p in plots.iterdir()}
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/samples_vqa.json", str(tmp_path)))
                       .read_text())
    assert table["columns"] == ["dataset", "source_id", "prompt", "prediction", "reference", "image"]
    assert len(table["data"]) == 2 and table["data"][0][5]["type"] == "image"
    text_table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/samples_nli.json",
                                                           str(tmp_path))).read_text())
    assert "image" not in text_table["columns"] and text_table["data"][0][2].startswith(" can text1")


@pytest.mark.timeout(300)
def test_cli_evaluate_subset_without_mlflow(tmp_path, store, demo_shards, demo_model_dir, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(demo_model_dir), "--shards", str(demo_shards), "--out", str(out),
                 "--limit", "2", "--tasks", "nli", "classification", "--no-mlflow"]) == 0
    report = json.loads(out.read_text())
    assert sorted(report) == ["classification", "nli"] and "run_id" not in report
    assert "wrote" in capsys.readouterr().out
    assert not (tmp_path / "mlflow.db").exists()                       # nothing logged


def test_bad_inputs_fail_clearly(tmp_path, demo_shards, demo_model_dir, capsys):
    def run(*args: str) -> str:
        assert main(["evaluate", "--model", str(demo_model_dir), "--out", str(tmp_path / "e.json"), "--no-mlflow",
                     *args]) == 2
        return capsys.readouterr().err

    assert "does not exist; run the shards stage" in run("--shards", str(tmp_path / "nope"))
    assert "cannot evaluate tasks ['detection']" in run("--shards", str(demo_shards), "--tasks", "detection")
    assert "--limit must be >= 1" in run("--shards", str(demo_shards), "--limit", "0")
    (tmp_path / "empty" / "vqa" / "train").mkdir(parents=True)
    assert "no test split of any evaluated task" in run("--shards", str(tmp_path / "empty"))
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert main(["evaluate", "--model", str(broken), "--shards", str(demo_shards), "--out", str(tmp_path / "e.json"),
                 "--no-mlflow"]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()
