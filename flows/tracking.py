"""MLflow tracking for training runs: the one place Galen talks to MLflow.

One MLflow run per training job. The driver (or Ray Train's rank 0) starts it with
`TrainingRun.start_or_resume`, persists the run id next to its checkpoints (`run_id_file`), and
hands the run id (a string, never a client object) to the workers; they `TrainingRun.attach` and
only rank 0 actually talks to MLflow. A job resumed from a checkpoint continues the same run.

Where runs go (`tracking_uri`): `MLFLOW_TRACKING_URI` if set (e.g. an `mlflow server` proxying
artifacts to S3), else a local sqlite store in the project with artifacts beside it, so the model
registry works without any server.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from model.errors import GalenInputError

log = logging.getLogger(__name__)

PROJECT_MARKERS = ("params.yaml", "dvc.yaml")
RUN_ID_FILENAME = "mlflow_run_id"
END_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's limits (mlflow.utils.validation); kept here so a bad value fails in our code, clearly.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


# --------------------------------------------------------------------------------------------------
# Where: project root and tracking store
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# What: code and data lineage
# --------------------------------------------------------------------------------------------------

def _git(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or f"git {' '.join(args)} failed")
    return proc.stdout.strip()


def lineage(project: str | Path | None = None) -> dict[str, str]:
    """Tags tying a run to its code (git commit, dirty tree) and data (md5 of each dvc.lock output),
    so a model can be traced back to exactly what produced it. Never raises: a missing piece
    becomes a tag saying why it is missing."""
    try:
        root = Path(project).resolve() if project is not None else project_root()
    except GalenInputError:
        root = Path.cwd().resolve()
    tags: dict[str, str] = {}

    try:
        commit = _git(["rev-parse", "HEAD"], root)
        # Untracked files are left out: outputs (mlflow.db, checkpoints) would make every tree dirty.
        dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], root))
        tags.update({"git.commit": commit, "git.dirty": str(dirty).lower(),
                     "mlflow.source.git.commit": commit})
    except FileNotFoundError:
        tags.update({"git.commit": "unavailable (git is not installed)", "git.dirty": "unknown"})
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        reason = "not a git repository" if "not a git repository" in str(e).lower() else str(e)[:200]
        tags.update({"git.commit": f"unavailable ({reason})", "git.dirty": "unknown"})

    lock = root / "dvc.lock"
    if not lock.is_file():
        tags["dvc.lock"] = f"missing (no dvc.lock in {root}; run `dvc repro`)"
        return tags
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
        if not isinstance(stages, dict):
            raise ValueError("`stages` is not a mapping")
    except (yaml.YAMLError, ValueError, AttributeError, OSError) as e:
        tags["dvc.lock"] = f"unreadable ({str(e)[:200]})"
        return tags
    tags["dvc.lock"] = "present"
    for stage, body in stages.items():
        outs = body.get("outs") if isinstance(body, dict) else None
        for out in outs or []:
            if not isinstance(out, dict) or "path" not in out:
                continue
            version = out.get("md5") or out.get("etag") or out.get("checksum") or "unknown"
            tags[sanitize_key(f"dvc.{stage}.{out['path']}")] = str(version)
    return tags


# --------------------------------------------------------------------------------------------------
# Keys and values MLflow accepts
# --------------------------------------------------------------------------------------------------

def sanitize_key(key: str) -> str:
    """A key MLflow accepts: allowed characters only, no empty/./.. path segments (MLflow treats
    keys as paths), at most 250 characters (long keys keep a hash so they stay distinct)."""
    key = _BAD_KEY_CHARS.sub("_", str(key))
    parts = ["_" if p in (".", "..") else p for p in key.split("/") if p]
    key = "/".join(parts) or "_"
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        key = f"{key[:MAX_KEY_LENGTH - 9]}~{digest}"
    assert posixpath.normpath(key) == key, key
    return key


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys ({"optim": {"lr": 1e-4}} -> {"optim.lr": 1e-4}), as MLflow
    params are flat."""
    flat: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            flat.update(flatten(v, key))
        else:
            flat[key] = v
    return flat


def _clip(value: Any, limit: int) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


# --------------------------------------------------------------------------------------------------
# The run id stored next to checkpoints
# --------------------------------------------------------------------------------------------------

