"""Image codes for image infilling: the crop they describe, k-means, and the k-means patch codebook.

OFA/BiomedGPT pretrain with *image infilling*: the middle 128x128 of a 256x256 image is masked
and the decoder predicts that region's codes (a VQGAN with 8x8-pixel codes, 8192 of them). The
reference VQGAN is not shipped with Galen, so the quantizer is pluggable behind
`ImageCodeTokenizer`, defined here with the pixel helpers every quantizer shares (`middle_crop`,
`as_image_batch`, `patchify`):

* `KMeansPatchCodes` ("kmeans") is trained offline here: mini-batch k-means over 8x8 RGB patches.
  It is a crude but honest stand-in (a codebook of patches, no learned encoder), good enough to
  give the infilling task real, image-dependent targets, and `decode` shows what the codes keep.
* `PrecomputedCodes` ("precomputed", in galen.model.image_code_files) carries codes computed
  elsewhere by a real VQGAN, looked up by the image's SHA-1.

Codes are laid out row-major over the grid (what a VQGAN's flattened h*w indices are), and
`token_ids` maps them into the unified vocabulary, which always reserves its own `num_codes`
slots (8192 by default) however many a quantizer actually uses. Everything is saved as
`image_codes.json` plus a safetensors file; nothing is pickled. `load_image_codes`
(galen.model.image_code_files) rebuilds a saved folder of either kind.
"""

from __future__ import annotations

import io
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from PIL import Image

from galen.model.errors import GalenConfigError, GalenInputError

if TYPE_CHECKING:
    from galen.model.vocabulary import GalenTokenizer

IMAGE_CODES_JSON = "image_codes.json"
CODEBOOK_FILE = "codebook.safetensors"
FORMAT_VERSION = 1
PATCH_SIZE = 8
DEFAULT_CODE_IMAGE_SIZE = 128
DEFAULT_GRID = DEFAULT_CODE_IMAGE_SIZE // PATCH_SIZE
DEFAULT_NUM_CODES = 8192

TRAIN_HINT = "train one with galen.flows.codebook.train_image_codes() or copy the folder from the run that made it"
# rows of a distance matrix computed at once: bounds memory at about 64 MB of float32
_DIST_ELEMENTS = 1 << 24

ImageInput = torch.Tensor | np.ndarray | Image.Image | Sequence[np.ndarray | Image.Image]


# ----------------------------------------------------------------------------- pixels


def middle_crop(image: Image.Image | bytes, size: int = DEFAULT_CODE_IMAGE_SIZE) -> np.ndarray:
    """The infilling target region as uint8 (size, size, 3): resize to 2*size square, keep the middle.

    OFA resizes every pretraining image to 256x256 (bicubic) and masks [64:192] on both axes; the
    codes describe exactly that region, so training and code extraction must crop the same way.
    """
    if size <= 0 or size % PATCH_SIZE:
        raise GalenInputError(f"crop size {size} must be a positive multiple of the {PATCH_SIZE}-pixel patch")
    if isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(image)) as img:
            img.load()
            return middle_crop(img, size)
    if not isinstance(image, Image.Image):
        raise GalenInputError(f"middle_crop needs a PIL image or encoded image bytes, got {type(image).__name__}")
    img = image.convert("RGB").resize((2 * size, 2 * size), Image.Resampling.BICUBIC)
    lo = size // 2
    return np.asarray(img.crop((lo, lo, lo + size, lo + size)), dtype=np.uint8).copy()


