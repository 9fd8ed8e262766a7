"""`galen`: the command line of every pipeline step (each also usable as a Python function).

Errors Galen raises on purpose (bad input, missing files) print one clear line and exit with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from galen.flows.cli_options import Command, CommandParser, ConfigOptions, add_commands, arg, opt
from galen.model.config import SIZES
from galen.model.errors import GalenError, GalenInputError
from galen.model.tasks import TASKS

CORPUS_FIELDS = ("question", "answer", "report", "caption", "sentence1", "sentence2", "text", "CHQ", "Summary")


# -- model -----------------------------------------------------------------------------------------
def cmd_model_info(args: argparse.Namespace) -> None:
    import torch

    from galen.model.config import REFERENCE_PARAMS, SIZES, get_config
    from galen.model.generalist import GalenModel

    sizes = list(SIZES) if args.size == "all" else [args.size]
    rows = []
    for size in sizes:
        overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
        cfg = get_config(size, **overrides)
        with torch.device("meta"):  # count parameters without allocating them
            model = GalenModel(cfg)
        parts = {"embedding": model.embed_tokens.weight.numel(),
                 "image_backbone": sum(p.numel() for p in model.encoder.embed_images.parameters()),
                 "encoder": sum(p.numel() for p in model.encoder.parameters()),
                 "decoder": sum(p.numel() for p in model.decoder.parameters())}
        parts["encoder"] -= parts["image_backbone"]
        total = model.num_parameters()
        ref = REFERENCE_PARAMS[size]
        rows.append({"size": size, "parameters": total, "reference_parameters": ref,
                     "vs_reference": None if not ref or args.vocab_size else round(total / ref - 1, 4),
                     "parts": parts, "config": cfg.to_dict()})
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return
    for r in rows:
        c = r["config"]
        ref = f"{r['reference_parameters'] / 1e6:.0f}M" if r["reference_parameters"] else "-"
        dev = f" ({r['vs_reference']:+.1%} vs reference {ref})" if r["vs_reference"] is not None else ""
        print(f"{r['size']}: {r['parameters']:,} parameters{dev}")
        print(f"  layers {c['encoder_layers']}+{c['decoder_layers']}  d_model {c['d_model']}  ffn {c['ffn_dim']}  "
              f"heads {c['attention_heads']}  resnet stages {tuple(c['resnet_depths'])}  vocab {c['vocab_size']:,}  "
              f"image {c['image_size']}px")
        print("  " + "  ".join(f"{k} {v / 1e6:.1f}M" for k, v in r["parts"].items()))


def cmd_model_init(args: argparse.Namespace) -> None:
    import torch

    from galen.model.config import get_config
    from galen.model.generalist import GalenModel
    from galen.model.vocabulary import GalenTokenizer

    tok = GalenTokenizer.load(args.tokenizer)
    torch.manual_seed(args.seed)
    model = GalenModel(get_config(args.size, vocab_size=len(tok)))
    model.save_pretrained(args.out, tok)
    print(f"wrote a new {args.size} model ({model.num_parameters():,} parameters) to {args.out}")


# -- tokenizer -------------------------------------------------------------------------------------
def corpus_texts(paths: Sequence[str], fields: Sequence[str]) -> Iterator[str]:
    """Lines of .txt files, and the named string fields of .json (list of records) / .jsonl files."""
    from galen.model.errors import GalenInputError

    for p in map(Path, paths):
        if p.is_dir() or p.suffix == ".parquet":  # Galen shards: the text of the training split
            from galen.flows.ingest.schema import read_records

            for rec in read_records(p):
                if rec.split == "train" and not rec.problem:
                    yield from (v.strip() for v in (rec.question, rec.text, rec.premise, rec.hypothesis,
                                                     rec.target) if v and v.strip())
            continue
        if not p.is_file():
            raise GalenInputError(f"corpus file {p} not found")
        if p.suffix == ".txt":
            yield from (line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
            continue
        if p.suffix not in (".json", ".jsonl"):
            raise GalenInputError(f"corpus file {p}: use .txt (one text per line), .json or .jsonl")
        try:
            records = json.loads(p.read_text()) if p.suffix == ".json" else \
                [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise GalenInputError(f"corpus file {p} is not valid JSON ({e})") from e
        for rec in records if isinstance(records, list) else [records]:
            for f in fields:
                if isinstance(rec, dict) and isinstance(rec.get(f), str) and rec[f].strip():
                    yield rec[f].strip()


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from galen.model.sentencepiece_text import train_sentencepiece
    from galen.model.vocabulary import GalenTokenizer

    text = train_sentencepiece(corpus_texts(args.corpus, args.fields), args.out, vocab_size=args.vocab_size,
                               model_type=args.model_type, seed=args.seed)
    tok = GalenTokenizer(text)
    tok.save(args.out)
    print(f"wrote tokenizer to {args.out}: {text.vocab_size:,} text pieces, {len(tok):,} ids in all "
          f"(<mask> {tok.mask_id}, codes from {tok.code_offset}, bins from {tok.bin_offset})")


def cmd_tokenizer_encode(args: argparse.Namespace) -> None:
    from galen.model.vocabulary import GalenTokenizer

    tok = GalenTokenizer.load(args.tokenizer)
    ids = tok.encode(args.text)
    print(json.dumps({"ids": ids, "decoded": tok.decode(ids)}))


# -- checkpoint interop ----------------------------------------------------------------------------------
def _reference_tokenizer(args: argparse.Namespace):
    """The GPT-2 BPE tokenizer that comes with a reference checkpoint (None with --no-tokenizer)."""
    from galen.model.errors import GalenCheckpointError
    from galen.model.gpt2_bpe import GPT2BPEText
    from galen.model.vocabulary import GalenTokenizer

    if args.no_tokenizer:
        return None
    src = Path(args.path)
    if args.layout == "hf":
        if args.bpe_dir is None and (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
            return GalenTokenizer(GPT2BPEText.from_hf(src / "vocab.json", src / "merges.txt"))
        if args.bpe_dir is None:
            raise GalenCheckpointError(f"{src} has no vocab.json + merges.txt; pass --bpe-dir with them, or "
                                       "--no-tokenizer to import the weights alone")
    bpe = Path(args.bpe_dir) if args.bpe_dir else None
    if bpe is None:
        raise GalenCheckpointError("fairseq checkpoints need the GPT-2 BPE files: pass --bpe-dir with encoder.json, "
                                   "vocab.bpe and dict.txt (BiomedGPT's utils/BPE folder), or --no-tokenizer")
    if (bpe / "vocab.json").is_file() and (bpe / "merges.txt").is_file() and not (bpe / "dict.txt").is_file():
        return GalenTokenizer(GPT2BPEText.from_hf(bpe / "vocab.json", bpe / "merges.txt"))
    dict_txt = bpe / "dict.txt"
    if not dict_txt.is_file() and (src.parent / "dict.txt").is_file():
        dict_txt = src.parent / "dict.txt"
    return GalenTokenizer(GPT2BPEText.from_fairseq(bpe / "encoder.json", bpe / "vocab.bpe", dict_txt))


def cmd_import_checkpoint(args: argparse.Namespace) -> None:
    import hashlib

    from galen.model.errors import GalenCheckpointError
    from galen.model.interop import import_reference

    tok = _reference_tokenizer(args)
    imported = import_reference(args.path, args.layout, use_ema=args.ema)
    model = imported.model
    if tok is not None and len(tok) != model.cfg.vocab_size:
        raise GalenCheckpointError(f"the tokenizer files give {len(tok):,} ids but the checkpoint's embedding has "
                                   f"{model.cfg.vocab_size:,} rows; use the BPE files that belong to this checkpoint")
    out = model.save_pretrained(args.out, tok)
    src = Path(args.path)
    digest = None
    if src.is_file():  # in blocks: a released checkpoint can be several GB
        sha = hashlib.sha256()
        with src.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        digest = sha.hexdigest()
    (out / "import.json").write_text(json.dumps({"source": str(src.resolve()), "layout": args.layout,
                                                 "ema": args.ema, "sha256": digest}, indent=2) + "\n")
    print(f"imported a {model.cfg.name} model ({model.num_parameters():,} parameters"
          f"{', EMA weights' if args.ema else ''}) from {src} into {out}"
          + ("" if tok else " (no tokenizer: add one before generating)"))


def cmd_export(args: argparse.Namespace) -> None:
    from galen.model.errors import GalenCheckpointError
    from galen.model.generalist import GalenModel
    from galen.model.interop import export_hf_ofa
    from galen.model.vocabulary import GalenTokenizer

    model = GalenModel.from_pretrained(args.model)
    try:
        tok = GalenTokenizer.load(args.model)
    except GalenError:
        tok = None
    if args.format != "hf-ofa":
        raise GalenCheckpointError(f"unknown export format {args.format!r}")
    export_hf_ofa(model, args.out, tok)
    print(f"exported {args.model} as a transformers-OFA folder to {args.out}")


# -- data ------------------------------------------------------------------------------------------
def _parse_options(pairs: Sequence[str]) -> dict:
    """`key=value` options of an adapter; values parsed as YAML scalars (true, 3, [a, b])."""
    import yaml

    from galen.model.errors import GalenInputError

    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise GalenInputError(f"--option {pair!r} must look like key=value")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def cmd_ingest(args: argparse.Namespace) -> None:
    from galen.flows.ingest import all_formats, ingest
    from galen.flows.ingest.limits import use_limits
    from galen.flows.params import load_params, section
    from galen.model.errors import GalenInputError

    if args.list_formats:
        for f in all_formats():
            print(f"{f.name:12s} {f.description}")
        return
    options = _parse_options(args.option)
    fmt, source = args.format, args.source
    if args.dataset:
        datasets = section(section(load_params(args.params), "ingest"), "datasets")
        if args.dataset not in datasets:
            raise GalenInputError(f"dataset {args.dataset!r} is not in params.yaml ingest.datasets "
                                  f"({', '.join(datasets)})")
        entry = datasets[args.dataset]
        fmt, source = fmt or entry.get("format"), source or entry.get("source")
        options = {**(entry.get("options") or {}), **options}
    if not fmt or not source:
        raise GalenInputError("give --format and --source (or --dataset NAME from params.yaml)")
    with use_limits(args.params):  # params.yaml ingest.limits: decompressed bytes, arrays, pixels, frames
        result = ingest(fmt, source, args.out, **options)
    Path(args.out, "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"ingested {result['records']} records from {source} ({fmt}) into {args.out}: {result['by_task_split']}"
          + (f"; {result['with_problems']} with problems (validation will quarantine them)"
             if result["with_problems"] else ""))


def cmd_download(args: argparse.Namespace) -> None:
    from galen.flows.ingest.download import PUBLIC_DATASETS, fetch

    if args.list or not args.name:
        for d in PUBLIC_DATASETS.values():
            how = "credentialed: pass a local path" if d.credentialed else \
                ("download" if d.files or d.name == "medmnist" else "manual (see note)")
            print(f"{d.name:10s} format {d.format:12s} {how:32s} {d.homepage}")
        return
    folder = fetch(args.name, Path(args.out), flags=args.flags, size=args.size, timeout=args.timeout)
    entry = PUBLIC_DATASETS[args.name]
    print(f"downloaded {args.name} into {folder}; ingest it with: galen ingest --format {entry.format} "
          f"--source {folder} --out data/ingested/{args.name}")


def cmd_validate(args: argparse.Namespace) -> None:
    from galen.flows.params import load_params, section
    from galen.flows.validate import ValidationConfig, validate

    cfg = ValidationConfig.from_params(section(load_params(args.params), "validate"))
    inputs = []
    for pattern in args.inputs:  # folders, or glob patterns such as data/ingested/*
        matches = sorted(Path().glob(pattern)) if any(ch in pattern for ch in "*?[") else [Path(pattern)]
        inputs += [m for m in matches if m.is_dir()]
    if not inputs:
        raise GalenError(f"no ingested folders match {args.inputs}; run the ingest stage first")
    summary = validate(inputs, args.out, cfg, report_path=args.report)
    print(f"validated {summary['rows']} rows: {summary['valid']} valid, {summary['quarantined']} quarantined "
          f"({summary['bad_fraction']:.1%}); report in {args.report or Path(args.out) / 'report.json'}")


def cmd_shards(args: argparse.Namespace) -> None:
    from galen.flows.params import load_params
    from galen.flows.shards import ShardConfig, build_shards

    cfg = ShardConfig.from_params(load_params(args.params))  # `shards:`, for the models params.yaml trains
    if args.workers:
        cfg.workers = args.workers
    manifest = build_shards(args.validated, args.out, cfg)
    print(f"wrote {manifest['shards']} shards ({manifest['rows']} rows) to {args.out}: {manifest['by_task_split']}")


def cmd_image_codes_train(args: argparse.Namespace) -> None:
    from galen.flows.codebook import train_image_codes
    from galen.flows.params import load_params, section

    p = section(load_params(args.params), "image_codes")
    report = train_image_codes(args.data, args.out, num_codes=p.get("num_codes", 8192),
                               patches_per_image=p.get("patches_per_image", 64), max_images=p.get("max_images"),
                               seed=p.get("seed", 0))
    print(f"trained a {report.get('num_codes', p.get('num_codes'))}-code image tokenizer on "
          f"{report.get('images_used')} images into {args.out}")


def cmd_image_codes_encode(args: argparse.Namespace) -> None:
    from galen.flows.codebook import encode_image_codes

    summary = encode_image_codes(args.data, args.codes, args.out)
    print(f"wrote image codes to {args.out}: {summary}")


def cmd_train(args: argparse.Namespace) -> None:
    from galen.flows.params import load_params
    from galen.flows.train.generalist_trainer import load_train_config, train

    cfg = load_train_config(load_params(args.params), args.stage, **TRAIN.values(args))
    result = train(cfg)
    print(f"trained ({cfg.stage}, ZeRO-{cfg.zero_stage}, {cfg.num_workers} workers): {result}; model in {cfg.out}")


def cmd_submit(args: argparse.Namespace) -> None:
    from galen.flows.submit import submit

    submit(args.command, build_parser(), address=args.address, project=args.project, cluster_dir=args.cluster_dir,
           excludes=args.exclude or (), env=args.env or (), job_id=args.job_id, wait=not args.no_wait)


def cmd_demo_data(args: argparse.Namespace) -> None:
    from galen.flows.demo_data import write_demo

    counts = write_demo(args.out, seed=args.seed, scale=args.scale, image_size=args.image_size)
    for name, c in counts.items():
        print(f"  {name:12s} {c}")
    print(f"wrote the demo datasets to {args.out}")


# -- learning check / inference --------------------------------------------------------------------
def cmd_learn_check(args: argparse.Namespace) -> None:
    import torch

    from galen.flows.ingest.schema import read_records
    from galen.flows.learn_check import learn_check, require_accuracy, required_accuracy, write_metrics
    from galen.model.config import get_config
    from galen.model.errors import GalenInputError
    from galen.model.generalist import GalenModel
    from galen.model.vocabulary import GalenTokenizer

    required_accuracy(args.require_accuracy)  # a bad requirement fails before training, not after
    records = [r for r in read_records(args.data) if r.task == args.task and r.split == "train" and not r.problem]
    records = records[: args.limit]
    if not records:
        raise GalenInputError(f"no {args.task} training records in {args.data}")
    tok = GalenTokenizer.load(args.tokenizer)
    torch.manual_seed(args.seed)
    model = GalenModel(get_config(args.size, vocab_size=len(tok), dropout=0.0, encoder_drop_path_rate=0.0,
                                  decoder_drop_path_rate=0.0))
    result = learn_check(model, tok, records, max_steps=args.max_steps, lr=args.lr, seed=args.seed)
    if args.metrics:
        write_metrics(result, args.metrics)
    if args.out:
        model.save_pretrained(args.out, tok)
    print(f"learn-check: {result.accuracy:.0%} of {len(records)} answers right after {result.steps} steps "
          f"({result.seconds:.0f}s, final nll {result.final_loss:.3f})")
    require_accuracy(result.accuracy, args.require_accuracy)  # low or not a number: exit 2 with the reason


def cmd_generate(args: argparse.Namespace) -> None:
    from galen.model.decoding import CandidateTrie, GenerationConfig, answer_closed_set, generate
    from galen.model.generalist import GalenModel
    from galen.model.tasks import build_prompt
    from galen.model.vision import preprocess_images, read_image_file
    from galen.model.vocabulary import GalenTokenizer

    image = read_image_file(args.image) if args.image else None  # size limits checked before decoding
    model = GalenModel.from_pretrained(args.model)
    tok = GalenTokenizer.load(args.model)
    fields = {"question": args.question, "text": args.text, "premise": args.premise, "hypothesis": args.hypothesis}
    prompt = build_prompt(args.task, **{k: v for k, v in fields.items() if v is not None})
    ids, _ = tok.pad_batch([tok.encode_prompt(prompt, max_length=model.cfg.max_positions)])
    images = preprocess_images([image], model.cfg.image_size) if image is not None else None
    if args.candidates:
        trie = CandidateTrie.from_texts(tok, args.candidates)
        index = answer_closed_set(model, ids, [trie], images, mode=args.closed_set_mode, beam_size=args.beam)[0]
        print(args.candidates[index])
        return
    cfg = GenerationConfig(beam_size=args.beam, max_length=args.max_length, min_length=args.min_length,
                           length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram)
    print(tok.decode(generate(model, ids, images, config=cfg)[0].tokens).strip())


# -- evaluation and registry -----------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> None:
    from galen.flows.evaluate import evaluate
    from galen.model.predict import PredictConfig

    config = PredictConfig(**EVALUATE_DECODING.values(args))
    report = evaluate(args.model, args.shards, args.out, limit=args.limit, tasks=args.tasks, predict_config=config,
                      log_mlflow=not args.no_mlflow, run_id=args.run_id, experiment=args.experiment,
                      predictions_path=args.predictions, plots_dir=args.plots, samples=args.samples)
    for task, m in report.items():
        if isinstance(m, dict):
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()
                              if not isinstance(v, dict))
            print(f"  {task:15s} {shown}")
    where = f"; MLflow run {report['run_id']}" if "run_id" in report else ""
    print(f"wrote {args.out}{where}")


def _registry_config(args: argparse.Namespace):
    from galen.flows.params import load_params
    from galen.flows.registry import RegistryConfig

    params = load_params(args.params)
    cfg = RegistryConfig.from_params(params)
    if args.name:
        cfg.model_name = args.name
    return cfg, params


def cmd_register(args: argparse.Namespace) -> None:
    cfg, params = _registry_config(args)
    _register_and_promote(args, cfg, params)


def _register_and_promote(args: argparse.Namespace, cfg: Any, params: dict, kind: Any = None) -> None:
    """register (+ promote with --promote), printing the decision and writing --report."""
    from dataclasses import asdict

    from galen.flows.registry import GENERALIST, aliases, promote, register

    reg = register(args.model, cfg, params, metrics_file=args.metrics, run_id=args.run_id, kind=kind or GENERALIST)
    print(f"registered {reg.name} version {reg.version} from run {reg.run_id} (model sha256 {reg.sha256[:12]})")
    report = asdict(reg)
    if args.promote:
        decision = promote(cfg, version=reg.version, break_lock=args.break_lock)
        print(decision.message)
        report.update(promoted=decision.promoted, decision=decision.message, aliases=aliases(cfg))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")


def cmd_promote(args: argparse.Namespace) -> None:
    from galen.flows.registry import promote

    cfg, _ = _registry_config(args)
    print(promote(cfg, version=args.version, alias=args.alias, break_lock=args.break_lock).message)


def cmd_rollback(args: argparse.Namespace) -> None:
    from galen.flows.registry import rollback

    cfg, _ = _registry_config(args)
    print(rollback(cfg, break_lock=args.break_lock).message)


def cmd_summary(args: argparse.Namespace) -> None:
    from galen.flows.summary import build_summary

    print(build_summary(args.metrics_dir, shards_dir=args.shards, model_dir=args.model,
                        clip_model_dir=args.clip_model), end="")


# -- CLIP model ---------------------------------------------------------------------------------
def cmd_clip_train(args: argparse.Namespace) -> None:
    from galen.flows.params import load_params
    from galen.flows.train.clip_trainer import load_clip_train_config, train_clip

    cfg = load_clip_train_config(load_params(args.params), **CLIP_TRAIN.values(args))
    result = train_clip(cfg)
    print(f"trained {cfg.out} (MLflow run {result['run_id']}, {result.get('samples_per_s', 0):.1f} samples/s)")


def cmd_clip_evaluate(args: argparse.Namespace) -> None:
    from galen.flows.evaluate_clip import ZERO_SHOT_TEMPLATES, evaluate_clip
    from galen.flows.params import load_params

    section = (load_params(args.params).get("clip") or {}).get("evaluate") or {}
    report = evaluate_clip(args.model, args.shards, args.out, limit=args.limit, plots_dir=args.plots,
                           templates=section.get("templates", ZERO_SHOT_TEMPLATES), log_mlflow=not args.no_mlflow)
    from galen.flows.evaluate import flat_metrics

    for name, m in report.items():
        if isinstance(m, dict):
            shown = {k: v for k, v in flat_metrics({k: v for k, v in m.items() if k != "by_dataset"}).items()}
            print(f"  {name:13s} " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    print(f"wrote {args.out}" + (f"; MLflow run {report['run_id']}" if "run_id" in report else ""))


def _clip_registry_config(args: argparse.Namespace):
    from galen.flows.params import load_params
    from galen.flows.registry import RegistryConfig

    params = load_params(args.params)
    section = (params.get("clip") or {}).get("registry")
    if not section:
        raise GalenInputError("params.yaml has no clip.registry section (model_name, metrics); add one")
    cfg = RegistryConfig.from_params({"registry": section})
    if args.name:
        cfg.model_name = args.name
    return cfg, params


def cmd_clip_register(args: argparse.Namespace) -> None:
    from galen.flows.params import load_params
    from galen.flows.registry import CLIP

    clip = load_params(args.params).get("clip")
    if clip is not None and not isinstance(clip, dict):
        raise GalenInputError(f"params.yaml `clip:` must be a section with a registry: entry, not a "
                              f"{type(clip).__name__}")
    cfg, params = _clip_registry_config(args)
    _register_and_promote(args, cfg, params.get("clip") or {}, CLIP)


def cmd_clip_import(args: argparse.Namespace) -> None:
    from galen.model.clip import ClipModel

    model = ClipModel.from_pretrained(args.source)
    model.save_pretrained(args.out)
    print(f"imported {args.source} ({model.spec.name}, embed dim {model.spec.embed_dim}, "
          f"{sum(p.numel() for p in model.clip.parameters()) / 1e6:.1f}M parameters) -> {args.out}")


def cmd_clip_export(args: argparse.Namespace) -> None:
    from galen.model.clip import ClipModel

    out = ClipModel.from_pretrained(args.model).export(args.out)
    print(f"wrote {out} (open_clip: open_clip.create_model_from_pretrained('local-dir:{out}'))")


def cmd_clip_index(args: argparse.Namespace) -> None:
    from galen.flows.evaluate_clip import build_index

    index = build_index(args.model, args.shards, args.out, tasks=args.tasks, split=args.split, limit=args.limit)
    print(f"indexed {len(index.items)} image-caption items ({index.embed_dim}-d) -> {args.out}")


def cmd_clip_embed(args: argparse.Namespace) -> None:
    from galen.model.clip import ClipModel

    if args.labels and not args.image:
        raise GalenInputError("zero-shot classification (--labels) needs --image")
    if not args.labels and bool(args.image) == bool(args.text):
        raise GalenInputError("give exactly one of --image or --text (or --image with --labels)")
    from galen.model.vision import read_image_file

    image = read_image_file(args.image) if args.image else None  # size limits checked before decoding
    model = ClipModel.from_pretrained(args.model)  # after the checks: loading takes seconds
    if args.labels:
        probs = model.classify([image], args.labels)[0]
        for label, p in sorted(zip(args.labels, probs.tolist()), key=lambda x: -x[1]):
            print(f"{p:.4f}  {label}")
        return
    emb = model.encode_images([image]) if image is not None else model.encode_texts([args.text])
    print(json.dumps([round(x, 6) for x in emb[0].tolist()]))


# -- serving ---------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> None:
    from galen.serve.app import DEFAULT_CONFIG, run_local

    user_config = SERVE_SETTINGS.values(args)  # only the settings given
    if args.no_batching:
        user_config["batching"] = False
    run_local(args.config or DEFAULT_CONFIG, host=args.host, port=args.port, user_config=user_config,
              args={"params": args.params} if args.params else None, num_cpus=args.num_cpus,
              ready_file=args.ready_file)


# -- options of the commands without a stage config ------------------------------------------------
# One field per option: `opt(default, help=...)`; no default means the option is required.
@dataclass(kw_only=True)
class LearnCheckOptions:
    data: str = opt(help="folder of Galen Parquet shards (ingested or validated)")
    task: str = opt("vqa", help="task of the records to learn (short answers: vqa, nli, ...)")
    tokenizer: str = opt(help="folder written by `galen tokenizer train`")
    size: str = opt("nano", choices=tuple(SIZES), help="model size")
    limit: int = opt(16, help="number of records to learn")
    max_steps: int = opt(400, help="give up after this many steps")
    lr: float = opt(1e-3, help="learning rate")
    seed: int = opt(0, help="seed of the weights and of the training order")
    require_accuracy: float = opt(1.0, help="fail below this accuracy")
    metrics: str | None = opt(None, help="write a JSON metrics file here")
    out: str | None = opt(None, help="save the trained model folder here")


@dataclass(kw_only=True)
class GenerateOptions:
    model: str = opt(help="model folder (save_pretrained / import-checkpoint output)")
    task: str = opt("vqa", choices=TASKS, help="the task to prompt for")
    image: str | None = opt(None, help="image file (PNG, JPEG, ...)")
    question: str | None = opt(None, help="the question (vqa)")
    text: str | None = opt(None, help="the text of a grounding, summarization, ... prompt")
    premise: str | None = opt(None, help="nli: the premise")
    hypothesis: str | None = opt(None, help="nli: the hypothesis")
    candidates: list[str] | None = opt(None, help="closed answer set: the answer will be one of these")
    beam: int = opt(5, help="beam size")
    max_length: int = opt(40, help="at most this many answer tokens")
    min_length: int = opt(1, help="at least this many answer tokens")
    length_penalty: float = opt(1.0, help="scores are normalised by length ** this")
    no_repeat_ngram: int = opt(3, help="never repeat an n-gram of this size (0: no blocking)")


@dataclass(kw_only=True)
class EvalOptions:
    """What `galen evaluate` and `galen clip evaluate` share."""

    model: str = opt(help="the model folder to evaluate")
    shards: str = opt(help="folder written by `galen shards`")
    out: str = opt(help="metrics JSON to write (a DVC metric)")
    limit: int | None = opt(None, help="at most this many test records per task")
    plots: str | None = opt(None, help="also write the plots (PNG: confusion matrices, ...) into this folder")
    no_mlflow: bool = opt(False, help="only write the metrics file")


@dataclass(kw_only=True)
class EvaluateOptions(EvalOptions):
    tasks: list[str] | None = opt(None, help="evaluate only these tasks (default: every task with a test split)")
    run_id: str | None = opt(None, help="log into this MLflow run (e.g. the training run) instead of a new one")
    experiment: str = opt("galen-evaluate", help="MLflow experiment of a new run")
    predictions: str | None = opt(None, help="also write every prediction as JSON lines here")
    samples: int = opt(8, help="sample predictions per task in the MLflow tables")


BREAK_LOCK_HELP = ("break a registry lock held from another machine whose holder is gone (its planned alias "
                   "changes are completed first); a lock of a dead process on this machine is broken without it")


@dataclass(kw_only=True)
class RegisterOptions:
    model: str = opt(help="model folder that was evaluated")
    metrics: str | None = opt(None, help="the metrics JSON `galen evaluate` (`galen clip evaluate`) wrote (its "
                              "run id is used)")
    run_id: str | None = opt(None, help="MLflow run holding the eval metrics (default: the metrics file's)")
    promote: bool = opt(False, help="then promote the new version (as `galen promote` does)")
    report: str | None = opt(None, help="write the version, run and promotion decision as JSON here")
    break_lock: bool = opt(False, help=BREAK_LOCK_HELP)


@dataclass(kw_only=True)
class PromoteOptions:
    version: str | None = opt(None, exclusive="version", help="version number (default: the latest)")
    alias: str | None = opt(None, exclusive="version", help="the version an alias points to, e.g. challenger")
    break_lock: bool = opt(False, help=BREAK_LOCK_HELP)


@dataclass(kw_only=True)
class SummaryOptions:
    metrics_dir: str = opt("metrics", help="folder of the metrics files dvc.yaml writes")
    shards: str = opt("data/shards", help="the shards (answer types of the VQA test split)")
    model: str = opt("artifacts/model", help="the generalist model folder")
    clip_model: str = opt("artifacts/clip_model", help="the CLIP model folder")


@dataclass(kw_only=True)
class ClipIndexOptions:
    model: str = opt(help="CLIP model folder")
    shards: str = opt(help="folder written by `galen shards`")
    out: str = opt(help="index folder to write")
    tasks: list[str] = opt(default_factory=lambda: ["caption"], choices=("caption", "classification"),
                           help="rows to index (classification rows are captioned with their class name)")
    split: str = opt("test", choices=("train", "val", "test"), help="the shard split to index")
    limit: int | None = opt(None, help="at most this many rows per task")


@dataclass(kw_only=True)
class ClipEmbedOptions:
    model: str = opt(help="CLIP model folder")
    image: str | None = opt(None, help="embed this image file (or classify it over --labels)")
    text: str | None = opt(None, help="embed this text")
    labels: list[str] | None = opt(None, help="zero-shot probabilities of --image over these labels")


@dataclass(kw_only=True)
class ServeOptions:
    config: str | None = opt(None, help="Serve config YAML (default: serve/config.yaml of the package)")
    params: str | None = opt(None, help="params.yaml whose `serve:` section sets limits, batching, timeouts "
                             "(default: the project's)")
    host: str = opt("127.0.0.1", help="address to listen on")
    port: int = opt(8000, help="port to listen on")
    no_batching: bool = opt(False, help="answer each request alone (override serve.batching)")
    num_cpus: int | None = opt(None, help="CPUs of the embedded Ray (default: all)")
    ready_file: str | None = opt(None, help="write the URL here once serving (for scripts)")


# -- options from the stages' configs (fields named here; flags, types and defaults from the classes) ----
_JOB_HELPS = {"init": "start from this model folder (pretrained or imported)",
              "out": "where to save the trained model folder", "use_gpu": "one GPU per worker",
              "precision": "bf16 on GPU", "metrics": "write the final metrics (and the MLflow run id) to this JSON file"}
TRAIN = ConfigOptions(
    "galen.flows.train.generalist_trainer:TrainConfig",
    ("steps", "num_workers", "zero_stage", "run_name", "init", "out", "batch_size", "size", "use_gpu", "precision",
     "metrics"),
    section="train", override=True, flags={"num_workers": "--workers"},
    choices={"zero_stage": (0, 1, 2, 3), "size": tuple(SIZES), "precision": ("fp32", "bf16")},
    helps={**_JOB_HELPS, "batch_size": "per worker and micro-step", "size": "must match --init's checkpoint",
           "run_name": "MLflow run name (default galen-<stage>); re-running the same params resumes an unfinished job"})


def _clip_config_names() -> list[str]:
    from galen.model.clip import config_names

    return config_names()


CLIP_TRAIN = ConfigOptions(
    "galen.flows.train.clip_trainer:ClipTrainConfig",
    ("config", "init", "steps", "num_workers", "batch_size", "zero_stage", "use_gpu", "precision", "out", "metrics",
     "run_name"),
    section="clip.train", override=True, flags={"num_workers": "--workers"},
    choices={"config": _clip_config_names, "zero_stage": (0, 1, 2), "precision": ("fp32", "bf16")},
    helps={**_JOB_HELPS, "config": "named model config", "init": "start from this CLIP model folder (e.g. imported "
           "BiomedCLIP)", "batch_size": "per worker; every worker's features are gathered for the loss",
           "run_name": "MLflow run name; re-running the same params resumes an unfinished job"})
GENERATE_DECODING = ConfigOptions("galen.model.predict:PredictConfig", ("closed_set_mode",))
EVALUATE_DECODING = ConfigOptions("galen.model.predict:PredictConfig", ("max_batch_size", "closed_set_mode"),
                                  flags={"max_batch_size": "--batch-size"})
REGISTRY_NAME = ConfigOptions("galen.flows.registry:RegistryConfig", ("model_name",), section="registry",
                              override=True, flags={"model_name": "--name"})
SERVE_SETTINGS = ConfigOptions(
    "galen.serve.settings:ServeSettings", ("model_name", "alias", "poll_interval_s"), section="serve", override=True,
    flags={"poll_interval_s": "--poll-interval"},
    helps={"model_name": "registered model", "alias": "serve the version at this alias (champion, challenger, ...)",
           "poll_interval_s": "seconds between alias checks"})
PARAMS = arg("--params", default="params.yaml", help="the project's settings")

# -- the command table -------------------------------------------------------------------------------
COMMANDS: tuple[Command, ...] = (
    Command("model", "model sizes and model folders", commands=(
        Command("info", "parameter counts and config of a named size", cmd_model_info, (
            arg("--size", default="base", choices=[*SIZES, "all"]),
            arg("--vocab-size", type=int, default=None, help="count with this vocabulary instead of the reference "
                "59,457"),
            arg("--json", action="store_true", help="machine-readable output"))),
        Command("init", "write a freshly initialised model folder (weights, config, tokenizer)", cmd_model_init, (
            arg("--size", required=True, choices=list(SIZES)),
            arg("--tokenizer", required=True, help="folder written by `galen tokenizer train`"),
            arg("--out", required=True),
            arg("--seed", type=int, default=0))))),
    Command("tokenizer", "train and try the text tokenizer", commands=(
        Command("train", "train a SentencePiece model on a text corpus", cmd_tokenizer_train, (
            arg("--corpus", nargs="+", required=True, help=".txt (a text per line), .json or .jsonl files, or folders "
                "of Galen Parquet shards (their training split's text)"),
            arg("--fields", nargs="+", default=list(CORPUS_FIELDS), help="text fields of JSON records"),
            arg("--out", required=True),
            arg("--vocab-size", type=int, default=8000),
            arg("--model-type", default="unigram", choices=["unigram", "bpe"]),
            arg("--seed", type=int, default=0))),
        Command("encode", "show the ids of a text", cmd_tokenizer_encode, (
            arg("--tokenizer", required=True),
            arg("text"))))),
    Command("demo-data", "write the procedural demo datasets in real raw layouts", cmd_demo_data, (
        arg("--out", required=True),
        arg("--seed", type=int, default=0),
        arg("--scale", type=float, default=1.0, help="multiplies every generated count"),
        arg("--image-size", type=int, default=128))),
    Command("ingest", "read a dataset in its real layout into normalized Parquet shards", cmd_ingest, (
        arg("--list-formats", action="store_true", help="print the dataset formats and exit"),
        arg("--format", help="dataset format (see --list-formats)"),
        arg("--source", help="the dataset's folder or file"),
        arg("--dataset", help="take format/source/options from params.yaml ingest.datasets.NAME"),
        arg("--option", action="append", metavar="KEY=VALUE", help="adapter option (repeatable)"),
        arg("--out", help="output folder of Parquet shards"),
        PARAMS)),
    Command("download", "download a public dataset, checksums verified (needs internet)", cmd_download, (
        arg("name", nargs="?", help="dataset name (see --list)"),
        arg("--list", action="store_true", help="list the datasets and how each is obtained"),
        arg("--out", default="data/raw", help="folder to download into"),
        arg("--flags", nargs="+", help="MedMNIST subsets, e.g. pathmnist organcmnist"),
        arg("--size", type=int, help="MedMNIST image size (28, 64, 128, 224)"),
        arg("--timeout", type=float, default=60))),
    Command("validate", "check every ingested row; quarantine bad ones with a reason", cmd_validate, (
        arg("--inputs", nargs="+", required=True, help="ingested shard folders (globs allowed)"),
        arg("--out", required=True),
        arg("--report", help="write the data report (a DVC metric) here instead of OUT/report.json"),
        PARAMS)),
    Command("shards", "per task/split training shards with resized images", cmd_shards, (
        arg("--validated", required=True),
        arg("--out", required=True),
        arg("--workers", type=int, default=0, help="processes (default: params.yaml shards.workers)"),
        PARAMS)),
    Command("image-codes", "discrete image codes for image infilling", commands=(
        Command("train", "train the k-means patch codebook (settings: params.yaml image_codes)", cmd_image_codes_train, (
            arg("--data", required=True, help="folder of validated Parquet shards"),
            arg("--out", required=True),
            PARAMS)),
        Command("encode", "codes of the training images' middle crops, keyed by image sha1", cmd_image_codes_encode, (
            arg("--data", required=True, help="folder of validated Parquet shards"),
            arg("--codes", required=True, help="image tokenizer folder (trained or precomputed)"),
            arg("--out", required=True, help="Parquet file to write"))))),
    Command("train", "pretrain or fine-tune on Ray Train + DeepSpeed (settings: params.yaml train)", cmd_train, (
        arg("--stage", required=True, choices=["pretrain", "finetune"], help="params.yaml train.<stage> is laid "
            "over train"),
        PARAMS, TRAIN)),
    Command("submit", "run a galen command (e.g. train) on a Ray cluster through the Ray Jobs API", cmd_submit, (
        arg("--address", help="the cluster's Jobs API, http://HEAD:8265 (default: RAY_ADDRESS)"),
        arg("--project", default=".", help="project folder uploaded as the job's working_dir"),
        arg("--cluster-dir", help="run in this project folder on the nodes instead (nothing uploaded)"),
        arg("--exclude", action="append", help="more upload excludes (.gitignore-style, repeatable)"),
        arg("--env", action="append", metavar="NAME[=VALUE]", help="env var for the job (repeatable)"),
        arg("--job-id", help="submission id (default: Ray picks one)"),
        arg("--no-wait", action="store_true", help="return once submitted instead of following the logs"),
        arg("command", nargs=argparse.REMAINDER, help="the galen command, after --")),
        description="galen submit [options] -- train --stage finetune --params params.yaml"),
    Command("learn-check", "train a small model on a few records until it answers them all", cmd_learn_check,
            (ConfigOptions(LearnCheckOptions),)),
    Command("import-checkpoint", "import released BiomedGPT/OFA weights (fairseq .pt or transformers-OFA folder) "
            "into a Galen model folder", cmd_import_checkpoint, (
                arg("--from", dest="layout", required=True, choices=["fairseq", "hf"]),
                arg("path", help="the fairseq checkpoint .pt file, or the transformers-OFA model folder"),
                arg("--out", required=True, help="Galen model folder to write"),
                arg("--ema", action="store_true", help="take the EMA weights (fairseq extra_state.ema)"),
                arg("--bpe-dir", help="GPT-2 BPE files: encoder.json, vocab.bpe, dict.txt (fairseq) or vocab.json + "
                    "merges.txt"),
                arg("--no-tokenizer", action="store_true", help="import the weights without tokenizer files"))),
    Command("export", "write a Galen model folder in a reference layout", cmd_export, (
        arg("--model", required=True, help="Galen model folder"),
        arg("--format", default="hf-ofa", choices=["hf-ofa"]),
        arg("out", help="folder to write"))),
    Command("generate", "answer one request with a saved model folder", cmd_generate,
            (ConfigOptions(GenerateOptions), GENERATE_DECODING)),
    Command("evaluate", "metrics of a model folder on the test split of every task in the shards", cmd_evaluate,
            (ConfigOptions(EvaluateOptions), EVALUATE_DECODING)),
    Command("register", "log a model folder as an MLflow pyfunc and register it with its lineage", cmd_register,
            (ConfigOptions(RegisterOptions), REGISTRY_NAME, PARAMS)),
    Command("promote", "make a registered version champion if it beats the current one (params.yaml "
            "registry.metrics), else challenger", cmd_promote, (ConfigOptions(PromoteOptions), REGISTRY_NAME, PARAMS)),
    Command("rollback", "make the `previous` champion `champion` again", cmd_rollback,
            (arg("--break-lock", action="store_true", help=BREAK_LOCK_HELP), REGISTRY_NAME, PARAMS)),
    Command("summary", "one short table of a pipeline run: per task the held-out result beside chance / majority, "
            "the registered versions, where the model and the MLflow UI are", cmd_summary,
            (ConfigOptions(SummaryOptions),)),
    Command("clip", "the CLIP (BiomedCLIP-style) model: train, evaluate, register, import, export, embed",
            metavar="COMMAND", commands=(
                Command("train", "CLIP training on Ray Train + DeepSpeed (settings: params.yaml clip.train)",
                        cmd_clip_train, (PARAMS, CLIP_TRAIN)),
                Command("evaluate", "zero-shot, linear probe and retrieval Recall@K on the shards' test splits",
                        cmd_clip_evaluate, (ConfigOptions(EvalOptions), arg(
                            "--params", default="params.yaml", help="clip.evaluate.templates: zero-shot prompt "
                            "templates"))),
                Command("register", "register a CLIP model (params.yaml clip.registry) and promote it",
                        cmd_clip_register, (ConfigOptions(RegisterOptions),
                                            dataclasses.replace(REGISTRY_NAME, section="clip.registry"), PARAMS)),
                Command("import", "read an open_clip / BiomedCLIP folder offline (open_clip_config.json, "
                        "open_clip_pytorch_model.bin, tokenizer files) into a Galen CLIP model folder",
                        cmd_clip_import, (arg("source"), arg("--out", required=True))),
                Command("export", "write a model in the released open_clip layout (open_clip_pytorch_model.bin)",
                        cmd_clip_export, (arg("--model", required=True), arg("--out", required=True))),
                Command("index", "embed the images and captions of a shard split for /v1/retrieve (serve setting "
                        "clip_index)", cmd_clip_index, (ConfigOptions(ClipIndexOptions),)),
                Command("embed", "print the normalized embedding of an image or a text, or zero-shot probabilities "
                        "of an image over --labels", cmd_clip_embed, (ConfigOptions(ClipEmbedOptions),)))),
    Command("serve", "serve the registered model over HTTP on an embedded Ray (Ray Serve; settings: "
            "serve/config.yaml and params.yaml serve)", cmd_serve, (ConfigOptions(ServeOptions), SERVE_SETTINGS)),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="galen", description="Galen: biomedical vision-language models from raw "
                                "datasets to a live endpoint.")
    add_commands(p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser),
                 COMMANDS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GalenError as e:
        print(f"galen: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
