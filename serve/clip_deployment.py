"""The CLIP model in the Serve application: deployment `GalenClip` and the request
handling behind the ingress routes of serve/routes.py.

    POST /v1/embed        {"image": b64} or {"text": ...}        -> normalized embedding
    POST /v1/zero-shot    {"image": b64, "labels": [...], "templates"?: [...]} -> probability per label
    POST /v1/retrieve     {"text": ...} -> nearest images, or {"image": b64} -> nearest captions, of the
                          candidates sent ("images" / "texts") or else of the served index (serve.clip_index)
    POST /v1/embeddings   OpenAI-compatible text embeddings ({"input": str | [str], "model": ...})

The ingress (GalenGeneralist, serve/routes.py) parses bodies with the same limits and JSON errors as every route
(serve/api.py) and hands the checked request to this deployment through a handle. The deployment
holds the version of `serve.clip_model_name` at `serve.clip_alias` (re-read every
`poll_interval_s`; a version is loaded beside the old one, then swapped in). Until one is
registered the routes answer 503 saying so, the replica keeps looking, and the generalist's routes
are unaffected.

Alias following and batching are the generalist's (serve/alias_follower.py, serve/batching.py):
every image or text to embed is one job of the `Batcher`, so concurrent requests share one forward
pass per tower (max_batch_size / batch_wait_timeout_s of `serve:`).
"""

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from galen.model.errors import GalenCheckpointError, GalenError, GalenInputError
from galen.serve.alias_follower import AliasFollower
from galen.serve.batching import Batcher
from galen.serve.settings import ServeSettings
from galen.serve.store import ModelRef, download

log = logging.getLogger("ray.serve.galen")

STATUS_STATS = ("model_calls", "requests", "largest_batch")  # the batching counters /v1/contrastive/status shows


def _error(status: int, type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"status": status, "type": type_, "message": message, "param": param}}


@dataclass
class Loaded:
    ref: ModelRef
    model: Any  # galen.model.clip.ClipModel
    index: Any  # galen.model.clip.RetrievalIndex or None
    loaded_at: float = field(default_factory=time.time)
    class_cache: dict[tuple, Any] = field(default_factory=dict)  # (labels, templates) -> class embeddings


def load(ref: ModelRef, settings: ServeSettings, uri: str) -> Loaded:
    """Download and load one registered CLIP version, with the served index checked against it."""
    from galen.model.clip import ClipModel, RetrievalIndex

    folder, _ = download(ref, settings, uri, marker="open_clip_config.json")
    model = ClipModel.from_pretrained(folder)
    index = None
    if settings.clip_index:
        index = RetrievalIndex.load(settings.clip_index)
        index.check_model(model)
    return Loaded(ref, model, index)


def _warm_up(loaded: Loaded) -> None:
    loaded.model.encode_texts(["warm up"])


def encode(model: Any, items: list[tuple[str, Any]]) -> list[Any]:
    """One forward pass per tower for a batch of ("image", bytes) / ("text", str) items (the
    Batcher runs each item alone when it fails, so one bad item fails only its own request)."""
    out: list[Any] = [None] * len(items)
    for kind in ("image", "text"):
        idx = [i for i, (k, _) in enumerate(items) if k == kind]
        if idx:
            rows = (model.encode_images if kind == "image" else model.encode_texts)([items[i][1] for i in idx])
            for i, row in zip(idx, rows):
                out[i] = row
    return out


@serve.deployment(name="GalenClip", max_ongoing_requests=64, health_check_period_s=10,
                  health_check_timeout_s=30, graceful_shutdown_timeout_s=30, ray_actor_options={"num_cpus": 0.5})
