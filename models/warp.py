"""The attention warp: the garment, resampled where one cross-attention layer looks.

Why: with an 8x6 token grid a garment token pools a 4x4-pixel cell, so attention that
finds the right cell still hands the decoder a blend of that cell's colours. Check cells
and dots of 2-4 pixels cannot come through such a token, however well placed the
attention is. The warp keeps the *where* from attention and takes the *what* from the
garment image at full resolution:

    mu_i   = sum_j A_ij p_j                    (head-mean attention centre of query i)
    w(x)   = garment(upsample(mu)(x))          (bilinear, at the codec's resolution)
    pred   = o + sigmoid(g) * (w - o)          (the UNet predicts o and a gate logit g per
                                                latent channel)

`mu` is the I²AM G2R centre of the layer, the quantity the position term supervises
(E_A||p - p*||^2 = Var + ||mu - p*||^2), so the monitor's maps explain what the warp
copies. Like Leffa's flow, mu is a soft argmax: differentiable, and the diffusion loss
reaches the layer's q/k through `grid_sample`.

`mu` is read by a forward hook on the layer's attention module (its own q/k projections
and one fused SDPA call with the cell centres as values, no N_q x N_k matrix), not by
its processor: the I²AM monitor and the diagnosis' repairs replace processors, and the
warp must see the layer the same way under all of them.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from i2am._grid import query_grid
from i2am.dispersion import attention_moments
from i2am.processor import query_key

from .codec import LatentCodec, PixelCodec
from .errors import ModelConfigError


def last_cross_attention(unet: nn.Module) -> str:
    """Module path of the UNet's last cross-attention layer (the decoder's finest)."""
    names = [n for n, m in unet.named_modules() if n.endswith("attn2") and getattr(m, "is_cross_attention", False)]
    # diffusers registers mid_block after up_blocks: the decoder's last is the last up_blocks one.
    names = [n for n in names if n.startswith("up_blocks")] or names
    if not names:
        raise ModelConfigError("model.warp needs a UNet with cross-attention layers; this one has none")
    return names[-1]


class CentreReader:
    """Forward hook on one cross-attention module: keeps the call's head-mean attention centre
    mu (B, N_q, 2) in [0, 1], under the softmax over the grid keys."""

    def __init__(self, reference_grid: tuple[int, int], extra_tokens: int) -> None:
        self.reference_grid = reference_grid
        self.extra_tokens = extra_tokens
        self.mu: torch.Tensor | None = None

    def __call__(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        query, key = query_key(module, hidden, context)
        # Softmax over the grid keys only: the extra (null) tokens have no place on the garment.
        mu, _ = attention_moments(query, key, query.shape[-1] ** -0.5, self.reference_grid, self.extra_tokens)
        self.mu = mu.mean(dim=1)

    def take(self) -> torch.Tensor:
        if self.mu is None:
            raise RuntimeError("the warp layer did not run in this UNet call (was the UNet changed after the "
                               "model was built?)")
        mu, self.mu = self.mu, None
        return mu


def warp_garment(codec: LatentCodec, garment: torch.Tensor, mu: torch.Tensor,
                 latent_grid: tuple[int, int]) -> torch.Tensor:
    """The garment (B, 3, H, W) resampled at the centres mu (B, h*w, 2) of a query grid (h, w),
    as a latent on ``latent_grid``.

    The centre field is upsampled bilinearly. With the pixel codec the garment is sampled at
    full image resolution and then folded into the latent (sub-cell detail survives); with a
    VAE its latent is sampled (one encoder pass, no gradient into the frozen VAE)."""
    field = _on_grid(mu, latent_grid).to(garment.dtype)
    if isinstance(codec, PixelCodec):
        source, size = garment, tuple(garment.shape[-2:])
    else:
        source, size = codec.encode(garment).to(garment.dtype), latent_grid
    field = F.interpolate(field, size=size, mode="bilinear", align_corners=False)
    # mu is in [0, 1] over the garment image (cell centres at (r + 0.5) / h_r): grid_sample's
    # align_corners=False convention is 2 mu - 1, as (x, y).
    grid = (field.flip(1) * 2 - 1).permute(0, 2, 3, 1)
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return codec.encode(warped) if isinstance(codec, PixelCodec) else warped


def _on_grid(x: torch.Tensor, latent_grid: tuple[int, int]) -> torch.Tensor:
    """(B, N_q, C) per query -> (B, C, h, w) on the layer's query grid (the latent grid as the
    UNet ceil-halves it, the monitor's `query_grid`)."""
    b, n, c = x.shape
    h, w = query_grid(n, tuple(latent_grid), "model.warp.layer")
    return x.transpose(1, 2).reshape(b, c, h, w)


class AttentionWarp(nn.Module):
    """Reads one layer's centres while the UNet runs and blends the warped garment into the
    x0 prediction through the UNet's gate channels (see the module docstring). Holds no
    weights: the gates are the UNet's, so a checkpoint is the UNet's as before."""

    def __init__(self, unet: nn.Module, reference_grid: tuple[int, int], extra_tokens: int,
                 layer: str | None = None) -> None:
        super().__init__()
        self.layer = layer or last_cross_attention(unet)
        try:
            module = unet.get_submodule(self.layer)
        except AttributeError as e:
            raise ModelConfigError(f"model.warp.layer={self.layer!r} is not a module of the UNet; its last "
                                   f"cross-attention layer is {last_cross_attention(unet)!r}") from e
        if not getattr(module, "is_cross_attention", False):
            raise ModelConfigError(f"model.warp.layer={self.layer!r} is not a cross-attention layer")
        self.reader = CentreReader(reference_grid, extra_tokens)
        self._handle = module.register_forward_hook(self.reader, with_kwargs=True)

    def forward(self, out: torch.Tensor, codec: LatentCodec, garment: torch.Tensor,
                keep: torch.Tensor | None, gate: torch.Tensor | None = None) -> torch.Tensor:
        """``out`` (B, 2C, h, w): the UNet's x0 prediction and one gate logit per latent channel
        (with the pixel codec: per pixel and colour, so a gate can follow the garment's edge
        inside a latent cell). ``keep`` (B,) False where the garment was dropped for guidance:
        those samples get no warp. ``gate`` (B, C, h, w) in [0, 1], if given, are held gates
        (the sampler's, `TryOnModel.warp_gate`): where they are open (> 0.5) they replace this
        call's; elsewhere this call's gates decide."""
        pred, logits = out.chunk(2, dim=1)
        own = torch.sigmoid(logits)
        # Held where the garment is (open at the noisiest step): there the low-noise gates would
        # close and copy the estimate's blur. Elsewhere (skin, background) they may close as trained.
        gate = own if gate is None else torch.where(gate > 0.5, gate.to(own.dtype), own)
        warped = warp_garment(codec, garment, self.reader.take(), tuple(pred.shape[-2:])).to(pred.dtype)
        if keep is not None:
            gate = gate * keep.view(-1, 1, 1, 1).to(gate.dtype)
        return pred + gate * (warped - pred)
