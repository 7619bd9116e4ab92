"""Per-forward attention statistics of one layer, memory-bounded and cheap.

The two directions need two different softmaxes of the same scores S:
over keys (G2R, DAAM, pair) and over queries (R2G). On CPU and GPU alike the
cost is passes over score-sized buffers, so we keep them few:

* no max subtraction when it cannot matter: by Cauchy-Schwarz every score
  satisfies |S_ij| <= max_i |q_i| · max_j |k_j|; when that bound is <= 64,
  exp(S) can neither overflow nor underflow in float32 (e^±64, summed over
  < 1e6 tokens), so the softmax is exp, sum, divide: exact, like the
  max-shifted one (the shift cancels);
* when the whole score matrix fits the chunk budget and no mask is given,
  one exponential serves both normalisations (P_key = E / rowsum,
  P_query = E / colsum), the reductions being matrix-vector products. With
  large scores the exponential takes a single offset per (batch, head),
  which is exact as long as no row or column max is far below it; we check
  that and fall back otherwise;
* otherwise query chunks (softmax over keys) and key chunks (softmax over
  queries) of at most ``chunk_size × N_k`` scores per (batch, head).

Every score buffer is updated in place, so at most one score-sized buffer is
alive: extra memory O(batch × heads × chunk × N_k) floats. A :class:`Workspace`
keeps that buffer between calls: on CPU every fresh large tensor is new
mmapped memory whose page faults cost as much as the matmul filling it.
"""

from __future__ import annotations

import math

import torch

# exp(-60) ≈ 9e-27 is still a normal float32; entries that underflow then are
# below exp(-27) ≈ 2e-12 of their own row/column maximum.
_MAX_OFFSET = 60.0
# |S| <= 64: exp(S) in [1.6e-28, 6.2e27], sums of up to 1e6 of them stay finite.
_DIRECT_EXP_BOUND = 64.0


