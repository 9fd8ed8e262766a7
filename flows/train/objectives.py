"""What each training step is made of: objectives, the shards they read, and mixed batches.

A *source* is a task's training shard (`data/shards/<task>/train`); an *objective* turns one
record of a source into one `Example`. Fine-tuning objectives are the tasks themselves; the
pretraining objectives are OFA's (captioning, VQA, image-text matching with negatives, grounding,
grounded captioning, detection, text infilling, image infilling on codes), each reading the
sources that can feed it.

Every step is planned from `(seed, step, micro-step)` alone, identically on all workers: Ray
Data's streaming split needs the workers to read the same task's dataset at the same time, and a
resumed run must re-plan exactly the steps the interrupted one would have run. A record an
objective cannot serve (no caption for ITM, no codes for image infilling) falls back to the
record's own task, so one planned slot always reads exactly one row.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from galen.flows.ingest.schema import Record
from galen.flows.train.examples import (
    FINETUNE_TASKS,
    Example,
    ImageCodes,
    caption_example,
    detection_example,
    grounded_caption_example,
    grounding_example,
    image_infilling_example,
    itm_example,
    make_example,
    text_infilling_example,
)
from galen.model.errors import GalenInputError
from galen.model.tasks import EVALUATED_TASKS
from galen.model.vocabulary import GalenTokenizer

# objective -> the shard tasks whose records can feed it (in order of preference)
PRETRAIN_SOURCES: dict[str, tuple[str, ...]] = {
    "caption": ("caption",),
    "image_text_matching": ("caption",),
    "vqa": ("vqa",),
    "classification": ("classification",),
    "grounding": ("grounding",),
    "grounded_caption": ("grounding",),
    "detection": ("detection", "grounding"),
    "text_infilling": ("summarization", "nli", "caption"),
    "image_infilling": ("caption", "vqa", "classification", "grounding"),
}
FINETUNE_OBJECTIVES: tuple[str, ...] = EVALUATED_TASKS
# Objectives (of either stage) that read a subset of one task's shards, so that it can get its own weight:
# objective (= its source) -> (task, column, value kept). Closed-ended questions answer in one or two
# tokens, so under a token-averaged loss they get ~1% of a mixed batch's gradient unless weighted.
SUBSET_SOURCES: dict[str, tuple[str, str, str]] = {
    "vqa_closed": ("vqa", "answer_type", "CLOSED"),
}


def objective_sources(stage: str) -> dict[str, tuple[str, ...]]:
    """Objective -> the sources that can feed it: pretraining's OFA objectives or fine-tuning's one per
    task, and in both stages the subset objectives (each its own source)."""
    base = PRETRAIN_SOURCES if stage == "pretrain" else {t: (t,) for t in FINETUNE_OBJECTIVES}
    return {**base, **{name: (name,) for name in SUBSET_SOURCES}}


@dataclass(frozen=True)
class Slot:
    """One row of a batch: which objective, fed by which source shard."""

    objective: str
    source: str


class StepPlanner:
    """Seeded plan of (objective, source) slots per micro-batch, the same on every worker."""

    def __init__(self, weights: Mapping[str, float], sources: Mapping[str, Sequence[str]],
                 available: Mapping[str, int], seed: int):
        for name, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                raise GalenInputError(f"objective weight of {name!r} must be a number >= 0, got {w!r}")
            if name not in sources:
                raise GalenInputError(f"unknown objective {name!r}; objectives are {', '.join(sources)}")
        self.options: list[tuple[str, tuple[str, ...]]] = []
        self.weights: list[float] = []
        for name, w in weights.items():
            usable = tuple(s for s in sources[name] if available.get(s, 0) > 0)
            if w > 0 and usable:
                self.options.append((name, usable))
                self.weights.append(float(w))
        if not self.options:
            raise GalenInputError(f"no objective has both a positive weight and training data (weights "
                                  f"{dict(weights)}, rows per task {dict(available)}); check params.yaml "
                                  "against the shards")
        self.seed = seed

    @property
    def objectives(self) -> list[str]:
        return [name for name, _ in self.options]

    @property
    def sources(self) -> list[str]:
        return sorted({s for _, usable in self.options for s in usable})

    def plan(self, step: int, micro: int, size: int) -> list[Slot]:
        rng = random.Random(f"{self.seed}/{step}/{micro}")
        picks = rng.choices(self.options, weights=self.weights, k=size)
        return [Slot(name, usable[0] if len(usable) == 1 else rng.choice(usable)) for name, usable in picks]


def step_rng(seed: int, rank: int, step: int, micro: int) -> random.Random:
    """Per-worker randomness of one micro-step (span masking, ITM negatives): resumable by step."""
    return random.Random(f"{seed}/{rank}/{step}/{micro}/rows")


class ExampleBuilder:
    """Record + objective -> Example, with the shared pieces (tokenizer, sizes, codes, answer sets)."""

    def __init__(self, tokenizer: GalenTokenizer, image_size: int, *,
                 candidates: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
                 image_codes: ImageCodes | None = None, code_image_size: int = 128,
                 itm_negative_ratio: float = 0.5):
        self.tok = tokenizer
        self.image_size = image_size
        self.candidates = candidates or {}
        self.image_codes = image_codes
        self.code_image_size = code_image_size
        self.itm_negative_ratio = itm_negative_ratio
        self._recent_captions: list[str] = []  # negatives for image-text matching come from other records

    def own_task(self, record: Record, rng: random.Random) -> Example:
        answers = self.candidates.get(record.dataset, {}).get(record.task)
        return make_example(record, self.tok, self.image_size, rng=rng, candidates=answers)

    def build(self, objective: str, record: Record, rng: random.Random) -> Example:
        example = self._objective(objective, record, rng)
        if record.task == "caption" and record.target:
            self._recent_captions = (self._recent_captions + [record.target])[-64:]
        return example if example is not None else self.own_task(record, rng)

    def _objective(self, objective: str, record: Record, rng: random.Random) -> Example | None:
        if objective == record.task and objective in FINETUNE_TASKS:  # what make_example serves
            return self.own_task(record, rng)
        fn: Callable[..., Example | None] | None = {
            "caption": caption_example, "grounding": grounding_example,
            "grounded_caption": grounded_caption_example, "detection": detection_example,
        }.get(objective)
        if fn is not None:
            return fn(record, self.tok, self.image_size)
        if objective == "image_text_matching":
            negatives = [c for c in self._recent_captions if c != record.target]
            negative = rng.choice(negatives) if negatives and rng.random() < self.itm_negative_ratio else None
            return itm_example(record, self.tok, self.image_size, negative)
        if objective == "text_infilling":
            text = record.text or record.premise or record.target
            return text_infilling_example(text, self.tok, rng) if text else None
        if objective == "image_infilling":
            key = (record.meta or {}).get("original_image_sha1")
            return image_infilling_example(record, self.tok, self.image_codes, code_image_size=self.code_image_size,
                                           key=key)
        return None  # a subset objective (vqa_closed), or "vqa" planned on another task's record: its own task


def group_by_image_shape(examples: Sequence[Example]) -> list[list[Example]]:
    """Split a mixed batch into sub-batches of one image size, text-only rows on their own (OFA's
    sub-batches: image infilling runs at twice the size, and pure-text rows never push blank images
    through the ResNet, whose BatchNorm statistics they would skew)."""
    groups: dict[tuple[int, ...] | None, list[Example]] = {}
    for e in examples:
        groups.setdefault(None if e.image is None else tuple(e.image.shape), []).append(e)
    return list(groups.values())
