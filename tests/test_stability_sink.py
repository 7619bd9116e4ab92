"""The sink term (`stability.sink`): the grid mass of the queries that show no garment plus the
extra-token mass of the worn ones, against the explicit softmax, through the three ways the loss
gets the mass (the layer's own attention call, a second fused call, the explicit matrix);
guidance-dropped samples, and what is refused."""
from __future__ import annotations

import pytest
import torch

from configs import ConfigError, load_config
from configs.schema import StabilityConfig
from i2am.dispersion import attention_with_moments
from losses.stability import AttentionTargets, StabilityLoss, describe
from tests.test_stability import _cell_means
from tests.test_stability_recipes import GRID, REF, UP, _Last, _qk, _targets


def _explicit_sink(q, k, scale, extra, worn_px):
    """mean over (sample, head, off query) of sum_{grid j} A_ij + mean over (sample, head, worn
    query) of sum_{extra j} A_ij, from the softmax over all keys; a query is off when no pixel of
    its cell is worn, worn when at least half of it is."""
    probs = torch.softmax(q @ k.mT * scale, dim=-1)
    grid_mass = probs[..., extra:].sum(-1)  # (B, heads, N_q)
    _, cover = _cell_means(worn_px, GRID, worn_px)
    off, worn = cover == 0, cover >= 0.5
    heads = q.shape[1]
    on_off = grid_mass.transpose(1, 2)[off]  # (n_off, heads)
    on_worn = (1 - grid_mass).transpose(1, 2)[worn]
    assert on_off.numel() and on_worn.numel() and heads == on_off.shape[1]
    return on_off.mean() + on_worn.mean()


@pytest.mark.parametrize("extra", [1, 3])
@pytest.mark.parametrize("path", ["in-layer", "second call", "explicit"])
def test_sink_term_equals_the_explicit_formula_with_gradients(extra, path):
    q, k = _qk(extra=extra)
    t = _targets()
    last = _Last(q, k, extra=extra)
    if path == "in-layer":  # the mass the layer's own attention call returns
        v = torch.randn(k.shape, generator=torch.Generator().manual_seed(5))
        last.mass = attention_with_moments(q, k, v, None, 0.5, REF, extra).mass
    loss, metrics = StabilityLoss(StabilityConfig(sink=0.4), explicit=path == "explicit")({UP: last}, None,
                                                                                        targets=t)
    explicit = _explicit_sink(q, k, 0.5, extra, t.worn)
    assert float(loss.detach()) == pytest.approx(0.4 * float(explicit.detach()), abs=1e-6)
    assert float(metrics["loss/sink/up1.0"]) == pytest.approx(float(explicit.detach()), abs=1e-6)
    for a, b in zip(torch.autograd.grad(loss, (q, k)), torch.autograd.grad(0.4 * explicit, (q, k))):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_sink_is_zero_when_only_worn_queries_take_from_the_garment_and_one_when_reversed():
    """Hand-built keys: a huge score on the extra token for the off queries and on the grid for the
    worn ones gives 0; the reverse gives 2 (1 from each half)."""
    t = _targets()
    _, cover = _cell_means(t.worn, GRID, t.worn)
    off = (cover == 0).float()
    q = torch.stack([off, 1 - off], dim=-1)[:, None]  # (2, 1, N_q, 2): off queries -> e0, others -> e1
    k = torch.zeros(2, 1, 1 + REF[0] * REF[1], 2)
    k[..., 0, 0] = 1.0  # the extra token answers the off queries
    k[..., 1:, 1] = 1.0  # every grid cell the others
    loss = StabilityLoss(StabilityConfig(sink=1.0))({UP: _Last(q, k, extra=1, scale=60.0)}, None, targets=t)[0]
    reverse = StabilityLoss(StabilityConfig(sink=1.0))({UP: _Last(1 - q, k, extra=1, scale=60.0)}, None,
                                                       targets=t)[0]
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert float(reverse) == pytest.approx(2.0, abs=1e-6)


def test_sink_skips_guidance_dropped_samples():
    q, k = _qk()
    t = _targets()
    alone = StabilityLoss(StabilityConfig(sink=1.0))(
        {UP: _Last(q[:1], k[:1])}, None, targets=AttentionTargets(t.person[:1], t.worn[:1]))[0]
    dropped = StabilityLoss(StabilityConfig(sink=1.0))(
        {UP: _Last(q, k)}, None, targets=_targets(keep=torch.tensor([True, False])))[0]
    both = StabilityLoss(StabilityConfig(sink=1.0))({UP: _Last(q, k)}, None, targets=t)[0]
    assert float(dropped.detach()) == pytest.approx(float(alone.detach()), rel=1e-6)
    assert abs(float(both.detach()) - float(alone.detach())) > 1e-3


def test_sink_without_extra_tokens_is_refused():
    with pytest.raises(ConfigError, match=r"stability.sink=0.2 .*model.garment.null_tokens=0 has none"):
        load_config(overrides=["stability.sink=0.2", "model.garment.null_tokens=0"])
    with pytest.raises(ConfigError, match=r"stability.sink=-0.1: stability weights must be >= 0"):
        load_config(overrides=["stability.sink=-0.1", "model.garment.null_tokens=4"])
    assert load_config(overrides=["stability.sink=0.2", "model.garment.null_tokens=4"]).stability.sink == 0.2
    # CLIP's CLS token is an extra token too
    assert load_config(overrides=["stability.sink=0.2", "model.garment.null_tokens=0",
                                  "model.garment.kind=clip"]).stability.sink == 0.2
    q, k = _qk(extra=0)
    with pytest.raises(ValueError, match="stability.sink > 0 needs extra tokens"):
        StabilityLoss(StabilityConfig(sink=0.2))({UP: _Last(q, k, extra=0)}, None, targets=_targets())


def test_describe_names_the_sink():
    assert describe(StabilityConfig(position=0.1, sink=0.3)) == "position 0.1 + sink 0.3 on every monitored layer; every t"
