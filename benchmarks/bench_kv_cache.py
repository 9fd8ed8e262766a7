"""Generation with the decoder key/value cache vs re-running the whole decoder every step.

Galen `tiny` (random init, eval mode), a batch of image+prompt inputs (256 px images, prompts of
~20 tokens with padding), exactly 32 generated tokens (GenerationConfig(min_length=32,
max_length=32)), beam 1 and beam 5. For each beam size the cached and uncached runs are timed
interleaved in one process, and their outputs are compared token for token.

Besides the end-to-end time (what a caller of `generate` sees: encoder + 33 decoder steps), the
encoder alone is timed in the same loop, so the table also shows the decoding-only ratio
((generate - encode) cached vs uncached).

    python benchmarks/bench_kv_cache.py
    python benchmarks/bench_kv_cache.py --beams 5 --batch 4 --repeats 5
"""

from __future__ import annotations

import argparse
import sys

import torch  # noqa: E402
from _common import (  # noqa: E402
    add_run_args,
    command_line,
    fmt_s,
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
from galen.model.decoding import GenerationConfig, generate  # noqa: E402
from galen.model.generalist import GalenModel  # noqa: E402

BOS, PAD, EOS = 0, 1, 2


def make_inputs(batch: int, prompt_len: int, image_size: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, prompt_len), PAD, dtype=torch.long)
    for i in range(batch):
        n = prompt_len if i == 0 else int(torch.randint(prompt_len // 2, prompt_len + 1, (1,), generator=g))
        ids[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = BOS, EOS
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    return ids, images


def breakdown(model, ids, images, args) -> str:
    """Wall-clock split of generate(): encoder, cache set-up, decoder step + logits, rules, reorder, rest."""
    import time

    from galen.model import decoding
    from galen.model.generalist import GalenModel as GM

    acc: dict[str, float] = {}
    targets = [(GM, "encode", "encoder"), (GM, "init_cache", "init_cache"),
               (decoding._DecoderState, "next_logits", "decoder step incl. logits"),
               (GM, "logits", "of which output projection"),
               (decoding, "_apply_rules", "_apply_rules (masks, log_softmax)"),
               (decoding._DecoderState, "reorder", "reorder (cache or encoder rows)")]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]

    def wrap(fn, label):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[label] = acc.get(label, 0.0) + time.perf_counter() - t0
        return timed

    rows = []
    try:
        for obj, name, label in targets:
            setattr(obj, name, wrap(getattr(obj, name), label))
        for beam in args.beams:
            for use_cache in (True, False):
                gc = GenerationConfig(beam_size=beam, min_length=args.tokens, max_length=args.tokens,
                                      use_cache=use_cache)
                acc.clear()
                t0 = time.perf_counter()
                generate(model, ids, images, config=gc)
                total = time.perf_counter() - t0
                parts = [acc.get(label, 0.0) for _, _, label in targets]
                outer = [p for (_, _, label), p in zip(targets, parts) if label != "of which output projection"]
                rest = total - sum(outer)
                rows.append([beam, use_cache, f"{total * 1e3:.0f}"] + [f"{p * 1e3:.0f}" for p in parts]
                            + [f"{rest * 1e3:.0f}"])
    finally:
        for obj, name, fn in originals:
            setattr(obj, name, fn)
    headers = ["beam", "use_cache", "total"] + [label for _, _, label in targets] + ["rest (beam bookkeeping)"]
    return markdown_table(headers, rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=20)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--tokens", type=int, default=32, help="generated tokens (min_length = max_length)")
    p.add_argument("--beams", nargs="+", type=int, default=[1, 5])
    add_run_args(p, repeats=3)
    p.add_argument("--breakdown", action="store_true",
                   help="also time the parts of one cached and one uncached run per beam (wall clock, by "
                        "wrapping decoding/model functions in this process; torch.profiler distorts this workload)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    facts = machine_facts()

    torch.manual_seed(args.seed)
    cfg = get_config(args.size, image_size=args.image_size)
    model = GalenModel(cfg).eval()
    ids, images = make_inputs(args.batch, args.prompt_len, args.image_size, cfg.vocab_size, args.seed)

    @torch.no_grad()
    def encode_only():
        return model.encode(ids, images)

    rows, results = [], []
    for beam in args.beams:
        gcfg = {c: GenerationConfig(beam_size=beam, min_length=args.tokens, max_length=args.tokens, use_cache=c)
                for c in (True, False)}
        contestants = {
            "cached": lambda gcfg=gcfg: generate(model, ids, images, config=gcfg[True]),
            "uncached": lambda gcfg=gcfg: generate(model, ids, images, config=gcfg[False]),
            "encode": encode_only,
        }
        times, last = interleaved(contestants, args.repeats, args.warmup)
        toks_c = [h.tokens for h in last["cached"]]
        toks_u = [h.tokens for h in last["uncached"]]
        identical = toks_c == toks_u
        n_same = sum(a == b for a, b in zip(toks_c, toks_u))
        max_score_diff = max(abs(a.log_prob - b.log_prob) for a, b in zip(last["cached"], last["uncached"]))
        lengths = sorted({len(t) for t in toks_c})
        qc, qu, qe = quantiles(times["cached"]), quantiles(times["uncached"]), quantiles(times["encode"])
        ratio = paired_ratio(times["uncached"], times["cached"])
        dec_c = [c - e for c, e in zip(times["cached"], times["encode"])]
        dec_u = [u - e for u, e in zip(times["uncached"], times["encode"])]
        ratio_dec = paired_ratio(dec_u, dec_c)
        new_tokens = args.batch * args.tokens
        verdict = "met" if ratio["median"] >= 5 else f"not met ({ratio['median']:.2f}× of 5×)"
        rows.append([beam, args.batch, fmt_s(qu), fmt_s(qc), fmt_s(qe), fmt_x(ratio), fmt_x(ratio_dec),
                     f"{new_tokens / qc['median']:.0f} / {new_tokens / qu['median']:.0f}",
                     f"{'yes' if identical else 'NO'} ({n_same}/{len(toks_c)})", verdict])
        results.append({"beam": beam, "cached_s": qc, "uncached_s": qu, "encode_s": qe, "ratio_end_to_end": ratio,
                        "ratio_decoding_only": ratio_dec, "tokens_identical": identical, "rows_identical": n_same,
                        "max_abs_logprob_diff": max_score_diff, "output_lengths_with_eos": lengths,
                        "times": times})
        print(f"beam {beam}: tokens identical cached vs uncached: {identical} ({n_same}/{len(toks_c)} rows), "
              f"max |log-prob difference| {max_score_diff:.2e}, output lengths (with eos) {lengths}",
              flush=True)
        assert all(len(t) == args.tokens + 1 for t in toks_c), "min_length/max_length did not give 32 tokens"

    print(f"\n## Generation of {args.tokens} tokens: KV cache vs no cache ({args.size}, image {args.image_size}px, "
          f"prompt ≤{args.prompt_len} tokens)\n\n{machine_line(facts)}\n")
    print(f"command: `{command_line()}`\n")
    print(f"{args.warmup} warmup + {args.repeats} timed runs each, interleaved (cached, uncached, encoder only); "
          "median [IQR]; ratios paired per repeat\n")
    print(markdown_table(["beam", "batch", "use_cache=False", "use_cache=True", "encoder alone",
                          "speed-up end to end", "speed-up decoding only", "new tokens/s cached / uncached",
                          "same tokens", "target ≥5×"], rows))
    breakdown_table = None
    if args.breakdown:
        breakdown_table = breakdown(model, ids, images, args)
        print(f"\n### Where the time goes (one run each, wall clock ms)\n\n{breakdown_table}")
    all_same = all(r["tokens_identical"] for r in results)
    print(f"\ncached and uncached outputs token-identical for every beam size: {all_same}")
    payload = {"benchmark": "kv_cache", "command": command_line(), "machine": facts, "args": vars(args),
               "results": results, "breakdown": breakdown_table}
    write_json(args.json, payload)
    if not all_same:
        print("ASSERTION FAILED: cached and uncached generation differ", file=sys.stderr)
        sys.exit(1)
    return payload


if __name__ == "__main__":
    main()
