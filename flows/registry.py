"""Model registry: package a Galen model as an MLflow pyfunc, register it with its lineage, and move
the `champion` / `challenger` / `previous` aliases (MLflow 3: aliases, not stages).

* `register` checks the model folder loads, logs it as a pickle-free pyfunc ("models from code":
  `flows/pyfunc_model.py`, the model folder as artifact, the `model` package as code, a signature
  from its type hints and a VQA input example) into the evaluation run, and registers a version
  tagged with the git commit, the DVC data hashes of dvc.lock, params.yaml, the eval metrics and
  the model folder's sha256.
* `promote` compares a candidate with the current champion on the metrics params.yaml names
  (`registry.metrics`: each needs champion + min_improvement; with no champion, the floor). Better:
  candidate -> `champion`, old champion -> `previous`. Not better: candidate -> `challenger`, and the
  decision says which metric fell short and by how much.
* `rollback` swaps `champion` and `previous` (a second rollback undoes the first).

Numbers are hostile input: a gate metric (params.yaml `registry.metrics`) that is missing, NaN,
±inf (MLflow's sql stores store ±inf as ±1.8e308, read back as such) or no number at all fails
every gate with a message naming the metric and its value; `register` refuses such a value in a
metrics file or evaluation run, `promote` refuses a candidate whose run has one. A champion whose
own metric is not a finite number counts as failing on that metric: a candidate is then held to
that metric's floor only, so a broken champion never blocks a good candidate. A metrics file must
agree with the evaluation run it names: a number that differs from the run's is refused, never
silently replaced by the run's.

Nothing changes an alias before every check passed (model and alias exist, the run has the
metrics, the artifact downloads and matches the registered sha256). Alias changes happen under
`AliasLock`, a registry-wide mutex: creating a registered model is atomic in every MLflow store
(unique name), so `<name>.lock` exists exactly while one process holds it, on sqlite and behind a
server alike. The holder writes its planned alias changes on the lock before applying them, so
one that dies half-way is completed by whoever breaks its lock: two racing promotions end as if
they had run one after the other, never half-applied.

The lock records its holder: host name, pid, and where the OS tells them (Linux /proc) the boot
id, the pid namespace and the process start time. A waiting promote/rollback on the same machine
(same host name, boot id and pid namespace) checks that process: gone (or its pid reused by
another program, or a zombie) means the lock is broken at once, after completing the dead
holder's plan. A holder on another machine cannot be checked: after `lock_timeout_s` the command
is refused with a hint to pass `break_lock` (`--break-lock`), which breaks that one lock (plan
completed first) — but never a lock whose holder is verifiably running on this machine. Any lock
older than `lock_stale_s` is broken as before.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import math
import numbers
import os
import random
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galen.flows.paths import tracking_uri
from galen.flows.registry_lookup import error_code, get_alias, get_registered_model, get_version
from galen.flows.tracking import MAX_TAG_VALUE_LENGTH, TrainingRun, flatten, lineage, sanitize_key
from galen.model.errors import GalenCheckpointError, GalenInputError

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
LOCK_SUFFIX = ".lock"
OWNER_TAG, INTENT_TAG, ABANDONED_TAG = "galen.lock.owner", "galen.lock.intent", "galen.lock.abandoned"
# who holds the lock: host name, pid, and (Linux) boot id, pid namespace, process start time (clock ticks after boot)
HOST_TAG, PID_TAG = "galen.lock.host", "galen.lock.pid"
BOOT_TAG, PID_NS_TAG, PID_START_TAG = "galen.lock.boot_id", "galen.lock.pid_ns", "galen.lock.pid_start"
SHA_TAG = "galen.model_sha256"
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_PACKAGE = Path(__file__).resolve().parent.parent / "model"  # bundled with the pyfunc as galen/model
ARTIFACT_KEY = "model"
MAX_VERSION_TAG_LENGTH = 5000  # MLflow's limit for model version tag values
# what the pyfunc needs at load time (pinned to the versions it was logged with)
PYFUNC_REQUIREMENTS = ("mlflow", "torch", "torchvision", "timm", "sentencepiece", "tokenizers", "safetensors",
                       "numpy", "pillow", "pydicom", "pydantic")


# --------------------------------------------------------------------------------------------------
# Settings (params.yaml `registry:`)
# --------------------------------------------------------------------------------------------------

@dataclass
class MetricRule:
    """A promotion criterion: higher is better; beat the champion by `min_improvement`, or with no
    champion reach `floor`."""

    name: str
    min_improvement: float = 0.0
    floor: float = 0.0


@dataclass
class RegistryConfig:
    model_name: str = field(default="galen-generalist", metadata={"help": "registered model name"})
    experiment: str = "galen-evaluate"
    metrics: list[MetricRule] = field(default_factory=list)
    lock_timeout_s: float = 120.0      # how long a promotion waits for another one to finish
    lock_stale_s: float = 900.0        # a lock older than this belongs to a dead process: completed and broken

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RegistryConfig:
        section = params.get("registry")
        if not isinstance(section, Mapping):
            raise GalenInputError("params.yaml has no `registry:` section; add model_name and the metrics to "
                                  "compare (see the project's params.yaml)")
        known = {"model_name", "experiment", "metrics", "lock_timeout_s", "lock_stale_s"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise GalenInputError(f"unknown registry params {unknown}; known: {sorted(known)}")
        metrics = section.get("metrics")
        if not isinstance(metrics, Mapping) or not metrics:
            raise GalenInputError("registry.metrics must map metric names (e.g. vqa.accuracy) to "
                                  "{min_improvement, floor}")
        rules = []
        for name, rule in metrics.items():
            rule = rule or {}
            if not isinstance(rule, Mapping) or set(rule) - {"min_improvement", "floor"}:
                raise GalenInputError(f"registry.metrics.{name} must be a mapping with min_improvement and/or floor, "
                                      f"got {rule!r}")
            values = {k: rule.get(k, 0.0) for k in ("min_improvement", "floor")}
            for k, v in values.items():
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise GalenInputError(f"registry.metrics.{name}.{k} must be a number, got {v!r}")
                if not math.isfinite(v):  # NaN would pass every comparison, inf would block every model
                    raise GalenInputError(f"registry.metrics.{name}.{k} is {v!r}; it must be a finite number")
            if values["min_improvement"] < 0:
                raise GalenInputError(f"registry.metrics.{name}.min_improvement is {values['min_improvement']}; it "
                                      "must be >= 0 (a worse model is never promoted)")
            rules.append(MetricRule(str(name), float(values["min_improvement"]), float(values["floor"])))
        cfg = cls(metrics=rules, **{k: section[k] for k in ("model_name", "experiment", "lock_timeout_s",
                                                             "lock_stale_s") if k in section})
        if not isinstance(cfg.model_name, str) or not cfg.model_name.strip() or cfg.model_name.endswith(LOCK_SUFFIX):
            raise GalenInputError(f"registry.model_name must be a non-empty name not ending in {LOCK_SUFFIX!r}")
        return cfg


# --------------------------------------------------------------------------------------------------
# Numbers: a gate metric must be a finite number
# --------------------------------------------------------------------------------------------------

MISSING = object()                  # `metrics.get(name, MISSING)`: no such metric at all
STORED_INF = sys.float_info.max     # MLflow's sql stores keep +inf / -inf as +/- this (the largest float)


def metric_problem(value: Any = MISSING) -> str | None:
    """Why `value` cannot be a gate metric, in words (None: it is a finite number). NaN, ±inf (also as
    MLflow's sql stores return them, ±1.8e308), a missing value, null, strings and booleans all fail."""
    if value is MISSING:
        return "missing"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"{value!r}, not a number" if value is not None else "null, not a number"
    v = float(value)
    if math.isnan(v):
        return "NaN, not a number"
    if math.isinf(v):
        return f"{v!r}, not a finite number"
    if abs(v) >= STORED_INF:
        return f"{v!r} (MLflow's store for {'-' if v < 0 else ''}inf), not a finite number"
    return None


def gate_values(rules: Sequence[MetricRule], metrics: Mapping[str, Any]) -> dict[str, str]:
    """metric -> what is wrong with its value, for every gate metric that is not a finite number."""
    return {r.name: problem for r in rules if (problem := metric_problem(metrics.get(r.name, MISSING)))}


def _same_number(a: float, b: float) -> bool:
    """Equal as stored: exactly (up to float noise of a server round trip), NaN equal to NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# --------------------------------------------------------------------------------------------------
# MLflow plumbing
# --------------------------------------------------------------------------------------------------

def _client(uri: str | None):
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


@contextlib.contextmanager
def _mlflow_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (log_model, start_run, register_model) at `uri` for a block, then put
    back exactly what was there: `set_tracking_uri` also exports MLFLOW_TRACKING_URI, which would
    otherwise redirect every later default-store lookup of this process."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    before = (tracking_state._tracking_uri, registry_state._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_metrics(client, run_id: str | None, what: str) -> dict[str, float]:
    if not run_id:
        raise GalenInputError(f"{what} has no source run, so no eval metrics; register it with `galen register`")
    try:
        run = client.get_run(run_id)
    except Exception as e:
        if error_code(e) == "RESOURCE_DOES_NOT_EXIST":
            raise GalenInputError(f"the run {run_id} of {what} does not exist (deleted?); its metrics are gone") from e
        raise
    if not run.data.metrics:
        raise GalenInputError(f"run {run_id} of {what} has no metrics; evaluate the model (`galen evaluate`) into "
                              "that run first")
    return dict(run.data.metrics)


# --------------------------------------------------------------------------------------------------
# Register
# --------------------------------------------------------------------------------------------------

@dataclass
class Registered:
    name: str
    version: str
    run_id: str
    model_uri: str
    sha256: str


def requirements(names: tuple[str, ...] = PYFUNC_REQUIREMENTS) -> list[str]:
    """Pinned pip requirements of the pyfunc (explicit: MLflow's inference would import and run it)."""
    out = []
    for name in names:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def input_example() -> list[dict[str, Any]]:
    """A VQA request (base64 PNG + question + yes/no candidates), stored with the model as its example."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (64, 64), 96).save(buf, format="PNG")
    return [{"task": "vqa", "image": base64.b64encode(buf.getvalue()).decode("ascii"),
             "question": "is there an abnormality in the image?", "candidates": ["yes", "no"]}]


def _read_metrics_file(path: str | Path, rules: Sequence[MetricRule] = ()) -> tuple[str | None, dict[str, float]]:
    """(the run id it names, its finite metrics: what `galen evaluate` logged into that run). A gate
    metric (`rules`) that is there but not a finite number (NaN, Infinity, a string, null) is refused;
    one that is missing is left to `promote` (which refuses to promote it)."""
    from galen.flows.evaluate import flat_metrics
    from galen.model.errors import read_json

    p = Path(path)
    if not p.is_file():
        raise GalenInputError(f"metrics file {p} not found; run `galen evaluate --out {p}` first")
    data = read_json(p, dict, "it should be the JSON written by `galen evaluate`")
    run_id = data.pop("run_id", None)
    raw = flatten(data)
    bad = {name: problem for name, problem in gate_values(rules, raw).items() if name in raw}
    if bad:
        raise GalenInputError(f"metrics file {p}: " + "; ".join(f"{k} is {v}" for k, v in bad.items())
                              + ". registry.metrics gates promotion on these, so each must be a finite number; "
                              "evaluate the model again")
    return (str(run_id) if run_id else None), flat_metrics(data)


def _check_against_run(file: str | Path, file_metrics: Mapping[str, float], run_id: str,
                       run_metrics_: Mapping[str, float]) -> None:
    """Every number of the metrics file must be the one its evaluation run holds (the run is the
    record promotion reads; a file edited or left over from another evaluation is refused)."""
    wrong = []
    for name, value in file_metrics.items():
        key = sanitize_key(name)
        if key not in run_metrics_:
            wrong.append(f"{name} is {value!r} in the file, absent from the run")
        elif not _same_number(float(value), float(run_metrics_[key])):
            wrong.append(f"{name} is {value!r} in the file, {run_metrics_[key]!r} in the run")
    if wrong:
        shown = "; ".join(wrong[:8]) + (f"; and {len(wrong) - 8} more" if len(wrong) > 8 else "")
        raise GalenInputError(f"metrics file {file} disagrees with its evaluation run {run_id}: {shown}. Register "
                              "with the file `galen evaluate` wrote for that run (or evaluate again)")


def _version_tags(params: Mapping[str, Any], metrics: Mapping[str, float], sha: str, run_id: str,
                  project: str | Path | None) -> dict[str, str]:
    limit = min(MAX_TAG_VALUE_LENGTH, MAX_VERSION_TAG_LENGTH)
    tags = {**lineage(project), SHA_TAG: sha, "galen.run_id": run_id}
    tags.update({f"params.{k}": json.dumps(v) if not isinstance(v, str) else v for k, v in flatten(params).items()})
    tags.update({f"metric.{k}": repr(float(v)) for k, v in metrics.items()})
    return {sanitize_key(k): (str(v) if len(str(v)) <= limit else str(v)[:limit - 3] + "...") for k, v in tags.items()}


@dataclass
class ModelKind:
    """What `register` needs to know about one kind of model folder: how to load it (a broken file
    fails before MLflow), its pyfunc file (models from code), an input example, the model_config
    stored with it (from the evaluation run's tags `galen.predict_config` and `galen.labels`, if any)
    and the pip packages the pyfunc needs."""

    load: Callable[[Path], Any]
    pyfunc_file: Path
    input_example: Callable[[], list[dict[str, Any]]]
    model_config: Callable[[Mapping[str, str]], dict[str, Any]]
    requirements: tuple[str, ...] = PYFUNC_REQUIREMENTS


def _generalist_load(folder: Path) -> Any:
    from galen.model.predict import GalenPredictor

    return GalenPredictor.load(folder)


def _generalist_config(eval_tags: Mapping[str, str]) -> dict[str, Any]:
    """The decoding settings the version was evaluated with and the label sets it was evaluated on
    (serving's defaults for requests that name none)."""
    from galen.model.predict import PredictConfig

    predict_config = eval_tags.get("galen.predict_config")
    config: dict[str, Any] = {"predict": json.loads(predict_config) if predict_config else PredictConfig().to_dict()}
    PredictConfig.from_dict(config["predict"])  # the served settings must load
    labels = json.loads(eval_tags.get("galen.labels") or "{}")
    if labels:
        config["labels"] = labels
    return config


GENERALIST = ModelKind(_generalist_load, PYFUNC_FILE, input_example, _generalist_config)


def _clip_load(folder: Path) -> Any:
    from galen.model.clip import ClipModel

    return ClipModel.from_pretrained(folder)


def _clip_example() -> list[dict[str, Any]]:
    """A zero-shot request (base64 PNG + two labels), stored with the CLIP model as its example."""
    image = input_example()[0]["image"]
    return [{"task": "zero_shot", "image": image, "labels": ["normal", "abnormal"]}]


CLIP = ModelKind(_clip_load, PYFUNC_FILE.with_name("pyfunc_clip.py"), _clip_example,
                        lambda _: {}, PYFUNC_REQUIREMENTS + ("open_clip_torch", "transformers", "ftfy"))


def register(model_dir: str | Path, config: RegistryConfig, params: Mapping[str, Any], *,
             metrics_file: str | Path | None = None, run_id: str | None = None, uri: str | None = None,
             project: str | Path | None = None, kind: ModelKind = GENERALIST) -> Registered:
    """Log `model_dir` as a pyfunc into its evaluation run and register it as a new version of
    `config.model_name` (no alias changes: that is `promote`)."""
    import mlflow

    from galen.model.checkpoint import folder_digest

    folder = Path(model_dir)
    kind.load(folder)  # a missing or corrupt weights/config/tokenizer file fails here, before MLflow
    sha = folder_digest(folder)
    client, uri = _client(uri)

    file_run, file_metrics = _read_metrics_file(metrics_file, config.metrics) if metrics_file else (None, {})
    if run_id and file_run and str(run_id) != file_run:
        raise GalenInputError(f"metrics file {metrics_file} names run {file_run}, but run {run_id} was given; pass "
                              "the metrics file alone (its run is used) or the run alone")
    run_id = run_id or file_run
    if run_id:
        try:
            run = client.get_run(run_id)
        except Exception as e:
            if error_code(e) == "RESOURCE_DOES_NOT_EXIST":
                raise GalenInputError(f"run {run_id} does not exist in {uri}; pass the run id `galen evaluate` "
                                      "wrote into its metrics file") from e
            raise
        if run.info.lifecycle_stage == "deleted":
            raise GalenInputError(f"run {run_id} is deleted in {uri}; restore it or evaluate again")
        evaluated = run.data.tags.get(SHA_TAG)
        if evaluated and evaluated != sha:
            raise GalenInputError(f"{folder} is not the model run {run_id} evaluated (sha256 {sha[:12]} vs "
                                  f"{evaluated[:12]}); evaluate this folder, or register the evaluated one")
        metrics = dict(run.data.metrics)
        if not metrics and not file_metrics:
            raise GalenInputError(f"run {run_id} has no metrics; evaluate the model into it first (`galen evaluate "
                                  f"--run-id {run_id}`)")
        eval_tags = dict(run.data.tags)
        if not metrics:
            TrainingRun.attach(run_id, uri).log_metrics(file_metrics, step=0)
            metrics = file_metrics
        elif file_metrics:
            _check_against_run(metrics_file, file_metrics, run_id, metrics)
        bad = {name: problem for name, problem in gate_values(config.metrics, metrics).items() if name in metrics}
        if bad:
            raise GalenInputError(f"run {run_id}: " + "; ".join(f"{k} is {v}" for k, v in bad.items())
                                  + ". registry.metrics gates promotion on these, so each must be a finite number; "
                                  f"evaluate the model again (`galen evaluate --run-id {run_id}`)")
    else:
        if not file_metrics:
            raise GalenInputError("register needs eval metrics: pass --metrics (the JSON `galen evaluate` wrote) or "
                                  "--run-id of a run holding them")
        new = TrainingRun.start_or_resume(config.experiment, "register", None, {"model": str(folder)},
                                          {"galen.stage": "register", SHA_TAG: sha}, uri=uri, project=project,
                                          system_metrics=False)
        new.log_metrics(file_metrics, step=0)
        new.end()
        run_id, metrics, eval_tags = new.run_id, file_metrics, {}

    model_config = kind.model_config(eval_tags)
    with _mlflow_uri(uri), mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as code:
        info = mlflow.pyfunc.log_model(name="model", python_model=str(kind.pyfunc_file),
                                       artifacts={ARTIFACT_KEY: str(folder.resolve())},
                                       code_paths=[str(bundled_model_package(Path(code)))],
                                       input_example=kind.input_example(),
                                       pip_requirements=requirements(kind.requirements), model_config=model_config)
    tags = _version_tags(params, metrics, sha, run_id, project)
    with _mlflow_uri(uri):
        mv = mlflow.register_model(info.model_uri, config.model_name, tags=tags)
    if mv.status != "READY":
        raise GalenCheckpointError(f"version {mv.version} of {config.model_name!r} did not become ready "
                                   f"(status {mv.status}: {mv.status_message})")
    return Registered(config.model_name, str(mv.version), run_id, info.model_uri, sha)


def bundled_model_package(into: Path) -> Path:
    """`galen/` holding a copy of the model library as `galen.model`: the pyfunc's bundled code, so a
    registered version loads with `import galen.model...` where Galen itself is not installed."""
    package = into / "galen"
    shutil.copytree(MODEL_PACKAGE, package / "model", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (package / "__init__.py").write_text('"""Galen\'s model library, bundled with a registered MLflow model."""\n')
    return package


# --------------------------------------------------------------------------------------------------
# Artifact check
# --------------------------------------------------------------------------------------------------

def verify_artifact(client, mv, uri: str) -> None:
    """Download a version's pyfunc and check its Galen model folder has the registered sha256, so a
    missing or corrupted artifact stops a promotion before any alias moves."""
    import mlflow
    from mlflow.models import Model

    from galen.model.checkpoint import folder_digest

    what = f"version {mv.version} of {mv.name!r}"
    expected = (mv.tags or {}).get(SHA_TAG)
    if not expected:
        raise GalenCheckpointError(f"{what} has no {SHA_TAG} tag; it was not registered by `galen register`, so "
                                   "its artifact cannot be checked")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            source = client.get_model_version_download_uri(mv.name, mv.version)
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri))
            flavor = Model.load(str(local)).flavors.get("python_function", {})
            folder = local / flavor["artifacts"][ARTIFACT_KEY]["path"]
            got = folder_digest(folder)
        except (OSError, KeyError, TypeError, GalenCheckpointError) as e:
            raise GalenCheckpointError(f"the artifact of {what} is missing or unreadable ({type(e).__name__}: "
                                       f"{str(e)[:300]}); register the model again") from e
        except Exception as e:
            if error_code(e) is None:
                raise
            raise GalenCheckpointError(f"the artifact of {what} cannot be downloaded ({str(e)[:300]}); register "
                                       "the model again") from e
    if got != expected:
        raise GalenCheckpointError(f"the artifact of {what} is corrupted: its model folder has sha256 {got[:12]}, "
                                   f"registered {expected[:12]}; register the model again")


# --------------------------------------------------------------------------------------------------
# The alias lock
# --------------------------------------------------------------------------------------------------

def apply_aliases(client, name: str, changes: Mapping[str, str | None]) -> None:
    """Set (version) or remove (None) aliases; idempotent, so a dead holder's plan can be replayed."""
    for alias, version in changes.items():
        if version is None:
            client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, str(version))


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int | str) -> tuple[str, str] | None:
    """(state, start time in clock ticks after boot) of a process, from Linux /proc; None where unknown."""
    text = _read_text(f"/proc/{pid}/stat")
    fields = text.rsplit(")", 1)[1].split() if ")" in text else []   # after "pid (comm)": state is field 3
    return (fields[0], fields[19]) if len(fields) > 19 else None       # starttime is field 22


def this_process() -> dict[str, str]:
    """The lock tags naming this process: host, pid and, where the OS tells, boot id, pid namespace and
    start time (so a reused pid, a rebooted host or another container is not taken for the holder)."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    stat = _proc_stat(os.getpid())
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            BOOT_TAG: _read_text("/proc/sys/kernel/random/boot_id"), PID_NS_TAG: pid_ns,
            PID_START_TAG: stat[1] if stat else ""}
    return {k: v for k, v in tags.items() if v}


@dataclass
class LockHolder:
    """Who holds a lock, from its tags (a lock written by an older Galen has only the owner tag
    `host:pid:token`: host and pid are read from it)."""

    owner: str
    host: str | None = None
    pid: int | None = None
    boot_id: str = ""
    pid_ns: str = ""
    pid_start: str = ""

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> LockHolder:
        owner = tags.get(OWNER_TAG, "?")
        host, pid = tags.get(HOST_TAG), tags.get(PID_TAG)
        if host is None and pid is None and owner.count(":") >= 2:
            host, pid, _ = owner.rsplit(":", 2)
        try:
            number = int(pid) if pid is not None else None
        except ValueError:
            number = None
        return cls(owner, host, number if number is not None and number > 0 else None, tags.get(BOOT_TAG, ""),
                   tags.get(PID_NS_TAG, ""), tags.get(PID_START_TAG, ""))

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}" if self.host and self.pid else f"owner {self.owner}"

    def on_this_machine(self) -> bool:
        """Whether its pid can be checked here: same host name, and the same boot id and pid namespace
        where both sides know them. Unknown (no pid, not POSIX): False, as for another host."""
        if os.name != "posix" or not self.host or self.pid is None:
            return False
        me = this_process()
        if self.host != me[HOST_TAG]:
            return False
        return all(not theirs or not me.get(tag) or theirs == me[tag]
                   for tag, theirs in ((BOOT_TAG, self.boot_id), (PID_NS_TAG, self.pid_ns)))

    def running(self) -> bool:
        """Whether the holder process still runs (on this machine): its pid exists, is no zombie and,
        where its start time was recorded, started then (not a reused pid)."""
        assert self.pid is not None and self.pid > 0
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass                               # it exists, as another user's process
        stat = _proc_stat(self.pid)
        if stat is not None:
            if stat[0] in ("Z", "X"):          # killed, not yet reaped by its parent
                return False
            if self.pid_start and stat[1] != self.pid_start:
                return False                   # the pid now belongs to another process
        return True


class AliasLock:
    """Mutex over a registered model's aliases, held by creating the registered model `<name>.lock`
    tagged with its holder (`this_process`). A waiting process breaks the lock, completing the plan
    written on it first, when its holder failed half-way, when it is older than `stale_s`, when its
    holder is on this machine and gone, or (`break_lock`, at most once) when its holder is on another
    machine, which cannot be checked from here."""

    def __init__(self, client, name: str, timeout_s: float = 120.0, stale_s: float = 900.0, *,
                 break_lock: bool = False):
        self.client, self.name = client, name
        self.lock_name = f"{name}{LOCK_SUFFIX}"
        self.timeout_s, self.stale_s = timeout_s, stale_s
        self.break_lock = break_lock
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held = self.pending = False

    def __enter__(self) -> AliasLock:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self.client.create_registered_model(
                    self.lock_name, tags={OWNER_TAG: self.owner, **this_process()},
                    description=f"lock of {self.name}'s aliases, held by a running `galen promote`/`rollback`")
                self.held = True
                return self
            except Exception as e:
                if error_code(e) != "RESOURCE_ALREADY_EXISTS" and "database is locked" not in str(e):
                    raise
            holder = self._holder()
            reason = self._why_break(holder) if holder is not None else None
            if reason:
                self._break(holder, reason)
                continue
            if time.monotonic() > deadline:
                raise GalenInputError(self._busy(holder))
            time.sleep(random.uniform(0.05, 0.3))

    def _holder(self):
        try:
            return self.client.get_registered_model(self.lock_name)
        except Exception as e:
            if error_code(e) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _why_break(self, holder) -> str | None:
        """Why the lock `holder` may be broken now (None: wait for it)."""
        tags = holder.tags or {}
        if tags.get(ABANDONED_TAG) == "true":
            return "its holder failed half-way"
        age = time.time() - holder.creation_timestamp / 1000
        if age > self.stale_s:
            return f"it is {age:.0f}s old, more than lock_stale_s {self.stale_s:.0f}s"
        who = LockHolder.from_tags(tags)
        if who.on_this_machine():
            return None if who.running() else f"its holder, {who}, is gone"
        if self.break_lock:
            self.break_lock = False            # one lock: a later holder is a live process to wait for
            return f"break_lock was given (its holder, {who}, cannot be checked from this machine)"
        return None

    def _busy(self, holder) -> str:
        if holder is None:  # it went away while the store kept refusing the lock
            return f"could not take the lock {self.lock_name!r} of {self.name!r} in {self.timeout_s:.0f}s; try again"
        who = LockHolder.from_tags(holder.tags or {})
        text = f"another promotion or rollback of {self.name!r} holds the lock {self.lock_name!r} ({who})"
        if who.on_this_machine():
            return (text + f": that process runs on this machine; wait for it to finish (or stop pid {who.pid}), "
                    "then try again")
        return (text + ", which this machine cannot check. If that process is gone, pass --break-lock (its "
                f"planned alias changes are completed, then the lock is removed); otherwise try again later, or "
                f"wait {self.stale_s:.0f}s for the lock to go stale")

    def _break(self, holder, reason: str) -> None:
        """Finish the holder's planned alias changes, then remove its lock, if it still is that lock
        (another waiting process may have broken it and taken a new one meanwhile)."""
        now = self._holder()
        if now is None or ((now.tags or {}).get(OWNER_TAG), now.creation_timestamp) != \
                ((holder.tags or {}).get(OWNER_TAG), holder.creation_timestamp):
            return
        tags = now.tags or {}
        log.warning("breaking the lock %s of %s: %s", self.lock_name, tags.get(OWNER_TAG), reason)
        intent = tags.get(INTENT_TAG)
        if intent:
            try:
                plan = json.loads(intent)
                if not isinstance(plan, dict) or not all(isinstance(v, (str, type(None))) for v in plan.values()):
                    raise ValueError("not a mapping of alias to version")
            except ValueError as e:
                raise GalenInputError(f"the lock {self.lock_name!r} holds an unreadable plan {intent[:200]!r} "
                                      f"({e}); check the aliases of {self.name!r}, then delete the registered model "
                                      f"{self.lock_name!r}") from e
            apply_aliases(self.client, self.name, plan)
        with contextlib.suppress(Exception):
            self.client.delete_registered_model(self.lock_name)

    def apply(self, changes: Mapping[str, str | None]) -> None:
        """Record the plan on the lock, then carry it out."""
        if not self.held:
            raise RuntimeError("apply() outside the lock")
        self.client.set_registered_model_tag(self.lock_name, INTENT_TAG, json.dumps(dict(changes)))
        self.pending = True
        apply_aliases(self.client, self.name, changes)
        self.pending = False

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.held:
            return
        self.held = False
        if self.pending:  # failed half-way: keep the lock and its plan, so the next holder completes it
            with contextlib.suppress(Exception):
                self.client.set_registered_model_tag(self.lock_name, ABANDONED_TAG, "true")
            log.error("alias changes of %s failed half-way; the next promote/rollback completes them", self.name)
            return
        holder = self._holder()
        if holder is not None and (holder.tags or {}).get(OWNER_TAG) == self.owner:
            self.client.delete_registered_model(self.lock_name)


# --------------------------------------------------------------------------------------------------
# Promote and roll back
# --------------------------------------------------------------------------------------------------

@dataclass
class Shortfall:
    metric: str
    value: float
    required: float
    basis: str           # "champion v3 0.71 + 0.01" or "floor 0.5"
    problem: str = ""    # the value is no finite number: what it is instead ("NaN, not a number", "missing")

    @property
    def gap(self) -> float:
        return math.inf if self.problem else self.required - self.value

    def __str__(self) -> str:
        if self.problem:
            return f"{self.metric} is {self.problem}: it fails against the required {self.required:.4f} ({self.basis})"
        return (f"{self.metric} = {self.value:.4f} is {self.gap:.4f} short of the required {self.required:.4f} "
                f"({self.basis})")


@dataclass
class Decision:
    name: str
    version: str
    promoted: bool
    champion_before: str | None
    shortfalls: list[Shortfall] = field(default_factory=list)
    note: str = ""

    @property
    def message(self) -> str:
        if self.note:
            return self.note
        if self.promoted:
            before = f"; v{self.champion_before} is now `{PREVIOUS}`" if self.champion_before else \
                " (first champion: every metric reached its floor)"
            return f"{self.name} v{self.version} is the new `{CHAMPION}`{before}"
        against = f"champion v{self.champion_before}" if self.champion_before else "the floors"
        return (f"{self.name} v{self.version} is not better than {against}: it is now `{CHALLENGER}`. Short: "
                + "; ".join(str(s) for s in self.shortfalls))


def compare(rules: list[MetricRule], candidate: Mapping[str, Any], champion: Mapping[str, Any] | None,
            champion_version: str | None) -> list[Shortfall]:
    """The metrics on which the candidate falls short (empty: it is better). A candidate value that is
    no finite number (missing, NaN, ±inf, not a number) always falls short. A champion value that is no
    finite number counts as failing: the candidate is held to that metric's floor instead, so a
    broken champion cannot block every later candidate."""
    out = []
    for rule in rules:
        value = candidate.get(rule.name, MISSING)
        held = champion.get(rule.name, MISSING) if champion is not None else MISSING
        held_problem = metric_problem(held)
        if champion is not None and held_problem is None:
            required = float(held) + rule.min_improvement
            basis = f"champion v{champion_version} {float(held):.4f} + min_improvement {rule.min_improvement}"
        else:
            required, basis = rule.floor, f"floor {rule.floor}"
            if champion is not None:
                basis += (" (the champion has no such metric)" if held is MISSING else
                          f" (the champion's value is {held_problem}: it counts as failing)")
        problem = metric_problem(value)
        if problem:
            out.append(Shortfall(rule.name, math.nan, required, basis, problem))
        elif float(value) < required:
            out.append(Shortfall(rule.name, float(value), required, basis))
    return out


def promote(config: RegistryConfig, *, version: str | int | None = None, alias: str | None = None,
            uri: str | None = None, break_lock: bool = False) -> Decision:
    """Make a candidate (a version, an alias, or the latest version) champion if it beats the current
    one on every configured metric; otherwise make it challenger. A candidate whose gate metric is
    missing or no finite number is refused (nothing changes). `break_lock`: break a registry lock
    held by a process on another machine (see `AliasLock`)."""
    client, uri = _client(uri)
    name = config.model_name
    cand = get_version(client, name, version, alias, uri=uri)
    what = f"version {cand.version} of {name!r}"
    metrics = run_metrics(client, cand.run_id, what)
    bad = gate_values(config.metrics, metrics)
    missing = [k for k in bad if k not in metrics]
    if missing:
        raise GalenInputError(f"run {cand.run_id} of {what} has no metric {', '.join(missing)} (it has "
                              f"{', '.join(sorted(metrics)[:12])}...); evaluate the tasks params.yaml "
                              "registry.metrics names, or change that list")
    if bad:
        raise GalenInputError(f"run {cand.run_id} of {what}: " + "; ".join(f"{k} is {v}" for k, v in bad.items())
                              + ". A gate metric must be a finite number, so it cannot be promoted; evaluate it "
                              "again and register the result")
    verify_artifact(client, cand, uri)
    with AliasLock(client, name, config.lock_timeout_s, config.lock_stale_s, break_lock=break_lock) as lock:
        champ = get_alias(client, name, CHAMPION)
        if champ is not None and str(champ.version) == str(cand.version):
            return Decision(name, str(cand.version), True, str(champ.version),
                            note=f"{name} v{cand.version} already is `{CHAMPION}`; nothing changed")
        champ_metrics = None
        if champ is not None:
            try:
                champ_metrics = run_metrics(client, champ.run_id, f"champion v{champ.version}")
            except GalenInputError as e:  # a champion without metrics is judged against the floors
                log.warning("%s; comparing against the floors", e)
                champ_metrics = {}
        shortfalls = compare(config.metrics, metrics, champ_metrics, champ and str(champ.version))
        if shortfalls:
            lock.apply({CHALLENGER: str(cand.version)})
            return Decision(name, str(cand.version), False, champ and str(champ.version), shortfalls)
        changes: dict[str, str | None] = {}
        if champ is not None:
            changes[PREVIOUS] = str(champ.version)
        changes[CHAMPION] = str(cand.version)
        challenger = get_alias(client, name, CHALLENGER)
        if challenger is not None and str(challenger.version) == str(cand.version):
            changes[CHALLENGER] = None
        lock.apply(changes)
        return Decision(name, str(cand.version), True, champ and str(champ.version))


def rollback(config: RegistryConfig, *, uri: str | None = None, break_lock: bool = False) -> Decision:
    """`previous` becomes `champion` again and the demoted champion becomes `previous` (no metric
    gate: an emergency rollback). `break_lock`: as in `promote`."""
    client, uri = _client(uri)
    name = config.model_name
    get_registered_model(client, name, uri)
    prev = get_alias(client, name, PREVIOUS)
    if prev is None:
        raise GalenInputError(f"{name!r} has no `{PREVIOUS}` alias: there is no earlier champion to roll back to")
    verify_artifact(client, prev, uri)
    with AliasLock(client, name, config.lock_timeout_s, config.lock_stale_s, break_lock=break_lock) as lock:
        champ, prev_now = get_alias(client, name, CHAMPION), get_alias(client, name, PREVIOUS)
        if prev_now is None or str(prev_now.version) != str(prev.version):
            raise GalenInputError(f"the `{PREVIOUS}` alias of {name!r} moved while rolling back (another promotion "
                                  "ran); nothing changed, check the aliases and try again")
        changes: dict[str, str | None] = {CHAMPION: str(prev.version)}
        changes[PREVIOUS] = str(champ.version) if champ is not None else None
        lock.apply(changes)
    before = champ and str(champ.version)
    return Decision(name, str(prev.version), True, before,
                    note=f"{name} v{prev.version} is `{CHAMPION}` again" +
                         (f"; v{before} is now `{PREVIOUS}`" if before else ""))


def aliases(config: RegistryConfig, uri: str | None = None) -> dict[str, str]:
    """alias -> version of the registered model (for reports and tests)."""
    client, uri = _client(uri)
    return {k: str(v) for k, v in get_registered_model(client, config.model_name, uri).aliases.items()}
