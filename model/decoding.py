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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from model.errors import GalenInputError
from model.generalist import DecoderCache, EncoderOutput, GalenModel

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
    def from_texts(cls, tokenizer, texts: Sequence[str]) -> "CandidateTrie":
        return cls([tokenizer.encode_target(t) for t in texts], tokenizer.eos_id)

    def node(self, prefix: Sequence[int]) -> dict[int, dict] | None:
        node = self.root
        for tok in prefix:
            node = node.get(tok)
            if node is None:
                return None
        return node

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        node = self.node(prefix)
        return [] if node is None else list(node)

    def index_of(self, sequence: Sequence[int]) -> int:
        return self.sequences.index(list(sequence))

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

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (N, V) for the position after `tokens` (N, t); only the last token is new."""
        if self.cache is not None:
            return self.model.step(tokens[:, -1:], self.cache)[:, -1]
        hidden = self.model.decode(tokens, self.encoder, self.code_masks)
        return self.model.logits(hidden[:, -1])

    def reorder(self, index: torch.Tensor, static_index: torch.Tensor | None) -> None:
        """`index`: new rows of the generated prefix; `static_index`: rows of the per-sample state
        (None when every row stays with its sample, the common case: nothing is copied)."""
        if self.cache is not None:
            self.cache.reorder(index, static_index)
        elif static_index is not None:
            self.encoder = self.encoder.index_select(static_index)
        if self.code_masks is not None and static_index is not None:
            self.code_masks = self.code_masks.index_select(0, static_index)


Constraint = Union[CandidateTrie, TokenLattice]


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


def _apply_rules(logits: torch.Tensor, model: GalenModel, prefixes: list[list[int]], nodes: list,
                 step: int, cfg: GenerationConfig) -> torch.Tensor:
    """Log-probabilities (N, V) after constraints, length rules and n-gram blocking."""
    c = model.cfg
    logits = logits.float()
    logits[:, c.pad_id] = NEG_INF
    logits[:, c.bos_id] = NEG_INF
    if any(node is not None for node in nodes):
        mask = torch.zeros_like(logits, dtype=torch.bool)
        for row, node in enumerate(nodes):
            if node is None:
                mask[row] = True
            elif node:
                mask[row, list(node)] = True
            else:  # a finished candidate path: only eos keeps the row alive (it will be ended)
                mask[row, c.eos_id] = True
        logits = logits.masked_fill(~mask, NEG_INF)
    lprobs = F.log_softmax(logits, dim=-1)
    if step < cfg.min_length:
        lprobs[:, c.eos_id] = NEG_INF
    if step >= cfg.max_length:  # force the end; a constrained row whose path cannot end here dies
        eos = lprobs[:, c.eos_id].clone()
        lprobs.fill_(NEG_INF)
        lprobs[:, c.eos_id] = eos
    if cfg.no_repeat_ngram_size > 0:
        for row, seq in enumerate(prefixes):
            banned = _banned_ngram_tokens(seq, cfg.no_repeat_ngram_size)
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
    was_training = model.training
    model.eval()
    try:
        encoder = model.encode(input_ids, images, patch_masks, check=False)
        batch = encoder.hidden.shape[0]
        tries = _constraint_nodes(constraints, batch)
        return _beam_search(model, encoder, tries, cfg, code_masks)
    finally:
        model.train(was_training)


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
    nodes = [tries[s] and tries[s].root for s in range(batch) for _ in range(beam)]
    active = list(range(batch))                  # sample ids of the current row groups
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]

    for step in range(cfg.max_length + 1):
        logits = state.next_logits(tokens)
        lprobs = _apply_rules(logits, model, prefixes, nodes, step, cfg)
        vocab = lprobs.shape[-1]
        cand = (scores.view(-1, beam, 1) + lprobs.view(-1, beam, vocab)).view(len(active), -1)
        top_scores, top_idx = cand.topk(min(2 * beam, cand.shape[1]), dim=1)
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()

        keep_rows, keep_tokens, keep_scores, next_active = [], [], [], []
        exact = cfg.length_penalty == 0.0  # scores only fall with length: an exact stopping bound exists
        for group, sample in enumerate(active):
            chosen = []
            for rank, (score, flat) in enumerate(zip(top_scores[group], top_idx[group])):
                if score == NEG_INF:
                    break
                row = group * beam + flat // vocab
                tok = flat % vocab
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
        nodes = [None if nodes[r] is None else nodes[r].get(t, {}) for r, t in zip(keep_rows, keep_tokens)]
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


@torch.no_grad()
def score_candidates(model: GalenModel, input_ids: torch.Tensor | None, candidates: Sequence[CandidateTrie],
                     images: torch.Tensor | None = None, patch_masks: torch.Tensor | None = None,
                     chunk_size: int = 512) -> list[torch.Tensor]:
    """All-candidates mode: per sample, the log-probability of each of its candidates (teacher forcing).

    Next-token distributions are normalised over the trie's allowed tokens, as in the reference.
    """
    model.check_inputs(input_ids, images, patch_masks)
    c = model.cfg
    was_training = model.training
    model.eval()
    try:
        encoder = model.encode(input_ids, images, patch_masks, check=False)
        if len(candidates) != encoder.hidden.shape[0]:
            raise GalenInputError(f"{len(candidates)} candidate sets for a batch of {encoder.hidden.shape[0]}")
        pairs = [(s, seq) for s, trie in enumerate(candidates) for seq in trie.sequences]
        out = torch.empty(len(pairs))
        device = encoder.hidden.device
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1]))  # similar lengths share a chunk
        for start in range(0, len(order), chunk_size):
            chunk_ids = order[start:start + chunk_size]
            chunk = [pairs[i] for i in chunk_ids]
            width = max(len(seq) for _, seq in chunk)
            target = torch.full((len(chunk), width), c.pad_id, dtype=torch.long)
            allowed_lists = []
            for i, (s, seq) in enumerate(chunk):
                target[i, :len(seq)] = torch.tensor(seq)
                node, lists = candidates[s].root, []
                for tok in seq:
                    lists.append(list(node))
                    node = node[tok]
                allowed_lists.append(lists)
            k_max = max(len(a) for lists in allowed_lists for a in lists)
            allowed = torch.full((len(chunk), width, k_max), -1, dtype=torch.long)
            for i, lists in enumerate(allowed_lists):
                for t, a in enumerate(lists):
                    allowed[i, t, :len(a)] = torch.tensor(a)
            # logits only for the tokens some candidate allows (the rest never enter the score)
            union = torch.unique(allowed[allowed >= 0])
            slot = torch.full((c.vocab_size,), 0, dtype=torch.long)
            slot[union] = torch.arange(union.numel())
            target, allowed, union, slot = target.to(device), allowed.to(device), union.to(device), slot.to(device)
            prev = torch.cat([torch.full_like(target[:, :1], c.bos_id), target[:, :-1]], 1)
            rows = torch.tensor([s for s, _ in chunk], device=device)
            hidden = model.decode(prev, encoder.index_select(rows))
            logits = (hidden @ model.embed_tokens.weight[union].t()).float()
            allowed_logits = logits.gather(-1, slot[allowed.clamp(min=0)]).masked_fill(allowed < 0, NEG_INF)
            target_logit = logits.gather(-1, slot[target][..., None]).squeeze(-1)
            token_lp = (target_logit - allowed_logits.logsumexp(-1)).masked_fill(target.eq(c.pad_id), 0.0)
            out[torch.tensor(chunk_ids)] = token_lp.sum(-1).cpu()
        result, offset = [], 0
        for trie in candidates:
            result.append(out[offset:offset + len(trie)])
            offset += len(trie)
        return result
    finally:
        model.train(was_training)


def answer_closed_set(model: GalenModel, input_ids: torch.Tensor | None, candidates: Sequence[CandidateTrie],
                      images: torch.Tensor | None = None, patch_masks: torch.Tensor | None = None,
                      mode: str = "trie", beam_size: int = 5) -> list[int]:
    """Index of the chosen candidate per sample, by trie-constrained beam search or all-candidates scoring."""
    if mode == "all":
        return [int(s.argmax()) for s in score_candidates(model, input_ids, candidates, images, patch_masks)]
    if mode != "trie":
        raise GalenInputError(f"unknown closed-set mode {mode!r}; use 'trie' or 'all'")
    longest = max(len(seq) for trie in candidates for seq in trie.sequences)
    cfg = GenerationConfig(beam_size=beam_size, max_length=longest, min_length=1, length_penalty=0.0)
    hyps = generate(model, input_ids, images, patch_masks, config=cfg, constraints=list(candidates))
    return [trie.index_of(h.tokens) for trie, h in zip(candidates, hyps)]
