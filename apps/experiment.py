"""The paper's debugging experiment: train arms with the same seed, data and steps,
evaluate them on the same held-out samples, write one markdown table and a figure.

    python -m apps.experiment configs/experiments/baseline.yaml configs/experiments/refined.yaml [more arms] \
        [--out runs/stability] [--eval-samples 64] [key=value ...]

Overrides apply to every arm (e.g. `train.max_steps=300` for a quicker look;
`train.resume=latest` re-evaluates arms already trained).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from common import tables
from configs import load_config


def evaluate_arm(trainer, num_samples: int, batch_size: int = 16) -> tuple[dict[str, float], tuple]:
    """Colour/pixel error, SSIM, IMACS and dispersion on `num_samples` test samples (EMA
    weights, fixed noise), and the first batch's (maps, batch, generated) for the
    comparison figure. The per-sample scores are the evaluation's (`tryon_eval.metrics.sample_scores`);
    dispersion is measured as in training (masked, every monitored layer) on one noised
    forward per batch at seeded timesteps."""
    from train.data import build_dataset
    from tryon_eval.metrics import sample_scores

    cfg, model, hooks = trainer.cfg, trainer.unwrapped, trainer.hooks
    sampler = trainer.validator.sampler
    dataset = build_dataset(cfg.data, "test", num_samples=num_samples)
    rows: dict[str, list[float]] = {"colour_error": [], "pixel_error": [], "ssim": [], "imacs_g": [], "imacs_r": [],
                                    "dispersion": []}
    first_maps = None
    with trainer.ema_weights(), torch.no_grad():
        model.eval()
        for start in range(0, num_samples, batch_size):
            batch = default_collate([dataset[i] for i in range(start, min(start + batch_size, num_samples))])
            gen = torch.Generator().manual_seed(cfg.train.seed + start)  # sampling, then the noised forward
            with hooks.recording(sampler.steps) as monitor:
                samples = sampler(model, batch, generator=gen, monitor=monitor)
            out, maps = samples.images, samples.maps
            first_maps = first_maps or (maps, batch, out)
            scores = sample_scores(out, batch, maps, target=batch["person"], with_ssim=True)
            for key in ("colour_error", "pixel_error", "ssim"):
                rows[key] += scores[key]
            for key in ("imacs_g", "imacs_r"):  # undefined where a map is constant
                rows[key] += [v for v in scores[key] if v is not None]
            rows["dispersion"].append(held_out_dispersion(trainer, batch, gen))
    result = {k: float(np.mean(v)) for k, v in rows.items()}
    result["steps"] = trainer.step
    result["minutes"] = round(trainer.train_seconds / 60, 2)
    return result, first_maps


@torch.no_grad()
def held_out_dispersion(trainer, batch, gen: torch.Generator) -> float:
    """Mean attention dispersion (masked, every monitored layer) of one noised forward of
    `batch` at timesteps and noise drawn from `gen` (the training loss's forward process)."""
    model = trainer.unwrapped
    latents = model.codec.encode(batch["person"])
    noisy, _, t = trainer.diffusion_loss.noised(latents, gen)
    model(noisy, t, model.condition(batch), batch["garment"])
    return trainer.hooks.dispersion(model.codec.latent_mask(batch["mask"]), t)


COLUMNS = [("colour_error", "colour error ↓", 4), ("pixel_error", "pixel error ↓", 4), ("ssim", "SSIM ↑", 4), ("dispersion", "dispersion ↓", 4),
           ("imacs_g", "IMACS_g ↑", 4), ("imacs_r", "IMACS_r ↑", 4), ("steps", "steps", 0), ("minutes", "min", 1)]


def results_table(results: dict[str, dict[str, float]]) -> str:
    """One row per arm (`common.tables.markdown_table`)."""
    return tables.markdown_table(["arm", *(c[1] for c in COLUMNS)],
                                 [[arm, *(r[k] for k, _, _ in COLUMNS)] for arm, r in results.items()],
                                 align=["", *["right"] * len(COLUMNS)], digits=[0, *(d for *_, d in COLUMNS)])


def comparison_figure(arms: dict[str, tuple], samples: int = 4) -> np.ndarray:
    """Rows per arm: R2G over the generated images, G2R over the garments."""
    from i2am import render

    panels = []
    for arm, (maps, batch, out) in arms.items():
        n = min(samples, out.shape[0])
        panels.append(render.map_grid(maps.unified("r2g")[:n].cpu(), list(out[:n]), [f"{arm} #{i}" for i in range(n)],
                                      suptitle=f"{arm}: R2G over the generated image", shared=False))
        panels.append(render.map_grid(maps.unified("g2r")[:n].cpu(), list(batch["garment"][:n]),
                                      [f"{arm} #{i}" for i in range(n)],
                                      suptitle=f"{arm}: G2R over the garment", shared=False))
    width = max(p.shape[1] for p in panels)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in panels])


def main(argv: list[str] | None = None) -> int:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from common.images import save_png
    from train import Trainer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arms", nargs="+", help="experiment config files (one per arm) and key=value overrides")
    parser.add_argument("--out", default="runs/stability")
    parser.add_argument("--eval-samples", type=int, default=64)
    args = parser.parse_intermixed_args(argv)
    files = [a for a in args.arms if "=" not in a]
    overrides = [a for a in args.arms if "=" in a]
    out = Path(args.out)
    results, figures = {}, {}
    for file in files:
        arm = Path(file).stem
        cfg = load_config(files=[file], overrides=[f"train.output_dir={out / arm}", *overrides])
        trainer = Trainer(cfg)
        trainer.fit()
        results[arm], figures[arm] = evaluate_arm(trainer, args.eval_samples)
        trainer.close()
        # Accelerate keeps process-wide state; start the next arm clean.
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    table = results_table(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    save_png(comparison_figure(figures), out / "maps.png")
    print(table)
    print(f"\nwritten: {out / 'results.md'}, {out / 'results.json'}, {out / 'maps.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
