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
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from galen.model.checkpoint import check_shapes, load_state_strict, model_shapes, safetensors_shapes
from galen.model.config import REFERENCE_PARAMS, SIZES, GalenConfig
from galen.model.errors import GalenCheckpointError, GalenConfigError, read_json
from galen.model.positions import code_position_ids, image_relative_buckets, token_relative_buckets
from galen.model.torch_files import read_torch_file as _read_untrusted_torch_file

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
    """torch.load with the weights-only unpickler plus fairseq's config classes; never runs code, and the
    zip is checked first (no compressed records, no legacy format: see model.torch_files)."""
    return _read_untrusted_torch_file(path, _allowed_globals())


_NODE_REFERENCE = re.compile(r"^\$\{([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)\}$")


META_ENTRIES = 100_000  # a fairseq config has a few hundred; a bigger (or DAG-shaped) one is refused


def plain_meta(obj: Any) -> Any:
    """A checkpoint's config (argparse.Namespace or omegaconf containers) as plain dicts and lists,
    **never resolved**: omegaconf resolvers such as `${oc.env:VAR}` would read this machine's
    environment on behalf of an untrusted file, so they stay the literal strings they are. Only plain
    references to other config values (`${task.patch_image_size}`) are followed, inside the file. At
    most META_ENTRIES entries are visited (a pickle can share one list many times over)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        DictConfig = ListConfig = OmegaConf = None  # type: ignore[assignment,misc]  # noqa: N806
    left = [META_ENTRIES]

    def items(container: Any) -> list[tuple[Any, Any]]:
        try:
            if OmegaConf.is_interpolation(container) or container._is_none() or container._is_missing():
                return []
            if isinstance(container, DictConfig):
                return list(container.items_ex(resolve=False))
            return list(enumerate(container._iter_ex(resolve=False)))
        except Exception as e:  # noqa: BLE001 - a malformed container from an untrusted file
            raise GalenCheckpointError(f"the checkpoint's omegaconf config cannot be read ({type(e).__name__})") \
                from e

    def plain(value: Any, depth: int = 0) -> Any:
        left[0] -= 1
        if left[0] < 0 or depth > 64:
            raise GalenCheckpointError(f"the checkpoint's config has over {META_ENTRIES:,} entries or 64 levels; "
                                       "it is not a fairseq/OFA config")
        if DictConfig is not None and isinstance(value, DictConfig):
            return {str(k): plain(v, depth + 1) for k, v in items(value)}
        if ListConfig is not None and isinstance(value, ListConfig):
            return [plain(v, depth + 1) for _, v in items(value)]
        if isinstance(value, argparse.Namespace):
            value = vars(value)
        if isinstance(value, Mapping):
            return {str(k): plain(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v, depth + 1) for v in value]
        return value

    root = plain(obj)

    def follow(value: Any, depth: int = 0) -> Any:
        if isinstance(value, dict):
            return {k: follow(v) for k, v in value.items()}
        if isinstance(value, list):
            return [follow(v) for v in value]
        m = _NODE_REFERENCE.match(value) if isinstance(value, str) else None
        if m is None or depth > 16 or not isinstance(root, dict):
            return value
        node: Any = root
        for part in m.group(1).split("."):
            if not isinstance(node, dict) or part not in node:
                return value  # a dangling reference stays the literal text
            node = node[part]
        if isinstance(node, (dict, list)):
            return value  # only values are followed: a container would copy (and could multiply) the tree
        return follow(node, depth + 1)

    return follow(root)


def _state_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GalenCheckpointError(f"{where} is not a state dict of tensors")
    return dict(obj)


# -- architecture inference ------------------------------------------------------------------------------
def _count(state: Mapping[str, Any], pattern: str) -> int:
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


# tensors whose shapes give the architecture: name -> number of dimensions
_SHAPE_KEYS = {"encoder.embed_tokens.weight": 2, "encoder.token_rel_pos_table_list.0.weight": 2,
               "encoder.image_rel_pos_table_list.0.weight": 2, "encoder.layers.0.fc1.weight": 2,
               "encoder.embed_positions.weight": 2}


def _shape(hf_state: Mapping[str, Any], key: str) -> tuple[int, ...]:
    """The shape of a tensor, or the shape itself when given shapes (a safetensors header)."""
    value = hf_state[key]
    return tuple(int(n) for n in (value.shape if isinstance(value, torch.Tensor) else value))


def _meta_typed(meta: Any, name: str, default: Any, kind: type) -> Any:
    """A field of the checkpoint's own config as `kind` (int, float, bool), or GalenCheckpointError
    naming the field and showing the value as the file holds it (never resolved)."""
    value = _meta_value(meta, name, default=default)
    if kind is bool:
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
    elif not isinstance(value, bool):
        try:
            number = kind(value)
            if kind is int or math.isfinite(number):
                return number
        except (TypeError, ValueError, OverflowError):
            pass
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    raise GalenCheckpointError(f"the checkpoint's config field {name} is {shown}, not "
                               f"{'true/false' if kind is bool else 'an integer' if kind is int else 'a number'}; "
                               "the file's config is damaged or not a BiomedGPT/OFA one")


def infer_config(hf_state: Mapping[str, torch.Tensor] | Mapping[str, tuple[int, ...]], meta: Any) -> GalenConfig:
    """GalenConfig from the tensors' shapes (structure) and the checkpoint's own config (flags).
    The result is validated like any config (types, ranges, parameter limit) before anything is built."""
    missing = [k for k in SIGNATURE_KEYS if k not in hf_state]
    if missing:
        sample = ", ".join(sorted(hf_state)[:6])
        raise GalenCheckpointError(f"this is not a BiomedGPT/OFA generalist checkpoint: it lacks {', '.join(missing)} "
                                   f"(its keys look like: {sample} ...). Galen imports OFA-architecture models only.")
    absent = [k for k in _SHAPE_KEYS if k not in hf_state]
    bad = [f"{k} {_shape(hf_state, k)}" for k, ndim in _SHAPE_KEYS.items()
           if k in hf_state and (len(_shape(hf_state, k)) != ndim or min(_shape(hf_state, k)) < 1)]
    if absent or bad:
        raise GalenCheckpointError("the checkpoint's architecture cannot be read from its tensors: "
                                   + "; ".join(([f"it lacks {', '.join(absent)}"] if absent else [])
                                               + ([f"unexpected shapes {', '.join(bad)}"] if bad else [])))
    vocab, d_model = _shape(hf_state, "encoder.embed_tokens.weight")
    heads = _shape(hf_state, "encoder.token_rel_pos_table_list.0.weight")[1]
    depths = tuple(_count(hf_state, rf"^encoder\.embed_images\.layer{i}\.(\d+)\.") for i in (1, 2, 3))
    token_buckets = (_shape(hf_state, "encoder.token_rel_pos_table_list.0.weight")[0] + 1) // 2
    image_distances = _shape(hf_state, "encoder.image_rel_pos_table_list.0.weight")[0]
    image_grid = int(round((max(image_distances - 3, 0) ** 0.5 + 1) / 2))
    scale_attn = "encoder.layers.0.self_attn_mid_layer_norm.weight" in hf_state
    scale_fc = "encoder.layers.0.ffn_layer_norm.weight" in hf_state
    if scale_attn != scale_fc:
        raise GalenCheckpointError("the checkpoint has NormFormer norms after attention but not in the FFN (or the "
                                   "reverse); Galen's `normformer` switch covers both together")
    disable_entangle = _meta_value(meta, "disable_entangle", default=None)
    if _meta_typed(meta, "sync_bn", False, bool):
        raise GalenCheckpointError("the checkpoint was trained with --sync-bn, whose BatchNorm layers use eps 1e-3; "
                                   "Galen's backbone uses the standard 1e-5 and would compute something else")
    fields: dict[str, Any] = dict(
        vocab_size=int(vocab), d_model=int(d_model), attention_heads=int(heads),
        encoder_layers=_count(hf_state, r"^encoder\.layers\.(\d+)\."),
        decoder_layers=_count(hf_state, r"^decoder\.layers\.(\d+)\."),
        ffn_dim=_shape(hf_state, "encoder.layers.0.fc1.weight")[0], resnet_depths=depths,
        max_positions=_shape(hf_state, "encoder.embed_positions.weight")[0] - 2,
        token_bucket_size=int(token_buckets), image_bucket_size=image_grid,
        normformer=scale_attn, head_scale="encoder.layers.0.self_attn.c_attn" in hf_state,
        code_layernorm_embedding="decoder.code_layernorm_embedding.weight" in hf_state,
        attn_scale_factor=_meta_typed(meta, "attn_scale_factor", 2.0, float),
        code_image_size=_meta_typed(meta, "code_image_size", 128, int),
        image_size=_meta_typed(meta, "patch_image_size", 256, int),  # e.g. 384 for base VQA fine-tunes
        dropout=_meta_typed(meta, "dropout", 0.1, float),
        attention_dropout=_meta_typed(meta, "attention_dropout", 0.0, float),
        activation_dropout=_meta_typed(meta, "activation_dropout", 0.0, float),
        encoder_drop_path_rate=_meta_typed(meta, "encoder_drop_path_rate", 0.0, float),
        decoder_drop_path_rate=_meta_typed(meta, "decoder_drop_path_rate", 0.0, float),
        resnet_drop_path_rate=_meta_typed(meta, "resnet_drop_path_rate", 0.0, float),
        encoder_entangle_positions=_meta_typed(meta, "entangle_position_embedding", False, bool),
        # fairseq's decoder adds positions unless --disable-entangle; the HF port never does
        decoder_entangle_positions=(False if disable_entangle is None
                                    else not _meta_typed(meta, "disable_entangle", None, bool)),
        freeze_batchnorm=_meta_typed(meta, "freeze_resnet", False, bool),
        pad_id=_meta_typed(meta, "pad_token_id", 1, int),
    )
    fields["name"] = _size_name(fields)
    try:
        return GalenConfig(**fields)
    except GalenConfigError as e:
        raise GalenConfigError(f"the checkpoint's tensors and config describe a model Galen will not build: {e}") \
            from e


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
        # plain containers, never resolved: the file's omegaconf interpolations must not read our environment
        meta = plain_meta(ckpt.get("args")) or _meta_value(plain_meta(ckpt.get("cfg")), "model")
        if use_ema:
            extra_state = ckpt.get("extra_state") or {}
            ema = extra_state.get("ema") if isinstance(extra_state, Mapping) else None
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
        meta = read_json(config_path, dict, "copy config.json from the model's release", GalenCheckpointError)
        if meta.get("model_type") not in (None, "ofa"):
            raise GalenCheckpointError(f"{path} holds a {str(meta.get('model_type'))[:80]!r} model, not OFA/BiomedGPT")
        if (path / "model.safetensors").is_file():
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            weights = path / "model.safetensors"
            # the architecture from the header's shapes, validated before any tensor is read
            infer_config(safetensors_shapes(weights), meta)
            try:
                hf_state = load_file(str(weights))
            except (SafetensorError, OSError) as e:
                raise GalenCheckpointError(f"{weights} cannot be read as safetensors ({e}); the file is truncated "
                                           "or corrupt — copy it again from its source") from e
        elif (path / "pytorch_model.bin").is_file():
            hf_state = _state_dict(read_torch_file(path / "pytorch_model.bin"), f"{path}/pytorch_model.bin")
        else:
            raise GalenCheckpointError(f"{path} has neither pytorch_model.bin nor model.safetensors")
        file_names = {k: k for k in hf_state}
    else:
        raise GalenCheckpointError(f"unknown layout {layout!r}; use 'fairseq' or 'hf'")

    cfg = infer_config(hf_state, meta)  # validated: types, ranges, parameter limit
    _check_buffers(hf_state, cfg)
    _untie(hf_state)
    _frozen_batchnorm_counters(hf_state, cfg)
    state = to_galen_state(hf_state)
    names = reference_key_name(layout, file_names)
    hint = (f"Keys are named as in the {layout} checkpoint; the file's layout differs from the OFA/BiomedGPT one "
            "(or from the architecture its other tensors imply).")
    # every tensor's declared shape against the config before the model is allocated
    check_shapes(model_shapes(cfg), {k: tuple(v.shape) for k, v in state.items()}, str(path), names, hint)
    model = GalenModel(cfg)
    load_state_strict(model, state, source=str(path), names=names, hint=hint)
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
