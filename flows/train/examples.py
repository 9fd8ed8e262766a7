"""Records -> training examples -> padded batches, for fine-tuning and for OFA-style pretraining.

Every prompt comes from `model.tasks` (the one place prompts live) and every id from
`GalenTokenizer`, so training sees exactly what evaluation and serving build. Design points:

* Over-long prompts/targets are truncated by the tokenizer (`truncate=True`, eos kept) and flagged
  in `meta["truncated"]`: a long report must never crash a training run hours in.
* Pretraining objectives return None for a record they cannot serve (no image, no boxes, no
  codes), so a mixture can simply try another record; malformed fine-tuning records raise
  `GalenInputError` (the validation stage should have quarantined them).
* Randomness (span masking) only comes from the `random.Random` passed in: same seed, same data.
* Closed answer sets travel as tokenized candidates; `collate` turns them into the per-position
  `allowed` mask that `label_smoothed_cross_entropy` uses for trie-aware smoothing.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image

from galen.flows.ingest.schema import Record, image_sha1
from galen.model.decoding import CandidateTrie
from galen.model.errors import GalenInputError
from galen.model.image_code_files import PrecomputedCodes
from galen.model.tasks import (
    NLI_ANSWERS,
    NLI_LABEL_TO_ANSWER,
    RECORD_TASKS,
    YES_NO,
    build_prompt,
    closed_answers,
    vqa_prompt,
)
from galen.model.vision import preprocess_images
from galen.model.vocabulary import GalenTokenizer

DEFAULT_MAX_SOURCE = 256
DEFAULT_MAX_TARGET = 128
CODE_IMAGE_SIZE = 128          # side of the masked middle region (OFA: 128 of a 256 image)
MASK_RATIO = 0.3               # text infilling: fraction of words masked (BART/OFA)
POISSON_LAMBDA = 3.0           # text infilling: span lengths ~ Poisson(3)
FINETUNE_TASKS = RECORD_TASKS  # a record of any task makes a fine-tuning example

ImageCodes = Mapping[str, Sequence[int]] | PrecomputedCodes


@dataclass
class Example:
    """One training sample in ids; `target` ends with eos, the decoder input is built in `collate`."""

    source: list[int]
    target: list[int]
    image: torch.Tensor | None
    code_target: bool
    task: str
    candidates: list[list[int]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    """Padded tensors ready for `GalenModel.forward` and `label_smoothed_cross_entropy`."""

    input_ids: torch.Tensor
    images: torch.Tensor | None
    patch_masks: torch.Tensor | None
    decoder_input_ids: torch.Tensor
    target: torch.Tensor
    code_masks: torch.Tensor
    allowed: torch.Tensor | None
    tasks: list[str]

    def num_target_tokens(self, pad_id: int) -> int:
        """Non-pad target tokens: the loss normaliser across data-parallel workers."""
        return int(self.target.ne(pad_id).sum())

    def to(self, device: torch.device | str) -> Batch:
        """A copy on `device` (non_blocking so pinned host memory overlaps the copy)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return replace(self, input_ids=move(self.input_ids), images=move(self.images),
                       patch_masks=move(self.patch_masks), decoder_input_ids=move(self.decoder_input_ids),
                       target=move(self.target), code_masks=move(self.code_masks), allowed=move(self.allowed))


# ----------------------------------------------------------------------------- helpers


