"""HTTP surface of the endpoint: request/response schemas, input parsing with limits, JSON errors.

Task routes take JSON (images as base64: PNG, JPEG or DICOM; a data: URL prefix is fine) or
multipart/form-data (the image as an uploaded file, the other fields as form fields; `candidates`
and `labels` as repeated fields, a JSON array, or one comma-separated value). Every error is JSON:
`{"error": {"type": ..., "message": ..., "param": ...}}` with a 4xx status saying what was wrong
(400 unreadable input, 404 unknown route or task, 413 over a size limit, 415 unsupported content
type, 422 well-formed but invalid input, 503 no model loaded, 504 timed out).

The routes themselves are methods of the ingress deployment (serve/routes.py).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import warnings
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from galen.model.errors import GalenInputError
from galen.serve.settings import ServeSettings

log = logging.getLogger("ray.serve.galen")

WEB_DIR = Path(__file__).parent / "web"
API_VERSION = "1"


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------

class ApiError(Exception):
    """An answer other than 200, with a type a program can branch on and a message a person can act on."""

    def __init__(self, status: int, type: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.param = status, type, message, param


def error_response(status: int, type: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type, "message": message, "param": param}}, status_code=status,
                        headers=headers)


def validation_message(e: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    parts, first = [], None
    for err in e.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        where = ".".join(loc) or "body"
        first = first or where
        got = err.get("input")
        got_type = "" if err.get("type") == "missing" else f" (got {type(got).__name__})"
        parts.append(f"{where}: {err.get('msg', 'invalid')}{got_type}")
    return "; ".join(parts) or "invalid request", first


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.type, e.message, e.param)

    @app.exception_handler(GalenInputError)
    async def _input_error(_: Request, e: GalenInputError) -> JSONResponse:
        return error_response(422, "invalid_input", str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = validation_message(e)
        return error_response(422, "validation_error", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            path = request.url.path
            m = re.fullmatch(r"/v1/([^/]+)/?", path)
            if m and request.method == "POST" and m.group(1) not in TASKS:
                return error_response(404, "unknown_task", f"unknown task {m.group(1)!r}; the tasks are "
                                      f"{', '.join(TASKS)} (POST /v1/<task>) and /v1/chat/completions")
            return error_response(404, "not_found", f"no route {request.method} {path}; see /docs")
        if e.status_code == 405:
            return error_response(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}",
                                  headers=dict(e.headers or {}))
        return error_response(e.status_code, "http_error", str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", f"{type(e).__name__}: the server failed on this request; "
                              "it is logged")


# --------------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------------

IMAGE_DOC = "the image: base64 of a PNG, JPEG or DICOM file (a data: URL prefix is accepted)"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class VQARequest(_Request):
    image: str = Field(description=IMAGE_DOC)
    question: str = Field(description="a question about the image")
    candidates: list[str] | None = Field(None, description="closed answer set: the answer is one of these")


class CaptionRequest(_Request):
    image: str = Field(description=IMAGE_DOC)


class ClassifyRequest(_Request):
    image: str = Field(description=IMAGE_DOC)
    labels: list[str] | None = Field(None, description="class names (default: the model's own label set)")


class GroundRequest(_Request):
    image: str = Field(description=IMAGE_DOC)
    text: str = Field(description="the region to find, described in words")


class NLIRequest(_Request):
    premise: str
    hypothesis: str


class SummarizeRequest(_Request):
    text: str = Field(description="the text to summarize")


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str
    run_id: str | None = None


class Answer(BaseModel):
    task: str
    answer: str = Field(description="the model's answer (grounding: the decoded location tokens)")
    box: list[float] | None = Field(None, description="grounding: [x0, y0, x1, y1] in pixels of the image as sent")
    scores: dict[str, float] | None = Field(None, description="closed sets with scores: probability per candidate")
    model: ModelInfo = Field(description="the registered model version that produced this answer")


class Health(BaseModel):
    status: str
    model: ModelInfo | None = None
    batching: bool
    last_error: str | None = Field(None, description="why the last alias check or reconfigure failed (the loaded "
                                   "version keeps serving)")
    stats: dict[str, int] | None = Field(None, description="this replica's model calls, requests and largest batch")


# route name -> (predictor task, request schema); one place for the task list of the HTTP layer
TASKS: dict[str, tuple[str, type[_Request]]] = {
    "vqa": ("vqa", VQARequest),
    "caption": ("caption", CaptionRequest),
    "classify": ("classification", ClassifyRequest),
    "ground": ("grounding", GroundRequest),
    "nli": ("nli", NLIRequest),
    "summarize": ("summarization", SummarizeRequest),
}
TEXT_FIELDS = ("question", "text", "premise", "hypothesis")
LIST_FIELDS = ("candidates", "labels")


def task_route(task: str) -> dict[str, Any]:
    """FastAPI route options of a task: its JSON and multipart bodies in the OpenAPI schema (the
    body is parsed by `read_task_request`, so one route takes both content types)."""
    schema = TASKS[task][1]
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema.__name__}"}}}
    props = schema.model_json_schema()["properties"]
    if "image" in props:
        form = {k: ({"type": "string", "format": "binary", "description": "the image file (PNG, JPEG or DICOM)"}
                    if k == "image" else {"type": "array", "items": {"type": "string"}} if k in LIST_FIELDS
                    else {"type": "string"}) for k in props}
        required = [k for k in schema.model_json_schema().get("required", [])]
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": form, "required": required}}
    return {"response_model": Answer, "response_model_exclude_none": True, "tags": ["tasks"],
            "openapi_extra": {"requestBody": {"required": True, "content": content}},
            "responses": {code: {"description": what} for code, what in (
                (400, "unreadable input: invalid JSON, base64 or image"), (413, "over a size limit"),
                (415, "unsupported content type"), (422, "invalid input"), (503, "no model loaded"),
                (504, "timed out"))}}


# --------------------------------------------------------------------------------------------------
# Parsing with limits
# --------------------------------------------------------------------------------------------------

async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to be over `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"the request body is {int(declared):,} bytes, over the limit of "
                       f"{limit:,} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"the request body is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _list_field(name: str, values: list[str]) -> list[str]:
    """Repeated form fields, a JSON array, or one comma-separated value."""
    if len(values) == 1:
        text = values[0].strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as e:
                raise ApiError(400, "invalid_form", f"{name} looks like a JSON array but is not valid JSON ({e})",
                               name) from e
            if not isinstance(parsed, list):
                raise ApiError(422, "validation_error", f"{name} must be a list of strings", name)
            return parsed
        return [x.strip() for x in text.split(",") if x.strip()]
    return values


async def read_payload(request: Request, settings: ServeSettings) -> tuple[dict[str, Any], bytes | None]:
    """(fields, uploaded image bytes or None) of a JSON or multipart request."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    body = await read_body(request, settings.max_body_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        parser = MultiPartParser(request.headers, _once(body), max_files=1, max_fields=64,
                                 max_part_size=settings.max_body_bytes)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise ApiError(400, "invalid_form", f"the multipart body cannot be parsed: {e.message}") from e
        fields: dict[str, list[Any]] = {}
        upload: bytes | None = None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image":
                    raise ApiError(422, "validation_error", f"unexpected file field {key!r}; send the image as "
                                   "'image'", key)
                upload = await value.read()
                await value.close()
            else:
                fields.setdefault(key, []).append(value)
        data: dict[str, Any] = {k: _list_field(k, v) if k in LIST_FIELDS else v[-1] for k, v in fields.items()}
        return data, upload
    if ctype in ("application/json", "") or ctype.endswith("+json"):
        if not body.strip():
            raise ApiError(400, "invalid_json", "the request body is empty; send a JSON object")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, "invalid_json", f"the request body is not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ApiError(422, "validation_error", f"the request body must be a JSON object, got a JSON "
                           f"{type(data).__name__}")
        return data, None
    raise ApiError(415, "unsupported_media_type", f"content type {ctype!r} is not accepted; send application/json "
                   "or multipart/form-data")


