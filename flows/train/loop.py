"""The one training loop of Galen: resumable Ray Train + DeepSpeed, with the model as a plug-in.

Both models (the generalist, `generalist_trainer`; CLIP, `clip_trainer`) train through this
module. What they share lives here once:
  * the run fields and their checks (`JobConfig`), done before any worker starts;
  * the job named by its params (`job_location`): a rerun of unfinished params resumes that job
    and its MLflow run, changed params start a new one;
  * the worker loop (`worker_loop`): DeepSpeed ZeRO around the plug-in's model and optimizer,
    bf16 inputs and buffers, micro-steps with gradient accumulation, per-step RNG seeding (a
    restart repeats dropout and augmentation exactly), checkpoint/restore of step, optimizer,
    scheduler, data position and the plug-in's own state, MLflow metrics, the progress bar,
    and the fp32 model folder at the end (ZeRO-3 partitions gathered first);
  * the driver (`run_job`): Ray started before the MLflow run, datasets read in order, the
    `TorchTrainer` with failure restarts, the finished marker and the metrics file.
What a model brings is a `Recipe`: its model, optimizer and schedule, how a batch is drawn from
its data sources, its loss, what happens after a step, and how its folder is written.
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from galen.model.errors import GalenInputError

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
FINISHED_MARKER = "galen_finished.json"


@dataclass
class JobConfig:
    """The fields every Galen training job has (params.yaml `train:` and `clip.train:`); a model's
    config adds its own fields and may change these defaults."""

    SECTION: ClassVar[str] = "train"        # the params.yaml section, for messages
    ZERO_STAGES: ClassVar[tuple[int, ...]] = (0, 1, 2, 3)
    ZERO_REASON: ClassVar[str] = ""         # why a model allows fewer stages, for the message
    POSITIVE: ClassVar[tuple[str, ...]] = ("steps", "batch_size", "grad_accum", "num_workers", "checkpoint_every",
                                           "log_every", "cache_rows")
    PATHS: ClassVar[tuple[str, ...]] = ("init", "tokenizer", "out")  # made absolute for the workers
    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = (
        "max_failures", "log_every", "metrics", "storage_path", "run_name", "experiment", "placement_strategy",
        "cache_rows")                       # how a job runs and reports, not what it computes

    init: str | None = None                 # a model folder to start from (pretrained or imported)
    steps: int = 200
    batch_size: int = 8                     # per worker, per micro-step
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    zero_stage: int = 2
    precision: str = "fp32"                 # fp32 | bf16 (fp16 is GPU-only in DeepSpeed; not offered)
    num_workers: int = 2
    use_gpu: bool = False
    checkpoint_every: int = 50
    max_failures: int = 2
    storage_path: str = "ray_results"       # local folder or s3://bucket/prefix (endpoint: AWS_ENDPOINT_URL)
    placement_strategy: str = "PACK"        # Ray placement of the workers: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD
    run_name: str | None = None
    experiment: str = "galen-generalist"
    seed: int = 0
    shards: str = "data/shards"
    tokenizer: str = "artifacts/tokenizer"
    out: str = "artifacts/model"
    metrics: str | None = None
    log_every: int = 10
    cache_rows: int = 10000                 # a worker's shard of a source up to this many rows is cycled in memory

    def job_problems(self) -> list[str]:
        """What is wrong with the shared fields (the model's config checks its own)."""
        problems = []
        if self.zero_stage not in self.ZERO_STAGES:
            *most, last = map(str, self.ZERO_STAGES)
            problems.append(f"zero_stage must be {', '.join(most)} or {last}{self.ZERO_REASON}, got {self.zero_stage}")
        if self.precision not in ("fp32", "bf16"):
            problems.append(f"precision must be fp32 or bf16, got {self.precision!r}")
        for name in self.POSITIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.lr, bool) or not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            problems.append(f"lr must be in (0, 1), got {self.lr!r}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            problems.append(f"placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                            f"got {self.placement_strategy!r}")
        if not isinstance(self.storage_path, str) or not self.storage_path or (
                "://" in self.storage_path and not self.storage_path.startswith("s3://")):
            problems.append(f"storage_path must be a local folder or s3://bucket/prefix, got {self.storage_path!r}")
        return problems

    def model_problems(self) -> list[str]:
        """The model's own checks (overridden by each model's config)."""
        return []

    def check(self) -> None:
        problems = self.job_problems() + self.model_problems()
        if problems:
            raise GalenInputError(f"bad {self.SECTION} params: " + "; ".join(problems) + " (fix them in params.yaml)")

    def for_workers(self) -> dict[str, Any]:
        """The config as the workers get it: plain data, paths absolute (workers may run elsewhere)."""
        return asdict(self) | {k: str(Path(v).resolve()) if v else v for k in self.PATHS for v in [getattr(self, k)]}


