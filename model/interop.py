"""Import and export of the reference BiomedGPT/OFA checkpoint layouts.

Two layouts exist in the wild:
  * fairseq (the authors' `.pt` files): `{"args" | "cfg", "model", "extra_state": {"ema": ...}}`;
  * the transformers port (PanaceaAI/BiomedGPT-* folders): `config.json` + `pytorch_model.bin`.
Both map onto Galen's parameter names with the explicit rename tables below. Derived integer
buffers (relative-position bucket tables, `image_position_idx`) are rebuilt by Galen and checked
against the checkpoint's instead of being loaded; the port's one-short `image_position_idx` is
accepted by checking only the entries it has.

Reading a fairseq `.pt` file never executes code: it goes through torch's weights-only unpickler
with exactly the config classes fairseq legitimately pickles allowed (argparse.Namespace and the
omegaconf containers); anything else is refused with the names it asked for.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from galen.model.checkpoint import load_state_strict
from galen.model.config import REFERENCE_PARAMS, SIZES, GalenConfig
from galen.model.errors import GalenCheckpointError
from galen.model.positions import code_position_ids, image_relative_buckets, token_relative_buckets

if TYPE_CHECKING:  # for annotations only; the runtime import stays local, as in import_reference
    from galen.model.generalist import GalenModel

# Keys that only an OFA/BiomedGPT generalist has: used to tell "another architecture" apart.
SIGNATURE_KEYS = ("encoder.embed_images.conv1.weight", "encoder.image_proj.weight", "encoder.embed_tokens.weight",
                  "encoder.token_rel_pos_table_list.0.weight")
# Derived buffers the reference layouts store and Galen rebuilds (checked, not loaded).
REFERENCE_BUFFERS = ("encoder.token_rp_bucket", "encoder.image_rp_bucket", "decoder.token_rp_bucket",
                     "decoder.image_rp_bucket", "decoder.image_position_idx")
# Keys that hold the shared embedding in the reference layouts (tied to encoder.embed_tokens).
REFERENCE_TIED = ("decoder.embed_tokens.weight", "decoder.output_projection.weight")

_HF_TO_GALEN = [
    (r"^encoder\.embed_tokens\.weight$", "embed_tokens.weight"),
    (r"^encoder\.pos_(q|k)_linear\.", r"encoder.abs_pos.\1_linear."),
    (r"^decoder\.self_pos_(q|k)_linear\.", r"decoder.self_abs_pos.\1_linear."),
    (r"^decoder\.cross_pos_(q|k)_linear\.", r"decoder.cross_abs_pos.\1_linear."),
    (r"^(encoder|decoder)\.layers\.(\d+)\.(fc1|fc2|ffn_layer_norm)\.", r"\1.layers.\2.ffn.\3."),
]
_GALEN_TO_HF = [
    (r"^embed_tokens\.weight$", "encoder.embed_tokens.weight"),
    (r"^encoder\.abs_pos\.(q|k)_linear\.", r"encoder.pos_\1_linear."),
    (r"^decoder\.self_abs_pos\.(q|k)_linear\.", r"decoder.self_pos_\1_linear."),
    (r"^decoder\.cross_abs_pos\.(q|k)_linear\.", r"decoder.cross_pos_\1_linear."),
    (r"^(encoder|decoder)\.layers\.(\d+)\.ffn\.(fc1|fc2|ffn_layer_norm)\.", r"\1.layers.\2.\3."),
]


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        key, n = re.subn(pattern, repl, key)
        if n:
            break
    return key


def fairseq_to_hf_key(key: str) -> str:
    """OFA fairseq names -> transformers-OFA names (the official converter's rename chain)."""
    return (key.replace("self_attn_ln", "self_attn_mid_layer_norm").replace("ffn_layernorm", "ffn_layer_norm")
            .replace("cross_attn_ln", "cross_attn_mid_layer_norm").replace("encoder_attn", "cross_attn")
            .replace("attn_ln", "self_attn_mid_layer_norm"))


def hf_to_fairseq_key(key: str) -> str:
    """transformers-OFA names -> OFA fairseq names (the inverse of `fairseq_to_hf_key`)."""
    if key.startswith("encoder."):
        key = key.replace("self_attn_mid_layer_norm", "attn_ln")
    key = re.sub(r"cross_attn(?=\.|_layer_norm)", "encoder_attn", key)
    return (key.replace("self_attn_mid_layer_norm", "self_attn_ln")
            .replace("cross_attn_mid_layer_norm", "cross_attn_ln").replace("ffn_layer_norm", "ffn_layernorm"))


def hf_to_galen_key(key: str) -> str:
    return _rename(key, _HF_TO_GALEN)


def galen_to_hf_key(key: str) -> str:
    return _rename(key, _GALEN_TO_HF)


# -- reading files safely -----------------------------------------------------------------------------
def _allowed_globals() -> list[Any]:
    allowed: list[Any] = [argparse.Namespace]
    try:  # fairseq >= 0.10 pickles its config as omegaconf containers
        import collections
        import typing

        from omegaconf import DictConfig, ListConfig
        from omegaconf.base import ContainerMetadata, Metadata
        from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

        allowed += [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, StringNode, IntegerNode,
                    FloatNode, BooleanNode, typing.Any, collections.defaultdict, dict, list, int]
    except ImportError:
        pass
    return allowed


def read_torch_file(path: str | Path) -> Any:
    """torch.load with the weights-only unpickler plus fairseq's config classes; never runs code."""
    path = Path(path)
    if not path.is_file():
        raise GalenCheckpointError(f"checkpoint file {path} not found")
    allowed = _allowed_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - unreadable in another way: fall through to the generic message
            names = []
        allowed_names = {f"{g.__module__}.{g.__qualname__}" for g in allowed if hasattr(g, "__qualname__")}
        extra = [n for n in names if n not in allowed_names]
        if extra:
            raise GalenCheckpointError(
                f"{path} refused: unpickling it would import {', '.join(extra)}, which could run arbitrary code. "
                "Galen only allows the config classes fairseq pickles (argparse.Namespace, omegaconf containers). "
                "If you trust the file, re-save its state dict with plain tensors and import that.") from e
        raise GalenCheckpointError(f"{path} cannot be read ({str(e).splitlines()[-1][:200]}); the file is truncated "
                                   "or corrupt — download it again") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise GalenCheckpointError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200]}); "
                                   "the file is truncated or corrupt — download it again") from e


