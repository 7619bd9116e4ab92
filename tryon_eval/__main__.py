"""``python -m tryon_eval RUN_OR_CHECKPOINT [options]``: generate the test set and compute
FID, KID, LPIPS, SSIM, IMACS_g/IMACS_r, colour error and box mIoU (see README)."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tryon_eval",
        description="Evaluate a try-on checkpoint: generate the test set with its EMA weights (resumable: "
                    "existing images are kept) while recording I²AM maps, then compute FID/KID (clean-fid, "
                    "clean mode), LPIPS (AlexNet) and SSIM on paired results, IMACS_g/IMACS_r, colour error "
                    "inside the mask and box mIoU. Writes results.json and results.md.",
        epilog="Weights are never downloaded: Inception from --inception or $I2AM_INCEPTION (clean-fid's "
               "inception-2015-12-05.pt), AlexNet from --alexnet, $I2AM_ALEXNET or "
               "$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth.")
    p.add_argument("checkpoint", help="a run directory (its latest checkpoint is used) or a checkpoint directory")
    p.add_argument("--out", help="output folder (default: <run>/eval/<checkpoint name>)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--mode", default="paired,unpaired", help="paired, unpaired or both (comma-separated)")
    p.add_argument("--limit", type=int, help="only the first N test samples (a quick look)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, help="DDIM steps (default: the config's diffusion.sample_steps)")
    p.add_argument("--guidance-scale", type=float, help="default: the config's diffusion.guidance_scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--data-root", help="override data.root of the saved config (data moved since training)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any key of the saved config (repeatable), e.g. --set data.category=dresses")
    p.add_argument("--num-synthetic", type=int, default=500, help="test-set size for synthetic data")
    p.add_argument("--inception", help="clean-fid's inception-2015-12-05.pt (file or folder)")
    p.add_argument("--alexnet", help="torchvision's alexnet-owt-7be5be79.pth (file or folder)")
    p.add_argument("--fid-backend", default="inception", choices=["inception", "random"],
                   help="random: a seeded stand-in for smoke runs (numbers NOT comparable)")
    p.add_argument("--lpips-backend", default="alex", choices=["alex", "random"],
                   help="random: random AlexNet backbone for smoke runs (numbers NOT comparable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from configs.loader import ConfigError

    from .pipeline import evaluate
    from .generate import EvalError
    from .weights import MissingWeightsError

    try:
        results = evaluate(
            args.checkpoint, out=args.out, modes=[m.strip() for m in args.mode.split(",") if m.strip()],
            split=args.split, limit=args.limit, batch_size=args.batch_size, steps=args.steps,
            guidance_scale=args.guidance_scale, seed=args.seed, device=args.device, data_root=args.data_root,
            overrides=args.overrides, num_synthetic=args.num_synthetic, fid_backend=args.fid_backend,
            inception=args.inception, lpips_backend=args.lpips_backend, alexnet=args.alexnet,
            progress=not args.no_progress)
    except (MissingWeightsError, EvalError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from pathlib import Path

    print((Path(results["out"]) / "results.md").read_text())
    print(f"results: {Path(results['out']) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
