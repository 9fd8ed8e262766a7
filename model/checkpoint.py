"""Checkpoint I/O: Galen's own folder format and the mapping from the reference OFA layouts.

A Galen model folder holds `config.json` (GalenConfig), `model.safetensors` (weights; loading it
never unpickles) and the tokenizer files (`tokenizer.json` + the text model). The reference
layouts (fairseq BiomedGPT/OFA, transformers OFA port) map onto our parameter names with the
explicit rename tables below; derived integer buffers (bucket tables, `image_position_idx`) are
not stored by Galen but checked against ours when importing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import BACKBONE_NAMES, REFERENCE_PARAMS, SIZES, GalenConfig, RESNET_STAGE_DEPTHS
from model.errors import GalenCheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_TAG = {"format": "pt", "galen_format": "generalist", "galen_format_version": "1"}


def save_pretrained(model: torch.nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write config, safetensors weights and (optionally) the tokenizer files into `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None and len(tokenizer) != model.cfg.vocab_size:
        raise GalenCheckpointError(f"tokenizer has {len(tokenizer)} entries but the model's vocabulary is "
                                   f"{model.cfg.vocab_size}; save the tokenizer the model was built for")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata=FORMAT_TAG)
    tmp.replace(out / WEIGHTS_FILE)  # atomic: a crash never leaves a half-written weights file
    model.cfg.save(out / CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def _require(directory: Path, name: str, hint: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise GalenCheckpointError(f"{directory} has no {name}; {hint}")
    return path


def load_config(directory: str | Path) -> GalenConfig:
    d = Path(directory)
    if not d.is_dir():
        raise GalenCheckpointError(f"model folder {d} does not exist; pass the folder written by save_pretrained "
                                   "or `galen import-checkpoint`")
    return GalenConfig.load(_require(d, CONFIG_FILE, "a Galen model folder needs the config.json written with "
                                                     "its weights; copy it from where the model was saved"))


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the model from `config.json` and load `model.safetensors` strictly."""
    from model.generalist import GalenModel

    d = Path(directory)
    cfg = load_config(d)
    weights = _require(d, WEIGHTS_FILE, "the weights file is missing; copy it beside config.json, or for a "
                                        "reference checkpoint run `galen import-checkpoint` first")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise GalenCheckpointError(f"{weights} cannot be read as safetensors ({e}); the file is truncated or "
                                   "corrupt — copy it again from its source") from e
    model = GalenModel(cfg)
    load_state_strict(model, state, source=str(weights))
    return model.to(map_location).eval()


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict) with every shape checked first and all problems listed in one message."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        def show(items: list[str]) -> str:
            return ", ".join(items[:20]) + (f" ... ({len(items)} in all)" if len(items) > 20 else "")
        parts = [f"{len(missing)} missing: {show(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {show(unexpected)}" if unexpected else "",
                 f"{len(wrong)} with other shapes: {show(wrong)}" if wrong else ""]
        raise GalenCheckpointError(f"{source} does not fit this model config — " + "; ".join(p for p in parts if p)
                                   + ". Is config.json the one saved with these weights?")
    model.load_state_dict(dict(state), strict=True)


# --------------------------------------------------------------------------------------------------
# Reference layouts (OFA / BiomedGPT)
# --------------------------------------------------------------------------------------------------

# Derived buffers the reference layouts store and Galen rebuilds (checked, not loaded).
REFERENCE_BUFFERS = {"encoder.token_rp_bucket", "encoder.image_rp_bucket", "decoder.token_rp_bucket",
                     "decoder.image_rp_bucket", "decoder.image_position_idx"}
# Keys that hold the shared embedding in the reference layouts (tied to encoder.embed_tokens).
REFERENCE_TIED = ("decoder.embed_tokens.weight", "decoder.output_projection.weight")

_HF_TO_GALEN = [
    (r"^encoder\.embed_tokens\.weight$", "embed_tokens.weight"),
    (r"^encoder\.pos_(q|k)_linear\.", r"encoder.abs_pos.\1_linear."),
    (r"^decoder\.self_pos_(q|k)_linear\.", r"decoder.self_abs_pos.\1_linear."),
    (r"^decoder\.cross_pos_(q|k)_linear\.", r"decoder.cross_abs_pos.\1_linear."),
    (r"^(encoder|decoder)\.layers\.(\d+)\.(fc1|fc2|ffn_layer_norm)\.", r"\1.layers.\2.ffn.\3."),
]