C = TypeVar("C", bound=JobConfig)


def config_from(cls: type[C], values: Mapping[str, Any]) -> C:
    """A checked config from params.yaml values; an unknown key is an error naming the near miss."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, known, 1)) else u
                 for u in unknown]
        raise GalenInputError(f"unknown {cls.SECTION} params: {', '.join(hints)}; known: {', '.join(sorted(known))}")
    cfg = cls(**values)
    cfg.check()
    return cfg


def job_fingerprint(cfg: JobConfig) -> str:
    """Hash of everything that changes what a job computes: same params -> same job (a rerun resumes
    it after a crash); changed params -> a new job and a new MLflow run, never a mixed one."""
    import hashlib

    kept = {k: v for k, v in asdict(cfg).items() if k not in cfg.NOT_IN_FINGERPRINT}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:10]


def job_location(cfg: JobConfig, run_name: str, storage: Any) -> tuple[str, Any]:
    """(Ray Train run name, its folder in `storage`, a `flows.tracking.StorageFolder`: local or
    s3://). An unfinished job with these params is resumed; once finished, running the same params
    again starts the next attempt (`-r2`, `-r3`, ...)."""
    base = f"{run_name}-{job_fingerprint(cfg)}"
    name, attempt = base, 1
    while storage.child(name).exists(FINISHED_MARKER):
        attempt += 1
        name = f"{base}-r{attempt}"
    return name, storage.child(name)


# --------------------------------------------------------------------------------------------------
# the model's side: a recipe
# --------------------------------------------------------------------------------------------------
@dataclass
class StepLoss:
    """One forward pass of a micro-step: the loss to back-propagate and what it covered."""

    loss: Any                               # scalar tensor: a mean over `weight` tokens or rows
    weight: float                           # parts of a micro-step combine as sum(weight * loss) / sum(weight)
    samples: int
    tokens: int = 0                         # target tokens (0: the model does not count tokens)
    curves: dict[str, list[float]] | None = None  # values averaged over the logging window (e.g. loss/vqa)


class Recipe:
    """What a model brings to `worker_loop`. Built on every worker with the worker's config (the
    model's `JobConfig` subclass) and the driver's extras (`run_job(extras=...)`)."""

    CONFIG: ClassVar[type[JobConfig]] = JobConfig
    label: str = "train"                    # progress-bar label

    def __init__(self, cfg: Any, extras: dict[str, Any], rank: int, world: int) -> None:
        self.cfg, self.extras, self.rank, self.world = cfg, extras, rank, world

    def build(self) -> Any:
        """The torch module DeepSpeed trains (torch is seeded with `cfg.seed`: the same weights on every worker)."""
        raise NotImplementedError

    def optimizer(self, module: Any) -> Any:
        raise NotImplementedError

    def lr_multiplier(self) -> Callable[[int], float]:
        raise NotImplementedError

    def sources(self) -> list[str]:
        """The datasets (driver's `datasets` keys) this worker reads."""
        raise NotImplementedError

    def after_initialize(self, engine: Any) -> None:
        """Once DeepSpeed wrapped the module (e.g. an EMA of its parameters)."""

    def draw(self, step: int, micro: int, next_row: Callable[[str], dict], rng: Any) -> Any:
        """The examples of one micro-step: rows are taken with `next_row(source)` (the loop counts the
        data position); `rng` is this worker's randomness for this micro-step."""
        raise NotImplementedError

    def losses(self, engine: Any, examples: Any, dtype: Any) -> list[StepLoss]:
        """The forward passes over the examples (a list: e.g. one per image shape); inputs in `dtype`."""
        raise NotImplementedError

    def after_step(self, engine: Any) -> None:
        """After the optimizer step (e.g. EMA update, clamping a parameter)."""

    def window_metrics(self, engine: Any) -> dict[str, float]:
        """Point values logged with each window's means (e.g. a temperature)."""
        return {}

    def save_state(self, directory: Path) -> None:
        """The recipe's own checkpoint state beside DeepSpeed's (this rank's)."""

    def load_state(self, directory: Path) -> None:
        pass

    def write_model(self, engine: Any) -> Callable[[], None]:
        """A function that writes the model folder to `cfg.out` in fp32 (called on rank 0, after a
        ZeRO-3 gather)."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------------
def save_final_model(module: Any, zero_stage: int, rank: int, write: Callable[[], None]) -> None:
    """The loop's end: rank 0 calls `write` (which saves the model folder in fp32 — after bf16
    training, the bf16 weights the model ran with, like DeepSpeed's 16-bit export); under ZeRO-3
    every rank gathers the partitions of `module` first, so the folder holds whole tensors."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if rank == 0:
                write()
    elif rank == 0:
        write()


def save_state(directory: str, engine: Any, recipe: Recipe, rank: int, state: dict) -> None:
    """A checkpoint: DeepSpeed's sharded state, the recipe's, and (rank 0) step and data position."""
    engine.save_checkpoint(directory, tag="state")
    recipe.save_state(Path(directory))
    if rank == 0:
        (Path(directory) / "galen_state.json").write_text(json.dumps(state))


def _window_means(curves: dict[str, list[float]]) -> dict[str, float]:
    """Each curve's mean over the window; `loss` (when the recipe has no curve of that name) is the
    mean over every loss sample, whatever objective it came from."""
    means = {k: sum(v) / len(v) for k, v in sorted(curves.items()) if v}
    if "loss" not in means:
        samples = [x for k, v in curves.items() if k.startswith("loss/") for x in v]
        if samples:
            means["loss"] = sum(samples) / len(samples)
    return means


def worker_loop(config: dict) -> None:
    """The Ray Train worker loop (once per worker process), for any `Recipe`."""
    import deepspeed
    import ray.train
    import torch
    from tqdm import tqdm

    from galen.flows.tracking import TrainingRun
    from galen.flows.train.objectives import step_rng
    from galen.flows.train.streams import endless_rows, prefetched

    recipe_cls: type[Recipe] = config["recipe"]
    cfg = recipe_cls.CONFIG(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    recipe = recipe_cls(cfg, config["extras"], rank, world)
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker
    module = recipe.build()
    torch.manual_seed(cfg.seed + 1000 + rank)  # what is random before the first step differs per worker
    optimizer = recipe.optimizer(module)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_multiplier())
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config={
        "train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip, "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9})
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32  # DeepSpeed cast the weights...
    for buffer in engine.module.buffers():  # ...not the buffers (BatchNorm statistics): inputs and buffers follow
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)
    recipe.after_initialize(engine)

    sources = recipe.sources()
    step, consumed = 0, {t: 0 for t in sources}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag="state")
            recipe.load_state(Path(d))
            state = json.loads((Path(d) / "galen_state.json").read_text())
        step, consumed = state["step"], {**consumed, **state["consumed"]}
    run = TrainingRun.attach(config["run_id"], config["tracking_uri"], rank, system_metrics=rank == 0)
    if checkpoint:
        run.log_metrics({"resumed_from_step": step}, step)
        run.increment_tag("galen.checkpoint_restores")  # worker-group restarts and reruns that continued the run
    streams = {t: prefetched(endless_rows(ray.train.get_dataset_shard(t).iter_rows, consumed[t], cfg.cache_rows))
               for t in sources}

    def next_row(source: str) -> dict:
        consumed[source] += 1
        return next(streams[source])

    bar = tqdm(total=cfg.steps, initial=step, desc=recipe.label, unit="step", disable=rank != 0, mininterval=5,
               dynamic_ncols=True)
    window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
    curves: dict[str, list[float]] = {}
    warm_start, warm_samples, warm_tokens = None, 0, 0  # steady-state throughput, after the first step
    counts_tokens, last_loss = False, float("nan")
    while step < cfg.steps:
        for micro in range(cfg.grad_accum):
            # dropout / augmentation seeded by step (not a process-wide stream): a restart repeats them exactly
            torch.manual_seed(step_rng(cfg.seed, rank, step, micro).getrandbits(63))
            examples = recipe.draw(step, micro, next_row, step_rng(cfg.seed, rank, step, micro))
            parts = recipe.losses(engine, examples, dtype)
            samples = sum(p.samples for p in parts)
            tokens = sum(p.tokens for p in parts)
            counts_tokens = counts_tokens or tokens > 0
            # parts differ in size: their losses weigh by what they cover, one mean over the micro-step
            loss = sum(p.loss * p.weight for p in parts) / max(sum(p.weight for p in parts), 1)
            engine.backward(loss)
            engine.step()
            last_loss = float(loss)
            for p in parts:
                for name, values in (p.curves or {"loss": [float(p.loss)]}).items():
                    curves.setdefault(name, []).extend(values)
            window_samples += samples
            window_tokens += tokens
            if warm_start is not None:
                warm_samples += samples
                warm_tokens += tokens
        step += 1
        if warm_start is None:
            warm_start = time.perf_counter()
        recipe.after_step(engine)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            metrics = _window_means(curves) | {"lr": scheduler.get_last_lr()[0]} | recipe.window_metrics(engine)
            metrics["samples_per_s"] = window_samples * world / elapsed
            if counts_tokens:
                metrics["tokens_per_s"] = window_tokens * world / elapsed
            run.log_metrics(metrics, step)
            bar.set_postfix({"loss": f"{metrics.get('loss', last_loss):.3f}",
                             "samples/s": f"{metrics['samples_per_s']:.1f}"})
            window_start, window_samples, window_tokens, curves = time.perf_counter(), 0, 0, {}
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            with tempfile.TemporaryDirectory() as d:
                save_state(d, engine, recipe, rank, {"step": step, "consumed": consumed, "run_id": config["run_id"]})
                elapsed = max(time.perf_counter() - warm_start, 1e-9)
                report = {"step": step, "loss": last_loss, **{f"consumed/{t}": n for t, n in consumed.items()},
                          "samples_per_s": warm_samples * world / elapsed}
                if counts_tokens:
                    report["tokens_per_s"] = warm_tokens * world / elapsed
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
    bar.close()
    save_final_model(engine.module, cfg.zero_stage, rank, recipe.write_model(engine))
    if rank == 0:
        run.log_model_folder(cfg.out)
    run.close()


