"""The unified tokenizer: text pieces, `<mask>`, image codes and location bins in one id space.

Id layout (OFA style; the network's embedding table is indexed by these ids):

    0 <s>   1 <pad>   2 </s>   3 <unk>                     fixed special ids
    4 .. T-1                                               text pieces (T = text.vocab_size)
    T                                                      <mask>
    T+1 .. T+num_codes                                     <code_0> .. <code_{num_codes-1}>
    T+1+num_codes .. T+num_codes+num_bins                  <bin_0> .. <bin_{num_bins-1}>

The text part is a pluggable `TextTokenizer` (galen.model.text_tokenizer): SentencePiece for
Galen's own vocabularies (galen.model.sentencepiece_text), GPT-2 byte-level BPE through fairseq's
dict.txt for imported BiomedGPT/OFA checkpoints (galen.model.gpt2_bpe). Codes and bins live
outside it, so the text model never wastes pieces on them and their ids depend only on
`text.vocab_size`. This module is the layout and its files (tokenizer.json); each text part is
its own module.

Spacing rule (what makes `decode(encode(x)) == x`): a special token (`<mask>`, `<code_N>`,
`<bin_N>`) written in text absorbs at most one plain space on each side; `decode` puts exactly
one space between a special token and its neighbour. So "a <mask> b" and "<bin_1> <bin_2>"
round-trip exactly, while "a<mask>b" comes back as "a <mask> b" and two spaces between two
special tokens come back as one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from galen.model.errors import GalenTokenizerError, read_json
from galen.model.gpt2_bpe import GPT2BPEText
from galen.model.sentencepiece_text import SentencePieceText
from galen.model.text_tokenizer import (
    BOS_ID,
    DEFAULT_NUM_BINS,
    DEFAULT_NUM_CODES,
    EOS_ID,
    MISSING_HINT,
    NUM_SPECIALS,
    PAD_ID,
    SPECIAL_RE,
    TOKENIZER_JSON,
    UNK_ID,
    TextTokenizer,
    as_int_list,
    int_at_least,
)

FORMAT_VERSION = 1
_SPECIAL_NAMES = {BOS_ID: "<s>", PAD_ID: "<pad>", EOS_ID: "</s>"}


TextLoader = Callable[[Path, Sequence[str]], TextTokenizer]

# text_kind (as written in tokenizer.json) -> loader of that kind's files.
TEXT_TOKENIZER_KINDS: dict[str, TextLoader] = {
    SentencePieceText.kind: SentencePieceText.load,
    GPT2BPEText.kind: GPT2BPEText.load,
}


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
        text_vocab = int_at_least(text.vocab_size, "text.vocab_size", NUM_SPECIALS + 1)
        self.text = text
        self.num_codes = int_at_least(num_codes, "num_codes", 1)
        # Two bins at least: box coordinates are scaled by (num_bins - 1).
        self.num_bins = int_at_least(num_bins, "num_bins", 2)
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
        values = as_int_list(codes, "codes")
        for c in values:
            if not 0 <= c < self.num_codes:
                raise GalenTokenizerError(
                    f"image code {c} is outside 0..{self.num_codes - 1}; the image quantizer "
                    f"and the tokenizer disagree on num_codes ({self.num_codes})"
                )
        return [self.code_offset + c for c in values]

    def tokens_to_codes(self, ids: Sequence[int]) -> list[int]:
        """Inverse of `code_tokens`: image code indices of code ids."""
        values = as_int_list(ids, "ids")
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
        matches = list(SPECIAL_RE.finditer(text))
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
        values = as_int_list(ids, "ids")
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
        int_at_least(max_length, "max_length", 2)
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
        values = as_int_list(ids, "ids")
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
            int_at_least(pad_to_multiple_of, "pad_to_multiple_of", 1)
        if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Iterable):
            raise GalenTokenizerError("sequences must be a list of id sequences")
        rows = [as_int_list(s, f"sequence {k}") for k, s in enumerate(sequences)]
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
                f"tokenizer folder {directory} does not exist: {MISSING_HINT}"
            )
        meta_path = directory / TOKENIZER_JSON
        if not meta_path.is_file():
            raise GalenTokenizerError(f"{meta_path} is missing: {MISSING_HINT}")
        meta = read_json(meta_path, dict, MISSING_HINT, GalenTokenizerError)
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
                    f"{MISSING_HINT}"
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
