"""The unified tokenizer: text pieces, `<mask>`, image codes and location bins in one id space.

Id layout (OFA style; the network's embedding table is indexed by these ids):

    0 <s>   1 <pad>   2 </s>   3 <unk>                     fixed special ids
    4 .. T-1                                               text pieces (T = text.vocab_size)
    T                                                      <mask>
    T+1 .. T+num_codes                                     <code_0> .. <code_{num_codes-1}>
    T+1+num_codes .. T+num_codes+num_bins                  <bin_0> .. <bin_{num_bins-1}>

The text part is a pluggable `TextTokenizer` (SentencePiece for Galen's own vocabularies,
GPT-2 byte-level BPE through fairseq's dict.txt for imported BiomedGPT/OFA checkpoints); codes
and bins live outside it, so the text model never wastes pieces on them and their ids depend
only on `text.vocab_size`.

Spacing rule (what makes `decode(encode(x)) == x`): a special token (`<mask>`, `<code_N>`,
`<bin_N>`) written in text absorbs at most one plain space on each side; `decode` puts exactly
one space between a special token and its neighbour. So "a <mask> b" and "<bin_1> <bin_2>"
round-trip exactly, while "a<mask>b" comes back as "a <mask> b" and two spaces between two
special tokens come back as one.
"""

from __future__ import annotations

import io
import json
import math
import operator
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import sentencepiece as spm
import torch

from galen.model.errors import GalenTokenizerError, read_json

BOS_ID = 0
PAD_ID = 1
EOS_ID = 2
UNK_ID = 3
NUM_SPECIALS = 4
DEFAULT_NUM_CODES = 8192
DEFAULT_NUM_BINS = 1000
TOKENIZER_JSON = "tokenizer.json"
FORMAT_VERSION = 1
SPM_FILE = "spm.model"

_MISSING_HINT = "run `galen tokenizer train` or copy the tokenizer files beside the model"
# Only these are parsed out of user text; <s>, </s>, <pad>, <unk> stay plain text so a prompt
# can never inject control tokens.
_SPECIAL_RE = re.compile(r"<(?:(mask)|code_([0-9]+)|bin_([0-9]+))>")
_SPECIAL_NAMES = {BOS_ID: "<s>", PAD_ID: "<pad>", EOS_ID: "</s>"}


