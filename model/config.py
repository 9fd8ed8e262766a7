"""Typed configuration of the generalist model and the registry of named sizes.

Sizes are data (litgpt style): the model code branches only on config fields, never on a
size's name. The reference sizes follow OFA/BiomedGPT (`ofa_tiny` ... `ofa_huge`); `nano` is
ours, small enough to train on a laptop CPU in minutes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galen.model.errors import GalenConfigError, read_json

# Reference vocabulary: 4 specials + 50,260 GPT-2 BPE pieces + <mask> + 8192 codes + 1000 bins.
REFERENCE_VOCAB_SIZE = 59457

# Largest model a config may describe (parameters, counted from the config before anything is built):
# ~4.3x the largest named size `huge` (~930M), i.e. 16 GB of fp32 weights. A config file arrives with
# a model folder or a downloaded checkpoint, so it is untrusted and cannot raise its own limit: the
# person running Galen can, with the environment variable below (or `max_parameters=` in code).
MAX_PARAMETERS = 4_000_000_000
MAX_PARAMETERS_ENV = "GALEN_MAX_PARAMETERS"

# ResNet depths of stages 1-3 (stage 4 is never built) for the backbones OFA uses.
RESNET_STAGE_DEPTHS: dict[str, tuple[int, int, int]] = {
    "resnet50": (3, 4, 6),
    "resnet101": (3, 4, 23),
    "resnet152": (3, 8, 36),
}


@dataclass
class GalenConfig:
    """Everything that determines the generalist network's shape and numerics."""

    name: str = "custom"
    vocab_size: int = REFERENCE_VOCAB_SIZE
    d_model: int = 256
    encoder_layers: int = 4
    decoder_layers: int = 4
    attention_heads: int = 4
    ffn_dim: int = 1024
    resnet_depths: tuple[int, int, int] = (3, 4, 6)

    # positions: absolute embeddings only ever enter as attention bias (decoupled)
    max_positions: int = 1024          # text positions (embedding table has +2 rows, fairseq style)
    token_bucket_size: int = 256       # 1D relative buckets for text
    image_bucket_size: int = 42        # 2D relative buckets for a grid of at most 42x42 patches
    attn_scale_factor: float = 2.0     # q scaled by (head_dim * factor) ** -0.5
    patch_size: int = 16               # ResNet stages 1-3 downsample by 16
    image_size: int = 256              # default input resolution
    code_image_size: int = 128         # image-infilling crops; codes are on an (size/8)^2 grid
    num_codes: int = 8192
    num_bins: int = 1000

    # regularisation
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_drop_path_rate: float = 0.1
    decoder_drop_path_rate: float = 0.1
    resnet_drop_path_rate: float = 0.0

    # fidelity switches (where released OFA/BiomedGPT runs differ from plain Transformers)
    normformer: bool = True            # LN after attention(s) and inside the FFN (--scale-attn/--scale-fc)
    head_scale: bool = True            # one learnable scalar per head (--scale-heads)
    encoder_entangle_positions: bool = False  # add absolute positions to encoder embeddings too
    decoder_entangle_positions: bool = False  # fairseq adds them unless --disable-entangle (released runs set it)
    freeze_batchnorm: bool = False     # backbone BatchNorm fixed while training: statistics and affine (--freeze-resnet)
    code_layernorm_embedding: bool = True

    # special ids of the unified vocabulary
    bos_id: int = 0
    pad_id: int = 1
    eos_id: int = 2
    unk_id: int = 3

    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_field_types(self)  # types and ranges first: the checks below compute with the values
        self.resnet_depths = tuple(self.resnet_depths)  # type: ignore[assignment]
        problems = []
        if self.d_model % self.attention_heads:
            problems.append(f"d_model={self.d_model} is not divisible by attention_heads={self.attention_heads}")
        if self.vocab_size <= 4:
            problems.append(f"vocab_size={self.vocab_size} leaves no room for text tokens")
        if len(self.resnet_depths) != 3 or min(self.resnet_depths) < 1:
            problems.append(f"resnet_depths={self.resnet_depths} must be three positive stage depths")
        if self.image_size % self.patch_size:
            problems.append(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.image_size // self.patch_size > self.image_bucket_size:
            problems.append(f"image_size={self.image_size} gives more than {self.image_bucket_size} patches per side")
        if self.code_image_size % 8 or self.code_image_size // 8 > self.image_bucket_size:
            problems.append(f"code_image_size={self.code_image_size} must be a multiple of 8 whose code grid "
                            f"(size/8) fits the {self.image_bucket_size}-patch position grid")
        for name in ("bos_id", "pad_id", "eos_id", "unk_id"):
            if getattr(self, name) >= self.vocab_size:
                problems.append(f"{name}={getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})")
        if problems:
            raise GalenConfigError("invalid model config: " + "; ".join(problems))
        check_parameter_budget(self)

    def num_parameters(self) -> int:
        """Parameters of the model this config builds, counted from the fields alone (no tensor is made);
        equal to GalenModel(cfg).num_parameters()."""
        return count_parameters(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention_heads

    @property
    def attention_scale(self) -> float:
        return float(self.head_dim * self.attn_scale_factor) ** -0.5

    @property
    def max_image_side(self) -> int:
        """Largest square image the 2D relative-position grid covers (42 patches x 16 px)."""
        return self.image_bucket_size * self.patch_size

    @property
    def code_grid(self) -> int:
        return self.code_image_size // 8

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["resnet_depths"] = list(self.resnet_depths)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GalenConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GalenConfigError(
                f"unknown model config keys {unknown}; this Galen understands {sorted(known)}. "
                "Was the config written by a newer Galen? Upgrade, or remove those keys.")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GalenConfig:
        """A config.json, checked (types, ranges, parameter limit) before anything is built from it."""
        try:
            return cls.from_dict(read_json(path, dict, "restore it from where the model was saved",
                                           GalenConfigError))
        except GalenConfigError as e:
            if str(path) in str(e):
                raise
            raise GalenConfigError(f"{path}: {e}") from e


# -- validation of untrusted configs (config.json of a model folder, a checkpoint's shapes) ----------------
# Ranges keep every table the model builds from its config small before anything is allocated: the text
# bucket table is max_positions^2 entries and the image one (image_bucket_size^2 + 1)^2 (a few MB at the
# reference 1024 / 42; 4096 / 64 stays under ~100 MB); layers are bounded so building never loops for long.
_INT_RANGES: dict[str, tuple[int, int]] = {
    "vocab_size": (5, 1 << 24), "d_model": (1, 1 << 16), "encoder_layers": (1, 256), "decoder_layers": (1, 256),
    "attention_heads": (1, 1024), "ffn_dim": (1, 1 << 18), "max_positions": (8, 4096),
    "token_bucket_size": (2, 8192), "image_bucket_size": (1, 64), "patch_size": (1, 1024),
    "image_size": (1, 16384), "code_image_size": (8, 16384), "num_codes": (0, 1 << 20), "num_bins": (0, 1 << 20),
    "bos_id": (0, 1 << 24), "pad_id": (0, 1 << 24), "eos_id": (0, 1 << 24), "unk_id": (0, 1 << 24),
}
_FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "attn_scale_factor": (1e-6, 1e6), "dropout": (0.0, 1.0), "attention_dropout": (0.0, 1.0),
    "activation_dropout": (0.0, 1.0), "encoder_drop_path_rate": (0.0, 1.0), "decoder_drop_path_rate": (0.0, 1.0),
    "resnet_drop_path_rate": (0.0, 1.0),
}
_BOOL_FIELDS = ("normformer", "head_scale", "encoder_entangle_positions", "decoder_entangle_positions",
                "freeze_batchnorm", "code_layernorm_embedding")
MAX_RESNET_STAGE_DEPTH = 64  # resnet152's deepest stage has 36 blocks


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_field_types(cfg: GalenConfig) -> None:
    """Every field has its type and a value in range, or GalenConfigError lists all that do not. Values
    are normalised (int/float/bool/tuple) so the other checks and the model can compute with them."""
    problems = []
    for name, (lo, hi) in _INT_RANGES.items():
        value = getattr(cfg, name)
        if not _is_int(value):
            problems.append(f"{name} must be an integer, got {_shown(value)}")
        elif not lo <= value <= hi:
            problems.append(f"{name}={value} is outside [{lo:,}, {hi:,}]")
        else:
            setattr(cfg, name, int(value))
    for name, (flo, fhi) in _FLOAT_RANGES.items():
        value = getattr(cfg, name)
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            problems.append(f"{name} must be a number, got {_shown(value)}")
        elif not (math.isfinite(float(value)) and flo <= float(value) <= fhi):
            problems.append(f"{name}={value} is outside [{flo:g}, {fhi:g}]")
        else:
            setattr(cfg, name, float(value))
    for name in _BOOL_FIELDS:
        if not isinstance(getattr(cfg, name), bool):
            problems.append(f"{name} must be true or false, got {_shown(getattr(cfg, name))}")
    depths = cfg.resnet_depths
    if (not isinstance(depths, (list, tuple)) or len(depths) != 3
            or not all(_is_int(d) and 1 <= d <= MAX_RESNET_STAGE_DEPTH for d in depths)):
        problems.append(f"resnet_depths must be three stage depths in [1, {MAX_RESNET_STAGE_DEPTH}], got "
                        f"{_shown(depths)}")
    else:
        cfg.resnet_depths = tuple(int(d) for d in depths)  # type: ignore[assignment]
    if not isinstance(cfg.name, str) or len(cfg.name) > 200:
        problems.append(f"name must be a string of at most 200 characters, got {_shown(cfg.name)}")
    if not isinstance(cfg.extra, dict):
        problems.append(f"extra must be a mapping, got {_shown(cfg.extra)}")
    if problems:
        raise GalenConfigError("invalid model config: " + "; ".join(problems))


def _resnet_parameters(depths: tuple[int, int, int]) -> int:
    """Parameters of timm's ResNet stem + bottleneck stages 1-3 (BatchNorm: weight and bias)."""
    total = 3 * 64 * 7 * 7 + 2 * 64  # conv1 7x7 + bn1
    inplanes = 64
    for planes, blocks in zip((64, 128, 256), depths):
        out = 4 * planes
        for b in range(blocks):
            cin = inplanes if b == 0 else out
            total += cin * planes + 2 * planes + 9 * planes * planes + 2 * planes + planes * out + 2 * out
            if b == 0:  # downsample: 1x1 conv + BatchNorm
                total += cin * out + 2 * out
        inplanes = out
    return total


def count_parameters(cfg: GalenConfig) -> int:
    """GalenModel(cfg).num_parameters(), from the config's numbers (pure arithmetic: nothing is built)."""
    d, f, h, nf = cfg.d_model, cfg.ffn_dim, cfg.attention_heads, cfg.normformer
    g = cfg.image_bucket_size
    linear_dd = d * d + d
    attention = 4 * linear_dd + (h if cfg.head_scale else 0)
    ffn = 2 * d * f + f + d + (2 * f if nf else 0)
    mid_ln = 2 * d if nf else 0

    def positions(layers: int) -> int:  # add_position_tables
        return ((cfg.max_positions + 2) * d + (g * g + 1) * d + 4 * d
                + layers * (2 * cfg.token_bucket_size - 1) * h + layers * ((2 * g - 1) ** 2 + 3) * h)

    encoder = (2 * d + 2 * d + _resnet_parameters(cfg.resnet_depths) + 1024 * d + d + 2 * d
               + positions(cfg.encoder_layers) + 2 * linear_dd
               + cfg.encoder_layers * (2 * d + attention + mid_ln + 2 * d + ffn) + 2 * d)
    decoder = (2 * d + (2 * d if cfg.code_layernorm_embedding else 0) + positions(cfg.decoder_layers)
               + 4 * linear_dd + cfg.decoder_layers * (3 * 2 * d + 2 * attention + 2 * mid_ln + ffn) + 2 * d)
    return cfg.vocab_size * d + encoder + decoder


def max_parameters() -> int:
    """The parameter limit: MAX_PARAMETERS, or the environment variable GALEN_MAX_PARAMETERS."""
    raw = os.environ.get(MAX_PARAMETERS_ENV)
    if raw is None or not raw.strip():
        return MAX_PARAMETERS
    try:
        value = int(raw.replace("_", "").strip())
    except ValueError:
        value = 0
    if value < 1:
        raise GalenConfigError(f"{MAX_PARAMETERS_ENV}={raw!r} must be a positive whole number of parameters")
    return value


def check_parameter_budget(cfg: GalenConfig, limit: int | None = None) -> int:
    """The config's parameter count, or GalenConfigError when it is above `limit` (default max_parameters())."""
    limit = max_parameters() if limit is None else limit
    n = count_parameters(cfg)
    if n > limit:
        raise GalenConfigError(
            f"invalid model config: it describes {n:,} parameters, over the limit of {limit:,} (the largest named "
            f"size, huge, has ~930M); a config this size is refused before anything is allocated. If you mean it, "
            f"raise the limit with the environment variable {MAX_PARAMETERS_ENV}")
    return n


def _size(name: str, layers: tuple[int, int], d: int, ffn: int, heads: int, resnet: str, **kw: Any) -> dict[str, Any]:
    return dict(name=name, encoder_layers=layers[0], decoder_layers=layers[1], d_model=d, ffn_dim=ffn,
                attention_heads=heads, resnet_depths=RESNET_STAGE_DEPTHS[resnet], **kw)


# Named sizes. `reference_params` is the count the BiomedGPT/OFA release reports (None for ours).
SIZES: dict[str, dict[str, Any]] = {
    "nano": _size("nano", (2, 2), 128, 512, 4, "resnet50", image_size=128) | {"resnet_depths": (1, 1, 1)},
    "tiny": _size("tiny", (4, 4), 256, 1024, 4, "resnet50"),
    "medium": _size("medium", (4, 4), 512, 2048, 8, "resnet101"),
    "base": _size("base", (6, 6), 768, 3072, 12, "resnet101"),
    "large": _size("large", (12, 12), 1024, 4096, 16, "resnet152"),
    "huge": _size("huge", (24, 12), 1280, 5120, 16, "resnet152"),
}
REFERENCE_PARAMS: dict[str, int | None] = {
    "nano": None, "tiny": 33_000_000, "medium": 93_000_000, "base": 182_000_000,
    "large": 470_000_000, "huge": 930_000_000,
}
BACKBONE_NAMES = {v: k for k, v in RESNET_STAGE_DEPTHS.items()}


def get_config(size: str, **overrides: Any) -> GalenConfig:
    """The config of a named size, with field overrides (e.g. `vocab_size` of a trained tokenizer)."""
    if size not in SIZES:
        raise GalenConfigError(f"unknown model size {size!r}; choose one of: {', '.join(SIZES)}")
    fields = dict(SIZES[size])
    bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(GalenConfig)})
    if bad:
        raise GalenConfigError(f"unknown config overrides {bad} for size {size!r}")
    fields.update(overrides)
    return GalenConfig(**fields)
