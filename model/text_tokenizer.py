"""What every text part of Galen's vocabulary agrees on: special ids, the protocol, shared checks.

`GalenTokenizer` (galen.model.vocabulary) lays text pieces, `<mask>`, image codes and location bins
out in one id space; its text part is pluggable: SentencePiece for Galen's own vocabularies
(galen.model.sentencepiece_text), GPT-2 byte-level BPE for imported checkpoints (galen.model.gpt2_bpe).
This module holds the pieces all of them need: the four fixed special ids, the default numbers of
codes and bins, how a special token is written in text, the `TextTokenizer` protocol, and the
argument checks they share. It imports no tokenizer, so the imports run one way:
text_tokenizer <- sentencepiece_text, gpt2_bpe <- vocabulary.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from galen.model.errors import GalenTokenizerError

BOS_ID = 0
PAD_ID = 1
EOS_ID = 2
UNK_ID = 3
NUM_SPECIALS = 4
DEFAULT_NUM_CODES = 8192
DEFAULT_NUM_BINS = 1000
TOKENIZER_JSON = "tokenizer.json"

MISSING_HINT = "run `galen tokenizer train` or copy the tokenizer files beside the model"
# Only these are parsed out of user text; <s>, </s>, <pad>, <unk> stay plain text so a prompt
# can never inject control tokens.
SPECIAL_RE = re.compile(r"<(?:(mask)|code_([0-9]+)|bin_([0-9]+))>")


@runtime_checkable
class TextTokenizer(Protocol):
    """The text part of the vocabulary; implementations register in vocabulary.TEXT_TOKENIZER_KINDS.

    Contract: ids 0..3 are <s> <pad> </s> <unk>; `encode` returns ids in 4..vocab_size-1 (or 3
    for unknown text) without bos/eos; `vocab_size` counts the 4 specials.
    """

    kind: ClassVar[str]  # registry key (TEXT_TOKENIZER_KINDS), read from the class
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: Path) -> list[str]: ...

    @classmethod
    def load(cls, directory: Path, files: Sequence[str]) -> TextTokenizer: ...


def as_int_list(ids: Any, what: str) -> list[int]:
    """ids from a list, tuple or 1-D tensor/array as plain ints, with a clear error otherwise."""
    if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):
        ids = ids.tolist()
    if isinstance(ids, (int, str, bytes)) or not isinstance(ids, Iterable):
        raise GalenTokenizerError(f"{what} must be a sequence of ints, got {type(ids).__name__}")
    out = []
    for i in ids:
        if isinstance(i, bool):
            raise GalenTokenizerError(f"{what} holds a bool ({i!r}); pass integer ids")
        try:
            out.append(operator.index(i))
        except TypeError:
            raise GalenTokenizerError(
                f"{what} must hold ints only, found {type(i).__name__} {i!r}"
                + ("; decode one sequence at a time" if isinstance(i, (list, tuple)) else "")
            ) from None
    return out


def int_at_least(value: Any, what: str, minimum: int) -> int:
    """An int of at least `minimum` (bools refused), or an error naming the argument."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise GalenTokenizerError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value
