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

from galen.flows.paths import artifact_location, project_root, tracking_uri
from galen.model.errors import GalenInputError

log = logging.getLogger(__name__)

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
# Job storage (a local folder or s3://bucket/prefix) and the run id stored next to checkpoints
# --------------------------------------------------------------------------------------------------

def s3_endpoint() -> str | None:
    """The S3-compatible endpoint (MinIO, Ceph, moto) from the environment, as boto3 and pyarrow
    name it: `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`; None means AWS S3 itself."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


class StorageFolder:
    """A folder of training storage: a local path or `s3://bucket/prefix` (boto3, endpoint from
    `s3_endpoint()`). Holds the small files Galen keeps beside Ray Train's checkpoints (the MLflow
    run id, the finished marker), and says how Ray Train should open the same place."""

    def __init__(self, location: str | Path) -> None:
        loc = str(location)
        self.is_s3 = loc.startswith("s3://")
        if "://" in loc and not self.is_s3:
            raise GalenInputError(f"storage {loc!r}: use a local folder or s3://bucket/prefix "
                                  f"(other filesystems are not supported)")
        if self.is_s3:
            bucket, _, prefix = loc[len("s3://"):].partition("/")
            if not bucket:
                raise GalenInputError(f"storage {loc!r} names no bucket; use s3://bucket/prefix")
            self.bucket, self.prefix, self.path = bucket, prefix.strip("/"), None
        else:
            self.bucket, self.prefix, self.path = None, "", Path(loc)
        self._s3 = None

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/") if self.is_s3 else str(self.path)

    def __repr__(self) -> str:
        return f"StorageFolder({str(self)!r})"

    def child(self, name: str) -> StorageFolder:
        return StorageFolder(f"{self}/{name}" if self.is_s3 else self.path / name)  # type: ignore[operator]

    def uri(self, name: str) -> str:
        return f"{self}/{name}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def s3(self):
        if self._s3 is None:
            import boto3

            self._s3 = boto3.client("s3", endpoint_url=s3_endpoint())
        return self._s3

    def _s3_call(self, what: str, fn, *args, **kwargs):
        """One S3 request; a missing bucket or bad credentials become one clear error."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(what) from e
            where = f" at {s3_endpoint()}" if s3_endpoint() else ""
            if code == "NoSuchBucket":
                raise GalenInputError(f"S3 bucket {self.bucket!r}{where} does not exist; create it or fix "
                                      "train.storage_path") from e
            raise GalenInputError(f"cannot {what}{where}: {code or e}; check the AWS credentials and "
                                  "AWS_ENDPOINT_URL") from e
        except BotoCoreError as e:
            raise GalenInputError(f"cannot {what}: {e}; check the AWS credentials and AWS_ENDPOINT_URL") from e

    def read_text(self, name: str) -> str | None:
        """The file's text, or None when it does not exist."""
        if not self.is_s3:
            file = self.path / name  # type: ignore[operator]
            return file.read_text() if file.is_file() else None
        try:
            obj = self._s3_call(f"read {self.uri(name)}", self.s3.get_object, Bucket=self.bucket, Key=self._key(name))
        except FileNotFoundError:
            return None
        return obj["Body"].read().decode()

    def exists(self, name: str) -> bool:
        return self.read_text(name) is not None

    def write_text(self, name: str, text: str) -> None:
        """Write a whole file at once: a local temp file + rename, or one S3 PUT (atomic by
        itself), so a job killed mid-write never leaves half a file."""
        if self.is_s3:
            self._s3_call(f"write {self.uri(name)}", self.s3.put_object, Bucket=self.bucket, Key=self._key(name),
                          Body=text.encode())
            return
        file = self.path / name  # type: ignore[operator]
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, name: str) -> None:
        if self.is_s3:
            self._s3_call(f"delete {self.uri(name)}", self.s3.delete_object, Bucket=self.bucket, Key=self._key(name))
        else:
            (self.path / name).unlink(missing_ok=True)  # type: ignore[operator]

    def ray_storage(self):
        """(storage_path, storage_filesystem) for Ray Train's RunConfig: a local path, or with an
        S3-compatible endpoint a pyarrow S3FileSystem pointed at it (and the path without
        `s3://`, as Ray expects with a custom filesystem); None lets pyarrow resolve AWS S3."""
        if not self.is_s3:
            return str(self.path), None
        endpoint = s3_endpoint()
        if not endpoint:
            return str(self), None
        import pyarrow.fs

        return f"{self.bucket}/{self.prefix}".rstrip("/"), pyarrow.fs.S3FileSystem(endpoint_override=endpoint)


class RunIdFile:
    """`<storage_dir>/mlflow_run_id` (a local folder or s3://...): lets a resumed job find the run
    it belongs to. Written whole (temp file + rename, or one S3 PUT) so a job killed mid-write
    never leaves half an id."""

    def __init__(self, storage_dir: str | Path | StorageFolder) -> None:
        self.folder = storage_dir if isinstance(storage_dir, StorageFolder) else StorageFolder(storage_dir)
        self.uri = self.folder.uri(RUN_ID_FILENAME)
        self.path = None if self.folder.is_s3 else self.folder.path / RUN_ID_FILENAME  # type: ignore[operator]

    def read(self) -> str | None:
        text = self.folder.read_text(RUN_ID_FILENAME)
        if text is None:
            return None
        run_id = text.strip()
        if not re.fullmatch(r"[A-Za-z0-9][\w\-]{0,255}", run_id):
            raise GalenInputError(f"{self.uri} does not hold an MLflow run id ({run_id[:80]!r}); delete it to "
                                  "start a fresh run")
        return run_id

    def write(self, run_id: str) -> None:
        self.folder.write_text(RUN_ID_FILENAME, run_id + "\n")

    def clear(self) -> None:
        self.folder.delete(RUN_ID_FILENAME)


def run_id_file(storage_dir: str | Path | StorageFolder) -> RunIdFile:
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

    def increment_tag(self, key: str) -> int:
        """Add one to a counter tag (e.g. how many times the job restarted from a checkpoint) and
        return the new count (0 on ranks that do not log)."""
        if not self.active:
            return 0
        current = self.client.get_run(self.run_id).data.tags.get(sanitize_key(key), "0")
        count = int(current) + 1 if current.isdigit() else 1
        self.set_tags({key: str(count)})
        return count

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