class RunIdFile:
    """`<storage_dir>/mlflow_run_id`: lets a resumed job find the run it belongs to. Written
    atomically (temp file + rename) so a job killed mid-write never leaves half an id."""

    def __init__(self, storage_dir: str | Path) -> None:
        self.path = Path(storage_dir) / RUN_ID_FILENAME

    def read(self) -> str | None:
        if not self.path.is_file():
            return None
        run_id = self.path.read_text().strip()
        if not re.fullmatch(r"[A-Za-z0-9][\w\-]{0,255}", run_id):
            raise GalenInputError(f"{self.path} does not hold an MLflow run id ({run_id[:80]!r}); delete it to "
                                  "start a fresh run")
        return run_id

    def write(self, run_id: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{RUN_ID_FILENAME}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(run_id + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def run_id_file(storage_dir: str | Path) -> RunIdFile:
    """The run-id file of a training job's checkpoint folder."""
    return RunIdFile(storage_dir)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def _not_found(e: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(e, MlflowException) and e.error_code == "RESOURCE_DOES_NOT_EXIST"


class TrainingRun:
    """One MLflow run of one training job, addressed by its run id only (so it pickles into Ray
    workers as plain strings). On a rank other than 0 every method does nothing: only one process
    per job logs."""

    def __init__(self, run_id: str | None, uri: str, rank: int = 0) -> None:
        self.run_id = run_id
        self.tracking_uri = uri
        self.rank = rank
        self.resumed = False
        self._client = None
        self._monitor = None

    # -- creation ----------------------------------------------------------------------------------

    @classmethod
    def start_or_resume(cls, experiment: str, run_name: str, resume_run_id: str | None = None,
                        params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None, *,
                        uri: str | None = None, project: str | Path | None = None,
                        system_metrics: bool = True, system_metrics_interval: float = 10.0,
                        with_lineage: bool = True) -> TrainingRun:
        """Start a new run in `experiment`, or continue `resume_run_id` (a job restarted from its
        checkpoint keeps one run: metrics keep their steps, status goes back to RUNNING). Logs
        `params` (nested ok), `tags` and the lineage tags."""
        uri = uri or tracking_uri(project)
        run = cls(resume_run_id, uri)
        client = run.client
        all_tags = {**(lineage(project) if with_lineage else {}), **{str(k): v for k, v in (tags or {}).items()}}
        if resume_run_id:
            existing = run._get_run(resume_run_id, uri)
            exp = client.get_experiment(existing.info.experiment_id)
            if exp.name != experiment:
                raise GalenInputError(f"run {resume_run_id} belongs to experiment {exp.name!r}, not {experiment!r}; "
                                      "resume with the same experiment name or start a fresh run")
            run._check_params_unchanged(existing.data.params, params or {})
            client.update_run(resume_run_id, status="RUNNING")
            count = int(existing.data.tags.get("galen.resume_count", "0")) + 1
            all_tags["galen.resume_count"] = str(count)
            run.resumed = True
        else:
            exp_id = cls._experiment_id(client, experiment, uri)
            created = client.create_run(exp_id, run_name=run_name)
            run.run_id = created.info.run_id
        try:
            run.set_tags(all_tags)
            if params:
                run.log_params(params)
        except BaseException:
            client.set_terminated(run.run_id, status="FAILED")
            raise
        if system_metrics:
            run.start_system_metrics(system_metrics_interval)
        log.info("MLflow run %s (%s) at %s", run.run_id, "resumed" if run.resumed else "new", uri)
        return run

    @classmethod
    def attach(cls, run_id: str, uri: str | None = None, rank: int = 0, *, system_metrics: bool = False,
               system_metrics_interval: float = 10.0) -> TrainingRun:
        """Join an already started run from another process (a Ray Train worker). Rank 0 checks the
        run exists; other ranks get a run that logs nothing and never touches MLflow."""
        run = cls(run_id, uri or tracking_uri(), rank)
        if run.active:
            run._get_run(run_id, run.tracking_uri)
            if system_metrics:
                run.start_system_metrics(system_metrics_interval, resume=True)
        return run

    @staticmethod
    def _experiment_id(client, name: str, uri: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name, artifact_location=artifact_location(uri))
            except MlflowException as e:  # another job created it between our get and create
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = client.get_experiment_by_name(name)
        if exp.lifecycle_stage == "deleted":
            raise GalenInputError(f"experiment {name!r} is deleted in {uri}; restore it "
                                  f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or use "
                                  "another experiment name")
        return exp.experiment_id

    def _get_run(self, run_id: str, uri: str):
        try:
            found = self.client.get_run(run_id)
        except Exception as e:
            if _not_found(e) or "not found" in str(e).lower():
                raise GalenInputError(
                    f"MLflow run {run_id} does not exist in the tracking store {uri}; to start a fresh run, "
                    f"delete the `{RUN_ID_FILENAME}` file next to the checkpoints (or pass no resume run id), "
                    "or point MLFLOW_TRACKING_URI at the store that holds the run") from e
            raise
        if found.info.lifecycle_stage == "deleted":
            raise GalenInputError(f"MLflow run {run_id} is deleted in {uri}; restore it (`mlflow runs restore "
                                  f"--run-id {run_id}`) or delete the `{RUN_ID_FILENAME}` file to start a fresh run")
        return found

    def _check_params_unchanged(self, logged: Mapping[str, str], params: Mapping[str, Any]) -> None:
        """MLflow params are immutable; a resumed job with other settings is a different run."""
        new = {sanitize_key(k): _clip(v, MAX_PARAM_VALUE_LENGTH) for k, v in flatten(params).items()}
        changed = {k: (logged[k], v) for k, v in new.items() if k in logged and logged[k] != v}
        if changed:
            listing = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items())[:10])
            raise GalenInputError(f"cannot resume run {self.run_id}: params changed since it started ({listing}); "
                                  "resume with the original params or start a fresh run")

    # -- plumbing ----------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.rank == 0

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        # Clients and monitor threads stay in their process; a worker re-creates what it needs.
        return {**self.__dict__, "_client": None, "_monitor": None}

    def start_system_metrics(self, interval: float = 10.0, resume: bool | None = None) -> None:
        """CPU/GPU/memory/disk/network as `system/...` metrics from a background thread (psutil;
        pynvml for GPUs where installed). Failing to start it only warns: training goes on."""
        if not self.active or self._monitor is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval,
                                                 resume_logging=self.resumed if resume is None else resume,
                                                 tracking_uri=self.tracking_uri)
            self._monitor.start()
        except Exception as e:  # noqa: BLE001 - system metrics are nice to have
            log.warning("system metrics logging not started: %s", e)
            self._monitor = None

    # -- logging -----------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Log (possibly nested) params as flat, sanitized keys with values clipped to MLflow's
        6000 characters. Returns what was logged."""
        if not self.active:
            return {}
        from mlflow.entities import Param

        flat = {sanitize_key(k): _clip(v, MAX_PARAM_VALUE_LENGTH) for k, v in flatten(params).items()}
        for batch in _chunks([Param(k, v) for k, v in flat.items()], MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch)
        return flat

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active or not tags:
            return
        from mlflow.entities import RunTag

        items = [RunTag(sanitize_key(k), _clip(v, MAX_TAG_VALUE_LENGTH)) for k, v in tags.items()]
        for batch in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=batch)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log one step's metrics (per-task loss, lr, samples/s, tokens/s, ...) in one request.
        Non-numeric values are a caller bug and raise; NaN/inf are logged as is (a diverging loss
        should show up in the UI, not vanish)."""
        if not self.active or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            try:
                value = float(v.item() if hasattr(v, "item") else v)
            except (TypeError, ValueError) as e:
                raise GalenInputError(f"metric {k!r} must be a number, got {type(v).__name__}") from e
            items.append(Metric(sanitize_key(k), value, now, int(step)))
        for batch in _chunks(items, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch)

    def log_model_folder(self, path: str | Path, artifact_path: str = "model") -> str | None:
        """Upload a saved Galen model folder (config, weights, tokenizer) as run artifacts; returns
        the artifact URI (the registry registers from it)."""
        if not self.active:
            return None
        folder = Path(path)
        if not folder.is_dir() or not any(folder.iterdir()):
            raise GalenInputError(f"{folder} is not a saved model folder (missing or empty); save the model first")
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)
        return f"runs:/{self.run_id}/{artifact_path}"

    # -- ending ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop and flush system metrics without ending the run (a worker leaving a run the driver
        will end)."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    def end(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED (a later resume sets it RUNNING again)."""
        status = status.upper()
        if status not in END_STATUSES:
            raise GalenInputError(f"run status must be one of {', '.join(END_STATUSES)}, got {status!r}")
        self.close()
        if self.active:
            self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
