"""params.yaml: the single place stage settings come from (DVC tracks each section per stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from galen.model.errors import GalenInputError

DEFAULT_PARAMS = "params.yaml"


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise GalenInputError(f"{p} not found; run from the project root or pass --params")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise GalenInputError(f"{p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise GalenInputError(f"{p} must be a mapping of sections")
    return data


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    value = params.get(name)
    if not isinstance(value, dict):
        raise GalenInputError(f"params.yaml has no `{name}:` section (or it is not a mapping); add it")
    return value
