"""Fused attention statistics vs explicit formulas, and the stability loss's behaviour."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from i2am.dispersion import (atv, attention_moments, attention_moments_explicit, attention_with_moments,
                             cell_centres, concentration, masked_mean, query_mask)
from configs.schema import StabilityConfig
from losses.stability import StabilityLoss


def _qk(b=2, heads=3, grid=(4, 3), ref=(5, 4), extra=1, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, grid[0] * grid[1], d, generator=g).requires_grad_()
    k = (2 * torch.randn(b, heads, extra + ref[0] * ref[1], d, generator=g)).requires_grad_()
    return q, k


def _explicit_dispersion(q, k, scale, ref, extra, mask_q=None):
    """Straight from the notes, with python loops over queries: no shared code with the package."""
    b, heads, nq, _ = q.shape
    hr, wr = ref
    total, count = 0.0, 0
    for bi in range(b):
        for h in range(heads):
            scores = (q[bi, h] @ k[bi, h, extra:].T) * scale
            a = torch.softmax(scores, dim=-1)  # over grid tokens only
            for i in range(nq):
                if mask_q is not None and not mask_q[bi, i]:
                    continue
                p = torch.tensor([[(j // wr + 0.5) / hr, (j % wr + 0.5) / wr] for j in range(hr * wr)])
                mu = (a[i, :, None] * p).sum(0)
                total = total + (a[i] * ((p - mu) ** 2).sum(-1)).sum()
                count += 1
    return total / count


def test_cell_centres_follow_the_notes():
    p = cell_centres((2, 4))
    assert torch.allclose(p[5], torch.tensor([(1 + 0.5) / 2, (1 + 0.5) / 4]))


@pytest.mark.parametrize("extra", [0, 1])
def test_fused_dispersion_equals_explicit_formula_and_gradients(extra):
    q, k = _qk(extra=extra)
    scale, ref = 0.4, (5, 4)
    mask = torch.zeros(2, 1, 8, 6)
    mask[0, :, 2:6, 1:5] = 1
    mask[1, :, :4] = 1
    qm = query_mask(mask, (4, 3), 2)
    _, var = attention_moments(q, k, scale, ref, extra)
    fused = masked_mean(var, qm)
    explicit = _explicit_dispersion(q, k, scale, ref, extra, qm)
    assert torch.allclose(fused, explicit, atol=1e-5)
    g_fused = torch.autograd.grad(fused, (q, k))
    g_expl = torch.autograd.grad(explicit, (q, k))
    for a, b in zip(g_fused, g_expl):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_fused_moments_match_explicit_matrix_version():
    q, k = _qk(b=1, heads=2, grid=(6, 5), ref=(7, 3), extra=2)
    mu_f, var_f = attention_moments(q, k, 0.3, (7, 3), 2)
    mu_e, var_e = attention_moments_explicit(q, k, 0.3, (7, 3), 2)
    assert torch.allclose(mu_f, mu_e, atol=1e-6) and torch.allclose(var_f, var_e, atol=1e-6)


@pytest.mark.parametrize("extra,d", [(0, 8), (2, 5)])
def test_moments_inside_the_layer_attention_equal_plain_attention_and_explicit_formulas(extra, d):
    """One SDPA call with the coordinates as extra value columns: the layer output is plain
    attention (over all keys, extra tokens included), the moments are the grid-only ones."""
    q, k = _qk(b=2, heads=3, grid=(6, 5), ref=(7, 3), extra=extra, d=d)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(3)).requires_grad_()
    scale = d ** -0.5
    out, mu, var, anchored = attention_with_moments(q, k, v, None, scale, (7, 3), extra)
    assert anchored is None
    plain = F.scaled_dot_product_attention(q, k, v)
    mu_e, var_e = attention_moments_explicit(q, k, scale, (7, 3), extra)
    assert out.shape == plain.shape
    assert torch.allclose(out, plain, atol=1e-6)
    assert torch.allclose(mu, mu_e, atol=1e-5) and torch.allclose(var, var_e, atol=1e-5)
    # Gradients of a loss on the output and on both statistics, w.r.t. q, k and v.
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    folded = (out * w).sum() + var.sum() + mu.square().sum()
    separate = (plain * w).sum() + var_e.sum() + mu_e.square().sum()
    for a, b in zip(torch.autograd.grad(folded, (q, k, v)), torch.autograd.grad(separate, (q, k, v))):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_moments_inside_attention_in_bfloat16_stay_close_to_float32():
    """Centred coordinates keep E||p||^2 - ||mu||^2 usable in bf16 autocast precision."""
    q, k = _qk(b=1, heads=2, grid=(8, 6), ref=(8, 6), extra=0, d=16)
    v = torch.randn(k.shape)
    _, mu, var, _ = attention_with_moments(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, 0.25, (8, 6))
    mu_e, var_e = attention_moments_explicit(q, k, 0.25, (8, 6))
    assert mu.dtype == var.dtype == torch.float32
    assert (var - var_e).abs().max() < 0.02 * var_e.max()  # bf16 keeps 8 bits: compare at ~1 %
    assert (mu - mu_e).abs().max() < 0.01


def test_moments_refuse_keys_that_do_not_match_the_grid():
    q, k = _qk(ref=(5, 4), extra=1)
    with pytest.raises(ValueError, match="21 keys but reference_grid \\(4, 4\\) has 16 cells"):
        attention_with_moments(q, k, k, None, 0.4, (4, 4), 1)


def test_atv_equals_explicit_neighbour_sum_and_gradients():
    q, k = _qk(grid=(4, 3))
    scale, ref, extra = 0.4, (5, 4), 1
    mask = torch.ones(2, 1, 4, 3)
    mask[0, 0, 0, 0] = 0
    qm = query_mask(mask, (4, 3), 2)
    mu, _ = attention_moments(q, k, scale, ref, extra)
    fused = atv(mu, (4, 3), qm)
    # explicit: head-averaged probabilities -> centres -> |c_a - c_b|_1 over in-mask neighbour pairs
    probs = torch.softmax(q @ k[:, :, extra:].transpose(-1, -2) * scale, -1).mean(1)
    c = (probs @ cell_centres(ref)).reshape(2, 4, 3, 2)
    m = qm.reshape(2, 4, 3)
    diffs = []
    for bi in range(2):
        for y in range(4):
            for x in range(3):
                for dy, dx in ((1, 0), (0, 1)):
                    if y + dy < 4 and x + dx < 3 and m[bi, y, x] and m[bi, y + dy, x + dx]:
                        diffs.append((c[bi, y, x] - c[bi, y + dy, x + dx]).abs().sum())
    explicit = torch.stack(diffs).mean()
    assert torch.allclose(fused, explicit, atol=1e-6)
    for a, b in zip(torch.autograd.grad(fused, (q, k)), torch.autograd.grad(explicit, (q, k))):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_concentration_is_one_for_a_point_mass_and_lower_when_spread():
    q = torch.zeros(1, 1, 2, 4)
    k = torch.zeros(1, 1, 9, 4)
    k[0, 0, 4, 0] = 50.0  # the centre cell of a 3x3 grid
    q[0, 0, 0, 0] = 1.0   # query 0 attends to it only; query 1 attends uniformly
    conc = concentration(q, k, 1.0, (3, 3), sigma=0.05)
    assert conc[0, 0, 0] == pytest.approx(1.0, abs=1e-5) and conc[0, 0, 1] < 0.2


def test_mask_selects_queries_and_empty_mask_is_zero():
    var = torch.arange(12.0).view(1, 2, 6)
    qm = torch.tensor([[True, False, False, False, False, True]])
    assert masked_mean(var, qm) == pytest.approx((0 + 5 + 6 + 11) / 4)
    assert masked_mean(var, torch.zeros(1, 6, dtype=torch.bool)) == 0


class _Last:
    def __init__(self, q, k, grid, ref=(5, 4), extra=1, scale=0.4):
        self.query, self.key, self.grid, self.reference_grid = q, k, grid, ref
        self.extra_tokens, self.scale, self.heads = extra, scale, q.shape[1]


def _stats():
    q1, k1 = _qk(grid=(4, 3), seed=1)
    q2, k2 = _qk(grid=(2, 2), seed=2)
    return {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor": _Last(q1, k1, (4, 3)),
            "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor": _Last(q2, k2, (2, 2))}


def test_loss_logs_dispersion_with_zero_weight_and_has_no_gradient_path():
    loss, metrics = StabilityLoss(StabilityConfig())(_stats(), None)
    assert float(loss) == 0 and not loss.requires_grad
    assert {"i2am/dispersion/down0.0", "i2am/dispersion/up1.0", "i2am/dispersion/mean"} <= set(metrics)


def test_layer_selection_by_name_and_resolution_level():
    stats = _stats()
    by_level = StabilityLoss(StabilityConfig(dispersion=1.0, layers=["2x2"]))
    loss, metrics = by_level(stats, None)
    assert float(loss.detach()) == pytest.approx(float(metrics["i2am/dispersion/up1.0"]), rel=1e-6)
    both = StabilityLoss(StabilityConfig(dispersion=1.0))
    loss_all, m = both(stats, None)
    expected = (m["i2am/dispersion/up1.0"] + m["i2am/dispersion/down0.0"]) / 2
    assert float(loss_all.detach()) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="matched no layer.*4x3"):
        StabilityLoss(StabilityConfig(dispersion=1.0, layers=["8x8"]))(stats, None)


def test_unknown_or_self_attention_layer_is_a_config_error():
    monitored = list(_stats())
    with pytest.raises(ValueError, match="attn1"):
        StabilityLoss(StabilityConfig(dispersion=1.0, layers=["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]),
                      monitored=monitored)


def test_timestep_window_and_warmup():
    stats = _stats()
    loss_fn = StabilityLoss(StabilityConfig(dispersion=1.0, t_max=500, warmup_steps=10))
    early, _ = loss_fn(stats, None, torch.tensor([100, 900]), step=5)
    assert float(early) == 0  # warm-up
    late, m = loss_fn(stats, None, torch.tensor([100, 900]), step=10)
    # only sample 0 (t=100 < 500) counts
    only0 = StabilityLoss(StabilityConfig(dispersion=1.0))(
        {n: _Last(s.query[:1], s.key[:1], s.grid) for n, s in stats.items()}, None)[0]
    assert float(late.detach()) == pytest.approx(float(only0.detach()), rel=1e-5)


def test_nan_in_statistic_names_the_layer():
    stats = _stats()
    name = next(iter(stats))
    stats[name].query = stats[name].query.detach().clone()
    stats[name].query[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="down_blocks.0.attentions.0"):
        StabilityLoss(StabilityConfig(dispersion=1.0))(stats, None)
