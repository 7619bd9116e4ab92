"""Losses return `(loss, metrics)`: a scalar to backpropagate and detached values to log."""
from .diffusion import DiffusionLoss, Noised, build_train_scheduler

__all__ = ["DiffusionLoss", "Noised", "build_train_scheduler"]
