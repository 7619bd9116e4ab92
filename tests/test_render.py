"""Pictures of attribution maps: overlays, figures, grids, the specific-reference figure."""
from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from i2am import render as R

JET = matplotlib.colormaps["jet"]


def _grey(h: int = 32, w: int = 24, value: float = 0.0) -> torch.Tensor:
    return torch.full((3, h, w), value)


def _has_colour(img: np.ndarray, rgb, tol: int = 2) -> bool:
    return bool((np.abs(img.astype(int) - np.asarray(rgb, int)).max(axis=-1) <= tol).any())


def _blob(h: int = 8, w: int = 6) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return 0.02 * torch.exp(-((y - h / 2) ** 2 + (x - w / 3) ** 2) / 4)


def test_image_to_uint8_conventions():
    img = torch.stack([torch.full((4, 5), -1.0), torch.full((4, 5), 1.0), torch.zeros(4, 5)])
    out = R.image_to_uint8(img)
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    assert out[0, 0].tolist() == [0, 255, 128]
    u8 = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    assert np.array_equal(R.image_to_uint8(u8), u8)
    assert R.image_to_uint8(torch.zeros(1, 4, 5)).shape == (4, 5, 3)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        R.image_to_uint8(torch.zeros(4, 4, 5))
    with pytest.raises(ValueError, match="uint8"):
        R.image_to_uint8(np.zeros((3, 4, 5), np.uint8))


def test_normalise():
    m = torch.tensor([[1.0, 3.0], [2.0, 5.0]])
    n = R.normalise(m)
    assert torch.allclose(n, torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(R.normalise(torch.full((3, 4), 7.0)), torch.zeros(3, 4))
    assert torch.allclose(R.normalise(m.numpy()), n)
    with pytest.raises(ValueError, match="NaN"):
        R.normalise(torch.tensor([[1.0, float("nan")]]))


def test_overlay_alpha_extremes_match_image_and_colour_map():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 16, 12, generator=g) * 2 - 1
    m = torch.rand(16, 12, generator=g) * 3 + 1  # raw, unnormalised
    img_u8 = R.image_to_uint8(image)
    for mm in (m, m[:4, :3]):  # same size, and a small map that is upsampled
        out = R.overlay(mm, image, alpha=0.0)
        assert out.dtype == np.uint8 and out.shape == (16, 12, 3)
        assert np.array_equal(out, img_u8)
    a = m.numpy()
    expected = np.rint(JET((a - a.min()) / (a.max() - a.min()))[..., :3] * 255)
    got = R.overlay(m, image, alpha=1.0)
    assert np.abs(got.astype(int) - expected).max() <= 1
    # a small map: bicubic (align_corners=False) to the image size, clamped, then the colour map
    small = m[:4, :3]
    up = F.interpolate(R.normalise(small)[None, None], size=(16, 12), mode="bicubic", align_corners=False)
    expected = np.rint(JET(up[0, 0].clamp(0, 1).numpy())[..., :3] * 255)
    assert np.abs(R.overlay(small, image, alpha=1.0).astype(int) - expected).max() <= 1
    half = R.overlay(m, image, alpha=0.5).astype(int)
    assert np.abs(half - (img_u8.astype(int) + got.astype(int)) / 2).max() <= 1
    # uint8 images are accepted too
    assert np.array_equal(R.overlay(m, img_u8, alpha=0.0), img_u8)


def test_overlay_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\(h, w\).*\(1, 8, 6\)"):
        R.overlay(torch.zeros(1, 8, 6), _grey())
    with pytest.raises(ValueError, match="alpha"):
        R.overlay(torch.zeros(8, 6), _grey(), alpha=1.5)


