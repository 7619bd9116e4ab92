"""Attention-stability loss: the I²AM paper's refinement, as weighted optional terms.

The paper traced inconsistent garment colours to a high variance of the
attention scores (each generated patch attending to scattered garment
patches) and fixed it with a loss that stabilises attention. Terms:

- `dispersion`: attention-score variance per layer (fused, see `i2am.dispersion`);
- `atv`: StableVITON's total variation of attention centres inside the mask;
- `concentration`: 1 - Gaussian attention mass around each centre (the authors'
  follow-up), explicit, for comparison.

The statistics come from the monitor's last forward pass (`last_attention()`):
the centres and dispersion the layer's own attention call computed when the
monitor runs with `moments=True`, else one fused call on the kept q/k. The loss
never reaches into the model. Per-layer dispersion is always in the
metrics, also with every weight at 0, so a user can watch before regularising.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from configs.schema import StabilityConfig

from i2am.names import short_name
from i2am.dispersion import (atv, attention_moments, attention_moments_explicit, concentration, masked_mean,
                             query_mask)

Metrics = dict[str, torch.Tensor]
_LEVEL = re.compile(r"^(\d+)x(\d+)$")


class StabilityLoss:
    """`loss(last_attention, latent_mask, timesteps, step) -> (loss, metrics)`.

    Weights, layers, window and warm-up come from `StabilityConfig`.
    `layers`: None (every monitored layer), processor names, or resolution
    levels such as "16x12" (query grid h×w), matched on every call against the
    query grids of that call's layers.
    `t_max`: apply only to samples with t < t_max (Leffa applies its loss at
    low noise only); `warmup_steps`: weights are 0 before this optimizer step.
    """

    def __init__(self, cfg: StabilityConfig, monitored: list[str] | None = None, explicit: bool = False) -> None:
        self.terms, self.t_max, self.warmup_steps = cfg, cfg.t_max, cfg.warmup_steps
        layers = cfg.layers
        # explicit=True builds the probability matrix (and keeps it for backward), as peers do:
        # the naive baseline of bench/step.py.
        self.explicit = explicit
        self.selectors = list(layers) if layers else None
        if self.selectors and monitored is not None:
            names = [s for s in self.selectors if not _LEVEL.match(s)]
            unknown = [s for s in names if _strip(s) not in {_strip(m) for m in monitored}]
            if unknown:
                raise ValueError(
                    f"stability.layers names {unknown}, which are not monitored reference cross-attention layers "
                    f"(self-attention 'attn1' layers and unknown names are refused); choose from {monitored} "
                    f"or resolution levels like '16x12'")

    @property
    def active(self) -> bool:
        t = self.terms
        return bool(t.dispersion or t.atv or t.concentration)

    def _selected(self, stats: Mapping) -> list[str]:
        if self.selectors is None:
            return list(stats)
        chosen = []
        for name, s in stats.items():
            for sel in self.selectors:
                m = _LEVEL.match(sel)
                if (m and tuple(s.grid) == (int(m.group(1)), int(m.group(2)))) or _strip(sel) == _strip(name):
                    chosen.append(name)
                    break
        if not chosen:
            grids = sorted({f"{s.grid[0]}x{s.grid[1]}" for s in stats.values()})
            raise ValueError(f"stability.layers {self.selectors} matched no layer; resolution levels seen: {grids}")
        return chosen

    def __call__(self, last: Mapping, latent_mask: torch.Tensor | None, timesteps: torch.Tensor | None = None,
                 step: int = 0) -> tuple[torch.Tensor, Metrics]:
        metrics: Metrics = {}
        total = None
        selected = set(self._selected(last))
        warm = step >= self.warmup_steps
        dispersions: dict[str, torch.Tensor] = {}
        for name, s in last.items():
            b = s.query.shape[0]
            qmask = query_mask(latent_mask, s.grid, b)
            if self.t_max is not None and timesteps is not None:
                keep = (timesteps.to(s.query.device) < self.t_max).view(b, 1)
                qmask = keep.expand(b, s.grid[0] * s.grid[1]) if qmask is None else qmask & keep
            want_grad = name in selected and warm and self.active
            with torch.set_grad_enabled(want_grad and torch.is_grad_enabled()):
                mu, var = self._moments(s)
                disp = masked_mean(var if want_grad else var.detach(), qmask)
            short = short_name(name)
            dispersions[name] = metrics[f"i2am/dispersion/{short}"] = disp.detach()
            if not want_grad:
                continue
            term = self.terms.dispersion * disp
            if self.terms.atv:
                a = atv(mu, s.grid, qmask)
                metrics[f"loss/atv/{short}"] = a.detach()
                term = term + self.terms.atv * a
            if self.terms.concentration:
                conc = masked_mean(concentration(s.query, s.key, s.scale, s.reference_grid, s.extra_tokens,
                                                 self.terms.concentration_sigma), qmask)
                metrics[f"loss/concentration/{short}"] = (1 - conc).detach()
                term = term + self.terms.concentration * (1 - conc)
            total = term if total is None else total + term
        if dispersions:
            values = torch.stack(list(dispersions.values()))
            if not torch.isfinite(values).all():  # one host sync per step, not one per layer
                bad = [n for n, v in dispersions.items() if not torch.isfinite(v)]
                raise FloatingPointError(f"non-finite attention dispersion in layer(s) {bad}")
            metrics["i2am/dispersion/mean"] = values.mean()
        if total is None:
            device = next(iter(last.values())).query.device if last else "cpu"
            total = torch.zeros((), device=device)
        else:
            total = total / len(selected)
        metrics["loss/stability"] = total.detach()
        return total, metrics

    def _moments(self, s) -> tuple[torch.Tensor, torch.Tensor]:
        if self.explicit:  # builds the probability matrix and keeps it for backward, as peers do
            return attention_moments_explicit(s.query, s.key, s.scale, s.reference_grid, s.extra_tokens)
        if getattr(s, "var", None) is not None:  # computed inside the layer's attention call
            return s.mu, s.var
        return attention_moments(s.query, s.key, s.scale, s.reference_grid, s.extra_tokens)


def _strip(name: str) -> str:
    return name.removesuffix(".processor")
