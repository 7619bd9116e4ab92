"""The stability experiment: arms trained with the same data and steps, each on several
seeds, evaluated on the same held-out samples; one markdown table (mean ± sd over the
seeds), the two fill baselines beside them, and figures of maps and samples.

    python -m apps.experiment configs/experiments/baseline.yaml configs/experiments/anchored.yaml [more arms] \
        [--seeds 0,1,2] [--out runs/stability] [--eval-samples 64] [--diagnose N] [key=value ...]

Overrides apply to every arm (e.g. `train.max_steps=300` for a quicker look;
`train.resume=latest` re-evaluates arms already trained). A seed sets `train.seed` (weights,
noise, timesteps, dropout); the data (`data.seed`) is the same for every arm and seed.

Each finished run leaves its held-out scores in `<run>/heldout.json`, keyed by its resolved
config; a later invocation with the same config reuses them instead of training again (the
first seed of each arm is still re-evaluated from its checkpoint, for the figures). So runs
can be split over processes (`--seeds 0` in one, `--seeds 1,2` in another, the same `--out`)
and one final invocation with every arm and seed writes the table.

Fine-tune arms (`train.init_from`) name the run they start from with placeholders: `{out}`
(the `--out` directory) and `{seed}` (this run's seed), e.g. `{out}/baseline/seed{seed}`,
so each seed fine-tunes the baseline trained with the same seed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import default_collate

from common import tables
from configs import load_config

# (key, column title, decimals); a key missing from every row is left out of the table.
COLUMNS = [("colour_error", "colour err ↓", 4), ("pixel_error", "pixel err ↓", 4),
           ("pixel_error_worn", "pixel err (worn) ↓", 4), ("ssim", "SSIM ↑", 3), ("dispersion", "dispersion", 4),
           ("centre_error", "centre err ↓", 3), ("imacs_g", "IMACS_g ↑", 2), ("imacs_r", "IMACS_r ↑", 2),
           ("miou", "box mIoU ↑", 3), ("minutes", "train min", 1)]


def _errors(out: torch.Tensor, batch: Mapping[str, Any]) -> dict[str, list[float]]:
    """Colour and pixel error inside the inpainting mask, and the pixel error inside the
    worn-garment mask (where the pattern must land) when the data set gives one."""
    from tryon_data.samples import colour_error, pixel_error

    person, mask = batch["person"], batch["mask"]
    errors = {"colour_error": colour_error(out, person, mask).tolist(),
              "pixel_error": pixel_error(out, person, mask).tolist()}
    if "worn_mask" in batch:
        errors["pixel_error_worn"] = pixel_error(out, person, batch["worn_mask"]).tolist()
    return errors


def _batches(dataset, num_samples: int, batch_size: int):
    for start in range(0, num_samples, batch_size):
        yield start, default_collate([dataset[i] for i in range(start, min(start + batch_size, num_samples))])


def fill_baselines(trainer, num_samples: int, batch_size: int = 16) -> dict[str, dict[str, float]]:
    """What a model that does no try-on scores: the mask filled with the training set's mean
    garment colour (garment-blind), or with the garment's own mean colour (a flat copy)."""
    from tryon_data.samples import masked_mean_colour
    from train.data import build_dataset
    from tryon_eval.metrics import ssim
    from common.images import to_uint8

    dataset = build_dataset(trainer.cfg.data, "test", num_samples=num_samples)
    blind_colour = masked_mean_colour(trainer.train_set, num=512).view(1, 3, 1, 1)
    rows: dict[str, dict[str, list[float]]] = {"fill: garment-blind": {}, "fill: garment's mean colour": {}}
    for _, batch in _batches(dataset, num_samples, batch_size):
        gm = batch["garment_mask"]
        own = ((batch["garment"] * gm).sum((2, 3)) / gm.sum((2, 3)).clamp(min=1))[:, :, None, None]
        mask, agnostic = batch["mask"], batch["agnostic"]
        for name, colour in (("fill: garment-blind", blind_colour), ("fill: garment's mean colour", own)):
            out = agnostic * (1 - mask) + colour * mask
            scores = _errors(out, batch)
            scores["ssim"] = [ssim(a, b) for a, b in zip(to_uint8(out), to_uint8(batch["person"]))]
            for k, v in scores.items():
                rows[name].setdefault(k, []).extend(v)
    return {name: {k: float(np.mean(v)) for k, v in r.items()} for name, r in rows.items()}


