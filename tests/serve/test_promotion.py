"""Promotion without downtime: while clients keep sending requests, `galen promote` moves the
`champion` alias to version 2; the replicas load it beside version 1 and switch in place. No
request fails, every answer names the version that produced it, and each client sees version 1
then version 2, never back."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.serve.conftest import assert_healthy, b64, png_bytes

CLIENTS = 8


def test_champion_moves_under_load_with_zero_failed_requests(server):
    assert server.version() == "1"
    image = b64(png_bytes(64, 64))
    bodies = [("nli", {"premise": "the lungs are clear", "hypothesis": "there is no effusion"}),
              ("vqa", {"image": image, "question": "is there an effusion?", "candidates": ["yes", "no"]})]
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(CLIENTS)]
    failures: list[str] = []

    def client(i: int) -> None:
        with requests.Session() as s:
            n = 0
            while not stop.is_set():
                task, body = bodies[(i + n) % len(bodies)]
                n += 1
                try:
                    r = s.post(f"{server.url}/v1/{task}", json=body, timeout=120)
                except requests.RequestException as e:
                    failures.append(f"client {i}: {type(e).__name__}: {e}")
                    continue
                if r.status_code != 200:
                    failures.append(f"client {i}: {r.status_code} {r.text[:200]}")
                    continue
                seen[i].append(r.json()["model"]["version"])

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client, i) for i in range(CLIENTS)]
        try:
            time.sleep(3)  # load is flowing on version 1
            assert all(v == ["1"] * len(v) for v in seen)
            message = server.registry.promote("2")
            assert "v2 is the new `champion`" in message, message
            deadline = time.time() + 180
            while time.time() < deadline and not all(v[-3:] == ["2"] * 3 for v in seen if v):
                time.sleep(0.5)
            time.sleep(2)  # and keeps flowing on version 2
        finally:
            stop.set()
            for f in futures:
                f.result()

    assert not failures, f"{len(failures)} failed requests during the promotion: {failures[:5]}"
    total = sum(len(v) for v in seen)
    assert total > 2 * CLIENTS
    for i, versions in enumerate(seen):
        assert versions and versions[0] == "1" and versions[-1] == "2", (i, versions)
        switch = versions.index("2")
        assert set(versions[switch:]) == {"2"}, f"client {i} went back to version 1: {versions}"
    assert server.version() == "2"
    assert server.get("/v1/models").json()["data"][0]["version"] == "2"
    assert_healthy(server)
