"""Grid and time-binning helpers shared by the monitor and the maps.

Kept free of diffusers imports so that :mod:`i2am.maps` (and loading saved
maps) stays cheap to import.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Grid = tuple[int, int]


def query_grid(num_queries: int, latent_grid: Grid, layer: str = "") -> Grid:
    """The (h_l, w_l) grid of a layer with ``num_queries`` queries.

    diffusers' UNets downsample with stride-2 convolutions (padding 1), so each
    level's grid is the previous one ceil-halved: 64×48 → 32×24 → 16×12 → 8×6,
    and an odd side like 5 becomes 3. We walk down from the latent grid until
    the sizes match.
    """
    h, w = latent_grid
    while True:
        if h * w == num_queries:
            return h, w
        if h * w < num_queries or (h == 1 and w == 1):
            break
        h, w = (h + 1) // 2, (w + 1) // 2
    raise ValueError(
        f"layer {layer!r}: {num_queries} queries match no ceil-halving of the latent grid "
        f"{tuple(latent_grid)} (expected one of {_halvings(latent_grid)} cells)"
    )


def _halvings(grid: Grid) -> list[int]:
    h, w = grid
    sizes = [h * w]
    while h * w > 1:
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append(h * w)
    return sizes


def split_bounds(num_items: int, groups: int) -> list[tuple[int, int]]:
    """``numpy.array_split`` boundaries: earlier groups take the remainder."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    base, extra = divmod(num_items, groups)
    bounds, start = [], 0
    for g in range(groups):
        stop = start + base + (1 if g < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def group_of(step: int, num_items: int, groups: int) -> int:
    """The array_split group that holds item ``step``."""
    for g, (start, stop) in enumerate(split_bounds(num_items, groups)):
        if start <= step < stop:
            return g
    raise ValueError(f"step {step} is outside 0..{num_items - 1}")


def merge_bins(bins: torch.Tensor, bin_bounds: Sequence[tuple[int, int]], groups: int) -> torch.Tensor:
    """Sum per-bin accumulators (first dim) into ``groups`` array_split groups of steps.

    ``bin_bounds`` gives each stored bin's step range. Every requested group must
    be a union of whole bins; otherwise the split cannot be served exactly and
    we say so rather than approximate (clamping after the sum is nonlinear).
    """
    num_steps = bin_bounds[-1][1]
    starts = {b[0] for b in bin_bounds} | {num_steps}
    out = []
    for start, stop in split_bounds(num_steps, groups):
        if start not in starts or stop not in starts:
            raise ValueError(
                f"time_level(groups={groups}) needs step boundaries {split_bounds(num_steps, groups)}, "
                f"but the recording only kept sums over steps {list(bin_bounds)}; record with "
                f"num_steps=None (one bin per step) or time_groups={groups}"
            )
        idx = [i for i, (s, e) in enumerate(bin_bounds) if s >= start and e <= stop]
        out.append(bins[idx].sum(0))
    return torch.stack(out)


def upsample_clamp(maps: torch.Tensor, size: Grid) -> torch.Tensor:
    """The convention: bicubic (align_corners=False) per map, then clamp at 0.

    ``maps`` is (..., h, w); leading dims are flattened into channels so every
    (batch, head) map is interpolated on its own.
    """
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    if (h, w) == tuple(size):
        # Bicubic at scale 1 is the identity (weights 0, 1, 0, 0), skip the work.
        return maps.clamp(min=0)
    flat = maps.reshape(1, -1, h, w)
    up = F.interpolate(flat, size=tuple(size), mode="bicubic", align_corners=False)
    return up.reshape(*lead, *size).clamp(min=0)


def region_mask(region: torch.Tensor | Sequence[int], grid: Grid) -> torch.Tensor:
    """An (H, W) bool mask from a mask or a (y0, x0, y1, x1) box on ``grid``."""
    H, W = grid
    if isinstance(region, torch.Tensor):
        if tuple(region.shape) != (H, W):
            raise ValueError(f"region mask must have shape {(H, W)} (the generated grid), got {tuple(region.shape)}")
        mask = region.bool().cpu()
    else:
        if len(region) != 4:
            raise ValueError(f"region box must be (y0, x0, y1, x1), got {region!r}")
        y0, x0, y1, x1 = (int(v) for v in region)
        if not (0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W):
            raise ValueError(
                f"region box (y0, x0, y1, x1)={tuple(region)} must satisfy 0 <= y0 < y1 <= {H} "
                f"and 0 <= x0 < x1 <= {W} on the generated grid {(H, W)}"
            )
        mask = torch.zeros(H, W, dtype=torch.bool)
        mask[y0:y1, x0:x1] = True
    if not mask.any():
        raise ValueError("region selects no cell of the generated grid")
    return mask


def region_on_layer(mask: torch.Tensor, layer_grid: Grid) -> torch.Tensor:
    """Flat indices of the layer's queries inside ``mask`` (the notes' rule).

    Nearest resize then > 0.5; where that leaves nothing, the cell holding the
    region's centre (mean of its cells' centres, in grid units).
    """
    H, W = mask.shape
    h, w = layer_grid
    small = F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest")[0, 0] > 0.5
    if small.any():
        return small.flatten().nonzero().flatten()
    ys, xs = mask.nonzero(as_tuple=True)
    yc = (ys.double() + 0.5).mean().item()
    xc = (xs.double() + 0.5).mean().item()
    cy = min(int(yc * h / H), h - 1)
    cx = min(int(xc * w / W), w - 1)
    return torch.tensor([cy * w + cx])
