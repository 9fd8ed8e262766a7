"""Helpers for the tests that run `galen train` for real: a params file, an isolated environment
(own Ray temp dir and auth token, own MLflow store), the galen process, reading the run back, and
stopping every process a test started, by pid."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]

# Tiny fine-tuning job: nano model, 2 workers, 4 examples per worker and step, two tasks (one with
# images, one text-only) so the per-task data positions are exercised, EMA on (more restored state).
SMALL_JOB = {
    "size": "nano", "tasks": ["vqa", "nli"], "steps": 12, "checkpoint_every": 4, "batch_size": 4,
    "num_workers": 2, "zero_stage": 2, "max_failures": 2, "lr": 5e-4, "warmup_ratio": 0.1,
    "ema_decay": 0.9, "log_every": 1, "seed": 0,
}


def write_params(path: Path, **train) -> Path:
    """A params.yaml with only a `train:` section (everything shared by both stages)."""
    path.write_text(yaml.safe_dump({"train": train}, sort_keys=False))
    return path


def short_tmp(prefix: str) -> Path:
    """A short folder under /tmp: Ray puts unix sockets in its temp dir (path limit ~107 bytes),
    and pytest's tmp_path is too deep for that."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def isolated_env(ray_tmp: Path, mlflow_db: Path, **extra: str) -> dict[str, str]:
    """Environment of the Ray/galen processes of one test: its own Ray temp dir (never joins, nor is
    joined by, another Ray on this machine), token auth with a fresh token (nothing read from or
    written to ~/.ray), its own sqlite MLflow store, one thread per op (the machine is shared)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_TMPDIR": str(ray_tmp),
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(32).hex(), "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_db}", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def start_galen(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([str(BIN / "galen"), *args], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def processes_of(roots: list[int], marker: str | None) -> list[psutil.Process]:
    """The given processes, their descendants, and every process whose command line names `marker`
    (a test's own Ray temp dir: Ray daemons that outlived their parent), with their descendants."""
    found: dict[int, psutil.Process] = {}
    seeds = []
    for pid in roots:
        try:
            seeds.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    if marker:
        me = os.getpid()
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid != me and any(marker in a for a in (p.info["cmdline"] or [])):
                    seeds.append(p)
            except psutil.Error:
                pass
    for p in seeds:
        try:
            found[p.pid] = p
            for c in p.children(recursive=True):
                found[c.pid] = c
        except psutil.Error:
            pass
    return list(found.values())


def stop_processes(roots: list[int], marker: str | None = None, sig: int = signal.SIGTERM,
                   timeout: float = 20) -> None:
    """Signal them all (by pid), wait, then SIGKILL what is left."""
    procs = processes_of(roots, marker)
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


# Ray's own limit: a local node must register within 30 s (ray/_private/node.py). On a machine
# loaded far beyond its cores that can fail before anything of Galen's ran; such a start is retried.
RAY_STARTUP_TIMEOUT = "The current node timed out during startup"


class GalenJob:
    """One `galen ...` process of a test; `close()` stops it and every process it started (also
    after a failed assertion). With `own_ray` the process starts its own local Ray in env's
    RAY_TMPDIR, whose daemons are stopped too; without (a client of a cluster the test started
    separately) nothing but its own descendants. A run whose local Ray failed to start at all is
    started again, once."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path, own_ray: bool = True,
                 startup_retries: int = 1) -> None:
        self.args, self.cwd, self.env = args, cwd, env
        self.log, self.ray_tmp = log, env["RAY_TMPDIR"] if own_ray else None
        self.retries = startup_retries
        self._start()

    def _start(self) -> None:
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = start_galen(self.args, self.cwd, self.env, self.log)

    def poll(self) -> int | None:
        """The exit status, or None while running (or after restarting a failed Ray start)."""
        rc = self.proc.poll()
        if rc not in (None, 0) and self.retries > 0 and RAY_STARTUP_TIMEOUT in self.tail(None, self.log_offset):
            self.retries -= 1
            self.close()
            self._start()
            return None
        return rc

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self.poll()
            if rc is not None:
                return rc
            time.sleep(1)
        pytest.fail(f"galen did not finish in {timeout:.0f}s:\n{self.tail()}")

    def tail(self, n: int | None = 6000, offset: int = 0) -> str:
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return text if n is None else text[-n:]

    def workers(self) -> list[psutil.Process]:
        """The Ray Train worker processes of this job (process title `ray::RayTrainWorker...`)."""
        out = []
        for p in processes_of([self.proc.pid], self.ray_tmp):
            try:
                if (p.cmdline() or [""])[0].startswith("ray::RayTrainWorker"):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def close(self) -> None:
        stop_processes([self.proc.pid], self.ray_tmp)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def run_galen_to_end(args: list[str], workdir: Path, timeout: float = 1200) -> None:
    """Run one `galen ...` job in its own Ray (temp dir) and MLflow store (`workdir/mlflow.db`) until
    it exits, assert it succeeded (showing its log otherwise), and stop everything it started."""
    ray_tmp = short_tmp("galen-ray-")
    job = GalenJob(args, workdir, isolated_env(ray_tmp, workdir / "mlflow.db"), workdir / "train.log")
    try:
        assert job.wait(timeout) == 0, job.tail()
    finally:
        job.close()
        cleanup_dir(ray_tmp)


def wait_for(predicate, timeout: float, what: str, job: GalenJob | None = None, poll: float = 0.2):
    """Poll until `predicate()` returns something truthy (and return it); fail with the job's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if job is not None and job.poll() is not None:
            pytest.fail(f"galen exited ({job.proc.returncode}) while waiting for {what}:\n{job.tail()}")
        time.sleep(poll)
    pytest.fail(f"no {what} after {timeout:.0f}s" + (f":\n{job.tail()}" if job else ""))


def latest_checkpoint_step(snapshot_text: str | None) -> int | None:
    """The step of the latest checkpoint Ray Train registered, from its checkpoint_manager_snapshot.json."""
    if not snapshot_text:
        return None
    try:
        latest = json.loads(snapshot_text).get("latest_checkpoint_result")
    except ValueError:  # being written
        return None
    return int(latest["metrics"]["step"]) if latest else None


def local_checkpoint_step(storage: Path) -> int | None:
    steps = [latest_checkpoint_step(p.read_text()) for p in storage.glob("*/checkpoint_manager_snapshot.json")]
    return max((s for s in steps if s is not None), default=None)


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"expected one run in {experiment!r}, found {len(runs)}"
    return runs[0]


def load_weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def cleanup_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
