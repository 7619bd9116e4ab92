"""What ``python -m i2am diagnose`` writes (the measurement is :mod:`apps.diagnose`):

=========================  ================================================================
``diagnosis.json``         the ranking (most blamed first, every number behind each entry),
                           the margin, the recommendation, settings, per-sample errors
``recommended.yaml``       the stability settings to train with (``train.py --config FILE``)
``scatter.png``            colour error against a statistic, one panel per layer
``blame_heatmap.png``      blame per layer × time group (all steps in the first column)
``report.html``            all of the above on one self-contained page
=========================  ================================================================

Under ``tracker.kind=wandb`` the ranking is also logged as a W&B table (offline without
credentials); other trackers get a message saying so.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from common import tables
from common.images import save_png
from i2am.names import short_name

if TYPE_CHECKING:  # pragma: no cover
    from .diagnose import Diagnosis

TABLE_COLUMNS = ["layer", "short", "grid", "time_group", "blame", "blame_se", "colour_error",
                 "colour_error_repaired", "dispersion", "colour_var", "imacs", "r_dispersion", "r_colour_var",
                 "r_imacs"]


def snippet(diag: Diagnosis) -> str:
    """The recommendation as YAML that ``configs.load_config`` merges (a ``stability`` group)."""
    from omegaconf import OmegaConf

    rec = diag.recommendation
    body = OmegaConf.to_yaml(OmegaConf.create({"stability": dict(rec["stability"])}))
    header = (f"# python -m i2am diagnose {diag.settings['run']} ({diag.settings['samples']} samples)\n"
              f"# basis: {rec['basis']}\n"
              "# use: accelerate launch train.py --config <this file> (after your other --config files)\n")
    return header + body


def _render(fig: Any) -> np.ndarray:
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


def scatter_figure(diag: Diagnosis, per_layer: Mapping[str, Mapping[str, np.ndarray]]) -> np.ndarray:
    """Colour error (y) against the colour-anchored variance (or, without ground truth, the
    dispersion) over all steps (x), one panel per layer, Pearson r in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stat = "colour_var" if all("colour_var" in per_layer[n] for n in diag.layers) else "dispersion"
    y = np.asarray(diag.per_sample["colour_error"])
    n = len(diag.layers)
    cols = min(4, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.2 * cols, 2.8 * rows), dpi=90, facecolor="white")
    FigureCanvasAgg(fig)
    layer_entry = {e["layer"]: e for e in diag.ranking if e["time_group"] is None}
    for k, name in enumerate(diag.layers):
        ax = fig.add_subplot(rows, cols, k + 1)
        x = per_layer[name][stat][-1]
        ax.scatter(x, y, s=12, color="tab:blue")
        r = layer_entry[name][f"corr_{stat}"]["pearson"]
        ax.set_title(f"{short_name(name)} ({layer_entry[name]['grid']}): r = {tables.fmt(r, 2)}", fontsize=9)
        ax.set_xlabel(stat.replace("_", " "), fontsize=8)
        ax.set_ylabel("colour error" if diag.ground_truth else "proxy colour error", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _render(fig)


def blame_matrix(diag: Diagnosis) -> np.ndarray:
    """(layers, 1 + groups): blame over all steps, then per time group (NaN: not intervened)."""
    m = np.full((len(diag.layers), 1 + len(diag.time_groups)), np.nan)
    for e in diag.ranking:
        if e.get("blame") is None:
            continue
        m[diag.layers.index(e["layer"]), 0 if e["time_group"] is None else 1 + e["time_group"]] = e["blame"]
    return m


def heatmap_figure(diag: Diagnosis) -> np.ndarray:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = blame_matrix(diag)
    fig = Figure(figsize=(2.2 + 0.9 * m.shape[1], 1.2 + 0.45 * m.shape[0]), dpi=90, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = m[np.isfinite(m)]
    span = float(np.abs(finite).max()) if finite.size else 1.0
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#dddddd")  # grey: not intervened
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=-span or -1, vmax=span or 1, aspect="auto")
    for (i, j), v in np.ndenumerate(m):
        dark = not np.isnan(v) and abs(v) > 0.6 * span  # white figures on the saturated cells
        ax.text(j, i, "–" if np.isnan(v) else f"{v:.4f}", ha="center", va="center", fontsize=7,
                color="white" if dark else "black")
    grids = {e["layer"]: e["grid"] for e in diag.ranking}
    ax.set_yticks(range(len(diag.layers)), [f"{short_name(n)} ({grids[n]})" for n in diag.layers], fontsize=8)
    ax.set_xticks(range(m.shape[1]), ["all"] + [f"g{g['index']}\nt {g['timesteps'][0]}–{g['timesteps'][1]}"
                                                for g in diag.time_groups], fontsize=7)
    ax.set_title("blame = fall of the colour error when the layer is repaired", fontsize=9)
    fig.colorbar(im, ax=ax).ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _render(fig)


def table_rows(diag: Diagnosis) -> list[list[Any]]:
    rows = []
    for e in diag.ranking:
        rows.append([e["layer"], e["short"], e["grid"], e["time_group"], e.get("blame"), e.get("blame_se"),
                     e["colour_error"], e.get("colour_error_repaired"), e["dispersion"], e["colour_var"], e["imacs"],
                     *(e[f"corr_{s}"]["pearson"] if e.get(f"corr_{s}") else None
                       for s in ("dispersion", "colour_var", "imacs"))])
    return rows


def log_wandb(diag: Diagnosis, cfg: Any, out: Path) -> str:
    """The ranking as a W&B table under tracker.kind=wandb; otherwise a no-op. Returns what happened."""
    if cfg.tracker.kind != "wandb":
        return (f"W&B: not logged (the run's tracker.kind is {cfg.tracker.kind!r}; pass --set tracker.kind=wandb "
                "to log the ranking as a W&B table)")
    import wandb

    from train.tracking import wandb_has_credentials

    online = cfg.tracker.mode == "online" or (cfg.tracker.mode == "auto" and wandb_has_credentials())
    run = wandb.init(project=cfg.tracker.project, dir=str(out), mode="online" if online else "offline",
                     job_type="diagnose", name=f"diagnose-{Path(diag.settings['run']).parent.parent.name}",
                     config={"diagnose": diag.settings}, settings=wandb.Settings(x_disable_stats=True))
    try:
        run.log({"diagnosis/ranking": wandb.Table(columns=TABLE_COLUMNS, data=table_rows(diag)),
                 "diagnosis/margin": diag.margin})
        where = run.url or str(Path(run.dir).parent)
    finally:
        run.finish()
    return f"W&B: ranking table logged ({'online' if online else 'offline'}: {where})"


def write_outputs(diag: Diagnosis, out: Path, per_layer: Mapping[str, Mapping[str, np.ndarray]], cfg: Any) -> None:
    from .html_report import write_diagnosis_report

    out.mkdir(parents=True, exist_ok=True)
    save_png(scatter_figure(diag, per_layer), out / "scatter.png")
    figures = ["scatter.png"]
    if diag.ground_truth:
        save_png(heatmap_figure(diag), out / "blame_heatmap.png")
        figures.append("blame_heatmap.png")
    text = snippet(diag)
    (out / "recommended.yaml").write_text(text)
    diag.files = {"json": "diagnosis.json", "recommendation": "recommended.yaml", "figures": figures,
                  "html": "report.html"}
    diag.notes.append(log_wandb(diag, cfg, out))
    (out / "diagnosis.json").write_text(json.dumps(diag.as_json(), indent=2))
    write_diagnosis_report(out / "report.html", diag.as_json(), out)
    head = ["layer", "grid", "time group", "blame" if diag.ground_truth else "r(disp, err)", "± se",
            "r(colour var)", "r(dispersion)"]
    rows = [[short_name(e["layer"]), e["grid"], "all" if e["time_group"] is None else str(e["time_group"]),
             e["blame"] if diag.ground_truth else e.get("correlation_score"), e.get("blame_se"),
             e["corr_colour_var"]["pearson"] if e["corr_colour_var"] else None,
             e["corr_dispersion"]["pearson"]] for e in diag.ranking[:10]]
    print(tables.markdown_table(head, rows, align=["", "", "right", "right", "right", "right", "right"]))
    for note in diag.notes:
        print(note)
    print(f"\nmargin (top − second layer): {tables.fmt(diag.margin)}")
    print("\nrecommended config (written to " + str(out / "recommended.yaml") + "):\n")
    print(text)
    written = ["diagnosis.json", "recommended.yaml", *figures, "report.html"]
    print(f"written: {', '.join(str(out / f) for f in written)}")
