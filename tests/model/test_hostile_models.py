"""Hostile model files: configs, Galen model folders, fairseq / transformers checkpoints and open_clip
folders that are broken, lie about their sizes or carry secrets-reading interpolations. Each is refused
with a GalenError saying what is wrong, before memory is spent on it; memory bombs are loaded in a
subprocess whose address space is capped a few hundred MB above what it already uses."""

from __future__ import annotations

import argparse
import collections
import io
import json
import pickle
import shutil
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from galen.model.config import (
    MAX_PARAMETERS,
    MAX_PARAMETERS_ENV,
    REFERENCE_PARAMS,
    SIZES,
    GalenConfig,
    count_parameters,
    get_config,
)
from galen.model.errors import GalenCheckpointError, GalenConfigError
from galen.model.generalist import GalenModel
from galen.model.interop import import_reference, read_torch_file
from tests.conftest import REFERENCE_CHECK

SECRET_ENV = "GALEN_TEST_HOSTILE_SECRET"
SECRET = "s3cr3t-value-that-must-never-be-printed-7d1f"


def make_weights(out: Path, layout: str) -> Path:
    subprocess.run([sys.executable, str(REFERENCE_CHECK / "make_weights.py"), "--layout", layout, "--out", str(out)],
                   check=True, capture_output=True)
    return out / ("checkpoint.pt" if layout == "fairseq" else "")


@pytest.fixture(scope="module")
def fairseq_ckpt(tmp_path_factory) -> Path:
    return make_weights(tmp_path_factory.mktemp("fs"), "fairseq")


@pytest.fixture(scope="module")
def nano_folder(tmp_path_factory) -> Path:
    """A Galen model folder (config.json + model.safetensors) of a nano model, no tokenizer."""
    out = tmp_path_factory.mktemp("nano")
    GalenModel(get_config("nano", vocab_size=600)).save_pretrained(out)
    return out


def folder_with(base: Path, dest: Path, config: dict | None = None, weights: bytes | None = None) -> Path:
    shutil.copytree(base, dest)
    if config is not None:
        data = json.loads((dest / "config.json").read_text())
        data.update(config)
        (dest / "config.json").write_text(json.dumps(data))
    if weights is not None:
        (dest / "model.safetensors").write_bytes(weights)
    return dest


