"""MLflow tracking of training runs for real: a sqlite store in tmp_path, and a real `mlflow server`
proxying artifacts to a moto S3 server, both started here and stopped by pid."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from galen.flows.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    TrainingRun,
    artifact_location,
    lineage,
    run_id_file,
    sanitize_key,
    tracking_uri,
)
from galen.model.errors import GalenInputError
from tests.servers import AWS


@pytest.fixture
def uri(tmp_path, monkeypatch) -> str:
    """A local sqlite store in tmp_path, set explicitly (never the project's own mlflow.db)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tracking_uri(tmp_path)


def model_folder(root: Path) -> Path:
    """A small stand-in for a saved Galen model folder, with a nested tokenizer and binary weights."""
    folder = root / "saved_model"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text('{"size": "tiny"}')
    (folder / "model.safetensors").write_bytes(os.urandom(300_000))
    (folder / "tokenizer" / "spm.model").write_bytes(os.urandom(5_000))
    return folder


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# --------------------------------------------------------------------------------------------------
# Where runs go
# --------------------------------------------------------------------------------------------------

def test_tracking_uri_is_the_project_sqlite_store_unless_the_env_says_otherwise(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("demo: {}\n")
    (tmp_path / "flows" / "deep").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "flows" / "deep")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert artifact_location(tracking_uri()) == (tmp_path.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"
    assert artifact_location(tracking_uri()) is None          # the server decides (proxied artifacts)

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path.parent)                        # outside any project and no env: say so
    with pytest.raises(GalenInputError, match="no params.yaml or dvc.yaml"):
        tracking_uri()


# --------------------------------------------------------------------------------------------------
# One run per job, resumed by run id
# --------------------------------------------------------------------------------------------------

def test_start_log_end_then_resume_continues_the_same_run(tmp_path, uri):
    params = {"model": {"size": "tiny", "dim": 64}, "optim": {"lr": 1e-4, "betas": [0.9, 0.98]},
              "notes": "x" * 7000, "bad key!": 1}
    run = TrainingRun.start_or_resume("galen-test", "job-1", None, params, {"team": "vlm"}, uri=uri,
                                      project=tmp_path, system_metrics=False)
    for step in range(3):
        run.log_metrics({"loss/vqa": 3.0 - step, "loss/caption": 4.0 - step, "lr": 1e-4,
                         "samples_per_s": 100.0 + step, "tokens_per_s": 5000.0}, step=step)
    ids = run_id_file(tmp_path / "ckpt")
    ids.write(run.run_id)
    run.end("KILLED")                                         # the job was preempted

    client = MlflowClient(uri)
    first = client.get_run(run.run_id)
    assert first.info.status == "KILLED"
    assert first.data.params["model.size"] == "tiny" and first.data.params["optim.lr"] == "0.0001"
    assert first.data.params["optim.betas"] == "[0.9, 0.98]"
    assert len(first.data.params["notes"]) == MAX_PARAM_VALUE_LENGTH
    assert first.data.params["bad key_"] == "1"
    assert first.data.tags["team"] == "vlm" and first.data.tags["mlflow.runName"] == "job-1"

    resumed = TrainingRun.start_or_resume("galen-test", "job-1", ids.read(), params, {}, uri=uri,
                                          project=tmp_path, system_metrics=False)
    assert resumed.run_id == run.run_id and resumed.resumed
    assert client.get_run(run.run_id).info.status == "RUNNING"
    for step in range(3, 5):
        resumed.log_metrics({"loss/vqa": 3.0 - step, "loss/caption": 4.0 - step}, step=step)
    art = resumed.log_model_folder(model_folder(tmp_path))
    resumed.end()

    final = client.get_run(run.run_id)
    assert final.info.status == "FINISHED"
    assert final.data.tags["galen.resume_count"] == "1"
    assert history(client, run.run_id, "loss/vqa") == [(s, 3.0 - s) for s in range(5)]
    assert history(client, run.run_id, "loss/caption") == [(s, 4.0 - s) for s in range(5)]
    assert [s for s, _ in history(client, run.run_id, "samples_per_s")] == [0, 1, 2]
    exp = client.get_experiment_by_name("galen-test")
    assert len(client.search_runs([exp.experiment_id])) == 1  # one job, one run
    # artifacts sit beside the sqlite store, not in ./mlruns of the cwd
    assert art == f"runs:/{run.run_id}/model"
    stored = tmp_path / "mlartifacts" / run.run_id / "artifacts" / "model"
    assert tree_digest(stored) == tree_digest(tmp_path / "saved_model")


def test_resuming_an_unknown_run_id_says_how_to_start_fresh(tmp_path, uri):
    TrainingRun.start_or_resume("galen-test", "a", None, {}, {}, uri=uri, system_metrics=False).end()
    with pytest.raises(GalenInputError, match=r"does not exist.*start a fresh run"):
        TrainingRun.start_or_resume("galen-test", "a", "0123456789abcdef0123456789abcdef", {}, {}, uri=uri,
                                    system_metrics=False)
    with pytest.raises(GalenInputError, match="does not exist"):
        TrainingRun.attach("0123456789abcdef0123456789abcdef", uri, rank=0)


def test_resuming_with_changed_params_or_another_experiment_is_refused(tmp_path, uri):
    run = TrainingRun.start_or_resume("galen-test", "a", None, {"optim": {"lr": 0.1}}, {}, uri=uri,
                                      system_metrics=False)
    run.end("FAILED")
    with pytest.raises(GalenInputError, match=r"params changed.*optim.lr"):
        TrainingRun.start_or_resume("galen-test", "a", run.run_id, {"optim": {"lr": 0.2}}, {}, uri=uri,
                                    system_metrics=False)
    with pytest.raises(GalenInputError, match="belongs to experiment"):
        TrainingRun.start_or_resume("other", "a", run.run_id, {"optim": {"lr": 0.1}}, {}, uri=uri,
                                    system_metrics=False)
    assert MlflowClient(uri).get_run(run.run_id).info.status == "FAILED"   # untouched by the refusals


def test_bad_inputs_fail_clearly(tmp_path, uri):
    run = TrainingRun.start_or_resume("galen-test", "a", None, {}, {}, uri=uri, system_metrics=False)
    with pytest.raises(GalenInputError, match="must be a number"):
        run.log_metrics({"loss": "low"}, step=0)
    with pytest.raises(GalenInputError, match="not a saved model folder"):
        run.log_model_folder(tmp_path / "nope")
    with pytest.raises(GalenInputError, match="status must be one of"):
        run.end("DONE")
    run.end("FINISHED")


def test_sanitize_key_gives_keys_mlflow_accepts():
    assert sanitize_key("dvc.ingest@vqa_rad.data/ingested/vqa_rad") == "dvc.ingest_vqa_rad.data/ingested/vqa_rad"
    assert sanitize_key("a//b/./c/") == "a/b/_/c"
    long = sanitize_key("k" * 400)
    assert len(long) == 250 and long != sanitize_key("k" * 401)


def test_system_metrics_are_logged_while_the_run_is_open(tmp_path, uri):
    run = TrainingRun.start_or_resume("galen-test", "sys", None, {}, {}, uri=uri, system_metrics=True,
                                      system_metrics_interval=0.1)
    assert run._monitor is not None
    time.sleep(1.0)                                           # ~10 sampling intervals
    run.end()
    keys = MlflowClient(uri).get_run(run.run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in keys), sorted(keys)


# --------------------------------------------------------------------------------------------------
# Ray-style workers: the run id travels, only rank 0 logs
# --------------------------------------------------------------------------------------------------

def _worker(run_id: str, uri: str, rank: int) -> str:
    """What a Ray Train worker does: attach by run id, log, leave the run for the driver to end."""
    run = TrainingRun.attach(run_id, uri, rank=rank)
    run.log_metrics({"loss": float(rank), "rank_seen": float(rank)}, step=10 + rank)
    run.close()
    return "rank0" if run.active else "silent"


def test_workers_attach_by_run_id_and_only_rank_0_logs(tmp_path, uri):
    driver = TrainingRun.start_or_resume("galen-test", "ray", None, {"x": 1}, {}, uri=uri, system_metrics=False)
    assert pickle.loads(pickle.dumps(driver)).run_id == driver.run_id   # plain strings cross processes
    ctx = multiprocessing.get_context("spawn")                          # fresh interpreters, like Ray workers
    with ctx.Pool(2) as pool:
        seen = pool.starmap(_worker, [(driver.run_id, uri, 0), (driver.run_id, uri, 1)])
    assert seen == ["rank0", "silent"]
    driver.end()
    client = MlflowClient(uri)
    assert history(client, driver.run_id, "rank_seen") == [(10, 0.0)]
    assert client.get_run(driver.run_id).info.status == "FINISHED"


# --------------------------------------------------------------------------------------------------
# Lineage
# --------------------------------------------------------------------------------------------------

DVC_LOCK = """\
schema: '2.0'
stages:
  shards:
    cmd: galen shards
    deps:
    - path: data/validated
      md5: 11111111111111111111111111111111.dir
    outs:
    - path: data/shards
      hash: md5
      md5: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.dir
      size: 10
      nfiles: 2
  ingest@vqa_rad:
    cmd: galen ingest --dataset vqa_rad
    outs:
    - path: data/ingested/vqa_rad
      hash: md5
      md5: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb.dir
    - path: metrics/ingest.json
      hash: md5
      md5: cccccccccccccccccccccccccccccccc
"""


def git(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def test_lineage_tags_come_from_a_real_git_repo_and_dvc_lock(tmp_path, uri):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text("demo: {seed: 0}\n")
    (repo / "dvc.lock").write_text(DVC_LOCK)
    git(["init", "-q"], repo)
    git(["add", "."], repo)
    git(["commit", "-q", "-m", "init"], repo)
    head = git(["rev-parse", "HEAD"], repo)

    tags = lineage(repo)
    assert tags["git.commit"] == head and tags["git.dirty"] == "false"
    assert tags["dvc.shards.data/shards"] == "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.dir"
    assert tags["dvc.ingest_vqa_rad.data/ingested/vqa_rad"] == "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb.dir"
    assert tags["dvc.ingest_vqa_rad.metrics/ingest.json"] == "cccccccccccccccccccccccccccccccc"
    assert not any("data/validated" in k for k in tags)       # deps are not data versions of the run

    (repo / "scratch.txt").write_text("untracked")
    assert lineage(repo)["git.dirty"] == "false"              # untracked outputs do not count
    (repo / "params.yaml").write_text("demo: {seed: 1}\n")
    assert lineage(repo)["git.dirty"] == "true"

    run = TrainingRun.start_or_resume("galen-test", "lin", None, {}, {}, uri=uri, project=repo,
                                      system_metrics=False)
    run.end()
    logged = MlflowClient(uri).get_run(run.run_id).data.tags
    assert logged["git.commit"] == head and logged["mlflow.source.git.commit"] == head
    assert logged["dvc.shards.data/shards"] == "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.dir"


def test_lineage_without_git_or_dvc_lock_says_so(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "dvc.yaml").write_text("stages: {}\n")
    tags = lineage(bare)
    assert "not a git repository" in tags["git.commit"] and tags["git.dirty"] == "unknown"
    assert tags["dvc.lock"].startswith("missing")
    (bare / "dvc.lock").write_text("stages: [unclosed\n")
    assert lineage(bare)["dvc.lock"].startswith("unreadable")


def test_run_id_file_round_trips_atomically(tmp_path):
    ids = run_id_file(tmp_path / "ckpt")
    assert ids.read() is None
    ids.write("0123456789abcdef0123456789abcdef")
    ids.write("fedcba9876543210fedcba9876543210")
    assert ids.read() == "fedcba9876543210fedcba9876543210"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["mlflow_run_id"]   # no temp files left
    ids.path.write_text("garbage id with spaces")
    with pytest.raises(GalenInputError, match="delete it"):
        ids.read()
    ids.clear()
    assert ids.read() is None


# --------------------------------------------------------------------------------------------------
# A real tracking server with artifacts proxied to S3 (moto)
# --------------------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_runs_and_model_artifacts_go_through_a_real_server_to_s3(tmp_path, monkeypatch, mlflow_server_on_s3):
    url, s3 = mlflow_server_on_s3
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    for key in ("MLFLOW_S3_ENDPOINT_URL", *AWS):              # the client cannot reach S3 itself:
        monkeypatch.delenv(key, raising=False)                # artifacts must be proxied by the server
    assert tracking_uri() == url

    folder = model_folder(tmp_path)
    run = TrainingRun.start_or_resume("galen-server", "job", None, {"optim": {"lr": 3e-4}}, {"where": "server"},
                                      project=tmp_path, system_metrics=False)
    run.log_metrics({"loss/vqa": 1.5, "tokens_per_s": 1234.0}, step=7)
    assert run.log_model_folder(folder) == f"runs:/{run.run_id}/model"
    run.end()

    client = MlflowClient(url)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.params["optim.lr"] == "0.0003"
    assert history(client, run.run_id, "loss/vqa") == [(7, 1.5)]
    assert client.get_experiment_by_name("galen-server").artifact_location.startswith("mlflow-artifacts:")

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="galen-mlflow", Prefix="mlartifacts/")["Contents"]}
    weights = next(k for k in keys if k.endswith(f"{run.run_id}/artifacts/model/model.safetensors"))
    assert s3.get_object(Bucket="galen-mlflow", Key=weights)["Body"].read() == (folder / "model.safetensors").read_bytes()
    assert any(k.endswith(f"{run.run_id}/artifacts/model/tokenizer/spm.model") for k in keys)

    import mlflow

    back = Path(mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path="model",
                                                    dst_path=str(tmp_path / "download"), tracking_uri=url))
    assert tree_digest(back) == tree_digest(folder)
