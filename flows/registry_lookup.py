"""Reading the MLflow model registry: a registered model, the version an alias points at, a
version by number. The one place aliases are resolved — the pipeline's registry commands and the
serving side's alias follower both call it (it imports nothing of the pipeline's stages)."""

from __future__ import annotations

from galen.model.errors import GalenInputError


def error_code(e: Exception) -> str | None:
    from mlflow.exceptions import MlflowException

    return e.error_code if isinstance(e, MlflowException) else None


def get_registered_model(client, name: str, uri: str):
    try:
        return client.get_registered_model(name)
    except Exception as e:
        if error_code(e) == "RESOURCE_DOES_NOT_EXIST":
            raise GalenInputError(f"no registered model {name!r} in {uri}; register one with `galen register` "
                                  "(or check the name and MLFLOW_TRACKING_URI)") from e
        raise


def get_alias(client, name: str, alias: str):
    """The version an alias points to, or None when the alias is not set."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception as e:
        if error_code(e) in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST") and "not found" in str(e).lower():
            return None
        raise


def get_version(client, name: str, version: str | int | None = None, alias: str | None = None, *, uri: str):
    """A version by number, by alias (which must exist), or the latest one."""
    get_registered_model(client, name, uri)
    if alias is not None:
        mv = get_alias(client, name, alias)
        if mv is None:
            raise GalenInputError(f"registered model {name!r} has no alias {alias!r}; set aliases: "
                                  f"{sorted(client.get_registered_model(name).aliases) or 'none'}")
        return mv
    if version is not None:
        try:
            return client.get_model_version(name, str(version))
        except Exception as e:
            if error_code(e) == "RESOURCE_DOES_NOT_EXIST":
                raise GalenInputError(f"registered model {name!r} has no version {version}") from e
            raise
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise GalenInputError(f"registered model {name!r} has no versions; run `galen register` first")
    return max(versions, key=lambda v: int(v.version))
