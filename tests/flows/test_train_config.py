"""Training configuration: bad params and missing inputs fail before any Ray worker starts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from galen.flows.train.generalist_trainer import check_inputs, load_train_config
from galen.model.errors import GalenInputError


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
    ({"loss_average": "tokens"}, "loss_average must be one of token, sample, got 'tokens'"),
    ({"cache_rows": -1}, "cache_rows must be a positive integer"),
    ({"curriculum": {"steps": 5, "objectives": {"vqa_closed": 1.0}}},
     r"curriculum.steps \+ curriculum.rewarm_steps \(5 \+ 0\) must be below steps \(5\)"),
    ({"curriculum": {"steps": 2, "objectives": {"vqa_closd": 1.0}}}, r"unknown curriculum objectives \['vqa_closd'\]"),
    ({"curriculum": {"steps": 2, "objectives": {"vqa_closed": 0}}}, "curriculum.objectives needs a positive weight"),
    ({"curriculum": {"steps": -1, "objectives": {}}}, r"curriculum.steps must be an integer >= 0, got -1"),
    ({"curriculum": {"step": 2}}, r"unknown train curriculum keys \['step'\]"),
])
def test_out_of_range_params_are_refused(bad, message):
    with pytest.raises(GalenInputError, match=message):
        load_train_config(params(**bad), "finetune")


def test_curriculum_phase_has_its_own_weights_then_the_mixture_with_objectives_on_top():
    cfg = load_train_config(params(finetune={"steps": 100, "tasks": ["vqa", "nli"], "objectives": {"vqa_closed": 2.0},
                                             "curriculum": {"steps": 30, "objectives": {"vqa_closed": 1.0},
                                                            "rewarm_steps": 10}}), "finetune")
    assert cfg.curriculum.steps == 30 and cfg.curriculum.objectives == {"vqa_closed": 1.0}
    assert cfg.objective_weights() == {"vqa": 1.0, "nli": 1.0, "vqa_closed": 2.0}
    assert cfg.planned_objectives() == ["nli", "vqa", "vqa_closed"]


def test_lr_rewarms_after_the_curriculum_and_rejoins_the_decay():
    from galen.flows.train.generalist_trainer import lr_schedule

    plain = load_train_config(params(finetune={"steps": 100}), "finetune")
    cfg = load_train_config(params(finetune={"steps": 100, "curriculum": {
        "steps": 30, "objectives": {"vqa_closed": 1.0}, "rewarm_steps": 10}}), "finetune")
    base, lr = lr_schedule(plain), lr_schedule(cfg)
    assert [lr(s) for s in range(30)] == [base(s) for s in range(30)]          # warmup 5 steps, then decay
    assert lr(30) == pytest.approx(base(30) / 10) and lr(34) == pytest.approx(base(34) / 2)
    assert lr(39) == pytest.approx(base(39)) and [lr(s) for s in range(40, 100)] == [base(s) for s in range(40, 100)]
    off = load_train_config(params(finetune={"steps": 100, "curriculum": {"steps": 0, "rewarm_steps": 10}}), "finetune")
    assert [lr_schedule(off)(s) for s in range(100)] == [base(s) for s in range(100)]  # no first phase, no rewarm


def test_closed_vqa_source_counts_and_reads_the_closed_rows_of_the_vqa_shards(demo_shards):
    import pyarrow.parquet as pq

    from galen.flows.train.generalist_trainer import source_rows, step_planners, training_sources

    cfg = load_train_config(params(shards=str(demo_shards), finetune={"steps": 50, "tasks": ["vqa", "nli"],
                                                                       "curriculum": {"steps": 10, "objectives": {
                                                                           "vqa_closed": 1.0}}}), "finetune")
    files = training_sources(cfg, demo_shards)
    assert files["vqa_closed"] == files["vqa"]
    counts = source_rows(demo_shards, files)
    kinds = [t for p in files["vqa"] for t in pq.read_table(p, columns=["answer_type"])["answer_type"].to_pylist()]
    assert counts["vqa_closed"] == kinds.count("CLOSED") and 0 < counts["vqa_closed"] < counts["vqa"] == len(kinds)
    mixture, first = step_planners(cfg, counts)
    assert first.sources == ["vqa_closed"] and set(mixture.sources) == {"vqa", "nli"}
    cfg.tasks = ["nli"]
    with pytest.raises(GalenInputError, match="objective vqa_closed reads the vqa shards, but vqa is not in "
                                              "train.tasks"):
        training_sources(cfg, demo_shards)
    with pytest.raises(GalenInputError, match="no objective has both a positive weight and training data"):
        step_planners(cfg, {**counts, "vqa_closed": 0})


def test_pretraining_can_weight_closed_vqa_as_its_own_objective(demo_shards):
    from galen.flows.train.generalist_trainer import source_rows, step_planners, training_sources

    cfg = load_train_config(params(shards=str(demo_shards), pretrain={
        "steps": 50, "objectives": {"caption": 1.0, "vqa_closed": 0.5},
        "curriculum": {"steps": 10, "objectives": {"vqa_closed": 1.0}}}), "pretrain")
    files = training_sources(cfg, demo_shards)
    assert set(files) == {"caption", "vqa_closed"} and files["vqa_closed"]  # curriculum objectives read too
    counts = source_rows(demo_shards, files)
    mixture, first = step_planners(cfg, counts)
    assert first.sources == ["vqa_closed"] and set(mixture.sources) == {"caption", "vqa_closed"}
    with pytest.raises(GalenInputError, match=r"unknown pretrain objectives \[.vqa_closd.\]; known: .*vqa_closed"):
        load_train_config(params(pretrain={"objectives": {"vqa_closd": 1.0}}), "pretrain")


def test_the_shards_are_sized_by_the_models_configs_not_by_a_setting(tmp_path):
    """One place decides a model's input size: its config (a named size, an init folder's config.json,
    CLIP's named config). The shards stage writes for those models; training, evaluation and serving
    read the size from the model."""
    import json

    import yaml

    from galen.flows.shards import model_input_sizes

    project = yaml.safe_load((Path(__file__).parents[2] / "params.yaml").read_text())
    assert model_input_sizes(project) == {"generalist": 128, "clip": 64}  # nano and micro
    assert model_input_sizes({"train": {"size": "tiny"}, "clip": {"train": {"config": "biomedclip"}}}) == \
        {"generalist": 256, "clip": 224}
    # fine-tuning from the folder pretraining writes: the pretraining size; from a foreign folder: its own
    chained = {"train": {"size": "base", "pretrain": {"out": "artifacts/pretrained"},
                         "finetune": {"init": "artifacts/pretrained"}}}
    assert model_input_sizes(chained) == {"generalist": 256}
    (tmp_path / "config.json").write_text(json.dumps({"image_size": 384}))
    imported = {"train": {"size": None, "finetune": {"init": str(tmp_path)}}}
    assert model_input_sizes(imported) == {"generalist": 384}
    with pytest.raises(GalenInputError, match=r"the generalist's stages take different image sizes .*'pretrain': 128"):
        model_input_sizes({"train": {"size": "nano", "finetune": {"init": str(tmp_path)}}})
    with pytest.raises(GalenInputError, match="cannot tell the models' input size"):
        model_input_sizes({"train": {"finetune": {"init": str(tmp_path / "missing")}}})


def test_a_model_refuses_shards_written_for_another_size(tmp_path):
    import json

    from galen.flows.shards import check_written_for

    (tmp_path / "manifest.json").write_text(json.dumps({"image_size": 128, "models": {"generalist": 128, "clip": 64}}))
    check_written_for(tmp_path, "generalist", 128, "the generalist")
    check_written_for(tmp_path, "clip", 64, "CLIP")
    with pytest.raises(GalenInputError, match=r"written for clip 64 px, generalist 128 px, but the generalist takes "
                                              r"256 px images; write shards for it: `dvc repro shards`"):
        check_written_for(tmp_path, "generalist", 256, "the generalist")
    (tmp_path / "manifest.json").write_text(json.dumps({"image_size": {"vqa": 128}}))  # before models were recorded
    with pytest.raises(GalenInputError, match="written by an older Galen"):
        check_written_for(tmp_path, "generalist", 128, "the generalist")


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


# --------------------------------------------------------------------------------------------------
# `galen train` with bad input: one clear error, before Ray starts, and nothing in the run storage
# --------------------------------------------------------------------------------------------------

def split_then_drop_a_shard(shards: Path, task: str = "vqa") -> Path:
    """One of the task's training shard files lost (a single file is split in two first)."""
    import pyarrow.parquet as pq

    files = sorted((shards / task / "train").glob("*.parquet"))
    if len(files) == 1:
        (only,) = files
        table = pq.read_table(only)
        half = table.num_rows // 2
        files = [only.with_name("part-a.parquet"), only.with_name("part-b.parquet")]
        pq.write_table(table.slice(0, half), files[0])
        pq.write_table(table.slice(half), files[1])
        only.unlink()
    files[-1].unlink()
    return shards


