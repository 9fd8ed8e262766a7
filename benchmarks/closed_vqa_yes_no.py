"""First-token yes-vs-no accuracy of trained model folders on the demo's held-out closed VQA-RAD
questions (presence and size separately): does a model read the image, or answer the prior?

    python benchmarks/closed_vqa_yes_no.py artifacts/pretrained artifacts/model

Needs the shards stage (data/shards).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from learn_closed_vqa import yes_no_accuracy  # noqa: E402

from galen.flows.evaluate import eval_records  # noqa: E402
from galen.flows.train.examples import make_example  # noqa: E402
from galen.model.generalist import GalenModel  # noqa: E402
from galen.model.vocabulary import GalenTokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="model folders")
    ap.add_argument("--shards", default=str(ROOT / "data" / "shards"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    records = [r for r in eval_records(args.shards, "vqa") if r.dataset == "vqa-rad" and r.answer_type == "CLOSED"]
    groups = {"all": records, "presence": [r for r in records if "large" not in (r.question or "")],
              "size": [r for r in records if "large" in (r.question or "")]}
    for folder in args.models:
        model, tok = GalenModel.from_pretrained(folder), GalenTokenizer.load(folder)
        cells = []
        for name, recs in groups.items():
            if recs:
                acc, yes = yes_no_accuracy(model, tok, [make_example(r, tok, model.cfg.image_size) for r in recs])
                majority = max(sum(r.target.lower() == "yes" for r in recs), sum(r.target.lower() == "no" for r in recs))
                cells.append(f"{name} {acc:.3f} (n={len(recs)}, majority {majority / len(recs):.3f}, says yes {yes:.2f})")
        print(f"{folder}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
