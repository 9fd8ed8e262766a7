"""Real services for tests, started as processes and stopped by pid: a moto S3 server and an
`mlflow server` (sqlite backend) proxying its artifacts to that S3 bucket."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "galen-mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready, proc: subprocess.Popen, what: str, log: Path, timeout: float = 45.0) -> None:
    """Poll `ready()` until true; fail early with the log if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    pytest.fail(f"{what} not ready after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Stop the process group we started (the server's uvicorn/gunicorn workers included)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as r:
        return r.status == 200


@contextlib.contextmanager
def mlflow_server_on_s3(folder: Path) -> Iterator[tuple[str, object]]:
    """moto S3 + `mlflow server --artifacts-destination s3://...` with their logs and database in
    `folder`; yields (server url, boto3 S3 client) and stops both by pid afterwards."""
    import boto3

    procs: list[subprocess.Popen] = []
    try:
        s3_port = free_port()
        s3_url = f"http://127.0.0.1:{s3_port}"
        moto_log = folder / "moto.log"
        procs.append(start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], moto_log,
                           {**os.environ, **AWS}))
        s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        wait_until(lambda: s3.list_buckets() is not None, procs[-1], "moto_server", moto_log)
        s3.create_bucket(Bucket=BUCKET)

        port = free_port()
        server_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # no job runner (huey consumers): tracking does not need it and it slows startup down
        server_env.update({**AWS, "MLFLOW_S3_ENDPOINT_URL": s3_url, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        server_log = folder / "mlflow-server.log"
        procs.append(start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/server.db",
                            "--artifacts-destination", f"s3://{BUCKET}/mlartifacts",
                            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                           server_log, server_env))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{url}/health"), procs[-1], "mlflow server", server_log, timeout=50)
        yield url, s3
    finally:
        for proc in reversed(procs):
            stop(proc)
