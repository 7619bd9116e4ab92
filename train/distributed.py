"""Launch set-ups the trainer cannot run, refused at start with what breaks under them.

FSDP: the trainer keeps the whole model on every rank outside the wrapped forward. With
FSDP each rank holds only a shard of every wrapped parameter between forwards, and the
nested FSDP units gather their weights with collectives that every rank must join. So the
features listed by `fsdp_problems` cannot work as written, and no FSDP run is started.
accelerate 1.15 runs no FSDP on CPU ranks at all (see docs/distributed.md#fsdp), so none of
this could be tested on CPUs and the refusal is the tested behaviour.
"""
from __future__ import annotations

import os

from accelerate.utils import DistributedType

from configs.schema import Config


class UnsupportedLaunchError(ValueError):
    """A launch set-up the trainer cannot run; the message names each feature that breaks."""


def fsdp_requested(distributed_type: DistributedType | None = None, environ: dict[str, str] | None = None) -> bool:
    """True for an FSDP launch: `accelerate launch` with an FSDP config exports ACCELERATE_USE_FSDP,
    and an Accelerator built with an FSDP plugin reports the FSDP distributed type."""
    env = os.environ if environ is None else environ
    return env.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes") \
        or distributed_type == DistributedType.FSDP


def fsdp_problems(cfg: Config) -> list[str]:
    """Each trainer feature that cannot work under FSDP, naming the feature and why."""
    problems = [
        "validation (every train.val_every steps and at the end of each run) samples on the main process "
        "alone with the unwrapped model, whose parameters FSDP shards across the ranks",
        "checkpoints export model/ (the full weights that evaluation and analysis load) with save_pretrained "
        "on the main process alone, from the same sharded model",
    ]
    if cfg.optim.ema_decay:
        problems.append(f"the EMA (optim.ema_decay={cfg.optim.ema_decay}) keeps full copies of the parameters "
                        "taken before accelerate.prepare and updates them from the parameters each step, "
                        "which FSDP leaves as per-rank shards")
    if cfg.model.codec.kind == "vae":
        problems.append("the VAE codec (model.codec.kind=vae) encodes the batch outside the wrapped forward, "
                        "where FSDP holds its frozen weights sharded")
    return problems


def check_launch(cfg: Config, distributed_type: DistributedType | None = None) -> None:
    """Raise `UnsupportedLaunchError` for a launch the trainer cannot run (before anything is written)."""
    if not fsdp_requested(distributed_type):
        return
    listed = "\n".join(f"  - {p}" for p in fsdp_problems(cfg))
    raise UnsupportedLaunchError(
        "FSDP launch (e.g. launch/fsdp.yaml) is not supported by this trainer:\n" + listed + "\n"
        "Launch with DDP instead (launch/multi_gpu.yaml) and save memory with "
        "model.unet.gradient_checkpointing=true; see docs/distributed.md#fsdp.")
