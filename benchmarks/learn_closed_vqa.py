"""Diagnosis for the demo's closed VQA: can the from-scratch nano model learn nodule presence/size
from demo VQA-RAD images when it trains on closed questions alone (single process, no Ray)?

Writes a VQA-RAD-layout demo folder with `--images` images (flows.demo_data.write_vqa_rad), trains a
fresh nano model on its closed questions (`--pres`: presence only) and prints, every `--every` steps,
yes-vs-no accuracy on the train and test images (first answer token; at most 96 rows each).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/learn_closed_vqa.py --pres --images 400 \
        --set dropout=0.0 encoder_drop_path_rate=0.0 decoder_drop_path_rate=0.0

Needs `dvc repro tokenizer` (artifacts/tokenizer).
"""
import argparse
import ast
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flows.demo_data import write_vqa_rad
from flows.ingest.schema import Record
from flows.train.examples import collate, make_example
from model.generalist import GalenModel
from model.config import get_config
from model.losses import label_smoothed_cross_entropy
from model.tokenizer import GalenTokenizer
p = argparse.ArgumentParser()
p.add_argument('--steps', type=int, default=300); p.add_argument('--lr', type=float, default=5e-4)
p.add_argument('--bs', type=int, default=16); p.add_argument('--images', type=int, default=96)
p.add_argument('--vision-lr', type=float, default=None); p.add_argument('--pres', action='store_true')
p.add_argument('--set', nargs='*', default=[]); p.add_argument('--every', type=int, default=25)
a = p.parse_args()
torch.manual_seed(0); random.seed(0); torch.set_num_threads(1)
tok = GalenTokenizer.load(ROOT / 'artifacts/tokenizer')
d = Path(tempfile.gettempdir()) / f'galen-closed-vqa-{a.images}'
if not d.exists(): write_vqa_rad(d, num_images=a.images)
def recs(split):
    out = []
    for r in json.load(open(d / f'{split}set.json')):
        if r['answer_type'] != 'CLOSED' or (a.pres and 'large' in r['question']): continue
        out.append(Record(task='vqa', split=split, dataset='vqa-rad', source_id=str(r['qid']), target=r['answer'],
                          image=(d / 'images' / r['image_name']).read_bytes(), question=r['question'], answer_type='CLOSED'))
    return out
train, test = recs('train'), recs('test')
print(len(train), 'train', len(test), 'test', 'yes-frac test', sum(r.target == 'yes' for r in test) / len(test))
over = {}
for kv in a.set:
    k, v = kv.split('='); over[k] = ast.literal_eval(v)
model = GalenModel(get_config('nano', vocab_size=len(tok), **over))
vis = [q_ for n, q_ in model.named_parameters() if 'embed_images' in n]
rest = [q_ for n, q_ in model.named_parameters() if 'embed_images' not in n]
opt = torch.optim.AdamW([{'params': rest, 'lr': a.lr}, {'params': vis, 'lr': a.vision_lr or a.lr}], weight_decay=0.01)
ex_train = [make_example(r, tok, 128) for r in train]; ex_test = [make_example(r, tok, 128) for r in test]
YES, NO = tok.encode_target('yes')[0], tok.encode_target('no')[0]
def acc(exs):
    model.eval()
    b = collate(exs[:96], tok)
    with torch.no_grad():
        lg = model(b.input_ids, b.decoder_input_ids, images=b.images, patch_masks=b.patch_masks).logits[:, 0].float()
    model.train()
    pred = torch.where(lg[:, YES] > lg[:, NO], YES, NO)
    return (pred == b.target[:, 0]).float().mean().item(), (pred == YES).float().mean().item()
t0 = time.time()
for step in range(1, a.steps + 1):
    b = collate(random.sample(ex_train, a.bs), tok)
    out = model(b.input_ids, b.decoder_input_ids, images=b.images, patch_masks=b.patch_masks)
    loss = label_smoothed_cross_entropy(out.logits, b.target, 0.1, tok.pad_id)
    opt.zero_grad(); loss.loss.backward(); torch.nn.utils.cliq_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % a.every == 0:
        (tr, _), (te, yf) = acc(ex_train), acc(ex_test)
        print(step, f'nll {loss.nll.item():.3f} train {tr:.3f} test {te:.3f} (pred yes {yf:.2f}) {time.time()-t0:.0f}s', flush=True)
