"""`galen import-checkpoint` / `galen export` end to end, with real-size GPT-2 BPE files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from galen.model.generalist import GalenModel
from galen.model.vocabulary import GalenTokenizer
from tests.conftest import REFERENCE_CHECK, load_script
from tests.flows.test_cli import galen

write_full_size_bpe = load_script(REFERENCE_CHECK / "make_bpe.py").write_full_size_bpe


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
