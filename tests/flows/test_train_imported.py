"""Fine-tuning from imported reference weights, end to end through the real commands:
`galen import-checkpoint` (fairseq layout, GPT-2 BPE, --freeze-resnet) -> `galen train --stage finetune
--init <folder>` on 2 Ray Train workers -> the saved folder reloads strictly with the same BPE tokenizer
and fidelity switches -> `galen generate` / `galen evaluate` / `galen export` on the result."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import REFERENCE_CHECK, load_script
from tests.flows.test_cli import galen
from tests.flows.train_procs import metric_history, only_run, run_galen_to_end, write_params
from tests.model.test_interop import assert_reproduces_reference, make_weights

write_full_size_bpe = load_script(REFERENCE_CHECK / "make_bpe.py").write_full_size_bpe

# BatchNorm parameters and buffers of the backbone: frozen by --freeze-resnet, so training must not move them
BATCHNORM = ("running_mean", "running_var", "num_batches_tracked", "bn1.weight", "bn1.bias", "bn2.weight",
             "bn2.bias", "bn3.weight", "bn3.bias", "downsample.1.weight", "downsample.1.bias")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The reference-check weights as a BiomedGPT fine-tuning run would leave them (--freeze-resnet),
    imported with their GPT-2 BPE files through the CLI."""
    from galen.model.interop import read_torch_file

    root = tmp_path_factory.mktemp("release")
    ckpt_path = make_weights(root, "fairseq")
    ckpt = read_torch_file(ckpt_path)
    ckpt["args"].freeze_resnet = True
    torch.save(ckpt, ckpt_path)
    write_full_size_bpe(root / "BPE")
    out = root / "imported"
    galen("import-checkpoint", "--from", "fairseq", str(ckpt_path), "--bpe-dir", str(root / "BPE"), "--out", str(out))
    return out


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_finetune_from_an_imported_folder(tmp_path, demo_shards, imported, case_single_image, capsys):
    from mlflow.tracking import MlflowClient

    from galen.flows.cli import main
    from galen.flows.shards import ShardConfig, build_shards
    from galen.model.generalist import GalenModel
    from galen.model.interop import import_reference
    from galen.model.vocabulary import GalenTokenizer

    storage, out = tmp_path / "storage", tmp_path / "model"
    # shards written for the imported model: its config takes 256-px images (the demo's shards are 128 px
    # for the nano model, and a model never reads shards written for another size)
    shards = tmp_path / "shards"
    cfg = ShardConfig.from_params({"train": {"size": None, "finetune": {"init": str(imported)}}})
    assert cfg.models == {"generalist": 256}
    build_shards(demo_shards.parent / "validated", shards, cfg)
    # params.yaml names another size and a tokenizer folder that does not exist: `--init` alone must
    # take the architecture and the tokenizer from the imported folder
    params = write_params(tmp_path / "params.yaml", size="nano", tokenizer=str(tmp_path / "no-tokenizer"),
                          tasks=["vqa", "nli"], steps=3, batch_size=2, num_workers=2, zero_stage=2,
                          checkpoint_every=3, max_failures=0, lr=1e-3, warmup_ratio=0.0, log_every=1,
                          experiment="imported", storage_path=str(storage), shards=str(shards), out=str(out))
    run_galen_to_end(["train", "--stage", "finetune", "--params", str(params), "--init", str(imported)], tmp_path)

    # the loss of every step was logged and is finite
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    losses = metric_history(client, only_run(client, "imported").info.run_id, "loss")
    assert [s for s, _ in losses] == [1, 2, 3] and all(math.isfinite(v) and v > 0 for _, v in losses)

    # the saved folder loads strictly, with the imported GPT-2 BPE tokenizer and the same fidelity switches
    start, trained = GalenModel.from_pretrained(imported), GalenModel.from_pretrained(out)
    assert trained.cfg == start.cfg and trained.cfg.name == "custom" and trained.cfg.vocab_size == 59457
    assert trained.cfg.freeze_batchnorm and trained.cfg.normformer and trained.cfg.head_scale
    tok, tok0 = GalenTokenizer.load(out), GalenTokenizer.load(imported)
    assert json.loads((out / "tokenizer.json").read_text())["text_kind"] == "gpt2-bpe"
    for text in [" is there a nodule?", " can text1 \" x \" imply text2 \" y \"? <bin_7>"]:
        assert tok.encode(text) == tok0.encode(text)

    # training moved the weights, except the frozen BatchNorm (parameters and statistics)
    a, b = start.state_dict(), trained.state_dict()
    assert all(torch.isfinite(v).all() for v in b.values() if v.is_floating_point())
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    batchnorm = {k for k in a if k.startswith("encoder.embed_images.") and k.endswith(BATCHNORM)}
    assert len(batchnorm) > 50 and not changed & batchnorm
    assert {"embed_tokens.weight", "encoder.layers.0.ffn.fc1.weight", "decoder.layers.1.cross_attn.q_proj.weight",
            "encoder.embed_images.layer3.5.conv3.weight", "encoder.image_proj.weight"} <= changed

    # a model built from the trained folder's config computes the reference forward pass (imported weights)
    rebuilt = GalenModel(trained.cfg).eval()
    rebuilt.load_state_dict(a)
    assert_reproduces_reference(rebuilt, case_single_image)

    # zero-shot use of the result: closed-set and free-form generation, evaluation
    from PIL import Image

    Image.new("RGB", (300, 200), (90, 90, 90)).save(tmp_path / "x.png")
    closed = galen("generate", "--model", str(out), "--image", str(tmp_path / "x.png"), "--question",
                   "is there a nodule?", "--candidates", "yes", "no").stdout.strip()
    assert closed in {"yes", "no"}
    galen("generate", "--model", str(out), "--image", str(tmp_path / "x.png"), "--question", "what organ is shown?",
          "--beam", "2", "--max-length", "5")
    assert main(["evaluate", "--model", str(out), "--shards", str(shards), "--out", str(tmp_path / "eval.json"),
                 "--tasks", "vqa", "nli", "--limit", "4", "--no-mlflow"]) == 0
    # the demo's 128-px shards are refused with the fix, not resized
    assert main(["evaluate", "--model", str(out), "--shards", str(demo_shards), "--out", str(tmp_path / "e.json"),
                 "--no-mlflow"]) == 2
    assert "but the model" in capsys.readouterr().err and not (tmp_path / "e.json").exists()
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["vqa"]["count"] == 4 and metrics["nli"]["count"] == 4
    assert 0 <= metrics["nli"]["accuracy"] <= 1

    # and back to the transformers-OFA layout without loss
    galen("export", "--model", str(out), str(tmp_path / "hf"))
    again = import_reference(tmp_path / "hf", "hf").model
    assert again.cfg == trained.cfg
    assert all(torch.equal(again.state_dict()[k], v) for k, v in b.items())


@pytest.fixture(scope="module")
def case_single_image():
    from tests.conftest import load_reference_case

    return load_reference_case()


def test_size_that_contradicts_the_imported_folder_is_refused(tmp_path, demo_shards, imported, capsys):
    from galen.flows.cli import main

    params = write_params(tmp_path / "params.yaml", tasks=["vqa"], shards=str(demo_shards),
                          storage_path=str(tmp_path / "storage"))
    assert main(["train", "--stage", "finetune", "--params", str(params), "--init", str(imported),
                 "--size", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "does not match train.size='tiny'" in err and "leave --size out" in err
    assert not (tmp_path / "storage").exists()
