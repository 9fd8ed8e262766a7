"""The Ray Serve application: one deployment, `GalenGeneralist`, serving the registered generalist.

Each replica holds the version that the MLflow alias (default `champion`) points at, as a
`GalenPredictor`, and answers through FastAPI (routes below, schemas and errors in serve/api.py):

    POST /v1/vqa /v1/caption /v1/classify /v1/ground /v1/nli /v1/summarize   JSON or multipart
    POST /v1/chat/completions                                                 OpenAI-compatible (serve/chat.py)
    GET  /v1/models   GET /health   GET / (web page)   GET /docs (OpenAPI)

Throughput: concurrent requests are batched: `@serve.batch` groups requests that arrive together,
and whenever the model is free one call answers every group waiting (up to `max_batch_size`;
`GalenPredictor.predict` sorts a mixed batch by task). Model work runs on one thread per replica,
so the event loop stays free for parsing, health checks and the next batch; a request that fails
in a batch fails alone. Replicas scale out with Serve autoscaling.

Promotion without downtime: every replica re-reads the alias every `poll_interval_s` seconds
(and at once when `user_config` changes through `reconfigure`); a new version is downloaded and
loaded beside the old one in a background thread, warmed up, then swapped in with one
assignment. A batch takes the model it starts with, so requests in flight finish on the old
version, and every answer names the version that produced it.

Entry points: `build_app(args)` (the Serve config's import path `galen.serve.app:build_app`, for `serve
run serve/config.yaml`, `serve deploy`, the KubeRay RayService), and `run_local` (`galen serve`).
"""

# No `from __future__ import annotations` here: Ray's class-based FastAPI view needs real annotations
# on the route methods (a string "Request" would become a query parameter).
import asyncio
import logging
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from galen.model.errors import GalenInputError
from galen.serve import api as http
from galen.serve import chat
from galen.serve.settings import ServeSettings
from galen.serve.store import LoadedModel, ModelUnavailable, load, resolve, resolve_tracking_uri

log = logging.getLogger("ray.serve.galen")  # under ray.serve: into the replica logs

DEFAULT_CONFIG = Path(__file__).parent / "config.yaml"
WARMUP = {"task": "nli", "premise": "the lungs are clear", "hypothesis": "there is no effusion"}
_REQUEST_PREFIX = re.compile(r"^request \d+ \([a-z_]+\): ")

app = http.create_app(extra_schemas=[chat.ChatRequest, *http.CLIP_ROUTES.values()])


def _chat_body() -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ChatRequest"}}}}}


