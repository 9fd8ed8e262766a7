"""infra/: the cluster manifests, launcher config, image and scripts agree with each other, with the
code's contract (galen train, galen.serve.app:build_app, the MLflow alias) and with infra/README.md."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
BIN = Path(sys.executable).parent
IMAGE = "registry.example.com/galen:0.1.0"
RAY_VERSION = "2.60.0"


def load_all(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def one(path: Path, kind: str) -> dict:
    docs = [d for d in load_all(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path}: expected one {kind}, found {len(docs)}"
    return docs[0]


def walk(node, key=None):
    """Every (key, value) pair of a nested YAML structure."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v, k)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def pod_templates(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]


def containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec["containers"])


def documented_env() -> set[str]:
    text = (INFRA / "README.md").read_text()
    m = re.search(r"^## Environment variables\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "infra/README.md has no '## Environment variables' section"
    names = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", m.group(1), re.M))
    assert len(names) >= 8, names
    return names


SHELL_VARS = {"PWD", "HOME", "PATH"}  # the shell's own, not configuration


def shell_env_refs(text: str) -> set[str]:
    return set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", text)) - SHELL_VARS


YAML_FILES = sorted(INFRA.rglob("*.yaml"))
KUBERAY = {p.name: p for p in (INFRA / "kuberay").glob("*.yaml")}
SHELL_SCRIPTS = sorted(INFRA.rglob("*.sh"))


# --- every file ----------------------------------------------------------------------------------

def test_the_expected_files_exist():
    for rel in ["docker/Dockerfile", "docker/Dockerfile.dockerignore", "scripts/dvc-s3-remote.sh",
                "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml", "kuberay/rayservice.yaml",
                "kuberay/secret.example.yaml", "aws/cluster.yaml", "aws/galen.env.example",
                "mlflow/run-mlflow-server.sh", "mlflow/mlflow.yaml", "README.md"]:
        assert (INFRA / rel).is_file(), rel


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses_and_kubernetes_objects_are_named(path):
    for doc in load_all(path):
        assert isinstance(doc, dict), path
        if "apiVersion" in doc or "kind" in doc:  # a Kubernetes object
            assert doc.get("apiVersion") and doc.get("kind"), path
            assert doc["metadata"]["name"], path
            assert doc["metadata"]["namespace"] == "galen", path


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob-train.yaml", "RayJob"),
                                       ("rayservice.yaml", "RayService")])
def test_kuberay_objects_are_ray_io_v1(name, kind):
    docs = load_all(KUBERAY[name])
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [("ray.io/v1", kind)]


def kuberay_cluster_specs() -> dict[str, dict]:
    return {
        "raycluster": one(KUBERAY["raycluster.yaml"], "RayCluster")["spec"],
        "rayjob": one(KUBERAY["rayjob-train.yaml"], "RayJob")["spec"]["rayClusterSpec"],
        "rayservice": one(KUBERAY["rayservice.yaml"], "RayService")["spec"]["rayClusterConfig"],
    }


