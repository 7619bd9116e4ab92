"""The peers' recipes as stability terms: Leffa's flow loss (`stability.flow`) and the I²AM
authors' CWG + TV + DCML (`stability.cwg/tv/dcml`) through `StabilityLoss`, against explicit
loops and the pure functions; guidance dropping, the t window, warm-up, layer choice, config
errors, and a few training steps with every recipe term on."""
from __future__ import annotations

import math

import pytest
import torch

from configs import ConfigError, load_config
from configs.schema import StabilityConfig
from losses.authors import authors_loss, grid_probabilities
from losses.flow import flow_loss
from losses.stability import AttentionTargets, StabilityLoss
from tests.conftest import tiny_overrides
from tests.test_authors_loss import GRID, REF, _explicit as _explicit_authors
from tests.test_flow_loss import _explicit_flow_loss
from tests.test_stability import _cell_means

IMAGE = (12, 16)  # the query grid GRID = (3, 4) -> 4x4-pixel cells
GARMENT = (9, 8)
UP = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
DOWN = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"


class _Last:
    """A LastAttention-like record (q/k only: the loss computes the moments itself)."""

    def __init__(self, q, k, grid=GRID, ref=REF, extra=1, scale=0.5):
        self.query, self.key, self.grid, self.reference_grid = q, k, grid, ref
        self.extra_tokens, self.scale, self.heads = extra, scale, q.shape[1]


def _qk(b=2, heads=2, grid=GRID, ref=REF, extra=1, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, grid[0] * grid[1], d, generator=g).requires_grad_()
    k = (2 * torch.randn(b, heads, extra + ref[0] * ref[1], d, generator=g)).requires_grad_()
    return q, k


def _targets(b=2, seed=3, keep=None, image=IMAGE):
    g = torch.Generator().manual_seed(seed)
    garment = torch.rand(b, 3, *GARMENT, generator=g) * 2 - 1
    person = torch.rand(b, 3, *image, generator=g) * 2 - 1
    worn = torch.zeros(b, 1, *image)
    worn[0, :, 2:11, 3:14] = 1  # partial cells at the edges: some count (>= half), some not
    worn[1, :, 0:9, 5:16] = 1
    return AttentionTargets(person, worn, keep=keep, garment=garment)


