"""A single self-contained HTML page for one analysis: every figure embedded as a
base64 PNG data URI, inline CSS, no script or font or image from the network, so
the page can be mailed, archived or opened offline.

A tiny inline script counts, once the page has loaded, how many images decoded
(``naturalWidth > 0``) and writes ``"loaded/total"`` into
``document.body.dataset.imagesLoaded``: a headless browser's ``--dump-dom`` then
tells whether the page really shows its pictures.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from common.tables import fmt

# What each level shows, for the reader of the page (the README's "Reading the maps"
# guide says the same at more length).
EXPLANATIONS: dict[str, str] = {
    "result": "The person and the garment as the model saw them (letterboxed to its resolution), the "
              "agnostic image (the person greyed inside the inpainting mask) and the generated try-on. "
              "Outside the mask the person is pasted back, as try-on evaluations do.",
    "unified": "<b>R2G</b> (reference&rarr;generated) lies on the generated image: each garment token "
               "distributes one unit of attention over the generated positions (softmax over queries), "
               "averaged over garment tokens, heads, layers and summed over all steps. Bright = the "
               "garment shaped this place. A good try-on lights up the mask and nothing else: "
               "<b>IMACS_g</b> = mean inside the mask &minus; 3 &times; mean outside (map min-max "
               "normalised; 1 is perfect, negative means attention leaks outside). <b>G2R</b> "
               "(generated&rarr;reference) lies on the garment: the ordinary attention of the generated "
               "positions, averaged over them: which garment parts were used at all. <b>IMACS_r</b> "
               "compares it with the garment mask.",
    "head": "R2G per attention head, averaged over layers, on one shared colour scale. Heads specialise: "
            "some follow the garment's shape, some stay diffuse. A head that lights up the background "
            "or the face is a candidate for where wrong colours come from.",
    "time": "R2G per group of consecutive denoising steps, group 1 the noisiest, on one shared colour "
            "scale. Early steps lay out where the garment goes (coarse, spread), late steps refine "
            "texture. Colour that appears only late, or attention that never concentrates, points at "
            "the stage where transfer fails.",
    "layer": "R2G per cross-attention layer, averaged over heads, each panel normalised on its own. "
             "Low-resolution (inner) layers place the garment; high-resolution (outer) layers copy "
             "detail. A layer whose map is blurry or off-mask is where a loss on attention would act.",
    "specific": "For one cell of the generated grid (green box): the G2R attention of the queries inside "
                "it, averaged over heads and layers, summed over steps, shown on the garment. It "
                "answers &ldquo;which part of the garment did this spot copy?&rdquo;. A sleeve cell "
                "should look at the sleeve; attention spread over the whole garment means colours get "
                "averaged. Cells are given with <code>--patch y,x</code> or are the highest-R2G cells "
                "inside the mask.",
}

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1200px;padding:16px 24px;
color:#1d232a;background:#fafafa}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.15em;margin:1.4em 0 .3em;border-bottom:2px solid #d9dee3}
p.explain{max-width:900px;line-height:1.45;color:#38424c}
.figs{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0;background:#fff;border:1px solid #d9dee3;border-radius:6px;padding:6px}
figure img{display:block;max-width:100%;image-rendering:pixelated}
figcaption{font-size:.85em;color:#56606b;margin-top:4px}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #d9dee3;padding:3px 8px;text-align:left}
th{background:#eef1f4}.metric{font-size:1.6em;font-weight:600}.cards{display:flex;gap:16px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #d9dee3;border-radius:6px;padding:8px 14px;min-width:150px}
.note{color:#8a5a00}code{background:#eef1f4;padding:0 3px;border-radius:3px}
"""

