"""Leffa's flow loss against a per-pixel loop with hand-written bilinear interpolation,
finite differences, and hand-worked warps (identity, one-pixel and half-pixel shifts)."""
from __future__ import annotations

import math

import pytest
import torch

from losses.flow import flow_field, flow_loss, keep_samples


def _bilinear(img: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """img (C, H, W) at continuous pixel coordinates (y, x), pixel centres at integers,
    coordinates clamped to the image (edge pixels repeat), written out by hand."""
    _, h, w = img.shape
    y = y.clamp(0, h - 1)
    x = x.clamp(0, w - 1)
    y0, x0 = int(math.floor(float(y.detach()))), int(math.floor(float(x.detach())))
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    wy, wx = y - y0, x - x0
    return ((1 - wy) * (1 - wx) * img[:, y0, x0] + (1 - wy) * wx * img[:, y0, x1]
            + wy * (1 - wx) * img[:, y1, x0] + wy * wx * img[:, y1, x1])


def _explicit_flow_loss(mu, grid, garment, target, mask, keep=None):
    """Straight from the definition, one output pixel at a time; no code shared with the package.

    Query cell (r, c) has its centre at pixel ((r + 0.5) * H / h - 0.5, ...): the bilinear
    upsampling reads the centre field at source position (i + 0.5) * h / H - 0.5. The garment
    pixel (r, c) has relative centre ((r + 0.5) / Hg, (c + 0.5) / Wg), so a relative
    coordinate u is at pixel u * Hg - 0.5."""
    b, _, _, _ = mu.shape
    h, w = grid
    _, ch, hh, ww = target.shape
    hg, wg = garment.shape[-2:]
    total, count = 0.0, 0.0
    for bi in range(b):
        if keep is not None and not keep[bi]:
            continue
        centres = mu[bi].mean(0).reshape(h, w, 2).permute(2, 0, 1)  # (2, h, w)
        for i in range(hh):
            for j in range(ww):
                if not mask[bi, 0, i, j]:
                    continue
                sy = torch.tensor((i + 0.5) * h / hh - 0.5, dtype=mu.dtype)
                sx = torch.tensor((j + 0.5) * w / ww - 0.5, dtype=mu.dtype)
                fy, fx = _bilinear(centres, sy, sx)
                warped = _bilinear(garment[bi], fy * hg - 0.5, fx * wg - 0.5)
                total = total + ((warped - target[bi, :, i, j]) ** 2).sum()
                count += ch
    return total / count


def _case(seed=0, b=2, heads=2, grid=(3, 2), size=(6, 5), gsize=(5, 4)):
    g = torch.Generator().manual_seed(seed)
    # centres inside the garment, as real attention centres are
    mu = (0.1 + 0.8 * torch.rand(b, heads, grid[0] * grid[1], 2, generator=g, dtype=torch.float64))
    garment = torch.rand(b, 3, *gsize, generator=g, dtype=torch.float64) * 2 - 1
    target = torch.rand(b, 3, *size, generator=g, dtype=torch.float64) * 2 - 1
    mask = torch.rand(b, 1, *size, generator=g) > 0.4
    return mu.requires_grad_(), garment, target, mask


def test_flow_loss_equals_per_pixel_loop_with_hand_bilinear():
    mu, garment, target, mask = _case()
    loss, metrics = flow_loss(mu, (3, 2), garment, target, mask)
    explicit = _explicit_flow_loss(mu, (3, 2), garment, target, mask)
    assert abs(float(loss.detach()) - float(explicit.detach())) <= 1e-5 * max(1.0, abs(float(explicit.detach())))
    assert float(metrics["flow/pixels"]) == float(mask.sum())
    g_fn, = torch.autograd.grad(loss, mu)
    g_ex, = torch.autograd.grad(explicit, mu)
    assert (g_fn - g_ex).abs().max() <= 1e-4 * g_ex.abs().max()


def test_flow_loss_gradient_matches_finite_differences():
    mu, garment, target, mask = _case(seed=1)

    def f(m):
        return flow_loss(m, (3, 2), garment, target, mask)[0]

    analytic, = torch.autograd.grad(f(mu), mu)
    eps = 1e-6
    numeric = torch.zeros_like(analytic)
    flat = mu.detach().clone().view(-1)
    for idx in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus[idx] += eps
        minus[idx] -= eps
        numeric.view(-1)[idx] = (f(plus.view_as(mu)) - f(minus.view_as(mu))) / (2 * eps)
    assert (analytic - numeric).abs().max() <= 1e-4 * numeric.abs().max()


def _identity_mu(grid, b=1, heads=3):
    h, w = grid
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    p = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(1, 1, h * w, 2)
    return p.expand(b, heads, -1, -1).clone()


def test_identity_mapping_on_the_pixel_grid_costs_nothing():
    g = torch.Generator().manual_seed(2)
    garment = torch.rand(1, 3, 4, 5, generator=g, dtype=torch.float64)
    loss, _ = flow_loss(_identity_mu((4, 5)), (4, 5), garment, garment.clone(), torch.ones(1, 1, 4, 5))
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-12)


