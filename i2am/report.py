"""From a recording to what a researcher looks at: per-sample IMACS and the
figures for every map level (used at validation and by the analysis tools)."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from common.tables import fmt

from . import render
from .maps import AttributionMaps
from .metrics import imacs_per_sample, mask_to_grid, top_cells
from .names import short_name


def _unified_scored(maps: AttributionMaps, batch: Mapping[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, list[float | None], list[float | None]]:
    """Unified R2G and G2R maps on the CPU with their per-sample IMACS_g / IMACS_r."""
    r2g, g2r = maps.unified("r2g").float().cpu(), maps.unified("g2r").float().cpu()
    return r2g, g2r, imacs_per_sample(r2g, batch["mask"].cpu()), imacs_per_sample(g2r, batch["garment_mask"].cpu())


def _mean(values: list[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


def attribution_report(maps: AttributionMaps, batch: Mapping[str, torch.Tensor], generated: torch.Tensor,
                       samples: int = 4, patches: int = 3, time_groups: int = 5
                       ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """IMACS_g / IMACS_r (means over the batch) and figures keyed for a W&B dashboard.

    `batch` holds "garment", "mask" and "garment_mask" (B, ., H, W); `generated`
    the sampled images (B, 3, H, W) in [-1, 1].
    """
    r2g, g2r, imacs_g, imacs_r = _unified_scored(maps, batch)
    metrics = {"i2am/imacs_g": _mean(imacs_g), "i2am/imacs_r": _mean(imacs_r)}

    n = min(samples, r2g.shape[0])
    gen, garment = generated[:n].cpu(), batch["garment"][:n].cpu()

    images = {
        "i2am/r2g": render.map_grid(r2g[:n], list(gen), [f"#{i} IMACS_g {fmt(imacs_g[i], 3)}" for i in range(n)],
                                    suptitle="R2G: where the garment went (unified)", shared=False),
        "i2am/g2r": render.map_grid(g2r[:n], list(garment), [f"#{i} IMACS_r {fmt(imacs_r[i], 3)}" for i in range(n)],
                                    suptitle="G2R: garment parts used (unified)", shared=False),
    }
    heads = maps.head_level("r2g")[0].float().cpu()
    images["i2am/head_level"] = render.map_grid(heads, gen[0], [f"head {h}" for h in range(heads.shape[0])],
                                                suptitle="R2G per head (sample #0)")
    groups = min(time_groups, maps.num_steps)
    times = maps.time_level("r2g", groups=groups)[0].float().cpu()
    images["i2am/time_level"] = render.map_grid(times, gen[0], [f"steps {g + 1}/{groups}" for g in range(groups)],
                                                suptitle="R2G over time (noisiest first, sample #0)")
    layers = maps.layer_level("r2g")
    images["i2am/layer_level"] = render.map_grid(torch.stack([m[0].float().cpu() for m in layers.values()]), gen[0],
                                                 [short_name(k) for k in layers], suptitle="R2G per layer (sample #0)",
                                                 shared=False)
    if patches > 0:
        grid = tuple(r2g.shape[-2:])
        cells = top_cells(r2g[0], mask_to_grid(batch["mask"][:1].cpu(), grid)[0], patches)
        figures = []
        for y, x in cells:
            ref = maps.specific_reference((y, x, y + 1, x + 1))[0].float().cpu()
            figures.append(render.specific_reference_figure(gen[0], garment[0], (y, x, y + 1, x + 1), ref, grid))
        if figures:
            width = max(f.shape[1] for f in figures)
            figures = [np.pad(f, ((0, 0), (0, width - f.shape[1]), (0, 0)), constant_values=255) for f in figures]
            images["i2am/specific_reference"] = np.concatenate(figures, axis=0)
    return metrics, images


def sample_rows(maps: AttributionMaps, batch: Mapping[str, torch.Tensor], generated: torch.Tensor,
                colour_errors: list[float] | None = None) -> list[dict]:
    """One row per sample for a sortable table (W&B): person, garment, generated, R2G and G2R
    overlays, the specific-reference figure of its highest-R2G cell, IMACS_g/r, colour error."""
    r2g, g2r, imacs_g, imacs_r = _unified_scored(maps, batch)
    grid = tuple(r2g.shape[-2:])
    masks = mask_to_grid(batch["mask"].cpu(), grid)
    rows = []
    for i in range(r2g.shape[0]):
        gen, garment = generated[i].cpu(), batch["garment"][i].cpu()
        cells = top_cells(r2g[i], masks[i], 1)
        spec = None
        if cells:
            y, x = cells[0]
            ref = maps.specific_reference((y, x, y + 1, x + 1))[i].float().cpu()
            spec = render.specific_reference_figure(gen, garment, (y, x, y + 1, x + 1), ref, grid)
        rows.append({
            "person": render.image_to_uint8(batch["person"][i].cpu()),
            "garment": render.image_to_uint8(garment),
            "generated": render.image_to_uint8(gen),
            "r2g": render.overlay(r2g[i], gen),
            "g2r": render.overlay(g2r[i], garment),
            "specific_reference": spec,
            "imacs_g": imacs_g[i], "imacs_r": imacs_r[i],
            "colour_error": colour_errors[i] if colour_errors is not None else None,
        })
    return rows
