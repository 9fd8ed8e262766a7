"""Galen's own text tokenizer: a SentencePiece model, and training one on a corpus.

`SentencePieceText` is the text part of a GalenTokenizer trained for Galen (`galen tokenizer
train`); its ids equal the unified vocabulary's for 0..T-1. `train_sentencepiece` trains it
deterministically with normalization off, so biomedical text round-trips exactly (see its
docstring). Kept apart from the vocabulary layout (galen.model.vocabulary) and from the GPT-2 BPE
of imported checkpoints (galen.model.gpt2_bpe): each text tokenizer is one file.
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import ClassVar

import sentencepiece as spm

from galen.model.errors import GalenTokenizerError
from galen.model.text_tokenizer import (
    BOS_ID,
    EOS_ID,
    MISSING_HINT,
    NUM_SPECIALS,
    PAD_ID,
    TOKENIZER_JSON,
    UNK_ID,
    TextTokenizer,
    int_at_least,
)

SPM_FILE = "spm.model"


class SentencePieceText(TextTokenizer):
    """Galen's own text tokenizer: a SentencePiece model whose ids equal ours for 0..T-1.

    It is kept as the serialized proto (bytes), so saving and loading never touch temp files.
    """

    kind: ClassVar[str] = "sentencepiece"
    leading_space: ClassVar[bool] = False  # SentencePiece adds its own word-boundary marker

    def __init__(self, model_proto: bytes) -> None:
        if not isinstance(model_proto, (bytes, bytearray)) or not model_proto:
            raise GalenTokenizerError(
                "SentencePieceText needs the non-empty bytes of a SentencePiece model "
                f"(got {type(model_proto).__name__}); read them from spm.model or train one "
                "with train_sentencepiece()"
            )
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(bytes(model_proto))
        except (RuntimeError, OSError) as exc:
            raise GalenTokenizerError(
                f"these bytes are not a SentencePiece model ({exc}); the file is corrupt or "
                f"not a tokenizer: {MISSING_HINT}"
            ) from exc
        got = (processor.bos_id(), processor.pad_id(), processor.eos_id(), processor.unk_id())
        if got != (BOS_ID, PAD_ID, EOS_ID, UNK_ID):
            raise GalenTokenizerError(
                f"SentencePiece model has special ids bos/pad/eos/unk = {got}, Galen needs "
                f"{(BOS_ID, PAD_ID, EOS_ID, UNK_ID)}; retrain it with train_sentencepiece()"
            )
        if processor.get_piece_size() <= NUM_SPECIALS:
            raise GalenTokenizerError(
                "SentencePiece model has no text pieces; retrain it on a real corpus"
            )
        self._proto = bytes(model_proto)
        self._sp = processor

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        """Number of ids the text part uses, the 4 specials included."""
        return self._sp.get_piece_size()

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model, exactly what `save` writes."""
        return self._proto

    def encode(self, text: str) -> list[int]:
        """Ids of `text` (no bos/eos); byte fallback means nothing is <unk>."""
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of text-range ids (4..vocab_size-1, and 3 rendered by SentencePiece)."""
        return self._sp.decode([int(i) for i in ids])

    def save(self, directory: Path) -> list[str]:
        """Write `spm.model` into `directory`; returns the file names written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SPM_FILE).write_bytes(self._proto)
        return [SPM_FILE]

    @classmethod
    def load(cls, directory: Path, files: Sequence[str] = (SPM_FILE,)) -> SentencePieceText:
        """Read the model saved by `save` (the first of `files`, normally `spm.model`)."""
        if not files:
            raise GalenTokenizerError(
                f"no SentencePiece file is listed for {directory}; expected [{SPM_FILE!r}] "
                f"in {TOKENIZER_JSON}: {MISSING_HINT}"
            )
        path = Path(directory) / files[0]
        if not path.is_file():
            raise GalenTokenizerError(f"tokenizer file {path} is missing: {MISSING_HINT}")
        return cls(path.read_bytes())

    def __repr__(self) -> str:
        return f"SentencePieceText(vocab_size={self.vocab_size})"


def _spm_error(exc: RuntimeError, vocab_size: int) -> GalenTokenizerError:
    """Turn SentencePiece's terse trainer errors into ones that say what to change."""
    message = str(exc)
    high = re.search(r"Vocabulary size too high \((\d+)\).*?<= (\d+)", message)
    if high:
        return GalenTokenizerError(
            f"the corpus is too small for vocab_size={vocab_size}: it supports at most "
            f"{high.group(2)} pieces; pass vocab_size<={high.group(2)} or train on more text"
        )
    low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if low:
        return GalenTokenizerError(
            f"vocab_size={vocab_size} cannot hold the {low.group(2)} pieces that must exist "
            "(4 specials, 256 byte-fallback bytes and every character of the corpus); pass "
            f"vocab_size>={low.group(2)} or lower character_coverage"
        )
    return GalenTokenizerError(f"SentencePiece training failed: {message}")


