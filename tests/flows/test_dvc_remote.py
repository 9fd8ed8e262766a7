"""DVC remotes for real: push to and pull from an S3-compatible server (moto's server mode, the only
S3 emulation allowed here) through dvc-s3/boto3 with a configurable endpoint."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(tmp_path):
    """A moto S3 server process on localhost, stopped by pid at the end."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    import boto3

    boto3.client("s3", endpoint_url=url, **{k.lower(): v for k, v in env.items() if k != "AWS_DEFAULT_REGION"},
                 region_name="us-east-1").create_bucket(Bucket="galen-data")
    yield url, env
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    full_env = {**os.environ, **(env or {}), "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_dvc_push_and_pull_through_an_s3_endpoint(tmp_path, s3_server):
    url, env = s3_server
    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    shards = repo / "data" / "shards"
    shards.mkdir(parents=True)
    for i in range(3):
        (shards / f"part-{i:05d}.parquet").write_bytes(os.urandom(2048) + bytes([i]))
    run(["dvc", "add", "data/shards"], repo)
    run(["dvc", "remote", "add", "-d", "s3", "s3://galen-data/dvc"], repo)
    run(["dvc", "remote", "modify", "s3", "endpointurl", url], repo)
    out = run(["dvc", "push"], repo, env)
    assert "3 files pushed" in out or "pushed" in out

    import boto3
    s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="galen-data", Prefix="dvc/").get("Contents", [])]
    assert len(keys) >= 4  # three files plus the directory manifest

    originals = {p.name: p.read_bytes() for p in shards.iterdir()}
    shutil.rmtree(shards)
    shutil.rmtree(repo / ".dvc" / "cache")
    run(["dvc", "pull"], repo, env)
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == originals
