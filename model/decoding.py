"""Decoding for the generalist model: incremental (KV-cached) greedy and beam search, and the two
closed-set answering modes of the reference.

* `generate` — the encoder runs once; each step feeds one token through the decoder's key/value
  cache. Beam search follows fairseq: the top 2*beam candidates per sample, an end-of-sequence
  among the top `beam` finishes a hypothesis, scores normalised by length**length_penalty; plus
  min/max length and no-repeat-ngram blocking.
* Closed answer sets (VQA answer lists, class names, maybe/yes/no) as a `CandidateTrie`:
  - trie-constrained search: at every step only the trie's children of the current prefix are
    allowed, so the output is always one of the candidates;
  - all-candidates scoring: every candidate is scored by teacher forcing and the best is taken.
  Both normalise the next-token distribution over the allowed tokens only (as the reference does),
  so with length_penalty=0 they maximise the same score. Each sample of a batch may have its own
  candidate set.
* `closed_set_answers` answers a batch of closed-set questions from ONE encoder pass: every
  candidate of every sample is scored in one teacher-forced decoder pass over that encoder output
  (cross-attention keys/values projected once per sample, not once per candidate). A trie search
  whose beam holds the whole candidate set is exhaustive, so its pick is exactly the best-scoring
  candidate; only samples with more candidates than the beam run the search.
* Constrained rows only ever need the logits of the tokens their trie/lattice allows: the search
  projects onto that union of tokens (e.g. 1,000 location bins) instead of the whole vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from galen.model.errors import GalenInputError
from galen.model.generalist import DecoderCache, EncoderOutput, GalenModel

NEG_INF = float("-inf")


class CandidateTrie:
    """Prefix tree over tokenized candidates; each sequence must end with the eos id."""

    def __init__(self, sequences: Sequence[Sequence[int]], eos_id: int):
        if len(sequences) == 0:
            raise GalenInputError("the candidate set is empty; give at least one answer")
        self.eos_id = eos_id
        self.sequences = [list(s) for s in sequences]
        self.root: dict[int, dict] = {}
        seen = set()
        for i, seq in enumerate(self.sequences):
            if not seq or seq[-1] != eos_id or eos_id in seq[:-1]:
                raise GalenInputError(f"candidate {i} must end with exactly one eos ({eos_id}); "
                                      "tokenize candidates with GalenTokenizer.encode_target")
            if tuple(seq) in seen:
                raise GalenInputError(f"candidate {i} is a duplicate (same tokens as an earlier one); remove it")
            seen.add(tuple(seq))
            node = self.root
            for tok in seq:
                node = node.setdefault(tok, {})

    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[str]) -> CandidateTrie:
        return cls([tokenizer.encode_target(t) for t in texts], tokenizer.eos_id)

    def node(self, prefix: Sequence[int]) -> dict[int, dict] | None:
        node = self.root
        for tok in prefix:
            child = node.get(tok)
            if child is None:
                return None
            node = child
        return node

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        node = self.node(prefix)
        return [] if node is None else list(node)

    def index_of(self, sequence: Sequence[int]) -> int:
        return self.sequences.index(list(sequence))

    def allowed_per_step(self) -> list[list[list[int]]]:
        """Per candidate, the tokens the trie allows at each of its positions (what the scoring
        normalises over); walked once per trie and kept, as tries are reused across batches."""
        if getattr(self, "_allowed", None) is None:
            out = []
            for seq in self.sequences:
                node, lists = self.root, []
                for tok in seq:
                    lists.append(list(node))
                    node = node[tok]
                out.append(lists)
            self._allowed = out
        return self._allowed

    def search_is_exhaustive(self, beam_size: int, banned: Sequence[int] = ()) -> bool:
        """True when a trie-constrained beam search (length_penalty 0) with this beam must find the
        best-scoring candidate: the beam holds every candidate's prefix at every step, no candidate
        is only an eos (min_length 1 bans it) and none uses a token the search never emits."""
        return len(self.sequences) <= beam_size and all(
            len(seq) >= 2 and not any(t in banned for t in seq) for seq in self.sequences)

    def __len__(self) -> int:
        return len(self.sequences)


class TokenLattice:
    """Fixed-length constraint: one token from each position's allowed set, then eos.

    Constrained search only walks `root` child by child, so a lattice can stand where a trie does;
    its levels are shared dicts, so "exactly 4 location bins" (1000^4 boxes, as the reference
    restricts grounding output) costs 4 dicts instead of a trie of every box.
    """

    def __init__(self, levels: Sequence[Sequence[int]], eos_id: int):
        if not levels or any(len(level) == 0 for level in levels):
            raise GalenInputError("every position of a token lattice needs at least one allowed token")
        if any(eos_id in level for level in levels):
            raise GalenInputError(f"the eos id {eos_id} cannot be an allowed token before the end")
        node: dict[int, dict] = {eos_id: {}}
        for level in reversed(levels):
            node = dict.fromkeys((int(t) for t in level), node)
        self.root = node
        self.eos_id = eos_id
        self.length = len(levels)


@dataclass
class GenerationConfig:
    """Search settings. Lengths count answer tokens without the final eos."""

    beam_size: int = 5
    max_length: int = 40
    min_length: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise GalenInputError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.max_length < 1 or self.min_length < 0 or self.min_length > self.max_length:
            raise GalenInputError(f"need 0 <= min_length <= max_length and max_length >= 1; got "
                                  f"min_length={self.min_length}, max_length={self.max_length}")


@dataclass
class Hypothesis:
    tokens: list[int]       # answer tokens including the final eos
    score: float            # length-normalised score used for ranking
    log_prob: float         # raw sum of (allowed-set normalised) log-probabilities


class _DecoderState:
    """Hides whether a step uses the KV cache or re-runs the whole decoder (for tests/benchmarks)."""

    def __init__(self, model: GalenModel, encoder: EncoderOutput, max_length: int,
                 code_masks: torch.Tensor | None, use_cache: bool):
        self.model, self.use_cache, self.code_masks = model, use_cache, code_masks
        self.encoder = encoder
        self.cache: DecoderCache | None = model.init_cache(encoder, max_length, code_masks) if use_cache else None

    def next_logits(self, tokens: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, V) for the position after `tokens` (N, t); only the last token is new. With
        `columns` (vocabulary ids) only those logits, (N, len(columns))."""
        if self.cache is not None:
            hidden = self.model.decoder.step(self.model.embed_tokens(tokens[:, -1:]), self.cache)[:, -1]
        else:
            hidden = self.model.decode(tokens, self.encoder, self.code_masks)[:, -1]
        return _project(self.model, hidden, columns)

    def reorder(self, index: torch.Tensor, static_index: torch.Tensor | None) -> None:
        """`index`: new rows of the generated prefix; `static_index`: rows of the per-sample state
        (None when every row stays with its sample, the common case: nothing is copied)."""
        if self.cache is not None:
            self.cache.reorder(index, static_index)
        elif static_index is not None:
            self.encoder = self.encoder.index_select(static_index)
        if self.code_masks is not None and static_index is not None:
            self.code_masks = self.code_masks.index_select(0, static_index)


