"""``python -m i2am diagnose RUN``: which cross-attention layers and denoising steps cause wrong
colours, and what to regularise.

1. **Measure.** Sample ``samples`` held-out test samples (one seed per sample) with the
   monitor recording; per sample, layer and time group keep the position dispersion, the
   colour-anchored variance of the attended cells (as training logs ``i2am/colour_var/*``) and
   IMACS_g of the layer's R2G map; per sample the colour and pixel error.
2. **Blame by intervention.** Re-sample the same samples (same seeds) with one layer's attention
   repaired (:mod:`i2am.repair`): on synthetic data replaced by the anchored target (attention
   on the true garment position), elsewhere sharpened (lower softmax temperature). The blame is
   the mean fall of the colour error. Every layer is repaired over all steps first; then only
   the ``top_layers`` most blamed layers per time group (cost: 1 + L + top_layers × groups
   sampling runs instead of 1 + L × (groups + 1)). A run repaired from group g on resumes
   from the recorded run's latents at g's first step (with DDIM's eta = 0 the steps before
   are the same), which saves about 40 % of the group runs' steps with 5 groups.
3. **Rank and recommend.** Entries sorted by blame, with the per-layer correlation of each
   statistic with the colour error over the samples beside it; the layers and ``t_max`` to give
   ``stability.colour``, as a config snippet and ``recommended.yaml``.

Without ground truth (unpaired data: ``person`` is not the try-on target) there is no colour
error to lower: only correlations are computed, against a ground-truth-free proxy (the
generated mean colour in the mask against the garment's mean colour), and the JSON says so.
Outputs are written by :mod:`apps.diagnose_report`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from i2am.names import short_name

STATISTICS = ("dispersion", "colour_var", "imacs")
# Layers whose blame reaches this share of the top blame are recommended too (if clearly > 0).
SHARE = 0.5
# The term and weight recommended, from the measured comparison (docs/benchmarks.md, "Default model
# quality"): where the data knows each worn pixel's garment position, the position-anchored term at
# 0.1 placed patterns best; elsewhere the colour-anchored term at the gentle 0.03 (stronger colour
# weights collapsed attention to one cell per colour). Starting points, not tuned per data set.
TERM_WEIGHTS = {"position": 0.1, "colour": 0.03}


class DiagnoseError(ValueError):
    """A diagnosis that cannot run as asked; the message says what to change."""


@dataclass
class Diagnosis:
    """The result of :func:`diagnose`; ``as_json()`` is what ``diagnosis.json`` holds."""

    ranking: list[dict[str, Any]]
    layers: list[str]
    time_groups: list[dict[str, Any]]
    recommendation: dict[str, Any]
    ground_truth: bool
    notes: list[str]
    settings: dict[str, Any]
    margin: float | None
    per_sample: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"ranking": self.ranking, "margin": self.margin, "ground_truth": self.ground_truth,
                "notes": self.notes, "recommendation": self.recommendation, "layers": self.layers,
                "time_groups": self.time_groups, "settings": self.settings, "per_sample": self.per_sample,
                "files": self.files, "seconds": round(self.seconds, 2)}


# ------------------------------------------------------------------------------------ helpers
def _per_sample_mean(values: torch.Tensor, qmask: torch.Tensor | None) -> torch.Tensor:
    """(B, heads, N_q) -> (B,) mean over heads and the masked queries; NaN where the mask is empty."""
    if qmask is None:
        return values.float().mean((1, 2))
    w = qmask.unsqueeze(1).float().expand_as(values)
    total = w.sum((1, 2))
    return torch.where(total > 0, (values.float() * w).sum((1, 2)) / total.clamp(min=1), torch.nan)


def correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, float | None]:
    """Pearson and Spearman r over the samples where both are finite (None: < 3 such samples or a
    constant side)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]

    def r(u: np.ndarray, v: np.ndarray) -> float | None:
        if len(u) < 3 or u.std() == 0 or v.std() == 0:
            return None
        return float(np.corrcoef(u, v)[0, 1])

    def ranks(u: np.ndarray) -> np.ndarray:  # average ranks for ties
        order = np.argsort(u, kind="mergesort")
        rk = np.empty(len(u))
        rk[order] = np.arange(len(u))
        for value in np.unique(u):
            rk[u == value] = rk[u == value].mean()
        return rk

    return {"pearson": r(a, b), "spearman": r(ranks(a), ranks(b)) if len(a) >= 3 else None, "n": int(len(a))}


