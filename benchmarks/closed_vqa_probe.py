"""Diagnosis for the demo's closed VQA (#4): where does "is there a nodule?" get lost? Logistic-regression
probes (scikit-learn) on the 72 train / 24 held-out demo VQA-RAD presence questions, over a model
folder's encoder output at image positions (mean- and max-pooled), at text positions, and the
decoder's first hidden state (the one the answer is read from). Prints train and test accuracy.

    python benchmarks/closed_vqa_probe.py artifacts/model
"""
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from galen.flows.ingest.schema import read_records
from galen.flows.shards import shard_paths
from galen.flows.train.examples import collate
from galen.flows.train.objectives import ExampleBuilder
from galen.model.generalist import GalenModel
from galen.model.vocabulary import GalenTokenizer

ROOT = Path(__file__).resolve().parents[1]

m = GalenModel.from_pretrained(sys.argv[1]).eval()
tok = GalenTokenizer.load(ROOT / "artifacts" / "tokenizer")
b = ExampleBuilder(tok, 128, candidates=json.load(open(ROOT / "data" / "shards" / "candidates.json")))
def data(split):
    ex, y = [], []
    for p in shard_paths(ROOT / "data" / "shards", "vqa", split):
        for r in read_records(p):
            if r.dataset == "vqa-rad" and "is there a nodule" in r.question:
                ex.append(b.own_task(r, random.Random(0))); y.append(r.target == "yes")
    return collate(ex, tok), np.array(y)
with torch.no_grad():
    feats = {}
    for split in ("train", "test"):
        bt, y = data(split)
        e = m.encode(bt.input_ids, bt.images, bt.patch_masks)
        h, n = e.hidden, e.num_image_tokens
        dh = m.decode(bt.decoder_input_ids, e)
        backbone = m.encoder.embed_images(bt.images).mean((2, 3))
        feats[split] = ({"resnet_mean": backbone, "img_mean": h[:, :n].mean(1), "img_max": h[:, :n].amax(1), "txt_mean": h[:, n:].mean(1),
                         "dec0": dh[:, 0]}, y)
for k in feats["train"][0]:
    clf = LogisticRegression(max_iter=3000).fit(feats["train"][0][k].numpy(), feats["train"][1])
    print(k, clf.score(feats["train"][0][k].numpy(), feats["train"][1]), clf.score(feats["test"][0][k].numpy(), feats["test"][1]))