Constraint = CandidateTrie | TokenLattice


def _project(model: GalenModel, hidden: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """Output logits for all vocabulary ids, or only for `columns`."""
    if columns is None:
        return model.logits(hidden)
    return hidden @ model.embed_tokens.weight[columns].t()


@contextlib.contextmanager
def _eval(model: GalenModel) -> Iterator[None]:
    """Decode in eval mode (no dropout) and give the caller back the mode it had (a model already
    in eval mode, as a predictor's is, is not walked at all: that walk costs milliseconds)."""
    was_training = model.training
    if not was_training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _constraint_nodes(constraints, batch: int) -> list[Constraint | None]:
    if constraints is None or isinstance(constraints, (CandidateTrie, TokenLattice)):
        return [constraints] * batch
    if len(constraints) != batch:
        raise GalenInputError(f"{len(constraints)} candidate sets for a batch of {batch}; give one per sample "
                              "(or None for free generation)")
    return list(constraints)


def _banned_ngram_tokens(seq: list[int], n: int) -> list[int]:
    if n <= 0 or len(seq) < n - 1:
        return []
    key = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == key]


def _search_columns(nodes: list, eos_id: int, device: torch.device) -> tuple[torch.Tensor, list[int]] | None:
    """The vocabulary ids any row may emit at this step when every row is constrained (their
    union; a finished path allows only eos), else None: logits are then needed for those ids only."""
    if any(node is None for node in nodes):
        return None
    union: set[int] = set()
    for node in {id(n): n for n in nodes}.values():
        union.update(node if node else (eos_id,))
    ids = sorted(union)
    return torch.tensor(ids, dtype=torch.long, device=device), ids


