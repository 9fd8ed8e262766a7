"""Registry for real, on both stores: the default local sqlite store and a real `mlflow server` (sqlite
backend, artifacts proxied to a moto S3 server), started here and stopped by pid. Versions are the
demo nano model registered with chosen eval metrics, so which one is "better" is known."""

from __future__ import annotations

import base64
import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from galen.flows.cli import main
from galen.flows.evaluate import eval_records, evaluate, record_request
from galen.flows.paths import tracking_uri
from galen.flows.registry import (
    CHALLENGER,
    CHAMPION,
    LOCK_SUFFIX,
    PREVIOUS,
    SHA_TAG,
    MetricRule,
    RegistryConfig,
    aliases,
    compare,
    promote,
    register,
    rollback,
)
from galen.flows.tracking import TrainingRun
from galen.model.checkpoint import folder_digest
from galen.model.errors import GalenCheckpointError, GalenInputError
from galen.model.predict import PredictConfig

REPO = Path(__file__).resolve().parents[2]
PARAMS = {"registry": {"model_name": "galen-test", "experiment": "galen-evaluate",
                       "metrics": {"vqa.accuracy": {"min_improvement": 0.0, "floor": 0.5},
                                   "nli.accuracy": {"min_improvement": 0.0, "floor": 0.3}}},
          "train": {"size": "nano", "finetune": {"lr": 0.0005}}}
SHORT = PredictConfig.from_dict({"vqa": {"beam_size": 2, "max_length": 6}, "caption": {"beam_size": 2, "max_length": 8},
                                 "summarization": {"beam_size": 2, "max_length": 8}})


def config(name: str) -> RegistryConfig:
    cfg = RegistryConfig.from_params(PARAMS)
    cfg.model_name = name
    return cfg


