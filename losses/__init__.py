"""Losses return `(loss, metrics)`: a scalar to backpropagate and detached values to log."""
from .diffusion import DiffusionLoss, Noised

__all__ = ["DiffusionLoss", "Noised"]
