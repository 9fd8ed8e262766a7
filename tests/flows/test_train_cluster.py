"""`galen submit` against a real two-node Ray cluster on this machine (`ray start --head` plus
`ray start --address=...`: two raylets with their own temp dirs and ports, one GCS, token auth),
through the Ray Jobs API: the project is uploaded as the job's working_dir, the driver runs on the
head with RAY_ADDRESS set by the Jobs API (so `galen train` joins the cluster), and the two Ray
Train workers land on the two nodes (train.placement_strategy STRICT_SPREAD). Every Ray process is
stopped by pid afterwards; `ray stop` is not used because it stops every Ray process on the
machine, not only these.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.flows.train_procs import (
    BIN,
    ROOT,
    SMALL_JOB,
    GalenJob,
    cleanup_dir,
    isolated_env,
    metric_history,
    only_run,
    short_tmp,
    stop_processes,
    wait_for,
    write_params,
)
from tests.servers import free_port

pytestmark = pytest.mark.slow

STATE_QUERY = """
import json, sys
from ray.util.state import list_actors, list_jobs, list_nodes
address = sys.argv[1]
nodes = [n.node_id for n in list_nodes(address=address, filters=[("state", "=", "ALIVE")])]
workers = [a.node_id for a in list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")],
                                          limit=1000)]
