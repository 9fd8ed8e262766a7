"""Pretraining/fine-tuning step plans, the objective builder and the weight EMA (no Ray needed)."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from PIL import Image

from galen.flows.ingest.schema import Record
from galen.flows.train.ema import WeightEMA
from galen.flows.train.examples import collate
from galen.flows.train.objectives import PRETRAIN_SOURCES, ExampleBuilder, StepPlanner, group_by_image_shape, step_rng
from galen.model.errors import GalenInputError


def png(colour: int, size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (colour, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def tok(demo_tokenizer):
    return demo_tokenizer


def planner(**weights):
    available = {"caption": 10, "vqa": 10, "nli": 5, "summarization": 5, "classification": 10}
    return StepPlanner(weights or {k: 1.0 for k in PRETRAIN_SOURCES}, PRETRAIN_SOURCES, available, seed=3)


def test_plan_is_a_function_of_seed_step_and_micro_step_only():
    a, b = planner(), planner()
    assert a.plan(7, 0, 16) == b.plan(7, 0, 16)  # two workers (or a resumed run) plan the same slots
    assert a.plan(7, 0, 16) != a.plan(8, 0, 16)
    assert a.plan(7, 0, 16) != a.plan(7, 1, 16)


def test_objectives_without_data_are_dropped_and_weights_are_followed():
    p = planner()
    assert "grounding" not in p.objectives and "detection" not in p.objectives  # no grounding shards
    assert "grounding" not in p.sources
    counts = Counter(slot.objective for step in range(200) for slot in p.plan(step, 0, 8))
    assert set(counts) == set(p.objectives)
    q = planner(caption=3.0, vqa=1.0)
    counts = Counter(slot.objective for step in range(300) for slot in q.plan(step, 0, 8))
    assert 2.4 < counts["caption"] / counts["vqa"] < 3.6
    for step in range(20):  # text infilling only reads sources that feed it and have data
        assert all(s.source in ("summarization", "nli", "caption") for s in p.plan(step, 0, 8)
                   if s.objective == "text_infilling")


def test_bad_weights_and_no_usable_objective_are_clear():
    with pytest.raises(GalenInputError, match="unknown objective 'colouring'"):
        planner(colouring=1.0)
    with pytest.raises(GalenInputError, match="must be a number >= 0"):
        planner(caption=-1)
    with pytest.raises(GalenInputError, match="no objective has both a positive weight and training data"):
        planner(grounding=1.0)


def test_builder_serves_each_objective_and_falls_back_to_the_records_own_task(tok):
    builder = ExampleBuilder(tok, 64)
    cap = Record("caption", "train", "demo", "c1", "a round nodule in the left lung", image=png(10))
    other = Record("caption", "train", "demo", "c2", "no nodule is seen", image=png(200))
    vqa = Record("vqa", "train", "demo", "q1", "yes", image=png(50), question="is there a nodule?",
                 answer_type="CLOSED")
    rng = step_rng(0, 0, 0, 0)
    assert builder.build("caption", cap, rng).task == "caption"
    builder.build("caption", other, rng)
    itm = [builder.build("image_text_matching", cap, step_rng(0, 0, s, 0)) for s in range(30)]
    assert {e.task for e in itm} == {"image_text_matching"}
    answers = {tok.decode(e.target).strip() for e in itm}
    assert answers == {"yes", "no"}  # positives and negatives from the other record's caption
    infill = builder.build("text_infilling", cap, rng)
    assert infill.task == "text_infilling" and "<mask>" in tok.decode(infill.source)
    # no codes table and no boxes: the slot still yields one example, of the record's own task
    assert builder.build("image_infilling", vqa, rng).task == "vqa"
    assert builder.build("grounding", cap, rng).task == "caption"


def test_mixed_batch_splits_by_image_size_and_collates(tok):
    builder = ExampleBuilder(tok, 64)
    cap = Record("caption", "train", "demo", "c1", "a nodule", image=png(10))
    nli = Record("nli", "train", "demo", "n1", "entailment", premise="fever of 39 c", hypothesis="febrile")
    examples = [builder.build("caption", cap, step_rng(0, 0, 0, 0)), builder.build("nli", nli, step_rng(0, 0, 0, 0))]
    big = builder.build("caption", cap, step_rng(0, 0, 0, 0))
    big.image = torch.zeros(3, 128, 128)
    groups = group_by_image_shape([*examples, big])
    assert [[e.task for e in g] for g in groups] == [["caption"], ["nli"], ["caption"]]
    assert [tuple(g[0].image.shape) for g in (groups[0], groups[2])] == [(3, 64, 64), (3, 128, 128)]
    assert collate(groups[1], tok).images is None  # pure text never runs the image backbone


def test_ema_averages_swaps_and_round_trips(tmp_path):
    p = torch.nn.Parameter(torch.zeros(3))
    ema = WeightEMA([p], decay=0.5)
    for value in (1.0, 1.0, 1.0):
        p.data.fill_(value)
        ema.update()
    # warm-up decays: min(0.5, 1/10)=0.1, min(0.5, 2/11), min(0.5, 3/12)=0.25
    expected = 0.0
    for n in range(3):
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * 1.0
    assert torch.allclose(ema.shadow[0], torch.full((3,), expected))
    ema.save(tmp_path / "ema.safetensors")
    other = WeightEMA([torch.nn.Parameter(torch.zeros(3))], decay=0.5)
    other.load(tmp_path / "ema.safetensors")
    assert other.updates == 3 and torch.equal(other.shadow[0], ema.shadow[0])
    ema.swap()
    assert torch.allclose(p.data, torch.full((3,), expected)) and torch.equal(ema.shadow[0], torch.ones(3))
    with pytest.raises(GalenInputError, match="ema_decay must be in"):
        WeightEMA([p], decay=1.0)
    with pytest.raises(GalenInputError, match="another model"):
        WeightEMA([p, torch.nn.Parameter(torch.zeros(2))], 0.5).load(tmp_path / "ema.safetensors")
