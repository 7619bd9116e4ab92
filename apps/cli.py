"""``python -m i2am analyze SOURCE --person P --mask M --garment G --out DIR``.

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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: everything is local
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