def test_overlay_figure_is_legible_and_shows_the_colour_map():
    fig = R.overlay_figure(_blob(), _grey(), "R2G")
    assert fig.dtype == np.uint8 and fig.ndim == 3 and fig.shape[2] == 3
    assert fig.std() > 0
    assert fig.shape[0] >= 200  # a 32x24 image is upscaled, not shown as a speck
    # the colour bar holds the pure colour-map ends
    assert _has_colour(fig, np.array(JET(1.0)[:3]) * 255, tol=3)
    assert _has_colour(fig, np.array(JET(0.0)[:3]) * 255, tol=3)
    plain = R.overlay_figure(_blob(), _grey(), "R2G", colorbar=False)
    assert plain.shape[1] < fig.shape[1]
    assert not _has_colour(plain, np.array(JET(1.0)[:3]) * 255, tol=3)
    assert R.overlay_figure(_blob(), _grey(), "x", scale=2).shape[0] < fig.shape[0]
    with pytest.raises(ValueError, match="scale"):
        R.overlay_figure(_blob(), _grey(), "x", scale=0)


def test_map_grid_grows_with_n_and_normalisation_is_stated():
    maps = torch.stack([_blob() * (k + 1) for k in range(6)])
    two = R.map_grid(maps[:2], _grey(), ["a", "b"])
    four = R.map_grid(maps[:4], _grey(), list("abcd"))
    six = R.map_grid(maps, _grey(), list("abcdef"))
    assert two.dtype == np.uint8 and two.std() > 0
    assert four.shape[1] > two.shape[1] and six.shape[0] > four.shape[0]
    assert R.map_grid(maps, _grey(), list("abcdef"), ncols=6).shape[1] > six.shape[1]
    # shared scale: a zero map and a one map get the two ends of the colour map; per panel, a
    # constant map is all zeros, so the top colour cannot appear in the panels
    flat = torch.stack([torch.zeros(8, 6), torch.ones(8, 6)])
    top = np.rint(0.5 * 128 + 0.5 * 255 * np.array(JET(1.0)[:3]))
    shared = R.map_grid(flat, _grey(), ["zero", "one"])
    separate = R.map_grid(flat, _grey(), ["zero", "one"], shared=False, suptitle="heads")
    assert _has_colour(shared, top) and not _has_colour(separate, top)
    assert separate.shape[1] < shared.shape[1]  # no colour bar
    # one image per panel works too
    assert R.map_grid(maps[:2], torch.stack([_grey(), _grey(value=1.0)]), ["a", "b"]).shape == two.shape
    with pytest.raises(ValueError, match="titles"):
        R.map_grid(maps, _grey(), ["a"])
    with pytest.raises(ValueError, match="image"):
        R.map_grid(maps[:2], [_grey()] * 3, ["a", "b"])


def test_long_suptitle_wraps_inside_the_figure():
    """A title wider than a narrow grid takes more lines instead of being cut at the edges."""
    maps = torch.stack([_blob(), _blob()])
    short = R.map_grid(maps, _grey(), ["a", "b"], suptitle="x")
    long = R.map_grid(maps, _grey(), ["a", "b"], suptitle="concentration: R2G over the generated image " * 2)
    assert long.shape[1] == short.shape[1] and long.shape[0] > short.shape[0]
    band = long[: long.shape[0] - short.shape[0] + 30]  # the title band, without the panels
    ink = band.min(axis=-1) < 128
    assert ink.any() and not ink[:, :3].any() and not ink[:, -3:].any()


def _extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


