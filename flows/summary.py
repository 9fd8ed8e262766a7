"""`galen summary`: the short table `make demo` ends with.

Why this exists: `dvc metrics show` prints one row per metrics file with every flattened key, a
200-column line a person has to take apart to learn the four things they ran the demo for: what
the model scores on held-out data, whether that beats guessing, which registered version came out
of it (and whether it became champion), and where to look next (the model folder, the MLflow UI).
This reads the files the pipeline writes (dvc.yaml) and prints exactly that, one line per task;
`dvc metrics show --md` still prints every metric.

    metrics/eval.json              `galen evaluate`: per task metrics (+ the MLflow run id)
    metrics/eval_predictions.jsonl `galen evaluate --predictions`: every test reference, for the baselines
    metrics/registry.json          `galen register --promote --report`: version, decision, aliases
    metrics/clip_eval.json         `galen clip evaluate`: zero-shot, linear probe, retrieval
    metrics/clip_registry.json     `galen clip register --promote --report`
    metrics/data_report.json       `galen validate --report`: rows kept and quarantined

Baselines come only from what the run stored; where nothing honest is on file the cell is "—":

    chance    a uniform guess over the answers each test record was scored against: the label set of
              the prediction's `scores` (classification; NLI's fixed maybe / yes / no), yes / no for
              closed VQA when every closed reference is yes or no, the `chance` the CLIP
              zero-shot report stores (its linear probe is scored on the same labels), and k / texts
              for image -> text Recall@k (one relevant caption among `texts` distinct ones)
    majority  always answering each dataset's most frequent test answer (the references in
              eval_predictions.jsonl; VQA's closed / open split from the shards' answer_type); the
              CLIP classification rows reuse it when they were scored on the same test rows

Predictions whose counts do not match eval.json (a stale file) are not used.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from galen.model.errors import GalenInputError, read_json

DASH = "—"
PREDICTIONS = "eval_predictions.jsonl"
# metrics file -> the dvc.yaml stage that writes it
STAGES = {"eval.json": "evaluate", "registry.json": "register", "clip_eval.json": "clip_evaluate",
          "clip_registry.json": "clip_register", "data_report.json": "validate"}
TASK_ORDER = ("vqa", "classification", "nli", "caption", "summarization", "grounding")
# task -> (metric key in eval.json, how it is shown)
HEADLINE = {"vqa": ("accuracy", "accuracy"), "classification": ("accuracy", "accuracy"),
            "nli": ("accuracy", "accuracy"), "caption": ("cider", "CIDEr"),
            "summarization": ("rouge_l", "ROUGE-L"), "grounding": ("accuracy", "acc@IoU≥0.5")}
RETRIEVAL_K = 5  # the Recall@k shown (params.yaml clip.registry compares retrieval.image_to_text.recall_at_5)


@dataclass
class Row:
    task: str
    count: int | None
    headline: str
    chance: float | None = None
    majority: float | None = None


# --------------------------------------------------------------------------------------------------
# Baselines from the stored references
# --------------------------------------------------------------------------------------------------

def majority_rate(rows: Iterable[Mapping[str, Any]], normalize=lambda s: s) -> float | None:
    """Accuracy of always answering each dataset's most frequent reference (None without rows)."""
    by_dataset: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        ref = row.get("reference")
        if not isinstance(ref, str):
            return None  # boxes, or anything else without a "most frequent answer"
        by_dataset[str(row.get("dataset"))][normalize(ref)] += 1
    total = sum(sum(c.values()) for c in by_dataset.values())
    return sum(c.most_common(1)[0][1] for c in by_dataset.values()) / total if total else None