def _apply_rules(logits: torch.Tensor, model: GalenModel, prefixes: list[list[int]], nodes: list,
                 step: int, cfg: GenerationConfig, columns: list[int] | None = None) -> torch.Tensor:
    """Log-probabilities after constraints, length rules and n-gram blocking: (N, V), or (N, U)
    over the vocabulary ids `columns` when the logits are only those (all others are -inf)."""
    c = model.cfg
    slot = None if columns is None else {tok: j for j, tok in enumerate(columns)}

    def cols(tokens) -> list[int]:
        return list(tokens) if slot is None else [slot[t] for t in tokens if t in slot]

    logits = logits.float()
    logits[:, cols((c.pad_id, c.bos_id))] = NEG_INF
    if any(node is not None for node in nodes):
        mask = torch.zeros_like(logits, dtype=torch.bool)
        rows_of: dict[int, tuple[dict | None, list[int]]] = {}
        for row, node in enumerate(nodes):  # rows at the same trie node share one mask write
            rows_of.setdefault(id(node), (node, []))[1].append(row)
        for node, rows in rows_of.values():
            index = torch.tensor(rows, device=logits.device)[:, None]
            if node is None:
                mask[index[:, 0]] = True
            else:  # an empty node is a finished candidate path: only eos keeps the row alive (it will be ended)
                mask[index, torch.tensor(cols(node if node else (c.eos_id,)), dtype=torch.long,
                                         device=logits.device)] = True
        logits = logits.masked_fill(~mask, NEG_INF)
    lprobs = F.log_softmax(logits, dim=-1)
    eos = cols((c.eos_id,))
    if step < cfg.min_length:
        lprobs[:, eos] = NEG_INF
    if step >= cfg.max_length:  # force the end; a constrained row whose path cannot end here dies
        kept = lprobs[:, eos].clone()
        lprobs.fill_(NEG_INF)
        lprobs[:, eos] = kept
    if cfg.no_repeat_ngram_size > 0:
        for row, seq in enumerate(prefixes):
            banned = cols(_banned_ngram_tokens(seq, cfg.no_repeat_ngram_size))
            if banned:
                lprobs[row, banned] = NEG_INF
    return lprobs


@torch.no_grad()
def generate(model: GalenModel, input_ids: torch.Tensor | None, images: torch.Tensor | None = None,
             patch_masks: torch.Tensor | None = None, *, config: GenerationConfig | None = None,
             constraints: Constraint | Sequence[Constraint | None] | None = None,
             code_masks: torch.Tensor | None = None) -> list[Hypothesis]:
    """Best hypothesis per sample (greedy when beam_size == 1)."""
    cfg = config or GenerationConfig()
    model.check_inputs(input_ids, images, patch_masks, code_masks=code_masks)
    with _eval(model):
        encoder = model.encode(input_ids, images, patch_masks, check=False)
        batch = encoder.hidden.shape[0]
        tries = _constraint_nodes(constraints, batch)
        return _beam_search(model, encoder, tries, cfg, code_masks)


def _keep_best(finished: list[Hypothesis], hyp: Hypothesis, beam: int) -> None:
    """Keep the `beam` best finished hypotheses of a sample."""
    if len(finished) < beam:
        finished.append(hyp)
        return
    worst = min(range(len(finished)), key=lambda i: finished[i].score)
    if hyp.score > finished[worst].score:
        finished[worst] = hyp


