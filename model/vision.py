"""Image side of the generalist model: the timm ResNet backbone (stages 1-3) and preprocessing.

OFA embeds images with the first three stages of a ResNet (stride 16, 1024 channels) and treats
each cell of the resulting grid as one token. The module keeps torchvision/timm parameter names
(`conv1`, `bn1`, `layer1.0.conv1`, `...downsample.1`) so reference checkpoints map one to one.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from galen.model.errors import GalenInputError

BACKBONE_CHANNELS = 1024  # output channels of ResNet stage 3 (bottleneck width 256 x 4)
OFA_MEAN = (0.5, 0.5, 0.5)
OFA_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResNetStages(nn.Module):
    """conv1 -> bn1 -> relu -> maxpool -> layer1..layer3 of a timm ResNet; no stage 4, no head."""

    conv1: nn.Module
    bn1: nn.Module
    act1: nn.Module
    maxpool: nn.Module
    layer1: nn.Module
    layer2: nn.Module
    layer3: nn.Module

    def __init__(self, depths: Sequence[int], drop_path_rate: float = 0.0, freeze_batchnorm: bool = False):
        super().__init__()
        # timm 1.0 annotates `block` as an instance; it takes the block class (as timm's own models pass)
        full = ResNet(block=Bottleneck, layers=(*depths, 1), num_classes=0, global_pool="",  # type: ignore[arg-type]
                      drop_path_rate=drop_path_rate)
        self.conv1, self.bn1, self.act1, self.maxpool = full.conv1, full.bn1, full.act1, full.maxpool
        # registered with add_module in timm, so typed Tensor | Module through nn.Module.__getattr__
        self.layer1, self.layer2, self.layer3 = (cast(nn.Module, full.layer1), cast(nn.Module, full.layer2),
                                                 cast(nn.Module, full.layer3))
        self.freeze_batchnorm = freeze_batchnorm
        if freeze_batchnorm:  # the reference's --freeze-resnet (FrozenBatchNorm2d): scale and shift fixed too
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNetStages:
        super().train(mode)
        if self.freeze_batchnorm:  # ... and the running statistics are never updated
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(images))))
        return self.layer3(self.layer2(self.layer1(x)))


def check_images(images: torch.Tensor, patch_size: int, max_side: int) -> None:
    """Reject image batches the backbone cannot take, before any tensor math, saying how to fix them."""
    if not isinstance(images, torch.Tensor):
        raise GalenInputError(f"images must be a torch.Tensor of shape (batch, 3, H, W), got {type(images).__name__}; "
                              "use galen.model.vision.preprocess_images() to turn PIL images or arrays into one")
    if images.dim() != 4 or images.shape[1] != 3:
        raise GalenInputError(f"images must have shape (batch, 3, H, W), got {tuple(images.shape)}; "
                              "convert grayscale/RGBA to RGB (preprocess_images does) and add a batch dimension")
    if not images.is_floating_point():
        raise GalenInputError(f"images must be a floating-point tensor normalised to about [-1, 1], got {images.dtype}; "
                              "uint8 pixels must go through preprocess_images() (x / 255 - 0.5) / 0.5")
    h, w = images.shape[-2:]
    if h % patch_size or w % patch_size:
        raise GalenInputError(f"image size {h}x{w} is not a multiple of the {patch_size}-pixel patch; "
                              f"resize to e.g. {max(patch_size, h // patch_size * patch_size)}x"
                              f"{max(patch_size, w // patch_size * patch_size)}")
    if h > max_side or w > max_side or h < patch_size or w < patch_size:
        raise GalenInputError(f"image size {h}x{w} is outside [{patch_size}, {max_side}] pixels per side, "
                              f"the range the 2D position grid covers; resize the image")


def array_to_image(array: np.ndarray, what: str = "image") -> Image.Image:
    """A uint8 HxW, HxWx1, HxWx3 or HxWx4 array as a PIL image."""
    if array.dtype != np.uint8:
        raise GalenInputError(f"{what}: array dtype {array.dtype} is not uint8; scale it to 0..255 and "
                              "cast (DICOM pixel data goes through the dicom reader first)")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise GalenInputError(f"{what}: array shape {array.shape} is not HxW, HxWx1, HxWx3 or HxWx4")
    return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1 else array)


def preprocess_images(images: Sequence[Image.Image | np.ndarray], size: int,
                      mean: Sequence[float] = OFA_MEAN, std: Sequence[float] = OFA_STD) -> torch.Tensor:
    """PIL images or HxW[xC] uint8 arrays -> normalised (B, 3, size, size) float tensor.

    Grayscale, RGBA and palette images are converted to RGB; resizing uses bicubic like OFA.
    """
    if len(images) == 0:
        raise GalenInputError("no images given; pass at least one PIL image or array")
    out = []
    for i, img in enumerate(images):
        if isinstance(img, np.ndarray):
            img = array_to_image(img, f"image {i}")
        if not isinstance(img, Image.Image):
            raise GalenInputError(f"image {i}: expected a PIL image or uint8 array, got {type(img).__name__}")
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = img.resize((size, size), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
    x = torch.stack(out).float() / 255.0
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


# ----------------------------------------------------------------------------- decoding requests
# Images reach the model as PIL images, uint8 arrays or encoded bytes (PNG/JPEG/... or DICOM). The
# DICOM display mapping below is the one the ingest adapter applies, so a scan sent to the endpoint
# looks exactly like the same scan seen in training.

MAX_IMAGE_PIXELS = 40_000_000          # params.yaml validate.max_image_pixels: bigger is not a medical image we take
# An image file read from disk (`galen generate --image`, `galen clip embed --image`): at most this many
# bytes are read. 40M pixels of 16-bit RGB stored uncompressed (TIFF, DICOM) take 240 MB.
MAX_IMAGE_FILE_BYTES = 256 * 1024 * 1024
DICOM_PREAMBLE = b"DICM"              # bytes 128..131 of a DICOM Part 10 file

_LIBJPEG = "`pip install pylibjpeg pylibjpeg-libjpeg` (or `pip install python-gdcm`)"
_OPENJPEG = "`pip install pylibjpeg pylibjpeg-openjpeg` (or `pip install python-gdcm`)"
DECODER_HINTS = {  # transfer syntax UID -> what to install to decode it
    "1.2.840.10008.1.2.4.50": _LIBJPEG, "1.2.840.10008.1.2.4.51": _LIBJPEG, "1.2.840.10008.1.2.4.57": _LIBJPEG,
    "1.2.840.10008.1.2.4.70": _LIBJPEG,
    "1.2.840.10008.1.2.4.80": "`pip install pyjpegls` or " + _LIBJPEG,
    "1.2.840.10008.1.2.4.81": "`pip install pyjpegls` or " + _LIBJPEG,
    "1.2.840.10008.1.2.4.90": _OPENJPEG, "1.2.840.10008.1.2.4.91": _OPENJPEG,
    "1.2.840.10008.1.2.4.201": _OPENJPEG, "1.2.840.10008.1.2.4.202": _OPENJPEG, "1.2.840.10008.1.2.4.203": _OPENJPEG,
    "1.2.840.10008.1.2.5": "`pip install pylibjpeg pylibjpeg-rle`",
}


def _first(value) -> float:
    """First value of a possibly multi-valued DS element (WindowCenter "40\\400" style)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The VOI window of DICOM PS3.3 C.11.2.1.2 mapped to [0, 1] (LINEAR, LINEAR_EXACT, SIGMOID)."""
    x = x.astype(np.float64)
    function = function.upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) if width > 1 else (x > center - 0.5).astype(np.float64)
    y = np.where(x <= center - 0.5 - (width - 1) / 2, 0.0, y)
    y = np.where(x > center - 0.5 + (width - 1) / 2, 1.0, y)
    return np.clip(y, 0.0, 1.0)


def _min_max(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    return np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo)


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def display_pixels(frame: np.ndarray, ds) -> tuple[np.ndarray, dict]:
    """One decoded DICOM frame as a uint8 HxW or HxWx3 array, and how it was mapped: rescale
    slope/intercept, then the VOI window (or VOI LUT, else min-max), MONOCHROME1 inverted."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR" and frame.ndim == 2:
        rgb = apply_color_lut(frame, ds)
        bits = 16 if rgb.dtype.itemsize > 1 else 8
        return _to_uint8(rgb / float(2 ** bits - 1)), {"mapping": "palette"}
    if frame.ndim == 3:  # colour: pydicom already turned YBR_* into RGB
        if frame.dtype == np.uint8:
            return frame, {"mapping": "rgb"}
        bits = int(ds.get("BitsStored") or 8 * frame.dtype.itemsize)
        return _to_uint8(frame / float(2 ** bits - 1)), {"mapping": "rgb", "bits_stored": bits}
    values = apply_modality_lut(frame, ds)
    info: dict = {}
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None and _first(width) > 0:
        c, w = _first(center), _first(width)
        function = str(ds.get("VOILUTFunction") or "LINEAR")
        unit, info = window(values, c, w, function), {"mapping": "window", "window": [c, w, function]}
    elif "VOILUTSequence" in ds:
        unit, info = _min_max(apply_voi_lut(values, ds, index=0, prefer_lut=True)), {"mapping": "voi_lut"}
    else:
        unit, info = _min_max(values), {"mapping": "min-max"}
    if photometric == "MONOCHROME1":  # low values are bright: invert so the PNG reads like MONOCHROME2
        unit = 1.0 - unit
        info["inverted"] = True
    return _to_uint8(unit), info


