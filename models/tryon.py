"""The try-on latent diffusion model: codec + inpainting UNet + garment encoder.

The UNet sees `cat(noisy latent, agnostic-person latent, inpainting mask[, pose latent])`
and attends to the garment tokens through its cross-attention layers; those
layers are what the I²AM monitor watches. The diffusion process (noise
schedule, targets, sampling) lives outside, in `losses/` and `models/sampling.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .codec import LatentCodec, VAECodec
from .garment import GarmentEncoder
from .errors import ModelConfigError
from .warp import AttentionWarp


def mask_box_coordinates(mask: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w): each cell's (y, x) relative to the bounding box of ``mask`` (B, 1, h, w),
    mapped so the box's first cell centre to its last spans [-1, 1] (values continue linearly
    outside the box); zeros for an empty mask.

    With rows r0..r1 of the box, y = 2 (r - r0) / (r1 - r0) - 1 (1 cell: 0), and x alike. The
    box of the inpainting mask is where the garment goes, so these are (approximately) the
    garment's own coordinates, which the garment tokens' position embeddings also encode."""
    m = mask[:, 0] > 0.5
    out = []
    for dim, size in ((2, m.shape[1]), (1, m.shape[2])):  # rows: any over columns, and vice versa
        hit = m.any(dim=dim)  # (B, size)
        idx = torch.arange(size, device=mask.device, dtype=mask.dtype)
        first = torch.where(hit, idx, torch.full_like(idx, size)).amin(dim=1, keepdim=True)
        last = torch.where(hit, idx, torch.full_like(idx, -1)).amax(dim=1, keepdim=True)
        span = (last - first).clamp(min=1)
        coord = torch.where(hit.any(dim=1, keepdim=True), 2 * (idx - first) / span - 1, torch.zeros_like(idx))
        out.append(coord)
    y, x = out
    return torch.stack([y[:, :, None].expand(-1, -1, m.shape[2]), x[:, None, :].expand(-1, m.shape[1], -1)], dim=1)