def write_zip_bomb(path: Path, numel: int = 1 << 30, chunk: int = 64 << 20) -> Path:
    """A torch.save-style zip (data.pkl + one float32 storage of `numel` elements: 4 GiB by default)
    whose storage record is deflate-compressed into a few MB. torch would inflate it into memory."""
    class Storage:  # pickled by persistent id, as torch.save pickles storages
        pass

    storage = Storage()

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (storage, 0, (numel,), (1,), False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is storage else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"model": {"encoder.embed_tokens.weight": Tensor()}})
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(bytes(chunk)) + comp.flush(zlib.Z_FULL_FLUSH)  # the same bytes for every chunk of zeros
    tail = comp.flush(zlib.Z_FINISH)

    class Repeat:  # what zlib would produce for `chunk` zeros, without compressing 4 GiB here
        def compress(self, data):
            return block

        def flush(self):
            return tail

    real_crc = zipfile.crc32
    zipfile.crc32 = lambda data, value=0: 0  # a bomb's CRC never gets checked: the allocation comes first
    try:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", buf.getvalue())
            z.writestr("archive/byteorder", "little")
            z.writestr("archive/version", "3\n")
            info = zipfile.ZipInfo("archive/data/0")
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w", force_zip64=True) as f:
                f._compressor = Repeat()
                zeros = memoryview(bytes(chunk))
                for _ in range(numel * 4 // chunk):
                    f.write(zeros)
    finally:
        zipfile.crc32 = real_crc
    with zipfile.ZipFile(path) as z:
        record = z.getinfo("archive/data/0")
    assert record.file_size == numel * 4 and record.compress_size < 8 << 20 and path.stat().st_size < 8 << 20
    return path


LIMITED = textwrap.dedent('''
    import contextlib, gc, importlib, io, json, resource, sys
    import torch, timm, safetensors, open_clip  # noqa: F401 - loaded before any cap is measured
    import galen.flows.cli, galen.flows.evaluate, galen.model.clip, galen.model.interop  # noqa: F401
    import galen.model.predict  # noqa: F401

    CAP = 400 << 20

    def vm_bytes():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))

    def resolve(dotted):
        parts = dotted.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                target = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                target = getattr(target, attr)
            return target
        raise ImportError(dotted)

    results = {"capped": True}
    for name, call in json.loads(sys.argv[1]).items():
        gc.collect()
        resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + CAP, resource.RLIM_INFINITY))  # each call: +400 MB
        try:  # the cap is real: 1 GiB cannot be had
            torch.empty(1 << 28)
            results["capped"] = False
        except (RuntimeError, MemoryError):
            pass
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                returned = resolve(call[0])(*call[1:])
            results[name] = ["returned", repr(returned)[:200], err.getvalue()]
        except BaseException as e:  # noqa: BLE001 - reported to the test, which decides
            results[name] = [type(e).__name__, str(e)[:4000], err.getvalue()]
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print("RESULTS " + json.dumps(results))
''')


def run_capped(calls: dict[str, list]) -> dict[str, list[str]]:
    """Run `module.function(*args)` calls in a subprocess, each capped at +400 MB of address space; per call
    [exception type or "returned", its message or the repr of the result, what it wrote to stderr]."""
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS and /proc/self/status are Linux's")
    out = subprocess.run([sys.executable, "-c", LIMITED, json.dumps(calls)], capture_output=True, text=True,
                         timeout=600)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, out.stdout + out.stderr
    results = json.loads(line[len("RESULTS "):])
    assert results.pop("capped") is True, "the address-space cap did not hold: the test would prove nothing"
    return results


# -- configs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("d_model", "abc", "d_model must be an integer, got 'abc'"),
    ("d_model", -128, "d_model=-128 is outside [1, 65,536]"),
    ("d_model", 10 ** 6, "d_model=1000000 is outside [1, 65,536]"),
    ("d_model", 128.0, "d_model must be an integer, got 128.0"),
    ("d_model", True, "d_model must be an integer, got True"),
    ("attention_heads", 0, "attention_heads=0 is outside"),     # was a ZeroDivisionError
    ("patch_size", 0, "patch_size=0 is outside"),                # was a ZeroDivisionError
    ("vocab_size", None, "vocab_size must be an integer, got None"),
    ("max_positions", 10 ** 6, "max_positions=1000000 is outside [8, 4,096]"),  # a 10^12-entry bucket table
    ("image_bucket_size", 1000, "image_bucket_size=1000 is outside [1, 64]"),
    ("dropout", "0.1", "dropout must be a number, got '0.1'"),
    ("dropout", float("nan"), "dropout=nan is outside [0, 1]"),
    ("attn_scale_factor", 0, "attn_scale_factor=0 is outside"),
    ("normformer", "yes", "normformer must be true or false, got 'yes'"),
    ("resnet_depths", "abc", "resnet_depths must be three stage depths in [1, 64], got 'abc'"),
    ("resnet_depths", [3, 4, 10 ** 6], "resnet_depths must be three stage depths"),
    ("pad_id", 600, "pad_id=600 is outside the vocabulary [0, 600)"),
    ("code_image_size", 12, "code_image_size=12 must be a multiple of 8"),
    ("extra", [], "extra must be a mapping"),
])
def test_config_fields_are_checked_for_type_and_range(field, value, message):
    data = get_config("nano", vocab_size=600).to_dict() | {field: value}
    with pytest.raises(GalenConfigError, match="invalid model config") as err:
        GalenConfig.from_dict(data)
    assert message in str(err.value)


def test_parameter_count_from_the_config_is_exact():
    variants = [{}, {"normformer": False, "head_scale": False, "code_layernorm_embedding": False},
                {"max_positions": 512, "token_bucket_size": 128, "image_bucket_size": 24, "image_size": 384}]
    for size in SIZES:
        for overrides in variants if size in ("tiny", "huge") else variants[:1]:
            cfg = get_config(size, **overrides)
            with torch.device("meta"):
                model = GalenModel(cfg)
            assert count_parameters(cfg) == cfg.num_parameters() == model.num_parameters(), (size, overrides)


