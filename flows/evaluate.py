"""Evaluation stage: a Galen model folder on the test split of every task in the shards.

Predictions come from `model.predict.GalenPredictor.predict` (the same code path the registered
MLflow model and the endpoints use), so evaluated and served answers cannot drift apart. Metrics
come from the reference libraries, never our own arithmetic:

    vqa             exact-match accuracy overall, CLOSED and OPEN (answer_type); decoded with the trie
                    over the dataset's answer list (shards' candidates.json) when it has one
    caption         BLEU-4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap, PTB tokenizer; needs Java)
    summarization   ROUGE-1/2/L F1 with Porter stemming (rouge-score)
    classification  accuracy, macro-F1, one-vs-rest macro AUC from the per-label probabilities (scikit-learn)
    nli             the same over maybe / yes / no
    grounding       accuracy at IoU >= 0.5 and mean IoU (torchvision.ops.box_iou)

Scores are fractions in [0, 1] except CIDEr (0..10, as pycocoevalcap reports it). A task whose test
split spans several datasets also gets per-dataset metrics under `by_dataset`. Results go to a JSON
file (a DVC metric) and to an MLflow run: metrics, per-task tables of sample predictions, the
confusion matrices and per-task bar plots, and every prediction as a JSON-lines artifact.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galen.flows.ingest.schema import Record, read_records
from galen.flows.shards import shard_paths
from galen.model.errors import GalenInputError
from galen.model.tasks import (
    EVALUATED_TASKS,
    NLI_ANSWERS,
    NLI_LABEL_TO_ANSWER,
    build_prompt,
    closed_answers,
    vqa_prompt,
)
from galen.model.tasks import IMAGE_TASKS as ALL_IMAGE_TASKS

log = logging.getLogger(__name__)

EVAL_TASKS = EVALUATED_TASKS
IMAGE_TASKS = tuple(t for t in EVALUATED_TASKS if t in ALL_IMAGE_TASKS)
IOU_THRESHOLD = 0.5
EXPERIMENT = "galen-evaluate"


# --------------------------------------------------------------------------------------------------
# Metrics (pure functions over predictions and references)
# --------------------------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """Exact-match normalisation of the reference: lower case, single spaces."""
    return " ".join(str(text).lower().split())


def vqa_metrics(predictions: Sequence[str], references: Sequence[str],
                answer_types: Sequence[str | None]) -> dict[str, float]:
    """Exact-match accuracy overall and per answer type (CLOSED: yes/no style, OPEN: the rest)."""
    from sklearn.metrics import accuracy_score

    pred = [normalize_answer(p) for p in predictions]
    ref = [normalize_answer(r) for r in references]
    out: dict[str, float] = {"accuracy": float(accuracy_score(ref, pred)), "count": len(ref)}
    for kind in ("closed", "open"):
        idx = [i for i, t in enumerate(answer_types) if (t or "").strip().lower() == kind]
        out[f"{kind}_count"] = len(idx)
        if idx:
            out[f"{kind}_accuracy"] = float(accuracy_score([ref[i] for i in idx], [pred[i] for i in idx]))
    return out


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4, METEOR, ROUGE-L and CIDEr-D with the COCO caption toolkit (PTB-tokenized, lower-cased,
    punctuation removed). METEOR and the tokenizer run Java."""
    if shutil.which("java") is None:
        raise GalenInputError("caption metrics need Java (pycocoevalcap's PTB tokenizer and METEOR are Java "
                              "programs); install a JRE, e.g. `apt-get install openjdk-17-jre-headless`")
    if len(predictions) != len(references) or not predictions:
        raise GalenInputError("caption metrics need one non-empty reference list per prediction")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # "." tokenizes to nothing: an empty prediction stays one (empty) line for the line-based tokenizer
    res = {i: [{"caption": p.strip() or "."}] for i, p in enumerate(predictions)}
    gts = {i: [{"caption": r.strip() or "."} for r in refs] for i, refs in enumerate(references)}
    tokenizer = PTBTokenizer()
    gts_t, res_t = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram statistics
        bleu, _ = Bleu(4).compute_score(gts_t, res_t)
    meteor_scorer = Meteor()
    try:
        meteor, _ = meteor_scorer.compute_score(gts_t, res_t)
    finally:
        del meteor_scorer  # stops the Java process
    rouge, _ = Rouge().compute_score(gts_t, res_t)
    cider, _ = Cider().compute_score(gts_t, res_t)
    return {"bleu_4": float(bleu[3]), "meteor": float(meteor), "rouge_l": float(rouge), "cider": float(cider),
            "count": len(predictions)}