@pytest.mark.parametrize("which", ["raycluster", "rayjob", "rayservice"])
def test_ray_clusters_have_a_head_and_a_gpu_worker_group_on_the_galen_image(which):
    spec = kuberay_cluster_specs()[which]
    assert spec["rayVersion"] == RAY_VERSION
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265, 10001, 8000} <= head_ports
    groups = spec["workerGroupSpecs"]
    assert groups and all(isinstance(g["rayStartParams"], dict) for g in groups)
    gpu = [g for g in groups
           if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu, f"{which}: no worker group asks for a GPU"
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    for pod in pod_templates(spec):
        for c in containers(pod):
            assert c["image"] == IMAGE, (which, c["name"])
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            assert limits["cpu"] and limits["memory"] and requests["memory"], (which, c["name"])
            # every container of every Ray pod gets the S3 credentials from the one Secret
            refs = [e["secretRef"]["name"] for e in c.get("envFrom", [])]
            assert refs == ["galen-secrets"], (which, c["name"])


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_training_gpu_pods_pull_the_data_before_ray_starts(which):
    spec = kuberay_cluster_specs()[which]
    for g in spec["workerGroupSpecs"]:
        pod = g["template"]["spec"]
        init = {c["name"]: c for c in pod.get("initContainers", [])}
        assert "dvc-pull" in init, g["groupName"]
        cmd = " ".join(init["dvc-pull"]["command"])
        assert "infra/scripts/dvc-s3-remote.sh" in cmd and "dvc pull --with-deps shards tokenizer" in cmd
        # the pulled folders are the ones the Ray worker container sees
        pulled = {m["mountPath"] for m in init["dvc-pull"]["volumeMounts"]}
        worker = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert {"/app/data", "/app/artifacts"} <= pulled <= worker
        assert "/dev/shm" in worker


# --- RayJob --------------------------------------------------------------------------------------

def rayjob() -> dict:
    return one(KUBERAY["rayjob-train.yaml"], "RayJob")


def test_rayjob_entrypoint_pulls_the_data_then_runs_galen_train():
    entry = rayjob()["spec"]["entrypoint"]
    steps = [s.strip() for s in entry.split("&&")]
    assert steps[0] == "cd /app"
    assert "bash infra/scripts/dvc-s3-remote.sh" in steps
    pull = steps.index("dvc pull --with-deps shards tokenizer")
    train = next(i for i, s in enumerate(steps) if s.startswith("galen train"))
    assert pull < train
    argv = shlex.split(steps[train])
    assert argv[:2] == ["galen", "train"]
    assert argv[argv.index("--stage") + 1] in {"pretrain", "finetune"}
    assert argv[argv.index("--params") + 1] == "params.yaml"
    assert (ROOT / "params.yaml").is_file() and (ROOT / "dvc.yaml").is_file()
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert {"shards", "tokenizer"} <= set(stages)
    subprocess.run(["bash", "-n", "-c", entry], check=True)


def test_rayjob_owns_its_cluster_and_cleans_up():
    spec = rayjob()["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 3600
    assert "rayClusterSpec" in spec and "clusterSelector" not in spec
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is False
    (gpu,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert gpu["minReplicas"] == gpu["replicas"] == gpu["maxReplicas"] >= 1


# --- RayService ----------------------------------------------------------------------------------

def serve_config() -> dict:
    svc = one(KUBERAY["rayservice.yaml"], "RayService")
    raw = svc["spec"]["serveConfigV2"]
    assert isinstance(raw, str), "serveConfigV2 is a YAML string in ray.io/v1"
    return yaml.safe_load(raw)


def test_rayservice_serve_config_runs_the_galen_app_at_the_champion_alias():
    cfg = serve_config()
    (app,) = cfg["applications"]
    assert app["name"] == "galen"
    assert app["import_path"] == "galen.serve.app:build_app"
    assert app["route_prefix"] == "/"
    dep, clip = app["deployments"]
    assert dep["name"] == "GalenGeneralist" and clip["name"] == "GalenClip"
    assert "user_config" not in clip  # the CLIP deployment has no reconfigure: settings come from args
    assert dep["user_config"] == {"model_name": "galen-generalist", "alias": "champion"}
    auto = dep["autoscaling_config"]
    assert 1 <= auto["min_replicas"] <= auto["max_replicas"]
    assert "num_replicas" not in dep  # autoscaling, not a fixed count
    assert cfg["http_options"]["port"] == 8000


def test_rayservice_has_gpus_for_every_autoscaled_replica():
    dep = serve_config()["applications"][0]["deployments"][0]
    gpus_per_replica = dep["ray_actor_options"].get("num_gpus", 0)
    spec = kuberay_cluster_specs()["rayservice"]
    assert spec["enableInTreeAutoscaling"] is True
    gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                      .get("nvidia.com/gpu", 0)) for g in spec["workerGroupSpecs"])
    assert gpus >= gpus_per_replica * dep["autoscaling_config"]["max_replicas"]


# --- environment variables and secrets -----------------------------------------------------------

def manifest_env_names() -> dict[str, set[str]]:
    """Env var names each file sets or reads."""
    found: dict[str, set[str]] = {}
    for path in YAML_FILES:
        names: set[str] = set()
        for doc in load_all(path):
            for key, value in walk(doc):
                if key == "env" and isinstance(value, list):
                    names |= {e["name"] for e in value}
                elif key == "secretKeyRef":
                    names.add(value["key"])
                elif key == "stringData" and doc.get("kind") == "Secret":
                    names |= set(value)
                elif key in {"entrypoint", "command", "setup_commands", "worker_start_ray_commands",
                             "head_start_ray_commands", "initialization_commands"}:
                    names |= shell_env_refs(value if isinstance(value, str) else " ".join(value))
        found[str(path.relative_to(INFRA))] = names
    for path in SHELL_SCRIPTS:
        found[str(path.relative_to(INFRA))] = shell_env_refs(path.read_text())
    env_file = (INFRA / "aws" / "galen.env.example").read_text()
    found["aws/galen.env.example"] = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", env_file, re.M))
    return found


def test_every_env_var_used_is_documented_in_the_readme():
    documented = documented_env()
    used = manifest_env_names()
    for where, names in used.items():
        assert names <= documented, f"{where}: undocumented {sorted(names - documented)}"
    everything = set().union(*used.values())
    for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL",
                 "MLFLOW_TRACKING_URI", "GALEN_DVC_REMOTE_URL", "MLFLOW_BACKEND_STORE_URI"]:
        assert name in everything, f"{name} is documented but never wired up"


