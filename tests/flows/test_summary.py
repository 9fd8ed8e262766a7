"""Code tier: `galen summary`, the table `make demo` ends with, on metrics files the real writers wrote.

The run is small and made up but goes through the pipeline's own writers: test shards through
`ShardWriter`, metrics/eval.json and eval_predictions.jsonl through `flows.evaluate.evaluate` (a
scripted predictor in place of the model, so every score is known), metrics/clip_eval.json through
`flows.evaluate_clip.evaluate_clip` (a scripted embedding model), metrics/data_report.json
through `flows.validate.validate`, and the registry reports as `galen register --promote --report`
builds them (`Registered` + `Decision` + aliases).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.flows.test_cli import galen

EVAL_RUN, CLIP_RUN = "a1b2c3d4e5f60718293a4b5c6d7e8f90", "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
LABELS = ["adipose", "debris", "lymphocytes"]
CAPTIONS = ["no acute disease", "small nodule in the left lung", "cardiomegaly", "clear lungs", "pleural effusion",
            "no acute disease", "right lower lobe opacity"]          # 7 images, 6 distinct texts

# (dataset, answer_type, reference, what the scripted model answers)
VQA = [*[("vqa-rad", "CLOSED", ref, ans) for ref, ans in [("yes", "yes"), ("yes", "yes"), ("Yes", "yes"),
                                                            ("yes", "yes"), ("yes", "yes"), ("yes", "yes"),
                                                            ("no", "yes"), ("no", "no")]],
       *[("vqa-rad", "OPEN", ref, ans) for ref, ans in [("lung", "lung"), ("lung", "heart"), ("heart", "heart"),
                                                          ("liver", "lung")]],
       *[("slake", "CLOSED", ref, ans) for ref, ans in [("no", "no"), ("no", "yes"), ("yes", "yes")]]]
# reference class, what the image looks like (= what both scripted models answer)
CLASSIFICATION = [("adipose", "adipose"), ("adipose", "adipose"), ("adipose", "debris"), ("debris", "debris"),
                  ("debris", "debris"), ("lymphocytes", "lymphocytes")]
NLI = [("yes", "yes"), ("yes", "no"), ("yes", "no"), ("no", "no"), ("no", "no"), ("maybe", "yes")]


class ScriptedPredictor:
    """Stands in for `GalenPredictor`: answers from the request alone, as listed above."""

    image_size = 128  # the size its model takes (the shards below are written for it)

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def predict(self, requests):
        out = []
        for req in requests:
            task = req["task"]
            if task == "vqa":
                out.append({"task": task, "answer": self.answers[req["question"]]})
            elif task in ("classification", "nli"):
                labels = req.get("labels") or ["maybe", "yes", "no"]
                answer = req["image"].decode().split("#")[0] if task == "classification" else \
                    self.answers[req["premise"]]
                out.append({"task": task, "answer": answer,
                            "scores": {lab: 0.8 if lab == answer else 0.2 / (len(labels) - 1) for lab in labels}})
            elif task == "caption":
                out.append({"task": task, "answer": req["image"].decode().split("|")[1]})
            elif task == "summarization":
                out.append({"task": task, "answer": self.answers[req["text"]]})
            else:  # grounding
                out.append({"task": task, "answer": "", "box": json.loads(self.answers[req["text"]])})
        return out


class ScriptedEmbeddings:
    """Stands in for `ClipModel`: an image embeds as what it looks like, a text as itself."""

    vocab = sorted(set(LABELS) | set(CAPTIONS))
    spec = SimpleNamespace(image_size=64)

    def _embed(self, keys):
        return torch.nn.functional.one_hot(torch.tensor([self.vocab.index(k) for k in keys]), len(self.vocab)).float()

    def encode_images(self, images):
        return self._embed([bytes(b).decode().split("#")[0] for b in images])

    def encode_texts(self, texts):
        return self._embed(list(texts))

    def class_embeddings(self, labels, templates):
        return self._embed(list(labels))

    def zero_shot(self, image_embeddings, class_embeddings):
        return (10.0 * image_embeddings @ class_embeddings.T).softmax(dim=-1)


def write_shards(shards: Path) -> dict[str, str]:
    """Test (and, for the linear probe, train) shards; returns the scripted answers by prompt."""
    from galen.flows.ingest.schema import Record, ShardWriter

    answers: dict[str, str] = {}
    by_task: dict[tuple[str, str], list[Record]] = {}

    def add(task, split, **fields):
        by_task.setdefault((task, split), []).append(Record(task=task, split=split, **fields))

    for i, (ds, kind, ref, ans) in enumerate(VQA):
        add("vqa", "test", dataset=ds, source_id=f"q{i}", target=ref, image=b"scan", question=f"question {i}?",
            answer_type=kind)
        answers[f"question {i}?"] = ans
    for i, (ref, looks) in enumerate(CLASSIFICATION):
        add("classification", "test", dataset="pathmnist", source_id=f"t{i}", target=ref,
            image=f"{looks}#{i}".encode(), candidates=LABELS)
    for i, label in enumerate(LABELS * 2):
        add("classification", "train", dataset="pathmnist", source_id=f"tr{i}", target=label,
            image=f"{label}#train{i}".encode(), candidates=LABELS)
    for i, (ref, ans) in enumerate(NLI):
        add("nli", "test", dataset="mednli", source_id=f"n{i}", target=ref, premise=f"premise {i}.",
            hypothesis="hypothesis.")
        answers[f"premise {i}."] = ans
    for i, caption in enumerate(CAPTIONS):  # the scripted captioner gets the first two wrong
        said = CAPTIONS[(i + 2) % len(CAPTIONS)] if i < 2 else caption
        add("caption", "test", dataset="iu-xray", source_id=f"c{i}", target=caption,
            image=f"{caption}#{i}|{said}".encode())
    for i, (text, ref, said) in enumerate([("what is the dose of ibuprofen for a child?", "ibuprofen dose child",
                                            "ibuprofen dose child"),
                                           ("can i take aspirin with warfarin?", "aspirin warfarin", "warfarin")]):
        add("summarization", "test", dataset="meqsum", source_id=f"s{i}", target=ref, text=text)
        answers[text] = said
    for i, (box, said) in enumerate([([10.0, 10.0, 40.0, 40.0], [10.0, 10.0, 40.0, 40.0]),
                                     ([50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 20.0, 20.0])]):
        add("grounding", "test", dataset="slake", source_id=f"g{i}", target="", image=b"scan", text=f"nodule {i}",
            boxes=[box])
        answers[f"nodule {i}"] = json.dumps(said)
    for (task, split), records in by_task.items():
        with ShardWriter(shards / task / split) as writer:
            writer.write_all(records)
    (shards / "manifest.json").write_text(json.dumps({"image_size": 128, "models": {"generalist": 128, "clip": 64}}))
    return answers


def write_registry_reports(metrics: Path) -> None:
    """What `galen register --promote --report` writes (flows/cli.py _register_and_promote)."""
    from galen.flows.registry import Decision, Registered, Shortfall

    gen = asdict(Registered("galen-generalist", "2", EVAL_RUN, "models:/m-1234", "ab" * 32))
    gen.update(promoted=True, decision=Decision("galen-generalist", "2", True, "1").message,
               aliases={"champion": "2", "previous": "1"})
    clip = asdict(Registered("galen-clip", "3", CLIP_RUN, "models:/m-5678", "cd" * 32))
    decision = Decision("galen-clip", "3", False, "2",
                        [Shortfall("zero_shot.accuracy", 5 / 6, 0.9, "champion v2 0.9000 + min_improvement 0.0")])
    clip.update(promoted=False, decision=decision.message, aliases={"champion": "2", "challenger": "3"})
    (metrics / "registry.json").write_text(json.dumps(gen, indent=2) + "\n")
    (metrics / "clip_registry.json").write_text(json.dumps(clip, indent=2) + "\n")


def write_data_report(root: Path, metrics: Path) -> None:
    """`galen validate --report metrics/data_report.json` on seven NLI rows, one without a hypothesis."""
    from galen.flows.ingest.schema import Record, ShardWriter
    from galen.flows.validate import ValidationConfig, validate

    rows = [Record("nli", "train", "mednli", f"v{i}", target="yes", premise=f"p {i}", hypothesis="h" if i else "")
            for i in range(7)]
    with ShardWriter(root / "ingested") as writer:
        writer.write_all(rows)
    validate([root / "ingested"], root / "validated", ValidationConfig(max_bad_fraction=0.5),
             report_path=metrics / "data_report.json")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A project folder after a (scripted) `dvc repro`: params.yaml, data/shards, artifacts/, metrics/."""
    import galen.flows.evaluate
    import galen.model.checkpoint
    import galen.model.clip
    import galen.model.predict
    from galen.flows.evaluate import evaluate
    from galen.flows.evaluate_clip import evaluate_clip

    root = tmp_path_factory.mktemp("project")
    (root / "params.yaml").write_text("demo: {}\n")
    metrics, shards = root / "metrics", root / "data" / "shards"
    answers = write_shards(shards)
    for folder in ("artifacts/model", "artifacts/clip_model"):
        (root / folder).mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(galen.model.predict.GalenPredictor, "load", lambda *a, **k: ScriptedPredictor(answers))
        mp.setattr(galen.model.clip.ClipModel, "from_pretrained", lambda *a, **k: ScriptedEmbeddings())
        mp.setattr(galen.model.checkpoint, "folder_digest", lambda folder: "ab" * 32)
        # pycocoevalcap's Java scorers take ~20 s; this is their result's shape (test_evaluate.py runs the real one)
        mp.setattr(galen.flows.evaluate, "caption_metrics", lambda predictions, references: {
            "bleu_4": 0.412, "meteor": 0.356, "rouge_l": 0.701, "cider": 2.345, "count": len(predictions)})
        evaluate(root / "artifacts/model", shards, metrics / "eval.json", log_mlflow=False,
                 predictions_path=metrics / "eval_predictions.jsonl")
        evaluate_clip(root / "artifacts/clip_model", shards, metrics / "clip_eval.json", log_mlflow=False)
    # the run ids `evaluate` / `evaluate_clip` put first when they log to MLflow (not done here: no store)
    for name, run_id in (("eval.json", EVAL_RUN), ("clip_eval.json", CLIP_RUN)):
        report = json.loads((metrics / name).read_text())
        (metrics / name).write_text(json.dumps({"run_id": run_id, **report}, indent=2) + "\n")
    write_registry_reports(metrics)
    write_data_report(root, metrics)
    return root


