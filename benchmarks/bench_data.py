"""Data stages throughput: ingest + validate + shard of the demo set, one process vs a process pool.

Both contestants run the same stage functions on the same generated demo data, interleaved over
repeats: "serial" ingests the datasets one after another and shards with one process;
"parallel" ingests the datasets concurrently in a process pool and shards with the same number of
worker processes. Images/s counts rows that carry an image. Also times a no-op `dvc repro` in
this repository (every stage up to date), which is what a user waits for when nothing changed.

    python benchmarks/bench_data.py [--scale 1.0] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from galen.flows.demo_data import write_demo  # noqa: E402
from galen.flows.ingest import ingest  # noqa: E402
from galen.flows.ingest.schema import read_records  # noqa: E402
from galen.flows.params import load_params  # noqa: E402
from galen.flows.shards import ShardConfig, build_shards  # noqa: E402
from galen.flows.validate import ValidationConfig, validate  # noqa: E402


def _ingest_one(job: tuple[str, str, str, dict]) -> int:
    fmt, source, out, options = job
    return ingest(fmt, source, out, **options)["records"]


def run_pipeline(demo: Path, work: Path, workers: int) -> float:
    """Seconds for ingest (all datasets) + validate + shards."""
    datasets = load_params(ROOT / "params.yaml")["ingest"]["datasets"]
    jobs = [(d["format"], str(demo / Path(d["source"]).relative_to("data/raw/demo")), str(work / "ingested" / name),
             d.get("options") or {}) for name, d in datasets.items()]
    start = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_ingest_one, jobs))
    else:
        for job in jobs:
            _ingest_one(job)
    validate([work / "ingested" / n for n in datasets], work / "validated", ValidationConfig(max_bad_fraction=1.0))
    build_shards(work / "validated", work / "shards", ShardConfig(models={"generalist": 128}, workers=workers))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="demo data scale")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="galen-bench-data-"))
    try:
        demo = tmp / "demo"
        write_demo(demo, seed=0, scale=args.scale)
        times: dict[str, list[float]] = {"serial": [], "parallel": []}
        order = ["serial", "parallel"]
        run_pipeline(demo, tmp / "warmup", 1)  # warm caches and imports
        for r in range(args.repeats):
            for name in (order if r % 2 == 0 else order[::-1]):
                work = tmp / f"{name}-{r}"
                times[name].append(run_pipeline(demo, work, 1 if name == "serial" else args.workers))
                shutil.rmtree(work)
        rows = [r for r in read_records(tmp / "warmup" / "validated")]
        images = sum(r.image is not None for r in rows)

        noop = []
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        status = subprocess.run(["dvc", "status"], cwd=ROOT, env=env, capture_output=True, text=True)
        up_to_date = "up to date" in status.stdout
        if up_to_date:
            for _ in range(3):
                t = time.perf_counter()
                subprocess.run(["dvc", "repro"], cwd=ROOT, env=env, capture_output=True, check=True)
                noop.append(time.perf_counter() - t)

        med = {k: statistics.median(v) for k, v in times.items()}
        ratios = [s / p for s, p in zip(times["serial"], times["parallel"])]
        print(f"\n## Data stages: ingest + validate + shard, demo scale {args.scale} "
              f"({len(rows)} rows, {images} with images), {os.cpu_count()} CPUs\n")
        print("| mode | workers | median time | images/s | runs |")
        print("|---|---|---|---|---|")
        for name in order:
            w = 1 if name == "serial" else args.workers
            print(f"| {name} | {w} | {med[name]:.2f} s | {images / med[name]:.0f} | "
                  f"{', '.join(f'{t:.2f}' for t in times[name])} |")
        print(f"\nparallel speed-up (paired median): {statistics.median(ratios):.2f}x")
        if noop:
            print(f"no-op `dvc repro` in this repository (all stages up to date): median {statistics.median(noop):.2f} s "
                  f"({', '.join(f'{t:.2f}' for t in noop)})")
        else:
            print("no-op `dvc repro`: skipped — run `dvc repro` first so that every stage is up to date")
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": len(rows), "images": images, "times": times,
                                                   "speedup": statistics.median(ratios), "noop_repro": noop},
                                                  indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
