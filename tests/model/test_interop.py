"""Checkpoint interop with the reference layouts: strict import, fidelity, export, refusals."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from galen.model.config import REFERENCE_PARAMS, SIZES, get_config
from galen.model.errors import GalenCheckpointError
from galen.model.generalist import GalenModel
from galen.model.interop import (
    export_hf_ofa,
    fairseq_to_hf_key,
    galen_to_hf_key,
    hf_to_fairseq_key,
    import_reference,
    infer_config,
    read_torch_file,
)
from tests.conftest import REFERENCE_CHECK, load_reference_case


def make_weights(out, layout, *extra):
    subprocess.run([sys.executable, str(REFERENCE_CHECK / "make_weights.py"), "--layout", layout, "--out", str(out),
                    *extra], check=True, capture_output=True)
    return out / ("checkpoint.pt" if layout == "fairseq" else "")


@pytest.fixture(scope="module")
def fairseq_ckpt(tmp_path_factory):
    return make_weights(tmp_path_factory.mktemp("fs"), "fairseq")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_weights(tmp_path_factory.mktemp("hf"), "hf")


@pytest.fixture(scope="module")
def case():
    return load_reference_case()


def assert_reproduces_reference(model, case):
    subset, c = case
    image = (c["image_u8"].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        out = model(c["input_ids"], c["decoder_input_ids"], images=image, patch_masks=c["patch_masks"])
    assert (out.encoder.hidden - c["encoder_last_hidden_state"]).abs().max() < 1e-4
    assert (out.decoder_hidden - c["decoder_last_hidden_state"]).abs().max() < 1e-4
    assert (out.logits[..., subset] - c["logits_subset"]).abs().max() < 2e-5
    assert (out.logits.double().logsumexp(-1) - c["logits_lse"]).abs().max() < 2e-5
    assert torch.equal(out.logits.topk(5, dim=-1).indices, c["logits_top5_idx"])
    return out.logits


@pytest.mark.parametrize("meta", ["args", "cfg"])
def test_fairseq_layout_imports_strictly_and_reproduces_the_reference(tmp_path, case, meta):
    ckpt = make_weights(tmp_path, "fairseq", "--fairseq-meta", meta)
    imported = import_reference(ckpt, "fairseq")
    assert imported.model.cfg.name == "custom" and imported.model.cfg.encoder_layers == 2
    assert imported.model.cfg.decoder_entangle_positions is False  # --disable-entangle in the released runs
    assert_reproduces_reference(imported.model, case)


def test_hf_layout_with_its_one_short_buffer_imports_and_agrees_with_fairseq(hf_dir, fairseq_ckpt, case):
    assert torch.load(hf_dir / "pytorch_model.bin", weights_only=True)["decoder.image_position_idx"].numel() == 1025
    from_hf = import_reference(hf_dir, "hf").model
    from_fs = import_reference(fairseq_ckpt, "fairseq").model
    a, b = from_hf.state_dict(), from_fs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_reproduces_reference(from_hf, case)


def test_omegaconf_config_is_allowed_but_nothing_else(tmp_path, fairseq_ckpt, case):
    from omegaconf import OmegaConf

    ckpt = read_torch_file(fairseq_ckpt)
    args = vars(ckpt.pop("args"))
    ckpt["cfg"] = OmegaConf.create({"model": {k: v for k, v in args.items() if not isinstance(v, (list, tuple))},
                                   "task": {"_name": "vqa_gen", "max_src_length": 80}})
    torch.save(ckpt, tmp_path / "omega.pt")
    assert_reproduces_reference(import_reference(tmp_path / "omega.pt", "fairseq").model, case)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['GALEN_PWNED']}",))


def test_pickle_that_needs_arbitrary_code_is_refused_without_running_it(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("GALEN_PWNED", str(marker))
    torch.save({"model": {}, "args": _Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(GalenCheckpointError, match=r"refused: unpickling it would import .*system"):
        import_reference(tmp_path / "evil.pt", "fairseq")
    assert not marker.exists()


def test_truncated_file_is_refused(tmp_path, fairseq_ckpt):
    data = fairseq_ckpt.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(GalenCheckpointError, match="truncated or corrupt"):
        import_reference(tmp_path / "cut.pt", "fairseq")


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    bart_like = {"model.shared.weight": torch.zeros(10, 4), "model.encoder.layers.0.fc1.weight": torch.zeros(8, 4)}
    torch.save({"model": bart_like, "args": argparse.Namespace(arch="bart_base")}, tmp_path / "bart.pt")
    with pytest.raises(GalenCheckpointError, match="not a BiomedGPT/OFA generalist checkpoint"):
        import_reference(tmp_path / "bart.pt", "fairseq")


def test_missing_or_extra_keys_are_listed_by_the_checkpoints_own_names(tmp_path, fairseq_ckpt, hf_dir):
    ckpt = read_torch_file(fairseq_ckpt)
    del ckpt["model"]["decoder.layers.1.fc2.bias"], ckpt["model"]["encoder.layers.1.attn_ln.weight"]
    ckpt["model"]["decoder.mystery.weight"] = torch.zeros(3)
    ckpt["model"]["decoder.layers.0.encoder_attn.c_attn"] = torch.ones(5)
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(GalenCheckpointError) as err:
        import_reference(tmp_path / "odd.pt", "fairseq")
    assert "2 missing: decoder.layers.1.fc2.bias, encoder.layers.1.attn_ln.weight;" in str(err.value)
    assert "1 unexpected (could not be placed): decoder.mystery.weight;" in str(err.value)
    assert "1 with other shapes: decoder.layers.0.encoder_attn.c_attn: checkpoint (5,) vs model (4,)" in str(err.value)
    assert "Keys are named as in the fairseq checkpoint" in str(err.value)

    state = torch.load(hf_dir / "pytorch_model.bin", weights_only=True)
    del state["decoder.layers.1.cross_attn_mid_layer_norm.bias"]
    (tmp_path / "hf").mkdir()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    (tmp_path / "hf" / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(GalenCheckpointError, match=r"1 missing: decoder\.layers\.1\.cross_attn_mid_layer_norm\.bias"):
        import_reference(tmp_path / "hf", "hf")


def test_fairseq_and_transformers_names_map_both_ways():
    for entry in json.loads((REFERENCE_CHECK / "keys_fairseq.json").read_text()):
        if entry["hf_key"] is not None:
            assert fairseq_to_hf_key(entry["key"]) == entry["hf_key"]
            assert hf_to_fairseq_key(entry["hf_key"]) == entry["key"]


def test_ema_weights_on_request(tmp_path, fairseq_ckpt):
    ckpt = read_torch_file(fairseq_ckpt)
    ema = {k: (v * 0.5 if v.is_floating_point() else v) for k, v in ckpt["model"].items()}
    ckpt["extra_state"] = {"ema": ema}
    torch.save(ckpt, tmp_path / "ema.pt")
    plain = import_reference(tmp_path / "ema.pt", "fairseq").model
    averaged = import_reference(tmp_path / "ema.pt", "fairseq", use_ema=True).model
    assert torch.equal(averaged.embed_tokens.weight, plain.embed_tokens.weight * 0.5)
    with pytest.raises(GalenCheckpointError, match="no EMA weights"):
        import_reference(fairseq_ckpt, "fairseq", use_ema=True)


def test_entangled_decoder_positions_follow_the_fairseq_flag(tmp_path, fairseq_ckpt, case):
    ckpt = read_torch_file(fairseq_ckpt)
    ckpt["args"].disable_entangle = False
    torch.save(ckpt, tmp_path / "entangled.pt")
    model = import_reference(tmp_path / "entangled.pt", "fairseq").model
    assert model.cfg.decoder_entangle_positions is True
    with pytest.raises(AssertionError):  # the reference case was computed without entangled positions
        assert_reproduces_reference(model, case)


def test_frozen_resnet_checkpoint_without_batchnorm_counters_imports_and_round_trips(tmp_path, fairseq_ckpt, case):
    """--freeze-resnet models hold FrozenBatchNorm2d layers, which save no num_batches_tracked."""
    ckpt = read_torch_file(fairseq_ckpt)
    ckpt["args"].freeze_resnet = True
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.endswith("num_batches_tracked")}
    torch.save(ckpt, tmp_path / "frozen.pt")
    model = import_reference(tmp_path / "frozen.pt", "fairseq").model
    assert model.cfg.freeze_batchnorm is True
    assert not model.encoder.embed_images.bn1.weight.requires_grad
    assert_reproduces_reference(model, case)
    export_hf_ofa(model, tmp_path / "hf")
    again = import_reference(tmp_path / "hf", "hf").model
    assert again.cfg == model.cfg
    ckpt["args"].freeze_resnet = False  # counters missing without the flag: a strict failure naming them
    torch.save(ckpt, tmp_path / "unfrozen.pt")
    with pytest.raises(GalenCheckpointError, match=r"missing: encoder\.embed_images\..*num_batches_tracked"):
        import_reference(tmp_path / "unfrozen.pt", "fairseq")


def test_input_resolution_follows_the_checkpoint_and_survives_export(tmp_path, fairseq_ckpt, case):
    ckpt = read_torch_file(fairseq_ckpt)
    ckpt["args"].patch_image_size = 384  # a BiomedGPT-B VQA fine-tune
    torch.save(ckpt, tmp_path / "vqa.pt")
    model = import_reference(tmp_path / "vqa.pt", "fairseq").model
    assert model.cfg.image_size == 384 and import_reference(fairseq_ckpt, "fairseq").model.cfg.image_size == 256
    assert_reproduces_reference(model, case)
    export_hf_ofa(model, tmp_path / "hf")
    assert import_reference(tmp_path / "hf", "hf").model.cfg == model.cfg


def test_sync_batchnorm_checkpoint_is_refused(tmp_path, fairseq_ckpt):
    ckpt = read_torch_file(fairseq_ckpt)
    ckpt["args"].sync_bn = True
    torch.save(ckpt, tmp_path / "sync.pt")
    with pytest.raises(GalenCheckpointError, match="--sync-bn"):
        import_reference(tmp_path / "sync.pt", "fairseq")


def test_import_export_import_is_lossless_and_weights_stay_tied(tmp_path, fairseq_ckpt, case):
    first = import_reference(fairseq_ckpt, "fairseq").model
    export_hf_ofa(first, tmp_path / "out")
    exported = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    reference_keys = {e["key"]: e["shape"] for e in json.loads((REFERENCE_CHECK / "keys_hf.json").read_text())}
    assert {k: list(v.shape) for k, v in exported.items()} == reference_keys  # exactly the port's tensors
    emb = exported["encoder.embed_tokens.weight"]
    assert torch.equal(exported["decoder.output_projection.weight"], emb)
    assert torch.equal(exported["decoder.embed_tokens.weight"], emb)
    second = import_reference(tmp_path / "out", "hf").model
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second.cfg == first.cfg
    assert sum(p.numel() == emb.numel() for p in second.parameters()) == 1  # still one shared matrix
    assert_reproduces_reference(second, case)


@pytest.mark.parametrize("size", [s for s, n in REFERENCE_PARAMS.items() if n])
def test_shape_table_of_every_size(size):
    cfg = get_config(size)
    with torch.device("meta"):
        model = GalenModel(cfg)
    hf_shapes = {galen_to_hf_key(k): v for k, v in model.state_dict().items()}
    d, f, h = cfg.d_model, cfg.ffn_dim, cfg.attention_heads
    expected = {
        "encoder.embed_tokens.weight": (59457, d), "encoder.image_proj.weight": (d, 1024),
        "encoder.embed_positions.weight": (1026, d), "encoder.embed_image_positions.weight": (1765, d),
        "encoder.layers.0.fc1.weight": (f, d), "decoder.layers.0.ffn_layer_norm.weight": (f,),
        "encoder.layers.0.self_attn.c_attn": (h,), "decoder.layers.0.cross_attn.q_proj.weight": (d, d),
        "encoder.token_rel_pos_table_list.0.weight": (511, h), "decoder.image_rel_pos_table_list.0.weight": (6892, h),
        "decoder.cross_pos_q_linear.weight": (d, d), "encoder.embed_images.layer3.0.conv3.weight": (1024, 256, 1, 1),
    }
    for key, shape in expected.items():
        assert tuple(hf_shapes[key].shape) == shape, key
    assert f"encoder.layers.{cfg.encoder_layers - 1}.fc2.bias" in hf_shapes
    assert f"encoder.embed_images.layer3.{cfg.resnet_depths[2] - 1}.bn3.weight" in hf_shapes
    # the importer infers exactly this config back from the shapes
    inferred = infer_config(hf_shapes, {"attn_scale_factor": 2, "dropout": cfg.dropout,
                                        "encoder_drop_path_rate": cfg.encoder_drop_path_rate,
                                        "decoder_drop_path_rate": cfg.decoder_drop_path_rate})
    assert inferred.to_dict() == cfg.to_dict()


def test_wrong_kind_of_path_is_explained(tmp_path, hf_dir, fairseq_ckpt):
    with pytest.raises(GalenCheckpointError, match="is a folder"):
        import_reference(hf_dir, "fairseq")
    with pytest.raises(GalenCheckpointError, match="is not a folder"):
        import_reference(fairseq_ckpt, "hf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GalenCheckpointError, match="no config.json"):
        import_reference(tmp_path / "empty", "hf")
    with pytest.raises(GalenCheckpointError, match="not found"):
        import_reference(tmp_path / "nope.pt", "fairseq")


def test_export_refuses_what_the_port_cannot_express(tmp_path):
    assert SIZES["nano"]["resnet_depths"] == (1, 1, 1)  # no OFA backbone has these depths
    with pytest.raises(GalenCheckpointError, match="not one of the OFA backbones"):
        export_hf_ofa(GalenModel(get_config("nano", vocab_size=600)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    entangled = GalenModel(get_config("tiny", vocab_size=600, decoder_entangle_positions=True))
    with pytest.raises(GalenCheckpointError, match="decoder_entangle_positions"):
        export_hf_ofa(entangled, tmp_path / "out2")
