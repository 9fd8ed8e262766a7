"""Training-step time of Galen's text path vs transformers' BART with the same dimensions.

One step = zero_grad + forward + label-smoothed cross-entropy + backward + AdamW step, on the
same batch (padded prompts of ~40 tokens, padded targets of ~20), same loss function, same
optimizer settings. Galen runs without images (input_ids only). BART is built from a BartConfig
with Galen's d_model / layers / heads / ffn / vocabulary, max positions 1024, the same dropout,
GELU, tied embeddings and `attn_implementation="sdpa"`.

The two models are timed interleaved (order rotated every repeat) in one process; the ratio is
computed per repeat. `--profile` additionally records a few steps of each under torch.profiler
and prints the ops whose self CPU time differs most between the two.

    python benchmarks/bench_text_path.py                    # tiny (batch 16) and base (batch 8)
    python benchmarks/bench_text_path.py --sizes tiny --batch 32 --profile
"""

from __future__ import annotations

import argparse

import torch  # noqa: E402
from _common import (  # noqa: E402
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

from galen.model.config import REFERENCE_VOCAB_SIZE, get_config  # noqa: E402
from galen.model.generalist import GalenModel  # noqa: E402
from galen.model.losses import label_smoothed_cross_entropy  # noqa: E402

BOS, PAD, EOS = 0, 1, 2
DEFAULT_BATCH = {"nano": 32, "tiny": 16, "medium": 8, "base": 8, "large": 4, "huge": 2}


def make_batch(batch: int, prompt_len: int, target_len: int, vocab: int, seed: int):
    """Right-padded prompts ([bos] text [eos]) and targets (text [eos]); lengths vary per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, prompt_len), PAD, dtype=torch.long)
    tgt = torch.full((batch, target_len), PAD, dtype=torch.long)
    for i in range(batch):
        # the longest row fills the width, the others are 70-100% of it
        n = prompt_len if i == 0 else int(torch.randint(int(prompt_len * 0.7), prompt_len + 1, (1,), generator=g))
        m = target_len if i == 0 else int(torch.randint(int(target_len * 0.6), target_len + 1, (1,), generator=g))
        ids[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = BOS, EOS
        tgt[i, :m] = torch.randint(4, vocab, (m,), generator=g)
        tgt[i, m - 1] = EOS
    dec_in = torch.cat([torch.full((batch, 1), BOS, dtype=torch.long), tgt[:, :-1]], 1)
    dec_in = dec_in.masked_fill(dec_in.eq(EOS), PAD)  # no eos on the decoder input side
    return ids, dec_in, tgt


def build_bart(cfg):
    from transformers import BartConfig, BartForConditionalGeneration
    bc = BartConfig(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.attention_heads, decoder_attention_heads=cfg.attention_heads,
        encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim,
        max_position_embeddings=cfg.max_positions, dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout,
        activation_function="gelu", encoder_layerdrop=0.0, decoder_layerdrop=0.0,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=BOS,
        scale_embedding=False, tie_word_embeddings=True, use_cache=False,
    )
    return BartForConditionalGeneration._from_config(bc, attn_implementation="sdpa")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_steps(size: str, batch: int, args):
    torch.manual_seed(args.seed)
    cfg = get_config(size, vocab_size=args.vocab)
    galen = GalenModel(cfg).train()
    bart = build_bart(cfg).train()
    ids, dec_in, tgt = make_batch(batch, args.prompt_len, args.target_len, args.vocab, args.seed)
    mask = ids.ne(PAD)
    opt_kw = dict(lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt_g = torch.optim.AdamW(galen.parameters(), **opt_kw)
    opt_b = torch.optim.AdamW(bart.parameters(), **opt_kw)
    losses: dict[str, list[float]] = {"galen": [], "bart": []}

    def step_galen():
        opt_g.zero_grad(set_to_none=True)
        out = galen(ids, dec_in)
        loss = label_smoothed_cross_entropy(out.logits, tgt, args.label_smoothing, PAD).loss
        loss.backward()
        opt_g.step()
        losses["galen"].append(loss.detach().item())

    def step_bart():
        opt_b.zero_grad(set_to_none=True)
        # right padding + causal attention: target padding can never be attended by a real position,
        # so (as usual for BART training) no decoder_attention_mask is passed; the loss ignores pad.
        logits = bart(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_in).logits
        loss = label_smoothed_cross_entropy(logits, tgt, args.label_smoothing, PAD).loss
        loss.backward()
        opt_b.step()
        losses["bart"].append(loss.detach().item())

    vision = sum(p.numel() for n, p in galen.named_parameters() if n.startswith("encoder.embed_images."))
    info = {
        "size": size, "batch": batch, "d_model": cfg.d_model, "layers": f"{cfg.encoder_layers}+{cfg.decoder_layers}",
        "heads": cfg.attention_heads, "ffn": cfg.ffn_dim, "vocab": cfg.vocab_size,
        "prompt_tokens": int(mask.sum()), "prompt_shape": list(ids.shape),
        "target_tokens": int(tgt.ne(PAD).sum()), "target_shape": list(tgt.shape),
        "params_galen": n_params(galen), "params_galen_without_resnet": n_params(galen) - vision,
        "params_bart": n_params(bart),
    }
    return {"galen": step_galen, "bart": step_bart}, losses, info


def profile_steps(steps, n: int, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile
    tables = {}
    for name, fn in steps.items():
        fn()  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                fn()
        tables[name] = {e.key: e for e in prof.key_averages()}
    keys = set(tables["galen"]) | set(tables["bart"])

    def self_ms(name, k):
        e = tables[name].get(k)
        return 0.0 if e is None else e.self_cpu_time_total / 1000.0 / n

    def calls(name, k):
        e = tables[name].get(k)
        return 0 if e is None else e.count // n

    diffs = sorted(keys, key=lambda k: -(self_ms("galen", k) - self_ms("bart", k)))
    tot_g = sum(self_ms("galen", k) for k in keys)
    tot_b = sum(self_ms("bart", k) for k in keys)
    rows = [[k, f"{self_ms('galen', k):.1f}", calls("galen", k), f"{self_ms('bart', k):.1f}", calls("bart", k),
             f"{self_ms('galen', k) - self_ms('bart', k):+.1f}"] for k in diffs[:top]]
    rows += [["...", "", "", "", "", ""]]
    rows += [[k, f"{self_ms('galen', k):.1f}", calls("galen", k), f"{self_ms('bart', k):.1f}", calls("bart", k),
              f"{self_ms('galen', k) - self_ms('bart', k):+.1f}"] for k in diffs[-max(3, top // 3):]]
    rows += [["**total self CPU**", f"{tot_g:.1f}", "", f"{tot_b:.1f}", "", f"{tot_g - tot_b:+.1f}"]]
    return markdown_table(["op", "Galen self ms/step", "calls", "BART self ms/step", "calls", "Δ ms"], rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "base"], help="Galen sizes whose dims both models take")
    p.add_argument("--batch", nargs="+", type=int, default=None,
                   help=f"batch per size (one value, or one per size); default {DEFAULT_BATCH}")
    p.add_argument("--prompt-len", type=int, default=40, help="padded prompt width (longest prompt)")
    p.add_argument("--target-len", type=int, default=20, help="padded target width (longest target)")
    p.add_argument("--vocab", type=int, default=REFERENCE_VOCAB_SIZE)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per model (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core machine 2 threads stall at "
                        "every op barrier; 0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="also profile both and print the op-level difference")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--profile-top", type=int, default=15)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.batch is None:
        batches = [DEFAULT_BATCH.get(s, 4) for s in args.sizes]
    else:
        batches = args.batch * len(args.sizes) if len(args.batch) == 1 else args.batch
    if len(batches) != len(args.sizes):
        p.error("--batch needs one value or one per --sizes entry")

    facts = machine_facts()
    results, rows, profiles = [], [], {}
    for size, batch in zip(args.sizes, batches):
        steps, losses, info = make_steps(size, batch, args)
        times, _ = interleaved(steps, args.repeats, args.warmup)
        qg, qb = quantiles(times["galen"]), quantiles(times["bart"])
        ratio = paired_ratio(times["galen"], times["bart"])
        info.update(galen_s=qg, bart_s=qb, ratio_galen_over_bart=ratio, times=times,
                    first_loss={k: v[0] for k, v in losses.items()}, last_loss={k: v[-1] for k, v in losses.items()})
        results.append(info)
        verdict = "met" if ratio["median"] <= 1.0 else f"not met ({(ratio['median'] - 1) * 100:.0f}% slower)"
        rows.append([size, f"{info['d_model']}, {info['layers']}, {info['heads']}h, ffn {info['ffn']}", batch,
                     f"{info['params_galen'] / 1e6:.2f}M ({info['params_galen_without_resnet'] / 1e6:.2f}M w/o ResNet)",
                     f"{info['params_bart'] / 1e6:.2f}M", fmt_s(qg), fmt_s(qb), fmt_x(ratio), verdict])
        if args.profile:
            profiles[size] = profile_steps(steps, args.profile_steps, args.profile_top)
        del steps

    print(f"## Text-path training step: Galen vs BART (same dims)\n\n{machine_line(facts)}\n")
    print(f"command: `{command_line()}`\n")
    print(f"prompts padded to {args.prompt_len}, targets to {args.target_len}, vocab {args.vocab}, "
          f"AdamW lr {args.lr}, label smoothing {args.label_smoothing}, train mode (dropout on); "
          f"{args.warmup} warmup + {args.repeats} timed steps each, interleaved; median [IQR]\n")
    print(markdown_table(["size", "dims (d, enc+dec, heads, ffn)", "batch", "params Galen", "params BART",
                          "Galen step", "BART step", "Galen/BART (paired)", "target ours ≤ BART"], rows))
    for r in results:
        print(f"\n{r['size']}: real prompt tokens {r['prompt_tokens']} in {r['prompt_shape']}, real target tokens "
              f"{r['target_tokens']} in {r['target_shape']}; loss first/last step Galen "
              f"{r['first_loss']['galen']:.3f}/{r['last_loss']['galen']:.3f}, BART "
              f"{r['first_loss']['bart']:.3f}/{r['last_loss']['bart']:.3f}")
    for size, table in profiles.items():
        print(f"\n### Profile, {size}: self CPU time per step by op, sorted by Galen − BART "
              f"({args.profile_steps} steps each)\n\n{table}")
    payload = {"benchmark": "text_path", "command": command_line(), "machine": facts, "args": vars(args),
               "results": results, "profiles": profiles}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
