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
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from galen.flows.train.objectives import FINETUNE_OBJECTIVES, SUBSET_SOURCES
from galen.model.errors import GalenInputError

STAGES = ("pretrain", "finetune")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def run_field_problems(cfg: Any, positive: tuple[str, ...]) -> list[str]:
    """Checks of the fields every Galen training job shares (generalist and CLIP): precision,
    positive counts, worker placement and the storage location."""
    problems = []
    if cfg.precision not in ("fp32", "bf16"):
        problems.append(f"precision must be fp32 or bf16, got {cfg.precision!r}")
    for name in positive:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(cfg.lr, (int, float)) and 0 < cfg.lr < 1):
        problems.append(f"lr must be in (0, 1), got {cfg.lr!r}")
    if cfg.placement_strategy not in PLACEMENT_STRATEGIES:
        problems.append(f"placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                        f"got {cfg.placement_strategy!r}")
    if not isinstance(cfg.storage_path, str) or not cfg.storage_path or (
            "://" in cfg.storage_path and not cfg.storage_path.startswith("s3://")):
        problems.append(f"storage_path must be a local folder or s3://bucket/prefix, got {cfg.storage_path!r}")
    return problems


@dataclass
class Curriculum:
    """A first phase of training with its own objective weights, then the job's mixture. On the demo,
    e.g. closed-ended VQA alone before the mixture (off by default: it taught closed VQA in a replica
    from one pretrained model, not in the pipeline from another; BENCHMARKS.md)."""

    steps: int = 0                          # length of the first phase (0: no curriculum)
    objectives: dict[str, float] = field(default_factory=dict)
    rewarm_steps: int = 0                   # the lr ramps up again over these steps when the mixture starts
                                            # (Adam's moments were fit to the first phase's gradients)

    def problems(self, total_steps: int, known: tuple[str, ...]) -> list[str]:
        out = []
        for name in ("steps", "rewarm_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                out.append(f"curriculum.{name} must be an integer >= 0, got {value!r}")
        if not out and isinstance(total_steps, int) and self.steps + self.rewarm_steps >= total_steps:
            out.append(f"curriculum.steps + curriculum.rewarm_steps ({self.steps} + {self.rewarm_steps}) must be "
                       f"below steps ({total_steps}): the mixture needs steps of its own")
        if not isinstance(self.objectives, dict) or any(
                isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in self.objectives.values()):
            out.append(f"curriculum.objectives must map names to weights >= 0, got {self.objectives!r}")
        else:
            unknown = [k for k in self.objectives if k not in known]
            if unknown:
                out.append(f"unknown curriculum objectives {unknown}; known: {', '.join(known)}")
            if self.steps and not any(w > 0 for w in self.objectives.values()):
                out.append("curriculum.objectives needs a positive weight when curriculum.steps > 0")
        return out


@dataclass
class TrainConfig:
    """params.yaml `train:` (shared) merged with `train.<stage>:` (per stage)."""

    stage: str = "finetune"
    size: str | None = "nano"               # None: the architecture of `init` (an imported checkpoint's)
    init: str | None = None                 # model folder to start from (pretrained or imported)
    tasks: list[str] = field(default_factory=lambda: list(FINETUNE_OBJECTIVES))
    steps: int = 200
    batch_size: int = 8                     # per worker, per micro-step
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    loss_average: str = "token"             # token: each target token weighs the same; sample: each example does
    zero_stage: int = 2
    precision: str = "fp32"                 # fp32 | bf16 (fp16 is GPU-only in DeepSpeed; not offered)
    num_workers: int = 2
    use_gpu: bool = False
    checkpoint_every: int = 50
    max_failures: int = 2
    storage_path: str = "ray_results"      # local folder or s3://bucket/prefix (endpoint: AWS_ENDPOINT_URL)
    placement_strategy: str = "PACK"        # Ray placement of the workers: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD
    run_name: str | None = None
    experiment: str = "galen-generalist"
    seed: int = 0
    shards: str = "data/shards"
    tokenizer: str = "artifacts/tokenizer"
    out: str = "artifacts/model"
    metrics: str | None = None
    dropout: float = 0.1
    log_every: int = 10
    objectives: dict[str, float] | None = None  # pretraining: objective weights; fine-tuning: weights over
                                                # the shards' task mixture (e.g. vqa_closed), None: the mixture
    curriculum: Curriculum | None = None    # a first phase on other objective weights
    ema_decay: float | None = None          # fine-tuning EMA of the weights (the saved model is the EMA)
    image_codes: str | None = "data/image_codes.parquet"  # image-infilling targets (pretraining)
    image_size: int | None = None           # model input size for a new model (None: the shards' size); training,
                                            # evaluation and serving all resize to the model's size
    cache_rows: int = 10000                 # a worker's shard of a task up to this many rows is cycled in memory

    def __post_init__(self) -> None:
        if isinstance(self.curriculum, dict):  # from params.yaml or a worker's config
            unknown = sorted(set(self.curriculum) - set(Curriculum.__dataclass_fields__))
            if unknown:
                raise GalenInputError(f"unknown train curriculum keys {unknown}; known: "
                                      f"{', '.join(Curriculum.__dataclass_fields__)} (fix them in params.yaml)")
            self.curriculum = Curriculum(**self.curriculum)

    def known_objectives(self) -> tuple[str, ...]:
        from galen.flows.train.objectives import objective_sources

        return tuple(objective_sources(self.stage))

    def objective_weights(self) -> dict[str, float]:
        """The mixture's weights (a curriculum's first phase has its own). Pretraining: `objectives`;
        fine-tuning: one objective per task (the driver fills in the shards' mixture) with
        `objectives` on top."""
        from galen.flows.train.objectives import PRETRAIN_SOURCES

        if self.stage == "pretrain":
            return dict(self.objectives if self.objectives is not None else {k: 1.0 for k in PRETRAIN_SOURCES})
        return {t: 1.0 for t in self.tasks} | dict(self.objectives or {})

    def planned_objectives(self) -> list[str]:
        """Every objective with a positive weight in some phase of the job."""
        phases = [self.objective_weights()] + ([self.curriculum.objectives] if self.curriculum else [])
        return sorted({name for weights in phases for name, w in weights.items() if w > 0})

    def tokenizer_dir(self) -> str:
        """A model folder carries its own tokenizer; otherwise the pipeline's tokenizer stage output."""
        if self.init and (Path(self.init) / "tokenizer.json").is_file():
            return self.init
        return self.tokenizer

    def check(self) -> None:
        problems = []
        if self.stage not in STAGES:
            problems.append(f"stage {self.stage!r} is not one of {STAGES}")
        from galen.model.config import SIZES

        if self.size is None and not self.init:
            problems.append("size is needed when training does not start from an init model folder")
        if self.size is not None and self.size not in SIZES:
            problems.append(f"size {self.size!r} is not one of {', '.join(SIZES)}")
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        problems += run_field_problems(self, ("steps", "batch_size", "grad_accum", "num_workers", "checkpoint_every",
                                              "cache_rows"))
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.ema_decay is not None and not (isinstance(self.ema_decay, float) and 0 < self.ema_decay < 1):
            problems.append(f"ema_decay must be in (0, 1) or null, got {self.ema_decay!r}")
        from galen.model.losses import LOSS_AVERAGES

        if self.loss_average not in LOSS_AVERAGES:
            problems.append(f"loss_average must be one of {', '.join(LOSS_AVERAGES)}, got {self.loss_average!r}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        known = self.known_objectives()
        if self.objectives is not None:
            unknown = [k for k in self.objectives if k not in known]
            if unknown:
                problems.append(f"unknown {self.stage} objectives {unknown}; known: {', '.join(known)}")
            if not isinstance(self.objectives, dict) or any(
                    isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in self.objectives.values()):
                problems.append(f"objectives must map names to weights >= 0, got {self.objectives!r}")
        if self.curriculum is not None:
            problems += self.curriculum.problems(self.steps, known)
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size % 16):
            problems.append(f"image_size must be a multiple of 16, got {self.image_size!r}")
        if problems:
            raise GalenInputError("bad train params: " + "; ".join(problems) + " (fix them in params.yaml)")


def load_train_config(params: dict[str, Any], stage: str, **overrides: Any) -> TrainConfig:
    """Merge `train:` and `train.<stage>:`; unknown or misspelled keys are an error naming them."""
    section = dict(params.get("train") or {})
    per_stage = {s: section.pop(s, None) or {} for s in STAGES}
    merged = {**section, **per_stage.get(stage, {}), "stage": stage,
              **{k: v for k, v in overrides.items() if v is not None}}
    if overrides.get("init") is not None and overrides.get("size") is None:
        merged["size"] = None  # `--init DIR` alone: the model is what DIR holds, whatever size params.yaml names
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


def training_sources(cfg: TrainConfig, shards: Path) -> dict[str, list[str]]:
    """Shard files per source task. Fine-tuning needs every listed task; pretraining reads whatever
    its objectives can use (an objective without data is dropped, not an error)."""
    from galen.flows.shards import shard_paths
    from galen.flows.train.objectives import objective_sources

    if cfg.stage == "pretrain":
        sources = objective_sources(cfg.stage)
        wanted = sorted({s for name in cfg.planned_objectives() for s in sources[name]})
        files = {t: shard_paths(shards, SUBSET_SOURCES[t][0] if t in SUBSET_SOURCES else t, "train") for t in wanted}
        files = {t: f for t, f in files.items() if f}
        if not files:
            raise GalenInputError(f"no training shards under {shards} for any pretraining objective "
                                  f"({', '.join(cfg.objective_weights())}); run `dvc repro shards`")
        return files
    files = {t: shard_paths(shards, t, "train") for t in cfg.tasks}
    missing = [t for t, f in files.items() if not f]
    if missing:
        raise GalenInputError(f"no training shards for {missing} under {shards}; remove them from train.tasks or "
                              "add a dataset with that task")
    for name in cfg.planned_objectives():
        if name in SUBSET_SOURCES:  # a subset of one task's rows, read from that task's files
            task = SUBSET_SOURCES[name][0]
            if task not in files:
                raise GalenInputError(f"objective {name} reads the {task} shards, but {task} is not in train.tasks; "
                                      f"add {task} to train.tasks or give {name} weight 0")
            files[name] = files[task]
    return files


def source_rows(shards: Path, files: dict[str, list[str]]) -> dict[str, int]:
    """Training rows per source: the manifest's count for a task, the kept rows for a subset."""
    import pyarrow.parquet as pq

    by_task_split = json.loads((shards / "manifest.json").read_text())["by_task_split"]
    counts = {}
    for source, paths in files.items():
        if source in SUBSET_SOURCES:
            _, column, value = SUBSET_SOURCES[source]  # the same test Ray Data reads them with (train())
            counts[source] = sum(pq.read_table(p, columns=[column], filters=[(column, "==", value)]).num_rows
                                 for p in paths)
        else:
            counts[source] = by_task_split.get(f"{source}/train", 0)
    return counts


def step_planners(cfg: TrainConfig, counts: dict[str, int]) -> tuple[Any, Any]:
    """(the mixture's planner, the curriculum's or None); building them checks that every phase has
    an objective with both weight and rows, so the driver can refuse a job before workers start."""
    from galen.flows.train.objectives import StepPlanner, objective_sources

    def planner(weights: dict[str, float]) -> Any:
        return StepPlanner(weights, objective_sources(cfg.stage), counts, cfg.seed)

    first = cfg.curriculum is not None and cfg.curriculum.steps > 0
    return planner(cfg.objective_weights()), planner(cfg.curriculum.objectives) if first else None


def check_inputs(cfg: TrainConfig) -> dict[str, list[str]]:
    """Shard files per source task, checked (with the tokenizer, init model and image codes)
    before any worker starts, so a bad input never leaves a half-written run behind."""
    from galen.model.tasks import TASKS

    shards = Path(cfg.shards)
    if not (shards / "manifest.json").is_file():
        raise GalenInputError(f"no shards at {shards} (manifest.json missing); run `dvc repro shards` first")
    if not (Path(cfg.tokenizer_dir()) / "tokenizer.json").is_file():
        raise GalenInputError(f"no tokenizer at {cfg.tokenizer}; run `dvc repro tokenizer` first")
    bad = [t for t in cfg.tasks if t not in TASKS]
    if bad:
        raise GalenInputError(f"unknown tasks {bad} in train.tasks; tasks are {', '.join(TASKS)}")
    files = training_sources(cfg, shards)
    check_shard_rows(shards, files)
    if cfg.init:
        check_init_model(cfg)
    if cfg.stage == "pretrain" and cfg.objective_weights().get("image_infilling", 0) > 0:
        if not cfg.image_codes or not Path(cfg.image_codes).is_file():
            raise GalenInputError(f"image_infilling needs image codes, but {cfg.image_codes!r} is not a file; run "
                                  "`dvc repro image_codes` or set train.pretrain.objectives.image_infilling: 0")
    return files


def check_shard_rows(shards: Path, files: dict[str, list[str]]) -> None:
    """Every training shard the manifest counts is there and readable: the rows on disk per task
    must match manifest.json, so a deleted, truncated or foreign shard file fails here, not mid-run
    (the step planner and the resume positions rely on those counts)."""
    import pyarrow.parquet as pq

    try:
        expected = json.loads((shards / "manifest.json").read_text()).get("by_task_split", {})
    except (OSError, ValueError, AttributeError) as e:
        raise GalenInputError(f"{shards / 'manifest.json'} is unreadable ({e}); run `dvc repro shards`") from e
    for task, paths in files.items():
        if task in SUBSET_SOURCES:
            continue  # the files of its task, checked under the task's name
        rows = 0
        for p in paths:
            try:
                rows += pq.read_metadata(p).num_rows
            except Exception as e:  # noqa: BLE001 - any unreadable file is the same bad input
                raise GalenInputError(f"shard {p} is not readable Parquet ({e}); re-run `dvc repro shards` "
                                      "(or `dvc checkout data/shards`)") from e
        want = expected.get(f"{task}/train")
        if rows != want:
            raise GalenInputError(f"the {task} training shards under {shards} hold {rows} rows in {len(paths)} "
                                  f"file(s) but manifest.json counts {want}: a shard file is missing or was changed; "
                                  "re-run `dvc repro shards` (or `dvc checkout data/shards`)")


def check_init_model(cfg: TrainConfig) -> None:
    """The starting model folder must exist and match the tokenizer (vocabulary) it will train with."""
    from galen.model.tokenizer import GalenTokenizer

    init = Path(cfg.init)  # type: ignore[arg-type]
    config_file = init / "config.json"
    if not config_file.is_file():
        raise GalenInputError(f"train.init={cfg.init} is not a Galen model folder (no config.json); give a folder "
                              "written by `galen train`, `galen model init` or `galen import-checkpoint`")
    from galen.model.config import SIZES

    saved = json.loads(config_file.read_text())
    expected = SIZES[cfg.size] if cfg.size is not None else {}  # None: whatever architecture init holds
    differs = {k: (saved.get(k), v) for k, v in expected.items()
               if k in ("d_model", "encoder_layers", "decoder_layers", "attention_heads", "ffn_dim")
               and saved.get(k) != v}
    if differs:
        detail = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differs.items())
        own = saved.get("name")
        fix = (f"set train.size to the checkpoint's size ({own})" if own in SIZES else
               f"the checkpoint is a {own or 'custom'} architecture: leave --size out (the size then comes "
               f"from --init), or set `size: null` under train.{cfg.stage} in params.yaml")
        raise GalenInputError(f"train.init={cfg.init} does not match train.size={cfg.size!r} ({detail}: checkpoint "
                              f"vs size); {fix}")
    model_vocab = saved.get("vocab_size")
    tok_dir = init if (init / "tokenizer.json").is_file() else Path(cfg.tokenizer)
    tok_size = len(GalenTokenizer.load(tok_dir))
    if model_vocab != tok_size:
        raise GalenInputError(f"train.init={cfg.init} has a vocabulary of {model_vocab} but the tokenizer at "
                              f"{tok_dir} has {tok_size}; train with the tokenizer the model was made with")


# --------------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------------
def _lr_lambda(total: int, warmup: int, rewarm_at: int = 0, rewarm: int = 0):
    """Linear warmup then linear decay; with `rewarm`, the lr ramps up again from `rewarm_at` (where a
    curriculum's first phase ends) over `rewarm` steps, back onto the decay line."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        scale = max(0.0, (total - step) / max(total - warmup, 1))  # linear (polynomial power 1) decay
        if rewarm and rewarm_at <= step < rewarm_at + rewarm:
            scale *= (step - rewarm_at + 1) / rewarm
        return scale
    return f


def lr_schedule(cfg: TrainConfig):
    """The lr multiplier per step of this job (warmup, decay, curriculum rewarm)."""
    cur = cfg.curriculum if cfg.curriculum is not None and cfg.curriculum.steps else None
    return _lr_lambda(cfg.steps, int(cfg.steps * cfg.warmup_ratio), cur.steps if cur else 0,
                      cur.rewarm_steps if cur else 0)


def _save_state(directory: str, engine: Any, ema: Any, rank: int, state: dict) -> None:
    engine.save_checkpoint(directory, tag="state")
    if ema is not None:
        ema.save(Path(directory) / f"ema_rank{rank}.safetensors")
    if rank == 0:
        (Path(directory) / "galen_state.json").write_text(json.dumps(state))


def save_final_model(module: Any, zero_stage: int, rank: int, write: Callable[[], None]) -> None:
    """Both trainers' end: rank 0 calls `write` (which saves the model folder in fp32 — after bf16
    training, the bf16 weights the model ran with, like DeepSpeed's 16-bit export); under ZeRO-3
    every rank gathers the partitions of `module` first, so the folder holds whole tensors."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if rank == 0:
                write()
    elif rank == 0:
        write()


def train_worker(config: dict) -> None:
    """The Ray Train worker loop (runs once per worker process)."""
    import deepspeed
    import ray.train
    import torch
    from tqdm import tqdm

    from galen.flows.ingest.schema import from_row
    from galen.flows.tracking import TrainingRun
    from galen.flows.train.ema import WeightEMA
    from galen.flows.train.examples import collate
    from galen.flows.train.objectives import ExampleBuilder, group_by_image_shape, step_rng
    from galen.flows.train.streams import endless_rows, prefetched
    from galen.model.config import get_config
    from galen.model.generalist import GalenModel
    from galen.model.image_codes import PrecomputedCodes
    from galen.model.losses import label_smoothed_cross_entropy
    from galen.model.tokenizer import GalenTokenizer

    cfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker
    tok = GalenTokenizer.load(cfg.tokenizer_dir())
    image_size = config["image_size"]
    if cfg.init:
        model = GalenModel.from_pretrained(cfg.init)
    else:
        model = GalenModel(get_config(cfg.size, vocab_size=len(tok), dropout=cfg.dropout, image_size=image_size))
    torch.manual_seed(cfg.seed + 1000 + rank)  # dropout differs per worker

    planner, first_phase = step_planners(cfg, config["counts"])
    phases = [planner] + ([first_phase] if first_phase else [])
    codes = None
    if cfg.stage == "pretrain" and any("image_infilling" in p.objectives for p in phases):
        codes = PrecomputedCodes.from_file(cfg.image_codes)  # type: ignore[arg-type]
    # the model's own input size, the one evaluation and serving resize to (image infilling builds its
    # 2 x code_image_size images itself)
    builder = ExampleBuilder(tok, model.cfg.image_size, candidates=config["candidates"], image_codes=codes,
                             code_image_size=model.cfg.code_image_size)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip, "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    compute_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32  # DeepSpeed cast the weights...
    for buffer in engine.module.buffers():  # ...not the buffers (BatchNorm statistics): inputs and buffers follow
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(compute_dtype)
    ema = WeightEMA(list(model.parameters()), cfg.ema_decay) if cfg.ema_decay else None

    step, consumed = 0, {t: 0 for t in config["counts"]}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag="state")
            if ema is not None:
                ema.load(Path(d) / f"ema_rank{rank}.safetensors")
            state = json.loads((Path(d) / "galen_state.json").read_text())
        step, consumed = state["step"], {**consumed, **state["consumed"]}

    run = TrainingRun.attach(config["run_id"], config["tracking_uri"], rank, system_metrics=rank == 0)
    if checkpoint:
        run.log_metrics({"resumed_from_step": step}, step)
        run.increment_tag("galen.checkpoint_restores")  # worker-group restarts and reruns that continued the run
    sources = sorted({s for p in phases for s in p.sources})
    shards = {t: ray.train.get_dataset_shard(t) for t in sources}
    streams = {t: prefetched(endless_rows(shards[t].iter_rows, consumed[t], cfg.cache_rows)) for t in sources}
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.stage, unit="step", disable=rank != 0, mininterval=5,
               dynamic_ncols=True)
    window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
    task_losses: dict[str, list[float]] = {}
    warm_start, warm_samples, warm_tokens = None, 0, 0  # steady-state throughput, after the first step
    while step < cfg.steps:
        for micro in range(cfg.grad_accum):
            # dropout/drop-path seeded by step (not a process-wide stream), so a restart repeats it exactly
            torch.manual_seed(step_rng(cfg.seed, rank, step, micro).getrandbits(63))
            rng = step_rng(cfg.seed, rank, step, micro)
            examples = []
            phase = first_phase if first_phase is not None and step < cfg.curriculum.steps else planner
            for slot in phase.plan(step, micro, cfg.batch_size):  # the same slots on every worker
                record = from_row(next(streams[slot.source]))
                consumed[slot.source] += 1
                examples.append(builder.build(slot.objective, record, rng))
            parts, tokens, weight = [], 0, 0
            for group in group_by_image_shape(examples):
                batch = collate(group, tok)
                images = batch.images.to(compute_dtype) if batch.images is not None else None
                out = engine(batch.input_ids, batch.decoder_input_ids, images=images,
                             patch_masks=batch.patch_masks, code_masks=batch.code_masks)
                loss = label_smoothed_cross_entropy(out.logits, batch.target, cfg.label_smoothing, tok.pad_id,
                                                    allowed=batch.allowed, average=cfg.loss_average)
                parts.append(loss.loss * loss.weight)  # groups differ in size: weighted sums, one mean below
                weight += loss.weight
                tokens += loss.num_tokens
                for task in set(batch.tasks):  # per-objective loss for the curves (rows of one objective)
                    rows = torch.tensor([t == task for t in batch.tasks], device=loss.row_nll.device)
                    task_losses.setdefault(task, []).append(loss.mean_nll(rows))
            engine.backward(sum(parts) / max(weight, 1))
            engine.step()
            window_samples += len(examples)
            window_tokens += tokens
            if warm_start is not None:
                warm_samples += len(examples)
                warm_tokens += tokens
        step += 1
        if warm_start is None:
            warm_start = time.perf_counter()
        if ema is not None:
            ema.update()
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            metrics = {f"loss/{t}": sum(v) / len(v) for t, v in sorted(task_losses.items())}
            all_losses = [x for v in task_losses.values() for x in v]
            metrics.update({"loss": sum(all_losses) / len(all_losses), "lr": scheduler.get_last_lr()[0],
                            "samples_per_s": window_samples * world / elapsed,
                            "tokens_per_s": window_tokens * world / elapsed})
            run.log_metrics(metrics, step)
            bar.set_postfix({"loss": f"{metrics['loss']:.3f}", "samples/s": f"{metrics['samples_per_s']:.1f}"})
            window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
            task_losses = {}
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            state = {"step": step, "consumed": consumed, "run_id": config["run_id"]}
            with tempfile.TemporaryDirectory() as d:
                _save_state(d, engine, ema, rank, state)
                elapsed = max(time.perf_counter() - warm_start, 1e-9)
                ray.train.report({"step": step, **{f"consumed/{t}": n for t, n in consumed.items()},
                                  "samples_per_s": warm_samples * world / elapsed,
                                  "tokens_per_s": warm_tokens * world / elapsed},
                                 checkpoint=ray.train.Checkpoint.from_directory(d))
    bar.close()
    if ema is not None:
        ema.swap()  # the saved model is the moving average
    save_final_model(engine.module, cfg.zero_stage, rank,
                     lambda: engine.module.save_pretrained(cfg.out, tok, dtype=torch.float32))
    if rank == 0:
        run.log_model_folder(cfg.out)
    run.close()