def _state_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GalenCheckpointError(f"{where} is not a state dict of tensors")
    return dict(obj)


# -- architecture inference ------------------------------------------------------------------------------
def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def _meta_value(meta: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if meta is None:
            break
        value = meta.get(name) if isinstance(meta, Mapping) else getattr(meta, name, None)
        if value is not None:
            return value
    return default


def infer_config(hf_state: Mapping[str, torch.Tensor], meta: Any) -> GalenConfig:
    """GalenConfig from the tensors' shapes (structure) and the checkpoint's own config (flags)."""
    missing = [k for k in SIGNATURE_KEYS if k not in hf_state]
    if missing:
        sample = ", ".join(sorted(hf_state)[:6])
        raise GalenCheckpointError(f"this is not a BiomedGPT/OFA generalist checkpoint: it lacks {', '.join(missing)} "
                                   f"(its keys look like: {sample} ...). Galen imports OFA-architecture models only.")
    vocab, d_model = hf_state["encoder.embed_tokens.weight"].shape
    heads = hf_state["encoder.token_rel_pos_table_list.0.weight"].shape[1]
    depths = tuple(_count(hf_state, rf"^encoder\.embed_images\.layer{i}\.(\d+)\.") for i in (1, 2, 3))
    token_buckets = (hf_state["encoder.token_rel_pos_table_list.0.weight"].shape[0] + 1) // 2
    image_distances = hf_state["encoder.image_rel_pos_table_list.0.weight"].shape[0]
    image_grid = int(round(((image_distances - 3) ** 0.5 + 1) / 2))
    scale_attn = "encoder.layers.0.self_attn_mid_layer_norm.weight" in hf_state
    scale_fc = "encoder.layers.0.ffn_layer_norm.weight" in hf_state
    if scale_attn != scale_fc:
        raise GalenCheckpointError("the checkpoint has NormFormer norms after attention but not in the FFN (or the "
                                   "reverse); Galen's `normformer` switch covers both together")
    disable_entangle = _meta_value(meta, "disable_entangle", default=None)
    if _meta_value(meta, "sync_bn", default=False):
        raise GalenCheckpointError("the checkpoint was trained with --sync-bn, whose BatchNorm layers use eps 1e-3; "
                                   "Galen's backbone uses the standard 1e-5 and would compute something else")
    fields: dict[str, Any] = dict(
        vocab_size=int(vocab), d_model=int(d_model), attention_heads=int(heads),
        encoder_layers=_count(hf_state, r"^encoder\.layers\.(\d+)\."),
        decoder_layers=_count(hf_state, r"^decoder\.layers\.(\d+)\."),
        ffn_dim=int(hf_state["encoder.layers.0.fc1.weight"].shape[0]), resnet_depths=depths,
        max_positions=int(hf_state["encoder.embed_positions.weight"].shape[0]) - 2,
        token_bucket_size=int(token_buckets), image_bucket_size=image_grid,
        normformer=scale_attn, head_scale="encoder.layers.0.self_attn.c_attn" in hf_state,
        code_layernorm_embedding="decoder.code_layernorm_embedding.weight" in hf_state,
        attn_scale_factor=float(_meta_value(meta, "attn_scale_factor", default=2.0)),
        code_image_size=int(_meta_value(meta, "code_image_size", default=128)),
        image_size=int(_meta_value(meta, "patch_image_size", default=256)),  # e.g. 384 for base VQA fine-tunes
        dropout=float(_meta_value(meta, "dropout", default=0.1)),
        attention_dropout=float(_meta_value(meta, "attention_dropout", default=0.0)),
        activation_dropout=float(_meta_value(meta, "activation_dropout", default=0.0)),
        encoder_drop_path_rate=float(_meta_value(meta, "encoder_drop_path_rate", default=0.0)),
        decoder_drop_path_rate=float(_meta_value(meta, "decoder_drop_path_rate", default=0.0)),
        resnet_drop_path_rate=float(_meta_value(meta, "resnet_drop_path_rate", default=0.0)),
        encoder_entangle_positions=bool(_meta_value(meta, "entangle_position_embedding", default=False)),
        # fairseq's decoder adds positions unless --disable-entangle; the HF port never does
        decoder_entangle_positions=False if disable_entangle is None else not bool(disable_entangle),
        freeze_batchnorm=bool(_meta_value(meta, "freeze_resnet", default=False)),
        pad_id=int(_meta_value(meta, "pad_token_id", default=1)),
    )
    fields["name"] = _size_name(fields)
    return GalenConfig(**fields)


def _size_name(fields: Mapping[str, Any]) -> str:
    for name, size in SIZES.items():
        if REFERENCE_PARAMS[name] and all(fields[k] == size[k] for k in
                                          ("d_model", "encoder_layers", "decoder_layers", "ffn_dim")):
            return name
    return "custom"


# -- import ----------------------------------------------------------------------------------------------------
@dataclass
class ImportedCheckpoint:
    model: GalenModel
    layout: str
    source: str
    used_ema: bool
    meta: Any


def _check_buffers(hf_state: Mapping[str, torch.Tensor], cfg: GalenConfig) -> None:
    """The checkpoint's derived buffers must be the ones Galen rebuilds (else the config differs)."""
    expected = {
        "token_rp_bucket": token_relative_buckets(cfg.token_bucket_size, cfg.max_positions),
        "image_rp_bucket": image_relative_buckets(cfg.image_bucket_size),
    }
    for side in ("encoder", "decoder"):
        for name, ours in expected.items():
            theirs = hf_state.get(f"{side}.{name}")
            if theirs is not None and not torch.equal(theirs.long(), ours):
                raise GalenCheckpointError(f"{side}.{name} differs from the table Galen builds for this config; "
                                           "the checkpoint uses another bucket setting than its shapes imply")
    idx = hf_state.get("decoder.image_position_idx")
    if idx is not None:
        ours = code_position_ids(cfg.code_grid, cfg.image_bucket_size, cfg.max_positions + 2)
        n = min(idx.numel(), ours.numel())  # the HF port builds it one short: compare what it has
        if not torch.equal(idx.long()[:n], ours[:n]):
            raise GalenCheckpointError("decoder.image_position_idx differs from the code-image positions Galen "
                                       f"builds for code_image_size={cfg.code_image_size}")


def _untie(hf_state: dict[str, torch.Tensor]) -> None:
    shared = hf_state["encoder.embed_tokens.weight"]
    for key in REFERENCE_TIED:
        other = hf_state.get(key)
        if other is not None and not torch.equal(other, shared):
            raise GalenCheckpointError(f"{key} is not tied to encoder.embed_tokens.weight; Galen models share one "
                                       "embedding matrix (share_all_embeddings), as every released checkpoint does")


def _frozen_batchnorm_counters(hf_state: dict[str, torch.Tensor], cfg: GalenConfig) -> None:
    """A model trained with --freeze-resnet holds FrozenBatchNorm2d layers, which save no
    `num_batches_tracked`; Galen's (frozen) BatchNorm has the counter, and it is never used."""
    if not cfg.freeze_batchnorm:
        return
    for key in [k for k in hf_state if k.startswith("encoder.embed_images.") and k.endswith(".running_mean")]:
        hf_state.setdefault(key[: -len("running_mean")] + "num_batches_tracked", torch.tensor(0))


def to_galen_state(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {hf_to_galen_key(k): v for k, v in hf_state.items()
            if k not in REFERENCE_BUFFERS and k not in REFERENCE_TIED}


def reference_key_name(layout: str, hf_keys: Mapping[str, str]) -> Callable[[str], str]:
    """Galen key -> the name it has (or would have) in the imported file, for error messages:
    `hf_keys` maps the transformers names of this file to its own names."""
    def name(key: str) -> str:
        hf = galen_to_hf_key(key)
        return hf_keys.get(hf) or (hf_to_fairseq_key(hf) if layout == "fairseq" else hf)
    return name


def import_reference(path: str | Path, layout: str, use_ema: bool = False) -> ImportedCheckpoint:
    """Build a Galen model from a fairseq `.pt` file or a transformers-OFA folder, loading strictly."""
    from galen.model.generalist import GalenModel

    path = Path(path)
    if layout == "fairseq":
        if path.is_dir():
            raise GalenCheckpointError(f"{path} is a folder; --from fairseq takes the checkpoint .pt file itself")
        ckpt = read_torch_file(path)
        if not isinstance(ckpt, Mapping) or "model" not in ckpt:
            raise GalenCheckpointError(f"{path} is not a fairseq checkpoint (no 'model' entry); for a transformers "
                                       "folder use --from hf")
        meta = ckpt.get("args") or _meta_value(ckpt.get("cfg"), "model")
        if use_ema:
            ema = (ckpt.get("extra_state") or {}).get("ema")
            if ema is None:
                raise GalenCheckpointError(f"{path} holds no EMA weights (extra_state.ema); import without --ema")
            raw = _state_dict(ema, f"{path} extra_state.ema")
        else:
            raw = _state_dict(ckpt["model"], f"{path} 'model'")
        hf_state = {fairseq_to_hf_key(k): v for k, v in raw.items() if k not in ("encoder.version", "decoder.version")}
        file_names = {fairseq_to_hf_key(k): k for k in raw}
    elif layout == "hf":
        if not path.is_dir():
            raise GalenCheckpointError(f"{path} is not a folder; --from hf takes the transformers-OFA model folder "
                                       "(config.json + pytorch_model.bin)")
        if use_ema:
            raise GalenCheckpointError("transformers-OFA folders hold one set of weights; --ema applies to fairseq")
        config_path = path / "config.json"
        if not config_path.is_file():
            raise GalenCheckpointError(f"{path} has no config.json; copy the whole model folder")
        meta = json.loads(config_path.read_text())
        if meta.get("model_type") not in (None, "ofa"):
            raise GalenCheckpointError(f"{path} holds a {meta.get('model_type')!r} model, not OFA/BiomedGPT")
        if (path / "model.safetensors").is_file():
            from safetensors.torch import load_file
            hf_state = load_file(str(path / "model.safetensors"))
        elif (path / "pytorch_model.bin").is_file():
            hf_state = _state_dict(read_torch_file(path / "pytorch_model.bin"), f"{path}/pytorch_model.bin")
        else:
            raise GalenCheckpointError(f"{path} has neither pytorch_model.bin nor model.safetensors")
        file_names = {k: k for k in hf_state}
    else:
        raise GalenCheckpointError(f"unknown layout {layout!r}; use 'fairseq' or 'hf'")

    cfg = infer_config(hf_state, meta)
    _check_buffers(hf_state, cfg)
    _untie(hf_state)
    _frozen_batchnorm_counters(hf_state, cfg)
    model = GalenModel(cfg)
    load_state_strict(model, to_galen_state(hf_state), source=str(path), names=reference_key_name(layout, file_names),
                      hint=f"Keys are named as in the {layout} checkpoint; the file's layout differs from the "
                           "OFA/BiomedGPT one (or from the architecture its other tensors imply).")
    return ImportedCheckpoint(model.eval(), layout, str(path), use_ema, meta)


# -- export ----------------------------------------------------------------------------------------------------
def hf_config(cfg: GalenConfig) -> dict[str, Any]:
    """transformers-OFA `config.json` for a Galen config."""
    from galen.model.config import BACKBONE_NAMES

    if cfg.resnet_depths not in BACKBONE_NAMES:
        raise GalenCheckpointError(f"ResNet stage depths {cfg.resnet_depths} are not one of the OFA backbones "
                                   f"({', '.join(BACKBONE_NAMES.values())}); this model cannot be exported as OFA")
    if cfg.decoder_entangle_positions:
        raise GalenCheckpointError("the transformers OFA port cannot express decoder_entangle_positions=True")
    return {
        "architectures": ["OFAModel"], "model_type": "ofa", "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
        "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.decoder_layers,
        "num_hidden_layers": cfg.encoder_layers,
        "encoder_attention_heads": cfg.attention_heads, "decoder_attention_heads": cfg.attention_heads,
        "encoder_ffn_dim": cfg.ffn_dim, "decoder_ffn_dim": cfg.ffn_dim, "activation_function": "gelu",
        "dropout": cfg.dropout, "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout, "encoder_drop_path_rate": cfg.encoder_drop_path_rate,
        "decoder_drop_path_rate": cfg.decoder_drop_path_rate, "resnet_drop_path_rate": cfg.resnet_drop_path_rate,
        "max_position_embeddings": cfg.max_positions, "token_bucket_size": cfg.token_bucket_size,
        "image_bucket_size": cfg.image_bucket_size, "attn_scale_factor": cfg.attn_scale_factor,
        "code_image_size": cfg.code_image_size, "resnet_type": BACKBONE_NAMES[cfg.resnet_depths],
        "normformer": cfg.normformer, "entangle_position_embedding": cfg.encoder_entangle_positions,
        # not read by the port; kept so a re-import is lossless
        "freeze_resnet": cfg.freeze_batchnorm, "patch_image_size": cfg.image_size,
        "code_layernorm_embedding": cfg.code_layernorm_embedding, "add_type_embedding": True,
        "layernorm_embedding": True, "patch_layernorm_embedding": True, "encoder_normalize_before": True,
        "decoder_normalize_before": True, "scale_embedding": False, "share_decoder_input_output_embed": True,
        "pad_token_id": cfg.pad_id, "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
        "decoder_start_token_id": cfg.bos_id, "forced_eos_token_id": cfg.eos_id, "is_encoder_decoder": True,
        "use_cache": True, "resnet_model_path": None,
    }


def to_hf_state(model: GalenModel) -> dict[str, torch.Tensor]:
    """Galen state -> transformers-OFA state, with the port's buffers and tied copies."""
    cfg: GalenConfig = model.cfg
    out = {galen_to_hf_key(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    shared = out["encoder.embed_tokens.weight"]
    for key in REFERENCE_TIED:
        out[key] = shared
    token = token_relative_buckets(cfg.token_bucket_size, cfg.max_positions)
    image = image_relative_buckets(cfg.image_bucket_size)
    for side in ("encoder", "decoder"):
        out[f"{side}.token_rp_bucket"], out[f"{side}.image_rp_bucket"] = token, image
    # the port's length (one short of fairseq's), so the port loads it without complaint
    out["decoder.image_position_idx"] = code_position_ids(cfg.code_grid, cfg.image_bucket_size, cfg.max_positions + 1)
    return out


def export_hf_ofa(model: GalenModel, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write a transformers-OFA-layout folder: config.json + pytorch_model.bin (+ tokenizer files)."""
    config = hf_config(model.cfg)  # refuse before writing anything
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(to_hf_state(model), out / "pytorch_model.bin")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save(out)
        text: Any = getattr(tokenizer, "text", None)
        if hasattr(text, "save_hf"):  # GPT-2 BPE: also the port's vocab.json + merges.txt
            text.save_hf(out, tokenizer.num_codes, tokenizer.num_bins)
    return out
