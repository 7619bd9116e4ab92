"""``python -m i2am analyze`` on real photographs: a tiny trained checkpoint and tiny
diffusers pipelines saved to disk. Every promised file is checked for what it holds:
the maps against a monitor run by the test itself, images by size and content, the
HTML page by the figures it embeds."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from i2am import AttentionMonitor, AttributionMaps, trace
from apps.photos import Letterbox, PhotoError, load_inputs, open_photo
from tests.analyze_data import (CHECKPOINT_ARGS, INPAINT_RES, PERSON_SIZE, analysed_checkpoint, photos,
                                tiny_pipeline, tiny_run)

FIGURES = ["inputs.png", "r2g.png", "g2r.png", "head_level.png", "time_level.png", "layer_level.png"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="module")
def pics(base) -> dict[str, Path]:
    return photos(base)


def _u8(image: torch.Tensor) -> np.ndarray:
    return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _imacs(m: torch.Tensor, mask: torch.Tensor) -> float:
    """The authors' IMACS written out: min-max normalise, mean inside - 3 * mean outside,
    the (1, H, W) mask brought to the map's grid by area (a cell is in when half of it is)."""
    k = F.interpolate(mask[None].float(), size=m.shape, mode="area")[0, 0] >= 0.5
    n = (m - m.min()) / (m.max() - m.min())
    return float(n[k].mean() - 3 * n[~k].mean())


def _assert_same_maps(saved: AttributionMaps, own: AttributionMaps, cell: tuple[int, int]) -> None:
    assert saved.layer_names == own.layer_names and saved.bin_bounds == own.bin_bounds
    assert saved.reference_grid == own.reference_grid and saved.generated_grid == own.generated_grid
    for name in own.layer_names:
        a, b = saved.layers[name], own.layers[name]
        for kind in ("r2g", "g2r", "daam", "pair"):
            torch.testing.assert_close(getattr(a, kind), getattr(b, kind), rtol=1e-5, atol=1e-6)
    for d in ("r2g", "g2r"):
        torch.testing.assert_close(saved.unified(d), own.unified(d), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(saved.time_level(d, groups=2), own.time_level(d, groups=2), rtol=1e-5, atol=1e-6)
    y, x = cell
    torch.testing.assert_close(saved.specific_reference((y, x, y + 1, x + 1)),
                               own.specific_reference((y, x, y + 1, x + 1)), rtol=1e-5, atol=1e-6)


def _assert_html_embeds(out: Path, summary: dict) -> None:
    """report.html embeds exactly the figure files (byte for byte), and nothing external."""
    page = (out / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]*)"', page)
    names = FIGURES + [p["file"] for p in summary["patches"]]
    assert len(srcs) == len(names)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs if s.startswith("data:image/png;base64,")}
    assert embedded == {(out / n).read_bytes() for n in names}
    assert not re.search(r'(src|href)="(?!data:)', page)  # no network or file asset
    for level in ("Head level", "Time level", "Layer level", "Specific-reference level", "IMACS_g", "IMACS_r"):
        assert level in page