# Counts decoded images once everything has loaded; see the module docstring.
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.dataset.imagesLoaded = ok + '/' + imgs.length;
});
"""


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure(folder: Path, name: str, caption: str) -> str:
    return (f'<figure><img src="{data_uri(folder / name)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)} &middot; <code>{html.escape(name)}</code></figcaption></figure>")


def _section(title: str, key: str, figures: str) -> str:
    return f'<h2 id="{key}">{html.escape(title)}</h2><p class="explain">{EXPLANATIONS[key]}</p>' \
           f'<div class="figs">{figures}</div>'


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def render_html(summary: dict[str, Any], folder: Path) -> str:
    """The page for an analysis ``summary`` (see :func:`i2am.analyze.analyze`) whose
    figures are PNG files in ``folder``."""
    titles = summary["figures"]
    src = summary["source"]
    cards = "".join(
        f'<div class="card"><div>{name}</div><div class="metric">{fmt(summary[key])}</div>'
        f"<div>{html.escape(sub)}</div></div>"
        for name, key, sub in (("IMACS_g", "imacs_g", "R2G vs. inpainting mask"),
                               ("IMACS_r", "imacs_r", "G2R vs. garment mask")))
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in summary.get("notes", []))
    settings = [("source", f"{src['kind']}: {src['path']}"), ("steps", summary["steps"]), ("seed", summary["seed"]),
                ("guidance scale", summary["guidance_scale"]), ("resolution (HxW)", "x".join(map(str, summary["resolution"])))]
    if summary.get("prompt"):
        settings.append(("prompt", summary["prompt"]))
    settings += [(k, v) for k, v in summary["resize"].items() if isinstance(v, str)]
    settings += [("garment mask", summary["garment_mask"]),
                 ("generated grid", "x".join(map(str, summary["maps"]["generated_grid"]))),
                 ("reference grid", "x".join(map(str, summary["maps"]["reference_grid"]))),
                 ("layers", len(summary["maps"]["layers"])), ("recorded UNet calls", summary["maps"]["recorded_steps"])]
    patches = "".join(_figure(folder, p["file"], f"cell ({p['cell'][0]}, {p['cell'][1]}), R2G {p['r2g']:.3g}"
                              + ("" if p["inside_mask"] else " (outside the mask)"))
                      for p in summary["patches"])
    body = [
        "<h1>I&sup2;AM attribution report</h1>",
        f'<div class="cards">{cards}</div>', notes,
        _section("Result", "result", _figure(folder, "inputs.png", titles["inputs.png"])),
        _section("Unified level: R2G and G2R", "unified",
                 _figure(folder, "r2g.png", titles["r2g.png"]) + _figure(folder, "g2r.png", titles["g2r.png"])),
        _section("Head level", "head", _figure(folder, "head_level.png", titles["head_level.png"])),
        _section("Time level", "time", _figure(folder, "time_level.png", titles["time_level.png"])),
        _section("Layer level", "layer", _figure(folder, "layer_level.png", titles["layer_level.png"])),
        _section(f"Specific-reference level ({summary['patch_choice']})", "specific",
                 patches or "<p>no patch chosen (--num-patches 0)</p>"),
        "<h2>Settings</h2>", _table(settings),
        "<p>Raw maps: <code>maps.safetensors</code> (<code>i2am.AttributionMaps.load</code>); "
        "numbers: <code>summary.json</code>.</p>",
    ]
    return _page("I²AM report", body)


def _page(title: str, body: list[str]) -> str:
    """A whole HTML page: the report's style and script around ``body``'s parts."""
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            + "".join(body) + f"<script>{_SCRIPT}</script></body></html>")


def write_html_report(path: str | Path, summary: dict[str, Any], folder: str | Path) -> None:
    Path(path).write_text(render_html(summary, Path(folder)), encoding="utf-8")


# ------------------------------------------------------------------------ the diagnosis page
DIAGNOSIS_EXPLANATION = (
    "<b>Blame</b> of a layer (and time group) = how much the mean colour error of the same held-out samples "
    "(same seeds) falls when only that layer's attention is repaired during those steps: replaced by attention on "
    "the true garment position (synthetic data) or sharpened by a lower softmax temperature. Positive blame: that "
    "layer's attention caused wrong colours. The correlations (Pearson r over the samples, all steps) of each "
    "attention statistic with the colour error stand beside it as evidence, not as the ranking.")


def render_diagnosis_html(diagnosis: dict[str, Any], folder: Path) -> str:
    """The page (or section) for ``diagnosis.json``'s content whose figures are PNGs in ``folder``."""
    rank_key = "blame" if diagnosis["ground_truth"] else "correlation_score"
    head = ["#", "layer", "grid", "time group", rank_key.replace("_", " "), "± se", "colour err",
            "repaired", "r(colour var)", "r(dispersion)", "r(IMACS)"]

    def r(e: dict[str, Any], stat: str) -> Any:
        return e[f"corr_{stat}"]["pearson"] if e.get(f"corr_{stat}") else None

    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in (
            i + 1, e["layer"].removesuffix(".processor"), e["grid"],
            "all" if e["time_group"] is None else e["time_group"],
            e.get(rank_key), e.get("blame_se"), e["colour_error"], e.get("colour_error_repaired"),
            r(e, "colour_var"), r(e, "dispersion"), r(e, "imacs"))) + "</tr>"
        for i, e in enumerate(diagnosis["ranking"]))
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + rows + "</table>"
    rec = diagnosis["recommendation"]
    snippet = (folder / "recommended.yaml").read_text() if (folder / "recommended.yaml").is_file() else ""
    captions = {"scatter.png": "colour error vs statistic, one panel per layer",
                "blame_heatmap.png": "blame per layer × time group (0 = noisiest)"}
    figures = "".join(_figure(folder, f, captions.get(f, f)) for f in diagnosis["files"].get("figures", []))
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in diagnosis["notes"])
    settings = _table([(k, v if not isinstance(v, list) else ", ".join(map(str, v)))
                       for k, v in diagnosis["settings"].items()])
    body = [
        '<h1 id="diagnosis">Diagnosis: which layers and steps cause wrong colours</h1>',
        f'<p class="explain">{DIAGNOSIS_EXPLANATION}</p>', notes,
        f'<div class="cards"><div class="card"><div>margin (top &minus; second layer)</div>'
        f'<div class="metric">{html.escape(fmt(diagnosis["margin"]))}</div></div></div>',
        "<h2>Ranking</h2>", table,
        "<h2>Figures</h2>", f'<div class="figs">{figures}</div>',
        "<h2>Recommendation</h2>", f'<p class="explain">{html.escape(rec["basis"])}</p>',
        f"<pre><code>{html.escape(snippet)}</code></pre>",
        "<h2>Settings</h2>", settings,
    ]
    return _page("I²AM diagnosis", body)


def write_diagnosis_report(path: str | Path, diagnosis: dict[str, Any], folder: str | Path) -> None:
    Path(path).write_text(render_diagnosis_html(diagnosis, Path(folder)), encoding="utf-8")