def fairseq_to_hf_key(key: str) -> str:
    """OFA fairseq names -> transformers-OFA names (the rename chain of the official converter)."""
    return (key.replace("self_attn_ln", "self_attn_mid_layer_norm").replace("ffn_layernorm", "ffn_layer_norm")
            .replace("cross_attn_ln", "cross_attn_mid_layer_norm").replace("encoder_attn", "cross_attn")
            .replace("attn_ln", "self_attn_mid_layer_norm"))


def hf_to_galen_key(key: str) -> str:
    for pattern, repl in _HF_TO_GALEN:
        key, n = re.subn(pattern, repl, key)
        if n:
            break
    return key


def galen_to_hf_key(key: str) -> str:
    """Inverse of hf_to_galen_key (used by export)."""
    if key == "embed_tokens.weight":
        return "encoder.embed_tokens.weight"
    key = re.sub(r"^encoder\.abs_pos\.(q|k)_linear\.", r"encoder.pos_\1_linear.", key)
    key = re.sub(r"^decoder\.self_abs_pos\.(q|k)_linear\.", r"decoder.self_pos_\1_linear.", key)
    key = re.sub(r"^decoder\.cross_abs_pos\.(q|k)_linear\.", r"decoder.cross_pos_\1_linear.", key)
    return re.sub(r"^(encoder|decoder)\.layers\.(\d+)\.ffn\.(fc1|fc2|ffn_layer_norm)\.", r"\1.layers.\2.\3.", key)


def reference_to_galen_state(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rename a fairseq or transformers-OFA state dict to Galen names; drop checked buffers and ties."""
    if layout not in ("fairseq", "hf"):
        raise GalenCheckpointError(f"unknown reference layout {layout!r}; use 'fairseq' or 'hf'")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if layout == "fairseq":
            if key in ("encoder.version", "decoder.version"):
                continue
            key = fairseq_to_hf_key(key)
        if key in REFERENCE_BUFFERS or key in REFERENCE_TIED:
            continue
        out[hf_to_galen_key(key)] = value
    return out


def config_from_hf(hf: Mapping[str, Any]) -> GalenConfig:
    """GalenConfig from a transformers-OFA `config.json`."""
    resnet = hf.get("resnet_type", "resnet101")
    if resnet not in RESNET_STAGE_DEPTHS:
        raise GalenCheckpointError(f"backbone {resnet!r} is not one Galen builds ({', '.join(RESNET_STAGE_DEPTHS)})")
    cfg = GalenConfig(
        name=infer_size_name(hf["d_model"], hf["encoder_layers"], hf["decoder_layers"]),
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], encoder_layers=hf["encoder_layers"],
        decoder_layers=hf["decoder_layers"], attention_heads=hf["encoder_attention_heads"],
        ffn_dim=hf["encoder_ffn_dim"], resnet_depths=RESNET_STAGE_DEPTHS[resnet],
        max_positions=hf.get("max_position_embeddings", 1024), token_bucket_size=hf.get("token_bucket_size", 256),
        image_bucket_size=hf.get("image_bucket_size", 42), attn_scale_factor=hf.get("attn_scale_factor", 2.0),
        code_image_size=hf.get("code_image_size", 128), dropout=hf.get("dropout", 0.1),
        attention_dropout=hf.get("attention_dropout", 0.0), activation_dropout=hf.get("activation_dropout", 0.0),
        encoder_drop_path_rate=hf.get("encoder_drop_path_rate", 0.0),
        decoder_drop_path_rate=hf.get("decoder_drop_path_rate", 0.0),
        resnet_drop_path_rate=hf.get("resnet_drop_path_rate", 0.0), normformer=hf.get("normformer", True),
        encoder_entangle_positions=hf.get("entangle_position_embedding", False),
        code_layernorm_embedding=hf.get("code_layernorm_embedding", True),
        pad_id=hf.get("pad_token_id", 1), bos_id=hf.get("bos_token_id", 0), eos_id=hf.get("eos_token_id", 2))
    return cfg


def infer_size_name(d_model: int, encoder_layers: int, decoder_layers: int) -> str:
    for name, fields in SIZES.items():
        if (fields["d_model"], fields["encoder_layers"], fields["decoder_layers"]) == \
                (d_model, encoder_layers, decoder_layers) and REFERENCE_PARAMS[name]:
            return name
    return "custom"


__all__ = ["save_pretrained", "load_model", "load_config", "load_state_strict", "reference_to_galen_state",
           "config_from_hf", "fairseq_to_hf_key", "hf_to_galen_key", "galen_to_hf_key", "BACKBONE_NAMES"]