@serve.deployment(name="GalenGeneralist", user_config={}, max_ongoing_requests=64, health_check_period_s=10,
                  health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
@serve.ingress(app)
class GalenGeneralist:
    def __init__(self, settings: Mapping[str, Any] | None = None, clip: Any = None):
        self.clip = clip  # handle of the GalenClip deployment (serve/clip_deployment.py), or None
        self.base = ServeSettings().replace(settings)
        self.settings = self.base
        self.current: LoadedModel | None = None
        self.last_error: str | None = None
        self._uri: str | None = None
        self._load_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="galen-model")  # one model call at a time
        self._queue: deque[tuple[list[dict[str, Any]], asyncio.Future]] = deque()  # groups waiting for the model
        self._drainer: asyncio.Task | None = None
        self._stop = threading.Event()
        # batching at work, shown in /health
        self.stats = {"model_calls": 0, "requests": 0, "largest_batch": 0, "model_ms": 0}
        self._apply(self.settings)
        # The model loads in `reconfigure`, which Serve calls right after this with the user_config
        # (`{}` by default), so a replica never loads one version only to switch at once.
        self._watcher = threading.Thread(target=self._watch, name="galen-alias-watch", daemon=True)
        self._watcher.start()

    # -- model lifecycle -----------------------------------------------------------------------------

    async def reconfigure(self, user_config: Mapping[str, Any] | None) -> None:
        """The user_config (alias, model, limits) applies to this replica: at start (the first load;
        failing the replica with a clear message when the alias resolves to nothing loadable) and
        whenever it changes (switching in place, in the background of running requests)."""
        settings = self.base.replace(user_config)
        self._apply(settings)
        self.settings = settings
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._refresh)
            self.last_error = None
        except Exception as e:  # noqa: BLE001 - keep serving the loaded version; health shows why
            if self.current is None:
                raise
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("reconfigure kept version %s: %s", self.current.ref.version, self.last_error)

    def _apply(self, settings: ServeSettings) -> None:
        import torch

        torch.set_num_threads(settings.torch_threads)
        self._batched.set_max_batch_size(settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    def _refresh(self) -> bool:
        """Load the version the alias points at now, if it is not the one served; True if switched."""
        with self._load_lock:
            settings = self.settings
            uri = resolve_tracking_uri(settings)
            ref = resolve(settings, uri)
            cur = self.current
            if cur is not None and uri == self._uri and (cur.ref.name, cur.ref.version) == (ref.name, ref.version):
                if cur.ref.alias != ref.alias:
                    self.current = replace(cur, ref=ref)
                return False
            new = load(ref, settings, uri)
            new.predictor.predict([WARMUP])  # a version that cannot answer never gets traffic
            self.current, self._uri = new, uri  # one assignment: batches already running keep the old model
            log.info("serving %s version %s (alias %s)%s", ref.name, ref.version, ref.alias,
                     f", was version {cur.ref.version}" if cur else "")
            return True

    def _watch(self) -> None:
        while not self._stop.is_set():
            interval = self.settings.poll_interval_s
            if self._stop.wait(interval if interval > 0 else 1.0) or interval <= 0 or self.current is None:
                continue
            try:
                self._refresh()
                self.last_error = None
            except Exception as e:  # noqa: BLE001 - a registry hiccup must not stop serving
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("alias check failed, still serving version %s: %s",
                            self.current.ref.version if self.current else None, self.last_error)

    def check_health(self) -> None:
        if self.current is None:
            self._refresh()  # only when deployed with user_config None (no reconfigure call): load now
        if self.current is None:
            raise RuntimeError("no model loaded")
        if not self._watcher.is_alive():
            raise RuntimeError("the alias watcher thread died")

    def __del__(self) -> None:
        self._stop.set()

    # -- answering -----------------------------------------------------------------------------------

    def _predict(self, model: LoadedModel, jobs: list[dict[str, Any]]) -> list[dict[str, Any] | Exception]:
        """One model call for the batch; if it fails, each request alone, so one bad request in a
        batch fails only itself."""
        self.stats["model_calls"] += 1
        self.stats["requests"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        t0 = time.perf_counter()
        try:
            return model.predictor.predict(jobs)
        except Exception as e:  # noqa: BLE001 - sorted out per request below
            if len(jobs) == 1:
                return [e]
        finally:
            self.stats["model_ms"] += round((time.perf_counter() - t0) * 1000)
        out: list[dict[str, Any] | Exception] = []
        for job in jobs:
            try:
                out.append(model.predictor.predict([job])[0])
            except Exception as e:  # noqa: BLE001 - handed to this request's caller
                out.append(e)
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=256)
    async def _batched(self, jobs: list[dict[str, Any]]) -> list[tuple[Any, LoadedModel]]:
        """Requests that arrive together (grouped by @serve.batch) join the model's queue."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((jobs, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Whenever the model is free, one call answers everything queued (up to max_batch_size).

        @serve.batch alone forms each batch on a timer, also while the model is still busy with the
        previous one, so under load batches queue up small; taking what has gathered when the model
        becomes free keeps them as large as the load allows."""
        loop = asyncio.get_running_loop()
        while self._queue:
            groups, size = [], 0
            while self._queue and (not groups or size + len(self._queue[0][0]) <= self.settings.max_batch_size):
                jobs, future = self._queue.popleft()
                if not future.done():  # a cancelled group is skipped
                    groups.append((jobs, future))
                    size += len(jobs)
            if not groups:
                continue
            model = self.current
            try:
                results = await loop.run_in_executor(self._pool, self._predict, model,
                                                     [job for jobs, _ in groups for job in jobs])
            except Exception as e:  # noqa: BLE001 - _predict answers per request; this is a bug: tell everyone
                for _, future in groups:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for jobs, future in groups:
                if not future.done():
                    future.set_result([(r, model) for r in results[start:start + len(jobs)]])
                start += len(jobs)

    async def _single(self, job: dict[str, Any]) -> tuple[Any, LoadedModel]:
        model = self.current
        (result,) = await asyncio.get_running_loop().run_in_executor(self._pool, self._predict, model, [job])
        return result, model

    async def _answer(self, job: dict[str, Any]) -> dict[str, Any]:
        if self.current is None:
            raise http.ApiError(503, "model_unavailable", "no model is loaded yet; retry shortly")
        settings = self.settings
        call = self._batched(job) if settings.batching else self._single(job)
        try:
            result, model = await asyncio.wait_for(call, timeout=settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise http.ApiError(504, "timeout", f"no answer within {settings.request_timeout_s:g} s; the server is "
                                "busy, retry later") from None
        if isinstance(result, GalenInputError):
            raise http.ApiError(422, "invalid_input", _REQUEST_PREFIX.sub("", str(result)))
        if isinstance(result, Exception):
            raise result
        return {**result, "model": model.ref.to_dict()}

    async def _decode(self, image: bytes) -> Any:
        model = self.current
        if model is None:
            raise http.ApiError(503, "model_unavailable", "no model is loaded yet; retry shortly")
        try:
            return await asyncio.get_running_loop().run_in_executor(None, model.predictor.load_image, image)
        except GalenInputError as e:
            raise http.ApiError(400, "invalid_image", f"the image cannot be read: {e}", "image") from e

    async def _task(self, task: str, req: Any, image: bytes | None) -> dict[str, Any]:
        job = http.job_fields(task, req)
        if task == "classify" and "labels" not in job:
            labels = self.current.default_labels(self.settings.default_labels) if self.current else []
            if not labels:
                raise http.ApiError(422, "invalid_input", "labels are required: this model version has no default "
                                    "label set", "labels")
            job["labels"] = labels
        if image is not None:
            job["image"] = await self._decode(image)
        answer = await self._answer(job)
        answer["task"] = task
        return answer

    async def _task_route(self, request: Request, task: str) -> dict[str, Any]:
        req, image = await http.read_task_request(request, task, self.settings)
        return await self._task(task, req, image)

    # -- routes --------------------------------------------------------------------------------------

    @app.post("/v1/vqa", summary="Answer a question about an image", **http.task_route("vqa"))
    async def vqa(self, request: Request) -> dict[str, Any]:
        return await self._task_route(request, "vqa")

    @app.post("/v1/caption", summary="Describe an image", **http.task_route("caption"))
    async def caption(self, request: Request) -> dict[str, Any]:
        return await self._task_route(request, "caption")

    @app.post("/v1/classify", summary="Classify an image", **http.task_route("classify"))
    async def classify(self, request: Request) -> dict[str, Any]:
        return await self._task_route(request, "classify")

    @app.post("/v1/ground", summary="Find the region a text describes (a box in pixels)", **http.task_route("ground"))
    async def ground(self, request: Request) -> dict[str, Any]:
        return await self._task_route(request, "ground")

    @app.post("/v1/nli", summary="Does the premise imply the hypothesis (yes / no / maybe)",
              **http.task_route("nli"))
    async def nli(self, request: Request) -> dict[str, Any]:
        return await self._task_route(request, "nli")

    @app.post("/v1/summarize", summary="Summarize a text", **http.task_route("summarize"))
    async def summarize(self, request: Request) -> dict[str, Any]:
        return await self._task_route(request, "summarize")

    @app.post("/v1/chat/completions", summary="OpenAI-compatible chat completion", tags=["openai"],
              openapi_extra=_chat_body())
    async def chat_completions(self, request: Request) -> Any:
        settings = self.settings
        data, upload = await http.read_payload(request, settings)
        if upload is not None:
            raise http.ApiError(415, "unsupported_media_type", "chat completions take JSON; send images as image_url "
                                "data: URIs")
        try:
            conversation = chat.ChatRequest.model_validate(data)
        except ValidationError as e:
            message, param = http.validation_message(e)
            raise http.ApiError(422, "validation_error", message, param) from e
        task, fields, image_uri = chat.to_task_request(conversation, settings.model_name)
        req, image = http.prepare(task, {**fields, **({"image": image_uri} if image_uri else {})}, None, settings)
        answer = await self._task(task, req, image)
        tokenizer = self.current.predictor.tokenizer if self.current else None
        prompt = " ".join(str(v) for k, v in fields.items() if isinstance(v, str))
        counts = (len(tokenizer.encode(prompt)) if tokenizer and prompt else 0,
                  len(tokenizer.encode(answer["answer"])) if tokenizer and answer["answer"] else 0)
        body = chat.completion(answer, *counts)
        if conversation.stream:
            return StreamingResponse(chat.stream_events(body), media_type="text/event-stream")
        return JSONResponse(body)

    # -- the CLIP model (answered by GalenClip; parsed and limited here like every route) --

    async def _clip(self, request: Request, route: str) -> dict[str, Any]:
        if self.clip is None:
            raise http.ApiError(404, "not_served", "the CLIP model is not served here (serve setting "
                                "clip_model_name is null)")
        job = await http.read_clip_request(request, route, self.settings)
        method = {"embed": "embed", "zero-shot": "zero_shot", "retrieve": "retrieve"}[route]
        answer = await getattr(self.clip, method).remote(job)
        if "error" in answer:
            e = answer["error"]
            raise http.ApiError(e["status"], e["type"], e["message"], e.get("param"))
        return answer

    @app.post("/v1/embed", summary="Normalized embedding of an image or a text", **http.clip_route("embed"))
    async def embed(self, request: Request) -> dict[str, Any]:
        return await self._clip(request, "embed")

    @app.post("/v1/zero-shot", summary="Zero-shot classification of an image over labels",
              **http.clip_route("zero-shot"))
    async def zero_shot(self, request: Request) -> dict[str, Any]:
        return await self._clip(request, "zero-shot")

    @app.post("/v1/retrieve", summary="Nearest images of a text, or nearest texts of an image",
              **http.clip_route("retrieve"))
    async def retrieve(self, request: Request) -> dict[str, Any]:
        return await self._clip(request, "retrieve")

    @app.post("/v1/embeddings", summary="OpenAI-compatible text embeddings", **http.clip_route("embeddings"))
    async def embeddings(self, request: Request) -> dict[str, Any]:
        if self.clip is None:
            raise http.ApiError(404, "not_served", "the CLIP model is not served here")
        job = await http.read_clip_request(request, "embeddings", self.settings)
        answer = await self.clip.embeddings.remote(job["texts"])
        if "error" in answer:
            e = answer["error"]
            raise http.ApiError(e["status"], e["type"], e["message"], e.get("param"))
        return http.embeddings_response(answer, job, answer["model"]["name"])

    @app.get("/v1/contrastive/status", summary="The served CLIP model and its batching", tags=["service"])
    async def clip_status(self) -> dict[str, Any]:
        if self.clip is None:
            return {"status": "not_served"}
        return await self.clip.status.remote()

    @app.get("/v1/models", summary="The served model (OpenAI list format)", tags=["service"])
    async def models(self) -> dict[str, Any]:
        data = []
        if self.current is not None:
            ref = self.current.ref
            data.append({"id": ref.name, "object": "model", "created": int(self.current.loaded_at), "owned_by": "galen",
                         **ref.to_dict(), "tasks": list(http.TASKS),
                         "labels": {"classification": self.current.default_labels(self.settings.default_labels)}})
        return {"object": "list", "data": data}

    @app.get("/health", summary="Liveness and the served version", response_model=http.Health, tags=["service"])
    async def health(self) -> Any:
        if self.current is None:
            return JSONResponse({"status": "loading", "batching": self.settings.batching}, status_code=503)
        return {"status": "ok", "model": self.current.ref.to_dict(), "batching": self.settings.batching,
                "last_error": self.last_error, "stats": dict(self.stats)}


# --------------------------------------------------------------------------------------------------
# Building the application
# --------------------------------------------------------------------------------------------------

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
    from galen.serve import clip_deployment

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
    from galen.serve import clip_deployment

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
