"""Every route of the running endpoint over real HTTP: JSON (base64) and multipart bodies, DICOM,
the model version in every answer, OpenAPI, and dynamic batching of concurrent requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serve.conftest import LABELS, NAME, b64, dicom_bytes, png_bytes


def check_answer(r, task: str, server) -> dict:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == task
    assert isinstance(body["answer"], str)
    model = body["model"]
    assert model["name"] == NAME and model["alias"] == "champion" and model["version"].isdigit() and model["run_id"]
    assert model["version"] == server.registry.aliases()["champion"]
    return body


def test_health_models_and_openapi(server):
    health = server.get("/health").json()
    assert health["status"] == "ok" and health["model"]["name"] == NAME and health["batching"] is True
    models = server.get("/v1/models").json()
    assert models["object"] == "list"
    (m,) = models["data"]
    assert m["id"] == NAME and m["version"] == health["model"]["version"]
    assert set(m["tasks"]) == {"vqa", "caption", "classify", "ground", "nli", "summarize"}
    assert m["labels"] == {"classification": LABELS}  # the class names the version was evaluated on
    doc = server.get("/openapi.json").json()
    for task in ("vqa", "caption", "classify", "ground", "nli", "summarize"):
        body = doc["paths"][f"/v1/{task}"]["post"]["requestBody"]["content"]
        assert "application/json" in body
        assert ("multipart/form-data" in body) == (task not in ("nli", "summarize"))
    assert "/v1/chat/completions" in doc["paths"]
    assert doc["components"]["schemas"]["VQARequest"]["required"] == ["image", "question"]
    assert server.get("/docs").status_code == 200


@pytest.mark.parametrize("how", ["json", "multipart"])
def test_image_tasks(server, how):
    image = png_bytes(96, 80)

    def send(task: str, **fields):
        if how == "json":
            return server.post(f"/v1/{task}", json={"image": b64(image), **fields})
        return server.post(f"/v1/{task}", files={"image": ("scan.png", image, "image/png")}, data=fields)

    body = check_answer(send("vqa", question="is there a lesion?", candidates=["yes", "no"]), "vqa", server)
    assert body["answer"] in ("yes", "no")
    check_answer(send("vqa", question="what organ is shown?"), "vqa", server)  # open question: free text
    check_answer(send("caption"), "caption", server)
    body = check_answer(send("classify", labels=["normal", "pneumonia", "effusion"]), "classify", server)
    assert body["answer"] in ("normal", "pneumonia", "effusion")
    assert set(body["scores"]) == {"normal", "pneumonia", "effusion"}
    assert abs(sum(body["scores"].values()) - 1) < 1e-6
    body = check_answer(send("ground", text="the left lung"), "ground", server)
    x0, y0, x1, y1 = body["box"]
    assert 0 <= x0 <= x1 <= 96 and 0 <= y0 <= y1 <= 80  # pixels of the image as sent


def test_classify_without_labels_uses_the_registered_versions_class_names(server):
    for request in ({"json": {"image": b64(png_bytes())}}, {"files": {"image": ("scan.png", png_bytes(), "image/png")}}):
        body = check_answer(server.post("/v1/classify", **request), "classify", server)
        assert body["answer"] in LABELS and set(body["scores"]) == set(LABELS)


def test_multipart_list_fields_accept_repeats_json_and_commas(server):
    image = ("scan.png", png_bytes(), "image/png")
    for labels in (["a", "b", "c"], '["a", "b", "c"]', "a, b, c"):
        r = server.post("/v1/classify", files={"image": image}, data={"labels": labels})
        assert set(check_answer(r, "classify", server)["scores"]) == {"a", "b", "c"}


def test_text_tasks(server):
    body = check_answer(server.post("/v1/nli", json={"premise": "the patient has a fever",
                                                      "hypothesis": "the patient is ill"}), "nli", server)
    assert body["answer"] in ("yes", "no", "maybe") and set(body["scores"]) == {"yes", "no", "maybe"}
    check_answer(server.post("/v1/summarize", json={"text": "the patient reports a cough and fever for three days "
                                                            "and asks whether antibiotics are needed"}),
                 "summarize", server)


@pytest.mark.parametrize("how", ["json", "multipart", "data-url"])
def test_dicom_images(server, how):
    dcm = dicom_bytes()
    if how == "multipart":
        r = server.post("/v1/vqa", files={"image": ("ct.dcm", dcm, "application/dicom")},
                        data={"question": "is this a ct scan?", "candidates": "yes,no"})
    else:
        image = b64(dcm) if how == "json" else "data:application/dicom;base64," + b64(dcm)
        r = server.post("/v1/vqa", json={"image": image, "question": "is this a ct scan?", "candidates": ["yes", "no"]})
    assert check_answer(r, "vqa", server)["answer"] in ("yes", "no")
    r = server.post("/v1/ground", json={"image": b64(dcm), "text": "the spine"})
    x0, y0, x1, y1 = check_answer(r, "ground", server)["box"]
    assert 0 <= x0 <= x1 <= 128 and 0 <= y0 <= y1 <= 128  # CT_small is 128x128


def test_concurrent_requests_are_batched(server):
    """Concurrent requests of different tasks reach the model together (one model call answers
    several), and each still gets its own answer."""
    before = server.get("/health").json()["stats"]
    image = b64(png_bytes(64, 64))
    jobs = [("nli", {"premise": f"finding {i}", "hypothesis": "the patient is ill"}) for i in range(12)]
    jobs += [("vqa", {"image": image, "question": f"is there a lesion {i}?", "candidates": ["yes", "no"]})
             for i in range(12)]
    bad = ("classify", {"image": image, "labels": ["a", "a"]})  # passes the HTTP checks, fails in the model
    jobs.insert(5, bad)
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda j: server.post(f"/v1/{j[0]}", json=j[1]), jobs))
    for job, r in zip(jobs, replies):
        if job is bad:  # fails alone, whatever batch it shared
            assert r.status_code == 422 and "duplicate labels" in r.json()["error"]["message"], r.text
        else:
            check_answer(r, job[0], server)
    after = server.get("/health").json()["stats"]
    calls, requests_ = after["model_calls"] - before["model_calls"], after["requests"] - before["requests"]
    assert requests_ >= len(jobs)
    assert calls < requests_, f"{requests_} requests took {calls} model calls: no batching"
    assert after["largest_batch"] > 1


def test_web_page_and_assets_are_served(server):
    r = server.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="ask-form"' in r.text and "/web/app.js" in r.text
    assert server.get("/web/app.js").status_code == 200
    assert server.get("/web/style.css").status_code == 200
