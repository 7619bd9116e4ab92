"""Checkpoints: written with `accelerator.save_state` on every rank, committed
atomically; read back for inference with `load_checkpoint`.

A checkpoint is written as `checkpoint-XXXXXXX.tmp/` and renamed only once
complete, so a crash while saving never leaves a directory that resume would
pick up half-written. Beside the accelerate state (model, optimizer, scheduler,
RNG states and the registered EMA as `custom_checkpoint_0.pkl`): the resolved
`config.yaml`, `train_state.json` (step, samples seen, training time) and the
model with the EMA weights in diffusers/safetensors layout (`model/`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from accelerate import Accelerator

from configs.schema import Config

if TYPE_CHECKING:
    from models.tryon import TryOnModel

PATTERN = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A path that is not a usable checkpoint; the message says what was expected."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary `.tmp` directories are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None  # a fresh run: nothing to resume yet
    path = Path(resume)
    if not (path / "train_state.json").is_file() and not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"train.resume={resume!r}: {path} is not a checkpoint directory "
                                f"(expected e.g. {checkpoint_dir(run_dir)}/checkpoint-0000100)")
    return path


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, limit: int,
                    write_extras: Callable[[Path], None]) -> Path:
    """Collective: every rank must call it. `write_extras(dir)` runs on the main
    process before the commit (config, model weights)."""
    root = checkpoint_dir(run_dir)
    final = root / f"checkpoint-{step:07d}"
    tmp = root / (final.name + ".tmp")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        write_extras(tmp)
        if final.exists():  # re-saving the same step (e.g. at the end of a run)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------- loading
def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (config.yaml + model/), or a run directory (its latest checkpoint)."""
    p = Path(path).expanduser()
    if (p / "config.yaml").is_file() and (p / "model").is_dir():
        return p
    if (p / "checkpoints").is_dir():
        found = [c for c in list_checkpoints(p) if (c / "model").is_dir()]
        if not found:
            raise CheckpointError(f"run directory {p} has no complete checkpoint under {p / 'checkpoints'}")
        return found[-1]
    raise CheckpointError(f"{p} is neither a checkpoint (config.yaml + model/) nor a run directory (checkpoints/)")


@dataclass
class LoadedCheckpoint:
    path: Path
    cfg: Config
    model: TryOnModel  # in eval mode, holding the EMA weights saved with the checkpoint
    step: int | None


def load_checkpoint(path: str | Path, overrides: Sequence[str] = (), device: torch.device | str = "cpu"
                    ) -> LoadedCheckpoint:
    """Rebuild the model from the checkpoint's saved config and load its ``model/`` weights
    (in eval mode). ``overrides`` (dotted key=value) fix what moved since training, e.g. data.root."""
    from configs.loader import load_config
    from models.build import load_trained_model

    ckpt = resolve_checkpoint(path)
    cfg = load_config(files=[ckpt / "config.yaml"], overrides=list(overrides))
    model = load_trained_model(cfg.model, ckpt / "model").to(device).eval()
    state = ckpt / "train_state.json"
    step = json.loads(state.read_text()).get("step") if state.is_file() else None
    return LoadedCheckpoint(ckpt, cfg, model, step)