def validate(schema: type[BaseModel], data: dict[str, Any], settings: ServeSettings) -> BaseModel:
    """Typed fields (422 naming each wrong field), then non-empty texts within the length limit."""
    try:
        req = schema.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e)
        raise ApiError(422, "validation_error", message, param) from e
    for name in TEXT_FIELDS:
        value = getattr(req, name, None)
        if value is None:
            continue
        if not value.strip():
            raise ApiError(422, "invalid_input", f"{name} is empty; give some text", name)
        if len(value) > settings.max_text_chars:
            raise ApiError(422, "text_too_long", f"{name} is {len(value):,} characters, over the limit of "
                           f"{settings.max_text_chars:,}", name)
    for name in LIST_FIELDS:
        values = getattr(req, name, None)
        if values is None:
            continue
        if not values or any(not v.strip() for v in values):
            raise ApiError(422, "invalid_input", f"{name} must be a non-empty list of non-empty strings", name)
        if sum(len(v) for v in values) > settings.max_text_chars:
            raise ApiError(422, "text_too_long", f"{name} are over {settings.max_text_chars:,} characters in all",
                           name)
    return req


def decode_base64_image(text: str, settings: ServeSettings, param: str = "image") -> bytes:
    """Bytes of a base64 image (galen.model.vision's decoder, the one the predictor uses), with the
    serving limit; its reasons become 400 / 413 answers naming the parameter."""
    from galen.model.vision import ImageDecodeError
    from galen.model.vision import decode_base64_image as decode

    try:
        return decode(text, settings.max_image_bytes, what=param)
    except ImageDecodeError as e:
        raise ApiError(413 if e.code == "image_too_large" else 400, e.code, str(e), param) from e


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the file's header without decoding pixels; None when unreadable (the
    decoder then says what is wrong)."""
    from PIL import Image

    from galen.model.vision import is_dicom

    try:
        if is_dicom(data):
            import pydicom

            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            return int(ds.get("Columns") or 0), int(ds.get("Rows") or 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Image.DecompressionBombError:
        return (2 ** 31, 1)
    except Exception:  # noqa: BLE001 - not readable here: the decoder reports it
        return None


def check_image(data: bytes, settings: ServeSettings, param: str = "image") -> None:
    if len(data) > settings.max_image_bytes:
        raise ApiError(413, "image_too_large", f"{param} is {len(data):,} bytes, over the limit of "
                       f"{settings.max_image_bytes:,} bytes", param)
    dims = image_dimensions(data)
    if dims and dims[0] * dims[1] > settings.max_image_pixels:
        raise ApiError(413, "image_too_large", f"{param} is {dims[0]}x{dims[1]} = {dims[0] * dims[1]:,} pixels, "
                       f"over the limit of {settings.max_image_pixels:,}; downscale it (the model sees a few "
                       "hundred pixels per side)", param)


def prepare(task: str, data: dict[str, Any], upload: bytes | None, settings: ServeSettings
            ) -> tuple[BaseModel, bytes | None]:
    """(validated request, image bytes or None) of task `task` from parsed fields (+ an uploaded image)."""
    schema = TASKS[task][1]
    if upload is not None:
        data = {**data, "image": ""}  # placeholder so the schema sees the field; the bytes travel separately
    req = validate(schema, data, settings)
    image: bytes | None = None
    if "image" in schema.model_fields:
        image = upload if upload is not None else decode_base64_image(req.image, settings)  # type: ignore[attr-defined]
        if not image:
            raise ApiError(400, "invalid_image", "the uploaded image is empty (0 bytes)", "image")
        check_image(image, settings)
    return req, image


async def read_task_request(request: Request, task: str, settings: ServeSettings) -> tuple[BaseModel, bytes | None]:
    """(validated request, image bytes or None) of POST /v1/<task>."""
    data, upload = await read_payload(request, settings)
    return prepare(task, data, upload, settings)


def job_fields(task: str, req: BaseModel) -> dict[str, Any]:
    """The fields of a `GalenPredictor.predict` request (without the image)."""
    fields = {k: v for k, v in req.model_dump().items() if k != "image" and v is not None}
    return {"task": TASKS[task][0], **fields}


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------

def create_app(extra_schemas: Sequence[type[BaseModel]] = ()) -> FastAPI:
    """The FastAPI app without the model routes (the deployment adds them): error handlers, the
    web page, and an OpenAPI schema that documents the task bodies."""
    app = FastAPI(title="Galen", version=API_VERSION, docs_url="/docs", redoc_url=None,
                  description="Biomedical vision-language answers from the registered Galen generalist model. "
                  "Every answer names the model version that produced it.")
    install_error_handlers(app)
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    schemas = [s for _, s in TASKS.values()] + list(extra_schemas)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, defs = models_json_schema([(s, "validation") for s in schemas],
                                         ref_template="#/components/schemas/{model}")
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# --------------------------------------------------------------------------------------------------
# The CLIP model's routes (served by serve/clip_deployment.py through the ingress)
# --------------------------------------------------------------------------------------------------

class EmbedRequest(_Request):
    image: str | None = Field(None, description=IMAGE_DOC + "; give image or text")
    text: str | None = Field(None, description="a text to embed; give image or text")


class ZeroShotRequest(_Request):
    image: str = Field(description=IMAGE_DOC)
    labels: list[str] = Field(description="class names (at least two, no duplicates)")
    templates: list[str] | None = Field(None, description="prompt templates with one '{}' for the label; class "
                                        "embeddings are averaged over them (default: the model's)")


class RetrieveRequest(_Request):
    image: str | None = Field(None, description=IMAGE_DOC + ": find the nearest texts")
    text: str | None = Field(None, description="find the nearest images")
    texts: list[str] | None = Field(None, description="candidate texts for an image query (default: the index's "
                                    "captions)")
    images: list[str] | None = Field(None, description="candidate images (base64) for a text query (default: the "
                                     "index's images)")
    top_k: int = Field(5, ge=1, le=100, description="how many results")


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request (text input only; token-id input is not accepted)."""

    model_config = ConfigDict(extra="allow")
    input: str | list[str] = Field(description="a text or a list of texts")
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None


