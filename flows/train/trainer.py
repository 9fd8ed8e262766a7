"""`galen train`: multitask training of the generalist model on Ray Train workers under DeepSpeed.

The driver checks the config and the data before any worker starts, opens (or resumes) the one
MLflow run of the job, and starts a `TorchTrainer`. Each worker:
  * builds the model (a named size, or `init`: a pretrained / imported model folder) and wraps it
    in `deepspeed.initialize` with the ZeRO stage from params.yaml (a torch AdamW is passed, so no
    fused op needs building on CPU);
  * reads its shard of every task's Ray Dataset (`get_dataset_shard(task)`) and draws the next
    task of each batch from the task-mixture weights;
  * reports a checkpoint every `checkpoint_every` steps (DeepSpeed's sharded state + our step,
    data positions and the MLflow run id). When a worker dies, Ray Train restarts the group from
    the latest checkpoint (`FailureConfig`), and the loop resumes at that step, with the same
    optimizer/scheduler state, data position and MLflow run.
At the end rank 0 consolidates the weights (ZeRO-3 shards included) into a Galen model folder.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.errors import GalenInputError

STAGES = ("pretrain", "finetune")
FINETUNE_TASKS = ("vqa", "caption", "classification", "nli", "summarization")


@dataclass
class TrainConfig:
    """params.yaml `train:` (shared) merged with `train.<stage>:` (per stage)."""

    stage: str = "finetune"
    size: str = "nano"
    init: str | None = None                 # model folder to start from (pretrained or imported)
    tasks: list[str] = field(default_factory=lambda: list(FINETUNE_TASKS))
    steps: int = 200
    batch_size: int = 8                     # per worker, per micro-step
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    zero_stage: int = 2
    precision: str = "fp32"                 # fp32 | bf16 (fp16 is GPU-only in DeepSpeed; not offered)
    num_workers: int = 2
    use_gpu: bool = False
    checkpoint_every: int = 50
    max_failures: int = 2
    storage_path: str = "ray_results"
    run_name: str | None = None
    experiment: str = "galen-generalist"
    seed: int = 0
    shards: str = "data/shards"
    tokenizer: str = "artifacts/tokenizer"
    out: str = "artifacts/model"
    metrics: str | None = None
    dropout: float = 0.1
    log_every: int = 10

    def check(self) -> None:
        problems = []
        if self.stage not in STAGES:
            problems.append(f"stage {self.stage!r} is not one of {STAGES}")
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("fp32", "bf16"):
            problems.append(f"precision must be fp32 or bf16, got {self.precision!r}")
        for name in ("steps", "batch_size", "grad_accum", "num_workers", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            problems.append(f"lr must be in (0, 1), got {self.lr!r}")
        if problems:
            raise GalenInputError("bad train params: " + "; ".join(problems) + " (fix them in params.yaml)")


def load_train_config(params: dict[str, Any], stage: str, **overrides: Any) -> TrainConfig:
    """Merge `train:` and `train.<stage>:`; unknown or misspelled keys are an error naming them."""
    section = dict(params.get("train") or {})
    per_stage = {s: section.pop(s, None) or {} for s in STAGES}
    merged = {**section, **per_stage.get(stage, {}), "stage": stage,
              **{k: v for k, v in overrides.items() if v is not None}}
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(merged) - known)
    if unknown:
        import difflib

        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, known, 1)) else u
                 for u in unknown]
        raise GalenInputError(f"unknown train params: {', '.join(hints)}; known: {', '.join(sorted(known))}")
    cfg = TrainConfig(**merged)
    cfg.check()
    return cfg


def check_inputs(cfg: TrainConfig) -> dict[str, list[str]]:
    """Shard files per task, checked before any worker starts."""
    from flows.shards import shard_paths
    from model.tasks import TASKS

    shards = Path(cfg.shards)
    if not (shards / "manifest.json").is_file():
        raise GalenInputError(f"no shards at {shards} (manifest.json missing); run `dvc repro shards` first")
    if not (Path(cfg.tokenizer) / "tokenizer.json").is_file():
        raise GalenInputError(f"no tokenizer at {cfg.tokenizer}; run `dvc repro tokenizer` first")
    bad = [t for t in cfg.tasks if t not in TASKS]
    if bad:
        raise GalenInputError(f"unknown tasks {bad} in train.tasks; tasks are {', '.join(TASKS)}")
    files = {t: shard_paths(shards, t, "train") for t in cfg.tasks}
    missing = [t for t, f in files.items() if not f]
    if missing:
        raise GalenInputError(f"no training shards for {missing} under {shards}; remove them from train.tasks or "
                              "add a dataset with that task")
    if cfg.init and not (Path(cfg.init) / "config.json").is_file():
        raise GalenInputError(f"train.init={cfg.init} is not a Galen model folder (no config.json)")
    return files


# --------------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------------
def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        return max(0.0, (total - step) / max(total - warmup, 1))  # linear (polynomial power 1) decay
    return f


def train_worker(config: dict) -> None:
    """The Ray Train worker loop (runs once per worker process)."""
    import deepspeed
    import ray.train
    import torch
    from tqdm import tqdm

    from flows.ingest.schema import from_row
    from flows.tracking import TrainingRun
    from flows.train.examples import collate, make_example, task_mixture_sampler
    from model.config import get_config
    from model.generalist import GalenModel
    from model.losses import label_smoothed_cross_entropy
    from model.tokenizer import GalenTokenizer

    cfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    tok = GalenTokenizer.load(cfg.tokenizer)
    if cfg.init:
        model = GalenModel.from_pretrained(cfg.init)
    else:
        model = GalenModel(get_config(cfg.size, vocab_size=len(tok), dropout=cfg.dropout,
                                      image_size=config["image_size"]))
    if model.cfg.vocab_size != len(tok):
        raise GalenInputError(f"model vocabulary {model.cfg.vocab_size} != tokenizer {len(tok)}")
    image_size = config["image_size"]
    candidates = config["candidates"]

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    warmup = int(cfg.steps * cfg.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.steps, warmup))
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip, "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)

    step, consumed = 0, {t: 0 for t in cfg.tasks}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag="state")
            state = json.loads((Path(d) / "galen_state.json").read_text())
        step, consumed = state["step"], state["consumed"]

    run = TrainingRun.attach(config["run_id"], config["tracking_uri"], rank, system_metrics=rank == 0)
    shards = {t: ray.train.get_dataset_shard(t) for t in cfg.tasks}
    resume_skip = dict(consumed)  # rows this worker took from each task before the checkpoint

    def rows(task: str):
        """Endless rows of a task's shard, resuming after the rows already consumed."""
        skip = resume_skip[task]
        while True:
            for row in shards[task].iter_rows():
                if skip:
                    skip -= 1
                    continue
                yield row

    streams = {t: rows(t) for t in cfg.tasks}
    # every worker draws the same task sequence: Ray Data's streaming split needs all workers
    # reading the same task's dataset together (the rows themselves differ per worker)
    sampler = task_mixture_sampler(config["mixture"], config["counts"], cfg.seed + step)
    rng = random.Random(cfg.seed + rank + step)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.stage}", disable=rank != 0, mininterval=5)
    micro = cfg.batch_size
    window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
    while step < cfg.steps:
        task_losses: dict[str, list[float]] = {}
        for _ in range(cfg.grad_accum):
            task = next(sampler)
            examples = []
            for _ in range(micro):
                rec = from_row(next(streams[task]))
                consumed[task] += 1
                examples.append(make_example(rec, tok, image_size, rng=rng,
                                             candidates=candidates.get(rec.dataset, {}).get(task)))
            batch = collate(examples, tok)
            out = engine(batch.input_ids, batch.decoder_input_ids, images=batch.images,
                         patch_masks=batch.patch_masks, code_masks=batch.code_masks)
            loss = label_smoothed_cross_entropy(out.logits, batch.target, cfg.label_smoothing, tok.pad_id,
                                                allowed=batch.allowed)
            engine.backward(loss.loss)
            engine.step()
            task_losses.setdefault(task, []).append(float(loss.nll.detach()))
            window_samples += micro
            window_tokens += loss.num_tokens
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            metrics = {f"loss/{t}": sum(v) / len(v) for t, v in task_losses.items()}
            metrics.update({"lr": scheduler.get_last_lr()[0], "samples_per_s": window_samples * world / elapsed,
                            "tokens_per_s": window_tokens * world / elapsed})
            run.log_metrics(metrics, step)
            bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in metrics.items() if k.startswith("loss/")})
            window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            with tempfile.TemporaryDirectory() as d:
                engine.save_checkpoint(d, tag="state")
                (Path(d) / "galen_state.json").write_text(json.dumps({"step": step, "consumed": consumed,
                                                                       "run_id": config["run_id"]}))
                ray.train.report({"step": step, **{f"consumed/{t}": n for t, n in consumed.items()}},
                                 checkpoint=ray.train.Checkpoint.from_directory(d))
    bar.close()
    # consolidate (ZeRO-3 shards included) and save a Galen model folder on rank 0
    if cfg.zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag="final")
            if rank == 0:
                state = get_fp32_state_dict_from_zero_checkpoint(d, tag="final")
                model.load_state_dict(state, strict=True)
    if rank == 0:
        final = model if cfg.zero_stage == 3 else engine.module
        final.save_pretrained(cfg.out, tok)
        run.log_model_folder(cfg.out)
    run.close()