def transfer_syntax(ds):
    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def decode_problem(ds, error: Exception) -> str:
    """Why pixels could not be decoded, naming the transfer syntax and the package that decodes it."""
    ts = transfer_syntax(ds)
    said = " ".join(str(error).split())[:300]
    if ts is not None and ts.is_compressed:
        hint = DECODER_HINTS.get(str(ts), "`pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` "
                                          "(or `pip install python-gdcm`)")
        return (f"cannot decode pixel data compressed as {ts.name} ({ts}): no working decoder; install one with "
                f"{hint}. pydicom said: {said}")
    name = f"{ts.name} ({ts})" if ts is not None else "unknown transfer syntax"
    return f"cannot decode pixel data ({name}): {type(error).__name__}: {said}"


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file (128-byte preamble then "DICM")."""
    return len(data) >= 132 and data[128:132] == DICOM_PREAMBLE


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if width < 1 or height < 1:
        raise GalenInputError(f"{what} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise GalenInputError(f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of "
                              f"{max_pixels:,}; downscale it before sending (the model sees it at a few hundred "
                              "pixels per side anyway)")


def decode_dicom(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """The middle frame of a DICOM file as display pixels (uint8 HxW or HxWx3), as ingest maps it."""
    import io

    try:
        import pydicom
        from pydicom.pixels import pixel_array
    except ImportError as e:  # pragma: no cover - pydicom is a dependency
        raise GalenInputError("DICOM images need pydicom 3: `pip install 'pydicom>=3'`") from e
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - any parse failure means the bytes are not usable DICOM
        raise GalenInputError(f"the DICOM file cannot be read: {type(e).__name__}: {' '.join(str(e).split())[:200]}") \
            from e
    if "PixelData" not in ds:
        raise GalenInputError(f"the DICOM file has no pixel data ({ds.get('Modality') or 'unknown modality'}; "
                              "e.g. a report or a plan); send an image")
    _check_pixels(int(ds.get("Columns") or 0), int(ds.get("Rows") or 0), max_pixels, "the DICOM image")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        frame = pixel_array(ds, index=frames // 2)
        pixels, _ = display_pixels(frame, ds)
    except Exception as e:  # noqa: BLE001 - a missing codec or broken pixel data: say which
        raise GalenInputError(decode_problem(ds, e)) from e
    return pixels


def load_image(image: Image.Image | np.ndarray | bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A request image as a PIL image: PIL images and uint8 arrays pass through; encoded bytes are
    decoded (anything Pillow reads, or DICOM). The size is checked before pixels are decoded, so a
    decompression bomb never allocates its pixels."""
    import io

    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, max_pixels, "the image")
        return image
    if isinstance(image, np.ndarray):
        if image.ndim >= 2:
            _check_pixels(int(image.shape[1]), int(image.shape[0]), max_pixels, "the image array")
        return array_to_image(image, "the image array")
    if isinstance(image, (bytearray, memoryview)):
        image = bytes(image)
    if not isinstance(image, bytes):
        raise GalenInputError(f"an image must be a PIL image, a uint8 array or encoded bytes (PNG, JPEG, DICOM), "
                              f"got {type(image).__name__}")
    if not image:
        raise GalenInputError("the image is empty (0 bytes)")
    if is_dicom(image):
        return Image.fromarray(decode_dicom(image, max_pixels))
    import warnings

    try:
        with warnings.catch_warnings():  # Pillow warns above its own limit; ours (below) is lower and says why
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(image))
    except Image.DecompressionBombError as e:
        raise GalenInputError(f"the image is over the limit of {max_pixels:,} pixels ({e}); downscale it before "
                              "sending") from e
    except Image.UnidentifiedImageError as e:
        raise GalenInputError(f"the image bytes cannot be decoded: these {len(image):,} bytes are not in an image "
                              "format Galen reads; send PNG, JPEG or DICOM") from e
    except Exception as e:  # noqa: BLE001 - Pillow's parsers raise many kinds; all mean unreadable bytes
        raise GalenInputError(f"the image bytes cannot be decoded ({type(e).__name__}: {_said(e)}); send PNG, "
                              "JPEG or DICOM") from e
    _check_pixels(img.width, img.height, max_pixels, "the image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Exception as e:  # noqa: BLE001 - a decoder failing on broken data, whatever it raises
        raise GalenInputError(f"the image bytes are truncated or corrupt ({type(e).__name__}: {_said(e)})") from e
    return img


def _said(error: Exception) -> str:
    return " ".join(str(error).split())[:200] or "no detail"


def read_image_file(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS,
                    max_bytes: int = MAX_IMAGE_FILE_BYTES) -> Image.Image:
    """An image file from disk, decoded as `load_image` decodes request bytes (size limits checked
    before the pixels are decoded); every problem is a GalenInputError naming the file."""
    path = Path(path)
    if not path.exists():
        raise GalenInputError(f"image file {path} not found")
    if not path.is_file():
        raise GalenInputError(f"image {path} is not a file; pass an image file (PNG, JPEG, DICOM, ...)")
    size = path.stat().st_size
    if size > max_bytes:
        raise GalenInputError(f"image file {path} is {size:,} bytes, over the limit of {max_bytes:,}; downscale "
                              "or compress it first")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GalenInputError(f"image file {path} cannot be read ({e.strerror or e})") from e
    try:
        return load_image(data, max_pixels)
    except GalenInputError as e:
        raise GalenInputError(f"image file {path}: {e}") from e


class ImageDecodeError(GalenInputError):
    """A request's base64 image could not be turned into file bytes; `code` names the reason
    (invalid_base64, image_too_large, invalid_image) for callers that answer with an error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def decode_base64_image(text: str, max_bytes: int | None = None, what: str = "image") -> bytes:
    """File bytes of a base64 image as requests send it (a `data:<type>;base64,` prefix and line
    breaks are fine), its size checked before decoding. The one decoder of request images: the
    predictor, the registered MLflow models and the HTTP endpoints all call it."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise ImageDecodeError("invalid_base64", f"{what} is a data: URL without base64 data "
                                   "(data:<type>;base64,<data>)")
    text = re.sub(r"\s+", "", text)
    if max_bytes is not None and len(text) * 3 // 4 > max_bytes + 2:
        raise ImageDecodeError("image_too_large", f"{what} is about {len(text) * 3 // 4:,} bytes, over the limit "
                               f"of {max_bytes:,} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageDecodeError("invalid_base64", f"{what} is not valid base64 ({e}); send the file's bytes "
                               "base64-encoded") from e
    if not data:
        raise ImageDecodeError("invalid_image", f"{what} is empty")
    return data
