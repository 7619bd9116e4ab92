"""Train a try-on latent diffusion model: parse config -> build -> run.

    accelerate launch train.py [--config FILE] [key=value ...]

With no arguments this trains the embedded default (synthetic try-on data, a
tiny pixel-space model) on the CPU in a few minutes.
"""
from __future__ import annotations

import importlib.util
import os
import sys

_TRUE = ("1", "true", "yes", "on")


def launch_problem(environ: dict[str, str] | None = None) -> str | None:
    """What is wrong with how this process was launched, before anything is built."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower() in _TRUE \
            and importlib.util.find_spec("deepspeed") is None:
        return ("this launch uses DeepSpeed (e.g. launch/deepspeed_zero2.yaml) but the `deepspeed` package is not "
                "installed: `pip install deepspeed` (it needs a CUDA toolkit), or launch with launch/multi_gpu.yaml "
                "or launch/fsdp.yaml instead")
    try:
        world = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world > 1 and env.get("ACCELERATE_USE_CPU", "").strip().lower() not in _TRUE:
        import torch

        if not torch.cuda.is_available():
            return (f"{world} processes were started without GPUs and without ACCELERATE_USE_CPU=1: they would train "
                    "as unconnected single-process runs writing to the same directory. On a CPU, launch with "
                    "`ACCELERATE_USE_CPU=1 accelerate launch --config_file launch/cpu_2proc.yaml train.py ...`")
    return None


def main(argv: list[str] | None = None) -> int:
    from configs import ConfigError, parse_args

    try:
        cfg = parse_args(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    problem = launch_problem()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
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
