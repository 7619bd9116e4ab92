"""Attention-stability loss: the I²AM paper's refinement, as weighted optional terms.

The paper traced inconsistent garment colours to a high variance of the
attention scores (each generated patch attending to scattered garment
patches) and fixed it with a loss that stabilises attention. Terms:

- `dispersion`: attention-score variance per layer (fused, see `i2am.dispersion`);
- `atv`: StableVITON's total variation of attention centres inside the mask;
- `concentration`: 1 - Gaussian attention mass around each centre (the authors'
  follow-up), explicit, for comparison;
- `colour`: colour-anchored variance E_A||g - y_i||^2 (garment colours g of the
  attended cells around the true colour y_i), over the worn-garment queries;
- `position`: position-anchored variance E_A||p - p*_i||^2 = Var_i + ||mu_i - p*_i||^2
  around the true garment position p*_i (data with `garment_pos`: the synthetic set).
- `placement`: the same in the R2G direction, E||x - x*_j||^2 under each garment cell's
  softmax over the generated positions, around where the cell is worn, x*_j (synthetic).
- `sink`: which queries take from the garment at all. A model with extra tokens (learned
  null tokens, a CLS token) lets a query put its attention there instead of on garment cells;
  the term is the mean grid mass of the queries that show no garment plus the mean extra-token
  mass of the worn ones. Without it the person's background, skin and hair attend to the
  garment image's white background, which is most of what the G2R map shows (every data set).

Two peers' recipes, each on its own layers (`RECIPES`; the pure functions are in
`losses.flow` and `losses.authors`):

- `flow`: Leffa's flow loss, the garment warped by the head-mean attention centres
  against the ground-truth person over the worn pixels; mean over `flow_layers`
  (default: every layer at >= 1/32 of the image size, Leffa's);
- `cwg`, `tv`, `dcml`: the I²AM authors' CWG + TV + DCML on `authors_layers`
  (default: the decoder layers at 16x12 queries, theirs), from explicit
  probabilities; CWG and DCML are rewards, so the loss is -cwg*CWG + tv*TV - dcml*DCML,
  summed over the layers as their code does.

The first three have a degenerate minimum (every patch on one shared garment
cell); the anchored two and the flow loss do not (DCML opposes it). The
statistics come from the monitor's last forward pass (`last_attention()`): the
centres, dispersion and anchored colours the layer's own attention call computed
when the monitor runs with `moments=True` (the colour anchors set by
`losses.objective.TryOnObjective`), else one fused call on the kept q/k. The loss never reaches into the model.
Per-layer dispersion, colour variance and centre error are always in the
metrics, also with every weight at 0, so a user can watch before regularising.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import torch

from configs.schema import StabilityConfig

from i2am.names import short_name
from i2am.dispersion import (anchored_variance, atv, attention_anchored, attention_anchored_explicit,
                             attention_grid_mass, attention_grid_mass_explicit,
                             attention_moments, attention_moments_explicit, centre_error, concentration, masked_mean,
                             pool_to_grid, position_variance, query_mask, r2g_moments, sample_cells, worn_places)

from .authors import authors_layers, authors_loss, grid_probabilities
from .diffusion import Generators, uniform_draws
from .flow import flow_loss, keep_samples

Metrics = dict[str, torch.Tensor]
_LEVEL = re.compile(r"^(\d+)x(\d+)$")
# A query is on the worn garment when at least this share of its cell's pixels is (convention).
WORN_COVERAGE = 0.5
# Leffa's flow loss acts on the layers whose query grid is at least 1/32 of the image size.
FLOW_MIN_FRACTION = 32


@dataclass(frozen=True)
class Recipe:
    """A peer's recipe: its weight keys in `StabilityConfig`, the key of its own layer selection, and
    how its per-layer weighted values combine over those layers ("mean" or "sum")."""

    name: str
    terms: tuple[str, ...]
    layers_key: str
    combine: str


# The weights of the terms `stability.layers` chooses the layers of (the recipes choose their own).
OWN_TERMS = ("dispersion", "atv", "concentration", "colour", "position", "placement", "sink")

RECIPES = (Recipe("flow", ("flow",), "flow_layers", "mean"),          # Leffa
           Recipe("authors", ("cwg", "tv", "dcml"), "authors_layers", "sum"))  # the I²AM authors' code adds layers


@dataclass
class AttentionTargets:
    """What the anchored terms compare attention with, from the batch, at image size.

    `person` (B, 3, H, W) in [-1, 1] is the ground truth; `worn` (B, 1, H, W) in {0, 1} where
    the garment is worn in it; `garment_pos` (B, 2, H, W) the true garment position of each
    worn pixel (relative (y, x) in the garment image) or None; `keep` (B,) bool the samples
    whose garment tokens were not dropped for guidance (None: all); `garment` (B, 3, H, W) the
    garment image, for terms that warp it (Leffa's flow loss), or None."""

    person: torch.Tensor
    worn: torch.Tensor
    garment_pos: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    garment: torch.Tensor | None = None
    _grids: dict = field(default_factory=dict, repr=False)

    def on_grid(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(worn queries (B, N_q) bool, colour y (B, N_q, 3), position p* (B, N_q, 2) or None) on a
        query grid: the person's colour (as [0, 1] centred on 0.5, like the anchors) and the
        positions averaged over each cell's worn pixels; a query counts as worn when at least
        WORN_COVERAGE of its cell is. Computed once per grid."""
        grid = tuple(grid)
        if grid not in self._grids:
            with torch.no_grad():
                colour, cover = pool_to_grid(self.person / 2, grid, self.worn)
                pos = pool_to_grid(self.garment_pos, grid, self.worn)[0] if self.garment_pos is not None else None
                worn, off = cover >= WORN_COVERAGE, cover == 0
                if self.keep is not None:
                    keep = self.keep.to(worn.device).view(-1, 1)
                    worn, off = worn & keep, off & keep
            self._grids[grid] = (worn, colour, pos, off)
        return self._grids[grid][:3]

    def off_garment(self, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N_q) bool: the queries whose cell shows no worn garment pixel at all (of the samples
        kept); partly covered cells are neither worn nor off."""
        self.on_grid(grid)
        return self._grids[tuple(grid)][3]

    def places(self, reference_grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(where each garment cell is worn (B, N_grid, 2), relative (y, x) on the person; the
        cells some worn pixel shows, of the samples kept (B, N_grid) bool): the placement
        term's targets (`i2am.dispersion.worn_places`). Computed once per reference grid."""
        key = ("places", tuple(reference_grid))
        if key not in self._grids:
            with torch.no_grad():
                places, valid = worn_places(self.garment_pos, self.worn, tuple(reference_grid))
                if self.keep is not None:
                    valid = valid & self.keep.to(valid.device).view(-1, 1)
            self._grids[key] = (places, valid)
        return self._grids[key]


class StabilityLoss:
    """`loss(last_attention, latent_mask, timesteps, step, targets) -> (loss, metrics)`.

    Weights, layers, window and warm-up come from `StabilityConfig`.
    `layers`: None (every monitored layer), processor names, or resolution
    levels such as "16x12" (query grid h×w), matched on every call against the
    query grids of that call's layers.
    `t_max`: apply only to samples with t < t_max (Leffa applies its loss at
    low noise only); `warmup_steps`: weights are 0 before this optimizer step.
    `targets` (`AttentionTargets`) feed the anchored terms and readings; without
    them only the dispersion family is computed. The peers' recipes (`RECIPES`:
    `flow`; `cwg`, `tv`, `dcml`) choose their own layers (`flow_layers`,
    `authors_layers`) and need `targets`.
    """

    def __init__(self, cfg: StabilityConfig, monitored: list[str] | None = None, explicit: bool = False) -> None:
        self.terms, self.t_max, self.warmup_steps = cfg, cfg.t_max, cfg.warmup_steps
        # explicit=True builds the probability matrix (and keeps it for backward), as peers do:
        # the naive baseline of bench/step.py.
        self.explicit = explicit
        self.selectors = list(cfg.layers) if cfg.layers else None
        # The recipes switched on (a weight > 0), with their layer selectors (None: the recipe's default).
        self.recipes = {r: (list(getattr(cfg, r.layers_key)) if getattr(cfg, r.layers_key) else None)
                        for r in RECIPES if any(getattr(cfg, t) for t in r.terms)}
        for key, selectors in [("layers", self.selectors)] + [(r.layers_key, sel) for r, sel in self.recipes.items()]:
            _check_names(f"stability.{key}", selectors, monitored)

    @property
    def active(self) -> bool:
        return any(getattr(self.terms, k) for k in OWN_TERMS)

    def _selected(self, stats: Mapping) -> list[str]:
        return list(stats) if self.selectors is None else _match(stats, self.selectors, "stability.layers")

    def _recipe_layers(self, stats: Mapping, targets: AttentionTargets | None) -> dict[Recipe, list[str]]:
        """The layers of each recipe switched on: its own selection, else the recipe's default."""
        chosen = {}
        for recipe, selectors in self.recipes.items():
            if targets is None or (recipe.name == "flow" and targets.garment is None):
                raise ValueError(f"stability: the {recipe.name} terms ({', '.join(recipe.terms)}) need the batch's "
                                 f"person, worn mask{' and garment' if recipe.name == 'flow' else ''} "
                                 f"(AttentionTargets); this call has none")
            if selectors is not None:
                chosen[recipe] = _match(stats, selectors, f"stability.{recipe.layers_key}")
            elif recipe.name == "authors":
                chosen[recipe] = authors_layers({n: tuple(s.grid) for n, s in stats.items()})
            else:  # Leffa: the layers at 1/32 of the image resolution and finer
                size = targets.person.shape[-2:]
                chosen[recipe] = [n for n, s in stats.items()
                                  if all(g * FLOW_MIN_FRACTION >= d for g, d in zip(s.grid, size))]
        return chosen

    def __call__(self, last: Mapping, latent_mask: torch.Tensor | None, timesteps: torch.Tensor | None = None,
                 step: int = 0, targets: AttentionTargets | None = None, generator: Generators = None
                 ) -> tuple[torch.Tensor, Metrics]:
        """The weighted stability terms of one forward and their metrics. ``generator``: where
        the placement term draws its garment cells from (one generator per sample, as the trainer
        passes them, keeps the draw the same on any process count and across a resume; None:
        torch's global generator)."""
        metrics: Metrics = {}
        total = None
        selected = set(self._selected(last))
        warm = step >= self.warmup_steps
        recipes = self._recipe_layers(last, targets) if warm and self.recipes else {}
        recipe_sums: dict[Recipe, torch.Tensor] = {}
        if (self.terms.position or self.terms.placement) and targets is not None and targets.garment_pos is None:
            raise ValueError("stability.position or stability.placement > 0 needs each worn pixel's true garment "
                             "position (sample key "
                             "'garment_pos', which only the synthetic set gives); this batch has none")
        readings: dict[str, dict[str, torch.Tensor]] = {"dispersion": {}, "colour_var": {}, "centre_error": {}}
        for name, s in last.items():
            b = s.query.shape[0]
            window = _window(timesteps, self.t_max, b, s.query.device)
            qmask = query_mask(latent_mask, s.grid, b)
            if window is not None:
                qmask = window.expand(b, s.grid[0] * s.grid[1]) if qmask is None else qmask & window
            regularised = name in selected and warm and self.active
            mine = [r for r, names in recipes.items() if name in names]  # the recipes acting on this layer
            want_grad = regularised or any(r.name == "flow" for r in mine)  # flow reads mu; authors read q/k
            with torch.set_grad_enabled(want_grad and torch.is_grad_enabled()):
                mu, var = self._moments(s)
                disp = masked_mean(var if want_grad else var.detach(), qmask)
            short = short_name(name)
            readings["dispersion"][name] = metrics[f"i2am/dispersion/{short}"] = disp.detach()
            # Terms that need the batch besides this layer's statistics read it from `targets`: the
            # anchored ones in `_anchored`, the peers' recipes in `_flow` and `_authors`.
            anchored_terms = self._anchored(name, s, mu, var, targets, window, regularised, readings, metrics,
                                            generator)
            if mine:
                keep = keep_samples(b, timesteps=timesteps, t_max=self.t_max,
                                    dropped=None if targets.keep is None else ~targets.keep)
                for recipe in mine:
                    value = getattr(self, f"_{recipe.name}")(name, s, mu, targets, keep, metrics)
                    recipe_sums[recipe] = value if recipe not in recipe_sums else recipe_sums[recipe] + value
            if not regularised:
                continue
            term = self.terms.dispersion * disp + anchored_terms
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
        if total is not None:
            total = total / len(selected)
        for recipe, value in recipe_sums.items():
            value = value / len(recipes[recipe]) if recipe.combine == "mean" else value
            total = value if total is None else total + value
        _check_finite(readings)
        for what, values in readings.items():
            if values:
                metrics[f"i2am/{what}/mean"] = torch.stack(list(values.values())).mean()
        if total is None:
            device = next(iter(last.values())).query.device if last else "cpu"
            total = torch.zeros((), device=device)
        metrics["loss/stability"] = total.detach()
        return total, metrics

    def _anchored(self, name: str, s, mu: torch.Tensor, var: torch.Tensor, targets: AttentionTargets | None,
                  window: torch.Tensor | None, want_grad: bool,
                  readings: dict[str, dict[str, torch.Tensor]], metrics: Metrics,
                  generator: Generators = None) -> torch.Tensor | float:
        """The colour- and position-anchored terms of one layer over its worn queries (guidance-
        dropped samples and samples outside the t window excluded): readings always, the weighted
        terms (with graph) when the layer is regularised. Returns their weighted sum (0 if none)."""
        if targets is None:
            return 0.0
        worn, colour, pos = targets.on_grid(s.grid)
        if window is not None:
            worn = worn & window
        term: torch.Tensor | float = 0.0
        short = short_name(name)
        anchors = getattr(s, "anchors", None)
        if anchors is not None:
            grad = want_grad and bool(self.terms.colour)
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                anchored = self._anchored_values(s)
                cvar = masked_mean(anchored_variance(anchored if grad else anchored.detach(), colour), worn)
            readings["colour_var"][name] = metrics[f"i2am/colour_var/{short}"] = cvar.detach()
            if grad:
                term = term + self.terms.colour * cvar
        if pos is not None:
            readings["centre_error"][name] = metrics[f"i2am/centre_error/{short}"] = \
                masked_mean(centre_error(mu.detach(), pos), worn)
            if want_grad and self.terms.position:
                pvar = masked_mean(position_variance(mu, var, pos), worn)
                metrics[f"loss/position/{short}"] = pvar.detach()
                term = term + self.terms.position * pvar
        if want_grad and self.terms.placement and pos is not None:
            places, valid = targets.places(s.reference_grid)
            if window is not None:
                valid = valid & window
            cells = None
            if 0 < self.terms.placement_cells < valid.shape[1]:
                draws = uniform_draws(generator, valid.shape[0], valid.device, valid.shape[1])
                cells = sample_cells(valid, self.terms.placement_cells, draws)
                places, valid = places.gather(1, cells[..., None].expand(-1, -1, 2)), valid.gather(1, cells)
            mu_r, var_r = r2g_moments(s.query, s.key, s.scale, s.grid, s.extra_tokens, cells)
            place = masked_mean(position_variance(mu_r, var_r, places), valid)
            metrics[f"loss/placement/{short}"] = place.detach()
            metrics[f"i2am/placement_error/{short}"] = masked_mean(centre_error(mu_r.detach(), places), valid)
            term = term + self.terms.placement * place
        if want_grad and self.terms.sink:
            if not s.extra_tokens:
                raise ValueError("stability.sink > 0 needs extra tokens for attention to go to instead of the "
                                 "garment cells (model.garment.null_tokens > 0, or a CLIP encoder's CLS token); "
                                 f"layer {name!r} has none")
            mass = self._grid_mass(s)
            off = targets.off_garment(s.grid)
            if window is not None:
                off = off & window
            sink = masked_mean(mass, off) + masked_mean(1 - mass, worn)
            metrics[f"loss/sink/{short}"] = sink.detach()
            term = term + self.terms.sink * sink
        return term

    def _flow(self, name: str, s, mu: torch.Tensor, targets: AttentionTargets, keep: torch.Tensor | None,
              metrics: Metrics) -> torch.Tensor:
        """Leffa's flow loss of one layer, weighted; logs the unweighted value as loss/flow/<layer>."""
        value, _ = flow_loss(mu, s.grid, targets.garment, targets.person, targets.worn, keep)
        metrics[f"loss/flow/{short_name(name)}"] = value.detach()
        return self.terms.flow * value

    def _authors(self, name: str, s, mu: torch.Tensor, targets: AttentionTargets, keep: torch.Tensor | None,
                 metrics: Metrics) -> torch.Tensor:
        """The authors' -cwg*CWG + tv*TV - dcml*DCML of one layer over its worn queries, from explicit
        probabilities (one layer: affordable); logs the unweighted terms as loss/{cwg,tv,dcml}/<layer>."""
        probs = grid_probabilities(s.query, s.key, s.scale, s.extra_tokens)
        worn = targets.on_grid(s.grid)[0]
        t = self.terms
        value, parts = authors_loss(probs, tuple(s.grid), tuple(s.reference_grid), worn, keep,
                                    cwg_weight=-t.cwg, tv_weight=t.tv, dcml_weight=-t.dcml)
        short = short_name(name)
        for term in ("cwg", "tv", "dcml"):
            if getattr(t, term):
                metrics[f"loss/{term}/{short}"] = parts[f"loss/{term}"]
        return value

    def _moments(self, s) -> tuple[torch.Tensor, torch.Tensor]:
        if self.explicit:  # builds the probability matrix and keeps it for backward, as peers do
            return attention_moments_explicit(s.query, s.key, s.scale, s.reference_grid, s.extra_tokens)
        if getattr(s, "var", None) is not None:  # computed inside the layer's attention call
            return s.mu, s.var
        return attention_moments(s.query, s.key, s.scale, s.reference_grid, s.extra_tokens)

    def _grid_mass(self, s) -> torch.Tensor:
        if self.explicit:
            return attention_grid_mass_explicit(s.query, s.key, s.scale, s.extra_tokens)
        if getattr(s, "mass", None) is not None:  # computed inside the layer's attention call
            return s.mass
        return attention_grid_mass(s.query, s.key, s.scale, s.extra_tokens)

    def _anchored_values(self, s) -> torch.Tensor:
        if self.explicit:
            return attention_anchored_explicit(s.query, s.key, s.scale, s.anchors, s.extra_tokens)
        if getattr(s, "anchored", None) is not None:  # computed inside the layer's attention call
            return s.anchored
        return attention_anchored(s.query, s.key, s.scale, s.anchors, s.extra_tokens)


def describe(cfg: StabilityConfig) -> str:
    """One line for the run summary: which terms are on, at what weight, where and when;
    "off" when none is."""
    own = [k for k in OWN_TERMS if getattr(cfg, k)]
    parts = []
    if own:
        layers = ", ".join(cfg.layers) if cfg.layers else "every monitored layer"
        parts.append(" + ".join(f"{k} {getattr(cfg, k):g}" for k in own) + f" on {layers}")
    for recipe in RECIPES:
        on = [k for k in recipe.terms if getattr(cfg, k)]
        if on:
            layers = getattr(cfg, recipe.layers_key)
            parts.append(" + ".join(f"{k} {getattr(cfg, k):g}" for k in on)
                         + f" on {', '.join(layers) if layers else 'its default layers'}")
    if not parts:
        return "off (attention readings logged only)"
    when = f"t < {cfg.t_max}" if cfg.t_max is not None else "every t"
    if cfg.warmup_steps:
        when += f", from step {cfg.warmup_steps}"
    return "; ".join(parts) + f"; {when}"


def dispersion_readings(last: Mapping, latent_mask: torch.Tensor | None, timesteps: torch.Tensor | None = None,
                        t_max: int | None = None) -> dict[str, torch.Tensor]:
    """Per layer, the masked mean dispersion of the last forward, detached, as the loss logs it
    (inpainting mask on the query grid, samples with t < t_max when t_max is set)."""
    out = {}
    for name, s in last.items():
        b = s.query.shape[0]
        qmask = query_mask(latent_mask, s.grid, b)
        window = _window(timesteps, t_max, b, s.query.device)
        if window is not None:
            qmask = window.expand(b, s.grid[0] * s.grid[1]) if qmask is None else qmask & window
        var = s.var if getattr(s, "var", None) is not None else \
            attention_moments(s.query, s.key, s.scale, s.reference_grid, s.extra_tokens)[1]
        out[name] = masked_mean(var.detach(), qmask)
    _check_finite({"dispersion": out})
    return out


def _window(timesteps: torch.Tensor | None, t_max: int | None, batch: int, device) -> torch.Tensor | None:
    """(B, 1) bool: the samples inside the t < t_max window (None: no window)."""
    if t_max is None or timesteps is None:
        return None
    return (timesteps.to(device) < t_max).view(batch, 1)


def _check_finite(readings: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """One host sync per step (not one per layer); a non-finite reading names its layer(s)."""
    values = [v for per_layer in readings.values() for v in per_layer.values()]
    if not values or bool(torch.isfinite(torch.stack(values)).all()):
        return
    bad = [f"{n} ({what})" for what, per_layer in readings.items() for n, v in per_layer.items()
           if not torch.isfinite(v)]
    raise FloatingPointError(f"non-finite attention statistic in layer(s) {bad}")


def _strip(name: str) -> str:
    return name.removesuffix(".processor")


def _check_names(key: str, selectors: list[str] | None, monitored: list[str] | None) -> None:
    """Refuse layer names (not levels) that are not monitored cross-attention layers."""
    if not selectors or monitored is None:
        return
    names = [s for s in selectors if not _LEVEL.match(s)]
    unknown = [s for s in names if _strip(s) not in {_strip(m) for m in monitored}]
    if unknown:
        raise ValueError(
            f"{key} names {unknown}, which are not monitored reference cross-attention layers "
            f"(self-attention 'attn1' layers and unknown names are refused); choose from {monitored} "
            f"or resolution levels like '16x12'")


def _match(stats: Mapping, selectors: list[str], key: str) -> list[str]:
    """The layers of `stats` named by `selectors` (processor names or levels like "16x12")."""
    chosen = []
    for name, s in stats.items():
        for sel in selectors:
            m = _LEVEL.match(sel)
            if (m and tuple(s.grid) == (int(m.group(1)), int(m.group(2)))) or _strip(sel) == _strip(name):
                chosen.append(name)
                break
    if not chosen:
        grids = sorted({f"{s.grid[0]}x{s.grid[1]}" for s in stats.values()})
        raise ValueError(f"{key} {selectors} matched no layer; resolution levels seen: {grids}")
    return chosen
