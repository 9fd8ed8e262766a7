"""The endpoint's settings, typed, in one place: params.yaml `serve:` < the Serve config's `args` < user_config.

`build_app(args)` reads params.yaml's `serve:` section and lays the Serve config's application
`args` over it; the deployment's `user_config` (model name, alias, ...) is laid over that on every
replica by `reconfigure`, so editing it and re-deploying changes running replicas without a restart.
Every limit here answers a 4xx JSON error saying which limit was hit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galen.model.errors import GalenInputError

MiB = 2 ** 20


@dataclass
class ServeSettings:
    model_name: str = "galen-generalist"   # registered model in the MLflow registry
    alias: str = "champion"                # alias whose version is served (champion / challenger / previous)
    tracking_uri: str | None = None        # None: MLFLOW_TRACKING_URI, else the project's sqlite store
    poll_interval_s: float = 10.0          # each replica checks the alias this often and switches in place; 0 = never
    batching: bool = True                  # dynamic batching across concurrent requests (@serve.batch)
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01     # how long a batch waits to fill up
    request_timeout_s: float = 60.0        # per request inside the replica (504 after it)
    max_body_bytes: int = 20 * MiB         # whole request body (413)
    max_image_bytes: int = 15 * MiB        # one image, decoded from base64 or uploaded (413)
    max_image_pixels: int = 25_000_000     # width x height, read from the header before decoding (413)
    max_text_chars: int = 20_000           # any one text field (422)
    torch_threads: int = 1                 # intra-op threads per replica (replicas scale out, not up)
    device: str = "auto"                   # auto: cuda when the replica has a GPU, else cpu
    model_cache: str | None = None         # where versions are downloaded; None: <tmp>/galen-serve-models
    default_labels: list[str] = field(default_factory=list)  # classify without labels (if the model has none)
    clip_model_name: str | None = "galen-clip"  # the CLIP model served beside (None: no CLIP routes)
    clip_alias: str = "champion"
    clip_index: str | None = None          # retrieval index folder (`galen clip index`) for /v1/retrieve without candidates
    max_candidates: int = 256              # texts / images / labels one CLIP request may carry (422 above)

    def __post_init__(self) -> None:
        for name in ("model_name", "alias", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise GalenInputError(f"serve setting {name} must be a non-empty string, got {getattr(self, name)!r}")
        if not isinstance(self.batching, bool):
            raise GalenInputError(f"serve setting batching must be true or false, got {self.batching!r}")
        for name in ("max_batch_size", "max_body_bytes", "max_image_bytes", "max_image_pixels", "max_text_chars",
                     "torch_threads", "max_candidates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GalenInputError(f"serve setting {name} must be an integer >= 1, got {value!r}")
        for name in ("poll_interval_s", "batch_wait_timeout_s", "request_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise GalenInputError(f"serve setting {name} must be a number >= 0, got {value!r}")
        if self.clip_model_name is not None and (not isinstance(self.clip_model_name, str)
                                                 or not self.clip_model_name.strip()):
            raise GalenInputError(f"serve setting clip_model_name must be a name or null, got {self.clip_model_name!r}")
        if self.request_timeout_s == 0:
            raise GalenInputError("serve setting request_timeout_s must be > 0")
        if not isinstance(self.default_labels, list) or not all(isinstance(x, str) for x in self.default_labels):
            raise GalenInputError("serve setting default_labels must be a list of strings")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, overrides: Mapping[str, Any] | None) -> ServeSettings:
        """These settings with `overrides` laid over them; unknown keys are refused (a typo never
        silently keeps a default)."""
        overrides = dict(overrides or {})
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise GalenInputError(f"unknown serve settings {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_params(cls, path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> ServeSettings:
        """params.yaml's `serve:` section (if the file exists) with `overrides` on top."""
        base: dict[str, Any] = {}
        if path is not None and Path(path).is_file():
            from galen.flows.params import load_params

            section = load_params(path).get("serve") or {}
            if not isinstance(section, Mapping):
                raise GalenInputError(f"{path}: the `serve:` section must be a mapping")
            base = dict(section)
        return cls().replace(base).replace(overrides)
