"""Observation encoders for the diffusion policy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RgbEncoder(nn.Module):
    """Small ResNet-style CNN with GroupNorm and spatial-softmax keypoints (as Diffusion Policy's
    ResNet-18 head, scaled down for CPU): images (N, 3, H, W) uint8 or float in [0, 1] -> (N, out_dim).

    Training applies a random crop of ``crop_size`` (augmentation), evaluation a centre crop.
    """

    def __init__(self, image_size: int = 128, crop_size: int = 116, channels: tuple[int, ...] = (32, 64, 128),
                 num_keypoints: int = 32):
        super().__init__()
        self.image_size, self.crop_size = image_size, crop_size
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.backbone = nn.Sequential(*layers)
        self.keypoints = nn.Conv2d(c_in, num_keypoints, 1)
        self.out_dim = 2 * num_keypoints

    def crop(self, images: Tensor) -> Tensor:
        H, W = images.shape[-2:]
        c = self.crop_size
        if self.training:
            top = int(torch.randint(0, H - c + 1, ()))
            left = int(torch.randint(0, W - c + 1, ()))
        else:
            top, left = (H - c) // 2, (W - c) // 2
        return images[..., top:top + c, left:left + c]

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        if images.shape[-1] == 3 and images.shape[1] != 3:  # accept (N, H, W, 3)
            images = images.permute(0, 3, 1, 2)
        x = self.backbone(self.crop(images) * 2 - 1)
        heat = self.keypoints(x)  # (N, K, h, w) -> spatial softmax -> expected (x, y) per keypoint
        N, K, h, w = heat.shape
        attn = F.softmax(heat.flatten(2), dim=-1).view(N, K, h, w)
        ys = torch.linspace(-1, 1, h, device=x.device)
        xs = torch.linspace(-1, 1, w, device=x.device)
        kx = (attn.sum(2) * xs).sum(-1)
        ky = (attn.sum(3) * ys).sum(-1)
        return torch.cat([kx, ky], dim=-1)