def decode_image(data: bytes, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(normalised (3, S, S) tensor, original (width, height)); the size is what boxes refer to."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            size = img.size
            return preprocess_images([img], image_size)[0], size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise GalenInputError(f"image bytes could not be decoded ({type(exc).__name__}: {exc})") from exc


def _record_meta(record: Record | None) -> dict[str, Any]:
    if record is None:
        return {}
    return {"dataset": record.dataset, "source_id": record.source_id}


def _tokenize_candidates(tokenizer: GalenTokenizer, answers: Sequence[str], max_target: int) -> list[list[int]]:
    """Candidates as target ids, deduplicated after truncation (a trie refuses duplicates)."""
    seen: set[tuple[int, ...]] = set()
    out: list[list[int]] = []
    for a in answers:
        ids = tokenizer.encode_target(a, max_length=max_target, truncate=True)
        if tuple(ids) not in seen:
            seen.add(tuple(ids))
            out.append(ids)
    return out


def _build(tokenizer: GalenTokenizer, task: str, prompt: str, target: str | list[int], image: torch.Tensor | None,
           max_source: int, max_target: int, *, answers: Sequence[str] | None = None, code_target: bool = False,
           meta: dict[str, Any] | None = None) -> Example:
    """Tokenize with explicit truncation; drop a closed set that does not contain the target."""
    meta = dict(meta or {})
    source = tokenizer.encode_prompt(prompt)
    truncated = len(source) > max_source
    if truncated:
        source = tokenizer.encode_prompt(prompt, max_length=max_source, truncate=True)
    if isinstance(target, str):
        full = tokenizer.encode_target(target)
        truncated = truncated or len(full) > max_target
        tgt = full if len(full) <= max_target else tokenizer.encode_target(target, max_length=max_target, truncate=True)
    else:  # pre-built ids (image codes): never truncated, the decoder must predict all of them
        tgt = list(target)
    candidates = None
    if answers is not None:
        candidates = _tokenize_candidates(tokenizer, answers, max_target)
        if tgt not in candidates:  # smoothing over a set without the answer would give an infinite loss
            meta["target_outside_candidates"] = True
            candidates = None
    meta["truncated"] = truncated
    return Example(source, tgt, image, code_target, task, candidates, meta)


def _text(value: str | None) -> str:
    return " ".join(str(value or "").split())


def _lookup_codes(image_codes: ImageCodes | None, sha: str | None) -> list[int] | None:
    if image_codes is None or sha is None:
        return None
    if isinstance(image_codes, PrecomputedCodes):
        return image_codes.encode_by_key(sha).flatten().tolist() if sha in image_codes else None
    codes = image_codes.get(sha)
    return None if codes is None else [int(c) for c in codes]


# ----------------------------------------------------------------------------- fine-tuning


def make_example(record: Record, tokenizer: GalenTokenizer, image_size: int, *, rng: random.Random | None = None,
                 image_codes: ImageCodes | None = None, candidates: Sequence[str] | None = None,
                 max_source: int = DEFAULT_MAX_SOURCE, max_target: int = DEFAULT_MAX_TARGET) -> Example:
    """The example of a record for its own task (vqa, caption, classification, nli, summarization,
    grounding, detection, text_infilling); `candidates` overrides the record's closed answer set
    (e.g. a VQA answer list). `rng` is needed only for text_infilling records; `image_codes` is
    accepted so one call signature serves every loader (image infilling has its own function)."""
    del image_codes
    task = record.task
    meta = _record_meta(record)
    if task == "text_infilling":
        if rng is None:
            raise GalenInputError("text_infilling records need a seeded random.Random (rng=...) for span masking")
        ex = text_infilling_example(record.text or record.target, tokenizer, rng, max_source=max_source,
                                    max_target=max_target, meta=meta)
        if ex is None:
            raise GalenInputError(f"record {record.source_id}: text infilling needs at least two words")
        return ex
    if task in ("grounding", "detection"):
        fn = grounding_example if task == "grounding" else detection_example
        ex = fn(record, tokenizer, image_size, max_source=max_source, max_target=max_target)
        if ex is None:
            raise GalenInputError(f"record {record.source_id}: {task} needs an image, boxes and a phrase/labels")
        return ex
    if task not in FINETUNE_TASKS:
        raise GalenInputError(f"record {record.source_id}: task {task!r} is not a fine-tuning task "
                              f"({', '.join(FINETUNE_TASKS)}); use the pretraining objective functions")
    target = _text(record.target)
    if not target:
        raise GalenInputError(f"record {record.source_id}: empty target; validation should have quarantined it")
    answers = candidates if candidates is not None else record.candidates
    if task in ("nli", "summarization"):  # text-only
        if task == "nli":
            target = NLI_LABEL_TO_ANSWER.get(target.lower(), target.lower())
            if target not in NLI_ANSWERS:
                raise GalenInputError(f"record {record.source_id}: NLI target {record.target!r} is not one of "
                                      f"{NLI_ANSWERS} or {sorted(NLI_LABEL_TO_ANSWER)}")
            prompt = build_prompt("nli", premise=record.premise or "", hypothesis=record.hypothesis or "")
            answers = closed_answers("nli")
        else:
            prompt = build_prompt("summarization", text=record.text or "")
            answers = None
        return _build(tokenizer, task, prompt, target, None, max_source, max_target, answers=answers, meta=meta)
    if record.image is None:
        raise GalenInputError(f"record {record.source_id}: task {task!r} needs an image")
    image, _ = decode_image(record.image, image_size)
    if task == "vqa":
        prompt = vqa_prompt(record.question or "")
        # answers lower-cased like the questions and the answer sets (reference normalisation): SLAKE's
        # "Yes" and VQA-RAD's "yes" are one answer, and the target is in its closed set
        target = target.lower()
        meta["answer_type"] = record.answer_type
    else:  # caption and classification share the reference caption instruction
        prompt = build_prompt(task)
        if task == "caption":
            answers = None
    if answers is not None:
        answers = closed_answers(task, answers)
    return _build(tokenizer, task, prompt, target, image, max_source, max_target, answers=answers, meta=meta)


# ----------------------------------------------------------------------------- pretraining objectives


def caption_example(record: Record, tokenizer: GalenTokenizer, image_size: int, *,
                    max_source: int = DEFAULT_MAX_SOURCE, max_target: int = DEFAULT_MAX_TARGET) -> Example | None:
    """Captioning on any image record whose target is a caption/report."""
    if record.image is None or not _text(record.target) or record.task not in ("caption",):
        return None
    image, _ = decode_image(record.image, image_size)
    return _build(tokenizer, "caption", build_prompt("caption"), _text(record.target), image, max_source, max_target,
                  meta=_record_meta(record))


def itm_example(record: Record, tokenizer: GalenTokenizer, image_size: int, negative_caption: str | None = None, *,
                max_source: int = DEFAULT_MAX_SOURCE, max_target: int = DEFAULT_MAX_TARGET) -> Example | None:
    """Image-text matching: the record's own caption -> "yes"; `negative_caption` (from another record) -> "no"."""
    caption = _text(record.target)
    if record.image is None or not caption or record.task != "caption":
        return None
    text, answer = caption, YES_NO[0]
    if negative_caption is not None:
        text, answer = _text(negative_caption), YES_NO[1]
        if not text or text == caption:  # not a negative at all
            return None
    image, _ = decode_image(record.image, image_size)
    return _build(tokenizer, "image_text_matching", build_prompt("image_text_matching", text=text), answer, image,
                  max_source, max_target, answers=closed_answers("image_text_matching"), meta=_record_meta(record))


def mask_words(words: Sequence[str], rng: random.Random, ratio: float = MASK_RATIO,
               lam: float = POISSON_LAMBDA) -> list[bool]:
    """Which words to mask: whole-word spans with lengths ~ Poisson(lam), round(ratio * n) words in all.

    Zero-length draws become 1 (every span hides at least one word); a span is cut to what is left
    of the budget and to the unmasked run it starts in, and spans never touch (so each stays one
    `<mask>`). Poisson draws use Knuth's method on `rng` so the result depends on the seed only.
    """
    n = len(words)
    budget = min(n, max(1, round(ratio * n))) if n else 0
    masked = [False] * n
    while budget > 0:
        length = min(max(1, _poisson(rng, lam)), budget)
        # free starts: unmasked with unmasked neighbours (spans must not merge)
        starts = [i for i in range(n) if not masked[i] and (i == 0 or not masked[i - 1])
                  and (i + 1 >= n or not masked[i + 1])]
        if not starts:
            break
        start = rng.choice(starts)
        end = start + 1
        while end < n and end - start < length and not masked[end] and (end + 1 >= n or not masked[end + 1]):
            end += 1
        for i in range(start, end):
            masked[i] = True
        budget -= end - start
    return masked


def _poisson(rng: random.Random, lam: float) -> int:
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def text_infilling_example(text: str, tokenizer: GalenTokenizer, rng: random.Random, *,
                           max_source: int = DEFAULT_MAX_SOURCE, max_target: int = DEFAULT_MAX_TARGET,
                           meta: dict[str, Any] | None = None) -> Example | None:
    """Text-only infilling: ~30% of words in Poisson(3) whole-word spans, each span one `<mask>`; target = full text."""
    words = _text(text).split(" ")
    if len(words) < 2 or not words[0]:  # masking the only word leaves nothing to infer from
        return None
    masked = mask_words(words, rng)
    shown: list[str] = []
    for i, w in enumerate(words):
        if not masked[i]:
            shown.append(w)
        elif i == 0 or not masked[i - 1]:
            shown.append("<mask>")
    info = dict(meta or {})
    info["masked_fraction"] = sum(masked) / len(words)
    return _build(tokenizer, "text_infilling", build_prompt("text_infilling", text=" ".join(shown)), " ".join(words),
                  None, max_source, max_target, meta=info)


def blank_middle(image: torch.Tensor, code_image_size: int = CODE_IMAGE_SIZE) -> torch.Tensor:
    """Zero the middle code_image_size square of a (3, 2c, 2c) normalised image.

    The reference (OFA `process_pure_image`) writes 0 after normalisation, i.e. mid-grey pixels,
    over [c/2, 3c/2) on both axes: exactly the region `model.image_codebook.middle_crop` encodes.
    """
    out = image.clone()
    lo, hi = code_image_size // 2, code_image_size // 2 + code_image_size
    out[:, lo:hi, lo:hi] = 0.0
    return out


def image_infilling_example(record: Record, tokenizer: GalenTokenizer, image_codes: ImageCodes | None, *,
                            code_image_size: int = CODE_IMAGE_SIZE, max_source: int = DEFAULT_MAX_SOURCE,
                            key: str | None = None) -> Example | None:
    """Predict the codes of the blanked middle of a 2c x 2c image (OFA: 128 of 256, 16x16 = 256 codes).

    Codes are looked up by `key` (the shards stage records the original image's SHA-1, since it
    stores a resized copy) or else by the SHA-1 of the record's own image bytes.
    """
    if record.image is None:
        return None
    codes = _lookup_codes(image_codes, key or image_sha1(record.image))
    grid = code_image_size // 8
    if codes is None:
        return None
    if len(codes) != grid * grid:
        raise GalenInputError(f"record {record.source_id}: {len(codes)} image codes, expected {grid}x{grid}; "
                              "the codes were made for another crop size")
    image, _ = decode_image(record.image, 2 * code_image_size)
    target = tokenizer.code_tokens(codes) + [tokenizer.eos_id]
    return _build(tokenizer, "image_infilling", build_prompt("image_infilling"), target,
                  blank_middle(image, code_image_size), max_source, len(target), code_target=True,
                  meta=_record_meta(record))


def _boxes(record: Record) -> list[list[float]] | None:
    if record.image is None or not record.boxes:
        return None
    return [list(b) for b in record.boxes]


def grounding_example(record: Record, tokenizer: GalenTokenizer, image_size: int, *,
                      max_source: int = DEFAULT_MAX_SOURCE, max_target: int = DEFAULT_MAX_TARGET) -> Example | None:
    """Phrase -> the 4 location bins of box 0 (the phrase is `text`, else the first box label)."""
    boxes = _boxes(record)
    phrase = _text(record.text) or _text((record.box_labels or [""])[0])
    if boxes is None or not phrase:
        return None
    image, (w, h) = decode_image(record.image, image_size)  # type: ignore[arg-type]
    target = tokenizer.box_to_tokens(boxes[0], w, h) + [tokenizer.eos_id]
    return _build(tokenizer, "grounding", build_prompt("grounding", text=phrase), target, image, max_source,
                  max_target, meta=_record_meta(record))


def grounded_caption_example(record: Record, tokenizer: GalenTokenizer, image_size: int, *,
                             max_source: int = DEFAULT_MAX_SOURCE,
                             max_target: int = DEFAULT_MAX_TARGET) -> Example | None:
    """The region's bins in the prompt -> its phrase (grounding turned around)."""
    boxes = _boxes(record)
    phrase = _text(record.text) or _text((record.box_labels or [""])[0])
    if boxes is None or not phrase:
        return None
    image, (w, h) = decode_image(record.image, image_size)  # type: ignore[arg-type]
    region = tokenizer.box_to_text(boxes[0], w, h)
    return _build(tokenizer, "grounded_caption", build_prompt("grounded_caption", region=region), phrase, image,
                  max_source, max_target, meta=_record_meta(record))


def detection_example(record: Record, tokenizer: GalenTokenizer, image_size: int, *,
                      max_source: int = DEFAULT_MAX_SOURCE, max_target: int = DEFAULT_MAX_TARGET) -> Example | None:
    """Every object as `<bins> label`, sorted top-to-bottom then left-to-right (a deterministic order)."""
    boxes = _boxes(record)
    labels = record.box_labels or []
    if boxes is None or len(labels) != len(boxes) or not all(_text(x) for x in labels):
        return None
    image, (w, h) = decode_image(record.image, image_size)  # type: ignore[arg-type]
    objects = []
    for box, label in zip(boxes, labels):
        bins = tokenizer.box_to_tokens(box, w, h)
        objects.append(((bins[1], bins[0], bins[3], bins[2]), _text(label), tokenizer.box_to_text(box, w, h)))
    objects.sort(key=lambda o: (o[0], o[1]))
    target = " ".join(f"{text} {label}" for _, label, text in objects)
    return _build(tokenizer, "detection", build_prompt("detection"), target, image, max_source, max_target,
                  meta=_record_meta(record))


# ----------------------------------------------------------------------------- batching


def collate(examples: Sequence[Example], tokenizer: GalenTokenizer) -> Batch:
    """Right-padded batch; text-only rows get a zero image with patch_masks False (padding to the encoder).

    `allowed` (B, T, V) is built only when some row has a closed set: that row's positions allow the
    trie's children of the target prefix, every other row/position allows the whole vocabulary.
    """
    if not examples:
        raise GalenInputError("cannot collate an empty list of examples")
    input_ids, _ = tokenizer.pad_batch([e.source for e in examples])
    target, _ = tokenizer.pad_batch([e.target for e in examples])
    decoder_input_ids, _ = tokenizer.pad_batch([[tokenizer.bos_id] + e.target[:-1] for e in examples])
    shapes = {tuple(e.image.shape) for e in examples if e.image is not None}
    if len(shapes) > 1:
        raise GalenInputError(f"images of different sizes {sorted(shapes)} in one batch; batch per task "
                              "(the data stage resizes each task to one size)")
    images = patch_masks = None
    if shapes:
        shape = shapes.pop()
        images = torch.stack([e.image if e.image is not None else torch.zeros(shape) for e in examples])
        patch_masks = torch.tensor([e.image is not None for e in examples], dtype=torch.bool)
    code_masks = torch.tensor([e.code_target for e in examples], dtype=torch.bool)
    allowed = None
    if any(e.candidates for e in examples):
        allowed = torch.ones(len(examples), target.shape[1], tokenizer.vocab_size, dtype=torch.bool)
        for row, e in enumerate(examples):
            if not e.candidates:
                continue
            trie = CandidateTrie(e.candidates, tokenizer.eos_id)
            for t in range(len(e.target)):
                children = trie.allowed(e.target[:t])
                if not children:
                    raise GalenInputError(f"row {row}: the target leaves its candidate set at position {t}")
                allowed[row, t] = False
                allowed[row, t, children] = True
    return Batch(input_ids, images, patch_masks, decoder_input_ids, target, code_masks, allowed,
                 [e.task for e in examples])


# ----------------------------------------------------------------------------- task mixture


def task_mixture_sampler(weights: Mapping[str, float], counts: Mapping[str, int], seed: int) -> Iterator[str]:
    """Endless, seeded stream of task names drawn in proportion to `weights`, over tasks that have data."""
    for task, w in weights.items():
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise GalenInputError(f"mixture weight of {task!r} must be a finite number >= 0, got {w!r}")
    tasks = sorted(t for t, w in weights.items() if w > 0 and counts.get(t, 0) > 0)
    if not tasks:
        raise GalenInputError(f"no task has both a positive weight and data (weights {dict(weights)}, "
                              f"counts {dict(counts)}); check the mixture config against the shards")
    rng = random.Random(seed)
    cum: list[float] = []
    total = 0.0
    for t in tasks:
        total += float(weights[t])
        cum.append(total)

    def stream() -> Iterator[str]:
        while True:
            yield from rng.choices(tasks, cum_weights=cum, k=1024)

    return stream()