def as_image_batch(images: ImageInput, size: int, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """Any accepted image input -> float (B, 3, size, size) in [-1, 1], or a GalenInputError.

    Torch tensors are channel-first (B,3,H,W)/(3,H,W), float in [-1, 1] or uint8; numpy arrays
    are channel-last uint8 (H,W)/(H,W,3)/(B,H,W,3) as `np.asarray(pil_image)` gives; PIL images
    and lists of arrays/PIL images are stacked. Nothing is resized silently: the codes describe a
    fixed crop, so a wrong size is an error that points at `middle_crop`.
    """
    if isinstance(images, torch.Tensor):
        x = images
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise GalenInputError(f"image tensor of shape {tuple(images.shape)} is not (B, 3, H, W) or (3, H, W); "
                                  "torch tensors are channel-first (numpy arrays are channel-last)")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        elif x.is_floating_point():
            x = x.float()
            if not torch.isfinite(x).all():
                raise GalenInputError("image tensor has NaN or infinite values")
            lo, hi = float(x.min()), float(x.max())
            if lo < -1.001 or hi > 1.001:
                raise GalenInputError(f"float images must lie in [-1, 1] (got values in [{lo:.3g}, {hi:.3g}]); "
                                      "scale uint8 pixels with x / 127.5 - 1 or pass the uint8 tensor")
        else:
            raise GalenInputError(f"image tensor dtype {x.dtype} is neither floating point in [-1, 1] nor uint8")
    else:
        items: Sequence[Any]
        if isinstance(images, np.ndarray) and images.ndim == 4:
            items = list(images)
        elif isinstance(images, (np.ndarray, Image.Image)):
            items = [images]
        elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
            items = images
        else:
            raise GalenInputError(f"expected images as a tensor, uint8 array, PIL image or a list of them, "
                                  f"got {type(images).__name__}")
        if not items:
            raise GalenInputError("no images given; pass at least one")
        arrays = [_hwc_uint8(item, i) for i, item in enumerate(items)]
        for a in arrays:  # every item must already be the code size, so they stack
            _check_size(a.shape[0], a.shape[1], size, patch_size)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    _check_size(int(x.shape[2]), int(x.shape[3]), size, patch_size)
    return x.contiguous()


def _hwc_uint8(item: Any, i: int) -> np.ndarray:
    if isinstance(item, Image.Image):
        return np.asarray(item.convert("RGB"), dtype=np.uint8)
    if not isinstance(item, np.ndarray):
        raise GalenInputError(f"image {i}: expected a uint8 array or PIL image, got {type(item).__name__}")
    if item.dtype != np.uint8:
        raise GalenInputError(f"image {i}: numpy arrays must be uint8 0..255 (got {item.dtype}); for float pixels "
                              "pass a (B, 3, H, W) torch tensor scaled to [-1, 1]")
    if item.ndim == 3 and item.shape[2] == 1:
        item = item[..., 0]
    if item.ndim == 2:
        item = np.repeat(item[..., None], 3, axis=2)
    if item.ndim != 3 or item.shape[2] != 3:
        raise GalenInputError(f"image {i}: array shape {item.shape} is not HxW, HxWx1 or HxWx3 (channel-last)")
    return item


def _check_size(h: int, w: int, size: int, patch_size: int) -> None:
    if h % patch_size or w % patch_size:
        raise GalenInputError(f"image size {h}x{w} is not a multiple of the {patch_size}-pixel code patch; "
                              f"image codes cover {size}x{size} crops: take them with middle_crop()")
    if (h, w) != (size, size):
        raise GalenInputError(f"image size {h}x{w} is not the code image size {size}x{size}; "
                              f"take the infilling region with middle_crop(image, {size})")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), the inverse of the uint8 -> float scaling."""
    return ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def patchify(x: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p, W/p, C*p*p): one vector per patch, channel-major inside the patch."""
    b, c, h, w = x.shape
    gh, gw = h // patch_size, w // patch_size
    return (x.reshape(b, c, gh, patch_size, gw, patch_size)
            .permute(0, 2, 4, 1, 3, 5).reshape(b, gh, gw, c * patch_size * patch_size))


