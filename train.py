"""Train a try-on latent diffusion model: parse config -> build -> run.

    accelerate launch train.py [--config FILE] [key=value ...]

With no arguments this trains the embedded default (synthetic try-on data, a
tiny pixel-space model) on the CPU in a few minutes.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from configs import ConfigError, parse_args

    try:
        cfg = parse_args(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    # Heavy imports (torch, diffusers) only once the config is known to be good.
    from models.errors import ModelConfigError
    from train import Trainer

    try:
        trainer = Trainer(cfg)
    except (ModelConfigError, FileNotFoundError, KeyError, ValueError) as err:
        # Bad input found while building: nothing has been written yet.
        print(f"error: {err}", file=sys.stderr)
        return 2
    trainer.fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
