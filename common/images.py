"""Image conversion: the project's tensors (float, channels first, in [-1, 1]) and uint8
pictures (channels last, 0..255), and the one PNG writer.

    to_uint8(tensor)     (3, H, W) / (B, 3, H, W) in [-1, 1] -> uint8 (H, W, 3) / (B, H, W, 3)
    from_uint8(array)    uint8 (H, W, 3) / (B, H, W, 3)      -> float32 (3, H, W) / (B, 3, H, W)
    to_pil / from_pil    the same through PIL RGB images
    save_png(image, path)  a tensor in [-1, 1], a uint8 array or a PIL image, written atomically

``v -> (v + 1) * 127.5`` (clamped, rounded) and ``u -> u / 127.5 - 1`` are inverse on the
256 uint8 levels, so ``to_uint8(from_uint8(a)) == a`` exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

PngSource = Union[torch.Tensor, np.ndarray, Image.Image]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Float (3, H, W) or (B, 3, H, W) in [-1, 1] (clamped) -> uint8 (H, W, 3) or (B, H, W, 3)."""
    if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4):
        raise ValueError(f"image: expected a (3, H, W) or (B, 3, H, W) tensor, got "
                         f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))}")
    a = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(a.movedim(-3, -1).numpy())


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) or (B, H, W, 3) -> float32 (3, H, W) or (B, 3, H, W) in [-1, 1]."""
    a = np.asarray(array)
    if a.dtype != np.uint8 or a.ndim not in (3, 4):
        raise ValueError(f"array: expected uint8 (H, W, C) or (B, H, W, C), got {a.dtype} {a.shape}")
    return (torch.from_numpy(a.astype(np.float32)) / 127.5 - 1.0).movedim(-1, -3).contiguous()


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL image."""
    return Image.fromarray(to_uint8(image))


def from_pil(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    if image.mode != "RGB":
        raise ValueError(f"image: expected an RGB image, got mode {image.mode}")
    return from_uint8(np.asarray(image))


def as_picture(image: PngSource) -> np.ndarray:
    """A tensor in [-1, 1] (3, H, W), a uint8 (H, W, 3|4) array or a PIL image -> uint8 (H, W, 3|4)."""
    if isinstance(image, torch.Tensor):
        return to_uint8(image)
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"array: expected uint8 (H, W, 3) or (H, W, 4), got {a.dtype} {a.shape}")
    return a


# save_png's temporary files are hidden and end in ".tmp", not in an image extension, so that a
# leftover of a killed process is never read as an image by anything listing a folder
# (clean-fid's folder functions, globbing "*.png"); TEMP_GLOB finds them for clean-up.
TEMP_SUFFIX = ".tmp"
TEMP_GLOB = ".*" + TEMP_SUFFIX


def save_png(image: PngSource, path: str | os.PathLike) -> None:
    """Write ``image`` (see :func:`as_picture`) as a PNG, creating parent folders.

    The file is written under a temporary name beside ``path`` and renamed into place, so a
    killed process never leaves a half-written PNG that looks done."""
    a = as_picture(image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        Image.fromarray(a).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["TEMP_GLOB", "as_picture", "from_pil", "from_uint8", "save_png", "to_pil", "to_uint8"]
