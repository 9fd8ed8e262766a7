"""Closed-set answering: trie-constrained beam search vs all-candidates scoring vs free generation.

A VQA-RAD-like closed answer set of ~500 short medical answers (1-5 words: yes/no, organs,
sides, modalities, planes, findings, counts, sizes, signal/density, "finding in organ" ...) is
tokenized with Galen's tokenizer (a SentencePiece model trained here on the questions and
answers; a word-level fallback is used only if `model.vocabulary` does not import). A `nano`
model is first trained (not timed; fixed seed) to answer a set of questions whose answers come
from the set, so that accuracy means something. Then, on the same questions and batches, three
answering methods are timed side by side (interleaved, rotated order, warmup first):

  * trie   - `answer_closed_set(mode="trie", beam_size=5)`: beam search restricted to the trie;
  * all    - `answer_closed_set(mode="all")`: every candidate scored by teacher forcing
             (`score_candidates`, default chunk_size);
  * free   - `generate(beam_size=5)` without constraints, exact match against the reference.

Reported: questions/s, trie-vs-all speed ratio (paper: >=16x), agreement of trie and all on the
chosen answer, and the accuracy of all three.

    python benchmarks/bench_closed_set.py
    python benchmarks/bench_closed_set.py --questions 128 --train-steps 400 --json out.json
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch  # noqa: E402
from _common import (  # noqa: E402
    add_run_args,
    command_line,
    fmt_x,
    interleaved,
    machine_facts,
    machine_line,
    markdown_table,
    paired_ratio,
    quantiles,
    set_threads,
    write_json,
)

from galen.model.config import get_config  # noqa: E402
from galen.model.decoding import CandidateTrie, GenerationConfig, answer_closed_set, generate, score_candidates  # noqa: E402
from galen.model.generalist import GalenModel  # noqa: E402
from galen.model.losses import label_smoothed_cross_entropy  # noqa: E402

# --------------------------------------------------------------------------------------------------
# A VQA-RAD-like answer vocabulary
# --------------------------------------------------------------------------------------------------
ORGANS = [
    "lung", "liver", "kidney", "spleen", "heart", "brain", "pancreas", "gallbladder", "bladder", "stomach",
    "colon", "small bowel", "aorta", "trachea", "esophagus", "thyroid", "adrenal gland", "prostate", "uterus",
    "ovary", "diaphragm", "mediastinum", "pleura", "cerebellum", "lateral ventricle", "basal ganglia",
    "thalamus", "pons", "spinal cord", "vertebra", "rib", "clavicle", "sternum", "femur", "pelvis", "appendix",
    "duodenum", "rectum", "sigmoid colon", "breast", "frontal lobe", "temporal lobe", "parietal lobe",
    "occipital lobe", "sinus", "orbit", "mandible", "humerus", "hip", "knee",
]
PAIRED = ["lung", "kidney", "adrenal gland", "ovary", "breast", "hip", "knee", "frontal lobe", "temporal lobe",
          "parietal lobe", "occipital lobe", "lateral ventricle", "hemidiaphragm", "pleural space", "clavicle",
          "femur", "humerus", "orbit", "maxillary sinus", "basal ganglia"]
LOBES = ["right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe",
         "lingula", "right lobe of liver", "left lobe of liver", "caudate lobe"]
SIDES = ["left", "right", "bilateral", "midline", "both sides", "left side", "right side", "anterior",
         "posterior", "superior", "inferior", "medial", "lateral"]
MODALITIES = ["ct", "mri", "x-ray", "ultrasound", "pet", "pet ct", "mra", "angiography", "fluoroscopy",
              "mammography", "contrast enhanced ct", "non contrast ct", "ct with contrast", "ct without contrast",
              "t1 weighted", "t2 weighted", "flair", "dwi", "adc map", "gradient echo", "t1 with contrast",
              "pa view", "ap view", "lateral view", "plain film", "barium swallow", "ivp", "cta"]
PLANES = ["axial", "coronal", "sagittal", "axial plane", "coronal plane", "sagittal plane", "transverse"]
FINDINGS = [
    "pneumothorax", "pleural effusion", "cardiomegaly", "consolidation", "atelectasis", "pneumonia", "nodule",
    "mass", "edema", "hemorrhage", "infarct", "fracture", "abscess", "cyst", "tumor", "metastasis", "lymphadenopathy",
    "calcification", "emphysema", "fibrosis", "aneurysm", "dissection", "stenosis", "occlusion", "thrombus",
    "hydronephrosis", "kidney stone", "gallstones", "cholecystitis", "appendicitis", "diverticulitis",
    "bowel obstruction", "free air", "ascites", "splenomegaly", "hepatomegaly", "cirrhosis", "fatty liver",
    "pancreatitis", "hydrocephalus", "midline shift", "subdural hematoma", "epidural hematoma",
    "subarachnoid hemorrhage", "ischemic stroke", "glioblastoma", "meningioma", "multiple sclerosis",
    "herniation", "edema of the brain", "pulmonary embolism", "pericardial effusion", "aortic aneurysm",
    "rib fracture", "compression fracture", "osteophytes", "disc herniation", "scoliosis", "osteoporosis",
    "bone metastasis", "ground glass opacity", "cavitation", "bronchiectasis", "hilar enlargement",
    "widened mediastinum", "air fluid level", "mucosal thickening", "soft tissue swelling", "foreign body",
    "nasogastric tube", "endotracheal tube", "chest tube", "pacemaker", "central line", "surgical clips",
    "no abnormality", "normal", "abnormal", "enhancing lesion", "ring enhancing lesion", "necrosis",
]
FEATURES = ["hyperdense", "hypodense", "isodense", "hyperintense", "hypointense", "isointense", "enhancing",
            "non enhancing", "calcified", "cystic", "solid", "heterogeneous", "homogeneous", "well defined",
            "ill defined", "irregular", "smooth", "lobulated", "spiculated", "round", "oval", "air", "fat", "fluid",
            "blood", "contrast", "bone", "soft tissue", "gas", "black", "white", "gray"]
LOCATED = ["mass", "nodule", "cyst", "lesion", "hemorrhage", "infarct", "fracture", "abscess", "tumor", "stone"]
WHERE = ["liver", "right lung", "left lung", "brain", "right kidney", "left kidney", "spleen", "pancreas",
         "colon", "bladder", "right lobe", "left lobe", "frontal lobe", "cerebellum"]
COUNT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def answer_set(n: int) -> list[str]:
    """n distinct short answers, deterministic, in a VQA-RAD-like mix."""
    out: list[str] = []

    def add(items):
        for a in items:
            if a not in out:
                out.append(a)

    add(["yes", "no"])
    add(ORGANS)
    add(SIDES)
    add(MODALITIES)
    add(PLANES)
    add(FINDINGS)
    add(FEATURES)
    add(LOBES)
    add([str(i) for i in range(0, 13)] + COUNT_WORDS)
    add([f"{x} cm" for x in ("0.5", "1", "1.5", "2", "2.5", "3", "3.5", "4", "5", "6", "7", "8", "10")]
        + [f"{x} mm" for x in ("2", "3", "5", "7", "8", "10", "12", "15", "20")])
    add([f"{s} {o}" for o in PAIRED for s in ("left", "right")])
    add([f"bilateral {o}s" for o in ("lungs", "kidneys", "adrenal glands", "ovaries", "breasts", "hips")])
    add([f"{f} in the {w}" for f in LOCATED for w in WHERE])
    add([f"{s} {f}" for f in ("pleural effusion", "pneumothorax", "hydronephrosis", "consolidation") for s in
         ("left", "right", "bilateral")])
    add([f"{f} {m}" for f in ("hyperintense", "hypodense", "hyperdense", "hypointense") for m in
         ("mass", "lesion", "nodule")])
    add([f"{a} {o}" for a in ("enlarged", "normal", "atrophic", "small") for o in
         ("liver", "spleen", "kidney", "heart", "pancreas", "prostate", "thyroid", "uterus")])
    if len(out) < n:
        raise SystemExit(f"only {len(out)} distinct answers can be built; ask for --candidates <= {len(out)}")
    return out[:n]


TEMPLATES = {
    "yesno": ["is there {f} in this image?", "is the {o} normal?", "is there evidence of {f}?",
              "is the {o} enlarged?", "does the patient have {f}?", "is this an {m} image?",
              "is there {f} in the {o}?", "was contrast given?", "is the lesion in the {o}?"],
    "organ": ["what organ is shown?", "which organ is abnormal?", "what organ system is imaged?",
              "where is the abnormality?"],
    "side": ["which side is the lesion on?", "on which side is the {f}?", "where is the {f} located?"],
    "modality": ["what modality was used?", "what type of image is this?", "how was this image taken?"],
    "plane": ["in what plane is this image?", "what plane is shown?"],
    "finding": ["what is the main finding?", "what abnormality is seen in the {o}?", "what is the diagnosis?"],
    "count": ["how many lesions are seen?", "how many {f}s are present?"],
    "size": ["how large is the {f}?", "what is the size of the lesion?"],
    "feature": ["how does the lesion appear?", "what is the density of the {f}?"],
}


def make_questions(answers: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    """n (question, answer) pairs; ~40% yes/no like VQA-RAD's closed questions, the rest open."""
    rng = random.Random(seed)
    by_kind = {
        "organ": [a for a in answers if a in ORGANS or a in LOBES or any(a.endswith(" " + p) for p in PAIRED)],
        "side": [a for a in answers if a in SIDES],
        "modality": [a for a in answers if a in MODALITIES],
        "plane": [a for a in answers if a in PLANES],
        "finding": [a for a in answers if a in FINDINGS or " in the " in a],
        "count": [a for a in answers if a.isdigit() or a in COUNT_WORDS],
        "size": [a for a in answers if a.endswith((" cm", " mm"))],
        "feature": [a for a in answers if a in FEATURES or a.split(" ")[0] in FEATURES],
    }
    pairs, seen = [], set()
    while len(pairs) < n:
        kind = "yesno" if rng.random() < 0.4 else rng.choice([k for k in by_kind if by_kind[k]])
        q = rng.choice(TEMPLATES[kind]).format(f=rng.choice(FINDINGS[:40]), o=rng.choice(ORGANS[:30]),
                                               m=rng.choice(MODALITIES[:10]))
        q = f"image {rng.randint(1, 315)}: {q}"  # an image id, as VQA-RAD questions are about a given image
        if q in seen:
            continue
        seen.add(q)
        a = rng.choice(["yes", "no"]) if kind == "yesno" else rng.choice(by_kind[kind])
        pairs.append((q, a))
    return pairs