def summarization_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (rouge-score, Porter stemmer), as reported for MeQSum."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise GalenInputError("summarization metrics need one reference per prediction")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals: dict[str, float] = defaultdict(float)
    for pred, ref in zip(predictions, references):
        for key, score in scorer.score(ref, pred).items():
            totals[key] += score.fmeasure
    n = len(predictions)
    return {"rouge_1": totals["rouge1"] / n, "rouge_2": totals["rouge2"] / n, "rouge_l": totals["rougeL"] / n,
            "count": n}


def classification_metrics(references: Sequence[str], predictions: Sequence[str], labels: Sequence[str],
                           probabilities: Sequence[Sequence[float]] | None = None) -> dict[str, float]:
    """Accuracy, macro-F1 (over the classes that occur in references or predictions) and, given
    per-label probabilities (columns in `labels` order), the one-vs-rest AUC averaged over the classes
    that have both positive and negative references (AUC is undefined for the others)."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    out: dict[str, float] = {"accuracy": float(accuracy_score(references, predictions)),
                             "macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0)),
                             "count": len(references)}
    if probabilities is not None:
        probs = np.asarray(probabilities, dtype=np.float64)
        if probs.shape != (len(references), len(labels)):
            raise GalenInputError(f"probabilities have shape {probs.shape}, expected ({len(references)}, "
                                  f"{len(labels)}): one column per label")
        truth = np.asarray(references)
        aucs = [roc_auc_score(truth == label, probs[:, k]) for k, label in enumerate(labels)
                if 0 < int((truth == label).sum()) < len(truth)]
        if aucs:
            out["auc"] = float(np.mean(aucs))
    return out


def grounding_metrics(predicted: Sequence[Sequence[float]], references: Sequence[Sequence[float]],
                      threshold: float = IOU_THRESHOLD) -> dict[str, float]:
    """Fraction of predicted boxes with IoU >= threshold against the reference box, and the mean IoU."""
    import torch
    from torchvision.ops import box_iou

    if len(predicted) != len(references) or not predicted:
        raise GalenInputError("grounding metrics need one reference box per predicted box")
    iou = box_iou(torch.tensor(predicted, dtype=torch.float64),
                  torch.tensor(references, dtype=torch.float64)).diagonal()
    return {"accuracy": float((iou >= threshold).double().mean()), "mean_iou": float(iou.mean()),
            "count": len(predicted)}


# --------------------------------------------------------------------------------------------------
# Records -> requests and references
# --------------------------------------------------------------------------------------------------

def load_candidates(shards_dir: str | Path) -> dict[str, dict[str, list[str]]]:
    """The shards stage's closed answer sets, per dataset and task (empty if it wrote none)."""
    path = Path(shards_dir) / "candidates.json"
    if not path.is_file():
        return {}
    from galen.model.errors import read_json

    return read_json(path, dict, "re-run the shards stage (`dvc repro shards`)")


def eval_records(shards_dir: str | Path, task: str, limit: int | None = None) -> list[Record]:
    """The task's test split in shard order (records with a problem are skipped), at most `limit`."""
    records: list[Record] = []
    for path in shard_paths(shards_dir, task, "test"):
        for rec in read_records(path):
            if rec.problem:
                continue
            records.append(rec)
            if limit is not None and len(records) >= limit:
                return records
    return records


def record_request(record: Record, candidates: dict[str, dict[str, list[str]]]) -> dict[str, Any]:
    """The `GalenPredictor.predict` request that asks the model for this record's answer."""
    task, sets = record.task, candidates.get(record.dataset, {})
    if task == "vqa":
        req: dict[str, Any] = {"task": "vqa", "image": record.image, "question": record.question}
        if sets.get("vqa"):
            req["candidates"] = list(sets["vqa"])
        return req
    if task == "caption":
        return {"task": "caption", "image": record.image}
    if task == "classification":
        labels = record.candidates or sets.get("classification")
        if not labels:
            raise GalenInputError(f"classification record {record.source_id} ({record.dataset}) has no class names "
                                  "and candidates.json has none for its dataset; re-run the shards stage")
        return {"task": "classification", "image": record.image, "labels": list(closed_answers(task, labels) or ())}
    if task == "nli":
        return {"task": "nli", "premise": record.premise, "hypothesis": record.hypothesis}
    if task == "summarization":
        return {"task": "summarization", "text": record.text}
    if task == "grounding":
        phrase = (record.text or "").strip() or ((record.box_labels or [""])[0] or "").strip()
        return {"task": "grounding", "image": record.image, "text": phrase}
    raise GalenInputError(f"task {task!r} has no evaluation; evaluated tasks: {', '.join(EVAL_TASKS)}")