def label_set_chance(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """Mean over the rows of 1 / (size of the label set the prediction was scored over)."""
    sizes = [len((row.get("prediction") or {}).get("scores") or ()) for row in rows]
    if not sizes or not all(sizes):
        return None
    return sum(1.0 / n for n in sizes) / len(sizes)


def read_predictions(path: Path) -> dict[str, list[dict[str, Any]]]:
    """eval_predictions.jsonl grouped by task (empty if the file is missing)."""
    if not path.is_file():
        return {}
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GalenInputError(f"{path} line {n} is not valid JSON ({e}); re-run `dvc repro evaluate`") from e
        if isinstance(row, dict):
            out[str(row.get("task"))].append(row)
    return dict(out)


def vqa_answer_types(shards_dir: Path) -> dict[tuple[str, str], str]:
    """(dataset, source_id) -> "closed" / "open" of the shards' VQA test split (empty without shards)."""
    import pyarrow.parquet as pq

    from galen.flows.shards import shard_paths

    types: dict[tuple[str, str], str] = {}
    for path in shard_paths(shards_dir, "vqa", "test"):
        table = pq.read_table(path, columns=["dataset", "source_id", "answer_type"]).to_pylist()
        for rec in table:
            types[(rec["dataset"], rec["source_id"])] = (rec["answer_type"] or "").strip().lower()
    return types


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------

def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _headline(task: str, metrics: Mapping[str, Any]) -> tuple[str, float] | None:
    key, shown = HEADLINE.get(task, (None, None))
    if key is None or _num(metrics.get(key)) is None:  # a task this table does not know: its first score
        key = next((k for k, v in metrics.items() if _num(v) is not None and not k.endswith("count")), None)
        shown = key
    return None if key is None else (str(shown), float(metrics[key]))


def generalist_rows(report: Mapping[str, Any], predictions: Mapping[str, list[dict[str, Any]]],
                    answer_types: Mapping[tuple[str, str], str]) -> tuple[list[Row], list[str]]:
    """One row per task of eval.json (VQA: all, closed, open), and notes on missing baselines."""
    from galen.flows.evaluate import normalize_answer
    from galen.model.tasks import YES_NO, closed_answers

    rows, notes = [], []
    tasks = [t for t in TASK_ORDER if isinstance(report.get(t), dict)]
    tasks += [t for t, v in report.items() if isinstance(v, dict) and t not in tasks]
    for task in tasks:
        metrics = report[task]
        head = _headline(task, metrics)
        if head is None:
            continue
        count = metrics.get("count")
        preds = predictions.get(task, [])
        if preds and len(preds) != count:
            notes.append(f"{PREDICTIONS} has {len(preds)} {task} rows but eval.json counts {count}; "
                         "its baselines are left out (re-run `dvc repro evaluate`)")
            preds = []
        norm = normalize_answer if task == "vqa" else (lambda s: s)
        chance = None
        if task == "nli":
            chance = 1.0 / len(closed_answers("nli") or ())
        elif task == "classification" and preds:
            chance = label_set_chance(preds)
        majority = majority_rate(preds, norm) if preds and task in ("vqa", "classification", "nli") else None
        rows.append(Row(task if task != "vqa" else "vqa, all", count, f"{head[0]} = {head[1]:.3f}", chance, majority))
        if task != "vqa":
            continue
        if not any(metrics.get(f"{kind}_count") for kind in ("closed", "open")):
            rows[-1].task = "vqa"  # no answer types in the report: nothing to tell "all" apart from
            continue
        typed = [r for r in preds if (r.get("dataset"), r.get("source_id")) in answer_types]
        if preds and len(typed) != len(preds):
            typed = []  # predictions of test rows the shards do not hold: the split is unknown
        for kind in ("closed", "open"):
            if not metrics.get(f"{kind}_count") or f"{kind}_accuracy" not in metrics:
                continue
            subset = [r for r in typed if answer_types[(r["dataset"], r["source_id"])] == kind]
            if len(subset) != metrics[f"{kind}_count"]:
                subset = []
            chance = 1.0 / len(YES_NO) if kind == "closed" and subset and all(
                normalize_answer(r["reference"]) in YES_NO for r in subset) else None
            rows.append(Row(f"vqa, {kind}", metrics[f"{kind}_count"], f"accuracy = {metrics[f'{kind}_accuracy']:.3f}",
                            chance, majority_rate(subset, normalize_answer) if subset else None))
        if preds and not typed and (metrics.get("closed_count") or metrics.get("open_count")):
            notes.append("closed / open VQA baselines need the shards' answer types (data/shards/vqa/test; "
                         "`dvc repro shards`, or --shards)")
    if report and not predictions:
        notes.append(f"majority baselines need {PREDICTIONS} (`galen evaluate --predictions`, `dvc repro evaluate`)")
    return rows, notes


def _dataset_counts(metrics: Mapping[str, Any]) -> dict[str, int] | None:
    by = metrics.get("by_dataset")
    if isinstance(by, dict):
        return {ds: m.get("count") for ds, m in by.items() if isinstance(m, dict)}
    return None


def clip_rows(report: Mapping[str, Any],
                     classification_predictions: Sequence[Mapping[str, Any]]) -> list[Row]:
    """Zero-shot and linear-probe accuracy, image -> text Recall@k of clip_eval.json."""
    rows = []
    pred_counts = Counter(str(r.get("dataset")) for r in classification_predictions)

    def same_rows(metrics: Mapping[str, Any]) -> bool:  # scored on the generalist's classification test rows?
        counts = _dataset_counts(metrics)
        if counts is None:
            return len(pred_counts) == 1 and sum(pred_counts.values()) == metrics.get("count")
        return counts == dict(pred_counts)

    zero = report.get("zero_shot")
    zero_chance = _num(zero.get("chance")) if isinstance(zero, dict) else None
    for key, label in (("zero_shot", "zero-shot classification"), ("linear_probe", "linear probe")):
        m = report.get(key)
        if not isinstance(m, dict) or _num(m.get("accuracy")) is None:
            continue
        chance = _num(m.get("chance"))
        if chance is None and isinstance(zero, dict) and m.get("count") == zero.get("count") and \
                _dataset_counts(m) == _dataset_counts(zero):
            chance = zero_chance  # the same test rows, scored over the same label sets
        majority = majority_rate(classification_predictions) if classification_predictions and same_rows(m) else None
        rows.append(Row(label, m.get("count"), f"accuracy = {m['accuracy']:.3f}", chance, majority))
    retrieval = report.get("retrieval")
    if isinstance(retrieval, dict) and isinstance(retrieval.get("image_to_text"), dict):
        recalls = retrieval["image_to_text"]
        k = RETRIEVAL_K if f"recall_at_{RETRIEVAL_K}" in recalls else \
            min((int(name.rsplit("_", 1)[1]) for name in recalls if name.startswith("recall_at_")), default=None)
        if k is not None:
            texts = retrieval.get("texts")
            chance = min(1.0, k / texts) if isinstance(texts, int) and texts > 0 else None
            rows.append(Row("retrieval image→text", retrieval.get("images"),
                            f"Recall@{k} = {recalls[f'recall_at_{k}']:.3f}", chance))
    return rows


# --------------------------------------------------------------------------------------------------
# Registry, model folders, MLflow, data
# --------------------------------------------------------------------------------------------------

def registry_lines(report: Mapping[str, Any], evaluated_run: str | None = None) -> list[str]:
    """`name version N: champion` / `not champion`, and why not (the promotion decision's shortfalls)."""
    name, version = report.get("name", "?"), str(report.get("version", "?"))
    head = f"{name} version {version}"
    aliases = report.get("aliases") if isinstance(report.get("aliases"), dict) else None
    decision = str(report.get("decision") or "").replace("`", "")
    if "promoted" not in report and aliases is None:
        lines = [f"{head}: registered, not promoted (`galen promote --version {version}`)"]
    else:
        champion = aliases.get("champion") if aliases else None
        if (champion == version) if champion is not None else bool(report.get("promoted")):
            previous = aliases.get("previous") if aliases else None
            lines = [f"{head}: champion" + (f" (previous: version {previous})" if previous else "")]
        else:
            role = "challenger" if aliases and aliases.get("challenger") == version else None
            extra = "; ".join(x for x in (role, f"champion: version {champion}" if champion else None) if x)
            lines = [f"{head}: not champion" + (f" ({extra})" if extra else "")]
            if decision:
                lines.append("why: " + (decision.split("Short: ", 1)[1] if "Short: " in decision else decision))
    run = report.get("run_id")
    if evaluated_run and run and run != evaluated_run:
        lines.append(f"stale: registered from MLflow run {run}, the metrics file is of run {evaluated_run}; "
                     "re-run the register stage")
    return lines


def mlflow_line(project: str | Path | None = None) -> str:
    """How to open the MLflow UI on the store the pipeline logged to (galen.flows.paths.tracking_uri)."""
    from galen.flows.paths import tracking_uri

    try:
        uri = tracking_uri(project)
    except GalenInputError:
        return "no project here (params.yaml) and MLFLOW_TRACKING_URI is not set: run from the project folder"
    if uri.startswith(("http://", "https://")):
        return f"open {uri} (the tracking server's UI)"
    return f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000"


def data_line(report: Mapping[str, Any]) -> str:
    rows, valid, bad = report.get("rows"), report.get("valid"), report.get("quarantined")
    fraction, limit = _num(report.get("bad_fraction")), _num(report.get("max_bad_fraction"))
    share = f" ({fraction:.1%} of rows; limit {limit:.1%})" if fraction is not None and limit is not None else ""
    return f"{rows:,} rows validated: {valid:,} kept, {bad:,} quarantined{share}" \
        if all(isinstance(x, int) for x in (rows, valid, bad)) else "data_report.json has no row counts"


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------

def _cell(value: float | None) -> str:
    return DASH if value is None else f"{value:.3f}"


def format_rows(sections: Sequence[tuple[str, list[Row]]]) -> list[str]:
    header = ("task (held-out test split)", "n", "result", "chance", "majority")
    body = [(f"  {r.task}", "" if r.count is None else str(r.count), r.headline, _cell(r.chance), _cell(r.majority))
            for _, rows in sections for r in rows]
    widths = [max(len(c[i]) for c in [header, *body]) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        left, n, result, chance, majority = cells
        return (f"{left:<{widths[0]}}  {n:>{widths[1]}}  {result:<{widths[2]}}  {chance:>{widths[3]}}  "
                f"{majority:>{widths[4]}}").rstrip()

    out = [fmt(header), "-" * len(fmt(header))]
    i = 0
    for title, rows in sections:
        out.append(title)
        for _ in rows:
            out.append(fmt(body[i]))
            i += 1
    return out


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return read_json(path, dict, f"re-run the stage that writes it (`dvc repro {STAGES.get(path.name, '')}`)")


def build_summary(metrics_dir: str | Path = "metrics", *, shards_dir: str | Path = "data/shards",
                  model_dir: str | Path = "artifacts/model", clip_model_dir: str | Path = "artifacts/clip_model",
                  project: str | Path | None = None) -> str:
    """The summary table of a pipeline run, from the metrics files in `metrics_dir`."""
    folder = Path(metrics_dir)
    files = {name: _read(folder / name) for name in STAGES}
    if not any(v is not None for v in files.values()):
        raise GalenInputError(f"no metrics in {folder} (looked for {', '.join(STAGES)}); run the pipeline first: "
                              "`dvc repro` (or `make demo`)")
    ev, reg, clip, clip_reg, data = (files[n] for n in STAGES)
    notes: list[str] = []
    sections: list[tuple[str, list[Row]]] = []
    predictions = read_predictions(folder / PREDICTIONS) if ev is not None else {}
    if ev is not None:
        types = vqa_answer_types(Path(shards_dir)) if "vqa" in predictions else {}
        rows, ev_notes = generalist_rows(ev, predictions, types)
        notes += ev_notes
        run = f", MLflow run {ev['run_id']}" if ev.get("run_id") else ""
        sections.append((f"generalist ({folder / 'eval.json'}{run})", rows))
    if clip is not None:
        run = f", MLflow run {clip['run_id']}" if clip.get("run_id") else ""
        sections.append((f"clip ({folder / 'clip_eval.json'}{run})",
                         clip_rows(clip, predictions.get("classification", []))))

    lines = ["Galen results", ""]
    if any(rows for _, rows in sections):
        lines += format_rows(sections)
        lines += ["chance: uniform guess over the answers; majority: each dataset's most frequent test answer; "
                  f"{DASH}: none on file", ""]
    facts: list[tuple[str, str]] = []
    for label, registry, evaluated in (("generalist", reg, ev), ("clip", clip_reg, clip)):
        if registry is not None:
            first, *more = registry_lines(registry, evaluated.get("run_id") if evaluated else None)
            facts += [(label, first), *(("", line) for line in more)]
    folders = [f"{p}" + ("" if Path(p).is_dir() else " (not there)") for p in (model_dir, clip_model_dir)]
    facts.append(("model folders", ", ".join(folders)))
    if reg is not None or clip_reg is not None:
        facts.append(("serve", "galen serve   (serves the registered model's `champion`)"))
    facts.append(("MLflow UI", mlflow_line(project)))
    if data is not None:
        facts.append(("data", data_line(data)))
    facts.append(("every metric", "dvc metrics show --md"))
    width = max(len(k) for k, _ in facts)
    lines += [f"{k:<{width}}  {v}" for k, v in facts]
    missing = [f"  {folder / name}: run `dvc repro {stage}`" for name, stage in STAGES.items() if files[name] is None]
    if missing:
        lines += ["", "not there yet:", *missing]
    if notes:
        lines += ["", *[f"note: {n}" for n in notes]]
    return "\n".join(lines) + "\n"