def unpatchify(p: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """Inverse of `patchify`: (B, gh, gw, C*p*p) -> (B, C, gh*p, gw*p)."""
    b, gh, gw, d = p.shape
    c = d // (patch_size * patch_size)
    return (p.reshape(b, gh, gw, c, patch_size, patch_size)
            .permute(0, 3, 1, 4, 2, 5).reshape(b, c, gh * patch_size, gw * patch_size))


# ----------------------------------------------------------------------------- k-means


@dataclass
class KMeansResult:
    """What `kmeans` found; inertias are sums of squared distances in the clustered space."""

    centroids: torch.Tensor          # (k, d) float32
    assignments: torch.Tensor        # (n,) int64, nearest centroid of every sample (final pass)
    counts: torch.Tensor             # (k,) int64 samples per centroid in the final pass
    inertia: float                   # with the final centroids
    init_inertia: float              # with the initial centroids
    epoch_inertia: list[float] = field(default_factory=list)  # online estimate during each epoch


def _assign(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (first on ties) and squared distance of every row, in bounded memory."""
    c_sq = (c * c).sum(1)
    chunk = max(1, _DIST_ELEMENTS // max(1, c.shape[0]))
    labels, dists = [], []
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk]
        d = c_sq[None, :] - 2.0 * (xb @ c.T)
        a = d.argmin(1)
        labels.append(a)
        dists.append(((xb - c[a]) ** 2).sum(1))  # direct, free of the expansion's cancellation
    return torch.cat(labels), torch.cat(dists)


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii): each new centre drawn with probability ~ D(x)^2.

    Distances use a float64 mat-vec (no n x d temporaries per step; duplicates of a chosen
    centre get distance ~0, so they are practically never drawn again).
    """
    n = x.shape[0]
    x64 = x.double()
    sq = (x64 * x64).sum(1)

    def dist(i: int) -> torch.Tensor:
        return (sq - 2.0 * (x64 @ x64[i]) + sq[i]).clamp_min(0.0)

    first = int(torch.randint(n, (1,), generator=gen))
    centres = [first]
    d2 = dist(first)
    for _ in range(1, k):
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        cum = torch.cumsum(d2, 0)
        total = float(cum[-1])
        if total <= 0.0:  # every sample coincides with a centre: fewer distinct samples than k
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            target = torch.tensor([u * total], dtype=torch.float64, device=cum.device)
            idx = min(int(torch.searchsorted(cum, target, right=True)), n - 1)
        centres.append(idx)
        d2 = torch.minimum(d2, dist(idx))
    return x[torch.tensor(centres, device=x.device)].clone()


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    epochs: int = 10,
    batch_size: int = 4096,
    init: str = "kmeans++",
    init_sample_size: int | None = None,
    lloyd_steps: int = 1,
) -> KMeansResult:
    """Mini-batch k-means (Sculley 2010) with per-centre 1/count learning rates, then full Lloyd steps.

    Every random draw comes from one seeded CPU generator, so runs on CPU are bit-identical; on
    CUDA the float64 scatter-adds may differ in the last bits between runs.
    Centres that win no sample in an epoch are re-seeded on random samples so codes do not die.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise GalenInputError("kmeans needs a 2D floating-point tensor of samples (n, d)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise GalenConfigError(f"number of clusters must be a positive integer, got {k!r}")
    n = x.shape[0]
    if n < k:
        raise GalenInputError(f"too few samples to train {k} clusters: got {n} patches; use more images "
                              f"(or more patches per image) or fewer codes")
    if init not in ("kmeans++", "random"):
        raise GalenConfigError(f"unknown k-means init {init!r}; use 'kmeans++' or 'random'")
    if epochs < 0 or lloyd_steps < 0 or batch_size < 1:
        raise GalenConfigError("epochs and lloyd_steps must be >= 0 and batch_size >= 1")
    x = x.float()
    gen = torch.Generator().manual_seed(int(seed))
    m = min(n, init_sample_size or max(20_000, 4 * k))  # seeding on a sample, as sklearn does
    cand = x if m == n else x[torch.randperm(n, generator=gen)[:m].to(x.device)]
    if init == "kmeans++":
        c = _kmeans_pp(cand, k, gen)
    else:
        c = cand[torch.randperm(cand.shape[0], generator=gen)[:k].to(x.device)].clone()
    _, d = _assign(x, c)
    init_inertia = float(d.double().sum())

    counts = torch.zeros(k, dtype=torch.float64, device=x.device)
    epoch_inertia: list[float] = []
    for epoch in range(epochs):
        won = torch.zeros(k, dtype=torch.bool, device=x.device)
        total = 0.0
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            xb = x[idx.to(x.device)]
            a, db = _assign(xb, c)
            total += float(db.double().sum())
            nb = torch.bincount(a, minlength=k).double()
            sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, a, xb.double())
            counts += nb
            hit = nb > 0
            won |= hit
            step = (sums[hit] - nb[hit, None] * c[hit].double()) / counts[hit, None]
            c[hit] = (c[hit].double() + step).float()
        epoch_inertia.append(total)
        dead = (~won).nonzero()[:, 0]
        if len(dead) and epoch < epochs - 1:
            pick = torch.randint(n, (len(dead),), generator=gen).to(x.device)
            c[dead] = x[pick]
            counts[dead] = 0.0

    for _ in range(lloyd_steps):
        a, _ = _assign(x, c)
        nb = torch.bincount(a, minlength=k)
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, a, x.double())
        hit = nb > 0
        c[hit] = (sums[hit] / nb[hit, None].double()).float()
    a, d = _assign(x, c)
    return KMeansResult(centroids=c, assignments=a, counts=torch.bincount(a, minlength=k),
                        inertia=float(d.double().sum()), init_inertia=init_inertia, epoch_inertia=epoch_inertia)


# ----------------------------------------------------------------------------- interface


class ImageCodeTokenizer(ABC):
    """A quantizer from a code_image_size crop to a (grid, grid) LongTensor of codes < num_codes.

    Implementations register in image_code_files.IMAGE_CODE_KINDS under `kind`;
    `ImageCodeTokenizer.load(dir)` reads `image_codes.json` and rebuilds whichever kind saved the folder.
    """

    kind: ClassVar[str]
    num_codes: int
    grid: int
    patch_size: int = PATCH_SIZE

    @property
    def image_size(self) -> int:
        """Side of the square crop the codes describe (grid * patch_size, 128 for OFA)."""
        return self.grid * self.patch_size

    @abstractmethod
    def encode(self, images: ImageInput) -> torch.Tensor:
        """Images of image_size x image_size -> LongTensor (B, grid, grid)."""

    @abstractmethod
    def _save_files(self, directory: Path) -> tuple[list[str], dict[str, Any]]:
        """Write the kind's own files; return their names and extra JSON fields."""

    @classmethod
    @abstractmethod
    def _from_files(cls, directory: Path, meta: dict[str, Any]) -> ImageCodeTokenizer:
        """Rebuild from the files `_save_files` wrote (names and fields are in `meta`)."""

    def save(self, directory: str | Path) -> None:
        """Write `image_codes.json` and the kind's safetensors file into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files, extra = self._save_files(directory)
        meta = {"format_version": FORMAT_VERSION, "kind": self.kind, "num_codes": self.num_codes,
                "grid": self.grid, "patch_size": self.patch_size, "image_size": self.image_size,
                "files": files, **extra}
        (directory / IMAGE_CODES_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> ImageCodeTokenizer:
        """Rebuild a saved image tokenizer; on a subclass, also check the folder holds that kind."""
        # The kinds registry sits beside the last kind, in image_code_files, which imports this module.
        from galen.model.image_code_files import load_image_codes

        tok = load_image_codes(directory)
        if cls is not ImageCodeTokenizer and not isinstance(tok, cls):
            raise GalenConfigError(f"{directory} holds a {tok.kind!r} image tokenizer, not {cls.kind!r}; "
                                   f"load it with ImageCodeTokenizer.load()")
        return tok

    def token_ids(self, codes: torch.Tensor | Sequence[int], tokenizer: GalenTokenizer) -> list[int]:
        """Row-major codes of one image -> ids in the unified vocabulary (`tokenizer.code_tokens`)."""
        if tokenizer.num_codes < self.num_codes:
            raise GalenConfigError(f"this {self.kind} image tokenizer has {self.num_codes} codes but the text "
                                   f"tokenizer reserves only {tokenizer.num_codes} code ids; build the "
                                   f"GalenTokenizer with num_codes >= {self.num_codes}")
        flat = torch.as_tensor(codes).reshape(-1)
        if flat.numel() != self.grid * self.grid:
            raise GalenInputError(f"one image has {self.grid}x{self.grid} = {self.grid ** 2} codes, got {flat.numel()}")
        return tokenizer.code_tokens(flat.tolist())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_codes={self.num_codes}, grid={self.grid}, patch_size={self.patch_size})"


def check_grid(grid: Any, patch_size: Any) -> None:
    for name, v in (("grid", grid), ("patch_size", patch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise GalenConfigError(f"{name} must be a positive integer, got {v!r}")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a kind's safetensors file, or an error that says how to get the file."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise GalenConfigError(f"image tokenizer file {path} is missing: {TRAIN_HINT}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for corrupt headers
        raise GalenConfigError(f"{path} is not a readable safetensors file ({exc}): {TRAIN_HINT}") from exc


class KMeansPatchCodes(ImageCodeTokenizer):
    """Codes = nearest k-means centroid of each 8x8 RGB patch; decode pastes centroid patches back.

    Patches are clustered in a feature space: optionally standardised per dimension (training
    mean/std) and optionally randomly projected (fixed Gaussian matrix) to fewer dimensions, which
    makes 8192-way nearest-centroid search cheaper. `patch_centroids` are the pixel-space means of
    each cluster's training patches, so `decode` is the best reconstruction the partition allows.
    """

    kind: ClassVar[str] = "kmeans"

    def __init__(
        self,
        centroids: torch.Tensor,
        patch_centroids: torch.Tensor,
        *,
        grid: int = DEFAULT_GRID,
        patch_size: int = PATCH_SIZE,
        feature_mean: torch.Tensor | None = None,
        feature_std: torch.Tensor | None = None,
        projection: torch.Tensor | None = None,
        cluster_sizes: torch.Tensor | None = None,
        stats: dict[str, Any] | None = None,
    ) -> None:
        check_grid(grid, patch_size)
        dim = 3 * patch_size * patch_size
        centroids, patch_centroids = centroids.detach().float(), patch_centroids.detach().float()
        if patch_centroids.ndim != 2 or patch_centroids.shape[1] != dim or patch_centroids.shape[0] < 1:
            raise GalenConfigError(f"patch_centroids must be (num_codes, 3*{patch_size}*{patch_size}={dim}), "
                                   f"got {tuple(patch_centroids.shape)}")
        k = patch_centroids.shape[0]
        feat_dim = dim if projection is None else projection.shape[-1]
        if projection is not None and (projection.ndim != 2 or projection.shape[0] != dim):
            raise GalenConfigError(f"projection must be ({dim}, d), got {tuple(projection.shape)}")
        if tuple(centroids.shape) != (k, feat_dim):
            raise GalenConfigError(f"centroids must be ({k}, {feat_dim}) to match patch_centroids and the "
                                   f"projection, got {tuple(centroids.shape)}")
        if (feature_mean is None) != (feature_std is None):
            raise GalenConfigError("feature_mean and feature_std come together (or neither)")
        if feature_mean is not None and feature_std is not None and (  # both or neither (checked above)
                feature_mean.shape != (dim,) or feature_std.shape != (dim,) or bool((feature_std <= 0).any())):
            raise GalenConfigError(f"feature_mean/feature_std must be ({dim},) with positive std")
        for name, t in (("centroids", centroids), ("patch_centroids", patch_centroids)):
            if not torch.isfinite(t).all():
                raise GalenConfigError(f"{name} has NaN or infinite values; the codebook is corrupt, retrain it")
        self.centroids, self.patch_centroids = centroids, patch_centroids
        self.feature_mean = None if feature_mean is None else feature_mean.detach().float()
        self.feature_std = None if feature_std is None else feature_std.detach().float()
        self.projection = None if projection is None else projection.detach().float()
        self.cluster_sizes = None if cluster_sizes is None else cluster_sizes.detach().long()
        self.num_codes, self.grid, self.patch_size = k, grid, patch_size
        self.stats: dict[str, Any] = dict(stats or {})

    @classmethod
    def from_patch_centroids(cls, patch_centroids: torch.Tensor, grid: int = DEFAULT_GRID,
                             patch_size: int = PATCH_SIZE) -> KMeansPatchCodes:
        """A codebook of given pixel patches (in [-1, 1]), clustered in plain pixel space."""
        return cls(patch_centroids.clone(), patch_centroids, grid=grid, patch_size=patch_size)

    @classmethod
    def fit(
        cls,
        patches: torch.Tensor,
        num_codes: int = DEFAULT_NUM_CODES,
        *,
        grid: int = DEFAULT_GRID,
        patch_size: int = PATCH_SIZE,
        normalize: bool = True,
        projection_dim: int | None = None,
        seed: int = 0,
        epochs: int = 10,
        batch_size: int = 4096,
        init: str = "kmeans++",
        lloyd_steps: int = 1,
        device: str | torch.device = "cpu",
    ) -> KMeansPatchCodes:
        """Train on patch vectors (N, 3*p*p) in [-1, 1] (from `patchify`); deterministic by seed."""
        check_grid(grid, patch_size)
        dim = 3 * patch_size * patch_size
        if not isinstance(patches, torch.Tensor) or patches.ndim != 2 or patches.shape[1] != dim:
            raise GalenInputError(f"patches must be a (N, {dim}) tensor of {patch_size}x{patch_size} RGB patches, "
                                  f"got {getattr(patches, 'shape', type(patches).__name__)}")
        if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
            raise GalenConfigError(f"num_codes must be a positive integer, got {num_codes!r}")
        if patches.shape[0] < num_codes:
            raise GalenInputError(f"too few patches to train {num_codes} codes: got {patches.shape[0]}; "
                                  "use more images or patches per image, or fewer codes")
        if projection_dim is not None and not (isinstance(projection_dim, int) and 1 <= projection_dim):
            raise GalenConfigError(f"projection_dim must be a positive integer or None, got {projection_dim!r}")
        x = patches.detach().to(device=device, dtype=torch.float32)
        mean = std = proj = None
        if normalize:
            mean = x.mean(0)
            std = x.std(0, unbiased=False).clamp_min(1e-3)
        if projection_dim is not None:
            gen = torch.Generator().manual_seed(int(seed) + 7919)  # independent of the k-means draws
            proj = (torch.randn(dim, projection_dim, generator=gen) / math.sqrt(projection_dim)).to(x.device)
        feats = _features(x, mean, std, proj)
        res = kmeans(feats, num_codes, seed=seed, epochs=epochs, batch_size=batch_size, init=init,
                     lloyd_steps=lloyd_steps)
        sums = torch.zeros(num_codes, dim, dtype=torch.float64, device=x.device).index_add_(0, res.assignments,
                                                                                            x.double())
        hit = res.counts > 0
        pix = torch.zeros(num_codes, dim, dtype=torch.float32, device=x.device)
        pix[hit] = (sums[hit] / res.counts[hit, None].double()).float()
        empty = (~hit).nonzero()[:, 0]
        if len(empty):  # a code no training patch chose: show the training patch nearest its centroid
            nearest, _ = _assign(res.centroids[empty], feats)
            pix[empty] = x[nearest]
        stats = {"num_patches": int(x.shape[0]), "init_inertia": res.init_inertia, "inertia": res.inertia,
                 "epoch_inertia": res.epoch_inertia, "codes_used": int(hit.sum()), "seed": int(seed),
                 "epochs": epochs, "batch_size": batch_size, "init": init, "lloyd_steps": lloyd_steps}
        return cls(res.centroids.cpu(), pix.cpu(), grid=grid, patch_size=patch_size,
                   feature_mean=None if mean is None else mean.cpu(), feature_std=None if std is None else std.cpu(),
                   projection=None if proj is None else proj.cpu(), cluster_sizes=res.counts.cpu(), stats=stats)

    @classmethod
    def fit_images(cls, images: ImageInput, num_codes: int = DEFAULT_NUM_CODES, *, grid: int = DEFAULT_GRID,
                   patch_size: int = PATCH_SIZE, **kwargs: Any) -> KMeansPatchCodes:
        """Train on every patch of whole code-size images (see `fit` for the options)."""
        x = as_image_batch(images, grid * patch_size, patch_size)
        return cls.fit(patchify(x, patch_size).reshape(-1, 3 * patch_size * patch_size), num_codes,
                       grid=grid, patch_size=patch_size, **kwargs)

    def to(self, device: str | torch.device) -> KMeansPatchCodes:
        """Move the codebook (e.g. to the GPU for fast encoding); returns self."""
        for name in ("centroids", "patch_centroids", "feature_mean", "feature_std", "projection"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    def encode(self, images: ImageInput) -> torch.Tensor:
        """Nearest centroid of every patch: LongTensor (B, grid, grid) on the codebook's device."""
        x = as_image_batch(images, self.image_size, self.patch_size).to(self.centroids.device)
        p = patchify(x, self.patch_size)
        b = p.shape[0]
        feats = _features(p.reshape(-1, p.shape[-1]), self.feature_mean, self.feature_std, self.projection)
        labels, _ = _assign(feats, self.centroids)
        return labels.reshape(b, self.grid, self.grid)

    def decode_float(self, codes: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        """Codes (B, grid, grid) or (grid, grid) -> float (B, 3, H, W) in [-1, 1] of centroid patches."""
        c = self._check_codes(codes)
        p = self.patch_centroids[c.to(self.patch_centroids.device)]
        return unpatchify(p, self.patch_size)

    def decode(self, codes: torch.Tensor | Sequence[Any]) -> np.ndarray:
        """Codes -> uint8 image(s), (H, W, 3) for one grid or (B, H, W, 3), to look at or save as PNG."""
        single = torch.as_tensor(codes).ndim == 2
        out = to_uint8(self.decode_float(codes))
        return out[0] if single else out

    def _check_codes(self, codes: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        c = torch.as_tensor(codes)
        if c.is_floating_point() or c.dtype == torch.bool:
            raise GalenInputError(f"codes must be integers, got dtype {c.dtype}")
        if c.ndim == 2:
            c = c.unsqueeze(0)
        if c.ndim != 3 or tuple(c.shape[1:]) != (self.grid, self.grid):
            raise GalenInputError(f"codes must be (B, {self.grid}, {self.grid}) or ({self.grid}, {self.grid}), "
                                  f"got {tuple(torch.as_tensor(codes).shape)}")
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.num_codes):
            raise GalenInputError(f"codes outside 0..{self.num_codes - 1} (got {int(c.min())}..{int(c.max())}); "
                                  "they were made by a different image tokenizer")
        return c.long()

    def _save_files(self, directory: Path) -> tuple[list[str], dict[str, Any]]:
        from safetensors.torch import save_file

        tensors = {"centroids": self.centroids, "patch_centroids": self.patch_centroids}
        for name in ("feature_mean", "feature_std", "projection", "cluster_sizes"):
            t = getattr(self, name)
            if t is not None:
                tensors[name] = t
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / CODEBOOK_FILE))
        extra = {"normalize": self.feature_mean is not None,
                 "projection_dim": None if self.projection is None else int(self.projection.shape[1]),
                 "stats": self.stats}
        return [CODEBOOK_FILE], extra

    @classmethod
    def _from_files(cls, directory: Path, meta: dict[str, Any]) -> KMeansPatchCodes:
        t = load_tensors(directory / meta["files"][0])
        for name in ("centroids", "patch_centroids"):
            if name not in t:
                raise GalenConfigError(f"{directory / meta['files'][0]} has no {name!r} tensor; it is not a "
                                       f"k-means codebook: {TRAIN_HINT}")
        tok = cls(t["centroids"], t["patch_centroids"], grid=meta["grid"], patch_size=meta["patch_size"],
                  feature_mean=t.get("feature_mean"), feature_std=t.get("feature_std"),
                  projection=t.get("projection"), cluster_sizes=t.get("cluster_sizes"), stats=meta.get("stats"))
        if tok.num_codes != meta["num_codes"]:
            raise GalenConfigError(f"{directory / IMAGE_CODES_JSON} says num_codes={meta['num_codes']} but the "
                                   f"codebook has {tok.num_codes}; the files are mixed from different runs")
        return tok


def _features(x: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None,
              proj: torch.Tensor | None) -> torch.Tensor:
    if mean is not None and std is not None:
        x = (x - mean) / std
    return x if proj is None else x @ proj


def reconstruction_error(tokenizer: KMeansPatchCodes, images: ImageInput) -> float:
    """Mean squared pixel error of decode(encode(images)) in [-1, 1] units (PSNR = 10 log10(4 / mse))."""
    x = as_image_batch(images, tokenizer.image_size, tokenizer.patch_size)
    y = tokenizer.decode_float(tokenizer.encode(x)).cpu()
    return float(((y - x) ** 2).mean())
