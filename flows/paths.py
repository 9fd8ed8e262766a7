"""Where a Galen project's runtime state lives: the project folder and its MLflow store.

A small shared module: the pipeline and the serving side both find the project and the tracking
store through it (the serving side imports nothing else of the pipeline's)."""

from __future__ import annotations

import os
from pathlib import Path

from galen.model.errors import GalenInputError

PROJECT_MARKERS = ("params.yaml", "dvc.yaml")


def project_root(start: str | Path | None = None) -> Path:
    """The folder holding params.yaml / dvc.yaml, walking up from `start` (default: cwd), so runs
    land in the same store whichever subfolder a job was launched from."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if any((folder / m).is_file() for m in PROJECT_MARKERS):
            return folder
    raise GalenInputError(f"no {' or '.join(PROJECT_MARKERS)} in {here} or any parent; run from the Galen "
                          "project or set MLFLOW_TRACKING_URI")


def tracking_uri(project: str | Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else `sqlite:///<project>/mlflow.db` (MLflow 3's model
    registry needs a database store; sqlite needs no server)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    root = Path(project).resolve() if project is not None else project_root()
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Where new experiments keep artifacts: `mlartifacts/` next to a sqlite database (MLflow
    would otherwise use ./mlruns of whatever the cwd is); None for servers and other databases,
    which decide themselves (a server with --artifacts-destination proxies them)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):]
    if not db or db == ":memory:":
        return None
    return (Path(db).resolve().parent / "mlartifacts").as_uri()
