"""Losses return `(loss, metrics)`: a scalar to backpropagate and detached values to log."""
from .diffusion import DiffusionLoss, build_train_scheduler

__all__ = ["DiffusionLoss", "build_train_scheduler"]