# ------------------------------------------------------------------------------- photos
def test_photos_are_upright_rgb_and_letterboxed(pics):
    from skimage import data

    person = open_photo(pics["person"])
    assert Image.open(pics["person"]).size == (PERSON_SIZE[0], PERSON_SIZE[1])  # stored sideways (w=512)
    assert person.size == PERSON_SIZE and person.orientation == 6 and person.image.mode == "RGB"
    upright = data.astronaut()[:, 64:448].astype(float)
    assert np.abs(np.asarray(person.image, float) - upright).mean() < 6  # only JPEG loss left

    garment = open_photo(pics["garment_rgba"])
    g = np.asarray(garment.image)
    assert garment.mode == "RGBA" and (g[:, :100] == 255).all()  # transparent -> white
    assert (g[:, 100:] == data.coffee()[:, 100:]).all()          # opaque pixels untouched (PNG)
    grey = np.asarray(open_photo(pics["garment_grey"]).image)
    assert grey.shape == (512, 512, 3) and (grey[..., 0] == grey[..., 2]).all()
    assert (grey[..., 1] == data.camera()).all()

    box = Letterbox.fit((400, 600), (32, 24))
    assert (box.resized, box.padding) == ((16, 24), (8, 8, 0, 0))
    white = np.asarray(box.apply(garment.image, (255, 255, 255)))
    assert white.shape == (32, 24, 3) and (white[:8] == 255).all() and (white[24:] == 255).all()
    assert not (white[8:24] == 255).all()
    inputs = load_inputs((32, 24), pics["garment_rgba"], pics["coffee_mask"], person=pics["coffee"])
    pad = np.r_[0:8, 24:32]
    assert inputs.person[:, pad].abs().max() < 0.01 and inputs.mask[:, pad].sum() == 0  # grey, never repainted
    assert (inputs.agnostic[:, inputs.mask[0] > 0] == 0).all()
    assert inputs.mask.sum() > 0 and "padded with grey" in inputs.choices["person"]

    # round trip: a smooth image survives letterbox + invert up to resampling error
    yy, xx = np.mgrid[0:400, 0:600]
    smooth = Image.fromarray(np.dstack([yy * 255 // 400, xx * 255 // 600, 128 + 0 * xx]).astype(np.uint8))
    back = box.invert(box.apply(smooth, (128, 128, 128)))
    assert back.size == (600, 400)
    assert np.abs(np.asarray(back, float) - np.asarray(smooth, float)).mean() < 6


def test_missing_mask_is_a_clear_error(pics, capsys):
    from apps.cli import main

    rc = main(["analyze", "/nonexistent/run", "--person", str(pics["person"]), "--garment",
               str(pics["garment_grey"]), "--out", "/nonexistent/out"])
    err = capsys.readouterr().err
    assert rc == 2 and "--mask" in err and "no human parser" in err
    with pytest.raises(PhotoError, match="same size"):
        load_inputs((32, 24), pics["garment_grey"], pics["coffee_mask"], person=pics["person"])


def test_a_folder_that_is_no_checkpoint_is_a_clear_error(tmp_path):
    from apps.sources import AnalyzeError, open_source

    with pytest.raises(AnalyzeError, match="neither a checkpoint .* or a diffusers pipeline"):
        open_source(tmp_path)


def test_help_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "i2am", "analyze", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).parents[1])
    assert r.returncode == 0 and "--patch" in r.stdout and "--agnostic" in r.stdout


# --------------------------------------------------------------------------- checkpoint
@pytest.mark.slow  # trains a 2-step checkpoint with the real Trainer (~20 s on a busy 2-core machine)
def test_checkpoint_analysis_outputs(base, pics):
    from models.sampling import Sampler
    from train.checkpoint import load_checkpoint

    out, printed = analysed_checkpoint(base)
    summary = json.loads((out / "summary.json").read_text())
    for name in ["result.png", "result_original_size.png", "maps.safetensors", "report.html", "summary.json",
                 *FIGURES, "specific_reference_5_4.png"]:
        assert (out / name).is_file() and name in summary["files"], name
    # the resize choices are printed
    assert "EXIF orientation 6" in printed and "512x384 -> scaled x0.0625 to 32x24, no padding" in printed
    assert "transparency composited on white" in printed and "padded with white" in printed

    # the test's own run of the same model, inputs and seed
    ckpt = load_checkpoint(tiny_run(base), (), "cpu")
    res = tuple(ckpt.cfg.data.resolution)
    inputs = load_inputs(res, pics["garment_rgba"], pics["person_mask"], person=pics["person"])
    sampler = Sampler.from_config(ckpt.cfg.diffusion, steps=CHECKPOINT_ARGS["steps"])
    batch = {"agnostic": inputs.agnostic[None], "mask": inputs.mask[None], "garment": inputs.garment[None]}
    with AttentionMonitor(ckpt.model.unet, ckpt.model.reference_grid, ckpt.model.extra_tokens) as mon:
        images = sampler(ckpt.model, batch, generator=torch.Generator().manual_seed(CHECKPOINT_ARGS["seed"])).images
        own = mon.maps()
    saved = AttributionMaps.load(out / "maps.safetensors")
    _assert_same_maps(saved, own, (5, 4))

    result = _png(out / "result.png")
    assert result.shape == (*res, 3)
    assert np.abs(result.astype(int) - _u8(images[0])).max() <= 1
    # mapped back: the photo's own pixels outside the mask, the result scaled up inside it
    big = _png(out / "result_original_size.png")
    assert big.shape == (*PERSON_SIZE, 3)
    photo = np.asarray(open_photo(pics["person"]).image)
    inside = np.asarray(Image.open(pics["person_mask"])) >= 128
    assert (big[~inside] == photo[~inside]).all()
    up = np.asarray(Image.fromarray(result).resize(PERSON_SIZE[::-1], Image.Resampling.BICUBIC))
    assert np.abs(big[inside].astype(int) - up[inside]).max() <= 1
    assert np.abs(big[inside].astype(int) - photo[inside]).mean() > 5  # really repainted

    assert summary["steps"] == 2 and summary["seed"] == 3 and summary["source"]["step"] == 2
    assert summary["imacs_g"] == pytest.approx(_imacs(own.unified("r2g")[0], inputs.mask), abs=1e-5)
    gmask = torch.from_numpy((inputs.garment.numpy() / 2 + 0.5 < 0.94).any(0)[None])
    assert summary["imacs_r"] == pytest.approx(_imacs(own.unified("g2r")[0], gmask), abs=1e-5)
    assert summary["patches"][0]["cell"] == [5, 4] and summary["patch_choice"] == "given with --patch"
    assert summary["resize"]["person_letterbox"]["resized"] == list(res)
    assert f"IMACS_g {summary['imacs_g']:.3f}" in printed
    _assert_html_embeds(out, summary)


# ---------------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("kind", ["inpaint", "pbe"])
def test_pipeline_analysis_outputs(kind, base, pics):
    from apps.cli import main

    directory, pipe = tiny_pipeline(base, kind)
    out = base / f"analysis_{kind}"
    if kind == "inpaint":  # a landscape JPEG person, a greyscale garment
        given = dict(person=pics["coffee"], mask=pics["coffee_mask"], garment=pics["garment_grey"])
        extra = ["--person", str(given["person"]), "--prompt", "a red shirt"]
    else:  # a greyscale agnostic image, an RGBA garment
        given = dict(agnostic=pics["chelsea_grey"], mask=pics["chelsea_mask"], garment=pics["garment_rgba"])
        extra = ["--agnostic", str(given["agnostic"])]
    rc = main(["analyze", str(directory), *extra, "--mask", str(given["mask"]), "--garment", str(given["garment"]),
               "--out", str(out), "--steps", "2", "--seed", "5", "--guidance-scale", "3",
               "--resolution", "x".join(map(str, INPAINT_RES)), "--num-patches", "2", "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"]["kind"] == type(pipe).__name__ and summary["steps"] == 2

    inputs = load_inputs(INPAINT_RES, given["garment"], given["mask"], person=given.get("person"),
                         agnostic=given.get("agnostic"))
    mask_img = Image.fromarray((inputs.mask[0].numpy() * 255).astype(np.uint8))
    kwargs = dict(image=Image.fromarray(_u8(inputs.person)), mask_image=mask_img, height=INPAINT_RES[0],
                  width=INPAINT_RES[1], num_inference_steps=2, guidance_scale=3.0, output_type="np",
                  generator=torch.Generator().manual_seed(5))
    if kind == "inpaint":
        kwargs["prompt"] = "a red shirt"
    else:
        kwargs["example_image"] = Image.fromarray(_u8(inputs.garment))
    result, own = trace(pipe, **kwargs)
    saved = AttributionMaps.load(out / "maps.safetensors")
    cells = [tuple(p["cell"]) for p in summary["patches"]]
    _assert_same_maps(saved, own, cells[0])
    assert saved.reference_grid == ((1, 16) if kind == "inpaint" else (1, 1))

    # result: the pipeline's image inside the mask, the input outside (pasted back)
    gen = _png(out / "result.png").astype(int)
    assert gen.shape == (*INPAINT_RES, 3)
    m = inputs.mask[0].numpy() > 0
    assert np.abs(gen[m] - np.round(result.images[0] * 255)[m]).max() <= 1
    assert np.abs(gen[~m] - _u8(inputs.agnostic)[~m]).max() <= 1
    photo = open_photo(given.get("person") or given["agnostic"])
    assert Image.open(out / "result_original_size.png").size == photo.image.size

    # automatic patches: the highest-R2G cells inside the mask
    r2g = own.unified("r2g")[0]
    grid_mask = F.interpolate(inputs.mask[None], size=r2g.shape, mode="area")[0, 0] >= 0.5
    assert len(cells) == 2 and all(grid_mask[c] for c in cells)
    rest = [float(r2g[c]) for c in zip(*torch.nonzero(grid_mask, as_tuple=True)) if tuple(map(int, c)) not in cells]
    assert min(float(r2g[c]) for c in cells) >= max(rest)
    assert summary["imacs_g"] == pytest.approx(_imacs(r2g, inputs.mask), abs=1e-5)
    assert summary["imacs_r"] is None  # text tokens / one pooled token: no garment grid to score
    for name in FIGURES + [p["file"] for p in summary["patches"]]:
        assert _png(out / name).shape[0] > 100
    _assert_html_embeds(out, summary)