@contextlib.contextmanager
def open_store(kind: str, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(uri, folder): the default local store of a project folder ("sqlite"), or a real server proxying
    to S3 ("server"), stopped afterwards."""
    folder = tmp_path_factory.mktemp(f"store_{kind}")
    if kind == "sqlite":
        (folder / "params.yaml").write_text("demo: {}\n")
        old = os.environ.pop("MLFLOW_TRACKING_URI", None)
        try:
            yield tracking_uri(folder), folder
        finally:
            if old is not None:
                os.environ["MLFLOW_TRACKING_URI"] = old
        return
    from tests.servers import mlflow_server_on_s3

    with mlflow_server_on_s3(folder) as (url, _s3):
        yield url, folder


@pytest.fixture(scope="module", params=["sqlite", "server"])
def store(request, tmp_path_factory):
    """(uri, folder) of both stores, one after the other (open_store)."""
    with open_store(request.param, tmp_path_factory) as opened:
        yield opened


def new_version(uri: str, model_dir: Path, folder: Path, cfg: RegistryConfig, vqa: float, nli: float) -> str:
    """Register `model_dir` with eval metrics vqa.accuracy / nli.accuracy (what galen evaluate would log)."""
    metrics = folder / f"eval_{cfg.model_name}_{time.monotonic_ns()}.json"
    metrics.write_text(json.dumps({"vqa": {"accuracy": vqa, "count": 10}, "nli": {"accuracy": nli, "count": 10}}))
    return register(model_dir, cfg, PARAMS, metrics_file=metrics, uri=uri, project=REPO).version


# --------------------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------------------

def test_registry_params_are_checked():
    cfg = RegistryConfig.from_params(PARAMS)
    assert cfg.model_name == "galen-test" and [r.name for r in cfg.metrics] == ["vqa.accuracy", "nli.accuracy"]
    project = RegistryConfig.from_params(__import__("yaml").safe_load((REPO / "params.yaml").read_text()))
    assert project.model_name == "galen-generalist" and project.metrics
    bad = [({}, "no `registry:` section"),
           ({"registry": {"metrics": {}}}, "must map metric names"),
           ({"registry": {"metrics": {"a": {"min_improvement": -0.1}}}}, "must be >= 0"),
           ({"registry": {"metrics": {"a": {"floor": "high"}}}}, "must be a number"),
           ({"registry": {"metrics": {"a": {"min_improvment": 0.1}}}}, "mapping with min_improvement"),
           ({"registry": {"metrics": {"a": {}}, "modelname": "x"}}, "unknown registry params"),
           ({"registry": {"metrics": {"a": {}}, "model_name": "x.lock"}}, "not ending in")]
    for params, message in bad:
        with pytest.raises(GalenInputError, match=message):
            RegistryConfig.from_params(params)


def test_compare_says_which_metric_fell_short_and_by_how_much():
    rules = [MetricRule("vqa.accuracy", 0.01, 0.5), MetricRule("nli.accuracy", 0.0, 0.3)]
    champion = {"vqa.accuracy": 0.70, "nli.accuracy": 0.60}
    assert compare(rules, {"vqa.accuracy": 0.72, "nli.accuracy": 0.60}, champion, "3") == []
    short = compare(rules, {"vqa.accuracy": 0.705, "nli.accuracy": 0.65}, champion, "3")
    assert [s.metric for s in short] == ["vqa.accuracy"] and short[0].gap == pytest.approx(0.005)
    assert "0.0050 short of the required 0.7100 (champion v3 0.7000 + min_improvement 0.01)" in str(short[0])
    floors = compare(rules, {"vqa.accuracy": 0.4, "nli.accuracy": 0.3}, None, None)
    assert [(s.metric, round(s.gap, 6), s.basis) for s in floors] == [("vqa.accuracy", 0.1, "floor 0.5")]


# --------------------------------------------------------------------------------------------------
# Lifecycle on both stores
# --------------------------------------------------------------------------------------------------

@pytest.mark.timeout(900)
def test_register_promote_and_rollback(store, demo_model_dir):
    uri, folder = store
    cfg = config("lifecycle")
    v1 = new_version(uri, demo_model_dir, folder, cfg, vqa=0.6, nli=0.5)
    client = MlflowClient(uri, uri)
    tags = client.get_model_version(cfg.model_name, v1).tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["git.commit"] == head and tags[SHA_TAG] == folder_digest(demo_model_dir)
    assert any(k.startswith("dvc.") and k != "dvc.lock" for k in tags), tags         # data versions from dvc.lock
    assert tags["params.registry.model_name"] == "galen-test" and tags["params.train.finetune.lr"] == "0.0005"
    assert float(tags["metric.vqa.accuracy"]) == 0.6 and float(tags["metric.nli.accuracy"]) == 0.5
    assert aliases(cfg, uri) == {}                                       # registering moves no alias

    first = promote(cfg, version=v1, uri=uri)
    assert first.promoted and "first champion" in first.message
    assert aliases(cfg, uri) == {CHAMPION: v1}

    v2 = new_version(uri, demo_model_dir, folder, cfg, vqa=0.5, nli=0.9)   # worse on vqa: never champion
    worse = promote(cfg, uri=uri)                                        # default candidate: the latest version
    assert not worse.promoted and worse.version == v2
    assert "vqa.accuracy = 0.5000 is 0.1000 short of the required 0.6000" in worse.message
    assert aliases(cfg, uri) == {CHAMPION: v1, CHALLENGER: v2}

    v3 = new_version(uri, demo_model_dir, folder, cfg, vqa=0.7, nli=0.55)
    better = promote(cfg, version=v3, uri=uri)
    assert better.promoted and better.champion_before == v1
    assert aliases(cfg, uri) == {CHAMPION: v3, PREVIOUS: v1, CHALLENGER: v2}
    assert "already" in promote(cfg, version=v3, uri=uri).message
    assert not promote(cfg, alias=CHALLENGER, uri=uri).promoted          # v2 is still worse than v3

    assert rollback(cfg, uri=uri).version == v1
    assert aliases(cfg, uri) == {CHAMPION: v1, PREVIOUS: v3, CHALLENGER: v2}
    rollback(cfg, uri=uri)                                               # a second rollback undoes the first
    assert aliases(cfg, uri) == {CHAMPION: v3, PREVIOUS: v1, CHALLENGER: v2}
    assert all(not m.name.endswith(LOCK_SUFFIX) for m in client.search_registered_models())   # locks released


def test_a_first_candidate_below_the_floors_is_only_challenger(store, demo_model_dir):
    uri, folder = store
    cfg = config("floors")
    v1 = new_version(uri, demo_model_dir, folder, cfg, vqa=0.45, nli=0.9)
    decision = promote(cfg, uri=uri)
    assert not decision.promoted and "vqa.accuracy = 0.4500 is 0.0500 short of the required 0.5000 (floor 0.5)" \
        in decision.message
    assert aliases(cfg, uri) == {CHALLENGER: v1}


# --------------------------------------------------------------------------------------------------
# The registered model in a new process = the evaluated model
# --------------------------------------------------------------------------------------------------

LOAD_AND_PREDICT = """
import json, sys
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
requests = json.load(open(sys.argv[2]))
json.dump([r.model_dump(exclude_none=True) for r in model.predict(requests)], open(sys.argv[3], "w"))
"""


@pytest.mark.timeout(900)
def test_the_champion_loaded_by_alias_in_a_new_process_reproduces_the_evaluation(store, demo_shards, demo_model_dir,
                                                                                  tmp_path):
    uri, _ = store
    cfg = config("served")
    predictions = tmp_path / "predictions.jsonl"
    report = evaluate(demo_model_dir, demo_shards, tmp_path / "eval.json", limit=2, predict_config=SHORT,
                      predictions_path=predictions, samples=1, uri=uri)
    reg = register(demo_model_dir, cfg, PARAMS, metrics_file=tmp_path / "eval.json", uri=uri, project=REPO)
    assert reg.run_id == report["run_id"]                                # the model lives in its evaluation run
    # the version carries the class names it was evaluated on: serving's default for /v1/classify
    from galen.serve.settings import ServeSettings
    from galen.serve.store import LoadedModel, ModelRef, download

    labels = json.loads((demo_shards / "candidates.json").read_text())["medmnist-pathmnist"]["classification"]
    settings = ServeSettings(model_name=cfg.model_name, model_cache=str(tmp_path / "served-models"))
    folder, model_config = download(ModelRef(cfg.model_name, reg.version, "champion"), settings, uri)  # as a replica
    served = model_config["labels"]["classification"]
    assert sorted(served) == sorted(labels) and len(served) == len(labels) == 9  # the dataset's order, each once
    assert LoadedModel(None, None, folder, model_config).default_labels(["other"]) == served
    assert LoadedModel(None, None, folder, {}).default_labels([]) == []  # no set: /v1/classify asks for labels
    # random weights score below the floors; promote with the floors lowered so it becomes champion
    cfg.metrics = [MetricRule("vqa.accuracy", 0.0, 0.0), MetricRule("nli.accuracy", 0.0, 0.0)]
    assert promote(cfg, version=reg.version, uri=uri).promoted

    evaluated = [json.loads(line) for line in predictions.read_text().splitlines()]
    requests = []
    candidates = json.loads((demo_shards / "candidates.json").read_text())
    for task in dict.fromkeys(r["task"] for r in evaluated):
        for rec in eval_records(demo_shards, task, 2):
            req = record_request(rec, candidates)
            if "image" in req:                                           # JSON requests carry images as base64
                req["image"] = base64.b64encode(req["image"]).decode()
            requests.append(req)
    assert len(requests) == len(evaluated) == 12
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env["MLFLOW_TRACKING_URI"] = uri                                    # a server: artifacts come through it
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, f"models:/{cfg.model_name}@{CHAMPION}",
                           str(tmp_path / "requests.json"), str(tmp_path / "served.json")],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads((tmp_path / "served.json").read_text())
    assert served == [r["prediction"] for r in evaluated]                # exactly: answers, boxes and scores


# --------------------------------------------------------------------------------------------------
# Racing promotions
# --------------------------------------------------------------------------------------------------

def _promote_slowly(uri: str, name: str, version: str, barrier) -> bool:
    """A promotion in its own process whose decision takes 1.5 s (between reading the champion and
    moving aliases: the window in which an unlocked promotion would be overtaken)."""
    import galen.flows.registry as registry

    original = registry.compare

    def slow_compare(*args, **kwargs):
        time.sleep(1.5)
        return original(*args, **kwargs)

    registry.compare = slow_compare
    barrier.wait(timeout=300)                                            # both start together
    return registry.promote(config(name), version=version, uri=uri).promoted


@pytest.mark.timeout(900)
def test_two_racing_promotions_end_as_if_one_ran_after_the_other(store, demo_model_dir):
    uri, folder = store
    cfg = config("race")
    good = new_version(uri, demo_model_dir, folder, cfg, vqa=0.7, nli=0.5)
    best = new_version(uri, demo_model_dir, folder, cfg, vqa=0.8, nli=0.5)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        barrier = manager.Barrier(2)
        results = [pool.apply_async(_promote_slowly, (uri, cfg.model_name, v, barrier)) for v in (good, best)]
        good_promoted, best_promoted = [r.get(timeout=600) for r in results]
    final = aliases(cfg, uri)
    assert best_promoted                                                # the best one wins in either order
    if good_promoted:   # good first (champion), then best beat it: good became previous
        assert final == {CHAMPION: best, PREVIOUS: good}
    else:               # best first, then good fell short of it: challenger
        assert final == {CHAMPION: best, CHALLENGER: good}
    client = MlflowClient(uri, uri)
    assert all(not m.name.endswith(LOCK_SUFFIX) for m in client.search_registered_models())


def test_a_dead_holders_plan_is_completed_before_its_stale_lock_is_broken(store, demo_model_dir):
    """A promotion that died after writing its plan but before moving every alias: the next one
    finishes the plan, so the registry is never left half-updated."""
    uri, folder = store
    cfg = config("stale")
    v1 = new_version(uri, demo_model_dir, folder, cfg, vqa=0.6, nli=0.5)
    v2 = new_version(uri, demo_model_dir, folder, cfg, vqa=0.7, nli=0.5)
    client = MlflowClient(uri, uri)
    assert promote(cfg, version=v1, uri=uri).promoted
    # the dead promotion of v2 wrote its plan, set `previous`, and died before moving `champion`
    client.create_registered_model(cfg.model_name + LOCK_SUFFIX, tags={
        "galen.lock.owner": "dead-host:1:x", "galen.lock.abandoned": "true",
        "galen.lock.intent": json.dumps({PREVIOUS: v1, CHAMPION: v2})})
    client.set_registered_model_alias(cfg.model_name, PREVIOUS, v1)
    assert "already" in promote(cfg, version=v2, uri=uri).message       # the plan was completed first
    assert aliases(cfg, uri) == {CHAMPION: v2, PREVIOUS: v1}
    assert all(not m.name.endswith(LOCK_SUFFIX) for m in client.search_registered_models())


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors, aliases untouched
# --------------------------------------------------------------------------------------------------

def stored_model_folder(client: MlflowClient, name: str, version: str) -> Path:
    """The registered Galen model folder inside a local artifact store."""
    root = Path(client.get_model_version_download_uri(name, version).removeprefix("file://"))
    return next(p.parent for p in root.rglob("model.safetensors"))


@pytest.mark.timeout(900)
def test_bad_inputs_fail_before_any_alias_changes(tmp_path, monkeypatch, demo_model_dir):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text("demo: {}\n")
    uri = tracking_uri(tmp_path)
    cfg = config("guarded")
    client = MlflowClient(uri, uri)
    v1 = new_version(uri, demo_model_dir, tmp_path, cfg, vqa=0.6, nli=0.5)
    promote(cfg, version=v1, uri=uri)
    v2 = new_version(uri, demo_model_dir, tmp_path, cfg, vqa=0.9, nli=0.9)
    before = aliases(cfg, uri)

    with pytest.raises(GalenInputError, match="no registered model 'nope'"):
        promote(config("nope"), uri=uri)
    with pytest.raises(GalenInputError, match="has no alias 'staging'"):
        promote(cfg, alias="staging", uri=uri)
    with pytest.raises(GalenInputError, match="has no version 99"):
        promote(cfg, version=99, uri=uri)
    with pytest.raises(GalenInputError, match="no `previous` alias"):
        rollback(cfg, uri=uri)

    empty = TrainingRun.start_or_resume("galen-evaluate", "empty", None, {}, {}, uri=uri, system_metrics=False)
    empty.end()
    with pytest.raises(GalenInputError, match="has no metrics"):
        register(demo_model_dir, cfg, PARAMS, run_id=empty.run_id, uri=uri)
    with pytest.raises(GalenInputError, match="does not exist"):
        register(demo_model_dir, cfg, PARAMS, run_id="0" * 32, uri=uri)
    with pytest.raises(GalenInputError, match="register needs eval metrics"):
        register(demo_model_dir, cfg, PARAMS, uri=uri)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((demo_model_dir / "config.json").read_text())
    with pytest.raises(GalenCheckpointError, match="model.safetensors"):
        register(broken, cfg, PARAMS, metrics_file=tmp_path / "missing.json", uri=uri)

    # a version whose run lacks a metric params.yaml names
    metrics = tmp_path / "vqa_only.json"
    metrics.write_text(json.dumps({"vqa": {"accuracy": 0.99}}))
    v3 = register(demo_model_dir, cfg, PARAMS, metrics_file=metrics, uri=uri).version
    with pytest.raises(GalenInputError, match="has no metric nli.accuracy"):
        promote(cfg, version=v3, uri=uri)

    # a corrupted, then a missing artifact of the (better) candidate v2
    weights = stored_model_folder(client, cfg.model_name, v2) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(GalenCheckpointError, match="is corrupted"):
        promote(cfg, version=v2, uri=uri)
    weights.unlink()
    with pytest.raises(GalenCheckpointError, match="corrupted|missing"):
        promote(cfg, version=v2, uri=uri)
    mlmodel = next(Path(client.get_model_version_download_uri(cfg.model_name, v2).removeprefix("file://"))
                   .rglob("MLmodel"))
    mlmodel.unlink()
    with pytest.raises(GalenCheckpointError, match="missing or unreadable|cannot be downloaded"):
        promote(cfg, version=v2, uri=uri)

    # a model folder other than the one the run evaluated
    other = tmp_path / "other"
    other.mkdir()
    for f in demo_model_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "config.json").write_text((demo_model_dir / "config.json").read_text() + "\n")
    run_id = client.get_model_version(cfg.model_name, v1).run_id
    with pytest.raises(GalenInputError, match="is not the model run"):
        register(other, cfg, PARAMS, run_id=run_id, uri=uri)

    assert aliases(cfg, uri) == before == {CHAMPION: v1}
    assert [m.name for m in client.search_registered_models()] == [cfg.model_name]   # no lock left behind


@pytest.mark.timeout(900)
def test_cli_register_promote_rollback_on_the_default_store(tmp_path, monkeypatch, demo_model_dir, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (tmp_path / "eval.json").write_text(json.dumps({"vqa": {"accuracy": 0.6}, "nli": {"accuracy": 0.4}}))
    assert main(["register", "--model", str(demo_model_dir), "--metrics", "eval.json", "--promote",
                 "--report", "metrics/registry.json"]) == 0
    out = capsys.readouterr().out
    assert "registered galen-test version 1" in out and "v1 is the new `champion`" in out
    report = json.loads((tmp_path / "metrics" / "registry.json").read_text())
    assert report["version"] == "1" and report["promoted"] is True and report["aliases"] == {CHAMPION: "1"}
    assert report["sha256"] == folder_digest(demo_model_dir)
    assert main(["rollback"]) == 2
    assert "no `previous` alias" in capsys.readouterr().err
    assert main(["promote", "--alias", "nope"]) == 2
    assert "has no alias 'nope'" in capsys.readouterr().err
    assert main(["promote", "--name", "missing"]) == 2
    assert "no registered model 'missing'" in capsys.readouterr().err
    assert (tmp_path / "mlflow.db").is_file()                           # tracking_uri(): the project's sqlite store
    assert aliases(config("galen-test"), tracking_uri(tmp_path)) == {CHAMPION: "1"}