def _nanmean(v: np.ndarray) -> float | None:
    v = np.asarray(v, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else None


def garment_colour_error(generated: torch.Tensor, garment: torch.Tensor, garment_mask: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """The ground-truth-free proxy: mean colour of the result inside the inpainting mask against
    the garment's mean colour inside its garment mask, per sample, in [0, 1] like colour_error."""
    def mean(img: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return (img.float() * m).sum((2, 3)) / m.sum((2, 3)).clamp(min=1)
    return ((mean(generated, mask) - mean(garment, garment_mask)).abs() / 2).mean(1)


# ------------------------------------------------------------------------------- measurement
class _Readings:
    """A forward hook on the UNet, run after the monitor's: per call, each layer's per-sample
    dispersion and colour-anchored variance of that forward, summed into the call's time group."""

    def __init__(self, monitor: Any, batch: Mapping[str, torch.Tensor], latent_mask: torch.Tensor,
                 targets: Any, num_steps: int, groups: int) -> None:
        from i2am._grid import group_of

        self.monitor, self.latent_mask, self.targets = monitor, latent_mask, targets
        self.b = batch["garment"].shape[0]
        self.group = [group_of(k, num_steps, groups) for k in range(num_steps)]
        self.call = 0
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.counts = [0] * groups

    def __call__(self, module: Any, args: Any, output: Any) -> None:
        from i2am.dispersion import anchored_variance, query_mask

        g = self.group[self.call]
        self.call += 1
        self.counts[g] += 1
        half = slice(-self.b, None)  # the conditional half under guidance
        for name, s in self.monitor.last_attention().items():
            stats = {"dispersion": _per_sample_mean(s.var[half], query_mask(self.latent_mask, s.grid, self.b))}
            if self.targets is not None and s.anchored is not None:
                worn, colour, _ = self.targets.on_grid(s.grid)
                stats["colour_var"] = _per_sample_mean(anchored_variance(s.anchored[half], colour), worn)
            for key, v in stats.items():
                acc = self.sums.setdefault(name, {}).setdefault(key, torch.zeros(len(self.counts), self.b))
                acc[g] += v.detach().float().cpu()


def _batches(dataset: Any, n: int, batch_size: int) -> list[tuple[int, dict[str, Any]]]:
    from torch.utils.data import default_collate

    return [(s, default_collate([dataset[i] for i in range(s, min(s + batch_size, n))]))
            for s in range(0, n, batch_size)]


def _errors(images: torch.Tensor, batch: Mapping[str, Any], ground_truth: bool) -> dict[str, torch.Tensor]:
    from tryon_data.samples import colour_error, pixel_error

    if ground_truth:
        return {"colour_error": colour_error(images, batch["person"], batch["mask"]),
                "pixel_error": pixel_error(images, batch["person"], batch["mask"])}
    return {"colour_error": garment_colour_error(images, batch["garment"], batch["garment_mask"], batch["mask"])}


def _open(run: str | Path, overrides: Sequence[str], device: str) -> Any:
    from train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint

    p = Path(run).expanduser()
    if not p.exists():
        raise DiagnoseError(f"{p} does not exist; expected a run directory (with checkpoints/checkpoint-N/) "
                            "or a checkpoint directory (config.yaml + model/)")
    if not (p / "config.yaml").is_file() and not [c for c in list_checkpoints(p) if (c / "model").is_dir()]:
        raise DiagnoseError(f"{p} has no checkpoint: expected a run directory with at least one complete "
                            f"checkpoint under {p / 'checkpoints'} (checkpoint-N/ with config.yaml and model/), or a "
                            "checkpoint directory itself; train longer than train.checkpoint_every steps, or pass "
                            "the checkpoint directory")
    try:
        return load_checkpoint(p, overrides, device)
    except CheckpointError as err:
        raise DiagnoseError(str(err)) from None


# ------------------------------------------------------------------------------------ the run
@dataclass
class _Plan:
    """What every sampling run of one diagnosis shares: the same samples, seeds and steps."""

    model: Any
    sampler: Any
    batches: list[tuple[int, dict[str, Any]]]
    seeds: list[int]
    bounds: list[tuple[int, int]]       # the time groups' steps [start, stop)
    timesteps: list[int]
    ground_truth: bool

    def seeds_of(self, start: int, batch: Mapping[str, Any]) -> list[int]:
        return self.seeds[start:start + batch["garment"].shape[0]]


@dataclass
class _Recorded:
    """The recorded run: per layer and statistic (groups + 1, N) values (the time groups, then all
    steps), per-sample errors, each layer's grid, and the latents entering each group per batch."""

    per_layer: dict[str, dict[str, np.ndarray]]
    errors: dict[str, np.ndarray]
    grids: dict[str, str]
    starts: dict[int, dict[int, torch.Tensor]]


def _append(acc: dict[str, np.ndarray], key: str, values: np.ndarray) -> None:
    acc[key] = np.concatenate([acc[key], values], 1) if key in acc else values


def _record(plan: _Plan, progress: bool) -> tuple[list[str], _Recorded]:
    """One sampling run with the monitor recording (colour anchors set, as in training)."""
    from tqdm.auto import tqdm

    from i2am import AttentionMonitor
    from i2am.dispersion import colour_anchors
    from i2am.metrics import imacs_per_sample
    from losses.stability import AttentionTargets

    model, sampler, steps = plan.model, plan.sampler, plan.sampler.steps
    groups = len(plan.bounds)
    group_starts = {start for start, _ in plan.bounds}
    per_layer: dict[str, dict[str, np.ndarray]] = {}
    errors: dict[str, list[float]] = {}
    starts: dict[int, dict[int, torch.Tensor]] = {}
    monitor = AttentionMonitor(model.unet, model.reference_grid, model.extra_tokens, num_steps=steps,
                               time_groups=groups, moments=True, pair_layers=False)
    layers = list(monitor.layers)
    try:
        for s, batch in tqdm(plan.batches, desc="diagnose: recording", disable=not progress):
            b = batch["garment"].shape[0]
            anchors = colour_anchors(batch["garment"], model.reference_grid)
            monitor.set_anchors(torch.cat([anchors, anchors]) if sampler.guided else anchors)
            targets = (AttentionTargets(batch["person"], batch.get("worn_mask", batch["mask"]))
                       if plan.ground_truth else None)
            hook = _Readings(monitor, batch, model.codec.latent_mask(batch["mask"]), targets, steps, groups)
            handle = model.unet.register_forward_hook(hook)
            # The latents entering each time group: a run repaired only from group g on is the same
            # as this one before g, so it resumes there instead of sampling those steps again.
            starts[s] = {}

            def keep(k: int, latents: torch.Tensor, into: dict = starts[s]) -> None:
                if k in group_starts:
                    into[k] = latents.clone()
            try:
                run = sampler(model, batch, seeds=plan.seeds_of(s, batch), monitor=monitor, on_step=keep)
            finally:
                handle.remove()
                monitor.set_anchors(None)
            for k, v in _errors(run.images, batch, plan.ground_truth).items():
                errors.setdefault(k, []).extend(v.tolist())
            counts = torch.tensor(hook.counts, dtype=torch.float32).clamp(min=1)[:, None]
            for name in layers:
                acc = per_layer.setdefault(name, {})
                for key, sums in hook.sums.get(name, {}).items():
                    _append(acc, key, torch.cat([sums / counts, (sums.sum(0) / counts.sum())[None]]).numpy())
                lm = run.maps.layers[name]
                r2g = lm.r2g.float().mean(2)  # (bins, B, N_q), head mean; bins = time groups
                rows = [imacs_per_sample(m.reshape(b, *lm.query_grid), batch["mask"]) for m in [*r2g, r2g.sum(0)]]
                _append(acc, "imacs", np.array([[np.nan if v is None else v for v in row] for row in rows]))
    finally:
        monitor.close()
    grids = {n: "x".join(map(str, run.maps.layers[n].query_grid)) for n in layers}
    return layers, _Recorded(per_layer, {k: np.asarray(v) for k, v in errors.items()}, grids, starts)


def _repaired_errors(plan: _Plan, rec: _Recorded, name: str, group: int | None, repair: str,
                     temperature: float) -> dict[str, np.ndarray]:
    """The errors of the same samples and seeds with ``name`` repaired on all steps or on one group's."""
    from i2am.repair import AttentionTarget, repaired

    model, steps = plan.model, plan.sampler.steps
    out: dict[str, list[float]] = {}
    for s, batch in plan.batches:
        target = AttentionTarget(batch["garment_pos"], batch["worn_mask"]) if repair == "target" else None
        # Repaired on the group's steps, resumed at its first one (the gate counts calls from there).
        first, stop = (0, steps) if group is None else plan.bounds[group]
        resume = dict(latents=rec.starts[s][first], start_step=first) if first else {}
        with repaired(model.unet, name, steps=set(range(stop - first)),
                      temperature=temperature if repair == "temperature" else 1.0, target=target,
                      reference_grid=model.reference_grid, extra_tokens=model.extra_tokens):
            images = plan.sampler(model, batch, seeds=plan.seeds_of(s, batch), **resume).images
        for k, v in _errors(images, batch, True).items():
            out.setdefault(k, []).extend(v.tolist())
    return {k: np.asarray(v) for k, v in out.items()}


def _entry(plan: _Plan, rec: _Recorded, name: str, g: int | None) -> dict[str, Any]:
    """A ranking entry's measurements: where it is, the errors as sampled, each statistic's mean
    and its correlation with the colour error over the samples."""
    steps = plan.sampler.steps
    first, stop = (0, steps) if g is None else plan.bounds[g]
    e: dict[str, Any] = {"layer": name, "short": short_name(name), "grid": rec.grids[name], "time_group": g,
                         "steps": [first, stop], "timesteps": [plan.timesteps[first], plan.timesteps[stop - 1]],
                         "colour_error": float(rec.errors["colour_error"].mean())}
    if "pixel_error" in rec.errors:
        e["pixel_error"] = float(rec.errors["pixel_error"].mean())
    row = -1 if g is None else g
    for stat in STATISTICS:
        values = rec.per_layer[name].get(stat)
        e[stat] = None if values is None else _nanmean(values[row])
        e[f"corr_{stat}"] = None if values is None else correlation(values[row], rec.errors["colour_error"])
    return e


def _blame(e: dict[str, Any], base: dict[str, np.ndarray], err: dict[str, np.ndarray], repair: str,
           temperature: float, metric: str = "colour") -> dict[str, Any]:
    diff = base[f"{metric}_error"] - err[f"{metric}_error"]
    e.update(blame=float(diff.mean()), blame_se=float(diff.std(ddof=1) / math.sqrt(len(diff))),
             colour_error_repaired=float(err["colour_error"].mean()),
             pixel_error_repaired=float(err["pixel_error"].mean()), repair=repair,
             blame_metric=f"{metric}_error", blame_samples=[round(float(d), 6) for d in diff])
    if repair == "temperature":
        e["temperature"] = temperature
    return e


def diagnose(run: str | Path, samples: int = 32, out: str | Path | None = None, *, steps: int | None = None,
             time_groups: int = 5, top_layers: int = 2, repair: str = "auto", temperature: float = 0.5,
             seed: int = 0, batch_size: int = 32, unpaired: bool = False, device: str | None = None,
             metric: str = "colour",
             overrides: Sequence[str] = (), progress: bool = True, loaded: Any = None,
             write: bool = True) -> Diagnosis:
    """Diagnose a run or checkpoint (see the module docstring); writes the outputs to ``out``
    (default ``<run>/diagnosis/<checkpoint name>``) unless ``write=False``. ``loaded`` (a
    ``train.checkpoint.LoadedCheckpoint``) skips loading, e.g. to diagnose a modified model."""
    from tqdm.auto import tqdm

    from i2am._grid import split_bounds
    from models.sampling import Sampler
    from train.data import build_dataset

    if samples < 3:
        raise DiagnoseError(f"--samples {samples}: at least 3 samples are needed for correlations")
    if metric not in ("colour", "pixel"):
        raise DiagnoseError(f"metric={metric!r}: expected colour (mean colour in the mask: wrong colours) or pixel "
                            f"(per pixel: also patterns out of place)")
    if repair not in ("auto", "target", "temperature"):
        raise DiagnoseError(f"repair={repair!r}: expected auto, target or temperature")
    start = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = loaded if loaded is not None else _open(run, overrides, device)
    cfg, model = ckpt.cfg, ckpt.model
    sampler = Sampler.from_config(cfg.diffusion, steps=steps)
    steps = sampler.steps
    groups = min(time_groups, steps)
    dataset = build_dataset(cfg.data, "test", mode="unpaired" if unpaired else "paired", num_samples=samples)
    samples = min(samples, len(dataset))
    batches = [(s, {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()})
               for s, b in _batches(dataset, samples, batch_size)]
    ground_truth = not unpaired
    notes: list[str] = []
    has_pos = all("garment_pos" in b and "worn_mask" in b for _, b in batches)
    chosen = repair if repair != "auto" else ("target" if has_pos else "temperature")
    if chosen == "target" and not has_pos:
        raise DiagnoseError(f"repair=target needs each worn pixel's true garment position (sample key 'garment_pos'), "
                            f"which data.name={cfg.data.name!r} does not give; use repair=temperature")
    if not ground_truth:
        notes.append("no ground truth: the data is unpaired, so 'person' is not the try-on result and the colour "
                     "error cannot be measured; no intervention was run (its effect could not be scored) and the "
                     "ranking is by correlation only, against a proxy colour error (the result's mean colour in the "
                     "mask vs the garment's mean colour). The colour-anchored variance needs the true colours and "
                     "is not computed.")
    sampler.scheduler.set_timesteps(steps)
    plan = _Plan(model, sampler, batches, [seed + i for i in range(samples)], split_bounds(steps, groups),
                 [int(t) for t in sampler.scheduler.timesteps], ground_truth)

    # ---- 1. measure (one recorded sampling run)
    layers, rec = _record(plan, progress)
    base = rec.errors
    layer_entries = [_entry(plan, rec, n, None) for n in layers]
    group_entries: list[dict[str, Any]] = []
    # ---- 2. intervene: every layer over all steps, then the top layers per time group
    if ground_truth:
        with tqdm(total=len(layers) + min(top_layers, len(layers)) * groups, desc="diagnose: interventions",
                  disable=not progress) as bar:
            for e in layer_entries:
                _blame(e, base, _repaired_errors(plan, rec, e["layer"], None, chosen, temperature), chosen,
                       temperature, metric)
                bar.update()
            for t in sorted(layer_entries, key=lambda e: -e["blame"])[:top_layers]:
                for g in range(groups):
                    err = _repaired_errors(plan, rec, t["layer"], g, chosen, temperature)
                    group_entries.append(_blame(_entry(plan, rec, t["layer"], g), base, err, chosen, temperature,
                                                metric))
                    bar.update()
        ranking = sorted(layer_entries + group_entries, key=lambda e: -e["blame"])
        key = "blame"
    else:  # correlation only: rank by how strongly more dispersion goes with a larger (proxy) error
        for e in layer_entries:
            e["blame"], e["correlation_score"] = None, e["corr_dispersion"]["pearson"]
        ranking = sorted(layer_entries, key=lambda e: -(e["correlation_score"] if e["correlation_score"] is not None
                                                       else -math.inf))
        key = "correlation_score"
    # ---- 3. rank and recommend
    by_layer = [e for e in ranking if e["time_group"] is None]
    scores = [e[key] for e in by_layer if e[key] is not None]
    margin = float(scores[0] - scores[1]) if len(scores) > 1 else None
    from configs.loader import DATA_WITH_GARMENT_POS

    term = "position" if cfg.data.name in DATA_WITH_GARMENT_POS else "colour"
    recommendation = recommend(by_layer, group_entries, rec.grids, ground_truth, term, metric)
    settings = {"run": str(ckpt.path), "step": ckpt.step, "samples": samples, "metric": f"{metric}_error", "seeds": [seed, seed + samples - 1],
                "sampling_steps": steps, "guidance_scale": sampler.guidance_scale, "time_groups": groups,
                "top_layers": top_layers if ground_truth else 0, "repair": chosen if ground_truth else None,
                "temperature": temperature if chosen == "temperature" else None, "split": "test",
                "mode": "unpaired" if unpaired else "paired", "data": cfg.data.name, "device": str(device),
                "tracker": cfg.tracker.kind, "ranked_by": key,
                "sampling_runs": 1 + (len(layers) + len(group_entries) if ground_truth else 0),
                # group runs resume at their group's first step (the steps before it are the recorded run's)
                "unet_calls": steps * (1 + (len(layers) if ground_truth else 0))
                              + sum(steps - e["steps"][0] for e in group_entries)}
    diag = Diagnosis(ranking=ranking, layers=layers,
                     time_groups=[{"index": g, "steps": list(b), "timesteps": [plan.timesteps[b[0]],
                                                                              plan.timesteps[b[1] - 1]]}
                                  for g, b in enumerate(plan.bounds)],
                     recommendation=recommendation, ground_truth=ground_truth, notes=notes, settings=settings,
                     margin=margin, per_sample={k: [round(float(x), 6) for x in v] for k, v in base.items()})
    diag.seconds = time.perf_counter() - start
    if write:
        from .diagnose_report import write_outputs

        # Default beside the checkpoints, not inside one: training prunes old checkpoint directories.
        ck_dir = Path(ckpt.path)
        run_dir = ck_dir.parent.parent if ck_dir.parent.name == "checkpoints" else ck_dir
        target_dir = Path(out) if out is not None else run_dir / "diagnosis" / ck_dir.name
        diag.settings["out"] = str(target_dir)
        write_outputs(diag, target_dir, rec.per_layer, cfg)
        diag.seconds = time.perf_counter() - start
        print(f"diagnosis of {samples} samples took {diag.seconds:.1f} s ({diag.settings['sampling_runs']} sampling "
              f"runs of up to {steps} steps, {diag.settings['unet_calls']} UNet calls of up to {batch_size} samples, "
              f"on {device}, {torch.get_num_threads()} CPU threads)")
    return diag


# ---------------------------------------------------------------------------- recommendation
def recommend(by_layer: list[dict[str, Any]], group_entries: list[dict[str, Any]], grids: Mapping[str, str],
              ground_truth: bool, term: str = "colour", metric: str = "colour") -> dict[str, Any]:
    """The stability settings the ranking points to.

    Nothing when the top blame is within two standard errors of zero. Layers: the top layer,
    plus every layer whose blame reaches ``SHARE`` of it and is more than two standard errors
    above zero; a set that is every layer of one resolution is written as
    that level ("16x12"). t_max: the time groups of the chosen layers whose summed blame reaches
    ``SHARE`` of the largest; t_max = 1 + the noisiest timestep of the earliest of them (the
    loss applies for t < t_max). If the noisiest group is blamed, t_max stays null (every t):
    t_max can only cut off noisy steps. ``term``: "position" where the data gives garment
    positions, else "colour", at its weight in ``TERM_WEIGHTS``."""
    weight = TERM_WEIGHTS[term]
    if not ground_truth:
        top = [e["layer"] for e in by_layer[:1] if e.get("correlation_score") is not None]
        return {"term": term, "stability": {term: weight, "layers": top or None, "t_max": None},
                "basis": "correlation only (no ground truth); confirm on paired data before training on it",
                "layers_chosen": top}
    best = by_layer[0]["blame"] if by_layer else 0.0
    if best <= 0 or best <= 2 * by_layer[0]["blame_se"]:
        # Within two standard errors of zero the top layer may be first by chance: say so rather
        # than send the user off to regularise a layer that is fine.
        # An empty group: merged over the user's configs it changes nothing (a weight of 0 here
        # would switch off a term they already train with).
        return {"term": None, "stability": {},
                "basis": f"no layer's repair lowered the {metric} error by more than two standard errors "
                         f"(top: {best:.4g} ± {by_layer[0]['blame_se'] if by_layer else 0:.2g}): "
                         "nothing to regularise",
                "layers_chosen": []}
    chosen = [e["layer"] for e in by_layer
              if e is by_layer[0] or (e["blame"] >= SHARE * best and e["blame"] > 2 * e["blame_se"])]
    emitted: list[str] = []
    for level in dict.fromkeys(grids[n] for n in chosen):
        members = [n for n, g in grids.items() if g == level]
        if len(members) > 1 and set(members) <= set(chosen):
            emitted.append(level)
        else:
            emitted.extend(n.removesuffix(".processor") for n in chosen if grids[n] == level)
    per_group: dict[int, float] = {}
    first_t: dict[int, int] = {}
    for e in group_entries:
        if e["layer"] in chosen:
            per_group[e["time_group"]] = per_group.get(e["time_group"], 0.0) + e["blame"]
            first_t[e["time_group"]] = e["timesteps"][0]
    t_max, blamed = None, []
    if per_group and max(per_group.values()) > 0:
        peak = max(per_group.values())
        blamed = sorted(g for g, v in per_group.items() if v > 0 and v >= SHARE * peak)
        if blamed[0] > 0:
            t_max = first_t[blamed[0]] + 1
    basis = (f"repairing {', '.join(short_name(n) for n in chosen)} lowered the {metric} error by "
             + ", ".join(format(e["blame"], ".4f") for e in by_layer if e["layer"] in chosen)
             + (f"; blamed time groups {blamed} (0 = noisiest)" if blamed else ""))
    return {"term": term, "stability": {term: weight, "layers": emitted, "t_max": t_max},
            "basis": basis, "layers_chosen": chosen, "blamed_time_groups": blamed}
