"""The tasks of the generalist model: instruction prompts and closed answer sets, in one place.

Training, evaluation and serving all build prompts here, so a prompt string exists exactly once.
Prompts are the reference BiomedGPT/OFA instructions (their leading space matters for the GPT-2
BPE of imported checkpoints; SentencePiece treats it as the word boundary it is).
"""

from __future__ import annotations

from collections.abc import Sequence

from galen.model.errors import GalenInputError

PROMPTS: dict[str, str] = {
    "caption": " what does the image describe?",
    "classification": " what does the image describe?",
    "image_text_matching": ' does the image describe " {text} "?',
    "grounding": ' which region does the text " {text} " describe?',
    "grounded_caption": " what does the region describe? region: {region}",
    "text_infilling": ' what is the complete text of " {text} "?',
    "image_infilling": " what is the image in the middle part?",
    "detection": " what are the objects in the image?",
    "nli": ' can text1 " {premise} " imply text2 " {hypothesis} "?',
    "summarization": ' what is the summary of article " {text} "?',
}
TASKS: tuple[str, ...] = ("vqa", *PROMPTS)

# The task lists, once: what a dataset record can hold, which of those carry an image or boxes,
# and which the model is fine-tuned, evaluated and served on.
RECORD_TASKS: tuple[str, ...] = ("vqa", "caption", "classification", "nli", "summarization", "grounding",
                                 "detection", "text_infilling")
IMAGE_TASKS: tuple[str, ...] = ("vqa", "caption", "classification", "grounding", "detection")
BOX_TASKS: tuple[str, ...] = ("grounding", "detection")  # [x0, y0, x1, y1] pixel boxes are the answer
EVALUATED_TASKS: tuple[str, ...] = ("vqa", "caption", "classification", "nli", "summarization", "grounding")

# Closed answer sets fixed by the task itself (others come from the dataset).
YES_NO: tuple[str, ...] = ("yes", "no")
NLI_ANSWERS: tuple[str, ...] = ("maybe", "yes", "no")
NLI_LABEL_TO_ANSWER: dict[str, str] = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}


def vqa_prompt(question: str) -> str:
    """Reference VQA normalisation: lower-cased, one trailing question mark, leading space."""
    q = " ".join(str(question).split()).lower().rstrip("?").strip()
    if not q:
        raise GalenInputError("the question is empty; ask something about the image")
    return f" {q}?"


def build_prompt(task: str, **fields: str) -> str:
    """The instruction for `task`, with its fields filled in (e.g. build_prompt('nli', premise=.., hypothesis=..))."""
    if task == "vqa":
        return vqa_prompt(fields.get("question", ""))
    if task not in PROMPTS:
        raise GalenInputError(f"unknown task {task!r}; Galen's tasks are: {', '.join(TASKS)}")
    template = PROMPTS[task]
    names = [part.split("}")[0] for part in template.split("{")[1:]]
    missing = [n for n in names if not str(fields.get(n, "")).strip()]
    if missing:
        raise GalenInputError(f"task {task!r} needs non-empty {', '.join(missing)}")
    clean = {n: " ".join(str(fields[n]).split()) for n in names}
    return template.format(**clean)


def closed_answers(task: str, labels: Sequence[str] | None = None) -> tuple[str, ...] | None:
    """The fixed candidate set of a task, or the given labels; None for open-ended tasks."""
    if task == "nli":
        return NLI_ANSWERS
    if task == "image_text_matching":
        return YES_NO
    if labels is not None:
        out = tuple(" ".join(str(x).split()) for x in labels)
        if not out or any(not x for x in out):
            raise GalenInputError("the label set is empty or has an empty label; give non-empty class names")
        if len(set(out)) != len(out):
            dup = sorted({x for x in out if out.count(x) > 1})
            raise GalenInputError(f"duplicate labels {dup}; each candidate must be unique")
        return out
    return None