# --------------------------------------------------------------------------------------------------
# tokenizer: Galen's if it works, otherwise a word-level stand-in with the same id layout
# --------------------------------------------------------------------------------------------------
class WordTokenizer:
    bos_id, pad_id, eos_id = 0, 1, 2

    def __init__(self, texts):
        words = sorted({w for t in texts for w in t.split()})
        self.ids = {w: i + 4 for i, w in enumerate(words)}
        self.vocab_size = len(words) + 4

    def __len__(self):
        return self.vocab_size

    def encode_prompt(self, text):
        return [self.bos_id] + [self.ids[w] for w in text.split()] + [self.eos_id]

    def encode_target(self, text):
        return [self.ids[w] for w in text.split()] + [self.eos_id]


def build_tokenizer(texts: list[str], sp_vocab: int, seed: int):
    try:
        from galen.model.sentencepiece_text import train_sentencepiece
        from galen.model.vocabulary import GalenTokenizer
        out = tempfile.mkdtemp(prefix="galen_bench_tok_")
        vocab = sp_vocab
        while True:
            try:
                sp = train_sentencepiece(texts, out, vocab_size=vocab, seed=seed, num_threads=1)
                break
            except Exception as e:  # corpus too small for this many pieces: retry smaller
                if vocab <= 400:
                    raise
                vocab = int(vocab * 0.8)
                last = e  # noqa: F841
        tok = GalenTokenizer(sp)
        return tok, f"GalenTokenizer (SentencePiece {sp.vocab_size} text pieces + mask/codes/bins = {len(tok)} ids)"
    except Exception as e:  # noqa: BLE001
        tok = WordTokenizer(texts)
        return tok, f"word-level stand-in ({len(tok)} ids; model.vocabulary unusable: {type(e).__name__}: {e})"


