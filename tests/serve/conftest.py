"""Fixtures of the serving tests: a real MLflow registry holding two registered nano models, and a
real `galen serve` (embedded Ray + Ray Serve) answering over HTTP on a free local port.

Both are session-wide (starting Ray costs tens of seconds on a small machine); the server's
limits are lowered through its own params file so the size-limit tests send small bodies. The
promotion test moves `champion` from version 1 to 2, so tests read the served version from
/health instead of assuming one.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
MiB = 2 ** 20
# The server's limits in these tests (params.yaml `serve:` of its own params file).
LIMITS = {"poll_interval_s": 1.0, "max_body_bytes": 2 * MiB, "max_image_bytes": 1 * MiB,
          "max_image_pixels": 4_000_000, "max_batch_size": 8, "request_timeout_s": 120.0}
NAME = "galen-generalist"
LABELS = ["adipose tissue", "lymphocytes", "colorectal adenocarcinoma epithelium"]  # the versions' class names
STARTS = 3  # attempts to start `galen serve` when Ray's node start times out (busy machine)
RAY_START_TIMEOUT = "timed out during startup"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(width: int = 96, height: int = 80, seed: int = 0, mode: str = "RGB") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def dicom_bytes() -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm")).read_bytes()


@dataclass
class Registry:
    root: Path
    uri: str
    config: Any  # flows.registry.RegistryConfig

    def promote(self, version: str) -> str:
        from galen.flows.registry import promote

        return promote(self.config, version=version, uri=self.uri).message

    def aliases(self) -> dict[str, str]:
        from galen.flows.registry import aliases

        return {k: str(v) for k, v in aliases(self.config, uri=self.uri).items()}


@pytest.fixture(scope="session")
def registry(tmp_path_factory, demo_tokenizer) -> Registry:
    """galen-generalist versions 1 and 2 (random nano models, seeds 0 and 1) registered by
    flows.registry from evaluation runs (metrics + label sets) as the pyfunc with the model folder
    as artifact; `champion` -> 1."""
    from mlflow import MlflowClient

    from galen.flows.cli import main
    from galen.flows.params import load_params
    from galen.flows.registry import MetricRule, RegistryConfig, register

    root = tmp_path_factory.mktemp("serve_registry")
    demo_tokenizer.save(root / "tokenizer")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = RegistryConfig(model_name=NAME, metrics=[MetricRule("nli.accuracy")])
    params = load_params(ROOT / "params.yaml")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("galen-evaluate")
    for seed in (0, 1):
        folder = root / f"model-{seed}"
        assert main(["model", "init", "--size", "nano", "--tokenizer", str(root / "tokenizer"), "--out", str(folder),
                     "--seed", str(seed)]) == 0
        # what `galen evaluate` leaves in its run: the metrics and the label sets it evaluated on
        run = client.create_run(experiment, tags={"galen.labels": json.dumps({"classification": LABELS})})
        client.log_metric(run.info.run_id, "nli.accuracy", 0.5)
        register(folder, config, params, run_id=run.info.run_id, uri=uri, project=ROOT)
    reg = Registry(root, uri, config)
    reg.promote("1")
    assert reg.aliases()["champion"] == "1"
    return reg


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    registry: Registry

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 120), **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=kw.pop("timeout", 120), **kw)

    def version(self) -> str:
        r = self.get("/health")
        assert r.status_code == 200, r.text
        return r.json()["model"]["version"]

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # galen serve shuts Serve and its embedded Ray down
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: Ray's processes go with it
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def server(registry, tmp_path_factory) -> Server:
    root = tmp_path_factory.mktemp("serve_run")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["serve"] = {**(params.get("serve") or {}), **LIMITS, "model_cache": str(root / "models")}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.uri, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for attempt in range(1, STARTS + 1):
        port, ready, log = free_port(), root / f"ready-{attempt}", root / f"serve-{attempt}.log"
        cmd = [sys.executable, "-m", "galen.flows.cli", "serve", "--port", str(port), "--params", str(root / "params.yaml"),
               "--num-cpus", "2", "--ready-file", str(ready)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        srv = Server(f"http://127.0.0.1:{port}", proc, log, registry)
        deadline = time.time() + 300
        while not ready.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(1)
        if ready.is_file():
            break
        _stop(proc)
        # Ray gives its node 30 s to start; on a machine busy with other jobs that can run out.
        if attempt < STARTS and RAY_START_TIMEOUT in log.read_text(errors="replace"):
            continue
        pytest.fail(f"galen serve did not start (exit status {proc.returncode}):\n{srv.log_tail()}")
    try:
        assert srv.get("/health").status_code == 200
        yield srv
    finally:
        _stop(proc)
    assert proc.returncode == 0, f"galen serve did not stop cleanly ({proc.returncode}):\n{srv.log_tail()}"


def assert_healthy(server: Server) -> None:
    """The server still answers: health, then a normal request."""
    r = server.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    r = server.post("/v1/nli", json={"premise": "the lungs are clear", "hypothesis": "there is no effusion"})
    assert r.status_code == 200, r.text
    assert r.json()["answer"] in ("yes", "no", "maybe")
