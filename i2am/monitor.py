"""AttentionMonitor: attach to a diffusers UNet, record I²AM attribution maps.

Usage::

    with AttentionMonitor(unet, reference_grid=(16, 12), extra_tokens=1, num_steps=50) as mon:
        run_any_sampler(unet, ...)          # no changes to the sampler
        maps = mon.maps()
    maps.unified("r2g")                     # (B, H, W) on the latent grid

The monitor learns each UNet call's timestep and latent grid from a forward
pre-hook on the UNet, and every monitored cross-attention layer gets a
:class:`~i2am.processor.MonitorProcessor`. One UNet call is one recorded step
(a sampler calling the UNet twice per timestep, e.g. Heun, records two).

Memory: running sums only. With ``num_steps`` known, each layer keeps
``time_groups`` bins (constant in the number of steps); with ``num_steps=None``
it keeps one bin per step at the layer's native grid, so memory grows
linearly with steps, but ``time_level`` can then split the steps any way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from ._grid import group_of, query_grid, split_bounds
from .maps import AttributionMaps, LayerMaps
from ._stats import Workspace, attention_statistics
from .processor import LayerRecorder, MonitorProcessor

LayerSelector = Union[None, Sequence[str], Callable[[str], bool]]
BatchSlice = Union[None, slice, Callable[[int], slice]]
_UNSET: Any = object()


@dataclass
class LastAttention:
    """The last forward's per-head projections of one layer, with autograd graph.

    ``query`` (B, heads, N_q, d) and ``key`` (B, heads, N_k, d) cover the UNet's
    whole batch (``batch_slice`` does not apply); the first ``extra_tokens`` keys
    are not on the reference grid. ``scale`` is the softmax temperature the
    layer applied. ``grid`` is the layer's query grid (h_l, w_l). With
    ``AttentionMonitor(..., moments=True)`` a layer that runs diffusers' default
    processor also carries its attention centres ``mu`` (B, heads, N_q, 2) and
    dispersion ``var`` (B, heads, N_q), with graph, from its own attention call
    (:func:`i2am.dispersion.attention_with_moments`); otherwise they are None.
    ``anchors`` are the values given to ``monitor.set_anchors`` for that forward
    (B, N_grid, C) or None; such a layer then also carries ``anchored``
    (B, heads, N_q, C) = sum_j A_ij anchors_j over the grid keys, with graph, from
    the same call (None on other processors or without ``moments``: compute it
    from q/k with :func:`i2am.dispersion.attention_anchored`). With extra tokens such a layer
    also carries ``mass`` (B, heads, N_q), the attention each query puts on the grid keys rather
    than the extra tokens, with graph (else None: compute it with
    :func:`i2am.dispersion.attention_grid_mass`).
    """

    query: torch.Tensor
    key: torch.Tensor
    grid: tuple[int, int]
    heads: int
    scale: float
    extra_tokens: int
    reference_grid: tuple[int, int]
    mu: torch.Tensor | None = None
    var: torch.Tensor | None = None
    anchors: torch.Tensor | None = None
    anchored: torch.Tensor | None = None
    mass: torch.Tensor | None = None


class AttentionMonitor:
    """Records R2G / G2R / DAAM attribution statistics of cross-attention layers.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (anything with
            ``attn_processors`` / ``set_attn_processor``).
        reference_grid: (h_r, w_r) of the reference tokens after the extra ones.
            ``None`` reads it as a 1 × (N_k − extra_tokens) row at the first call
            after construction or ``reset()`` (text prompts, single tokens).
        extra_tokens: tokens before the grid (e.g. a CLIP CLS token).
        layers: None (every cross-attention layer), a list of processor names
            (with or without the ``.processor`` suffix) or a predicate on names.
        num_steps: UNet calls the recording will see; enables constant-memory
            time bins. ``None``: one bin per call (memory grows with steps).
        time_groups: number of time bins when ``num_steps`` is set.
        chunk_size: queries per score chunk; the extra memory is one reused
            float32 buffer of at most batch × heads × chunk_size × N_k. A layer
            with N_q <= chunk_size is done in one pass with one exponential
            (faster on GPUs); larger layers take two chunked passes.
        pair_layers: layers that keep the (N_q × N_grid) matrix needed by
            ``specific_reference`` (None: all monitored; False or []: none).
        batch_slice: which samples of the UNet batch to record: a slice, or a
            function of the batch size returning one (e.g. the conditional half
            under classifier-free guidance).
        keep_last: keep the last forward's q/k with graph (``last_attention()``).
        moments: also keep each layer's attention centres and dispersion, computed
            inside the layer's own attention call (implies ``keep_last``). The
            layer output then equals the unmonitored one to float rounding
            rather than bit for bit. ``set_anchors`` adds per-sample value
            columns to that call.
        record: whether to record maps (can be toggled via ``monitor.record``).
    """

    def __init__(
        self,
        unet: Any,
        reference_grid: tuple[int, int] | None,
        extra_tokens: int = 0,
        layers: LayerSelector = None,
        *,
        num_steps: int | None = None,
        time_groups: int = 5,
        chunk_size: int = 1024,
        pair_layers: LayerSelector | bool = None,
        batch_slice: BatchSlice = None,
        keep_last: bool = False,
        moments: bool = False,
        record: bool = True,
    ) -> None:
        if extra_tokens < 0:
            raise ValueError(f"extra_tokens must be >= 0, got {extra_tokens}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.unet = unet
        self._given_grid = tuple(reference_grid) if reference_grid is not None else None
        self.reference_grid = self._given_grid
        self.extra_tokens = int(extra_tokens)
        self.chunk_size = int(chunk_size)
        self.batch_slice = batch_slice
        self.keep_last = keep_last or moments
        self.moments = moments
        self.record = record

        self._original: dict[str, Any] = dict(unet.attn_processors)
        self.layers: list[str] = self._select(layers, "layers")
        if not self.layers:
            raise ValueError("the layer selection matched no cross-attention layer")
        if pair_layers is False:
            pairs: list[str] = []
        elif pair_layers is None or pair_layers is True:
            pairs = list(self.layers)
        else:
            pairs = self._select(pair_layers, "pair_layers")
            outside = [n for n in pairs if n not in self.layers]
            if outside:
                raise KeyError(f"pair_layers {outside} are not among the monitored layers {self.layers}")
        self.pair_layers = pairs

        self._processors = {n: MonitorProcessor(self, n, self._original[n]) for n in self.layers}
        unet.set_attn_processor({n: self._processors.get(n, p) for n, p in self._original.items()})
        self._hooks = [
            unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            unet.register_forward_hook(self._post_hook),
        ]
        self._closed = False
        self._anchors: torch.Tensor | None = None
        self._last: dict[str, LastAttention] = {}
        self._workspace = Workspace()
        self.reset(num_steps=num_steps, time_groups=time_groups)

    # ------------------------------------------------------------------ setup
    def _cross_attention_names(self) -> list[str]:
        names = []
        for name in self._original:
            module = self.unet.get_submodule(name.removesuffix(".processor"))
            if getattr(module, "is_cross_attention", "attn2" in name):
                names.append(name)
        return names

    def _select(self, selector: Any, what: str) -> list[str]:
        cross = self._cross_attention_names()
        if selector is None:
            return cross
        if callable(selector):
            return [n for n in cross if selector(n)]
        if isinstance(selector, str):
            selector = [selector]
        chosen = []
        for raw in selector:
            name = raw if raw.endswith(".processor") else raw + ".processor"
            if name not in self._original:
                raise KeyError(
                    f"{what}: unknown layer {raw!r}; expected one of the {len(cross)} cross-attention "
                    f"layers, e.g. {cross[:3]}"
                )
            if name not in cross:
                raise ValueError(f"{what}: layer {raw!r} is not a cross-attention layer; expected one of {cross}")
            if name not in chosen:
                chosen.append(name)
        return chosen

    # -------------------------------------------------------------- lifecycle
    def reset(self, num_steps: int | None = _UNSET, time_groups: int = _UNSET) -> None:
        """Start a new recording (optionally with a new step count / grouping)."""
        if num_steps is not _UNSET:
            if num_steps is not None and num_steps < 1:
                raise ValueError(f"num_steps must be >= 1 or None, got {num_steps}")
            self.num_steps = num_steps
        if time_groups is not _UNSET:
            if time_groups < 1:
                raise ValueError(f"time_groups must be >= 1, got {time_groups}")
            self.time_groups = int(time_groups)
        self._recorders: dict[str, LayerRecorder] = {}
        self._steps = 0
        self._timesteps: list[torch.Tensor] = []
        self._latent_grid: tuple[int, int] | None = None
        self._active = False
        self._bin = 0
        self._slice = slice(None)
        self.reference_grid = self._given_grid

    def close(self) -> None:
        """Restore the exact original processor objects and remove the hooks."""
        if self._closed:
            return
        self.unet.set_attn_processor(dict(self._original))
        for hook in self._hooks:
            hook.remove()
        self._closed = True
        self._last = {}
        self._anchors = None
        self._workspace.release()

    def __enter__(self) -> AttentionMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_anchors(self, values: torch.Tensor | None) -> None:
        """Per-sample values on the reference grid, (B, N_grid, C) with B the UNet's batch, that
        ride along in each monitored layer's own attention call from the next forward on
        (``moments=True``): ``last_attention()[layer].anchored`` is then sum_j A_ij values_j over
        the grid keys, with graph. One tensor serves every layer, since all attend to the same
        reference grid. They stay until ``set_anchors(None)``; clear them before running the
        UNet on another batch (e.g. sampling with guidance doubles it)."""
        if values is not None and (not isinstance(values, torch.Tensor) or values.ndim != 3):
            raise ValueError(f"set_anchors: expected a (B, N_grid, C) tensor or None, got "
                             f"{getattr(values, 'shape', type(values).__name__)}")
        self._anchors = values

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        self._last = {}
        if sample is None or sample.ndim != 4:
            raise ValueError("AttentionMonitor expects the UNet's sample as a 4-D (B, C, H, W) tensor")
        batch = sample.shape[0]
        bs = self.batch_slice(batch) if callable(self.batch_slice) else self.batch_slice
        self._slice = bs if bs is not None else slice(None)
        self._call_grid = (int(sample.shape[-2]), int(sample.shape[-1]))
        if not self.record:
            self._active = False
            return
        if self._latent_grid is not None and self._call_grid != self._latent_grid:
            raise ValueError(
                f"latent grid changed within one recording: {self._latent_grid} then {self._call_grid}; "
                "call monitor.reset() between runs"
            )
        self._latent_grid = self._call_grid
        if self.num_steps is not None:
            if self._steps >= self.num_steps:
                raise ValueError(
                    f"recording was set up for num_steps={self.num_steps} UNet calls and got one more; "
                    "call monitor.reset(num_steps=...) with the sampler's number of UNet calls"
                )
            self._bin = group_of(self._steps, self.num_steps, self.time_groups)
        else:
            self._bin = self._steps
        # Kept as tensors until maps(): reading a CUDA timestep now would sync every step.
        t = torch.as_tensor(timestep).detach().flatten()
        self._timesteps.append((t[self._slice] if t.numel() > 1 else t).clone())
        self._steps += 1
        self._active = True

    def _post_hook(self, module: Any, args: tuple, output: Any) -> None:
        self._active = False

    # ------------------------------------------------------------- processor
    def _wants(self, name: str) -> bool:
        return self.keep_last or (self.record and self._active)

    def _reference_grid_for(self, name: str, key: torch.Tensor) -> tuple[int, int]:
        """The reference grid a layer's keys must match (read from the first call if not given)."""
        n_grid = key.shape[-2] - self.extra_tokens
        if self.reference_grid is None:
            if n_grid < 1:
                raise ValueError(f"layer {name!r} has {key.shape[-2]} reference tokens, fewer than "
                                 f"extra_tokens + 1 = {self.extra_tokens + 1}")
            self.reference_grid = (1, n_grid)
        h_r, w_r = self.reference_grid
        if n_grid != h_r * w_r:
            raise ValueError(
                f"layer {name!r} got {key.shape[-2]} reference tokens, expected reference_grid "
                f"{h_r}×{w_r} + extra_tokens {self.extra_tokens} = {h_r * w_r + self.extra_tokens}"
            )
        return self.reference_grid

    def _anchors_for(self, name: str, key: torch.Tensor) -> torch.Tensor | None:
        """The anchors set for this forward, checked against the layer's batch and grid keys."""
        a = self._anchors
        if a is None:
            return None
        n_grid = key.shape[-2] - self.extra_tokens
        if a.shape[0] != key.shape[0] or a.shape[1] != n_grid:
            raise ValueError(
                f"layer {name!r}: monitor anchors are {tuple(a.shape)} but the layer runs a batch of "
                f"{key.shape[0]} with {n_grid} reference grid keys; set_anchors((B, N_grid, C)) for this batch, "
                f"or set_anchors(None) before running the UNet on another one (e.g. sampling with guidance)")
        return a

    def _observe(self, name: str, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                 scale: float, fused: Any = None) -> None:
        """``fused``: the :class:`~i2am.dispersion.FusedAttention` of the layer's own call, if any."""
        grid = query_grid(query.shape[-2], self._call_grid, name) if hasattr(self, "_call_grid") else None
        n_grid = key.shape[-2] - self.extra_tokens
        self._reference_grid_for(name, key)
        if self.keep_last:
            anchors = self._anchors_for(name, key)
            mu, var, anchored, mass = ((fused.mu, fused.var, fused.anchored, fused.mass) if fused is not None
                                       else (None, None, None, None))
            self._last[name] = LastAttention(query, key, grid, query.shape[1], scale, self.extra_tokens,
                                             self.reference_grid, mu, var, anchors, anchored, mass)
        if not (self.record and self._active):
            return
        with torch.no_grad():
            q, k = query.detach()[self._slice], key.detach()[self._slice]
            m = mask.detach()[self._slice] if mask is not None else None
            rec = self._recorders.get(name)
            if rec is None:
                bins = self.time_groups if self.num_steps is not None else None
                rec = LayerRecorder(name, q.shape[1], grid, n_grid, q.shape[0], name in self.pair_layers, bins)
                self._recorders[name] = rec
            rec.check(q.shape[1], grid, n_grid, q.shape[0])
            stats = attention_statistics(q, k, scale, self.extra_tokens, self.chunk_size, m,
                                         want_pair=rec.keep_pair, workspace=self._workspace)
            rec.add(self._bin, *stats)

    # ---------------------------------------------------------------- outputs
    @property
    def recorded_steps(self) -> int:
        return self._steps

    def state_nbytes(self) -> int:
        """Bytes held by the running accumulators (what grows, or not, with steps)."""
        return sum(r.nbytes() for r in self._recorders.values())

    def last_attention(self) -> dict[str, LastAttention]:
        """The last UNet forward's q/k per monitored layer (needs ``keep_last=True``)."""
        if not self.keep_last:
            raise ValueError("last_attention() needs AttentionMonitor(..., keep_last=True)")
        if not self._last:
            raise ValueError("no UNet forward seen since the last one started; run the UNet first")
        return {n: self._last[n] for n in self.layers if n in self._last}

    def maps(self) -> AttributionMaps:
        """Snapshot of the recording as :class:`AttributionMaps` (copies the sums)."""
        if self._steps == 0 or not self._recorders:
            raise ValueError(
                "empty recording: no UNet call was recorded since the monitor was attached or reset(); "
                "run the sampler while the monitor is attached and record=True"
            )
        missing = [n for n in self.layers if n not in self._recorders]
        if missing:
            raise ValueError(f"monitored layers {missing} never ran during the recording")
        if self.num_steps is not None:
            bounds = [(min(s, self._steps), min(e, self._steps))
                      for s, e in split_bounds(self.num_steps, self.time_groups)]
        else:
            bounds = [(s, s + 1) for s in range(self._steps)]
        layers = {}
        for name in self.layers:
            rec = self._recorders[name]
            pad = len(bounds) - len(rec.r2g)
            def stack(xs: list[torch.Tensor]) -> torch.Tensor:
                return torch.stack(xs + [torch.zeros_like(xs[0])] * pad)
            layers[name] = LayerMaps(
                heads=rec.heads, query_grid=rec.query_grid,
                r2g=stack(rec.r2g), g2r=stack(rec.g2r), daam=stack(rec.daam),
                pair=rec.pair.clone() if rec.pair is not None else None,
            )
        return AttributionMaps(
            layers=layers, bin_bounds=bounds, reference_grid=tuple(self.reference_grid),
            latent_grid=self._latent_grid, extra_tokens=self.extra_tokens,
            timesteps=[t.float().cpu().tolist() for t in self._timesteps],
        )
