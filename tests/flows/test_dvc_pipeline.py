"""`dvc repro` of the data stages in a temporary copy of the repository, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The tracked files of this repository in a fresh git repo, with a smaller demo scale."""
    dest = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["demo"]["scale"] = 0.3
    params["tokenizer"]["vocab_size"] = 400
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], dest)
    return dest


def test_data_stages_reproduce_and_rerun_only_what_changed(repo):
    first = run(["dvc", "repro", "shards", "tokenizer"], repo)
    stages = ran_stages(first.stdout)
    assert {"demo_data", "validate", "tokenizer", "shards"} <= set(stages)
    assert sum(s.startswith("ingest@") for s in stages) == 10

    report = json.loads((repo / "metrics" / "data_report.json").read_text())
    assert report["rows"] > 500 and report["quarantined"] == 0
    manifest = json.loads((repo / "data" / "shards" / "manifest.json").read_text())
    assert set(manifest["by_task_split"]) >= {"vqa/train", "caption/train", "classification/train", "nli/train",
                                               "summarization/train"}
    assert (repo / "artifacts" / "tokenizer" / "tokenizer.json").is_file()

    # nothing changed: nothing runs
    again = run(["dvc", "repro", "shards", "tokenizer"], repo)
    assert ran_stages(again.stdout) == [] and "up to date" in again.stdout

    # the trained model's size changes: only the shard stage runs (no re-ingest, no re-validation), and it
    # writes the images at the new model's input size (its config's, not a setting of the stage)
    assert manifest["image_size"] == 128 and manifest["models"] == {"clip": 64, "generalist": 128}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["size"] = "tiny"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run(["dvc", "repro", "shards", "tokenizer"], repo)
    assert ran_stages(changed.stdout) == ["shards"]
    assert json.loads((repo / "data" / "shards" / "manifest.json").read_text())["models"]["generalist"] == 256

    # the default remote is local: push, lose the cache and the data, pull them back
    run(["dvc", "push"], repo)
    manifest = (repo / "data" / "shards" / "manifest.json").read_bytes()
    shutil.rmtree(repo / "data" / "shards")
    shutil.rmtree(repo / ".dvc" / "cache")
    run(["dvc", "pull", "--with-deps", "shards", "tokenizer"], repo)
    assert (repo / "data" / "shards" / "manifest.json").read_bytes() == manifest


def test_bad_data_fails_the_stage_with_the_reason(repo):
    """A user's dataset with a truncated image: the row is quarantined, and past the threshold the
    validate stage fails saying why (after writing the report)."""
    user = repo / "userdata" / "vqa_rad"
    shutil.copytree(repo / "data" / "raw" / "demo" / "vqa_rad", user)
    image = sorted((user / "images").iterdir())[0]
    image.write_bytes(image.read_bytes()[:100])  # truncated JPEG
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["ingest"]["datasets"]["vqa_rad"]["source"] = "userdata/vqa_rad"
    params["validate"]["max_bad_fraction"] = 0.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run(["dvc", "repro", "validate"], repo, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert ran_stages(proc.stdout)[:1] == ["ingest@vqa_rad"] and "validate" in ran_stages(proc.stdout)
    assert "failed validation, above validate.max_bad_fraction=0.0%" in output and "undecodable image" in output
    report = json.loads((repo / "metrics" / "data_report.json").read_text())
    assert report["quarantined"] >= 1