def test_parameter_limit_is_well_above_huge_and_only_the_operator_moves_it(monkeypatch):
    huge = get_config("huge")
    assert REFERENCE_PARAMS["huge"] < huge.num_parameters() * 1.01 < MAX_PARAMETERS / 4
    monkeypatch.delenv(MAX_PARAMETERS_ENV, raising=False)
    big = get_config("nano").to_dict() | {"d_model": 32768, "attention_heads": 4}  # every range is fine, the total not
    with pytest.raises(GalenConfigError, match=r"describes [\d,]+ parameters, over the limit of 4,000,000,000"):
        GalenConfig.from_dict(big)
    with pytest.raises(GalenConfigError, match="over the limit"):  # the untrusted file cannot lift its own limit
        GalenConfig.from_dict(big | {"extra": {"max_parameters": 10 ** 15, "allow_large": True}})
    with pytest.raises(GalenConfigError, match="unknown model config keys"):
        GalenConfig.from_dict(big | {"max_parameters": 10 ** 15})
    monkeypatch.setenv(MAX_PARAMETERS_ENV, str(10 ** 12))  # the person running Galen can
    assert GalenConfig.from_dict(big).num_parameters() > MAX_PARAMETERS  # a config only: nothing is built
    monkeypatch.setenv(MAX_PARAMETERS_ENV, "1000000")
    with pytest.raises(GalenConfigError, match="over the limit of 1,000,000"):
        get_config("nano")
    monkeypatch.setenv(MAX_PARAMETERS_ENV, "lots")
    with pytest.raises(GalenConfigError, match="GALEN_MAX_PARAMETERS='lots' must be a positive whole number"):
        get_config("nano")


# -- Galen model folders -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, weights, error, message", [
    (None, b"", GalenCheckpointError, "model.safetensors cannot be read as safetensors"),
    (None, b"\x07" * 64 + b"garbage", GalenCheckpointError, "model.safetensors cannot be read as safetensors"),
    ({"d_model": "abc"}, None, GalenConfigError, "config.json: invalid model config: d_model must be an integer"),
    ({"d_model": -128}, None, GalenConfigError, "config.json: invalid model config: d_model=-128 is outside"),
    ({"d_model": 256}, None, GalenCheckpointError, "does not fit this model config"),  # other weights' shapes
], ids=["zero-byte-weights", "garbage-weights", "d_model-abc", "d_model-negative", "other-shapes"])
def test_broken_model_folders_are_refused(nano_folder, tmp_path, config, weights, error, message):
    folder = folder_with(nano_folder, tmp_path / "m", config, weights)
    with pytest.raises(error) as err:
        GalenModel.from_pretrained(folder)
    assert message in str(err.value)


def test_zero_byte_config_is_refused(nano_folder, tmp_path):
    folder = folder_with(nano_folder, tmp_path / "m")
    (folder / "config.json").write_bytes(b"")
    with pytest.raises(GalenConfigError, match="config.json is not valid JSON"):
        GalenModel.from_pretrained(folder)


