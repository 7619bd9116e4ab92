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
"""
from __future__ import annotations

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


def _coordinate_values(reference_grid: tuple[int, int], extra_tokens: int, num_keys: int,
                       device, dtype) -> torch.Tensor:
    """(N_k, 3 or 4) values [p_y - 0.5, p_x - 0.5, ||p - 0.5||^2 (, 1)] with zero rows for the
    extra tokens; the 4th column (grid mass) is only needed when there are extra tokens, to
    renormalise the softmax over all keys to one over the grid keys."""
    p = cell_centres(reference_grid, device) - 0.5
    if num_keys != extra_tokens + p.shape[0]:
        raise ValueError(f"{num_keys} keys but reference_grid {tuple(reference_grid)} has {p.shape[0]} cells "
                         f"and there are {extra_tokens} extra tokens")
    cols = [p, p.square().sum(-1, keepdim=True)] + ([torch.ones_like(p[:, :1])] if extra_tokens else [])
    return F.pad(torch.cat(cols, dim=-1), (0, 0, extra_tokens, 0)).to(dtype)


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
    values = _coordinate_values(reference_grid, 0, k.shape[-2], q.device, q.dtype)  # (N_grid, 3)
    if q.shape[-1] > 3:
        # Zero-pad the values to the head dim: with v's dim != q's, PyTorch's CPU SDPA falls back
        # to the math kernel, which materialises the probabilities (6x slower here, and the memory
        # this function exists to avoid); with equal dims it uses the flash kernel.
        values = F.pad(values, (0, q.shape[-1] - 3))
    values = values.expand(q.shape[0], q.shape[1], -1, -1)
    return _moments(F.scaled_dot_product_attention(q, k, values, scale=scale)[..., :3])


def attention_with_moments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attn_mask: torch.Tensor | None, scale: float, reference_grid: tuple[int, int],
                           extra_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's attention and its moments from one SDPA call: (out (B, h, N_q, d), mu, Var).

    The coordinate columns ride along with the values; q and k get zero columns to the same
    width (equal widths keep SDPA on its flash kernels; a multiple of 8 suits CUDA's), which
    leaves every score unchanged. `out` equals plain SDPA to float rounding.
    """
    b, heads, n_k, d = value.shape
    coords = _coordinate_values(reference_grid, extra_tokens, n_k, value.device, value.dtype)
    n = coords.shape[-1]
    width = -(-(d + n) // 8) * 8
    values = torch.cat([value, F.pad(coords, (0, width - d - n)).expand(b, heads, -1, -1)], dim=-1)
    out = F.scaled_dot_product_attention(F.pad(query, (0, width - d)), F.pad(key, (0, width - d)), values,
                                         attn_mask=attn_mask, scale=scale)
    mu, var = _moments(out[..., d:d + n])
    return out[..., :d], mu, var


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
