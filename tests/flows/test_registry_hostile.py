"""Hostile input to the registry, on both stores of test_registry (local sqlite, a real `mlflow server`):
numbers that are no finite numbers (NaN, ±inf, missing, strings) in metrics files and MLflow runs, a
metrics file that disagrees with its run, and registry locks left by a killed process or held from
another host. Real MLflow stores and real processes; nothing of MLflow is mocked."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from galen.flows.learn_check import LearnCheckFailed, require_accuracy, required_accuracy
from galen.flows.registry import (
    BOOT_TAG,
    CHALLENGER,
    CHAMPION,
    HOST_TAG,
    INTENT_TAG,
    LOCK_SUFFIX,
    MISSING,
    OWNER_TAG,
    PID_START_TAG,
    PID_TAG,
    PREVIOUS,
    LockHolder,
    MetricRule,
    RegistryConfig,
    aliases,
    compare,
    metric_problem,
    promote,
    register,
    rollback,
    this_process,
)
from galen.flows.tracking import TrainingRun
from galen.model.errors import GalenInputError
from tests.flows.test_registry import PARAMS, REPO, config, new_version, open_store

RULES = [MetricRule("vqa.accuracy", 0.0, 0.5), MetricRule("nli.accuracy", 0.0, 0.3)]
STORED_INF = 1.7976931348623157e308  # what MLflow's sql stores keep for +inf


@pytest.fixture(scope="module", params=["sqlite", "server"])
def store(request, tmp_path_factory):
    """(uri, folder): the local sqlite store, then a real `mlflow server` on S3 (as in test_registry)."""
    with open_store(request.param, tmp_path_factory) as opened:
        yield opened


def versions(uri: str, name: str) -> list[str]:
    return sorted(str(v.version) for v in MlflowClient(uri, uri).search_model_versions(f"name='{name}'"))


def eval_run(uri: str, metrics: dict[str, float]) -> str:
    """An evaluation run holding `metrics` (as `galen evaluate` leaves one), NaN and inf logged as is."""
    run = TrainingRun.start_or_resume("galen-evaluate", "eval", None, {}, {}, uri=uri, system_metrics=False)
    run.log_metrics(metrics, step=0)
    run.end()
    return run.run_id


def relog(uri: str, run_id: str, metrics: dict[str, float]) -> None:
    """A later evaluation into the same run (step 1: these become the run's current values)."""
    TrainingRun.attach(run_id, uri).log_metrics(metrics, step=1)


def no_locks(uri: str) -> bool:
    return all(not m.name.endswith(LOCK_SUFFIX) for m in MlflowClient(uri, uri).search_registered_models())


# --------------------------------------------------------------------------------------------------
# Numbers, without a store
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "words"), [
    (math.nan, "NaN, not a number"), (math.inf, "inf, not a finite number"), (-math.inf, "-inf, not a finite number"),
    (STORED_INF, "(MLflow's store for inf), not a finite number"),
    (-STORED_INF, "(MLflow's store for -inf), not a finite number"),
    (MISSING, "missing"), (None, "null, not a number"), ("0.9", "'0.9', not a number"), (True, "True, not a number"),
    ([0.9], "[0.9], not a number")])
def test_every_non_finite_value_is_a_problem_with_its_value_named(value, words):
    assert words in metric_problem(value)


@pytest.mark.parametrize("value", [0, 0.0, 0.5, 1, -0.25, 1e300])
def test_finite_numbers_are_fine(value):
    assert metric_problem(value) is None


@pytest.mark.parametrize(("value", "words"), [(math.nan, "vqa.accuracy is NaN"), (math.inf, "vqa.accuracy is inf"),
                                              (STORED_INF, "vqa.accuracy is 1.7976931348623157e+308"),
                                              (MISSING, "vqa.accuracy is missing"), ("high", "vqa.accuracy is 'high'")])
def test_a_non_finite_candidate_falls_short_against_a_champion_and_against_the_floors(value, words):
    candidate = {"nli.accuracy": 0.9} if value is MISSING else {"vqa.accuracy": value, "nli.accuracy": 0.9}
    for champion, version in (({"vqa.accuracy": 0.6, "nli.accuracy": 0.5}, "1"), (None, None)):
        short = compare(RULES, candidate, champion, version)
        assert [s.metric for s in short] == ["vqa.accuracy"], short
        assert words in str(short[0]) and short[0].gap == math.inf