def _sample_done(finished: list[Hypothesis], live: list[tuple[int, int, float]], beam: int, exact: bool) -> bool:
    """fairseq's rule: done once `beam` hypotheses have finished. With length_penalty 0 the score of
    a live beam can only fall, so the search stops exactly when no live beam can still beat the
    worst kept hypothesis (the search then finds what scoring every candidate finds far more often)."""
    if len(finished) < beam:
        return False
    if not exact:
        return True
    return max(score for _, _, score in live) <= min(h.score for h in finished)


def _beam_search(model: GalenModel, encoder: EncoderOutput, tries: list[Constraint | None],
                 cfg: GenerationConfig, code_masks: torch.Tensor | None) -> list[Hypothesis]:
    c, beam, device = model.cfg, cfg.beam_size, encoder.hidden.device
    batch = encoder.hidden.shape[0]
    rows = torch.arange(batch, device=device).repeat_interleave(beam)
    encoder = encoder.index_select(rows)
    if code_masks is not None:
        code_masks = code_masks.index_select(0, rows)
    state = _DecoderState(model, encoder, cfg.max_length + 2, code_masks, cfg.use_cache)
    tokens = torch.full((batch * beam, 1), c.bos_id, dtype=torch.long, device=device)
    # only the first beam of each sample is live at step 0 (the others are copies of it)
    scores = torch.full((batch, beam), NEG_INF, device=device)
    scores[:, 0] = 0.0
    prefixes: list[list[int]] = [[] for _ in range(batch * beam)]
    # (a CandidateTrie is never empty, so `None if t is None` is the same test as `t and ...`)
    nodes: list[dict[int, dict] | None] = [None if (t := tries[s]) is None else t.root
                                           for s in range(batch) for _ in range(beam)]
    active = list(range(batch))                  # sample ids of the current row groups
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]

    for step in range(cfg.max_length + 1):
        columns = _search_columns(nodes, c.eos_id, device)
        logits = state.next_logits(tokens, None if columns is None else columns[0])
        lprobs = _apply_rules(logits, model, prefixes, nodes, step, cfg, None if columns is None else columns[1])
        vocab = lprobs.shape[-1]  # the vocabulary, or the columns of this step
        cand = (scores.view(-1, beam, 1) + lprobs.view(-1, beam, vocab)).view(len(active), -1)
        top = cand.topk(min(2 * beam, cand.shape[1]), dim=1)
        top_scores, top_idx = top.values.tolist(), top.indices.tolist()

        keep_rows, keep_tokens, keep_scores, next_active = [], [], [], []
        exact = cfg.length_penalty == 0.0  # scores only fall with length: an exact stopping bound exists
        for group, sample in enumerate(active):
            chosen: list[tuple[int, int, float]] = []
            for rank, (score, flat) in enumerate(zip(top_scores[group], top_idx[group])):
                if score == NEG_INF:
                    break
                row = group * beam + flat // vocab
                tok = flat % vocab if columns is None else columns[1][flat % vocab]
                if tok == c.eos_id:
                    if rank < beam or exact:
                        length = len(prefixes[row]) + 1
                        _keep_best(finished[sample], Hypothesis(prefixes[row] + [tok],
                                                                score / length ** cfg.length_penalty, score), beam)
                    continue
                if len(chosen) < beam:
                    chosen.append((row, tok, score))
            if not chosen or _sample_done(finished[sample], chosen, beam, exact):
                continue
            while len(chosen) < beam:  # pad the group with dead copies so shapes stay rectangular
                chosen.append((chosen[0][0], chosen[0][1], NEG_INF))
            next_active.append(sample)
            for row, tok, score in chosen:
                keep_rows.append(row)
                keep_tokens.append(tok)
                keep_scores.append(score)
        if not next_active:
            break
        index = torch.tensor(keep_rows, device=device)
        static = None
        if next_active != active:  # some samples finished: drop their per-sample state too
            old_group = {sample: g for g, sample in enumerate(active)}
            static = torch.tensor([old_group[s] * beam + j for s in next_active for j in range(beam)], device=device)
        state.reorder(index, static)
        tokens = torch.cat([tokens.index_select(0, index), torch.tensor(keep_tokens, device=device)[:, None]], 1)
        prefixes = [prefixes[r] + [t] for r, t in zip(keep_rows, keep_tokens)]
        nodes = [None if (n := nodes[r]) is None else n.get(t, {}) for r, t in zip(keep_rows, keep_tokens)]
        scores = torch.tensor(keep_scores, device=device).view(len(next_active), beam)
        active = next_active

    results = []
    for sample in range(batch):
        hyps = finished[sample]
        if not hyps:
            raise GalenInputError(f"sample {sample}: no hypothesis could finish — the candidate set admits no "
                                  "sequence within max_length; raise max_length")
        results.append(max(hyps, key=lambda h: h.score))
    return results


