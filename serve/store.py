"""The served model from the MLflow registry: resolve `models:/<name>@<alias>` to a version,
download it once per node, and load its Galen model folder into a `GalenPredictor`.

A registered version is the pyfunc of `flows/pyfunc_model.py`: its artifact "model" is the Galen
model folder (config.json, weights, tokenizer) and its `model_config["predict"]` holds the decoding
settings the version was evaluated with, which serving keeps (only the request limits are ours).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galen.model.errors import GalenError, GalenInputError
from galen.serve.settings import ServeSettings

log = logging.getLogger("ray.serve.galen")

_MLFLOW_LOCK = threading.Lock()  # mlflow's tracking/registry URIs are process-global


class ModelUnavailable(GalenError):
    """The registry cannot give the model asked for (no such name or alias, unreachable store)."""


@dataclass(frozen=True)
class ModelRef:
    """One registered version: what every answer names."""

    name: str
    version: str
    alias: str
    run_id: str | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "alias": self.alias, "run_id": self.run_id}


@dataclass
class LoadedModel:
    ref: ModelRef
    predictor: Any                          # model.predict.GalenPredictor
    folder: Path
    model_config: dict[str, Any] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)

    def default_labels(self, fallback: list[str]) -> list[str]:
        """Class names for /v1/classify without labels: the version's own (model_config["labels"]
        ["classification"]), else the serve setting."""
        labels = (self.model_config.get("labels") or {}).get("classification") if isinstance(
            self.model_config.get("labels"), dict) else None
        return list(labels or fallback)


def resolve_tracking_uri(settings: ServeSettings) -> str:
    if settings.tracking_uri:
        return settings.tracking_uri
    from galen.flows.paths import tracking_uri

    try:
        return tracking_uri()
    except GalenInputError as e:
        raise ModelUnavailable(f"no MLflow store to load {settings.model_name!r} from: {e}") from e


def _configure_mlflow(uri: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def resolve(settings: ServeSettings, uri: str) -> ModelRef:
    """The version `settings.alias` points at now."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from galen.flows.registry_lookup import get_alias

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        mv = get_alias(client, settings.model_name, settings.alias)
    except MlflowException as e:  # e.g. the store is unreachable or holds no such model
        raise ModelUnavailable(f"no version of {settings.model_name!r} has alias {settings.alias!r} in {uri} "
                               f"({e.error_code}); register one and set the alias (galen register / promote)") \
            from e
    if mv is None:
        raise ModelUnavailable(f"no version of {settings.model_name!r} has alias {settings.alias!r} in {uri}; "
                               "register one and set the alias (galen register / promote)")
    return ModelRef(settings.model_name, str(mv.version), settings.alias, mv.run_id, mv.source)


def _cache_root(settings: ServeSettings, uri: str) -> Path:
    root = Path(settings.model_cache) if settings.model_cache else Path(tempfile.gettempdir()) / "galen-serve-models"
    store = hashlib.sha1(uri.encode()).hexdigest()[:12]  # two registries never share a version folder
    return root / store / settings.model_name


def _model_folder(downloaded: Path, marker: str = "config.json") -> tuple[Path, dict[str, Any]]:
    """(the Galen model folder, the pyfunc's model_config) of a downloaded version; `marker` is the
    config file that names the folder (open_clip_config.json for the CLIP model)."""
    import yaml

    model_config: dict[str, Any] = {}
    mlmodel = downloaded / "MLmodel"
    if mlmodel.is_file():
        flavor = ((yaml.safe_load(mlmodel.read_text()) or {}).get("flavors") or {}).get("python_function") or {}
        model_config = dict(flavor.get("config") or flavor.get("model_config") or {})
        art = ((flavor.get("artifacts") or {}).get("model") or {}).get("path")
        if art and (downloaded / art / marker).is_file():
            return downloaded / art, model_config
    found = sorted(p.parent for p in downloaded.rglob(marker) if (p.parent / "tokenizer.json").is_file())
    if not found:
        raise ModelUnavailable(f"the registered version in {downloaded} holds no Galen model folder (config.json + "
                               "tokenizer.json); register it with the model folder as artifact 'model'")
    return found[0], model_config


def download(ref: ModelRef, settings: ServeSettings, uri: str, marker: str = "config.json"
             ) -> tuple[Path, dict[str, Any]]:
    """The version's files on this node (downloaded once; replicas sharing a node share them:
    each downloads into a private folder and renames it into place, so none sees half a model)."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in replica logs
    target = _cache_root(settings, uri) / ref.version
    if not (target / ".complete").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{ref.version}."))
        try:
            with _MLFLOW_LOCK:
                _configure_mlflow(uri)
                mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{ref.name}/{ref.version}",
                                                    dst_path=str(tmp))
            (tmp / ".complete").write_text(f"{ref.name} {ref.version} {ref.run_id}\n")
            try:
                os.replace(tmp, target)
            except OSError:  # another replica won the race: its copy is complete
                if not (target / ".complete").is_file():
                    raise
        except Exception as e:
            if isinstance(e, GalenError):
                raise
            raise ModelUnavailable(f"cannot download {ref.name} version {ref.version} from {uri}: {e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _model_folder(target, marker)


def device_for(settings: ServeSettings) -> str:
    if settings.device != "auto":
        return settings.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(ref: ModelRef, settings: ServeSettings, uri: str) -> LoadedModel:
    """Download and load one version; its decoding settings are kept, the request limits are ours."""
    from galen.model.predict import GalenPredictor, PredictConfig

    folder, model_config = download(ref, settings, uri)
    cfg = PredictConfig.from_dict(model_config.get("predict"))
    cfg.max_image_pixels = settings.max_image_pixels
    cfg.max_batch_size = max(cfg.max_batch_size, settings.max_batch_size)  # one Serve batch = one model batch
    predictor = GalenPredictor.load(folder, cfg, device=device_for(settings))
    log.info("loaded %s version %s (alias %s) from %s", ref.name, ref.version, ref.alias, folder)
    return LoadedModel(ref, predictor, folder, model_config)