def evaluate_arm(trainer, num_samples: int, batch_size: int = 16) -> tuple[dict[str, float], tuple]:
    """Held-out scores of one trained arm (EMA weights, fixed noise) and the first batch's
    (maps, batch, generated) for the figures. Per-sample scores are the evaluation's
    (`tryon_eval.metrics.sample_scores`, `tryon_eval.boxes.score_boxes`); the attention
    readings (dispersion, centre error) come from one noised forward per batch at seeded
    timesteps, measured as in training (`MonitorHooks.attention_readings`)."""
    from train.data import build_dataset
    from tryon_eval.boxes import score_boxes
    from tryon_eval.metrics import sample_scores

    cfg, model, hooks = trainer.cfg, trainer.unwrapped, trainer.hooks
    sampler = trainer.validator.sampler
    dataset = build_dataset(cfg.data, "test", num_samples=num_samples)
    rows: dict[str, list[float]] = {}
    first = None
    with trainer.ema_weights(), torch.no_grad():
        model.eval()
        for start, batch in _batches(dataset, num_samples, batch_size):
            gen = torch.Generator().manual_seed(cfg.train.seed + start)  # sampling, then the noised forward
            with hooks.recording(sampler.steps) as monitor:
                samples = sampler(model, batch, generator=gen, monitor=monitor)
            out, maps = samples.images, samples.maps
            first = first or (maps, batch, out)
            scores = sample_scores(out, batch, maps, target=batch["person"], with_ssim=True)
            scores.update(_errors(out, batch))
            boxes = score_boxes(list(maps.unified("r2g").float().cpu()), batch["box"].tolist(), out.shape[-2:],
                                seed=cfg.train.seed, offset=start)
            scores["miou"] = [b["iou"] for b in boxes]
            scores["miou_random"] = [b["iou_random"] for b in boxes]
            for key, values in scores.items():  # IMACS is undefined (None) where a map is constant
                rows.setdefault(key, []).extend(v for v in values if v is not None)
            for key, value in held_out_readings(trainer, batch, gen).items():
                rows.setdefault(key, []).append(value)
    result = {k: float(np.mean(v)) for k, v in rows.items() if v}
    result["steps"] = trainer.step
    result["minutes"] = round(trainer.train_seconds / 60, 2)
    return result, first


def held_out_readings(trainer, batch, gen: torch.Generator) -> dict[str, float]:
    """The monitor's attention readings of one noised forward of `batch` at noise and t drawn
    from `gen` (`TryOnObjective.readings`, measured as training logs them): mean dispersion,
    and the mean centre error where the data knows the true garment positions."""
    readings = trainer.objective.readings(trainer.unwrapped, batch, gen)
    out = {"dispersion": readings["i2am/dispersion/mean"]}
    if "i2am/centre_error/mean" in readings:
        out["centre_error"] = readings["i2am/centre_error/mean"]
    return out


