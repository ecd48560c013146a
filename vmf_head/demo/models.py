"""The demo's networks: a small convolutional backbone and DINO's multi-crop wrapper.

A CNN rather than a tiny ViT: on 8x8 digits a ViT has a handful of tokens, and on two CPU cores
a few thousand convolution steps train in minutes while a ViT of comparable accuracy does not.
The backbone ends in global average pooling, so global and local crops of different sides go
through the same weights, as in DINO.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallConvNet(nn.Module):
    """Three 3x3 conv stages (the last two stride 2) with BatchNorm and GELU, then global average
    pooling. Input (B, C, H, W) with H, W >= 4; output (B, ``width * 4``) features."""

    def __init__(self, in_channels: int, width: int = 32) -> None:
        super().__init__()

        def stage(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]

        self.features = nn.Sequential(
            *stage(in_channels, width, 1),
            *stage(width, width, 1),
            *stage(width, 2 * width, 2),
            *stage(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class MultiCropNet(nn.Module):
    """Backbone + projection head applied to a list of crops, as DINO's ``MultiCropWrapper``:
    crops of the same side go through the backbone as one batch, the head sees all of them at
    once. Returns the head's output for the crops concatenated in order, (n_crops * B, K)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        feats, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(feats))