class GalenClip:
    def __init__(self, settings: Mapping[str, Any] | None = None):
        self.settings = ServeSettings().replace(settings)
        self.batcher: Batcher[Any, tuple[str, Any], Any] = Batcher(encode, self.settings, thread_name="galen-clip")
        clip = self.settings.replace({"model_name": self.settings.clip_model_name, "alias": self.settings.clip_alias})
        self.follower: AliasFollower[Loaded] = AliasFollower(clip, load, _warm_up, thread_name="galen-clip-watch",
                                                             poll_while_empty=True)
        self.follower.check()
        if self.follower.current is None:  # no CLIP model yet: answer 503 and keep looking
            log.warning("no CLIP model loaded: %s", self.follower.last_error)
        self.follower.start()

    def __del__(self) -> None:
        self.follower.stop()

    async def status(self) -> dict[str, Any]:
        cur = self.follower.current
        return {"status": "ok" if cur else "unavailable", "model": cur.ref.to_dict() if cur else None,
                "last_error": self.follower.last_error, "stats": {k: self.batcher.stats[k] for k in STATUS_STATS},
                "index": len(cur.index.items) if cur and cur.index else None}

    # -- batched embedding ---------------------------------------------------------------------------
    async def _one(self, cur: Loaded, kind: str, value: Any) -> Any:
        result = await self.batcher.submit(cur.model, (kind, value))
        if isinstance(result, Exception):
            raise result
        return result

    async def _call(self, coro) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(coro, timeout=self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            return _error(504, "timeout", f"no answer within {self.settings.request_timeout_s:g} s; retry later")
        except GalenInputError as e:
            message = str(e)
            if "image" in message and ("decoded" in message or "corrupt" in message or "empty" in message):
                return _error(400, "invalid_image", f"the image cannot be read: {message}", "image")
            return _error(422, "invalid_input", message)
        except GalenError as e:
            return _error(422, "invalid_input", str(e))

    def _loaded(self) -> Loaded | dict[str, Any]:
        cur = self.follower.current
        if cur is None:
            name, alias = self.settings.clip_model_name, self.settings.clip_alias
            return _error(503, "model_unavailable", f"no CLIP model is loaded: {self.follower.last_error or 'loading'}; "
                          f"register one as {name!r} with alias {alias!r} (galen clip register --promote)")
        return cur

    # -- requests (called through the ingress's handle; fields already parsed and size-checked) -----
    async def embed(self, job: dict[str, Any]) -> dict[str, Any]:
        cur = self._loaded()
        if isinstance(cur, dict):
            return cur

        async def run():
            kind = "image" if job.get("image") is not None else "text"
            vec = await self._one(cur, kind, job[kind])
            out = {"input": kind, "embedding": vec.tolist(), "dim": int(vec.shape[0])}
            if kind == "text":
                out["truncated"] = _truncated(cur.model, job["text"])
            return out

        return self._named(cur, await self._call(run()))

    async def zero_shot(self, job: dict[str, Any]) -> dict[str, Any]:
        from galen.model.clip import DEFAULT_TEMPLATES

        cur = self._loaded()
        if isinstance(cur, dict):
            return cur

        async def run():
            labels, templates = job["labels"], tuple(job.get("templates") or DEFAULT_TEMPLATES)
            key = (tuple(labels), templates)
            classes = cur.class_cache.get(key)
            if classes is None:
                classes = await self.batcher.call(cur.model.class_embeddings, labels, templates)
                if len(cur.class_cache) > 256:
                    cur.class_cache.clear()
                cur.class_cache[key] = classes
            vec = await self._one(cur, "image", job["image"])
            probs = cur.model.zero_shot(vec[None], classes)[0]
            scores = dict(zip(labels, (float(p) for p in probs)))
            return {"label": max(scores, key=scores.get), "scores": scores}

        return self._named(cur, await self._call(run()))

    async def retrieve(self, job: dict[str, Any]) -> dict[str, Any]:
        import torch

        from galen.model.clip import rank

        cur = self._loaded()
        if isinstance(cur, dict):
            return cur
        query_kind = "image" if job.get("image") is not None else "text"
        target = "texts" if query_kind == "image" else "images"
        candidates = job.get(target)
        if candidates is None and cur.index is None:
            return _error(422, "no_index", f"send the {target} to rank as '{target}', or serve an index "
                          "(`galen clip index`, then serve setting clip_index)", target)

        async def run():
            query = await self._one(cur, query_kind, job[query_kind])
            k = job.get("top_k") or 5
            if candidates is not None:
                kind = "image" if target == "images" else "text"
                embedded = await asyncio.gather(*(self._one(cur, kind, c) for c in candidates))
                results = [{"index": i, "score": s} for i, s in rank(query, torch.stack(embedded), k)]
            else:
                hits = cur.index.search(query[None], target, k)[0]
                results = [{"index": i, "score": s, "item": cur.index.items[i]} for i, s in hits]
            return {"query": query_kind, "target": target, "results": results}

        return self._named(cur, await self._call(run()))

    async def embeddings(self, texts: list[str]) -> dict[str, Any]:
        cur = self._loaded()
        if isinstance(cur, dict):
            return cur

        async def run():
            vecs = await asyncio.gather(*(self._one(cur, "text", t) for t in texts))
            enc = cur.model.text_encoder
            tokens = sum(min(enc.token_count(t), enc.context_length) for t in texts)
            return {"vectors": [v.tolist() for v in vecs], "tokens": tokens}

        return self._named(cur, await self._call(run()))

    @staticmethod
    def _named(cur: Loaded, answer: dict[str, Any]) -> dict[str, Any]:
        return answer if "error" in answer else {**answer, "model": cur.ref.to_dict()}


def _truncated(model: Any, text: str) -> bool:
    """Whether the text was longer than the model's context (it was cut, as CLIP text towers do)."""
    return model.text_encoder.token_count(text) > model.text_encoder.context_length


def bind(settings: ServeSettings, options: Mapping[str, Any] | None = None) -> Any:
    """The bound deployment, or None when the CLIP model is switched off (clip_model_name null)."""
    if settings.clip_model_name is None:
        return None
    return GalenClip.options(**dict(options or {})).bind(settings.to_dict())


def check_index_compatible(settings: ServeSettings) -> None:
    """A configured index must be readable before deploying (a bad path fails `galen serve` at once)."""
    if settings.clip_index:
        from galen.model.clip import RetrievalIndex

        try:
            RetrievalIndex.load(settings.clip_index)
        except GalenCheckpointError as e:
            raise GalenInputError(f"serve setting clip_index: {e}") from e