jobs = {j.submission_id: str(j.status) for j in list_jobs(address=address) if j.submission_id}
print(json.dumps({"nodes": nodes, "workers": workers, "jobs": jobs}))
"""


def cluster_state(dashboard: str, env: dict[str, str]) -> dict:
    """Nodes, Ray Train worker actors (dead ones too) and jobs, from the State API (a separate
    process: it needs the cluster's auth token from `env`)."""
    out = subprocess.run([str(BIN / "python"), "-c", STATE_QUERY, dashboard], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def alive_nodes(dashboard: str, env: dict[str, str]) -> int:
    try:
        return len(cluster_state(dashboard, env)["nodes"])
    except (AssertionError, ValueError, IndexError, subprocess.TimeoutExpired):  # dashboard not up yet
        return 0


def ray_start(args: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "ab") as f:
        proc = subprocess.run([str(BIN / "ray"), "start", "--disable-usage-stats", *args], env=env, stdout=f,
                              stderr=subprocess.STDOUT, timeout=180)
    assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.fixture
def two_node_cluster(tmp_path):
    """Head (GCS, dashboard/Jobs API, 2 CPUs) + a second node (2 CPUs), ports all picked free so
    another Ray on this machine is neither disturbed nor joined."""
    ray_tmp = short_tmp("galen-rc-")
    env = isolated_env(ray_tmp, tmp_path / "mlflow.db")
    gcs, dashboard = free_port(), free_port()
    try:
        ray_start(["--head", f"--port={gcs}", "--num-cpus=2", f"--temp-dir={ray_tmp}",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                   f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"],
                  env, tmp_path / "head.log")
        # The second raylet needs its own temp dir: with the head's, both nodes' runtime-env agents
        # manage one runtime_resources folder and one deletes the job's working_dir under the other.
        ray_start([f"--address=127.0.0.1:{gcs}", "--num-cpus=2", f"--temp-dir={ray_tmp / 'n2'}",
                   f"--dashboard-agent-listen-port={free_port()}"], env, tmp_path / "node2.log")
        url = f"http://127.0.0.1:{dashboard}"
        wait_for(lambda: alive_nodes(url, env) == 2, 180, "two alive nodes", poll=2)
        yield {"dashboard": url, "env": env, "ray_tmp": ray_tmp}
    finally:
        stop_processes([], str(ray_tmp))   # both nodes' daemons and workers: they name this temp dir
        for log in ray_tmp.glob("session_*/logs/*"):   # Ray's own logs outlive the temp dir, for a failure
            if log.is_file() and log.suffix in (".log", ".err", ".out"):
                (tmp_path / "ray-logs").mkdir(exist_ok=True)
                shutil.copy(log, tmp_path / "ray-logs" / log.name)
        cleanup_dir(ray_tmp)


@pytest.mark.timeout(1500)
def test_galen_submit_trains_on_both_nodes_of_a_cluster(two_node_cluster, tmp_path, demo_shards, demo_model_dir):
    import torch
    from safetensors import safe_open

    from galen.model.generalist import GalenModel

    url, env = two_node_cluster["dashboard"], two_node_cluster["env"]
    out = tmp_path / "model"
    # bf16 on CPU and gradient accumulation ride along: 2 micro-batches per step, bf16 weights and inputs
    params = write_params(tmp_path / "params.yaml", **{**SMALL_JOB, "steps": 4, "checkpoint_every": 2,
                                                       "precision": "bf16", "grad_accum": 2},
                          placement_strategy="STRICT_SPREAD", experiment="cluster",
                          storage_path=str(tmp_path / "storage"), shards=str(demo_shards),
                          tokenizer=str(demo_model_dir), init=str(demo_model_dir), out=str(out),
                          metrics=str(tmp_path / "metrics.json"))
    job_id = "galen-cluster-test"
    submit = GalenJob(["submit", "--address", url, "--job-id", job_id, "--env", "OMP_NUM_THREADS=1", "--",
                       "train", "--stage", "finetune", "--params", str(params)], ROOT, env, tmp_path / "submit.log",
                      own_ray=False)
    try:
        assert submit.wait(1200) == 0, submit.tail()
    finally:
        submit.close()
    log = (tmp_path / "submit.log").read_text(errors="replace")
    assert f"submitted job {job_id}" in log and f"job {job_id} SUCCEEDED" in log
    assert "trained (finetune" in log                                   # the driver's output was streamed

    state = cluster_state(url, env)
    assert state["jobs"][job_id] == "SUCCEEDED"
    assert len(state["nodes"]) == 2
    assert len(state["workers"]) == 2 and set(state["workers"]) == set(state["nodes"]), state

    GalenModel.from_pretrained(out)                                      # rank 0 wrote the model folder
    with safe_open(str(out / "model.safetensors"), "pt") as weights:     # fp32 on disk after bf16 training
        assert {weights.get_tensor(k).dtype for k in weights.keys()} <= {torch.float32, torch.int64}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 4
    per_step = SMALL_JOB["batch_size"] * 2                              # grad_accum 2: two micro-batches a step
    assert sum(v for k, v in metrics.items() if k.startswith("consumed/")) == 4 * per_step
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])                    # forwarded to the job by submit
    run = only_run(client, "cluster")
    assert run.info.run_id == metrics["run_id"] and run.info.status == "FINISHED"
    assert run.data.params["placement_strategy"] == "STRICT_SPREAD"
    assert run.data.params["precision"] == "bf16" and run.data.params["grad_accum"] == "2"
    assert [s for s, _ in metric_history(client, run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert any(a.path == "model" for a in client.list_artifacts(run.info.run_id))


def test_submit_refuses_a_bad_command_before_contacting_a_cluster(tmp_path):
    from galen.flows.cli import build_parser
    from galen.flows.submit import galen_command, submit
    from galen.model.errors import GalenInputError

    parser = build_parser()

    assert galen_command(["--", "train", "--stage", "finetune"], parser) == ["train", "--stage", "finetune"]
    with pytest.raises(GalenInputError, match="not a valid Galen command"):
        galen_command(["--", "train", "--stage", "finetuning"], parser)
    with pytest.raises(GalenInputError, match="cannot submit itself"):
        galen_command(["submit", "--", "train"], parser)
    with pytest.raises(GalenInputError, match="not the Galen project folder"):
        submit(["train", "--stage", "finetune"], parser, address="http://127.0.0.1:9", project=tmp_path)
    with pytest.raises(GalenInputError, match="cannot reach the Ray Jobs API"):
        submit(["train", "--stage", "finetune"], parser, address=f"http://127.0.0.1:{free_port()}", project=ROOT)