def test_a_non_finite_champion_metric_counts_as_failing_so_the_floor_applies():
    for bad in (math.nan, math.inf, STORED_INF, "x", None):
        champion = {"vqa.accuracy": bad, "nli.accuracy": 0.6}
        assert compare(RULES, {"vqa.accuracy": 0.55, "nli.accuracy": 0.6}, champion, "1") == []    # floor 0.5 met
        short = compare(RULES, {"vqa.accuracy": 0.45, "nli.accuracy": 0.7}, champion, "1")
        assert [(s.metric, s.required) for s in short] == [("vqa.accuracy", 0.5)]
        assert "floor 0.5 (the champion's value is" in str(short[0]) and "counts as failing" in str(short[0])
        # its finite metrics still count: nli must reach the champion's 0.6
        assert [s.metric for s in compare(RULES, {"vqa.accuracy": 0.9, "nli.accuracy": 0.5}, champion, "1")] == \
            ["nli.accuracy"]


@pytest.mark.parametrize(("rule", "message"), [({"floor": float("nan")}, "floor is nan"),
                                               ({"floor": float("inf")}, "floor is inf"),
                                               ({"min_improvement": float("nan")}, "min_improvement is nan"),
                                               ({"min_improvement": float("inf")}, "min_improvement is inf")])
def test_non_finite_floors_and_improvements_are_refused(rule, message):
    with pytest.raises(GalenInputError, match=f"registry.metrics.a.{message}; it must be a finite number"):
        RegistryConfig.from_params({"registry": {"metrics": {"a": rule}}})


@pytest.mark.parametrize(("accuracy", "words"), [(math.nan, "accuracy is nan"), (math.inf, "accuracy is inf"),
                                                 (None, "accuracy is None"), ("1.0", "accuracy is '1.0'"),
                                                 (0.9375, "reached 93.8% < required 100.0%")])
def test_the_learn_check_gate_fails_non_finite_and_low_accuracy(accuracy, words):
    with pytest.raises(LearnCheckFailed, match=words):
        require_accuracy(accuracy, 1.0)


def test_the_learn_check_gate_refuses_a_non_finite_requirement_and_passes_a_good_accuracy():
    for required in (math.nan, math.inf, -0.1, 1.5, None, "1.0"):
        with pytest.raises(GalenInputError, match="require_accuracy is .*finite number in \\[0, 1\\]"):
            require_accuracy(1.0, required)
        with pytest.raises(GalenInputError, match="require_accuracy is .*finite number in \\[0, 1\\]"):
            required_accuracy(required)
    assert required_accuracy(1) == 1.0
    require_accuracy(1.0, 1.0)
    require_accuracy(0.5, 0.5)


# --------------------------------------------------------------------------------------------------
# Numbers in metrics files and MLflow runs, on both stores
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("vqa", "words"), [
    ("NaN", "vqa.accuracy is NaN, not a number"), ("Infinity", "vqa.accuracy is inf, not a finite number"),
    ("-Infinity", "vqa.accuracy is -inf, not a finite number"), ('"0.9"', "vqa.accuracy is '0.9', not a number"),
    ("null", "vqa.accuracy is null, not a number")])
def test_a_non_finite_metric_in_the_metrics_file_is_refused(store, demo_model_dir, vqa, words):
    uri, folder = store
    cfg = config(f"file-{vqa.strip(chr(34)).lower()}")
    metrics = folder / f"{cfg.model_name}.json"
    metrics.write_text('{"vqa": {"accuracy": ' + vqa + ', "count": 10}, "nli": {"accuracy": 0.9}}')
    with pytest.raises(GalenInputError, match=f"metrics file .*{metrics.name}: {words}"):
        register(demo_model_dir, cfg, PARAMS, metrics_file=metrics, uri=uri, project=REPO)
    assert versions(uri, cfg.model_name) == []                            # nothing registered, so no champion


def test_a_missing_metric_in_the_metrics_file_never_makes_a_champion(store, demo_model_dir):
    uri, folder = store
    cfg = config("file-missing")
    metrics = folder / "vqa_missing.json"
    metrics.write_text(json.dumps({"vqa": {"count": 10}, "nli": {"accuracy": 0.9}}))
    version = register(demo_model_dir, cfg, PARAMS, metrics_file=metrics, uri=uri, project=REPO).version
    with pytest.raises(GalenInputError, match=f"run .* of version {version} .* has no metric vqa.accuracy"):
        promote(cfg, version=version, uri=uri)
    assert aliases(cfg, uri) == {}


@pytest.mark.parametrize(("value", "words"), [(math.nan, "vqa.accuracy is NaN"),
                                              (math.inf, "vqa.accuracy is (inf|1.797.*e\\+308)"),
                                              (-math.inf, "vqa.accuracy is (-inf|-1.797.*e\\+308)")])
