"""Training throughput under DeepSpeed ZeRO stages 0/1/2/3: `galen train` with 2 CPU workers (gloo).

Each contestant is a real fine-tuning job (Ray Train TorchTrainer, DeepSpeed, Ray Data shards,
MLflow in a temporary sqlite store) on the demo shards, from the same initial weights. The figure
is the workers' steady-state samples/s (measured inside the loop after the first step, so Ray
start-up, data-pipeline warm-up and the final save are excluded). Stages run one after another
in one process, in rotated order over repeats, so a busy moment of the machine hits each stage.

    python benchmarks/bench_zero.py [--steps 30] [--batch-size 8] [--repeats 2]

Needs `dvc repro shards tokenizer` first (data/shards, artifacts/tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--size", default="nano")
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-zero-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.chdir(ROOT)
    from galen.flows.params import load_params
    from galen.flows.train.generalist_trainer import load_train_config, train

    params = load_params("params.yaml")
    results: dict[int, list[float]] = {s: [] for s in args.stages}
    for r in range(args.repeats):
        order = args.stages[r % len(args.stages):] + args.stages[:r % len(args.stages)]
        for stage in order:
            cfg = load_train_config(params, "finetune", steps=args.steps, zero_stage=stage, num_workers=args.workers,
                                    batch_size=args.batch_size, size=args.size, ema_decay=None,
                                    storage_path=str(tmp / "ray"), run_name=f"zero{stage}-r{r}",
                                    out=str(tmp / f"model-{stage}-{r}"), metrics=str(tmp / f"metrics-{stage}-{r}.json"),
                                    checkpoint_every=10 ** 6,
                                    experiment="bench-zero")
            cfg.init = None  # from scratch: the same seeded initial weights for every stage
            metrics = train(cfg)
            results[stage].append(float(metrics["samples_per_s"]))
            print(f"repeat {r} ZeRO-{stage}: {metrics['samples_per_s']:.2f} samples/s", flush=True)
    summary = {f"zero{s}": {"samples_per_s_median": statistics.median(v), "runs": v} for s, v in results.items()}
    print(json.dumps({"workers": args.workers, "batch_per_worker": args.batch_size, "steps": args.steps,
                      "size": args.size, "cpus": os.cpu_count(), "results": summary}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
