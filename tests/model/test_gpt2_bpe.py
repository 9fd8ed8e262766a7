"""Tests of the GPT-2 byte-level BPE text part (fairseq dict.txt and transformers-port layouts).

No downloads: a real byte-level BPE is trained here on a generated biomedical corpus and saved
in GPT-2's file formats, and a synthetic full-size vocabulary checks OFA's id arithmetic. The
expected GPT-2 ids come from a small independent reference BPE written below, not from the
`tokenizers` library the implementation uses.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import regex

from galen.model.errors import GalenTokenizerError
from galen.model.gpt2_bpe import FAIRSEQ_DICT_FILE, GPT2_BPE_FILES, GPT2BPEText
from galen.model.text_tokenizer import TextTokenizer
from galen.model.vocabulary import TEXT_TOKENIZER_KINDS, GalenTokenizer
from tests.conftest import REFERENCE_CHECK, load_script

# ----------------------------------------------------------------------------- reference BPE
_GPT2_SPLIT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


B2S = load_script(REFERENCE_CHECK / "make_bpe.py").byte_symbols()
S2B = {s: b for b, s in B2S.items()}


def reference_tokens(text: str, merges: list[tuple[str, str]]) -> list[str]:
    """Plain GPT-2 BPE: regex split, bytes to symbols, merge the lowest-ranked pair until none."""
    ranks = {pair: r for r, pair in enumerate(merges)}
    out: list[str] = []
    for word in _GPT2_SPLIT.findall(text):
        parts = [B2S[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            rank, best = min(
                (ranks.get(pair, math.inf), pair) for pair in zip(parts, parts[1:])
            )
            if rank == math.inf:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        out.extend(parts)
    return out


def token_bytes(token: str) -> bytes:
    return bytes(S2B[c] for c in token)


# ----------------------------------------------------------------------------- fixtures
def make_corpus(n: int = 400, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    studies = ["chest x-ray", "CT scan", "MRI", "ultrasound", "histology slide", "fundus photo"]
    findings = ["nodule", "mass", "opacity", "lesion", "effusion", "α-cell cluster",
                "β-amyloid plaque", "γδ T-cell infiltrate", "cyst", "fracture"]
    sizes = ["5 µm", "12 µm", "3 mm", "2.5 cm", "40 µm", "Δ 4 mm"]
    questions = [" what is the finding?", " is there a {f}?", " where is the {f}?",
                 " how large is the {f}?"]
    out = []
    for _ in range(n):
        f = rng.choice(findings)
        if rng.random() < 0.4:
            out.append(rng.choice(questions).format(f=f))
        else:
            out.append(f"The {rng.choice(studies)} shows a {rng.choice(sizes)} {f} at 37 °C.")
    return out


def read_merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").split("\n")
    return [tuple(line.split(" ")) for line in lines[1:] if line]  # type: ignore[misc]


class Files:
    """A trained GPT-2-format tokenizer in fairseq layout, with what the tests compare against."""

    def __init__(self, root: Path) -> None:
        from tokenizers import ByteLevelBPETokenizer

        corpus = make_corpus()
        trainer = ByteLevelBPETokenizer(add_prefix_space=False)
        trainer.train_from_iterator(corpus, vocab_size=600, min_frequency=2,
                                    special_tokens=["<|endoftext|>"], show_progress=False)
        trainer.save_model(str(root))
        self.encoder = root / "encoder.json"
        self.vocab_bpe = root / "vocab.bpe"
        (root / "vocab.json").rename(self.encoder)
        (root / "merges.txt").rename(self.vocab_bpe)
        self.vocab: dict[str, int] = json.loads(self.encoder.read_text(encoding="utf-8"))
        self.merges = read_merges(self.vocab_bpe)
        # fairseq's dict.txt: every GPT-2 id with its corpus count, most frequent first
        # (ties in random order), then fairseq's three padding words.
        counts = Counter(self.vocab[t] for line in corpus for t in reference_tokens(line, self.merges))
        ids = list(self.vocab.values())
        random.Random(11).shuffle(ids)
        ids.sort(key=lambda g: -counts[g])
        self.lines = [f"{g} {counts[g]}" for g in ids] + [f"madeupword000{k} 0" for k in range(3)]
        self.line_of = {g: k for k, g in enumerate(ids)}
        self.dict_txt = root / "dict.txt"
        self.dict_txt.write_text("\n".join(self.lines) + "\n", encoding="utf-8")

    def expected(self, text: str) -> list[int]:
        """Model ids the fairseq way: reference GPT-2 ids, then 4 + their dict.txt line."""
        return [4 + self.line_of[self.vocab[t]] for t in reference_tokens(text, self.merges)]

    def hf_vocab(self, extras: bool = True, num_codes: int = 8192, num_bins: int = 1000) -> dict[str, int]:
        """The transformers-port vocab.json: BART specials, then tokens at their model ids."""
        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        by_id = {g: t for t, g in self.vocab.items()}
        for k, line in enumerate(self.lines):
            symbol = line.split()[0]
            vocab[by_id[int(symbol)] if symbol.isdigit() else symbol] = 4 + k
        size = 4 + len(self.lines)
        if extras:
            vocab["<mask>"] = size
            vocab.update({f"<code_{i}>": size + 1 + i for i in range(num_codes)})
            vocab.update({f"<bin_{i}>": size + 1 + num_codes + i for i in range(num_bins)})
        return vocab


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def text(files: Files) -> GPT2BPEText:
    return GPT2BPEText.from_fairseq(files.encoder, files.vocab_bpe, files.dict_txt)


@pytest.fixture(scope="module")
def tok(text: GPT2BPEText) -> GalenTokenizer:
    return GalenTokenizer(text)


def write_hf(root: Path, vocab: dict[str, int], files: Files) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (root / "merges.txt").write_bytes(files.vocab_bpe.read_bytes())
    return root / "vocab.json", root / "merges.txt"


SAMPLES = [
    " what is the finding?",
    "what is the finding?",
    "The MRI shows a 5 µm nodule at 37 °C.",
    " Greek: α-cell, β-amyloid, γδ T cells, Δ 4 mm, Ω unseen",
    "line one\nline two\r\n\ttabbed  two spaces   three",
    "emoji 🫁 and 中文 never seen in training",
    "   ",
    "it's the patient's 2nd scan; they'll re-check",
]


# ----------------------------------------------------------------------------- encoding
def test_reference_tables_agree_with_gpt2_alphabet() -> None:
    from tokenizers.pre_tokenizers import ByteLevel

    assert set(B2S.values()) == set(ByteLevel.alphabet())
    assert B2S[ord(" ")] == "Ġ" and B2S[ord("\n")] == "Ċ"


@pytest.mark.parametrize("s", SAMPLES)
def test_ids_follow_gpt2_bpe_then_dict_order(text: GPT2BPEText, files: Files, s: str) -> None:
    assert text.encode(s) == files.expected(s)


def test_leading_space_matters(text: GPT2BPEText, files: Files) -> None:
    spaced, bare = text.encode(" what"), text.encode("what")
    assert spaced != bare
    assert spaced == [4 + files.line_of[files.vocab["Ġwhat"]]]
    assert text.decode(spaced) == " what" and text.decode(bare) == "what"


@pytest.mark.parametrize("s", SAMPLES)
def test_round_trip(text: GPT2BPEText, tok: GalenTokenizer, s: str) -> None:
    assert text.decode(text.encode(s)) == s
    assert tok.decode(tok.encode(s)) == s
    assert all(4 <= i < text.vocab_size for i in text.encode(s))


def test_index_is_four_plus_dict_line(text: GPT2BPEText, files: Files) -> None:
    checked = 0
    for token, g in files.vocab.items():
        try:
            expected = token_bytes(token).decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert text.decode([4 + files.line_of[g]]) == expected, token
        checked += 1
    assert checked > 250


def test_partial_utf8_decodes_with_replacement(text: GPT2BPEText, files: Files) -> None:
    lead = 4 + files.line_of[files.vocab[B2S[0xC2]]]  # first byte of "µ" alone
    assert text.decode([lead]) == "\ufffd"
    assert text.decode(text.encode("µ")) == "µ"


def test_vocab_size_and_filler_words(text: GPT2BPEText, files: Files, tok: GalenTokenizer) -> None:
    assert text.vocab_size == 4 + len(files.lines) == 4 + len(files.vocab) + 3
    assert isinstance(text, TextTokenizer) and text.kind == "gpt2-bpe"
    fillers = [4 + k for k, line in enumerate(files.lines) if line.startswith("madeupword")]
    assert fillers == [text.vocab_size - 3, text.vocab_size - 2, text.vocab_size - 1]
    assert text.decode(fillers) == ""
    assert text.decode([0, 1, 2]) == ""
    assert (tok.mask_id, tok.code_offset) == (text.vocab_size, text.vocab_size + 1)


def test_gpt2_id_missing_from_dict_is_unk(files: Files, tmp_path: Path) -> None:
    dropped = files.vocab["Ġnodule"]
    lines = [line for line in files.lines if line.split()[0] != str(dropped)]
    assert len(lines) == len(files.lines) - 1
    (tmp_path / "dict.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    short = GPT2BPEText.from_fairseq(files.encoder, files.vocab_bpe, tmp_path / "dict.txt")
    assert short.vocab_size == 4 + len(lines)
    assert short.encode(" nodule") == [3]
    assert short.decode(short.encode("a nodule here")) == "a<unk> here"
    galen = GalenTokenizer(short)
    ids = galen.encode("a nodule <bin_5>")
    assert 3 in ids and ids[-1] == galen.bin_offset + 5
    # the lines after the dropped one move up by one id
    after = next(int(line.split()[0]) for line in files.lines[files.line_of[dropped] + 1:]
                 if not line.startswith("madeup"))
    assert short._inner_to_model[after] == 4 + files.line_of[after] - 1


def test_specials_inside_text(tok: GalenTokenizer, text: GPT2BPEText) -> None:
    ids = tok.encode(" what is at <bin_5> <bin_999> and <code_7>? <mask>")
    assert ids == [*text.encode(" what is at"), tok.bin_offset + 5, tok.bin_offset + 999,
                   *text.encode("and"), tok.code_offset + 7, *text.encode("?"), tok.mask_id]
    assert tok.decode(ids) == " what is at <bin_5> <bin_999> and <code_7> ? <mask>"
    plain = tok.encode("<s> </s> <pad> <unk>")
    assert all(4 <= i < tok.mask_id for i in plain)
    assert tok.decode(plain) == "<s> </s> <pad> <unk>"


def test_prompt_framing(tok: GalenTokenizer, text: GPT2BPEText) -> None:
    assert tok.encode_prompt(" what is the finding?") == [0, *text.encode(" what is the finding?"), 2]


# ----------------------------------------------------------------------------- HF layout
@pytest.mark.parametrize("extras", [True, False])
def test_hf_layout_gives_vocab_json_ids(files: Files, text: GPT2BPEText, tmp_path: Path, extras: bool) -> None:
    vocab = files.hf_vocab(extras=extras)
    hf = GPT2BPEText.from_hf(*write_hf(tmp_path, vocab, files))
    assert hf.vocab_size == text.vocab_size
    for s in SAMPLES:
        assert hf.encode(s) == [vocab[t] for t in reference_tokens(s, files.merges)] == text.encode(s)
        assert hf.decode(hf.encode(s)) == s
    galen = GalenTokenizer(hf)
    assert galen.vocab_size == len(files.hf_vocab(extras=True))
    if extras:
        assert (galen.mask_id, galen.code_offset, galen.bin_offset) == (
            vocab["<mask>"], vocab["<code_0>"], vocab["<bin_0>"])


def test_hf_layout_with_holes_and_custom_codes(files: Files, tmp_path: Path) -> None:
    vocab = files.hf_vocab(extras=True, num_codes=16, num_bins=10)
    hole = vocab.pop("madeupword0001")
    hf = GPT2BPEText.from_hf(*write_hf(tmp_path / "hf", vocab, files), num_codes=16)
    assert hf.vocab_size == vocab["<mask>"] and hf.decode([hole]) == ""
    GalenTokenizer(hf, num_codes=16, num_bins=10).save(tmp_path / "saved")
    back = GalenTokenizer.load(tmp_path / "saved")
    assert back.text.vocab_size == hf.vocab_size and back.bin_offset == vocab["<bin_0>"]
    assert back.encode(SAMPLES[2]) == [vocab[t] for t in reference_tokens(SAMPLES[2], files.merges)]


@pytest.mark.parametrize("change, match", [
    (lambda v: v.update({"<mask>": 10**6}), r"<mask> at id 1000000, but with text ids 0..\d+ .*gives it id \d+;"),
    (lambda v: v.update({"<bin_0>": 10**6}), r"<bin_0> at id 1000000.*num_codes=8192"),
    (lambda v: v.update({"<code_3>": 10**6}), r"<code_3> at id 1000000"),
    (lambda v: v.update({"<pad>": 5, "<s>": 1, "<unk>": 0}), r"<s> at id 1"),
    (lambda v: v.update({"<s>": 10**6}), r"<s> at id 1000000.*<s>=0"),
    (lambda v: (v.pop("<s>"), v.update({"Ġnodule": 0})), r"'Ġnodule' at id 0.*reserved"),
    (lambda v: v.update({"Ġnodule": "7"}), r"'Ġnodule' the id '7'.*non-negative integers"),
    (lambda v: v.update({"Ġnodule": v["Ġthe"]}), r"same id"),
    (lambda v: v.update({"日本": v.pop("Ġnodule")}), r"'日本'.*byte-level"),
])
def test_hf_layout_errors(files: Files, tmp_path: Path, change, match: str) -> None:
    vocab = files.hf_vocab()
    change(vocab)
    with pytest.raises(GalenTokenizerError, match=match):
        GPT2BPEText.from_hf(*write_hf(tmp_path, vocab, files))


def test_hf_layout_without_text_tokens(files: Files, tmp_path: Path) -> None:
    with pytest.raises(GalenTokenizerError, match="no text tokens"):
        GPT2BPEText.from_hf(*write_hf(tmp_path, {"<s>": 0, "<mask>": 4}, files))
    with pytest.raises(GalenTokenizerError, match="num_codes"):
        GPT2BPEText.from_hf(*write_hf(tmp_path, files.hf_vocab(), files), num_codes=0)


# ----------------------------------------------------------------------------- files
@pytest.mark.parametrize("layout", ["fairseq", "hf"])
def test_save_load_round_trip(files: Files, text: GPT2BPEText, tmp_path: Path, layout: str) -> None:
    source = text if layout == "fairseq" else GPT2BPEText.from_hf(
        *write_hf(tmp_path / "hf", files.hf_vocab(), files))
    galen = GalenTokenizer(source)
    galen.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert meta["text_kind"] == "gpt2-bpe" and meta["text_files"] == list(GPT2_BPE_FILES)
    back = GalenTokenizer.load(tmp_path / "saved")
    assert isinstance(back.text, GPT2BPEText)
    assert back.vocab_size == galen.vocab_size and back.mask_id == galen.mask_id
    for s in [*SAMPLES, "a <bin_5> b <mask>"]:
        assert back.encode(s) == galen.encode(s)
        if "<" not in s:
            assert back.encode(s) == text.encode(s)
        assert back.decode(back.encode(s)) == galen.decode(galen.encode(s))
    every = list(range(galen.vocab_size))
    assert back.decode(every) == galen.decode(every)
    first = (tmp_path / "saved" / FAIRSEQ_DICT_FILE).read_text().split("\n")[0]
    assert first == (files.lines[0] if layout == "fairseq" else "4 0")


def test_registry_and_load_errors(text: GPT2BPEText, tmp_path: Path) -> None:
    assert TEXT_TOKENIZER_KINDS["gpt2-bpe"] == GPT2BPEText.load
    names = text.save(tmp_path)
    assert GPT2BPEText.load(tmp_path, names).encode(SAMPLES[0]) == text.encode(SAMPLES[0])
    with pytest.raises(GalenTokenizerError, match="3 files"):
        GPT2BPEText.load(tmp_path, names[:2])
    (tmp_path / names[1]).unlink()
    with pytest.raises(GalenTokenizerError, match="gpt2_merges.txt is missing.*utils/BPE"):
        GPT2BPEText.load(tmp_path, names)


def test_overwrite_flag_lets_a_later_line_win(files: Files, tmp_path: Path) -> None:
    g = files.vocab["Ġnodule"]
    path = tmp_path / "dict.txt"
    path.write_text("\n".join([*files.lines, f"{g} 1 #fairseq:overwrite"]) + "\n", encoding="utf-8")
    flagged = GPT2BPEText.from_fairseq(files.encoder, files.vocab_bpe, path)
    assert flagged.encode(" nodule") == [flagged.vocab_size - 1]
    assert flagged.decode([4 + files.line_of[g]]) == " nodule"
    flagged.save(tmp_path / "saved")
    assert (tmp_path / "saved" / FAIRSEQ_DICT_FILE).read_text().endswith(" #fairseq:overwrite\n")


# ----------------------------------------------------------------------------- full size
def test_full_size_layout_matches_ofa(tmp_path: Path) -> None:
    alphabet = [B2S[b] for b in range(256)]
    pairs = [(a, b) for a in alphabet for b in alphabet][:50000]
    vocab = {s: i for i, s in enumerate(alphabet)}
    vocab.update({a + b: 256 + k for k, (a, b) in enumerate(pairs)})
    vocab["<|endoftext|>"] = 50256
    assert len(vocab) == 50257
    (tmp_path / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pairs), encoding="utf-8")
    ids = list(range(50257))
    random.Random(5).shuffle(ids)
    lines = [f"{g} {50257 - k}" for k, g in enumerate(ids)] + [f"madeupword000{k} 0" for k in range(3)]
    assert len(lines) == 50260
    (tmp_path / "dict.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    text = GPT2BPEText.from_fairseq(tmp_path / "encoder.json", tmp_path / "vocab.bpe", tmp_path / "dict.txt")
    galen = GalenTokenizer(text)
    assert text.vocab_size == 50264
    assert (galen.mask_id, galen.code_offset, galen.bin_offset, len(galen)) == (50264, 50265, 58457, 59457)
    line = {g: k for k, g in enumerate(ids)}
    assert text.encode("!!") == [4 + line[vocab["!!"]]]
    assert galen.encode("!! <bin_0> <code_8191>") == [4 + line[vocab["!!"]], 58457, 58456]
    assert galen.decode([4 + line[vocab[B2S[ord("a")]]], 59456]) == "a <bin_999>"


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("missing", ["encoder", "vocab_bpe", "dict_txt"])
def test_missing_files_are_named(files: Files, tmp_path: Path, missing: str) -> None:
    paths = {"encoder": files.encoder, "vocab_bpe": files.vocab_bpe, "dict_txt": files.dict_txt}
    paths[missing] = tmp_path / f"no_{missing}"
    with pytest.raises(GalenTokenizerError, match=rf"no_{missing} is missing.*checkpoint.*utils/BPE"):
        GPT2BPEText.from_fairseq(paths["encoder"], paths["vocab_bpe"], paths["dict_txt"])


def test_missing_hf_file(files: Files, tmp_path: Path) -> None:
    with pytest.raises(GalenTokenizerError, match="vocab.json is missing"):
        GPT2BPEText.from_hf(tmp_path / "vocab.json", files.vocab_bpe)


@pytest.mark.parametrize("edit, match", [
    (lambda ls: ls.insert(5, "12"), r"line 6 of .*dict.txt is '12'"),
    (lambda ls: ls.insert(2, "12 3 4"), r"line 3 of .*'<symbol> <count>'"),
    (lambda ls: ls.insert(0, "12 many"), r"line 1 of .*count 'many'"),
    (lambda ls: ls.insert(4, "hello 5"), r"line 5 of .*'hello', which is not a GPT-2 id"),
    (lambda ls: ls.insert(4, "007 5"), r"line 5 of .*'007'"),
    (lambda ls: ls.insert(4, "99999 5"), r"line 5 of .*GPT-2 id 99999, which .*encoder.json does not have"),
    (lambda ls: ls.append(ls[0].split()[0] + " 1"), r"repeats the symbol"),
    (lambda ls: ls.insert(1, ""), r"line 2 of .*is ''"),
    (lambda ls: ls.clear(), r"dict.txt is empty"),
])
def test_bad_dict_txt(files: Files, tmp_path: Path, edit, match: str) -> None:
    lines = list(files.lines)
    edit(lines)
    path = tmp_path / "dict.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(GalenTokenizerError, match=match):
        GPT2BPEText.from_fairseq(files.encoder, files.vocab_bpe, path)


@pytest.mark.parametrize("content, match", [
    ('["a", "b"]', r"JSON object.*got a JSON list"),
    ('{"a": 1,', r"not valid JSON"),
    ('{}', r"is empty"),
    (None, r"lacks 1 of GPT-2's 256 byte symbols"),
    ({"Ġnodule": 3.5}, r"'Ġnodule' the id 3.5"),
    ({"Ġnodule": -1}, r"'Ġnodule' the id -1"),
    ({"Ġnodule": True}, r"'Ġnodule' the id True"),
    ({"Ġnodule": 0}, r"same id 0"),
    ({"a b": 10**6}, r"'a b'.*not spelt in GPT-2's byte-level alphabet"),
])
def test_bad_vocab_json(files: Files, tmp_path: Path, content, match: str) -> None:
    if content is None:
        vocab = dict(files.vocab)
        del vocab[B2S[0]]
        content = json.dumps(vocab)
    elif isinstance(content, dict):
        content = json.dumps({**files.vocab, **content})
    path = tmp_path / "encoder.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(GalenTokenizerError, match=match):
        GPT2BPEText.from_fairseq(path, files.vocab_bpe, files.dict_txt)


@pytest.mark.parametrize("edit, match", [
    (lambda ls: ls.insert(3, "abc"), r"line 4 of .*vocab.bpe is 'abc'"),
    (lambda ls: ls.insert(3, "a  b"), r"line 4 of .*one space"),
    (lambda ls: ls.insert(0, "#version: 0.2"), r"merge 1 \('#version:' '0.2'\) uses token '#version:'"),
    (lambda ls: ls.append("Ġnodule Ġnodule"), r"merge \d+ .*'ĠnoduleĠnodule', which .* does not have"),
    (lambda ls: ls.insert(1, "zzzq x"), r"merge 1 .*'zzzq'"),
])
def test_bad_merges(files: Files, tmp_path: Path, edit, match: str) -> None:
    lines = files.vocab_bpe.read_text(encoding="utf-8").rstrip("\n").split("\n")
    edit(lines)
    path = tmp_path / "vocab.bpe"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(GalenTokenizerError, match=match):
        GPT2BPEText.from_fairseq(files.encoder, path, files.dict_txt)


def test_merges_without_header_are_read(files: Files, text: GPT2BPEText, tmp_path: Path) -> None:
    lines = files.vocab_bpe.read_text(encoding="utf-8").split("\n")[1:]
    path = tmp_path / "vocab.bpe"
    path.write_text("\n".join(lines), encoding="utf-8")
    plain = GPT2BPEText.from_fairseq(files.encoder, path, files.dict_txt)
    assert all(plain.encode(s) == text.encode(s) for s in SAMPLES)


def test_non_utf8_file(files: Files, tmp_path: Path) -> None:
    path = tmp_path / "dict.txt"
    path.write_bytes(b"\xff\xfe12 3\n")
    with pytest.raises(GalenTokenizerError, match="not UTF-8"):
        GPT2BPEText.from_fairseq(files.encoder, files.vocab_bpe, path)


def test_encode_decode_argument_errors(text: GPT2BPEText) -> None:
    with pytest.raises(GalenTokenizerError, match="must be str"):
        text.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(GalenTokenizerError, match="outside this text vocabulary"):
        text.decode([text.vocab_size])
    with pytest.raises(GalenTokenizerError, match="outside this text vocabulary"):
        text.decode([-1])
    with pytest.raises(GalenTokenizerError, match="ints only"):
        text.decode(["4"])  # type: ignore[list-item]
    assert text.decode([]) == "" and text.encode("") == []


def test_targets_get_the_reference_leading_space(tok: GalenTokenizer) -> None:
    # OFA encodes answers as " yes": with GPT-2 BPE "yes" and " yes" are different ids
    assert tok.encode("yes") != tok.encode(" yes")
    assert tok.encode_target("yes") == tok.encode_target(" yes") == tok.encode(" yes") + [tok.eos_id]
    assert tok.encode_prompt("what is shown?")[1:-1] == tok.encode(" what is shown?")