def reference(record: Record) -> Any:
    """What the prediction is scored against: an answer string, or a box for grounding."""
    if record.task == "nli":
        target = normalize_answer(record.target)
        return NLI_LABEL_TO_ANSWER.get(target, target)
    if record.task == "grounding":
        if not record.boxes:
            raise GalenInputError(f"grounding record {record.source_id} has no box")
        return [float(v) for v in record.boxes[0]]
    return " ".join(record.target.split())  # class names are compared as closed_answers() normalises them


def request_prompt(request: dict[str, Any]) -> str:
    """The instruction the model saw, for the sample tables."""
    task = request["task"]
    if task == "vqa":
        return vqa_prompt(request["question"])
    if task == "grounding" or task == "summarization":
        return build_prompt(task, text=request["text"])
    if task == "nli":
        return build_prompt("nli", premise=request["premise"], hypothesis=request["hypothesis"])
    return build_prompt(task)


# --------------------------------------------------------------------------------------------------
# One task
# --------------------------------------------------------------------------------------------------

@dataclass
class TaskResult:
    task: str
    metrics: dict[str, Any]
    records: list[Record]
    requests: list[dict[str, Any]]
    predictions: list[dict[str, Any]]
    references: list[Any]
    # dataset -> (labels, references, predictions), for the confusion matrices
    confusion: dict[str, tuple[list[str], list[str], list[str]]] = field(default_factory=dict)


def score_task(task: str, records: Sequence[Record], requests: Sequence[dict[str, Any]],
               predictions: Sequence[dict[str, Any]], references: Sequence[Any]) -> dict[str, Any]:
    """Metrics of one task's predictions (one dataset or several pooled)."""
    answers = [p["answer"] for p in predictions]
    if task == "vqa":
        return vqa_metrics(answers, references, [r.answer_type for r in records])
    if task == "caption":
        return caption_metrics(answers, [[ref] for ref in references])
    if task == "summarization":
        return summarization_metrics(answers, references)
    if task == "grounding":
        return grounding_metrics([p["box"] for p in predictions], references)
    # classification / nli: AUC needs one label set; pooled datasets with different sets get per-dataset AUCs
    label_sets = {tuple(req.get("labels") or NLI_ANSWERS) for req in requests}
    labels = list(next(iter(label_sets)))
    probs = [[p["scores"][label] for label in labels] for p in predictions] if len(label_sets) == 1 else None
    return classification_metrics(references, answers, labels, probs)


def evaluate_task(predictor, task: str, records: Sequence[Record],
                  candidates: dict[str, dict[str, list[str]]]) -> TaskResult:
    requests = [record_request(r, candidates) for r in records]
    predictions = predictor.predict(requests)
    references = [reference(r) for r in records]
    metrics = score_task(task, records, requests, predictions, references)
    datasets = sorted({r.dataset for r in records})
    if len(datasets) > 1:
        metrics["by_dataset"] = {}
        for ds in datasets:
            idx = [i for i, r in enumerate(records) if r.dataset == ds]
            metrics["by_dataset"][ds] = score_task(task, [records[i] for i in idx], [requests[i] for i in idx],
                                                   [predictions[i] for i in idx], [references[i] for i in idx])
        if "auc" not in metrics and task in ("classification", "nli"):
            aucs = [m["auc"] for m in metrics["by_dataset"].values() if "auc" in m]
            if aucs:
                metrics["auc"] = sum(aucs) / len(aucs)  # mean of the per-dataset AUCs (label sets differ)
    result = TaskResult(task, metrics, list(records), requests, predictions, references)
    if task in ("classification", "nli"):
        for ds in datasets:
            idx = [i for i, r in enumerate(records) if r.dataset == ds]
            labels = list(requests[idx[0]].get("labels") or NLI_ANSWERS)
            result.confusion[ds] = (labels, [references[i] for i in idx], [predictions[i]["answer"] for i in idx])
    return result


