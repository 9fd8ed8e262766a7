"""Tests of the image-infilling code tokenizers (k-means patch codes, precomputed codes) and their flow."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from galen.flows.codebook import encode_image_codes, train_image_codes
from galen.flows.ingest.schema import Record, ShardWriter, image_sha1
from galen.model.errors import GalenConfigError, GalenInputError
from galen.model.image_code_files import PrecomputedCodes, load_image_codes
from galen.model.image_codebook import (
    CODEBOOK_FILE,
    IMAGE_CODES_JSON,
    ImageCodeTokenizer,
    KMeansPatchCodes,
    kmeans,
    middle_crop,
    patchify,
    reconstruction_error,
    unpatchify,
)
from galen.model.vocabulary import GalenTokenizer


def smooth_images(n: int, seed: int = 0, size: int = 128) -> torch.Tensor:
    """Varied smooth RGB images in [-1, 1]: sums of random sinusoids, like blurry anatomy."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        f, ph = torch.rand(3, 2, generator=g) * 8, torch.rand(3, generator=g) * 6
        out.append(torch.stack([torch.sin(f[c, 0] * xx + ph[c]) * torch.cos(f[c, 1] * yy) for c in range(3)]) * 0.9)
    return torch.stack(out)


def planted(k: int = 6, per: int = 300, dim: int = 192, noise: float = 0.05, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g)
    labels = torch.arange(k).repeat_interleave(per)
    x = centres[labels] + noise * torch.randn(k * per, dim, generator=g)
    perm = torch.randperm(k * per, generator=g)
    return x[perm], labels[perm], centres


def constant_patch_image(colours: np.ndarray, layout: np.ndarray) -> np.ndarray:
    """uint8 (16*8, 16*8, 3) image whose 8x8 patch (r, c) is colours[layout[r, c]]."""
    return np.repeat(np.repeat(colours[layout], 8, axis=0), 8, axis=1)


@pytest.fixture(scope="module")
def trained() -> tuple[KMeansPatchCodes, torch.Tensor]:
    x = smooth_images(24)
    return KMeansPatchCodes.fit_images(x, 64, seed=3, epochs=4), x


# ----------------------------------------------------------------------------- k-means


def test_kmeans_finds_planted_clusters():
    x, truth, centres = planted()
    res = kmeans(x, 6, seed=0, epochs=5, batch_size=256)
    table = torch.zeros(6, 6, dtype=torch.long)
    table.index_put_((truth, res.assignments), torch.ones_like(truth), accumulate=True)
    # a permutation: every true cluster lands in exactly one found cluster and vice versa
    assert ((table > 0).sum(1) == 1).all() and ((table > 0).sum(0) == 1).all()
    match = table.argmax(1)
    assert torch.allclose(res.centroids[match], centres, atol=0.02)
    assert res.counts.tolist() == [300] * 6


def test_minibatch_updates_lower_the_inertia():
    x, _, _ = planted(k=8, noise=0.2)
    res = kmeans(x, 8, seed=0, epochs=4, batch_size=128, init="random", lloyd_steps=0)
    assert res.inertia < 0.8 * res.init_inertia
    assert res.epoch_inertia[-1] < res.epoch_inertia[0]
    # the final full-data inertia equals the sum of squared distances to the assigned centroids
    direct = float(((x - res.centroids[res.assignments]) ** 2).sum())
    assert res.inertia == pytest.approx(direct, rel=1e-4)


def test_dead_centres_are_reseeded():
    # random inits that put two centres on one point: the later centre never wins, and the far
    # pair is shared by one centre, a local minimum only reseeding escapes
    x = torch.tensor([[0.0, 0.0], [10.0, 0.0], [11.0, 0.0]]).repeat_interleave(100, 0)
    seeds = [s for s in range(8) if (kmeans(x, 3, seed=s, epochs=0, init="random").counts == 0).any()]
    assert len(seeds) >= 3
    for seed in seeds:
        res = kmeans(x, 3, seed=seed, epochs=12, batch_size=64, init="random")
        assert res.counts.tolist() == [100, 100, 100] and res.inertia == 0.0, seed


