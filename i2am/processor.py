"""The attention processor behind :class:`i2am.AttentionMonitor`, and the
memory-bounded statistics it records.

Why a processor and not hooks on the Attention module: diffusers' default
``AttnProcessor2_0`` computes attention with a fused kernel and never
materialises the probabilities, and q/k only exist inside the processor.

Two ways to produce the layer output:

* the layer ran diffusers' ``AttnProcessor2_0`` (the default): we mirror it op
  for op, so outputs are bit-identical (equal to float rounding when the monitor
  also computes ``moments``, and any anchored values, in that call), and reuse
  its q/k for recording;
* any other processor (``AttnProcessor``, a custom or another monitor's): we
  call it untouched for the output and recompute q/k with the same prelude
  (group/spatial norm, projections). That costs one extra q/k projection but
  never changes what the model computes.

Recording (:func:`i2am._stats.attention_statistics`) runs under
``torch.no_grad`` in float32, in chunks, so the extra peak memory is
O(batch × heads × chunk × N_k).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ._stats import attention_statistics
from .dispersion import attention_with_moments

if TYPE_CHECKING:  # pragma: no cover
    from .monitor import AttentionMonitor

__all__ = ["LayerRecorder", "MonitorProcessor", "attention_statistics", "query_key"]


class LayerRecorder:
    """Running sums of one layer: per time bin r2g/daam (B, h, N_q) and g2r
    (B, h, N_g), plus the time-summed head-mean pair matrix (B, N_q, N_g).

    Memory is bins × (layer × heads × grid) + N_q × N_g; with a fixed number
    of bins it does not depend on the number of steps.
    """

    def __init__(self, name: str, heads: int, query_grid: tuple[int, int], num_grid_keys: int,
                 batch: int, keep_pair: bool, num_bins: int | None = None) -> None:
        self.name = name
        self.heads = heads
        self.query_grid = query_grid
        self.num_grid_keys = num_grid_keys
        self.batch = batch
        self.keep_pair = keep_pair
        # A known number of bins is allocated up front: memory is fixed from
        # the first step on; otherwise bins are appended as steps arrive.
        self.num_bins = num_bins
        self.r2g: list[torch.Tensor] = []
        self.g2r: list[torch.Tensor] = []
        self.daam: list[torch.Tensor] = []
        self.pair: torch.Tensor | None = None
        self.calls = 0

    def check(self, heads: int, query_grid: tuple[int, int], num_grid_keys: int, batch: int) -> None:
        got = (heads, tuple(query_grid), num_grid_keys, batch)
        want = (self.heads, self.query_grid, self.num_grid_keys, self.batch)
        if got != want:
            raise ValueError(
                f"layer {self.name!r} changed shape within one recording: (heads, query grid, grid keys, "
                f"recorded batch) was {want}, now {got}; call monitor.reset() between different runs"
            )

    def add(self, bin_index: int, r2g: torch.Tensor, g2r: torch.Tensor, daam: torch.Tensor,
            pair: torch.Tensor | None) -> None:
        target = self.num_bins if self.num_bins is not None else bin_index + 1
        while len(self.r2g) < target:
            self.r2g.append(torch.zeros_like(r2g))
            self.g2r.append(torch.zeros_like(g2r))
            self.daam.append(torch.zeros_like(daam))
        self.r2g[bin_index] += r2g
        self.g2r[bin_index] += g2r
        self.daam[bin_index] += daam
        if self.keep_pair and pair is not None:
            if self.pair is None:
                self.pair = torch.zeros_like(pair)
            self.pair += pair
        self.calls += 1

    def nbytes(self) -> int:
        tensors = self.r2g + self.g2r + self.daam + ([self.pair] if self.pair is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def _prelude(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
             attention_mask: torch.Tensor | None, temb: torch.Tensor | None) -> dict[str, Any]:
    """AttnProcessor2_0 up to (and including) the per-head q/k, verbatim."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    channel = height = width = None
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    )
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return dict(residual=residual, input_ndim=input_ndim, shape=(batch_size, channel, height, width),
                encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                query=query, key=key, head_dim=head_dim)


def query_key(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head q (B, h, N_q, d) and k (B, h, N_k, d) of a diffusers ``Attention`` module for
    these inputs, as ``AttnProcessor2_0`` computes them (norms, projections, head split)."""
    pre = _prelude(attn, hidden_states, encoder_hidden_states, None, None)
    return pre["query"], pre["key"]


class MonitorProcessor:
    """Processor installed on each monitored cross-attention layer.

    Deliberately not an ``nn.Module``: it must not enter the UNet's state dict.
    """

    def __init__(self, monitor: AttentionMonitor, name: str, original: Any) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.monitor = monitor
        self.name = name
        self.original = original
        self.mirror = type(original) is AttnProcessor2_0

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.mirror:
            return self._mirror_2_0(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        extra = {"temb": temb} if temb is not None else {}
        out = self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                            attention_mask=attention_mask, **extra, **kwargs)
        if self.monitor._wants(self.name):
            pre = _prelude(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            # Non-2_0 processors (AttnProcessor, get_attention_scores) scale by attn.scale.
            self.monitor._observe(self.name, pre["query"], pre["key"], pre["attention_mask"], attn.scale)
        return out

    def _mirror_2_0(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                    attention_mask: torch.Tensor | None, temb: torch.Tensor | None) -> torch.Tensor:
        pre = _prelude(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        query, key, head_dim = pre["query"], pre["key"], pre["head_dim"]
        batch_size, channel, height, width = pre["shape"]
        value = attn.to_v(pre["encoder_hidden_states"])
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        observe = self.monitor._wants(self.name)
        fused = None
        if observe and self.monitor.moments:
            # The stability loss's statistics (and the anchored values, when set) ride along in this
            # very attention call: no second kernel.
            reference_grid = self.monitor._reference_grid_for(self.name, key)
            fused = attention_with_moments(query, key, value, pre["attention_mask"], head_dim ** -0.5,
                                           reference_grid, self.monitor.extra_tokens,
                                           self.monitor._anchors_for(self.name, key))
            hidden_states = fused.out
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=pre["attention_mask"], dropout_p=0.0, is_causal=False
            )
        if observe:
            # SDPA's default scale is what the model actually applied.
            self.monitor._observe(self.name, query, key, pre["attention_mask"], head_dim ** -0.5, fused)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if pre["input_ndim"] == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + pre["residual"]
        return hidden_states / attn.rescale_output_factor
