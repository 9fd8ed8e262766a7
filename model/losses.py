"""Training losses of the generalist model.

Label-smoothed cross-entropy as in OFA, with the trie-aware variant for closed answer sets: the
logits are restricted to the tokens the candidate trie allows at each position, and the smoothing
mass is spread over that allowed set only (not over the whole 60k vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    loss: torch.Tensor      # mean label-smoothed loss (what the optimizer sees): per target token, or per row
    nll: torch.Tensor       # mean negative log-likelihood per target token (what to report)
    num_tokens: int
    row_nll: torch.Tensor   # (B,) summed negative log-likelihood of each row's target tokens (no grad)
    row_tokens: torch.Tensor  # (B,) target tokens per row
    weight: int             # what `loss` is a mean over (tokens or rows): sums of weight * loss combine batches

    def mean_nll(self, rows: torch.Tensor) -> float:
        """Mean NLL per target token over a subset of rows (bool mask), e.g. one task's rows."""
        return float(self.row_nll[rows].sum() / self.row_tokens[rows].sum().clamp(min=1))


LOSS_AVERAGES = ("token", "sample")


def label_smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, epsilon: float = 0.1,
                                 pad_id: int = 1, allowed: torch.Tensor | None = None,
                                 average: str = "token") -> LossOutput:
    """logits (B, T, V), target (B, T) with pad_id where there is no target.

    `allowed` (B, T, V) bool restricts each position to the trie's allowed tokens (closed sets).
    `average`: "token" (every target token weighs the same) or "sample" (the mean of each row's own
    token mean: a one-token "yes" weighs as much as a 60-token report in a multitask batch).
    """
    if average not in LOSS_AVERAGES:
        raise ValueError(f"average must be one of {LOSS_AVERAGES}, got {average!r}")
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    lprobs = F.log_softmax(logits, dim=-1)
    keep = target.ne(pad_id)
    lprobs, tgt = lprobs[keep], target[keep]
    nll = -lprobs.gather(-1, tgt[:, None]).squeeze(-1)
    if allowed is not None:
        allowed_k = allowed[keep]
        smooth = -lprobs.masked_fill(~allowed_k, 0.0).sum(-1)
        n_classes = allowed_k.sum(-1).clamp(min=1).float()
    else:
        smooth = -lprobs.sum(-1)
        n_classes = torch.full_like(nll, lprobs.shape[-1])
    eps_i = epsilon / n_classes
    loss = (1.0 - epsilon) * nll + eps_i * smooth
    n = int(keep.sum())
    denom = max(n, 1)
    row_index = keep.nonzero()[:, 0]
    row_nll = torch.zeros(target.shape[0], device=nll.device).index_add_(0, row_index, nll.detach())
    row_tokens = keep.sum(-1)
    if average == "sample":
        row_loss = torch.zeros(target.shape[0], device=loss.device, dtype=loss.dtype).index_add_(0, row_index, loss)
        return LossOutput((row_loss / row_tokens.clamp(min=1)).mean(), nll.sum() / denom, n, row_nll, row_tokens,
                          target.shape[0])
    return LossOutput(loss.sum() / denom, nll.sum() / denom, n, row_nll, row_tokens, n)


def clip_loss(rank: int = 0, world_size: int = 1) -> torch.nn.Module:
    """Symmetric InfoNCE of a CLIP batch: (CE(image -> text) + CE(text -> image)) / 2 with the
    learnable temperature `logit_scale` (= exp(log scale)). With several workers, open_clip's
    ClipLoss gathers every worker's features *with gradients* and each worker scores its own rows
    against all columns (`local_loss`): the mean over workers equals the loss of the concatenated
    batch, and so do the averaged gradients. Every worker must pass the same batch size."""
    from open_clip.loss import ClipLoss

    return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)