# --------------------------------------------------------------------------------------------------
# Reports: JSON, plots, MLflow
# --------------------------------------------------------------------------------------------------

def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metrics -> {"vqa.accuracy": 0.7, "vqa.by_dataset.slake.accuracy": ...}: MLflow metric keys,
    also the names params.yaml `registry.metrics` refers to. The finite numbers of `flatten`."""
    from galen.flows.tracking import flatten

    return {name: float(value) for name, value in flatten(metrics, prefix).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def plot_confusion(labels: list[str], refs: list[str], preds: list[str], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(refs, preds, labels=labels, ax=ax, colorbar=False,
                                            xticks_rotation="vertical")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_task_bars(metrics: dict[str, Any], path: Path) -> Path:
    """One panel per task with its scores (counts and per-dataset breakdowns left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in EVAL_TASKS if isinstance(metrics.get(t), dict)]
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(3.2 * max(len(tasks), 1), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        scores = {k: v for k, v in metrics[task].items()
                  if isinstance(v, (int, float)) and not k.endswith("count")}
        ax.bar(range(len(scores)), list(scores.values()), color="#4c72b0")
        ax.set_xticks(range(len(scores)), list(scores), rotation=45, ha="right")
        ax.set_title(f"{task} (n={metrics[task].get('count', '?')})")
        ax.set_ylim(0, max(1.0, *scores.values()) if scores else 1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(results: Sequence[TaskResult], metrics: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [plot_task_bars(metrics, folder / "task_metrics.png")]
    for result in results:
        for ds, (labels, refs, preds) in result.confusion.items():
            paths.append(plot_confusion(labels, refs, preds, f"{result.task}: {ds}",
                                        folder / f"confusion_{result.task}_{ds}.png"))
    return paths


def prediction_rows(results: Sequence[TaskResult]) -> list[dict[str, Any]]:
    """Every prediction with its record's identity and reference (the predictions artifact)."""
    return [{"task": res.task, "dataset": rec.dataset, "source_id": rec.source_id, "prediction": pred,
             "reference": ref}
            for res in results for rec, pred, ref in zip(res.records, res.predictions, res.references)]


def sample_table(result: TaskResult, samples: int) -> dict[str, list]:
    """The first `samples` predictions of a task as an MLflow table (images as images)."""
    from PIL import Image

    n = min(samples, len(result.records))
    table: dict[str, list] = {"dataset": [], "source_id": [], "prompt": [], "prediction": [], "reference": []}
    if result.task in IMAGE_TASKS:
        table["image"] = []
    for i in range(n):
        rec, req, pred = result.records[i], result.requests[i], result.predictions[i]
        table["dataset"].append(rec.dataset)
        table["source_id"].append(rec.source_id)
        table["prompt"].append(request_prompt(req))
        table["prediction"].append(json.dumps(pred["box"]) if "box" in pred else pred["answer"])
        ref = result.references[i]
        table["reference"].append(ref if isinstance(ref, str) else json.dumps(ref))
        if "image" in table:
            with Image.open(io.BytesIO(rec.image)) as img:  # type: ignore[arg-type]
                table["image"].append(img.convert("RGB"))
    return table


def log_to_mlflow(run_id: str | None, experiment: str, metrics: dict[str, Any], results: Sequence[TaskResult],
                  params: dict[str, Any], tags: dict[str, str], plot_paths: Sequence[Path], predictions_path: Path,
                  samples: int, uri: str | None = None) -> str:
    """Metrics, sample tables, plots and predictions into `run_id` (or a new run); returns the run id."""
    from galen.flows.tracking import TrainingRun

    if run_id:  # e.g. the training run: settings as tags, since params cannot change on a re-evaluation
        run = TrainingRun.attach(run_id, uri)
        run.set_tags({**tags, **{f"eval.{k}": v for k, v in params.items()}})
    else:
        run = TrainingRun.start_or_resume(experiment, "evaluate", None, params, tags, uri=uri, system_metrics=False)
    client = run.client
    try:
        run.log_metrics(flat_metrics(metrics), step=0)
        for result in results:
            if samples > 0 and result.records:
                client.log_table(run.run_id, sample_table(result, samples), f"eval/samples_{result.task}.json")
        for path in plot_paths:
            client.log_artifact(run.run_id, str(path), "eval/plots")
        client.log_artifact(run.run_id, str(predictions_path), "eval")
    except BaseException:
        if not run_id:
            run.end("FAILED")
        raise
    if not run_id:
        run.end("FINISHED")
    return run.run_id


def served_labels(results: Sequence[TaskResult]) -> dict[str, list[str]]:
    """The class names the model was evaluated on, in first-seen order over all classification
    datasets: registered with the version, they are what `/v1/classify` offers without `labels`."""
    names: list[str] = []
    for result in results:
        if result.task == "classification":
            for req in result.requests:
                names += [n for n in req.get("labels") or () if n not in names]
    return {"classification": names} if names else {}


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

def evaluate(model_dir: str | Path, shards_dir: str | Path, out: str | Path, *, limit: int | None = None,
             tasks: Sequence[str] | None = None, predict_config=None, log_mlflow: bool = True,
             run_id: str | None = None, experiment: str = EXPERIMENT, predictions_path: str | Path | None = None,
             plots_dir: str | Path | None = None, samples: int = 8, uri: str | None = None) -> dict[str, Any]:
    """Evaluate `model_dir` on the test split of every evaluable task in `shards_dir`; write the metrics
    JSON to `out` (with the MLflow run id when logged) and return it."""
    from galen.flows.shards import check_written_for
    from galen.model.checkpoint import folder_digest
    from galen.model.predict import GalenPredictor, PredictConfig

    if limit is not None and limit < 1:
        raise GalenInputError(f"--limit must be >= 1, got {limit}")
    unknown = sorted(set(tasks or ()) - set(EVAL_TASKS))
    if unknown:
        raise GalenInputError(f"cannot evaluate tasks {unknown}; evaluated tasks: {', '.join(EVAL_TASKS)}")
    shards = Path(shards_dir)
    if not shards.is_dir():
        raise GalenInputError(f"shards folder {shards} does not exist; run the shards stage first")
    present = sorted(p.parent.name for p in shards.glob("*/test") if p.is_dir())
    chosen = [t for t in EVAL_TASKS if t in present and (not tasks or t in tasks)]
    skipped = sorted(set(present) - set(EVAL_TASKS))
    if skipped:
        log.warning("no evaluation for tasks %s (their test splits are left out)", skipped)
    if tasks:
        missing = sorted(set(tasks) - set(present))
        if missing:
            raise GalenInputError(f"{shards} has no test split for {missing}; present: {present}")
    if not chosen:
        raise GalenInputError(f"{shards} has no test split of any evaluated task ({', '.join(EVAL_TASKS)})")

    config = predict_config or PredictConfig()
    predictor = GalenPredictor.load(model_dir, config)
    check_written_for(shards, "generalist", predictor.image_size, f"the model {model_dir}")
    sha = folder_digest(model_dir)  # of the files just loaded: register checks it names the same model
    candidates = load_candidates(shards)
    results: list[TaskResult] = []
    for task in chosen:
        records = eval_records(shards, task, limit)
        if not records:
            log.warning("the %s test split has no usable records; skipped", task)
            continue
        log.info("evaluating %s on %d records", task, len(records))
        results.append(evaluate_task(predictor, task, records, candidates))
    if not results:
        raise GalenInputError(f"no usable test records in {shards}")
    metrics: dict[str, Any] = {r.task: r.metrics for r in results}

    rows = prediction_rows(results)
    with tempfile.TemporaryDirectory() as tmp:
        pred_path = Path(tmp) / "predictions.jsonl"  # the MLflow artifact's name, whatever the local copy's
        pred_path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
        if predictions_path:
            Path(predictions_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pred_path, predictions_path)
        plot_paths = write_plots(results, metrics, Path(plots_dir) if plots_dir else Path(tmp) / "plots") \
            if (plots_dir or log_mlflow) else []
        report: dict[str, Any] = dict(metrics)
        if log_mlflow:
            params = {"model": str(model_dir), "shards": str(shards_dir), "limit": limit, "tasks": ",".join(chosen),
                      "predict_config": json.dumps(config.to_dict(), sort_keys=True)}
            tags = {"galen.stage": "evaluate", "galen.model_sha256": sha,
                    "galen.predict_config": json.dumps(config.to_dict(), sort_keys=True),
                    "galen.labels": json.dumps(served_labels(results))}
            report = {"run_id": log_to_mlflow(run_id, experiment, metrics, results, params, tags, plot_paths,
                                              pred_path, samples, uri), **metrics}
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return report
