"""Shared fixtures. Nothing here downloads: models are built from configs."""
from __future__ import annotations

import os

# Set before anything imports huggingface_hub / wandb.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Accelerate keeps process-wide singletons; reset them so tests don't leak settings."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


def tiny_overrides(tmp_path, **extra) -> list[str]:
    """A config small enough for a test to train a few steps in about a second."""
    base = {
        "train.output_dir": str(tmp_path / "run"),
        "model.unet.size": "test",
        "model.garment.width": 16,
        "data.num_train": 64,
        "data.num_val": 4,
        "train.batch_size": 4,
        "train.max_steps": 4,
        "train.log_every": 1,
        "train.val_every": 1000,
        "train.checkpoint_every": 1000,
        "train.validate_at_start": False,
        "diffusion.sample_steps": 3,
        "optim.warmup_steps": 0,
        "tracker.kind": "none",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