# --------------------------------------------------------------------------------------------------
# driver side
# --------------------------------------------------------------------------------------------------
def start_ray(num_workers: int) -> None:
    """Join RAY_ADDRESS if set, else start a local Ray with logical CPUs to spare for Ray Data's
    read tasks beside the training workers."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=(os.cpu_count() or 1) + num_workers, include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": "galen.flows.train.quiet_dashboardless_ray"})


def run_job(cfg: JobConfig, recipe: type[Recipe], datasets: Callable[[], dict[str, Any]], *, run_name: str,
            stage: str, extras: dict[str, Any]) -> dict:
    """Run (or resume) one training job: `datasets` builds the Ray Datasets once Ray is up (their
    names are the recipe's sources); `extras` reach every worker's recipe. Returns the final metrics."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from galen.flows.paths import tracking_uri
    from galen.flows.tracking import StorageFolder, TrainingRun, run_id_file

    storage = StorageFolder(cfg.storage_path if "://" in cfg.storage_path else Path(cfg.storage_path).resolve())
    job_name, job_dir = job_location(cfg, run_name, storage)  # reads S3 first: a bad bucket fails here
    storage_path, storage_fs = storage.ray_storage()
    id_file = run_id_file(job_dir)
    resume_id = id_file.read()
    start_ray(cfg.num_workers)  # before the MLflow run: Ray failing to start leaves no run behind
    run = TrainingRun.start_or_resume(cfg.experiment, run_name, resume_id, params=asdict(cfg),
                                      tags={"galen.stage": stage, "galen.job": job_name}, system_metrics=False)
    if not resume_id:
        id_file.write(run.run_id)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the same rows in the same order after a restart
    ctx.enable_progress_bars = False  # one progress bar (the training one), not one per dataset
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"recipe": recipe, "train": cfg.for_workers(), "run_id": run.run_id,
                           "tracking_uri": tracking_uri(), "extras": extras},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(name=job_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets(),
    )
    return fit_and_finish(trainer, run, job_dir, cfg.out, cfg.metrics)


def fit_and_finish(trainer: Any, run: Any, job_dir: Any, out: str, metrics_file: str | None) -> dict:
    """Run a Ray trainer, end its MLflow run with the outcome, mark the job finished (the next run of
    the same params starts a new attempt) and write the final metrics file."""
    try:
        result = trainer.fit()
    except Exception:
        run.end("FAILED")
        raise
    metrics = dict(result.metrics or {})
    run.end("FINISHED")
    job_dir.write_text(FINISHED_MARKER, json.dumps({"run_id": run.run_id, "out": out}) + "\n")
    if metrics_file:
        Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_file).write_text(json.dumps({"run_id": run.run_id, **metrics}, indent=2) + "\n")
    return {"run_id": run.run_id, **metrics}
