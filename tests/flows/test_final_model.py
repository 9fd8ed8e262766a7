"""The loop ends through one `save_final_model` with the recipe's writer: rank 0 writes the folder,
other ranks write nothing, and after bf16 training the CLIP folder holds fp32 weights (its
trainer used to write bf16 weights as they were)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from safetensors import safe_open

from galen.flows.train.clip_trainer import ClipRecipe, ClipTrainConfig
from galen.flows.train.loop import save_final_model
from galen.model.clip import WEIGHTS_FILE, ClipModel


def weight_dtypes(path) -> set[torch.dtype]:
    with safe_open(str(path), framework="pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()}


def test_the_clip_folder_is_fp32_after_bf16_training_and_only_rank_0_writes(tmp_path, demo_model_dir):
    from galen.model.vocabulary import GalenTokenizer

    wrapper = ClipModel.create("micro", GalenTokenizer.load(demo_model_dir), seed=0)
    wrapper.clip = wrapper.clip.to(torch.bfloat16)  # what DeepSpeed's bf16 engine holds
    bf16_state = {k: v.clone() for k, v in wrapper.clip.state_dict().items()}

    def write(rank):  # the trainer's own end: its recipe's writer, after DeepSpeed's engine
        recipe = ClipRecipe(ClipTrainConfig(out=str(tmp_path / f"rank{rank}")), {}, rank=rank, world=2)
        recipe.wrapper = wrapper
        return recipe.write_model(SimpleNamespace(module=wrapper.clip))

    save_final_model(wrapper.clip, zero_stage=1, rank=1, write=write(1))
    assert not (tmp_path / "rank1").exists()
    save_final_model(wrapper.clip, zero_stage=1, rank=0, write=write(0))

    assert weight_dtypes(tmp_path / "rank0" / WEIGHTS_FILE) == {torch.float32}
    again = ClipModel.from_pretrained(tmp_path / "rank0")
    for k, v in again.clip.state_dict().items():
        if v.is_floating_point():  # fp32 holds the bf16 values exactly
            torch.testing.assert_close(v, bf16_state[k].float().reshape(v.shape), rtol=0, atol=0)