# --------------------------------------------------------------------------------------------------
# driver side
# --------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Run (or resume) the training job described by `cfg`; returns the final metrics."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from flows.tracking import TrainingRun, run_id_file, tracking_uri

    files = check_inputs(cfg)
    manifest = json.loads((Path(cfg.shards) / "manifest.json").read_text())
    candidates = json.loads((Path(cfg.shards) / "candidates.json").read_text())
    counts = {t: manifest["by_task_split"].get(f"{t}/train", 0) for t in cfg.tasks}
    mixture = {t: float(manifest["mixture"].get(t, 1.0)) for t in cfg.tasks}
    image_size = max(manifest["image_size"].get(t, 128) for t in cfg.tasks)
    run_name = cfg.run_name or f"galen-{cfg.stage}"
    storage = Path(cfg.storage_path).resolve() if "://" not in cfg.storage_path else cfg.storage_path
    job_dir = Path(storage) / run_name if isinstance(storage, Path) else None
    id_file = run_id_file(job_dir) if job_dir else None
    if job_dir:
        job_dir.mkdir(parents=True, exist_ok=True)
    resume_id = id_file.read() if id_file else None
    run = TrainingRun.start_or_resume(cfg.experiment, run_name, resume_id, params=asdict(cfg),
                                      tags={"galen.stage": cfg.stage}, system_metrics=False)
    if id_file and not resume_id:
        id_file.write(run.run_id)

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:  # local Ray: leave logical CPUs for Ray Data's read tasks beside the training workers
            ray.init(num_cpus=(os.cpu_count() or 1) + cfg.num_workers, include_dashboard=False, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the same rows in the same order after a restart
    datasets = {t: ray.data.read_parquet([str(Path(p).resolve()) for p in f]) for t, f in files.items()}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"train": asdict(cfg) | {"tokenizer": str(Path(cfg.tokenizer).resolve()),
                                                   "out": str(Path(cfg.out).resolve()),
                                                   "init": cfg.init and str(Path(cfg.init).resolve())},
                           "run_id": run.run_id, "tracking_uri": tracking_uri(), "candidates": candidates,
                           "mixture": mixture, "counts": counts, "image_size": image_size},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(name=run_name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    except Exception:
        run.end("FAILED")
        raise
    metrics = dict(result.metrics or {})
    run.end("FINISHED")
    if cfg.metrics:
        Path(cfg.metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.metrics).write_text(json.dumps({"run_id": run.run_id, **metrics}, indent=2) + "\n")
    return {"run_id": run.run_id, **metrics}

