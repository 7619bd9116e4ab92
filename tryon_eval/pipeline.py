"""The whole evaluation: weights check, generation (resumable), metrics, JSON + markdown.

Output folder layout::

    <out>/real/<name>.png                  test persons at the model's resolution (FID/KID
                                           reference; paired ground truth)
    <out>/<mode>/images/<name>.png         generated, mode = paired | unpaired
    <out>/<mode>/samples.json              settings + per-sample IMACS, colour error, boxes
    <out>/results.json, <out>/results.md   the numbers
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from common import tables
from train.checkpoint import CheckpointError, load_checkpoint

from .generate import EvalError, build_eval_dataset, generate, write_json, write_reference
from .metrics import (FeatureExtractor, RandomFeatures, build_lpips, fid_kid, image_features, inception_extractor,
                      mean_or_none, paired_metrics)
from .weights import find_alexnet, find_inception

MODES: tuple[str, ...] = ("paired", "unpaired")
NOT_COMPARABLE = "stand-in, NOT comparable with published numbers"
# How the initial noise is seeded, in the settings of samples.json: folders generated with
# the earlier per-chunk seeding (no such key) are refused rather than mixed with these.
NOISE = "per-sample seed (seed, index)"


def default_out(checkpoint: Path) -> Path:
    """<run>/eval/<checkpoint name> (outside checkpoints/, which rotation deletes)."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "eval" / checkpoint.name
    return checkpoint / "eval"


