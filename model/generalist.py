"""The generalist encoder-decoder (BiomedGPT = OFA architecture), top to bottom in reading order.

    images --ResNet stages 1-3--> patches --Linear--> (+type 1, LN) --+
                                                                      +--> encoder --> decoder --> logits
    prompt ids --shared embedding--> (+type 0, LN) -------------------+           ^
                                                        target ids --shared embedding

Facts this file follows (see ../shared/reference-check/README.md): positions are never added to
token embeddings; each attention adds an absolute-position bias plus a per-layer relative bias
(1D text buckets, 2D image buckets); queries are scaled by (head_dim*2)^-0.5; pre-LN blocks with
NormFormer LayerNorms and a learnable per-head scale; one embedding matrix is the encoder input,
the decoder input and the output projection. Attention runs through
`F.scaled_dot_product_attention` with the bias as its float mask, so fused kernels run on GPU.
Parameter names follow the transformers port of OFA, so checkpoint import is a short rename table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from galen.model.config import GalenConfig, get_config
from galen.model.errors import GalenInputError
from galen.model.positions import (
    AbsolutePositionBias,
    RelativeBuckets,
    image_position_ids,
    num_image_distances,
    relative_bias,
)
from galen.model.vision import BACKBONE_CHANNELS, ResNetStages, check_images


def linear_drop_path(rate: float, layers: int) -> list[float]:
    """Drop-path probability rising linearly from 0 at the first layer to `rate` at the last."""
    return [rate * i / max(layers - 1, 1) for i in range(layers)]


def add_position_tables(module: nn.Module, cfg: GalenConfig, layers: int) -> None:
    """The position parameters encoder and decoder each own: absolute tables, their LayerNorms, and
    per-layer relative tables (1D text buckets, 2D image buckets)."""
    d, heads = cfg.d_model, cfg.attention_heads
    module.embed_positions = nn.Embedding(cfg.max_positions + 2, d)
    module.embed_image_positions = nn.Embedding(cfg.image_bucket_size ** 2 + 1, d)
    module.pos_ln, module.image_pos_ln = nn.LayerNorm(d), nn.LayerNorm(d)
    module.token_rel_pos_table_list = nn.ModuleList(
        nn.Embedding(2 * cfg.token_bucket_size - 1, heads) for _ in range(layers))
    module.image_rel_pos_table_list = nn.ModuleList(
        nn.Embedding(num_image_distances(cfg.image_bucket_size), heads) for _ in range(layers))


def _masked(bias: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
    """Add a key-padding mask (B, S) to a bias (B|1, H, T, S); masked keys get the dtype's minimum.

    A finite minimum instead of -inf keeps fully-masked rows finite (uniform) instead of NaN.
    """
    if key_padding is None or not bool(key_padding.any()):
        return bias
    return bias.masked_fill(key_padding[:, None, None, :], torch.finfo(bias.dtype).min)


class PositionTables(nn.Module):
    """What add_position_tables sets on the encoder and the decoder (declared for type checkers:
    nn.Module.__getattr__ is untyped)."""

    embed_positions: nn.Embedding
    embed_image_positions: nn.Embedding
    pos_ln: nn.LayerNorm
    image_pos_ln: nn.LayerNorm
    token_rel_pos_table_list: nn.ModuleList
    image_rel_pos_table_list: nn.ModuleList


class Attention(nn.Module):
    """Multi-head attention with an additive bias and OFA's per-head output scale (`c_attn`)."""

    def __init__(self, cfg: GalenConfig):
        super().__init__()
        d, self.heads, self.scale = cfg.d_model, cfg.attention_heads, cfg.attention_scale
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.c_attn = nn.Parameter(torch.ones(self.heads)) if cfg.head_scale else None
        self.dropout = cfg.attention_dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, T, d) -> (B, H, T, d_head)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q = self.split_heads(self.q_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale,
                                             dropout_p=self.dropout if self.training else 0.0)
        if self.c_attn is not None:
            out = out * self.c_attn.view(1, -1, 1, 1).to(out.dtype)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """fc1 -> GELU (erf) -> [NormFormer LN] -> fc2."""

    def __init__(self, cfg: GalenConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.d_model, cfg.ffn_dim), nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.ffn_layer_norm = nn.LayerNorm(cfg.ffn_dim) if cfg.normformer else nn.Identity()
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layer_norm(self.activation_dropout(F.gelu(self.fc1(x)))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: GalenConfig, drop_path: float):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.self_attn = Attention(cfg)
        self.self_attn_mid_layer_norm = nn.LayerNorm(cfg.d_model) if cfg.normformer else nn.Identity()
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.self_attn_layer_norm(x)
        h = self.self_attn(h, *self.self_attn.project_kv(h), bias)
        x = x + self.drop_path(self.dropout(self.self_attn_mid_layer_norm(h)))
        h = self.ffn(self.final_layer_norm(x))
        return x + self.drop_path(self.dropout(h))