def _candidate_log_probs(model: GalenModel, encoder: EncoderOutput, candidates: Sequence[CandidateTrie],
                         chunk_size: int = 512) -> list[torch.Tensor]:
    """Per sample, the log-probability of each of its candidates by teacher forcing over `encoder`.

    All (sample, candidate) pairs go through the decoder together (`chunk_size` pairs at a time,
    similar lengths sharing a chunk). The cross-attention keys/values are projected once per
    sample (the decoder cache) and only copied per candidate; right padding needs no key mask as
    the decoder is causal. Next-token distributions are normalised over the trie's allowed tokens.
    """
    c = model.cfg
    device = encoder.hidden.device
    if len(candidates) != encoder.hidden.shape[0]:
        raise GalenInputError(f"{len(candidates)} candidate sets for a batch of {encoder.hidden.shape[0]}")
    pairs = [(s, k) for s, trie in enumerate(candidates) for k in range(len(trie))]
    longest = max(len(seq) for trie in candidates for seq in trie.sequences)
    cache = model.init_cache(encoder, longest)  # cross-attention keys/values of every sample, once
    out = torch.empty(len(pairs))
    order = sorted(range(len(pairs)), key=lambda i: len(candidates[pairs[i][0]].sequences[pairs[i][1]]))
    for start in range(0, len(order), chunk_size):
        chunk_ids = order[start:start + chunk_size]
        chunk = [(candidates[s].sequences[k], candidates[s].allowed_per_step()[k], s)
                 for s, k in (pairs[i] for i in chunk_ids)]
        width = max(len(seq) for seq, _, _ in chunk)
        k_max = max(len(a) for _, lists, _ in chunk for a in lists)
        target = torch.full((len(chunk), width), c.pad_id, dtype=torch.long)
        allowed = torch.full((len(chunk), width, k_max), -1, dtype=torch.long)
        for i, (seq, lists, _) in enumerate(chunk):
            target[i, :len(seq)] = torch.tensor(seq)
            for t, a in enumerate(lists):
                allowed[i, t, :len(a)] = torch.tensor(a)
        # logits only for the tokens some candidate allows (the rest never enter the score)
        union = torch.unique(allowed[allowed >= 0])
        slot = torch.full((c.vocab_size,), 0, dtype=torch.long)
        slot[union] = torch.arange(union.numel())
        target, allowed, union, slot = target.to(device), allowed.to(device), union.to(device), slot.to(device)
        prev = torch.cat([torch.full_like(target[:, :1], c.bos_id), target[:, :-1]], 1)
        rows = torch.tensor([s for _, _, s in chunk], device=device)
        pair_cache = dataclasses.replace(cache, self_k=list(cache.self_k), self_v=list(cache.self_v),
                                         cross_k=list(cache.cross_k), cross_v=list(cache.cross_v),
                                         self_bias=list(cache.self_bias))
        pair_cache.reorder(rows, rows)
        hidden = model.decoder.step(model.embed_tokens(prev), pair_cache)
        logits = _project(model, hidden, union).float()
        allowed_logits = logits.gather(-1, slot[allowed.clamp(min=0)]).masked_fill(allowed < 0, NEG_INF)
        target_logit = logits.gather(-1, slot[target][..., None]).squeeze(-1)
        token_lp = (target_logit - allowed_logits.logsumexp(-1)).masked_fill(target.eq(c.pad_id), 0.0)
        out[torch.tensor(chunk_ids)] = token_lp.sum(-1).cpu()
    result, offset = [], 0
    for trie in candidates:
        result.append(out[offset:offset + len(trie)])
        offset += len(trie)
    return result


