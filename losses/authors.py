"""The I²AM authors' attention recipe, as their try-on code computes it: CWG + TV + DCML.

Their refined model adds three terms on one cross-attention layer to the
diffusion loss. Notation: query i on the layer's (h, w) grid, key j on the
garment's (h_r, w_r) grid, Abar the head-mean probabilities (softmax over the
grid keys), p_j = (row, col) of key j in *key-cell units* (integers 0..h_r-1,
0..w_r-1), c_i = sum_j Abar_ij p_j the attention centre in the same units, and
M_i the worn-garment mask on the query grid.

* CWG, centre-weighted Gaussian, weight -2.0:
  ``mean_{b,i,j} M_i Abar_ij exp(-||p_j - c_i|| / (2 sigma^2))``, sigma = 1. The
  distance is NOT squared, and the mean runs over every (b, i, j), masked-out
  queries counting as zeros. It rewards mass near the centre: a point mass
  scores most, wherever it sits (the collapse is a minimum of -2.0 * CWG).
* TV, weight 1e-4: squared differences of c between vertical neighbours, both
  in the mask, summed over both coordinates and divided by B * (h-1) * w * 2;
  plus the same horizontally over B * h * (w-1) * 2. (Their normalisation: the
  mean over every neighbour pair and coordinate, pairs outside the mask as zeros.)
* DCML, weight -0.01: over ordered query pairs in the mask, relu(x_j - x_i) for
  j right of i in the same row plus relu(y_j - y_i) for j below i in the same
  column, divided by B * N_q^2 (their mean over the full pair matrix). A collapse
  scores 0; any order-preserving spread scores above 0, so -0.01 * DCML < 0.
  Alone it pushes the centres towards the garment's border.

The centres are not detached: gradients reach the probabilities through c as
well, as in their code. Guidance-dropped samples are skipped (``keep``); the
remaining means run over the kept samples only, so with nothing dropped the
value is theirs. They apply the terms at every timestep.

The layer: theirs is the middle decoder cross-attention layer at 16x12 queries
(SD-1.5 at 512x384; ``up_blocks.1.attentions.1`` in diffusers' names), keys the
37x28 DINOv2 patch grid. `authors_layers` picks the decoder layers at 16x12 by
default, or any names / levels given. Where several layers are chosen, their
code adds the per-layer terms (with one layer, sum and mean agree).

These functions are pure: tensors in, tensors out, no model, monitor or trainer.
The probabilities are explicit ((B, heads, N_q, N_grid), kept for backward), which
is affordable for one layer; `bench/authors_cost.py` measures the cost.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]

CWG_WEIGHT = -2.0
TV_WEIGHT = 1e-4
DCML_WEIGHT = -0.01
SIGMA = 1.0
LEVEL = (16, 12)
_LEVEL = re.compile(r"^(\d+)x(\d+)$")


def authors_layers(grids: Mapping[str, tuple[int, int]], layers: Sequence[str] | None = None) -> list[str]:
    """The layers the recipe applies to, from ``{processor name: query grid (h, w)}``.

    ``layers`` None: the decoder (``up_blocks``) cross-attention layers at 16x12
    queries, the authors' choice. Otherwise processor names (with or without
    ``.processor``) or levels such as ``"16x12"`` (every layer with that grid).
    Nothing matched is a ValueError naming the levels and layers that exist.
    """
    def strip(name: str) -> str:
        return name.removesuffix(".processor")

    if layers is None:
        chosen = [n for n, g in grids.items() if "up_blocks" in n and tuple(g) == LEVEL]
    else:
        chosen = []
        for name, g in grids.items():
            for sel in layers:
                m = _LEVEL.match(sel)
                if (m and tuple(g) == (int(m.group(1)), int(m.group(2)))) or strip(sel) == strip(name):
                    chosen.append(name)
                    break
    if not chosen:
        levels = sorted({f"{g[0]}x{g[1]}" for g in grids.values()})
        wanted = "decoder layers at 16x12 queries (the default)" if layers is None else f"layers {list(layers)}"
        raise ValueError(f"the authors' recipe: {wanted} matched no cross-attention layer; "
                         f"query grids seen: {levels}; layers: {sorted(grids)}")
    return chosen


def grid_probabilities(query: torch.Tensor, key: torch.Tensor, scale: float, extra_tokens: int = 0) -> torch.Tensor:
    """Explicit attention probabilities (B, heads, N_q, N_grid) in float32 (or float64 if given),
    softmax over the grid keys only (the first ``extra_tokens`` keys dropped), the monitor's
    convention. q (B, heads, N_q, d), k (B, heads, N_k, d), as `LastAttention` keeps them."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    q, k = query.to(dtype), key[:, :, extra_tokens:].to(dtype)
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)


