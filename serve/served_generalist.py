"""The generalist as one GalenGeneralist replica serves it: the registered version at the alias,
loaded as a `GalenPredictor`, and answering one task job with it.

`ServedGeneralist` holds an `AliasFollower` (serve/alias_follower.py: the version the alias points
at, re-read every `poll_interval_s` and at every `reconfigure`, swapped in without downtime) and a
`Batcher` (serve/batching.py: concurrent requests share model calls; `GalenPredictor.predict`
sorts a mixed batch by task). `task(...)` turns a checked request into a job, answers it, and names
the version that produced it; its failures are `ApiError`s (503 no model yet, 504 timeout, 400
unreadable image, 422 invalid input). The routes over it are serve/routes.py.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any

from galen.model.errors import GalenInputError
from galen.serve import api as http
from galen.serve.alias_follower import AliasFollower
from galen.serve.batching import Batcher
from galen.serve.settings import ServeSettings
from galen.serve.store import LoadedModel, load

WARMUP = {"task": "nli", "premise": "the lungs are clear", "hypothesis": "there is no effusion"}
_REQUEST_PREFIX = re.compile(r"^request \d+ \([a-z_]+\): ")


def _warm_up(model: LoadedModel) -> None:
    model.predictor.predict([WARMUP])


def _predict(model: LoadedModel, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return model.predictor.predict(jobs)


class ServedGeneralist:
    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self.base = ServeSettings().replace(settings)  # what user_config is laid over
        self.settings = self.base
        self.batcher: Batcher[LoadedModel, dict[str, Any], dict[str, Any]] = Batcher(
            _predict, self.settings, thread_name="galen-model")
        # The first version loads in `reconfigure`, which Serve calls right after the replica starts
        # with the user_config (`{}` by default), so a replica never loads one version only to switch
        # at once; the thread polls once a version is loaded.
        self.follower: AliasFollower[LoadedModel] = AliasFollower(self.settings, load, _warm_up,
                                                                  thread_name="galen-alias-watch")
        self.follower.start()

    @property
    def current(self) -> LoadedModel | None:
        return self.follower.current

    @property
    def last_error(self) -> str | None:
        return self.follower.last_error

    # -- lifecycle (the deployment's reconfigure, check_health, __del__) ------------------------------

    async def reconfigure(self, user_config: Mapping[str, Any] | None) -> None:
        """The user_config (alias, model, limits) applies to this replica: at start (the first load;
        failing the replica with a clear message when the alias resolves to nothing loadable) and
        whenever it changes (switching in place, in the background of running requests)."""
        settings = self.base.replace(user_config)
        self.batcher.apply(settings)
        self.settings = settings
        await asyncio.get_running_loop().run_in_executor(None, self.follower.follow, settings)

    def check_health(self) -> None:
        self.follower.check_health()  # loads now when deployed with user_config None (no reconfigure call)

    def stop(self) -> None:
        self.follower.stop()

    # -- answering -------------------------------------------------------------------------------------

    def default_labels(self) -> list[str]:
        """The class names of /v1/classify without labels (the version's own, else the setting)."""
        return self.current.default_labels(self.settings.default_labels) if self.current else []

    def token_count(self, text: str) -> int:
        """Tokens of a text under the served version's tokenizer (0 without a model or text)."""
        tokenizer = self.current.predictor.tokenizer if self.current else None
        return len(tokenizer.encode(text)) if tokenizer and text else 0

    def _model(self) -> LoadedModel:
        model = self.current
        if model is None:
            raise http.ApiError(503, "model_unavailable", "no model is loaded yet; retry shortly")
        return model

    async def answer(self, job: dict[str, Any]) -> dict[str, Any]:
        """The predictor's answer to one job, with the version that produced it."""
        model = self._model()
        settings = self.settings
        try:
            result = await asyncio.wait_for(self.batcher.submit(model, job), timeout=settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise http.ApiError(504, "timeout", f"no answer within {settings.request_timeout_s:g} s; the server is "
                                "busy, retry later") from None
        if isinstance(result, GalenInputError):
            raise http.ApiError(422, "invalid_input", _REQUEST_PREFIX.sub("", str(result)))
        if isinstance(result, Exception):
            raise result
        return {**result, "model": model.ref.to_dict()}

    async def decode(self, image: bytes) -> Any:
        model = self._model()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, model.predictor.load_image, image)
        except GalenInputError as e:
            raise http.ApiError(400, "invalid_image", f"the image cannot be read: {e}", "image") from e

    async def task(self, task: str, req: Any, image: bytes | None) -> dict[str, Any]:
        """The answer to a checked task request (serve/api.py) and its image bytes, if any."""
        job = http.job_fields(task, req)
        if task == "classify" and "labels" not in job:
            labels = self.default_labels()
            if not labels:
                raise http.ApiError(422, "invalid_input", "labels are required: this model version has no default "
                                    "label set", "labels")
            job["labels"] = labels
        if image is not None:
            job["image"] = await self.decode(image)
        answer = await self.answer(job)
        answer["task"] = task
        return answer