@pytest.fixture
def project(run, tmp_path, monkeypatch) -> Path:
    """A copy of the run to change, as the working directory, with the default MLflow store."""
    root = tmp_path / "project"
    shutil.copytree(run, root)
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


def table_rows(text: str) -> dict[str, list[str]]:
    """Task rows of the printed table: label -> [n, result, chance, majority]."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("  "):
            cells = re.split(r"\s{2,}", line.strip())
            if len(cells) == 5:
                rows[cells[0]] = cells[1:]
    return rows


def fact(text: str, key: str) -> str:
    """The value of a `key   value` line under the table."""
    return next(m[1] for line in text.splitlines() if (m := re.match(rf"{re.escape(key)} {{2,}}(.*)$", line)))


def test_the_table_holds_each_tasks_result_beside_chance_and_majority(project):
    out = galen("summary").stdout
    rows = table_rows(out)
    eval_report = json.loads((project / "metrics" / "eval.json").read_text())
    # VQA: 15 questions, 11 right; closed 11 (9 right; per-dataset majority 6 of 8 + 2 of 3), open 4 (2 right)
    assert rows["vqa, all"] == ["15", "accuracy = 0.733", "—", "0.533"]
    assert rows["vqa, closed"] == ["11", "accuracy = 0.818", "0.500", "0.727"]
    assert rows["vqa, open"] == ["4", "accuracy = 0.500", "—", "0.500"]
    assert eval_report["vqa"]["closed_accuracy"] == pytest.approx(9 / 11)
    assert rows["classification"] == ["6", "accuracy = 0.833", "0.333", "0.500"]
    assert rows["nli"] == ["6", "accuracy = 0.500", "0.333", "0.500"]
    assert rows["caption"] == ["7", "CIDEr = 2.345", "—", "—"]
    assert rows["summarization"] == ["2", f"ROUGE-L = {eval_report['summarization']['rouge_l']:.3f}", "—", "—"]
    assert rows["grounding"] == ["2", "acc@IoU≥0.5 = 0.500", "—", "—"]
    # the CLIP model, scored on the same classification test rows: the same majority
    assert rows["zero-shot classification"] == ["6", "accuracy = 0.833", "0.333", "0.500"]
    assert rows["linear probe"] == ["6", "accuracy = 0.833", "0.333", "0.500"]
    assert rows["retrieval image→text"] == ["7", "Recall@5 = 1.000", "0.833", "—"]   # 5 of 6 distinct texts
    assert f"generalist (metrics/eval.json, MLflow run {EVAL_RUN})" in out

    assert fact(out, "generalist") == "galen-generalist version 2: champion (previous: version 1)"
    assert fact(out, "clip") == "galen-clip version 3: not champion (challenger; champion: version 2)"
    assert ("  why: zero_shot.accuracy = 0.8333 is 0.0667 short of the required 0.9000 (champion v2 0.9000 + "
            "min_improvement 0.0)") in out.split("clip   ")[-1].splitlines()[1]
    assert fact(out, "model folders") == "artifacts/model, artifacts/clip_model"
    assert fact(out, "MLflow UI") == (f"mlflow ui --backend-store-uri sqlite:///{project.resolve()}/mlflow.db   "
                                      "then open http://127.0.0.1:5000")
    assert fact(out, "data") == "7 rows validated: 6 kept, 1 quarantined (14.3% of rows; limit 50.0%)"
    assert fact(out, "every metric") == "dvc metrics show --md"
    assert "not there yet" not in out and "note:" not in out
    assert max(len(line) for line in out.splitlines()) < 200                       # read at a glance


def test_a_tracking_server_is_where_the_ui_is(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    out = galen("summary").stdout
    assert fact(out, "MLflow UI") == "open http://mlflow.internal:5000 (the tracking server's UI)"


def test_other_folders_from_the_options(project):
    moved = project / "elsewhere"
    shutil.move(project / "metrics", moved)
    out = galen("summary", "--metrics-dir", str(moved), "--model", "models/new", "--clip-model",
                "artifacts/clip_model").stdout
    assert table_rows(out)["vqa, closed"][1] == "accuracy = 0.818"
    assert fact(out, "model folders") == "models/new (not there), artifacts/clip_model"


def test_baselines_it_cannot_know_are_dashes_not_guesses(project):
    # without the shards the closed / open split of the references is unknown
    out = galen("summary", "--shards", str(project / "nowhere")).stdout
    rows = table_rows(out)
    assert rows["vqa, all"][2:] == ["—", "0.533"]
    assert rows["vqa, closed"] == ["11", "accuracy = 0.818", "—", "—"]
    assert rows["vqa, open"][2:] == ["—", "—"]
    assert "note: closed / open VQA baselines need the shards' answer types" in out

    # predictions of another run (fewer rows than eval.json counts) are not used
    preds = project / "metrics" / "eval_predictions.jsonl"
    lines = preds.read_text().splitlines()
    preds.write_text("\n".join(line for line in lines if json.loads(line)["source_id"] != "t0") + "\n")
    out = galen("summary").stdout
    rows = table_rows(out)
    assert rows["classification"] == ["6", "accuracy = 0.833", "—", "—"]
    assert rows["zero-shot classification"][2:] == ["0.333", "—"]   # its chance is stored in clip_eval.json
    assert rows["nli"][2:] == ["0.333", "0.500"]                    # the other tasks' rows still match
    assert "note: eval_predictions.jsonl has 5 classification rows but eval.json counts 6" in out

    preds.unlink()
    out = galen("summary").stdout
    assert table_rows(out)["nli"][2:] == ["0.333", "—"]             # NLI's answer set is fixed: maybe / yes / no
    assert "majority baselines need eval_predictions.jsonl" in out


def test_missing_files_show_what_is_there_and_which_stage_to_run(project):
    for name in ("registry.json", "clip_eval.json", "clip_registry.json", "data_report.json"):
        (project / "metrics" / name).unlink()
    shutil.rmtree(project / "artifacts" / "clip_model")
    out = galen("summary").stdout
    rows = table_rows(out)
    assert rows["classification"] == ["6", "accuracy = 0.833", "0.333", "0.500"]
    assert "zero-shot classification" not in rows and "clip (" not in out
    assert "galen-generalist" not in out and "champion" not in out
    assert fact(out, "model folders") == "artifacts/model, artifacts/clip_model (not there)"
    assert "MLflow UI" in out
    missing = out.split("not there yet:\n")[1].splitlines()
    assert missing == ["  metrics/registry.json: run `dvc repro register`",
                       "  metrics/clip_eval.json: run `dvc repro clip_evaluate`",
                       "  metrics/clip_registry.json: run `dvc repro clip_register`",
                       "  metrics/data_report.json: run `dvc repro validate`"]

    # only the data report: no table, the facts and every evaluation stage to run
    for name in ("eval.json", "eval_predictions.jsonl"):
        (project / "metrics" / name).unlink()
    write_data_report(project / "again", project / "metrics")
    out = galen("summary").stdout
    assert "task (held-out test split)" not in out and "data " in out
    assert "  metrics/eval.json: run `dvc repro evaluate`" in out


def test_a_registration_without_promotion_and_a_stale_report_say_so(project):
    reg = project / "metrics" / "registry.json"
    report = json.loads(reg.read_text())
    for key in ("promoted", "decision", "aliases"):
        report.pop(key)
    report["run_id"] = "ffff0000ffff0000ffff0000ffff0000"
    reg.write_text(json.dumps(report))
    out = galen("summary").stdout
    assert fact(out, "generalist") == "galen-generalist version 2: registered, not promoted (`galen promote --version 2`)"
    stale = out.split(fact(out, "generalist"))[1].splitlines()[1].strip()
    assert stale == ("stale: registered from MLflow run ffff0000ffff0000ffff0000ffff0000, the metrics file is of run "
                     f"{EVAL_RUN}; re-run the register stage")
    assert "stale" not in fact(out, "clip") and out.count("stale:") == 1


def test_no_metrics_at_all_is_a_clear_error(project):
    shutil.rmtree(project / "metrics")
    out = galen("summary", check=False)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("galen: error: no metrics in metrics (looked for eval.json, registry.json")
    assert "run the pipeline first: `dvc repro` (or `make demo`)" in out.stderr
    (project / "metrics").mkdir()
    assert galen("summary", check=False).returncode == 2

    (project / "metrics" / "eval.json").write_text("{not json")
    out = galen("summary", check=False)
    assert out.returncode == 2 and "metrics/eval.json is not valid JSON" in out.stderr
    assert "`dvc repro evaluate`" in out.stderr
