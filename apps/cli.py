"""``python -m i2am analyze SOURCE --person P --mask M --garment G --out DIR`` and
``python -m i2am diagnose RUN [--samples N] [--out DIR]``.

Only argparse at import time: torch, diffusers and the models are imported when a
command runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m i2am", description="I²AM attribution maps for try-on diffusion.")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser(
        "analyze", help="one try-on with all map levels, PNGs, safetensors and an HTML report",
        description="Run one try-on from a training run/checkpoint or a local diffusers pipeline directory "
                    "(StableDiffusionInpaintPipeline, PaintByExamplePipeline) while recording I²AM maps; write "
                    "the result, every map level as PNG, the maps as safetensors, summary.json and a "
                    "self-contained report.html. Photos of any size/format are letterboxed to the model's "
                    "resolution (the choice is printed) and the result is mapped back.",
        epilog="Example: python -m i2am analyze runs/default --person me.jpg --mask me_mask.png "
               "--garment shirt.png --out analysis/ --steps 25 --seed 0")
    a.add_argument("source", help="a run directory (latest checkpoint), a checkpoint directory, or a diffusers "
                                  "pipeline directory (has model_index.json)")
    a.add_argument("--person", help="photo of the person (JPEG/PNG/..., any size; EXIF orientation honoured)")
    a.add_argument("--agnostic", help="instead of --person: the person with the garment region already removed")
    a.add_argument("--mask", help="inpainting mask, same size as the person/agnostic photo: white = repaint "
                                  "(required: there is no human parser to derive one)")
    a.add_argument("--garment", required=True, help="photo of the garment (ideally on white)")
    a.add_argument("--garment-mask", help="garment mask for IMACS_r (default: the garment's non-white pixels)")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--steps", type=int, help="sampling steps (default: the config's diffusion.sample_steps; "
                                             "50 for pipelines)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--guidance-scale", type=float, help="default: the config's / the pipeline's usual value")
    a.add_argument("--patch", action="append", default=[], metavar="Y,X",
                   help="a cell of the generated (latent) grid for a specific-reference map (repeatable); "
                        "default: the --num-patches highest-R2G cells inside the mask")
    a.add_argument("--num-patches", type=int, default=3, help="automatic patches when no --patch is given")
    a.add_argument("--time-groups", type=int, default=5, help="groups of steps for the time level")
    a.add_argument("--prompt", help="text prompt for StableDiffusionInpaintPipeline "
                                    "(default: 'a person wearing a garment'; other sources ignore it, with a warning)")
    a.add_argument("--resolution", metavar="HxW", help="pipelines only: the resolution to run at "
                                                       "(default: the UNet's sample size, square; a checkpoint "
                                                       "ignores it, with a warning)")
    a.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="checkpoints only: override a key of the saved config (repeatable; a pipeline "
                        "ignores it, with a warning)")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = sub.add_parser(
        "diagnose", help="which cross-attention layers and denoising steps cause wrong colours, and what to regularise",
        description="Sample held-out test samples while recording per-layer attention statistics, then re-sample "
                    "them (same seeds) with one layer's attention repaired at a time and rank layers x time groups "
                    "by how much the colour error falls (docs/diagnose.md). Writes diagnosis.json, figures, "
                    "report.html and recommended.yaml (pass it to train.py --config).",
        epilog="Example: python -m i2am diagnose runs/default --samples 32 --out diagnosis/")
    d.add_argument("source", help="a run directory (latest checkpoint) or a checkpoint directory")
    d.add_argument("--samples", type=int, default=32, help="held-out test samples (one seed each)")
    d.add_argument("--out", help="output folder (default: <run>/diagnosis/<checkpoint name>)")
    d.add_argument("--steps", type=int, help="sampling steps (default: the config's diffusion.sample_steps)")
    d.add_argument("--time-groups", type=int, default=5, help="groups of consecutive steps (0 = noisiest)")
    d.add_argument("--top-layers", type=int, default=2,
                   help="layers (the most blamed over all steps) that are also repaired per time group")
    d.add_argument("--repair", choices=("auto", "target", "temperature"), default="auto",
                   help="auto: attention on the true garment position where the data gives it (synthetic), "
                        "else a lower softmax temperature")
    d.add_argument("--temperature", type=float, default=0.5, help="softmax temperature of the temperature repair")
    d.add_argument("--metric", choices=("colour", "pixel"), default="colour",
                   help="what a repair must lower to be blamed: colour (mean colour in the mask: wrong colours) or "
                        "pixel (per-pixel error: also patterns out of place)")
    d.add_argument("--seed", type=int, default=0, help="sample k is sampled with seed SEED + k")
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--unpaired", action="store_true",
                   help="unpaired test data (no ground truth: correlations only, against a proxy colour error)")
    d.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the saved config (repeatable), e.g. tracker.kind=wandb")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _diagnose(args: argparse.Namespace) -> int:
    from configs.loader import ConfigError

    from .diagnose import DiagnoseError, diagnose

    try:
        diagnose(args.source, samples=args.samples, out=args.out, steps=args.steps, time_groups=args.time_groups,
                 top_layers=args.top_layers, repair=args.repair, temperature=args.temperature, seed=args.seed,
                 batch_size=args.batch_size, unpaired=args.unpaired, device=args.device, overrides=args.overrides,
                 metric=args.metric,
                 progress=not args.no_progress)
    except (DiagnoseError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: everything is local
    if args.command == "diagnose":
        return _diagnose(args)
    from configs.loader import ConfigError

    from .analyze import AnalyzeError, analyze, parse_cell, parse_size
    from .photos import PhotoError

    try:
        analyze(args.source, person=args.person, agnostic=args.agnostic, mask=args.mask, garment=args.garment,
                garment_mask=args.garment_mask, out=args.out, steps=args.steps, seed=args.seed,
                guidance_scale=args.guidance_scale, patches=[parse_cell(c) for c in args.patch],
                num_patches=args.num_patches, time_groups=args.time_groups, prompt=args.prompt,
                resolution=parse_size(args.resolution) if args.resolution else None, device=args.device,
                overrides=args.overrides, progress=not args.no_progress)
    except (AnalyzeError, PhotoError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
