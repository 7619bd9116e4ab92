"""Pictures of attribution maps and try-on samples, as uint8 (H, W, 3) arrays.

Visualisation only (the stored maps stay raw): a map is min-max normalised, upsampled bicubic
(``align_corners=False``, clamped to [0, 1]) to the image size, colour-mapped (jet) and blended
over the image. Figures show the RAW value range on their colour bars.

Every function returns ``np.uint8`` arrays of shape (h, w, 3), ready for ``save_png``, W&B or
TensorBoard (``add_image(..., dataformats="HWC")``). Figures are drawn on matplotlib's Agg
canvas directly (no pyplot, no global backend switch, no state shared between calls). Tiny
images (32x24) are upscaled with nearest neighbours by an integer factor and laid out at
exactly one figure pixel per displayed pixel, so they stay sharp and legible.

Images may be float tensors/arrays (3, H, W) or (1, H, W) in [-1, 1] (the data convention), or
uint8 (H, W, 3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

# save_png: the project's one PNG writer (a uint8 (H, W, 3|4) array or a tensor in [-1, 1]), re-exported
from common.images import save_png, to_uint8

__all__ = ["normalise", "image_to_uint8", "overlay", "overlay_figure", "map_grid",
           "specific_reference_figure", "sample_row", "sample_grid", "save_png"]

ArrayLike = torch.Tensor | np.ndarray
BOX_COLOUR = (0, 255, 0)  # the query-region rectangle: pure green, absent from jet and the data
_DPI = 100
_PAD, _TITLE_H, _SUPTITLE_H, _BAR_W = 10, 22, 28, 74  # layout, in figure pixels
_LINE_H = 14  # a 10-pt line's height, in pixels
_TITLE_LINE_H = 13  # a 9-pt (panel title) line's height, in pixels
_MARGIN = 2  # background pixels kept around everything drawn (see _fit_canvas)


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    raise ValueError(f"{name}: expected a torch.Tensor or np.ndarray, got {type(x).__name__}")


def _as_map(m: ArrayLike, name: str = "map") -> torch.Tensor:
    t = _as_tensor(m, name)
    if t.dim() != 2 or t.numel() == 0:
        raise ValueError(f"{name}: expected a 2-D (h, w) map, got shape {tuple(t.shape)}")
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or inf")
    return t


def normalise(m: ArrayLike) -> torch.Tensor:
    """Min-max normalise a map to [0, 1] (float32, same shape). A constant map gives zeros."""
    t = _as_tensor(m, "map").to(torch.float32)
    if t.numel() == 0:
        raise ValueError("map: expected a non-empty map, got shape " + str(tuple(t.shape)))
    if not bool(torch.isfinite(t).all()):
        raise ValueError("map: contains NaN or inf")
    lo, hi = t.min(), t.max()
    if hi <= lo:
        return torch.zeros_like(t)
    return (t - lo) / (hi - lo)


def image_to_uint8(image: ArrayLike) -> np.ndarray:
    """Float (3, H, W) / (1, H, W) / (H, W) in [-1, 1], or uint8 (H, W, 3) -> uint8 (H, W, 3)."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 or \
            isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
        a = np.asarray(_as_tensor(image, "image").numpy())
        if a.ndim == 3 and a.shape[2] == 3:
            return np.ascontiguousarray(a)
        raise ValueError(f"image: expected uint8 (H, W, 3), got shape {a.shape}")
    t = _as_tensor(image, "image").to(torch.float32)
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"image: expected float (3, H, W) in [-1, 1] or uint8 (H, W, 3), got "
                         f"{t.dtype} {tuple(t.shape)}")
    return to_uint8(t.expand(3, -1, -1))


def _upscale(a: np.ndarray, scale: int) -> np.ndarray:
    return a if scale == 1 else np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)


def _auto_scale(h: int, w: int, target: int) -> int:
    """Integer nearest-neighbour factor bringing the longer side to about ``target`` px."""
    return max(1, math.ceil(target / max(h, w)))


def _check_scale(scale: int | None, h: int, w: int, target: int) -> int:
    if scale is None:
        return _auto_scale(h, w, target)
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale: expected a positive integer, got {scale}")
    return int(scale)


