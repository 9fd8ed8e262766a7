"""Bad input gets a 4xx JSON error saying what was wrong, and the server stays healthy: after
every case, /health and a normal request still succeed."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tests.serve.conftest import LIMITS, MiB, assert_healthy, b64, png_bytes


def huge_png() -> bytes:
    """A 2500x2000 image (5,000,000 pixels, over the test limit of 4,000,000) that is small on the wire."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (2500, 2000), 0).save(buf, format="PNG")
    assert len(buf.getvalue()) < LIMITS["max_image_bytes"]
    return buf.getvalue()


def truncated_png() -> bytes:
    data = png_bytes(200, 200)
    return data[: len(data) // 2]


def noise_bytes(n: int) -> bytes:
    return np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()


OK_IMAGE = png_bytes(64, 64)
CASES = {
    # name: (method kwargs for POST path, status, error type, words the message must contain)
    "not an image": ("/v1/vqa", {"json": {"image": b64(b"this is a text file, not an image"), "question": "q?"}},
                     400, "invalid_image", ["cannot be read", "PNG, JPEG or DICOM"]),
    "not an image (upload)": ("/v1/caption", {"files": {"image": ("notes.txt", b"plain text", "text/plain")}},
                              400, "invalid_image", ["cannot be read"]),
    "truncated image": ("/v1/caption", {"json": {"image": b64(truncated_png())}},
                        400, "invalid_image", ["truncated"]),
    "huge image": ("/v1/vqa", {"json": {"image": b64(huge_png()), "question": "q?"}},
                   413, "image_too_large", ["2500x2000", "4,000,000"]),
    "huge image (upload)": ("/v1/caption", {"files": {"image": ("big.png", huge_png(), "image/png")}},
                            413, "image_too_large", ["pixels"]),
    "too many image bytes": ("/v1/caption", {"files": {"image": ("big.png", noise_bytes(MiB + 10), "image/png")}},
                             413, "image_too_large", ["bytes", "limit"]),
    "broken base64": ("/v1/vqa", {"json": {"image": "iVBORw0KGgo$$$not-base64", "question": "q?"}},
                      400, "invalid_base64", ["not valid base64"]),
    "data url without base64": ("/v1/caption", {"json": {"image": "data:image/png,rawbytes"}},
                                400, "invalid_base64", ["data: URL"]),
    "empty image": ("/v1/caption", {"json": {"image": ""}}, 400, "invalid_image", ["empty"]),
    "empty question": ("/v1/vqa", {"json": {"image": b64(OK_IMAGE), "question": ""}},
                       422, "invalid_input", ["question is empty"]),
    "blank question": ("/v1/vqa", {"json": {"image": b64(OK_IMAGE), "question": "   "}},
                       422, "invalid_input", ["question is empty"]),
    "empty question (upload)": ("/v1/vqa", {"files": {"image": ("x.png", OK_IMAGE, "image/png")},
                                            "data": {"question": ""}}, 422, "invalid_input", ["question is empty"]),
    "empty candidate": ("/v1/vqa", {"json": {"image": b64(OK_IMAGE), "question": "q?", "candidates": ["yes", ""]}},
                        422, "invalid_input", ["candidates"]),
    "duplicate labels": ("/v1/classify", {"json": {"image": b64(OK_IMAGE), "labels": ["a", "a"]}},
                         422, "invalid_input", ["duplicate"]),
    "oversized body": ("/v1/summarize", {"json": {"text": "x" * (2 * MiB + 100)}},
                       413, "body_too_large", ["limit of 2,097,152 bytes"]),
    "oversized upload": ("/v1/caption", {"files": {"image": ("x.png", noise_bytes(3 * MiB), "image/png")}},
                         413, "body_too_large", ["limit"]),
    "text too long": ("/v1/summarize", {"json": {"text": "word " * 5000}}, 422, "text_too_long", ["20,000"]),
    "unknown task": ("/v1/segment", {"json": {"image": b64(OK_IMAGE)}}, 404, "unknown_task",
                     ["unknown task 'segment'", "vqa, caption, classify, ground, nli, summarize"]),
    "wrong JSON types": ("/v1/vqa", {"json": {"image": 12345, "question": ["is", "it"], "candidates": "yes"}},
                         422, "validation_error", ["image", "question", "candidates", "valid string"]),
    "wrong JSON types (nli)": ("/v1/nli", {"json": {"premise": None, "hypothesis": 3.5}},
                               422, "validation_error", ["premise", "hypothesis"]),
    "missing field": ("/v1/ground", {"json": {"image": b64(OK_IMAGE)}}, 422, "validation_error",
                      ["text", "Field required"]),
    "unknown field": ("/v1/caption", {"json": {"image": b64(OK_IMAGE), "promt": "x"}}, 422, "validation_error",
                      ["promt"]),
    "JSON array body": ("/v1/nli", {"json": [1, 2]}, 422, "validation_error", ["JSON object"]),
    "invalid JSON": ("/v1/nli", {"data": b'{"premise": "a", ', "headers": {"Content-Type": "application/json"}},
                     400, "invalid_json", ["not valid JSON"]),
    "empty body": ("/v1/nli", {"data": b"", "headers": {"Content-Type": "application/json"}},
                   400, "invalid_json", ["empty"]),
    "unsupported content type": ("/v1/nli", {"data": b"premise=a", "headers": {"Content-Type": "text/plain"}},
                                 415, "unsupported_media_type", ["text/plain"]),
    "empty label list": ("/v1/classify", {"json": {"image": b64(OK_IMAGE), "labels": []}}, 422, "invalid_input",
                         ["labels must be a non-empty list"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_clear_4xx_and_the_server_stays_healthy(server, name):
    path, kwargs, status, kind, words = CASES[name]
    r = server.post(path, **kwargs)
    assert r.status_code == status, f"{name}: {r.status_code} {r.text[:500]}"
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["type"] == kind, error
    for word in words:
        assert word in error["message"], (word, error["message"])
    assert_healthy(server)


def test_wrong_method_and_unknown_route_are_json_errors(server):
    r = server.get("/v1/vqa")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
    r = server.get("/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    assert_healthy(server)