def test_secret_keys_are_the_documented_ones_and_are_placeholders():
    secret = one(INFRA / "kuberay" / "secret.example.yaml", "Secret")
    assert secret["metadata"]["name"] == "galen-secrets"
    keys = set(secret["stringData"])
    assert keys == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"}
    readme = (INFRA / "README.md").read_text()
    secrets_section = readme[readme.index("### Secrets"):]
    for key in keys:
        assert f"`{key}`" in secrets_section
    assert secret["stringData"]["AWS_ACCESS_KEY_ID"].startswith("<")
    assert secret["stringData"]["AWS_SECRET_ACCESS_KEY"].startswith("<")


def test_every_secret_reference_names_a_documented_secret_and_key():
    readme = (INFRA / "README.md").read_text()
    for path in YAML_FILES:
        for doc in load_all(path):
            for key, value in walk(doc):
                if key in {"secretRef", "secretKeyRef"}:
                    assert value["name"] in {"galen-secrets", "galen-mlflow-db"}, path
                    assert f"`{value['name']}`" in readme, path
                if key == "secretKeyRef" and value["name"] == "galen-secrets":
                    keys = set(one(INFRA / "kuberay" / "secret.example.yaml", "Secret")["stringData"])
                    assert value["key"] in keys, path


def test_the_mlflow_uri_points_at_the_mlflow_service():
    svc = one(INFRA / "mlflow" / "mlflow.yaml", "Service")
    port = svc["spec"]["ports"][0]["port"]
    expected = f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{port}"
    uris = set()
    for name in ["raycluster.yaml", "rayjob-train.yaml", "rayservice.yaml"]:
        for key, value in walk(load_all(KUBERAY[name])):
            if key == "env":
                uris |= {e["value"] for e in value if e["name"] == "MLFLOW_TRACKING_URI"}
    assert uris == {expected}
    allowed = {e["name"]: e.get("value") for e in
               one(INFRA / "mlflow" / "mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{port}" in \
        allowed["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")


def test_mlflow_deployment_runs_the_server_script_behind_its_service():
    dep = one(INFRA / "mlflow" / "mlflow.yaml", "Deployment")
    svc = one(INFRA / "mlflow" / "mlflow.yaml", "Service")
    assert dep["apiVersion"] == "apps/v1" and svc["apiVersion"] == "v1"
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    assert c["image"] == IMAGE
    script = c["command"][-1]
    assert (ROOT / script).is_file(), script
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    env = {e["name"]: e for e in c["env"]}
    assert int(env["MLFLOW_PORT"]["value"]) == port
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "galen-mlflow-db"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")


# --- AWS cluster launcher ------------------------------------------------------------------------

def launcher() -> dict:
    (cfg,) = load_all(INFRA / "aws" / "cluster.yaml")
    return cfg


def test_cluster_launcher_has_head_and_gpu_worker_types_and_setup():
    cfg = launcher()
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5"))
                           for t in workers.values())
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
    assert cfg["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    setup = " && ".join(cfg["setup_commands"])
    assert "pip install -e ." in setup
    assert "dvc pull --with-deps shards tokenizer" in setup
    assert setup.index("pip install -e .") < setup.index("dvc pull")
    # the repo and the env file are synced; both sources exist relative to the repo root
    mounts = cfg["file_mounts"]
    assert mounts["~/galen"] == "."
    assert (ROOT / "infra" / "aws" / "galen.env.example").is_file()
    assert mounts["~/galen.env"] == "infra/aws/galen.env"
    assert "galen.env" in (INFRA / "aws" / ".gitignore").read_text().split()
    for cmd in cfg["setup_commands"] + cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        subprocess.run(["bash", "-n", "-c", cmd], check=True)


def test_cluster_launcher_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher()))