@torch.no_grad()
def score_candidates(model: GalenModel, input_ids: torch.Tensor | None, candidates: Sequence[CandidateTrie],
                     images: torch.Tensor | None = None, patch_masks: torch.Tensor | None = None,
                     chunk_size: int = 512) -> list[torch.Tensor]:
    """All-candidates mode: per sample, the log-probability of each of its candidates (teacher forcing).

    Next-token distributions are normalised over the trie's allowed tokens, as in the reference.
    """
    model.check_inputs(input_ids, images, patch_masks)
    with _eval(model):
        encoder = model.encode(input_ids, images, patch_masks, check=False)
        return _candidate_log_probs(model, encoder, candidates, chunk_size)


@dataclass
class ClosedSetAnswers:
    picks: list[int]                        # index of the chosen candidate per sample
    scores: list[torch.Tensor] | None       # per sample, each candidate's log-probability (when asked for)


@torch.no_grad()
def closed_set_answers(model: GalenModel, input_ids: torch.Tensor | None, candidates: Sequence[CandidateTrie],
                       images: torch.Tensor | None = None, patch_masks: torch.Tensor | None = None, *,
                       mode: str = "trie", beam_size: int = 5, with_scores: bool = False) -> ClosedSetAnswers:
    """Chosen candidate per sample (and, with `with_scores`, every candidate's log-probability)
    from one encoder pass, whatever the mode.

    "all" picks the best-scoring candidate. "trie" is the reference's trie-constrained beam search
    (length_penalty 0); where the beam holds a sample's whole candidate set that search is
    exhaustive, so the sample is answered by scoring its candidates in the one batched
    teacher-forced pass (the same pick), and only samples with larger sets are searched.
    """
    if mode not in ("trie", "all"):
        raise GalenInputError(f"unknown closed-set mode {mode!r}; use 'trie' or 'all'")
    model.check_inputs(input_ids, images, patch_masks)
    c = model.cfg
    with _eval(model):
        encoder = model.encode(input_ids, images, patch_masks, check=False)
        if len(candidates) != encoder.hidden.shape[0]:
            raise GalenInputError(f"{len(candidates)} candidate sets for a batch of {encoder.hidden.shape[0]}")
        n = len(candidates)
        searched = [] if mode == "all" else [
            i for i, t in enumerate(candidates) if not t.search_is_exhaustive(beam_size, (c.pad_id, c.bos_id))]
        scored = list(range(n)) if with_scores else sorted(set(range(n)) - set(searched))
        picks: list[int] = [0] * n
        scores: list[torch.Tensor | None] = [None] * n
        device = encoder.hidden.device
        if scored:
            sub = encoder if len(scored) == n else encoder.index_select(torch.tensor(scored, device=device))
            for i, lp in zip(scored, _candidate_log_probs(model, sub, [candidates[i] for i in scored])):
                scores[i], picks[i] = lp, int(lp.argmax())
        if searched:
            longest = max(len(seq) for i in searched for seq in candidates[i].sequences)
            cfg = GenerationConfig(beam_size=beam_size, max_length=longest, min_length=1, length_penalty=0.0)
            sub = encoder.index_select(torch.tensor(searched, device=device))
            hyps = _beam_search(model, sub, [candidates[i] for i in searched], cfg, None)
            for i, h in zip(searched, hyps):
                picks[i] = candidates[i].index_of(h.tokens)
    return ClosedSetAnswers(picks, scores if with_scores else None)  # type: ignore[arg-type]


def answer_closed_set(model: GalenModel, input_ids: torch.Tensor | None, candidates: Sequence[CandidateTrie],
                      images: torch.Tensor | None = None, patch_masks: torch.Tensor | None = None,
                      mode: str = "trie", beam_size: int = 5) -> list[int]:
    """Index of the chosen candidate per sample, by trie-constrained beam search or all-candidates scoring."""
    return closed_set_answers(model, input_ids, candidates, images, patch_masks, mode=mode, beam_size=beam_size).picks
