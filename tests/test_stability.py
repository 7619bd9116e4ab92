"""Fused attention statistics vs explicit formulas, and the stability loss's behaviour."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from i2am.dispersion import (anchored_variance, atv, attention_anchored, attention_anchored_explicit, attention_moments,
                             attention_moments_explicit, attention_with_moments, cell_centres, colour_anchors,
                             concentration, masked_mean, query_mask)
from configs.schema import StabilityConfig
from losses.stability import AttentionTargets, StabilityLoss


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


def test_moments_first_computed_under_inference_mode_still_train():
    """The coordinate columns are cached per grid: a first call under torch.inference_mode()
    (sampling with maps) must not leave an inference tensor that a later training step's
    backward cannot save. A grid no other test uses, so this call builds the cache entry."""
    ref = (7, 3)
    q, _ = _qk(extra=0)
    k = torch.randn(2, 3, 21, 8, requires_grad=True)
    with torch.inference_mode():
        attention_moments(q.detach(), k.detach(), 0.4, ref, 0)
    _, var = attention_moments(q, k, 0.4, ref, 0)
    grad, = torch.autograd.grad(var.mean(), k)
    assert grad.abs().sum() > 0


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
    out, mu, var, anchored, mass = attention_with_moments(q, k, v, None, scale, (7, 3), extra)
    assert anchored is None
    plain = F.scaled_dot_product_attention(q, k, v)
    mu_e, var_e = attention_moments_explicit(q, k, scale, (7, 3), extra)
    assert out.shape == plain.shape
    assert torch.allclose(out, plain, atol=1e-6)
    assert torch.allclose(mu, mu_e, atol=1e-5) and torch.allclose(var, var_e, atol=1e-5)
    # The grid mass (the 4th coordinate column): the softmax's share on the grid keys; without
    # extra tokens it is 1 and not returned.
    mass_e = torch.softmax(q @ k.mT * scale, dim=-1)[..., extra:].sum(-1)
    if extra:
        assert torch.allclose(mass, mass_e, atol=1e-5) and float(mass_e.detach().min()) < 0.9
    else:
        assert mass is None
        mass, mass_e = torch.ones(()), torch.ones(())
    # Gradients of a loss on the output and on the statistics, w.r.t. q, k and v.
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    folded = (out * w).sum() + var.sum() + mu.square().sum() + 3 * mass.sum()
    separate = (plain * w).sum() + var_e.sum() + mu_e.square().sum() + 3 * mass_e.sum()
    for a, b in zip(torch.autograd.grad(folded, (q, k, v)), torch.autograd.grad(separate, (q, k, v))):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_moments_inside_attention_in_bfloat16_stay_close_to_float32():
    """Centred coordinates keep E||p||^2 - ||mu||^2 usable in bf16 autocast precision."""
    q, k = _qk(b=1, heads=2, grid=(8, 6), ref=(8, 6), extra=0, d=16)
    v = torch.randn(k.shape)
    _, mu, var, _, _ = attention_with_moments(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, 0.25, (8, 6))
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


# ---------------------------------------------------------------------- anchored values and terms
def _anchors(b, n_grid, c=4, seed=5):
    return torch.randn(b, n_grid, c, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("extra,d", [(0, 8), (2, 5)])
def test_anchored_values_ride_along_in_the_layer_attention_and_equal_explicit_softmax(extra, d):
    """Per-sample anchor columns in the same SDPA call: the layer output is plain attention, the
    anchored outputs are sum_j A_ij a_j with A the softmax over the grid keys only; gradients of
    all three w.r.t. q, k and v match the explicit computation."""
    ref = (7, 3)
    q, k = _qk(b=2, heads=3, grid=(6, 5), ref=ref, extra=extra, d=d)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(3)).requires_grad_()
    a = _anchors(2, ref[0] * ref[1])
    scale = d ** -0.5
    out, mu, var, anchored, _ = attention_with_moments(q, k, v, None, scale, ref, extra, anchors=a)
    plain = F.scaled_dot_product_attention(q, k, v)
    probs = torch.softmax(q @ k[:, :, extra:].transpose(-1, -2) * scale, dim=-1)  # grid keys only
    explicit = torch.einsum("bhqj,bjc->bhqc", probs, a)
    _, var_e = attention_moments_explicit(q, k, scale, ref, extra)
    assert anchored.shape == (2, 3, 30, 4) and anchored.dtype == torch.float32
    assert torch.allclose(out, plain, atol=1e-6)
    assert torch.allclose(anchored, explicit, atol=1e-5)
    assert torch.allclose(var, var_e, atol=1e-5)
    g = torch.Generator().manual_seed(4)
    w_out, w_anc = torch.randn(out.shape, generator=g), torch.randn(anchored.shape, generator=g)
    fused = (out * w_out).sum() + (anchored * w_anc).sum() + var.sum()
    reference = (plain * w_out).sum() + (explicit * w_anc).sum() + var_e.sum()
    for x, y in zip(torch.autograd.grad(fused, (q, k, v)), torch.autograd.grad(reference, (q, k, v))):
        assert (x - y).abs().max() <= 1e-4 * y.abs().max()


def test_anchored_in_a_second_call_and_explicitly_equal_the_fused_ones():
    q, k = _qk(b=2, heads=2, grid=(4, 3), ref=(5, 4), extra=1, d=8)
    v = torch.randn(k.shape)
    a = _anchors(2, 20, c=3)
    fused = attention_with_moments(q, k, v, None, 0.3, (5, 4), 1, anchors=a).anchored
    assert torch.allclose(attention_anchored(q, k, 0.3, a, 1), fused, atol=1e-5)
    assert torch.allclose(attention_anchored_explicit(q, k, 0.3, a, 1), fused, atol=1e-5)


def test_anchors_that_do_not_match_batch_or_grid_are_refused():
    q, k = _qk(b=2, ref=(5, 4), extra=1)
    with pytest.raises(ValueError, match=r"anchors must be \(B=2, N_grid=20, C\).*got \(2, 21, 4\)"):
        attention_with_moments(q, k, k, None, 0.4, (5, 4), 1, anchors=_anchors(2, 21))
    with pytest.raises(ValueError, match=r"anchors must be \(B=2"):
        attention_with_moments(q, k, k, None, 0.4, (5, 4), 1, anchors=_anchors(1, 20))


IMAGE = (20, 12)  # divisible by the query grid (4, 3) -> 5x4-pixel cells and the reference grid (5, 4) -> 4x3


def _images(b=2, seed=7):
    """Garment, person, a worn mask covering a few whole and partial query cells, and garment
    positions on the worn pixels."""
    g = torch.Generator().manual_seed(seed)
    garment = torch.rand(b, 3, *IMAGE, generator=g) * 2 - 1
    person = torch.rand(b, 3, *IMAGE, generator=g) * 2 - 1
    worn = torch.zeros(b, 1, *IMAGE)
    worn[0, :, 3:17, 2:10] = 1   # partial cells at the edges: some count (>= half), some not
    worn[1, :, 5:20, 0:9] = 1
    pos = torch.rand(b, 2, *IMAGE, generator=g) * worn
    return garment, person, worn, pos


def _cell_means(img, grid, weight=None):
    """Explicit area means over the (H/h, W/w)-pixel cells, python loops: (B, h*w, C) and coverage."""
    b, c, hh, ww = img.shape
    h, w = grid
    ch, cw = hh // h, ww // w
    wt = torch.ones(b, 1, hh, ww) if weight is None else weight
    means, cover = torch.zeros(b, h * w, c), torch.zeros(b, h * w)
    for bi in range(b):
        for r in range(h):
            for col in range(w):
                px = img[bi, :, r * ch:(r + 1) * ch, col * cw:(col + 1) * cw]
                m = wt[bi, 0, r * ch:(r + 1) * ch, col * cw:(col + 1) * cw]
                cover[bi, r * w + col] = m.mean()
                if m.sum() > 0:
                    means[bi, r * w + col] = (px * m).sum((1, 2)) / m.sum()
    return means, cover


def _layer(q, k, grid, ref, extra, anchors, scale=0.4):
    """A LastAttention-like record with the statistics of one fused call, as the monitor keeps it."""
    v = torch.zeros(k.shape)
    _, mu, var, anchored, _ = attention_with_moments(q, k, v, None, scale, ref, extra, anchors=anchors)
    rec = _Last(q, k, grid, ref, extra, scale)
    rec.mu, rec.var, rec.anchors, rec.anchored = mu, var, anchors, anchored
    return rec


@pytest.mark.parametrize("extra", [0, 1])
def test_colour_term_equals_the_explicit_formula_with_gradients(extra):
    """colour = mean over worn queries of kept samples of sum_j A_ij ||g_j - y_i||^2: g_j the
    garment colour over key j's cell, y_i the true colour over query i's worn pixels, in [0, 1]."""
    grid, ref, scale = (4, 3), (5, 4), 0.4
    q, k = _qk(b=2, heads=3, grid=grid, ref=ref, extra=extra)
    garment, person, worn, _ = _images()
    keep = torch.tensor([True, True])
    layer = _layer(q, k, grid, ref, extra, colour_anchors(garment, ref), scale)
    targets = AttentionTargets(person, worn, keep=keep)
    fused, metrics = StabilityLoss(StabilityConfig(colour=1.0))({"down_blocks.0.attentions.0.x": layer}, None,
                                                                targets=targets)
    g, _ = _cell_means((garment + 1) / 2, ref)
    y, cover = _cell_means((person + 1) / 2, grid, worn)
    terms = []
    for bi in range(2):
        a_all = torch.softmax((q[bi] @ k[bi, :, extra:].mT) * scale, dim=-1)  # (heads, N_q, N_grid)
        for h in range(3):
            for i in range(12):
                if cover[bi, i] >= 0.5:
                    terms.append((a_all[h, i] * (g[bi] - y[bi, i]).square().sum(-1)).sum())
    explicit = torch.stack(terms).mean()
    assert len(terms) > 6 and torch.allclose(fused, explicit, atol=1e-5)
    assert float(metrics["i2am/colour_var/down0.0"]) == pytest.approx(float(explicit.detach()), abs=1e-5)
    for x, y_ in zip(torch.autograd.grad(fused, (q, k)), torch.autograd.grad(explicit, (q, k))):
        assert (x - y_).abs().max() <= 1e-4 * y_.abs().max()


@pytest.mark.parametrize("extra", [0, 1])
def test_position_term_and_centre_error_equal_the_explicit_formula_with_gradients(extra):
    """position = mean over worn queries of sum_j A_ij ||p_j - p*_i||^2 with p*_i the mean true
    garment position over query i's worn pixels; centre error = mean ||mu_i - p*_i||."""
    grid, ref, scale = (4, 3), (5, 4), 0.4
    q, k = _qk(b=2, heads=3, grid=grid, ref=ref, extra=extra)
    garment, person, worn, pos = _images()
    layer = _layer(q, k, grid, ref, extra, None, scale)
    fused, metrics = StabilityLoss(StabilityConfig(position=1.0))(
        {"up_blocks.1.attentions.0.x": layer}, None, targets=AttentionTargets(person, worn, pos))
    target, cover = _cell_means(pos, grid, worn)
    p = torch.tensor([[(j // ref[1] + 0.5) / ref[0], (j % ref[1] + 0.5) / ref[1]] for j in range(20)])
    terms, errors = [], []
    for bi in range(2):
        a_all = torch.softmax((q[bi] @ k[bi, :, extra:].mT) * scale, dim=-1)
        for h in range(3):
            for i in range(12):
                if cover[bi, i] >= 0.5:
                    terms.append((a_all[h, i] * (p - target[bi, i]).square().sum(-1)).sum())
                    errors.append(((a_all[h, i, :, None] * p).sum(0) - target[bi, i]).norm())
    explicit = torch.stack(terms).mean()
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert float(metrics["loss/position/up1.0"]) == pytest.approx(float(explicit.detach()), abs=1e-5)
    assert float(metrics["i2am/centre_error/up1.0"]) == pytest.approx(float(torch.stack(errors).mean().detach()), abs=1e-5)
    for x, y_ in zip(torch.autograd.grad(fused, (q, k)), torch.autograd.grad(explicit, (q, k))):
        assert (x - y_).abs().max() <= 1e-4 * y_.abs().max()


def test_anchored_terms_skip_guidance_dropped_samples_and_the_t_window():
    """A dropped sample (null tokens) or one outside t < t_max adds nothing to the anchored terms:
    the loss equals the one computed on the other sample alone."""
    grid, ref = (4, 3), (5, 4)
    q, k = _qk(b=2, heads=3, grid=grid, ref=ref, extra=1)
    garment, person, worn, pos = _images()
    cfg = StabilityConfig(colour=1.0, position=0.5)
    both = {"x": _layer(q, k, grid, ref, 1, colour_anchors(garment, ref))}
    only0 = {"x": _layer(q[:1], k[:1], grid, ref, 1, colour_anchors(garment[:1], ref))}
    alone = StabilityLoss(cfg)(only0, None, targets=AttentionTargets(person[:1], worn[:1], pos[:1]))[0].detach()
    dropped = StabilityLoss(cfg)(both, None, targets=AttentionTargets(person, worn, pos,
                                                                      keep=torch.tensor([True, False])))[0].detach()
    late = StabilityLoss(StabilityConfig(colour=1.0, position=0.5, t_max=500))(
        both, None, torch.tensor([100, 900]), targets=AttentionTargets(person, worn, pos))[0].detach()
    assert float(dropped) == pytest.approx(float(alone), rel=1e-6)
    assert float(late) == pytest.approx(float(alone), rel=1e-6)
    # With both samples kept, each counts by its number of worn queries.
    only1 = {"x": _layer(q[1:], k[1:], grid, ref, 1, colour_anchors(garment[1:], ref))}
    alone1 = StabilityLoss(cfg)(only1, None, targets=AttentionTargets(person[1:], worn[1:], pos[1:]))[0].detach()
    n = AttentionTargets(person, worn, pos).on_grid(grid)[0].sum(1).float()
    kept = StabilityLoss(cfg)(both, None, targets=AttentionTargets(person, worn, pos))[0].detach()
    assert float(kept) == pytest.approx(float((n[0] * alone + n[1] * alone1) / n.sum()), rel=1e-5)


def test_anchored_readings_are_logged_with_zero_weights_and_carry_no_gradient():
    grid, ref = (4, 3), (5, 4)
    q, k = _qk(grid=grid, ref=ref)
    garment, person, worn, pos = _images()
    stats = {"down_blocks.0.attentions.0.x": _layer(q, k, grid, ref, 1, colour_anchors(garment, ref))}
    loss, metrics = StabilityLoss(StabilityConfig())(stats, None, targets=AttentionTargets(person, worn, pos))
    assert float(loss) == 0 and not loss.requires_grad
    assert {"i2am/colour_var/down0.0", "i2am/colour_var/mean", "i2am/centre_error/down0.0",
            "i2am/centre_error/mean", "i2am/dispersion/mean"} <= set(metrics)
    assert not any(k.startswith("loss/position") for k in metrics)
    assert 0 < float(metrics["i2am/colour_var/mean"]) < 3 and 0 < float(metrics["i2am/centre_error/mean"]) < 1.5


def test_position_on_a_batch_without_garment_positions_is_refused():
    grid, ref = (4, 3), (5, 4)
    q, k = _qk(grid=grid, ref=ref)
    _, person, worn, _ = _images()
    with pytest.raises(ValueError, match="stability.position or stability.placement > 0 needs .*garment_pos"):
        StabilityLoss(StabilityConfig(position=1.0))({"x": _layer(q, k, grid, ref, 1, None)}, None,
                                                     targets=AttentionTargets(person, worn))


def test_worn_places_are_the_mean_person_position_of_each_cells_worn_pixels():
    """Hand-worked: a 4x2 person, three worn pixels; two show garment cell 0, one cell 3."""
    from i2am.dispersion import worn_places

    pos, worn = torch.zeros(1, 2, 4, 2), torch.zeros(1, 1, 4, 2)
    for (r, c), p in {(0, 0): (0.1, 0.1), (0, 1): (0.2, 0.3), (3, 1): (0.9, 0.9), (2, 0): (0.6, 0.1)}.items():
        pos[0, :, r, c] = torch.tensor(p)
        worn[0, 0, r, c] = float((r, c) != (2, 0))  # (2, 0) has a position but is not worn
    places, valid = worn_places(pos, worn, (2, 2))
    assert valid.tolist() == [[True, False, False, True]]
    torch.testing.assert_close(places[0, 0], torch.tensor([0.125, 0.5]))  # pixel centres (0.125, 0.25|0.75)
    torch.testing.assert_close(places[0, 3], torch.tensor([0.875, 0.75]))


@pytest.mark.parametrize("extra", [0, 1])
def test_placement_term_equals_the_explicit_r2g_formula_with_gradients(extra):
    """placement = mean over (kept sample, head, worn garment cell j) of
    sum_i softmax_i(k_j . q_i) ||x_i - x*_j||^2: x_i the query cell centres, x*_j the mean person
    position of the worn pixels showing cell j; the guidance-dropped sample adds nothing."""
    grid, ref, scale = (4, 3), (5, 4), 0.4
    q, k = _qk(b=2, heads=3, grid=grid, ref=ref, extra=extra)
    _, person, worn, pos = _images()
    keep = torch.tensor([True, False])
    layer = _layer(q, k, grid, ref, extra, None, scale)
    fused, metrics = StabilityLoss(StabilityConfig(placement=1.0, placement_cells=0))(
        {"up_blocks.1.attentions.0.x": layer}, None, targets=AttentionTargets(person, worn, pos, keep=keep))
    x = torch.tensor([[(i // grid[1] + 0.5) / grid[0], (i % grid[1] + 0.5) / grid[1]] for i in range(12)])
    terms, errors = [], []
    for bi in (0,):
        shown: dict[int, list[torch.Tensor]] = {}
        for r in range(IMAGE[0]):
            for c in range(IMAGE[1]):
                if worn[bi, 0, r, c] > 0:
                    row, col = int(pos[bi, 0, r, c] * ref[0]), int(pos[bi, 1, r, c] * ref[1])
                    j = min(row, ref[0] - 1) * ref[1] + min(col, ref[1] - 1)
                    shown.setdefault(j, []).append(torch.tensor([(r + 0.5) / IMAGE[0], (c + 0.5) / IMAGE[1]]))
        a = torch.softmax((k[bi, :, extra:] @ q[bi].mT) * scale, dim=-1)  # (heads, N_grid, N_q): over queries
        for h in range(3):
            for j, where in shown.items():
                target = torch.stack(where).mean(0)
                terms.append((a[h, j] * (x - target).square().sum(-1)).sum())
                errors.append(((a[h, j, :, None] * x).sum(0) - target).norm())
    explicit = torch.stack(terms).mean()
    assert len(terms) > 9 and torch.allclose(fused, explicit, atol=1e-5)
    assert float(metrics["loss/placement/up1.0"]) == pytest.approx(float(explicit.detach()), abs=1e-5)
    assert float(metrics["i2am/placement_error/up1.0"]) == pytest.approx(float(torch.stack(errors).mean().detach()), abs=1e-5)
    for got, want in zip(torch.autograd.grad(fused, (q, k)), torch.autograd.grad(explicit, (q, k))):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_sample_cells_draws_distinct_valid_cells_uniformly():
    from i2am.dispersion import sample_cells
    from losses.diffusion import uniform_draws

    cpu = torch.device("cpu")
    valid = torch.tensor([[True, False, True, True, False, True], [False, True, False, False, False, False]])
    counts = torch.zeros(6)
    for i in range(3000):
        cells = sample_cells(valid, 3, uniform_draws(torch.Generator().manual_seed(i), 2, cpu, 6))
        assert cells.shape == (2, 3)
        assert valid[0, cells[0]].all() and len(set(cells[0].tolist())) == 3
        assert 1 in cells[1].tolist()  # a sample with fewer valid cells than asked takes all of them
        counts[cells[0]] += 1
    # each of the 4 valid cells is drawn with probability 3/4: 2250 of 3000 (sd 24)
    assert counts[[0, 2, 3, 5]].sub(2250).abs().max() < 5 * 24 and counts[[1, 4]].sum() == 0
    # One generator per sample: each sample's cells depend on its own generator only, so the draw
    # is the same whichever batch (process, resume point) the sample lands in.
    gens = lambda: [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]  # noqa: E731
    both = sample_cells(valid, 3, uniform_draws(gens(), 2, cpu, 6))
    alone = sample_cells(valid[1:], 3, uniform_draws(gens()[1:], 1, cpu, 6))
    assert torch.equal(both[1:], alone)
    with pytest.raises(ValueError, match="1 generators for a batch of 2"):
        uniform_draws(gens()[:1], 2, cpu, 6)


def test_placement_over_sampled_cells_is_an_unbiased_estimate_of_every_cell():
    """placement_cells=n: the mean over n uniformly drawn worn cells of one sample, whose expectation
    is the mean over all of them (placement_cells=0, itself checked against the explicit formula
    above); averaged over 400 draws it lands within 4 standard errors."""
    grid, ref, scale = (4, 3), (5, 4), 0.4
    q, k = _qk(b=2, heads=3, grid=grid, ref=ref, extra=0)
    _, person, worn, pos = _images()
    targets = AttentionTargets(person, worn, pos, keep=torch.tensor([True, False]))
    shown = int(targets.places(ref)[1][0].sum())
    assert shown > 3
    layer = {"up_blocks.1.attentions.0.x": _layer(q, k, grid, ref, 0, None, scale)}
    with torch.no_grad():
        exact = float(StabilityLoss(StabilityConfig(placement=1.0, placement_cells=0))(layer, None, targets=targets)[0])
        torch.manual_seed(0)
        draws = torch.tensor([float(StabilityLoss(StabilityConfig(placement=1.0, placement_cells=2))(
            layer, None, targets=targets)[0]) for _ in range(400)])
    assert draws.std() > 0  # the draws differ: cells really are sampled
    assert abs(float(draws.mean()) - exact) < 4 * float(draws.std()) / 400 ** 0.5


def test_anchored_colours_in_bfloat16_stay_close_to_float32():
    """Centred colours keep s - 2 y.c + ||y||^2 usable when the layer runs in bf16 autocast."""
    grid, ref = (8, 6), (8, 6)
    q, k = _qk(b=2, heads=2, grid=grid, ref=ref, extra=0, d=16)
    v = torch.randn(k.shape)
    garment, person, worn, _ = _images()
    anchors = colour_anchors(garment, ref)
    y = AttentionTargets(person, worn).on_grid(grid)[1]
    half = attention_with_moments(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, 0.25, ref, anchors=anchors)
    full = attention_with_moments(q, k, v, None, 0.25, ref, anchors=anchors)
    assert half.anchored.dtype == torch.float32
    cv_half, cv_full = anchored_variance(half.anchored, y), anchored_variance(full.anchored, y)
    assert (cv_half - cv_full).abs().max() < 0.02 * cv_full.max()
