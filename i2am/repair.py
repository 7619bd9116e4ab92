"""Attention repairs: replace one cross-attention layer's attention while sampling, to test
whether that layer causes an error (blame by intervention, ``python -m i2am diagnose``).

Two repairs, both generic (any diffusers ``Attention`` layer, any sampler):

* **temperature**: ``softmax(q·k / (sqrt(d) · T))`` with ``T < 1``. Each query keeps its own
  ranking of the keys, so attention is sharpened toward the cells it already prefers (its own
  centre): scattered attention that averages colours becomes concentrated. It needs no ground
  truth, so it works on every data set. It cannot repair a layer whose scores are all equal
  (a uniform layer stays uniform at any temperature).
* **target**: on the queries that lie on the worn garment, the attention is replaced by the
  anchored target, a Gaussian over the reference grid cells around the query's true garment
  position ``p*`` (``sample["garment_pos"]``, synthetic data only): what a perfect layer
  would attend to. Other queries keep the layer's own attention.

The processor computes the probabilities explicitly (N_q × N_k per head). That is cheap at the
tiny model's sizes; at Stable Diffusion sizes the 64×64 layers would need chunking. While the
gate is closed (other steps) the layer's original processor runs untouched.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ._grid import query_grid
from .dispersion import cell_centres, pool_to_grid
from .processor import _prelude

# A query is on the worn garment when at least this share of its cell is (as the stability loss).
WORN_COVERAGE = 0.5


@dataclass
class AttentionTarget:
    """Where attention should go: ``garment_pos`` (B, 2, H, W) the true (y, x) garment position of
    each worn pixel, relative to the garment image; ``worn`` (B, 1, H, W) in {0, 1} where it is
    valid. ``sigma`` is the Gaussian's width in reference-grid cells (0.5: about one cell)."""

    garment_pos: torch.Tensor
    worn: torch.Tensor
    sigma: float = 0.5

    def probabilities(self, grid: tuple[int, int], reference_grid: tuple[int, int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(target probabilities (B, N_q, N_grid), worn queries (B, N_q) bool) on a layer's query grid."""
        pos, cover = pool_to_grid(self.garment_pos, tuple(grid), self.worn)
        cells = cell_centres(reference_grid, pos.device)  # (N_grid, 2)
        h_r, w_r = reference_grid
        # Distance in cell units on each axis, so sigma means the same on a non-square grid.
        unit = torch.tensor([1.0 / h_r, 1.0 / w_r], device=pos.device)
        d2 = ((pos.unsqueeze(2) - cells.view(1, 1, -1, 2)) / unit).square().sum(-1)
        return torch.softmax(-d2 / (2 * self.sigma ** 2), dim=-1), cover >= WORN_COVERAGE


class RepairProcessor:
    """Attention processor for one layer: the original processor while ``gate()`` is false, else
    the repaired attention (``temperature`` and/or ``target``). ``keep_probs`` keeps the last
    repaired probabilities (B, heads, N_q, N_k) in ``last_probs`` (for tests and figures).

    Not an ``nn.Module``, so it never enters the UNet's state dict."""

    def __init__(self, original: Any, *, temperature: float = 1.0, target: AttentionTarget | None = None,
                 reference_grid: tuple[int, int] | None = None, extra_tokens: int = 0,
                 latent_grid: Callable[[], tuple[int, int]] | None = None,
                 gate: Callable[[], bool] = lambda: True, keep_probs: bool = False) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if target is not None and reference_grid is None:
            raise ValueError("a target repair needs the reference_grid the keys lie on")
        self.original = original
        self.temperature = float(temperature)
        self.target = target
        self.reference_grid = tuple(reference_grid) if reference_grid is not None else None
        self.extra_tokens = int(extra_tokens)
        self.latent_grid = latent_grid
        self.gate = gate
        self.keep_probs = keep_probs
        self.last_probs: torch.Tensor | None = None
        self._targets: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.gate():
            extra = {"temb": temb} if temb is not None else {}
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **extra, **kwargs)
        pre = _prelude(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        query, key, head_dim = pre["query"], pre["key"], pre["head_dim"]
        batch_size, channel, height, width = pre["shape"]
        value = attn.to_v(pre["encoder_hidden_states"]).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        # SDPA's default scale (what AttnProcessor2_0 applies), divided by the temperature.
        scores = (query.float() @ key.float().transpose(-1, -2)) * (head_dim ** -0.5 / self.temperature)
        if pre["attention_mask"] is not None:
            scores = scores + pre["attention_mask"].float()
        probs = torch.softmax(scores, dim=-1)
        if self.target is not None:
            probs = self._apply_target(probs, query.shape[-2])
        if self.keep_probs:
            self.last_probs = probs.detach()
        out = (probs @ value.float()).to(query.dtype)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if pre["input_ndim"] == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + pre["residual"]
        return out / attn.rescale_output_factor

    def _apply_target(self, probs: torch.Tensor, num_queries: int) -> torch.Tensor:
        """Worn queries get the target distribution over the grid keys (0 on extra tokens). Under
        guidance the UNet batch is [unconditional, conditional]: only the conditional half, which
        the target describes, is repaired."""
        b = self.target.garment_pos.shape[0]
        if probs.shape[0] not in (b, 2 * b):
            raise ValueError(f"target repair: the layer runs a batch of {probs.shape[0]}, the target has {b} "
                             f"samples (expected the same, or twice as many under guidance)")
        if self.latent_grid is None:
            raise ValueError("target repair: latent_grid (a callable giving the UNet call's latent grid) is needed")
        grid = query_grid(num_queries, self.latent_grid())
        if grid not in self._targets:
            with torch.no_grad():
                t, worn = self.target.probabilities(grid, self.reference_grid)
            self._targets[grid] = (F.pad(t, (self.extra_tokens, 0)).to(probs.device), worn.to(probs.device))
        target, worn = self._targets[grid]
        part = probs[-b:]
        repaired = torch.where(worn[:, None, :, None], target[:, None], part)
        return torch.cat([probs[:-b], repaired]) if probs.shape[0] != b else repaired


class StepGate:
    """Counts a UNet's forward calls (one per sampling step without a second-order sampler) and
    is true on the chosen call indices (None: every call). Use as ``gate=stepgate``."""

    def __init__(self, steps: set[int] | None = None) -> None:
        self.steps = steps
        self.call = -1
        self.latent_grid: tuple[int, int] | None = None

    def pre_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        self.call += 1
        self.latent_grid = (int(sample.shape[-2]), int(sample.shape[-1]))

    def __call__(self) -> bool:
        return self.steps is None or self.call in self.steps


@contextlib.contextmanager
def repaired(unet: Any, layer: str | Sequence[str], *, steps: set[int] | None = None, temperature: float = 1.0,
             target: AttentionTarget | None = None, reference_grid: tuple[int, int] | None = None,
             extra_tokens: int = 0, keep_probs: bool = False) -> Iterator[Any]:
    """Inside the block, ``layer`` (a processor name, with or without ``.processor``) of ``unet``
    runs the repaired attention on the UNet calls numbered in ``steps`` (0 = the first call inside
    the block; None = all), its original processor elsewhere. Restored on exit, also on errors.
    Yields the :class:`RepairProcessor`; given a sequence of layers, all of them are repaired
    together (a joint repair) and the block yields their processors in that order."""
    names = [layer] if isinstance(layer, str) else list(layer)
    names = [n if n.endswith(".processor") else n + ".processor" for n in names]
    original = dict(unet.attn_processors)
    for name in names:
        if name not in original:
            raise KeyError(f"unknown attention layer {name.removesuffix('.processor')!r}; e.g. {list(original)[:3]}")
    gate = StepGate(steps)
    procs = {name: RepairProcessor(original[name], temperature=temperature, target=target,
                                   reference_grid=reference_grid, extra_tokens=extra_tokens,
                                   latent_grid=lambda: gate.latent_grid, gate=gate, keep_probs=keep_probs)
             for name in names}
    hook = unet.register_forward_pre_hook(gate.pre_hook, with_kwargs=True)
    unet.set_attn_processor({n: procs.get(n, p) for n, p in original.items()})
    try:
        yield procs[names[0]] if isinstance(layer, str) else [procs[n] for n in names]
    finally:
        hook.remove()
        unet.set_attn_processor(dict(original))  # diffusers pops from the dict it is given
