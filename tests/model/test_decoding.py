"""Decoding behaviour: the KV cache changes nothing, constraints hold, batching changes nothing."""

from __future__ import annotations

import random

import pytest
import torch

from model.decoding import (CandidateTrie, GenerationConfig, _banned_ngram_tokens, answer_closed_set, generate,
                            score_candidates)
from model.errors import GalenInputError
from tests.conftest import nano
from tests.model.test_generalist import ids

V = 300  # a small vocabulary makes repeats (and thus n-gram blocking) likely in random models


@pytest.fixture(scope="module")
def model():
    return nano(V)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    prompts = ids([0, 5, 6, 7, 8, 2], [0, 9, 10, 2], [0, 11, 2])
    return prompts, torch.randn(3, 3, 128, 128)


@pytest.mark.parametrize("beam, ngram", [(1, 0), (1, 2), (4, 0), (4, 3)])
def test_cached_decoding_yields_exactly_the_uncached_tokens(model, batch, beam, ngram):
    prompts, images = batch
    cfg = GenerationConfig(beam_size=beam, max_length=16, no_repeat_ngram_size=ngram, length_penalty=1.0)
    cached = generate(model, prompts, images, config=cfg)
    cfg.use_cache = False
    uncached = generate(model, prompts, images, config=cfg)
    assert [h.tokens for h in cached] == [h.tokens for h in uncached]
    assert [h.score for h in cached] == pytest.approx([h.score for h in uncached], abs=1e-4)


def test_length_limits_are_respected(model, batch):
    prompts, images = batch
    for lo, hi in [(5, 5), (3, 9), (0, 2)]:
        for beam in (1, 3):
            hyps = generate(model, prompts, images, config=GenerationConfig(beam_size=beam, min_length=lo, max_length=hi))
            for h in hyps:
                assert h.tokens[-1] == 2 and 2 not in h.tokens[:-1]
                assert lo <= len(h.tokens) - 1 <= hi


def test_no_repeat_ngram_blocks_every_repeat(model, batch):
    prompts, images = batch
    free = generate(model, prompts, images, config=GenerationConfig(beam_size=3, min_length=30, max_length=30))
    assert any(len(set(zip(h.tokens, h.tokens[1:]))) < len(h.tokens) - 1 for h in free), \
        "the random model should repeat bigrams without blocking (otherwise this test proves nothing)"
    for n in (2, 3):
        hyps = generate(model, prompts, images, config=GenerationConfig(beam_size=3, min_length=30, max_length=30,
                                                                 no_repeat_ngram_size=n))
        for h in hyps:
            grams = [tuple(h.tokens[i:i + n]) for i in range(len(h.tokens) - n + 1)]
            assert len(grams) == len(set(grams))


def test_banned_ngram_helper():
    assert _banned_ngram_tokens([5, 6, 7, 5, 6], 3) == [7]
    assert sorted(_banned_ngram_tokens([4, 4, 4], 2)) == [4, 4]
    assert _banned_ngram_tokens([1, 2], 3) == []


def _random_trie(rng: random.Random, n: int) -> CandidateTrie:
    seqs = set()
    while len(seqs) < n:
        seqs.add(tuple(rng.randrange(4, V) for _ in range(rng.randint(1, 4))) + (2,))
    return CandidateTrie([list(s) for s in seqs], eos_id=2)


@pytest.mark.parametrize("seed", range(5))
def test_trie_decoding_only_ever_yields_candidates(model, batch, seed):
    rng = random.Random(seed)
    prompts, images = batch
    tries = [_random_trie(rng, rng.randint(1, 30)) for _ in range(3)]
    for beam in (1, 3, 5):
        hyps = generate(model, prompts, images, config=GenerationConfig(beam_size=beam, max_length=5, length_penalty=0.0),
                        constraints=tries)
        for trie, h in zip(tries, hyps):
            assert h.tokens in trie.sequences


def test_trie_search_and_all_candidates_agree_and_score_the_same(model, batch):
    rng = random.Random(7)
    prompts, images = batch
    # beam >= candidates makes the search exhaustive, so both modes must pick the same answer
    tries = [_random_trie(rng, 6) for _ in range(3)]
    scores = score_candidates(model, prompts, tries, images)
    by_trie = answer_closed_set(model, prompts, tries, images, mode="trie", beam_size=6)
    by_all = answer_closed_set(model, prompts, tries, images, mode="all")
    assert by_trie == by_all == [int(s.argmax()) for s in scores]
    hyps = generate(model, prompts, images, config=GenerationConfig(beam_size=6, max_length=5, length_penalty=0.0),
                    constraints=tries)
    for s, trie, h in zip(scores, tries, hyps):
        assert h.log_prob == pytest.approx(float(s[trie.index_of(h.tokens)]), abs=1e-4)
    # restricted to the candidates, the probabilities of each set sum to one
    for s in scores:
        assert float(s.exp().sum()) == pytest.approx(1.0, abs=1e-4)


def test_questions_with_different_candidate_sets_decode_together(model, batch):
    prompts, images = batch
    rng = random.Random(3)
    tries = [_random_trie(rng, 3), None, _random_trie(rng, 12)]
    cfg = GenerationConfig(beam_size=3, max_length=6, length_penalty=0.0)
    together = generate(model, prompts, images, config=cfg, constraints=tries)
    for i in range(3):
        alone = generate(model, prompts[i:i + 1, :int(prompts[i].ne(1).sum())], images[i:i + 1], config=cfg,
                         constraints=[tries[i]])
        assert together[i].tokens == alone[0].tokens
    batched_all = answer_closed_set(model, prompts[[0, 2]], [tries[0], tries[2]], images[[0, 2]], mode="all")
    single = [answer_closed_set(model, prompts[i:i + 1, :int(prompts[i].ne(1).sum())], [tries[i]],
                                images[i:i + 1], mode="all")[0] for i in (0, 2)]
    assert batched_all == single


def test_candidate_trie_rejects_bad_sets():
    with pytest.raises(GalenInputError, match="empty"):
        CandidateTrie([], 2)
    with pytest.raises(GalenInputError, match="end with exactly one eos"):
        CandidateTrie([[5, 6]], 2)
    with pytest.raises(GalenInputError, match="duplicate"):
        CandidateTrie([[5, 2], [5, 2]], 2)


def test_bad_generation_settings_are_refused(model, batch):
    prompts, images = batch
    with pytest.raises(GalenInputError, match="beam_size"):
        GenerationConfig(beam_size=0)
    with pytest.raises(GalenInputError, match="min_length"):
        GenerationConfig(min_length=9, max_length=3)
    with pytest.raises(GalenInputError, match="candidate sets for a batch of 3"):
        generate(model, prompts, images, constraints=[CandidateTrie([[5, 2]], 2)])
