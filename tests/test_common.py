"""common.images (conversions, the PNG writer) and common.tables (formatter, markdown)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from common.images import as_picture, from_pil, from_uint8, save_png, to_pil, to_uint8
from common.tables import fmt, markdown_table


# ----------------------------------------------------------------------------- images
def test_uint8_round_trip_is_exact_on_every_level():
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    t = from_uint8(levels)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.min() == -1 and t.max() == 1
    assert np.array_equal(to_uint8(t), levels)
    batch = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    tb = from_uint8(batch)
    assert tb.shape == (2, 3, 5, 7)
    assert np.array_equal(to_uint8(tb), batch)
    assert torch.equal(tb[1], from_uint8(batch[1]))


def test_to_uint8_clamps_and_rounds():
    t = torch.tensor([-3.0, -1.0, 0.0, 1 / 255, 1.0, 7.0]).view(1, 1, 6).expand(3, 1, 6)
    assert to_uint8(t)[0, :, 0].tolist() == [0, 0, 128, 128, 255, 255]
    assert to_uint8(t.double().requires_grad_()).dtype == np.uint8
    with pytest.raises(ValueError, match="tensor"):
        to_uint8(np.zeros((3, 2, 2)))
    with pytest.raises(ValueError, match="uint8"):
        from_uint8(np.zeros((2, 2, 3), np.float32))


def test_pil_round_trip():
    a = np.random.default_rng(1).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    assert np.array_equal(np.asarray(to_pil(from_pil(im))), a)
    with pytest.raises(ValueError, match="RGB"):
        from_pil(im.convert("L"))


@pytest.mark.parametrize("kind", ["tensor", "array", "pil", "rgba"])
def test_save_png_writes_the_pixels_and_leaves_no_temp_file(tmp_path, kind):
    a = np.random.default_rng(2).integers(0, 256, (7, 5, 4 if kind == "rgba" else 3), dtype=np.uint8)
    image = {"tensor": from_uint8(a), "array": a, "pil": Image.fromarray(a), "rgba": a}[kind]
    path = tmp_path / "sub" / "x.png"
    save_png(image, path)
    with Image.open(path) as im:
        assert im.format == "PNG" and np.array_equal(np.asarray(im), a)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["x.png"]


def test_save_png_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    old = np.zeros((4, 4, 3), np.uint8)
    save_png(old, path)

    def broken_save(self, fp, *args, **kwargs):  # a write that dies half-way
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(np.full((4, 4, 3), 255, np.uint8), path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temp file left
    assert np.array_equal(np.asarray(Image.open(path)), old)  # the old file is intact


def test_save_png_rejects_what_is_not_a_picture(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_png(np.zeros((4, 4, 3), np.float32), tmp_path / "x.png")
    with pytest.raises(ValueError, match="uint8"):
        as_picture(np.zeros((4, 4), np.uint8))
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- tables
def test_fmt():
    assert fmt(None) == "n/a" and fmt(float("nan")) == "n/a" and fmt(np.float32("nan")) == "n/a"
    assert fmt(None, missing="–") == "–"
    assert fmt(0.123456) == "0.1235" and fmt(0.123456, 2) == "0.12" and fmt(2.0, 0) == "2"
    assert fmt(np.float32(0.5), 3) == "0.500" and fmt(np.float64(1.25), 1) == "1.2"
    assert fmt(3) == "3" and fmt(np.int64(3), 2) == "3" and fmt(True) == "True" and fmt("x") == "x"
    assert fmt(math.inf, 1) == "inf"


def test_markdown_table_matches_a_hand_written_one():
    table = markdown_table(["arm", "error ↓", "steps"], [["a", 0.12345, 300], ["b", None, 2]],
                           align=["", "right", "right"], digits=[0, 3, 0])
    assert table == ("| arm | error ↓ | steps |\n"
                     "|---|---:|---:|\n"
                     "| a | 0.123 | 300 |\n"
                     "| b | n/a | 2 |")
    assert markdown_table(["x", "y"], [[1.0, float("nan")]], align=["left", "center"], missing="–") == (
        "| x | y |\n|:---|:---:|\n| 1.0000 | – |")
    assert markdown_table(["x"], []) == "| x |\n|---|"
    with pytest.raises(ValueError, match="cells"):
        markdown_table(["x", "y"], [[1]])
    with pytest.raises(ValueError, match="columns"):
        markdown_table(["x", "y"], [], align=["right"])


def test_the_projects_tables_use_the_builder():
    from apps.experiment import results_table

    row = {"colour_error": 0.1, "pixel_error": 0.2, "ssim": 0.3, "dispersion": float("nan"), "imacs_g": None,
           "imacs_r": 0.5, "steps": 4, "minutes": 1.26}
    lines = results_table({"baseline": {"seeds": {0: row}, "mean": row, "sd": {}}}).splitlines()
    assert lines[1] == "|---|" + "---:|" * 7  # no worn-mask, centre-error or mIoU column: no row has them
    assert lines[2] == "| baseline (1 seed) | 0.1000 | 0.2000 | 0.300 | n/a | n/a | 0.50 | 1.3 |"