@runtime_checkable
class TextTokenizer(Protocol):
    """The text part of the vocabulary; implementations are registered in TEXT_TOKENIZER_KINDS.

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
                f"not a tokenizer: {_MISSING_HINT}"
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
                f"in {TOKENIZER_JSON}: {_MISSING_HINT}"
            )
        path = Path(directory) / files[0]
        if not path.is_file():
            raise GalenTokenizerError(f"tokenizer file {path} is missing: {_MISSING_HINT}")
        return cls(path.read_bytes())

    def __repr__(self) -> str:
        return f"SentencePieceText(vocab_size={self.vocab_size})"


GPT2_VOCAB_FILE = "gpt2_vocab.json"
GPT2_MERGES_FILE = "gpt2_merges.txt"
FAIRSEQ_DICT_FILE = "fairseq_dict.txt"
GPT2_BPE_FILES = (GPT2_VOCAB_FILE, GPT2_MERGES_FILE, FAIRSEQ_DICT_FILE)

_BPE_HINT = (
    "the GPT-2 BPE files come with the checkpoint: encoder.json, vocab.bpe and dict.txt are in "
    "the BiomedGPT repo's utils/BPE folder (use GPT2BPEText.from_fairseq), vocab.json and "
    "merges.txt in a transformers-port folder (use GPT2BPEText.from_hf)"
)
# fairseq pads dictionaries with these placeholder symbols; they own an id but no text.
_FILLER_RE = re.compile(r"madeupword[0-9]+")
_GPT2_ID_RE = re.compile(r"0|[1-9][0-9]*")
_OVERWRITE_FLAG = "#fairseq:overwrite"
_HF_SPECIALS = {"<s>": BOS_ID, "<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
_UNK_TEXT = "<unk>"


def _tokenizers_lib() -> Any:
    """The `tokenizers` package, imported on first use so SentencePiece-only installs work."""
    try:
        import tokenizers
    except ImportError as exc:
        raise GalenTokenizerError(
            "the gpt2-bpe text tokenizer needs the `tokenizers` package; pip install tokenizers"
        ) from exc
    return tokenizers


def _read_bpe_text(path: str | Path, what: str) -> str:
    """A GPT-2/fairseq tokenizer file as text, with an error that says where such files live."""
    path = Path(path)
    if not path.is_file():
        raise GalenTokenizerError(f"{what} file {path} is missing; {_BPE_HINT}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GalenTokenizerError(
            f"{what} file {path} is not UTF-8 text ({exc}); it is corrupt or not a {what} file"
        ) from exc


def _file_lines(text: str) -> list[str]:
    """Lines split on "\\n" only (str.splitlines would also split on U+0085 and friends)."""
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _read_vocab_json(path: str | Path) -> dict[str, int]:
    """encoder.json / vocab.json: a JSON object of token string -> id (checked later)."""
    text = _read_bpe_text(path, "GPT-2 vocabulary")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GalenTokenizerError(
            f"GPT-2 vocabulary {path} is not valid JSON ({exc}); it is corrupt, re-copy it"
        ) from exc
    if not isinstance(data, dict):
        raise GalenTokenizerError(
            f"GPT-2 vocabulary {path} must hold a JSON object mapping token strings to ids, got "
            f"a JSON {type(data).__name__}; is this really encoder.json / vocab.json?"
        )
    return data


def _read_merges(path: str | Path) -> list[tuple[str, str]]:
    """vocab.bpe / merges.txt: "left right" per line in rank order; skips a `#version` header."""
    lines = _file_lines(_read_bpe_text(path, "GPT-2 merges"))
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        if number == 1 and line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise GalenTokenizerError(
                f"line {number} of GPT-2 merges {path} is {line!r}; each merge line is two "
                "tokens separated by one space"
            )
        merges.append((parts[0], parts[1]))
    return merges


def _read_fairseq_dict(path: str | Path) -> list[tuple[str, int, bool]]:
    """fairseq dict.txt as (symbol, count, overwrite) per line, in file (= index) order."""
    lines = _file_lines(_read_bpe_text(path, "fairseq dictionary"))
    entries: list[tuple[str, int, bool]] = []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        overwrite = len(fields) == 3 and fields[2] == _OVERWRITE_FLAG
        if len(fields) != 2 and not overwrite:
            raise GalenTokenizerError(
                f"line {number} of fairseq dictionary {path} is {line!r}; each line must be "
                f"'<symbol> <count>' (optionally followed by {_OVERWRITE_FLAG})"
            )
        try:
            count = int(fields[1])
        except ValueError:
            raise GalenTokenizerError(
                f"line {number} of fairseq dictionary {path} has count {fields[1]!r}, not an "
                "integer; each line must be '<symbol> <count>'"
            ) from None
        entries.append((fields[0], count, overwrite))
    if not entries:
        raise GalenTokenizerError(f"fairseq dictionary {path} is empty; {_BPE_HINT}")
    return entries


class GPT2BPEText(TextTokenizer):
    """GPT-2 byte-level BPE seen through a fairseq dictionary: the text part of OFA/BiomedGPT.

    Text -> GPT-2 ids (the `tokenizers` library's BPE with GPT-2's byte-level pre-tokenizer, no
    prefix space, so " what" and "what" differ as in the released models) -> model ids through
    dict.txt: line k holds GPT-2 id g as the symbol "g" and gets id 4 + k; a GPT-2 id that
    dict.txt lacks becomes <unk> (3). Decoding goes back through the same table and joins the
    bytes as UTF-8 (invalid bytes become U+FFFD). `madeupwordNNNN` lines (fairseq's padding)
    own an id but no text. The HF layout (vocab.json already in model ids) is stored as an
    identity dictionary, so both layouts save and load the same way.
    """

    kind: ClassVar[str] = "gpt2-bpe"
    leading_space: ClassVar[bool] = True  # word starts carry a space (see GalenTokenizer.word_start)

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        dict_entries: Sequence[tuple[str, int, bool]],
        *,
        vocab_name: str = "encoder.json",
        dict_name: str = "dict.txt",
    ) -> None:
        """Build from parsed files: GPT-2 token -> GPT-2 id, ranked merges, dict.txt lines.

        Use `from_fairseq` / `from_hf` / `load` to read files; the names only label errors.
        """
        lib = _tokenizers_lib()
        vocab = dict(vocab)
        merges = [(str(a), str(b)) for a, b in merges]
        entries = [(str(s), int(c), bool(o)) for s, c, o in dict_entries]
        by_id = self._check_vocab(lib, vocab, vocab_name)
        self._check_merges(vocab, merges, vocab_name)
        if not entries:
            raise GalenTokenizerError(f"{dict_name} has no entries; {_BPE_HINT}")

        inner_to_model = np.full(max(by_id) + 1, UNK_ID, dtype=np.int64)
        model_to_inner = np.full(NUM_SPECIALS + len(entries), -1, dtype=np.int64)
        seen: set[str] = set()
        for k, (symbol, _count, overwrite) in enumerate(entries):
            where = f"line {k + 1} of {dict_name}"
            if symbol in seen and not overwrite:
                raise GalenTokenizerError(
                    f"{where} repeats the symbol {symbol!r}; the dictionary is corrupt (fairseq "
                    f"only allows that with {_OVERWRITE_FLAG})"
                )
            seen.add(symbol)
            if _FILLER_RE.fullmatch(symbol):
                continue
            if not _GPT2_ID_RE.fullmatch(symbol):
                raise GalenTokenizerError(
                    f"{where} has symbol {symbol!r}, which is not a GPT-2 id; a fairseq GPT-2 "
                    "dict.txt names each token by its GPT-2 id in decimal (plus madeupwordNNNN "
                    "fillers); this dictionary belongs to a different tokenizer"
                )
            gpt2_id = int(symbol)
            if gpt2_id not in by_id:
                raise GalenTokenizerError(
                    f"{where} names GPT-2 id {gpt2_id}, which {vocab_name} does not have; "
                    "dict.txt and the vocabulary come from different tokenizers"
                )
            inner_to_model[gpt2_id] = NUM_SPECIALS + k  # a later overwrite line wins, as in fairseq
            model_to_inner[NUM_SPECIALS + k] = gpt2_id

        bpe = lib.models.BPE(vocab=vocab, merges=merges)
        tokenizer = lib.Tokenizer(bpe)
        tokenizer.pre_tokenizer = lib.pre_tokenizers.ByteLevel(
            add_prefix_space=False, use_regex=True
        )
        tokenizer.decoder = lib.decoders.ByteLevel()
        self._tok = tokenizer
        self._vocab = vocab
        self._merges = merges
        self._entries = entries
        self._inner_to_model = inner_to_model
        self._model_to_inner = model_to_inner

    @staticmethod
    def _check_vocab(lib: Any, vocab: dict[str, int], name: str) -> dict[int, str]:
        """Ids are unique non-negative ints and every token is spelt in GPT-2's byte alphabet."""
        if not vocab:
            raise GalenTokenizerError(f"{name} is empty; {_BPE_HINT}")
        alphabet = set(lib.pre_tokenizers.ByteLevel.alphabet())
        by_id: dict[int, str] = {}
        for token, idx in vocab.items():
            if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
                raise GalenTokenizerError(
                    f"{name} gives token {token!r} the id {idx!r}; ids must be non-negative "
                    "integers"
                )
            if idx in by_id:
                raise GalenTokenizerError(
                    f"{name} gives tokens {by_id[idx]!r} and {token!r} the same id {idx}; the "
                    "file is corrupt"
                )
            if not token or not set(token) <= alphabet:
                raise GalenTokenizerError(
                    f"{name} has token {token!r}, which is not spelt in GPT-2's byte-level "
                    "alphabet; this is not a byte-level BPE vocabulary"
                )
            by_id[idx] = token
        missing = alphabet - vocab.keys()
        if missing:
            raise GalenTokenizerError(
                f"{name} lacks {len(missing)} of GPT-2's 256 byte symbols (e.g. "
                f"{sorted(missing)[0]!r}), so some text could not be encoded; it is not a "
                "complete byte-level BPE vocabulary"
            )
        return by_id

    @staticmethod
    def _check_merges(vocab: dict[str, int], merges: list[tuple[str, str]], name: str) -> None:
        """Every merge joins two known tokens into a known token (tokenizers panics otherwise)."""
        for rank, (left, right) in enumerate(merges, 1):
            for token in (left, right, left + right):
                if token not in vocab:
                    raise GalenTokenizerError(
                        f"merge {rank} ({left!r} {right!r}) uses token {token!r}, which {name} "
                        "does not have; the merges and the vocabulary come from different "
                        "tokenizers"
                    )

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_fairseq(
        cls, encoder_json: str | Path, vocab_bpe: str | Path, dict_txt: str | Path
    ) -> GPT2BPEText:
        """The fairseq/OFA layout: GPT-2's encoder.json and vocab.bpe plus fairseq's dict.txt."""
        vocab = _read_vocab_json(encoder_json)
        merges = _read_merges(vocab_bpe)
        entries = _read_fairseq_dict(dict_txt)
        return cls(vocab, merges, entries, vocab_name=str(encoder_json), dict_name=str(dict_txt))

    @classmethod
    def from_hf(
        cls,
        vocab_json: str | Path,
        merges_txt: str | Path,
        *,
        num_codes: int = DEFAULT_NUM_CODES,
    ) -> GPT2BPEText:
        """The transformers-port layout: vocab.json ids already are model ids (BART style).

        <s> <pad> </s> <unk> must sit at 0..3. `<mask>`, `<code_N>`, `<bin_N>` entries are left
        to GalenTokenizer, but must sit where it puts them (`num_codes` places the bins), so a
        checkpoint's embedding rows line up. Ids without a token (holes) get filler entries.
        """
        _count(num_codes, "num_codes", 1)
        raw = _read_vocab_json(vocab_json)
        merges = _read_merges(merges_txt)
        text_vocab: dict[str, int] = {}
        fillers: dict[int, str] = {}
        layout: dict[str, int] = {}
        taken: dict[int, str] = {}
        for token, idx in raw.items():
            if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
                raise GalenTokenizerError(
                    f"{vocab_json} gives token {token!r} the id {idx!r}; ids must be "
                    "non-negative integers"
                )
            if idx in taken:
                raise GalenTokenizerError(
                    f"{vocab_json} gives tokens {taken[idx]!r} and {token!r} the same id {idx}; "
                    "the file is corrupt"
                )
            taken[idx] = token
            if token in _HF_SPECIALS:
                if idx != _HF_SPECIALS[token]:
                    raise GalenTokenizerError(
                        f"{vocab_json} puts {token} at id {idx}; Galen and OFA need <s>=0 "
                        "<pad>=1 </s>=2 <unk>=3, so this vocabulary does not fit"
                    )
            elif _SPECIAL_RE.fullmatch(token):
                layout[token] = idx
            elif idx < NUM_SPECIALS:
                raise GalenTokenizerError(
                    f"{vocab_json} puts {token!r} at id {idx}, which is reserved for "
                    "<s> <pad> </s> <unk> (0..3); this is not a BART/OFA-style vocabulary"
                )
            elif _FILLER_RE.fullmatch(token):
                fillers[idx] = token
            else:
                text_vocab[token] = idx
        if not text_vocab:
            raise GalenTokenizerError(f"{vocab_json} has no text tokens; {_BPE_HINT}")
        size = max([*text_vocab.values(), *fillers]) + 1
        for token, idx in layout.items():
            match = _SPECIAL_RE.fullmatch(token)
            assert match is not None
            if match.group(1):
                expected = size
            elif match.group(2) is not None:
                expected = size + 1 + int(match.group(2))
            else:
                expected = size + 1 + num_codes + int(match.group(3))
            if idx != expected:
                raise GalenTokenizerError(
                    f"{vocab_json} puts {token} at id {idx}, but with text ids 0..{size - 1} "
                    f"and num_codes={num_codes} GalenTokenizer gives it id {expected}; the "
                    "vocabulary's layout is not OFA's (or pass the checkpoint's num_codes)"
                )
        # Identity dictionary: model id i -> the token with id i, fillers where there is none.
        in_vocab = set(text_vocab.values())
        names = set(fillers.values())
        next_filler = 0
        entries: list[tuple[str, int, bool]] = []
        for idx in range(NUM_SPECIALS, size):
            if idx in in_vocab:
                entries.append((str(idx), 0, False))
                continue
            name = fillers.get(idx)
            while name is None:
                candidate = f"madeupword{next_filler:04d}"
                next_filler += 1
                if candidate not in names:
                    name = candidate
                    names.add(name)
            entries.append((name, 0, False))
        return cls(
            text_vocab, merges, entries, vocab_name=str(vocab_json),
            dict_name=f"the identity dictionary built from {vocab_json}",
        )

    # ----------------------------------------------------------------- TextTokenizer
    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        """4 specials + one id per dict.txt line (50264 for the released OFA/BiomedGPT files)."""
        return int(self._model_to_inner.shape[0])

    def encode(self, text: str) -> list[int]:
        """Model ids of `text` (no bos/eos); GPT-2 tokens missing from dict.txt become 3."""
        if not isinstance(text, str):
            raise GalenTokenizerError(f"text must be str, got {type(text).__name__}")
        inner = self._tok.encode(text, add_special_tokens=False).ids
        if not inner:
            return []
        return self._inner_to_model[np.asarray(inner, dtype=np.int64)].tolist()

    def decode(self, ids: Sequence[int]) -> str:
        """Text of model ids; 3 shows as "<unk>", 0..2 and filler ids carry no text."""
        values = _as_int_list(ids, "ids")
        if not values:
            return ""
        arr = np.asarray(values, dtype=np.int64)
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise GalenTokenizerError(
                f"id {int(bad[0])} is outside this text vocabulary 0..{self.vocab_size - 1}"
            )
        inner = self._model_to_inner[arr]
        parts: list[str] = []
        start = 0
        for cut in [*np.flatnonzero(arr == UNK_ID).tolist(), len(values)]:
            run = inner[start:cut]
            run = run[run >= 0]
            if run.size:
                parts.append(self._tok.decode(run.tolist(), skip_special_tokens=False))
            if cut < len(values):
                parts.append(_UNK_TEXT)
            start = cut + 1
        return "".join(parts)

    def save_hf(self, directory: Path, num_codes: int = DEFAULT_NUM_CODES,
                num_bins: int = DEFAULT_NUM_BINS) -> list[str]:
        """Write the transformers port's `vocab.json` (token -> model id) and `merges.txt`.

        Filler ids (fairseq's madeupwords) keep their name so every id up to <mask> is present.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        by_gpt2 = {g: t for t, g in self._vocab.items()}
        vocab: dict[str, int] = {"<s>": BOS_ID, "<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
        for model_id in range(NUM_SPECIALS, self.vocab_size):
            inner = int(self._model_to_inner[model_id])
            token = by_gpt2.get(inner) if inner >= 0 else None
            if token is None or token in vocab:
                token = self._entries[model_id - NUM_SPECIALS][0] if inner < 0 else f"<unused_{model_id}>"
            vocab[token] = model_id
        mask = self.vocab_size
        vocab["<mask>"] = mask
        vocab.update({f"<code_{i}>": mask + 1 + i for i in range(num_codes)})
        vocab.update({f"<bin_{i}>": mask + 1 + num_codes + i for i in range(num_bins)})
        (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
        merges = "".join(f"{a} {b}\n" for a, b in self._merges)
        (directory / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
        return ["vocab.json", "merges.txt"]

    def save(self, directory: Path) -> list[str]:
        """Write gpt2_vocab.json, gpt2_merges.txt and fairseq_dict.txt; returns their names."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / GPT2_VOCAB_FILE).write_text(
            json.dumps(self._vocab, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        merges = "".join(f"{a} {b}\n" for a, b in self._merges)
        (directory / GPT2_MERGES_FILE).write_text("#version: 0.2\n" + merges, encoding="utf-8")
        lines = "".join(
            f"{s} {c}{' ' + _OVERWRITE_FLAG if o else ''}\n" for s, c, o in self._entries
        )
        (directory / FAIRSEQ_DICT_FILE).write_text(lines, encoding="utf-8")
        return list(GPT2_BPE_FILES)

    @classmethod
    def load(cls, directory: Path, files: Sequence[str] = GPT2_BPE_FILES) -> GPT2BPEText:
        """Read what `save` wrote: `files` are the vocabulary, merges and dictionary, in order."""
        if len(files) != 3:
            raise GalenTokenizerError(
                f"a gpt2-bpe tokenizer is 3 files (vocabulary, merges, dictionary), but "
                f"{directory} lists {list(files)}; expected {list(GPT2_BPE_FILES)} in "
                f"{TOKENIZER_JSON}"
            )
        directory = Path(directory)
        return cls.from_fairseq(*(directory / name for name in files))

    def __repr__(self) -> str:
        return (
            f"GPT2BPEText(vocab_size={self.vocab_size}, gpt2_tokens={len(self._vocab)}, "
            f"merges={len(self._merges)})"
        )


TextLoader = Callable[[Path, Sequence[str]], TextTokenizer]

# text_kind (as written in tokenizer.json) -> loader of that kind's files.
TEXT_TOKENIZER_KINDS: dict[str, TextLoader] = {
    SentencePieceText.kind: SentencePieceText.load,
    GPT2BPEText.kind: GPT2BPEText.load,
}


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
    _count(vocab_size, "vocab_size", NUM_SPECIALS + 1)
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


def _as_int_list(ids: Any, what: str) -> list[int]:
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


def _finite(value: Any, what: str) -> float:
    """A real number as float, rejecting text, bools, NaN and infinities."""
    if isinstance(value, (str, bytes, bool)):
        raise GalenTokenizerError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GalenTokenizerError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise GalenTokenizerError(f"{what} must be finite, got {number}")
    return number


def _count(value: Any, what: str, minimum: int) -> int:
    """An int of at least `minimum` (bools refused), or an error naming the argument."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise GalenTokenizerError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


class GalenTokenizer:
    """Maps prompts, targets, boxes and image codes to the model's ids and back."""

    bos_id: int = BOS_ID
    pad_id: int = PAD_ID
    eos_id: int = EOS_ID
    unk_id: int = UNK_ID

    def __init__(
        self,
        text: TextTokenizer,
        num_codes: int = DEFAULT_NUM_CODES,
        num_bins: int = DEFAULT_NUM_BINS,
    ) -> None:
        if not isinstance(text, TextTokenizer):
            raise GalenTokenizerError(
                f"text must implement TextTokenizer (kind, vocab_size, encode, decode, save, "
                f"load), got {type(text).__name__}"
            )
        text_vocab = _count(text.vocab_size, "text.vocab_size", NUM_SPECIALS + 1)
        self.text = text
        self.num_codes = _count(num_codes, "num_codes", 1)
        # Two bins at least: box coordinates are scaled by (num_bins - 1).
        self.num_bins = _count(num_bins, "num_bins", 2)
        self.mask_id = text_vocab
        self.code_offset = self.mask_id + 1
        self.bin_offset = self.code_offset + self.num_codes
        self.vocab_size = self.bin_offset + self.num_bins

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"GalenTokenizer(text={self.text!r}, num_codes={self.num_codes}, "
            f"num_bins={self.num_bins}, vocab_size={self.vocab_size})"
        )

    # ----------------------------------------------------------------- id classes
    def is_code(self, token_id: int) -> bool:
        """Whether `token_id` is an image code `<code_N>`."""
        return self.code_offset <= token_id < self.bin_offset

    def is_bin(self, token_id: int) -> bool:
        """Whether `token_id` is a location bin `<bin_N>`."""
        return self.bin_offset <= token_id < self.vocab_size

    def code_tokens(self, codes: Sequence[int]) -> list[int]:
        """Ids of image codes (e.g. a VQ-GAN's indices 0..num_codes-1)."""
        values = _as_int_list(codes, "codes")
        for c in values:
            if not 0 <= c < self.num_codes:
                raise GalenTokenizerError(
                    f"image code {c} is outside 0..{self.num_codes - 1}; the image quantizer "
                    f"and the tokenizer disagree on num_codes ({self.num_codes})"
                )
        return [self.code_offset + c for c in values]

    def tokens_to_codes(self, ids: Sequence[int]) -> list[int]:
        """Inverse of `code_tokens`: image code indices of code ids."""
        values = _as_int_list(ids, "ids")
        for i in values:
            if not self.is_code(i):
                raise GalenTokenizerError(f"id {i} is not an image code id")
        return [i - self.code_offset for i in values]

    # ----------------------------------------------------------------- text
    def _special_id(self, match: re.Match[str]) -> int:
        if match.group(1):
            return self.mask_id
        digits, size, offset, name = (
            (match.group(2), self.num_codes, self.code_offset, "code")
            if match.group(2) is not None
            else (match.group(3), self.num_bins, self.bin_offset, "bin")
        )
        value = int(digits)
        if str(value) != digits:
            raise GalenTokenizerError(
                f"{match.group(0)} has leading zeros; write <{name}_{value}>"
            )
        if value >= size:
            raise GalenTokenizerError(
                f"{match.group(0)} is out of range: this tokenizer has {name}s 0..{size - 1}; "
                f"fix the text or use a tokenizer with more {name}s"
            )
        return offset + value

    def _encode_text(self, segment: str) -> list[int]:
        ids = self.text.encode(segment)
        for i in ids:
            if not (i == UNK_ID or NUM_SPECIALS <= i < self.mask_id):
                raise GalenTokenizerError(
                    f"text tokenizer {self.text.kind!r} returned id {i} outside the text range "
                    f"4..{self.mask_id - 1}; it breaks the TextTokenizer contract"
                )
        return ids

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without bos/eos; `<mask>`, `<code_N>`, `<bin_N>` become their ids."""
        if not isinstance(text, str):
            raise GalenTokenizerError(f"text must be str, got {type(text).__name__}")
        ids: list[int] = []
        position = 0
        matches = list(_SPECIAL_RE.finditer(text))
        for k, match in enumerate(matches + [None]):
            end = match.start() if match is not None else len(text)
            segment = text[position:end]
            if k > 0 and segment.startswith(" "):  # separator after the previous special
                segment = segment[1:]
            if match is not None and segment.endswith(" "):  # separator before this special
                segment = segment[:-1]
            if segment:
                ids.extend(self._encode_text(segment))
            if match is not None:
                ids.append(self._special_id(match))
                position = match.end()
        return ids

    def _token_name(self, token_id: int) -> str:
        if token_id == self.mask_id:
            return "<mask>"
        if self.is_code(token_id):
            return f"<code_{token_id - self.code_offset}>"
        if self.is_bin(token_id):
            return f"<bin_{token_id - self.bin_offset}>"
        return _SPECIAL_NAMES[token_id]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; one space separates each special token from its neighbours.

        bos/pad/eos are dropped when `skip_special_tokens`, otherwise shown as <s> <pad> </s>;
        mask, codes and bins are always shown. Nothing stops decoding early (cut at eos first
        if that is wanted).
        """
        values = _as_int_list(ids, "ids")
        parts: list[tuple[bool, str]] = []  # (is_special, text)
        run: list[int] = []

        def flush() -> None:
            if run:
                parts.append((False, self.text.decode(run)))
                run.clear()

        for i in values:
            if not 0 <= i < self.vocab_size:
                raise GalenTokenizerError(
                    f"id {i} is outside the vocabulary 0..{self.vocab_size - 1}; the ids come "
                    "from a model with a different vocab_size than this tokenizer"
                )
            if i in _SPECIAL_NAMES and skip_special_tokens:
                continue
            if i == UNK_ID or NUM_SPECIALS <= i < self.mask_id:
                run.append(i)
                continue
            flush()
            parts.append((True, self._token_name(i)))
        flush()

        out: list[str] = []
        for k, (special, piece) in enumerate(parts):
            if k > 0 and (special or parts[k - 1][0]):
                out.append(" ")
            out.append(piece)
        return "".join(out)

    def _finish(
        self, ids: list[int], what: str, max_length: int | None, truncate: bool
    ) -> list[int]:
        if max_length is None:
            return ids
        _count(max_length, "max_length", 2)
        if len(ids) <= max_length:
            return ids
        if truncate:
            return ids[: max_length - 1] + [self.eos_id]
        raise GalenTokenizerError(
            f"{what} is {len(ids)} tokens long (with its special tokens), over max_length="
            f"{max_length}; shorten it, raise max_length, or pass truncate=True to cut it"
        )

    def _check_nonempty(self, text: str, what: str) -> None:
        if not isinstance(text, str):
            raise GalenTokenizerError(f"{what} must be str, got {type(text).__name__}")
        if not text.strip():
            raise GalenTokenizerError(
                f"{what} is empty or only whitespace; give the model some text"
            )

    def word_start(self, text: str) -> str:
        """Make a prompt or target start at a word boundary, the way the text model expects.

        GPT-2 BPE marks a word start with a leading space (the reference encodes " yes", not
        "yes"); SentencePiece adds its own boundary, so a leading space there would only add a
        stray piece. Either way "yes" and " yes" encode the same.
        """
        stripped = text.lstrip(" ")
        return " " + stripped if getattr(self.text, "leading_space", False) else stripped

    def encode_prompt(
        self, text: str, max_length: int | None = None, truncate: bool = False
    ) -> list[int]:
        """Encoder input: `[bos] + encode(text) + [eos]`; never truncated unless asked."""
        self._check_nonempty(text, "prompt")
        ids = [self.bos_id] + self.encode(self.word_start(text)) + [self.eos_id]
        return self._finish(ids, "prompt", max_length, truncate)

    def encode_target(
        self, text: str, max_length: int | None = None, truncate: bool = False
    ) -> list[int]:
        """Decoder target: `encode(text) + [eos]` (the decoder input gets bos prepended)."""
        self._check_nonempty(text, "target")
        ids = self.encode(self.word_start(text)) + [self.eos_id]
        return self._finish(ids, "target", max_length, truncate)

    # ----------------------------------------------------------------- boxes
    def _image_side(self, width: Any, height: Any) -> tuple[float, float]:
        w = _finite(width, "image width")
        h = _finite(height, "image height")
        if w <= 0 or h <= 0:
            raise GalenTokenizerError(f"image size must be positive, got {w} x {h}")
        return w, h

    def box_to_tokens(self, box: Sequence[float], width: float, height: float) -> list[int]:
        """Bin ids of a pixel box (x0, y0, x1, y1): bin = round(coord / side * (num_bins - 1)).

        Rounding is Python's (half to even), as torch.round in OFA's preprocessing.
        """
        w, h = self._image_side(width, height)
        if hasattr(box, "tolist") and not isinstance(box, (list, tuple)):
            box = box.tolist()
        if isinstance(box, (str, bytes)) or not isinstance(box, Iterable):
            raise GalenTokenizerError(
                f"box must be 4 numbers (x0, y0, x1, y1), got {type(box).__name__}"
            )
        coords = list(box)
        if len(coords) != 4:
            raise GalenTokenizerError(
                f"box must be 4 numbers (x0, y0, x1, y1), got {len(coords)}"
            )
        x0, y0, x1, y1 = (_finite(v, f"box[{k}]") for k, v in enumerate(coords))
        if x1 < x0 or y1 < y0:
            raise GalenTokenizerError(
                f"box {(x0, y0, x1, y1)} has x1 < x0 or y1 < y0; give (x0, y0, x1, y1) with "
                "the top-left corner first"
            )
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise GalenTokenizerError(
                f"box {(x0, y0, x1, y1)} is outside the {w} x {h} image; clip it to "
                "[0, width] x [0, height] or pass the image's real size"
            )
        scale = self.num_bins - 1
        bins = (x0 / w, y0 / h, x1 / w, y1 / h)
        return [self.bin_offset + round(b * scale) for b in bins]

    def tokens_to_box(
        self, ids: Sequence[int], width: float, height: float
    ) -> tuple[float, float, float, float]:
        """Pixel box of 4 bin ids: coord = bin / (num_bins - 1) * side (order not checked)."""
        w, h = self._image_side(width, height)
        values = _as_int_list(ids, "ids")
        if len(values) != 4 or not all(self.is_bin(i) for i in values):
            raise GalenTokenizerError(
                f"a box is exactly 4 bin ids ({self.bin_offset}..{self.vocab_size - 1}), got "
                f"{values}; the model did not produce a box here"
            )
        scale = self.num_bins - 1
        b = [i - self.bin_offset for i in values]
        return (b[0] / scale * w, b[1] / scale * h, b[2] / scale * w, b[3] / scale * h)

    def box_to_text(self, box: Sequence[float], width: float, height: float) -> str:
        """The box as text, "<bin_a> <bin_b> <bin_c> <bin_d>", for building prompts/targets."""
        return " ".join(self._token_name(i) for i in self.box_to_tokens(box, width, height))

    # ----------------------------------------------------------------- batching
    def pad_batch(
        self,
        sequences: Sequence[Sequence[int]],
        pad_to_multiple_of: int | None = None,
        side: str = "right",
    ) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """(ids [B, L] padded with pad_id, mask [B, L] True on real tokens)."""
        if side not in ("right", "left"):
            raise GalenTokenizerError(f"side must be 'right' or 'left', got {side!r}")
        if pad_to_multiple_of is not None:
            _count(pad_to_multiple_of, "pad_to_multiple_of", 1)
        if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Iterable):
            raise GalenTokenizerError("sequences must be a list of id sequences")
        rows = [_as_int_list(s, f"sequence {k}") for k, s in enumerate(sequences)]
        if not rows:
            raise GalenTokenizerError("cannot pad an empty batch; pass at least one sequence")
        for k, row in enumerate(rows):
            if not row:
                raise GalenTokenizerError(
                    f"sequence {k} is empty; an all-padding row has nothing to attend to, drop it"
                )
            bad = [i for i in row if not 0 <= i < self.vocab_size]
            if bad:
                raise GalenTokenizerError(
                    f"sequence {k} has ids {bad[:5]} outside 0..{self.vocab_size - 1}"
                )
        length = max(len(r) for r in rows)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for k, row in enumerate(rows):
            span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
            ids[k, span] = torch.tensor(row, dtype=torch.long)
            mask[k, span] = True
        return ids, mask  # type: ignore[return-value]

    # ----------------------------------------------------------------- files
    def save(self, directory: str | Path) -> None:
        """Write the text tokenizer's files and tokenizer.json (plain JSON, nothing pickled)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = self.text.save(directory)
        meta = {
            "format_version": FORMAT_VERSION,
            "text_kind": self.text.kind,
            "text_files": list(files),
            "num_codes": self.num_codes,
            "num_bins": self.num_bins,
            "vocab_size": self.vocab_size,
            "special_ids": {
                "bos": self.bos_id,
                "pad": self.pad_id,
                "eos": self.eos_id,
                "unk": self.unk_id,
                "mask": self.mask_id,
                "code_offset": self.code_offset,
                "bin_offset": self.bin_offset,
            },
        }
        (directory / TOKENIZER_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> GalenTokenizer:
        """Rebuild a saved tokenizer, checking that its files agree with tokenizer.json."""
        directory = Path(directory)
        if not directory.is_dir():
            raise GalenTokenizerError(
                f"tokenizer folder {directory} does not exist: {_MISSING_HINT}"
            )
        meta_path = directory / TOKENIZER_JSON
        if not meta_path.is_file():
            raise GalenTokenizerError(f"{meta_path} is missing: {_MISSING_HINT}")
        meta = read_json(meta_path, dict, _MISSING_HINT, GalenTokenizerError)
        if meta.get("format_version") != FORMAT_VERSION:
            raise GalenTokenizerError(
                f"{meta_path} has format_version {meta.get('format_version')!r}; this Galen "
                f"reads version {FORMAT_VERSION}; upgrade Galen or re-save the tokenizer"
            )
        kind = meta.get("text_kind")
        if kind not in TEXT_TOKENIZER_KINDS:
            raise GalenTokenizerError(
                f"{meta_path} names text_kind {kind!r}, which this Galen cannot load; known "
                f"kinds: {sorted(TEXT_TOKENIZER_KINDS)}"
            )
        files = meta.get("text_files")
        if not isinstance(files, list) or not all(
            isinstance(f, str) and f and Path(f).name == f and f not in (".", "..") for f in files
        ):
            raise GalenTokenizerError(
                f"{meta_path} text_files must be a list of plain file names in the same folder, "
                f"got {files!r}"
            )
        for name in files:
            if not (directory / name).is_file():
                raise GalenTokenizerError(
                    f"tokenizer file {directory / name} (listed in {TOKENIZER_JSON}) is missing: "
                    f"{_MISSING_HINT}"
                )
        text = TEXT_TOKENIZER_KINDS[kind](directory, files)
        try:
            tokenizer = cls(text, num_codes=meta.get("num_codes"), num_bins=meta.get("num_bins"))
        except GalenTokenizerError as exc:
            raise GalenTokenizerError(f"{meta_path}: {exc}; re-save the tokenizer") from exc
        expected = meta.get("vocab_size")
        if expected != tokenizer.vocab_size:
            raise GalenTokenizerError(
                f"{meta_path} says vocab_size {expected!r} but its files give "
                f"{tokenizer.vocab_size}; the tokenizer files are corrupt or mixed from "
                "different tokenizers: copy all of them from the same save"
            )
        specials = meta.get("special_ids")
        if isinstance(specials, dict):
            actual = {
                "bos": tokenizer.bos_id, "pad": tokenizer.pad_id, "eos": tokenizer.eos_id,
                "unk": tokenizer.unk_id, "mask": tokenizer.mask_id,
                "code_offset": tokenizer.code_offset, "bin_offset": tokenizer.bin_offset,
            }
            wrong = {k: v for k, v in specials.items() if k in actual and actual[k] != v}
            if wrong:
                raise GalenTokenizerError(
                    f"{meta_path} special_ids {wrong} disagree with the loaded tokenizer "
                    f"{ {k: actual[k] for k in wrong} }; the files are corrupt or mixed"
                )
        return tokenizer
