"""Train the bundled digits example model and export it to ONNX.

A small residual CNN is trained deterministically on the ``"train"`` split of scikit-learn's 8x8 digits
(see :mod:`maptools.examples.digits`) and exported with the legacy TorchScript-based ONNX exporter, which
folds every BatchNorm into the preceding convolution. The exported model is checked with
``onnx.checker`` and its FP32 top-1 accuracy on the ``"test"`` split is measured with onnxruntime.

Usage::

    python examples/train_digits.py --epochs 40 --out maptools/examples/data/digits_resnet.onnx
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

try:
    from maptools.examples import digits
except ImportError:  # running from a source checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from maptools.examples import digits

logger = logging.getLogger("train_digits")

NUM_CLASSES = 10
BATCH_SIZE = 64
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 1e-4
SEED = 0


class BasicBlock(nn.Module):
    """Residual block ``conv-bn-relu-conv-bn`` plus shortcut, followed by ReLU.

    Args:
        in_channels: Number of input channels.
        out_channels: Number of output channels.
        stride: Stride of the first convolution; if it is not 1 or the channel count changes, the shortcut
            is a 1x1 convolution with BatchNorm.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Tiny ResNet for 1x8x8 inputs: stem, 16-ch block, stride-2 block to 32 ch, 32-ch block, head."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = BasicBlock(16, 16)
        self.block2 = BasicBlock(16, 32, stride=2)
        self.block3 = BasicBlock(32, 32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with the background value.

    Args:
        images: Batch of shape ``(N, C, H, W)`` normalised to ``[-1, 1]`` (background is ``-1``).
        generator: Random generator used for the shifts.
        max_shift: Maximum absolute shift in pixels.

    Returns:
        The shifted batch, same shape as ``images``.
    """
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack(
        [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())]
    )


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the top-1 accuracy (percent) of ``model`` in eval mode."""
    model.eval()
    with torch.no_grad():
        predictions = model(images).argmax(dim=1)
    return 100.0 * (predictions == labels).float().mean().item()


def train(epochs: int) -> nn.Module:
    """Train :class:`DigitsResNet` on the ``"train"`` split (see :func:`fit`).

    Args:
        epochs: Number of training epochs.

    Returns:
        The trained model (in eval mode).
    """
    return fit(DigitsResNet(), epochs)


def fit(model: nn.Module, epochs: int) -> nn.Module:
    """Train ``model`` on the ``"train"`` split: Adam, cosine schedule, random shifts, seeded shuffles.

    Args:
        model: A freshly initialised classifier of 1x8x8 digits.
        epochs: Number of training epochs.

    Returns:
        The trained model (in eval mode).
    """
    x_np, y_np = digits.load_split("train")
    images, labels = torch.from_numpy(x_np), torch.from_numpy(y_np)
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(images) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, epochs + 1):
        model.train()
        permutation = torch.randperm(len(images), generator=generator)
        total_loss = 0.0
        for start in range(0, len(images), BATCH_SIZE):
            index = permutation[start : start + BATCH_SIZE]
            batch = random_shift(images[index], generator)
            optimizer.zero_grad()
            loss = loss_fn(model(batch), labels[index])
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(index)
        if epoch == 1 or epoch % 10 == 0 or epoch == epochs:
            logger.info(
                "epoch %3d/%d  loss %.4f  train top-1 %.2f%%",
                epoch,
                epochs,
                total_loss / len(images),
                evaluate(model, images, labels),
            )
    model.eval()
    return model


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every ``Conv2d`` directly followed by ``BatchNorm2d`` into the convolution (eval mode).

    Only needed if the exporter leaves BatchNormalization nodes in the graph.

    Args:
        model: Model in eval mode; modified in place.

    Returns:
        ``model`` with the BatchNorm layers replaced by :class:`torch.nn.Identity`.
    """
    for module in model.modules():
        if isinstance(module, BasicBlock):
            module.conv1 = fuse_conv_bn_eval(module.conv1, module.bn1)
            module.conv2 = fuse_conv_bn_eval(module.conv2, module.bn2)
            module.bn1, module.bn2 = nn.Identity(), nn.Identity()
        if (
            isinstance(module, nn.Sequential)
            and len(module) >= 2
            and isinstance(module[0], nn.Conv2d)
            and isinstance(module[1], nn.BatchNorm2d)
        ):
            module[0] = fuse_conv_bn_eval(module[0], module[1])
            module[1] = nn.Identity()
    return model


def _export(model: nn.Module, out: Path) -> onnx.ModelProto:
    """Run the legacy ONNX exporter and load the result."""
    dummy = torch.zeros(digits.INPUT_SHAPE)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        torch.onnx.export(
            model,
            (dummy,),
            str(out),
            dynamo=False,
            export_params=True,
            opset_version=13,
            do_constant_folding=True,
            input_names=[digits.INPUT_NAME],
            output_names=[digits.OUTPUT_NAME],
            dynamic_axes={digits.INPUT_NAME: {0: "batch"}, digits.OUTPUT_NAME: {0: "batch"}},
        )
    return onnx.load(str(out))


def export(model: nn.Module, out: Path) -> onnx.ModelProto:
    """Export ``model`` to ONNX with BatchNorm folded and unique node names, and validate it.

    Args:
        model: Trained model in eval mode.
        out: Output path of the ``.onnx`` file; parent directories are created.

    Returns:
        The exported (and saved) ONNX model.

    Raises:
        RuntimeError: If the exported graph differs numerically from the PyTorch model.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    proto = _export(model, out)
    if any(node.op_type == "BatchNormalization" for node in proto.graph.node):
        logger.info("exporter kept BatchNormalization nodes; folding them into the convolutions")
        proto = _export(fold_batchnorm(model), out)
        if any(node.op_type == "BatchNormalization" for node in proto.graph.node):
            raise RuntimeError("BatchNormalization nodes remain after folding")

    # Every node gets a non-empty, unique name (the legacy exporter already uses "/stem/stem.0/Conv").
    seen: set[str] = set()
    renamed = False
    for i, node in enumerate(proto.graph.node):
        name = node.name or f"/{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        if name != node.name:
            node.name, renamed = name, True
        seen.add(name)
    if renamed:
        logger.info("renamed nodes to make names non-empty and unique")
        onnx.save(proto, str(out))

    onnx.checker.check_model(proto, full_check=True)

    # Numerical equivalence check against PyTorch (guards against bad folding).
    import onnxruntime as ort

    x_np, _ = digits.load_split("test")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {digits.INPUT_NAME: x_np})[0]
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_np)).numpy()
    max_diff = float(np.abs(onnx_logits - torch_logits).max())
    logger.info("max |onnx - torch| logits difference on test split: %.2e", max_diff)
    if max_diff > 1e-3:
        raise RuntimeError(f"ONNX output differs from PyTorch by {max_diff:.3e}")
    return proto


def run(argv: list[str] | None, description: str, default_out: Path, train_model) -> int:
    """Command line shared by the training scripts: train deterministically, export, report test top-1.

    Args:
        argv: Command-line arguments (None for ``sys.argv``).
        description: The script's one-line description.
        default_out: Default ONNX output path.
        train_model: ``epochs -> trained model``.

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=40, help="number of training epochs (default: 40)")
    parser.add_argument("--out", type=Path, default=default_out, help=f"output ONNX path (default: {default_out})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    start = time.perf_counter()
    model = train_model(args.epochs)
    logger.info("training took %.1f s", time.perf_counter() - start)

    proto = export(model, args.out)
    logger.info(
        "exported %s (%.1f KB, %d nodes: %s)",
        args.out,
        args.out.stat().st_size / 1024,
        len(proto.graph.node),
        ", ".join(sorted({node.op_type for node in proto.graph.node})),
    )
    x_test, y_test = digits.load_split("test")
    logger.info("FP32 test top-1 (onnxruntime): %.2f%%", digits.onnx_top1(args.out, x_test, y_test))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    return run(argv, __doc__.splitlines()[0], digits.MODEL_PATH, train)


if __name__ == "__main__":
    sys.exit(main())
