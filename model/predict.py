"""The one inference API of the generalist model: evaluation, the MLflow pyfunc and Ray Serve call it.

`GalenPredictor.load(folder)` reads a Galen model folder (weights, config and tokenizer written
together by `save_pretrained`) and answers batches per task:

    vqa(images, questions, candidates=None)   closed set (trie) when candidates are given, else free text
    caption(images)                           beam search with no-repeat-ngram blocking
    classify(images, labels)                  closed set (trie) + per-label probabilities (for AUC)
    ground(images, texts)                     exactly 4 location bins -> a box in the image's own pixels
    nli(premises, hypotheses)                 maybe / yes / no (+ probabilities)
    summarize(texts)                          beam search with length penalty

`predict(requests)` takes JSON-like dicts (images may be base64 strings), validates all of them
before any model work, groups them by task and decoding mode, and returns one dict per request.
Batching never changes an answer's inputs, so the same requests in the same order give the same
answers whichever caller sends them (evaluation and the registered model agree exactly).
Every bad input raises `GalenInputError` saying what is wrong.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from galen.model.decoding import CandidateTrie, GenerationConfig, TokenLattice, closed_set_answers, generate
from galen.model.errors import GalenError, GalenInputError
from galen.model.generalist import GalenModel
from galen.model.tasks import NLI_ANSWERS, build_prompt, closed_answers, vqa_prompt
from galen.model.vision import MAX_IMAGE_PIXELS, decode_base64_image, load_image, preprocess_images
from galen.model.vocabulary import GalenTokenizer

BOX_BINS = 4
_TRIE_CACHE_SIZE = 64

# task -> (required fields, optional fields) of a `predict` request (besides "task" itself)
REQUEST_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vqa": (("image", "question"), ("candidates",)),
    "caption": (("image",), ()),
    "classification": (("image", "labels"), ()),
    "grounding": (("image", "text"), ()),
    "nli": (("premise", "hypothesis"), ()),
    "summarization": (("text",), ()),
}


def _caption_generation() -> GenerationConfig:
    return GenerationConfig(beam_size=5, max_length=96, no_repeat_ngram_size=3)


def _summary_generation() -> GenerationConfig:
    return GenerationConfig(beam_size=5, max_length=128, length_penalty=0.7, no_repeat_ngram_size=3)


def _answer_generation() -> GenerationConfig:
    return GenerationConfig(beam_size=5, max_length=40)


@dataclass
class PredictConfig:
    """Decoding settings (reference defaults: beam 5, no-repeat-ngram 3 for text, lenpen 0.7 for summaries)."""

    closed_set_mode: str = field(default="trie", metadata={
        "help": "closed-set answers: trie = beam search constrained to the candidates, all = score every one",
        "choices": ("trie", "all")})
    closed_beam_size: int = 5
    grounding_beam_size: int = 5
    vqa: GenerationConfig = field(default_factory=_answer_generation)          # open questions
    caption: GenerationConfig = field(default_factory=_caption_generation)
    summarization: GenerationConfig = field(default_factory=_summary_generation)
    max_source_length: int = 256       # prompt tokens; longer prompts are cut (as in training)
    max_batch_size: int = field(default=16, metadata={"help": "at most this many requests per model call"})
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.closed_set_mode not in ("trie", "all"):
            raise GalenInputError(f"closed_set_mode must be 'trie' or 'all', got {self.closed_set_mode!r}")
        for name in ("closed_beam_size", "grounding_beam_size", "max_batch_size", "max_image_pixels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise GalenInputError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.max_source_length, int) or self.max_source_length < 8:
            raise GalenInputError(f"max_source_length must be an integer >= 8, got {self.max_source_length!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PredictConfig:
        """Inverse of `to_dict`; unknown keys are refused so a typo never silently keeps a default."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GalenInputError(f"unknown predict config keys {unknown}; known: {sorted(known)}")
        for name in ("vqa", "caption", "summarization"):
            if isinstance(data.get(name), Mapping):
                gen_known = {f.name for f in dataclasses.fields(GenerationConfig)}
                bad = sorted(set(data[name]) - gen_known)
                if bad:
                    raise GalenInputError(f"unknown generation keys {bad} in predict config {name!r}; "
                                          f"known: {sorted(gen_known)}")
                data[name] = GenerationConfig(**data[name])
        return cls(**data)


