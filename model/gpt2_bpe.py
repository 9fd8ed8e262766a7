"""The text part of OFA/BiomedGPT checkpoints: GPT-2 byte-level BPE read through fairseq's dict.txt.

`GPT2BPEText` reads the files that come with an imported checkpoint, in the fairseq layout
(encoder.json, vocab.bpe, dict.txt) or the transformers-port layout (vocab.json, merges.txt), and
checks them line by line, so a wrong or mixed file fails with a message that names it. It needs
the `tokenizers` package, imported on first use so SentencePiece-only installs work. The unified
vocabulary around it is galen.model.vocabulary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from galen.model.errors import GalenTokenizerError
from galen.model.text_tokenizer import (
    BOS_ID,
    DEFAULT_NUM_BINS,
    DEFAULT_NUM_CODES,
    EOS_ID,
    NUM_SPECIALS,
    PAD_ID,
    SPECIAL_RE,
    TOKENIZER_JSON,
    UNK_ID,
    TextTokenizer,
    as_int_list,
    int_at_least,
)

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
        int_at_least(num_codes, "num_codes", 1)
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
            elif SPECIAL_RE.fullmatch(token):
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
            match = SPECIAL_RE.fullmatch(token)
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
        values = as_int_list(ids, "ids")
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
