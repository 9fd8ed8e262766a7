"""Exponential moving average of the weights, for fine-tuning (OFA/BiomedGPT evaluate the EMA model).

Under ZeRO-3 each worker holds only its partition of every parameter (`param.ds_tensor`), so the
average is kept per partition on the worker that owns it: no gathering per step, and the memory
cost is the partition's, not the model's. `swap()` exchanges the live weights with the averages,
which is how the final model is saved (and swapped back if training went on).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from galen.model.errors import GalenInputError


def _local(param: torch.nn.Parameter) -> torch.Tensor:
    """The tensor this worker updates: the ZeRO-3 partition, or the full parameter."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class WeightEMA:
    """ema <- decay * ema + (1 - decay) * weights, with the usual warm-up min(decay, (1+n)/(10+n))."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise GalenInputError(f"ema_decay must be in (0, 1), got {decay}; use null to train without EMA")
        self.params = [p for p in params if p.requires_grad]
        self.decay = decay
        self.updates = 0
        self.shadow = [_local(p).detach().clone().float() for p in self.params]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(_local(p).float(), alpha=1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def swap(self) -> None:
        for s, p in zip(self.shadow, self.params):
            live = _local(p)
            tmp = live.detach().clone()
            live.copy_(s.to(live.dtype))
            s.copy_(tmp.float())

    def save(self, path: str | Path) -> None:
        save_file({f"p{i}": s.contiguous() for i, s in enumerate(self.shadow)}, str(path),
                  metadata={"updates": str(self.updates), "decay": str(self.decay)})

    def load(self, path: str | Path) -> None:
        tensors = load_file(str(path))
        if len(tensors) != len(self.shadow):
            raise GalenInputError(f"{path}: EMA of {len(tensors)} tensors, the model has {len(self.shadow)}; "
                                  "the checkpoint belongs to another model")
        for i, s in enumerate(self.shadow):
            t = tensors[f"p{i}"]
            if t.shape != s.shape:
                raise GalenInputError(f"{path}: EMA tensor {i} has shape {tuple(t.shape)}, expected {tuple(s.shape)}")
            s.copy_(t)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            self.updates = int((f.metadata() or {}).get("updates", 0))
