"""Image side of the generalist model: the timm ResNet backbone (stages 1-3) and preprocessing.

OFA embeds images with the first three stages of a ResNet (stride 16, 1024 channels) and treats
each cell of the resulting grid as one token. The module keeps torchvision/timm parameter names
(`conv1`, `bn1`, `layer1.0.conv1`, `...downsample.1`) so reference checkpoints map one to one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from model.errors import GalenInputError

BACKBONE_CHANNELS = 1024  # output channels of ResNet stage 3 (bottleneck width 256 x 4)
OFA_MEAN = (0.5, 0.5, 0.5)
OFA_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResNetStages(nn.Module):
    """conv1 -> bn1 -> relu -> maxpool -> layer1..layer3 of a timm ResNet; no stage 4, no head."""

    def __init__(self, depths: Sequence[int], drop_path_rate: float = 0.0, freeze_batchnorm: bool = False):
        super().__init__()
        full = ResNet(block=Bottleneck, layers=[*depths, 1], num_classes=0, global_pool="",
                      drop_path_rate=drop_path_rate)
        self.conv1, self.bn1, self.act1, self.maxpool = full.conv1, full.bn1, full.act1, full.maxpool
        self.layer1, self.layer2, self.layer3 = full.layer1, full.layer2, full.layer3
        self.freeze_batchnorm = freeze_batchnorm

    def train(self, mode: bool = True) -> "ResNetStages":
        super().train(mode)
        if self.freeze_batchnorm:  # reference fine-tuning option: BatchNorm statistics stay fixed
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
                              "use model.vision.preprocess_images() to turn PIL images or arrays into one")
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
            if img.dtype != np.uint8:
                raise GalenInputError(f"image {i}: array dtype {img.dtype} is not uint8; scale it to 0..255 and "
                                      "cast (DICOM pixel data goes through the dicom reader first)")
            if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
                raise GalenInputError(f"image {i}: array shape {img.shape} is not HxW, HxWx1, HxWx3 or HxWx4")
            img = Image.fromarray(img.squeeze(-1) if img.ndim == 3 and img.shape[2] == 1 else img)
        if not isinstance(img, Image.Image):
            raise GalenInputError(f"image {i}: expected a PIL image or uint8 array, got {type(img).__name__}")
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = img.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
    x = torch.stack(out).float() / 255.0
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s