def _heat(m01: torch.Tensor, size: tuple[int, int], cmap: str) -> np.ndarray:
    """Normalised map (h, w) -> bicubic to ``size``, clamped -> colour-mapped float (H, W, 3)."""
    if tuple(m01.shape) != size:
        m01 = F.interpolate(m01[None, None], size=size, mode="bicubic", align_corners=False)[0, 0]
    m01 = m01.clamp(0, 1)  # bicubic overshoots
    return matplotlib.colormaps[cmap](m01.numpy())[..., :3]


def _blend(img: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    out = (1.0 - alpha) * img.astype(np.float64) + alpha * 255.0 * heat
    return np.rint(out).clip(0, 255).astype(np.uint8)


def _overlay_u8(m: torch.Tensor, img: np.ndarray, alpha: float, cmap: str,
                lo: float | None = None, hi: float | None = None) -> np.ndarray:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a number in [0, 1], got {alpha}")
    if lo is None or hi is None:
        m01 = normalise(m)
    else:
        m01 = (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)
    return _blend(img, _heat(m01, img.shape[:2], cmap), alpha)


def overlay(map: ArrayLike, image: ArrayLike, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped map over an image: uint8 (H, W, 3) at the image's size.

    ``map`` (h, w) is min-max normalised, upsampled bicubic to (H, W), clamped to [0, 1] and
    colour-mapped; the result is ``round((1 - alpha) * image + alpha * 255 * cmap(map))``.
    """
    return _overlay_u8(_as_map(map), image_to_uint8(image), float(alpha), cmap)


@dataclass(frozen=True)
class _Bar:
    vmin: float
    vmax: float
    cmap: str
    label: str = ""


def _wrap(text: str, width_px: float, fontsize: float = 10) -> list[str]:
    """Greedy word wrap at the rendered width of the text (10 pt at _DPI)."""
    from matplotlib.textpath import TextPath

    def fits(line: str) -> bool:
        return TextPath((0, 0), line, size=fontsize * _DPI / 72).get_extents().width <= width_px

    lines: list[str] = []
    for word in text.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _figure(panels: Sequence[np.ndarray], titles: Sequence[str], ncols: int,
            suptitle: str | None = None, bar: _Bar | None = None) -> tuple[Figure, list]:
    """Lay panels out on a grid at one figure pixel per panel pixel; returns (figure, axes).

    Each cell is as large as the largest panel plus a title band; an optional colour bar spans
    the panel rows on the right.
    """
    n = len(panels)
    nrows = math.ceil(n / ncols)
    cw = max(max(p.shape[1] for p in panels), 60)
    # Panel titles wider than their cell are wrapped (they would run into the neighbours' or
    # past the figure's edge); the title band grows with the longest.
    wrapped = ["\n".join(_wrap(t, cw, fontsize=9)) if t else "" for t in titles]
    title_h = _TITLE_H + _TITLE_LINE_H * max([w.count("\n") for w in wrapped] + [0])
    ch = max(p.shape[0] for p in panels) + title_h
    grid_w = ncols * cw + (ncols - 1) * _PAD
    grid_h = nrows * ch + (nrows - 1) * _PAD
    fw = _PAD + grid_w + (_BAR_W if bar else 0) + _PAD
    # A suptitle wider than the figure is wrapped rather than cut at both edges.
    lines = _wrap(suptitle, fw - 2 * _PAD) if suptitle else []
    top = _PAD + (_SUPTITLE_H + _LINE_H * (len(lines) - 1) if lines else 0)
    fh = top + grid_h + _PAD
    fig = Figure(figsize=(fw / _DPI + 1e-6, fh / _DPI + 1e-6), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)

    def rect(x: float, y: float, w: float, h: float) -> list[float]:  # pixel box (top-left) -> fig fraction
        return [x / fw, 1.0 - (y + h) / fh, w / fw, h / fh]

    axes = []
    for k, (panel, title) in enumerate(zip(panels, wrapped)):
        r, c = divmod(k, ncols)
        ph, pw = panel.shape[:2]
        x = _PAD + c * (cw + _PAD) + (cw - pw) / 2
        y = top + r * (ch + _PAD) + title_h
        ax = fig.add_axes(rect(x, y, pw, ph))
        ax.imshow(panel, interpolation="nearest")
        ax.set_axis_off()
        if title:
            ax.set_title(title, fontsize=9, pad=4)
        axes.append(ax)
    if lines:
        fig.text(0.5, 1.0 - (top + _PAD) / 2 / fh, "\n".join(lines), ha="center", va="center", fontsize=10)
    if bar is not None:
        cax = fig.add_axes(rect(_PAD + grid_w + 12, top + title_h, 12, grid_h - title_h))
        sm = ScalarMappable(norm=Normalize(vmin=bar.vmin, vmax=bar.vmax), cmap=bar.cmap)
        cb = fig.colorbar(sm, cax=cax)
        cb.ax.tick_params(labelsize=7)
        if bar.label:
            cb.set_label(bar.label, fontsize=8)
    return fig, axes


def _fit_canvas(fig: Figure) -> None:
    """Grow the figure so that everything drawn (titles, colour-bar ticks, offset text and
    label) lies inside it with _MARGIN pixels to spare. Axes keep their size and their
    position relative to each other in pixels, so panels stay one figure pixel per pixel."""
    canvas = fig.canvas
    canvas.draw()
    box = fig.get_tightbbox(canvas.get_renderer())  # inches
    dpi = fig.dpi
    w_in, h_in = fig.get_size_inches()
    fw, fh = round(w_in * dpi), round(h_in * dpi)
    left = max(0, math.ceil(_MARGIN - box.x0 * dpi))
    right = max(0, math.ceil(box.x1 * dpi - (fw - _MARGIN)))
    bottom = max(0, math.ceil(_MARGIN - box.y0 * dpi))
    top = max(0, math.ceil(box.y1 * dpi - (fh - _MARGIN)))
    if not (left or right or bottom or top):
        return
    nw, nh = fw + left + right, fh + bottom + top
    for ax in fig.axes:
        p = ax.get_position()
        ax.set_position([(p.x0 * fw + left) / nw, (p.y0 * fh + bottom) / nh, p.width * fw / nw, p.height * fh / nh])
    for text in fig.texts:
        x, y = text.get_position()
        text.set_position(((x * fw + left) / nw, (y * fh + bottom) / nh))
    fig.set_size_inches(nw / dpi + 1e-6, nh / dpi + 1e-6)


def _render(fig: Figure) -> np.ndarray:
    _fit_canvas(fig)
    canvas = fig.canvas
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


def overlay_figure(map: ArrayLike, image: ArrayLike, title: str, colorbar: bool = True,
                   scale: int | None = None, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """One overlay with a title and a colour bar of the map's RAW range.

    The overlay is computed at the image's size (as :func:`overlay`) and then upscaled by the
    integer ``scale`` (default: longer side ~256 px) with nearest neighbours.
    """
    m = _as_map(map)
    img = image_to_uint8(image)
    s = _check_scale(scale, *img.shape[:2], target=256)
    panel = _upscale(_overlay_u8(m, img, float(alpha), cmap), s)
    bar = _Bar(float(m.min()), float(m.max()), cmap, "raw value") if colorbar else None
    fig, _ = _figure([panel], [title], ncols=1, bar=bar)
    return _render(fig)


def _image_list(image: ArrayLike | Sequence[ArrayLike], n: int) -> list[np.ndarray]:
    """One image for all panels, or one per panel (a sequence or a (N, C, H, W) batch)."""
    if isinstance(image, (torch.Tensor, np.ndarray)) and image.ndim == 4:
        image = list(image)
    if isinstance(image, (list, tuple)):
        if len(image) != n:
            raise ValueError(f"image: expected one image or {n} images, got {len(image)}")
        return [image_to_uint8(im) for im in image]
    return [image_to_uint8(image)] * n


def map_grid(maps: ArrayLike | Sequence[ArrayLike], image: ArrayLike | Sequence[ArrayLike],
             titles: Sequence[str], ncols: int | None = None, suptitle: str | None = None,
             shared: bool = True, scale: int | None = None, alpha: float = 0.5,
             cmap: str = "jet") -> np.ndarray:
    """A grid of overlays (head-, time- or layer-level maps), one titled panel per map.

    ``shared=True``: all maps are normalised with one min/max, so panels are comparable, and
    one colour bar shows that raw range. ``shared=False``: each panel is min-max normalised on
    its own (no colour bar) and the suptitle says so. ``image``: one image for every panel,
    or N images. ``ncols`` defaults to min(N, 4).
    """
    ms = [_as_map(m, f"maps[{k}]") for k, m in enumerate(maps)]
    n = len(ms)
    if n == 0:
        raise ValueError("maps: expected at least one map, got none")
    if len(titles) != n:
        raise ValueError(f"titles: expected {n} titles (one per map), got {len(titles)}")
    ncols = min(n, 4) if ncols is None else int(ncols)
    if ncols < 1:
        raise ValueError(f"ncols: expected >= 1, got {ncols}")
    imgs = _image_list(image, n)
    s = _check_scale(scale, *imgs[0].shape[:2], target=160)
    if shared:
        lo, hi = min(float(m.min()) for m in ms), max(float(m.max()) for m in ms)
        panels = [_upscale(_overlay_u8(m, im, alpha, cmap, lo, hi), s) for m, im in zip(ms, imgs)]
        bar = _Bar(lo, hi, cmap, "raw value (shared)")
    else:
        panels = [_upscale(_overlay_u8(m, im, alpha, cmap), s) for m, im in zip(ms, imgs)]
        bar = None
        note = "each panel min-max normalised"
        suptitle = f"{suptitle} ({note})" if suptitle else note
    fig, _ = _figure(panels, list(titles), ncols, suptitle, bar)
    return _render(fig)


def _region_box(region: ArrayLike | Sequence[int], grid_hw: tuple[int, int]
                ) -> tuple[tuple[int, int, int, int], np.ndarray | None]:
    """A box (y0, x0, y1, x1) in grid cells, or a bool mask of the grid -> (box, mask or None)."""
    gh, gw = grid_hw
    if isinstance(region, (torch.Tensor, np.ndarray)) and region.ndim == 2:
        mask = _as_tensor(region, "region").numpy().astype(bool)
        if mask.shape != (gh, gw):
            raise ValueError(f"region: expected a ({gh}, {gw}) mask (grid_hw), got {mask.shape}")
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size == 0:
            raise ValueError("region: the mask is empty")
        return (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1), mask
    box = [int(v) for v in (region.tolist() if isinstance(region, (torch.Tensor, np.ndarray)) else region)]
    if len(box) != 4:
        raise ValueError(f"region: expected a box (y0, x0, y1, x1) or an (H, W) mask, got {region}")
    y0, x0, y1, x1 = box
    if not (0 <= y0 < y1 <= gh and 0 <= x0 < x1 <= gw):
        raise ValueError(f"region: expected 0 <= y0 < y1 <= {gh} and 0 <= x0 < x1 <= {gw}, got {box}")
    return (y0, x0, y1, x1), None


def specific_reference_figure(generated: ArrayLike, garment: ArrayLike,
                              region: ArrayLike | Sequence[int], ref_map: ArrayLike,
                              grid_hw: tuple[int, int], scale: int | None = None,
                              alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """The specific-reference picture: which garment parts a region of the output drew on.

    Left: ``generated`` with the query region outlined in pure green (a box (y0, x0, y1, x1)
    covering grid rows y0..y1-1 and columns x0..x1-1 of ``grid_hw``, scaled to image pixels;
    a bool (H_grid, W_grid) mask is outlined along its cells). Right: ``ref_map`` (h_r, w_r)
    over ``garment``, with a colour bar of its raw range.
    """
    if len(grid_hw) != 2 or min(int(v) for v in grid_hw) < 1:
        raise ValueError(f"grid_hw: expected (H_grid, W_grid) positive, got {grid_hw}")
    grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
    box, mask = _region_box(region, grid_hw)
    m = _as_map(ref_map, "ref_map")
    gen, gar = image_to_uint8(generated), image_to_uint8(garment)
    s = _check_scale(scale, *gen.shape[:2], target=256)
    left = _upscale(gen, s)
    right = _upscale(_overlay_u8(m, gar, float(alpha), cmap), s)
    bar = _Bar(float(m.min()), float(m.max()), cmap, "raw value")
    fig, (ax_l, _) = _figure([left, right], ["query region", "influence on garment"], 2, bar=bar)
    sy, sx = left.shape[0] / grid_hw[0], left.shape[1] / grid_hw[1]
    green = tuple(c / 255 for c in BOX_COLOUR)
    if mask is None:
        y0, x0, y1, x1 = box  # imshow pixel edges sit at -0.5
        ax_l.add_patch(Rectangle((x0 * sx - 0.5, y0 * sy - 0.5), (x1 - x0) * sx, (y1 - y0) * sy,
                                 fill=False, edgecolor=green, linewidth=2, antialiased=False))
    else:
        # Outline the mask along cell edges: one segment per edge between a region cell and a
        # non-region cell (padding closes regions that touch the border).
        p = np.pad(mask, 1)
        hr, hc = np.nonzero(p[1:, 1:-1] != p[:-1, 1:-1])   # edge at the top of grid row hr
        vr, vc = np.nonzero(p[1:-1, 1:] != p[1:-1, :-1])   # edge at the left of grid column vc
        segs = [((c * sx - 0.5, r * sy - 0.5), ((c + 1) * sx - 0.5, r * sy - 0.5)) for r, c in zip(hr, hc)]
        segs += [((c * sx - 0.5, r * sy - 0.5), (c * sx - 0.5, (r + 1) * sy - 0.5)) for r, c in zip(vr, vc)]
        ax_l.add_collection(LineCollection(segs, colors=[green], linewidths=2, antialiased=False))
    ax_l.set_xlim(-0.5, left.shape[1] - 0.5)
    ax_l.set_ylim(left.shape[0] - 0.5, -0.5)
    return _render(fig)


def sample_row(images: Sequence[ArrayLike], titles: Sequence[str], scale: int | None = None) -> np.ndarray:
    """Side-by-side titled panels (e.g. agnostic | garment | generated | ground truth)."""
    if len(images) == 0 or len(images) != len(titles):
        raise ValueError(f"images/titles: expected equal non-zero lengths, got {len(images)} and {len(titles)}")
    imgs = [image_to_uint8(im) for im in images]
    s = _check_scale(scale, *imgs[0].shape[:2], target=192)
    fig, _ = _figure([_upscale(im, s) for im in imgs], list(titles), ncols=len(imgs))
    return _render(fig)


def sample_grid(columns: Mapping[str, ArrayLike], scale: int | None = None, gap: int = 6) -> np.ndarray:
    """One row per sample, one titled column per entry of ``columns`` (each (B, C, H, W),
    C in {1, 3}, [-1, 1]; all with the same B, H, W). Drawn as a single mosaic, so a batch of
    16 costs one matplotlib axes, not 64."""
    if not columns:
        raise ValueError("columns: expected at least one column, got none")
    batches = {k: _as_tensor(v, f"columns[{k!r}]") for k, v in columns.items()}
    shapes = {k: tuple(v.shape) for k, v in batches.items()}
    first = next(iter(shapes.values()))
    if any(len(sh) != 4 or sh[0] != first[0] or sh[2:] != first[2:] or sh[1] not in (1, 3)
           for sh in shapes.values()) or first[0] == 0:
        raise ValueError(f"columns: expected (B, 1 or 3, H, W) tensors with equal B, H, W, got {shapes}")
    b, (h, w) = first[0], first[2:]
    s = _check_scale(scale, h, w, target=128)
    th, tw = h * s, w * s
    ncol = len(batches)
    mosaic = np.full((b * th + (b - 1) * gap, ncol * tw + (ncol - 1) * gap, 3), 255, np.uint8)
    for c, t in enumerate(batches.values()):
        for r in range(b):
            y, x = r * (th + gap), c * (tw + gap)
            mosaic[y:y + th, x:x + tw] = _upscale(image_to_uint8(t[r]), s)
    fig, (ax,) = _figure([mosaic], [""], ncols=1)
    for c, title in enumerate(batches):
        ax.text(c * (tw + gap) + tw / 2 - 0.5, -4, title, ha="center", va="bottom", fontsize=9, clip_on=False)
    return _render(fig)