class Workspace:
    """One reusable float32 buffer for score chunks (grows, never shrinks)."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        if self._buf is None or self._buf.numel() < n or self._buf.device != device:
            self._buf = None  # free the old one before allocating the new one
            self._buf = torch.empty(n, device=device)
        return self._buf[:n].view(shape)

    @property
    def nbytes(self) -> int:
        return 0 if self._buf is None else self._buf.numel() * 4

    def release(self) -> None:
        self._buf = None


def attention_statistics(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    extra_tokens: int,
    chunk_size: int,
    mask: torch.Tensor | None = None,
    want_pair: bool = True,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """R2G, G2R, DAAM (and pair) statistics of one layer for one forward.

    ``query`` (B, h, N_q, d), ``key`` (B, h, N_k, d); the first ``extra_tokens``
    keys are not on the reference grid; ``mask`` is additive (or boolean),
    broadcastable to (B, h, N_q, N_k). Returns

    * r2g (B, h, N_q): softmax over queries, mean over the grid keys;
    * g2r (B, h, N_g): softmax over all keys, mean over queries, grid columns;
    * daam (B, h, N_q): softmax over all keys, mean over the grid columns;
    * pair (B, N_q, N_g) or None: softmax over all keys, head mean, grid columns.
    """
    ws = workspace if workspace is not None else Workspace()
    # float32 so fp16 models still sum probabilities accurately; q carries the scale.
    q = query.float() * scale
    kt = key.float().transpose(-1, -2)
    B, h, n_q, _ = q.shape
    n_k = kt.shape[-1]
    E, n_g = extra_tokens, n_k - extra_tokens
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    elif mask is not None:
        mask = mask.float()

    direct = mask is None and bool(
        (q.norm(dim=-1).amax() * kt.norm(dim=-2).amax() <= _DIRECT_EXP_BOUND).item())

    r2g = torch.zeros(B, h, n_q, device=q.device)
    g2r = torch.zeros(B, h, n_g, device=q.device)
    daam = torch.empty(B, h, n_q, device=q.device)
    pair = torch.empty(B, n_q, n_g, device=q.device) if want_pair else None

    if n_q <= chunk_size and mask is None:
        s = torch.matmul(q, kt, out=ws.take((B, h, n_q, n_k), q.device))
        if _one_exp(s, E, direct, r2g, g2r, daam, pair):
            return r2g, g2r, daam, pair
        del s

    for i0 in range(0, n_q, chunk_size):
        i1 = min(i0 + chunk_size, n_q)
        s = torch.matmul(q[:, :, i0:i1], kt, out=ws.take((B, h, i1 - i0, n_k), q.device))
        if mask is not None:
            s.add_(mask if mask.shape[-2] == 1 else mask[..., i0:i1, :])
        p = _softmax_(s, -1, direct)[..., E:]
        g2r += p.sum(dim=-2)
        daam[:, :, i0:i1] = p.sum(dim=-1) / n_g
        if pair is not None:
            pair[:, i0:i1] = p.mean(dim=1)
        del s, p
    g2r /= n_q

    # Key chunks for the softmax over queries, same budget: ck × N_q <= chunk × N_k.
    ck = max(1, chunk_size * n_k // n_q)
    for j0 in range(E, n_k, ck):
        j1 = min(j0 + ck, n_k)
        s = torch.matmul(q, kt[..., j0:j1], out=ws.take((B, h, n_q, j1 - j0), q.device))
        if mask is not None:
            s.add_(mask[..., j0:j1])
        p = _softmax_(s, -2, direct)
        if mask is not None:
            p.nan_to_num_(0.0)  # a key masked for every query: 0/0, read as "attends nowhere"
        r2g += p.sum(dim=-1)
        del s, p
    r2g /= n_g
    return r2g, g2r, daam, pair


def _softmax_(s: torch.Tensor, dim: int, direct: bool) -> torch.Tensor:
    """Softmax in place (no second score-sized buffer)."""
    if not direct:
        s.sub_(s.amax(dim=dim, keepdim=True))
    s.exp_()
    return s.div_(s.sum(dim=dim, keepdim=True))


def _one_exp(s: torch.Tensor, E: int, direct: bool, r2g: torch.Tensor, g2r: torch.Tensor,
             daam: torch.Tensor, pair: torch.Tensor | None) -> bool:
    """Both softmaxes from one exponential of the full (B, h, N_q, N_k) scores.

    Returns False (``s`` left unusable) when the scores are not ``direct``ly
    exponentiable and some row or grid column max is more than
    ``_MAX_OFFSET`` below its (batch, head) max.
    """
    n_q, n_g = s.shape[-2], s.shape[-1] - E
    if not direct:
        row_max = s.amax(dim=-1)
        col_max = s[..., E:].amax(dim=-2)
        top = row_max.amax(dim=-1, keepdim=True)  # (B, h, 1)
        spread = torch.maximum((top - row_max).amax(), (top - col_max).amax())
        if spread.item() > _MAX_OFFSET:
            return False
        s.sub_(top.unsqueeze(-1))
    e = s.exp_()
    g = e[..., E:]
    grid_row = g.sum(dim=-1)  # (B, h, N_q)
    inv_row = 1.0 / (grid_row + e[..., :E].sum(dim=-1)) if E else 1.0 / grid_row
    # Matrix-vector products over the whole contiguous buffer (a zero weight
    # for the extra columns) avoid copying the non-contiguous grid slice.
    inv_col = torch.zeros(e.shape[:2] + (1, e.shape[-1]), device=e.device)
    inv_col[..., E:] = 1.0 / g.sum(dim=-2, keepdim=True)
    r2g += torch.matmul(e, inv_col.transpose(-1, -2)).squeeze(-1) / n_g  # Σ_j E_ij / colsum_j
    daam.copy_(grid_row * inv_row / n_g)
    p = e.mul_(inv_row.unsqueeze(-1))[..., E:]  # the softmax over keys, in place
    g2r += p.sum(dim=-2) / n_q
    if pair is not None:
        pair.copy_(p.sum(dim=1) / s.shape[1])
    return True
