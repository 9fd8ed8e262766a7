"""`galen train`: multitask training of the generalist model (the `Recipe` of `flows.train.loop`).

The driver checks the config and the data before any worker starts (tasks, shards against the
manifest, tokenizer, init model, image codes) and hands the job to `loop.run_job`. On each worker
the recipe builds the model (a named size, or `init`: a pretrained / imported model folder),
draws the next objective of every batch slot from the task-mixture weights (a curriculum's first
phase has its own), builds OFA-style examples and scores them with label-smoothed cross-entropy;
with `ema_decay` the saved model is the moving average of the weights. Everything else (ZeRO,
checkpoints, resume, MLflow, saving) is the loop's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from galen.flows.train.loop import JobConfig, Recipe, StepLoss, config_from, run_job
from galen.model.errors import GalenInputError
from galen.model.tasks import EVALUATED_TASKS

STAGES = ("pretrain", "finetune")


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
class TrainConfig(JobConfig):
    """params.yaml `train:` (shared) merged with `train.<stage>:` (per stage): the loop's fields
    (`JobConfig`: steps, batch_size, lr, zero_stage, ...) and the generalist's."""

    PATHS: ClassVar[tuple[str, ...]] = (*JobConfig.PATHS, "image_codes")

    stage: str = "finetune"
    size: str | None = "nano"               # None: the architecture of `init` (an imported checkpoint's)
    tasks: list[str] = field(default_factory=lambda: list(EVALUATED_TASKS))  # objectives.FINETUNE_OBJECTIVES
    warmup_ratio: float = 0.05
    label_smoothing: float = 0.1
    loss_average: str = "token"             # token: each target token weighs the same; sample: each example does
    dropout: float = 0.1
    objectives: dict[str, float] | None = None  # pretraining: objective weights; fine-tuning: weights over
                                                # the shards' task mixture (e.g. vqa_closed), None: the mixture
    curriculum: Curriculum | None = None    # a first phase on other objective weights
    ema_decay: float | None = None          # fine-tuning EMA of the weights (the saved model is the EMA)
    image_codes: str | None = "data/image_codes.parquet"  # image-infilling targets (pretraining)

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

    def model_problems(self) -> list[str]:
        problems = []
        if self.stage not in STAGES:
            problems.append(f"stage {self.stage!r} is not one of {STAGES}")
        from galen.model.config import SIZES

        if self.size is None and not self.init:
            problems.append("size is needed when training does not start from an init model folder")
        if self.size is not None and self.size not in SIZES:
            problems.append(f"size {self.size!r} is not one of {', '.join(SIZES)}")
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
        return problems


def load_train_config(params: dict[str, Any], stage: str, **overrides: Any) -> TrainConfig:
    """Merge `train:` and `train.<stage>:`; unknown or misspelled keys are an error naming them."""
    section = dict(params.get("train") or {})
    per_stage = {s: section.pop(s, None) or {} for s in STAGES}
    merged = {**section, **per_stage.get(stage, {}), "stage": stage,
              **{k: v for k, v in overrides.items() if v is not None}}
    if overrides.get("init") is not None and overrides.get("size") is None:
        merged["size"] = None  # `--init DIR` alone: the model is what DIR holds, whatever size params.yaml names
    return config_from(TrainConfig, merged)


def training_sources(cfg: TrainConfig, shards: Path) -> dict[str, list[str]]:
    """Shard files per source task. Fine-tuning needs every listed task; pretraining reads whatever
    its objectives can use (an objective without data is dropped, not an error)."""
    from galen.flows.shards import shard_paths
    from galen.flows.train.objectives import SUBSET_SOURCES, objective_sources

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

    from galen.flows.train.objectives import SUBSET_SOURCES

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
    from galen.flows.shards import check_written_for

    check_written_for(shards, "generalist", model_input_size(cfg),
                      f"the generalist ({f'init {cfg.init}' if cfg.init else f'size {cfg.size}'})")
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

    from galen.flows.train.objectives import SUBSET_SOURCES

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
    from galen.model.vocabulary import GalenTokenizer

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


