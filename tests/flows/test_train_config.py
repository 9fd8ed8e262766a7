"""Training configuration: bad params and missing inputs fail before any Ray worker starts."""

from __future__ import annotations

import pytest

from flows.train.trainer import check_inputs, load_train_config
from model.errors import GalenInputError


def params(**train):
    return {"train": {"size": "nano", "finetune": {"steps": 5}, **train}}


def test_stage_section_overrides_the_shared_one():
    cfg = load_train_config(params(steps=100, lr=1e-3), "finetune")
    assert cfg.steps == 5 and cfg.lr == 1e-3 and cfg.stage == "finetune"
    assert load_train_config(params(steps=100), "pretrain").steps == 100


def test_misspelled_params_are_named_with_a_suggestion():
    with pytest.raises(GalenInputError, match=r"unknown train params: lrr \(did you mean lr\?\)"):
        load_train_config(params(lrr=0.1), "finetune")


@pytest.mark.parametrize("bad, message", [
    ({"zero_stage": 4}, "zero_stage must be 0, 1, 2 or 3"),
    ({"precision": "fp16"}, "precision must be fp32 or bf16"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"lr": 5}, r"lr must be in \(0, 1\)"),
    ({"warmup_ratio": 1.5}, r"warmup_ratio must be in \[0, 1\)"),
])
def test_out_of_range_params_are_refused(bad, message):
    with pytest.raises(GalenInputError, match=message):
        load_train_config(params(**bad), "finetune")


def test_missing_shards_tokenizer_or_task_data_are_clear(tmp_path):
    cfg = load_train_config(params(shards=str(tmp_path / "none"), tokenizer=str(tmp_path / "tok")), "finetune")
    with pytest.raises(GalenInputError, match="run `dvc repro shards` first"):
        check_inputs(cfg)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    cfg = load_train_config(params(shards=str(tmp_path / "shards"), tokenizer=str(tmp_path / "tok"),
                                   tasks=["vqa", "nli"]), "finetune")
    with pytest.raises(GalenInputError, match=r"no training shards for \['vqa', 'nli'\]"):
        check_inputs(cfg)
    cfg.tasks = ["vqa", "colouring"]
    with pytest.raises(GalenInputError, match="unknown tasks"):
        check_inputs(cfg)