def _cells(reference_grid: tuple[int, int], device, dtype) -> torch.Tensor:
    """(h_r * w_r, 2) key positions (row, col) in key-cell units, row-major like the tokens."""
    h, w = reference_grid
    rows = torch.arange(h, device=device, dtype=dtype)
    cols = torch.arange(w, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(h * w, 2)


def _check_probs(probs: torch.Tensor, reference_grid: tuple[int, int]) -> None:
    if probs.ndim != 4 or probs.shape[-1] != reference_grid[0] * reference_grid[1]:
        raise ValueError(f"the authors' recipe: probabilities must be (B, heads, N_q, N_grid) with N_grid = "
                         f"{reference_grid[0]}x{reference_grid[1]}, got {tuple(probs.shape)}")


def cell_centres(probs: torch.Tensor, reference_grid: tuple[int, int]) -> torch.Tensor:
    """Centres c (B, N_q, 2) = (row, col) of the head-mean probabilities, in key-cell units."""
    _check_probs(probs, reference_grid)
    return probs.mean(1) @ _cells(reference_grid, probs.device, probs.dtype)


def centres_from_mu(mu: torch.Tensor, reference_grid: tuple[int, int]) -> torch.Tensor:
    """The same centres from the monitor's per-head ``mu`` (B, heads, N_q, 2) in [0, 1]: the
    centre is linear in the probabilities, so the head mean of mu is the centre of the head-mean
    probabilities; u = (r + 0.5) / h_r becomes r = u * h_r - 0.5. TV and DCML need nothing else,
    so they can run on the fused centres without a probability matrix."""
    scale = torch.tensor(reference_grid, device=mu.device, dtype=mu.dtype)
    return mu.mean(1) * scale - 0.5


def _qmask(qmask: torch.Tensor | None, b: int, n_q: int, device, dtype) -> torch.Tensor:
    if qmask is None:
        return torch.ones(b, n_q, device=device, dtype=dtype)
    if qmask.shape != (b, n_q):
        raise ValueError(f"the authors' recipe: query mask must be ({b}, {n_q}), got {tuple(qmask.shape)}")
    return qmask.to(device=device, dtype=dtype)


def cwg(probs: torch.Tensor, reference_grid: tuple[int, int], qmask: torch.Tensor | None = None,
        sigma: float = SIGMA) -> torch.Tensor:
    """Unweighted CWG: mean over (b, i, j) of M_i Abar_ij exp(-||p_j - c_i|| / (2 sigma^2))."""
    _check_probs(probs, reference_grid)
    b, _, n_q, n_k = probs.shape
    abar = probs.mean(1)                                           # (B, N_q, N_grid)
    p = _cells(reference_grid, probs.device, probs.dtype)
    c = abar @ p                                                   # (B, N_q, 2), with graph
    dist = torch.linalg.vector_norm(p.view(1, 1, n_k, 2) - c.unsqueeze(2), dim=-1)  # not squared
    m = _qmask(qmask, b, n_q, probs.device, probs.dtype)
    return (m.unsqueeze(-1) * abar * torch.exp(-dist / (2 * sigma**2))).mean()


def tv(centres: torch.Tensor, grid: tuple[int, int], qmask: torch.Tensor | None = None) -> torch.Tensor:
    """Unweighted TV of centres (B, N_q, 2): squared neighbour differences, both ends in the mask,
    averaged over all vertical (resp. horizontal) pairs and both coordinates, then added."""
    b, n_q, _ = centres.shape
    h, w = grid
    if n_q != h * w:
        raise ValueError(f"the authors' recipe: {n_q} centres but the query grid {tuple(grid)} has {h * w}")
    c = centres.reshape(b, h, w, 2)
    m = _qmask(qmask, b, n_q, centres.device, centres.dtype).reshape(b, h, w, 1)
    total = centres.sum() * 0
    if h > 1:
        total = total + ((c[:, 1:] - c[:, :-1]).square() * (m[:, 1:] * m[:, :-1])).mean()
    if w > 1:
        total = total + ((c[:, :, 1:] - c[:, :, :-1]).square() * (m[:, :, 1:] * m[:, :, :-1])).mean()
    return total


def dcml(centres: torch.Tensor, grid: tuple[int, int], qmask: torch.Tensor | None = None) -> torch.Tensor:
    """Unweighted DCML of centres (B, N_q, 2) = (y, x): sum over in-mask pairs of relu(x_j - x_i),
    j right of i in the same row, and relu(y_j - y_i), j below i in the same column, over B * N_q^2.

    Only same-row and same-column pairs contribute, so the sums run per row (w x w) and per
    column (h x h) instead of over the N_q x N_q pair matrix."""
    b, n_q, _ = centres.shape
    h, w = grid
    if n_q != h * w:
        raise ValueError(f"the authors' recipe: {n_q} centres but the query grid {tuple(grid)} has {h * w}")
    c = centres.reshape(b, h, w, 2)
    m = _qmask(qmask, b, n_q, centres.device, centres.dtype).reshape(b, h, w)
    x, y = c[..., 1], c[..., 0]
    # rows: [b, r, a, a'] = relu(x[b, r, a'] - x[b, r, a]) for a' > a
    right = torch.triu(torch.ones(w, w, device=c.device, dtype=c.dtype), diagonal=1)
    rows = F.relu(x.unsqueeze(-2) - x.unsqueeze(-1)) * (m.unsqueeze(-1) * m.unsqueeze(-2)) * right
    # columns: [b, col, a, a'] = relu(y[b, a', col] - y[b, a, col]) for a' > a
    below = torch.triu(torch.ones(h, h, device=c.device, dtype=c.dtype), diagonal=1)
    yt, mt = y.transpose(1, 2), m.transpose(1, 2)
    cols = F.relu(yt.unsqueeze(-2) - yt.unsqueeze(-1)) * (mt.unsqueeze(-1) * mt.unsqueeze(-2)) * below
    return (rows.sum() + cols.sum()) / (b * n_q * n_q)


def authors_loss(probs: torch.Tensor, grid: tuple[int, int], reference_grid: tuple[int, int],
                 qmask: torch.Tensor | None = None, keep: torch.Tensor | None = None, *,
                 cwg_weight: float = CWG_WEIGHT, tv_weight: float = TV_WEIGHT, dcml_weight: float = DCML_WEIGHT,
                 sigma: float = SIGMA) -> tuple[torch.Tensor, Metrics]:
    """CWG + TV + DCML of one layer with the authors' weights: ``(loss, metrics)``.

    Args:
        probs: (B, heads, N_q, N_grid) attention probabilities over the garment grid, with
            graph (`grid_probabilities`).
        grid: the layer's query grid (h, w); reference_grid: the garment token grid (h_r, w_r).
        qmask: (B, N_q) booleans, the worn-garment mask on the query grid; None = every query.
        keep: (B,) booleans, the samples that count (False for guidance-dropped ones).

    Metrics: the unweighted terms ``loss/cwg``, ``loss/tv``, ``loss/dcml`` and the weighted
    total ``loss/authors``, detached. No kept sample: 0 without gradient, not NaN.
    """
    _check_probs(probs, reference_grid)
    if probs.shape[2] != grid[0] * grid[1]:
        raise ValueError(f"the authors' recipe: {probs.shape[2]} queries but the query grid {tuple(grid)} "
                         f"has {grid[0] * grid[1]}")
    if keep is not None:
        if keep.shape != (probs.shape[0],):
            raise ValueError(f"the authors' recipe: keep must be ({probs.shape[0]},), got {tuple(keep.shape)}")
        keep = keep.to(device=probs.device, dtype=torch.bool)
        if not bool(keep.any()):
            zero = probs.sum() * 0
            return zero, {k: zero.detach() for k in ("loss/cwg", "loss/tv", "loss/dcml", "loss/authors")}
        probs = probs[keep]
        qmask = qmask[keep.to(qmask.device)] if qmask is not None else None
    centres = cell_centres(probs, reference_grid)
    terms = {"loss/cwg": cwg(probs, reference_grid, qmask, sigma),
             "loss/tv": tv(centres, grid, qmask),
             "loss/dcml": dcml(centres, grid, qmask)}
    loss = cwg_weight * terms["loss/cwg"] + tv_weight * terms["loss/tv"] + dcml_weight * terms["loss/dcml"]
    metrics = {k: v.detach() for k, v in terms.items()}
    metrics["loss/authors"] = loss.detach()
    return loss, metrics
