"""Records -> Examples -> Batch: prompts from model.tasks, ids, images, masks, trie-aware smoothing, mixture."""

from __future__ import annotations

import io
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from galen.flows.ingest.schema import Record, image_sha1
from galen.flows.train.examples import (
    caption_example,
    collate,
    detection_example,
    grounded_caption_example,
    grounding_example,
    image_infilling_example,
    itm_example,
    make_example,
    mask_words,
    task_mixture_sampler,
    text_infilling_example,
)
from galen.model.decoding import CandidateTrie
from galen.model.errors import GalenInputError
from galen.model.image_code_files import PrecomputedCodes
from galen.model.losses import label_smoothed_cross_entropy
from galen.model.sentencepiece_text import train_sentencepiece
from galen.model.tasks import NLI_ANSWERS, build_prompt, vqa_prompt
from galen.model.vision import preprocess_images
from galen.model.vocabulary import GalenTokenizer

S = 64  # image side for fine-tuning examples (nano model: 16-px patches)
WORDS = ("the chest x ray shows a small nodule in left lung no effusion heart size normal lesion "
         "liver kidney brain mass organ region image describe what does is there any which text "
         "complete summary article can imply maybe yes no objects middle part patient report").split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> GalenTokenizer:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(400)]
    lines += [build_prompt("caption"), build_prompt("nli", premise="a", hypothesis="b"), "is there a mass?"]
    text = train_sentencepiece(lines, tmp_path_factory.mktemp("spm"), vocab_size=320)
    return GalenTokenizer(text, num_codes=1024, num_bins=100)


