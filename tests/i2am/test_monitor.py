"""Attaching, detaching, memory, flatness, errors, save/load, last_attention."""

from __future__ import annotations

import pytest
import torch

from i2am import AttentionMonitor, AttributionMaps

from .conftest import LATENT

REF = (3, 4)


def _inputs(seed=0, batch=2, tokens=None, latent=LATENT):
    g = torch.Generator().manual_seed(seed)
    tokens = tokens if tokens is not None else REF[0] * REF[1]
    return torch.randn(batch, 4, *latent, generator=g), torch.randn(batch, tokens, 32, generator=g)


def _steps(unet, n, seed=0, **kw):
    x, c = _inputs(seed, **kw)
    with torch.no_grad():
        for t in torch.linspace(999, 0, n).long():
            unet(x, t, encoder_hidden_states=c)


def test_outputs_unchanged_and_processors_restored(tiny_unet):
    x, c = _inputs()
    before = dict(tiny_unet.attn_processors)
    with torch.no_grad():
        plain = tiny_unet(x, 500, c).sample
        with AttentionMonitor(tiny_unet, REF, keep_last=True) as mon:
            assert any(type(p).__name__ == "MonitorProcessor" for p in tiny_unet.attn_processors.values())
            monitored = tiny_unet(x, 500, c).sample
            assert mon.recorded_steps == 1
        after = tiny_unet(x, 500, c).sample
    torch.testing.assert_close(monitored, plain, atol=1e-5, rtol=0)
    assert torch.equal(after, plain)
    now = tiny_unet.attn_processors
    assert list(now) == list(before) and all(now[n] is before[n] for n in before)
    assert mon.recorded_steps == 1  # hooks removed: the call after close was not counted
    assert not tiny_unet._forward_pre_hooks and not tiny_unet._forward_hooks


def test_wrapped_non_default_processor(tiny_unet, cross_names):
    """A layer running another processor keeps it for the output; maps are the same."""
    from diffusers.models.attention_processor import AttnProcessor

    x, c = _inputs()
    with AttentionMonitor(tiny_unet, REF) as reference_mon, torch.no_grad():
        tiny_unet(x, 300, c)
        expected = reference_mon.maps()
    original = dict(tiny_unet.attn_processors)
    classic = {n: (AttnProcessor() if n in cross_names else p) for n, p in original.items()}
    tiny_unet.set_attn_processor(dict(classic))
    try:
        with torch.no_grad():
            plain = tiny_unet(x, 300, c).sample
            with AttentionMonitor(tiny_unet, REF) as mon:
                out = tiny_unet(x, 300, c).sample
                maps = mon.maps()
        assert torch.equal(out, plain)
        assert all(tiny_unet.attn_processors[n] is classic[n] for n in classic)
    finally:
        tiny_unet.set_attn_processor(original)
    for d in ("r2g", "g2r", "daam"):
        torch.testing.assert_close(maps.unified(d), expected.unified(d), atol=1e-5, rtol=1e-5)


def test_memory_constant_in_steps_with_num_steps(tiny_unet):
    with AttentionMonitor(tiny_unet, REF, num_steps=10, time_groups=5) as mon:
        _steps(tiny_unet, 2)
        after_two = mon.state_nbytes()
        x, c = _inputs(1)
        with torch.no_grad():
            for t in range(8):
                tiny_unet(x, 100 * t, c)
        assert mon.recorded_steps == 10
        assert mon.state_nbytes() == after_two > 0
        with pytest.raises(ValueError, match="num_steps=10"):
            _steps(tiny_unet, 1)
    # Without num_steps one bin per step is kept: memory grows (documented trade-off).
    with AttentionMonitor(tiny_unet, REF, pair_layers=False) as mon:
        _steps(tiny_unet, 2)
        two = mon.state_nbytes()
        _steps(tiny_unet, 8)
        assert mon.state_nbytes() == 5 * two


