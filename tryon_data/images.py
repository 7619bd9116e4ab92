"""Reading, resizing and augmenting the files of real try-on data sets.

Every reader names the file it failed on: a corrupt JPEG deep inside a data loader worker
must say which file to delete or re-download. Images come out in the sample contract's
conventions (:mod:`tryon_data.samples`): float32, RGB in [-1, 1] (what the model's codec
expects), masks in {0, 1}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from common.images import from_pil

Size = tuple[int, int]  # (H, W)


class DatasetError(ValueError):
    """A data set that can't be used as it is on disk; the message names the files."""


class UnreadableFileError(DatasetError):
    """One file exists but can't be decoded (corrupt, truncated, wrong format)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"cannot read {path}: {reason}")
        self.path = Path(path)


def open_image(path: Path | str, mode: str) -> Image.Image:
    """Decode the whole file now (PIL decodes lazily; a truncated JPEG only fails on load)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except FileNotFoundError:
        raise DatasetError(f"file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableFileError(path, f"{type(err).__name__}: {err}") from None


def read_json(path: Path | str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DatasetError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnreadableFileError(path, f"{type(err).__name__}: {err}") from None


def _resize(im: Image.Image, size: Size, resample: int) -> Image.Image:
    h, w = size
    return im if im.size == (w, h) else im.resize((w, h), resample)


def read_rgb(path: Path | str, size: Size) -> torch.Tensor:
    """An RGB image resized to ``size`` (bicubic; PIL antialiases when shrinking), in [-1, 1]."""
    return from_pil(_resize(open_image(path, "RGB"), size, Image.BICUBIC))


def read_mask(path: Path | str, size: Size) -> torch.Tensor:
    """A binary mask image -> float32 (1, H, W) in {0, 1}.

    Resized as grey levels (bilinear) and thresholded at half: JPEG masks (VITON-HD's
    cloth-mask) have ringing near the edge, and a nearest-neighbour shrink would alias.
    """
    grey = _resize(open_image(path, "L"), size, Image.BILINEAR)
    return torch.from_numpy((np.asarray(grey) >= 128).astype(np.float32))[None]


def read_labels(path: Path | str, size: Size) -> np.ndarray:
    """A label map (parsing classes as pixel values) resized nearest -> int64 (H, W).

    Palette ("P") PNGs keep their indices (converting them to grey would mix the palette's
    colours); RGB label images use their first channel.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L", "I", "I;16"):
                im = im.getchannel(0)
            im = _resize(im, size, Image.NEAREST)
            return np.asarray(im).astype(np.int64)
    except FileNotFoundError:
        raise DatasetError(f"file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableFileError(path, f"{type(err).__name__}: {err}") from None


def mask_box(mask: torch.Tensor) -> torch.Tensor:
    """int64 (y0, x0, y1, x1) bounding box of a (1, H, W) mask; the whole image when empty
    (so that the contract's box is always valid)."""
    m = mask.reshape(mask.shape[-2:]) > 0.5
    rows = torch.nonzero(m.any(1)).flatten()
    cols = torch.nonzero(m.any(0)).flatten()
    h, w = m.shape
    if rows.numel() == 0:
        return torch.tensor([0, 0, h, w], dtype=torch.int64)
    return torch.tensor([int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1], dtype=torch.int64)


def garment_mask_from_white(garment: torch.Tensor, threshold: float = 0.94) -> torch.Tensor:
    """Mask of a product photo on a white background (DressCode ships none).

    A pixel is garment when any channel is below ``threshold`` (in [0, 1]); holes (white
    prints on the garment) are filled so the mask is the silhouette.
    """
    from scipy import ndimage

    fg = (((garment + 1) / 2) < threshold).any(0).numpy()
    fg = ndimage.binary_fill_holes(fg)
    fg = ndimage.binary_opening(fg, structure=np.ones((3, 3), bool))  # JPEG specks on the white
    return torch.from_numpy(fg.astype(np.float32))[None]


# Densepose label images (DressCode's dense/<n>_5.png: 0 background, 1-24 body parts) are
# turned into a fixed colour rendering so that "pose" is an RGB image like VITON-HD's.
def _part_palette() -> np.ndarray:
    import colorsys

    cols = [(0.0, 0.0, 0.0)] + [colorsys.hsv_to_rgb(k / 24.0, 0.8, 0.95) for k in range(24)]
    cols += [(1.0, 1.0, 1.0)] * (256 - len(cols))
    return np.asarray(cols, dtype=np.float32) * 2 - 1


_PALETTE = _part_palette()


def labels_to_rgb(labels: np.ndarray) -> torch.Tensor:
    """int (H, W) part labels -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(_PALETTE[np.clip(labels, 0, 255)]).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------ augmentation
IMAGE_KEYS: tuple[str, ...] = ("person", "garment", "agnostic")
SPATIAL_KEYS: tuple[str, ...] = ("person", "garment", "garment_mask", "agnostic", "mask", "pose", "worn_mask")


def _adjust(img01: torch.Tensor, brightness: float, contrast: float, saturation: float) -> torch.Tensor:
    """Brightness, contrast and saturation as torchvision's formulas, except that contrast
    pivots on mid-grey instead of the image's mean: the whole map is then per pixel, so a
    colour on the garment and the same colour on the person stay equal, and the agnostic
    stays the person outside the mask."""
    x = (img01 * brightness).clamp(0, 1)
    x = (contrast * x + (1 - contrast) * 0.5).clamp(0, 1)
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    return (saturation * x + (1 - saturation) * grey).clamp(0, 1)


class JointAugment:
    """Training augmentation applied to a whole sample at once.

    * Horizontal flip (probability ``flip_prob``) of person, garment, masks, agnostic and
      pose together: a flip of one without the others would teach the model to mirror.
      ``garment_pos`` follows (mirrored columns, x -> 1 - x on the worn garment).
    * Colour jitter: brightness, contrast and saturation factors drawn once from
      U(1 - s, 1 + s) and applied to person, agnostic *and* garment, so the garment's
      colour still matches the worn one; the agnostic's grey region is re-greyed after.
    The box is recomputed from the (flipped) mask. Randomness comes from ``generator``
    (or torch's global RNG, seeded per data loader worker).
    """

    def __init__(self, flip_prob: float = 0.0, color_jitter: float = 0.0) -> None:
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob: expected a probability in [0, 1], got {flip_prob}")
        if not 0.0 <= color_jitter < 1.0:
            raise ValueError(f"color_jitter: expected a strength in [0, 1), got {color_jitter}")
        self.flip_prob, self.color_jitter = float(flip_prob), float(color_jitter)

    @property
    def active(self) -> bool:
        return self.flip_prob > 0 or self.color_jitter > 0

    def __call__(self, sample: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        out = dict(sample)
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        if u[0] < self.flip_prob:
            for k in SPATIAL_KEYS:
                if k in out:
                    out[k] = out[k].flip(-1)
            if "garment_pos" in out:
                # Person and garment flip together: a worn pixel moves to the mirrored column and
                # its garment point to the mirrored relative x (1 - x); 0 stays 0 off the garment.
                pos = out["garment_pos"].flip(-1)
                out["garment_pos"] = torch.stack([pos[0], (1 - pos[1]) * out["worn_mask"][0]])
        s = self.color_jitter
        if s > 0:
            b, c, sat = (1 - s + 2 * s * v for v in u[1:])
            for k in IMAGE_KEYS:
                out[k] = _adjust((out[k] + 1) / 2, b, c, sat) * 2 - 1
            out["agnostic"] = out["agnostic"] * (1 - out["mask"])
        if "box" in out:
            out["box"] = mask_box(out["mask"])
        return out