CLIP_ROUTES: dict[str, type[BaseModel]] = {"embed": EmbedRequest, "zero-shot": ZeroShotRequest,
                                           "retrieve": RetrieveRequest, "embeddings": EmbeddingsRequest}


def clip_route(route: str) -> dict[str, Any]:
    """FastAPI route options of a CLIP route (JSON bodies; documented schema)."""
    schema = CLIP_ROUTES[route]
    return {"tags": ["contrastive"] if route != "embeddings" else ["openai"],
            "openapi_extra": {"requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{schema.__name__}"}}}}},
            "responses": {code: {"description": what} for code, what in (
                (400, "unreadable input"), (413, "over a size limit"), (422, "invalid input"),
                (503, "no CLIP model loaded"), (504, "timed out"))}}


def _one_of(req: BaseModel, a: str, b: str) -> str:
    given = [n for n in (a, b) if getattr(req, n) is not None]
    if len(given) != 1:
        raise ApiError(422, "invalid_input", f"give exactly one of {a!r} or {b!r}", a)
    return given[0]


def _check_texts(name: str, values: list[str], settings: ServeSettings) -> None:
    if not values or any(not v.strip() for v in values):
        raise ApiError(422, "invalid_input", f"{name} must be a non-empty list of non-empty strings", name)
    if len(values) > settings.max_candidates:
        raise ApiError(422, "too_many_candidates", f"{name} has {len(values)} entries, over the limit of "
                       f"{settings.max_candidates}", name)
    if any(len(v) > settings.max_text_chars for v in values):
        raise ApiError(422, "text_too_long", f"an entry of {name} is over {settings.max_text_chars:,} characters", name)