def test_score_buffer_bounded_by_chunk(tiny_unet):
    """The only score-sized memory is the reused buffer: <= B × heads × chunk × N_k floats."""
    chunk = 16
    with AttentionMonitor(tiny_unet, REF, chunk_size=chunk) as mon:
        _steps(tiny_unet, 2)
        assert 0 < mon._workspace.nbytes <= 2 * 8 * chunk * 12 * 4
    assert mon._workspace.nbytes == 0  # released on close


def test_daam_flat_without_extra_tokens_r2g_g2r_not(tiny_unet):
    """Softmax over keys sums to 1 per query: the per-query mean over keys is 1/N_k."""
    with AttentionMonitor(tiny_unet, REF) as mon:
        _steps(tiny_unet, 3)
        maps = mon.maps()
    daam = maps.unified("daam")
    torch.testing.assert_close(daam, torch.full_like(daam, 3 / 12), atol=1e-6, rtol=0)
    for name, m in maps.layer_level("daam").items():
        torch.testing.assert_close(m, torch.full_like(m, 3 / 12), atol=1e-6, rtol=0)
    for d in ("r2g", "g2r"):
        m = maps.unified(d)
        # random weights give soft attention: ~1 % relative spread, vs ~1e-7 for DAAM
        assert (m.flatten(1).std(1) / m.flatten(1).mean(1)).min() > 1e-3, d
    # With a CLS-like extra token the grid columns no longer sum to one: DAAM varies.
    with AttentionMonitor(tiny_unet, REF, extra_tokens=1) as mon:
        _steps(tiny_unet, 3, tokens=13)
        assert mon.maps().unified("daam").std() > 1e-4


def test_single_token_reference(tiny_unet):
    """Paint-by-Example's single pooled token: every key-softmax is exactly 1."""
    with AttentionMonitor(tiny_unet, (1, 1)) as mon:
        _steps(tiny_unet, 2, tokens=1)
        maps = mon.maps()
    torch.testing.assert_close(maps.unified("daam"), torch.full((2, *LATENT), 2.0))
    torch.testing.assert_close(maps.unified("g2r"), torch.full((2, 1, 1), 2.0))
    r2g = maps.unified("r2g")
    assert r2g.std() > 1e-3 * r2g.mean()


def test_layer_selection_by_name_and_predicate(tiny_unet, cross_names):
    short = cross_names[1].removesuffix(".processor")
    with AttentionMonitor(tiny_unet, REF, layers=[short]) as mon:
        assert mon.layers == [cross_names[1]]
    with AttentionMonitor(tiny_unet, REF, layers=lambda n: n.startswith("up_blocks")) as mon:
        assert mon.layers == [n for n in cross_names if n.startswith("up_blocks")]
        _steps(tiny_unet, 1)
        assert set(mon.maps().layer_level("r2g")) == set(mon.layers)


def test_errors(tiny_unet, mixed_heads_unet, cross_names):
    with pytest.raises(KeyError, match="unknown layer 'down_blocks.9.nope'.*cross-attention"):
        AttentionMonitor(tiny_unet, REF, layers=["down_blocks.9.nope"])
    attn1 = cross_names[0].replace("attn2", "attn1")
    with pytest.raises(ValueError, match="not a cross-attention layer"):
        AttentionMonitor(tiny_unet, REF, layers=[attn1])
    assert all(type(p).__name__ != "MonitorProcessor" for p in tiny_unet.attn_processors.values())

    with AttentionMonitor(tiny_unet, REF, extra_tokens=1) as mon:
        with pytest.raises(ValueError, match="expected reference_grid 3×4 \\+ extra_tokens 1 = 13"):
            _steps(tiny_unet, 1)  # 12 tokens
        mon.reset()
        with pytest.raises(ValueError, match="empty recording"):
            mon.maps()
        _steps(tiny_unet, 2, tokens=13)
        maps = mon.maps()
        with pytest.raises(ValueError, match="direction must be one of"):
            maps.unified("forward")
        with pytest.raises(ValueError, match="groups must be in 1..2"):
            maps.time_level("r2g", groups=3)
        with pytest.raises(ValueError, match="0 <= y0 < y1 <= 11"):
            maps.specific_reference((0, 0, 12, 2))
        with pytest.raises(ValueError, match="selects no cell"):
            maps.specific_reference(torch.zeros(LATENT, dtype=torch.bool))
        with pytest.raises(ValueError, match="latent grid changed"):
            _steps(tiny_unet, 1, tokens=13, latent=(8, 8))

    with AttentionMonitor(tiny_unet, REF, pair_layers=False) as mon:
        _steps(tiny_unet, 1)
        with pytest.raises(ValueError, match="specific_reference needs pair matrices"):
            mon.maps().specific_reference((0, 0, 2, 2))
        with pytest.raises(ValueError, match="keep_last=True"):
            mon.last_attention()

    with AttentionMonitor(mixed_heads_unet, REF) as mon:
        _steps(mixed_heads_unet, 1)
        maps = mon.maps()
        with pytest.raises(ValueError, match="same number of heads"):
            maps.head_level("r2g")
        assert maps.unified("r2g").shape == (2, *LATENT)  # the other levels still work