@dataclass
class Prediction:
    """One answer. `box` (grounding) is (x0, y0, x1, y1) in pixels of the image as sent; `scores`
    (classification, NLI) are probabilities over the candidate answers, summing to 1."""

    task: str
    answer: str
    box: tuple[float, float, float, float] | None = None
    scores: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "answer": self.answer}
        if self.box is not None:
            out["box"] = list(self.box)
        if self.scores is not None:
            out["scores"] = dict(self.scores)
        return out


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise GalenInputError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise GalenInputError(f"{what} is empty; give some text")
    return value


def _labels(value: Any, what: str) -> list[str]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise GalenInputError(f"{what} must be a list of strings, got {type(value).__name__}")
    if not all(isinstance(x, str) for x in value):
        raise GalenInputError(f"{what} must be a list of strings")
    return list(closed_answers("classification", value) or ())


def _per_sample(value: Any, n: int, what: str) -> list:
    """A label set shared by the whole batch (a list of strings), or one per sample (a list of lists/None)."""
    if value is None:
        return [None] * n
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and value and \
            all(isinstance(x, str) for x in value):
        return [value] * n
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) != n:
        raise GalenInputError(f"{what} must be one list of strings for the whole batch or one list per sample "
                              f"({n} samples)")
    return list(value)


def _same_length(what: str, *seqs: Sequence) -> int:
    lengths = {len(s) for s in seqs}
    if len(lengths) != 1:
        raise GalenInputError(f"{what}: the inputs have different lengths {[len(s) for s in seqs]}; give one of "
                              "each per sample")
    n = lengths.pop()
    if n == 0:
        raise GalenInputError(f"{what}: empty batch; give at least one sample")
    return n


