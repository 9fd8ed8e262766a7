"""`galen clip evaluate`: a CLIP model on the test splits of the shards.

    zero_shot      classification test split, per dataset: class embeddings averaged over the prompt
                   templates, softmax over the scaled cosine similarities; accuracy, macro-F1 and AUC
                   (scikit-learn, through `flows.evaluate.classification_metrics`) and the chance level
    linear_probe   logistic regression (scikit-learn) on frozen image embeddings of the train split,
                   scored on the test split with the same metrics
    retrieval      caption test split, image -> text and text -> image Recall@1/5/10. Texts that are
                   identical (the same caption for several images) are one candidate: a retrieved
                   caption or image counts when its caption equals the query's

Results go to a JSON file (a DVC metric) and to an MLflow run: metrics, a confusion matrix per
zero-shot dataset, the model's sha256 (register checks it names the same folder).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from galen.flows.evaluate import classification_metrics, eval_records, load_candidates, plot_confusion
from galen.model.errors import GalenInputError

log = logging.getLogger(__name__)

EXPERIMENT = "galen-clip-evaluate"
ZERO_SHOT_TEMPLATES = ("{}.", "an image of {}.", "a histology slide showing {}.", "a medical image of {}.")
RECALL_AT = (1, 5, 10)


def recall_at_k(similarity: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """Fraction of queries (rows) with a relevant candidate among their k most similar (columns)."""
    if similarity.shape != relevant.shape or similarity.ndim != 2 or not similarity.numel():
        raise GalenInputError(f"similarity {tuple(similarity.shape)} and relevance {tuple(relevant.shape)} must be "
                              "the same non-empty (queries, candidates) matrix")
    order = similarity.argsort(dim=1, descending=True)
    hits = relevant.gather(1, order)
    return {f"recall_at_{k}": float(hits[:, :k].any(dim=1).float().mean()) for k in ks}


def retrieval_metrics(model: Any, records: Sequence[Any]) -> dict[str, Any]:
    """Image <-> text Recall@K over captioned images (identical captions are one text candidate)."""
    texts = sorted({r.target for r in records})
    caption_of = [texts.index(r.target) for r in records]
    img = model.encode_images([r.image for r in records])
    txt = model.encode_texts(texts)
    relevant = torch.zeros(len(records), len(texts), dtype=torch.bool)
    relevant[torch.arange(len(records)), torch.tensor(caption_of)] = True
    sim = img @ txt.T
    return {"image_to_text": recall_at_k(sim, relevant), "text_to_image": recall_at_k(sim.T, relevant.T),
            "images": len(records), "texts": len(texts)}


def _labels(records: Sequence[Any], candidates: dict) -> list[str]:
    dataset = records[0].dataset
    labels = records[0].candidates or candidates.get(dataset, {}).get("classification")
    if not labels:
        raise GalenInputError(f"the {dataset} classification records have no class names and candidates.json has "
                              "none; re-run the shards stage")
    return list(labels)


def zero_shot_metrics(model: Any, records: Sequence[Any], labels: Sequence[str],
                      templates: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    probs = model.zero_shot(model.encode_images([r.image for r in records]), model.class_embeddings(labels, templates))
    predictions = [labels[int(i)] for i in probs.argmax(dim=1)]
    metrics = classification_metrics([r.target for r in records], predictions, labels, probs.tolist())
    metrics["chance"] = 1.0 / len(labels)
    return metrics, predictions


def linear_probe_metrics(model: Any, train: Sequence[Any], test: Sequence[Any], labels: Sequence[str],
                         seed: int = 0) -> dict[str, float]:
    """Logistic regression on frozen image embeddings (train split) scored on the test split."""
    from sklearn.linear_model import LogisticRegression

    x_train = model.encode_images([r.image for r in train]).numpy()
    x_test = model.encode_images([r.image for r in test]).numpy()
    probe = LogisticRegression(max_iter=2000, C=10.0, random_state=seed).fit(x_train, [r.target for r in train])
    probs = probe.predict_proba(x_test)
    columns = {c: k for k, c in enumerate(probe.classes_)}
    full = [[row[columns[label]] if label in columns else 0.0 for label in labels] for row in probs]
    return classification_metrics([r.target for r in test], list(probe.predict(x_test)), labels, full)


def _split_records(shards: Path, task: str, split: str, limit: int | None) -> list[Any]:
    from galen.flows.ingest.schema import read_records
    from galen.flows.shards import shard_paths

    out = []
    for path in shard_paths(shards, task, split):
        out.extend(r for r in read_records(path) if not r.problem)
        if limit and len(out) >= limit:
            return out[:limit]
    return out


def evaluate_clip(model_dir: str | Path, shards_dir: str | Path, out: str | Path, *, limit: int | None = None,
                  templates: Sequence[str] = ZERO_SHOT_TEMPLATES, probe_limit: int | None = 2000,
                  plots_dir: str | Path | None = None, log_mlflow: bool = True,
                  experiment: str = EXPERIMENT) -> dict[str, Any]:
    """Zero-shot, linear probe and retrieval metrics of `model_dir` on `shards_dir`; writes `out`."""
    from collections import defaultdict

    from galen.flows.shards import check_written_for
    from galen.model.checkpoint import folder_digest
    from galen.model.clip import ClipModel

    if limit is not None and limit < 1:
        raise GalenInputError(f"--limit must be >= 1, got {limit}")
    shards = Path(shards_dir)
    if not shards.is_dir():
        raise GalenInputError(f"shards folder {shards} does not exist; run the shards stage first")
    model = ClipModel.from_pretrained(model_dir)
    check_written_for(shards, "clip", model.spec.image_size, f"the CLIP model {model_dir}")
    sha = folder_digest(model_dir)
    candidates = load_candidates(shards)
    metrics: dict[str, Any] = {}
    confusions: list[tuple[str, list[str], list[str], list[str]]] = []

    by_dataset: dict[str, list[Any]] = defaultdict(list)
    for r in eval_records(shards, "classification", limit):
        by_dataset[r.dataset].append(r)
    train_by_dataset: dict[str, list[Any]] = defaultdict(list)
    if by_dataset:
        for r in _split_records(shards, "classification", "train", probe_limit):
            train_by_dataset[r.dataset].append(r)
    zero, probe = {}, {}
    for dataset, records in sorted(by_dataset.items()):
        labels = _labels(records, candidates)
        zero[dataset], predictions = zero_shot_metrics(model, records, labels, templates)
        confusions.append((dataset, labels, [r.target for r in records], predictions))
        if len({r.target for r in train_by_dataset.get(dataset, [])}) >= 2:
            probe[dataset] = linear_probe_metrics(model, train_by_dataset[dataset], records, labels)
    if zero:
        metrics["zero_shot"] = _pooled(zero)
        if probe:
            metrics["linear_probe"] = _pooled(probe)
    captions = eval_records(shards, "caption", limit)
    if len(captions) >= 2:
        metrics["retrieval"] = retrieval_metrics(model, captions)
    if not metrics:
        raise GalenInputError(f"{shards} has no classification or caption test split to evaluate a CLIP "
                              "model on; ingest a classification or caption dataset")

    report: dict[str, Any] = dict(metrics)
    if log_mlflow:
        report = {"run_id": _log(metrics, confusions, sha, model_dir, shards_dir, limit, templates, plots_dir,
                                 experiment), **metrics}
    elif plots_dir:
        _plots(confusions, Path(plots_dir))
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _pooled(per_dataset: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Count-weighted means over datasets (one dataset: its own numbers), plus `by_dataset`."""
    total = sum(m["count"] for m in per_dataset.values())
    keys = set.intersection(*(set(m) for m in per_dataset.values())) - {"count"}
    pooled: dict[str, Any] = {k: sum(m[k] * m["count"] for m in per_dataset.values()) / total for k in sorted(keys)}
    pooled["count"] = total
    if len(per_dataset) > 1:
        pooled["by_dataset"] = per_dataset
    return pooled