def _explicit_mu(q, k, scale, ref, extra):
    """Attention centres (B, heads, N_q, 2) in relative garment coordinates, from the softmax."""
    p = torch.tensor([[(j // ref[1] + 0.5) / ref[0], (j % ref[1] + 0.5) / ref[1]] for j in range(ref[0] * ref[1])])
    return torch.softmax(q @ k[:, :, extra:].mT * scale, dim=-1) @ p


def _rel_close(got, want, rel=1e-4):
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= rel * b.abs().max()


@pytest.mark.parametrize("extra", [0, 1])
def test_flow_term_equals_the_per_pixel_loop_with_gradients(extra):
    q, k = _qk(extra=extra)
    t = _targets()
    loss, metrics = StabilityLoss(StabilityConfig(flow=0.7))({UP: _Last(q, k, extra=extra)}, None, targets=t)
    explicit = _explicit_flow_loss(_explicit_mu(q, k, 0.5, REF, extra), GRID, t.garment, t.person, t.worn)
    assert torch.allclose(loss, 0.7 * explicit, atol=1e-5)
    assert float(metrics["loss/flow/up1.0"]) == pytest.approx(float(explicit.detach()), abs=1e-5)
    assert float(metrics["loss/stability"]) == pytest.approx(float(loss.detach()))
    _rel_close(torch.autograd.grad(loss, (q, k)), torch.autograd.grad(0.7 * explicit, (q, k)))


@pytest.mark.parametrize("extra", [0, 1])
def test_authors_terms_equal_the_explicit_loops_with_gradients(extra):
    """-cwg*CWG + tv*TV - dcml*DCML over the worn queries (a cell counts when at least half of it
    is worn), with weights large enough that each term shows."""
    q, k = _qk(extra=extra)
    t = _targets()
    cfg = StabilityConfig(cwg=2.0, tv=0.5, dcml=0.3, authors_layers=["3x4"])
    loss, metrics = StabilityLoss(cfg)({UP: _Last(q, k, extra=extra)}, None, targets=t)
    _, cover = _cell_means(t.person, GRID, t.worn)
    worn = cover >= 0.5
    assert 0 < int(worn.sum()) < worn.numel()
    c, v, d = _explicit_authors(q, k, 0.5, extra, worn)
    explicit = -2.0 * c + 0.5 * v - 0.3 * d
    assert torch.allclose(loss, explicit, atol=1e-5)
    for name, value in (("cwg", c), ("tv", v), ("dcml", d)):
        assert float(metrics[f"loss/{name}/up1.0"]) == pytest.approx(float(value.detach()), abs=1e-5)
    _rel_close(torch.autograd.grad(loss, (q, k)), torch.autograd.grad(explicit, (q, k)))


def test_default_layers_are_the_recipes_own_and_layers_combine_as_theirs():
    """Defaults: the authors' decoder layers at 16x12 (summed, as their code adds layers); Leffa's
    layers at >= 1/32 of the image size (averaged). `stability.layers` does not choose them."""
    image = (128, 96)
    q16, k16 = _qk(b=2, grid=(16, 12), seed=1)
    q16b, k16b = _qk(b=2, grid=(16, 12), seed=2)
    q2, k2 = _qk(b=2, grid=(2, 2), seed=3)  # 2x2 of 128x96: below 1/32 -> not Leffa's
    q1, k1 = _qk(b=2, grid=(16, 12), seed=4)  # an encoder layer at 16x12: not the authors'
    stats = {UP: _Last(q16, k16, (16, 12)), UP.replace("attentions.0", "attentions.1"): _Last(q16b, k16b, (16, 12)),
             "mid_block.attentions.0.transformer_blocks.0.attn2.processor": _Last(q2, k2, (2, 2)),
             DOWN: _Last(q1, k1, (16, 12))}
    t = _targets(image=image)
    keep = torch.tensor([True, True])
    cfg = StabilityConfig(flow=0.5, cwg=2.0, tv=1e-4, dcml=0.01, layers=["2x2"])
    loss, metrics = StabilityLoss(cfg)(stats, None, targets=t)
    assert {k for k in metrics if k.startswith("loss/flow/")} == {"loss/flow/up1.0", "loss/flow/up1.1",
                                                                  "loss/flow/down0.0"}
    assert {k for k in metrics if k.startswith("loss/cwg/")} == {"loss/cwg/up1.0", "loss/cwg/up1.1"}
    flows, authors = [], []
    for name in (UP, UP.replace("attentions.0", "attentions.1"), DOWN):
        s = stats[name]
        flows.append(flow_loss(_explicit_mu(s.query, s.key, 0.5, REF, 1), s.grid, t.garment, t.person, t.worn,
                               keep)[0])
        if name != DOWN:
            authors.append(authors_loss(grid_probabilities(s.query, s.key, 0.5, 1), s.grid, REF,
                                        t.on_grid(s.grid)[0], keep)[0])
    expected = 0.5 * sum(flows) / 3 + sum(authors)
    assert torch.allclose(loss, expected, atol=1e-5)
    _rel_close(torch.autograd.grad(loss, (q16, k16, q1, k1)), torch.autograd.grad(expected, (q16, k16, q1, k1)))


def test_recipes_add_to_the_other_terms():
    q, k = _qk()
    t = _targets()
    cfg = dict(flow=0.3, cwg=1.0, tv=0.2, dcml=0.1, authors_layers=["3x4"])
    stats = {UP: _Last(q, k)}
    both, m = StabilityLoss(StabilityConfig(dispersion=0.5, **cfg))(stats, None, targets=t)
    recipes, _ = StabilityLoss(StabilityConfig(**cfg))(stats, None, targets=t)
    assert float(both.detach()) == pytest.approx(float(recipes.detach() + 0.5 * m["i2am/dispersion/up1.0"]), rel=1e-6)


def test_recipes_skip_guidance_dropped_samples_the_t_window_and_warm_up():
    """A dropped sample (null tokens) or one outside t < t_max adds nothing: the loss equals the one
    computed on the other sample alone. Before warm-up there is no recipe term at all."""
    q, k = _qk()
    terms = dict(flow=0.7, cwg=2.0, tv=0.5, dcml=0.3, authors_layers=["3x4"])
    both = {UP: _Last(q, k)}
    t0 = _targets()
    alone_t = AttentionTargets(t0.person[:1], t0.worn[:1], garment=t0.garment[:1])
    alone, m_alone = StabilityLoss(StabilityConfig(**terms))({UP: _Last(q[:1], k[:1])}, None, targets=alone_t)
    dropped, m_dropped = StabilityLoss(StabilityConfig(**terms))(both, None, targets=_targets(
        keep=torch.tensor([True, False])))
    late, _ = StabilityLoss(StabilityConfig(t_max=500, **terms))(both, None, torch.tensor([100, 900]),
                                                                targets=_targets())
    kept, _ = StabilityLoss(StabilityConfig(**terms))(both, None, targets=_targets())
    assert float(dropped.detach()) == pytest.approx(float(alone.detach()), rel=1e-6)
    assert float(late.detach()) == pytest.approx(float(alone.detach()), rel=1e-6)
    assert abs(float(kept.detach()) - float(alone.detach())) > 1e-3  # the second sample does count when kept
    for key in ("loss/flow/up1.0", "loss/cwg/up1.0", "loss/tv/up1.0", "loss/dcml/up1.0"):
        assert float(m_dropped[key]) == pytest.approx(float(m_alone[key]), rel=1e-6)
    # Nothing kept: 0 (not NaN), and the gradient is zero.
    none, _ = StabilityLoss(StabilityConfig(t_max=500, **terms))(both, None, torch.tensor([600, 900]),
                                                                targets=_targets())
    assert float(none.detach()) == 0
    warm = StabilityLoss(StabilityConfig(warmup_steps=10, **terms))
    early, m_early = warm(both, None, targets=_targets(), step=5)
    assert float(early.detach() if torch.is_tensor(early) else early) == 0 and not any(k.startswith(("loss/flow", "loss/cwg")) for k in m_early)
    assert float(warm(both, None, targets=_targets(), step=10)[0].detach()) == pytest.approx(float(kept.detach()), rel=1e-6)


def test_only_the_terms_switched_on_are_logged_and_weighted():
    q, k = _qk()
    loss, metrics = StabilityLoss(StabilityConfig(tv=0.5, authors_layers=["3x4"]))({UP: _Last(q, k)}, None,
                                                                                  targets=_targets())
    assert "loss/tv/up1.0" in metrics and not any(k.startswith(("loss/cwg", "loss/dcml", "loss/flow"))
                                                   for k in metrics)
    assert float(loss.detach()) == pytest.approx(0.5 * float(metrics["loss/tv/up1.0"]), rel=1e-6)


def test_recipe_layers_that_do_not_exist_are_refused():
    q, k = _qk()
    stats = {UP: _Last(q, k)}
    with pytest.raises(ValueError, match="stability.flow_layers names .*attn1"):
        StabilityLoss(StabilityConfig(flow=1.0, flow_layers=[UP.replace("attn2", "attn1")]), monitored=list(stats))
    with pytest.raises(ValueError, match=r"stability.authors_layers \['8x8'\] matched no layer.*3x4"):
        StabilityLoss(StabilityConfig(cwg=1.0, authors_layers=["8x8"]))(stats, None, targets=_targets())
    with pytest.raises(ValueError, match="decoder layers at 16x12.*matched no"):  # the default: none at 16x12
        StabilityLoss(StabilityConfig(cwg=1.0))(stats, None, targets=_targets())
    t = _targets()
    with pytest.raises(ValueError, match="flow terms .*garment"):
        StabilityLoss(StabilityConfig(flow=1.0))(stats, None, targets=AttentionTargets(t.person, t.worn))


@pytest.mark.parametrize("override, message", [
    ("stability.flow=-0.001", r"stability.flow=-0.001: stability weights must be >= 0"),
    ("stability.cwg=-2.0", r"stability.cwg=-2.0: stability weights must be >= 0"),
    ("stability.dcml=-0.01", r"stability.dcml=-0.01: stability weights must be >= 0"),
    ("stability.tv=-1", r"stability.tv=-1.0: stability weights must be >= 0"),
    ("stability.placement_cells=-4", r"stability.placement_cells=-4: .* must be >= 0 \(0 = every cell\)"),
])
def test_negative_recipe_weights_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_recipes_without_the_monitor_or_their_layer_are_config_errors():
    with pytest.raises(ConfigError, match="monitor.enabled=false"):
        load_config(overrides=["stability.flow=0.001", "monitor.enabled=false"])
    # 40x24 pixels -> 20x12 latents, 10x6, ...: no 16x12 level for the authors' layer
    with pytest.raises(ConfigError, match=r"stability.cwg=2.0.*16x12.*\[40, 24\].*20x12.*stability.authors_layers"):
        load_config(overrides=["stability.cwg=2.0", "data.resolution=[40,24]"])
    cfg = load_config(overrides=["stability.cwg=2.0", "data.resolution=[40,24]", "stability.authors_layers=[20x12]"])
    assert cfg.stability.authors_layers == ["20x12"]
    for res in ("[32,24]", "[64,48]"):  # the default, and one halving above it
        load_config(overrides=["stability.cwg=2.0", "stability.tv=1e-4", f"data.resolution={res}"])
    # The VITON-HD / DressCode configs (512x384 through a VAE) reach 16x12 by halving.
    paths = ["data.root=/d", "model.codec.pretrained=/m", "model.unet.pretrained=/m", "model.garment.pretrained=/c"]
    load_config(files=["configs/viton_hd.yaml"], overrides=[*paths, "stability.cwg=2.0", "stability.flow=0.001"])


def test_a_few_training_steps_with_every_recipe_term_on(tmp_path):
    """The objective's loss is the diffusion loss plus the weighted recipe terms, every step."""
    from train import Trainer

    weights = {"stability.flow": 0.5, "stability.cwg": 2.0, "stability.tv": 0.1, "stability.dcml": 0.05,
               "stability.position": 0, "stability.placement": 0, "stability.sink": 0}
    cfg = load_config(overrides=tiny_overrides(tmp_path, **weights, **{"train.max_steps": 3}))
    trainer = Trainer(cfg)
    seen = []
    objective = trainer.objective

    def recording(*args, **kwargs):
        loss, metrics = objective(*args, **kwargs)
        seen.append((loss.detach(), {k: v.detach() for k, v in metrics.items()}))
        return loss, metrics

    trainer.objective = recording
    trainer.fit()
    trainer.close()
    assert len(seen) == 3
    for loss, m in seen:
        flows = [v for k, v in m.items() if k.startswith("loss/flow/")]
        authors = {t: [v for k, v in m.items() if k.startswith(f"loss/{t}/")] for t in ("cwg", "tv", "dcml")}
        # Leffa's: every monitored layer (all >= 1/32 of 32x24); the authors': up1.0 and up1.1 at 16x12
        assert len(flows) == len(objective.monitor.layers) and all(len(v) == 2 for v in authors.values())
        assert all(math.isfinite(float(v)) for v in [*flows, *sum(authors.values(), [])])
        expected = (0.5 * torch.stack(flows).mean() - 2.0 * sum(authors["cwg"]) + 0.1 * sum(authors["tv"])
                    - 0.05 * sum(authors["dcml"]))
        assert float(m["loss/stability"]) == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
        assert float(loss) == pytest.approx(float(m["loss/diffusion"] + m["loss/stability"]), rel=1e-6)
    logged = trainer.history[-1]
    assert {"loss/flow/up1.0", "loss/cwg/up1.1", "loss/tv/up1.0", "loss/dcml/up1.0", "loss/stability"} <= set(logged)
    assert all(math.isfinite(v) for v in logged.values())


def test_describe_names_the_terms_that_are_on():
    from configs.schema import StabilityConfig
    from losses.stability import describe

    assert describe(StabilityConfig()) == "off (attention readings logged only)"
    assert describe(StabilityConfig(colour=0.03, position=0.1, layers=["16x12"], t_max=500)) == \
        "colour 0.03 + position 0.1 on 16x12; t < 500"
    assert describe(StabilityConfig(flow=1e-3, cwg=2.0, dcml=0.01, authors_layers=["up1.0"], warmup_steps=5)) == \
        "flow 0.001 on its default layers; cwg 2 + dcml 0.01 on up1.0; every t, from step 5"
