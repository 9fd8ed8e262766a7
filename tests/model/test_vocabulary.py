"""Tests of the unified tokenizer: id layout, round trips, boxes, padding, files and errors."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from galen.model.errors import GalenTokenizerError
from galen.model.sentencepiece_text import SentencePieceText, train_sentencepiece
from galen.model.text_tokenizer import TextTokenizer
from galen.model.vocabulary import TEXT_TOKENIZER_KINDS, GalenTokenizer

VOCAB = 400


def make_corpus(n: int = 600, seed: int = 7) -> list[str]:
    """A few hundred varied radiology-report style sentences, built procedurally."""
    rng = random.Random(seed)
    studies = ["chest x-ray", "CT scan", "MRI", "T2-weighted MRI", "ultrasound", "PET-CT",
               "mammogram", "abdominal radiograph", "contrast CT", "FLAIR sequence"]
    verbs = ["shows", "reveals", "demonstrates", "suggests", "excludes", "confirms"]
    sizes = ["a small", "a large", "a faint", "an irregular", "a well-defined", "a 5 mm",
             "a 12 mm", "a spiculated", "a calcified", "a cystic"]
    findings = ["nodule", "mass", "opacity", "lesion", "effusion", "consolidation",
                "fracture", "haemorrhage", "infarct", "abscess", "aneurysm", "stenosis",
               "thrombus", "granuloma", "atelectasis", "pneumothorax"]
    places = ["left upper lobe", "right lower lobe", "liver", "left kidney", "spleen",
              "pancreatic head", "frontal lobe", "thyroid gland", "right breast", "pleural space",
              "gallbladder", "adrenal gland", "cerebellum", "mediastinum", "prostate"]
    extras = ["", " with surrounding oedema", " without enhancement", ", stable since 2019",
              ", new compared with prior imaging", " measuring about 3 cm"]
    out = []
    for _ in range(n):
        s = (f"the {rng.choice(studies)} {rng.choice(verbs)} {rng.choice(sizes)} "
             f"{rng.choice(findings)} in the {rng.choice(places)}{rng.choice(extras)}.")
        out.append(s[0].upper() + s[1:] if rng.random() < 0.5 else s)
    return out


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    out = tmp_path_factory.mktemp("spm")
    train_sentencepiece(corpus, out, vocab_size=VOCAB)
    return out


@pytest.fixture(scope="session")
def text(spm_dir: Path) -> SentencePieceText:
    return SentencePieceText.load(spm_dir, ["spm.model"])


@pytest.fixture(scope="session")
def tok(text: SentencePieceText) -> GalenTokenizer:
    return GalenTokenizer(text)


class FakeText:
    """A TextTokenizer of any size, for arithmetic and registry tests (one id per character)."""

    kind = "fake"

    def __init__(self, vocab_size: int = 50264) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [4 + (ord(c) % (self.vocab_size - 4)) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i - 4) for i in ids)

    def save(self, directory: Path) -> list[str]:
        (Path(directory) / "fake.txt").write_text(str(self.vocab_size))
        return ["fake.txt"]

    @classmethod
    def load(cls, directory: Path, files: Sequence[str]) -> FakeText:
        return cls(int((Path(directory) / files[0]).read_text()))


# --------------------------------------------------------------------------- layout
def test_id_layout(tok: GalenTokenizer, text: SentencePieceText) -> None:
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert text.vocab_size == VOCAB
    assert tok.mask_id == VOCAB
    assert tok.code_offset == VOCAB + 1
    assert tok.bin_offset == VOCAB + 1 + 8192
    assert tok.vocab_size == VOCAB + 1 + 8192 + 1000 == len(tok)
    assert tok.encode("<mask> <code_0> <code_8191> <bin_0> <bin_999>") == [
        VOCAB, VOCAB + 1, VOCAB + 8192, VOCAB + 8193, VOCAB + 8192 + 1000]


def test_sentencepiece_special_ids_match_ours(text: SentencePieceText) -> None:
    sp = text._sp
    assert (sp.bos_id(), sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    ids = text.encode("The MRI shows a nodule")
    assert ids and all(4 <= i < VOCAB for i in ids)


def test_reference_vocab_arithmetic() -> None:
    ref = GalenTokenizer(FakeText(50264))
    assert ref.vocab_size == 50264 + 1 + 8192 + 1000 == 59457
    assert (ref.mask_id, ref.code_offset, ref.bin_offset) == (50264, 50265, 58457)


def test_configurable_codes_and_bins() -> None:
    small = GalenTokenizer(FakeText(100), num_codes=16, num_bins=10)
    assert (small.mask_id, small.code_offset, small.bin_offset, small.vocab_size) == (100, 101, 117, 127)
    with pytest.raises(GalenTokenizerError, match="num_bins"):
        GalenTokenizer(FakeText(100), num_bins=1)
    with pytest.raises(GalenTokenizerError, match="num_codes"):
        GalenTokenizer(FakeText(100), num_codes=0)


def test_protocol_is_checked() -> None:
    assert isinstance(FakeText(), TextTokenizer)
    with pytest.raises(GalenTokenizerError, match="TextTokenizer"):
        GalenTokenizer(object())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- text
@pytest.mark.parametrize("s", [
    "the chest x-ray shows a small nodule in the left upper lobe.",
    "Unseen words: pneumothorax, bronchiectasis; zebra!",
    "two  spaces,   three, trailing ",
    " leading space",
    "line one\nline two\ttabbed",
    "<s> </s> <pad> <unk> are plain text here",
    "<bin_x> <code_-1> <masks> are not tokens",
])
def test_text_round_trip(tok: GalenTokenizer, s: str) -> None:
    assert tok.decode(tok.encode(s)) == s


@pytest.mark.parametrize("s", ["CT", "T2-weighted", "a 5 µm section", "αβγ δ-wave Ω",
                               "pH 7.4 and HbA1c",
                               "naïve café 胸部 🫁"])
def test_unicode_and_case_preserved(tok: GalenTokenizer, s: str) -> None:
    ids = tok.encode(s)
    assert tok.unk_id not in ids  # byte fallback: nothing is unknown
    assert tok.decode(ids) == s


def test_case_is_distinguished(tok: GalenTokenizer) -> None:
    assert tok.encode("CT") != tok.encode("ct")
    # identity normalization: the micro sign is not folded into Greek mu (NFKC would)
    assert tok.encode("\u00b5m") != tok.encode("\u03bcm")


def test_control_tokens_are_not_parsed_from_text(tok: GalenTokenizer) -> None:
    ids = tok.encode("<s> hi </s> <pad>")
    assert not {tok.bos_id, tok.pad_id, tok.eos_id} & set(ids)


@pytest.mark.parametrize("s", [
    "which region does <mask> describe?",
    "nodule <bin_12> <bin_40> <bin_300> <bin_999>",
    "<bin_0> <bin_1> <bin_2> <bin_3>",
    "<code_5> <code_8191> <code_0> then text <mask>",
    "a  <mask>  b",
    "<mask>",
])
def test_mixed_round_trip(tok: GalenTokenizer, s: str) -> None:
    assert tok.decode(tok.encode(s)) == s


def test_mixed_ids(tok: GalenTokenizer) -> None:
    ids = tok.encode("lesion <bin_1> <bin_2> <code_7><mask>")
    assert ids[-4:] == [tok.bin_offset + 1, tok.bin_offset + 2, tok.code_offset + 7, tok.mask_id]
    assert ids[:-4] == tok.text.encode("lesion")  # the separator space is absorbed


def test_spacing_rule_for_unspaced_specials(tok: GalenTokenizer) -> None:
    assert tok.decode(tok.encode("a<mask>b")) == "a <mask> b"
    assert tok.decode(tok.encode("<code_1><code_2>")) == "<code_1> <code_2>"
    assert tok.encode("<code_1><code_2>") == tok.encode("<code_1> <code_2>")


@pytest.mark.parametrize("bad, what", [
    ("box <bin_1000>", "bin"), ("<code_8192>", "code"), ("<code_9000> x", "code"),
    ("<bin_007>", "leading zeros"),
])
def test_out_of_range_special_in_text(tok: GalenTokenizer, bad: str, what: str) -> None:
    with pytest.raises(GalenTokenizerError, match=what):
        tok.encode(bad)


def test_encode_rejects_non_str(tok: GalenTokenizer) -> None:
    with pytest.raises(GalenTokenizerError, match="str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_decode_specials_and_errors(tok: GalenTokenizer) -> None:
    ids = tok.encode_prompt("the liver") + [tok.pad_id, tok.pad_id]
    assert tok.decode(ids) == "the liver"
    assert tok.decode(ids, skip_special_tokens=False) == "<s> the liver </s> <pad> <pad>"
    assert tok.decode(torch.tensor(ids)) == "the liver"
    assert tok.decode([]) == ""
    with pytest.raises(GalenTokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(GalenTokenizerError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(GalenTokenizerError, match="one sequence"):
        tok.decode([[4, 5]])  # type: ignore[list-item]


# --------------------------------------------------------------------------- prompts/targets
def test_prompt_and_target_framing(tok: GalenTokenizer) -> None:
    body = tok.encode("what does the CT show?")
    assert tok.encode_prompt("what does the CT show?") == [0] + body + [2]
    assert tok.encode_target("what does the CT show?") == body + [2]


@pytest.mark.parametrize("method", ["encode_prompt", "encode_target"])
@pytest.mark.parametrize("empty", ["", "   ", "\n\t"])
def test_empty_prompt_or_target(tok: GalenTokenizer, method: str, empty: str) -> None:
    with pytest.raises(GalenTokenizerError, match="empty"):
        getattr(tok, method)(empty)


def test_overlong_prompt_is_an_error_not_truncated(tok: GalenTokenizer) -> None:
    text = "the chest x-ray shows a small nodule in the left upper lobe " * 3
    n = len(tok.encode_prompt(text))
    assert tok.encode_prompt(text, max_length=n) == tok.encode_prompt(text)
    with pytest.raises(GalenTokenizerError) as info:
        tok.encode_prompt(text, max_length=n - 1)
    message = str(info.value)
    assert str(n) in message and f"max_length={n - 1}" in message and "truncate=True" in message


@pytest.mark.parametrize("method, head", [("encode_prompt", [0]), ("encode_target", [])])
def test_truncate_keeps_eos(tok: GalenTokenizer, method: str, head: list[int]) -> None:
    text = "the MRI reveals an irregular mass in the frontal lobe with surrounding oedema"
    full = getattr(tok, method)(text)
    cut = getattr(tok, method)(text, max_length=6, truncate=True)
    assert len(cut) == 6 and cut[-1] == tok.eos_id
    assert cut[:5] == full[:5] and cut[: len(head)] == head
    with pytest.raises(GalenTokenizerError, match="max_length"):
        getattr(tok, method)(text, max_length=1, truncate=True)


# --------------------------------------------------------------------------- boxes
def test_box_corners_map_to_first_and_last_bin(tok: GalenTokenizer) -> None:
    b = tok.bin_offset
    assert tok.box_to_tokens((0, 0, 640, 480), 640, 480) == [b, b, b + 999, b + 999]
    assert tok.box_to_tokens([0.0, 0.0, 0.0, 0.0], 10, 10) == [b] * 4


@pytest.mark.parametrize("box, bins", [
    # 101/640*999 = 157.65 -> 158 (up); 50/480*999 = 104.06 -> 104 (down);
    # 320.5/640*999 = 500.28 -> 500 (down); 470/480*999 = 978.19 -> 978 (down)
    ((101, 50, 320.5, 470), [158, 104, 500, 978]),
    # 100/640*999 = 156.09 -> 156 (down); 52.3/480*999 = 108.85 -> 109 (up);
    # 321.5/640*999 = 501.84 -> 502 (up); 479/480*999 = 996.92 -> 997 (up)
    ((100, 52.3, 321.5, 479), [156, 109, 502, 997]),
])
def test_box_hand_computed(tok: GalenTokenizer, box: tuple[float, ...], bins: list[int]) -> None:
    ids = tok.box_to_tokens(box, 640, 480)
    assert [i - tok.bin_offset for i in ids] == bins
    assert tok.box_to_text(box, 640, 480) == " ".join(f"<bin_{b}>" for b in bins)
    assert tok.encode(tok.box_to_text(box, 640, 480)) == ids
    back = tok.tokens_to_box(ids, 640, 480)
    assert back == pytest.approx((bins[0] / 999 * 640, bins[1] / 999 * 480,
                                  bins[2] / 999 * 640, bins[3] / 999 * 480))
    for got, want, side in zip(back, box, (640, 480, 640, 480)):
        assert abs(got - want) <= side / 999 / 2 + 1e-9


def test_box_rounding_half_to_even() -> None:
    five = GalenTokenizer(FakeText(10), num_codes=4, num_bins=5)  # scale 4, width 8: x/2
    bins = [i - five.bin_offset for i in five.box_to_tokens((1, 3, 5, 7), 8, 8)]
    assert bins == [0, 2, 2, 4]  # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4
    assert five.tokens_to_box([five.bin_offset + k for k in (0, 1, 2, 4)], 8, 4) == (0.0, 1.0, 4.0, 4.0)


@pytest.mark.parametrize("box, size, match", [
    ((1, 2, 3), (10, 10), "4 numbers"),
    ((1, 2, 3, 4, 5), (10, 10), "4 numbers"),
    ("1234", (10, 10), "4 numbers"),
    ((1, float("nan"), 3, 4), (10, 10), "finite"),
    ((1, 2, float("inf"), 4), (10, 10), "finite"),
    ((1, "2", 3, 4), (10, 10), "number"),
    ((5, 2, 3, 4), (10, 10), "x1 < x0"),
    ((1, 5, 3, 4), (10, 10), "y1 < y0"),
    ((-1, 2, 3, 4), (10, 10), "outside"),
    ((1, 2, 10.5, 4), (10, 10), "outside"),
    ((1, 2, 3, 11), (10, 10), "outside"),
    ((1, 2, 3, 4), (0, 10), "positive"),
    ((1, 2, 3, 4), (10, -5), "positive"),
    ((1, 2, 3, 4), (float("inf"), 10), "finite"),
])
def test_bad_boxes(tok: GalenTokenizer, box: object, size: tuple[float, float], match: str) -> None:
    with pytest.raises(GalenTokenizerError, match=match):
        tok.box_to_tokens(box, *size)  # type: ignore[arg-type]


def test_tokens_to_box_needs_four_bins(tok: GalenTokenizer) -> None:
    b = tok.bin_offset
    with pytest.raises(GalenTokenizerError, match="4 bin ids"):
        tok.tokens_to_box([b, b, b], 10, 10)
    with pytest.raises(GalenTokenizerError, match="4 bin ids"):
        tok.tokens_to_box([b, b, b, tok.code_offset], 10, 10)
    with pytest.raises(GalenTokenizerError, match="4 bin ids"):
        tok.tokens_to_box([b, b, b, b, b], 10, 10)


# --------------------------------------------------------------------------- codes
def test_codes_and_id_classes(tok: GalenTokenizer) -> None:
    ids = tok.code_tokens([0, 17, 8191])
    assert ids == [tok.code_offset, tok.code_offset + 17, tok.code_offset + 8191]
    assert tok.tokens_to_codes(ids) == [0, 17, 8191]
    assert tok.code_tokens(torch.tensor([3, 4])) == [tok.code_offset + 3, tok.code_offset + 4]
    assert [tok.is_code(i) for i in (tok.mask_id, tok.code_offset, tok.bin_offset - 1, tok.bin_offset)] == [
        False, True, True, False]
    edges = (tok.bin_offset - 1, tok.bin_offset, tok.vocab_size - 1, tok.vocab_size)
    assert [tok.is_bin(i) for i in edges] == [
        False, True, True, False]
    with pytest.raises(GalenTokenizerError, match="8192"):
        tok.code_tokens([8192])
    with pytest.raises(GalenTokenizerError, match="outside"):
        tok.code_tokens([-1])
    with pytest.raises(GalenTokenizerError, match="not an image code"):
        tok.tokens_to_codes([tok.mask_id])


# --------------------------------------------------------------------------- padding
def test_pad_right_and_left(tok: GalenTokenizer) -> None:
    seqs = [[0, 10, 11, 2], [0, 12, 2]]
    ids, mask = tok.pad_batch(seqs)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.tolist() == [[0, 10, 11, 2], [0, 12, 2, 1]]
    assert mask.tolist() == [[True] * 4, [True, True, True, False]]
    ids, mask = tok.pad_batch(seqs, side="left")
    assert ids.tolist() == [[0, 10, 11, 2], [1, 0, 12, 2]]
    assert mask.tolist() == [[True] * 4, [False, True, True, True]]


def test_pad_to_multiple_of(tok: GalenTokenizer) -> None:
    ids, mask = tok.pad_batch([[5, 6, 7, 8, 9]], pad_to_multiple_of=4)
    assert ids.shape == (1, 8) and ids[0, 5:].tolist() == [1, 1, 1]
    assert mask.sum().item() == 5
    ids, _ = tok.pad_batch([[5, 6, 7, 8]], pad_to_multiple_of=4)
    assert ids.shape == (1, 4)


def test_pad_errors(tok: GalenTokenizer) -> None:
    with pytest.raises(GalenTokenizerError, match="empty batch"):
        tok.pad_batch([])
    with pytest.raises(GalenTokenizerError, match="sequence 1 is empty"):
        tok.pad_batch([[4], []])
    with pytest.raises(GalenTokenizerError, match="side"):
        tok.pad_batch([[4]], side="middle")
    with pytest.raises(GalenTokenizerError, match="pad_to_multiple_of"):
        tok.pad_batch([[4]], pad_to_multiple_of=0)
    with pytest.raises(GalenTokenizerError, match="outside"):
        tok.pad_batch([[tok.vocab_size]])


# --------------------------------------------------------------------------- files
SAMPLES = ["the CT scan shows a 5 µm lesion <bin_3> <bin_4> <bin_10> <bin_20>",
           "Which organ is <mask> here?", "<code_1> <code_2> naïve αβ"]


def test_save_load_identical(tok: GalenTokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tk")
    meta = json.loads((tmp_path / "tk" / "tokenizer.json").read_text())
    assert meta["format_version"] == 1 and meta["text_kind"] == "sentencepiece"
    assert meta["text_files"] == ["spm.model"] and (tmp_path / "tk" / "spm.model").is_file()
    assert (meta["num_codes"], meta["num_bins"], meta["vocab_size"]) == (8192, 1000, tok.vocab_size)
    assert meta["special_ids"]["mask"] == tok.mask_id
    loaded = GalenTokenizer.load(tmp_path / "tk")
    assert loaded.vocab_size == tok.vocab_size and loaded.bin_offset == tok.bin_offset
    for s in SAMPLES:
        assert loaded.encode(s) == tok.encode(s)
        assert loaded.decode(tok.encode(s)) == s


def test_load_missing_folder_and_json(tmp_path: Path) -> None:
    with pytest.raises(GalenTokenizerError, match="does not exist.*galen tokenizer train"):
        GalenTokenizer.load(tmp_path / "nowhere")
    with pytest.raises(GalenTokenizerError, match="tokenizer.json is missing.*galen tokenizer train"):
        GalenTokenizer.load(tmp_path)


def _saved(tok: GalenTokenizer, where: Path) -> tuple[Path, dict]:
    tok.save(where)
    return where / "tokenizer.json", json.loads((where / "tokenizer.json").read_text())


def test_load_unknown_kind(tok: GalenTokenizer, tmp_path: Path) -> None:
    path, meta = _saved(tok, tmp_path)
    meta["text_kind"] = "gpt2-bpe-from-the-future"
    path.write_text(json.dumps(meta))
    with pytest.raises(GalenTokenizerError, match="text_kind 'gpt2-bpe-from-the-future'"):
        GalenTokenizer.load(tmp_path)


def test_load_mismatched_vocab_size(tok: GalenTokenizer, tmp_path: Path) -> None:
    path, meta = _saved(tok, tmp_path)
    meta["vocab_size"] += 1
    path.write_text(json.dumps(meta))
    with pytest.raises(GalenTokenizerError, match="vocab_size"):
        GalenTokenizer.load(tmp_path)


def test_load_spm_from_other_tokenizer(tok: GalenTokenizer, corpus: list[str], tmp_path: Path) -> None:
    path, _ = _saved(tok, tmp_path / "a")
    train_sentencepiece(corpus, tmp_path / "b", vocab_size=VOCAB - 50)
    (tmp_path / "a" / "spm.model").write_bytes((tmp_path / "b" / "spm.model").read_bytes())
    with pytest.raises(GalenTokenizerError, match="vocab_size.*corrupt"):
        GalenTokenizer.load(tmp_path / "a")


def test_load_missing_or_corrupt_text_file(tok: GalenTokenizer, tmp_path: Path) -> None:
    _saved(tok, tmp_path)
    (tmp_path / "spm.model").write_bytes(b"not a model")
    with pytest.raises(GalenTokenizerError, match="not a SentencePiece model"):
        GalenTokenizer.load(tmp_path)
    (tmp_path / "spm.model").unlink()
    with pytest.raises(GalenTokenizerError, match="spm.model.*missing"):
        GalenTokenizer.load(tmp_path)


@pytest.mark.parametrize("change, match", [
    ({"format_version": 2}, "format_version"),
    ({"num_bins": "1000"}, "num_bins"),
    ({"text_files": []}, "no SentencePiece file"),
])
def test_load_rejects_bad_json_fields(tok: GalenTokenizer, tmp_path: Path, change: dict, match: str) -> None:
    path, meta = _saved(tok, tmp_path)
    path.write_text(json.dumps({**meta, **change}))
    with pytest.raises(GalenTokenizerError, match=match):
        GalenTokenizer.load(tmp_path)


def test_load_rejects_invalid_json(tok: GalenTokenizer, tmp_path: Path) -> None:
    path, _ = _saved(tok, tmp_path)
    path.write_text("{not json")
    with pytest.raises(GalenTokenizerError, match="not valid JSON"):
        GalenTokenizer.load(tmp_path)


def test_load_rejects_files_outside_the_folder(tok: GalenTokenizer, tmp_path: Path) -> None:
    path, meta = _saved(tok, tmp_path / "tk")
    tok.text.save(tmp_path)  # a real model one level up, so only the name check can refuse it
    path.write_text(json.dumps({**meta, "text_files": ["../spm.model"]}))
    with pytest.raises(GalenTokenizerError, match="plain file names"):
        GalenTokenizer.load(tmp_path / "tk")


def test_load_mismatched_special_ids(tok: GalenTokenizer, tmp_path: Path) -> None:
    path, meta = _saved(tok, tmp_path)
    meta["special_ids"]["mask"] = 4
    path.write_text(json.dumps(meta))
    with pytest.raises(GalenTokenizerError, match="special_ids.*mask"):
        GalenTokenizer.load(tmp_path)


def test_registry_dispatches_on_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TEXT_TOKENIZER_KINDS, "fake", FakeText.load)
    GalenTokenizer(FakeText(300), num_codes=8, num_bins=4).save(tmp_path)
    loaded = GalenTokenizer.load(tmp_path)
    assert isinstance(loaded.text, FakeText) and loaded.vocab_size == 300 + 1 + 8 + 4


# --------------------------------------------------------------------------- training
def test_training_is_deterministic(corpus: list[str], spm_dir: Path, tmp_path: Path) -> None:
    again = train_sentencepiece(corpus, tmp_path, vocab_size=VOCAB)
    assert (tmp_path / "spm.model").read_bytes() == (spm_dir / "spm.model").read_bytes()
    first = SentencePieceText.load(spm_dir)
    for s in corpus[:50] + SAMPLES:
        assert again.encode(s) == first.encode(s)


def test_sampled_training_is_reproducible_across_processes(corpus: list[str], tmp_path: Path) -> None:
    # SentencePiece's own input sampling changes from process to process; ours must not.
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    code = (
        "import sys; from galen.model.sentencepiece_text import train_sentencepiece as t; "
        "t(None, sys.argv[2], corpus_files=[sys.argv[1]], vocab_size=350, input_sentence_size=300, seed=3)"
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "child")], check=True, cwd=tmp_path)
    here = train_sentencepiece(corpus, tmp_path / "here", vocab_size=350, input_sentence_size=300, seed=3)
    assert (tmp_path / "child" / "spm.model").read_bytes() == here.model_proto
    other = train_sentencepiece(corpus, tmp_path / "other", vocab_size=350, input_sentence_size=300, seed=4)
    assert other.model_proto != here.model_proto


def test_training_from_files(corpus: list[str], spm_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    from_file = train_sentencepiece(None, tmp_path / "out", corpus_files=[path], vocab_size=VOCAB)
    assert (tmp_path / "out" / "spm.model").read_bytes() == (spm_dir / "spm.model").read_bytes()
    assert from_file.vocab_size == VOCAB


def test_training_keeps_codes_and_bins_out(text: SentencePieceText) -> None:
    pieces = {text._sp.id_to_piece(i) for i in range(text.vocab_size)}
    assert not any(p.startswith(("<code_", "<bin_", "<mask")) for p in pieces)


@pytest.mark.parametrize("texts", [[], ["", "   ", "\n"]])
def test_training_empty_corpus(texts: list[str], tmp_path: Path) -> None:
    with pytest.raises(GalenTokenizerError, match="empty"):
        train_sentencepiece(texts, tmp_path, vocab_size=VOCAB)


def test_training_corpus_too_small(tmp_path: Path) -> None:
    with pytest.raises(GalenTokenizerError, match=r"at most (\d+)") as info:
        train_sentencepiece(["the chest x-ray is normal"] * 3, tmp_path, vocab_size=8000)
    largest = int(re.search(r"at most (\d+)", str(info.value)).group(1))
    assert NUM_OK_MIN <= largest < 8000
    fits = train_sentencepiece(["the chest x-ray is normal"] * 3, tmp_path, vocab_size=largest)
    assert fits.vocab_size == largest


NUM_OK_MIN = 4 + 256  # specials + byte-fallback pieces are always there


def test_training_vocab_below_required(corpus: list[str], tmp_path: Path) -> None:
    with pytest.raises(GalenTokenizerError, match="vocab_size>="):
        train_sentencepiece(corpus, tmp_path, vocab_size=100)


@pytest.mark.parametrize("kwargs, match", [
    ({"texts": "one big string"}, "not one string"),
    ({"texts": [b"bytes"]}, "not str"),
    ({"texts": ["fine line"] * 50 + [7]}, "^corpus item 50 is int, not str"),
    ({"texts": ["a"], "corpus_files": ["x.txt"]}, "not both"),
    ({"texts": None, "corpus_files": ["/does/not/exist.txt"]}, "does not exist"),
    ({"texts": None}, "empty"),
    ({"texts": ["a"], "vocab_size": 3}, "vocab_size"),
    ({"texts": ["a"], "model_type": "wordpiece"}, "model_type"),
    ({"texts": ["a"], "character_coverage": 0.0}, "character_coverage"),
    ({"texts": ["a"], "input_sentence_size": -1}, "input_sentence_size"),
    ({"texts": ["a"], "seed": "0"}, "seed"),
    ({"texts": ["a"], "num_threads": 0}, "num_threads"),
])
def test_training_argument_errors(kwargs: dict, match: str, tmp_path: Path) -> None:
    texts = kwargs.pop("texts")
    with pytest.raises(GalenTokenizerError, match=match):
        train_sentencepiece(texts, tmp_path, **kwargs)


def test_sentencepiece_text_rejects_bad_bytes() -> None:
    with pytest.raises(GalenTokenizerError):
        SentencePieceText(b"")
    with pytest.raises(GalenTokenizerError, match="not a SentencePiece model"):
        SentencePieceText(b"\x00garbage")


def test_prompts_and_targets_start_at_a_word_boundary_without_stray_pieces(tok: GalenTokenizer) -> None:
    # the reference prompts begin with a space (for GPT-2 BPE); SentencePiece must not get an extra piece
    assert tok.encode_prompt(" is there a nodule?") == tok.encode_prompt("is there a nodule?")
    assert tok.encode_target("  yes") == tok.encode_target("yes") == tok.encode("yes") + [tok.eos_id]
    assert tok.encode(" yes") != tok.encode("yes")  # raw encode stays literal