# --------------------------------------------------------------------------------------------------
# driver side
# --------------------------------------------------------------------------------------------------
def model_image_size(cfg: TrainConfig, manifest: dict, tasks: list[str]) -> int:
    """The input size the model is built for and trained at: init's, `image_size`, or the largest of the
    shards' sizes. Evaluation and serving resize to the same size (model config.json), so training must
    too: a model trained on 128-px images and asked about 256-px ones sees every finding at twice the
    scale it learned. Image infilling is not a reason for a larger size: it builds its own
    2 x code_image_size images, and image positions are bucketed."""
    if cfg.init:
        return int(json.loads((Path(cfg.init) / "config.json").read_text()).get("image_size", 256))
    if cfg.image_size:
        return cfg.image_size
    return max(int(manifest.get("image_size", {}).get(t, 128)) for t in tasks)


FINISHED_MARKER = "galen_finished.json"
_NOT_IN_FINGERPRINT = ("max_failures", "log_every", "metrics", "storage_path", "run_name", "experiment",
                       "placement_strategy", "cache_rows")


def job_fingerprint(cfg: TrainConfig) -> str:
    """Hash of everything that changes what a job computes: same params -> same job (a rerun resumes
    it after a crash); changed params -> a new job and a new MLflow run, never a mixed one."""
    import hashlib

    fields = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_FINGERPRINT}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]


