"""`galen clip train`: CLIP training on Ray Train workers under DeepSpeed.

The same machinery as the generalist's trainer (`flows.train.generalist_trainer`): checks before any worker
starts, a job named by its params (a rerun resumes an unfinished job), one MLflow run per job,
checkpoints every `checkpoint_every` steps restored after a worker dies (`FailureConfig`), local or
s3:// storage. What differs is the step: every worker embeds its batch of image-text pairs, the
features of all workers are gathered with gradients and each worker scores its own rows against
every column (symmetric InfoNCE with a learnable temperature, `model.losses.clip_loss`).

Pairs come from the shards of the data stages: `caption` rows (caption-csv, webdataset, report
datasets) pair an image with its caption; `classification` rows become captions of their class
through `label_templates` (the "captions of the other datasets").
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from galen.model.errors import GalenInputError

PAIR_SOURCES = ("caption", "classification")
LABEL_TEMPLATES = ("{}", "a pathology image of {}", "tissue showing {}", "microscopy of {}")


@dataclass
class ClipTrainConfig:
    """params.yaml `clip:` `train` section (recipe defaults after BiomedCLIP: AdamW betas (0.9, 0.98),
    eps 1e-6, weight decay 0.2, warmup then cosine)."""

    config: str = "micro"                   # named config (model.clip.CONFIGS), unless init
    init: str | None = None                 # a CLIP model folder to start from (e.g. imported BiomedCLIP)
    sources: dict[str, float] = field(default_factory=lambda: {"caption": 1.0, "classification": 1.0})
    label_templates: list[str] = field(default_factory=lambda: list(LABEL_TEMPLATES))
    steps: int = 300
    batch_size: int = 32                    # per worker; every worker must have the same (gathered loss)
    lr: float = 5e-4
    weight_decay: float = 0.2
    warmup_steps: int = 20
    grad_clip: float = 1.0
    zero_stage: int = 1
    precision: str = "fp32"
    num_workers: int = 2
    use_gpu: bool = False
    checkpoint_every: int = 100
    max_failures: int = 2
    storage_path: str = "ray_results"
    placement_strategy: str = "PACK"
    run_name: str | None = None
    experiment: str = "galen-clip"
    seed: int = 0
    shards: str = "data/shards"
    tokenizer: str = "artifacts/tokenizer"
    out: str = "artifacts/clip_model"
    metrics: str | None = None
    log_every: int = 10
    cache_rows: int = 10000                 # a worker's shard of a source up to this many rows is cycled in memory

    def check(self) -> None:
        from galen.flows.train.generalist_trainer import run_field_problems
        from galen.model.clip import CONFIGS

        problems = []
        if not self.init and self.config not in CONFIGS:
            problems.append(f"config {self.config!r} is not one of {', '.join(sorted(CONFIGS))}")
        if self.zero_stage not in (0, 1, 2):
            problems.append(f"zero_stage must be 0, 1 or 2 for the CLIP model (its features are gathered "
                            f"every step; ZeRO-2 already shards what pays off), got {self.zero_stage}")
        problems += run_field_problems(self, ("steps", "batch_size", "num_workers", "checkpoint_every", "log_every",
                                              "cache_rows"))
        if self.batch_size == 1:
            problems.append("batch_size must be at least 2: a contrastive batch needs negatives")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            problems.append(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.sources, dict) or not self.sources:
            problems.append(f"sources must map tasks to weights, got {self.sources!r}")
        else:
            unknown = [s for s in self.sources if s not in PAIR_SOURCES]
            if unknown:
                problems.append(f"unknown pair sources {unknown}; image-text pairs come from {', '.join(PAIR_SOURCES)}")
            if any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in self.sources.values()) \
                    or not any(w > 0 for w in self.sources.values() if isinstance(w, (int, float))):
                problems.append(f"sources weights must be >= 0 with one > 0, got {self.sources!r}")
        if not self.label_templates or any(not isinstance(t, str) or t.count("{}") != 1 for t in self.label_templates):
            problems.append(f"label_templates must be strings with one '{{}}' each, got {self.label_templates!r}")
        if problems:
            raise GalenInputError("bad clip.train params: " + "; ".join(problems) + " (fix them in params.yaml)")


def load_clip_train_config(params: dict[str, Any], **overrides: Any) -> ClipTrainConfig:
    """params.yaml `clip.train`, with overrides; unknown keys are an error naming the near miss."""
    import difflib

    merged = {**((params.get("clip") or {}).get("train") or {}), **{k: v for k, v in overrides.items() if v is not None}}
    known = set(ClipTrainConfig.__dataclass_fields__)
    unknown = sorted(set(merged) - known)
    if unknown:
        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, known, 1)) else u for u in unknown]
        raise GalenInputError(f"unknown clip.train params: {', '.join(hints)}; known: {', '.join(sorted(known))}")
    cfg = ClipTrainConfig(**merged)
    cfg.check()
    return cfg


def pair_text(record: Any, templates: list[str], rng: Any) -> str:
    """The text side of an image-text pair: a caption, or a class name put into a caption template."""
    if record.task == "caption":
        return record.target
    return rng.choice(templates).format(record.target)


def check_inputs(cfg: ClipTrainConfig) -> dict[str, list[str]]:
    """Pair shards per source (counted against the manifest), the tokenizer and the init folder,
    checked before any worker starts."""
    from galen.flows.shards import shard_paths
    from galen.flows.train.generalist_trainer import check_shard_rows

    shards = Path(cfg.shards)
    if not (shards / "manifest.json").is_file():
        raise GalenInputError(f"no shards at {shards} (manifest.json missing); run `dvc repro shards` first")
    if cfg.init:
        from galen.model.clip import read_spec

        read_spec(Path(cfg.init))
    elif not (Path(cfg.tokenizer) / "tokenizer.json").is_file():
        raise GalenInputError(f"no tokenizer at {cfg.tokenizer}; run `dvc repro tokenizer` first")
    files = {t: shard_paths(shards, t, "train") for t, w in cfg.sources.items() if w > 0}
    files = {t: f for t, f in files.items() if f}
    if not files:
        raise GalenInputError(f"no image-text pairs: no train shards for {', '.join(cfg.sources)} under {shards}; "
                              "ingest a caption dataset (caption-csv, webdataset, roco, ...) and run `dvc repro shards`")
    check_shard_rows(shards, files)
    return files


def _cosine(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    return f


def clip_worker(config: dict) -> None:
    """The Ray Train worker loop of CLIP training."""
    import deepspeed
    import ray.train
    import torch
    from tqdm import tqdm

    from galen.flows.ingest.schema import from_row
    from galen.flows.tracking import TrainingRun
    from galen.flows.train.generalist_trainer import _save_state, save_final_model
    from galen.flows.train.objectives import step_rng
    from galen.flows.train.streams import endless_rows, prefetched
    from galen.model.clip import ClipModel
    from galen.model.losses import clip_loss
    from galen.model.tokenizer import GalenTokenizer
    from galen.model.vision import load_image

    cfg = ClipTrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker
    if cfg.init:
        wrapper = ClipModel.from_pretrained(cfg.init)
    else:
        wrapper = ClipModel.create(cfg.config, GalenTokenizer.load(cfg.tokenizer), seed=cfg.seed)
    model = wrapper.clip.train()
    from open_clip.transform import image_transform

    augment = image_transform(wrapper.spec.image_size, is_train=True, mean=wrapper.spec.mean, std=wrapper.spec.std)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(cfg.steps, min(cfg.warmup_steps, cfg.steps)))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config={
        "train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip, "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9})
    loss_fn = clip_loss(rank, world)

    step, consumed = 0, {t: 0 for t in config["counts"]}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag="state")
            state = json.loads((Path(d) / "galen_state.json").read_text())
        step, consumed = state["step"], {**consumed, **state["consumed"]}
    run = TrainingRun.attach(config["run_id"], config["tracking_uri"], rank, system_metrics=rank == 0)
    if checkpoint:
        run.log_metrics({"resumed_from_step": step}, step)
        run.increment_tag("galen.checkpoint_restores")
    shards = {t: ray.train.get_dataset_shard(t) for t in config["counts"]}

    streams = {t: prefetched(endless_rows(shards[t].iter_rows, consumed[t], cfg.cache_rows)) for t in shards}
    sources, weights = zip(*sorted(config["weights"].items()))
    bar = tqdm(total=cfg.steps, initial=step, desc="clip", unit="step", disable=rank != 0, mininterval=5,
               dynamic_ncols=True)
    window_start, window_samples, losses = time.perf_counter(), 0, []
    warm_start, warm_samples = None, 0
    while step < cfg.steps:
        rng = step_rng(cfg.seed, rank, step, 0)
        torch.manual_seed(rng.getrandbits(63))  # augmentation and dropout repeat exactly after a restart
        images, texts = [], []
        # the same sources on every worker: each reads as many rows of each dataset shard, so the shards'
        # epochs (which start together on all workers) stay in step and no worker waits on another's epoch
        plan = step_rng(cfg.seed, 0, step, 0).choices(sources, weights, k=cfg.batch_size)
        for source in plan:
            record = from_row(next(streams[source]))
            consumed[source] += 1
            images.append(augment(load_image(record.image)))
            texts.append(pair_text(record, cfg.label_templates, rng))
        pixels = torch.stack(images).to(engine.device, dtype=torch.bfloat16 if cfg.precision == "bf16" else None)
        out = engine(pixels, wrapper.text_encoder(texts).to(engine.device))
        loss = loss_fn(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())
        engine.backward(loss)
        engine.step()
        with torch.no_grad():  # CLIP caps the temperature at 100
            engine.module.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss))
        window_samples += cfg.batch_size
        if warm_start is not None:
            warm_samples += cfg.batch_size
        step += 1
        if warm_start is None:
            warm_start = time.perf_counter()
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            metrics = {"loss": sum(losses) / len(losses), "lr": scheduler.get_last_lr()[0],
                       "logit_scale": float(engine.module.logit_scale.exp()),
                       "samples_per_s": window_samples * world / elapsed}
            run.log_metrics(metrics, step)
            bar.set_postfix({"loss": f"{metrics['loss']:.3f}", "samples/s": f"{metrics['samples_per_s']:.1f}"})
            window_start, window_samples, losses = time.perf_counter(), 0, []
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            with tempfile.TemporaryDirectory() as d:
                _save_state(d, engine, None, rank, {"step": step, "consumed": consumed, "run_id": config["run_id"]})
                elapsed = max(time.perf_counter() - warm_start, 1e-9)
                ray.train.report({"step": step, "loss": float(loss),
                                  "samples_per_s": warm_samples * world / elapsed},
                                 checkpoint=ray.train.Checkpoint.from_directory(d))
    bar.close()
    wrapper.clip = engine.module.eval()
    save_final_model(engine.module, cfg.zero_stage, rank, lambda: wrapper.save_pretrained(cfg.out, dtype=torch.float32))
    if rank == 0:
        run.log_model_folder(cfg.out)
    run.close()


def train_clip(cfg: ClipTrainConfig) -> dict:
    """Run (or resume) the CLIP training job described by `cfg`; returns the final metrics."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from galen.flows.paths import tracking_uri
    from galen.flows.tracking import StorageFolder, TrainingRun, run_id_file
    from galen.flows.train.generalist_trainer import fit_and_finish, job_location, start_ray

    files = check_inputs(cfg)
    manifest = json.loads((Path(cfg.shards) / "manifest.json").read_text())
    counts = {t: manifest["by_task_split"].get(f"{t}/train", 0) for t in files}
    run_name = cfg.run_name or "galen-clip"
    storage = StorageFolder(cfg.storage_path if "://" in cfg.storage_path else Path(cfg.storage_path).resolve())
    job_name, job_dir = job_location(cfg, run_name, storage)
    storage_path, storage_fs = storage.ray_storage()
    id_file = run_id_file(job_dir)
    resume_id = id_file.read()
    start_ray(cfg.num_workers)
    run = TrainingRun.start_or_resume(cfg.experiment, run_name, resume_id, params=asdict(cfg),
                                      tags={"galen.stage": "clip", "galen.job": job_name}, system_metrics=False)
    if not resume_id:
        id_file.write(run.run_id)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    datasets = {t: ray.data.read_parquet([str(Path(p).resolve()) for p in f]) for t, f in files.items()}
    resolved = {"tokenizer": str(Path(cfg.tokenizer).resolve()), "out": str(Path(cfg.out).resolve()),
                "init": cfg.init and str(Path(cfg.init).resolve())}
    trainer = TorchTrainer(
        clip_worker,
        train_loop_config={"train": asdict(cfg) | resolved, "run_id": run.run_id, "tracking_uri": tracking_uri(),
                           "counts": counts, "weights": {t: float(cfg.sources[t]) for t in files}},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(name=job_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
    )
    return fit_and_finish(trainer, run, job_dir, cfg.out, cfg.metrics)
