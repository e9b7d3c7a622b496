"""Augmented calibration images for learned rounding: random resized crops and horizontal flips of the given ones.

Learned rounding fits thousands of rounding decisions per layer to the calibration data; with few images it
fits those images (the held-out error stops falling while the training loss does). When the calibration
batches hold fewer than ``count`` images, :func:`augment_batches` adds views of them until there are
``count``: each a crop of 35-100 % of a random image's area (aspect ratio 3/4 to 4/3) resized back to the
input's size (bilinear), flipped left-right with probability one half, and with ``photometric`` darkened toward
its minimum and tinted (each channel its own gain). Only 4-D inputs (N, C, H, W) of at
least 8x8 are augmented (every input of a feed the same way); other models keep their batches. With enough
images it returns the batches unchanged. The views depend only on the batches and ``seed``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["AREA", "ASPECT", "FLAT_GREYS", "FLAT_MAX_CHANNELS", "augment_batches", "flat_batches", "image_count"]

logger = logging.getLogger(__name__)

#: Share of the image's area a crop keeps (uniform in this range).
AREA = (0.35, 1.0)
#: Aspect ratio (width / height) of a crop, log-uniform in this range.
ASPECT = (3 / 4, 4 / 3)
#: With ``photometric``: the factor a view's values are scaled by toward the image's minimum (darker, lower contrast)
#: and each channel's gain around it (a tint; grayscale images gain colour), uniform in these ranges.
DARKEN = (0.25, 1.0)
TINT = (0.8, 1.2)
#: Most channels an input may have for :func:`flat_batches` (one flat image per corner: 2 ** channels).
FLAT_MAX_CHANNELS = 4
#: Flat images between the lowest and the highest corner of the range (greys for an RGB input).
FLAT_GREYS = 3
#: Smallest spatial size augmented (smaller inputs are not images).
_MIN_SIDE = 8

Batch = dict[str, torch.Tensor]


def _images(batch: Batch) -> bool:
    return all(t.ndim == 4 and t.is_floating_point() and min(t.shape[2:]) >= _MIN_SIDE for t in batch.values())


def image_count(batches: Sequence[Batch]) -> int:
    """Images in ``batches``: the sum of the first input's batch sizes."""
    return sum(int(next(iter(batch.values())).shape[0]) for batch in batches if batch)


def _photometric(view: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``view`` (1, C, H, W) darkened toward its minimum by a factor from :data:`DARKEN`, each channel's gain from
    :data:`TINT` (the values stay within the view's own range)."""
    low = view.amin()
    factor = DARKEN[0] + (DARKEN[1] - DARKEN[0]) * float(torch.rand((), generator=generator))
    gains = TINT[0] + (TINT[1] - TINT[0]) * torch.rand(view.shape[1], generator=generator)
    return (low + (view - low) * factor * gains.reshape(1, -1, 1, 1)).clamp(max=float(view.amax()))


def _view(images: dict[str, torch.Tensor], generator: torch.Generator,
          photometric: bool = False) -> dict[str, torch.Tensor]:
    """One random resized crop (and flip) of one image, the same window for every input of the feed; with
    ``photometric`` also darkened and tinted (:func:`_photometric`, each input on its own)."""
    height, width = next(iter(images.values())).shape[-2:]
    area = height * width * (AREA[0] + (AREA[1] - AREA[0]) * float(torch.rand((), generator=generator)))
    log_lo, log_hi = math.log(ASPECT[0]), math.log(ASPECT[1])
    aspect = math.exp(log_lo + (log_hi - log_lo) * float(torch.rand((), generator=generator)))
    w = max(1, min(width, round(math.sqrt(area * aspect))))
    h = max(1, min(height, round(math.sqrt(area / aspect))))
    top = int(torch.randint(height - h + 1, (), generator=generator))
    left = int(torch.randint(width - w + 1, (), generator=generator))
    flip = bool(torch.rand((), generator=generator) < 0.5)
    views = {}
    for name, image in images.items():
        crop = image[:, :, top:top + h, left:left + w].float()
        view = F.interpolate(crop, size=image.shape[-2:], mode="bilinear", align_corners=False)
        view = _photometric(view, generator) if photometric else view
        views[name] = (view.flip(-1) if flip else view).to(image.dtype)
    return views


def augment_batches(batches: Sequence[Batch], count: int, seed: int = 0, photometric: bool = False) -> list[Batch]:
    """``batches`` followed by augmented views of their images until there are ``count`` images.

    The views come in batches of the first batch's size; the originals are returned as given (the same
    objects) when there are already ``count`` images, or when the inputs are not images.
    """
    have = image_count(batches)
    if have >= count or not batches:
        return list(batches)
    if not all(_images(batch) for batch in batches):
        logger.info("learned rounding: %d calibration images, fewer than %d, but the inputs are not images "
                    "(N, C, H, W of at least %dx%d); not augmented", have, count, _MIN_SIDE, _MIN_SIDE)
        return list(batches)
    generator = torch.Generator().manual_seed(seed)
    sources = [(b, i) for b, batch in enumerate(batches) for i in range(int(next(iter(batch.values())).shape[0]))]
    size = int(next(iter(batches[0].values())).shape[0])
    views: list[dict[str, torch.Tensor]] = []
    for _ in range(count - have):
        b, i = sources[int(torch.randint(len(sources), (), generator=generator))]
        views.append(_view({name: t[i:i + 1] for name, t in batches[b].items()}, generator, photometric))
    extra = [{name: torch.cat([v[name] for v in views[start:start + size]]) for name in views[0]}
             for start in range(0, len(views), size)]
    logger.info("learned rounding: %d calibration images, fewer than %d; added %d augmented views (random resized "
                "crops and flips%s)", have, count, len(views), ", darkened and tinted" if photometric else "")
    return list(batches) + extra


def flat_batches(batches: Sequence[Batch]) -> list[Batch]:
    """Flat images (one value per channel, batches of one) spanning the calibration inputs' per-channel range: every
    corner of it (black, white and each saturated colour for an RGB input) and :data:`FLAT_GREYS` points between
    its lowest and highest corner.

    A camera sees dark frames, sky and walls; natural calibration photographs hold few such regions, so the first
    layer's rounding is not fitted to them (benchmarks: a dark photograph's KL came from the first Conv). Empty
    unless the model has one input, an image of at most :data:`FLAT_MAX_CHANNELS` channels.
    """
    if not batches or any(len(batch) != 1 or not _images(batch) for batch in batches):
        return []
    name = next(iter(batches[0]))
    first = batches[0][name]
    channels = int(first.shape[1])
    if channels > FLAT_MAX_CHANNELS:
        return []
    low = torch.stack([batch[name].float().amin(dim=(0, 2, 3)) for batch in batches]).amin(dim=0)
    high = torch.stack([batch[name].float().amax(dim=(0, 2, 3)) for batch in batches]).amax(dim=0)
    corners = [torch.tensor([(corner >> c) & 1 for c in range(channels)], dtype=torch.float32)
               for corner in range(2 ** channels)]
    greys = [torch.full((channels,), (k + 1) / (FLAT_GREYS + 1)) for k in range(FLAT_GREYS)]
    return [{name: (low + share * (high - low)).reshape(1, channels, 1, 1).expand(1, channels, *first.shape[2:])
             .to(first.dtype).contiguous()} for share in corners + greys]
