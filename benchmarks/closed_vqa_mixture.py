"""Diagnosis for the demo's closed VQA (#4): a single-process replica of the fine-tuning loop (no Ray or
DeepSpeed; the trainer's StepPlanner, ExampleBuilder, loss and EMA) that prints, every `--every` steps,
first-token yes-vs-no accuracy on the held-out closed VQA-RAD questions (EMA weights and raw weights)
and the per-task training loss. Variants: task weights (`--w vqa=8,caption=0`), `--avg sample|token`,
`--lr`, `--closed-only` (VQA-RAD closed questions only), `--closed-first N --closed-weight W --rewarm R`
(the fine-tuning curriculum: N steps of closed questions alone, then the mixture with closed questions
at weight W and the lr ramped up again over R steps; `--closed-datasets vqa-rad,slake` takes SLAKE's
closed questions too, as the trainer's `vqa_closed` does), `--init scratch`, `--vqa-images N` (a fresh
demo VQA-RAD of N images in place of the shards' one).

    python benchmarks/closed_vqa_mixture.py --steps 600 --threads 1 --avg sample --w vqa=8

Needs `dvc repro pretrain` (artifacts/pretrained, data/shards, artifacts/tokenizer).
"""
import argparse
import json
import random
import time
from pathlib import Path

import torch

from galen.flows.ingest.schema import read_records
from galen.flows.shards import shard_paths
from galen.flows.train.ema import WeightEMA
from galen.flows.train.examples import collate
from galen.flows.train.generalist_trainer import _lr_lambda
from galen.flows.train.objectives import ExampleBuilder, StepPlanner, group_by_image_shape, step_rng
from galen.model.config import get_config
from galen.model.generalist import GalenModel
from galen.model.losses import label_smoothed_cross_entropy
from galen.model.vocabulary import GalenTokenizer

ROOT = Path(__file__).resolve().parents[1]

ap = argparse.ArgumentParser()
ap.add_argument("--init", default=str(ROOT / "artifacts" / "pretrained"))
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--lr", type=float, default=5e-4)
ap.add_argument("--bs", type=int, default=16)
ap.add_argument("--avg", default="token")
ap.add_argument("--w", default="")  # task=weight,...
ap.add_argument("--ema", type=float, default=0.99)
ap.add_argument("--every", type=int, default=50)
ap.add_argument("--warmup", type=float, default=0.05)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--vqa-images", type=int, default=0)
ap.add_argument("--closed-only", action="store_true")
ap.add_argument("--closed-first", type=int, default=0)  # curriculum: closed VQA only for the first N steps
ap.add_argument("--closed-weight", type=float, default=0.0)  # closed VQA as its own mixture component
ap.add_argument("--rewarm", type=int, default=0)
ap.add_argument("--closed-datasets", default="vqa-rad")  # the trainer's vqa_closed: vqa-rad,slake  # after the closed-only phase, ramp the lr again over N steps
a = ap.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(0)
S = ROOT / "data" / "shards"
man = json.loads((S / "manifest.json").read_text())
tok = GalenTokenizer.load(ROOT / "artifacts" / "tokenizer")
cands = json.loads((S / "candidates.json").read_text())
tasks = ["vqa", "caption", "classification", "nli", "summarization", "grounding"]
weights = {t: float(man.get("mixture", {}).get(t, 1.0)) for t in tasks}
for kv in filter(None, a.w.split(",")):
    k, v = kv.split("="); weights[k] = float(v)
rows = {t: [r for p in shard_paths(S, t, "train") for r in read_records(p)] for t in tasks}
def raw_vqa(n):
    import tempfile

    from galen.flows.demo_data import write_vqa_rad
    from galen.flows.ingest.schema import Record
    d = Path(tempfile.gettempdir()) / f"galen-demo-vqa{n}"
    if not d.exists(): write_vqa_rad(d, n, 128, seed=0)
    out = {}
    for split in ("train", "test"):
        out[split] = [Record(task="vqa", split=split, dataset="vqa-rad", source_id=str(q["qid"]), target=q["answer"],
                             image=(d / "images" / q["image_name"]).read_bytes(), question=q["question"],
                             answer_type=q["answer_type"]) for q in json.loads((d / f"{split}set.json").read_text())]
    return out
