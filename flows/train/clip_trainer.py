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

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from galen.flows.train.loop import JobConfig, Recipe, StepLoss, config_from, run_job
from galen.model.errors import GalenInputError

PAIR_SOURCES = ("caption", "classification")
LABEL_TEMPLATES = ("{}", "a pathology image of {}", "tissue showing {}", "microscopy of {}")


@dataclass
class ClipTrainConfig(JobConfig):
    """params.yaml `clip:` `train` section: the loop's fields (`JobConfig`, defaults after BiomedCLIP's
    recipe: AdamW betas (0.9, 0.98), eps 1e-6, weight decay 0.2, warmup then cosine) and CLIP's own."""

    SECTION: ClassVar[str] = "clip.train"
    ZERO_STAGES: ClassVar[tuple[int, ...]] = (0, 1, 2)
    ZERO_REASON: ClassVar[str] = (" for the CLIP model (its features are gathered every step; ZeRO-2 already "
                                  "shards what pays off)")

    config: str = "micro"                   # named config (model.clip.CONFIGS), unless init
    sources: dict[str, float] = field(default_factory=lambda: {"caption": 1.0, "classification": 1.0})
    label_templates: list[str] = field(default_factory=lambda: list(LABEL_TEMPLATES))
    steps: int = 300
    batch_size: int = 32                    # per worker; every worker must have the same (gathered loss)
    weight_decay: float = 0.2
    warmup_steps: int = 20
    zero_stage: int = 1
    checkpoint_every: int = 100
    experiment: str = "galen-clip"
    out: str = "artifacts/clip_model"

    def model_problems(self) -> list[str]:
        from galen.model.clip import CONFIGS

        problems = []
        if not self.init and self.config not in CONFIGS:
            problems.append(f"config {self.config!r} is not one of {', '.join(sorted(CONFIGS))}")
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
        return problems


def load_clip_train_config(params: dict[str, Any], **overrides: Any) -> ClipTrainConfig:
    """params.yaml `clip.train`, with overrides; unknown keys are an error naming the near miss."""
    merged = {**((params.get("clip") or {}).get("train") or {}), **{k: v for k, v in overrides.items() if v is not None}}
    return config_from(ClipTrainConfig, merged)


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
    from galen.flows.shards import check_written_for
    from galen.model.clip import CONFIGS, ClipSpec, read_spec

    if not cfg.init and not (Path(cfg.tokenizer) / "tokenizer.json").is_file():
        raise GalenInputError(f"no tokenizer at {cfg.tokenizer}; run `dvc repro tokenizer` first")
    spec = read_spec(Path(cfg.init)) if cfg.init else ClipSpec(cfg.config, CONFIGS[cfg.config])
    check_written_for(shards, "clip", spec.image_size,
                      f"the CLIP model ({f'init {cfg.init}' if cfg.init else f'config {cfg.config}'})")
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


class ClipRecipe(Recipe):
    """CLIP in the loop: batches of image-text pairs drawn from the pair sources, the gathered
    symmetric InfoNCE loss, the temperature capped after every step."""

    CONFIG = ClipTrainConfig
    label = "clip"

    def build(self) -> Any:
        from open_clip.transform import image_transform

        from galen.model.clip import ClipModel
        from galen.model.losses import clip_loss
        from galen.model.vocabulary import GalenTokenizer

        cfg = self.cfg
        if cfg.init:
            self.wrapper = ClipModel.from_pretrained(cfg.init)
        else:
            self.wrapper = ClipModel.create(cfg.config, GalenTokenizer.load(cfg.tokenizer), seed=cfg.seed)
        spec = self.wrapper.spec  # the model decides its own preprocessing (its size, mean and std)
        self.augment = image_transform(spec.image_size, is_train=True, mean=spec.mean, std=spec.std)
        self.loss_fn = clip_loss(self.rank, self.world)
        return self.wrapper.clip.train()

    def optimizer(self, module: Any) -> Any:
        import torch

        decay = [p for n, p in module.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in module.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=self.cfg.lr, betas=(0.9, 0.98),
                                 eps=1e-6)

    def lr_multiplier(self) -> Any:
        return _cosine(self.cfg.steps, min(self.cfg.warmup_steps, self.cfg.steps))

    def sources(self) -> list[str]:
        return sorted(self.extras["weights"])

    def draw(self, step: int, micro: int, next_row: Any, rng: Any) -> tuple[list[Any], list[str]]:
        from galen.flows.ingest.schema import from_row
        from galen.flows.train.objectives import step_rng
        from galen.model.vision import load_image

        sources, weights = zip(*sorted(self.extras["weights"].items()), strict=True)
        # the same sources on every worker: each reads as many rows of each dataset shard, so the shards'
        # epochs (which start together on all workers) stay in step and no worker waits on another's epoch
        plan = step_rng(self.cfg.seed, 0, step, micro).choices(sources, weights, k=self.cfg.batch_size)
        images, texts = [], []
        for source in plan:
            record = from_row(next_row(source))
            images.append(self.augment(load_image(record.image)))
            texts.append(pair_text(record, self.cfg.label_templates, rng))
        return images, texts

    def losses(self, engine: Any, examples: tuple[list[Any], list[str]], dtype: Any) -> list[StepLoss]:
        import torch

        images, texts = examples
        out = engine(torch.stack(images).to(engine.device, dtype=dtype), self.wrapper.text_encoder(texts).to(engine.device))
        loss = self.loss_fn(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())
        return [StepLoss(loss, 1, len(images))]

    def after_step(self, engine: Any) -> None:
        import torch

        with torch.no_grad():  # CLIP caps the temperature at 100
            engine.module.logit_scale.clamp_(0, math.log(100))

    def window_metrics(self, engine: Any) -> dict[str, float]:
        return {"logit_scale": float(engine.module.logit_scale.exp())}

    def write_model(self, engine: Any) -> Any:
        import torch

        self.wrapper.clip = engine.module.eval()
        return lambda: self.wrapper.save_pretrained(self.cfg.out, dtype=torch.float32)


def train_clip(cfg: ClipTrainConfig) -> dict:
    """Run (or resume) the CLIP training job described by `cfg`; returns the final metrics."""
    files = check_inputs(cfg)

    def datasets() -> dict[str, Any]:
        import ray.data

        return {t: ray.data.read_parquet([str(Path(p).resolve()) for p in f]) for t, f in files.items()}

    return run_job(cfg, ClipRecipe, datasets, run_name=cfg.run_name or "galen-clip", stage="clip",
                   extras={"weights": {t: float(cfg.sources[t]) for t in files}})
