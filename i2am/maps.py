"""AttributionMaps: the five I²AM levels from a recording's raw sums.

Conventions (definitions on the method page, ``docs/method.md``): per (layer, head) the map is
summed over time, upsampled bicubic (align_corners=False) to the output grid
and clamped at 0; then means over heads and/or layers. R2G and DAAM land on
the generated grid (the largest query grid among the monitored layers), G2R on
the reference grid. Maps stay raw: normalisation is for display only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ._grid import Grid, merge_bins, region_mask, region_on_layer, upsample_clamp

DIRECTIONS = ("r2g", "g2r", "daam")
_FORMAT = "i2am-maps/1"


@dataclass
class LayerMaps:
    """Raw sums of one layer.

    r2g, daam: (bins, B, heads, N_q); g2r: (bins, B, heads, N_grid);
    pair: (B, N_q, N_grid) time-summed head-mean G2R probabilities, or None.
    """

    heads: int
    query_grid: Grid
    r2g: torch.Tensor
    g2r: torch.Tensor
    daam: torch.Tensor
    pair: torch.Tensor | None = None


class AttributionMaps:
    """Bi-directional attribution maps of one recording (see module docstring)."""

    def __init__(self, layers: dict[str, LayerMaps], bin_bounds: Sequence[tuple[int, int]],
                 reference_grid: Grid, latent_grid: Grid | None = None, extra_tokens: int = 0,
                 timesteps: list[list[float]] | None = None) -> None:
        if not layers:
            raise ValueError("AttributionMaps needs at least one layer")
        self.layers = dict(layers)
        self.bin_bounds = [tuple(int(v) for v in b) for b in bin_bounds]
        self.reference_grid = tuple(int(v) for v in reference_grid)
        self.latent_grid = tuple(int(v) for v in latent_grid) if latent_grid is not None else None
        self.extra_tokens = int(extra_tokens)
        self.timesteps = timesteps or []
        for name, lm in self.layers.items():
            if lm.r2g.shape[0] != len(self.bin_bounds):
                raise ValueError(f"layer {name!r} has {lm.r2g.shape[0]} time bins, "
                                 f"expected {len(self.bin_bounds)}")

    # ------------------------------------------------------------ properties
    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    @property
    def num_steps(self) -> int:
        return self.bin_bounds[-1][1]

    @property
    def batch_size(self) -> int:
        return next(iter(self.layers.values())).r2g.shape[1]

    @property
    def generated_grid(self) -> Grid:
        """The largest query grid among the layers: R2G/DAAM output grid."""
        return max((lm.query_grid for lm in self.layers.values()), key=lambda g: g[0] * g[1])

    def grid(self, direction: str) -> Grid:
        _check_direction(direction)
        return self.reference_grid if direction == "g2r" else self.generated_grid

    # ----------------------------------------------------------------- levels
    def _layer_head(self, direction: str,
                    bins: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per layer (B, heads, H, W): time sum, upsample, clamp. ``bins`` maps
        layer → already-summed (B, heads, N) sums when given."""
        size = self.grid(direction)
        out = {}
        for lname, lm in self.layers.items():
            summed = bins[lname] if bins is not None else getattr(lm, direction).sum(0)
            src = self.reference_grid if direction == "g2r" else lm.query_grid
            out[lname] = upsample_clamp(summed.reshape(*summed.shape[:2], *src), size)
        return out

    def unified(self, direction: str) -> torch.Tensor:
        """(B, H, W): mean over all (layer, head) pairs."""
        return torch.cat(list(self._layer_head(direction).values()), dim=1).mean(1)

    def layer_level(self, direction: str) -> dict[str, torch.Tensor]:
        """{layer: (B, H, W)}: per layer, mean over heads."""
        return {n: m.mean(1) for n, m in self._layer_head(direction).items()}

    def head_level(self, direction: str) -> torch.Tensor:
        """(B, heads, H, W): for head n, mean over layers (needs equal head counts)."""
        heads = {n: lm.heads for n, lm in self.layers.items()}
        if len(set(heads.values())) != 1:
            raise ValueError(f"head_level needs every layer to have the same number of heads, got {heads}; "
                             "monitor a subset of layers with equal head counts")
        return torch.stack(list(self._layer_head(direction).values())).mean(0)

    def time_level(self, direction: str, groups: int = 5) -> torch.Tensor:
        """(B, groups, H, W): steps split like numpy.array_split (group 0 the
        noisiest), each group aggregated as the unified level."""
        _check_direction(direction)
        if not 1 <= groups <= self.num_steps:
            raise ValueError(f"groups must be in 1..{self.num_steps} (recorded steps), got {groups}")
        merged = {n: merge_bins(getattr(lm, direction), self.bin_bounds, groups) for n, lm in self.layers.items()}
        out = []
        for g in range(groups):
            per_layer = self._layer_head(direction, bins={n: m[g] for n, m in merged.items()})
            out.append(torch.cat(list(per_layer.values()), dim=1).mean(1))
        return torch.stack(out, dim=1)

    def specific_reference(self, region: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """(B, h_r, w_r): G2R of the queries in ``region`` (an (H, W) bool mask
        on the generated grid, or a (y0, x0, y1, x1) box in its cells), averaged
        over those queries, heads and layers, summed over time."""
        with_pairs = {n: lm for n, lm in self.layers.items() if lm.pair is not None}
        if not with_pairs:
            raise ValueError("specific_reference needs pair matrices, and none were recorded; "
                             "attach the monitor with pair_layers=None (all) or a list of layers")
        mask = region_mask(region, self.generated_grid)
        maps = []
        for lm in with_pairs.values():
            idx = region_on_layer(mask, lm.query_grid).to(lm.pair.device)
            maps.append(lm.pair[:, idx].mean(1))
        return torch.stack(maps).mean(0).reshape(-1, *self.reference_grid)

    # ------------------------------------------------------------------- I/O
    def save(self, path: str | Path) -> None:
        """safetensors file: raw sums per layer plus JSON metadata."""
        from safetensors.torch import save_file

        tensors, layers_meta = {}, []
        for i, (name, lm) in enumerate(self.layers.items()):
            for kind in DIRECTIONS + ("pair",):
                t = getattr(lm, kind)
                if t is not None:
                    tensors[f"{i}.{kind}"] = t.detach().cpu().contiguous()
            layers_meta.append({"name": name, "heads": lm.heads, "query_grid": list(lm.query_grid),
                                "pair": lm.pair is not None})
        meta = {"format": _FORMAT, "layers": layers_meta, "bin_bounds": self.bin_bounds,
                "reference_grid": self.reference_grid, "latent_grid": self.latent_grid,
                "extra_tokens": self.extra_tokens, "timesteps": self.timesteps}
        save_file(tensors, str(path), metadata={"i2am": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> AttributionMaps:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("i2am")
            if raw is None:
                raise ValueError(f"{path} has no 'i2am' metadata; not written by AttributionMaps.save")
            meta = json.loads(raw)
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path}: format {meta.get('format')!r}, expected {_FORMAT!r}")
            layers = {}
            for i, lmeta in enumerate(meta["layers"]):
                t = {k: f.get_tensor(f"{i}.{k}") for k in DIRECTIONS}
                pair = f.get_tensor(f"{i}.pair") if lmeta["pair"] else None
                layers[lmeta["name"]] = LayerMaps(lmeta["heads"], tuple(lmeta["query_grid"]), pair=pair, **t)
        return cls(layers, [tuple(b) for b in meta["bin_bounds"]], tuple(meta["reference_grid"]),
                   tuple(meta["latent_grid"]) if meta["latent_grid"] else None,
                   meta["extra_tokens"], meta["timesteps"])

    def __repr__(self) -> str:
        return (f"AttributionMaps(layers={len(self.layers)}, steps={self.num_steps}, batch={self.batch_size}, "
                f"generated_grid={self.generated_grid}, reference_grid={self.reference_grid})")


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
