"""``python -m i2am analyze``: one try-on, all I²AM map levels, one HTML page.

From a run/checkpoint or a diffusers pipeline directory (:mod:`i2am.sources`) and
real photos (:mod:`i2am.photos`), write to ``out``:

=============================  ======================================================
``result.png``                 the try-on at the model's resolution
``result_original_size.png``   scaled back to the person photo (its pixels kept outside the mask)
``inputs.png``                 person | agnostic | garment | result, as the model saw them
``maps.safetensors``           the raw maps (:meth:`AttributionMaps.save`; reload with ``load``)
``r2g.png`` / ``g2r.png``      unified level, both directions, with IMACS_g / IMACS_r
``head_level.png``             R2G per attention head (mean over layers)
``time_level.png``             R2G per group of denoising steps (noisiest first)
``layer_level.png``            R2G per cross-attention layer (mean over heads)
``specific_reference_*.png``   per chosen patch: which reference parts it drew on
``report.html``                all of the above on one self-contained page
``summary.json``               IMACS, settings, source, patches, resize choices, file list
=============================  ======================================================
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.images import save_png
from common.tables import fmt
from i2am import render
from i2am.maps import AttributionMaps
from i2am.metrics import imacs_per_sample, mask_to_grid, top_cells
from i2am.names import short_name

from .photos import PhotoError, Size, TryOnInputs, load_inputs, open_photo, result_to_original, to_tensor
from .sources import DEFAULT_PROMPT, AnalyzeError, RunOutput, open_source

Cell = tuple[int, int]


# ------------------------------------------------------------------------------ arguments
def parse_cell(text: str) -> Cell:
    try:
        y, x = (int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise AnalyzeError(f"--patch expects 'y,x' (two integers, a cell of the generated grid), got {text!r}")
    return y, x


def parse_size(text: str) -> Size:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise AnalyzeError(f"--resolution expects HxW, e.g. 512x384, got {text!r}")
    return h, w


# -------------------------------------------------------------------------------- figures
def _draw_box(image: np.ndarray, box: tuple[int, int, int, int], grid: Size, scale: int) -> np.ndarray:
    """Upscale and outline grid cells (y0, x0, y1, x1) in pure green (render.BOX_COLOUR)."""
    a = np.repeat(np.repeat(image, scale, 0), scale, 1)
    sy, sx = a.shape[0] / grid[0], a.shape[1] / grid[1]
    y0, x0 = int(box[0] * sy), int(box[1] * sx)
    y1, x1 = max(y0 + 2, int(box[2] * sy)), max(x0 + 2, int(box[3] * sx))
    for ys, xs in ((slice(y0, y0 + 2), slice(x0, x1)), (slice(y1 - 2, y1), slice(x0, x1)),
                   (slice(y0, y1), slice(x0, x0 + 2)), (slice(y0, y1), slice(x1 - 2, x1))):
        a[ys, xs] = render.BOX_COLOUR
    return a


def token_figure(values: torch.Tensor, labels: Sequence[str], title: str,
                 image: np.ndarray | None = None) -> np.ndarray:
    """A text reference's map (one value per token) as labelled bars, optionally next to
    an image (the query region of a specific-reference map). Trailing padding tokens
    after the first end-of-text are left out: they carry no word."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(labels)
    end = next((i for i, t in enumerate(labels) if t.startswith("<|endoftext")), len(labels) - 1)
    n = min(len(labels), end + 1)
    vals = values.float().cpu().numpy()[:n]
    hidden = len(labels) - n
    fig = Figure(figsize=(7.5 if image is not None else 5.5, 0.8 + 0.22 * max(n, 8)), dpi=100, facecolor="white")
    FigureCanvasAgg(fig)
    if image is not None:
        ax_img = fig.add_axes((0.02, 0.08, 0.3, 0.8))
        ax_img.imshow(image, interpolation="nearest")
        ax_img.set_axis_off()
        ax_img.set_title("query region", fontsize=9)
        ax = fig.add_axes((0.5, 0.08, 0.46, 0.8))
    else:
        ax = fig.add_axes((0.3, 0.08, 0.65, 0.8))
    ax.barh(np.arange(n), vals, color="tab:orange")
    ax.set_yticks(np.arange(n), labels[:n], fontsize=8)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title + (f"\n({hidden} padding tokens not shown)" if hidden else ""), fontsize=9)
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


