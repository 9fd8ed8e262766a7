"""Position handling of the OFA architecture: positions never enter the token embeddings.

Instead every attention gets a bias made of two parts (BiomedGPT Extended Data Fig. 3b/c):
  * an absolute part, `(Wq LN(P_i)) . (Wk LN(P_j)) * scale`, computed once per forward and
    shared by all layers, and
  * a learned relative part per layer: 1D buckets for text, 2D buckets for image patches.

The bucket tables below reproduce the reference buffers exactly (checked against
`reference-check/buffers_hf.npz`), which is what lets official checkpoints run unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def token_relative_buckets(bucket_size: int, max_position: int) -> torch.Tensor:
    """(max_position, max_position) bucket ids for text: exact within +-bucket_size/2, log-spaced beyond."""
    context = torch.arange(max_position)[:, None]
    memory = torch.arange(max_position)[None, :]
    relative = context - memory
    sign = torch.sign(relative)
    mid = bucket_size // 2
    abs_pos = torch.where((relative < mid) & (relative > -mid), torch.full_like(relative, mid - 1), relative.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    bucket = torch.where(abs_pos.le(mid), relative, log_pos.int() * sign).long()
    return bucket + bucket_size - 1


def image_relative_buckets(grid: int) -> torch.Tensor:
    """(grid^2 + 1, grid^2 + 1) 2D bucket ids; row/col 0 is the reserved non-patch position."""
    num_distances = (2 * grid - 1) ** 2 + 3
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)
    relative[:, :, 0] *= 2 * grid - 1
    index = torch.zeros((grid * grid + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = relative.sum(-1)
    index[0, 0:] = num_distances - 3
    index[0:, 0] = num_distances - 2
    index[0, 0] = num_distances - 1
    return index


def num_image_distances(grid: int) -> int:
    return (2 * grid - 1) ** 2 + 3


def image_position_ids(rows: int, cols: int, bucket_grid: int) -> torch.Tensor:
    """Flattened ids of an rows x cols patch grid inside the bucket grid: row*grid + col + 1."""
    return (torch.arange(cols)[None, :] + torch.arange(rows)[:, None] * bucket_grid + 1).flatten()


def code_position_ids(code_grid: int, bucket_grid: int, length: int) -> torch.Tensor:
    """Decoder positions for image-code targets: bos at 0, the code grid row-major, then 1024s.

    Mirrors fairseq's `image_position_idx` buffer (length 1026); only the first
    code_grid^2 + 1 entries are ever used by code targets.
    """
    ids = torch.cat([torch.zeros(1, dtype=torch.long), image_position_ids(code_grid, code_grid, bucket_grid)])
    tail = torch.full((max(length - ids.numel(), 0),), 1024, dtype=torch.long)
    return torch.cat([ids, tail])[:length]


class RelativeBuckets(nn.Module):
    """The bucket lookup tables, built once and shared by encoder and decoder (not saved)."""

    # buffers registered in _build (declared for type checkers: nn.Module.__getattr__ is untyped)
    token: torch.Tensor
    image: torch.Tensor
    code_positions: torch.Tensor

    def __init__(self, token_bucket_size: int, image_bucket_size: int, max_positions: int, code_grid: int):
        super().__init__()
        with torch.device("cpu"):  # real tables even when the model is built on the meta device
            self._build(token_bucket_size, image_bucket_size, max_positions, code_grid)

    def _build(self, token_bucket_size: int, image_bucket_size: int, max_positions: int, code_grid: int) -> None:
        self.register_buffer("token", token_relative_buckets(token_bucket_size, max_positions).int(), persistent=False)
        self.register_buffer("image", image_relative_buckets(image_bucket_size).int(), persistent=False)
        self.register_buffer("code_positions", code_position_ids(code_grid, image_bucket_size, max_positions + 2),
                             persistent=False)

    def token_block(self, length: int) -> torch.Tensor:
        return self.token[:length, :length]

    def image_block(self, ids_q: torch.Tensor, ids_k: torch.Tensor | None = None) -> torch.Tensor:
        ids_k = ids_q if ids_k is None else ids_k
        return self.image.index_select(0, ids_q).index_select(1, ids_k)


def relative_bias(table: nn.Module, buckets: torch.Tensor) -> torch.Tensor:
    """(Tq, Tk) bucket ids -> (heads, Tq, Tk) bias; `table` is an nn.Embedding(buckets, heads)."""
    return table(buckets).permute(2, 0, 1)  # called as a module: ZeRO-3 gathers its weight


class AbsolutePositionBias(nn.Module):
    """`(Wq LN(Pq)) (Wk LN(Pk))^T * scale` per head: the decoupled absolute-position attention bias."""

    def __init__(self, d_model: int, heads: int, scale: float):
        super().__init__()
        self.heads, self.scale = heads, scale
        self.q_linear = nn.Linear(d_model, d_model)
        self.k_linear = nn.Linear(d_model, d_model)

    def forward(self, pos_q: torch.Tensor, pos_k: torch.Tensor) -> torch.Tensor:
        """pos_q (B|1, Tq, d) and pos_k (B|1, Tk, d), already layer-normed -> (B|1, H, Tq, Tk)."""
        q = self.q_linear(pos_q).unflatten(-1, (self.heads, -1)).transpose(1, 2) * self.scale
        k = self.k_linear(pos_k).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return q @ k.transpose(-1, -2)