def _plots(confusions, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [plot_confusion(labels, refs, preds, f"zero-shot {dataset}", folder / f"zero_shot_{dataset}.png")
            for dataset, labels, refs, preds in confusions]


def _log(metrics, confusions, sha, model_dir, shards_dir, limit, templates, plots_dir, experiment) -> str:
    import tempfile

    from galen.flows.evaluate import flat_metrics
    from galen.flows.tracking import TrainingRun

    params = {"model": str(model_dir), "shards": str(shards_dir), "limit": limit, "templates": json.dumps(list(templates))}
    run = TrainingRun.start_or_resume(experiment, "clip-evaluate", None, params,
                                      {"galen.stage": "clip_evaluate", "galen.model_sha256": sha},
                                      system_metrics=False)
    try:
        run.log_metrics(flat_metrics(metrics), step=0)
        with tempfile.TemporaryDirectory() as tmp:
            for path in _plots(confusions, Path(plots_dir) if plots_dir else Path(tmp)):
                run.client.log_artifact(run.run_id, str(path), "eval/plots")
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")
    return run.run_id


def build_index(model_dir: str | Path, shards_dir: str | Path, out: str | Path, *, tasks: Sequence[str] = ("caption",),
                split: str = "test", limit: int | None = None) -> Any:
    """A retrieval index of a shard split (images + captions; classification rows are captioned with
    their class name) for `/v1/retrieve`, saved to `out`."""
    from galen.model.clip import ClipModel, RetrievalIndex

    records = [r for task in tasks for r in _split_records(Path(shards_dir), task, split, limit) if r.image]
    if not records:
        raise GalenInputError(f"no {split} rows with images for {', '.join(tasks)} under {shards_dir}")
    model = ClipModel.from_pretrained(model_dir)
    items = [{"id": r.source_id, "dataset": r.dataset, "task": r.task} for r in records]
    index = RetrievalIndex.build(model, [r.image for r in records], [r.target for r in records], items)
    index.save(out)
    return index
