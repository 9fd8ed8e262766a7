"""The CLIP model in the Serve application: deployment `GalenClip` and the request
handling behind the ingress routes of serve/app.py.

    POST /v1/embed        {"image": b64} or {"text": ...}        -> normalized embedding
    POST /v1/zero-shot    {"image": b64, "labels": [...], "templates"?: [...]} -> probability per label
    POST /v1/retrieve     {"text": ...} -> nearest images, or {"image": b64} -> nearest captions, of the
                          candidates sent ("images" / "texts") or else of the served index (serve.clip_index)
    POST /v1/embeddings   OpenAI-compatible text embeddings ({"input": str | [str], "model": ...})

The ingress (GalenGeneralist) parses bodies with the same limits and JSON errors as every route
(serve/api.py) and hands the checked request to this deployment through a handle. The deployment
holds the version of `serve.clip_model_name` at `serve.clip_alias` (re-read every
`poll_interval_s`; a version is loaded beside the old one, then swapped in). Until one is
registered the routes answer 503 saying so, and the generalist's routes are unaffected.

Batching: every image or text to embed goes through one `@serve.batch` method, so concurrent
requests share one forward pass per tower (max_batch_size / batch_wait_timeout_s of `serve:`).
"""

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from galen.model.errors import GalenCheckpointError, GalenError, GalenInputError
from galen.serve.settings import ServeSettings
from galen.serve.store import ModelRef, download, resolve, resolve_tracking_uri

log = logging.getLogger("ray.serve.galen")


def _error(status: int, type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"status": status, "type": type_, "message": message, "param": param}}


class Loaded:
    def __init__(self, ref: ModelRef, model: Any, index: Any) -> None:
        self.ref, self.model, self.index, self.loaded_at = ref, model, index, time.time()
        self.class_cache: dict[tuple, Any] = {}


@serve.deployment(name="GalenClip", max_ongoing_requests=64, health_check_period_s=10,
                  health_check_timeout_s=30, graceful_shutdown_timeout_s=30, ray_actor_options={"num_cpus": 0.5})
class GalenClip:
    def __init__(self, settings: Mapping[str, Any] | None = None):
        self.settings = ServeSettings().replace(settings)
        self.current: Loaded | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="galen-clip")  # one model call at a time
        self._stop = threading.Event()
        self.stats = {"model_calls": 0, "requests": 0, "largest_batch": 0}
        import torch

        torch.set_num_threads(self.settings.torch_threads)
        self._encode.set_max_batch_size(self.settings.max_batch_size)
        self._encode.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        try:
            self._refresh()
        except Exception as e:  # noqa: BLE001 - no CLIP model yet: answer 503 and keep looking
            self.last_error = f"{type(e).__name__}: {e}"
            log.warning("no CLIP model loaded: %s", self.last_error)
        threading.Thread(target=self._watch, name="galen-clip-watch", daemon=True).start()

    # -- model lifecycle -----------------------------------------------------------------------------
    def _clip_settings(self) -> ServeSettings:
        return self.settings.replace({"model_name": self.settings.clip_model_name, "alias": self.settings.clip_alias})

    def _refresh(self) -> bool:
        from galen.model.clip import ClipModel, RetrievalIndex

        with self._lock:
            settings = self._clip_settings()
            uri = resolve_tracking_uri(settings)
            ref = resolve(settings, uri)
            cur = self.current
            if cur is not None and (cur.ref.name, cur.ref.version) == (ref.name, ref.version):
                return False
            folder, _ = download(ref, settings, uri, marker="open_clip_config.json")
            model = ClipModel.from_pretrained(folder)
            index = None
            if self.settings.clip_index:
                index = RetrievalIndex.load(self.settings.clip_index)
                index.check_model(model)
            model.encode_texts(["warm up"])  # a version that cannot answer never gets traffic
            self.current = Loaded(ref, model, index)
            log.info("serving %s version %s (alias %s)", ref.name, ref.version, ref.alias)
            return True

    def _watch(self) -> None:
        while not self._stop.is_set():
            interval = self.settings.poll_interval_s
            if self._stop.wait(interval if interval > 0 else 1.0) or (interval <= 0 and self.current is not None):
                continue
            try:
                self._refresh()
                self.last_error = None
            except Exception as e:  # noqa: BLE001 - keep serving what is loaded; status shows why
                self.last_error = f"{type(e).__name__}: {e}"

    def __del__(self) -> None:
        self._stop.set()

    async def status(self) -> dict[str, Any]:
        cur = self.current
        return {"status": "ok" if cur else "unavailable", "model": cur.ref.to_dict() if cur else None,
                "last_error": self.last_error, "stats": dict(self.stats),
                "index": len(cur.index.items) if cur and cur.index else None}

    # -- batched embedding ---------------------------------------------------------------------------
    def _embed_batch(self, model: Any, items: list[tuple[str, Any]]) -> list[Any]:
        """One forward pass per tower for a batch of ("image", bytes) / ("text", str) items; when it
        fails, each item alone, so one bad item fails only its own request."""
        self.stats["model_calls"] += 1
        self.stats["requests"] += len(items)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
        out: list[Any] = [None] * len(items)
        for kind in ("image", "text"):
            idx = [i for i, (k, _) in enumerate(items) if k == kind]
            if not idx:
                continue
            encode = model.encode_images if kind == "image" else model.encode_texts
            try:
                rows = encode([items[i][1] for i in idx])
                for i, row in zip(idx, rows):
                    out[i] = row
            except Exception:  # noqa: BLE001 - sorted out per item
                for i in idx:
                    try:
                        out[i] = encode([items[i][1]])[0]
                    except Exception as e:  # noqa: BLE001 - handed to this item's request
                        out[i] = e
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=1)
    async def _encode(self, items: list[tuple[Any, str, Any]]) -> list[Any]:
        model = items[0][0]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._embed_batch, model, [(k, v) for _, k, v in items])

    async def _one(self, cur: Loaded, kind: str, value: Any) -> Any:
        if self.settings.batching:
            result = await self._encode((cur.model, kind, value))
        else:
            loop = asyncio.get_running_loop()
            (result,) = await loop.run_in_executor(self._pool, self._embed_batch, cur.model, [(kind, value)])
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
        cur = self.current
        if cur is None:
            name, alias = self.settings.clip_model_name, self.settings.clip_alias
            return _error(503, "model_unavailable", f"no CLIP model is loaded: {self.last_error or 'loading'}; "
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
                loop = asyncio.get_running_loop()
                classes = await loop.run_in_executor(self._pool, cur.model.class_embeddings, labels, templates)
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

