"""The CLIP model: loss against a hand computation, gathering across two real gloo workers,
open_clip interop both ways (our export loads in open_clip; a BiomedCLIP-layout folder loads in
Galen offline) and the bad inputs that must fail loudly."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from galen.model.clip import CONFIG_FILE, ClipModel, build_clip, get_spec, load_weights
from galen.model.errors import GalenCheckpointError, GalenConfigError, GalenInputError
from galen.model.losses import clip_loss


def _png(seed: int, size: int = 96) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- loss
def test_loss_equals_hand_computation():
    img = F.normalize(torch.tensor([[1.0, 0.0, 0.2], [0.1, 1.0, 0.0], [0.3, 0.3, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[0.9, 0.1, 0.0], [0.0, 1.0, 0.4], [0.5, 0.0, 0.8]]), dim=-1)
    scale = 10.0
    sim = [[float(img[i] @ txt[j]) * scale for j in range(3)] for i in range(3)]

    def ce(rows):  # mean over rows of -log softmax(row)[own index]
        return sum(math.log(sum(math.exp(v) for v in r)) - r[i] for i, r in enumerate(rows)) / len(rows)

    by_column = [[sim[j][i] for j in range(3)] for i in range(3)]
    expected = (ce(sim) + ce(by_column)) / 2
    got = clip_loss()(img, txt, torch.tensor(scale))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # a perfect match with a large scale costs almost nothing; swapping two captions costs a lot
    assert float(clip_loss()(img, img, torch.tensor(100.0))) < 1e-3
    assert float(clip_loss()(img, img[[1, 0, 2]], torch.tensor(100.0))) > 10


def _towers(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Linear(6, 4), torch.nn.Linear(5, 4), torch.nn.Parameter(torch.tensor(2.0))


def _loss_and_grads(images, texts, rank=0, world=1):
    vis, txt, log_scale = _towers()
    loss = clip_loss(rank, world)(F.normalize(vis(images), dim=-1), F.normalize(txt(texts), dim=-1),
                                         log_scale.exp())
    loss.backward()
    return loss.detach(), [p.grad for p in (*vis.parameters(), *txt.parameters(), log_scale)]


def _worker(rank: int, init_file: str, out_dir: str, images: np.ndarray, texts: np.ndarray) -> None:
    """One of two gloo workers: its half of the batch through the gathering loss, gradients averaged as
    DDP does, the result written to `out_dir/rank<rank>.npz`.

    The worker leaves with os._exit(0) once the group is destroyed and the result is on disk. A spawned
    child otherwise leaves through sys.exit: interpreter finalization, atexit handlers, then the C++
    static destructors, while native threads still run (the OpenMP and OpenBLAS pools always; gloo's
    pair loop and run-loop threads, and a TCP store's server, whenever anything still holds the group
    past destroy_process_group). Such a thread at that moment aborts the child ("terminate called
    without an active exception", SIGABRT) after a correct result: a race a loaded machine loses now
    and then. Nothing needs cleaning up by then; a failure before it raises and shows as a non-zero
    exit code."""
    import os
    import sys
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)  # two workers and pytest on a 2-core machine: no oversubscription
    # a FileStore in the test's tmp_path: no TCP port to pick (and lose to another process), no store
    # server thread; a generous timeout so that a slow peer under load is waited for, a dead one is not
    # waited for forever
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=300))
    images_t, texts_t = torch.from_numpy(images), torch.from_numpy(texts)
    half = len(images_t) // 2
    loss, grads = _loss_and_grads(images_t[rank * half:(rank + 1) * half], texts_t[rank * half:(rank + 1) * half],
                                  rank, 2)
    for g in grads:  # what DDP / DeepSpeed do with the gradients: average over workers
        dist.all_reduce(g)
        g /= 2
    dist.all_reduce(loss)
    result = {"loss": np.array(float(loss) / 2), **{f"grad{i}": g.numpy().copy() for i, g in enumerate(grads)}}
    dist.barrier()  # both ranks are done with every collective before either tears the group down
    del loss, grads, images_t, texts_t  # no tensor of a collective outlives the group
    dist.destroy_process_group()
    tmp = os.path.join(out_dir, f"rank{rank}.tmp.npz")
    np.savez(tmp, **result)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.npz"))  # whole or absent
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_two_workers(tmp_path, images: torch.Tensor, texts: torch.Tensor, deadline_s: float = 600.0) -> list[dict]:
    """Both workers' results ({"loss", "grad0", ...}); fails, with the exit codes, unless both exit 0."""
    import time

    ctx = torch.multiprocessing.get_context("spawn")
    args = (str(tmp_path / "gloo_store"), str(tmp_path), images.numpy(), texts.numpy())  # by value
    procs = [ctx.Process(target=_worker, args=(rank, *args)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        end = time.monotonic() + deadline_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
    finally:
        for p in procs:  # a worker still running past the deadline is stopped, and the test fails below
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0, 0], f"worker exit codes {[p.exitcode for p in procs]}"
    results = []
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz", allow_pickle=False) as npz:
            results.append({k: npz[k] for k in npz.files})
    return results


def test_two_gathering_workers_equal_one_process_on_the_whole_batch(tmp_path):
    torch.manual_seed(1)
    images, texts = torch.randn(8, 6), torch.randn(8, 5)
    full_loss, full_grads = _loss_and_grads(images, texts)
    results = _run_two_workers(tmp_path, images, texts)
    for result in results:  # rank 0 and (after the averaging) rank 1 hold the same numbers
        assert float(result["loss"]) == pytest.approx(float(full_loss), rel=1e-5)
        assert len(result) - 1 == len(full_grads)
        for i, ref in enumerate(full_grads):
            torch.testing.assert_close(torch.from_numpy(result[f"grad{i}"]), ref, rtol=1e-5, atol=1e-6)
    # without the gathered columns the loss is a different (easier) one: the test can tell them apart
    half_loss, _ = _loss_and_grads(images[:4], texts[:4])
    assert abs(float(half_loss) - float(full_loss)) > 1e-3


# ---------------------------------------------------------------------------------------------- interop
@pytest.fixture(scope="module")
def micro(demo_tokenizer):
    return ClipModel.create("micro", demo_tokenizer, seed=0)


def test_export_loads_in_open_clip_with_the_same_embeddings(micro, tmp_path):
    import open_clip

    micro.save_pretrained(tmp_path / "m")
    clip, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{tmp_path / 'm'}")
    clip.eval()
    images = [Image.open(io.BytesIO(_png(k))) for k in range(3)]
    texts = ["is there a nodule?", "the heart is enlarged"]
    with torch.no_grad():
        theirs_img = clip.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        theirs_txt = clip.encode_text(micro.text_encoder(texts), normalize=True)
    torch.testing.assert_close(theirs_img, micro.encode_images(images), rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs_txt, micro.encode_texts(texts), rtol=0, atol=1e-5)
    again = ClipModel.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(again.encode_texts(texts), micro.encode_texts(texts))
    with pytest.raises(Exception):  # noqa: B017 -- whatever open_clip raises; open_clip's own BPE would give ids meaningless to this model: refused
        open_clip.get_tokenizer(f"local-dir:{tmp_path / 'm'}")


def test_cli_export_and_embed(micro, tmp_path, capsys):
    """`galen clip export` writes the released layout (open_clip_pytorch_model.bin, no Galen section),
    which open_clip and Galen both load; `galen clip embed` prints the same numbers as the API."""
    import open_clip

    from galen.flows.cli import main

    micro.save_pretrained(tmp_path / "m")
    assert main(["clip", "export", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "open_clip_pytorch_model.bin").is_file()
    assert "galen" not in json.loads((tmp_path / "x" / CONFIG_FILE).read_text())
    clip, _ = open_clip.create_model_from_pretrained(f"local-dir:{tmp_path / 'x'}")
    exported = ClipModel.from_pretrained(tmp_path / "x")
    torch.testing.assert_close(exported.encode_texts(["a nodule"]), micro.encode_texts(["a nodule"]))
    capsys.readouterr()
    assert main(["clip", "embed", "--model", str(tmp_path / "x"), "--text", "a nodule"]) == 0
    printed = torch.tensor(json.loads(capsys.readouterr().out))
    torch.testing.assert_close(printed, micro.encode_texts(["a nodule"])[0], rtol=0, atol=1e-5)
    (tmp_path / "p.png").write_bytes(_png(1))
    assert main(["clip", "embed", "--model", str(tmp_path / "x"), "--image", str(tmp_path / "p.png"),
                 "--labels", "nodule", "nodule"]) == 2  # duplicate labels: a clear error, exit status 2


BERT_VOCAB = ["[PAD]", *[f"[unused{i}]" for i in range(99)], "[UNK]", "[CLS]", "[SEP]", "[MASK]",
              "the", "heart", "is", "enlarged", "nodule", "lung", "a", "of", "image", "there", "no", "."]


def _biomedclip_release(folder, seed: int = 0) -> torch.nn.Module:
    """An official-layout BiomedCLIP folder (random weights in the real key layout): open_clip_config.json
    as the release has it, open_clip_pytorch_model.bin (torch.save), BERT tokenizer files."""
    spec = get_spec("biomedclip")
    torch.manual_seed(seed)
    clip = build_clip(spec)
    folder.mkdir()
    config = {"model_cfg": spec.model_cfg, "preprocess_cfg": {"mean": list(spec.mean), "std": list(spec.std)}}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    state = clip.state_dict()
    state["text.transformer.embeddings.position_ids"] = torch.arange(512)[None]  # older transformers saved it
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    (folder / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 256,
                                                              "tokenizer_class": "BertTokenizer"}))
    return clip.eval()


@pytest.fixture(scope="module")
def biomedclip_release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("release") / "BiomedCLIP"
    return folder, _biomedclip_release(folder)


def test_official_biomedclip_folder_loads_offline(biomedclip_release, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, reference = biomedclip_release
    model = ClipModel.from_pretrained(folder)
    assert model.spec.embed_dim == 512 and model.spec.context_length == 256 and model.spec.image_size == 224
    ids = model.text_encoder(["The heart is enlarged."])
    assert ids[0, 0] == BERT_VOCAB.index("[CLS]") and ids[0, -1] == BERT_VOCAB.index("[SEP]")
    assert ids[0, 1:5].tolist() == [BERT_VOCAB.index(w) for w in ("the", "heart", "is", "enlarged")]
    as_open_clip = torch.zeros(1, 256, dtype=torch.long)  # open_clip pads to the context; the tower masks padding
    as_open_clip[0, :ids.shape[1]] = ids[0]
    with torch.no_grad():
        want = F.normalize(reference.encode_text(as_open_clip), dim=-1)
    torch.testing.assert_close(model.encode_texts(["The heart is enlarged."]), want, rtol=0, atol=1e-5)
    image = Image.open(io.BytesIO(_png(3, 240)))
    with torch.no_grad():
        want = F.normalize(reference.encode_image(model.preprocess(image)[None]), dim=-1)
    torch.testing.assert_close(model.encode_images([image]), want)
    # and back out as our folder (safetensors + the BERT config), which reloads the same, offline
    model.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "text_encoder" / "config.json").is_file()
    torch.testing.assert_close(ClipModel.from_pretrained(tmp_path / "ours").encode_images([image]),
                               model.encode_images([image]))


# ---------------------------------------------------------------------------------------------- bad input
def test_mismatched_weights_and_tokenizers_are_refused(micro, tmp_path, demo_tokenizer):
    micro.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    config["model_cfg"]["embed_dim"] = 64
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(GalenCheckpointError, match="shape mismatches.*text_projection"):
        ClipModel.from_pretrained(tmp_path / "m")

    spec = get_spec("micro", demo_tokenizer)
    clip = build_clip(spec)
    with pytest.raises(GalenCheckpointError, match="cannot be read as weights"):
        (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
        load_weights(clip, tmp_path / "junk.bin")

    class Bigger:  # a tokenizer with more ids than the text tower has embeddings
        pad_id, eos_id, bos_id = demo_tokenizer.pad_id, demo_tokenizer.eos_id, demo_tokenizer.bos_id

        def __len__(self):
            return len(demo_tokenizer) + 10

    from galen.model.clip import GalenTextEncoder

    with pytest.raises(GalenCheckpointError, match="tokenizer has .* entries but the text tower"):
        ClipModel(clip, spec, GalenTextEncoder(Bigger(), spec.context_length))
    with pytest.raises(GalenConfigError, match="unknown CLIP config"):
        get_spec("vit-huge", demo_tokenizer)


def test_broken_tokenizer_files_are_refused(biomedclip_release, tmp_path):
    import shutil

    folder, _ = biomedclip_release
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "vocab.txt").unlink()
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(GalenCheckpointError, match="tokenizer files"):
        ClipModel.from_pretrained(broken)


def test_bad_inference_inputs(micro):
    with pytest.raises(GalenInputError, match="labels must be a non-empty list"):
        micro.class_embeddings([])
    with pytest.raises(GalenInputError, match="duplicates labels"):
        micro.class_embeddings(["nodule", "effusion", "Nodule"])
    with pytest.raises(GalenInputError, match="at least two labels"):
        micro.class_embeddings(["nodule"])
    with pytest.raises(GalenInputError, match=r"texts\[1\] must be a non-empty string"):
        micro.encode_texts(["fine", "  "])
    with pytest.raises(GalenInputError, match="cannot be decoded"):
        micro.encode_images([b"this is not an image"])
    with pytest.raises(GalenInputError, match="exactly one"):
        micro.class_embeddings(["a", "b"], templates=["no placeholder"])
    with pytest.raises(GalenInputError, match="embedding sizes do not match"):
        micro.zero_shot(torch.randn(2, 128), torch.randn(3, 64))


def test_zero_shot_probabilities(micro):
    probs = micro.classify([_png(0), _png(1)], ["nodule", "effusion", "normal"])
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    # class embeddings average the templates: one template alone gives a different (still unit) vector
    avg = micro.class_embeddings(["nodule", "effusion"])
    one = micro.class_embeddings(["nodule", "effusion"], templates=["{}."])
    torch.testing.assert_close(avg.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(avg, one)


def test_retrieval_index_round_trip_and_mismatch(micro, tmp_path, demo_tokenizer):
    from galen.model.clip import RetrievalIndex

    images = [_png(k) for k in range(4)]
    captions = ["a nodule", "an effusion", "a normal chest", "an enlarged heart"]
    index = RetrievalIndex.build(micro, images, captions, [{"id": str(k)} for k in range(4)])
    again = RetrievalIndex.load(index.save(tmp_path / "ix"))
    assert again.items[1] == {"id": "1", "caption": "an effusion"}
    query = micro.encode_texts(["an effusion"])
    hits = again.search(query, "texts", 2)[0]
    assert hits[0][0] == 1 and hits[0][1] == pytest.approx(1.0, abs=1e-5)  # the identical caption first
    want = (query @ micro.encode_images(images).T)[0].argsort(descending=True)[:3].tolist()
    assert [i for i, _ in again.search(query, "images", 3)[0]] == want
    other = ClipModel(build_clip(get_spec("small", demo_tokenizer)), get_spec("small", demo_tokenizer),
                             micro.text_encoder)
    with pytest.raises(GalenCheckpointError, match="128-d embeddings but the model makes 256-d"):
        again.check_model(other)
    (tmp_path / "ix" / "items.jsonl").write_text('{"id": "0"}\n')
    with pytest.raises(GalenCheckpointError, match="inconsistent"):
        RetrievalIndex.load(tmp_path / "ix")
