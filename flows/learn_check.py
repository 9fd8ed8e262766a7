"""Learning check: train a small model on a handful of image-question-answer triples until it answers
every one of them.

The quickest end-to-end proof that images, tokenizer, model, loss, optimizer and decoding work
together — on the demo data, or on the first few records of a user's own ingested dataset before
a long run. Examples are built exactly as training builds them (`flows.train.examples`). Single
process on purpose; distributed training is `galen train`. The gate (`require_accuracy`) fails an
accuracy that is no finite number instead of letting NaN pass.
"""

from __future__ import annotations

import json
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from galen.flows.ingest.schema import Record
from galen.flows.train.examples import Batch, collate, make_example
from galen.model.decoding import GenerationConfig, generate
from galen.model.errors import GalenError, GalenInputError
from galen.model.generalist import GalenModel
from galen.model.losses import label_smoothed_cross_entropy
from galen.model.vocabulary import GalenTokenizer


class LearnCheckFailed(GalenError):
    """The small model did not reach the required accuracy (or its accuracy is no number)."""


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def required_accuracy(required) -> float:
    """`require_accuracy` checked before any training: a finite number in [0, 1] (a NaN requirement
    would let anything pass, one above 1 nothing)."""
    if not _finite(required) or not 0.0 <= float(required) <= 1.0:
        raise GalenInputError(f"learn_check.require_accuracy is {required!r}; it must be a finite number in [0, 1]")
    return float(required)


def require_accuracy(accuracy, required) -> None:
    """The learn-check gate: raise `LearnCheckFailed` unless `accuracy` is a finite number >= `required`.
    A non-finite accuracy (NaN, ±inf, None, a string) fails, naming its value, instead of passing every
    comparison (`nan < required` is False)."""
    required = required_accuracy(required)
    if not _finite(accuracy):
        raise LearnCheckFailed(f"learn-check accuracy is {accuracy!r}, not a finite number: it fails the required "
                               f"{float(required):.0%}; check the data and the model")
    if float(accuracy) < float(required):
        raise LearnCheckFailed(f"learn-check reached {float(accuracy):.1%} < required {float(required):.1%}; raise "
                               "--max-steps or check the data")


@dataclass
class LearnCheckResult:
    steps: int
    accuracy: float
    final_loss: float
    seconds: float
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def answer_accuracy(model: GalenModel, tokenizer: GalenTokenizer, batch: Batch, answers: Sequence[str],
                    max_length: int = 8) -> tuple[float, list[str]]:
    """Exact-match accuracy (case-insensitive) of free (unconstrained) greedy answers."""
    hyps = generate(model, batch.input_ids, batch.images, batch.patch_masks,
                    config=GenerationConfig(beam_size=1, max_length=max_length))
    preds = [tokenizer.decode(h.tokens).strip().lower() for h in hyps]
    return sum(p == a.strip().lower() for p, a in zip(preds, answers)) / len(answers), preds


def learn_check(model: GalenModel, tokenizer: GalenTokenizer, records: Sequence[Record], max_steps: int = 400,
                lr: float = 1e-3, eval_every: int = 25, seed: int = 0, progress: bool = True) -> LearnCheckResult:
    """Train on the whole (small) set each step until greedy answers are all right or max_steps pass."""
    if not records:
        raise GalenInputError("no records to learn; give at least one (e.g. --limit 16 on ingested VQA data)")
    if len(tokenizer) != model.cfg.vocab_size:
        raise GalenInputError(f"tokenizer has {len(tokenizer)} entries, the model's vocabulary {model.cfg.vocab_size}; "
                              "build the model with vocab_size=len(tokenizer)")
    torch.manual_seed(seed)
    batch = collate([make_example(r, tokenizer, model.cfg.image_size) for r in records], tokenizer)
    answers = [r.target for r in records]
    max_answer = max(len(tokenizer.encode_target(a)) for a in answers)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    history, accuracy, loss_value, step = [], 0.0, float("nan"), 0
    start = time.perf_counter()
    bar = tqdm(range(1, max_steps + 1), desc="learn-check", disable=not progress)
    for step in bar:
        model.train()
        out = model(batch.input_ids, batch.decoder_input_ids, images=batch.images, patch_masks=batch.patch_masks)
        loss = label_smoothed_cross_entropy(out.logits, batch.target, 0.1, tokenizer.pad_id, allowed=batch.allowed)
        opt.zero_grad(set_to_none=True)
        loss.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = float(loss.nll.detach())
        if step % eval_every == 0 or step == max_steps:
            accuracy, _ = answer_accuracy(model, tokenizer, batch, answers, max_length=max_answer)
            history.append({"step": step, "nll": loss_value, "accuracy": accuracy})
            bar.set_postfix(nll=f"{loss_value:.3f}", acc=f"{accuracy:.2f}")
            if accuracy == 1.0:
                break
    model.eval()
    return LearnCheckResult(step, accuracy, loss_value, time.perf_counter() - start, history)


def write_metrics(result: LearnCheckResult, path: str | Path) -> None:
    out = asdict(result)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")
