"""Typed configuration of the generalist model and the registry of named sizes.

Sizes are data (litgpt style): the model code branches only on config fields, never on a
size's name. The reference sizes follow OFA/BiomedGPT (`ofa_tiny` ... `ofa_huge`); `nano` is
ours, small enough to train on a laptop CPU in minutes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galen.model.errors import GalenConfigError, read_json

# Reference vocabulary: 4 specials + 50,260 GPT-2 BPE pieces + <mask> + 8192 codes + 1000 bins.
REFERENCE_VOCAB_SIZE = 59457

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
        if problems:
            raise GalenConfigError("invalid model config: " + "; ".join(problems))

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
        return cls.from_dict(read_json(path, dict, "restore it from where the model was saved", GalenConfigError))


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
