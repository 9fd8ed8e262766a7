"""`galen import-checkpoint` / `galen export` end to end, with real-size GPT-2 BPE files."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.generalist import GalenModel
from model.tokenizer import GalenTokenizer
from tests.conftest import REFERENCE_CHECK
from tests.flows.test_cli import galen
from tests.model.test_tokenizer_bpe import B2S


def write_full_size_bpe(folder: Path) -> None:
    """encoder.json (50,257 tokens), vocab.bpe and a 50,260-line dict.txt: the reference's sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = [B2S[b] for b in range(256)]  # GPT-2's printable stand-ins for the 256 bytes
    words = ["Ġis", "Ġthere", "Ġa", "Ġnodule", "?", "Ġyes", "Ġno", "Ġwhat", "Ġorgan", "Ġlung", "Ġliver"]
    merges, vocab = [], {s: i for i, s in enumerate(alphabet)}
    for w in words:  # left-to-right merges building each word
        cur = w[0]
        for ch in w[1:]:
            if cur + ch not in vocab:
                merges.append((cur, ch))
                vocab[cur + ch] = len(vocab)
            cur += ch
    pairs = (a + b for a in alphabet for b in alphabet)
    while len(vocab) < 50256:
        p = next(pairs)
        if p not in vocab and len(p) == 2:
            merges.append((p[0], p[1]))
            vocab[p] = len(vocab)
    vocab["<|endoftext|>"] = 50256
    (folder / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    ids = list(range(50257))
    random.Random(0).shuffle(ids)
    lines = [f"{g} {50257 - k}" for k, g in enumerate(ids)] + [f"madeupword000{k} 0" for k in range(3)]
    (folder / "dict.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    subprocess.run([sys.executable, str(REFERENCE_CHECK / "make_weights.py"), "--layout", "fairseq", "--out",
                    str(root)], check=True, capture_output=True)
    write_full_size_bpe(root / "BPE")
    return root


def test_import_generate_export_reimport(tmp_path, release):
    out = galen("import-checkpoint", "--from", "fairseq", str(release / "checkpoint.pt"), "--bpe-dir",
                str(release / "BPE"), "--out", str(tmp_path / "imported"))
    assert "imported a custom model" in out.stdout
    folder = tmp_path / "imported"
    provenance = json.loads((folder / "import.json").read_text())
    assert provenance["layout"] == "fairseq" and len(provenance["sha256"]) == 64
    tok = GalenTokenizer.load(folder)
    assert (len(tok), tok.mask_id, tok.bin_offset) == (59457, 50264, 58457)
    assert tok.decode(tok.encode(" is there a nodule?")) == " is there a nodule?"

    from PIL import Image
    Image.new("RGB", (300, 200), (90, 90, 90)).save(tmp_path / "x.png")
    answer = galen("generate", "--model", str(folder), "--image", str(tmp_path / "x.png"), "--question",
                   "is there a nodule?", "--candidates", " yes", " no").stdout.strip()
    assert answer in {"yes", "no"}

    galen("export", "--model", str(folder), str(tmp_path / "hf"))
    hf_vocab = json.loads((tmp_path / "hf" / "vocab.json").read_text())
    assert len(hf_vocab) == 59457 and hf_vocab["<mask>"] == 50264 and hf_vocab["<bin_0>"] == 58457
    galen("import-checkpoint", "--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "again"))
    tok2 = GalenTokenizer.load(tmp_path / "again")
    for text in [" is there a nodule?", " what organ is this? <bin_3> <bin_900>", " liver"]:
        assert tok2.encode(text) == tok.encode(text)
    a = GalenModel.from_pretrained(folder).state_dict()
    b = GalenModel.from_pretrained(tmp_path / "again").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_import_without_bpe_files_says_what_to_pass(tmp_path, release):
    out = galen("import-checkpoint", "--from", "fairseq", str(release / "checkpoint.pt"), "--out",
                str(tmp_path / "x"), check=False)
    assert out.returncode == 2 and "--bpe-dir" in out.stderr and not (tmp_path / "x").exists()


def test_tokenizer_of_another_size_is_refused(tmp_path, release):
    small = tmp_path / "BPE"
    write_full_size_bpe(small)
    lines = (small / "dict.txt").read_text().splitlines()[:-10]
    (small / "dict.txt").write_text("\n".join(lines) + "\n")
    out = galen("import-checkpoint", "--from", "fairseq", str(release / "checkpoint.pt"), "--bpe-dir", str(small),
                "--out", str(tmp_path / "x"), check=False)
    assert out.returncode == 2 and "59,447 ids but the checkpoint's embedding has 59,457 rows" in out.stderr