@pytest.mark.parametrize("as_mask", [False, True])
def test_specific_reference_figure_draws_the_region_where_it_belongs(as_mask):
    blue = torch.stack([-torch.ones(32, 24), -torch.ones(32, 24), torch.ones(32, 24)])  # pure blue
    garment = _grey(value=1.0)  # white: its overlay contains neither pure blue nor pure green
    grid_hw, box = (8, 6), (2, 1, 5, 4)
    region: object = box
    if as_mask:
        region = torch.zeros(grid_hw, dtype=torch.bool)
        region[2:5, 1:4] = True
    fig = R.specific_reference_figure(blue, garment, region, _blob(), grid_hw)
    assert fig.dtype == np.uint8 and fig.std() > 0
    left = fig[:, : fig.shape[1] // 2]
    near = lambda rgb: np.abs(left.astype(int) - rgb).max(-1) <= 10  # noqa: E731
    iy0, ix0, iy1, ix1 = _extent(near((0, 0, 255)))  # the image panel, found by its colour
    gy0, gx0, gy1, gx1 = _extent(near(R.BOX_COLOUR))
    sy, sx = (iy1 - iy0) / grid_hw[0], (ix1 - ix0) / grid_hw[1]
    assert (iy1 - iy0, ix1 - ix0) == (32 * 8, 24 * 8)  # auto scale 8 for a 32x24 image
    tol = 3  # the 2-pt line straddles the cell edge
    assert abs(gy0 - (iy0 + box[0] * sy)) <= tol and abs(gy1 - (iy0 + box[2] * sy)) <= tol
    assert abs(gx0 - (ix0 + box[1] * sx)) <= tol and abs(gx1 - (ix0 + box[3] * sx)) <= tol
    # an outline, not a filled box; nothing green on the garment side
    assert near(R.BOX_COLOUR).sum() < 0.3 * (gy1 - gy0) * (gx1 - gx0)
    assert not (np.abs(fig[:, fig.shape[1] // 2:].astype(int) - R.BOX_COLOUR).max(-1) <= 10).any()
    assert _has_colour(fig, np.array(JET(1.0)[:3]) * 255, tol=3)  # the colour bar


def test_specific_reference_figure_rejects_bad_regions():
    args = (_grey(), _grey(value=1.0))
    with pytest.raises(ValueError, match="region"):
        R.specific_reference_figure(*args, (0, 0, 9, 2), _blob(), (8, 6))
    with pytest.raises(ValueError, match=r"\(8, 6\)"):
        R.specific_reference_figure(*args, torch.ones(4, 3, dtype=torch.bool), _blob(), (8, 6))
    with pytest.raises(ValueError, match="ref_map"):
        R.specific_reference_figure(*args, (0, 0, 2, 2), torch.zeros(2, 8, 6), (8, 6))


def test_sample_row_and_grid_sizes():
    row2 = R.sample_row([_grey(), _grey(value=1.0)], ["a", "b"])
    row4 = R.sample_row([_grey()] * 4, list("abcd"))
    assert row2.dtype == np.uint8 and row2.std() > 0 and row4.shape[1] > row2.shape[1]
    with pytest.raises(ValueError):
        R.sample_row([_grey()], ["a", "b"])
    batch = lambda b: torch.rand(b, 3, 32, 24) * 2 - 1  # noqa: E731
    g2 = R.sample_grid({"agnostic": batch(2), "garment": batch(2)})
    g4 = R.sample_grid({"agnostic": batch(4), "garment": batch(4)})
    g4c3 = R.sample_grid({"agnostic": batch(4), "garment": batch(4), "mask": torch.ones(4, 1, 32, 24)})
    assert g4.shape[0] > g2.shape[0] and g4c3.shape[1] > g4.shape[1] and g4.shape[1] == g2.shape[1]
    with pytest.raises(ValueError, match="equal B"):
        R.sample_grid({"a": batch(2), "b": batch(3)})


def test_sample_grid_shows_the_images_pixel_for_pixel():
    red = torch.zeros(2, 3, 32, 24)
    red[:, 0] = 1.0  # (255, 128, 128)
    out = R.sample_grid({"x": red}, scale=2)
    hit = (np.abs(out.astype(int) - (255, 128, 128)).max(-1) == 0)
    assert hit.sum() == 2 * 64 * 48  # both tiles, exactly, at scale 2


def test_save_png_roundtrip(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    path = tmp_path / "sub" / "x.png"
    R.save_png(a, path)
    assert np.array_equal(np.asarray(Image.open(path)), a)
    with pytest.raises(ValueError, match="uint8"):
        R.save_png(a.astype(np.float32), path)
