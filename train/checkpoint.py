"""Checkpoints: written with `accelerator.save_state` on every rank, committed
atomically; read back for inference with `load_checkpoint`.

A checkpoint is written as `checkpoint-XXXXXXX.tmp/` and renamed only once
complete, so a crash while saving never leaves a directory that resume would
pick up half-written. Re-saving a step moves the existing copy aside
(`checkpoint-XXXXXXX.old/`) and deletes it only once the new one is in place;
a checkpoint is removed by renaming it to `checkpoint-XXXXXXX.del/` first. So a
kill at any moment leaves every step that was complete before the save complete
under its own name or as its aside copy, which `list_checkpoints` counts. Beside the accelerate state (model, optimizer, scheduler,
RNG states and the registered EMA as `custom_checkpoint_0.pkl`): the resolved
`config.yaml`, `train_state.json` (step, samples seen, training time) and the
model with the EMA weights in diffusers/safetensors layout (`model/`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
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
ASIDE = re.compile(r"^checkpoint-(\d+)\.old$")  # the previous copy of a step being re-saved
CRASH_ENV = "TRYON_CRASH_AT"


def _crash_point(name: str, step: int) -> None:
    """For the fault tests: SIGKILL this process at a named point of a save when the
    environment variable TRYON_CRASH_AT names it (``<name>`` or ``<name>@<step>``).
    A no-op otherwise. Points: saved (new state complete as .tmp, nothing renamed),
    aside (old copy of the step moved aside, new one not yet in place), committed (new
    one in place, aside and old checkpoints not yet deleted), pruning (a checkpoint
    renamed for deletion, not yet deleted)."""
    want = os.environ.get(CRASH_ENV)
    if want and want in (name, f"{name}@{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointError(ValueError):
    """A path that is not a usable checkpoint; the message says what was expected."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: `checkpoint-N`, or its aside copy `checkpoint-N.old`
    when a kill during a re-save of step N left only that. `.tmp` (being written) and `.del`
    (being deleted) directories are ignored."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        if m := PATTERN.match(p.name):
            found[int(m.group(1))] = p
        elif (m := ASIDE.match(p.name)) and not (root / p.name.removesuffix(".old")).exists():
            found[int(m.group(1))] = p
    return [found[k] for k in sorted(found)]


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None  # a fresh run: nothing to resume yet
    path = Path(resume)
    if not path.is_dir() and ASIDE.match(path.name + ".old") and path.with_name(path.name + ".old").is_dir():
        path = path.with_name(path.name + ".old")  # killed while this step was re-saved: its aside copy
    if not (path / "train_state.json").is_file() and not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"train.resume={resume!r}: {path} is not a checkpoint directory "
                                f"(expected e.g. {checkpoint_dir(run_dir)}/checkpoint-0000100)")
    return path


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, limit: int,
                    write_extras: Callable[[Path], None]) -> Path:
    """Collective: every rank must call it. `write_extras(dir)` runs on the main
    process before the commit (config, model weights)."""
    if limit < 1:
        raise ValueError(f"train.checkpoint_limit={limit}: must be >= 1 (the newest checkpoint is always kept)")
    root = checkpoint_dir(run_dir)
    final = root / f"checkpoint-{step:07d}"
    tmp = root / (final.name + ".tmp")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _tidy(root)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        write_extras(tmp)
        _crash_point("saved", step)
        aside = None
        if final.exists():  # re-saving a step (e.g. resumed from an older checkpoint): keep the old copy
            aside = final.with_name(final.name + ".old")  # until the new one is in place
            os.replace(final, aside)
            _crash_point("aside", step)
        os.replace(tmp, final)
        _crash_point("committed", step)
        if aside is not None:
            _remove(aside, step)
        # Never the one just written: it is complete, and the newest of this run even when
        # checkpoints of higher steps (from before a resume of an older one) are still there.
        others = [c for c in list_checkpoints(run_dir) if c != final]
        for old in others[:max(len(others) - (limit - 1), 0)]:
            _remove(old, step)
    accelerator.wait_for_everyone()
    return final


def _remove(path: Path, step: int = -1) -> None:
    """Delete a checkpoint directory so that a kill never leaves it half-deleted under a
    name `list_checkpoints` counts: rename it to `.del` first."""
    doomed = path.with_name(path.name.removesuffix(".old") + ".del")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    _crash_point("pruning", step)
    shutil.rmtree(doomed, ignore_errors=True)


def _tidy(root: Path) -> None:
    """Clear what an interrupted save left (main process, before a save): `.tmp` and `.del`
    directories go; an aside copy goes back to its name if the step has no other copy, else it goes."""
    for p in sorted(root.iterdir()):
        if p.name.endswith((".tmp", ".del")):
            shutil.rmtree(p, ignore_errors=True)
        elif ASIDE.match(p.name):
            final = root / p.name.removesuffix(".old")
            if final.exists():
                _remove(p)  # via .del: a half-deleted aside must never count as the step's copy
            else:
                os.replace(p, final)


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


def init_weights(model: TryOnModel, path: str | Path) -> Path:
    """Load the model weights of a checkpoint (or a run directory's latest) into ``model``, to
    fine-tune it (``train.init_from``). The architectures must match; a mismatch names both."""
    try:
        ckpt = resolve_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"train.init_from={str(path)!r}: {err}") from None
    try:
        model.load_pretrained(ckpt / "model")
    except RuntimeError as err:  # load_state_dict: missing/unexpected keys or shape mismatches
        raise CheckpointError(
            f"train.init_from={str(path)!r}: the weights in {ckpt / 'model'} do not fit this run's model "
            f"(compare the model section of {ckpt / 'config.yaml'} with this run's): {str(err).splitlines()[0]}"
        ) from None
    return ckpt


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
    # The saved config is fully resolved: a key it lacks is newer than the run, which ran as that
    # key's schema default, so today's default.yaml must not fill it in.
    cfg = load_config(files=[ckpt / "config.yaml"], overrides=list(overrides), defaults=False)
    model = load_trained_model(cfg.model, ckpt / "model").to(device).eval()
    state = ckpt / "train_state.json"
    step = json.loads(state.read_text()).get("step") if state.is_file() else None
    return LoadedCheckpoint(ckpt, cfg, model, step)