def job_location(cfg: TrainConfig, run_name: str, storage: Any) -> tuple[str, Any]:
    """(Ray Train run name, its folder in `storage`, a `flows.tracking.StorageFolder`: local or
    s3://). An unfinished job with these params is resumed; once finished, running the same params
    again starts the next attempt (`-r2`, `-r3`, ...)."""
    base = f"{run_name}-{job_fingerprint(cfg)}"
    name, attempt = base, 1
    while storage.child(name).exists(FINISHED_MARKER):
        attempt += 1
        name = f"{base}-r{attempt}"
    return name, storage.child(name)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) the training job described by `cfg`; returns the final metrics."""
    import ray
    import ray.data
    from ray.data.expressions import col
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from galen.flows.paths import tracking_uri
    from galen.flows.tracking import StorageFolder, TrainingRun, run_id_file

    files = check_inputs(cfg)
    manifest = json.loads((Path(cfg.shards) / "manifest.json").read_text())
    candidates = json.loads((Path(cfg.shards) / "candidates.json").read_text())
    counts = source_rows(Path(cfg.shards), files)
    tasks = [t for t in files if t not in SUBSET_SOURCES]
    image_size = model_image_size(cfg, manifest, tasks)
    if cfg.stage == "finetune":  # the task mixture of the shards stage, params' objectives on top
        cfg.objectives = {t: float(manifest.get("mixture", {}).get(t, 1.0)) for t in cfg.tasks} | (cfg.objectives or {})
    step_planners(cfg, counts)  # an objective-less phase (no rows of any weighted objective) fails here
    run_name = cfg.run_name or f"galen-{cfg.stage}"
    storage = StorageFolder(cfg.storage_path if "://" in cfg.storage_path else Path(cfg.storage_path).resolve())
    job_name, job_dir = job_location(cfg, run_name, storage)  # reads S3 first: a bad bucket fails here
    storage_path, storage_fs = storage.ray_storage()
    id_file = run_id_file(job_dir)
    resume_id = id_file.read()

    start_ray(cfg.num_workers)  # before the MLflow run: Ray failing to start leaves no run behind
    run = TrainingRun.start_or_resume(cfg.experiment, run_name, resume_id, params=asdict(cfg),
                                      tags={"galen.stage": cfg.stage, "galen.job": job_name}, system_metrics=False)
    if not resume_id:
        id_file.write(run.run_id)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the same rows in the same order after a restart
    ctx.enable_progress_bars = False  # one progress bar (the training one), not one per dataset
    datasets = {t: ray.data.read_parquet([str(Path(p).resolve()) for p in f]) for t, f in files.items()}
    for name, (_, column, value) in SUBSET_SOURCES.items():
        if name in datasets:  # an Arrow-native predicate (source_rows counted the rows it keeps)
            datasets[name] = datasets[name].filter(expr=col(column) == value)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"train": asdict(cfg) | {"tokenizer": str(Path(cfg.tokenizer).resolve()),
                                                   "out": str(Path(cfg.out).resolve()),
                                                   "init": cfg.init and str(Path(cfg.init).resolve()),
                                                   "image_codes": cfg.image_codes and str(Path(cfg.image_codes).resolve())},
                           "run_id": run.run_id, "tracking_uri": tracking_uri(), "candidates": candidates,
                           "counts": counts, "image_size": image_size},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(name=job_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
    )
    return fit_and_finish(trainer, run, job_dir, cfg.out, cfg.metrics)


def start_ray(num_workers: int) -> None:
    """Join RAY_ADDRESS if set, else start a local Ray with logical CPUs to spare for Ray Data's
    read tasks beside the training workers (shared by every `galen ... train`)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=(os.cpu_count() or 1) + num_workers, include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": "galen.flows.train.quiet_dashboardless_ray"})


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