def test_training_is_deterministic_by_seed():
    x = smooth_images(6, seed=5)
    a = KMeansPatchCodes.fit_images(x, 32, seed=11, epochs=2, projection_dim=16)
    b = KMeansPatchCodes.fit_images(x, 32, seed=11, epochs=2, projection_dim=16)
    c = KMeansPatchCodes.fit_images(x, 32, seed=12, epochs=2, projection_dim=16)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.projection, b.projection)
    assert torch.equal(a.encode(x), b.encode(x))
    assert not torch.equal(a.centroids, c.centroids)


# ----------------------------------------------------------------------------- encode / decode


def test_encode_shape_range_and_input_forms(trained):
    tok, x = trained
    codes = tok.encode(x[:5])
    assert codes.shape == (5, 16, 16) and codes.dtype == torch.long
    assert tok.num_codes == 64 and tok.grid == 16 and tok.patch_size == 8 and tok.image_size == 128
    assert 0 <= int(codes.min()) and int(codes.max()) < 64
    assert len(codes.unique()) > 16  # varied images use many codes
    u8 = ((x[:5] + 1) * 127.5).round().to(torch.uint8)
    hwc = u8.permute(0, 2, 3, 1).numpy()
    assert torch.equal(tok.encode(u8), tok.encode(hwc))
    assert torch.equal(tok.encode(list(hwc)), tok.encode([Image.fromarray(a) for a in hwc]))
    assert tok.encode(x[0]).shape == (1, 16, 16)
    # nearest centroid, checked by brute force in the same feature space
    feats = (patchify(x[:2]).reshape(-1, 192) - tok.feature_mean) / tok.feature_std
    brute = torch.cdist(feats.double(), tok.centroids.double()).argmin(1).reshape(2, 16, 16)
    assert torch.equal(tok.encode(x[:2]), brute)


def test_codes_are_row_major_over_the_grid():
    rng = np.random.default_rng(0)
    colours = rng.choice(256, size=(16, 3), replace=False).astype(np.uint8)
    colours[:, 1] = 255 - colours[:, 0]
    tok = KMeansPatchCodes.from_patch_centroids(
        torch.from_numpy(np.repeat(colours, 64, axis=0).reshape(16, 64, 3).transpose(0, 2, 1).reshape(16, 192))
        .float() / 127.5 - 1)
    layout = (np.arange(256).reshape(16, 16) * 7 + np.arange(16)[:, None]) % 16
    assert tok.encode(constant_patch_image(colours, layout)).tolist() == [layout.tolist()]
    assert patchify(unpatchify(torch.arange(2 * 4 * 4 * 192.0).reshape(2, 4, 4, 192))).reshape(-1).tolist() \
        == list(range(2 * 4 * 4 * 192))


def test_decode_of_encode_reproduces_piecewise_constant_images_exactly():
    rng = np.random.default_rng(1)
    colours = rng.integers(0, 256, size=(12, 3), dtype=np.uint8)
    train = [constant_patch_image(colours, rng.integers(0, 12, size=(16, 16))) for _ in range(6)]
    tok = KMeansPatchCodes.fit_images(train, 12, seed=0, epochs=3)
    assert tok.stats["codes_used"] == 12 and tok.stats["inertia"] < 1e-6
    new = constant_patch_image(colours, rng.integers(0, 12, size=(16, 16)))
    codes = tok.encode(new)
    assert np.array_equal(tok.decode(codes[0]), new)
    assert np.array_equal(tok.decode(codes)[0], new)
    assert reconstruction_error(tok, new) < 1e-10
    # a pixel off the centres makes the error positive
    off = new.copy()
    off[0, 0] ^= 0x40
    assert reconstruction_error(tok, off) > 1e-6


def test_reconstruction_error_on_smooth_images(trained):
    tok, x = trained
    mse = reconstruction_error(tok, x)
    variance = float(((x - x.mean((0, 2, 3), keepdim=True)) ** 2).mean())
    assert 0 < mse < 0.2 * variance
    recon = tok.decode(tok.encode(x[:2]))
    assert recon.shape == (2, 128, 128, 3) and recon.dtype == np.uint8
    # more codes fit better, on the same images
    bigger = KMeansPatchCodes.fit_images(x, 256, seed=3, epochs=4)
    assert reconstruction_error(bigger, x) < mse


