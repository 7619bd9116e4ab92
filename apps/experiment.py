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

from configs import load_config


def evaluate_arm(trainer, num_samples: int, batch_size: int = 16) -> tuple[dict[str, float], tuple]:
    """Colour/pixel error, SSIM, IMACS and dispersion on `num_samples` test samples (EMA
    weights, fixed noise), and the first batch's (maps, batch, generated) for the
    comparison figure. Dispersion is measured as in training (masked, every monitored
    layer) on one noised forward per batch at seeded timesteps."""
    from i2am.metrics import imacs_per_sample
    from models.sampling import sample_tryon
    from train.data import build_dataset
    from tryon_data import colour_error, pixel_error
    from tryon_eval.metrics import ssim

    cfg, model, hooks = trainer.cfg, trainer.unwrapped, trainer.hooks
    dataset = build_dataset(cfg.data, "test", num_samples=num_samples)
    rows: dict[str, list[float]] = {"colour_error": [], "pixel_error": [], "ssim": [], "imacs_g": [], "imacs_r": [],
                                    "dispersion": []}
    first_maps = None
    with trainer.ema_weights(), torch.no_grad():
        model.eval()
        for start in range(0, num_samples, batch_size):
            batch = default_collate([dataset[i] for i in range(start, min(start + batch_size, num_samples))])
            gen = torch.Generator().manual_seed(cfg.train.seed + start)
            with hooks.recording(cfg.diffusion.sample_steps, cfg.diffusion.guidance_scale != 1.0):
                out = sample_tryon(model, batch, trainer.validator.scheduler, cfg.diffusion.sample_steps,
                                   cfg.diffusion.guidance_scale, gen)
            maps = hooks.monitor.maps()
            first_maps = first_maps or (maps, batch, out)
            rows["colour_error"] += colour_error(out, batch["person"], batch["mask"]).tolist()
            rows["pixel_error"] += pixel_error(out, batch["person"], batch["mask"]).tolist()
            for a, b in zip(out, batch["person"]):
                rows["ssim"].append(ssim(_u8(a), _u8(b)))
            rows["imacs_g"] += [v for v in imacs_per_sample(maps.unified("r2g").cpu(), batch["mask"]) if v is not None]
            rows["imacs_r"] += [v for v in imacs_per_sample(maps.unified("g2r").cpu(), batch["garment_mask"])
                                if v is not None]
            rows["dispersion"].append(held_out_dispersion(trainer, batch, gen))
    result = {k: float(np.mean(v)) for k, v in rows.items()}
    result["steps"] = trainer.step
    result["minutes"] = round(trainer.train_seconds / 60, 2)
    return result, first_maps


@torch.no_grad()
def held_out_dispersion(trainer, batch, gen: torch.Generator) -> float:
    """Mean attention dispersion (masked, every monitored layer) of one noised forward of
    `batch` at timesteps and noise drawn from `gen`."""
    model = trainer.unwrapped
    latents = model.codec.encode(batch["person"])
    t = torch.randint(0, trainer.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    noise = torch.randn(latents.shape, generator=gen).to(latents.device)
    t = t.to(latents.device)
    noisy = trainer.noise_scheduler.add_noise(latents, noise, t)
    model(noisy, t, model.condition(batch), batch["garment"])
    return trainer.hooks.dispersion(model.codec.latent_mask(batch["mask"]), t)


def _u8(image: torch.Tensor) -> np.ndarray:
    return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


COLUMNS = [("colour_error", "colour error ↓", 4), ("pixel_error", "pixel error ↓", 4), ("ssim", "SSIM ↑", 4), ("dispersion", "dispersion ↓", 4),
           ("imacs_g", "IMACS_g ↑", 4), ("imacs_r", "IMACS_r ↑", 4), ("steps", "steps", 0), ("minutes", "min", 1)]


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    head = "| arm | " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    rows = [f"| {arm} | " + " | ".join(f"{r[k]:.{d}f}" for k, _, d in COLUMNS) + " |" for arm, r in results.items()]
    return "\n".join([head, sep, *rows])


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

    from i2am.render import save_png
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
    table = markdown_table(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    save_png(comparison_figure(figures), out / "maps.png")
    print(table)
    print(f"\nwritten: {out / 'results.md'}, {out / 'results.json'}, {out / 'maps.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
