"""The I²AM authors' CWG + TV + DCML against explicit loops, gradients, and the degenerate
cases: a collapse scores 0 for DCML and the most for CWG; an order-preserving spread scores
below 0 once weighted."""
from __future__ import annotations

import math

import pytest
import torch

from i2am.dispersion import attention_moments_explicit
from losses.authors import (CWG_WEIGHT, DCML_WEIGHT, TV_WEIGHT, authors_layers, authors_loss, cell_centres,
                            centres_from_mu, cwg, dcml, grid_probabilities, tv)

GRID, REF = (3, 4), (3, 2)  # query grid (h, w), garment grid (h_r, w_r)


def _qk(b=2, heads=2, extra=1, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, GRID[0] * GRID[1], d, generator=g, dtype=torch.float64).requires_grad_()
    k = (2 * torch.randn(b, heads, extra + REF[0] * REF[1], d, generator=g, dtype=torch.float64)).requires_grad_()
    return q, k


def _mask(b=2):
    m = torch.ones(b, GRID[0] * GRID[1], dtype=torch.bool)
    m[0, [0, 5]] = False
    m[1, 11] = False
    return m


def _explicit(q, k, scale, extra, qmask, samples=None, sigma=1.0):
    """The three unweighted terms written as loops over samples, queries and keys, from the
    definitions in the module docstring; nothing shared with the package."""
    b, heads, n_q, _ = q.shape
    h, w = GRID
    hr, wr = REF
    n_k = hr * wr
    samples = list(range(b)) if samples is None else samples
    cwg_sum, tv_y, tv_x, dcml_sum = 0.0, 0.0, 0.0, 0.0
    for bi in samples:
        abar = sum(torch.softmax(q[bi, hd] @ k[bi, hd, extra:].T * scale, dim=-1) for hd in range(heads)) / heads
        cells = [(j // wr, j % wr) for j in range(n_k)]
        c = []
        for i in range(n_q):
            cy = sum(abar[i, j] * cells[j][0] for j in range(n_k))
            cx = sum(abar[i, j] * cells[j][1] for j in range(n_k))
            c.append((cy, cx))
            if qmask[bi, i]:
                for j in range(n_k):
                    dist = torch.sqrt((cells[j][0] - cy) ** 2 + (cells[j][1] - cx) ** 2)
                    cwg_sum = cwg_sum + abar[i, j] * torch.exp(-dist / (2 * sigma**2))
        for r in range(h):
            for col in range(w):
                i = r * w + col
                if r + 1 < h and qmask[bi, i] and qmask[bi, i + w]:
                    tv_y = tv_y + (c[i + w][0] - c[i][0]) ** 2 + (c[i + w][1] - c[i][1]) ** 2
                if col + 1 < w and qmask[bi, i] and qmask[bi, i + 1]:
                    tv_x = tv_x + (c[i + 1][0] - c[i][0]) ** 2 + (c[i + 1][1] - c[i][1]) ** 2
        for i in range(n_q):
            for j in range(n_q):
                if not (qmask[bi, i] and qmask[bi, j]):
                    continue
                (ri, ci), (rj, cj) = divmod(i, w), divmod(j, w)
                if ri == rj and cj > ci:
                    dcml_sum = dcml_sum + torch.relu(c[j][1] - c[i][1])
                if ci == cj and rj > ri:
                    dcml_sum = dcml_sum + torch.relu(c[j][0] - c[i][0])
    nb = len(samples)
    return (cwg_sum / (nb * n_q * n_k),
            tv_y / (nb * (h - 1) * w * 2) + tv_x / (nb * h * (w - 1) * 2),
            dcml_sum / (nb * n_q * n_q))


@pytest.mark.parametrize("extra", [0, 1])
def test_each_term_equals_explicit_loops_with_gradients(extra):
    q, k = _qk(extra=extra)
    scale, qm = 0.5, _mask()
    probs = grid_probabilities(q, k, scale, extra)
    centres = cell_centres(probs, REF)
    ours = (cwg(probs, REF, qm), tv(centres, GRID, qm), dcml(centres, GRID, qm))
    theirs = _explicit(q, k, scale, extra, qm)
    for name, a, b in zip(("cwg", "tv", "dcml"), ours, theirs):
        a_, b_ = float(a.detach()), float(b.detach())
        assert abs(a_ - b_) <= 1e-5 * max(1.0, abs(b_)), name
        assert b_ > 0, name  # the case exercises every term
        ga = torch.autograd.grad(a, (q, k), retain_graph=True)
        gb = torch.autograd.grad(b, (q, k), retain_graph=True)
        for x, y in zip(ga, gb):
            assert (x - y).abs().max() <= 1e-4 * y.abs().max(), name


def test_weighted_total_and_metrics():
    q, k = _qk(seed=1)
    qm = _mask()
    loss, metrics = authors_loss(grid_probabilities(q, k, 0.5, 1), GRID, REF, qm)
    c, t, d = _explicit(q, k, 0.5, 1, qm)
    expected = -2.0 * c + 1e-4 * t - 0.01 * d
    assert (CWG_WEIGHT, TV_WEIGHT, DCML_WEIGHT) == (-2.0, 1e-4, -0.01)
    assert abs(float(loss.detach()) - float(expected.detach())) <= 1e-5 * abs(float(expected.detach()))
    assert float(metrics["loss/cwg"]) == pytest.approx(float(c.detach()), rel=1e-9)
    assert float(metrics["loss/authors"]) == pytest.approx(float(expected.detach()), rel=1e-9)
    ga = torch.autograd.grad(loss, (q, k))
    gb = torch.autograd.grad(expected, (q, k))
    for x, y in zip(ga, gb):
        assert (x - y).abs().max() <= 1e-4 * y.abs().max()


def test_guidance_dropped_samples_are_skipped():
    q, k = _qk(b=3, seed=2)
    qm = torch.ones(3, GRID[0] * GRID[1], dtype=torch.bool)
    probs = grid_probabilities(q, k, 0.5, 1)
    loss, _ = authors_loss(probs, GRID, REF, qm, keep=torch.tensor([True, False, True]))
    c, t, d = _explicit(q, k, 0.5, 1, qm, samples=[0, 2])
    assert float(loss.detach()) == pytest.approx(float((-2.0 * c + 1e-4 * t - 0.01 * d).detach()), rel=1e-9)
    none, metrics = authors_loss(probs, GRID, REF, qm, keep=torch.zeros(3, dtype=torch.bool))
    assert float(none.detach()) == 0.0 and float(metrics["loss/dcml"]) == 0.0
    g, = torch.autograd.grad(none, q)
    assert torch.equal(g, torch.zeros_like(g))


def _centres(fn, b=1):
    h, w = GRID
    c = torch.tensor([[fn(r, col) for r in range(h) for col in range(w)]], dtype=torch.float64)
    return c.expand(b, -1, -1)


def test_dcml_collapse_scores_zero_and_an_order_preserving_spread_scores_below_zero():
    h, w = GRID  # 3 x 4
    collapse = _centres(lambda r, col: (1.0, 0.5))
    assert float(dcml(collapse, GRID)) == 0.0 and float(tv(collapse, GRID)) == 0.0
    spread = _centres(lambda r, col: (float(r), float(col)))  # c_i = i's own (row, col)
    # rows: h * sum_{a<a'} (a' - a) = h (w^3 - w) / 6; columns: w (h^3 - h) / 6; over N_q^2
    hand = (h * (w**3 - w) / 6 + w * (h**3 - h) / 6) / (h * w) ** 2
    assert float(dcml(spread, GRID)) == pytest.approx(hand, rel=1e-12)  # = (30 + 16) / 144
    assert DCML_WEIGHT * float(dcml(spread, GRID)) < 0
    reversed_ = _centres(lambda r, col: (float(h - r), float(w - col)))
    assert float(dcml(reversed_, GRID)) == 0.0  # relu: only order-preserving pairs count
    # TV of the unit spread: every neighbour differs by 1 in one coordinate
    assert float(tv(spread, GRID)) == pytest.approx((h - 1) * w / ((h - 1) * w * 2) + h * (w - 1) / (h * (w - 1) * 2))


def test_cwg_scores_a_point_mass_highest_whatever_cell_it_is():
    """A one-hot attention has its centre on its cell: each query contributes exp(0) = 1, so
    the mean over (i, j) is 1 / N_grid; a uniform attention scores lower. The weighted term
    -2.0 * CWG is thus lowest for a collapse, which is why it needs DCML beside it."""
    n_q, n_k = GRID[0] * GRID[1], REF[0] * REF[1]
    for cell in (0, 4):
        onehot = torch.zeros(1, 2, n_q, n_k, dtype=torch.float64)
        onehot[..., cell] = 1
        assert float(cwg(onehot, REF)) == pytest.approx(1 / n_k, rel=1e-12)
    uniform = torch.full((1, 2, n_q, n_k), 1 / n_k, dtype=torch.float64)
    # centre (y, x) = (1, 0.5): distances 1/2 (x2 cells) and sqrt(1/4 + 1) (x4 cells) in key-cell units
    expected = (2 * math.exp(-0.5 / 2) + 4 * math.exp(-math.sqrt(1.25) / 2)) / n_k / n_k
    assert float(cwg(uniform, REF)) == pytest.approx(expected, rel=1e-12) and expected < 1 / n_k


def test_centres_from_the_monitors_mu_equal_the_explicit_ones():
    q, k = _qk(seed=3)
    mu, _ = attention_moments_explicit(q, k, 0.5, REF, 1)
    explicit = cell_centres(grid_probabilities(q, k, 0.5, 1), REF).float()  # the monitor's mu is float32
    assert torch.allclose(centres_from_mu(mu, REF), explicit, atol=1e-5)


def test_layer_choice_defaults_to_the_decoder_layers_at_16x12():
    grids = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor": (16, 12),
             "up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor": (8, 6),
             "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor": (16, 12),
             "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor": (16, 12)}
    assert authors_layers(grids) == list(grids)[2:]
    assert authors_layers(grids, ["16x12"]) == [list(grids)[0]] + list(grids)[2:]
    assert authors_layers(grids, ["up_blocks.1.attentions.1.transformer_blocks.0.attn2"]) == [list(grids)[3]]
    with pytest.raises(ValueError, match="matched no cross-attention layer; query grids seen: \\['16x12', '8x6'\\]"):
        authors_layers(grids, ["32x24"])
    with pytest.raises(ValueError, match="decoder layers at 16x12"):
        authors_layers({"up_blocks.1.attentions.0.attn2": (8, 6)})


def test_shapes_that_do_not_fit_are_named():
    q, k = _qk()
    probs = grid_probabilities(q, k, 0.5, 1)
    with pytest.raises(ValueError, match="N_grid = 2x2"):
        authors_loss(probs, GRID, (2, 2))
    with pytest.raises(ValueError, match="12 queries but the query grid \\(4, 4\\)"):
        authors_loss(probs, (4, 4), REF)
    with pytest.raises(ValueError, match="query mask must be \\(2, 12\\)"):
        authors_loss(probs, GRID, REF, torch.ones(2, 6, dtype=torch.bool))
