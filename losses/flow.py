"""Leffa's flow loss: warp the garment by the attention centres, compare with the person.

Leffa (Zhou et al., CVPR 2025, §3.3) reads a cross-attention layer's head-averaged
attention as a flow field: each generated location points at the garment position
it attends to. Warping the garment along that field should reproduce the
ground-truth person inside the worn garment, so

    F     = upsample_bilinear(mean_heads(mu), image size)     # (y, x) in [0, 1]
    warp  = grid_sample(garment, F)
    loss  = sum_{b,c,p} M_bp (warp_bcp - target_bcp)^2 / (C * sum_{b,p} M_bp)

with M the person-side worn-garment mask (only kept samples count). Unlike the
attention-score variance, this term is anchored: attention that collapses onto
one shared garment cell warps a flat colour, which is far from a patterned
target, so the collapse is not a minimum.

Conventions (the monitor's): `mu` are attention centres in relative garment-image
coordinates, (y, x) with cell centres at ((r + 0.5) / h_r, (c + 0.5) / w_r). Both
the upsampling and `grid_sample` use ``align_corners=False``, the convention in
which 0 and 1 are the outer *edges* of the image and pixel c's centre is
(c + 0.5) / W: a relative coordinate u maps to grid_sample's 2u - 1. Head-mean
centres equal the centres of head-mean probabilities (the centre is linear in
the probabilities), which is Leffa's "head-mean A @ C".

The function is pure: it sees tensors, never the model, the monitor or the
trainer. The weight (Leffa: 1e-3), the layers (Leffa: those at >= 1/32
resolution) and the timestep window (Leffa: t < 500) belong to the caller, which
expresses the window and guidance dropping through ``keep`` (see `keep_samples`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32, or float64 when given: half precision would quantise sub-pixel flow (bf16 keeps
    8 bits, coarser than one pixel of a 512-pixel image)."""
    return torch.promote_types(t.dtype, torch.float32)


def keep_samples(batch: int, *, timesteps: torch.Tensor | None = None, t_max: int | None = None,
                 dropped: torch.Tensor | None = None) -> torch.Tensor | None:
    """(B,) booleans: the samples an attention term applies to, or None for all of them.

    A sample is skipped when its timestep is not below ``t_max`` (Leffa's low-noise
    window) or when its garment condition was dropped for classifier-free guidance
    (``dropped`` True): attention over null tokens says nothing about the garment.
    """
    keep = None
    if t_max is not None and timesteps is not None:
        if timesteps.shape != (batch,):
            raise ValueError(f"keep_samples: timesteps must be ({batch},), got {tuple(timesteps.shape)}")
        keep = timesteps < t_max
    if dropped is not None:
        if dropped.shape != (batch,):
            raise ValueError(f"keep_samples: dropped must be ({batch},), got {tuple(dropped.shape)}")
        kept = ~dropped.to(torch.bool)
        keep = kept if keep is None else keep & kept.to(keep.device)
    return keep


def flow_field(mu: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Head-mean centres (B, heads, N_q, 2) on the query grid (h, w) -> flow (B, 2, H, W).

    The flow holds (y, x) relative garment coordinates at every image pixel,
    interpolated bilinearly with ``align_corners=False`` (query cell centres sit at
    ((r + 0.5) / h, (c + 0.5) / w), as the monitor places them). Within half a query
    cell of the image border the flow is constant (the interpolation clamps there).
    """
    if mu.ndim != 4 or mu.shape[-1] != 2:
        raise ValueError(f"flow_field: mu must be (B, heads, N_q, 2) attention centres, got {tuple(mu.shape)}")
    b, _, n_q, _ = mu.shape
    h, w = grid
    if n_q != h * w:
        raise ValueError(f"flow_field: mu has {n_q} queries but the query grid {tuple(grid)} has {h * w}")
    centres = mu.to(_compute_dtype(mu)).mean(1).reshape(b, h, w, 2).permute(0, 3, 1, 2)  # (B, 2, h, w)
    return F.interpolate(centres, size=tuple(size), mode="bilinear", align_corners=False)


def warp_garment(garment: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample ``garment`` (B, C, Hg, Wg) at ``flow`` (B, 2, H, W) (y, x in [0, 1]) -> (B, C, H, W).

    grid_sample wants (x, y) in [-1, 1]; with ``align_corners=False`` the map is
    u -> 2u - 1 (edges to edges). Bilinear, ``padding_mode="border"``: centres of
    real attention never leave the outermost cell centres, so the padding only
    matters for hand-made flows, where repeating the edge is the least surprising.
    """
    grid = (flow.permute(0, 2, 3, 1).flip(-1) * 2 - 1).to(garment.dtype)  # (B, H, W, 2) as (x, y)
    return F.grid_sample(garment, grid, mode="bilinear", padding_mode="border", align_corners=False)


def flow_loss(mu: torch.Tensor, grid: tuple[int, int], garment: torch.Tensor, target: torch.Tensor,
              worn_mask: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Leffa's flow loss of one layer: ``(loss, metrics)``.

    Args:
        mu: attention centres (B, heads, N_q, 2), (y, x) in relative garment coordinates,
            with graph (e.g. ``LastAttention.mu``).
        grid: the layer's query grid (h, w), N_q = h * w, row-major.
        garment: the garment image (B, C, Hg, Wg); its size may differ from the person's.
        target: the ground-truth person (B, C, H, W); its size is the size the flow is
            upsampled to.
        worn_mask: (B, 1, H, W) or (B, H, W), where the garment is on the person
            (bool or {0, 1}).
        keep: optional (B,) booleans, the samples that count (`keep_samples`).

    Returns the masked mean of the squared colour error over channels and the worn
    pixels of the kept samples (0 with no gradient when there are none, rather than
    NaN), and ``{"loss/flow": loss, "flow/pixels": worn pixels counted}``, detached.
    """
    if target.ndim != 4 or garment.ndim != 4 or garment.shape[:2] != target.shape[:2]:
        raise ValueError(f"flow_loss: garment {tuple(garment.shape)} and target {tuple(target.shape)} must be "
                         f"(B, C, H, W) with the same B and C")
    b, c, h, w = target.shape
    if mu.shape[0] != b:
        raise ValueError(f"flow_loss: mu has batch {mu.shape[0]}, the images {b}")
    mask = worn_mask.unsqueeze(1) if worn_mask.ndim == 3 else worn_mask
    if mask.shape != (b, 1, h, w):
        raise ValueError(f"flow_loss: worn_mask must be ({b}, 1, {h}, {w}) like the target, "
                         f"got {tuple(worn_mask.shape)}")
    dtype = _compute_dtype(mu)
    m = mask.to(dtype)
    if keep is not None:
        if keep.shape != (b,):
            raise ValueError(f"flow_loss: keep must be ({b},) booleans, got {tuple(keep.shape)}")
        m = m * keep.to(device=m.device, dtype=m.dtype).view(b, 1, 1, 1)
    warped = warp_garment(garment.to(dtype), flow_field(mu, grid, (h, w)))
    sq = (warped - target.to(dtype)).square() * m
    pixels = m.sum()
    loss = sq.sum() / (c * pixels) if pixels > 0 else sq.sum() * 0
    return loss, {"loss/flow": loss.detach(), "flow/pixels": pixels.detach()}
