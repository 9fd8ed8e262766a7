"""The AliasFollower both deployments share, against the real MLflow registry of the serving tests
(with a stand-in load function, so no model is loaded): it switches when the alias moves, keeps
serving on a failed check, keeps looking while empty only when asked to, and stops its thread."""

from __future__ import annotations

import time
from dataclasses import dataclass

from galen.serve.alias_follower import AliasFollower
from galen.serve.settings import ServeSettings
from galen.serve.store import ModelRef
from tests.serve.conftest import NAME, Registry


@dataclass
class Stand:
    ref: ModelRef


def set_alias(registry: Registry, alias: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=registry.uri, registry_uri=registry.uri).set_registered_model_alias(NAME, alias, version)


def wait_for(condition, seconds: float = 15.0) -> bool:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.05)
    return condition()


def follower(registry: Registry, alias: str, poll_interval_s: float, **kw):
    loads, warmed = [], []

    def load(ref, settings, uri):
        assert uri == registry.uri and settings.alias == ref.alias
        loads.append(ref.version)
        return Stand(ref)

    settings = ServeSettings(tracking_uri=registry.uri, alias=alias, poll_interval_s=poll_interval_s)
    return AliasFollower(settings, load, warmed.append, thread_name="test-alias-watch", **kw), loads, warmed


def test_follows_the_alias_and_keeps_serving_when_a_check_fails(registry):
    set_alias(registry, "follow-a", "1")
    f, loads, warmed = follower(registry, "follow-a", 0.2)
    f.start()
    try:
        time.sleep(0.6)
        assert f.current is None and loads == []  # without poll_while_empty the owner loads the first version
        f.follow(f.settings)
        assert f.current.ref.version == "1" and f.last_error is None
        f.check_health()

        set_alias(registry, "follow-a", "2")  # a promotion: picked up by the thread
        assert wait_for(lambda: f.current.ref.version == "2")
        assert loads == ["1", "2"] and [w.ref.version for w in warmed] == ["1", "2"]  # warmed before serving

        set_alias(registry, "follow-b", "2")
        f.follow(f.settings.replace({"alias": "follow-b"}))  # the same version under another alias
        assert f.current.ref.alias == "follow-b" and loads == ["1", "2"]  # relabelled, not loaded again

        f.follow(f.settings.replace({"alias": "no-such-alias"}))
        assert f.current.ref.version == "2"  # still serving
        assert "no version of 'galen-generalist' has alias 'no-such-alias'" in f.last_error
        assert wait_for(lambda: f.last_error is not None and f.alive)  # the thread keeps checking, and says why
        f.check_health()
    finally:
        f.stop()
    assert wait_for(lambda: not f.alive)


def test_an_empty_follower_keeps_looking_only_when_asked_to(registry):
    f, loads, _ = follower(registry, "follow-later", 0, poll_while_empty=True)
    f.check()  # what GalenClip does at start: no version yet is an error to record, not to raise
    assert f.current is None and "follow-later" in f.last_error
    f.start()
    try:
        set_alias(registry, "follow-later", "1")
        assert wait_for(lambda: f.current is not None)  # poll_interval_s 0: every second while empty
        assert f.current.ref.version == "1" and f.last_error is None
        set_alias(registry, "follow-later", "2")
        time.sleep(2.5)
        assert f.current.ref.version == "1" and loads == ["1"]  # once loaded, poll_interval_s 0 never polls
    finally:
        f.stop()
    assert wait_for(lambda: not f.alive)
