"""The CLIP routes of the running endpoint (real `galen serve`, real MLflow registry): a
random `micro` model is registered as galen-clip and promoted; the endpoint picks it up by polling
the alias, and its answers must equal the same model run locally."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.serve.conftest import ROOT, b64, png_bytes

CLIP = "galen-clip"


@pytest.fixture(scope="module")
def clip_model(registry, demo_tokenizer, tmp_path_factory):
    """galen-clip version 1 (champion): a random micro model with the demo tokenizer."""
    from galen.flows.params import load_params
    from galen.flows.registry import CLIP as CLIP_KIND
    from galen.flows.registry import MetricRule, RegistryConfig, promote, register
    from galen.model.clip import ClipModel

    root = tmp_path_factory.mktemp("clip_registry")
    model = ClipModel.create("micro", demo_tokenizer, seed=0)
    model.save_pretrained(root / "model")
    (root / "metrics.json").write_text(json.dumps({"zero_shot": {"accuracy": 0.5}}))
    config = RegistryConfig(model_name=CLIP, experiment="galen-clip-evaluate",
                            metrics=[MetricRule("zero_shot.accuracy")])
    reg = register(root / "model", config, load_params(ROOT / "params.yaml"), metrics_file=root / "metrics.json",
                   uri=registry.uri, project=ROOT, kind=CLIP_KIND)
    assert promote(config, version=reg.version, uri=registry.uri).promoted
    return ClipModel.from_pretrained(root / "model")


@pytest.fixture(scope="module")
def clip_server(server, clip_model):
    deadline = time.time() + 180
    while time.time() < deadline:
        status = server.get("/v1/contrastive/status").json()
        if status.get("status") == "ok":
            return server
        time.sleep(1)
    pytest.fail(f"the CLIP model was not picked up: {status}\n{server.log_tail()}")


def _vec(r) -> torch.Tensor:
    assert r.status_code == 200, r.text
    return torch.tensor(r.json()["embedding"])


def test_embeddings_equal_the_local_model(clip_server, clip_model):
    image = png_bytes(seed=3)
    got = _vec(clip_server.post("/v1/embed", json={"image": b64(image)}))
    torch.testing.assert_close(got, clip_model.encode_images([image])[0], rtol=0, atol=1e-5)
    r = clip_server.post("/v1/embed", json={"text": "is there a nodule?"})
    torch.testing.assert_close(_vec(r), clip_model.encode_texts(["is there a nodule?"])[0], rtol=0, atol=1e-5)
    assert r.json()["truncated"] is False and r.json()["model"]["name"] == CLIP
    assert abs(float(_vec(r).norm()) - 1) < 1e-5
    # multipart upload of the same image gives the same embedding
    up = clip_server.post("/v1/embed", files={"image": ("x.png", image, "image/png")})
    torch.testing.assert_close(_vec(up), got, rtol=0, atol=1e-6)
    long = clip_server.post("/v1/embed", json={"text": "nodule " * 200})
    assert long.status_code == 200 and long.json()["truncated"] is True  # cut to the context, and said so


def test_zero_shot_and_retrieval_equal_the_local_model(clip_server, clip_model):
    image = png_bytes(seed=5)
    labels = ["nodule", "effusion", "normal lung"]
    r = clip_server.post("/v1/zero-shot", json={"image": b64(image), "labels": labels})
    assert r.status_code == 200, r.text
    want = clip_model.classify([image], labels)[0]
    got = torch.tensor([r.json()["scores"][lab] for lab in labels])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert r.json()["label"] == labels[int(want.argmax())]

    texts = ["a nodule in the right lung", "the heart is enlarged", "no effusion"]
    r = clip_server.post("/v1/retrieve", json={"image": b64(image), "texts": texts, "top_k": 3})
    assert r.status_code == 200, r.text
    sims = clip_model.encode_images([image]) @ clip_model.encode_texts(texts).T
    assert [x["index"] for x in r.json()["results"]] == sims[0].argsort(descending=True).tolist()
    images = [png_bytes(seed=s) for s in (1, 2, 3)]
    r = clip_server.post("/v1/retrieve", json={"text": "a nodule", "images": [b64(x) for x in images], "top_k": 2})
    sims = clip_model.encode_texts(["a nodule"]) @ clip_model.encode_images(images).T
    assert [x["index"] for x in r.json()["results"]] == sims[0].argsort(descending=True)[:2].tolist()


def test_openai_client_embeddings(clip_server, clip_model):
    from openai import OpenAI

    client = OpenAI(base_url=clip_server.url + "/v1", api_key="unused")
    out = client.embeddings.create(model=CLIP, input=["the heart is enlarged", "no effusion"])
    assert [d.index for d in out.data] == [0, 1] and out.usage.prompt_tokens > 0
    want = clip_model.encode_texts(["the heart is enlarged", "no effusion"])
    torch.testing.assert_close(torch.tensor([d.embedding for d in out.data]), want, rtol=0, atol=1e-5)


def test_concurrent_requests_are_batched(clip_server):
    before = clip_server.get("/v1/contrastive/status").json()["stats"]
    texts = [f"finding number {k}" for k in range(24)]
    with ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(lambda t: clip_server.post("/v1/embed", json={"text": t}).status_code, texts))
    assert codes == [200] * 24
    after = clip_server.get("/v1/contrastive/status").json()["stats"]
    assert after["requests"] - before["requests"] == 24
    assert after["model_calls"] - before["model_calls"] < 24  # some requests shared a forward pass


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/zero-shot", {"labels": []}, 422, "labels must be a non-empty list"),
    ("/v1/zero-shot", {"labels": ["nodule", "Nodule "]}, 422, "duplicates"),
    ("/v1/zero-shot", {"labels": ["nodule"]}, 422, "at least two labels"),
    ("/v1/zero-shot", {"labels": ["a", "b"], "templates": ["no slot"]}, 422, "exactly one"),
    ("/v1/embed", {}, 422, "exactly one of 'image' or 'text'"),
    ("/v1/embed", {"text": "   "}, 422, "text is empty"),
    ("/v1/embed", {"image": b64(b"not an image at all")}, 400, "cannot be read"),
    ("/v1/embed", {"image": "%%%"}, 400, "not valid base64"),
    ("/v1/retrieve", {"text": "a nodule"}, 422, "serve an index"),
    ("/v1/retrieve", {"text": "a nodule", "texts": ["x"]}, 422, "send 'image'"),
    ("/v1/embeddings", {"input": []}, 422, "non-empty list"),
    ("/v1/embeddings", {"input": [1, 2]}, 422, "input"),
])
def test_bad_input_is_a_clear_error(clip_server, path, body, status, words):
    if path == "/v1/zero-shot":
        body = {"image": b64(png_bytes()), **body}
    r = clip_server.post(path, json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"], r.json()


def test_too_many_candidates(clip_server):
    r = clip_server.post("/v1/retrieve", json={"image": b64(png_bytes()), "texts": [f"t{k}" for k in range(300)]})
    assert r.status_code == 422 and r.json()["error"]["type"] == "too_many_candidates"