if a.vqa_images:
    vq = raw_vqa(a.vqa_images)
    rows["vqa"] = [r for r in rows["vqa"] if r.dataset != "vqa-rad"] + vq["train"]
    random.Random(0).shuffle(rows["vqa"])
if a.closed_only: rows["vqa"] = [r for r in rows["vqa"] if r.dataset == "vqa-rad" and (r.answer_type or "").upper() == "CLOSED"]
ap2 = a.closed_datasets.split(",")
rows["vqa_closed"] = [r for r in rows["vqa"] if r.dataset in ap2 and (r.answer_type or "").upper() == "CLOSED"]
counts = {t: len(v) for t, v in rows.items()}
model = GalenModel.from_pretrained(a.init) if a.init != "scratch" else GalenModel(get_config("nano", vocab_size=len(tok), image_size=128))
mix = dict(weights, **({"vqa_closed": a.closed_weight} if a.closed_weight else {}))
planner = StepPlanner(mix, {t: (t,) for t in mix}, counts, 0)
first = StepPlanner({"vqa": 1.0}, {"vqa": ("vqa_closed",)}, counts, 0)
builder = ExampleBuilder(tok, 128, candidates=cands, code_image_size=model.cfg.code_image_size)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.01)
warm = int(a.steps * a.warmup)
sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(a.steps, warm, a.closed_first, a.rewarm))  # the trainer's schedule
ema = WeightEMA(list(model.parameters()), a.ema) if a.ema else None
test = [r for p in shard_paths(S, "vqa", "test") for r in read_records(p) if r.dataset == "vqa-rad" and (r.answer_type or "").upper() == "CLOSED"]
if a.vqa_images: test = [r for r in vq["test"] if r.answer_type == "CLOSED"][:96]
test_ex = [builder.own_task(r, random.Random(0)) for r in test]
yes, no = tok.encode_target("yes")[0], tok.encode_target("no")[0]
@torch.no_grad()
def probe(use_ema=True):
    model.eval()
    use_ema = use_ema and ema is not None
    if use_ema: ema.swap()
    b = collate(test_ex, tok)
    lg = model(b.input_ids, b.decoder_input_ids, images=b.images, patch_masks=b.patch_masks).logits[:, 0]
    if use_ema: ema.swap()
    model.train()
    pred = torch.where(lg[:, yes] > lg[:, no], yes, no)
    return (pred == b.target[:, 0]).float().mean().item(), (pred == yes).float().mean().item()
pos = {t: 0 for t in counts}
t0 = time.time(); tl = {}
print("weights", weights, "closed test", len(test_ex), "probe@0", probe(), flush=True)
for step in range(a.steps):
    rng = step_rng(0, 0, step, 0)
    exs = []
    for slot in (first if step < a.closed_first else planner).plan(step, 0, a.bs):
        r = rows[slot.source][pos[slot.source] % counts[slot.source]]; pos[slot.source] += 1
        exs.append(builder.build(slot.objective, r, rng))
    parts = []; weight = 0
    for g in group_by_image_shape(exs):
        b = collate(g, tok)
        out = model(b.input_ids, b.decoder_input_ids, images=b.images, patch_masks=b.patch_masks, code_masks=b.code_masks)
        l = label_smoothed_cross_entropy(out.logits, b.target, 0.1, tok.pad_id, allowed=b.allowed, average=a.avg)
        parts.append(l.loss * l.weight); weight += l.weight
        for t in set(b.tasks):
            m = torch.tensor([x == t for x in b.tasks]); tl.setdefault(t, []).append(l.mean_nll(m))
    loss = sum(parts) / weight
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
    if ema: ema.update()
    if (step + 1) % a.every == 0:
        acc, y = probe(); raw, _ = probe(False)
        print(f"step {step+1} {time.time()-t0:.0f}s closed-acc {acc:.3f} yes {y:.2f} raw {raw:.3f} " + " ".join(f"{k}={sum(v)/len(v):.2f}" for k, v in sorted(tl.items())), flush=True)
        tl = {}
