"""Figures keep everything they draw inside the canvas: long titles, colour-bar ticks and
labels are neither cut at the edges nor run into each other, and panels stay pixel for pixel."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from i2am import render as R

LONG = "a very long title that is much wider than the panel it belongs to, IMACS_g 0.123"


def _img() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 32, 24, generator=g) * 2 - 1


def _maps(n: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 4, 3, generator=g) * scale + scale


FIGURES = {
    "overlay, long title, tiny values": lambda: R.overlay_figure(_maps(1, 1e-7)[0], _img(), LONG),
    "overlay, long title, large values": lambda: R.overlay_figure(_maps(1, 123456.0)[0], _img(), LONG),
    "grid, shared bar, long titles": lambda: R.map_grid(_maps(3, 2e6), _img(), [LONG, "head 1", LONG + " again"],
                                                        suptitle=LONG),
    "grid, own scales, one long word": lambda: R.map_grid(_maps(2, 1.0), _img(), [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2", "b"], shared=False),
    "specific reference, large values": lambda: R.specific_reference_figure(_img(), _img(), (1, 1, 3, 2),
                                                                           _maps(1, 5e5)[0], (4, 3)),
    "sample row, long titles": lambda: R.sample_row([_img(), _img()], [LONG, LONG]),
    "sample grid, long column names": lambda: R.sample_grid({LONG: _img()[None], "b": _img()[None]}),
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_nothing_is_cut_at_the_edges(name):
    fig = FIGURES[name]()
    white = np.array([255, 255, 255])
    for side, pixels in (("top", fig[0]), ("bottom", fig[-1]), ("left", fig[:, 0]), ("right", fig[:, -1])):
        drawn = np.flatnonzero(np.abs(pixels.astype(int) - white).sum(-1) > 0)
        assert drawn.size == 0, f"{name}: {drawn.size} drawn pixels on the {side} edge (at {drawn[:5].tolist()})"
    # not vacuous, nor fixed by an oversized canvas: content fills the figure up to a thin frame
    ink = np.abs(fig.astype(int) - white).sum(-1) > 60
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    assert ink.mean() > 0.25
    assert max(rows[0], fig.shape[0] - 1 - rows[-1], cols[0], fig.shape[1] - 1 - cols[-1]) <= 25


def test_long_panel_titles_wrap_above_their_panel_and_panels_stay_pixel_exact():
    img, m = _img(), _maps(1, 1.0)[0]
    short = R.overlay_figure(m, img, "short", colorbar=False)
    long = R.overlay_figure(m, img, LONG, colorbar=False)
    panel = np.repeat(np.repeat(R.overlay(m, img), 8, 0), 8, 1)  # 32x24 -> scale 8
    for fig in (short, long):
        hits = [(y, x) for y in range(fig.shape[0] - panel.shape[0] + 1)
                for x in range(fig.shape[1] - panel.shape[1] + 1)
                if (fig[y, x] == panel[0, 0]).all() and np.array_equal(fig[y:y + panel.shape[0], x:x + panel.shape[1]],
                                                                        panel)]
        assert len(hits) == 1
    # the long title took more lines, not more width: same width, taller
    assert long.shape[1] == short.shape[1] and long.shape[0] > short.shape[0]
