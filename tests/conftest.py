"""Shared fixtures: small real models and tokenizers built on the spot (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REFERENCE_CHECK = Path(__file__).parent / "fixtures" / "reference_check"


def load_script(path: Path):
    """A standalone script (e.g. the reference check's make_bpe.py) imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_reference_case() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(vocab_subset, tensors) of the reference forward-pass case (converted once from the shared
    `case_single_image.pt` to npz so the repository holds no pickle files)."""
    import numpy as np

    arrays = np.load(REFERENCE_CHECK / "case_single_image.npz", allow_pickle=False)
    tensors = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
    return tensors.pop("vocab_subset"), tensors


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    yield


@pytest.fixture(scope="session")
def demo_vqa(tmp_path_factory) -> Path:
    """The VQA-RAD-style demo dataset (folder with trainset.json, testset.json, images/)."""
    from galen.flows.demo_data import write_vqa_rad

    out = tmp_path_factory.mktemp("demo") / "vqa_rad"
    write_vqa_rad(out, num_images=24, image_size=128, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_tokenizer(demo_vqa, tmp_path_factory):
    """A SentencePiece tokenizer trained on the demo questions and answers."""
    from galen.flows.cli import corpus_texts
    from galen.model.sentencepiece_text import train_sentencepiece
    from galen.model.vocabulary import GalenTokenizer

    out = tmp_path_factory.mktemp("tok")
    texts = list(corpus_texts([str(demo_vqa / "trainset.json")], ["question", "answer"]))
    tok = GalenTokenizer(train_sentencepiece(texts, out, vocab_size=290))
    tok.save(out)
    return tok


def nano(vocab_size: int = 1200, **overrides):
    """A randomly initialised nano model in eval mode (dropout off)."""
    from galen.model.config import get_config
    from galen.model.generalist import GalenModel

    torch.manual_seed(overrides.pop("seed", 0))
    return GalenModel(get_config("nano", vocab_size=vocab_size, **overrides)).eval()


@pytest.fixture
def mlflow_server_on_s3(tmp_path):
    """moto S3 + `mlflow server --artifacts-destination s3://...` for one test, stopped by pid afterwards."""
    from tests.servers import mlflow_server_on_s3 as server

    with server(tmp_path) as running:
        yield running


DEMO_DATASETS = (  # (folder written by write_demo, ingest format, adapter options): one per evaluated task
    ("vqa_rad", "vqa-rad", {}), ("slake", "slake", {}), ("iu_xray", "r2gen", {"dataset": "iu-xray"}),
    ("medmnist", "medmnist", {}), ("mednli", "mednli", {}), ("meqsum", "meqsum", {}),
)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """The demo pipeline at scale 0.25 through the real stages (demo data -> ingest -> validate ->
    shards): test splits of vqa, caption, classification, nli, summarization and grounding."""
    from galen.flows.demo_data import write_demo
    from galen.flows.ingest import ingest
    from galen.flows.shards import ShardConfig, build_shards
    from galen.flows.validate import ValidationConfig, validate

    root = tmp_path_factory.mktemp("demo_pipeline")
    write_demo(root / "raw", seed=0, scale=0.25)
    for name, fmt, options in DEMO_DATASETS:
        ingest(fmt, root / "raw" / name, root / "ingested" / name, **options)
    validate([root / "ingested" / name for name, _, _ in DEMO_DATASETS], root / "validated", ValidationConfig())
    # written for the models params.yaml trains: the nano generalist (128 px) and the micro CLIP (64 px)
    build_shards(root / "validated", root / "shards", ShardConfig(models={"generalist": 128, "clip": 64}))
    return root / "shards"


@pytest.fixture(scope="session")
def demo_model_dir(demo_shards, tmp_path_factory) -> Path:
    """A random-weight nano model folder with a tokenizer trained on the demo shards' text (what
    `galen model init --size nano` writes): real plumbing, meaningless answers."""
    from galen.flows.cli import corpus_texts
    from galen.model.config import get_config
    from galen.model.generalist import GalenModel
    from galen.model.sentencepiece_text import train_sentencepiece
    from galen.model.vocabulary import GalenTokenizer

    out = tmp_path_factory.mktemp("nano_model")
    texts = list(corpus_texts([str(p) for p in sorted(demo_shards.glob("*/train"))], []))
    tok = GalenTokenizer(train_sentencepiece(texts, out, vocab_size=400))
    torch.manual_seed(0)
    GalenModel(get_config("nano", vocab_size=len(tok))).save_pretrained(out, tok)
    return out
