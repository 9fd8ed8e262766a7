"""`galen submit`: run a Galen command (usually `galen train`) on an existing Ray cluster through
the Ray Jobs API.

    RAY_ADDRESS=http://HEAD:8265 galen submit -- train --stage finetune --params params.yaml

The command is checked with Galen's own parser before anything is sent. By default the project
folder is uploaded as the job's `working_dir` (what .gitignore lists, data and run outputs are
left out: the nodes hold the data themselves, e.g. `dvc pull` in infra/), and the job runs
`python -m galen.flows.cli ...` in it on the head node; the Jobs API sets RAY_ADDRESS for that driver, so
`galen train` joins the cluster instead of starting a local Ray. With `--cluster-dir` nothing is
uploaded and the command runs in that folder of the nodes (e.g. /app in the Galen image).
`submit` waits for the job, streaming its logs, and its exit status is the job's (0 SUCCEEDED).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from galen.model.errors import GalenError, GalenInputError

# Left out of the upload besides .gitignore (Ray honours it): data and run outputs, environments,
# credentials. Patterns are .gitignore-style, relative to the project folder.
DEFAULT_EXCLUDES = (
    ".git", ".venv", "**/__pycache__", "*.egg-info", ".pytest_cache", "data", "artifacts", "metrics",
    "mlruns", "mlartifacts", "mlflow.db", "ray_results", "checkpoints", "outputs", "*.safetensors",
    ".dvc/cache", ".dvc/tmp", ".dvc/config.local", "infra/aws/galen.env",
)
# Settings (never credentials) a job's driver and workers get from the submitting shell when set
# there; anything else with --env NAME or --env NAME=VALUE.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_DEFAULT_REGION")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# An uploaded project runs as `galen.*` from the upload, not from whatever Galen the nodes have
# installed: this folder of the upload holds a `galen` package whose path is the project folder, and
# it leads PYTHONPATH of the job's driver and workers (both start in the working_dir).
JOB_IMPORT_DIR = "infra/job"


class JobFailed(GalenError):
    """The submitted job ended in FAILED or STOPPED."""


@dataclass
class Submitted:
    job_id: str
    status: str          # PENDING/RUNNING when not waited for, else SUCCEEDED, FAILED or STOPPED
    message: str = ""
    driver_exit_code: int | None = None


def galen_command(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """The Galen command line the job will run, checked with Galen's own parser (the CLI hands it
    over; a typo fails here, not minutes later on the cluster)."""
    argv = list(argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if argv[:1] == ["galen"]:
        argv = argv[1:]
    if not argv:
        raise GalenInputError("give the Galen command to run on the cluster, e.g. "
                              "`galen submit -- train --stage finetune --params params.yaml`")
    if argv[0] == "submit":
        raise GalenInputError("`galen submit` cannot submit itself; give the command the job should run")
    try:
        parser.parse_args(argv)
    except SystemExit as e:  # argparse printed the usage error already
        raise GalenInputError(f"not a valid Galen command: galen {shlex.join(argv)}") from e
    return argv


def job_environment(env: Sequence[str] = ()) -> dict[str, str]:
    """Env vars for the job: FORWARDED_ENV from this shell when set, then each --env NAME (its
    value here) or NAME=VALUE."""
    out = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    for item in env:
        name, eq, value = item.partition("=")
        if not name or not name.replace("_", "a").isalnum():
            raise GalenInputError(f"--env {item!r}: use NAME or NAME=VALUE")
        if not eq:
            if name not in os.environ:
                raise GalenInputError(f"--env {name}: {name} is not set in this shell; use {name}=VALUE")
            value = os.environ[name]
        out[name] = value
    return out


def submit(argv: Sequence[str], parser: argparse.ArgumentParser, *, address: str | None = None, project: str | Path = ".",
           cluster_dir: str | None = None, excludes: Sequence[str] = (), env: Sequence[str] = (),
           job_id: str | None = None, wait: bool = True, poll_s: float = 1.0,
           out: TextIO | None = None) -> Submitted:
    """Submit `galen <argv>` to the Ray cluster at `address` (default: RAY_ADDRESS) and, with
    `wait`, stream its logs to `out` until it ends. Raises JobFailed when it did not succeed."""
    from ray.job_submission import JobSubmissionClient

    out = out or sys.stdout
    command = galen_command(argv, parser)
    runtime_env: dict = {"env_vars": job_environment(env)}
    if cluster_dir:
        entrypoint = f"{_cd(cluster_dir)} && python -m galen.flows.cli {shlex.join(command)}"
    else:
        root = Path(project).resolve()
        if not (root / "flows" / "cli.py").is_file():
            raise GalenInputError(f"{root} is not the Galen project folder (no flows/cli.py); run from it, pass "
                                  "--project, or use --cluster-dir for a copy already on the nodes")
        runtime_env |= {"working_dir": str(root), "excludes": [*DEFAULT_EXCLUDES, *excludes]}
        env_vars = runtime_env["env_vars"]  # a PYTHONPATH given with --env stays, after the upload's galen
        env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (JOB_IMPORT_DIR, env_vars.get("PYTHONPATH")) if p)
        entrypoint = f"PYTHONPATH={shlex.quote(env_vars['PYTHONPATH'])} python -m galen.flows.cli {shlex.join(command)}"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        raise GalenInputError("no Ray cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise GalenInputError(f"cannot reach the Ray Jobs API at {address}: {e}") from e
    try:
        job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id,
                                metadata={"galen.command": shlex.join(command)[:1000]})
    except RuntimeError as e:  # e.g. the submission id exists already, the upload failed
        raise GalenError(f"the Ray Jobs API at {address} refused the job: {e}") from e
    print(f"submitted job {job} to {address}: {entrypoint}", file=out, flush=True)
    if not wait:
        return Submitted(job, str(client.get_job_status(job)))
    try:
        _stream_logs(client, job, out, poll_s)
    except KeyboardInterrupt:
        print(f"\nstopped following job {job}; it keeps running (stop it with `ray job stop {job}`)", file=out)
        raise
    info = client.get_job_info(job)
    status = str(info.status)
    result = Submitted(job, status, info.message or "", info.driver_exit_code)
    if status != "SUCCEEDED":
        raise JobFailed(f"job {job} {status}" + (f" (driver exit code {info.driver_exit_code})"
                                                  if info.driver_exit_code is not None else "")
                        + (f": {info.message.strip().splitlines()[0][:500]}" if info.message else "")
                        + " (its log is above)")
    print(f"job {job} SUCCEEDED", file=out, flush=True)
    return result


def _cd(folder: str) -> str:
    """`cd` into a folder of the head node; a plain `~/...` is left for that node's shell to expand."""
    if re.fullmatch(r"~(/[\w.\-/]*)?", folder):
        return f"cd {folder}"
    return f"cd {shlex.quote(folder)}"


def _stream_logs(client, job: str, out: TextIO, poll_s: float) -> None:
    """Print the job's log as it grows until the job ends (polling: works through any proxy or
    port-forward that passes plain HTTP)."""
    shown = 0
    while True:
        status = str(client.get_job_status(job))
        logs = client.get_job_logs(job)
        if len(logs) > shown:
            out.write(logs[shown:])
            out.flush()
            shown = len(logs)
        if status in TERMINAL:
            return
        time.sleep(poll_s)