def _corpus_lines(
    texts: Iterable[str] | None, corpus_files: Sequence[str | Path] | None
) -> Iterator[str]:
    """One sentence per line from texts or files, blank lines dropped, read lazily."""
    if isinstance(texts, (str, bytes)):
        raise GalenTokenizerError(
            "texts must be an iterable of sentences, not one string; wrap it as [text]"
        )
    if corpus_files is not None and isinstance(corpus_files, (str, Path)):
        corpus_files = [corpus_files]
    if texts is None and not corpus_files:
        raise GalenTokenizerError("the corpus is empty: pass texts=[...] or corpus_files=[...]")
    if texts is not None and corpus_files:
        raise GalenTokenizerError("pass either texts or corpus_files, not both")
    for path in corpus_files or ():
        if not Path(path).is_file():
            raise GalenTokenizerError(f"corpus file {path} does not exist; check the path")

    def from_texts() -> Iterator[str]:
        for i, text in enumerate(texts or ()):
            if not isinstance(text, str):
                raise GalenTokenizerError(
                    f"corpus item {i} is {type(text).__name__}, not str; decode it to text first"
                )
            yield from text.splitlines()

    def from_files() -> Iterator[str]:
        for path in corpus_files or ():
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    yield line.rstrip("\r\n")

    source = from_texts() if texts is not None else from_files()
    return (line for line in source if line.strip())


def _reservoir_sample(lines: Iterable[str], size: int, seed: int) -> list[str]:
    """A uniform sample of `size` lines in one pass, the same for the same seed."""
    rng = random.Random(seed)
    sample: list[str] = []
    for i, line in enumerate(lines):
        if i < size:
            sample.append(line)
        else:
            j = rng.randrange(i + 1)
            if j < size:
                sample[j] = line
    return sample


def train_sentencepiece(
    texts: Iterable[str] | None,
    out_dir: str | Path,
    *,
    corpus_files: Sequence[str | Path] | None = None,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    seed: int = 0,
    num_threads: int = 8,
    input_sentence_size: int = 0,
    verbose: bool = False,
) -> SentencePieceText:
    """Train Galen's text tokenizer and write `out_dir/spm.model`.

    Normalization is "identity" with whitespace kept as written: biomedical text depends on
    case ("CT", "T2", "pH") and on symbols NFKC would rewrite (micro sign "µ" -> Greek "μ",
    "m²" -> "m2", full-width digits), so any NFKC rule would make decode(encode(x)) != x.
    byte_fallback makes every character encodable (never <unk>). Codes and bins are not
    user_defined_symbols: they live outside the SentencePiece model.

    Deterministic: the same corpus, arguments, seed and num_threads give the same model bytes
    in any process (num_threads is fixed rather than taken from the machine for that reason).
    `input_sentence_size` > 0 trains on a sample of that many lines, drawn here with
    `random.Random(seed)`, because SentencePiece's own sampling differs from run to run.
    """
    int_at_least(vocab_size, "vocab_size", NUM_SPECIALS + 1)
    if model_type not in ("unigram", "bpe", "char", "word"):
        raise GalenTokenizerError(
            f"model_type {model_type!r} is not a SentencePiece model type; use unigram, bpe, "
            "char or word"
        )
    if not isinstance(character_coverage, (int, float)) or not 0.0 < character_coverage <= 1.0:
        raise GalenTokenizerError(
            f"character_coverage must be in (0, 1], got {character_coverage!r}"
        )
    if not isinstance(num_threads, int) or num_threads < 1:
        raise GalenTokenizerError(f"num_threads must be an int >= 1, got {num_threads!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise GalenTokenizerError(f"seed must be an int, got {seed!r}")
    if not isinstance(input_sentence_size, int) or input_sentence_size < 0:
        raise GalenTokenizerError(
            f"input_sentence_size must be an int >= 0 (0 = use every line), got "
            f"{input_sentence_size!r}"
        )

    lines = _corpus_lines(texts, corpus_files)
    first = next(lines, None)
    if first is None:
        raise GalenTokenizerError(
            "the corpus is empty (no non-blank lines); give it the text the model will read"
        )

    sentences: Iterator[str] = chain([first], lines)
    if input_sentence_size:
        sentences = iter(_reservoir_sample(sentences, input_sentence_size, seed))
    failures: list[GalenTokenizerError] = []

    def guarded(items: Iterator[str]) -> Iterator[str]:
        # SentencePiece turns exceptions raised by the iterator into a RuntimeError; keep ours.
        try:
            yield from items
        except GalenTokenizerError as exc:
            failures.append(exc)
            raise

    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=guarded(sentences),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=float(character_coverage),
            bos_id=BOS_ID,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            input_sentence_size=0,
            num_threads=num_threads,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as exc:
        if failures:
            raise failures[0] from None
        raise _spm_error(exc, vocab_size) from exc

    text = SentencePieceText(writer.getvalue())
    text.save(Path(out_dir))
    return text
