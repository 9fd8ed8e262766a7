"""Code tier: the `galen` command line as a user runs it (real files; the console script and the exit
status of bad input in real subprocesses, other commands through the same `main()` in-process)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest

from galen.flows.cli import build_parser, main


def galen(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`galen ARGS` through the console script's own `main()`, in this process: a subprocess per
    command cost ~5 s of imports each, and what the process adds (the entry point, the exit status)
    is tested by subprocess below. Returns what a subprocess run would: status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(args))
        except SystemExit as exit_:  # argparse's usage errors
            status = exit_.code if isinstance(exit_.code, int) else 1
    proc = subprocess.CompletedProcess(["galen", *args], status, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"galen {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def _all_commands(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _all_commands(sub, (*prefix, name))


def test_every_subcommand_has_help(capsys):

    commands = list(_all_commands(build_parser()))
    assert ("model", "info") in commands and ("tokenizer", "train") in commands
    for cmd in [(), *commands]:  # in-process (the installed script's --help: test_console_script_is_installed)
        with pytest.raises(SystemExit) as exit_:
            main([*cmd, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and f"usage: galen {' '.join(cmd)}".strip() in out and "--help" in out, cmd


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("galen") or str(__import__("pathlib").Path(sys.executable).parent / "galen")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "model" in out.stdout


def test_model_info_prints_counts_near_the_reference():
    out = galen("model", "info", "--size", "base")
    assert "base: 182,238,536 parameters (+0.1% vs reference 182M)" in out.stdout
    rows = json.loads(galen("model", "info", "--size", "all", "--json").stdout)
    assert [r["size"] for r in rows] == ["nano", "tiny", "medium", "base", "large", "huge"]
    for r in rows:
        if r["reference_parameters"]:
            assert abs(r["vs_reference"]) < 0.05


def test_unknown_size_is_a_clear_usage_error():
    out = galen("model", "info", "--size", "gigantic", check=False)
    assert out.returncode == 2 and "invalid choice: 'gigantic'" in out.stderr


def test_tokenizer_train_init_and_generate_round_trip(tmp_path, demo_vqa):
    tok = tmp_path / "tok"
    galen("tokenizer", "train", "--corpus", str(demo_vqa / "trainset.json"), "--out", str(tok), "--vocab-size", "290")
    enc = json.loads(galen("tokenizer", "encode", "--tokenizer", str(tok), "is there a nodule? <bin_12>").stdout)
    assert enc["decoded"] == "is there a nodule? <bin_12>"
    model = tmp_path / "model"
    galen("model", "init", "--size", "nano", "--tokenizer", str(tok), "--out", str(model))
    image = next((demo_vqa / "images").iterdir())
    out = galen("generate", "--model", str(model), "--image", str(image), "--question", "is there a nodule?",
                "--candidates", "yes", "no", "maybe")
    assert out.stdout.strip() in {"yes", "no", "maybe"}
    free = galen("generate", "--model", str(model), "--image", str(image), "--question", "how many?",
                 "--max-length", "5", "--beam", "2")
    assert free.returncode == 0


@pytest.mark.parametrize("args, message", [
    (("tokenizer", "train", "--corpus", "missing.txt", "--out", "x"), "corpus file missing.txt not found"),
    (("generate", "--model", "no-such-folder", "--question", "why?"), "model folder no-such-folder does not exist"),
])
def test_bad_input_gives_one_clear_line_and_status_2(tmp_path, args, message):
    out = subprocess.run([sys.executable, "-m", "galen.flows.cli", *args], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args, message", [
    (("clip", "embed", "--model", "unused", "--labels", "a", "b"), "zero-shot classification (--labels) needs --image"),
    (("clip", "embed", "--model", "unused"), "give exactly one of --image or --text"),
    (("clip", "embed", "--model", "unused", "--image", "x.png", "--text", "a chest x-ray"),
     "give exactly one of --image or --text"),
])
def test_clip_embed_refuses_a_wrong_combination_of_inputs(args, message):
    out = galen(*args, check=False)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_clip_register_without_a_registry_section_says_what_to_add(tmp_path):
    (tmp_path / "params.yaml").write_text("clip:\n  train: {steps: 1}\n")
    out = galen("clip", "register", "--model", str(tmp_path), "--params", str(tmp_path / "params.yaml"), check=False)
    assert out.returncode == 2 and "params.yaml has no clip.registry section" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_empty_question_is_refused(tmp_path, demo_vqa):
    tok = tmp_path / "tok"
    galen("tokenizer", "train", "--corpus", str(demo_vqa / "trainset.json"), "--out", str(tok), "--vocab-size", "290")
    galen("model", "init", "--size", "nano", "--tokenizer", str(tok), "--out", str(tmp_path / "m"))
    out = galen("generate", "--model", str(tmp_path / "m"), "--question", "  ? ", check=False)
    assert out.returncode == 2 and "question is empty" in out.stderr


def test_download_lists_datasets_and_refuses_credentialed_ones():
    listing = galen("download", "--list").stdout
    assert "vqa-rad" in listing and "credentialed: pass a local path" in listing
    out = galen("download", "mimic-cxr", "--out", "unused", check=False)
    assert out.returncode == 2 and "credentialed" in out.stderr and "Traceback" not in out.stderr


def test_ingest_lists_every_format():
    listing = galen("ingest", "--list-formats").stdout
    for fmt in ("vqa-rad", "slake", "pathvqa", "r2gen", "roco", "peir-gross", "medicat", "medmnist", "mednli",
                "meqsum", "caption-csv", "webdataset", "ofa-tsv", "dicom"):
        assert f"\n{fmt} " in "\n" + listing


# --------------------------------------------------------------------------------------------------
# The command table: options declared once, on typed configs (flows/cli_options.py)
# --------------------------------------------------------------------------------------------------

def _subparser(*path: str):
    parser = build_parser()
    for name in path:
        parser = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[name]
    return parser.add_pending()  # a command's options are added when it first parses or prints help


def test_building_the_parser_imports_no_command_module():
    """`galen --help` (and every command's start) does not pay for the other commands' imports."""
    import subprocess
    import sys

    code = ("import sys; from galen.flows.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'timm', 'galen.flows.train.generalist_trainer', 'galen.model.predict') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _action(parser, flag: str):
    return next(a for a in parser._actions if flag in a.option_strings)


def test_config_options_take_flag_type_default_choices_and_help_from_the_fields():
    import argparse
    from dataclasses import dataclass, field

    from galen.flows.cli_options import ConfigOptions, opt

    @dataclass(kw_only=True)
    class Toy:
        max_length: int = opt(40, help="longest answer")
        name: str = opt(help="no default: required")
        tags: list[str] | None = opt(None, help="several values")
        mode: str = opt("a", choices=("a", "b"), help="one of two")
        fast: bool = opt(False, help="a switch")
        version: str | None = opt(None, exclusive="which", help="by number")
        alias: str | None = opt(None, exclusive="which", help="by alias")
        ratio: float = field(default=0.5)  # no metadata at all

    parser = argparse.ArgumentParser()
    ConfigOptions(Toy).add_to(parser)
    ConfigOptions(Toy, ("ratio",), section="toy", override=True, flags={"ratio": "--r"}).add_to(parser)
    acts = {a.dest: a for a in parser._actions}
    assert acts["max_length"].option_strings == ["--max-length"] and acts["max_length"].type is int
    assert acts["max_length"].default == 40 and not acts["max_length"].required
    assert acts["name"].required and acts["tags"].nargs == "+" and acts["mode"].choices == ["a", "b"]
    assert acts["fast"].__class__.__name__ == "_StoreTrueAction" and acts["fast"].default is False
    assert acts["r"].type is float and acts["r"].default is None and acts["r"].help == "override toy.ratio"
    assert [sorted(a.dest for a in g._group_actions) for g in parser._mutually_exclusive_groups] == [["alias", "version"]]

    args = parser.parse_args(["--name", "x", "--tags", "p", "q", "--fast", "--r", "0"])
    assert ConfigOptions(Toy).values(args) == {"max_length": 40, "name": "x", "tags": ["p", "q"], "mode": "a",
                                               "fast": True, "version": None, "alias": None, "ratio": 0.5}
    assert Toy(**{k: v for k, v in ConfigOptions(Toy).values(args).items() if k != "ratio"}).tags == ["p", "q"]
    override = ConfigOptions(Toy, ("ratio", "fast", "tags"), override=True, flags={"ratio": "--r"})
    assert override.values(args) == {"ratio": 0.0, "fast": True, "tags": ["p", "q"]}  # 0 is given, not "unset"
    assert override.values(parser.parse_args(["--name", "x"])) == {}
    with pytest.raises(TypeError, match="has no fields"):
        ConfigOptions(Toy, ("no_such_field",)).add_to(argparse.ArgumentParser())


def test_train_options_are_train_config_fields_and_parse_into_a_config():
    import dataclasses
    from pathlib import Path

    from galen.flows.cli import TRAIN
    from galen.flows.params import load_params
    from galen.flows.train.generalist_trainer import TrainConfig, load_train_config

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(TRAIN.names) <= set(fields)
    tr = _subparser("train")
    assert _action(tr, "--workers").dest == "workers" and _action(tr, "--workers").type is int
    assert _action(tr, "--zero-stage").choices == [0, 1, 2, 3] and _action(tr, "--zero-stage").default is None
    assert _action(tr, "--stage").required and _action(tr, "--stage").choices == ["pretrain", "finetune"]
    assert _action(tr, "--use-gpu").__class__.__name__ == "_StoreTrueAction"

    args = tr.parse_args(["--stage", "finetune", "--workers", "3", "--precision", "bf16", "--steps", "7"])
    overrides = TRAIN.values(args)
    assert overrides == {"num_workers": 3, "precision": "bf16", "steps": 7}
    root = Path(__file__).resolve().parents[2]
    cfg = load_train_config(load_params(root / "params.yaml"), args.stage, **overrides)
    assert (cfg.num_workers, cfg.precision, cfg.steps, cfg.stage) == (3, "bf16", 7, "finetune")


def test_the_other_configs_options_parse_into_their_configs():
    from galen.flows.cli import CLIP_TRAIN, EVALUATE_DECODING, SERVE_SETTINGS
    from galen.model.predict import PredictConfig
    from galen.serve.settings import ServeSettings

    ev = _subparser("evaluate").parse_args(["--model", "m", "--shards", "s", "--out", "o", "--batch-size", "4",
                                            "--closed-set-mode", "all"])
    assert PredictConfig(**EVALUATE_DECODING.values(ev)) == PredictConfig(max_batch_size=4, closed_set_mode="all")
    assert _subparser("evaluate").parse_args(["--model", "m", "--shards", "s", "--out", "o"]).batch_size == 16
    sv = _subparser("serve").parse_args(["--alias", "challenger", "--poll-interval", "0"])
    assert SERVE_SETTINGS.values(sv) == {"alias": "challenger", "poll_interval_s": 0.0}
    assert ServeSettings().replace(SERVE_SETTINGS.values(sv)).alias == "challenger"
    ct = _subparser("clip", "train").parse_args(["--workers", "1", "--use-gpu", "--zero-stage", "0"])
    assert CLIP_TRAIN.values(ct) == {"num_workers": 1, "use_gpu": True, "zero_stage": 0}


def test_help_lists_the_options_with_their_help_texts():
    out = galen("train", "--help")
    shown = " ".join(out.stdout.split())  # as wide as the terminal: compare without the line breaks
    assert out.returncode == 0
    for text in ("--workers WORKERS", "override train.num_workers", "--zero-stage {0,1,2,3}", "--use-gpu",
                 "one GPU per worker (override train.use_gpu)", "--stage {pretrain,finetune}"):
        assert text in shown, text
    gen = " ".join(galen("generate", "--help").stdout.split())
    assert "--candidates CANDIDATES [CANDIDATES ...]" in gen and "--closed-set-mode {trie,all}" in gen
    assert "beam search constrained to the candidates" in gen  # PredictConfig's field metadata


@pytest.mark.parametrize("args, message", [
    (("train", "--stage", "finetune", "--zero-stage", "5"), "invalid choice: 5"),
    (("train", "--workers", "2"), "the following arguments are required: --stage"),
    (("evaluate", "--model", "m", "--shards", "s", "--out", "o", "--batch-size", "many"), "invalid int value"),
    (("promote", "--version", "3", "--alias", "champion"), "not allowed with argument"),
    (("clip", "index", "--model", "m", "--shards", "s", "--out", "o", "--tasks", "vqa"), "invalid choice: 'vqa'"),
    (("serve", "--poll-interval", "soon"), "invalid float value"),
])
def test_bad_option_values_are_usage_errors_with_status_2(args, message):
    out = galen(*args, check=False)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


# --------------------------------------------------------------------------------------------------
# Hostile images and model files: one line `galen: error: ...`, exit status 2, never a traceback
# (memory bombs through the command line: tests/model/test_hostile_models.py, in a capped process)
# --------------------------------------------------------------------------------------------------
def _refused(capsys, *args: str) -> str:
    """Run `galen ARGS` in-process; it must exit 2 with exactly one `galen: error:` line and no warning."""
    import warnings

    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = main(list(args))
    out = capsys.readouterr()
    assert status == 2, out.err
    assert "Traceback" not in out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("galen: error: "), out.err
    assert not [w for w in caught if "DecompressionBomb" in w.category.__name__], caught  # Pillow's own warning
    return lines[0]


@pytest.fixture(scope="module")
def nano_model(demo_tokenizer, tmp_path_factory):
    """A nano model folder with its tokenizer (what `galen model init --size nano` writes)."""
    import torch

    from galen.model.config import get_config
    from galen.model.generalist import GalenModel

    out = tmp_path_factory.mktemp("nano_cli")
    torch.manual_seed(0)
    GalenModel(get_config("nano", vocab_size=len(demo_tokenizer))).save_pretrained(out, demo_tokenizer)
    return out


@pytest.fixture(scope="module")
def hostile_images(tmp_path_factory):
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(d / "ok.png")
    (d / "zero.png").write_bytes(b"")
    (d / "truncated.png").write_bytes((d / "ok.png").read_bytes()[:60])
    (d / "text.png").write_text("this is not an image\n")
    Image.new("1", (12000, 12000)).save(d / "oversized.png")  # 144 M pixels in a small file
    return d


@pytest.mark.parametrize("name, message", [
    ("missing.png", "image file {path} not found"),
    ("zero.png", "image file {path}: the image is empty (0 bytes)"),
    ("truncated.png", "image file {path}: the image bytes are truncated or corrupt"),
    ("text.png", "image file {path}: the image bytes cannot be decoded"),
    ("oversized.png", "12000x12000 = 144,000,000 pixels, over the limit of 40,000,000"),
])
def test_generate_refuses_bad_image_files(capsys, nano_model, hostile_images, name, message):
    path = hostile_images / name
    said = _refused(capsys, "generate", "--model", str(nano_model), "--image", str(path), "--question", "a nodule?")
    assert message.format(path=path) in said
    from galen.model.vision import MAX_IMAGE_PIXELS

    assert MAX_IMAGE_PIXELS == 40_000_000  # params.yaml validate.max_image_pixels


def test_generate_takes_a_good_image(capsys, nano_model, hostile_images):
    capsys.readouterr()
    assert main(["generate", "--model", str(nano_model), "--image", str(hostile_images / "ok.png"), "--question",
                 "is there a nodule?", "--candidates", "yes", "no"]) == 0
    assert capsys.readouterr().out.strip() in {"yes", "no"}


BROKEN_MODELS = {  # name: (config.json fields, model.safetensors bytes, the message)
    "zero-byte-weights": (None, b"", "model.safetensors cannot be read as safetensors"),
    "garbage-weights": (None, b"\xff" * 100, "model.safetensors cannot be read as safetensors"),
    "zero-byte-config": ("", None, "config.json is not valid JSON"),
    "d_model-abc": ({"d_model": "abc"}, None, "invalid model config: d_model must be an integer, got 'abc'"),
    "d_model-negative": ({"d_model": -128}, None, "invalid model config: d_model=-128 is outside [1, 65,536]"),
    "d_model-1e6": ({"d_model": 10 ** 6}, None, "invalid model config: d_model=1000000 is outside [1, 65,536]"),
    "over-the-limit": ({"d_model": 32768}, None, "over the limit of 4,000,000,000"),
    "other-weights": ({"d_model": 256}, None, "does not fit this model config"),
}


def _broken_model(base, dest, name):
    import shutil

    config, weights, _ = BROKEN_MODELS[name]
    shutil.copytree(base, dest)
    if config == "":
        (dest / "config.json").write_bytes(b"")
    elif config is not None:
        (dest / "config.json").write_text(json.dumps(json.loads((dest / "config.json").read_text()) | config))
    if weights is not None:
        (dest / "model.safetensors").write_bytes(weights)
    return dest


@pytest.mark.parametrize("command", ["generate", "evaluate", "export"])
@pytest.mark.parametrize("name", list(BROKEN_MODELS))
def test_broken_model_folders_are_one_line_errors(capsys, tmp_path, nano_model, command, name):
    model = str(_broken_model(nano_model, tmp_path / "m", name))
    (tmp_path / "shards" / "vqa" / "test").mkdir(parents=True)
    args = {"generate": ("generate", "--model", model, "--question", "is there a nodule?"),
            "evaluate": ("evaluate", "--model", model, "--shards", str(tmp_path / "shards"), "--out",
                         str(tmp_path / "metrics.json"), "--no-mlflow"),
            "export": ("export", "--model", model, str(tmp_path / "exported"))}[command]
    said = _refused(capsys, *args)
    assert BROKEN_MODELS[name][2] in said


@pytest.fixture(scope="module")
def fairseq_checkpoint(tmp_path_factory):
    from tests.conftest import REFERENCE_CHECK

    out = tmp_path_factory.mktemp("fairseq")
    subprocess.run([sys.executable, str(REFERENCE_CHECK / "make_weights.py"), "--layout", "fairseq", "--out",
                    str(out)], check=True, capture_output=True)
    return out / "checkpoint.pt"


def test_import_checkpoint_refuses_empty_legacy_and_foreign_files(capsys, tmp_path, fairseq_checkpoint):
    import pickle

    import torch

    from galen.model.interop import read_torch_file

    def refused(path):
        return _refused(capsys, "import-checkpoint", "--from", "fairseq", str(path), "--out", str(tmp_path / "o"),
                        "--no-tokenizer")

    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty.pt is empty (0 bytes)" in refused(tmp_path / "empty.pt")
    torch.save(read_torch_file(fairseq_checkpoint), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    said = refused(tmp_path / "legacy.pt")
    assert "legacy (non-zip) torch format" in said and "re-save it with torch.save(" in said
    assert "trusted environment" in said and "truncated or corrupt" not in said
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"model": {}}))
    assert "plain Python pickle" in refused(tmp_path / "plain.pkl")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    assert "not a readable PyTorch checkpoint" in refused(tmp_path / "notes.pt")
    assert not (tmp_path / "o").exists()


def test_import_checkpoint_never_resolves_the_files_interpolations(capsys, tmp_path, fairseq_checkpoint, monkeypatch):
    """`${oc.env:VAR}` in a checkpoint's omegaconf cfg would read this machine's environment: the value of
    a real variable appears in no output, no error and no file written."""
    import torch
    from omegaconf import OmegaConf

    from galen.model.interop import read_torch_file

    secret_env, secret = "GALEN_CLI_TEST_SECRET", "cli-secret-7c2e-never-shown"
    monkeypatch.setenv(secret_env, secret)
    ckpt = read_torch_file(fairseq_checkpoint)
    args = {k: v for k, v in vars(ckpt.pop("args")).items() if not isinstance(v, (list, tuple))}
    env = f"${{oc.env:{secret_env}}}"
    for name, model_fields, ok in [("armed", {"dropout": env}, False), ("quiet", {"_name": env}, True)]:
        cfg = OmegaConf.create({"model": args | model_fields, "common": {"wandb_entity": env}})
        assert secret in json.dumps(OmegaConf.to_container(cfg, resolve=True))  # armed: resolving would leak it
        torch.save({**ckpt, "cfg": cfg}, tmp_path / f"{name}.pt")
        argv = ["import-checkpoint", "--from", "fairseq", str(tmp_path / f"{name}.pt"), "--out",
                str(tmp_path / name), "--no-tokenizer"]
        if ok:
            capsys.readouterr()
            assert main(argv) == 0
            out = capsys.readouterr()
            assert secret not in out.out + out.err and "imported a custom model" in out.out
            written = b"".join(p.read_bytes() for p in (tmp_path / name).rglob("*") if p.is_file())
            assert secret.encode() not in written
        else:
            said = _refused(capsys, *argv)
            assert secret not in said and f"config field dropout is '{env}', not a number" in said


@pytest.fixture(scope="module")
def micro_clip(demo_tokenizer, tmp_path_factory):
    from galen.model.clip import ClipModel

    out = tmp_path_factory.mktemp("micro_clip")
    return ClipModel.create("micro", demo_tokenizer, seed=0).save_pretrained(out)


def test_clip_import_and_embed_refuse_hostile_folders(capsys, tmp_path, micro_clip, hostile_images):
    import argparse
    import shutil

    import torch

    def copy(name):
        shutil.copytree(micro_clip, tmp_path / name)
        return tmp_path / name

    # weights that need a class the safe unpickler does not allow: refused, without torch's advice to turn it off
    odd = copy("odd")
    (odd / "open_clip_model.safetensors").unlink()
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, odd / "open_clip_pytorch_model.bin")
    said = _refused(capsys, "clip", "import", str(odd), "--out", str(tmp_path / "out"))
    assert "refused: unpickling it would import argparse.Namespace" in said
    assert "weights_only" not in said and "arbitrary code execution" not in said
    torch.save({"visual.proj": torch.zeros(2)}, odd / "open_clip_pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    assert "legacy (non-zip) torch format" in _refused(capsys, "clip", "import", str(odd), "--out", str(tmp_path / "o"))
    (odd / "open_clip_pytorch_model.bin").write_bytes(b"")
    assert "is empty (0 bytes)" in _refused(capsys, "clip", "embed", "--model", str(odd), "--text", "a nodule")

    deep = copy("deep")
    config = json.loads((deep / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["layers"] = 10 ** 6
    (deep / "open_clip_config.json").write_text(json.dumps(config))
    said = _refused(capsys, "clip", "embed", "--model", str(deep), "--text", "a nodule")
    assert "model_cfg.text_cfg.layers=1000000 is outside [-1, 256]" in said

    # the image is checked before the model is loaded, with the same limits as generate's
    for name, message in [("missing.png", "not found"), ("oversized.png", "over the limit of 40,000,000")]:
        said = _refused(capsys, "clip", "embed", "--model", str(micro_clip), "--image", str(hostile_images / name),
                        "--labels", "nodule", "effusion")
        assert message in said


def test_clip_register_with_a_clip_entry_that_is_not_a_section(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("clip: 3\n")
    said = _refused(capsys, "clip", "register", "--model", str(tmp_path), "--params", str(tmp_path / "params.yaml"))
    assert "params.yaml `clip:` must be a section" in said
