"""The CLIP dual encoder (BiomedCLIP-style), built with open_clip.

A model is an open_clip `CLIP` (native towers) or `CustomTextCLIP` (a transformers text tower)
made from a named config in `CONFIGS` — the open_clip `model_cfg` dicts, as data:

* `biomedclip`: BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 — timm `vit_base_patch16_224`
  (CLS token, linear projection) and PubMedBERT (CLS of the last hidden state, MLP projection
  768 -> 640 -> 512), context 256, embed dim 512. The BERT config is written here from PubMedBERT's
  known dimensions, so the model is built without the hub (weights come from an imported folder).
* `micro` / `small`: CPU-sized. open_clip's own ViT and text transformer over Galen's SentencePiece
  tokenizer (EOS pooling; causal, so padding after EOS never reaches the pooled token).

A model folder is an open_clip local directory: `open_clip_config.json` (+ a `galen` section naming
the tokenizer kind) and `open_clip_model.safetensors`, so `open_clip.create_model_from_pretrained(
"local-dir:<folder>")` loads it; plus the tokenizer files (Galen's, or BERT's `vocab.txt` ...).
Official BiomedCLIP folders (`open_clip_pytorch_model.bin`, weights-only unpickling) load too.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from galen.model.errors import GalenCheckpointError, GalenConfigError, GalenError, GalenInputError

if TYPE_CHECKING:  # open_clip is imported lazily at run time (and ships no type hints: these are Any to mypy)
    from open_clip import CLIP, CustomTextCLIP

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
OFFICIAL_WEIGHTS = ("open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "open_clip_model.safetensors",
                    "open_clip_pytorch_model.safetensors")
TEXT_ENCODER_DIR = "text_encoder"   # the transformers config of an HF text tower (read offline)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PUBMEDBERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
# PubMedBERT (BERT-base, uncased PubMed vocabulary): what the hub's config.json says, so no download is needed.
PUBMEDBERT_CONFIG = {
    "model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 30522, "hidden_size": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
    "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
}

# Native text towers read Galen's SentencePiece tokenizer (tokenizer.json + spm.model in the folder). open_clip
# has no such tokenizer type; naming one makes `open_clip.get_tokenizer("local-dir:...")` fail loudly instead of
# silently falling back to its own BPE, whose ids mean nothing to this model.
GALEN_TOKENIZER = "galen-sentencepiece"

# Named configs: open_clip model_cfg dicts. `vocab_size`, `pad_id`, `eos_id` of the native text
# towers come from the tokenizer the model is built for.
CONFIGS: dict[str, dict[str, Any]] = {
    "biomedclip": {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": PUBMEDBERT, "hf_tokenizer_name": PUBMEDBERT, "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
    },
    "micro": {  # CPU demos: trains in minutes on two cores
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "layers": 4, "width": 128, "head_width": 32},
        "text_cfg": {"context_length": 64, "width": 128, "heads": 4, "layers": 3, "pool_type": "eos",
                     "hf_tokenizer_name": GALEN_TOKENIZER},
    },
    "small": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 128, "patch_size": 16, "layers": 6, "width": 384, "head_width": 64},
        "text_cfg": {"context_length": 128, "width": 256, "heads": 4, "layers": 6, "pool_type": "eos",
                     "hf_tokenizer_name": GALEN_TOKENIZER},
    },
}


def config_names() -> list[str]:
    return sorted(CONFIGS)


@dataclass
class ClipSpec:
    """Everything needed to rebuild a model: the open_clip model_cfg, preprocessing, the tokenizer
    kind (`galen`: Galen's SentencePiece tokenizer; `hf`: a transformers tokenizer in the folder)
    and, for an HF text tower, its transformers config (so building never needs the hub)."""

    name: str
    model_cfg: dict[str, Any]
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    tokenizer: str = "galen"
    hf_text_config: dict[str, Any] | None = None

    @property
    def image_size(self) -> int:
        size = self.model_cfg["vision_cfg"].get("image_size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def hf_text(self) -> bool:
        return bool(self.model_cfg["text_cfg"].get("hf_model_name"))

    def to_json(self) -> dict[str, Any]:
        return {"model_cfg": self.model_cfg, "preprocess_cfg": {"mean": list(self.mean), "std": list(self.std)},
                "galen": {"config": self.name, "tokenizer": self.tokenizer}}


def get_spec(name: str, tokenizer: Any = None) -> ClipSpec:
    """The named config, completed for `tokenizer` (a GalenTokenizer) when its text tower is native."""
    if name not in CONFIGS:
        raise GalenConfigError(f"unknown CLIP config {name!r}; known: {', '.join(config_names())}")
    cfg = copy.deepcopy(CONFIGS[name])
    if cfg["text_cfg"].get("hf_model_name"):
        return ClipSpec(name, cfg, tokenizer="hf", hf_text_config=dict(PUBMEDBERT_CONFIG))
    if tokenizer is None:
        raise GalenConfigError(f"config {name!r} has a native text tower sized by its tokenizer; pass the Galen "
                               "tokenizer (e.g. artifacts/tokenizer)")
    cfg["text_cfg"].update(vocab_size=len(tokenizer), pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id)
    return ClipSpec(name, cfg, tokenizer="galen")


def build_clip(spec: ClipSpec) -> CLIP | CustomTextCLIP:
    """An open_clip model for `spec`, randomly initialised. An HF text tower is built from
    `spec.hf_text_config` through a temporary local config folder (transformers reads a folder
    offline), then the config keeps the tower's public name."""
    import open_clip

    cfg = copy.deepcopy(spec.model_cfg)
    cfg.pop("custom_text", None)
    cfg["nonscalar_logit_scale"] = True  # shape [1]: DeepSpeed cannot broadcast 0-dim parameters (saved as 0-dim)
    if not spec.hf_text:
        return open_clip.CLIP(**cfg, output_dict=True)
    if not spec.hf_text_config:
        raise GalenConfigError(f"config {spec.name!r} has a transformers text tower but no text encoder config; "
                               f"the folder needs {TEXT_ENCODER_DIR}/config.json")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(spec.hf_text_config))
        cfg["text_cfg"] = {**cfg["text_cfg"], "hf_model_name": d, "hf_model_pretrained": False}
        return open_clip.CustomTextCLIP(**cfg, output_dict=True)