class GalenPredictor:
    """A loaded model + tokenizer answering batched requests; stateless between calls."""

    def __init__(self, model: GalenModel, tokenizer: GalenTokenizer, config: PredictConfig | None = None,
                 device: str | torch.device = "cpu"):
        if model.cfg.vocab_size != len(tokenizer):
            raise GalenInputError(f"the tokenizer has {len(tokenizer)} ids but the model's vocabulary is "
                                  f"{model.cfg.vocab_size}; load the tokenizer saved with the model")
        self.config = config or PredictConfig()
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.image_size = model.cfg.image_size  # the model decides its input size (its config.json)
        self._tries: dict[tuple[str, ...], CandidateTrie] = {}
        bins = range(tokenizer.bin_offset, tokenizer.bin_offset + tokenizer.num_bins)
        self._box_lattice = TokenLattice([bins] * BOX_BINS, tokenizer.eos_id)

    @classmethod
    def load(cls, folder: str | Path, config: PredictConfig | None = None,
             device: str | torch.device = "cpu") -> GalenPredictor:
        """Model and tokenizer from one folder written by `save_pretrained(folder, tokenizer)`."""
        model = GalenModel.from_pretrained(folder, map_location=device)
        tokenizer = GalenTokenizer.load(folder)
        return cls(model, tokenizer, config, device)

    # -- inputs ----------------------------------------------------------------------------------------

    def load_image(self, image: Any) -> Image.Image:
        """PIL image, uint8 array, encoded bytes (PNG/JPEG/DICOM) or a base64 string -> PIL image."""
        if isinstance(image, str):
            image = decode_base64_image(image, what="the image string")
        return load_image(image, self.config.max_image_pixels)

    def _images(self, images: Sequence[Any]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        pil = []
        for i, img in enumerate(images):
            try:
                pil.append(self.load_image(img))
            except GalenInputError as e:
                raise GalenInputError(f"image {i}: {e}") from e
        sizes = [im.size for im in pil]
        return preprocess_images(pil, self.image_size).to(self.device), sizes

    def _ids(self, prompts: Sequence[str]) -> torch.Tensor:
        limit = min(self.config.max_source_length, self.model.cfg.max_positions)
        rows = [self.tokenizer.encode_prompt(p, max_length=limit, truncate=True) for p in prompts]
        return self.tokenizer.pad_batch(rows)[0].to(self.device)

    def _trie(self, answers: Sequence[str]) -> CandidateTrie:
        key = tuple(answers)
        trie = self._tries.get(key)
        if trie is None:
            try:
                trie = CandidateTrie.from_texts(self.tokenizer, key)
            except GalenError as e:
                raise GalenInputError(f"the candidate answers cannot be told apart by the tokenizer ({e}); "
                                      "make them distinct") from e
            if len(self._tries) >= _TRIE_CACHE_SIZE:
                self._tries.pop(next(iter(self._tries)))
            self._tries[key] = trie
        return trie

    def _chunks(self, n: int) -> list[range]:
        size = self.config.max_batch_size
        return [range(i, min(i + size, n)) for i in range(0, n, size)]

    # -- decoding --------------------------------------------------------------------------------------

    def _free(self, prompts: Sequence[str], images: Sequence[Any] | None, gen: GenerationConfig) -> list[str]:
        out: list[str] = []
        for chunk in self._chunks(len(prompts)):
            pixels = self._images([images[i] for i in chunk])[0] if images is not None else None
            hyps = generate(self.model, self._ids([prompts[i] for i in chunk]), pixels, config=gen)
            out += [self.tokenizer.decode(h.tokens).strip() for h in hyps]
        return out

    def _closed(self, prompts: Sequence[str], images: Sequence[Any] | None, answer_sets: Sequence[Sequence[str]],
                with_scores: bool) -> list[tuple[str, dict[str, float] | None]]:
        out: list[tuple[str, dict[str, float] | None]] = []
        for chunk in self._chunks(len(prompts)):
            pixels = self._images([images[i] for i in chunk])[0] if images is not None else None
            ids = self._ids([prompts[i] for i in chunk])
            sets = [list(answer_sets[i]) for i in chunk]
            tries = [self._trie(s) for s in sets]
            got = closed_set_answers(self.model, ids, tries, pixels, mode=self.config.closed_set_mode,
                                     beam_size=self.config.closed_beam_size, with_scores=with_scores)
            for k, (answers, pick) in enumerate(zip(sets, got.picks)):
                probs = None if got.scores is None else \
                    dict(zip(answers, torch.softmax(got.scores[k].double(), 0).tolist()))
                out.append((answers[pick], probs))
        return out

    # -- tasks -----------------------------------------------------------------------------------------

    def vqa(self, images: Sequence[Any], questions: Sequence[str],
            candidates: Sequence[str] | Sequence[Sequence[str] | None] | None = None) -> list[Prediction]:
        """Answers; with candidates (one list for all, or one list or None per question) the answer is
        one of them (trie-constrained), otherwise free text."""
        n = _same_length("vqa", images, questions)
        prompts = [vqa_prompt(_text(q, f"question {i}")) for i, q in enumerate(questions)]
        sets = [None if c is None else _labels(c, f"candidates of question {i}")
                for i, c in enumerate(_per_sample(candidates, n, "candidates"))]
        answers: list[str] = [""] * n
        closed = [i for i in range(n) if sets[i] is not None]
        open_ = [i for i in range(n) if sets[i] is None]
        if closed:
            got = self._closed([prompts[i] for i in closed], [images[i] for i in closed],
                               [sets[i] for i in closed], with_scores=False)  # type: ignore[misc]
            for i, (answer, _) in zip(closed, got):
                answers[i] = answer
        if open_:
            for i, answer in zip(open_, self._free([prompts[i] for i in open_], [images[i] for i in open_],
                                                   self.config.vqa)):
                answers[i] = answer
        return [Prediction("vqa", a) for a in answers]

    def caption(self, images: Sequence[Any]) -> list[Prediction]:
        _same_length("caption", images)
        prompt = build_prompt("caption")
        return [Prediction("caption", c) for c in self._free([prompt] * len(images), images, self.config.caption)]

    def classify(self, images: Sequence[Any], labels: Sequence[str] | Sequence[Sequence[str]]) -> list[Prediction]:
        """The class name per image (one label list for all, or one per image) with per-label probabilities."""
        n = _same_length("classify", images)
        sets = [_labels(s, f"labels of image {i}") for i, s in enumerate(_per_sample(labels, n, "labels"))]
        prompt = build_prompt("classification")
        got = self._closed([prompt] * n, images, sets, with_scores=True)
        return [Prediction("classification", a, scores=s) for a, s in got]

    def ground(self, images: Sequence[Any], texts: Sequence[str]) -> list[Prediction]:
        """The region each text describes, as (x0, y0, x1, y1) in pixels of the image as sent."""
        _same_length("ground", images, texts)
        prompts = [build_prompt("grounding", text=_text(t, f"text {i}")) for i, t in enumerate(texts)]
        gen = GenerationConfig(beam_size=self.config.grounding_beam_size, max_length=BOX_BINS, min_length=BOX_BINS,
                               length_penalty=0.0)
        out: list[Prediction] = []
        for chunk in self._chunks(len(prompts)):
            pixels, sizes = self._images([images[i] for i in chunk])
            hyps = generate(self.model, self._ids([prompts[i] for i in chunk]), pixels, config=gen,
                            constraints=[self._box_lattice] * len(chunk))
            for h, (w, hgt) in zip(hyps, sizes):
                x0, y0, x1, y1 = self.tokenizer.tokens_to_box(h.tokens[:BOX_BINS], w, hgt)
                box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
                out.append(Prediction("grounding", self.tokenizer.decode(h.tokens), box=box))
        return out

    def nli(self, premises: Sequence[str], hypotheses: Sequence[str]) -> list[Prediction]:
        """maybe / yes / no (entailment: yes, contradiction: no, neutral: maybe) with probabilities."""
        n = _same_length("nli", premises, hypotheses)
        prompts = [build_prompt("nli", premise=_text(p, f"premise {i}"), hypothesis=_text(h, f"hypothesis {i}"))
                   for i, (p, h) in enumerate(zip(premises, hypotheses))]
        got = self._closed(prompts, None, [NLI_ANSWERS] * n, with_scores=True)
        return [Prediction("nli", a, scores=s) for a, s in got]

    def summarize(self, texts: Sequence[str]) -> list[Prediction]:
        _same_length("summarize", texts)
        prompts = [build_prompt("summarization", text=_text(t, f"text {i}")) for i, t in enumerate(texts)]
        return [Prediction("summarization", s) for s in self._free(prompts, None, self.config.summarization)]

    # -- generic requests ------------------------------------------------------------------------------

    def _check_request(self, i: int, request: Any) -> dict[str, Any]:
        if not isinstance(request, Mapping):
            raise GalenInputError(f"request {i} must be an object with a 'task' field, got {type(request).__name__}")
        task = request.get("task")
        if task not in REQUEST_FIELDS:
            raise GalenInputError(f"request {i}: unknown task {task!r}; tasks: {', '.join(REQUEST_FIELDS)}")
        required, optional = REQUEST_FIELDS[task]
        given = {k: v for k, v in request.items() if v is not None}
        missing = [k for k in required if k not in given]
        unknown = sorted(set(given) - {"task", *required, *optional})
        if missing:
            raise GalenInputError(f"request {i} ({task}) is missing {', '.join(missing)}")
        if unknown:
            raise GalenInputError(f"request {i} ({task}) has unknown fields {unknown}; {task} takes "
                                  f"{', '.join(required + optional)}")
        try:  # check everything now, so a bad request fails the call before any model work
            if "image" in given:
                given["image"] = self.load_image(given["image"])
            if task == "vqa":
                vqa_prompt(_text(given["question"], "question"))
                if "candidates" in given:
                    given["candidates"] = _labels(given["candidates"], "candidates")
            elif task == "classification":
                given["labels"] = _labels(given["labels"], "labels")
            elif task in ("grounding", "summarization"):
                _text(given["text"], "text")
            elif task == "nli":
                _text(given["premise"], "premise")
                _text(given["hypothesis"], "hypothesis")
        except GalenInputError as e:
            raise GalenInputError(f"request {i} ({task}): {e}") from e
        return given

    def predict(self, requests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Answer a list of requests ({"task": ..., fields}); one result dict per request, in order.

        Requests are grouped by task (VQA also by closed/open) and cut into batches of
        `max_batch_size` in their original order."""
        if isinstance(requests, Mapping) or not isinstance(requests, Sequence) or not requests:
            raise GalenInputError("predict takes a non-empty list of requests ({'task': ..., ...})")
        checked = [self._check_request(i, r) for i, r in enumerate(requests)]
        groups: dict[tuple[str, bool], list[int]] = {}
        for i, r in enumerate(checked):
            groups.setdefault((r["task"], "candidates" in r), []).append(i)
        out: list[dict[str, Any] | None] = [None] * len(checked)
        runners: dict[str, Callable[[list[dict[str, Any]]], list[Prediction]]] = {
            "vqa": lambda rs: self.vqa([r["image"] for r in rs], [r["question"] for r in rs],
                                       [r.get("candidates") for r in rs]),
            "caption": lambda rs: self.caption([r["image"] for r in rs]),
            "classification": lambda rs: self.classify([r["image"] for r in rs], [r["labels"] for r in rs]),
            "grounding": lambda rs: self.ground([r["image"] for r in rs], [r["text"] for r in rs]),
            "nli": lambda rs: self.nli([r["premise"] for r in rs], [r["hypothesis"] for r in rs]),
            "summarization": lambda rs: self.summarize([r["text"] for r in rs]),
        }
        for (task, _), index in groups.items():
            for i, pred in zip(index, runners[task]([checked[i] for i in index])):
                out[i] = pred.to_dict()
        return out  # type: ignore[return-value]