def test_identity_mapping_upsampled_is_exact_away_from_the_border():
    """Query grid 4x3, image 16x12: inside, bilinear upsampling of the linear identity field is
    the identity; within half a query cell (2 pixels) of the border the interpolation clamps."""
    g = torch.Generator().manual_seed(3)
    garment = torch.rand(1, 3, 16, 12, generator=g, dtype=torch.float64)
    inner = torch.zeros(1, 1, 16, 12, dtype=torch.bool)
    inner[..., 2:14, 2:10] = True
    loss, _ = flow_loss(_identity_mu((4, 3)), (4, 3), garment, garment.clone(), inner)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-12)
    border, _ = flow_loss(_identity_mu((4, 3)), (4, 3), garment, garment.clone(), ~inner)
    assert float(border.detach()) > 1e-3  # the clamped band really is a different warp


@pytest.mark.parametrize("shift,axis,expected", [
    (1.0, "x", 0.3**2 * 4 / 5),   # one pixel right: error a everywhere but the last column
    (0.5, "x", 0.15**2 * 4 / 5),  # half a pixel: bilinear gives a / 2; the last column clamps to 0
    (1.0, "y", 0.7**2 * 3 / 4),   # one pixel down: error b everywhere but the last row
])
def test_shifted_mapping_gives_the_hand_worked_value(shift, axis, expected):
    """Garment = target = a*x + b*y (a = 0.3, b = 0.7 per pixel) on a 4x5 image, query grid =
    pixel grid. Warping by +s pixels along an axis reads the ramp s pixels further, an error of
    a*s (or b*s) per channel, except in the last column (row), where the border repeats."""
    h, w = 4, 5
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    ramp = (0.3 * xs + 0.7 * ys).expand(1, 3, h, w).clone()
    mu = _identity_mu((h, w), heads=2)
    if axis == "x":
        mu[..., 1] += shift / w
    else:
        mu[..., 0] += shift / h
    loss, _ = flow_loss(mu, (h, w), ramp, ramp.clone(), torch.ones(1, 1, h, w))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9)


def test_collapse_onto_one_cell_is_not_a_minimum_for_a_patterned_garment():
    """Every query at the garment's middle warps one flat colour: stripes are lost."""
    h, w = 8, 6
    stripes = (torch.arange(h, dtype=torch.float64) % 2 * 2 - 1).view(1, 1, h, 1).expand(1, 3, h, w).clone()
    mask = torch.ones(1, 1, h, w)
    collapsed = torch.full((1, 2, h * w, 2), 0.5, dtype=torch.float64)
    right, _ = flow_loss(_identity_mu((h, w)), (h, w), stripes, stripes.clone(), mask)
    wrong, _ = flow_loss(collapsed, (h, w), stripes, stripes.clone(), mask)
    # at y = 0.5 (between rows 3 and 4, values +1 and -1) bilinear gives 0: error 1 everywhere
    assert float(right.detach()) == pytest.approx(0.0, abs=1e-12) and float(wrong.detach()) == pytest.approx(1.0, rel=1e-9)


def test_keep_mask_drops_samples_and_an_empty_selection_is_zero():
    mu, garment, target, mask = _case(seed=4)
    loss, _ = flow_loss(mu, (3, 2), garment, target, mask, keep=torch.tensor([False, True]))
    explicit = _explicit_flow_loss(mu, (3, 2), garment, target, mask, keep=[False, True])
    assert abs(float(loss.detach()) - float(explicit.detach())) <= 1e-5 * abs(float(explicit.detach()))
    none, metrics = flow_loss(mu, (3, 2), garment, target, mask, keep=torch.tensor([False, False]))
    assert float(none.detach()) == 0.0 and float(metrics["flow/pixels"]) == 0.0
    g, = torch.autograd.grad(none, mu)
    assert torch.equal(g, torch.zeros_like(g))


def test_keep_samples_combines_the_timestep_window_and_guidance_dropping():
    t = torch.tensor([100, 700, 200, 499])
    dropped = torch.tensor([False, False, True, False])
    assert keep_samples(4) is None
    assert keep_samples(4, timesteps=t, t_max=500).tolist() == [True, False, True, True]
    assert keep_samples(4, dropped=dropped).tolist() == [True, True, False, True]
    assert keep_samples(4, timesteps=t, t_max=500, dropped=dropped).tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="dropped must be \\(4,\\)"):
        keep_samples(4, dropped=torch.tensor([True]))


def test_flow_field_holds_y_then_x():
    mu = torch.zeros(1, 1, 6, 2)
    mu[..., 0], mu[..., 1] = 0.25, 0.75
    f = flow_field(mu, (3, 2), (6, 4))
    assert f.shape == (1, 2, 6, 4)
    assert torch.allclose(f[0, 0], torch.full((6, 4), 0.25)) and torch.allclose(f[0, 1], torch.full((6, 4), 0.75))


def test_shapes_that_do_not_fit_are_named():
    mu, garment, target, mask = _case()
    with pytest.raises(ValueError, match="6 queries but the query grid \\(2, 2\\) has 4"):
        flow_loss(mu, (2, 2), garment, target, mask)
    with pytest.raises(ValueError, match="worn_mask must be \\(2, 1, 6, 5\\)"):
        flow_loss(mu, (3, 2), garment, target, mask[..., :4])
    with pytest.raises(ValueError, match="keep must be \\(2,\\)"):
        flow_loss(mu, (3, 2), garment, target, mask, keep=torch.tensor([True]))
