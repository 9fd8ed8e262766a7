"""The endpoint's configuration, without a running server: typed settings, the Serve config that
`serve deploy` accepts, and the RayService manifest carrying the same application."""

from __future__ import annotations

import pytest
import yaml

from galen.model.errors import GalenInputError
from galen.serve.settings import ServeSettings
from tests.serve.conftest import ROOT


def test_settings_from_params_with_overrides(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"serve": {"alias": "challenger", "max_batch_size": 4}}))
    s = ServeSettings.from_params(params, {"max_batch_size": 8})
    assert (s.alias, s.max_batch_size, s.model_name) == ("challenger", 8, "galen-generalist")
    assert ServeSettings.from_params(tmp_path / "missing.yaml") == ServeSettings()
    project = ServeSettings.from_params(ROOT / "params.yaml")
    assert project.model_name == "galen-generalist" and project.alias == "champion"


@pytest.mark.parametrize("overrides, words", [
    ({"alais": "champion"}, "unknown serve settings ['alais']"),
    ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1"),
    ({"max_body_bytes": "20MB"}, "max_body_bytes must be an integer"),
    ({"batching": "yes"}, "batching must be true or false"),
    ({"request_timeout_s": 0}, "request_timeout_s must be > 0"),
    ({"alias": " "}, "alias must be a non-empty string"),
])
def test_bad_settings_say_what_is_wrong(overrides, words):
    with pytest.raises(GalenInputError, match=words.replace("[", r"\[").replace("]", r"\]")):
        ServeSettings().replace(overrides)


def serve_config() -> dict:
    return yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())


def test_serve_config_is_one_serve_deploy_accepts():
    from ray.serve.schema import ServeDeploySchema

    cfg = ServeDeploySchema.model_validate(serve_config())
    (app,) = cfg.applications
    assert app.import_path == "galen.serve.app:build_app" and app.route_prefix == "/"
    dep, clip = app.deployments
    assert clip.name == "GalenClip" and clip.autoscaling_config["min_replicas"] >= 1
    assert dep.name == "GalenGeneralist" and dep.user_config == {"model_name": "galen-generalist", "alias": "champion"}
    assert dep.max_ongoing_requests >= ServeSettings.from_params(ROOT / "params.yaml").max_batch_size
    ServeSettings().replace(dep.user_config)  # every user_config key is a setting


def test_rayservice_embeds_the_same_application():
    (svc,) = [d for d in yaml.safe_load_all((ROOT / "infra" / "kuberay" / "rayservice.yaml").read_text())
              if d and d.get("kind") == "RayService"]
    k8s = yaml.safe_load(svc["spec"]["serveConfigV2"])
    local = serve_config()
    assert k8s["http_options"] == local["http_options"]
    (k8s_app,), (local_app,) = k8s["applications"], local["applications"]
    k8s_dep, local_dep = k8s_app.pop("deployments")[0], local_app.pop("deployments")[0]
    assert k8s_app == local_app
    # the same deployment, except that on Kubernetes every replica has a GPU
    assert k8s_dep.pop("ray_actor_options") == {**local_dep.pop("ray_actor_options"), "num_gpus": 1}
    assert k8s_dep == local_dep


def test_build_app_binds_the_deployment_with_settings_from_params(monkeypatch, tmp_path):
    from galen.serve.app import app_from_config, build_app, load_serve_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(ROOT)
    app = build_app({"params": "params.yaml", "max_batch_size": 4})
    settings = app._bound_deployment.init_args[0]
    assert settings["max_batch_size"] == 4 and settings["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    app = app_from_config(load_serve_config(), user_config={"alias": "challenger"})
    dep = app._bound_deployment
    assert dep.user_config == {"model_name": "galen-generalist", "alias": "challenger"}
    assert dep.max_ongoing_requests == 64
    clip = dep.init_args[1]._bound_deployment  # the GalenClip handle it answers /v1/embed etc. through
    assert clip.name == "GalenClip" and clip.ray_actor_options["num_cpus"] == 0.5
    assert clip._deployment_config.autoscaling_config.max_replicas == 2  # the config file's options, not defaults
    with pytest.raises(GalenInputError, match="unknown serve settings"):
        app_from_config(load_serve_config(), user_config={"alais": "x"})
    with pytest.raises(GalenInputError, match="params file nope.yaml not found"):
        build_app({"params": "nope.yaml"})


def test_openapi_documents_json_and_multipart_bodies():
    from galen.serve.routes import app

    doc = app.openapi()
    vqa = doc["paths"]["/v1/vqa"]["post"]
    assert set(vqa["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    form = vqa["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["image"]["format"] == "binary"
    assert "413" in vqa["responses"] and vqa["responses"]["200"]
    assert {"VQARequest", "ChatRequest", "Answer"} <= set(doc["components"]["schemas"])