def test_a_non_finite_metric_in_the_mlflow_run_is_refused_by_register_and_promote(store, demo_model_dir, value,
                                                                                   words):
    uri, folder = store
    cfg = config(f"run-{value}")
    run_id = eval_run(uri, {"vqa.accuracy": value, "nli.accuracy": 0.9})
    with pytest.raises(GalenInputError, match=f"run {run_id}: {words}"):
        register(demo_model_dir, cfg, PARAMS, run_id=run_id, uri=uri, project=REPO)
    assert versions(uri, cfg.model_name) == []
    # registered from good numbers, then evaluated again into the same run with this result: never promoted
    good = eval_run(uri, {"vqa.accuracy": 0.9, "nli.accuracy": 0.9})
    version = register(demo_model_dir, cfg, PARAMS, run_id=good, uri=uri, project=REPO).version
    relog(uri, good, {"vqa.accuracy": value})
    with pytest.raises(GalenInputError, match=f"run {good} of version {version} .*: {words}.*cannot be promoted"):
        promote(cfg, version=version, uri=uri)
    assert aliases(cfg, uri) == {} and no_locks(uri)


def test_a_champion_with_nan_and_inf_metrics_gives_way_to_a_finite_candidate(store, demo_model_dir):
    """The champion's run holds NaN and inf (evaluated again after its promotion, or promoted by an
    older Galen): each of those metrics counts as failing, so a candidate must reach their floors."""
    uri, folder = store
    cfg = config("nan-champion")
    client = MlflowClient(uri, uri)
    v1 = new_version(uri, demo_model_dir, folder, cfg, vqa=0.9, nli=0.9)
    assert promote(cfg, version=v1, uri=uri).promoted
    relog(uri, client.get_model_version(cfg.model_name, v1).run_id, {"vqa.accuracy": math.nan,
                                                                      "nli.accuracy": math.inf})
    below = new_version(uri, demo_model_dir, folder, cfg, vqa=0.45, nli=0.35)  # below the vqa floor 0.5
    decision = promote(cfg, version=below, uri=uri)
    assert not decision.promoted
    assert "vqa.accuracy = 0.4500 is 0.0500 short of the required 0.5000 (floor 0.5 (the champion's value is NaN" \
        in decision.message
    assert aliases(cfg, uri) == {CHAMPION: v1, CHALLENGER: below}
    good = new_version(uri, demo_model_dir, folder, cfg, vqa=0.55, nli=0.35)   # meets both floors
    decision = promote(cfg, version=good, uri=uri)
    assert decision.promoted and decision.champion_before == v1, decision.message
    assert aliases(cfg, uri) == {CHAMPION: good, PREVIOUS: v1, CHALLENGER: below}
    worse = new_version(uri, demo_model_dir, folder, cfg, vqa=0.52, nli=0.9)   # the new champion's numbers count
    assert not promote(cfg, version=worse, uri=uri).promoted
    assert aliases(cfg, uri)[CHAMPION] == good and no_locks(uri)


def test_a_metrics_file_disagreeing_with_its_run_is_refused(store, demo_model_dir):
    uri, folder = store
    cfg = config("disagree")
    run_id = eval_run(uri, {"vqa.accuracy": 0.6, "vqa.count": 10, "nli.accuracy": 0.5})
    edited = folder / "edited.json"
    edited.write_text(json.dumps({"run_id": run_id, "vqa": {"accuracy": 0.9, "count": 10}, "nli": {"accuracy": 0.5}}))
    with pytest.raises(GalenInputError, match=f"metrics file .*edited.json disagrees with its evaluation run {run_id}: "
                                              "vqa.accuracy is 0.9 in the file, 0.6 in the run"):
        register(demo_model_dir, cfg, PARAMS, metrics_file=edited, uri=uri, project=REPO)
    extra = folder / "extra.json"
    extra.write_text(json.dumps({"run_id": run_id, "vqa": {"accuracy": 0.6, "count": 10},
                                 "nli": {"accuracy": 0.5}, "caption": {"cider": 2.5}}))
    with pytest.raises(GalenInputError, match="caption.cider is 2.5 in the file, absent from the run"):
        register(demo_model_dir, cfg, PARAMS, metrics_file=extra, uri=uri, project=REPO)
    other = eval_run(uri, {"vqa.accuracy": 0.6, "vqa.count": 10, "nli.accuracy": 0.5})
    honest = folder / "honest.json"
    honest.write_text(json.dumps({"run_id": run_id, "vqa": {"accuracy": 0.6, "count": 10}, "nli": {"accuracy": 0.5}}))
    with pytest.raises(GalenInputError, match=f"names run {run_id}, but run {other} was given"):
        register(demo_model_dir, cfg, PARAMS, metrics_file=honest, run_id=other, uri=uri, project=REPO)
    assert versions(uri, cfg.model_name) == []
    reg = register(demo_model_dir, cfg, PARAMS, metrics_file=honest, uri=uri, project=REPO)  # agreeing: registered
    assert reg.run_id == run_id and versions(uri, cfg.model_name) == [reg.version]