BAD_INPUTS = {
    "misspelled": ({"lrr": 0.1}, r"unknown train params: lrr \(did you mean lr\?\)"),
    "out_of_range": ({"zero_stage": 5}, "zero_stage must be 0, 1, 2 or 3"),
    "placement": ({"placement_strategy": "SPREAD_OUT"}, "placement_strategy must be one of"),
    "storage_scheme": ({"storage_path": "gs://bucket/runs"}, r"storage_path must be a local folder or s3://"),
    "missing_shard": ({"shards": "MISSING_SHARD"}, r"the vqa training shards .* hold \d+ rows in \d+ file\(s\) but "
                                                   r"manifest.json counts \d+: a shard file is missing"),
    "init_size": ({"size": "tiny"}, r"train.init=.* does not match train.size='tiny'"),
    "image_size": ({"init": None, "size": "tiny"}, r"shards under .* were written for clip 64 px, generalist 128 px, "
                                                    r"but the generalist \(size tiny\) takes 256 px images"),
    "s3_unreachable": ({"storage_path": "s3://galen-ckpt/runs"},
                       r"cannot read s3://galen-ckpt/runs/galen-finetune-\w+/\S+: .*127.0.0.1:\d+.*AWS_ENDPOINT_URL"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_before_any_worker_and_writes_nothing(case, tmp_path, monkeypatch, capsys, demo_shards,
                                                              demo_model_dir):
    import shutil

    import yaml

    from galen.flows.cli import main
    from tests.servers import free_port

    overrides, message = BAD_INPUTS[case]
    shards = demo_shards
    if overrides.get("shards") == "MISSING_SHARD":
        shards = split_then_drop_a_shard(Path(shutil.copytree(demo_shards, tmp_path / "shards")))
        overrides = {**overrides, "shards": str(shards)}
    storage = tmp_path / "storage"
    train = {"size": "nano", "tasks": ["vqa", "nli"], "steps": 4, "batch_size": 2, "num_workers": 2,
             "storage_path": str(storage), "shards": str(shards), "tokenizer": str(demo_model_dir),
             "init": str(demo_model_dir), "out": str(tmp_path / "model"), "experiment": "bad-input", **overrides}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": train}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")   # nothing listens there
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)

    assert main(["train", "--stage", "finetune", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("galen: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not storage.exists() or not any(storage.iterdir())        # no job folder, no run-id file
    assert not (tmp_path / "mlflow.db").exists()                      # no MLflow run (not even a store)
    assert not (tmp_path / "model").exists()
    import ray

    assert not ray.is_initialized()                                   # no Ray, so no worker, ever started
