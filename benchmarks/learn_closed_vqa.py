"""Diagnosis for the demo's closed VQA: can the from-scratch nano model learn nodule presence/size
from demo VQA-RAD images when it trains on closed questions alone (single process, no Ray)?

Writes a VQA-RAD-layout demo folder with `--images` images (flows.demo_data.write_vqa_rad), trains a
fresh nano model on its closed questions (`--presence-only`: "is there a nodule" only) and prints,
every `--every` steps, yes-vs-no accuracy on train and test images (first answer token; at most 96
rows each) and the share of "yes" predictions.

    OMP_NUM_THREADS=1 python benchmarks/learn_closed_vqa.py --presence-only --images 400 \\
        --set dropout=0.0 encoder_drop_path_rate=0.0 decoder_drop_path_rate=0.0

Needs `dvc repro tokenizer` (artifacts/tokenizer).
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from galen.flows.demo_data import write_vqa_rad  # noqa: E402
from galen.flows.ingest.schema import Record  # noqa: E402
from galen.flows.train.examples import Example, collate, make_example  # noqa: E402
from galen.model.config import get_config  # noqa: E402
from galen.model.generalist import GalenModel  # noqa: E402
from galen.model.losses import label_smoothed_cross_entropy  # noqa: E402
from galen.model.vocabulary import GalenTokenizer  # noqa: E402


def closed_records(folder: Path, split: str, presence_only: bool) -> list[Record]:
    """The split's closed (yes/no) questions as ingest would give them."""
    records = []
    for row in json.loads((folder / f"{split}set.json").read_text()):
        if row["answer_type"] != "CLOSED" or (presence_only and "large" in row["question"]):
            continue
        records.append(Record(task="vqa", split=split, dataset="vqa-rad", source_id=str(row["qid"]),
                              target=row["answer"], image=(folder / "images" / row["image_name"]).read_bytes(),
                              question=row["question"], answer_type="CLOSED"))
    return records


@torch.no_grad()
def yes_no_accuracy(model: GalenModel, tok: GalenTokenizer, examples: list[Example]) -> tuple[float, float]:
    """(accuracy of "yes" vs "no" on the first answer token, share of "yes" predictions)."""
    yes, no = tok.encode_target("yes")[0], tok.encode_target("no")[0]
    model.eval()
    batch = collate(examples[:96], tok)
    logits = model(batch.input_ids, batch.decoder_input_ids, images=batch.images,
                   patch_masks=batch.patch_masks).logits[:, 0].float()
    model.train()
    pred = torch.where(logits[:, yes] > logits[:, no], yes, no)
    return (pred == batch.target[:, 0]).float().mean().item(), (pred == yes).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--presence-only", action="store_true")
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="nano config overrides")
    args = ap.parse_args()

    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(1)
    tok = GalenTokenizer.load(ROOT / "artifacts" / "tokenizer")
    folder = Path(tempfile.gettempdir()) / f"galen-closed-vqa-{args.images}"
    if not folder.exists():
        write_vqa_rad(folder, num_images=args.images)
    train, test = (closed_records(folder, s, args.presence_only) for s in ("train", "test"))
    print(f"{len(train)} train, {len(test)} test questions; test 'yes' share "
          f"{sum(r.target == 'yes' for r in test) / len(test):.3f}")

    overrides = {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    model = GalenModel(get_config("nano", vocab_size=len(tok), **overrides))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    train_ex = [make_example(r, tok, model.cfg.image_size) for r in train]
    test_ex = [make_example(r, tok, model.cfg.image_size) for r in test]
    start = time.time()
    for step in range(1, args.steps + 1):
        batch = collate(random.sample(train_ex, min(args.batch_size, len(train_ex))), tok)
        out = model(batch.input_ids, batch.decoder_input_ids, images=batch.images, patch_masks=batch.patch_masks)
        loss = label_smoothed_cross_entropy(out.logits, batch.target, 0.1, tok.pad_id)
        optimizer.zero_grad()
        loss.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.every == 0:
            (train_acc, _), (test_acc, yes_share) = (yes_no_accuracy(model, tok, ex) for ex in (train_ex, test_ex))
            print(f"{step} nll {loss.nll.item():.3f} train {train_acc:.3f} test {test_acc:.3f} "
                  f"(pred yes {yes_share:.2f}) {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
