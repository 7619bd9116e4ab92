"""Attention-score variance ("dispersion") and attention centres, differentiable.

For query i with probabilities A_ij over the reference *grid* tokens (softmax
over the grid tokens only) and cell centres p_j = ((r + 0.5)/h_r, (c + 0.5)/w_r):

    mu_i  = sum_j A_ij p_j
    Var_i = sum_j A_ij ||p_j - mu_i||^2 = sum_j A_ij ||p_j||^2 - ||mu_i||^2

Both sums are attention outputs with the coordinates as values, so they come
out of `F.scaled_dot_product_attention` without the N_q x N_k probability
matrix ever being materialised, in the forward *and* the backward pass. Two
fused forms:

* `attention_with_moments` folds the coordinate columns into the layer's own
  attention call (values [v, p_y, p_x, ||p||^2, 1_grid]): one kernel gives the
  layer output and the statistics, the cheapest form (the monitor uses it while
  training with the stability loss);
* `attention_moments` is a separate call on given q/k (any processor).

Coordinates are centred (p - 0.5) inside the kernels, which keeps the
cancellation in E||p||^2 - ||mu||^2 small in reduced precision. `*_explicit`
versions build the matrix: they are the reference for tests and the naive
baseline for `bench/step.py`.

**Anchors.** Any per-sample values a_j on the reference grid (B, N_grid, C) ride
along the same way: `attention_with_moments(..., anchors=a)` also returns
`sum_j A_ij a_j` (softmax over the grid keys). With a_j = [g_j, ||g_j||^2], g_j
the garment colour of key j's cell (`colour_anchors`), and y_i the true colour at
query i,

    E_A ||g - y_i||^2 = sum_j A_ij ||g_j - y_i||^2 = s_i - 2 y_i . c_i + ||y_i||^2

(`anchored_variance`): the attention-score variance in colour space around the
true colour, zero only when query i attends to cells of its own colour. With a
known garment position p*_i the coordinates give E_A ||p - p*_i||^2 = Var_i +
||mu_i - p*_i||^2 (`position_variance`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F


def cell_centres(reference_grid: tuple[int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """(h_r * w_r, 2) centres (y, x) in [0, 1], row-major like the token grid."""
    h, w = reference_grid
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2)


def query_mask(mask: torch.Tensor | None, grid: tuple[int, int], batch: int) -> torch.Tensor | None:
    """Inpainting mask (B, 1, H, W) -> (B, N_q) booleans on a layer's query grid."""
    if mask is None:
        return None
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] != batch:
        raise ValueError(f"mask must be (B={batch}, 1, H, W) on the latent grid, got {tuple(mask.shape)}")
    resized = F.interpolate(mask.float(), size=grid, mode="nearest") > 0.5
    return resized.flatten(1)