def _image(text: str, settings: ServeSettings, param: str) -> bytes:
    data = decode_base64_image(text, settings, param)
    check_image(data, settings, param)
    return data


async def read_clip_request(request: Request, route: str, settings: ServeSettings) -> dict[str, Any]:
    """The checked job of a CLIP route: texts within limits, images decoded from base64 and
    size-checked (multipart uploads are taken by /v1/embed and /v1/zero-shot as `image`)."""
    data, upload = await read_payload(request, settings)
    if upload is not None:
        if route not in ("embed", "zero-shot", "retrieve"):
            raise ApiError(415, "unsupported_media_type", f"/v1/{route} takes JSON")
        data = {**data, "image": ""}
    schema = CLIP_ROUTES[route]
    if route == "embeddings":
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            message, param = validation_message(e)
            raise ApiError(422, "validation_error", message, param) from e
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        _check_texts("input", texts, settings)
        if req.encoding_format not in ("float", "base64"):
            raise ApiError(422, "invalid_input", "encoding_format must be 'float' or 'base64'", "encoding_format")
        return {"texts": texts, "model": req.model, "encoding_format": req.encoding_format,
                "dimensions": req.dimensions}
    req = validate(schema, data, settings)
    job: dict[str, Any] = {}
    if route in ("embed", "retrieve"):
        job[_one_of(req, "image", "text")] = None
    if getattr(req, "image", None) is not None:
        job["image"] = upload if upload is not None else _image(req.image, settings, "image")
        if not job["image"]:
            raise ApiError(400, "invalid_image", "the uploaded image is empty (0 bytes)", "image")
        if upload is not None:
            check_image(upload, settings)
    if getattr(req, "text", None) is not None:
        job["text"] = req.text
    if route == "zero-shot":
        _check_texts("labels", req.labels, settings)
        seen: dict[str, int] = {}
        for k, label in enumerate(req.labels):
            if label.strip().lower() in seen:
                raise ApiError(422, "invalid_input", f"labels[{k}] {label!r} duplicates labels[{seen[label.strip().lower()]}]"
                               "; give each class once", "labels")
            seen[label.strip().lower()] = k
        if len(req.labels) < 2:
            raise ApiError(422, "invalid_input", "zero-shot classification needs at least two labels", "labels")
        job["labels"] = list(req.labels)
        if req.templates is not None:
            _check_texts("templates", req.templates, settings)
            bad = [t for t in req.templates if t.count("{}") != 1]
            if bad:
                raise ApiError(422, "invalid_input", f"each template needs exactly one '{{}}' for the label, got {bad}",
                               "templates")
            job["templates"] = list(req.templates)
    if route == "retrieve":
        job["top_k"] = req.top_k
        if req.texts is not None:
            if "image" not in job:
                raise ApiError(422, "invalid_input", "texts are candidates for an image query; send 'image'", "texts")
            _check_texts("texts", req.texts, settings)
            job["texts"] = list(req.texts)
        if req.images is not None:
            if "text" not in job:
                raise ApiError(422, "invalid_input", "images are candidates for a text query; send 'text'", "images")
            if not req.images or len(req.images) > settings.max_candidates:
                raise ApiError(422, "invalid_input", f"images must hold 1 to {settings.max_candidates} entries",
                               "images")
            job["images"] = [_image(x, settings, f"images[{k}]") for k, x in enumerate(req.images)]
    return job


def embeddings_response(answer: dict[str, Any], job: dict[str, Any], served_name: str) -> dict[str, Any]:
    """OpenAI's embeddings list object."""
    import numpy as np

    data = []
    for i, vec in enumerate(answer["vectors"]):
        if job.get("dimensions"):
            if job["dimensions"] > len(vec):
                raise ApiError(422, "invalid_input", f"dimensions {job['dimensions']} is more than the model's "
                               f"{len(vec)}", "dimensions")
            v = np.asarray(vec[: job["dimensions"]], dtype=np.float32)
            vec = (v / max(float(np.linalg.norm(v)), 1e-12)).tolist()
        emb: Any = vec
        if job["encoding_format"] == "base64":
            emb = base64.b64encode(np.asarray(vec, dtype=np.float32).tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": served_name,
            "usage": {"prompt_tokens": answer["tokens"], "total_tokens": answer["tokens"]}}
