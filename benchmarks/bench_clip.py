"""CLIP model throughput: embedding images and texts batched vs one by one, and training
samples/s with 2 Ray Train workers.

Embedding: `ClipModel.encode_images` / `encode_texts` of one named config (random weights:
speed does not depend on them), N inputs in one call of batch size B vs N calls of one input,
interleaved over repeats (benchmarks/_common.py). Images are the demo PathMNIST test patches
(decode + preprocessing included, as a request pays them), texts the demo captions.

Training (--train): `galen clip train` (Ray Train + DeepSpeed, 2 CPU workers, gloo, features
gathered across them) on the demo shards; the figure is the workers' steady-state samples/s
(measured inside the loop after the first step: Ray start-up and the final save excluded).

    python benchmarks/bench_clip.py --config micro [--n 256] [--batch 64] [--train]
    python benchmarks/bench_clip.py --config biomedclip --n 64 --batch 32 --device cuda

Needs `dvc repro shards tokenizer` first (data/shards, artifacts/tokenizer). The biomedclip config
runs with random weights and a stand-in BERT vocabulary (the real tokenizer's speed is similar).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from _common import (
    ROOT,
    add_run_args,
    command_line,
    fmt_s,
    interleaved,
    machine_facts,
    machine_line,
    markdown_table,
    quantiles,
    set_threads,
    write_json,
)


def _biomedclip(tmp: Path):
    """A BiomedCLIP-layout model with random weights and a small BERT vocabulary file."""
    import torch

    from galen.model.clip import ClipModel, HFTextEncoder, build_clip, get_spec

    spec = get_spec("biomedclip")
    clip = build_clip(spec)
    words = ["[PAD]", *[f"[unused{i}]" for i in range(99)], "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += sorted({w for line in _texts(10 ** 6) for w in line.replace(".", " .").split()})
    (tmp / "vocab.txt").write_text("\n".join(words) + "\n")
    (tmp / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}))
    torch.manual_seed(0)
    return ClipModel(clip, spec, HFTextEncoder(tmp, spec.context_length))


def _images(n: int) -> list[bytes]:
    from galen.flows.evaluate import eval_records

    records = eval_records(ROOT / "data" / "shards", "classification")
    return [records[i % len(records)].image for i in range(n)]


def _texts(n: int) -> list[str]:
    from galen.flows.evaluate import eval_records

    records = eval_records(ROOT / "data" / "shards", "caption")
    return [records[i % len(records)].target for i in range(n)]


def embedding(args: argparse.Namespace, tmp: Path) -> dict:
    import torch

    from galen.model.clip import ClipModel
    from galen.model.vocabulary import GalenTokenizer

    if args.config == "biomedclip":
        model = _biomedclip(tmp)
    else:
        model = ClipModel.create(args.config, GalenTokenizer.load(ROOT / "artifacts" / "tokenizer"), seed=0)
    model.clip.to(args.device)
    if args.device != "cpu":
        model.clip.half() if args.half else None
    images, texts = _images(args.n), _texts(args.n)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None

    def on_device(fn):
        def run(batch):
            if args.device == "cpu":
                return fn(batch)
            with torch.autocast("cuda", dtype=torch.float16, enabled=args.half):
                pixels = model.image_tensor(batch).to(args.device) if fn is model.encode_images else None
                if pixels is not None:
                    return torch.cat([model.clip.encode_image(pixels[i:i + args.batch], normalize=True)
                                      for i in range(0, len(pixels), args.batch)])
                ids = model.text_encoder(batch).to(args.device)
                return torch.cat([model.clip.encode_text(ids[i:i + args.batch], normalize=True)
                                  for i in range(0, len(ids), args.batch)])
        return run

    enc_img, enc_txt = on_device(model.encode_images), on_device(model.encode_texts)
    torch.set_grad_enabled(False)
    contestants = {
        "images batched": lambda: [enc_img(images[i:i + args.batch]) for i in range(0, len(images), args.batch)],
        "images one by one": lambda: [enc_img([im]) for im in images],
        "texts batched": lambda: [enc_txt(texts[i:i + args.batch]) for i in range(0, len(texts), args.batch)],
        "texts one by one": lambda: [enc_txt([t]) for t in texts],
    }
    times, _ = interleaved(contestants, args.repeats, args.warmup, sync)
    return {name: {"seconds": quantiles(t), "per_s": quantiles([args.n / x for x in t])} for name, t in times.items()}


def training(args: argparse.Namespace, tmp: Path) -> dict:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.chdir(ROOT)
    from galen.flows.params import load_params
    from galen.flows.train.clip_trainer import load_clip_train_config, train_clip

    runs = []
    for r in range(args.train_repeats):
        cfg = load_clip_train_config(load_params("params.yaml"), steps=args.train_steps, num_workers=2,
                                     batch_size=args.train_batch, storage_path=str(tmp / "ray"), run_name=f"bench-{r}",
                                     out=str(tmp / f"model-{r}"), metrics=None, experiment="bench-clip")
        cfg.checkpoint_every = 10 ** 6
        metrics = train_clip(cfg)
        runs.append(float(metrics["samples_per_s"]))
        print(f"training repeat {r}: {runs[-1]:.1f} samples/s", flush=True)
    return {"samples_per_s": quantiles(runs), "steps": args.train_steps, "batch_per_worker": args.train_batch,
            "workers": 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="micro", choices=["micro", "small", "biomedclip"])
    ap.add_argument("--n", type=int, default=256, help="inputs per contestant and repeat")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--half", action="store_true", help="fp16 autocast on a GPU")
    ap.add_argument("--train", action="store_true", help="also measure training samples/s (2 workers)")
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--train-repeats", type=int, default=1)
    add_run_args(ap, repeats=3)
    args = ap.parse_args()
    set_threads(args.threads)
    facts = machine_facts()
    tmp = Path(tempfile.mkdtemp(prefix="bench-clip-"))
    results = {"embedding": embedding(args, tmp)}
    rows = [[name, fmt_s(r["seconds"], 1.0, "s", 3), f"{r['per_s']['median']:.1f}"]
            for name, r in results["embedding"].items()]
    print(markdown_table([f"{args.config}, {args.n} inputs, batch {args.batch}, {args.device}", "time", "per s"], rows))
    if args.train:
        results["training"] = training(args, tmp)
        print(f"training: {results['training']['samples_per_s']['median']:.1f} samples/s (2 workers)")
    print(machine_line(facts))
    print(command_line())
    write_json(args.json, {"facts": facts, "command": command_line(), "results": results})


if __name__ == "__main__":
    main()