def _grid_qk(query: torch.Tensor, key: torch.Tensor, extra_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    # float32: Var = E||p||^2 - ||mu||^2 cancels badly in half precision.
    return query.float(), key[:, :, extra_tokens:].float()


@functools.lru_cache(maxsize=64)
def _coordinate_values(reference_grid: tuple[int, int], extra_tokens: int, num_keys: int,
                       device, dtype, width: int = 0) -> torch.Tensor:
    """(N_k, 3 or 4) values [p_y - 0.5, p_x - 0.5, ||p - 0.5||^2 (, 1)] with zero rows for the
    extra tokens, zero-padded to ``width`` columns if that is wider; the 4th column (grid mass)
    is only needed when there are extra tokens, to renormalise the softmax over all keys to one
    over the grid keys. Cached: every layer call of a run asks for the same few, and building
    one is a dozen tiny kernels, which on a GPU cost more than the attention they ride in.
    (Read-only: callers only pad, concatenate and expand it. Built outside inference mode, so
    one first asked for under `torch.inference_mode()` still serves a training step later.)"""
    h, w = reference_grid
    if num_keys != extra_tokens + h * w:
        raise ValueError(f"{num_keys} keys but reference_grid {tuple(reference_grid)} has {h * w} cells "
                         f"and there are {extra_tokens} extra tokens")
    with torch.inference_mode(False), torch.no_grad():
        p = cell_centres(reference_grid, device) - 0.5
        cols = [p, p.square().sum(-1, keepdim=True)] + ([torch.ones_like(p[:, :1])] if extra_tokens else [])
        values = torch.cat(cols, dim=-1)
        return F.pad(values, (0, max(0, width - values.shape[-1]), extra_tokens, 0)).to(dtype)


def _moments(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention outputs of `_coordinate_values` -> (mu (..., 2), Var (...)) in float32."""
    out = out.float()
    if out.shape[-1] == 4:
        out = out[..., :3] / out[..., 3:]
    mu, second = out[..., :2], out[..., 2]
    return mu + 0.5, (second - mu.square().sum(-1)).clamp(min=0)


def attention_moments(query: torch.Tensor, key: torch.Tensor, scale: float, reference_grid: tuple[int, int],
                      extra_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused, one extra SDPA call: (mu (B, heads, N_q, 2), Var (B, heads, N_q)) from per-head
    q (B, h, N_q, d) and k (B, h, N_k, d), in float32."""
    q, k = _grid_qk(query, key, extra_tokens)
    # Zero-padded to the head dim: with v's dim != q's, PyTorch's CPU SDPA falls back to the math
    # kernel, which materialises the probabilities (6x slower here, and the memory this function
    # exists to avoid); with equal dims it uses the flash kernel. (N_grid, max(3, d))
    values = _coordinate_values(tuple(reference_grid), 0, k.shape[-2], q.device, q.dtype, q.shape[-1])
    values = values.expand(q.shape[0], q.shape[1], -1, -1)
    return _moments(F.scaled_dot_product_attention(q, k, values, scale=scale)[..., :3])


class FusedAttention(NamedTuple):
    """What one fused attention call returns: the layer output (in the values' dtype) and, in
    float32, the centres (B, h, N_q, 2), dispersion (B, h, N_q), when anchors were given the
    anchored outputs sum_j A_ij a_j (B, h, N_q, C) over the grid keys (else None), and with
    extra tokens the grid mass sum_{j in grid} A_ij (B, h, N_q) (without any it is 1: None)."""

    out: torch.Tensor
    mu: torch.Tensor
    var: torch.Tensor
    anchored: torch.Tensor | None = None
    mass: torch.Tensor | None = None


def _anchor_values(anchors: torch.Tensor, batch: int, extra_tokens: int, num_keys: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """(B, N_grid, C) anchors -> (B, 1, N_k, C) values with zero rows for the extra tokens."""
    n_grid = num_keys - extra_tokens
    if anchors.ndim != 3 or anchors.shape[0] != batch or anchors.shape[1] != n_grid:
        raise ValueError(f"anchors must be (B={batch}, N_grid={n_grid}, C): one row per reference grid cell "
                         f"of each sample, got {tuple(anchors.shape)}")
    return F.pad(anchors, (0, 0, extra_tokens, 0)).to(dtype).unsqueeze(1)


def attention_with_moments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attn_mask: torch.Tensor | None, scale: float, reference_grid: tuple[int, int],
                           extra_tokens: int = 0, anchors: torch.Tensor | None = None) -> FusedAttention:
    """The layer's attention and its moments from one SDPA call: (out (B, h, N_q, d), mu, Var,
    anchored).

    The coordinate columns, and the per-sample ``anchors`` (B, N_grid, C) if given, ride along
    with the values; q and k get zero columns to the same width (equal widths keep SDPA on its
    flash kernels; a multiple of 8 suits CUDA's), which leaves every score unchanged. `out`
    equals plain SDPA to float rounding. Extra tokens get zero anchor rows, and the anchored
    outputs are renormalised by the grid mass, as the moments are.
    """
    b, heads, n_k, d = value.shape
    coords = _coordinate_values(tuple(reference_grid), extra_tokens, n_k, value.device, value.dtype)
    n = coords.shape[-1]
    c = 0 if anchors is None else anchors.shape[-1]
    width = -(-(d + n + c) // 8) * 8
    if anchors is None:  # the padded columns, cached too
        side = _coordinate_values(tuple(reference_grid), extra_tokens, n_k, value.device, value.dtype, width - d)
        side = side.expand(b, heads, -1, -1)
    else:
        side = torch.cat([coords.expand(b, 1, -1, -1),
                          _anchor_values(anchors, b, extra_tokens, n_k, value.dtype)], dim=-1)
        side = F.pad(side, (0, width - d - n - c)).expand(-1, heads, -1, -1)
    values = torch.cat([value, side], dim=-1)
    out = F.scaled_dot_product_attention(F.pad(query, (0, width - d)), F.pad(key, (0, width - d)), values,
                                         attn_mask=attn_mask, scale=scale)
    mu, var = _moments(out[..., d:d + n])
    mass = out[..., d + 3].float() if extra_tokens else None  # the 4th coordinate column
    anchored = None
    if anchors is not None:
        anchored = out[..., d + n:d + n + c].float()
        if extra_tokens:  # the softmax ran over every key: divide by the grid keys' mass
            anchored = anchored / mass.unsqueeze(-1)
    return FusedAttention(out[..., :d], mu, var, anchored, mass)


def attention_grid_mass(query: torch.Tensor, key: torch.Tensor, scale: float, extra_tokens: int) -> torch.Tensor:
    """Fused, one extra SDPA call (a layer on another processor): the attention each query puts
    on the grid keys rather than the extra tokens, sum_{j in grid} A_ij (B, heads, N_q), float32.
    The value column is 0 for the extra tokens and 1 for the grid (padded to the head dim, which
    keeps CPU SDPA on its flash kernel, see `attention_moments`)."""
    q, k = query.float(), key.float()
    ones = torch.ones(k.shape[-2], 1, device=k.device, dtype=k.dtype)
    ones[:extra_tokens] = 0
    values = F.pad(ones, (0, max(0, q.shape[-1] - 1))).expand(q.shape[0], q.shape[1], -1, -1)
    return F.scaled_dot_product_attention(q, k, values, scale=scale)[..., 0]


def attention_grid_mass_explicit(query: torch.Tensor, key: torch.Tensor, scale: float,
                                 extra_tokens: int) -> torch.Tensor:
    """The same from the explicit probability matrix (the naive baseline of `bench/step.py`)."""
    probs = torch.softmax(query.float() @ key.float().transpose(-1, -2) * scale, dim=-1)
    return probs[..., extra_tokens:].sum(-1)


def attention_anchored(query: torch.Tensor, key: torch.Tensor, scale: float, anchors: torch.Tensor,
                       extra_tokens: int = 0) -> torch.Tensor:
    """Fused, one extra SDPA call (a layer on another processor): sum_j A_ij a_j
    (B, heads, N_q, C) over the grid keys, in float32."""
    q, k = _grid_qk(query, key, extra_tokens)
    values = _anchor_values(anchors, q.shape[0], 0, k.shape[-2], q.dtype)
    c = values.shape[-1]
    if q.shape[-1] > c:  # equal widths keep CPU SDPA on its flash kernel (see attention_moments)
        values = F.pad(values, (0, q.shape[-1] - c))
    values = values.expand(-1, q.shape[1], -1, -1)
    return F.scaled_dot_product_attention(q, k, values, scale=scale)[..., :c]


def attention_anchored_explicit(query: torch.Tensor, key: torch.Tensor, scale: float, anchors: torch.Tensor,
                                extra_tokens: int = 0) -> torch.Tensor:
    """The same from the explicit probability matrix (the naive baseline of `bench/step.py`)."""
    q, k = _grid_qk(query, key, extra_tokens)
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # (B, h, N_q, N_grid)
    return probs @ anchors.float().unsqueeze(1)


def pool_to_grid(x: torch.Tensor, grid: tuple[int, int], weight: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-average (B, C, H, W) images to a (h, w) grid: ((B, h*w, C) values, (B, h*w) coverage).

    With ``weight`` (B, 1, H, W) in {0, 1} the average runs over the weighted pixels of each
    cell only (0 where a cell has none), and coverage is the weighted fraction of the cell;
    without it, coverage is 1."""
    x = x.float()
    if weight is None:
        pooled = F.adaptive_avg_pool2d(x, grid)
        return pooled.flatten(2).transpose(1, 2), torch.ones(x.shape[0], grid[0] * grid[1], device=x.device)
    w = weight.float()
    cover = F.adaptive_avg_pool2d(w, grid)
    pooled = F.adaptive_avg_pool2d(x * w, grid) / cover.clamp(min=1e-12)
    return pooled.flatten(2).transpose(1, 2), cover.flatten(1)


def colour_anchors(garment: torch.Tensor, reference_grid: tuple[int, int]) -> torch.Tensor:
    """Anchors [g_j, ||g_j||^2] (B, N_grid, 4): the garment image (B, 3, H, W) in [-1, 1],
    area-averaged over each reference grid cell, as colours in [0, 1] centred on 0.5 (g = x / 2).

    Centring does not change E||g - y||^2 (pool the target the same way) and keeps the
    cancellation in s - 2 y.c + ||y||^2 small in reduced precision. For a CLIP-like encoder
    (square resize, then patches) the grid cell of patch j covers the same part of the garment
    as the patch does."""
    g, _ = pool_to_grid(garment / 2, tuple(reference_grid))
    return torch.cat([g, g.square().sum(-1, keepdim=True)], dim=-1)


def anchored_variance(anchored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """E_A ||a - y_i||^2 = s_i - 2 y_i . c_i + ||y_i||^2 per (B, heads, N_q), from anchored outputs
    (B, heads, N_q, C + 1) = [c_i = E_A a, s_i = E_A ||a||^2] and targets y (B, N_q, C)."""
    c, second = anchored[..., :-1], anchored[..., -1]
    y = target.float().unsqueeze(1)
    return (second - 2 * (y * c).sum(-1) + y.square().sum(-1)).clamp(min=0)


def position_variance(mu: torch.Tensor, var: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """E_A ||p - p*_i||^2 = Var_i + ||mu_i - p*_i||^2 per (B, heads, N_q), from the centres
    (B, heads, N_q, 2), dispersion (B, heads, N_q) and target positions p* (B, N_q, 2)."""
    return var + (mu - target.float().unsqueeze(1)).square().sum(-1)


def worn_places(garment_pos: torch.Tensor, worn: torch.Tensor, reference_grid: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each garment cell is worn: ((B, h_r * w_r, 2) the mean person position (y, x), relative
    to the image, of the worn pixels whose garment position falls in the cell; (B, h_r * w_r) bool,
    the cells that some worn pixel shows). From ``garment_pos`` (B, 2, H, W) and ``worn`` (B, 1, H, W)."""
    b, _, h, w = garment_pos.shape
    hr, wr = reference_grid
    pos = garment_pos.float().flatten(2)  # (B, 2, H*W)
    on = worn.reshape(b, h * w) > 0.5
    # Clamped, so every pixel names a valid cell; pixels off the garment add weight 0.
    cell = ((pos[:, 0] * hr).long().clamp(0, hr - 1) * wr + (pos[:, 1] * wr).long().clamp(0, wr - 1))
    here = cell_centres((h, w), garment_pos.device).unsqueeze(0).expand(b, -1, -1)  # (B, H*W, 2)
    weight = on.float()
    sums = torch.zeros(b, hr * wr, 2, device=garment_pos.device).scatter_add_(
        1, cell.unsqueeze(-1).expand(-1, -1, 2), here * weight.unsqueeze(-1))
    counts = torch.zeros(b, hr * wr, device=garment_pos.device).scatter_add_(1, cell, weight)
    return sums / counts.clamp(min=1).unsqueeze(-1), counts > 0


def r2g_moments(query: torch.Tensor, key: torch.Tensor, scale: float, query_grid: tuple[int, int],
                extra_tokens: int = 0, cells: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The R2G direction's moments, fused: for each grid key j, the centre (B, h, N_grid, 2) and
    dispersion (B, h, N_grid) over the query grid of softmax_i(k_j . q_i): where that garment cell's
    attention lands on the generated image. One SDPA call with the roles of q and k swapped.
    ``cells`` (B, n) grid-key indices: only those keys, (B, h, n, 2) and (B, h, n); the call's
    cost scales with the number of keys."""
    k = key[:, :, extra_tokens:]
    if cells is not None:
        k = k.gather(2, cells[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1]))
    return attention_moments(k, query, scale, query_grid, 0)


def sample_cells(valid: torch.Tensor, n: int, draws: torch.Tensor) -> torch.Tensor:
    """(B, n) indices of ``n`` cells per sample drawn uniformly without replacement among its
    valid ones (``valid`` (B, N) bool; a sample with fewer than ``n`` takes all of them and
    fills up with invalid cells, which a mask over ``valid`` then drops), from ``draws`` (B, N)
    uniforms in [0, 1) (`losses.diffusion.uniform_draws`: one row per sample's generator)."""
    # Keys in [0, 1) for valid cells, >= 1 for invalid ones: the n smallest are a uniform draw
    # among the valid cells first.
    keys = draws.to(valid.device) + (~valid).float()
    return keys.topk(min(n, valid.shape[1]), dim=1, largest=False).indices


def centre_error(mu: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||mu_i - p*_i|| per (B, heads, N_q), in garment-image units (relative coordinates)."""
    return (mu - target.float().unsqueeze(1)).square().sum(-1).sqrt()


def attention_moments_explicit(query: torch.Tensor, key: torch.Tensor, scale: float,
                               reference_grid: tuple[int, int], extra_tokens: int = 0
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from the explicit probability matrix (what peers' code does)."""
    q, k = _grid_qk(query, key, extra_tokens)
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # (B, h, N_q, N_grid)
    p = cell_centres(reference_grid, q.device)
    mu = probs @ p
    var = (probs * (p.view(1, 1, 1, -1, 2) - mu.unsqueeze(-2)).square().sum(-1)).sum(-1)
    return mu, var


def masked_mean(values: torch.Tensor, qmask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, heads, N_q) over batch, heads and the masked queries.
    An empty mask contributes nothing (0, no gradient) rather than NaN."""
    if qmask is None:
        return values.mean()
    w = qmask.unsqueeze(1).to(values.dtype).expand_as(values)
    total = w.sum()
    return (values * w).sum() / total if total > 0 else values.sum() * 0


def atv(mu: torch.Tensor, grid: tuple[int, int], qmask: torch.Tensor | None) -> torch.Tensor:
    """StableVITON's attention total variation: L1 differences of the head-averaged
    attention centre between neighbouring queries, both inside the mask."""
    b = mu.shape[0]
    h, w = grid
    c = mu.mean(1).reshape(b, h, w, 2)  # centres of head-averaged attention (linear in probabilities)
    m = qmask.reshape(b, h, w) if qmask is not None else torch.ones(b, h, w, dtype=torch.bool, device=mu.device)
    dy = (c[:, 1:] - c[:, :-1]).abs().sum(-1)
    dx = (c[:, :, 1:] - c[:, :, :-1]).abs().sum(-1)
    my = (m[:, 1:] & m[:, :-1]).to(c.dtype)
    mx = (m[:, :, 1:] & m[:, :, :-1]).to(c.dtype)
    n = my.sum() + mx.sum()
    return ((dy * my).sum() + (dx * mx).sum()) / n if n > 0 else c.sum() * 0


def concentration(query: torch.Tensor, key: torch.Tensor, scale: float, reference_grid: tuple[int, int],
                  extra_tokens: int = 0, sigma: float = 0.1, chunk_size: int = 1024) -> torch.Tensor:
    """Gaussian-weighted attention mass around each query's centre (the authors'
    follow-up loss), per (B, heads, N_q). It needs the probabilities themselves,
    so it is computed explicitly, in chunks of queries to bound memory."""
    q, k = _grid_qk(query, key, extra_tokens)
    p = cell_centres(reference_grid, q.device)
    parts = []
    for start in range(0, q.shape[-2], chunk_size):
        probs = torch.softmax(q[:, :, start:start + chunk_size] @ k.transpose(-1, -2) * scale, dim=-1)
        mu = probs @ p
        d2 = (p.view(1, 1, 1, -1, 2) - mu.unsqueeze(-2)).square().sum(-1)
        parts.append((probs * torch.exp(-d2 / (2 * sigma**2))).sum(-1))
    return torch.cat(parts, dim=-1)