def test_save_load_gives_identical_codes(tmp_path, trained):
    tok, x = trained
    proj = KMeansPatchCodes.fit_images(x[:8], 32, seed=0, epochs=2, projection_dim=24, normalize=False)
    for t, d in ((tok, tmp_path / "a"), (proj, tmp_path / "b")):
        t.save(d)
        assert sorted(p.name for p in d.iterdir()) == [CODEBOOK_FILE, IMAGE_CODES_JSON]
        meta = json.loads((d / IMAGE_CODES_JSON).read_text())
        assert meta["kind"] == "kmeans" and meta["num_codes"] == t.num_codes and meta["grid"] == 16
        back = ImageCodeTokenizer.load(d)
        assert isinstance(back, KMeansPatchCodes) and back.num_codes == t.num_codes
        assert torch.equal(back.encode(x), t.encode(x))
        assert np.array_equal(back.decode(t.encode(x[:2])), t.decode(t.encode(x[:2])))
        assert back.stats == json.loads(json.dumps(t.stats))
    assert json.loads((tmp_path / "b" / IMAGE_CODES_JSON).read_text())["projection_dim"] == 24
    assert KMeansPatchCodes.load(tmp_path / "a").encode(x[:1]).shape == (1, 16, 16)


class _StubText:
    """The smallest TextTokenizer: enough for GalenTokenizer's code id layout."""

    kind = "stub"
    vocab_size = 10

    def encode(self, text: str) -> list[int]:
        return [4]

    def decode(self, ids: Sequence[int]) -> str:
        return ""

    def save(self, directory: Path) -> list[str]:
        return []

    @classmethod
    def load(cls, directory: Path, files: Sequence[str]) -> _StubText:
        return cls()


def test_token_ids_map_codes_into_the_unified_vocabulary(trained):
    tok, x = trained
    text = GalenTokenizer(_StubText())  # reserves 8192 code slots
    codes = tok.encode(x[:1])[0]
    ids = tok.token_ids(codes, text)
    assert len(ids) == 256 and ids == [text.code_offset + int(c) for c in codes.reshape(-1)]
    assert text.tokens_to_codes(ids) == codes.reshape(-1).tolist()
    with pytest.raises(GalenConfigError, match="reserves only 16"):
        tok.token_ids(codes, GalenTokenizer(_StubText(), num_codes=16))
    with pytest.raises(GalenInputError, match="256 codes"):
        tok.token_ids(codes[:4], text)


# ----------------------------------------------------------------------------- precomputed


def _sha(i: int) -> str:
    return hashlib.sha1(f"image-{i}".encode()).hexdigest()


def test_precomputed_lookup_save_and_load(tmp_path):
    rng = np.random.default_rng(0)
    table = {_sha(i): rng.integers(0, 8192, 256).tolist() for i in range(5)}
    pre = PrecomputedCodes.from_mapping(table)
    assert len(pre) == 5 and pre.num_codes == 8192 and pre.grid == 16
    got = pre.encode_by_key(_sha(2))
    assert got.shape == (16, 16) and got.reshape(-1).tolist() == table[_sha(2)]
    assert pre.encode_by_key(_sha(2).upper()).equal(got) and _sha(2) in pre
    assert pre.encode_by_keys([_sha(0), _sha(4)]).shape == (2, 16, 16)
    data = b"\x89PNG fake bytes"
    byb = PrecomputedCodes.from_mapping({hashlib.sha1(data).hexdigest(): table[_sha(1)]})
    assert byb.encode_by_image_bytes(data).reshape(-1).tolist() == table[_sha(1)]
    with pytest.raises(GalenInputError, match="no precomputed codes"):
        pre.encode_by_key(_sha(99))
    with pytest.raises(GalenInputError, match="looked up by image hash"):
        pre.encode(torch.zeros(1, 3, 128, 128))
    pre.save(tmp_path / "pre")
    back = load_image_codes(tmp_path / "pre")
    assert isinstance(back, PrecomputedCodes) and back.keys() == pre.keys()
    assert all(back.encode_by_key(k).equal(pre.encode_by_key(k)) for k in table)
    with pytest.raises(GalenConfigError, match="not 'kmeans'"):
        KMeansPatchCodes.load(tmp_path / "pre")