class TryOnModel(nn.Module):
    def __init__(self, codec: LatentCodec, unet: nn.Module, garment_encoder: GarmentEncoder, use_pose: bool = False,
                 mask_coords: bool = False, warp: AttentionWarp | None = None) -> None:
        super().__init__()
        self.codec = codec.requires_grad_(False)
        self.unet = unet
        self.garment_encoder = garment_encoder
        self.use_pose = use_pose
        self.mask_coords = mask_coords
        self.warp = warp
        # Classifier-free guidance: dropped garments are replaced by learned null tokens
        # (Paint-by-Example learns a null vector the same way).
        self.null_tokens = nn.Parameter(torch.zeros(1, garment_encoder.num_tokens, garment_encoder.dim))

    # -- what the I²AM monitor needs to lay keys out on the garment ---------------------
    @property
    def reference_grid(self) -> tuple[int, int]:
        return self.garment_encoder.reference_grid

    @property
    def extra_tokens(self) -> int:
        return self.garment_encoder.extra_tokens

    @property
    def latent_channels(self) -> int:
        return self.codec.latent_channels

    # -- inputs --------------------------------------------------------------------------
    @torch.no_grad()
    def condition(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The spatial condition on the latent grid: agnostic latent, mask[, pose latent][, mask-box
        coordinates]."""
        mask = self.codec.latent_mask(batch["mask"])
        parts = [self.codec.encode(batch["agnostic"]), mask]
        if self.use_pose:
            if "pose" not in batch:
                raise KeyError("model.unet.use_pose=true but the dataset gives no 'pose' image")
            parts.append(self.codec.encode(batch["pose"]))
        if self.mask_coords:
            parts.append(mask_box_coordinates(mask))
        return torch.cat(parts, dim=1)

    def garment_tokens(self, garment: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.garment_encoder(garment)
        if drop is not None:
            # Always through torch.where, even when nothing is dropped: the null tokens then
            # take part in every backward, which DDP needs to reduce the same buckets on every rank.
            null = self.null_tokens.to(tokens.dtype).expand_as(tokens)
            tokens = torch.where(drop.view(-1, 1, 1), null, tokens)
        return tokens

    def null_garment_tokens(self, batch_size: int) -> torch.Tensor:
        return self.null_tokens.expand(batch_size, -1, -1)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor,
                garment: torch.Tensor | None = None, drop: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the diffusion target. Pass `garment` (encoded here, so the encoder
        trains through DDP's forward) or precomputed `tokens` (sampling). With the warp the
        garment image is needed either way, `drop` (B,) marks the samples whose garment
        was dropped for guidance (they get no warp), and `gate` fixes the warp's gates
        (`warp_gate`) instead of this call's."""
        if tokens is None:
            if garment is None:
                raise ValueError("TryOnModel.forward needs `garment` or `tokens`")
            tokens = self.garment_tokens(garment, drop)
        x = torch.cat([noisy, condition.to(noisy.dtype)], dim=1)
        out = self.unet(x, timesteps, encoder_hidden_states=tokens).sample
        if self.warp is None:
            return out
        if garment is None:
            raise ValueError("TryOnModel.forward: the attention warp (model.warp) needs the `garment` image")
        return self.warp(out, self.codec, garment, None if drop is None else ~drop, gate)

    @torch.no_grad()
    def warp_gate(self, condition: torch.Tensor, tokens: torch.Tensor, timestep: int) -> torch.Tensor | None:
        """The warp's held gates (B, C, h, w) for a whole sampling run (None without the warp):
        the UNet's gates for a zero latent at ``timestep``, the noisiest. Where they are open
        (> 0.5) every step uses them; elsewhere each step's own gates decide.

        Why: in training, at low noise the noisy latent already shows the answer, so the gates
        learn to close there and copy it; in sampling it shows the model's own estimate, and the
        last steps copied that blur onto the garment (docs/warp.md). Where the garment goes does
        not depend on the noise: at the noisiest step the latent carries nothing, so its gates
        are the condition's and the garment's alone. Off the garment the later steps still
        close them (they see skin), which keeps garment colour off the arms. A zero latent makes
        them independent of the seed, so a run resumed at any step holds the same ones.

        Runs through `unet.forward`, not the module call: it is no sampling step to the hooks
        that count or record the UNet's calls (the I²AM monitor, the diagnosis' repairs)."""
        if self.warp is None:
            return None
        b, _, h, w = condition.shape
        x = torch.cat([torch.zeros(b, self.latent_channels, h, w, dtype=tokens.dtype, device=condition.device),
                       condition.to(tokens.dtype)], dim=1)
        t = torch.full((b,), timestep, device=condition.device)
        out = self.unet.forward(x, t, encoder_hidden_states=tokens).sample
        self.warp.reader.take()  # its centres are not needed: each step warps with its own
        return torch.sigmoid(out.chunk(2, dim=1)[1])

    # -- weights ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save_pretrained(self, directory: str | Path) -> None:
        """diffusers/safetensors layout: unet/, garment_encoder.safetensors[, vae/]."""
        directory = Path(directory)
        self.unet.save_pretrained(directory / "unet", safe_serialization=True)
        garment = {f"garment_encoder.{k}": v.detach().contiguous().cpu() for k, v in self.garment_encoder.state_dict().items()}
        garment["null_tokens"] = self.null_tokens.detach().contiguous().cpu()
        save_file(garment, str(directory / "garment_encoder.safetensors"))
        if isinstance(self.codec, VAECodec):
            self.codec.vae.save_pretrained(directory / "vae", safe_serialization=True)

    def load_pretrained(self, directory: str | Path) -> None:
        """Load weights written by `save_pretrained` into this (config-built) model."""
        directory = Path(directory)
        unet_file = directory / "unet" / "diffusion_pytorch_model.safetensors"
        garment_file = directory / "garment_encoder.safetensors"
        for f in (unet_file, garment_file):
            if not f.is_file():
                raise ModelConfigError(f"model weights not found: {f} (expected a directory written by TryOnModel.save_pretrained)")
        self.unet.load_state_dict(load_file(str(unet_file)), strict=True)
        garment = load_file(str(garment_file))
        with torch.no_grad():
            self.null_tokens.copy_(garment.pop("null_tokens"))
        self.garment_encoder.load_state_dict({k.split(".", 1)[1]: v for k, v in garment.items()}, strict=True)