def png(color=(255, 0, 0), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def noise_png(size=(96, 80), seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def rec(task: str, **kw) -> Record:
    return Record(task=task, split="train", dataset="demo", source_id=kw.pop("source_id", "r1"), **kw)


# ----------------------------------------------------------------------------- fine-tuning tasks


def test_vqa_prompt_target_bos_eos_and_image(tok):
    r = rec("vqa", image=png((255, 0, 0)), question="Is there a Mass", target="yes", answer_type="CLOSED")
    ex = make_example(r, tok, S, candidates=["yes", "no"])
    assert ex.source == tok.encode_prompt(vqa_prompt("Is there a Mass"))
    assert ex.source[0] == tok.bos_id and ex.source[-1] == tok.eos_id and tok.bos_id not in ex.source[1:]
    assert ex.target == tok.encode_target("yes") and ex.target[-1] == tok.eos_id and tok.bos_id not in ex.target
    assert ex.candidates == [tok.encode_target("yes"), tok.encode_target("no")]
    assert ex.image.shape == (3, S, S) and not ex.code_target and ex.task == "vqa"
    # OFA normalisation (x - 0.5) / 0.5: red -> (1, -1, -1)
    assert torch.allclose(ex.image[:, S // 2, S // 2], torch.tensor([1.0, -1.0, -1.0]))
    assert ex.meta["truncated"] is False and ex.meta["answer_type"] == "CLOSED"


def test_vqa_answers_are_lower_cased_like_the_answer_sets(tok):
    """SLAKE answers "Yes", VQA-RAD "yes": one answer, and inside the (lower-cased) closed set."""
    from galen.flows.shards import closed_answer_sets

    r = rec("vqa", image=png(), question="Is there a nodule?", target="Yes", answer_type="CLOSED")
    answers = closed_answer_sets([{"task": "vqa", "split": "train", "dataset": "demo", "target": t, "candidates": None}
                                  for t in ("Yes", "no", "CT")])["demo"]["vqa"]
    ex = make_example(r, tok, S, candidates=answers)
    assert ex.target == tok.encode_target("yes") and ex.candidates is not None
    assert not ex.meta.get("target_outside_candidates")


def test_vqa_answer_outside_closed_set_drops_constraint(tok):
    r = rec("vqa", image=png(), question="what organ?", target="liver")
    ex = make_example(r, tok, S, candidates=["yes", "no"])
    assert ex.candidates is None and ex.meta["target_outside_candidates"]


def test_caption_classification_nli_summarization(tok):
    cap = make_example(rec("caption", image=png(), target="a small  nodule"), tok, S)
    assert cap.source == tok.encode_prompt(build_prompt("caption"))
    assert cap.target == tok.encode_target("a small nodule") and cap.candidates is None

    cls = make_example(rec("classification", image=png(), target="liver", candidates=["liver", "kidney", "brain"]),
                       tok, S)
    assert cls.source == tok.encode_prompt(build_prompt("classification"))
    assert cls.target == tok.encode_target("liver")
    assert cls.candidates == [tok.encode_target(c) for c in ("liver", "kidney", "brain")]

    nli = make_example(rec("nli", premise="the heart is normal", hypothesis="no effusion", target="entailment"),
                       tok, S)
    assert nli.source == tok.encode_prompt(build_prompt("nli", premise="the heart is normal",
                                                        hypothesis="no effusion"))
    assert nli.target == tok.encode_target("yes") and nli.image is None
    assert nli.candidates == [tok.encode_target(a) for a in NLI_ANSWERS]

    summ = make_example(rec("summarization", text="the patient report shows a mass", target="mass"), tok, S)
    assert summ.source == tok.encode_prompt(build_prompt("summarization", text="the patient report shows a mass"))
    assert summ.target == tok.encode_target("mass") and summ.image is None and summ.candidates is None


def test_overlong_text_is_truncated_and_flagged(tok):
    long = " ".join(["the chest x ray shows a small nodule"] * 40)
    ex = make_example(rec("summarization", text=long, target=long), tok, S, max_source=32, max_target=16)
    assert len(ex.source) == 32 and ex.source[-1] == tok.eos_id and ex.source[0] == tok.bos_id
    assert len(ex.target) == 16 and ex.target[-1] == tok.eos_id
    assert ex.meta["truncated"] is True
    assert ex.source[:31] == tok.encode_prompt(build_prompt("summarization", text=long))[:31]


def test_bad_records_raise_clear_errors(tok):
    with pytest.raises(GalenInputError, match="needs an image"):
        make_example(rec("vqa", question="is there a mass?", target="yes"), tok, S)
    with pytest.raises(GalenInputError, match="NLI target"):
        make_example(rec("nli", premise="a b", hypothesis="c d", target="perhaps"), tok, S)


# ----------------------------------------------------------------------------- batching


def test_collate_padding_shift_and_patch_masks(tok):
    a = make_example(rec("vqa", image=png(), question="is there a mass in the left lung?", target="yes"), tok, S)
    b = make_example(rec("nli", premise="heart", hypothesis="normal heart size", target="neutral"), tok, S)
    batch = collate([a, b], tok)
    for row, ex in enumerate([a, b]):
        n, m = len(ex.source), len(ex.target)
        assert batch.input_ids[row, :n].tolist() == ex.source
        assert (batch.input_ids[row, n:] == tok.pad_id).all()
        assert batch.target[row, :m].tolist() == ex.target and (batch.target[row, m:] == tok.pad_id).all()
        assert batch.decoder_input_ids[row, :m].tolist() == [tok.bos_id] + ex.target[:-1]
        assert (batch.decoder_input_ids[row, m:] == tok.pad_id).all()
    assert batch.images.shape == (2, 3, S, S)
    assert batch.patch_masks.tolist() == [True, False] and (batch.images[1] == 0).all()
    assert torch.equal(batch.images[0], a.image)
    assert batch.code_masks.tolist() == [False, False] and batch.tasks == ["vqa", "nli"]


def test_collate_text_only_batch_has_no_images(tok):
    b = make_example(rec("summarization", text="a mass in the liver", target="liver mass"), tok, S)
    batch = collate([b], tok)
    assert batch.images is None and batch.patch_masks is None and batch.allowed is None


def test_collate_rejects_mixed_image_sizes(tok):
    a = make_example(rec("vqa", image=png(), question="is there a mass?", target="yes"), tok, S)
    b = make_example(rec("vqa", image=png(), question="is there a mass?", target="no"), tok, 2 * S)
    with pytest.raises(GalenInputError, match="different sizes"):
        collate([a, b], tok)


def test_allowed_is_trie_children_and_loss_runs_on_nano(tok):
    from tests.conftest import nano

    cls = make_example(rec("classification", image=png(), target="kidney",
                           candidates=["liver", "kidney", "left lung", "left kidney"]), tok, S)
    nli = make_example(rec("nli", premise="heart size normal", hypothesis="no effusion", target="maybe"), tok, S)
    cap = make_example(rec("caption", image=png((0, 0, 255)), target="the chest x ray shows a small nodule"), tok, S)
    batch = collate([cls, nli, cap], tok)
    assert batch.allowed.shape == (*batch.target.shape, tok.vocab_size)
    for row, ex in enumerate([cls, nli]):
        trie = CandidateTrie(ex.candidates, tok.eos_id)
        for t in range(batch.target.shape[1]):
            want = set(trie.allowed(ex.target[:t])) if t < len(ex.target) else set(range(tok.vocab_size))
            assert set(batch.allowed[row, t].nonzero().flatten().tolist()) == want
            if t < len(ex.target):
                assert batch.allowed[row, t, ex.target[t]]
    assert batch.allowed[2].all()  # open-ended caption: everything allowed

    model = nano(vocab_size=tok.vocab_size)
    out = model(batch.input_ids, batch.decoder_input_ids, batch.images, batch.patch_masks, batch.code_masks)
    loss = label_smoothed_cross_entropy(out.logits, batch.target, 0.1, tok.pad_id, allowed=batch.allowed)
    free = label_smoothed_cross_entropy(out.logits, batch.target, 0.1, tok.pad_id)
    assert torch.isfinite(loss.loss) and torch.isfinite(loss.nll)
    assert loss.num_tokens == int(batch.target.ne(tok.pad_id).sum())
    assert loss.nll < free.nll  # restricting to the trie can only raise the target's probability


def test_per_row_nll_gives_each_tasks_loss_without_a_second_softmax():
    """The training curves' per-objective loss comes from the batch's one loss computation: the rows of
    one task must give exactly the NLL of those rows computed alone (trie restriction included)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, 30, generator=g)
    target = torch.randint(4, 30, (5, 4), generator=g)
    target[1, 2:] = 1  # padding (pad_id 1): rows of different lengths
    target[3, 1:] = 1
    allowed = torch.rand(5, 4, 30, generator=g) > 0.3
    allowed.scatter_(-1, target[..., None], True)
    whole = label_smoothed_cross_entropy(logits, target, 0.1, 1, allowed=allowed)
    for rows in ([0, 2], [1, 3], [4], [0, 1, 2, 3, 4]):
        mask = torch.zeros(5, dtype=torch.bool)
        mask[rows] = True
        alone = label_smoothed_cross_entropy(logits[mask], target[mask], 0.0, 1, allowed=allowed[mask])
        assert whole.mean_nll(mask) == pytest.approx(float(alone.nll), rel=1e-6)
    assert whole.row_tokens.tolist() == [4, 2, 4, 1, 4]


def test_sample_average_weighs_every_row_the_same_whatever_its_length():
    """`train.loss_average: sample`: a one-token answer moves the model as much as a long report. The
    sample mean is the mean of the rows' own token means, and a row's gradient share does not grow
    with its length (under the token average it does)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 20, generator=g, requires_grad=True)
    target = torch.randint(4, 20, (3, 6), generator=g)
    target[0, 1:] = 1  # a one-token answer beside two six-token texts
    sample = label_smoothed_cross_entropy(logits, target, 0.1, 1, average="sample")
    token = label_smoothed_cross_entropy(logits, target, 0.1, 1)
    rows = [label_smoothed_cross_entropy(logits[i:i + 1], target[i:i + 1], 0.1, 1).loss for i in range(3)]
    assert float(sample.loss) == pytest.approx(float(sum(rows) / 3), rel=1e-6)
    assert float(token.loss) == pytest.approx(float(sum(r * n for r, n in zip(rows, [1, 6, 6])) / 13), rel=1e-6)
    assert (sample.weight, token.weight) == (3, 13)  # what each loss is a mean over
    assert float(sample.nll) == pytest.approx(float(token.nll))  # the reported NLL stays per token

    # gradients: each row gets 1/3 of its own loss's gradient (the token average: n_i/13 of it)
    (g_sample,) = torch.autograd.grad(sample.loss, logits, retain_graph=True)
    (g_token,) = torch.autograd.grad(token.loss, logits, retain_graph=True)
    for i, n in enumerate([1, 6, 6]):
        (own,) = torch.autograd.grad(rows[i], logits, retain_graph=True)
        torch.testing.assert_close(g_sample[i], own[i] / 3)
        torch.testing.assert_close(g_token[i], own[i] * n / 13)
    with pytest.raises(ValueError, match="average must be one of"):
        label_smoothed_cross_entropy(logits, target, 0.1, 1, average="tokens")


# ----------------------------------------------------------------------------- pretraining objectives

SENTENCE = ("the chest x ray shows a small nodule in the left lung and there is no effusion while the heart "
            "size is normal and the liver shows no mass in this patient report")


def test_text_infilling_masks_about_30_percent_of_whole_words(tok):
    words = SENTENCE.split()
    fractions, spans = [], []
    for seed in range(300):
        masked = mask_words(words, random.Random(seed))
        fractions.append(sum(masked) / len(words))
        run = 0
        for m in masked + [False]:
            if m:
                run += 1
            elif run:
                spans.append(run)
                run = 0
    assert abs(np.mean(fractions) - 0.3) < 0.03
    assert 1.8 < np.mean(spans) < 4.0  # Poisson(3) spans, cut to the 30% budget


def test_text_infilling_example_prompt_target_and_whole_word_spans(tok):
    ex = text_infilling_example(SENTENCE, tok, random.Random(7))
    assert ex.target == tok.encode_target(SENTENCE) and ex.image is None and ex.task == "text_infilling"
    masked = mask_words(SENTENCE.split(), random.Random(7))
    shown, words = [], SENTENCE.split()
    for i, w in enumerate(words):
        if not masked[i]:
            shown.append(w)
        elif i == 0 or not masked[i - 1]:
            shown.append("<mask>")
    assert ex.source == tok.encode_prompt(build_prompt("text_infilling", text=" ".join(shown)))
    assert ex.source.count(tok.mask_id) == shown.count("<mask>") >= 1
    # every unmasked word survives intact and in order: spans cover whole words only
    kept = [w for w in shown if w != "<mask>"]
    assert kept == [w for w, m in zip(words, masked) if not m]
    assert "<mask> <mask>" not in " ".join(shown)  # one mask per span, spans never touch


def test_text_infilling_is_deterministic_by_seed(tok):
    a = text_infilling_example(SENTENCE, tok, random.Random(3))
    b = text_infilling_example(SENTENCE, tok, random.Random(3))
    c = text_infilling_example(SENTENCE, tok, random.Random(4))
    assert a.source == b.source and a.source != c.source
    assert text_infilling_example("single", tok, random.Random(0)) is None


def test_image_infilling_blanks_middle_and_targets_256_codes(tok):
    data = noise_png()
    codes = [(7 * i) % tok.num_codes for i in range(256)]
    for store in ({image_sha1(data): codes}, PrecomputedCodes.from_mapping({image_sha1(data): codes},
                                                                         num_codes=tok.num_codes)):
        ex = image_infilling_example(rec("caption", image=data, target="x"), tok, store)
        assert ex.source == tok.encode_prompt(build_prompt("image_infilling"))
        assert ex.target == tok.code_tokens(codes) + [tok.eos_id] and len(ex.target) == 257
        assert ex.code_target and ex.image.shape == (3, 256, 256)
        full = preprocess_images([Image.open(io.BytesIO(data))], 256)[0]
        assert (ex.image[:, 64:192, 64:192] == 0).all()
        outside = torch.ones(256, 256, dtype=torch.bool)
        outside[64:192, 64:192] = False
        assert torch.equal(ex.image[:, outside], full[:, outside])
        assert (full[:, 64:192, 64:192] != 0).any()  # the blanking really changed something
    assert collate([ex], tok).code_masks.tolist() == [True]
    assert image_infilling_example(rec("caption", image=png(), target="x"), tok, {image_sha1(data): codes}) is None


def test_grounding_grounded_caption_and_detection_bins(tok):
    boxes = [[20.0, 30.0, 60.0, 70.0], [5.0, 2.0, 15.0, 12.0]]
    r = rec("detection", image=noise_png((96, 80)), text="small nodule", boxes=boxes, box_labels=["nodule", "mass"])
    g = grounding_example(r, tok, S)
    assert g.source == tok.encode_prompt(build_prompt("grounding", text="small nodule"))
    assert g.target == tok.box_to_tokens(boxes[0], 96, 80) + [tok.eos_id]
    assert all(tok.is_bin(i) for i in g.target[:4])

    gc = grounded_caption_example(r, tok, S)
    region = tok.box_to_text(boxes[0], 96, 80)
    assert gc.source == tok.encode_prompt(build_prompt("grounded_caption", region=region))
    assert gc.source[-5:-1] == tok.box_to_tokens(boxes[0], 96, 80)  # "region: <bins>" then eos
    assert gc.target == tok.encode_target("small nodule")

    d = detection_example(r, tok, S)
    assert d.source == tok.encode_prompt(build_prompt("detection"))
    # the box nearer the top comes first
    expected = f"{tok.box_to_text(boxes[1], 96, 80)} mass {tok.box_to_text(boxes[0], 96, 80)} nodule"
    assert d.target == tok.encode_target(expected)
    assert d.target[:4] == tok.box_to_tokens(boxes[1], 96, 80)
    assert make_example(r, tok, S).target == d.target


def test_caption_and_itm(tok):
    r = rec("caption", image=png(), target="a small nodule")
    assert caption_example(r, tok, S).target == tok.encode_target("a small nodule")
    pos = itm_example(r, tok, S)
    neg = itm_example(r, tok, S, negative_caption="no effusion")
    assert pos.source == tok.encode_prompt(build_prompt("image_text_matching", text="a small nodule"))
    assert neg.source == tok.encode_prompt(build_prompt("image_text_matching", text="no effusion"))
    assert pos.target == tok.encode_target("yes") and neg.target == tok.encode_target("no")
    assert pos.candidates == [tok.encode_target("yes"), tok.encode_target("no")] == neg.candidates


def test_objectives_skip_records_they_cannot_serve(tok):
    no_image = rec("caption", target="a small nodule")
    no_boxes = rec("vqa", image=png(), question="is there a mass?", target="yes")
    assert caption_example(no_image, tok, S) is None
    assert itm_example(no_image, tok, S) is None
    assert itm_example(rec("caption", image=png(), target="a b"), tok, S, negative_caption=" a  b ") is None
    assert grounding_example(no_boxes, tok, S) is None
    assert grounded_caption_example(no_boxes, tok, S) is None
    assert detection_example(no_boxes, tok, S) is None
    assert image_infilling_example(no_image, tok, {}) is None


# ----------------------------------------------------------------------------- task mixture


def test_mixture_sampler_frequencies_and_determinism():
    weights = {"vqa": 0.5, "caption": 0.3, "text_infilling": 0.2, "detection": 0.4}
    counts = {"vqa": 10, "caption": 5, "text_infilling": 100, "detection": 0}
    it = task_mixture_sampler(weights, counts, seed=1)
    draws = [next(it) for _ in range(20000)]
    freq = Counter(draws)
    assert set(freq) == {"vqa", "caption", "text_infilling"}  # detection has no data
    for task, w in (("vqa", 0.5), ("caption", 0.3), ("text_infilling", 0.2)):
        assert abs(freq[task] / len(draws) - w) < 0.015
    again = task_mixture_sampler(weights, counts, seed=1)
    assert [next(again) for _ in range(20000)] == draws
    other = task_mixture_sampler(weights, counts, seed=2)
    assert [next(other) for _ in range(100)] != draws[:100]
    with pytest.raises(GalenInputError):
        task_mixture_sampler({"vqa": 1.0}, {"vqa": 0}, seed=0)


def test_make_example_text_infilling_record_needs_rng(tok):
    r = rec("text_infilling", text=SENTENCE)
    ex = make_example(r, tok, S, rng=random.Random(5))
    assert ex.target == tok.encode_target(SENTENCE) and tok.mask_id in ex.source
    assert ex.source == text_infilling_example(SENTENCE, tok, random.Random(5)).source
    with pytest.raises(GalenInputError, match="rng"):
        make_example(r, tok, S)