def test_precomputed_file_formats(tmp_path):
    rng = np.random.default_rng(1)
    keys = [_sha(i) for i in range(4)]
    codes = rng.integers(0, 8192, size=(4, 256))
    pq.write_table(pa.table({"image_sha1": keys, "codes": [c.tolist() for c in codes]}), tmp_path / "c.parquet")
    np.savez(tmp_path / "c.npz", image_sha1=np.array(keys), codes=codes)
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"image_sha1": k, "codes": c.tolist()}) + "\n" for k, c in zip(keys, codes)))
    for name in ("c.parquet", "c.npz", "c.jsonl"):
        pre = PrecomputedCodes.from_file(tmp_path / name)
        assert pre.keys() == keys, name
        assert pre.encode_by_key(keys[3]).reshape(-1).tolist() == codes[3].tolist(), name


@pytest.mark.parametrize("bad, match", [
    ({"codes": list(range(255))}, "255 codes, expected 16x16 = 256"),
    ({"codes": [0] * 255 + [8192]}, r"outside 0..8191"),
    ({"codes": [0] * 255 + [-1]}, r"outside 0..8191"),
    ({"codes": [0] * 255 + [1.5]}, "not an integer"),
    ({"image_sha1": "not-a-hash"}, "not a SHA-1"),
])
def test_precomputed_rejects_bad_rows(tmp_path, bad, match):
    row = {"image_sha1": _sha(0), "codes": [1] * 256} | bad
    (tmp_path / "x.jsonl").write_text(json.dumps({"image_sha1": _sha(1), "codes": [2] * 256}) + "\n" + json.dumps(row))
    with pytest.raises(GalenInputError, match=match):
        PrecomputedCodes.from_file(tmp_path / "x.jsonl")


def test_precomputed_file_errors(tmp_path):
    with pytest.raises(GalenInputError, match="different codes"):
        PrecomputedCodes.from_mapping({_sha(0): [1] * 256, _sha(0).upper(): [2] * 256})
    pq.write_table(pa.table({"image_sha1": [_sha(0)], "codes": [[1] * 64]}), tmp_path / "short.parquet")
    with pytest.raises(GalenInputError, match="64 codes"):
        PrecomputedCodes.from_file(tmp_path / "short.parquet")
    assert PrecomputedCodes.from_file(tmp_path / "short.parquet", grid=8).grid == 8
    pq.write_table(pa.table({"image_sha1": [_sha(0), _sha(1)], "codes": [[1] * 256, [1] * 250]}),
                   tmp_path / "ragged.parquet")
    with pytest.raises(GalenInputError, match=f"image {_sha(1)} has 250 codes"):
        PrecomputedCodes.from_file(tmp_path / "ragged.parquet")
    pq.write_table(pa.table({"image_sha1": [_sha(0)], "codes": [[300] * 256]}), tmp_path / "big.parquet")
    with pytest.raises(GalenInputError, match="outside 0..255"):
        PrecomputedCodes.from_file(tmp_path / "big.parquet", num_codes=256)
    pq.write_table(pa.table({"sha": [_sha(0)]}), tmp_path / "cols.parquet")
    with pytest.raises(GalenInputError, match="lacks column"):
        PrecomputedCodes.from_file(tmp_path / "cols.parquet")
    np.savez(tmp_path / "obj.npz", image_sha1=np.array([_sha(0)], dtype=object), codes=np.ones((1, 256), int))
    with pytest.raises(GalenInputError, match="without pickle"):
        PrecomputedCodes.from_file(tmp_path / "obj.npz")
    with pytest.raises(GalenConfigError, match="does not exist"):
        PrecomputedCodes.from_file(tmp_path / "missing.parquet")
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(GalenConfigError, match="unknown codes file type"):
        PrecomputedCodes.from_file(tmp_path / "c.csv")


# ----------------------------------------------------------------------------- errors