def test_memory_bombs_are_refused_before_allocation(nano_folder, tmp_path):
    """Configs that would allocate tens to hundreds of GB, a zip-bombed fairseq checkpoint and an open_clip
    config with a giant tower: each refused inside a process that cannot get 1 GiB more."""
    mega = folder_with(nano_folder, tmp_path / "mega", {"d_model": 10 ** 6, "attention_heads": 4})
    # every field in range and 3.07e9 parameters (under the limit), but not what the weights file declares:
    # the header's shapes are compared with the config before the 12 GB model would be built
    liar = folder_with(nano_folder, tmp_path / "liar", {"vocab_size": 3_000_000, "d_model": 1024})
    bomb = write_zip_bomb(tmp_path / "bomb.pt")
    (tmp_path / "shards" / "vqa" / "test").mkdir(parents=True)  # a test split to evaluate on
    clip = tmp_path / "clip"
    clip.mkdir()
    cfg = {"embed_dim": 128, "vision_cfg": {"image_size": 64, "patch_size": 8, "layers": 4, "width": 65536,
                                            "head_width": 64},
           "text_cfg": {"context_length": 64, "width": 128, "heads": 4, "layers": 3, "vocab_size": 600}}
    (clip / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    (clip / "open_clip_model.safetensors").write_bytes(b"never read")
    main = "galen.flows.cli.main"
    got = run_capped({
        "mega": ["galen.model.checkpoint.load_model", str(mega)],
        "liar": ["galen.model.checkpoint.load_model", str(liar)],
        "bomb": ["galen.model.interop.import_reference", str(bomb), "fairseq"],
        "clip": ["galen.model.clip.ClipModel.from_pretrained", str(clip)],
        # the same through the command line: exit status 2 and one line
        "generate": [main, ["generate", "--model", str(liar), "--question", "is there a nodule?"]],
        "evaluate": [main, ["evaluate", "--model", str(mega), "--shards", str(tmp_path / "shards"),
                            "--out", str(tmp_path / "m.json"), "--no-mlflow"]],
        "export": [main, ["export", "--model", str(liar), str(tmp_path / "exported")]],
        "import": [main, ["import-checkpoint", "--from", "fairseq", str(bomb), "--out", str(tmp_path / "imported"),
                          "--no-tokenizer"]],
        "clip_import": [main, ["clip", "import", str(clip), "--out", str(tmp_path / "clip_out")]],
    })
    assert got["mega"][0] == "GalenConfigError" and "d_model=1000000 is outside" in got["mega"][1]
    assert got["liar"][0] == "GalenCheckpointError" and "does not fit this model config" in got["liar"][1]
    assert "with other shapes" in got["liar"][1] and "checkpoint (128, 128) vs model (1024, 1024)" in got["liar"][1]
    assert got["bomb"][0] == "GalenCheckpointError"
    assert "refused: its record archive/data/0 is compressed" in got["bomb"][1]
    assert "inflate to 4,294,967,296" in got["bomb"][1] and "truncated or corrupt" not in got["bomb"][1]
    assert got["clip"][0] == "GalenConfigError" and "over the limit of 4,000,000,000" in got["clip"][1]
    for name, message in [("generate", "does not fit this model config"), ("evaluate", "d_model=1000000 is outside"),
                          ("export", "does not fit this model config"), ("import", "archive/data/0 is compressed"),
                          ("clip_import", "over the limit of 4,000,000,000")]:
        kind, returned, stderr = got[name]
        assert (kind, returned) == ("returned", "2"), (name, got[name])
        assert stderr.startswith("galen: error: ") and len(stderr.strip().splitlines()) == 1, (name, stderr)
        assert message in stderr and "Traceback" not in stderr, (name, stderr)


# -- fairseq / transformers checkpoints ------------------------------------------------------------------------
def test_zero_byte_plain_pickle_and_legacy_files_are_told_apart(tmp_path, fairseq_ckpt):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(GalenCheckpointError, match=r"empty\.pt is empty \(0 bytes\)"):
        import_reference(tmp_path / "empty.pt", "fairseq")
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"model": {}}, f)
    with pytest.raises(GalenCheckpointError, match="is a plain Python pickle, not a torch.save checkpoint"):
        import_reference(tmp_path / "plain.pkl", "fairseq")
    ckpt = read_torch_file(fairseq_ckpt)
    torch.save(ckpt, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(GalenCheckpointError) as err:
        import_reference(tmp_path / "legacy.pt", "fairseq")
    said = str(err.value)
    assert "legacy (non-zip) torch format" in said and "re-save it with torch.save(" in said
    assert "trusted environment" in said and "truncated or corrupt" not in said and "weights_only" not in said
    (tmp_path / "text.pt").write_text("hello, I am not a checkpoint\n")
    with pytest.raises(GalenCheckpointError, match="neither torch.save's zip format nor a pickle"):
        import_reference(tmp_path / "text.pt", "fairseq")


def test_checkpoint_config_values_of_the_wrong_type_are_refused(tmp_path, fairseq_ckpt):
    ckpt = read_torch_file(fairseq_ckpt)
    for field, value, error, message in [
        ("attn_scale_factor", "abc", GalenCheckpointError, "config field attn_scale_factor is 'abc', not a number"),
        ("patch_image_size", [256], GalenCheckpointError, "config field patch_image_size is [256], not an integer"),
        ("sync_bn", "no", GalenCheckpointError, "config field sync_bn is 'no', not true/false"),
        ("patch_image_size", 10 ** 9, GalenConfigError, "image_size=1000000000 is outside"),
    ]:
        args = argparse.Namespace(**vars(ckpt["args"]))
        setattr(args, field, value)
        torch.save({**ckpt, "args": args}, tmp_path / "odd.pt")
        with pytest.raises(error) as err:
            import_reference(tmp_path / "odd.pt", "fairseq")
        assert message in str(err.value), field


def test_tensors_of_impossible_shapes_are_refused(tmp_path, fairseq_ckpt):
    ckpt = read_torch_file(fairseq_ckpt)
    model = dict(ckpt["model"])
    model["encoder.embed_tokens.weight"] = torch.zeros(7)  # a vector where a matrix must be
    torch.save({**ckpt, "model": model}, tmp_path / "flat.pt")
    with pytest.raises(GalenCheckpointError, match=r"unexpected shapes encoder\.embed_tokens\.weight \(7,\)"):
        import_reference(tmp_path / "flat.pt", "fairseq")
    del model["encoder.embed_tokens.weight"], model["encoder.image_rel_pos_table_list.0.weight"]
    model["encoder.embed_tokens.weight"] = ckpt["model"]["encoder.embed_tokens.weight"]
    torch.save({**ckpt, "model": model}, tmp_path / "short.pt")
    with pytest.raises(GalenCheckpointError, match=r"lacks encoder\.image_rel_pos_table_list\.0\.weight"):
        import_reference(tmp_path / "short.pt", "fairseq")


def _omegaconf_checkpoint(ckpt: dict, path: Path, model_overrides: dict, extra: dict | None = None):
    from omegaconf import OmegaConf

    args = {k: v for k, v in vars(ckpt["args"]).items() if not isinstance(v, (list, tuple))}
    cfg = OmegaConf.create({"model": args | model_overrides, "task": {"_name": "vqa_gen", "patch_image_size": 384},
                            "common": {"wandb_project": f"${{oc.env:{SECRET_ENV}}}"}, **(extra or {})})
    assert SECRET in json.dumps(OmegaConf.to_container(cfg, resolve=True))  # the file is armed
    torch.save({k: v for k, v in ckpt.items() if k != "args"} | {"cfg": cfg}, path)
    return path


def test_omegaconf_interpolations_never_read_the_environment(tmp_path, fairseq_ckpt, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    ckpt = read_torch_file(fairseq_ckpt)
    armed = _omegaconf_checkpoint(ckpt, tmp_path / "armed.pt",
                                  {"attn_scale_factor": f"${{oc.env:{SECRET_ENV}}}"})
    with pytest.raises(GalenCheckpointError) as err:
        import_reference(armed, "fairseq")
    said = f"{err.value!s} {err.value!r} {err.value.__cause__!r} {err.value.__context__!r}"
    assert SECRET not in said
    assert f"config field attn_scale_factor is '${{oc.env:{SECRET_ENV}}}', not a number" in str(err.value)

    # the secret in fields the import does not use, and a plain reference to another node of the file
    quiet = _omegaconf_checkpoint(ckpt, tmp_path / "quiet.pt",
                                  {"patch_image_size": "${task.patch_image_size}", "_name": f"${{oc.env:{SECRET_ENV}}}"})
    imported = import_reference(quiet, "fairseq")
    assert imported.model.cfg.image_size == 384  # ${task.patch_image_size}, followed inside the file
    assert SECRET not in repr(imported.meta) and SECRET not in json.dumps(imported.model.cfg.to_dict())
    assert imported.meta["_name"] == f"${{oc.env:{SECRET_ENV}}}"  # kept as the literal text


def test_a_config_that_shares_one_list_many_times_over_is_refused_quickly(tmp_path, fairseq_ckpt):
    """A pickle can hold one list referenced twice at each of 60 levels: 2^60 entries once expanded."""
    ckpt = read_torch_file(fairseq_ckpt)
    shared: list = [0]
    for _ in range(60):
        shared = [shared, shared]
    args = argparse.Namespace(**vars(ckpt["args"]), layers_to_keep=shared)
    torch.save({**ckpt, "args": args}, tmp_path / "dag.pt")
    assert (tmp_path / "dag.pt").stat().st_size < 2 * fairseq_ckpt.stat().st_size
    with pytest.raises(GalenCheckpointError, match="config has over 100,000 entries"):
        import_reference(tmp_path / "dag.pt", "fairseq")


def test_transformers_folders_with_broken_files_are_refused(tmp_path):
    folder = make_weights(tmp_path / "hf", "hf")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(GalenCheckpointError, match="config.json is not valid JSON"):
        import_reference(folder, "hf")
    (folder / "config.json").write_text(json.dumps({"model_type": "ofa"}))
    (folder / "pytorch_model.bin").unlink()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(GalenCheckpointError, match="model.safetensors cannot be read as safetensors"):
        import_reference(folder, "hf")


# -- open_clip folders -----------------------------------------------------------------------------------------------
def test_open_clip_weights_errors_never_advise_turning_the_safe_loader_off(tmp_path):
    from galen.model.clip import read_state_dict

    torch.save({"visual.proj": torch.zeros(2), "extra": argparse.Namespace(a=1)}, tmp_path / "odd.bin")
    with pytest.raises(GalenCheckpointError) as err:
        read_state_dict(tmp_path / "odd.bin")
    assert "refused: unpickling it would import argparse.Namespace" in str(err.value)
    assert "weights_only" not in str(err.value) and "arbitrary code execution" not in str(err.value)
    torch.save({"visual.proj": torch.zeros(2)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(GalenCheckpointError, match=r"legacy \(non-zip\) torch format"):
        read_state_dict(tmp_path / "legacy.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(GalenCheckpointError, match=r"is empty \(0 bytes\)"):
        read_state_dict(tmp_path / "empty.bin")


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["vision_cfg"].update(width="abc"), "describes a model open_clip cannot build"),
    (lambda c: c["vision_cfg"].update(layers=10 ** 6), "model_cfg.vision_cfg.layers=1000000 is outside [-1, 256]"),
    (lambda c: c["text_cfg"].update(vocab_size=-5), "model_cfg.text_cfg.vocab_size=-5 is outside"),
    (lambda c: c.update(embed_dim="abc"), "model_cfg.embed_dim must be an integer"),
    (lambda c: c.update(no_such_option=1), "describes a model open_clip cannot build"),
    (lambda c: c.update(text_cfg=[]), "vision_cfg and model_cfg.text_cfg must be objects"),
])
def test_open_clip_configs_are_checked_before_building(tmp_path, edit, message):
    from galen.model.clip import ClipModel

    cfg = {"embed_dim": 128, "vision_cfg": {"image_size": 64, "patch_size": 8, "layers": 2, "width": 64,
                                            "head_width": 32},
           "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 1, "vocab_size": 600}}
    edit(cfg)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"never read")
    with pytest.raises(GalenCheckpointError) as err:
        ClipModel.from_pretrained(tmp_path)
    assert message in str(err.value)


def test_open_clip_weights_of_another_shape_are_refused_from_the_header(tmp_path, monkeypatch):
    """The safetensors header's shapes are compared with the meta-built model before any tensor is read."""
    from safetensors.torch import save_file

    import galen.model.clip as clip_module

    cfg = {"embed_dim": 128, "vision_cfg": {"image_size": 64, "patch_size": 8, "layers": 2, "width": 64,
                                            "head_width": 32},
           "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 1, "vocab_size": 600}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({"visual.proj": torch.zeros(3, 3)}, str(tmp_path / "open_clip_model.safetensors"))
    monkeypatch.setattr("safetensors.torch.load_file", lambda *a, **k: pytest.fail("tensors read before the check"))
    with pytest.raises(GalenCheckpointError, match=r"does not fit open_clip_config\.json .*visual\.proj \(3, 3\)"):
        clip_module.ClipModel.from_pretrained(tmp_path)


def test_a_checkpoint_read_can_be_saved_over_in_place(tmp_path):
    """Load, edit, save to the same path (what a user fixing a released checkpoint's args does): the
    tensors read must not depend on the file any more (a memory-mapped read died of SIGBUS here)."""
    from galen.model.torch_files import read_torch_file

    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.arange(1 << 16, dtype=torch.float32)}, "args": {"lr": 1}}, path)
    ckpt = read_torch_file(path)
    ckpt["args"]["lr"] = 2
    torch.save(ckpt, path)  # truncates and rewrites the file the tensors came from
    again = read_torch_file(path)
    assert again["args"]["lr"] == 2 and torch.equal(again["model"]["w"], torch.arange(1 << 16, dtype=torch.float32))