class GeneralistRecipe(Recipe):
    """The generalist in the loop: OFA objectives mixed within every batch, label-smoothed
    cross-entropy over the target tokens, an optional EMA of the weights (saved instead of them)."""

    CONFIG = TrainConfig

    def __init__(self, cfg: TrainConfig, extras: dict[str, Any], rank: int, world: int) -> None:
        super().__init__(cfg, extras, rank, world)
        from galen.model.vocabulary import GalenTokenizer

        self.label = cfg.stage
        self.tok = GalenTokenizer.load(cfg.tokenizer_dir())
        self.planner, self.first_phase = step_planners(cfg, extras["counts"])
        self.ema: Any = None

    def build(self) -> Any:
        from galen.flows.train.objectives import ExampleBuilder
        from galen.model.config import get_config
        from galen.model.generalist import GalenModel
        from galen.model.image_code_files import PrecomputedCodes

        cfg = self.cfg
        if cfg.init:
            model = GalenModel.from_pretrained(cfg.init)
        else:
            model = GalenModel(get_config(cfg.size, vocab_size=len(self.tok), dropout=cfg.dropout))
        phases = [self.planner] + ([self.first_phase] if self.first_phase else [])
        codes = None
        if cfg.stage == "pretrain" and any("image_infilling" in p.objectives for p in phases):
            codes = PrecomputedCodes.from_file(cfg.image_codes)
        # the model's own input size, the one evaluation and serving resize to (image infilling builds its
        # 2 x code_image_size images itself)
        self.builder = ExampleBuilder(self.tok, model.cfg.image_size, candidates=self.extras["candidates"],
                                      image_codes=codes, code_image_size=model.cfg.code_image_size)
        return model

    def optimizer(self, module: Any) -> Any:
        import torch

        return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=self.cfg.lr,
                                 betas=(0.9, 0.999), weight_decay=self.cfg.weight_decay)

    def lr_multiplier(self) -> Any:
        return lr_schedule(self.cfg)

    def sources(self) -> list[str]:
        phases = [self.planner] + ([self.first_phase] if self.first_phase else [])
        return sorted({s for p in phases for s in p.sources})

    def after_initialize(self, engine: Any) -> None:
        from galen.flows.train.ema import WeightEMA

        if self.cfg.ema_decay:
            self.ema = WeightEMA(list(engine.module.parameters()), self.cfg.ema_decay)

    def draw(self, step: int, micro: int, next_row: Any, rng: Any) -> list[Any]:
        from galen.flows.ingest.schema import from_row

        cur = self.cfg.curriculum
        phase = self.first_phase if self.first_phase is not None and step < cur.steps else self.planner
        return [self.builder.build(slot.objective, from_row(next_row(slot.source)), rng)
                for slot in phase.plan(step, micro, self.cfg.batch_size)]  # the same slots on every worker

    def losses(self, engine: Any, examples: list[Any], dtype: Any) -> list[StepLoss]:
        import torch

        from galen.flows.train.examples import collate
        from galen.flows.train.objectives import group_by_image_shape
        from galen.model.losses import label_smoothed_cross_entropy

        parts = []
        for group in group_by_image_shape(examples):
            batch = collate(group, self.tok)
            images = batch.images.to(dtype) if batch.images is not None else None
            out = engine(batch.input_ids, batch.decoder_input_ids, images=images,
                         patch_masks=batch.patch_masks, code_masks=batch.code_masks)
            loss = label_smoothed_cross_entropy(out.logits, batch.target, self.cfg.label_smoothing, self.tok.pad_id,
                                                allowed=batch.allowed, average=self.cfg.loss_average)
            curves = {}
            for task in set(batch.tasks):  # per-objective loss for the curves (rows of one objective)
                rows = torch.tensor([t == task for t in batch.tasks], device=loss.row_nll.device)
                curves[f"loss/{task}"] = [loss.mean_nll(rows)]
            parts.append(StepLoss(loss.loss, loss.weight, len(group), loss.num_tokens, curves))
        return parts

    def after_step(self, engine: Any) -> None:
        if self.ema is not None:
            self.ema.update()

    def save_state(self, directory: Path) -> None:
        if self.ema is not None:
            self.ema.save(directory / f"ema_rank{self.rank}.safetensors")

    def load_state(self, directory: Path) -> None:
        if self.ema is not None:
            self.ema.load(directory / f"ema_rank{self.rank}.safetensors")

    def write_model(self, engine: Any) -> Any:
        import torch

        if self.ema is not None:
            self.ema.swap()  # the saved model is the moving average
        return lambda: engine.module.save_pretrained(self.cfg.out, self.tok, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# driver side
# --------------------------------------------------------------------------------------------------
def model_input_size(cfg: TrainConfig) -> int:
    """The image size the model takes, as its config says (init's config.json, or the named size):
    training, evaluation and serving all feed it that size, and the shards must have been written at it."""
    from galen.model.config import GalenConfig, get_config

    if cfg.init:
        return GalenConfig.load(Path(cfg.init) / "config.json").image_size
    return get_config(cfg.size).image_size  # type: ignore[arg-type]


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) the training job described by `cfg`; returns the final metrics."""
    from galen.flows.train.objectives import SUBSET_SOURCES
    files = check_inputs(cfg)
    manifest = json.loads((Path(cfg.shards) / "manifest.json").read_text())
    candidates = json.loads((Path(cfg.shards) / "candidates.json").read_text())
    counts = source_rows(Path(cfg.shards), files)
    if cfg.stage == "finetune":  # the task mixture of the shards stage, params' objectives on top
        cfg.objectives = {t: float(manifest.get("mixture", {}).get(t, 1.0)) for t in cfg.tasks} | (cfg.objectives or {})
    step_planners(cfg, counts)  # an objective-less phase (no rows of any weighted objective) fails here

    def datasets() -> dict[str, Any]:
        import ray.data
        from ray.data.expressions import col

        read = {t: ray.data.read_parquet([str(Path(p).resolve()) for p in f]) for t, f in files.items()}
        for name, (_, column, value) in SUBSET_SOURCES.items():
            if name in read:  # an Arrow-native predicate (source_rows counted the rows it keeps)
                read[name] = read[name].filter(expr=col(column) == value)
        return read

    return run_job(cfg, GeneralistRecipe, datasets, run_name=cfg.run_name or f"galen-{cfg.stage}", stage=cfg.stage,
                   extras={"candidates": candidates, "counts": counts})