def test_image_input_errors(trained):
    tok, _ = trained
    with pytest.raises(GalenInputError, match="not a multiple of the 8-pixel"):
        tok.encode(torch.zeros(1, 3, 130, 130))
    with pytest.raises(GalenInputError, match="not the code image size 128x128"):
        tok.encode(torch.zeros(1, 3, 256, 256))
    with pytest.raises(GalenInputError, match="not the code image size"):
        tok.encode(np.zeros((136, 128, 3), np.uint8))
    with pytest.raises(GalenInputError, match=r"\[-1, 1\]"):
        tok.encode(torch.full((1, 3, 128, 128), 255.0))
    with pytest.raises(GalenInputError, match="must be uint8"):
        tok.encode(np.zeros((128, 128, 3), np.float32))
    with pytest.raises(GalenInputError, match="channel-first"):
        tok.encode(torch.zeros(1, 128, 128, 3))
    with pytest.raises(GalenInputError, match="outside 0..63"):
        tok.decode(torch.full((16, 16), 64))
    with pytest.raises(GalenInputError, match=r"\(B, 16, 16\)"):
        tok.decode(torch.zeros(8, 8, dtype=torch.long))


def test_training_errors():
    with pytest.raises(GalenInputError, match="too few patches to train 300 codes: got 256"):
        KMeansPatchCodes.fit_images(smooth_images(1), 300)
    with pytest.raises(GalenInputError, match="too few samples"):
        kmeans(torch.zeros(3, 2), 4)
    with pytest.raises(GalenConfigError, match="num_codes must be a positive integer"):
        KMeansPatchCodes.fit_images(smooth_images(1), 0)
    with pytest.raises(GalenConfigError, match="unknown k-means init"):
        kmeans(torch.zeros(8, 2), 2, init="forgy")
    with pytest.raises(GalenInputError, match=r"\(N, 192\)"):
        KMeansPatchCodes.fit(torch.zeros(300, 64), 4)


def test_file_errors(tmp_path, trained):
    tok, _ = trained
    with pytest.raises(GalenConfigError, match="image_codes.json is missing"):
        load_image_codes(tmp_path / "nothing")
    tok.save(tmp_path / "t")
    (tmp_path / "t" / CODEBOOK_FILE).unlink()
    with pytest.raises(GalenConfigError, match="codebook.safetensors is missing"):
        load_image_codes(tmp_path / "t")
    tok.save(tmp_path / "t")
    (tmp_path / "t" / CODEBOOK_FILE).write_bytes(b"garbage")
    with pytest.raises(GalenConfigError, match="not a readable safetensors"):
        load_image_codes(tmp_path / "t")
    tok.save(tmp_path / "t")
    meta_path = tmp_path / "t" / IMAGE_CODES_JSON
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"kind": "vqgan"}))
    with pytest.raises(GalenConfigError, match="kind 'vqgan'"):
        load_image_codes(tmp_path / "t")
    meta_path.write_text(json.dumps(meta | {"num_codes": 65}))
    with pytest.raises(GalenConfigError, match="num_codes=65 but the codebook has 64"):
        load_image_codes(tmp_path / "t")
    meta_path.write_text(json.dumps(meta | {"files": ["../evil"]}))
    with pytest.raises(GalenConfigError, match="plain file names"):
        load_image_codes(tmp_path / "t")
    meta_path.write_text("{not json")
    with pytest.raises(GalenConfigError, match="not valid JSON"):
        load_image_codes(tmp_path / "t")