def evaluate(checkpoint: str | Path, out: str | Path | None = None, modes: Sequence[str] = MODES,
             split: str = "test", limit: int | None = None, batch_size: int = 8, steps: int | None = None,
             guidance_scale: float | None = None, seed: int = 0, device: str | torch.device | None = None,
             data_root: str | None = None, overrides: Sequence[str] = (), num_synthetic: int = 500,
             fid_backend: str = "inception", inception: str | Path | None = None,
             lpips_backend: str = "alex", alexnet: str | Path | None = None,
             feature_extractor: FeatureExtractor | None = None, lpips_model: torch.nn.Module | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate a run directory or checkpoint; returns (and writes) the results.

    Metric weights are resolved before anything is generated, so a missing Inception or
    AlexNet file fails in a second rather than after the generation. ``feature_extractor``
    and ``lpips_model`` inject stand-ins (tests); ``fid_backend="random"`` /
    ``lpips_backend="random"`` select the built-in ones (smoke runs; labelled as such).
    """
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise EvalError(f"modes must be among {MODES}, got {list(modes)}")
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    if seed < 0:  # sample_seed's SeedSequence takes non-negative entropy only
        raise EvalError(f"--seed must be >= 0, got {seed}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # 1. metric networks (fail fast)
    if feature_extractor is not None:
        fid_name = "injected feature extractor (" + NOT_COMPARABLE + ")"
    elif fid_backend == "inception":
        path = find_inception(inception)
        feature_extractor, fid_name = inception_extractor(path, dev), f"clean-fid Inception ({path})"
    elif fid_backend == "random":
        feature_extractor, fid_name = RandomFeatures().to(dev), "random features (" + NOT_COMPARABLE + ")"
    else:
        raise EvalError(f"--fid-backend must be 'inception' or 'random', got {fid_backend!r}")
    need_lpips = "paired" in modes
    if lpips_model is not None:
        lpips_name = "injected model (" + NOT_COMPARABLE + ")"
    elif need_lpips and lpips_backend == "alex":
        path = find_alexnet(alexnet)
        lpips_model, lpips_name = build_lpips("alex", path), f"LPIPS v0.1 AlexNet ({path})"
    elif need_lpips and lpips_backend == "random":
        lpips_model, lpips_name = build_lpips("random"), "LPIPS random AlexNet (" + NOT_COMPARABLE + ")"
    elif need_lpips:
        raise EvalError(f"--lpips-backend must be 'alex' or 'random', got {lpips_backend!r}")
    else:
        lpips_name = "not used"

    # 2. model and data
    extra = list(overrides) + ([f"data.root={data_root}"] if data_root else [])
    try:
        loaded = load_checkpoint(checkpoint, extra, dev)
    except CheckpointError as err:
        raise EvalError(str(err)) from err
    cfg = loaded.cfg
    steps = int(steps or cfg.diffusion.sample_steps)
    guidance = float(cfg.diffusion.guidance_scale if guidance_scale is None else guidance_scale)
    out = Path(out) if out is not None else default_out(loaded.path)
    out.mkdir(parents=True, exist_ok=True)
    reference_set = build_eval_dataset(cfg, split, "paired", limit, num_synthetic)
    real_files = write_reference(reference_set, out / "real", progress)

    results: dict[str, Any] = {
        "checkpoint": str(loaded.path), "step": loaded.step, "data": cfg.data.name, "split": split,
        "resolution": list(cfg.data.resolution), "limit": limit, "steps": steps, "guidance_scale": guidance,
        "seed": seed, "fid_backend": fid_name, "lpips_backend": lpips_name, "out": str(out), "modes": {},
    }
    real_feats = image_features(sorted(real_files), feature_extractor, dev, progress=progress, description="FID real")
    for mode in modes:
        dataset = reference_set if mode == "paired" else build_eval_dataset(cfg, split, mode, limit, num_synthetic)
        settings = {"checkpoint": loaded.path.name, "step": loaded.step, "data": cfg.data.name,
                    "resolution": list(cfg.data.resolution), "mode": mode, "split": split, "steps": steps,
                    "guidance_scale": guidance, "seed": seed, "noise": NOISE, "diffusion": asdict(cfg.diffusion)}
        gen = generate(loaded.model, dataset, out / mode, steps=steps, guidance_scale=guidance,
                       batch_size=batch_size, seed=seed, device=dev, settings=settings, paired=mode == "paired",
                       progress=progress)
        results["modes"][mode] = _mode_metrics(gen, out, mode, real_feats, feature_extractor, lpips_model, dev,
                                               progress)
    write_json(results, out / "results.json")
    (out / "results.md").write_text(markdown_table(results))
    return results


def _mode_metrics(gen: dict[str, Any], out: Path, mode: str, real_feats: Any, extractor: FeatureExtractor,
                  lpips_model: torch.nn.Module | None, dev: torch.device, progress: bool) -> dict[str, Any]:
    images = out / mode / "images"
    done = [n for n in gen["names"] if (images / f"{n}.png").is_file() and n in gen["samples"]]
    rows = [gen["samples"][n] for n in done]
    gen_feats = image_features(sorted(images / f"{n}.png" for n in done), extractor, dev, progress=progress,
                               description=f"FID {mode}")
    fk = fid_kid(gen_feats, real_feats)
    m: dict[str, Any] = {
        "n": len(done), "missing": len(gen["names"]) - len(done), "generated_now": gen["generated"],
        "fid": fk["fid"], "kid": fk["kid"], "kid_x1000": None if fk["kid"] is None else fk["kid"] * 1000,
        "lpips": None, "ssim": None,
    }
    if mode == "paired" and lpips_model is not None:
        pairs = [(images / f"{n}.png", out / "real" / f"{n}.png") for n in done]
        m.update(paired_metrics(pairs, lpips_model, dev, progress))
    for key in ("imacs_g", "imacs_r", "colour_error", "pixel_error"):
        m[key] = mean_or_none([r.get(key) for r in rows])
    m["imacs_g_undefined"] = sum(r["imacs_g"] is None for r in rows)
    m["imacs_r_undefined"] = sum(r["imacs_r"] is None for r in rows)
    for key in ("iou", "iou_random", "iou_whole"):
        m["box_m" + key] = mean_or_none([r[key] for r in rows])
    return m


COLUMNS = [("n", "n"), ("fid", "FID ↓"), ("kid_x1000", "KID×1000 ↓"), ("lpips", "LPIPS ↓"), ("ssim", "SSIM ↑"),
           ("imacs_g", "IMACS_g ↑"), ("imacs_r", "IMACS_r ↑"), ("colour_error", "colour error ↓"),
           ("pixel_error", "pixel error ↓"), ("box_miou", "box mIoU ↑"), ("box_miou_random", "random box"),
           ("box_miou_whole", "whole image")]


def markdown_table(results: dict[str, Any]) -> str:
    """The results as a markdown table (one row per mode; "–" where a number is undefined) and notes."""
    table = tables.markdown_table(["mode", *(title for _, title in COLUMNS)],
                                  [[mode, *(m[key] for key, _ in COLUMNS)] for mode, m in results["modes"].items()],
                                  digits=4, missing="–")
    notes = [
        f"Checkpoint `{results['checkpoint']}` (step {results['step']}), data `{results['data']}` "
        f"{results['split']} at {results['resolution'][0]}×{results['resolution'][1]}, "
        f"{results['steps']} DDIM steps, guidance {results['guidance_scale']}, seed {results['seed']}"
        + (f", first {results['limit']} samples" if results["limit"] else "") + ".",
        f"FID/KID: {results['fid_backend']}, clean mode, against the test persons. "
        f"LPIPS: {results['lpips_backend']}. SSIM: Gaussian σ 1.5.",
        "IMACS_g: R2G map vs inpainting mask; IMACS_r: G2R map vs garment mask (masks to the map grid by "
        "area ≥ ½). Colour error: mean |Δ| in [0, 1] inside the mask vs the true try-on (paired: the "
        "person; unpaired: synthetic data only). Box mIoU: box from the R2G map vs the sample's box.",
    ]
    return table + "\n\n" + "\n".join(notes) + "\n"


__all__ = ["evaluate", "markdown_table", "default_out", "EvalError", "MODES"]
