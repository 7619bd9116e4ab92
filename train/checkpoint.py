"""Checkpoints: `accelerator.save_state` on every rank, committed atomically.

A checkpoint is written as `checkpoint-XXXXXXX.tmp/` and renamed only once
complete, so a crash while saving never leaves a directory that resume would
pick up half-written. Beside the accelerate state: the resolved config and the
model (EMA weights) in diffusers/safetensors layout.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

from accelerate import Accelerator

PATTERN = re.compile(r"^checkpoint-(\d+)$")


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
