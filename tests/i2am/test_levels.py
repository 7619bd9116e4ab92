"""Every map level against the naive implementation in naive.py (to 1e-5)."""

from __future__ import annotations

import pytest
import torch

from i2am import AttentionMonitor
from i2am._stats import attention_statistics

from . import naive
from .conftest import INNER, LATENT, one_thread

REF_GRID = (3, 4)
EXTRA = 1
TIMESTEPS = [999, 750, 400, 120, 10]
GRIDS = {LATENT[0] * LATENT[1]: LATENT, INNER[0] * INNER[1]: INNER}


def _subset(names):
    # three layers: outer (11×9) down, mid (6×5), outer up; all 8 heads
    wanted = ("down_blocks.0.", "mid_block.", "up_blocks.1.attentions.1.")
    return [n for n in names if n.startswith(wanted)]


def _run(unet, monitor_kwargs, seed=0, capture_names=None):
    """Five UNet calls like a sampler: new latents, descending timesteps."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(2, EXTRA + REF_GRID[0] * REF_GRID[1], 32, generator=g)
    cap = naive.Capture(unet, capture_names) if capture_names else None
    try:
        with AttentionMonitor(unet, REF_GRID, extra_tokens=EXTRA, **monitor_kwargs) as mon, torch.no_grad():
            for i, t in enumerate(TIMESTEPS):
                x = torch.randn(2, 4, *LATENT, generator=g)
                if i % 2:  # timestep positional or keyword: both must be read
                    unet(x, t, cond)
                else:
                    unet(sample=x, timestep=torch.tensor([t, t]), encoder_hidden_states=cond)
            maps = mon.maps()
    finally:
        if cap:
            cap.close()
    return maps, cap


@pytest.fixture(scope="module")
def recorded(tiny_unet, cross_names):
    layers = _subset(cross_names)
    with one_thread():
        maps, cap = _run(tiny_unet, dict(layers=layers, chunk_size=16), capture_names=layers)
        per_step = naive.per_step_maps(tiny_unet, cap, EXTRA, GRIDS)
    return layers, maps, per_step


def _close(actual, expected):
    torch.testing.assert_close(actual, expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("direction", ["r2g", "g2r", "daam"])
def test_every_level_matches_naive(recorded, direction):
    layers, maps, per_step = recorded
    assert maps.layer_names == layers and maps.num_steps == len(TIMESTEPS)
    out_grid = REF_GRID if direction == "g2r" else LATENT
    for groups in (2, 3, 5):
        ref = naive.levels(per_step, direction, out_grid, REF_GRID, groups)
        _close(maps.time_level(direction, groups=groups), ref["time"])
    _close(maps.unified(direction), ref["unified"])
    _close(maps.head_level(direction), ref["head"])
    got_layers = maps.layer_level(direction)
    assert list(got_layers) == layers
    for name in layers:
        _close(got_layers[name], ref["layer"][name])
    assert maps.unified(direction).shape == (2, *out_grid)
    assert maps.head_level(direction).shape == (2, 8, *out_grid)


def test_specific_reference_matches_naive(recorded):
    layers, maps, per_step = recorded
    grids = {n: maps.layers[n].query_grid for n in layers}
    assert grids[layers[0]] == LATENT and INNER in grids.values()
    box = (2, 1, 7, 5)
    mask = torch.zeros(LATENT, dtype=torch.bool)
    mask[2:7, 1:5] = True
    expected = naive.specific_reference(per_step, mask, grids, REF_GRID)
    _close(maps.specific_reference(box), expected)
    _close(maps.specific_reference(mask), expected)
    # One cell that nearest-resizing misses on the 6×5 layers: the centre rule picks it up.
    cell = torch.zeros(LATENT, dtype=torch.bool)
    cell[2, 2] = True
    small = torch.nn.functional.interpolate(cell[None, None].float(), size=INNER, mode="nearest")
    assert not small.any()
    _close(maps.specific_reference(cell), naive.specific_reference(per_step, cell, grids, REF_GRID))
    # (6, 6) is missed too and its centre (6.5, 6.5) lands at 3.55, 3.61 on 6×5: floor, not round
    cell = torch.zeros(LATENT, dtype=torch.bool)
    cell[6, 6] = True
    _close(maps.specific_reference(cell), naive.specific_reference(per_step, cell, grids, REF_GRID))
    assert maps.specific_reference(cell).shape == (2, *REF_GRID)


def test_timesteps_from_positional_keyword_and_tensor(recorded):
    _, maps, _ = recorded
    assert [t[0] for t in maps.timesteps] == TIMESTEPS


def test_grouped_recording_is_exact_for_its_groups(tiny_unet, cross_names, recorded):
    """num_steps known: 2 bins instead of 5, same unified and 2-group maps."""
    layers, per_step_maps, per_step = recorded
    maps, _ = _run(tiny_unet, dict(layers=layers, num_steps=len(TIMESTEPS), time_groups=2,
                                   pair_layers=[layers[-1]]))
    assert maps.layers[layers[0]].r2g.shape[0] == 2
    # only the last layer kept its pair matrix: specific_reference averages over it alone
    assert [n for n, lm in maps.layers.items() if lm.pair is not None] == [layers[-1]]
    box = torch.zeros(LATENT, dtype=torch.bool)
    box[0:3, 0:3] = True
    _close(maps.specific_reference(box), naive.specific_reference(
        {layers[-1]: per_step[layers[-1]]}, box, {layers[-1]: maps.layers[layers[-1]].query_grid}, REF_GRID))
    for d in ("r2g", "g2r", "daam"):
        torch.testing.assert_close(maps.unified(d), per_step_maps.unified(d), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(maps.time_level(d, 2), per_step_maps.time_level(d, 2), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(maps.time_level(d, 1)[:, 0], per_step_maps.unified(d), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="time_level\\(groups=3\\).*time_groups=3"):
        maps.time_level("r2g", groups=3)


def test_chunked_equals_unchunked(tiny_unet, cross_names, recorded):
    layers, chunked, _ = recorded  # chunk_size=16 < 99 queries: both chunk loops ran
    whole, _ = _run(tiny_unet, dict(layers=layers, chunk_size=10_000))
    for d in ("r2g", "g2r", "daam"):
        torch.testing.assert_close(chunked.unified(d), whole.unified(d), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked.specific_reference((0, 0, 4, 4)), whole.specific_reference((0, 0, 4, 4)),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_statistics_with_mask_against_explicit(chunk):
    """attention_statistics, any chunking, with an additive per-query mask and a
    -inf key, against full softmax matrices."""
    g = torch.Generator().manual_seed(3)
    B, h, n_q, n_k, d, E = 2, 3, 12, 7, 5, 2
    q, k = torch.randn(B, h, n_q, d, generator=g), torch.randn(B, h, n_k, d, generator=g)
    mask = torch.randn(B, h, n_q, n_k, generator=g)
    mask[..., 4] = float("-inf")  # a key nobody may attend to
    scale = 0.37
    s = (q.double() @ k.double().transpose(-1, -2)) * scale + mask.double()
    pk, pq = s.softmax(-1), s.softmax(-2).nan_to_num(0.0)
    r2g, g2r, daam, pair = attention_statistics(q, k, scale, E, chunk, mask)
    torch.testing.assert_close(r2g, pq[..., E:].mean(-1).float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g2r, pk[..., E:].mean(-2).float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(daam, pk[..., E:].mean(-1).float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pair, pk[..., E:].mean(1).float(), atol=1e-6, rtol=1e-5)
    assert r2g[..., :].abs().sum() > 0 and (pq[..., 4] == 0).all()


def test_unequal_heads_mean_over_layer_head_pairs(mixed_heads_unet):
    """Unified = mean over all (layer, head) pairs, not mean of layer means (2- and 4-head layers)."""
    names = [n for n in mixed_heads_unet.attn_processors if n.endswith("attn2.processor")]
    g = torch.Generator().manual_seed(5)
    cond = torch.randn(1, 12, 32, generator=g)
    cap = naive.Capture(mixed_heads_unet, names)
    try:
        with AttentionMonitor(mixed_heads_unet, REF_GRID) as mon, torch.no_grad():
            for t in (900, 300):
                mixed_heads_unet(torch.randn(1, 4, *LATENT, generator=g), t, cond)
            maps = mon.maps()
    finally:
        cap.close()
    per_step = naive.per_step_maps(mixed_heads_unet, cap, 0, GRIDS)
    assert sorted({lm.heads for lm in maps.layers.values()}) == [2, 4]
    for d in ("r2g", "g2r"):
        ref = naive.levels_without_heads(per_step, d, REF_GRID if d == "g2r" else LATENT, REF_GRID)
        _close(maps.unified(d), ref["unified"])
        for name, m in maps.layer_level(d).items():
            _close(m, ref["layer"][name])


def test_bicubic_undershoot_is_clamped_per_map():
    """A sharp 3×3 map upsampled bicubic to 6×6 goes negative; each (layer, head) map is clamped."""
    from i2am.maps import AttributionMaps, LayerMaps

    spike = torch.zeros(1, 1, 2, 9)  # (bins, B, heads, N_q): head 0 a centre spike, head 1 flat
    spike[..., 0, 4] = 1.0
    spike[..., 1, :] = 0.1
    big = torch.rand(1, 1, 2, 36, generator=torch.Generator().manual_seed(0))
    g2r = torch.rand(1, 1, 2, 4, generator=torch.Generator().manual_seed(1))
    maps = AttributionMaps({"a": LayerMaps(2, (6, 6), big, g2r, big), "b": LayerMaps(2, (3, 3), spike, g2r, spike)},
                           [(0, 1)], reference_grid=(2, 2))
    up = torch.nn.functional.interpolate(spike[0].reshape(1, 2, 3, 3), (6, 6), mode="bicubic", align_corners=False)
    assert up.min() < -1e-3  # the clamp matters here
    expected = (big[0].reshape(1, 2, 6, 6).sum(1) + up.clamp(min=0).sum(1)) / 4
    torch.testing.assert_close(maps.unified("r2g"), expected)
    torch.testing.assert_close(maps.layer_level("r2g")["b"], up.clamp(min=0).mean(1))


@pytest.mark.parametrize("chunk", [3, 100])
@pytest.mark.parametrize("scale, paths", [(0.37, (True, True)), (5.0, (False, True)), (40.0, (False, False))])
def test_statistics_without_mask_against_explicit(chunk, scale, paths, monkeypatch):
    """No mask. Chunk 100 takes the one-exponential path: without max shift for
    small scores, with one shift per (batch, head) for larger ones, and falls
    back to chunked softmaxes when the scores span too much (scale 40)."""
    from i2am import _stats

    taken = []
    one_exp = _stats._one_exp
    monkeypatch.setattr(_stats, "_one_exp", lambda *a: taken.append((a[2], one_exp(*a))) or taken[-1][1])
    g = torch.Generator().manual_seed(4)
    B, h, n_q, n_k, d, E = 2, 3, 20, 9, 6, 1
    q, k = torch.randn(B, h, n_q, d, generator=g), torch.randn(B, h, n_k, d, generator=g)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    pk, pq = s.softmax(-1), s.softmax(-2)
    r2g, g2r, daam, pair = attention_statistics(q, k, scale, E, chunk)
    for got, want in ((r2g, pq[..., E:].mean(-1)), (g2r, pk[..., E:].mean(-2)), (daam, pk[..., E:].mean(-1)),
                      (pair, pk[..., E:].mean(1))):
        torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-5)
    assert taken == ([] if chunk < n_q else [paths])