# ----------------------------------------------------------------------------- flow


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A structured test image: smooth colour gradients plus a few bright discs."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(xx * rng.uniform(2, 9) + rng.uniform(0, 6)) * np.cos(yy * rng.uniform(2, 9))
                    for _ in range(3)], axis=-1) * 100 + 128
    for _ in range(3):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 30)
        img[(yy * max(h, w) - cy) ** 2 + (xx * max(h, w) - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[bytes]]:
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("shards")
    images = [_png(_photo(rng, h, w)) for h, w in [(200, 160), (256, 256), (96, 120), (300, 300), (180, 240), (64, 64)]]
    val = _png(_photo(rng, 150, 150))
    gray = _png(_photo(rng, 100, 100)[..., 0])
    with ShardWriter(out, rows_per_shard=4) as w:
        for i, img in enumerate(images + [gray]):
            w.write(Record(task="vqa", split="train", dataset="demo", source_id=f"q{i}", target="yes",
                           image=img, question="is there a lesion?"))
        w.write(Record(task="vqa", split="train", dataset="demo", source_id="dup", target="no",
                       image=images[0], question="is it normal?"))
        w.write(Record(task="vqa", split="train", dataset="demo", source_id="broken", target="no",
                       image=b"this is not an image", question="?"))
        w.write(Record(task="vqa", split="train", dataset="demo", source_id="quarantined", target="no",
                       image=_png(_photo(rng, 64, 64)), question="?", problem="bad row"))
        w.write(Record(task="summarization", split="train", dataset="demo", source_id="t", target="s", text="a b"))
        w.write(Record(task="vqa", split="val", dataset="demo", source_id="v", target="yes", image=val, question="?"))
    return out, images + [gray]


def test_middle_crop_is_the_infilling_region():
    arr = _photo(np.random.default_rng(3), 256, 256)
    assert np.array_equal(middle_crop(Image.fromarray(arr), 128), arr[64:192, 64:192])
    assert np.array_equal(middle_crop(_png(arr), 128), arr[64:192, 64:192])
    assert middle_crop(Image.fromarray(arr[..., 0]), 64).shape == (64, 64, 3)


def test_flow_trains_reports_and_encodes(tmp_path, shards):
    src, images = shards
    report = train_image_codes(src, tmp_path / "codes", num_codes=32, patches_per_image=None, seed=0, epochs=3)
    assert json.loads((tmp_path / "codes" / "report.json").read_text()) == report
    assert report["images_available"] == 8 and report["images_used"] == 7  # 7 distinct decodable + 1 broken
    assert report["images_skipped"] == {"undecodable (UnidentifiedImageError)": 1}
    assert report["patches"] == 7 * 256 and report["num_codes"] == 32 and report["grid"] == 16
    assert report["inertia"] < report["init_inertia"]
    assert 0 < report["reconstruction_mse"] < 0.5 * report["pixel_variance"]
    assert report["val_images"] == 1 and 0 < report["val_reconstruction_mse"]
    assert Image.open(tmp_path / "codes" / "preview.png").size == (7 * 128, 256)
    tok = load_image_codes(tmp_path / "codes")
    assert isinstance(tok, KMeansPatchCodes) and tok.num_codes == 32

    summary = encode_image_codes(src, tmp_path / "codes", tmp_path / "codes.parquet", batch_size=3)
    assert summary["images"] == 7 and summary["images_skipped"] == {"undecodable (UnidentifiedImageError)": 1}
    table = pq.read_table(tmp_path / "codes.parquet")
    assert sorted(table.column("image_sha1").to_pylist()) == sorted(image_sha1(b) for b in images)
    pre = PrecomputedCodes.from_file(tmp_path / "codes.parquet")
    assert pre.num_codes == 32 and len(pre) == 7
    for data in images:
        expected = tok.encode(middle_crop(data, 128))[0]
        assert torch.equal(pre.encode_by_key(image_sha1(data)), expected)


def test_flow_is_deterministic_and_subsamples(tmp_path, shards):
    src, _ = shards
    a = train_image_codes(src, tmp_path / "a", num_codes=16, patches_per_image=40, max_images=4, seed=5, epochs=2)
    train_image_codes(src, tmp_path / "b", num_codes=16, patches_per_image=40, max_images=4, seed=5, epochs=2)
    # the 4 images are chosen before decoding: the undecodable one may be among them, and is counted
    assert a["images_used"] + sum(a["images_skipped"].values()) == 4 and a["patches"] == a["images_used"] * 40
    assert a["images_used"] >= 3
    ta, tb = load_image_codes(tmp_path / "a"), load_image_codes(tmp_path / "b")
    assert torch.equal(ta.centroids, tb.centroids)
    assert (tmp_path / "a" / CODEBOOK_FILE).read_bytes() == (tmp_path / "b" / CODEBOOK_FILE).read_bytes()


def test_flow_errors(tmp_path, shards):
    src, _ = shards
    with pytest.raises(GalenConfigError, match="multiple of the 8-pixel"):
        train_image_codes(src, tmp_path / "x", num_codes=8, crop=100)
    with pytest.raises(GalenInputError, match="too few patches"):
        train_image_codes(src, tmp_path / "x", num_codes=64, patches_per_image=4)
    with pytest.raises(GalenInputError, match="no usable images in the test split"):
        train_image_codes(src, tmp_path / "x", num_codes=8, splits=("test",))
    PrecomputedCodes.from_mapping({_sha(0): [0] * 256}).save(tmp_path / "pre")
    with pytest.raises(GalenConfigError, match="cannot encode pixels"):
        encode_image_codes(src, tmp_path / "pre", tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()
