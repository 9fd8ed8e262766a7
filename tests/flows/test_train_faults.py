"""Checkpoints and fault tolerance of `galen train`, for real (2 Ray Train workers, DeepSpeed on CPU):

* a Ray Train worker process is SIGKILLed mid-run: Ray Train restarts the worker group from the
  last checkpoint and the job finishes in the same MLflow run, with the same step sequence,
  learning rates, data positions and final weights as an uninterrupted run of the same params;
* checkpoints on s3:// (a moto server, endpoint from AWS_ENDPOINT_URL): the whole job (driver and
  local Ray) is SIGKILLed, and rerunning the same params resumes it from S3, in the same MLflow run.

Every run here shares one set of params (only where it stores things differs), so all of them must
match the uninterrupted reference run: the same steps, data positions and learning rates exactly,
the same losses and final weights up to float rounding.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.flows.train_procs import (
    SMALL_JOB,
    GalenJob,
    cleanup_dir,
    isolated_env,
    latest_checkpoint_step,
    load_weights,
    local_checkpoint_step,
    metric_history,
    only_run,
    short_tmp,
    stop_processes,
    wait_for,
    write_params,
)
from tests.servers import AWS, BIN, free_port, start, stop, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # setup (the reference run) counts too

RUN_S = 1200  # one tiny run takes 1-4 minutes on a loaded 2-core machine


# The fine-tuning curriculum runs across the checkpoint a restart resumes from: closed VQA alone for
# steps 0-4 (a filtered view of the vqa shards), then the mixture with closed VQA on top, lr rewarmed.
CURRICULUM = {"objectives": {"vqa_closed": 1.0},
              "curriculum": {"steps": 5, "objectives": {"vqa_closed": 1.0}, "rewarm_steps": 2}}


def job_params(root: Path, storage: str, demo_shards: Path, demo_model_dir: Path) -> Path:
    return write_params(root / "params.yaml", **SMALL_JOB, **CURRICULUM, experiment=root.name, storage_path=storage,
                        shards=str(demo_shards), tokenizer=str(demo_model_dir), init=str(demo_model_dir),
                        out=str(root / "model"), metrics=str(root / "metrics.json"))


def train_args(params: Path) -> list[str]:
    return ["train", "--stage", "finetune", "--params", str(params)]


def outcome(root: Path) -> dict:
    """What a finished run of `root` reported: final metrics, its one MLflow run, per-step curves."""
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = only_run(client, root.name)
    return {"metrics": json.loads((root / "metrics.json").read_text()), "run": run,
            "lr": metric_history(client, run.info.run_id, "lr"),
            "loss": metric_history(client, run.info.run_id, "loss"),
            "resumed_from_step": metric_history(client, run.info.run_id, "resumed_from_step")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_shards, demo_model_dir) -> dict:
    """The uninterrupted run every interrupted one is compared with."""
    root = tmp_path_factory.mktemp("reference")
    ray_tmp = short_tmp("galen-ray-")
    params = job_params(root, str(root / "storage"), demo_shards, demo_model_dir)
    job = GalenJob(train_args(params), root, isolated_env(ray_tmp, root / "mlflow.db"), root / "train.log")
    try:
        assert job.wait(RUN_S) == 0, job.tail()
    finally:
        job.close()
        cleanup_dir(ray_tmp)
    result = outcome(root)
    log = (root / "train.log").read_text(errors="replace")
    assert "Failed to query Ray Train Controller" not in log  # no State API noise
    # one console progress bar a person can follow: steps, elapsed<ETA, loss and throughput
    assert re.search(r"finetune: 100%\|[^|]*\| 12/12 \[\d\d:\d\d<\d\d:\d\d,\s+[0-9.]+(?:s/step|step/s), loss=[0-9.]+, "
                     r"samples/s=[0-9.]+\]", log), log[-3000:]
    assert result["metrics"]["step"] == SMALL_JOB["steps"]
    assert [s for s, _ in result["lr"]] == list(range(1, SMALL_JOB["steps"] + 1))  # log_every 1
    assert result["resumed_from_step"] == []
    # 5 curriculum steps x 4 rows per worker from the closed-VQA view, then some of the mixture's
    assert result["metrics"]["consumed/vqa_closed"] > 5 * SMALL_JOB["batch_size"]
    return {**result, "weights": load_weights(root / "model")}


def assert_same_training_as(reference: dict, got: dict, restored_from: int) -> None:
    """Same final report and learning rate at every step (exactly), same loss at every step and same
    final weights up to float rounding (steps between the checkpoint and the failure are logged
    twice: both times). Runs are usually bitwise equal, but CPU kernels may sum in another order
    from run to run (~1e-7 relative); an optimizer or scheduler that was not restored would be off
    by orders of magnitude more (each step moves weights by ~lr = 5e-4)."""
    steps = SMALL_JOB["steps"]
    assert got["metrics"]["step"] == steps
    consumed = {k: v for k, v in got["metrics"].items() if k.startswith("consumed/")}
    assert consumed and consumed == {k: v for k, v in reference["metrics"].items() if k.startswith("consumed/")}
    for key, tolerance in (("lr", 0.0), ("loss", 1e-5)):
        want = dict(reference[key])
        assert {s for s, _ in got[key]} == set(want), key                      # every step, none extra
        off = [(s, v, want[s]) for s, v in got[key] if v != pytest.approx(want[s], rel=tolerance, abs=0)]
        assert not off, (key, off)
        redone = [s for s, _ in got[key] if s > restored_from]
        assert len(redone) >= steps - restored_from, key
    assert got["resumed_from_step"] == [(restored_from, float(restored_from))]
    weights = got["weights"]
    assert weights.keys() == reference["weights"].keys()
    worst = max(float((weights[k] - w).abs().max()) for k, w in reference["weights"].items())
    assert worst < 1e-5, f"final weights differ from the uninterrupted run's by up to {worst:.3g}"


def test_a_killed_worker_resumes_from_the_last_checkpoint_in_the_same_run(reference, tmp_path, demo_shards,
                                                                           demo_model_dir):
    root = tmp_path / "killed_worker"
    root.mkdir()
    storage = root / "storage"
    ray_tmp = short_tmp("galen-ray-")
    params = job_params(root, str(storage), demo_shards, demo_model_dir)
    job = GalenJob(train_args(params), root, isolated_env(ray_tmp, root / "mlflow.db"), root / "train.log")
    try:
        first = wait_for(lambda: local_checkpoint_step(storage), RUN_S, "first checkpoint", job)
        workers = job.workers()
        assert len(workers) == SMALL_JOB["num_workers"], workers
        victim = workers[-1]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        # Ray Train replaces the whole worker group; once the new one exists, the checkpoint it
        # restores is the latest registered one (the next can only come steps after the restart).
        old = {w.pid for w in workers}
        wait_for(lambda: [w for w in job.workers() if w.pid not in old], RUN_S, "restarted workers", job)
        restored_from = local_checkpoint_step(storage)
        assert first <= restored_from < SMALL_JOB["steps"]
        assert restored_from % SMALL_JOB["checkpoint_every"] == 0
        assert job.wait(RUN_S) == 0, job.tail()
    finally:
        job.close()
        cleanup_dir(ray_tmp)

    got = {**outcome(root), "weights": load_weights(root / "model")}
    tags = got["run"].data.tags
    assert got["run"].info.status == "FINISHED"
    assert tags["galen.checkpoint_restores"] == "1"          # one worker-group restart, in this run
    assert "galen.resume_count" not in tags                   # not a rerun of the command
    assert_same_training_as(reference, got, restored_from)
    finished = json.loads(next(storage.glob("*/galen_finished.json")).read_text())
    assert finished["run_id"] == got["run"].info.run_id


@pytest.fixture
def moto_s3(tmp_path):
    """A moto S3 server with the bucket `galen-ckpt`; yields (endpoint url, boto3 client)."""
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "moto.log"
    proc = start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log, {**os.environ, **AWS})
    try:
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        wait_until(lambda: s3.list_buckets() is not None, proc, "moto_server", log)
        s3.create_bucket(Bucket="galen-ckpt")
        yield url, s3
    finally:
        stop(proc)


def s3_text(s3, key: str) -> str | None:
    try:
        return s3.get_object(Bucket="galen-ckpt", Key=key)["Body"].read().decode()
    except s3.exceptions.NoSuchKey:
        return None


def s3_keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="galen-ckpt", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def s3_checkpoint_step(s3) -> int | None:
    snaps = [k for k in s3_keys(s3, "runs/") if k.endswith("/checkpoint_manager_snapshot.json")]
    steps = [latest_checkpoint_step(s3_text(s3, k)) for k in snaps]
    return max((s for s in steps if s is not None), default=None)


def test_checkpoints_on_s3_resume_a_killed_job_in_the_same_run(reference, tmp_path, moto_s3, demo_shards,
                                                               demo_model_dir):
    url, s3 = moto_s3
    root = tmp_path / "s3_job"
    root.mkdir()
    params = job_params(root, "s3://galen-ckpt/runs", demo_shards, demo_model_dir)
    aws = {**AWS, "AWS_ENDPOINT_URL": url}

    ray_tmp = short_tmp("galen-ray-")
    job = GalenJob(train_args(params), root, isolated_env(ray_tmp, root / "mlflow.db", **aws), root / "train.log")
    try:
        wait_for(lambda: s3_checkpoint_step(s3), RUN_S, "a checkpoint on S3", job, poll=0.5)
        # the machine dies: driver, local Ray and workers at once
        stop_processes([job.proc.pid], job.ray_tmp, sig=signal.SIGKILL)
        job.wait(30)
    finally:
        job.close()
        cleanup_dir(ray_tmp)
    restored_from = s3_checkpoint_step(s3)
    keys = s3_keys(s3, "runs/")
    (job_prefix,) = {k.split("/")[1] for k in keys if k.endswith("/mlflow_run_id")} or {None}
    assert job_prefix, keys
    first_run_id = s3_text(s3, f"runs/{job_prefix}/mlflow_run_id").strip()
    assert s3_text(s3, f"runs/{job_prefix}/galen_finished.json") is None
    assert not (root / "s3:").exists() and not (root / "runs").exists()   # nothing went to a local folder

    ray_tmp = short_tmp("galen-ray-")
    rerun = GalenJob(train_args(params), root, isolated_env(ray_tmp, root / "mlflow.db", **aws), root / "rerun.log")
    try:
        assert rerun.wait(RUN_S) == 0, rerun.tail()
    finally:
        rerun.close()
        cleanup_dir(ray_tmp)

    got = {**outcome(root), "weights": load_weights(root / "model")}
    run = got["run"]
    assert run.info.run_id == first_run_id and run.info.status == "FINISHED"
    assert run.data.tags["galen.resume_count"] == "1"          # the rerun continued the run...
    assert run.data.tags["galen.checkpoint_restores"] == "1"   # ...from the checkpoint on S3
    assert_same_training_as(reference, got, restored_from)
    finished = json.loads(s3_text(s3, f"runs/{job_prefix}/galen_finished.json"))
    assert finished["run_id"] == first_run_id
    keys = s3_keys(s3, f"runs/{job_prefix}/")
    assert any("/checkpoint_" in k and k.endswith("/galen_state.json") for k in keys)
    assert any(k.endswith(".pt") for k in keys)               # DeepSpeed's model/optimizer states
