"""Plain PyTorch definitions of the three MTCNN stages (P-Net, R-Net, O-Net).

The layer names and shapes follow the state dicts shipped as ``pnet.pt``, ``rnet.pt`` and ``onet.pt`` in the
``facenet-pytorch`` wheel, so ``load_state_dict(strict=True)`` succeeds. The modules are written for ONNX export:
every activation is an ``nn.PReLU`` (exported as ``PRelu``; the legacy exporter gives a 4-D feature map's slope the
shape ``[C, 1, 1]``) and each network returns its face probability first, then its box regression.

The dense layers of R-Net and O-Net were trained on feature maps stored as (N, W, H, C): the maps are permuted to
that order before flattening, which is what makes the pretrained weights give correct answers.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PNet", "RNet", "ONet"]


def _conv_prelu(cin: int, cout: int, k: int) -> tuple[nn.Conv2d, nn.PReLU]:
    """A convolution (stride 1, no padding) and the per-channel PReLU that follows it."""
    return nn.Conv2d(cin, cout, kernel_size=k), nn.PReLU(cout)


class PNet(nn.Module):
    """Proposal network: fully convolutional, 12x12 receptive field, stride 2.

    Input: (N, 3, H, W) RGB scaled as ``(x - 127.5) / 128``. Outputs: ``prob`` (N, 2, h, w) softmax over
    (background, face) and ``reg`` (N, 4, h, w) box offsets, with ``h = ceil((H - 2) / 2) - 4``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _conv_prelu(3, 10, 3)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _conv_prelu(10, 16, 3)
        self.conv3, self.prelu3 = _conv_prelu(16, 32, 3)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (face probability map, box regression map)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return torch.softmax(self.conv4_1(x), dim=1), self.conv4_2(x)


class RNet(nn.Module):
    """Refinement network on 24x24 candidate crops.

    Outputs: ``prob`` (N, 2) softmax over (background, face) and ``reg`` (N, 4) box offsets.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _conv_prelu(3, 28, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _conv_prelu(28, 48, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = _conv_prelu(48, 64, 2)
        self.dense4 = nn.Linear(64 * 3 * 3, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (face probability, box regression)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = torch.flatten(x.permute(0, 3, 2, 1), 1)
        x = self.prelu4(self.dense4(x))
        return torch.softmax(self.dense5_1(x), dim=1), self.dense5_2(x)


class ONet(nn.Module):
    """Output network on 48x48 candidate crops.

    Outputs: ``prob`` (N, 2), ``reg`` (N, 4) box offsets and ``landmarks`` (N, 10): five x then five y, relative
    to the crop.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _conv_prelu(3, 32, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _conv_prelu(32, 64, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = _conv_prelu(64, 64, 3)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = _conv_prelu(64, 128, 2)
        self.dense5 = nn.Linear(128 * 3 * 3, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (face probability, box regression, landmarks)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = torch.flatten(x.permute(0, 3, 2, 1), 1)
        x = self.prelu5(self.dense5(x))
        return torch.softmax(self.dense6_1(x), dim=1), self.dense6_2(x), self.dense6_3(x)
