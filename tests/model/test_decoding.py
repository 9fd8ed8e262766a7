"""Decoding behaviour: the KV cache changes nothing, constraints hold, batching changes nothing."""

from __future__ import annotations

import random

import pytest
import torch

from galen.model.decoding import (
    CandidateTrie,
    GenerationConfig,
    TokenLattice,
    _banned_ngram_tokens,
    answer_closed_set,
    closed_set_answers,
    generate,
    score_candidates,
)
from galen.model.errors import GalenInputError
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


def _reference_log_probs(model, prompts, images, trie) -> list[list[float]]:
    """Straight from the definition: per sample and candidate, one full forward pass of that sample
    alone (unpadded prompt) with the candidate as decoder input; each step's log-probability of
    the candidate's token, normalised over the tokens the trie allows there, summed."""
    out = []
    for i in range(prompts.shape[0]):
        row = prompts[i:i + 1, :int(prompts[i].ne(1).sum())]
        scores = []
        for seq in trie[i].sequences:
            prev = torch.tensor([[0] + seq[:-1]])
            with torch.no_grad():
                logits = model(row, prev, images[i:i + 1]).logits[0].double()
            node, total = trie[i].root, 0.0
            for t, tok in enumerate(seq):
                allowed = list(node)
                total += float(logits[t, tok] - logits[t, allowed].logsumexp(0))
                node = node[tok]
            scores.append(total)
        out.append(scores)
    return out


def test_candidate_scores_are_the_full_forward_log_probs(model, batch):
    """One batched teacher-forced pass (pairs sorted and chunked, cross-attention keys shared per
    sample) gives each candidate the score of its own full forward pass."""
    prompts, images = batch
    rng = random.Random(11)
    tries = [_random_trie(rng, 1), _random_trie(rng, 4), _random_trie(rng, 12)]  # other sizes and lengths
    reference = _reference_log_probs(model, prompts, images, tries)
    for chunk_size in (512, 5):  # one chunk, and chunks that cut across samples
        got = score_candidates(model, prompts, tries, images, chunk_size=chunk_size)
        for s, ref in zip(got, reference):
            assert s.tolist() == pytest.approx(ref, abs=1e-4)
    both = closed_set_answers(model, prompts, tries, images, mode="all", with_scores=True)
    for s, ref in zip(both.scores, reference):
        assert s.tolist() == pytest.approx(ref, abs=1e-4)
    assert both.picks == [max(range(len(r)), key=r.__getitem__) for r in reference]
    assert closed_set_answers(model, prompts, tries, images).scores is None


def _trap_trie(a: int, b: int) -> CandidateTrie:
    """12 answers behind token a, one behind b: the lone answer scores best by far, but a search
    that prefers a at the first step (beam 1 when the model leans to a) never sees it."""
    return CandidateTrie([[a, x, 2] for x in range(100, 112)] + [[b, 2]], eos_id=2)


@pytest.mark.parametrize("beam", [1, 2, 4, 6])
def test_trie_mode_picks_what_the_constrained_beam_search_finds(model, batch, beam):
    """mode="trie" is the trie-constrained search; samples whose set fits in the beam are answered
    by scoring (that search is exhaustive there), the others by the search itself: either way the
    pick is the search's, also when samples of both kinds share a batch."""
    prompts, images = batch
    rng = random.Random(beam)
    tries = [_random_trie(rng, 2), _trap_trie(20, 21), _random_trie(rng, 5), _random_trie(rng, 14)]
    prompts, images = torch.cat([prompts, prompts[:1]]), torch.cat([images, images[:1]])
    longest = max(len(seq) for t in tries for seq in t.sequences)
    hyps = generate(model, prompts, images, constraints=tries,
                    config=GenerationConfig(beam_size=beam, max_length=longest, length_penalty=0.0))
    searched = [t.index_of(h.tokens) for t, h in zip(tries, hyps)]
    got = closed_set_answers(model, prompts, tries, images, mode="trie", beam_size=beam, with_scores=True)
    assert got.picks == searched == answer_closed_set(model, prompts, tries, images, mode="trie", beam_size=beam)
    reference = _reference_log_probs(model, prompts, images, tries)
    best = [max(range(len(ref)), key=ref.__getitem__) for ref in reference]
    for t, pick, ref, h, top in zip(tries, got.picks, reference, hyps, best):
        assert h.log_prob == pytest.approx(ref[pick], abs=1e-4)
        if t.search_is_exhaustive(beam, (0, 1)):
            assert pick == top
    if beam == 1:  # otherwise this test could not tell the search from scoring everything
        assert searched[1] != best[1] and got.picks[1] != best[1]
        assert closed_set_answers(model, prompts, tries, images, mode="all").picks == best


def test_constrained_search_on_allowed_tokens_equals_the_full_vocabulary_search(model, batch):
    """All-constrained batches project onto the allowed tokens only; a batch with one free row
    takes the whole vocabulary for every row. Both give a lattice row the same box and score."""
    prompts, images = batch
    lattice = TokenLattice([range(40, 240)] * 4, eos_id=2)
    cfg = GenerationConfig(beam_size=3, max_length=4, min_length=4, length_penalty=0.0)
    restricted = generate(model, prompts, images, config=cfg, constraints=[lattice, lattice, lattice])
    full = generate(model, prompts, images, config=cfg, constraints=[lattice, None, lattice])
    for i in (0, 2):
        assert restricted[i].tokens == full[i].tokens and len(restricted[i].tokens) == 5
        assert all(40 <= t < 240 for t in restricted[i].tokens[:4])
        assert restricted[i].score == pytest.approx(full[i].score, abs=1e-4)


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
