"""The official `openai` client works against the endpoint unchanged (POST /v1/chat/completions)."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from tests.serve.conftest import NAME, assert_healthy, b64, dicom_bytes, png_bytes


@pytest.fixture
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)


def image_part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64(data)}"}}


def galen(completion) -> dict:
    """The `galen` extra of a completion: task, answer, box/scores and the model version."""
    return completion.model_extra["galen"]


def test_models_list(client, server):
    (model,) = client.models.list().data
    assert model.id == NAME
    assert model.model_extra["version"] == server.version()


def test_vqa_with_an_image_data_uri(client, server):
    out = client.chat.completions.create(model=NAME, messages=[
        {"role": "system", "content": "candidates: yes, no"},
        {"role": "user", "content": [{"type": "text", "text": "Is there a pleural effusion?"},
                                     image_part(png_bytes())]},
    ])
    answer = out.choices[0].message
    assert answer.role == "assistant" and answer.content in ("yes", "no")
    assert out.choices[0].finish_reason == "stop"
    version = server.version()
    assert out.model == f"{NAME}:{version}"
    assert galen(out)["task"] == "vqa" and galen(out)["model"]["version"] == version
    assert out.usage.prompt_tokens > 0 and out.usage.total_tokens >= out.usage.prompt_tokens


def test_task_rules(client):
    image = image_part(png_bytes(80, 60))
    # an image and no text: caption
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [image]}])
    assert galen(out)["task"] == "caption"
    # the model suffix picks the task; grounding answers the box
    out = client.chat.completions.create(model=f"{NAME}:ground", messages=[
        {"role": "user", "content": [{"type": "text", "text": "the right lung"}, image]}])
    box = galen(out)["box"]
    assert galen(out)["task"] == "ground" and len(box) == 4 and out.choices[0].message.content.startswith("[")
    # a system line picks the task, labels from the system message too
    out = client.chat.completions.create(model=NAME, messages=[
        {"role": "system", "content": "task: classify\nlabels: normal, abnormal"},
        {"role": "user", "content": [image]}])
    assert galen(out)["task"] == "classify" and out.choices[0].message.content in ("normal", "abnormal")
    # no image: NLI with premise/hypothesis lines, else a summary
    out = client.chat.completions.create(model=NAME, messages=[
        {"role": "user", "content": "premise: the patient has a fever\nhypothesis: the patient is ill"}])
    assert galen(out)["task"] == "nli" and out.choices[0].message.content in ("yes", "no", "maybe")
    out = client.chat.completions.create(model=NAME, messages=[
        {"role": "user", "content": "My father has had a cough for three weeks; should he see a doctor?"}])
    assert galen(out)["task"] == "summarize"
    # the image of an earlier turn answers a follow-up question; DICOM as a data URI
    out = client.chat.completions.create(model=NAME, messages=[
        {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                     image_part(dicom_bytes(), "application/dicom")]},
        {"role": "assistant", "content": "a ct scan"},
        {"role": "user", "content": "is the spine visible?"}])
    assert galen(out)["task"] == "vqa"


def test_streaming(client, server):
    stream = client.chat.completions.create(model=f"{NAME}:nli", stream=True, messages=[
        {"role": "user", "content": "premise: no fever\nhypothesis: the patient has a fever"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text in ("yes", "no", "maybe")
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[0].model == f"{NAME}:{server.version()}"


def test_errors_are_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="unknown task 'segment'"):
        client.chat.completions.create(model=f"{NAME}:segment", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError, match="data: URI"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.org/x.png"}}]}])
    with pytest.raises(openai.UnprocessableEntityError, match="needs an image"):
        client.chat.completions.create(model=f"{NAME}:caption", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="not valid base64"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}])
    with pytest.raises(openai.UnprocessableEntityError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[])
    assert_healthy(server)
