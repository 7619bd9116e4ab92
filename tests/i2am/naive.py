"""An explicit, deliberately naive implementation of the I²AM definitions
(docs/method.md), written independently of the package: full
softmax matrices for every layer and every step, float64, per-head loops.

Inputs are captured with forward pre-hooks on the Attention modules, and the
probabilities come from diffusers' own projections (and are checked against
``Attention.get_attention_scores``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class Capture:
    """Records (hidden_states, encoder_hidden_states) of each call of some attention layers."""

    def __init__(self, unet, names):
        self.unet = unet
        self.calls = {n: [] for n in names}
        self.handles = []
        for n in names:
            module = unet.get_submodule(n[: -len(".processor")])
            self.handles.append(module.register_forward_pre_hook(self._hook(n), with_kwargs=True))

    def _hook(self, name):
        def hook(module, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            self.calls[name].append((hs.detach().clone(), kwargs["encoder_hidden_states"].detach().clone()))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def probabilities(attn, hs, ehs):
    """(softmax over keys, softmax over queries), each (B, heads, N_q, N_k), float64."""
    assert attn.group_norm is None and attn.spatial_norm is None and not attn.norm_cross and hs.ndim == 3
    with torch.no_grad():
        q32 = attn.head_to_batch_dim(attn.to_q(hs))
        k32 = attn.head_to_batch_dim(attn.to_k(ehs))
        reference = attn.get_attention_scores(q32, k32)  # diffusers' own softmax over keys
        s = torch.bmm(q32.double(), k32.double().transpose(1, 2)) * attn.scale
    assert torch.allclose(s.softmax(-1).float(), reference, atol=1e-6)
    B, heads = hs.shape[0], attn.heads
    s = s.reshape(B, heads, *s.shape[1:])
    return s.softmax(-1), s.softmax(-2)


def per_step_maps(unet, capture, extra, grids):
    """Per layer, per step: r2g/daam (B, h, h_l, w_l), g2r (B, h, N_g), pair (B, N_q, N_g)."""
    out = {}
    for name, calls in capture.calls.items():
        attn = unet.get_submodule(name[: -len(".processor")])
        steps = []
        for hs, ehs in calls:
            pk, pq = probabilities(attn, hs, ehs)
            B, h, n_q, _ = pk.shape
            gh, gw = grids[n_q]
            steps.append(dict(
                r2g=pq[..., extra:].mean(-1).reshape(B, h, gh, gw),
                daam=pk[..., extra:].mean(-1).reshape(B, h, gh, gw),
                g2r=pk[..., extra:].mean(-2),
                pair=pk[..., extra:].mean(1),
            ))
        out[name] = steps
    return out


def _layer_head_maps(steps, direction, step_ids, out_grid, ref_grid):
    """One layer: time sum over step_ids, then per head bicubic + clamp. List over heads of (B, H, W)."""
    summed = sum(steps[i][direction] for i in step_ids)
    if direction == "g2r":
        summed = summed.reshape(*summed.shape[:2], *ref_grid)
    maps = []
    for n in range(summed.shape[1]):
        m = F.interpolate(summed[:, n : n + 1], size=out_grid, mode="bicubic", align_corners=False)
        maps.append(m[:, 0].clamp(min=0))
    return maps


def levels(per_step, direction, out_grid, ref_grid, groups):
    """All levels of one direction, by the notes' definitions."""
    n_steps = len(next(iter(per_step.values())))
    all_steps = list(range(n_steps))
    per_layer = {l: _layer_head_maps(s, direction, all_steps, out_grid, ref_grid) for l, s in per_step.items()}
    pairs = [m for maps in per_layer.values() for m in maps]
    unified = sum(pairs) / len(pairs)
    layer = {l: sum(maps) / len(maps) for l, maps in per_layer.items()}
    heads = len(next(iter(per_layer.values())))
    head = torch.stack([sum(per_layer[l][n] for l in per_layer) / len(per_layer) for n in range(heads)], 1)
    time = []
    for ids in np.array_split(np.arange(n_steps), groups):
        group_pairs = [m for s in per_step.values()
                       for m in _layer_head_maps(s, direction, list(ids), out_grid, ref_grid)]
        time.append(sum(group_pairs) / len(group_pairs))
    return dict(unified=unified, layer=layer, head=head, time=torch.stack(time, 1))


def specific_reference(per_step, region, grids_by_layer, ref_grid):
    """Mean over layers of: time sum of the head-mean G2R of the region's queries, averaged over them."""
    H, W = region.shape
    maps = []
    for name, steps in per_step.items():
        h, w = grids_by_layer[name]
        small = F.interpolate(region[None, None].float(), size=(h, w), mode="nearest")[0, 0] > 0.5
        if small.any():
            idx = [y * w + x for y in range(h) for x in range(w) if small[y, x]]
        else:
            cells = region.nonzero().double() + 0.5
            yc, xc = cells.mean(0).tolist()
            idx = [int(np.floor(yc * h / H)) * w + int(np.floor(xc * w / W))]
        summed = sum(s["pair"] for s in steps)  # (B, N_q, N_g)
        maps.append(summed[:, idx].mean(1))
    return (sum(maps) / len(maps)).reshape(-1, *ref_grid)


def levels_without_heads(per_step, direction, out_grid, ref_grid):
    """Unified and layer levels only (for layers with unequal head counts)."""
    n_steps = len(next(iter(per_step.values())))
    per_layer = {l: _layer_head_maps(s, direction, range(n_steps), out_grid, ref_grid) for l, s in per_step.items()}
    pairs = [m for maps in per_layer.values() for m in maps]
    return dict(unified=sum(pairs) / len(pairs), layer={l: sum(m) / len(m) for l, m in per_layer.items()})
