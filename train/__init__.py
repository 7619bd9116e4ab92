"""The training loop (Accelerate) and its parts: data stream, checkpoints, tracking, validation."""
from .trainer import Trainer

__all__ = ["Trainer"]
