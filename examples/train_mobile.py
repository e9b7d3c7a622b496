"""Train the bundled mobile-style digits model and export it to ONNX.

A small MobileNetV3-like network is trained deterministically on the ``"train"`` split of scikit-learn's
8x8 digits (see :mod:`maptools.examples.digits`): depthwise-separable convolutions with ReLU6 and
HardSwish activations and a squeeze-excite block gated by a sigmoid. It complements the residual CNN of
``train_digits.py`` with the operators that make low-bit quantization hard (depthwise convolutions,
bounded activations, an activation-by-activation ``Mul``).

At opset 13 the legacy exporter writes ReLU6 as ``Clip(0, 6)`` and HardSwish as
``x * HardSigmoid(x)`` (``HardSwish`` only exists from opset 14); BatchNorm is folded into the
convolutions. Training, export, validation and the numerical check against PyTorch reuse
``train_digits.py``.

Usage::

    python examples/train_mobile.py --epochs 40 --out maptools/examples/data/digits_mobile.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import fit, run  # noqa: E402

try:
    from maptools.examples import mobile
except ImportError:  # running from a source checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from maptools.examples import mobile


NUM_CLASSES = 10


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
            activation: nn.Module | None = None) -> nn.Sequential:
    """``Conv2d`` (no bias) + ``BatchNorm2d`` + optional activation, as one ``Sequential``.

    The ``Sequential(Conv2d, BatchNorm2d, ...)`` layout is what ``train_digits.fold_batchnorm`` folds
    if the exporter ever keeps the BatchNorm.

    Args:
        in_channels: Number of input channels.
        out_channels: Number of output channels.
        kernel: Square kernel size (padding keeps the spatial size at stride 1).
        stride: Convolution stride.
        groups: Convolution groups (``in_channels`` for a depthwise convolution).
        activation: Activation module appended after the BatchNorm, or None.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if activation is not None:
        layers.append(activation)
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-excite: global average pool, 1x1 reduce + ReLU, 1x1 expand + sigmoid, channel-wise ``Mul``.

    Args:
        channels: Number of channels.
        reduced: Number of channels of the bottleneck.
    """

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: 1x1 expand, depthwise 3x3, optional squeeze-excite, 1x1 project (linear).

    A shortcut is added when the stride is 1 and the channel counts match.

    Args:
        in_channels: Number of input channels.
        expanded: Number of channels of the expanded (depthwise) stage.
        out_channels: Number of output channels.
        stride: Stride of the depthwise convolution.
        activation: Activation class of the expand and depthwise stages (``nn.ReLU6`` or ``nn.Hardswish``).
        squeeze_excite: Whether to insert a :class:`SqueezeExcite` after the depthwise stage.
    """

    def __init__(self, in_channels: int, expanded: int, out_channels: int, stride: int,
                 activation: type[nn.Module], squeeze_excite: bool) -> None:
        super().__init__()
        self.expand = conv_bn(in_channels, expanded, 1, activation=activation())
        self.depthwise = conv_bn(expanded, expanded, 3, stride=stride, groups=expanded, activation=activation())
        self.se: nn.Module = SqueezeExcite(expanded, max(8, expanded // 4)) if squeeze_excite else nn.Identity()
        self.project = conv_bn(expanded, out_channels, 1)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return x + out if self.residual else out


class DigitsMobile(nn.Module):
    """Tiny MobileNetV3-like classifier for 1x8x8 inputs.

    Stem 3x3 conv (16 ch, ReLU6), a ReLU6 inverted-residual block (16 -> 16), a stride-2 HardSwish block
    with squeeze-excite (16 -> 24), a HardSwish block with squeeze-excite and shortcut (24 -> 24), a 1x1
    head conv (HardSwish), global average pooling and a linear classifier.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16, 3, activation=nn.ReLU6())
        self.block1 = InvertedResidual(16, 32, 16, 1, nn.ReLU6, squeeze_excite=False)
        self.block2 = InvertedResidual(16, 48, 24, 2, nn.Hardswish, squeeze_excite=True)
        self.block3 = InvertedResidual(24, 72, 24, 1, nn.Hardswish, squeeze_excite=True)
        self.head = conv_bn(24, 64, 1, activation=nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.block3(self.block2(self.block1(self.stem(x)))))
        return self.fc(self.flatten(self.pool(x)))


def train(epochs: int) -> nn.Module:
    """Train :class:`DigitsMobile` on the ``"train"`` split with ``train_digits.fit`` (the same recipe).

    Args:
        epochs: Number of training epochs.

    Returns:
        The trained model (in eval mode).
    """
    return fit(DigitsMobile(), epochs)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    return run(argv, __doc__.splitlines()[0], mobile.MODEL_PATH, train)


if __name__ == "__main__":
    sys.exit(main())
