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
