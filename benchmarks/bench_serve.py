"""Serving throughput and latency: dynamic batching on vs off, side by side in one run, over real HTTP.

One Ray Serve instance runs two copies of the `GalenGeneralist` application from the same MLflow
registry version (one replica each, the same settings except `batching`), at /batched and
/unbatched. Closed-loop clients (each sends its next request when the last one is answered) load
one copy at a time, 1, 8 and 32 clients, for a fixed time; the copies alternate at every level
and repeat, so a busy moment of the machine hits both. Reported per copy and level: requests/s,
p50/p95/p99 latency, errors; and the batched/unbatched throughput ratio. Then a soak run: N
requests (default 10,000) of mixed tasks at 32 clients against the batched copy, which must end
with zero errors.

The model is a random nano model registered in a temporary MLflow registry (or --model FOLDER),
so the figures measure the serving stack and the model's batch efficiency, not answer quality.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, command_line, loadavg, machine_facts, machine_line, markdown_table, write_json  # noqa: E402

NAME = "galen-generalist"


# --------------------------------------------------------------------------------------------------
# A registered model to serve
# --------------------------------------------------------------------------------------------------

def make_model(out: Path) -> Path:
    """A random nano model with a tokenizer trained on the demo VQA text."""
    from galen.flows.cli import corpus_texts, main
    from galen.flows.demo_data import write_vqa_rad
    from galen.model.sentencepiece_text import train_sentencepiece
    from galen.model.vocabulary import GalenTokenizer

    write_vqa_rad(out / "vqa", num_images=24, image_size=128, seed=0)
    texts = list(corpus_texts([str(out / "vqa" / "trainset.json")], ["question", "answer"]))
    GalenTokenizer(train_sentencepiece(texts, out / "tokenizer", vocab_size=290)).save(out / "tokenizer")
    assert main(["model", "init", "--size", "nano", "--tokenizer", str(out / "tokenizer"), "--out",
                 str(out / "model")]) == 0
    return out / "model"


def register_model(folder: Path, root: Path) -> str:
    """Register `folder` as galen-generalist v1 (champion) in a sqlite registry under `root`."""
    from galen.flows.params import load_params
    from galen.flows.registry import MetricRule, RegistryConfig, promote, register

    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = RegistryConfig(model_name=NAME, metrics=[MetricRule("nli.accuracy")])
    metrics = root / "metrics.json"
    metrics.write_text(json.dumps({"nli": {"accuracy": 0.5}}))
    register(folder, config, load_params(ROOT / "params.yaml"), metrics_file=metrics, uri=uri, project=ROOT)
    promote(config, version="1", uri=uri)
    return uri


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------

def request_bodies(task: str) -> list[tuple[str, dict[str, Any]]]:
    """(route, JSON body) pairs; `mixed` cycles through closed-set VQA, NLI, classification and grounding."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buf, "PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    bodies = {
        "vqa": ("vqa", {"image": image, "question": "is there a pleural effusion?", "candidates": ["yes", "no"]}),
        "nli": ("nli", {"premise": "the chest x-ray shows no focal consolidation",
                        "hypothesis": "the patient has pneumonia"}),
        "classify": ("classify", {"image": image, "labels": ["normal", "pneumonia", "effusion"]}),
        "ground": ("ground", {"image": image, "text": "the left lower lobe"}),
    }
    if task == "mixed":
        return [bodies[k] for k in ("vqa", "nli", "classify", "ground")]
    return [bodies[task]]


async def load(url: str, bodies: list[tuple[str, dict[str, Any]]], clients: int, *, seconds: float | None = None,
               total: int | None = None) -> dict[str, Any]:
    """Closed-loop load: `clients` concurrent senders, for `seconds` or until `total` requests."""
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    stop_at = time.perf_counter() + seconds if seconds else None

    async def client(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal sent
        k = i
        while True:
            if stop_at is not None and time.perf_counter() >= stop_at:
                return
            if total is not None:
                if sent >= total:
                    return
                sent += 1
            route, body = bodies[k % len(bodies)]
            k += 1
            t0 = time.perf_counter()
            try:
                call = session.get(f"{url}/{route}") if body is None else session.post(f"{url}/v1/{route}", json=body)
                async with call as r:
                    data = await r.read()
                    if r.status != 200:
                        errors.append(f"{r.status} {data[:200]!r}")
                        continue
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                errors.append(f"{type(e).__name__}: {e}")
                continue
            latencies.append(time.perf_counter() - t0)

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session, i) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    return {"requests": len(latencies), "errors": len(errors), "error_samples": errors[:5], "seconds": elapsed,
            "latencies": latencies}


