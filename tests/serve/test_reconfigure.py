"""A replica's model lifecycle without Ray: the first load in `reconfigure`, switching when the
user_config names another alias (relabelling when it names the same version), a bad user_config
that leaves the loaded version serving, and the alias thread ending with the replica."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.serve.conftest import NAME, Registry


@pytest.fixture
def replica_class():
    from galen.serve.app import GalenGeneralist

    # the user class under Serve's ingress wrapper (which needs a running replica)
    return next(c for c in GalenGeneralist.func_or_class.__mro__ if c.__name__ == "GalenGeneralist"
                and c is not GalenGeneralist.func_or_class)


def set_alias(registry: Registry, alias: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=registry.uri, registry_uri=registry.uri).set_registered_model_alias(NAME, alias, version)


def test_reconfigure_loads_switches_and_keeps_serving_on_a_bad_alias(registry, replica_class, tmp_path):
    set_alias(registry, "canary", "1")
    replica = replica_class({"tracking_uri": registry.uri, "poll_interval_s": 0, "model_cache": str(tmp_path)})
    served = replica.generalist
    try:
        assert served.current is None
        asyncio.run(replica.reconfigure({"alias": "canary"}))
        assert (served.current.ref.version, served.current.ref.alias) == ("1", "canary")
        replica.check_health()

        set_alias(registry, "canary", "2")
        first = served.current
        asyncio.run(replica.reconfigure({"alias": "canary", "max_batch_size": 4}))  # a changed user_config
        assert served.current.ref.version == "2" and served.settings.max_batch_size == 4
        assert served.batcher.settings.max_batch_size == 4  # the batch size applied too
        assert first.ref.version == "1" and first.predictor is not served.current.predictor  # the old one untouched

        set_alias(registry, "other", "2")
        second = served.current
        asyncio.run(replica.reconfigure({"alias": "other"}))  # another alias, the same version: relabelled only
        assert (served.current.ref.version, served.current.ref.alias) == ("2", "other")
        assert served.current.predictor is second.predictor  # not loaded again

        asyncio.run(replica.reconfigure({"alias": "no-such-alias"}))
        assert served.current.ref.version == "2"  # still serving
        assert "no version of 'galen-generalist' has alias 'no-such-alias'" in served.last_error
        replica.check_health()
    finally:
        replica.__del__()  # what Serve calls when the replica stops: the alias thread ends
    deadline = time.time() + 10
    while served.follower.alive and time.time() < deadline:
        time.sleep(0.05)
    assert not served.follower.alive


def test_first_load_fails_the_replica_with_a_clear_message(registry, replica_class, tmp_path):
    replica = replica_class({"tracking_uri": registry.uri, "poll_interval_s": 0, "model_cache": str(tmp_path)})
    try:
        with pytest.raises(Exception, match="no version of 'galen-generalist' has alias 'nope'.*galen register"):
            asyncio.run(replica.reconfigure({"alias": "nope"}))
        assert replica.generalist.current is None
    finally:
        replica.__del__()
