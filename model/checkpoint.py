"""Galen's own checkpoint folder: `config.json` (GalenConfig), `model.safetensors` (weights; loading
never unpickles) and the tokenizer files (`tokenizer.json` + the text model).

The reference layouts (fairseq BiomedGPT/OFA, the transformers OFA port) live in `model.interop`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from galen.model.config import GalenConfig
from galen.model.errors import GalenCheckpointError

if TYPE_CHECKING:  # for annotations only; the runtime import stays inside load_model
    from galen.model.generalist import GalenModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_TAG = {"format": "pt", "galen_format": "generalist", "galen_format_version": "1"}


def save_pretrained(model: GalenModel, directory: str | Path, tokenizer: Any = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write config, safetensors weights and (optionally) the tokenizer files into `directory`;
    `dtype` casts the floating-point tensors (fp32 weights from a model trained in bf16)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None and len(tokenizer) != model.cfg.vocab_size:
        raise GalenCheckpointError(f"tokenizer has {len(tokenizer)} entries but the model's vocabulary is "
                                   f"{model.cfg.vocab_size}; save the tokenizer the model was built for")
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata=FORMAT_TAG)
    tmp.replace(out / WEIGHTS_FILE)  # atomic: a crash never leaves a half-written weights file
    model.cfg.save(out / CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def _require(directory: Path, name: str, hint: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise GalenCheckpointError(f"{directory} has no {name}; {hint}")
    return path


def load_config(directory: str | Path) -> GalenConfig:
    d = Path(directory)
    if not d.is_dir():
        raise GalenCheckpointError(f"model folder {d} does not exist; pass the folder written by save_pretrained "
                                   "or `galen import-checkpoint`")
    return GalenConfig.load(_require(d, CONFIG_FILE, "a Galen model folder needs the config.json written with "
                                                     "its weights; copy it from where the model was saved"))


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a safetensors file declares, from its header alone (no tensor is
    read), or GalenCheckpointError when the file is not safetensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise GalenCheckpointError(f"{path} cannot be read as safetensors ({e}); the file is truncated or "
                                   "corrupt — copy it again from its source") from e


def model_shapes(cfg: GalenConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of GalenModel(cfg)'s state dict, built on the meta device
    (nothing is allocated), so a file's shapes are checked against its config before any loading."""
    from galen.model.generalist import GalenModel

    with torch.device("meta"):
        skeleton = GalenModel(cfg)
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> GalenModel:
    """Build the model from `config.json` and load `model.safetensors` strictly. Everything is checked
    before memory is spent: the config (types, ranges, parameter limit), then the shapes the weights
    file declares against the ones the config builds; only then are the model and the tensors made."""
    from galen.model.generalist import GalenModel

    d = Path(directory)
    cfg = load_config(d)
    weights = _require(d, WEIGHTS_FILE, "the weights file is missing; copy it beside config.json, or for a "
                                        "reference checkpoint run `galen import-checkpoint` first")
    check_shapes(model_shapes(cfg), safetensors_shapes(weights), source=str(weights))
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise GalenCheckpointError(f"{weights} cannot be read as safetensors ({e}); the file is truncated or "
                                   "corrupt — copy it again from its source") from e
    model = GalenModel(cfg)
    load_state_strict(model, state, source=str(weights))
    return model.to(map_location).eval()


def check_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], source: str,
                 names: Callable[[str], str] | None = None,
                 hint: str = "Is config.json the one saved with these weights?") -> None:
    """Every expected tensor present with its shape and nothing else, or GalenCheckpointError listing
    all problems in one message. `names` shows a key as the checkpoint's own layout calls it (an
    importer's renamed keys), so the message lists what the user can find in their file."""
    name = names or (lambda k: k)
    missing = sorted(name(k) for k in set(expected) - set(found))
    unexpected = sorted(name(k) for k in set(found) - set(expected))
    wrong = sorted(f"{name(k)}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
                   for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    if missing or unexpected or wrong:
        def show(items: list[str]) -> str:
            return ", ".join(items[:20]) + (f" ... ({len(items)} in all)" if len(items) > 20 else "")
        parts = [f"{len(missing)} missing: {show(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected (could not be placed): {show(unexpected)}" if unexpected else "",
                 f"{len(wrong)} with other shapes: {show(wrong)}" if wrong else ""]
        raise GalenCheckpointError(f"{source} does not fit this model config — " + "; ".join(p for p in parts if p)
                                   + f". {hint}")


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                      names: Callable[[str], str] | None = None,
                      hint: str = "Is config.json the one saved with these weights?") -> None:
    """load_state_dict(strict) with every shape checked first and all problems listed in one message."""
    check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()},
                 {k: tuple(v.shape) for k, v in state.items()}, source, names, hint)
    model.load_state_dict(dict(state), strict=True)


def folder_digest(directory: str | Path) -> str:
    """sha256 over a model folder's relative file paths and contents: what was evaluated, registered and
    served can be checked to be the same bytes (a corrupt or swapped file changes it)."""
    import hashlib

    d = Path(directory)
    if not d.is_dir():
        raise GalenCheckpointError(f"model folder {d} does not exist")
    files = sorted(p for p in d.rglob("*") if p.is_file())
    if not files:
        raise GalenCheckpointError(f"model folder {d} is empty")
    listing = hashlib.sha256()
    for path in files:
        content = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                content.update(block)
        listing.update(f"{path.relative_to(d).as_posix()}\t{content.hexdigest()}\n".encode())
    return listing.hexdigest()