# --- image ---------------------------------------------------------------------------------------

def test_dockerfile_builds_from_the_ray_gpu_image_and_installs_the_repo():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    version = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1)
    assert version == RAY_VERSION
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", text, re.M)
    assert "pip install --no-cache-dir -e ." in text and "COPY --chown=ray:users . /app" in text
    assert re.findall(r"^WORKDIR (\S+)$", text, re.M)[-1] == "/app"
    import ray

    assert ray.__version__.split(".")[:2] == RAY_VERSION.split(".")[:2], "image and local Ray differ"
    # nothing secret baked in
    assert not re.search(r"^(ENV|ARG)\s+(AWS_|MLFLOW_TRACKING|.*SECRET|.*PASSWORD)", text, re.M)


def test_dockerignore_keeps_data_git_and_credentials_out_of_the_image():
    rules = {l.strip() for l in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")}
    assert {".git", "data", "artifacts", ".dvc/cache", ".dvc/config.local", "infra/aws/galen.env",
            "**/.venv"} <= rules


# --- shell ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(INFRA)))
def test_shell_scripts_parse(path):
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in path.read_text()
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_mlflow_server_script_passes_the_documented_flags(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mlflow").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (fake / "mlflow").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "MLFLOW_BACKEND_STORE_URI": "postgresql://u:p@db:5432/mlflow",
           "MLFLOW_SERVER_ALLOWED_HOSTS": "mlflow:5000"}
    out = subprocess.run(["bash", str(INFRA / "mlflow" / "run-mlflow-server.sh"), "--extra"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    flags = dict(zip(out, out[1:]))
    assert flags["--backend-store-uri"] == "postgresql://u:p@db:5432/mlflow"
    assert flags["--artifacts-destination"] == "s3://galen/mlflow-artifacts"
    assert flags["--host"] == "0.0.0.0" and flags["--port"] == "5000"
    assert flags["--allowed-hosts"] == "mlflow:5000"
    assert out[0] == "server" and "--serve-artifacts" in out and out[-1] == "--extra"
    default = subprocess.run(["bash", str(INFRA / "mlflow" / "run-mlflow-server.sh")],
                             env={"PATH": env["PATH"]}, capture_output=True, text=True, check=True).stdout.split()
    assert default[default.index("--backend-store-uri") + 1] == "sqlite:///mlflow.db"
    assert "--allowed-hosts" not in default


def test_the_real_mlflow_cli_accepts_those_flags():
    mlflow_bin = BIN / "mlflow"  # mlflow is a dependency
    helptext = subprocess.run([str(mlflow_bin), "server", "--help"], capture_output=True, text=True,
                              check=True).stdout
    for flag in ["--backend-store-uri", "--artifacts-destination", "--serve-artifacts", "--host", "--port",
                 "--workers", "--allowed-hosts"]:
        assert flag in helptext, flag


def dvc_checkout_copy(tmp_path: Path) -> Path:
    repo = tmp_path / "app"
    repo.mkdir()
    for name in ["dvc.yaml", "dvc.lock", "params.yaml"]:
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, repo / name)
    (repo / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    return repo  # like /app in the image: no .git


def test_dvc_remote_script_configures_the_s3_remote_without_git(tmp_path):
    repo = dvc_checkout_copy(tmp_path)
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "GALEN_DVC_REMOTE_URL": "s3://galen-test/dvc",
           "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9",  # the fallback when AWS_ENDPOINT_URL is unset
           "AWS_DEFAULT_REGION": "eu-west-1"}
    subprocess.run(["bash", str(INFRA / "scripts" / "dvc-s3-remote.sh")], cwd=repo, env=env, check=True,
                   capture_output=True)
    local = (repo / ".dvc" / "config.local").read_text()
    assert "no_scm = true" in local and "remote = galen-s3" in local
    assert "url = s3://galen-test/dvc" in local and "endpointurl = http://127.0.0.1:9" in local
    assert "region = eu-west-1" in local
    assert (repo / ".dvc" / "config").read_text() == (ROOT / ".dvc" / "config").read_text()  # committed one untouched
    default = subprocess.run([str(BIN / "dvc"), "remote", "default"], cwd=repo, env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
    assert default == "galen-s3"
    # idempotent: a restarted pod runs it again
    subprocess.run(["bash", str(INFRA / "scripts" / "dvc-s3-remote.sh")], cwd=repo, env=env, check=True,
                   capture_output=True)


def test_dvc_remote_script_refuses_without_a_remote_url(tmp_path):
    repo = dvc_checkout_copy(tmp_path)
    res = subprocess.run(["bash", str(INFRA / "scripts" / "dvc-s3-remote.sh")], cwd=repo,
                         env={"PATH": f"{BIN}:/usr/bin:/bin"}, capture_output=True, text=True)
    assert res.returncode != 0 and "GALEN_DVC_REMOTE_URL" in res.stderr
    assert not (repo / ".dvc" / "config.local").exists()


# --- the cluster side agrees with the code -------------------------------------------------------

def galen_args(command: str) -> list[str]:
    """`galen ...` (after any VAR=value prefixes) as argv without the program name."""
    argv = shlex.split(command)
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
        argv.pop(0)
    assert argv[0] == "galen", command
    return argv[1:]


def check_train_command(argv: list[str]) -> None:
    """A `galen train` command line parses with Galen's own parser, and the params file it names
    (the repo's, as in the image and on the launcher's nodes) loads with only known, valid params."""
    from galen.flows.cli import build_parser, cmd_train
    from galen.flows.params import load_params
    from galen.flows.train.generalist_trainer import load_train_config

    args = build_parser().parse_args(argv)
    assert args.func is cmd_train, argv
    assert not Path(args.params).is_absolute() and (ROOT / args.params).is_file(), args.params
    cfg = load_train_config(load_params(ROOT / args.params), args.stage, steps=args.steps,
                            num_workers=args.workers, zero_stage=args.zero_stage, run_name=args.run_name,
                            out=args.out, init=args.init, batch_size=args.batch_size, metrics=args.metrics,
                            size=args.size)
    assert cfg.stage == args.stage


def test_rayjob_runs_a_galen_train_command_with_known_params_and_its_worker_count():
    steps = [s.strip() for s in rayjob()["spec"]["entrypoint"].split("&&")]
    argv = galen_args(next(s for s in steps if s.startswith("galen train")))
    check_train_command(argv)

    from galen.flows.cli import build_parser
    from galen.flows.params import load_params
    from galen.flows.train.generalist_trainer import load_train_config

    args = build_parser().parse_args(argv)
    cfg = load_train_config(load_params(ROOT / args.params), args.stage, num_workers=args.workers)
    (gpu,) = rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert gpu["replicas"] == cfg.num_workers, "one Ray Train worker per GPU pod: train.num_workers == replicas"


def documented_submit_commands() -> list[str]:
    found = []
    for path in [INFRA / "README.md", *YAML_FILES]:
        for m in re.finditer(r"(?:[A-Z_]+=\S+ )*galen submit [^`\n]*", path.read_text()):
            cmd = m.group(0).strip().rstrip(".,;")
            if " -- " in cmd and "[" not in cmd and "…" not in cmd:  # not mentions, synopses or elisions
                found.append(cmd)
    return found


def test_every_documented_galen_submit_command_parses_and_submits_a_valid_train_command():
    from galen.flows.cli import build_parser
    from galen.flows.submit import galen_command

    commands = documented_submit_commands()
    assert len(commands) >= 3, commands                     # README (KubeRay, AWS) + the manifests' headers
    for cmd in commands:
        args = build_parser().parse_args(galen_args(cmd))
        assert args.func.__name__ == "cmd_submit", cmd
        assert args.cluster_dir in {"/app", "~/galen"}, cmd   # where the image / the launcher put the repo
        check_train_command(galen_command(args.command, build_parser()))


def ray_start_options() -> set[str]:
    from ray.scripts.scripts import start

    return {opt for p in start.params for opt in p.opts}


def test_ray_start_commands_and_params_use_real_ray_start_options():
    import click
    from ray.scripts.scripts import start

    cfg = launcher()
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        for part in cmd.split(";"):
            argv = shlex.split(part.split("&&")[-1])
            if argv[:2] == ["ray", "start"]:
                try:
                    start.make_context("start", argv[2:])
                except click.UsageError as e:
                    pytest.fail(f"{cmd!r}: {e}")
    options = ray_start_options()
    for which, spec in kuberay_cluster_specs().items():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            for key in group["rayStartParams"]:
                assert f"--{key}" in options, (which, key)


def test_the_long_lived_clusters_head_has_the_data_for_galen_submit_drivers():
    """`galen submit --cluster-dir /app` runs `galen train` on the head, which checks data/shards and
    artifacts/tokenizer before any worker starts: the head pod pulls them like the GPU pods."""
    head = kuberay_cluster_specs()["raycluster"]["headGroupSpec"]["template"]["spec"]
    init = {c["name"]: c for c in head.get("initContainers", [])}
    assert "dvc pull --with-deps shards tokenizer" in " ".join(init["dvc-pull"]["command"])
    pulled = {m["mountPath"] for m in init["dvc-pull"]["volumeMounts"]}
    mounted = {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert {"/app/data", "/app/artifacts"} <= pulled & mounted
    assert head["containers"][0]["workingDir"] == "/app"


# Env var names in Galen's code that are not configuration a deployment sets.
NOT_CONFIGURATION = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "serve/store.py turns MLflow's progress bars off in replicas",
    "MLFLOW_REGISTRY_URI": "flows/registry.py saves and restores it around registry calls",
}


def env_names_in_code() -> set[str]:
    """Env var names Galen's Python code mentions (reads, forwards, or sets)."""
    names: set[str] = set()
    for folder in ("flows", "model", "serve"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r"[\"']((?:AWS|MLFLOW|RAY|GALEN)_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


def test_the_env_vars_the_code_reads_are_the_documented_ones():
    in_code = env_names_in_code()
    for name, why in NOT_CONFIGURATION.items():
        assert name in in_code, f"{name} is no longer in the code ({why}): drop it from NOT_CONFIGURATION"
    read = in_code - set(NOT_CONFIGURATION)
    assert {"MLFLOW_TRACKING_URI", "RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"} <= read
    documented = documented_env()
    assert read <= documented, f"read by the code but not in infra/README.md: {sorted(read - documented)}"
    wired = set().union(*manifest_env_names().values())
    unused = documented - read - wired
    assert not unused, f"documented in infra/README.md but read by no code and set by no file here: {sorted(unused)}"
