"""OpenAI-compatible chat completions: POST /v1/chat/completions, so the official `openai` client
works against the endpoint unchanged (`OpenAI(base_url="http://host:8000/v1", api_key="unused")`).

Which task answers a conversation (the first rule that applies):
1. `model` names it: `galen-generalist:<task>` with task one of vqa, caption, classify, ground,
   nli, summarize (plain `galen-generalist` leaves it to the rules below).
2. A system (or developer) message line `task: <task>` names it. Lines `labels: a, b, c` and
   `candidates: a, b` give classification labels and a closed VQA answer set.
3. Otherwise, with an image in the conversation: VQA with the last user message's text as the
   question, or a caption when that text is empty; without an image: NLI when the user text has a
   `premise:` and a `hypothesis:` line, else a summary of the user text.

Images are `image_url` parts holding data: URIs (data:image/png;base64,..., data:image/jpeg;...,
data:application/dicom;...); the server fetches no URL. The image is the last one in the user
messages, so a follow-up question about the same image needs no second copy. The answer is the
assistant message's content (grounding: the box as "[x0, y0, x1, y1]" in pixels); the response's
`model` is `<name>:<version>` and an extra `galen` object gives the task, model version, box and scores.
`stream: true` is answered as server-sent events (one content chunk, then the end).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from galen.serve.api import TASKS, ApiError


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that matter here; others are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(description="galen-generalist, or galen-generalist:<task> to pick the task")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    n: int = 1


def _texts(message: ChatMessage) -> list[str]:
    if isinstance(message.content, str):
        return [message.content]
    return [p.text for p in message.content or [] if isinstance(p, TextPart)]


def _images(message: ChatMessage) -> list[str]:
    if isinstance(message.content, str) or not message.content:
        return []
    return [p.image_url.url for p in message.content if isinstance(p, ImagePart)]


def _directives(messages: list[ChatMessage]) -> dict[str, str]:
    """`key: value` lines of system/developer messages (task, labels, candidates)."""
    found: dict[str, str] = {}
    for m in messages:
        if m.role in ("system", "developer"):
            for line in "\n".join(_texts(m)).splitlines():
                key, sep, value = line.partition(":")
                if sep and key.strip().lower() in ("task", "labels", "candidates"):
                    found[key.strip().lower()] = value.strip()
    return found


def _split(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def _labelled_lines(text: str, *keys: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in keys:
            out[key.strip().lower()] = value.strip()
    return out


def to_task_request(chat: ChatRequest, served_name: str) -> tuple[str, dict[str, Any], str | None]:
    """(route task, fields, image data URI or None) of a conversation, by the rules above."""
    if chat.n != 1:
        raise ApiError(422, "invalid_input", "n must be 1 (one answer per request)", "n")
    name, _, model_task = chat.model.partition(":")
    if name != served_name:
        raise ApiError(404, "model_not_found", f"model {chat.model!r} is not served here; use {served_name!r} or "
                       f"'{served_name}:<task>' (GET /v1/models)", "model")
    users = [m for m in chat.messages if m.role == "user"]
    if not users:
        raise ApiError(422, "invalid_input", "the conversation has no user message", "messages")
    text = "\n".join(_texts(users[-1])).strip()
    images = [u for m in users for u in _images(m)]
    remote = [u for u in images if not u.startswith("data:")]
    if remote:
        raise ApiError(422, "invalid_input", f"image_url must be a data: URI (data:image/png;base64,...), got "
                       f"{remote[0][:60]!r}; the server fetches no URL", "messages")
    image = images[-1] if images else None
    directives = _directives(chat.messages)
    task = model_task or directives.get("task", "")
    if task and task not in TASKS:
        raise ApiError(400, "unknown_task", f"unknown task {task!r}; the tasks are {', '.join(TASKS)}",
                       "model" if model_task else "messages")
    if not task:
        if image is not None:
            task = "vqa" if text else "caption"
        else:
            task = "nli" if {"premise", "hypothesis"} <= set(_labelled_lines(text, "premise", "hypothesis")) \
                else "summarize"
    needs_image = "image" in TASKS[task][1].model_fields
    if needs_image and image is None:
        raise ApiError(422, "invalid_input", f"task {task} needs an image: add an image_url part with a data: URI",
                       "messages")
    fields: dict[str, Any] = {}
    if task == "vqa":
        fields["question"] = text
        if directives.get("candidates"):
            fields["candidates"] = _split(directives["candidates"])
    elif task == "classify" and directives.get("labels"):
        fields["labels"] = _split(directives["labels"])
    elif task in ("ground", "summarize"):
        fields["text"] = text
    elif task == "nli":
        lines = _labelled_lines(text, "premise", "hypothesis")
        if not {"premise", "hypothesis"} <= set(lines):
            raise ApiError(422, "invalid_input", "NLI needs a 'premise: ...' line and a 'hypothesis: ...' line in the "
                           "user message", "messages")
        fields.update(premise=lines["premise"], hypothesis=lines["hypothesis"])
    return task, fields, image if needs_image else None


def content_of(answer: dict[str, Any]) -> str:
    if answer.get("box") is not None:
        return "[" + ", ".join(f"{v:.1f}" for v in answer["box"]) + "]"
    return answer["answer"]


def completion(answer: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    model = answer["model"]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": f"{model['name']}:{model['version']}",
        "system_fingerprint": f"{model['name']}-v{model['version']}",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content_of(answer)},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "galen": answer,
    }


def stream_events(body: dict[str, Any]):
    """The completion as OpenAI's server-sent chunks: role + content, then finish_reason, then [DONE]."""
    import json

    base = {k: body[k] for k in ("id", "created", "model", "system_fingerprint")}
    content = body["choices"][0]["message"]["content"]
    chunks = [
        {**base, "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": None}]},
        {**base, "object": "chat.completion.chunk", "galen": body["galen"],
         "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    for c in chunks:
        yield f"data: {json.dumps(c)}\n\n"
    yield "data: [DONE]\n\n"