# --------------------------------------------------------------------------------------------------
# Recovery: registry locks of dead holders
# --------------------------------------------------------------------------------------------------

# A real promotion in its own process that dies (SIGKILL, from the test) while holding the lock: it
# wrote its plan on the lock and moved the first alias of it, then stops before the rest.
HOLD_AND_WAIT = """
import sys, time
import galen.flows.registry as registry
from tests.flows.test_registry import config

real = registry.apply_aliases

def first_then_wait(client, name, changes):
    alias, version = next(iter(changes.items()))
    real(client, name, {alias: version})
    print("HOLDING", flush=True)
    time.sleep(600)

registry.apply_aliases = first_then_wait
registry.promote(config(sys.argv[2]), version=sys.argv[3], uri=sys.argv[1])
"""


def start_holder(uri: str, name: str, version: str, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", HOLD_AND_WAIT, uri, name, version], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=out)
    return proc


def wait_for_holding(proc: subprocess.Popen, log: Path) -> None:
    line = proc.stdout.readline()               # blocks until the lock is held (or the process ends)
    assert line.strip() == b"HOLDING", f"the holder exited with {proc.poll()}:\n{log.read_text()[-3000:]}"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("then", ["rollback", "promote"])
def test_a_lock_of_a_killed_promotion_is_broken_at_once(store, demo_model_dir, tmp_path, then):
    uri, folder = store
    cfg = config(f"killed-{then}")
    client = MlflowClient(uri, uri)
    v1 = new_version(uri, demo_model_dir, folder, cfg, vqa=0.6, nli=0.5)
    v2 = new_version(uri, demo_model_dir, folder, cfg, vqa=0.7, nli=0.5)
    assert promote(cfg, version=v1, uri=uri).promoted
    log = tmp_path / "holder.log"
    proc = start_holder(uri, cfg.model_name, v2, log)
    try:
        wait_for_holding(proc, log)
        lock = client.get_registered_model(cfg.model_name + LOCK_SUFFIX)
        assert lock.tags[PID_TAG] == str(proc.pid) and lock.tags[HOST_TAG] == this_process()[HOST_TAG]
        assert json.loads(lock.tags[INTENT_TAG]) == {PREVIOUS: v1, CHAMPION: v2}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop(proc)
    assert aliases(cfg, uri) == {CHAMPION: v1, PREVIOUS: v1}             # half-applied by the dead promotion
    cfg.lock_timeout_s = 20.0                    # waiting for the lock would fail after 20 s; it goes stale after 900 s
    assert cfg.lock_stale_s == 900.0
    if then == "rollback":
        assert rollback(cfg, uri=uri).version == v1      # its plan was completed first (v2 champion), then undone
        assert aliases(cfg, uri) == {CHAMPION: v1, PREVIOUS: v2}
    else:
        assert "already" in promote(cfg, version=v2, uri=uri).message    # its plan was completed
        assert aliases(cfg, uri) == {CHAMPION: v2, PREVIOUS: v1}
    assert no_locks(uri)


def foreign_lock(client: MlflowClient, name: str, plan: dict[str, str] | None = None, **tags: str) -> None:
    """A lock held by a promotion on another machine (`build-7`, pid 4242), with its plan if given."""
    tags = {OWNER_TAG: "build-7:4242:0f0f0f0f", HOST_TAG: "build-7", PID_TAG: "4242", **tags}
    if plan is not None:
        tags[INTENT_TAG] = json.dumps(plan)
    client.create_registered_model(name + LOCK_SUFFIX, tags=tags)


def test_a_lock_from_another_host_is_refused_with_the_break_lock_hint_and_broken_with_break_lock(
        store, demo_model_dir):
    uri, folder = store
    cfg = config("foreign")
    cfg.lock_timeout_s = 1.0
    client = MlflowClient(uri, uri)
    v1 = new_version(uri, demo_model_dir, folder, cfg, vqa=0.6, nli=0.5)
    v2 = new_version(uri, demo_model_dir, folder, cfg, vqa=0.7, nli=0.5)
    assert promote(cfg, version=v1, uri=uri).promoted and promote(cfg, version=v2, uri=uri).promoted
    before = {CHAMPION: v2, PREVIOUS: v1}

    foreign_lock(client, cfg.model_name)                                  # died (or runs) there; no plan yet
    hint = "pid 4242 on host build-7.*cannot check. If that process is gone, pass --break-lock"
    with pytest.raises(GalenInputError, match=hint):
        rollback(cfg, uri=uri)
    with pytest.raises(GalenInputError, match=hint):
        promote(cfg, version=v1, uri=uri)
    assert aliases(cfg, uri) == before and not no_locks(uri)              # nothing moved, the lock is still there
    decision = rollback(cfg, uri=uri, break_lock=True)
    assert decision.version == v1 and aliases(cfg, uri) == {CHAMPION: v1, PREVIOUS: v2} and no_locks(uri)

    # a promotion of v2 there wrote its plan and died: breaking the lock completes it first
    foreign_lock(client, cfg.model_name, {PREVIOUS: v1, CHAMPION: v2})
    with pytest.raises(GalenInputError, match=hint):
        promote(cfg, version=v2, uri=uri)
    assert "already" in promote(cfg, version=v2, uri=uri, break_lock=True).message
    assert aliases(cfg, uri) == before and no_locks(uri)

    # same host name, another boot (another machine, or rebooted): not checkable either
    if this_process().get(BOOT_TAG):
        foreign_lock(client, cfg.model_name, **{HOST_TAG: this_process()[HOST_TAG], PID_TAG: "4242",
                                                BOOT_TAG: "00000000-0000-0000-0000-000000000000"})
        with pytest.raises(GalenInputError, match="--break-lock"):
            rollback(cfg, uri=uri)
        client.delete_registered_model(cfg.model_name + LOCK_SUFFIX)

    # --break-lock never breaks the lock of a process that runs on this machine (here: this test)
    client.create_registered_model(cfg.model_name + LOCK_SUFFIX, tags={OWNER_TAG: "live", **this_process()})
    try:
        with pytest.raises(GalenInputError, match=f"runs on this machine; wait for it to finish \\(or stop pid "
                                                  f"{os.getpid()}\\)"):
            rollback(cfg, uri=uri, break_lock=True)
        assert aliases(cfg, uri) == before
    finally:
        client.delete_registered_model(cfg.model_name + LOCK_SUFFIX)


# --------------------------------------------------------------------------------------------------
# Who holds a lock (real processes, no store)
# --------------------------------------------------------------------------------------------------

def unstarted(tags: dict[str, str]) -> dict[str, str]:
    """Lock tags without a start time (as on a system without /proc, or written by an older Galen)."""
    return {k: v for k, v in tags.items() if k != PID_START_TAG}


def test_a_holder_is_checked_by_pid_start_time_boot_id_and_host():
    me = LockHolder.from_tags(this_process())
    assert me.on_this_machine() and me.running()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)                                                # gone (and reaped)
    gone = LockHolder.from_tags({**unstarted(this_process()), PID_TAG: str(child.pid)})
    assert gone.on_this_machine() and not gone.running()
    if this_process().get(PID_START_TAG):                                # Linux: a reused pid is not the holder
        reused = LockHolder.from_tags({**this_process(), PID_START_TAG: "1"})
        assert not reused.running()
    assert not LockHolder.from_tags({**this_process(), HOST_TAG: "build-7"}).on_this_machine()
    if this_process().get(BOOT_TAG):
        assert not LockHolder.from_tags({**this_process(), BOOT_TAG: "another-boot"}).on_this_machine()
    legacy = LockHolder.from_tags({OWNER_TAG: f"{this_process()[HOST_TAG]}:{child.pid}:abcdef12"})  # older Galen
    assert (legacy.host, legacy.pid) == (this_process()[HOST_TAG], child.pid) and not legacy.running()
    for pid in ("0", "-1", "x"):                                         # never signal a process group
        assert not LockHolder.from_tags({HOST_TAG: this_process()[HOST_TAG], PID_TAG: pid}).on_this_machine()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="process states come from Linux /proc")
def test_a_zombie_holder_is_gone():
    """Killed but not yet reaped by its parent: /proc still lists the pid, as a zombie."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        child.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "Z" not in Path(f"/proc/{child.pid}/stat").read_text().split(")")[-1][:3]:
            time.sleep(0.05)
        assert Path(f"/proc/{child.pid}").exists()                     # the pid is still there
        assert not LockHolder.from_tags({**unstarted(this_process()), PID_TAG: str(child.pid)}).running()
    finally:
        child.kill()
        child.wait(timeout=30)
