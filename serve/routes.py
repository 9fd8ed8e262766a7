"""The HTTP routes of the Galen endpoint: the FastAPI app and the ingress deployment `GalenGeneralist`.

Each route reads its request with the limits and JSON errors of serve/api.py, hands it on, and
shapes the answer; the model work is elsewhere:

    POST /v1/vqa /v1/caption /v1/classify /v1/ground /v1/nli /v1/summarize   JSON or multipart
    POST /v1/chat/completions                                                 OpenAI-compatible (serve/chat.py)
    GET  /v1/models   GET /health   GET / (web page)   GET /docs (OpenAPI)
        -> the generalist this replica serves (serve/served_generalist.py: alias following, batching)
    POST /v1/embed /v1/zero-shot /v1/retrieve /v1/embeddings   GET /v1/contrastive/status
        -> the GalenClip deployment, through its handle (serve/clip_deployment.py)

The application around it (`build_app`, `run_local`) is serve/app.py.
"""

# No `from __future__ import annotations` here: Ray's class-based FastAPI view needs real annotations
# on the route methods (a string "Request" would become a query parameter).
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from galen.serve import api as http
from galen.serve import chat
from galen.serve.served_generalist import ServedGeneralist

app = http.create_app(extra_schemas=[chat.ChatRequest, *http.CLIP_ROUTES.values()])


def _chat_body() -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ChatRequest"}}}}}


def _clip_answer(answer: dict[str, Any]) -> dict[str, Any]:
    """GalenClip answers errors as data (they cross a handle): raise them as the route's error."""
    if "error" in answer:
        e = answer["error"]
        raise http.ApiError(e["status"], e["type"], e["message"], e.get("param"))
    return answer


@serve.deployment(name="GalenGeneralist", user_config={}, max_ongoing_requests=64, health_check_period_s=10,
                  health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
@serve.ingress(app)
class GalenGeneralist:
    def __init__(self, settings: Mapping[str, Any] | None = None, clip: Any = None):
        self.generalist = ServedGeneralist(settings)
        self.clip = clip  # handle of the GalenClip deployment (serve/clip_deployment.py), or None

    # -- Serve's replica lifecycle ---------------------------------------------------------------------

    async def reconfigure(self, user_config: Mapping[str, Any] | None) -> None:
        await self.generalist.reconfigure(user_config)

    def check_health(self) -> None:
        self.generalist.check_health()

    def __del__(self) -> None:
        self.generalist.stop()

    # -- the generalist's tasks ------------------------------------------------------------------------

    async def _task_route(self, request: Request, task: str) -> dict[str, Any]:
        req, image = await http.read_task_request(request, task, self.generalist.settings)
        return await self.generalist.task(task, req, image)

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
        settings = self.generalist.settings
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
        answer = await self.generalist.task(task, req, image)
        prompt = " ".join(str(v) for k, v in fields.items() if isinstance(v, str))
        counts = self.generalist.token_count(prompt), self.generalist.token_count(answer["answer"])
        body = chat.completion(answer, *counts)
        if conversation.stream:
            return StreamingResponse(chat.stream_events(body), media_type="text/event-stream")
        return JSONResponse(body)

    # -- the CLIP model (answered by GalenClip; parsed and limited here like every route) -------------

    async def _clip(self, request: Request, route: str) -> dict[str, Any]:
        if self.clip is None:
            raise http.ApiError(404, "not_served", "the CLIP model is not served here (serve setting "
                                "clip_model_name is null)")
        job = await http.read_clip_request(request, route, self.generalist.settings)
        method = {"embed": "embed", "zero-shot": "zero_shot", "retrieve": "retrieve"}[route]
        return _clip_answer(await getattr(self.clip, method).remote(job))

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
        job = await http.read_clip_request(request, "embeddings", self.generalist.settings)
        answer = _clip_answer(await self.clip.embeddings.remote(job["texts"]))
        return http.embeddings_response(answer, job, answer["model"]["name"])

    @app.get("/v1/contrastive/status", summary="The served CLIP model and its batching", tags=["service"])
    async def clip_status(self) -> dict[str, Any]:
        if self.clip is None:
            return {"status": "not_served"}
        return await self.clip.status.remote()

    # -- service ---------------------------------------------------------------------------------------

    @app.get("/v1/models", summary="The served model (OpenAI list format)", tags=["service"])
    async def models(self) -> dict[str, Any]:
        data = []
        current = self.generalist.current
        if current is not None:
            ref = current.ref
            data.append({"id": ref.name, "object": "model", "created": int(current.loaded_at), "owned_by": "galen",
                         **ref.to_dict(), "tasks": list(http.TASKS),
                         "labels": {"classification": self.generalist.default_labels()}})
        return {"object": "list", "data": data}

    @app.get("/health", summary="Liveness and the served version", response_model=http.Health, tags=["service"])
    async def health(self) -> Any:
        current, settings = self.generalist.current, self.generalist.settings
        if current is None:
            return JSONResponse({"status": "loading", "batching": settings.batching}, status_code=503)
        return {"status": "ok", "model": current.ref.to_dict(), "batching": settings.batching,
                "last_error": self.generalist.last_error, "stats": dict(self.generalist.batcher.stats)}
