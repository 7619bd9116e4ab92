"""Losses return `(loss, metrics)`: a scalar to backpropagate and detached values to log.

`TryOnObjective` (`objective.py`) is the training objective: noising, the model call, the
diffusion loss and the stability terms, once per micro-batch."""
from .diffusion import DiffusionLoss, Noised
from .objective import TryOnObjective

__all__ = ["DiffusionLoss", "Noised", "TryOnObjective"]
