"""Model-behaviour tier: the model learns (a learning test with a step budget, not a timing test)."""

from __future__ import annotations

import json

from galen.flows.ingest import get_format
from galen.flows.learn_check import learn_check
from galen.model.config import get_config
from galen.model.generalist import GalenModel


def test_tiny_model_overfits_a_handful_of_image_question_answer_triples(demo_vqa, demo_tokenizer):
    records = [r for r in get_format("vqa-rad").read(demo_vqa) if r.split == "train"][:8]
    answers = [r.target for r in records]
    assert len(set(answers)) >= 3, "the handful must need the image and question to be answered"
    model = GalenModel(get_config("nano", vocab_size=len(demo_tokenizer), dropout=0.0,
                                  encoder_drop_path_rate=0.0, decoder_drop_path_rate=0.0, image_size=128))
    result = learn_check(model, demo_tokenizer, records, max_steps=300, lr=1e-3, eval_every=10, progress=False)
    assert result.accuracy == 1.0, json.dumps(result.history)
    assert result.history[0]["accuracy"] < 1.0  # it had to learn: not right from the start