def summarise(per_seed: Mapping[int, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) of each metric over the seeds."""
    keys = sorted({k for r in per_seed.values() for k in r})
    mean, sd = {}, {}
    for k in keys:
        values = np.array([r[k] for r in per_seed.values() if k in r], dtype=np.float64)
        mean[k] = float(values.mean())
        sd[k] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd}


def results_table(results: Mapping[str, Mapping[str, Any]], baselines: Mapping[str, Mapping[str, float]] = {}) -> str:
    """One row per fill baseline, then one per arm with mean ± sd over its seeds; columns
    that no row has are left out."""
    rows = [*baselines.values(), *(r["mean"] for r in results.values())]
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    body = [[name, *(tables.fmt(r.get(k), d) for k, _, d in columns)] for name, r in baselines.items()]
    for arm, r in results.items():
        n = len(r["seeds"])
        cells = []
        for k, _, d in columns:
            if k not in r["mean"]:
                cells.append(tables.MISSING)
            elif n > 1:
                cells.append(f"{tables.fmt(r['mean'][k], d)} ± {tables.fmt(r['sd'][k], d)}")
            else:
                cells.append(tables.fmt(r["mean"][k], d))
        body.append([f"{arm} ({n} seed{'s' * (n > 1)})", *cells])
    return tables.markdown_table(["arm", *(c[1] for c in columns)], body, align=["", *["right"] * len(columns)])


def comparison_figure(arms: Mapping[str, tuple], samples: int = 4) -> np.ndarray:
    """Rows per arm: R2G over the generated images, G2R over the garments, and the
    specific-reference map of the middle of the torso (what that patch drew on)."""
    from i2am import render

    panels = []
    for arm, (maps, batch, out) in arms.items():
        n = min(samples, out.shape[0])
        titles = [f"{arm} #{i}" for i in range(n)]
        panels.append(render.map_grid(maps.unified("r2g")[:n].cpu(), list(out[:n]), titles,
                                      suptitle=f"{arm}: R2G over the generated image", shared=False))
        panels.append(render.map_grid(maps.unified("g2r")[:n].cpu(), list(batch["garment"][:n]), titles,
                                      suptitle=f"{arm}: G2R over the garment", shared=False))
        # The torso's middle cell on the generated grid: what did that patch draw on?
        grid = maps.generated_grid
        y0, x0, y1, x1 = (int(v) for v in batch["box"][0])
        h, w = out.shape[-2:]
        y, x = (y0 + y1) * grid[0] // (2 * h), (x0 + x1) * grid[1] // (2 * w)
        ref = maps.specific_reference((y, x, y + 1, x + 1))[0].float().cpu()
        panels.append(render.specific_reference_figure(out[0], batch["garment"][0], (y, x, y + 1, x + 1), ref, grid))
    width = max(p.shape[1] for p in panels)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in panels])


def samples_figure(arms: Mapping[str, tuple], samples: int = 8) -> np.ndarray:
    """What users see: garment, ground truth and each arm's try-on, one column a sample."""
    from i2am.render import sample_grid

    (_, batch, _), n = next(iter(arms.values())), samples
    columns = {"garment": batch["garment"][:n], "ground truth": batch["person"][:n]}
    columns.update({arm: out[:n].cpu() for arm, (_, _, out) in arms.items()})
    return sample_grid(columns)


def _config_key(cfg) -> str:
    """What a cached result must match: the resolved config, less what cannot change the
    trained model (`_plain`)."""
    import hashlib

    return hashlib.sha256(json.dumps(_plain(cfg), sort_keys=True).encode()).hexdigest()[:16]


# Keys that say how a run was watched, resumed or where it was written, not what it trained: a
# run cached with `tracker.kind=none train.cpu_threads=1` is the same run as one with W&B and every
# core, and a run trained under another `--out` and moved into this one is the same run too.
_NOT_THE_RUN = (("train", "resume"), ("train", "cpu_threads"), ("train", "output_dir"), ("tracker", None))


def _plain(cfg) -> dict[str, Any]:
    import dataclasses

    return _without_bookkeeping(dataclasses.asdict(cfg))


def _without_bookkeeping(plain: dict[str, Any]) -> dict[str, Any]:
    for section, key in _NOT_THE_RUN:
        if key is None:
            plain.pop(section, None)
        else:
            plain.setdefault(section, {})[key] = None
    return plain


def _cached(run_dir: Path, key: str, eval_samples: int, cfg=None) -> dict[str, float] | None:
    """The run's cached held-out scores if they were measured on `eval_samples` samples of a run
    with this config: the same key, or (a result cached before the schema gained keys, which
    changes every key) the run's own config.yaml matching `cfg` (`_same_run`)."""
    path = run_dir / "heldout.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("eval_samples") != eval_samples:
        return None
    if saved.get("config") == key:
        return saved["result"]
    if cfg is not None and (run_dir / "config.yaml").is_file() and _same_run(run_dir / "config.yaml", cfg):
        return saved["result"]
    return None


def _same_run(saved_yaml: Path, cfg) -> bool:
    """Whether a run's saved (fully resolved) config.yaml is `cfg`: every key it has is equal,
    and every key it lacks (added to the schema since) is at its schema default in `cfg`, which
    is how the run behaved without it."""
    from omegaconf import OmegaConf

    from configs.schema import Config

    saved = _without_bookkeeping(OmegaConf.to_container(OmegaConf.load(saved_yaml)))
    want, defaults = _plain(cfg), _plain(Config())

    def same(a: Any, b: Any, d: Any) -> bool:
        if isinstance(b, dict):
            return all(same(a[k], b[k], d.get(k) if isinstance(d, dict) else None) if k in a else b[k] == d.get(k)
                       for k in b) and set(a) <= set(b)
        return a == b

    return same(saved, want, defaults)


def arm_config(file: str | Path, out: Path, seed: int, overrides: list[str]):
    """One run's config: the arm's file, the run's directory `<out>/<arm>/seed<seed>` and seed,
    then the overrides; `{out}` and `{seed}` in `train.init_from` filled in."""
    run_dir = Path(out) / Path(file).stem / f"seed{seed}"
    cfg = load_config(files=[file], overrides=[f"train.output_dir={run_dir}", f"train.seed={seed}", *overrides])
    if cfg.train.init_from:  # fine-tune arms start from the same seed's run of another arm
        cfg.train.init_from = cfg.train.init_from.format(seed=seed, out=out)
    return cfg


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers like 0,1,2, got {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from common.images import save_png
    from train import Trainer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arms", nargs="+", help="experiment config files (one per arm) and key=value overrides")
    # One comma-separated value, so that key=value overrides after it are not taken for seeds.
    parser.add_argument("--seeds", type=_seeds, default=[0], help="train.seed of each run of every arm, e.g. 0,1,2")
    parser.add_argument("--out", default="runs/stability")
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--report", default="results", metavar="NAME",
                        help="file names of the table and figures under --out: NAME.md, NAME.json, NAME_maps.png, "
                             "NAME_samples.png (several experiments can share one --out)")
    parser.add_argument("--diagnose", type=int, default=0, metavar="N",
                        help="after each run, `python -m i2am diagnose` it on N held-out samples, into "
                             "<run>/diagnosis/ (0: off; docs/diagnose.md)")
    args = parser.parse_intermixed_args(argv)
    files = [a for a in args.arms if "=" not in a]
    overrides = [a for a in args.arms if "=" in a]
    out = Path(args.out)
    results: dict[str, dict[str, Any]] = {}
    figures: dict[str, tuple] = {}
    baselines: dict[str, dict[str, float]] = {}
    for file in files:
        arm = Path(file).stem
        per_seed: dict[int, dict[str, float]] = {}
        for seed in args.seeds:
            cfg = arm_config(file, out, seed, overrides)
            run_dir = Path(cfg.train.output_dir)
            key = _config_key(cfg)
            cached = _cached(run_dir, key, args.eval_samples, cfg)
            if cached is not None and seed != args.seeds[0]:
                per_seed[seed] = cached
                print(f"{arm} seed {seed}: reusing {run_dir / 'heldout.json'}")
                continue
            if cached is not None:
                cfg.train.resume = "latest"  # trained already: only re-evaluate, for the figures
            trainer = Trainer(cfg)
            trainer.fit()
            result, first = evaluate_arm(trainer, args.eval_samples)
            per_seed[seed] = cached or result  # the cached minutes are the training run's own
            (run_dir / "heldout.json").write_text(json.dumps(
                {"config": key, "eval_samples": args.eval_samples, "result": per_seed[seed]}, indent=2))
            if not baselines:
                baselines = fill_baselines(trainer, args.eval_samples)
            if seed == args.seeds[0]:
                figures[arm] = first
            trainer.close()
            if args.diagnose:
                from .diagnose import diagnose

                diagnose(cfg.train.output_dir, samples=args.diagnose, out=Path(cfg.train.output_dir) / "diagnosis",
                         progress=False)
            # Accelerate keeps process-wide state; start the next run clean.
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            PartialState._reset_state()
        results[arm] = {"seeds": per_seed, **summarise(per_seed)}
    table = results_table(results, baselines)
    out.mkdir(parents=True, exist_ok=True)
    name = args.report
    written = {"table": out / f"{name}.md", "json": out / f"{name}.json",
               "maps": out / ("maps.png" if name == "results" else f"{name}_maps.png"),
               "samples": out / ("samples.png" if name == "results" else f"{name}_samples.png")}
    written["table"].write_text(table + "\n")
    written["json"].write_text(json.dumps({"baselines": baselines, "arms": results}, indent=2))
    save_png(comparison_figure(figures), written["maps"])
    save_png(samples_figure(figures), written["samples"])
    print(table)
    print(f"\nwritten: {', '.join(str(f) for f in written.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
