"""Every params key a training stage reads is one DVC tracks for that stage: changing any `train.*`
or `clip.train.*` key marks the right stage as changed in `dvc status` (and only that stage, where
the key belongs to one). The shards stage too: it reads its own section and the keys that decide
the trained models' input sizes, found here by changing each key and seeing the sizes change."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from galen.flows.train.clip_trainer import ClipTrainConfig
from galen.flows.train.generalist_trainer import STAGES, TrainConfig

ROOT = Path(__file__).resolve().parents[2]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
TRAINING_STAGES = ("pretrain", "finetune", "clip_train", "shards")


def leaf_keys(section: dict, prefix: str) -> list[str]:
    """Dotted keys of every leaf under `section` (a dict value is descended into)."""
    out = []
    for k, v in section.items():
        key = f"{prefix}.{k}"
        out += leaf_keys(v, key) if isinstance(v, dict) and v else [key]
    return out


def model_size_keys() -> list[str]:
    """The `train.*` / `clip.train.*` keys whose change changes the models' input sizes the shards
    are written for (or makes them unknowable), outside any checkout (no artifacts to find)."""
    import os
    import tempfile

    from galen.flows.shards import model_input_sizes

    def sizes(params):
        try:
            return model_input_sizes(params)
        except Exception as e:  # noqa: BLE001 - a failure is a change too
            return type(e).__name__

    here = os.getcwd()
    with tempfile.TemporaryDirectory() as empty:
        os.chdir(empty)
        try:
            base = sizes(PARAMS)
            keys = leaf_keys(PARAMS["train"], "train") + leaf_keys(PARAMS["clip"]["train"], "clip.train")
            return [k for k in keys if sizes(with_value(PARAMS, k, changed_value(value_at(PARAMS, k)))) != base]
        finally:
            os.chdir(here)


def stage_reads() -> dict[str, list[str]]:
    """The params keys each stage reads: pretraining and fine-tuning merge `train:` with their own
    `train.<stage>:` (load_train_config); the CLIP trainer reads `clip.train:`; the shards stage its
    `shards:` section and the keys of the models' sizes."""
    shared = {k: v for k, v in PARAMS["train"].items() if k not in STAGES}
    return {
        "pretrain": leaf_keys(shared, "train") + leaf_keys(PARAMS["train"]["pretrain"], "train.pretrain"),
        "finetune": leaf_keys(shared, "train") + leaf_keys(PARAMS["train"]["finetune"], "train.finetune"),
        "clip_train": leaf_keys(PARAMS["clip"]["train"], "clip.train"),
        "shards": leaf_keys(PARAMS["shards"], "shards") + model_size_keys(),
    }


def value_at(params: dict, dotted: str):
    node = params
    for p in dotted.split("."):
        node = node[p]
    return node


def with_value(params: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(params)
    set_key(out, dotted, value)
    return out


def changed_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, list):
        return [*value, value[-1] if value else "x"]
    return {"changed": 1} if value is None else None


def set_key(params: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = params
    for p in parents:
        node = node[p]
    node[last] = value


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> Path:
    """dvc.yaml and params.yaml in a fresh DVC repo whose dvc.lock records the current params of
    the training stages (as after a `dvc repro`), so `dvc status` reports only what a change makes."""
    from dvc.repo import Repo

    repo = tmp_path_factory.mktemp("dvcparams")
    # the training stages as dvc.yaml declares them, their params lists untouched; data deps and
    # outputs are left out (they do not exist here, and what is under test is the params tracking)
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    spec = {name: {"cmd": spec[name]["cmd"], "params": spec[name]["params"]} for name in TRAINING_STAGES}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": spec}, sort_keys=False))
    shutil.copy2(ROOT / "params.yaml", repo / "params.yaml")
    Repo.init(str(repo), no_scm=True)

    def value(dotted):
        node = PARAMS
        for p in dotted.split("."):
            node = node[p]
        return node

    lock = {"schema": "2.0", "stages": {
        name: {"cmd": spec[name]["cmd"], "params": {"params.yaml": {k: value(k) for k in spec[name]["params"]}}}
        for name in TRAINING_STAGES}}
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    return repo


def changed_params(repo: Path) -> dict[str, set[str]]:
    """Per training stage, the params keys `dvc status` says changed."""
    import os

    from dvc.repo import Repo

    here = os.getcwd()
    os.chdir(repo)  # DVC resolves a stage's files against the working directory
    try:
        with Repo(str(repo)) as r:
            status = r.status(targets=list(TRAINING_STAGES))
    finally:
        os.chdir(here)
    out: dict[str, set[str]] = {s: set() for s in TRAINING_STAGES}
    for stage, entries in status.items():
        for entry in entries:
            changed = entry.get("changed deps", {}).get("params.yaml") if isinstance(entry, dict) else None
            if isinstance(changed, dict):  # {"train.size": "modified", ...}
                out[stage.split(":")[-1]] |= set(changed)
    return out


def test_the_shards_stage_reads_the_keys_of_the_models_sizes():
    assert set(model_size_keys()) == {"train.size", "train.pretrain.init", "train.pretrain.out",
                                      "train.finetune.init", "clip.train.config"}


def test_the_key_lists_follow_the_typed_configs():
    """The keys a stage reads are the typed configs' fields, so a new field shows up here."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in stage_reads()["finetune"] + stage_reads()["pretrain"]:
        assert key.split(".")[2 if key.split(".")[1] in STAGES else 1] in fields, key
    clip_fields = {f.name for f in dataclasses.fields(ClipTrainConfig)}
    assert {k.split(".")[2] for k in stage_reads()["clip_train"]} <= clip_fields


def test_nothing_is_changed_before_an_edit(dvc_repo):
    assert changed_params(dvc_repo) == {s: set() for s in TRAINING_STAGES}


@pytest.mark.parametrize("key", sorted({k for keys in stage_reads().values() for k in keys}))
def test_changing_a_training_key_marks_the_stage_that_reads_it(dvc_repo, key):
    params = copy.deepcopy(PARAMS)
    node = PARAMS
    for p in key.split("."):
        node = node[p]
    set_key(params, key, changed_value(node))
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        changed = changed_params(dvc_repo)
    finally:
        shutil.copy2(ROOT / "params.yaml", dvc_repo / "params.yaml")
    readers = {s for s, keys in stage_reads().items() if key in keys}
    for stage in TRAINING_STAGES:
        hit = any(key == c or key.startswith(c + ".") for c in changed[stage])
        assert hit == (stage in readers), (stage, key, changed[stage])
