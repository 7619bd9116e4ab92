"""Experiment trackers through Accelerate: W&B (online or offline), TensorBoard, none.

Only the main process talks to trackers (Accelerate makes `log` a no-op
elsewhere); images also land as PNGs in the run directory, so nothing depends
on a tracker being reachable.
"""
from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from accelerate import Accelerator

from common.images import save_png
from configs.schema import TrackerConfig


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def prepare_tracker_env(cfg: TrackerConfig, run_dir: Path) -> str | None:
    """Decide the tracker before the Accelerator exists; returns `log_with`."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "wandb":
        if not os.environ.get("WANDB_MODE"):  # an explicit environment wins
            online = cfg.mode == "online" or (cfg.mode == "auto" and wandb_has_credentials())
            os.environ["WANDB_MODE"] = "online" if online else "offline"
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_SILENT", "true")
    return cfg.kind


def init_trackers(accelerator: Accelerator, cfg: TrackerConfig, run_dir: Path, config: Mapping[str, Any]) -> None:
    if cfg.kind == "none":
        return
    kwargs: dict[str, Any] = {}
    if cfg.kind == "wandb":
        # Keep one W&B run per run directory across resumes.
        id_file = run_dir / "wandb_run_id.txt"
        if accelerator.is_main_process:
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
        else:
            run_id = None
        import wandb

        # System-metric sampling runs in W&B's service process; on a 2-core machine it competes with
        # training for a core (200 steps of the default: 70.9 s with it, 63.7 s without).
        kwargs["wandb"] = {"dir": str(run_dir), "name": cfg.run_name or run_dir.name, "id": run_id, "resume": "allow",
                           "settings": wandb.Settings(x_disable_stats=not cfg.system_metrics)}
    accelerator.init_trackers(cfg.project, config=dict(config), init_kwargs=kwargs)


def tracker_location(accelerator: Accelerator, cfg: TrackerConfig, run_dir: Path) -> str:
    """One line saying where the run's logs are, with the W&B sync hint when offline."""
    if cfg.kind == "none":
        return "no tracker (tracker.kind=none)"
    if cfg.kind == "tensorboard":
        return f"TensorBoard logs in {run_dir}  (tensorboard --logdir {run_dir})"
    run = accelerator.get_tracker("wandb", unwrap=True)
    url = getattr(run, "url", None)
    if url:
        return f"W&B run {url}"
    run_path = Path(getattr(run, "dir", run_dir)).parent
    return f"W&B offline run in {run_path}  (upload later: wandb sync {run_path})"


def log_images(accelerator: Accelerator, images: Mapping[str, np.ndarray], step: int, run_dir: Path) -> None:
    """Log uint8 HWC images to every tracker and save them as PNGs under run_dir/images."""
    if not accelerator.is_main_process:
        return
    out = run_dir / "images"
    out.mkdir(parents=True, exist_ok=True)
    for name, array in images.items():
        save_png(array, out / f"{name.replace('/', '_')}_{step:07d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({k: wandb.Image(v) for k, v in images.items()}, step=step)
        elif tracker.name == "tensorboard":
            for k, v in images.items():
                tracker.writer.add_image(k, v, step, dataformats="HWC")


def log_table(accelerator: Accelerator, name: str, rows: list[dict], step: int) -> None:
    """A per-sample table (W&B only: sortable by any column, e.g. the worst colour error).
    Other trackers already get the same figures as images."""
    if not accelerator.is_main_process or not rows:
        return
    for tracker in accelerator.trackers:
        if tracker.name != "wandb":
            continue
        import wandb

        columns = list(rows[0])
        data = [[wandb.Image(v) if isinstance(v, np.ndarray) else v for v in row.values()] for row in rows]
        tracker.log({name: wandb.Table(columns=columns, data=data)}, step=step)