def test_batch_slice_records_chosen_samples(tiny_unet):
    x, c = _inputs()
    with AttentionMonitor(tiny_unet, REF) as full, torch.no_grad():
        tiny_unet(x, 10, c)
        both = full.maps()
    with AttentionMonitor(tiny_unet, REF, batch_slice=lambda b: slice(b // 2, b)) as half, torch.no_grad():
        tiny_unet(x, 10, c)
        second = half.maps()
    assert second.batch_size == 1
    for d in ("r2g", "g2r", "daam"):
        torch.testing.assert_close(second.unified(d)[0], both.unified(d)[1], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(both.unified(d)[0], both.unified(d)[1]) or d == "daam"


def test_save_load_round_trip(tiny_unet, tmp_path):
    with AttentionMonitor(tiny_unet, REF, num_steps=4, time_groups=2) as mon:
        _steps(tiny_unet, 3)  # fewer than announced: bins are clipped, not invented
        maps = mon.maps()
    assert maps.bin_bounds == [(0, 2), (2, 3)]
    path = tmp_path / "maps.safetensors"
    maps.save(path)
    back = AttributionMaps.load(path)
    assert back.layer_names == maps.layer_names and back.bin_bounds == maps.bin_bounds
    assert back.reference_grid == maps.reference_grid and back.latent_grid == maps.latent_grid
    assert back.timesteps == maps.timesteps and len(back.timesteps) == 3
    for d in ("r2g", "g2r", "daam"):
        assert torch.equal(back.unified(d), maps.unified(d))
        assert torch.equal(back.head_level(d), maps.head_level(d))
        assert torch.equal(back.time_level(d, 2), maps.time_level(d, 2))
    assert torch.equal(back.specific_reference((1, 1, 4, 4)), maps.specific_reference((1, 1, 4, 4)))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no 'i2am' metadata"):
        AttributionMaps.load(tmp_path / "other.safetensors")


def test_last_attention_keeps_graph(tiny_unet, cross_names):
    x, c = _inputs()
    with AttentionMonitor(tiny_unet, REF, keep_last=True, record=False) as mon:
        tiny_unet(x, 10, c)
        last = mon.last_attention()
        assert mon.recorded_steps == 0
    assert list(last) == cross_names
    first = last[cross_names[0]]
    assert first.query.shape == (2, 8, LATENT[0] * LATENT[1], 4) and first.key.shape == (2, 8, 12, 4)
    assert first.grid == LATENT and first.heads == 8 and first.query.requires_grad
    # The graph reaches the layer's projection weights.
    attn = tiny_unet.get_submodule(cross_names[0].removesuffix(".processor"))
    grad_q, = torch.autograd.grad(first.query.square().sum() + first.key.sum(), attn.to_q.weight)
    assert grad_q.abs().sum() > 0
    inner = last[[n for n in cross_names if n.startswith("mid_block")][0]]
    assert inner.grid == (6, 5)


def test_moments_come_from_the_layer_attention_call(tiny_unet, cross_names):
    """moments=True: each layer's own attention call yields its centres and dispersion; the
    UNet output stays the plain one; a layer on another processor falls back to None."""
    from diffusers.models.attention_processor import AttnProcessor

    from i2am.dispersion import attention_moments

    x, c = _inputs()
    with torch.no_grad():
        plain = tiny_unet(x, 200, c).sample
    with AttentionMonitor(tiny_unet, REF, moments=True, record=False) as mon:
        out = tiny_unet(x, 200, c).sample
        last = mon.last_attention()
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)
    assert list(last) == cross_names
    for s in last.values():
        mu, var = attention_moments(s.query, s.key, s.scale, s.reference_grid, s.extra_tokens)
        assert s.var.requires_grad and s.var.shape == s.query.shape[:3]
        torch.testing.assert_close(s.var, var, atol=1e-5, rtol=0)
        torch.testing.assert_close(s.mu, mu, atol=1e-5, rtol=0)
    original = dict(tiny_unet.attn_processors)
    tiny_unet.set_attn_processor({n: (AttnProcessor() if n == cross_names[0] else p) for n, p in original.items()})
    try:
        with AttentionMonitor(tiny_unet, REF, moments=True, record=False) as mon:
            tiny_unet(x, 200, c)
            last = mon.last_attention()
    finally:
        tiny_unet.set_attn_processor(original)
    assert last[cross_names[0]].var is None and last[cross_names[1]].var is not None


def test_anchors_ride_along_in_every_layer_attention_call(tiny_unet, cross_names):
    """set_anchors: per-sample values on the reference grid; each layer's own call returns
    sum_j A_ij a_j (checked against the explicit softmax of its kept q/k, with gradients), the
    UNet output stays the plain one, and the anchors stay until cleared."""
    from diffusers.models.attention_processor import AttnProcessor

    x, c = _inputs()
    anchors = torch.randn(2, REF[0] * REF[1], 3, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        plain = tiny_unet(x, 300, c).sample
    with AttentionMonitor(tiny_unet, REF, moments=True, record=False) as mon:
        mon.set_anchors(anchors)
        out = tiny_unet(x, 300, c).sample
        last = mon.last_attention()
        assert all(s.anchors is anchors for s in last.values())
        for s in last.values():
            probs = torch.softmax(s.query @ s.key.transpose(-1, -2) * s.scale, dim=-1)
            explicit = torch.einsum("bhqj,bjc->bhqc", probs, anchors)
            assert s.anchored.shape == (*s.query.shape[:3], 3)
            torch.testing.assert_close(s.anchored, explicit, atol=1e-5, rtol=0)
            w = torch.randn(explicit.shape, generator=torch.Generator().manual_seed(1))
            got = torch.autograd.grad((s.anchored * w).sum(), (s.query, s.key), retain_graph=True)
            want = torch.autograd.grad((explicit * w).sum(), (s.query, s.key), retain_graph=True)
            for a, b in zip(got, want):
                assert (a - b).abs().max() <= 1e-4 * b.abs().max()
        with pytest.raises(ValueError, match=r"anchors are \(2, 12, 3\) but the layer runs a batch of 4"):
            x4, c4 = _inputs(batch=4)
            tiny_unet(x4, 300, c4)
        mon.set_anchors(None)
        tiny_unet(x, 300, c)
        assert all(s.anchors is None and s.anchored is None for s in mon.last_attention().values())
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)
    # A layer on another processor keeps the anchors but computes nothing in its call.
    original = dict(tiny_unet.attn_processors)
    tiny_unet.set_attn_processor({n: (AttnProcessor() if n == cross_names[0] else p) for n, p in original.items()})
    try:
        with AttentionMonitor(tiny_unet, REF, moments=True, record=False) as mon:
            mon.set_anchors(anchors)
            tiny_unet(x, 300, c)
            last = mon.last_attention()
    finally:
        tiny_unet.set_attn_processor(original)
    assert last[cross_names[0]].anchored is None and last[cross_names[0]].anchors is anchors
    assert last[cross_names[1]].anchored is not None
    with pytest.raises(ValueError, match="set_anchors: expected a \\(B, N_grid, C\\) tensor"):
        AttentionMonitor.set_anchors(mon, anchors[0])