def head_level_maps(maps: AttributionMaps) -> tuple[torch.Tensor, str]:
    """R2G per head, (heads, H, W) of sample 0. Head n of one layer has nothing to do
    with head n of a layer with another head count, so only the layers sharing the most
    common count are averaged (and the title says so)."""
    counts = Counter(lm.heads for lm in maps.layers.values())
    heads = counts.most_common(1)[0][0]
    if len(counts) == 1:
        return maps.head_level("r2g")[0], "all layers"
    keep = {n: lm for n, lm in maps.layers.items() if lm.heads == heads}
    sub = AttributionMaps(keep, maps.bin_bounds, maps.reference_grid, maps.latent_grid, maps.extra_tokens,
                          maps.timesteps)
    return sub.head_level("r2g")[0], f"the {len(keep)} layers with {heads} heads"


def choose_patches(r2g: torch.Tensor, mask: torch.Tensor, given: Sequence[Cell], k: int
                   ) -> tuple[list[Cell], str]:
    """The given cells (checked against the grid), or the k highest-R2G cells inside
    the mask: where the garment's influence is strongest."""
    gh, gw = r2g.shape
    if given:
        for y, x in given:
            if not (0 <= y < gh and 0 <= x < gw):
                raise AnalyzeError(f"--patch {y},{x} is outside the generated grid {gh}x{gw} "
                                   f"(rows 0..{gh - 1}, columns 0..{gw - 1})")
        return list(given), "given with --patch"
    inside = mask_to_grid(mask[None].cpu(), (gh, gw))[0]
    if not inside.any():  # a mask thinner than one cell: fall back to the whole grid
        return top_cells(r2g, torch.ones_like(inside), k), f"the {k} highest-R2G cells (the mask covers no whole cell)"
    return top_cells(r2g, inside, k), f"the {k} highest-R2G cells inside the mask"


def garment_mask_for(inputs: TryOnInputs, path: str | Path | None) -> tuple[torch.Tensor, str]:
    if path is not None:
        m = open_photo(path, as_mask=True)
        if m.size != inputs.garment_box.original:
            raise PhotoError(f"the garment mask {m.describe()} must have the garment photo's size "
                             f"{inputs.garment_box.original[0]}x{inputs.garment_box.original[1]}")
        return to_tensor(inputs.garment_box.apply(m.image, 0)), f"from {m.describe()}"
    from tryon_data.images import garment_mask_from_white

    return garment_mask_from_white(inputs.garment), "derived: non-white pixels of the garment (pass --garment-mask)"


