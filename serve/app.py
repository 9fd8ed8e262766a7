"""The Galen Serve application: the GalenGeneralist ingress (serve/routes.py) bound with the
GalenClip deployment (serve/clip_deployment.py) and settings from params.yaml `serve:`.

Entry points: `build_app(args)` (the Serve config's import path `galen.serve.app:build_app`, for `serve
run serve/config.yaml`, `serve deploy`, the KubeRay RayService), `app_from_config` (the application
as a Serve config describes it, deployment options included) and `run_local` (`galen serve`:
embedded Ray until Ctrl-C or SIGTERM).

A replica's parts: serve/routes.py (the HTTP routes), serve/served_generalist.py (the model behind
them), serve/alias_follower.py (promotion without downtime) and serve/batching.py (concurrent
requests share model calls), the last two shared with GalenClip. Replicas scale out with Serve
autoscaling (serve/config.yaml).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import serve

from galen.model.errors import GalenInputError
from galen.serve import clip_deployment
from galen.serve.routes import GalenGeneralist  # also imported from here (benchmarks/bench_serve.py)
from galen.serve.settings import ServeSettings
from galen.serve.store import ModelUnavailable, resolve_tracking_uri

DEFAULT_CONFIG = Path(__file__).parent / "config.yaml"


def settings_from_args(args: Mapping[str, Any] | None) -> ServeSettings:
    """Settings of the Serve config's application `args`: `params` (default: the project's
    params.yaml, if there is one) gives the `serve:` section; the other keys override it."""
    from galen.flows.paths import project_root

    args = dict(args or {})
    params = args.pop("params", None)
    try:
        root = project_root()
    except GalenInputError:
        root = None
    if params is None:
        params = root / "params.yaml" if root else None
    elif not Path(params).is_file():
        if root is None or Path(params).is_absolute() or not (root / params).is_file():
            raise GalenInputError(f"serve args: params file {params} not found (relative paths are taken from "
                                  f"{Path.cwd()} or the project root)")
        params = root / params
    settings = ServeSettings.from_params(params, args)
    if settings.tracking_uri is None:  # resolve where the app is built (the project's store), not on the replica
        try:
            settings = settings.replace({"tracking_uri": resolve_tracking_uri(settings)})
        except ModelUnavailable:
            pass  # the replica resolves it (MLFLOW_TRACKING_URI there) or says why it cannot
    return settings


def build_app(args: Mapping[str, Any] | None = None) -> serve.Application:
    """The application of the Serve config's import path `galen.serve.app:build_app`."""
    settings = settings_from_args(args)
    return GalenGeneralist.bind(settings.to_dict(), clip_deployment.bind(settings))


def load_serve_config(path: str | Path = DEFAULT_CONFIG) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise GalenInputError(f"Serve config {p} not found")
    cfg = yaml.safe_load(p.read_text()) or {}
    apps = cfg.get("applications") or []
    if len(apps) != 1 or apps[0].get("import_path") != "galen.serve.app:build_app":
        raise GalenInputError(f"{p} must hold one application with import_path galen.serve.app:build_app")
    return cfg


def app_from_config(cfg: Mapping[str, Any], user_config: Mapping[str, Any] | None = None,
                    args: Mapping[str, Any] | None = None) -> serve.Application:
    """The application as the Serve config describes it (deployment options included), with
    `user_config` keys laid over the config's user_config and `args` over its args."""
    app_cfg = cfg["applications"][0]
    deployments = [d for d in app_cfg.get("deployments") or [] if d.get("name") == "GalenGeneralist"]
    options = {k: v for k, v in (deployments[0] if deployments else {}).items() if k != "name"}
    options["user_config"] = {**(options.get("user_config") or {}), **(user_config or {})}
    settings = settings_from_args({**(app_cfg.get("args") or {}), **(args or {})})
    settings.replace(options["user_config"])  # refuse unknown user_config keys here, not on a replica
    clip_deployment.check_index_compatible(settings)
    clip_options = [{k: v for k, v in d.items() if k != "name"} for d in app_cfg.get("deployments") or []
                    if d.get("name") == "GalenClip"]
    clip = clip_deployment.bind(settings, clip_options[0] if clip_options else None)
    return GalenGeneralist.options(**options).bind(settings.to_dict(), clip)


def run_local(config: str | Path = DEFAULT_CONFIG, host: str = "127.0.0.1", port: int = 8000,
              user_config: Mapping[str, Any] | None = None, args: Mapping[str, Any] | None = None,
              num_cpus: int | None = None, ready_file: str | Path | None = None) -> None:
    """`galen serve`: the application on an embedded Ray, until Ctrl-C or SIGTERM."""
    import ray

    cfg = load_serve_config(config)
    application = app_from_config(cfg, user_config, args)
    app_cfg = cfg["applications"][0]

    def _stop(signum, frame):  # noqa: ARG001 - SIGTERM ends like Ctrl-C: Serve and Ray shut down
        raise KeyboardInterrupt

    ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False)
    # After ray.init, which installs its own fatal-signal handlers: SIGTERM and SIGINT (ignored from
    # the start in a background job) end like Ctrl-C, shutting Serve and Ray down.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        http_options = {**(cfg.get("http_options") or {}), "host": host, "port": port}
        serve.start(http_options=http_options)
        serve.run(application, name=app_cfg.get("name", "galen"), route_prefix=app_cfg.get("route_prefix", "/"))
        url = f"http://{host}:{port}{app_cfg.get('route_prefix', '/')}"
        print(f"galen: serving on {url} (OpenAPI at {url.rstrip('/')}/docs); Ctrl-C stops", flush=True)
        if ready_file:
            Path(ready_file).write_text(url + "\n")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("galen: stopping", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