def model_ceiling(folder: Path, task: str, batch: int, repeats: int = 5) -> dict[str, Any]:
    """The model's own batch gain, in this process without any serving: ms per request answering
    `batch` requests one call at a time vs in one call (interleaved, median of repeats)."""
    import statistics

    import torch
    from _common import interleaved

    from galen.model.predict import GalenPredictor
    from galen.serve.api import TASKS

    torch.set_num_threads(1)
    predictor = GalenPredictor.load(folder)
    requests = []
    for route, body in request_bodies(task):
        requests.append({"task": TASKS[route][0], **body})
    jobs = [requests[i % len(requests)] for i in range(batch)]
    times, _ = interleaved({"one at a time": lambda: [predictor.predict([j]) for j in jobs],
                            "one call": lambda: predictor.predict(jobs)}, repeats=repeats, warmup=1)
    one, together = (statistics.median(times[k]) / batch * 1000 for k in ("one at a time", "one call"))
    return {"batch": batch, "ms_per_request_alone": one, "ms_per_request_batched": together, "ratio": one / together}


def replica_stats(url: str) -> dict[str, int]:
    """The replica's model calls / requests / model milliseconds so far (GET /health)."""
    with urllib.request.urlopen(f"{url}/health") as r:
        return json.loads(r.read())["stats"]


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    lat = sorted(x for r in runs for x in r["latencies"])
    n, secs = sum(r["requests"] for r in runs), sum(r["seconds"] for r in runs)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] * 1000 if lat else float("nan")

    return {"requests": n, "errors": sum(r["errors"] for r in runs), "seconds": round(secs, 2),
            "rps": n / secs if secs else 0.0, "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "rps_per_repeat": [r["requests"] / r["seconds"] for r in runs],
            "error_samples": [e for r in runs for e in r["error_samples"]][:5]}


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="nli", choices=["nli", "vqa", "classify", "ground", "mixed"],
                   help="requests of the batching comparison")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10.0, help="per copy, level and repeat")
    p.add_argument("--repeats", type=int, default=2, help="alternations of the two copies per level")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--soak", type=int, default=10_000, help="requests of the soak run (0: skip)")
    p.add_argument("--soak-task", default="mixed", choices=["nli", "vqa", "classify", "ground", "mixed"])
    p.add_argument("--soak-clients", type=int, default=32)
    p.add_argument("--ceiling-tasks", nargs="+", default=["nli", "vqa", "classify", "ground"],
                   choices=["nli", "vqa", "classify", "ground"],
                   help="tasks whose model-alone batch gain is measured too (besides --task)")
    p.add_argument("--model", help="a Galen model folder to register and serve (default: a random nano model)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import ray
    from ray import serve

    from galen.serve.app import GalenGeneralist
    from galen.serve.settings import ServeSettings

    facts = machine_facts()
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    folder = Path(args.model) if args.model else make_model(tmp)
    uri = register_model(folder, tmp)
    ceilings = {}
    for task in dict.fromkeys([args.task, *args.ceiling_tasks]):
        ceilings[task] = model_ceiling(folder, task, args.max_batch_size)
        print(f"model alone ({task}): {ceilings[task]['ms_per_request_alone']:.1f} ms per request one at a time, "
              f"{ceilings[task]['ms_per_request_batched']:.1f} ms in calls of {ceilings[task]['batch']}: "
              f"{ceilings[task]['ratio']:.2f}x", flush=True)
    ceiling = ceilings[args.task]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        max_ongoing = max(64, 2 * max(args.clients + [args.soak_clients]))
        for name, batching in (("batched", True), ("unbatched", False)):
            settings = ServeSettings.from_params(ROOT / "params.yaml", {
                "tracking_uri": uri, "batching": batching, "max_batch_size": args.max_batch_size,
                "batch_wait_timeout_s": args.batch_wait_ms / 1000, "poll_interval_s": 0,
                "model_cache": str(tmp / "models")})
            app = GalenGeneralist.options(num_replicas=1, max_ongoing_requests=max_ongoing,
                                          ray_actor_options={"num_cpus": 1}).bind(settings.to_dict())
            serve.run(app, name=name, route_prefix=f"/{name}")
        urls = {"batched": f"{base}/batched", "unbatched": f"{base}/unbatched"}
        bodies = request_bodies(args.task)
        for url in urls.values():  # warm both copies up (first calls pay lazy initialisation)
            asyncio.run(load(url, bodies, 4, total=16))

        results: dict[str, Any] = {"machine": facts, "command": command_line(), "args": vars(args),
                                   "model_ceiling": ceiling, "model_ceilings": ceilings, "levels": {}}
        rows = []
        for level, clients in enumerate(args.clients):
            runs: dict[str, list[dict[str, Any]]] = {"batched": [], "unbatched": []}
            calls = {name: {"model_calls": 0, "requests": 0, "model_ms": 0} for name in urls}
            for r in range(args.repeats):
                order = ["batched", "unbatched"] if (level + r) % 2 == 0 else ["unbatched", "batched"]
                for name in order:
                    before = replica_stats(urls[name])
                    runs[name].append(asyncio.run(load(urls[name], bodies, clients, seconds=args.seconds)))
                    after = replica_stats(urls[name])
                    for k in calls[name]:
                        calls[name][k] += after[k] - before[k]
                    print(f"  {clients:3d} clients {name:9s} repeat {r}: {runs[name][-1]['requests']} requests "
                          f"in {runs[name][-1]['seconds']:.1f} s, {runs[name][-1]['errors']} errors", flush=True)
            stats = {name: summary(rs) for name, rs in runs.items()}
            ratio = stats["batched"]["rps"] / stats["unbatched"]["rps"] if stats["unbatched"]["rps"] else float("nan")
            paired = [b / u for b, u in zip(stats["batched"]["rps_per_repeat"], stats["unbatched"]["rps_per_repeat"])
                      if u]
            for name in stats:
                c = calls[name]
                stats[name].update(c, mean_batch=c["requests"] / max(1, c["model_calls"]),
                                   model_ms_per_request=c["model_ms"] / max(1, c["requests"]))
            results["levels"][clients] = {**stats, "ratio": ratio, "ratio_per_repeat": paired}
            for name in ("batched", "unbatched"):
                st = stats[name]
                rows.append([clients, name, f"{st['rps']:.1f}", f"{st['p50_ms']:.0f}", f"{st['p95_ms']:.0f}",
                             f"{st['p99_ms']:.0f}", st["requests"], st["errors"], f"{st['mean_batch']:.1f}",
                             f"{st['model_ms_per_request']:.1f}",
                             f"{ratio:.2f}× ({', '.join(f'{x:.2f}' for x in paired)})" if name == "batched" else ""])
        health = {name: replica_stats(url) for name, url in urls.items()}
        results["replica_stats"] = health
        probe = asyncio.run(load(urls["batched"], [("health", None)], 32, seconds=5))
        results["overhead_probe"] = {"route": "GET /health", "clients": 32,
                                     "rps": probe["requests"] / probe["seconds"], "errors": probe["errors"]}

        print(f"\n### Batching on vs off ({args.task} requests, {args.seconds:g} s x {args.repeats} per copy and "
              "level)\n")
        print(markdown_table(["clients", "copy", "requests/s", "p50 ms", "p95 ms", "p99 ms", "requests", "errors",
                              "mean batch", "model ms/request", "batched/unbatched (per repeat)"], rows))
        print(f"\nserving alone (GET /health, 32 clients, no model): {results['overhead_probe']['rps']:.0f} "
              "requests/s")
        print(f"\nthe model alone: {ceiling['ms_per_request_alone']:.1f} ms per request one at a time, "
              f"{ceiling['ms_per_request_batched']:.1f} ms in calls of {ceiling['batch']} "
              f"({ceiling['ratio']:.2f}x: the most batching can gain here)\n")
        print(markdown_table(["task (model alone, no serving)", "ms/request one at a time",
                              f"ms/request in calls of {args.max_batch_size}", "gain"],
                             [[task, f"{c['ms_per_request_alone']:.1f}", f"{c['ms_per_request_batched']:.1f}",
                               f"{c['ratio']:.2f}×"] for task, c in ceilings.items()]))
        for name, calls in health.items():
            print(f"\n{name} copy: {calls['requests']} requests in {calls['model_calls']} model calls (mean batch "
                  f"{calls['requests'] / max(1, calls['model_calls']):.1f}, largest {calls['largest_batch']}), "
                  f"{calls['model_ms'] / max(1, calls['requests']):.1f} ms of model time per request")

        if args.soak:
            print(f"\n### Soak: {args.soak:,} requests ({args.soak_task}), {args.soak_clients} clients, batched\n",
                  flush=True)
            soak = asyncio.run(load(urls["batched"], request_bodies(args.soak_task), args.soak_clients,
                                    total=args.soak))
            st = summary([soak])
            results["soak"] = {**st, "task": args.soak_task, "clients": args.soak_clients}
            print(markdown_table(["requests", "errors", "seconds", "requests/s", "p50 ms", "p95 ms", "p99 ms"],
                                 [[st["requests"] + st["errors"], st["errors"], f"{st['seconds']:.0f}",
                                   f"{st['rps']:.1f}", f"{st['p50_ms']:.0f}", f"{st['p95_ms']:.0f}",
                                   f"{st['p99_ms']:.0f}"]]))
            if st["errors"]:
                print("errors:", st["error_samples"])
        print(f"\n{machine_line(facts)}")
        results["loadavg_at_end"] = loadavg()
        write_json(args.json, results)
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.soak and results.get("soak", {}).get("errors"):
        raise SystemExit(f"soak run: {results['soak']['errors']} errors")


if __name__ == "__main__":
    main()