# --------------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------------
class GalenTextEncoder:
    """Galen's SentencePiece tokenizer as CLIP text input: `<bos> text <eos>`, cut to the context
    (EOS kept last: the tower pools at EOS) and right-padded."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer, self.context_length = tokenizer, context_length
        self.vocab_size = len(tokenizer)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        ids = torch.full((len(texts), self.context_length), self.tokenizer.pad_id, dtype=torch.long)
        for k, text in enumerate(texts):
            row = [self.tokenizer.bos_id, *self.tokenizer.encode(text)][: self.context_length - 1]
            row.append(self.tokenizer.eos_id)
            ids[k, : len(row)] = torch.tensor(row)
        return ids

    def token_count(self, text: str) -> int:
        """Tokens of `text` with <bos>/<eos>, before cutting to the context."""
        return len(self.tokenizer.encode(text)) + 2

    def save(self, folder: Path) -> None:
        self.tokenizer.save(folder)


class HFTextEncoder:
    """A transformers tokenizer read from local files (vocab.txt, tokenizer_config.json ...). Cut
    to the context; padded to the longest text of the batch, not to the context as open_clip's
    tokenizer does: the tower masks padding, so the embeddings are the same and a short text does
    not pay for 256 positions."""

    def __init__(self, folder: str | Path, context_length: int) -> None:
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable tokenizer file is the same bad input
            raise GalenCheckpointError(f"the tokenizer files in {folder} cannot be read ({type(e).__name__}: {e}); "
                                       "copy vocab.txt, tokenizer_config.json and special_tokens_map.json from "
                                       "the model's release next to its weights") from e
        self.context_length = context_length
        self.vocab_size = len(self.tokenizer)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = self.tokenizer(list(texts), return_tensors="pt", max_length=self.context_length,
                             padding="longest", truncation=True)
        return out.input_ids

    def token_count(self, text: str) -> int:
        """Tokens of `text` with [CLS]/[SEP], before cutting to the context."""
        return len(self.tokenizer(text).input_ids)

    def save(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(str(folder))


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------
def check_texts(texts: Any, what: str = "texts") -> list[str]:
    """A non-empty list of non-blank strings, or a GalenInputError saying which entry is wrong."""
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise GalenInputError(f"{what} must be a non-empty list of strings")
    for k, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise GalenInputError(f"{what}[{k}] must be a non-empty string, got {t!r}")
    return list(texts)


def check_labels(labels: Any) -> list[str]:
    """Zero-shot labels: non-empty, no blanks, no duplicates (a duplicate would split its probability)."""
    labels = check_texts(labels, "labels")
    seen: dict[str, int] = {}
    for k, label in enumerate(labels):
        key = label.strip().lower()
        if key in seen:
            raise GalenInputError(f"labels[{k}] {label!r} duplicates labels[{seen[key]}]; give each class once")
        seen[key] = k
    if len(labels) < 2:
        raise GalenInputError("zero-shot classification needs at least two labels to choose between")
    return labels


DEFAULT_TEMPLATES = ("{}.", "a medical image of {}.", "an image showing {}.", "this is a photo of {}.")


class ClipModel:
    """An open_clip model with its tokenizer and preprocessing: normalized embeddings, zero-shot
    classification and similarity, batched; the one inference API that evaluation, the pyfunc
    model and serving use."""

    def __init__(self, clip: CLIP | CustomTextCLIP, spec: ClipSpec, text_encoder: Any) -> None:
        from open_clip.transform import image_transform

        self.clip, self.spec, self.text_encoder = clip.eval(), spec, text_encoder
        self.preprocess = image_transform(spec.image_size, is_train=False, mean=spec.mean, std=spec.std)
        tower_vocab = _text_vocab_size(clip)
        if tower_vocab and text_encoder.vocab_size > tower_vocab:
            raise GalenCheckpointError(f"the tokenizer has {text_encoder.vocab_size} entries but the text tower's "
                                       f"embedding table has {tower_vocab}; use the tokenizer the model was made with")

    # ------------------------------------------------------------------ building and files
    @classmethod
    def create(cls, name: str, tokenizer: Any = None, seed: int | None = None) -> ClipModel:
        """A fresh, randomly initialised model of a named config (for `biomedclip` there is no
        tokenizer to make here: import a release folder instead)."""
        spec = get_spec(name, tokenizer)
        if seed is not None:
            torch.manual_seed(seed)
        clip = build_clip(spec)
        if spec.tokenizer != "galen":
            raise GalenConfigError(f"config {name!r} uses {PUBMEDBERT}'s tokenizer, which cannot be downloaded here; "
                                   "import a BiomedCLIP folder with `galen clip import`")
        return cls(clip, spec, GalenTextEncoder(tokenizer, spec.context_length))

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
        """An open_clip local-dir folder: config, safetensors weights, tokenizer files. `dtype` casts
        the floating-point tensors (fp32 weights from a model trained in bf16)."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
                 for k, v in self.clip.state_dict().items()}
        for k in ("logit_scale", "logit_bias"):  # open_clip's layout: scalars
            if k in state:
                state[k] = state[k].reshape(())
        tmp = out / (WEIGHTS_FILE + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "galen_format": "clip"})
        tmp.replace(out / WEIGHTS_FILE)
        (out / CONFIG_FILE).write_text(json.dumps(self.spec.to_json(), indent=2) + "\n")
        if self.spec.hf_text_config:
            (out / TEXT_ENCODER_DIR).mkdir(exist_ok=True)
            (out / TEXT_ENCODER_DIR / "config.json").write_text(json.dumps(self.spec.hf_text_config, indent=2) + "\n")
        self.text_encoder.save(out)
        return out

    def export(self, folder: str | Path) -> Path:
        """The released open_clip layout (as BiomedCLIP ships): open_clip_config.json without Galen's
        section, open_clip_pytorch_model.bin (a plain state dict), the tokenizer files."""
        out = self.save_pretrained(folder)
        state = load_file_state(out / WEIGHTS_FILE)
        torch.save(state, out / OFFICIAL_WEIGHTS[0])
        (out / WEIGHTS_FILE).unlink()
        data = json.loads((out / CONFIG_FILE).read_text())
        data.pop("galen", None)
        if self.spec.tokenizer == "galen":  # without the section, readers need to know the tokenizer kind
            data["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = GALEN_TOKENIZER
        (out / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ClipModel:
        """Load a Galen-saved or an official open_clip/BiomedCLIP folder, offline. The folder is untrusted:
        its config is checked (numbers in range, the model built on the meta device and its parameters
        counted against the limit) and the weights file's tensor shapes against that model, all before
        the real model is allocated."""
        folder = Path(folder)
        spec = read_spec(folder)
        weights = next((folder / n for n in (WEIGHTS_FILE, *OFFICIAL_WEIGHTS) if (folder / n).is_file()), None)
        if weights is None:
            raise GalenCheckpointError(f"{folder} has no weights ({', '.join((WEIGHTS_FILE, *OFFICIAL_WEIGHTS))}); "
                                       "copy the weights file next to open_clip_config.json")
        expected = {k: tuple(v.shape) for k, v in build_clip_checked(spec, folder / CONFIG_FILE).state_dict().items()}
        state = read_state_dict(weights, expected)
        clip = build_clip(spec)
        load_weights(clip, weights, state)
        if spec.tokenizer == "galen":
            from galen.model.vocabulary import GalenTokenizer

            text_encoder: Any = GalenTextEncoder(GalenTokenizer.load(folder), spec.context_length)
        else:
            text_encoder = HFTextEncoder(folder, spec.context_length)
        return cls(clip, spec, text_encoder)

    # ------------------------------------------------------------------ inference
    def image_tensor(self, images: Sequence[Any]) -> torch.Tensor:
        """Decode (PIL, arrays, PNG/JPEG/DICOM bytes) and preprocess a batch of images."""
        from galen.model.vision import load_image

        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or not images:
            raise GalenInputError("images must be a non-empty list")
        return torch.stack([self.preprocess(load_image(im)) for im in images])

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        """(N, embed_dim) L2-normalized image embeddings."""
        pixels = images if isinstance(images, torch.Tensor) else self.image_tensor(images)
        return torch.cat([self.clip.encode_image(pixels[i:i + batch_size], normalize=True)
                          for i in range(0, len(pixels), batch_size)]).float()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """(N, embed_dim) L2-normalized text embeddings."""
        ids = self.text_encoder(check_texts(texts))
        return torch.cat([self.clip.encode_text(ids[i:i + batch_size], normalize=True)
                          for i in range(0, len(ids), batch_size)]).float()

    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """(C, embed_dim): per class, the normalized mean of its normalized template embeddings."""
        labels = check_labels(labels)
        templates = check_texts(templates, "templates")
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise GalenInputError(f"each template needs exactly one '{{}}' for the label, got {bad}")
        emb = self.encode_texts([t.format(label) for label in labels for t in templates])
        emb = emb.view(len(labels), len(templates), -1).mean(1)
        return F.normalize(emb, dim=-1)

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().exp().clamp(max=100))

    def zero_shot(self, image_embeddings: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """(N, C) class probabilities: softmax of the scaled cosine similarities."""
        check_same_dim(image_embeddings, class_embeddings)
        return (self.logit_scale * image_embeddings @ class_embeddings.T).softmax(dim=-1)

    def classify(self, images: Sequence[Any], labels: Sequence[str],
                 templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        return self.zero_shot(self.encode_images(images), self.class_embeddings(labels, templates))


def check_same_dim(a: torch.Tensor, b: torch.Tensor) -> None:
    """Embeddings compared with each other must come from the same embedding space size."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[-1] != b.shape[-1]:
        raise GalenInputError(f"embedding sizes do not match ({tuple(a.shape)} vs {tuple(b.shape)}); compare "
                              "embeddings made by the same model")


def _text_vocab_size(clip: torch.nn.Module) -> int | None:
    emb = getattr(clip, "token_embedding", None)
    if emb is None:
        text = getattr(clip, "text", None)
        emb = getattr(getattr(text, "transformer", None), "get_input_embeddings", lambda: None)()
    return None if emb is None else int(emb.weight.shape[0])


# Bounds on the numbers of an untrusted open_clip config (checked before anything is built from it): any
# integer, and the depth of a tower, which building loops over. The parameter count is then checked on
# a model built on the meta device (model.config's limit, ~4.3x `huge`; BiomedCLIP has 196M).
MAX_CONFIG_INT = 1 << 24
MAX_TOWER_LAYERS = 256


def _config_numbers(value: Any, where: str, problems: list[str], depth: int = 0) -> None:
    if depth > 16:
        problems.append(f"{where} is nested too deeply")
    elif isinstance(value, dict):
        for k, v in value.items():
            _config_numbers(v, f"{where}.{k}", problems, depth + 1)
    elif isinstance(value, list):
        for k, v in enumerate(value[:64]):
            _config_numbers(v, f"{where}[{k}]", problems, depth + 1)
        if len(value) > 64:
            problems.append(f"{where} has {len(value)} entries")
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        return
    elif isinstance(value, int):
        layers = "layer" in where.rsplit(".", 1)[-1].split("[")[0]
        hi = MAX_TOWER_LAYERS if layers else MAX_CONFIG_INT
        if not -1 <= value <= hi:
            problems.append(f"{where}={value} is outside [-1, {hi:,}]")
    elif isinstance(value, float):
        if not math.isfinite(value) or abs(value) > MAX_CONFIG_INT:
            problems.append(f"{where}={value} is not a finite number of sensible size")
    else:
        problems.append(f"{where} has a {type(value).__name__}")


def check_spec(spec: ClipSpec, source: str | Path) -> None:
    """GalenCheckpointError unless the config's values have sane types and sizes (see MAX_CONFIG_INT)."""
    problems: list[str] = []
    if not isinstance(spec.model_cfg.get("embed_dim"), int) or isinstance(spec.model_cfg["embed_dim"], bool) \
            or not 1 <= spec.model_cfg["embed_dim"] <= 1 << 16:
        problems.append(f"model_cfg.embed_dim must be an integer in [1, 65,536], got "
                        f"{str(spec.model_cfg.get('embed_dim'))[:40]!r}")
    for tower in ("vision_cfg", "text_cfg"):
        if not isinstance(spec.model_cfg.get(tower), dict):
            problems.append(f"model_cfg.{tower} must be an object")
    _config_numbers(spec.model_cfg, "model_cfg", problems)
    if spec.hf_text_config is not None:
        _config_numbers(spec.hf_text_config, "text encoder config", problems)
    for name, values in (("mean", spec.mean), ("std", spec.std)):
        if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 255
                                       for v in values) or (name == "std" and min(values) <= 0):
            problems.append(f"preprocess_cfg.{name} must be three numbers{' > 0' if name == 'std' else ''}, got "
                            f"{str(list(values))[:60]}")
    if problems:
        raise GalenCheckpointError(f"{source} is not a usable CLIP config: " + "; ".join(problems[:10])
                                   + (f" ... ({len(problems)} problems)" if len(problems) > 10 else ""))


def build_clip_checked(spec: ClipSpec, source: str | Path) -> torch.nn.Module:
    """The model of an untrusted spec built on the meta device (nothing allocated), after `check_spec`,
    with its parameter count checked against the limit; GalenCheckpointError when it cannot be built."""
    from galen.model.config import MAX_PARAMETERS_ENV, max_parameters

    check_spec(spec, source)
    try:
        with torch.device("meta"):
            skeleton = build_clip(spec)
    except GalenError:
        raise
    except Exception as e:  # noqa: BLE001 - open_clip/timm/transformers refusing the config, whatever they raise
        said = " ".join(str(e).split())[:200]
        raise GalenCheckpointError(f"{source} describes a model open_clip cannot build ({type(e).__name__}: "
                                   f"{said}); copy the config from the model's release") from e
    n, limit = sum(p.numel() for p in skeleton.parameters()), max_parameters()
    if n > limit:
        raise GalenConfigError(f"{source} describes a model of {n:,} parameters, over the limit of {limit:,}; it is "
                               f"refused before anything is allocated (raise {MAX_PARAMETERS_ENV} if you mean it)")
    return skeleton


def read_spec(folder: Path) -> ClipSpec:
    """The spec of a model folder (Galen-written or an official open_clip release)."""
    from galen.model.errors import read_json

    if not folder.is_dir():
        raise GalenCheckpointError(f"model folder {folder} does not exist")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise GalenCheckpointError(f"{folder} has no {CONFIG_FILE}; a CLIP model folder is an open_clip "
                                   "local directory (open_clip_config.json + weights + tokenizer files)")
    hint = "copy open_clip_config.json from the model's release"
    data = read_json(path, dict, hint, GalenCheckpointError)
    model_cfg = data.get("model_cfg")
    if not isinstance(model_cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg):
        raise GalenCheckpointError(f"{path} has no model_cfg with embed_dim, vision_cfg and text_cfg; {hint}")
    if not isinstance(model_cfg["vision_cfg"], dict) or not isinstance(model_cfg["text_cfg"], dict):
        raise GalenCheckpointError(f"{path}: model_cfg.vision_cfg and model_cfg.text_cfg must be objects; {hint}")
    if model_cfg["vision_cfg"].get("timm_model_pretrained"):  # the weights come from this folder, never a download
        model_cfg["vision_cfg"]["timm_model_pretrained"] = False
    pre = data.get("preprocess_cfg") or {}
    galen = data.get("galen") or {}
    if not isinstance(pre, dict) or not isinstance(galen, dict) or not all(
            isinstance(pre.get(k, []), list) for k in ("mean", "std")):
        raise GalenCheckpointError(f"{path}: preprocess_cfg (mean, std lists) and galen must be objects; {hint}")
    hf = bool(model_cfg["text_cfg"].get("hf_model_name"))
    hf_config = None
    if hf:
        local = folder / TEXT_ENCODER_DIR / "config.json"
        if local.is_file():
            hf_config = read_json(local, dict, "re-import the model", GalenCheckpointError)
        elif model_cfg["text_cfg"]["hf_model_name"] in (PUBMEDBERT, "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract"):
            hf_config = dict(PUBMEDBERT_CONFIG)
        else:
            raise GalenCheckpointError(
                f"{path} names the text model {model_cfg['text_cfg']['hf_model_name']!r}, whose config cannot be "
                f"downloaded here; put its config.json at {folder / TEXT_ENCODER_DIR / 'config.json'}")
    kind = galen.get("tokenizer") or ("hf" if hf or model_cfg["text_cfg"].get("hf_tokenizer_name") not in
                                      (None, GALEN_TOKENIZER) else "galen")
    return ClipSpec(name=str(galen.get("config", "imported")), model_cfg=model_cfg,
                    mean=tuple(pre.get("mean", CLIP_MEAN)), std=tuple(pre.get("std", CLIP_STD)),
                    tokenizer=str(kind), hf_text_config=hf_config)


def load_file_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def read_state_dict(path: Path, expected: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Weights of a file: safetensors, or a torch file (zip checked, weights-only unpickler:
    model.torch_files). With `expected` (name -> shape of the model they must fit), the shapes the file
    declares are checked before the model takes them (safetensors: before they are read)."""
    from galen.model.torch_files import read_torch_file

    state: Any  # whatever the file holds; checked below
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from galen.model.checkpoint import safetensors_shapes

        try:
            declared = safetensors_shapes(path)
        except GalenCheckpointError as e:
            raise GalenCheckpointError(f"{path} cannot be read as weights ({e.__cause__ or e}); re-download it") from e
        if expected is not None:
            _check_fit(expected, _unwrapped(declared), path)
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise GalenCheckpointError(f"{path} cannot be read as weights ({e}); re-download it") from e
    else:
        try:
            state = read_torch_file(path, what="weights")
        except GalenCheckpointError as e:
            raise GalenCheckpointError(f"{path} cannot be read as weights: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GalenCheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    state = _unwrapped(state)
    if expected is not None:
        _check_fit(expected, {k: tuple(v.shape) for k, v in state.items()}, path)
    return state


def _unwrapped(state: Mapping[str, Any]) -> dict[str, Any]:
    """Keys without DataParallel's `module.` prefix, and without the position_ids buffer older
    transformers saved."""
    out = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    out.pop("text.transformer.embeddings.position_ids", None)
    return out


def _check_fit(own: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], path: Path) -> None:
    """Every tensor of the model in the file with its shape and nothing else; all problems in one error."""
    missing = sorted(set(own) - set(found))
    unexpected = sorted(set(found) - set(own))
    shapes = [f"{k} {tuple(found[k])} vs {tuple(v)}" for k, v in own.items()
              if k in found and tuple(found[k]) != tuple(v)
              and not (k.startswith("logit_") and math.prod(found[k]) == math.prod(v))]  # scalar vs [1]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:8]}" if missing else "", f"unexpected {unexpected[:8]}" if unexpected else "",
                 f"shape mismatches (file vs config) {shapes[:8]}" if shapes else ""]
        raise GalenCheckpointError(f"{path} does not fit {CONFIG_FILE} ({'; '.join(p for p in parts if p)}); the "
                                   "config and the weights must come from the same model")


def load_weights(clip: torch.nn.Module, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load strictly; every missing, unexpected or mis-shaped tensor is named in one error. `state`: the
    file's tensors when already read (and checked) by `read_state_dict`."""
    own = clip.state_dict()
    if state is None:
        state = read_state_dict(path, {k: tuple(v.shape) for k, v in own.items()})
    else:
        _check_fit({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in state.items()}, path)
    for k in ("logit_scale", "logit_bias"):
        if k in state:
            state[k] = state[k].reshape(own[k].shape)
    clip.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------------
# retrieval index
# --------------------------------------------------------------------------------------------------
@dataclass
class RetrievalIndex:
    """Image and text embeddings of an indexed set of image-caption items (row k of both belongs to
    `items[k]`): text -> nearest images and image -> nearest captions. Saved as .npy arrays (read
    without pickle) + items.jsonl + index.json."""

    image_embeddings: torch.Tensor          # (N, D), normalized
    text_embeddings: torch.Tensor           # (N, D), normalized
    items: list[dict[str, Any]]             # id, caption, and whatever else describes the item

    @classmethod
    def build(cls, model: ClipModel, images: Sequence[Any], captions: Sequence[str],
              items: Sequence[Mapping[str, Any]]) -> RetrievalIndex:
        if not (len(images) == len(captions) == len(items)) or not images:
            raise GalenInputError("an index needs the same non-zero number of images, captions and items")
        return cls(model.encode_images(images), model.encode_texts(captions),
                   [{**dict(it), "caption": c} for it, c in zip(items, captions)])

    @property
    def embed_dim(self) -> int:
        return int(self.image_embeddings.shape[1])

    def save(self, folder: str | Path) -> Path:
        import numpy as np

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "image_embeddings.npy", self.image_embeddings.numpy())
        np.save(out / "text_embeddings.npy", self.text_embeddings.numpy())
        (out / "items.jsonl").write_text("".join(json.dumps(it, sort_keys=True) + "\n" for it in self.items))
        (out / "index.json").write_text(json.dumps({"count": len(self.items), "embed_dim": self.embed_dim}) + "\n")
        return out

    @classmethod
    def load(cls, folder: str | Path) -> RetrievalIndex:
        import numpy as np

        folder = Path(folder)
        try:
            images = torch.from_numpy(np.load(folder / "image_embeddings.npy", allow_pickle=False))
            texts = torch.from_numpy(np.load(folder / "text_embeddings.npy", allow_pickle=False))
            items = [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            raise GalenCheckpointError(f"retrieval index {folder} cannot be read ({e}); build it with "
                                       "`galen clip index`") from e
        if images.ndim != 2 or images.shape != texts.shape or len(items) != len(images):
            raise GalenCheckpointError(f"retrieval index {folder} is inconsistent: {tuple(images.shape)} image and "
                                       f"{tuple(texts.shape)} text embeddings for {len(items)} items; rebuild it")
        return cls(images.float(), texts.float(), items)

    def check_model(self, model: ClipModel) -> None:
        if self.embed_dim != model.spec.embed_dim:
            raise GalenCheckpointError(f"the retrieval index holds {self.embed_dim}-d embeddings but the model makes "
                                       f"{model.spec.embed_dim}-d ones; rebuild the index with this model "
                                       "(`galen clip index`)")

    def search(self, query: torch.Tensor, against: str, k: int) -> list[list[tuple[int, float]]]:
        """Per query row, the k nearest items by cosine similarity: `against` "images" or "texts"."""
        table = self.image_embeddings if against == "images" else self.text_embeddings
        check_same_dim(query, table)
        scores, idx = (query @ table.T).topk(min(k, len(table)), dim=1)
        return [[(int(i), float(s)) for i, s in zip(ri, rs)] for ri, rs in zip(idx, scores)]


def rank(query: torch.Tensor, candidates: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k candidates (rows) nearest to one query embedding, best first."""
    check_same_dim(query[None] if query.ndim == 1 else query, candidates)
    scores, idx = (query.reshape(1, -1) @ candidates.T)[0].topk(min(k, len(candidates)))
    return [(int(i), float(s)) for i, s in zip(idx, scores)]
