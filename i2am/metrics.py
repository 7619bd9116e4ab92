"""IMACS, the authors' attribution-map metric."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def imacs(map: torch.Tensor, mask: torch.Tensor, penalty: float = 3.0) -> torch.Tensor:
    """Inside-mask attention minus ``penalty`` × outside-mask attention.

    The map is min-max normalised to [0, 1] per sample (a constant map becomes
    all zeros), then ``mean(map[mask]) − penalty · mean(map[~mask])``. ``map``
    is (B, H, W) → (B,) or (H, W) → scalar; ``mask`` (B or 1, h, w) or (h, w),
    bool or {0, 1}, resized nearest to the map's grid when it differs (an
    inpainting mask at image resolution, a map at latent resolution).
    """
    single = map.ndim == 2
    if map.ndim not in (2, 3):
        raise ValueError(f"map must be (H, W) or (B, H, W), got shape {tuple(map.shape)}")
    m = map[None] if single else map
    m = m.detach().float()
    B, H, W = m.shape
    k = mask[None] if mask.ndim == 2 else mask
    if k.ndim != 3 or k.shape[0] not in (1, B):
        raise ValueError(f"mask must be (h, w) or ({B} or 1, h, w) for a map of shape {tuple(map.shape)}, "
                         f"got {tuple(mask.shape)}")
    k = k.to(m.device)
    if tuple(k.shape[-2:]) != (H, W):
        k = F.interpolate(k[:, None].float(), size=(H, W), mode="nearest")[:, 0]
    k = (k > 0.5 if k.dtype != torch.bool else k).expand(B, H, W)
    inside = k.flatten(1).sum(1)
    outside = (~k).flatten(1).sum(1)
    if (inside == 0).any() or (outside == 0).any():
        raise ValueError("imacs needs a mask with cells both inside and outside on the map's grid "
                         f"(inside counts {inside.tolist()}, outside counts {outside.tolist()})")
    flat = m.flatten(1)
    lo = flat.min(1, keepdim=True).values
    span = flat.max(1, keepdim=True).values - lo
    norm = torch.where(span > 0, (flat - lo) / span.clamp(min=torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    kf = k.flatten(1).float()
    score = (norm * kf).sum(1) / inside - penalty * (norm * (1 - kf)).sum(1) / outside
    return score[0] if single else score


def mask_to_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A (B, 1, H, W) {0, 1} mask -> (B, h, w) booleans on a map's grid: a cell is
    inside when at least half of it is (area-average, then >= 0.5)."""
    return F.interpolate(mask.float(), size=tuple(grid), mode="area")[:, 0] >= 0.5


def imacs_per_sample(maps: torch.Tensor, mask: torch.Tensor, penalty: float = 3.0) -> list[float | None]:
    """IMACS of each map (B, h, w) against its mask (B, 1, H, W) brought to the map's
    grid; None where the mask is empty or full on that grid (IMACS is undefined there)."""
    grid_mask = mask_to_grid(mask.to(maps.device), tuple(maps.shape[-2:]))
    return [float(imacs(m, k, penalty)) if k.any() and (~k).any() else None for m, k in zip(maps, grid_mask)]


def top_cells(r2g: torch.Tensor, mask_grid: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The k highest-R2G cells inside the mask: the generated patches the garment
    influenced most, the natural places to ask 'where did this come from?'."""
    scores = torch.where(mask_grid, r2g, torch.full_like(r2g, -torch.inf)).flatten()
    k = min(k, int(mask_grid.sum()))
    idx = torch.topk(scores, k).indices.tolist() if k > 0 else []
    w = r2g.shape[-1]
    return [(i // w, i % w) for i in idx]