def write_figures(out: Path, run: RunOutput, inputs: TryOnInputs, garment_mask: torch.Tensor,
                  patches: Sequence[Cell], num_patches: int, time_groups: int) -> dict[str, Any]:
    """Every figure as a PNG in ``out``; returns IMACS, patches and figure titles."""
    maps, gen, garment = run.maps, run.generated, inputs.garment
    r2g, g2r = maps.unified("r2g")[0].float().cpu(), maps.unified("g2r")[0].float().cpu()
    imacs_g = imacs_per_sample(r2g[None], inputs.mask[None])[0]
    text = run.token_labels is not None
    imacs_r = None if text else imacs_per_sample(g2r[None], garment_mask[None])[0]
    titles: dict[str, str] = {}

    def save(name: str, image: np.ndarray, title: str) -> None:
        render.save_png(image, out / name)
        titles[name] = title

    save("inputs.png", render.sample_row([inputs.person, inputs.agnostic, garment, gen],
                                         ["person", "agnostic (mask grey)", "garment", "result"]),
         "what the model saw, and the result")
    save("r2g.png", render.overlay_figure(r2g, gen, f"R2G unified, IMACS_g {fmt(imacs_g, 3)}"), "R2G, unified")
    if text:
        save("g2r.png", token_figure(g2r.flatten(), run.token_labels, "G2R unified (text tokens)"), "G2R, unified")
    else:
        save("g2r.png", render.overlay_figure(g2r, garment, f"G2R unified, IMACS_r {fmt(imacs_r, 3)}"),
             "G2R, unified")
    heads, which = head_level_maps(maps)
    save("head_level.png", render.map_grid(heads.float().cpu(), gen, [f"head {h}" for h in range(heads.shape[0])],
                                           suptitle=f"R2G per head ({which})"), f"R2G per head ({which})")
    groups = min(time_groups, maps.num_steps)
    bounds = np.array_split(np.arange(maps.num_steps), groups)
    times = maps.time_level("r2g", groups=groups)[0].float().cpu()
    save("time_level.png", render.map_grid(times, gen, [f"steps {b[0] + 1}-{b[-1] + 1}" for b in bounds],
                                           suptitle="R2G over time (noisiest first)"), "R2G per group of steps")
    layers = maps.layer_level("r2g")
    save("layer_level.png", render.map_grid(torch.stack([m[0].float().cpu() for m in layers.values()]), gen,
                                            [short_name(k) for k in layers], suptitle="R2G per layer",
                                            shared=False), "R2G per layer")

    grid = maps.generated_grid
    cells, how = choose_patches(r2g, inputs.mask, patches, num_patches)
    H, W = gen.shape[-2:]
    inside = mask_to_grid(inputs.mask[None].cpu(), grid)[0]
    patch_info = []
    for y, x in cells:
        box = (y, x, y + 1, x + 1)
        ref = maps.specific_reference(box)[0].float().cpu()
        name = f"specific_reference_{y}_{x}.png"
        if text:
            img = _draw_box(render.image_to_uint8(gen), box, grid, max(1, 192 // max(H, W)))
            fig = token_figure(ref.flatten(), run.token_labels, f"cell ({y}, {x}): G2R of its queries", img)
        else:
            fig = render.specific_reference_figure(gen, garment, box, ref, grid)
        save(name, fig, f"cell ({y}, {x})")
        patch_info.append({"cell": [y, x], "file": name, "r2g": float(r2g[y, x]), "inside_mask": bool(inside[y, x]),
                           "pixels_yxyx": [y * H // grid[0], x * W // grid[1], (y + 1) * H // grid[0],
                                           (x + 1) * W // grid[1]]})
    return {"imacs_g": imacs_g, "imacs_r": imacs_r, "patches": patch_info, "patch_choice": how, "titles": titles,
            "time_groups": groups}


# ------------------------------------------------------------------------ early checks
def check_photos(*, garment: str | Path, mask: str | Path, person: str | Path | None = None,
                 agnostic: str | Path | None = None, garment_mask: str | Path | None = None) -> None:
    """Open every photo and mask and compare each mask's size with its photo's: the problems a
    user fixes in seconds, found before a model loads (which can take minutes)."""
    def opened(flag: str, path: str | Path, as_mask: bool = False):
        try:
            return open_photo(path, as_mask=as_mask)
        except PhotoError as err:
            raise PhotoError(f"{flag}: {err}") from None

    which = "person" if person is not None else "agnostic"
    base = opened(f"--{which}", person if person is not None else agnostic)  # type: ignore[arg-type]
    m = opened("--mask", mask, as_mask=True)
    if m.size != base.size:
        raise PhotoError(f"--mask: the mask {m.describe()} must have the same size as the {which} photo "
                         f"{base.describe()}")
    if m.image.getextrema()[1] < 128:
        raise PhotoError(f"--mask: the mask {m.describe()} has no white pixel (white = repaint): nothing would be "
                         "repainted")
    g = opened("--garment", garment)
    if garment_mask is not None:
        gm = opened("--garment-mask", garment_mask, as_mask=True)
        if gm.size != g.size:
            raise PhotoError(f"--garment-mask: the garment mask {gm.describe()} must have the garment photo's size "
                             f"{g.size[0]}x{g.size[1]} ({g.describe()})")


def ignored_flags(source: str | Path, *, prompt: str | None, resolution: Size | None,
                  overrides: Sequence[str]) -> tuple[bool, list[str]]:
    """(is the source a diffusers pipeline directory, the given flags it ignores, each with why).
    Reads only model_index.json: nothing is loaded."""
    p = Path(source).expanduser()
    notes = []
    if (p / "model_index.json").is_file():
        try:
            kind = json.loads((p / "model_index.json").read_text()).get("_class_name", "?")
        except (OSError, ValueError, AttributeError):
            kind = "?"
        if overrides:
            notes.append("--set is ignored: it overrides keys of a checkpoint's saved config; a diffusers pipeline "
                         "has none")
        if prompt is not None and kind == "PaintByExamplePipeline":
            notes.append("--prompt is ignored: Paint-by-Example is conditioned on the garment image, not on text")
        return True, notes
    if resolution is not None:
        notes.append("--resolution is ignored: a checkpoint runs at its training resolution (data.resolution in "
                     "its saved config)")
    if prompt is not None:
        notes.append("--prompt is ignored: this project's checkpoints are conditioned on the garment image, "
                     "not on text")
    return False, notes


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------- main
def analyze(source: str | Path, *, garment: str | Path, mask: str | Path | None, out: str | Path,
            person: str | Path | None = None, agnostic: str | Path | None = None,
            garment_mask: str | Path | None = None, steps: int | None = None, seed: int = 0,
            guidance_scale: float | None = None, patches: Sequence[Cell] = (), num_patches: int = 3,
            time_groups: int = 5, prompt: str | None = None, resolution: Size | None = None,
            device: str | None = None, overrides: Sequence[str] = (), progress: bool = True,
            log: Callable[[str], None] = print, warn: Callable[[str], None] = _warn) -> dict[str, Any]:
    """Run the analysis and write every output (module docstring); returns summary.json's content.
    ``prompt=None``: the default prompt (text pipelines only). Flags the source ignores are
    reported through ``warn`` (and listed in the summary)."""
    from .html_report import write_html_report

    # Argument and input errors first: loading a model can take minutes.
    if person is None and agnostic is None:
        raise AnalyzeError("pass the person photo (--person) or an agnostic image (--agnostic)")
    if person is not None and agnostic is not None:
        raise AnalyzeError("pass either --person or --agnostic, not both")
    if mask is None:
        raise AnalyzeError(f"--{'person' if person is not None else 'agnostic'} needs --mask PATH (white = the region "
                           "to repaint, same size as the photo): this tool has no human parser to derive one")
    for flag, path in (("--person", person), ("--agnostic", agnostic), ("--mask", mask), ("--garment", garment),
                       ("--garment-mask", garment_mask)):
        if path is not None and not Path(path).is_file():
            raise AnalyzeError(f"{flag}: no such file: {path}")
    if steps is not None and steps < 1 or num_patches < 0 or time_groups < 1:
        raise AnalyzeError("--steps and --time-groups must be >= 1, --num-patches >= 0")
    check_photos(garment=garment, mask=mask, person=person, agnostic=agnostic, garment_mask=garment_mask)
    is_pipeline, warnings = ignored_flags(source, prompt=prompt, resolution=resolution, overrides=overrides)
    for message in warnings:
        warn(message)
    prompt = DEFAULT_PROMPT if prompt is None else prompt

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    src = open_source(source, overrides=() if is_pipeline else overrides, device=device,
                      resolution=resolution if is_pipeline else None)
    info = src.info()
    log(f"source: {info['kind']} {info['path']}" + (f" (step {info['step']})" if info.get("step") else ""))
    H, W = src.resolution
    log(f"model resolution: {H}x{W} (HxW)")
    inputs = load_inputs(src.resolution, garment, mask, person=person, agnostic=agnostic)
    for key, choice in inputs.choices.items():
        log(f"{key}: {choice}")
    gmask, gmask_how = garment_mask_for(inputs, garment_mask)
    steps = steps or src.default_steps
    guidance = src.default_guidance if guidance_scale is None else float(guidance_scale)
    log(f"sampling: {steps} steps, seed {seed}, guidance scale {guidance:g} on {device}")

    run = src.run(inputs, steps=steps, seed=seed, guidance_scale=guidance, time_groups=time_groups,
                  progress=progress, prompt=prompt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_png(run.generated, out / "result.png")
    save_png(result_to_original(run.generated, inputs), out / "result_original_size.png")
    run.maps.save(out / "maps.safetensors")
    figs = write_figures(out, run, inputs, gmask, patches, num_patches, time_groups)
    for note in run.notes:
        log(f"note: {note}")
    log(f"IMACS_g {fmt(figs['imacs_g'], 3)}   IMACS_r {fmt(figs['imacs_r'], 3)}")
    log(f"specific-reference patches ({figs['patch_choice']}): "
        + ", ".join(f"({p['cell'][0]},{p['cell'][1]})" for p in figs["patches"]))

    maps = run.maps
    summary: dict[str, Any] = {
        "source": info, "steps": steps, "seed": seed, "guidance_scale": guidance, "device": device,
        "prompt": prompt if run.token_labels is not None else None,
        "resolution": [H, W], "imacs_g": figs["imacs_g"], "imacs_r": figs["imacs_r"],
        "garment_mask": gmask_how, "patches": figs["patches"], "patch_choice": figs["patch_choice"],
        "resize": {**inputs.choices, "person_letterbox": inputs.person_box.to_dict(),
                   "garment_letterbox": inputs.garment_box.to_dict()},
        "maps": {"generated_grid": list(maps.generated_grid), "reference_grid": list(maps.reference_grid),
                 "layers": maps.layer_names, "recorded_steps": maps.num_steps, "time_groups": figs["time_groups"]},
        "notes": run.notes, "warnings": warnings, "figures": figs["titles"],
    }
    write_html_report(out / "report.html", summary, out)
    summary["files"] = sorted({p.name for p in out.iterdir() if p.is_file()} | {"summary.json"})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"report: {out / 'report.html'}")
    return summary


__all__ = ["analyze", "AnalyzeError", "parse_cell", "parse_size", "token_figure", "choose_patches"]