def pad(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s)
    return out


# --------------------------------------------------------------------------------------------------
def train(model: GalenModel, prompts: list[list[int]], targets: list[list[int]], steps: int, batch: int, lr: float,
          epsilon: float, seed: int, pad_id: int, bos_id: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    model.train()
    losses = []
    n = len(prompts)
    for _ in range(steps):
        idx = torch.randperm(n, generator=g)[:batch].tolist()
        ids = pad([prompts[i] for i in idx], pad_id)
        tgt = pad([targets[i] for i in idx], pad_id)
        dec_in = torch.cat([torch.full((len(idx), 1), bos_id, dtype=torch.long), tgt[:, :-1]], 1)
        dec_in = dec_in.masked_fill(dec_in.eq(2), pad_id)
        out = model(ids, dec_in)
        loss = label_smoothed_cross_entropy(out.logits, tgt, epsilon, pad_id).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
    model.eval()
    return losses


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="nano")
    p.add_argument("--candidates", type=int, default=500, help="size of the closed answer set")
    p.add_argument("--questions", type=int, default=64, help="questions (trained on, then answered)")
    p.add_argument("--batch", type=int, default=16, help="questions per answering call")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--sp-vocab", type=int, default=1000, help="SentencePiece text pieces (lowered if too many)")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    add_run_args(p, repeats=3)
    args = p.parse_args(argv)
    set_threads(args.threads)
    facts = machine_facts()
    torch.manual_seed(args.seed)

    answers = answer_set(args.candidates)
    qa = make_questions(answers, args.questions, args.seed)
    corpus = answers + [q for q, _ in qa]
    tok, tok_desc = build_tokenizer(corpus, args.sp_vocab, args.seed)
    cand_tokens = [tok.encode_target(a) for a in answers]
    seen, dupes = {}, []
    for a, t in zip(answers, cand_tokens):
        if tuple(t) in seen:
            dupes.append((seen[tuple(t)], a))
        seen.setdefault(tuple(t), a)
    if dupes:
        raise SystemExit(f"answers that tokenize identically: {dupes[:5]}")
    trie = CandidateTrie(cand_tokens, tok.eos_id)
    cand_len = [len(t) for t in cand_tokens]
    words = [len(a.split()) for a in answers]
    prompts = [tok.encode_prompt(q) for q, _ in qa]
    targets = [tok.encode_target(a) for _, a in qa]
    ref_index = [answers.index(a) for _, a in qa]

    cfg = get_config(args.size, vocab_size=len(tok))
    model = GalenModel(cfg)
    t0 = time.perf_counter()
    losses = train(model, prompts, targets, args.train_steps, min(args.train_batch, len(qa)), args.lr,
                   args.label_smoothing, args.seed, tok.pad_id, tok.bos_id)
    train_s = time.perf_counter() - t0
    print(f"trained {args.size} ({model.num_parameters() / 1e6:.2f}M params, vocab {cfg.vocab_size}) for "
          f"{args.train_steps} steps in {train_s:.0f}s: loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)

    batches = [list(range(i, min(i + args.batch, len(qa)))) for i in range(0, len(qa), args.batch)]
    batch_ids = [pad([prompts[i] for i in b], tok.pad_id) for b in batches]
    longest = max(cand_len)
    free_cfg = GenerationConfig(beam_size=args.beam, max_length=longest, min_length=1)

    def run_trie():
        return [k for b, ids in zip(batches, batch_ids)
                for k in answer_closed_set(model, ids, [trie] * len(b), mode="trie", beam_size=args.beam)]

    def run_all():
        return [k for b, ids in zip(batches, batch_ids) for k in answer_closed_set(model, ids, [trie] * len(b),
                                                                                   mode="all")]

    def run_free():
        return [h.tokens for ids in batch_ids for h in generate(model, ids, config=free_cfg)]

    # warmup: each method once on the first batch (a full untimed pass of "all" would cost ~30 s)
    for _ in range(args.warmup):
        answer_closed_set(model, batch_ids[0], [trie] * len(batches[0]), mode="trie", beam_size=args.beam)
        answer_closed_set(model, batch_ids[0][:2], [trie] * 2, mode="all")
        generate(model, batch_ids[0], config=free_cfg)
    times, last = interleaved({"trie": run_trie, "all": run_all, "free": run_free}, args.repeats, 0)
    n = len(qa)
    acc_trie = sum(k == r for k, r in zip(last["trie"], ref_index)) / n
    acc_all = sum(k == r for k, r in zip(last["all"], ref_index)) / n
    acc_free = sum(t == targets[i] for i, t in enumerate(last["free"])) / n
    free_in_set = sum(tuple(t) in seen for t in last["free"]) / n
    agree = sum(a == b for a, b in zip(last["trie"], last["all"])) / n
    q = {k: quantiles(v) for k, v in times.items()}
    ratio = paired_ratio(times["all"], times["trie"])
    ratio_min = q["all"]["min"] / q["trie"]["min"]

    def qps(name):
        return f"{n / q[name]['median']:.2f} [{n / q[name]['q3']:.2f}, {n / q[name]['q1']:.2f}]"

    acc = {"trie": acc_trie, "all": acc_all, "free": acc_free}
    rows = [[name, desc, qps(name), f"{q[name]['median']:.2f} s (min {q[name]['min']:.2f})", f"{acc[name]:.1%}"]
            for name, desc in (("trie", f"answer_closed_set(mode='trie', beam_size={args.beam})"),
                               ("all", "answer_closed_set(mode='all'), chunk_size=512 (default)"),
                               ("free", f"generate(beam_size={args.beam}, max_length={longest}), exact match"))]

    print(f"\n## Closed-set answering over {len(answers)} candidates ({args.size}, {n} trained questions, "
          f"batches of {args.batch})\n\n{machine_line(facts)}\n")
    print(f"command: `{command_line()}`\n")
    print(f"tokenizer: {tok_desc}; candidates: {len(answers)} answers of {min(words)}-{max(words)} words, "
          f"{min(cand_len)}-{max(cand_len)} tokens with eos (mean {sum(cand_len) / len(cand_len):.1f}); trie root "
          f"fan-out {len(trie.root)}; training: {args.train_steps} AdamW steps, lr {args.lr}, label smoothing "
          f"{args.label_smoothing}, seed {args.seed}, loss {losses[0]:.3f} -> {losses[-1]:.3f} ({train_s:.0f}s, "
          f"not timed below). {args.warmup} warmup call(s) per method on the first batch, then {args.repeats} timed "
          "passes over all questions per method, "
          "interleaved; median [IQR]\n")
    print(markdown_table(["method", "call", "questions/s", "time for all questions", "accuracy"], rows))
    v_speed = "met" if ratio["median"] >= 16 else f"not met ({ratio['median']:.1f}× of 16×)"
    v_same = "met" if agree == 1.0 else f"not met ({agree:.1%})"
    print()
    print(markdown_table(["measure", "value", "target", "verdict"], [
        ["speed trie vs all-candidates (paired, median [IQR])", fmt_x(ratio, 1) + f"; ratio of minima "
         f"{ratio_min:.1f}×", "≥16×", v_speed],
        ["trie and all-candidates pick the same answer", f"{agree:.1%} ({round(agree * n)}/{n})", "100%", v_same],
        ["free generation output inside the candidate set", f"{free_in_set:.1%}", "-", "-"],
    ]))
    # diagnosis of disagreements (not timed): the all-candidates log-probabilities of both picks
    disagree = [i for i in range(n) if last["trie"][i] != last["all"][i]]
    diag = []
    if disagree:
        full = score_candidates(model, pad([prompts[i] for i in disagree], tok.pad_id), [trie] * len(disagree))
        for j, i in enumerate(disagree):
            kt, ka = last["trie"][i], last["all"][i]
            diag.append({"question": qa[i][0], "reference": qa[i][1], "trie": answers[kt], "all": answers[ka],
                         "logprob_trie_pick": float(full[j][kt]), "logprob_all_pick": float(full[j][ka]),
                         "tokens_all_pick": len(cand_tokens[ka]), "tokens_trie_pick": len(cand_tokens[kt])})
        print(f"\nQuestions where trie and all-candidates differ ({len(diag)}); log-probabilities are the "
              "all-candidates scores (allowed-set normalised, the score both modes maximise with length_penalty=0):\n")
        print(markdown_table(["question", "reference", "trie pick (log p, tokens)", "all pick (log p, tokens)",
                              "search error"],
                             [[d["question"], d["reference"], f"{d['trie']} ({d['logprob_trie_pick']:.2f}, "
                               f"{d['tokens_trie_pick']})", f"{d['all']} ({d['logprob_all_pick']:.2f}, "
                               f"{d['tokens_all_pick']})", "yes" if d["logprob_trie_pick"] < d["logprob_all_pick"]
                               else "no"] for d in diag]))
    payload = {"benchmark": "closed_set", "disagreements": diag, "command": command_line(), "machine": facts,
               "args": vars(args),
               "tokenizer": tok_desc, "num_candidates": len(answers), "candidate_tokens": cand_len,
               "answers": answers, "questions": qa, "train_losses": losses, "train_seconds": train_s,
               "times": times, "quantiles": q, "ratio_all_over_trie": ratio, "ratio_of_minima": ratio_min,
               "accuracy": acc, "agreement_trie_all": agree, "free_in_set": free_in_set}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