@dataclass
class EncoderOutput:
    hidden: torch.Tensor          # (B, S, d) after the final LayerNorm; image patches first
    padding_mask: torch.Tensor    # (B, S) True where the position is padding
    positions: torch.Tensor       # (1, S, d) layer-normed absolute position embeddings (cross-attn keys)
    num_image_tokens: int

    def index_select(self, index: torch.Tensor) -> EncoderOutput:
        """Rows of the batch (e.g. expanded per beam or per candidate answer)."""
        return EncoderOutput(self.hidden.index_select(0, index), self.padding_mask.index_select(0, index),
                             self.positions, self.num_image_tokens)


def _type_id(kind: int, device: torch.device) -> torch.Tensor:
    """Token type 0 (text) or 1 (image), looked up through the embedding module (not its weight)
    so that DeepSpeed ZeRO-3 gathers the table before use."""
    return torch.tensor(kind, dtype=torch.long, device=device)


class Encoder(PositionTables):
    """Image patches then text tokens through a bidirectional transformer."""

    def __init__(self, cfg: GalenConfig, buckets: RelativeBuckets):
        super().__init__()
        self.cfg, d, heads = cfg, cfg.d_model, cfg.attention_heads
        self.buckets = [buckets]  # held in a list: owned (and moved between devices) by the model
        self.type_embedding = nn.Embedding(2, d)
        self.layernorm_embedding = nn.LayerNorm(d)
        self.embed_images = ResNetStages(cfg.resnet_depths, cfg.resnet_drop_path_rate, cfg.freeze_batchnorm)
        self.image_proj = nn.Linear(BACKBONE_CHANNELS, d)
        self.patch_layernorm_embedding = nn.LayerNorm(d)
        add_position_tables(self, cfg, cfg.encoder_layers)
        self.abs_pos = AbsolutePositionBias(d, heads, cfg.attention_scale)
        drop_paths = linear_drop_path(cfg.encoder_drop_path_rate, cfg.encoder_layers)
        self.layers = nn.ModuleList(EncoderLayer(cfg, p) for p in drop_paths)
        self.layer_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)

    def embed_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> patch embeddings (B, N, d) and their grid position ids (N,)."""
        feats = self.embed_images(images)
        rows, cols = feats.shape[-2:]
        ids = image_position_ids(rows, cols, self.cfg.image_bucket_size).to(images.device)
        x = self.image_proj(feats.flatten(2).transpose(1, 2))
        if self.cfg.encoder_entangle_positions:
            x = x + self.embed_image_positions(ids)
        x = self.patch_layernorm_embedding(x + self.type_embedding(_type_id(1, x.device)))
        return self.dropout(x), ids

    def forward(self, token_embeddings: torch.Tensor | None, input_ids: torch.Tensor | None,
                images: torch.Tensor | None = None, patch_masks: torch.Tensor | None = None) -> EncoderOutput:
        parts, pads, positions = [], [], []
        num_image = 0
        if images is not None:
            x_img, image_ids = self.embed_image(images)
            num_image = x_img.shape[1]
            keep = torch.ones(images.shape[0], dtype=torch.bool, device=images.device) if patch_masks is None \
                else patch_masks
            parts.append(x_img)
            pads.append((~keep)[:, None].expand(-1, num_image))  # fairseq: images of masked samples are padding
            positions.append(self.image_pos_ln(self.embed_image_positions(image_ids))[None])
        num_text = 0
        if input_ids is not None:
            num_text = input_ids.shape[1]
            text_pos = self.embed_positions(torch.arange(num_text, device=input_ids.device))
            assert token_embeddings is not None, "token_embeddings come with input_ids (GalenModel.encode)"
            x_txt = token_embeddings
            if self.cfg.encoder_entangle_positions:
                x_txt = x_txt + text_pos
            x_txt = self.dropout(self.layernorm_embedding(x_txt + self.type_embedding(_type_id(0, x_txt.device))))
            parts.append(x_txt)
            pads.append(input_ids.eq(self.cfg.pad_id))
            positions.append(self.pos_ln(text_pos)[None])
        x, padding, pos = torch.cat(parts, 1), torch.cat(pads, 1), torch.cat(positions, 1)
        x = x * (~padding).unsqueeze(-1).to(x.dtype)  # padded embeddings are zeroed before the layers

        abs_bias = self.abs_pos(pos, pos)  # (1, H, S, S), shared by all layers
        buckets = self.buckets[0]
        text_buckets = buckets.token_block(num_text) if num_text else None
        image_buckets = buckets.image_block(image_ids) if num_image else None
        for idx, layer in enumerate(self.layers):
            rel = torch.zeros_like(abs_bias[0])
            if text_buckets is not None:  # i.e. num_text
                rel[:, num_image:, num_image:] = relative_bias(self.token_rel_pos_table_list[idx], text_buckets)
            if image_buckets is not None:  # i.e. num_image
                rel[:, :num_image, :num_image] = relative_bias(self.image_rel_pos_table_list[idx], image_buckets)
            x = layer(x, _masked(abs_bias + rel, padding))
        return EncoderOutput(self.layer_norm(x), padding, pos, num_image)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GalenConfig, drop_path: float):
        super().__init__()
        d = cfg.d_model
        self.self_attn_layer_norm, self.self_attn = nn.LayerNorm(d), Attention(cfg)
        self.self_attn_mid_layer_norm = nn.LayerNorm(d) if cfg.normformer else nn.Identity()
        self.cross_attn_layer_norm, self.cross_attn = nn.LayerNorm(d), Attention(cfg)
        self.cross_attn_mid_layer_norm = nn.LayerNorm(d) if cfg.normformer else nn.Identity()
        self.final_layer_norm = nn.LayerNorm(d)
        self.ffn = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, self_kv: tuple[torch.Tensor, torch.Tensor], self_bias: torch.Tensor,
                cross_kv: tuple[torch.Tensor, torch.Tensor], cross_bias: torch.Tensor) -> torch.Tensor:
        """`self_kv` is a callable's result: keys/values of all positions up to and including x's."""
        h = self.self_attn(self.self_attn_layer_norm(x), *self_kv, self_bias)
        x = x + self.drop_path(self.dropout(self.self_attn_mid_layer_norm(h)))
        h = self.cross_attn(self.cross_attn_layer_norm(x), *cross_kv, cross_bias)
        x = x + self.drop_path(self.dropout(self.cross_attn_mid_layer_norm(h)))
        return x + self.drop_path(self.dropout(self.ffn(self.final_layer_norm(x))))


@dataclass
class DecoderCache:
    """Key/value cache for incremental decoding: the encoder runs once, each step adds one position."""

    encoder: EncoderOutput
    code_masks: torch.Tensor | None
    self_k: list[torch.Tensor]          # per layer (B, H, T_max, d_head), filled up to `length`
    self_v: list[torch.Tensor]
    cross_k: list[torch.Tensor]         # per layer (B, H, S, d_head), computed once
    cross_v: list[torch.Tensor]
    self_bias: list[torch.Tensor]       # per layer (B|1, H, T_max, T_max) without the causal part
    cross_bias: torch.Tensor            # (B|1, H, T_max, S) including encoder padding
    length: int = 0

    @property
    def max_length(self) -> int:
        return self.self_k[0].shape[2]

    def reorder(self, index: torch.Tensor, static_index: torch.Tensor | None = None) -> None:
        """Keep/duplicate batch rows (beam search reordering, dropping finished samples).

        `index` picks the rows of the growing self-attention cache. `static_index` picks the rows
        of what never changes within a sample (encoder output, cross-attention keys/values and
        bias); None means the row-to-sample layout is unchanged, so nothing static is copied —
        beams only move within their own sample. Biases with a batch dimension of 1 are shared.
        """
        for lst in (self.self_k, self.self_v):
            lst[:] = [t.index_select(0, index) for t in lst]
        if static_index is None:
            return

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, static_index) if t.shape[0] > 1 else t

        self.encoder = self.encoder.index_select(static_index)
        self.code_masks = None if self.code_masks is None else self.code_masks.index_select(0, static_index)
        for lst in (self.cross_k, self.cross_v):
            lst[:] = [t.index_select(0, static_index) for t in lst]
        self.self_bias = [pick(b) for b in self.self_bias]
        self.cross_bias = pick(self.cross_bias)


class Decoder(PositionTables):
    """Causal transformer over target tokens, cross-attending to the encoder output."""

    def __init__(self, cfg: GalenConfig, buckets: RelativeBuckets):
        super().__init__()
        self.cfg, d, heads = cfg, cfg.d_model, cfg.attention_heads
        self.buckets = [buckets]
        self.layernorm_embedding = nn.LayerNorm(d)
        self.code_layernorm_embedding = nn.LayerNorm(d) if cfg.code_layernorm_embedding else None
        add_position_tables(self, cfg, cfg.decoder_layers)
        self.self_abs_pos = AbsolutePositionBias(d, heads, cfg.attention_scale)
        self.cross_abs_pos = AbsolutePositionBias(d, heads, cfg.attention_scale)
        drop_paths = linear_drop_path(cfg.decoder_drop_path_rate, cfg.decoder_layers)
        self.layers = nn.ModuleList(DecoderLayer(cfg, p) for p in drop_paths)
        self.layer_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)

    # -- position biases -------------------------------------------------------------------------
    def _raw_positions(self, length: int, device: torch.device, code: bool) -> torch.Tensor:
        if code:
            return self.embed_image_positions(self.buckets[0].code_positions[:length].to(device))
        return self.embed_positions(torch.arange(length, device=device))

    def _by_code_mask(self, text: torch.Tensor, code: torch.Tensor | None, code_masks: torch.Tensor | None
                      ) -> torch.Tensor:
        """Per sample: the image-position version for code targets, the text version otherwise."""
        if code is None:
            return text
        assert code_masks is not None, "a code version is only made when code_masks has a code target"
        if bool(code_masks.all()):
            return code
        return torch.where(code_masks.view(-1, *([1] * (text.dim() - 1))), code, text)

    def position_biases(self, length: int, encoder: EncoderOutput, code_masks: torch.Tensor | None,
                        ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-layer self-attention bias (no causal part) and the cross-attention bias for `length` targets."""
        device = encoder.hidden.device
        any_code = code_masks is not None and bool(code_masks.any())
        txt_pos = self.pos_ln(self._raw_positions(length, device, code=False))[None]
        self_txt = self.self_abs_pos(txt_pos, txt_pos)
        cross_txt = self.cross_abs_pos(txt_pos, encoder.positions)
        self_img: torch.Tensor | None = None
        cross_img: torch.Tensor | None = None
        if any_code:
            img_pos = self.image_pos_ln(self._raw_positions(length, device, code=True))[None]
            self_img = self.self_abs_pos(img_pos, img_pos)
            cross_img = self.cross_abs_pos(img_pos, encoder.positions)
            code_ids = self.buckets[0].code_positions[:length].to(device)
            img_buckets = self.buckets[0].image_block(code_ids)
        txt_buckets = self.buckets[0].token_block(length)
        self_biases = []
        for idx in range(len(self.layers)):
            text = self_txt + relative_bias(self.token_rel_pos_table_list[idx], txt_buckets)
            code = None if self_img is None else (  # self_img is None iff not any_code
                self_img + relative_bias(self.image_rel_pos_table_list[idx], img_buckets))
            self_biases.append(self._by_code_mask(text, code, code_masks))
        cross = _masked(self._by_code_mask(cross_txt, cross_img, code_masks), encoder.padding_mask)
        return self_biases, cross

    # -- embeddings --------------------------------------------------------------------------------
    def embed(self, token_embeddings: torch.Tensor, start: int, code_masks: torch.Tensor | None) -> torch.Tensor:
        x = token_embeddings
        length = x.shape[1]
        any_code = code_masks is not None and bool(code_masks.any())
        if self.cfg.decoder_entangle_positions:
            txt = self._raw_positions(start + length, x.device, code=False)[start:]
            img = self._raw_positions(start + length, x.device, code=True)[start:] if any_code else None
            x = x + self._by_code_mask(txt[None], None if img is None else img[None], code_masks)
        if any_code and self.code_layernorm_embedding is not None:
            x = self._by_code_mask(self.layernorm_embedding(x), self.code_layernorm_embedding(x), code_masks)
        else:
            x = self.layernorm_embedding(x)
        return self.dropout(x)

    # -- full (teacher-forced) pass ----------------------------------------------------------------
    def forward(self, token_embeddings: torch.Tensor, decoder_input_ids: torch.Tensor, encoder: EncoderOutput,
                code_masks: torch.Tensor | None = None) -> torch.Tensor:
        length = decoder_input_ids.shape[1]
        self_biases, cross_bias = self.position_biases(length, encoder, code_masks)
        causal = torch.ones(length, length, dtype=torch.bool, device=decoder_input_ids.device).triu(1)
        key_padding = decoder_input_ids.eq(self.cfg.pad_id)
        x = self.embed(token_embeddings, 0, code_masks)
        for idx, layer in enumerate(cast("Iterable[DecoderLayer]", self.layers)):
            self_bias = _masked(self_biases[idx].masked_fill(causal, torch.finfo(x.dtype).min), key_padding)
            x = layer(x, layer.self_attn.project_kv(layer.self_attn_layer_norm(x)), self_bias,
                      layer.cross_attn.project_kv(encoder.hidden), cross_bias)
        return self.layer_norm(x)

    # -- incremental decoding ----------------------------------------------------------------------
    def init_cache(self, encoder: EncoderOutput, max_length: int, code_masks: torch.Tensor | None = None
                   ) -> DecoderCache:
        batch = encoder.hidden.shape[0]
        self_biases, cross_bias = self.position_biases(max_length, encoder, code_masks)
        shape = (batch, self.cfg.attention_heads, max_length, self.cfg.head_dim)
        dtype, device = encoder.hidden.dtype, encoder.hidden.device
        cross = [layer.cross_attn.project_kv(encoder.hidden) for layer in cast("Iterable[DecoderLayer]", self.layers)]
        return DecoderCache(
            encoder=encoder, code_masks=code_masks,
            self_k=[torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers],
            self_v=[torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers],
            cross_k=[k for k, _ in cross], cross_v=[v for _, v in cross],
            self_bias=self_biases, cross_bias=cross_bias)

    def step(self, token_embeddings: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """Hidden states of the next `n` positions (usually 1) given everything cached before them."""
        start, n = cache.length, token_embeddings.shape[1]
        end = start + n
        if end > cache.max_length:
            raise GalenInputError(f"decoding past the cache length {cache.max_length}; raise max_length")
        x = self.embed(token_embeddings, start, cache.code_masks)
        causal = torch.ones(n, end, dtype=torch.bool, device=x.device).triu(start + 1)
        for idx, layer in enumerate(cast("Iterable[DecoderLayer]", self.layers)):
            k_new, v_new = layer.self_attn.project_kv(layer.self_attn_layer_norm(x))
            cache.self_k[idx][:, :, start:end] = k_new
            cache.self_v[idx][:, :, start:end] = v_new
            self_bias = cache.self_bias[idx][:, :, start:end, :end].masked_fill(causal, torch.finfo(x.dtype).min)
            x = layer(x, (cache.self_k[idx][:, :, :end], cache.self_v[idx][:, :, :end]), self_bias,
                      (cache.cross_k[idx], cache.cross_v[idx]), cache.cross_bias[:, :, start:end])
        cache.length = end
        return self.layer_norm(x)


@dataclass
class GalenOutput:
    logits: torch.Tensor            # (B, T, vocab)
    decoder_hidden: torch.Tensor    # (B, T, d): input of the output projection
    encoder: EncoderOutput


class GalenModel(nn.Module):
    """The generalist model; one embedding matrix for encoder input, decoder input and output."""

    def __init__(self, cfg: GalenConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.buckets = RelativeBuckets(cfg.token_bucket_size, cfg.image_bucket_size, cfg.max_positions,
                                       cfg.code_grid)
        self.encoder = Encoder(cfg, self.buckets)
        self.decoder = Decoder(cfg, self.buckets)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ResNetStages):
            return  # timm's own init
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    @classmethod
    def from_size(cls, size: str, **overrides) -> GalenModel:
        return cls(get_config(size, **overrides))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embeddings else n

    # -- input checks (before any tensor math, so users get a message rather than a torch trace) ---
    def check_inputs(self, input_ids: torch.Tensor | None, images: torch.Tensor | None,
                     patch_masks: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                     code_masks: torch.Tensor | None = None) -> None:
        cfg = self.cfg
        if input_ids is None and images is None:
            raise GalenInputError("nothing to encode: give input_ids (a tokenized prompt), images, or both")
        batch = None
        for name, ids in (("input_ids", input_ids), ("decoder_input_ids", decoder_input_ids)):
            if ids is None:
                continue
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
                raise GalenInputError(f"{name} must be an integer tensor of shape (batch, length), got "
                                      f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}; "
                                      "tokenize with GalenTokenizer and pad with pad_batch()")
            if ids.shape[1] == 0:
                raise GalenInputError(f"{name} is empty; a prompt needs at least <s> ... </s>")
            if ids.shape[1] > cfg.max_positions:
                raise GalenInputError(f"{name} has {ids.shape[1]} tokens but the model takes at most "
                                      f"{cfg.max_positions}; shorten the text or truncate it explicitly")
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise GalenInputError(f"{name} holds id {hi if hi >= cfg.vocab_size else lo} outside the vocabulary "
                                      f"[0, {cfg.vocab_size}); was it made by another tokenizer than this model's?")
            if name == "input_ids" and bool(ids.eq(cfg.pad_id).all(dim=1).any()) and images is None:
                raise GalenInputError("input_ids has a row made only of padding and no image; every sample needs "
                                      "a prompt or an image")
            batch = ids.shape[0] if batch is None else batch
            if ids.shape[0] != batch:
                raise GalenInputError(f"batch sizes differ: input_ids has {batch} rows, {name} {ids.shape[0]}")
        if images is not None:
            check_images(images, cfg.patch_size, cfg.max_image_side)
            if batch is not None and images.shape[0] != batch:
                raise GalenInputError(f"batch sizes differ: {batch} prompts but {images.shape[0]} images")
            batch = images.shape[0]
        for name, m in (("patch_masks", patch_masks), ("code_masks", code_masks)):
            if m is not None and (not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != (batch,)):
                raise GalenInputError(f"{name} must be a bool tensor of shape ({batch},), one flag per sample")
        if patch_masks is not None and images is None:
            raise GalenInputError("patch_masks given without images; pass the image batch too")
        if images is not None and input_ids is None and patch_masks is not None and not bool(patch_masks.all()):
            raise GalenInputError("a sample with neither a prompt nor an unmasked image has nothing to encode")

    # -- forward passes ----------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor | None, images: torch.Tensor | None = None,
               patch_masks: torch.Tensor | None = None, check: bool = True) -> EncoderOutput:
        if check:
            self.check_inputs(input_ids, images, patch_masks)
        emb = None if input_ids is None else self.embed_tokens(input_ids)
        return self.encoder(emb, input_ids, images, patch_masks)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.embed_tokens.weight.t()

    def decode(self, decoder_input_ids: torch.Tensor, encoder: EncoderOutput,
               code_masks: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced decoder hidden states (B, T, d)."""
        return self.decoder(self.embed_tokens(decoder_input_ids), decoder_input_ids, encoder, code_masks)

    def forward(self, input_ids: torch.Tensor | None, decoder_input_ids: torch.Tensor,
                images: torch.Tensor | None = None, patch_masks: torch.Tensor | None = None,
                code_masks: torch.Tensor | None = None) -> GalenOutput:
        self.check_inputs(input_ids, images, patch_masks, decoder_input_ids, code_masks)
        enc = self.encode(input_ids, images, patch_masks, check=False)
        hidden = self.decode(decoder_input_ids, enc, code_masks)
        return GalenOutput(self.logits(hidden), hidden, enc)

    # -- incremental decoding entry points (used by model.decoding) ----------------------------------
    def init_cache(self, encoder: EncoderOutput, max_length: int,
                   code_masks: torch.Tensor | None = None) -> DecoderCache:
        return self.decoder.init_cache(encoder, max_length, code_masks)

    def step(self, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """Next-token logits (B, n, vocab) for `tokens` (B, n) appended after the cached positions."""
        return self.logits(self.decoder.step(self.embed_tokens(tokens), cache))

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
        from galen.model.checkpoint import save_pretrained
        return save_pretrained(self, directory, tokenizer, dtype)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> GalenModel:
        from galen.model.checkpoint import load_model
        return load_model(directory, map_location)
