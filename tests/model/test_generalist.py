"""Model behaviour: shapes, masks, padding invariance, reference fidelity, checkpoints, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from galen.model.config import REFERENCE_PARAMS, SIZES, GalenConfig, get_config
from galen.model.errors import GalenCheckpointError, GalenConfigError, GalenInputError
from galen.model.generalist import GalenModel, linear_drop_path
from galen.model.positions import code_position_ids, image_relative_buckets, token_relative_buckets
from tests.conftest import REFERENCE_CHECK, nano

V = 1200


def ids(*rows, width=None):
    """Right-padded id batch from lists (pad id 1)."""
    width = width or max(len(r) for r in rows)
    return torch.tensor([list(r) + [1] * (width - len(r)) for r in rows])


# -- size registry ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [s for s, n in REFERENCE_PARAMS.items() if n])
def test_reference_sizes_within_5_percent(size):
    with torch.device("meta"):
        model = GalenModel(get_config(size))
    assert abs(model.num_parameters() / REFERENCE_PARAMS[size] - 1) < 0.05


def test_unknown_size_and_bad_config_are_clear():
    with pytest.raises(GalenConfigError, match="unknown model size 'gigantic'.*nano, tiny"):
        get_config("gigantic")
    with pytest.raises(GalenConfigError, match="not divisible"):
        GalenConfig(d_model=100, attention_heads=3)
    with pytest.raises(GalenConfigError, match="unknown model config keys"):
        GalenConfig.from_dict({"d_model": 64, "colour": "blue"})


def test_drop_path_rises_linearly_and_reaches_the_configured_rate():
    assert linear_drop_path(0.1, 6) == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08, 0.1])
    model = GalenModel(get_config("nano", vocab_size=V, encoder_drop_path_rate=0.2, encoder_layers=3))
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.encoder.layers]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


def test_fidelity_switches_change_the_architecture():
    plain = GalenModel(get_config("nano", vocab_size=V, normformer=False, head_scale=False))
    keys = plain.state_dict().keys()
    assert not any("mid_layer_norm" in k or "ffn_layer_norm" in k or k.endswith("c_attn") for k in keys)
    full_keys = nano(V).state_dict().keys()
    assert any(k.endswith("self_attn.c_attn") for k in full_keys)
    assert "decoder.layers.0.cross_attn_mid_layer_norm.weight" in full_keys


def test_frozen_batchnorm_keeps_statistics_and_affine_fixed_while_training():
    """The reference's --freeze-resnet (FrozenBatchNorm2d): nothing of the backbone's BatchNorm moves."""
    def train_one_step(model):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(ids([0, 5, 6, 2]), ids([0, 7, 8]), images=torch.randn(1, 3, 128, 128)).logits.sum().backward()
        opt.step()
        after = model.state_dict()
        return {k for k in before if not torch.equal(before[k], after[k])}

    bn = ("running_mean", "running_var", "num_batches_tracked", "bn1.weight", "bn1.bias", "bn3.bias")
    frozen = train_one_step(nano(V, freeze_batchnorm=True))
    assert "encoder.embed_images.conv1.weight" in frozen and "encoder.layers.0.ffn.fc1.weight" in frozen
    assert not [k for k in frozen if "embed_images" in k and k.endswith(bn)]
    trainable = train_one_step(nano(V))
    assert "encoder.embed_images.bn1.running_mean" in trainable and "encoder.embed_images.bn1.weight" in trainable


def test_one_shared_embedding_matrix():
    model = nano(V)
    assert sum(p.numel() == V * model.cfg.d_model for p in model.parameters()) == 1
    out = model(ids([0, 5, 6, 2]), ids([0, 7]))
    out.logits[0, -1, 9].backward()
    grad = model.embed_tokens.weight.grad
    assert grad[9].abs().sum() > 0  # output projection
    assert grad[5].abs().sum() > 0 and grad[7].abs().sum() > 0  # encoder and decoder inputs


# -- position tables match the reference buffers ----------------------------------------------------
def test_bucket_tables_equal_the_reference_buffers():
    import numpy as np

    buffers = np.load(REFERENCE_CHECK / "buffers_hf.npz")
    assert torch.equal(token_relative_buckets(256, 1024), torch.from_numpy(buffers["encoder.token_rp_bucket"]).long())
    assert torch.equal(image_relative_buckets(42), torch.from_numpy(buffers["encoder.image_rp_bucket"]).long())
    fairseq_idx = torch.from_numpy(buffers["fairseq.decoder.image_position_idx"]).long()
    assert torch.equal(code_position_ids(16, 42, 1026), fairseq_idx)


# -- shapes and masks --------------------------------------------------------------------------------
def test_shapes_and_masks_for_image_only_text_only_and_mixed_batches():
    model = nano(V)
    images = torch.randn(2, 3, 128, 128)  # 8x8 = 64 patches
    prompt = ids([0, 5, 6, 7, 2], [0, 8, 2])
    dec = ids([0, 9, 10], [0, 11])

    img_only = model(None, dec, images=images)
    assert img_only.encoder.hidden.shape == (2, 64, 128) and not img_only.encoder.padding_mask.any()
    assert img_only.logits.shape == (2, 3, V)

    txt_only = model(prompt, dec)
    assert txt_only.encoder.hidden.shape == (2, 5, 128)
    assert txt_only.encoder.padding_mask.tolist() == [[False] * 5, [False] * 3 + [True] * 2]

    mixed = model(prompt, dec, images=images, patch_masks=torch.tensor([True, False]))
    pad = mixed.encoder.padding_mask
    assert mixed.encoder.hidden.shape == (2, 69, 128) and mixed.encoder.num_image_tokens == 64
    assert not pad[0].any()
    assert pad[1, :64].all() and not pad[1, 64:67].any() and pad[1, 67:].all()
    assert torch.isfinite(mixed.logits).all()


def test_non_square_images_use_their_own_grid():
    model = nano(V)
    out = model(ids([0, 5, 2]), ids([0, 6]), images=torch.randn(1, 3, 128, 192))
    assert out.encoder.num_image_tokens == 8 * 12


def test_padding_does_not_change_unpadded_items():
    model = nano(V)
    images = torch.randn(2, 3, 128, 128)
    short_prompt, long_prompt = [0, 5, 6, 2], [0, 8, 9, 10, 11, 12, 2]
    short_dec, long_dec = [0, 20], [0, 21, 22, 23]
    batch = model(ids(short_prompt, long_prompt), ids(short_dec, long_dec), images=images)
    alone = model(ids(short_prompt), ids(short_dec), images=images[:1])
    torch.testing.assert_close(batch.encoder.hidden[0, :64 + 4], alone.encoder.hidden[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.logits[0, :2], alone.logits[0], atol=1e-5, rtol=1e-5)
    alone_long = model(ids(long_prompt), ids(long_dec), images=images[1:])
    torch.testing.assert_close(batch.logits[1], alone_long.logits[0], atol=1e-5, rtol=1e-5)


def test_masked_image_is_the_same_as_no_image():
    """fairseq semantics: a sample whose patch_mask is False has its image patches treated as padding."""
    model = nano(V)
    prompt, dec = ids([0, 5, 6, 7, 2]), ids([0, 9, 10])
    with_masked_image = model(prompt, dec, images=torch.randn(1, 3, 128, 128), patch_masks=torch.tensor([False]))
    text_only = model(prompt, dec)
    torch.testing.assert_close(with_masked_image.encoder.hidden[0, 64:], text_only.encoder.hidden[0],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_masked_image.logits, text_only.logits, atol=1e-5, rtol=1e-5)


def test_code_targets_use_image_positions():
    model = nano(V)
    prompt, dec = ids([0, 5, 2], [0, 5, 2]), ids([0, 30, 31], [0, 30, 31])
    out = model(prompt, dec, code_masks=torch.tensor([False, True]))
    text = model(prompt[:1], dec[:1], code_masks=torch.tensor([False]))
    code = model(prompt[:1], dec[:1], code_masks=torch.tensor([True]))
    torch.testing.assert_close(out.logits[0], text.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[1], code.logits[0], atol=1e-5, rtol=1e-5)
    assert (text.logits - code.logits).abs().max() > 1e-3


def test_code_target_biases_and_embedding_follow_the_reference_buffers():
    """For code samples the decoder uses embed_image_positions[image_position_idx[:T]] through image_pos_ln,
    the image relative buckets image_rp_bucket[idx][:, idx], and code_layernorm_embedding; built here from
    the reference's own buffers (buffers_hf.npz), not from Galen's bucket code."""
    import numpy as np

    buffers = np.load(REFERENCE_CHECK / "buffers_hf.npz")
    idx = torch.from_numpy(buffers["fairseq.decoder.image_position_idx"]).long()
    rp = torch.from_numpy(buffers["decoder.image_rp_bucket"]).long()
    model, length = nano(V), 20
    dec = model.decoder
    with torch.no_grad():
        enc = model.encode(ids([0, 5, 6, 2]), torch.randn(1, 3, 128, 128))
        self_biases, cross = dec.position_biases(length, enc, torch.tensor([True]))
        pos = dec.image_pos_ln(dec.embed_image_positions(idx[:length]))[None]
        for layer in range(len(dec.layers)):
            rel = dec.image_rel_pos_table_list[layer].weight[rp[idx[:length]][:, idx[:length]]].permute(2, 0, 1)
            torch.testing.assert_close(self_biases[layer], dec.self_abs_pos(pos, pos) + rel)
        torch.testing.assert_close(cross, dec.cross_abs_pos(pos, enc.positions))
        x = torch.randn(1, length, model.cfg.d_model)
        torch.testing.assert_close(dec.embed(x, 0, torch.tensor([True])), dec.code_layernorm_embedding(x))
        torch.testing.assert_close(dec.embed(x, 0, torch.tensor([False])), dec.layernorm_embedding(x))


def test_incremental_decoding_equals_teacher_forcing_for_padded_masked_and_code_batches():
    """The KV-cached path the generators use gives the teacher-forced hidden states for a batch that
    mixes padded prompts, a masked image (patch_masks False) and text vs code targets (code_masks)."""
    model = nano(V)
    prompt = ids([0, 5, 6, 7, 8, 2], [0, 9, 2])
    targets = ids([0, 30, 31, 32, 33], [0, 40, 41, 42, 43])
    code_masks = torch.tensor([False, True])
    with torch.no_grad():
        enc = model.encode(prompt, torch.randn(2, 3, 128, 128), patch_masks=torch.tensor([True, False]))
        full = model.decode(targets, enc, code_masks)
        cache = model.init_cache(enc, max_length=8, code_masks=code_masks)
        steps = torch.cat([model.decoder.step(model.embed_tokens(targets[:, t:t + 1]), cache)
                           for t in range(targets.shape[1])], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


# -- fidelity to the reference implementation: tests/model/test_interop.py imports the reference
# weights in both layouts and reproduces the reference forward pass.


# -- checkpoints ------------------------------------------------------------------------------------------
def test_save_load_reproduces_logits_exactly(tmp_path, demo_tokenizer):
    model = nano(len(demo_tokenizer))
    prompt, dec, img = ids([0, 5, 6, 2]), ids([0, 7, 8]), torch.randn(1, 3, 128, 128)
    before = model(prompt, dec, images=img).logits
    model.save_pretrained(tmp_path, demo_tokenizer)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "spm.model"}
    loaded = GalenModel.from_pretrained(tmp_path)
    assert torch.equal(loaded(prompt, dec, images=img).logits, before)
    assert loaded.cfg == model.cfg


def test_checkpoint_folder_problems_are_named(tmp_path, demo_tokenizer):
    with pytest.raises(GalenCheckpointError, match="does not exist"):
        GalenModel.from_pretrained(tmp_path / "nowhere")
    model = nano(len(demo_tokenizer))
    model.save_pretrained(tmp_path, demo_tokenizer)
    weights = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(GalenCheckpointError, match="truncated or corrupt"):
        GalenModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(GalenCheckpointError, match="no model.safetensors"):
        GalenModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(GalenCheckpointError, match="no config.json"):
        GalenModel.from_pretrained(tmp_path)


def test_weights_of_another_config_are_refused_with_the_keys(tmp_path):
    nano(V).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["encoder_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GalenCheckpointError, match=r"23 missing: .*encoder\.layers\.2\.ffn"):
        GalenModel.from_pretrained(tmp_path)


def test_saving_with_a_tokenizer_of_another_size_is_refused(tmp_path, demo_tokenizer):
    with pytest.raises(GalenCheckpointError, match="tokenizer has"):
        nano(len(demo_tokenizer) + 1).save_pretrained(tmp_path, demo_tokenizer)


# -- bad input: clear errors before tensor math ----------------------------------------------------------------
@pytest.mark.parametrize("images, match", [
    (torch.randn(1, 3, 100, 128), "not a multiple of the 16-pixel patch"),
    (torch.randn(1, 1, 128, 128), r"shape \(batch, 3, H, W\)"),
    (torch.randn(3, 128, 128), r"shape \(batch, 3, H, W\)"),
    (torch.zeros(1, 3, 128, 128, dtype=torch.uint8), "floating-point"),
    (torch.randn(1, 3, 1024, 1024), "outside"),
    ("image.png", "must be a torch.Tensor"),
])
def test_bad_images_are_rejected_with_the_fix(images, match):
    with pytest.raises(GalenInputError, match=match):
        nano(V)(ids([0, 5, 2]), ids([0, 6]), images=images)


def test_bad_prompts_are_rejected_with_the_fix():
    model = nano(V)
    with pytest.raises(GalenInputError, match="is empty"):
        model(torch.zeros(1, 0, dtype=torch.long), ids([0, 6]))
    with pytest.raises(GalenInputError, match="at most 1024"):
        model(torch.full((1, 1100), 5), ids([0, 6]))
    with pytest.raises(GalenInputError, match="outside the vocabulary"):
        model(ids([0, V + 5, 2]), ids([0, 6]))
    with pytest.raises(GalenInputError, match="integer tensor"):
        model(torch.randn(1, 4), ids([0, 6]))
    with pytest.raises(GalenInputError, match="only of padding"):
        model(ids([1, 1, 1]), ids([0, 6]))
    with pytest.raises(GalenInputError, match="batch sizes differ"):
        model(ids([0, 5, 2]), ids([0, 6], [0, 7]))
    with pytest.raises(GalenInputError, match="patch_masks"):
        model(ids([0, 5, 2]), ids([0, 6]), images=torch.randn(1, 3, 128, 128), patch_masks=torch.tensor([1]))
    with pytest.raises(GalenInputError, match="nothing to encode"):
        model(None, ids([0, 6]))


def test_sizes_registry_is_data_not_code():
    assert set(SIZES) == {"nano", "tiny", "medium", "base", "large", "huge"}
    for name, fields in SIZES.items():
        assert get_config(name).name == name and fields["d_model"] % fields["attention_heads"] == 0
