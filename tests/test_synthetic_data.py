"""The embedded synthetic try-on data set and the colour metrics built on the sample contract."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from tryon_data import PATTERNS, SAMPLE_KEYS, SyntheticTryOn, check_sample, colour_error, masked_mean_colour, pixel_error

TENSOR_KEYS = ("person", "garment", "garment_mask", "agnostic", "mask", "box", "colors")


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in TENSOR_KEYS) and all(
        a[k] == b[k] for k in ("name", "pattern"))


def _garment_pixels(image: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: pixels exactly equal to one of the garment's colours (the palette is exact)."""
    c = colors * 2 - 1
    return ((image == c[0].view(3, 1, 1)).all(0)) | ((image == c[1].view(3, 1, 1)).all(0))


def _bbox(m: torch.Tensor) -> list[int]:
    rows, cols = torch.nonzero(m.any(1)).flatten(), torch.nonzero(m.any(0)).flatten()
    return [int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1]


@pytest.fixture(scope="module")
def train200() -> list[dict]:
    ds = SyntheticTryOn(200)
    return [ds[i] for i in range(len(ds))]


def test_same_seed_same_samples_in_any_order():
    a, b = SyntheticTryOn(16, seed=3), SyntheticTryOn(16, seed=3)
    forward = [a[i] for i in range(16)]
    backward = [b[i] for i in reversed(range(16))][::-1]
    assert all(_same(x, y) for x, y in zip(forward, backward))
    # Reading a sample again, after others, gives it again; and the comparison can fail.
    assert _same(a[5], forward[5]) and _same(b[5], forward[5])
    assert not _same(a[5], forward[6])


def test_different_seed_or_split_gives_different_samples():
    base = SyntheticTryOn(8, seed=0)
    other_seed = SyntheticTryOn(8, seed=1)
    other_split = SyntheticTryOn(8, seed=0, split="val")
    for i in range(8):
        assert not torch.equal(base[i]["person"], other_seed[i]["person"])
        assert not torch.equal(base[i]["person"], other_split[i]["person"])
    assert base[3]["name"] == "synthetic_train_000003"
    assert other_split[3]["name"] == "synthetic_val_000003"


@pytest.mark.parametrize("hw", [(32, 24), (64, 48)])
def test_contract_shapes_dtypes_and_ranges(hw):
    h, w = hw
    ds = SyntheticTryOn(12, resolution=hw)
    for i in range(len(ds)):
        s = ds[i]
        check_sample(s)
        assert set(s) == set(SAMPLE_KEYS)
        for key, c in (("person", 3), ("garment", 3), ("agnostic", 3), ("garment_mask", 1), ("mask", 1)):
            assert s[key].shape == (c, h, w) and s[key].dtype == torch.float32, key
        assert s["person"].min() >= -1 and s["person"].max() <= 1
        assert s["garment"].min() >= -1 and s["garment"].max() <= 1
        assert set(s["mask"].unique().tolist()) == {0.0, 1.0}
        assert set(s["garment_mask"].unique().tolist()) == {0.0, 1.0}
        assert s["box"].dtype == torch.int64 and s["box"].shape == (4,)
        assert s["colors"].shape == (2, 3) and 0 <= s["colors"].min() and s["colors"].max() <= 1
        # the garment takes a sensible share of the person image (a torso, not a speck)
        y0, x0, y1, x1 = s["box"].tolist()
        assert 0.3 * h < y1 - y0 < 0.6 * h and 0.4 * w < x1 - x0 < 0.85 * w


def test_check_sample_rejects_broken_samples():
    s = SyntheticTryOn(1)[0]
    with pytest.raises(ValueError, match="mask"):
        check_sample({**s, "mask": s["mask"] * 0.5})
    with pytest.raises(ValueError, match="keys"):
        check_sample({k: v for k, v in s.items() if k != "box"})
    with pytest.raises(ValueError, match="garment"):
        check_sample({**s, "garment": s["garment"][:, :-1]})
    with pytest.raises(ValueError, match="'worn_mask': expected values in"):
        check_sample({**s, "worn_mask": s["worn_mask"] * 0.5})
    with pytest.raises(ValueError, match="'garment_pos': expected 0 outside 'worn_mask'"):
        check_sample({**s, "garment_pos": s["garment_pos"] + 0.01})
    with pytest.raises(ValueError, match="'garment_pos': expected finite values in \\[0, 1\\]"):
        check_sample({**s, "garment_pos": s["garment_pos"] * float("nan")})
    with pytest.raises(ValueError, match="'garment_pos': comes with 'worn_mask'"):
        check_sample({k: v for k, v in s.items() if k != "worn_mask"})


def test_agnostic_is_person_outside_mask_and_grey_inside(train200):
    for s in train200[:50]:
        m = s["mask"].bool().expand(3, -1, -1)
        assert torch.equal(s["agnostic"][~m], s["person"][~m])
        assert torch.all(s["agnostic"][m] == 0)
        assert m.any() and (~m).any()


def test_mask_covers_the_worn_garment_and_box_matches(train200):
    for s in train200:
        h, w = s["mask"].shape[1:]
        worn = _garment_pixels(s["person"], s["colors"])
        mask = s["mask"][0].bool()
        assert worn.sum() > 0.4 * float((s["box"][2] - s["box"][0]) * (s["box"][3] - s["box"][1]))
        assert not (worn & ~mask).any(), "garment pixels outside the inpainting mask"
        assert _bbox(worn) == s["box"].tolist()
        y0, x0, y1, x1 = s["box"].tolist()  # the mask is the garment region dilated by 1 px
        assert _bbox(mask) == [max(0, y0 - 1), max(0, x0 - 1), min(h, y1 + 1), min(w, x1 + 1)]


def test_flat_garment_is_the_garment_on_white(train200):
    for s in train200:
        gm = s["garment_mask"][0].bool()
        assert torch.all(s["garment"][:, ~gm] == 1.0)
        on = _garment_pixels(s["garment"], s["colors"])
        assert torch.equal(on, gm)
        if s["pattern"] != "solid":  # both colours are visible
            c2 = ((s["garment"] == (s["colors"][1] * 2 - 1).view(3, 1, 1)).all(0) & gm).sum()
            assert 0 < c2 < gm.sum()


def test_every_pattern_occurs_and_colours_of_patterns_differ(train200):
    counts = {k: 0 for k in PATTERNS}
    for s in train200:
        counts[s["pattern"]] += 1
        c = s["colors"]
        if s["pattern"] == "solid":
            assert torch.equal(c[0], c[1])
        else:
            assert (c[0] - c[1]).abs().max() > 0.3
        bg = (s["person"][:, 0, 0] + 1) / 2  # top-left pixel: background; garment colours stand out
        assert (c - bg).abs().amax(dim=1).min() > 0.2
    assert all(n >= 20 for n in counts.values()), counts


def test_pattern_choice_follows_arguments():
    only = SyntheticTryOn(30, patterns=("stripes", "dots"), pattern_probs=(1.0, 0.0))
    assert {only[i]["pattern"] for i in range(30)} == {"stripes"}
    for bad in ({"patterns": ("zigzag",)}, {"patterns": ()}, {"pattern_probs": (1.0, 1.0)},
                {"split": "dev"}, {"mode": "swapped"}, {"resolution": (4, 3)}, {"num_samples": 0}):
        with pytest.raises(ValueError):
            SyntheticTryOn(**{"num_samples": 4, **bad})


def test_stripes_are_at_least_two_pixels_wide_at_32x24(train200):
    checked = 0
    for s in train200:
        if s["pattern"] not in ("stripes", "checks"):
            continue
        c = s["colors"] * 2 - 1
        label = torch.full(s["person"].shape[1:], -1)
        for k in range(2):
            label[(s["person"] == c[k].view(3, 1, 1)).all(0)] = k
        y0, x0, y1, x1 = s["box"].tolist()
        lines = [label[y0:y1, x] for x in range(x0, x1)] + [label[y, x0:x1] for y in range(y0, y1)]
        for line in lines:
            runs, start = [], 0
            for t in range(1, len(line) + 1):
                if t == len(line) or line[t] != line[start]:
                    runs.append((int(line[start]), t - start))
                    start = t
            # interior runs (a garment colour between the two other garment colours) are whole stripes
            for k in range(1, len(runs) - 1):
                if runs[k - 1][0] == runs[k + 1][0] == 1 - runs[k][0] >= 0:
                    assert runs[k][1] >= 2, (s["name"], runs)
                    checked += 1
    assert checked > 100


def test_garment_image_position_matches_torso_position():
    """Garment-image (u, v) shows the colour of torso (u, v): the correspondence attention can learn."""
    ds = SyntheticTryOn(40, resolution=(128, 96))
    agree = total = 0
    for i in range(len(ds)):
        s = ds[i]
        if s["pattern"] == "solid":
            continue
        py0, px0, py1, px1 = s["box"].tolist()
        gy0, gx0, gy1, gx1 = _bbox(s["garment_mask"][0].bool())
        for u in np.linspace(0.3, 0.95, 9):
            for v in np.linspace(0.36, 0.64, 7):
                a = s["person"][:, int(py0 + u * (py1 - py0)), int(px0 + v * (px1 - px0))]
                b = s["garment"][:, int(gy0 + u * (gy1 - gy0)), int(gx0 + v * (gx1 - gx0))]
                agree += int(torch.equal(a, b))
                total += 1
    assert total > 500 and agree / total > 0.9


def test_worn_mask_is_exactly_the_garment_coloured_pixels_of_the_person(train200):
    """Garment colours are saturated and occur nowhere else on the person (muted palette)."""
    for s in train200[:60]:
        worn = s["worn_mask"][0].bool()
        assert torch.equal(worn, _garment_pixels(s["person"], s["colors"])), s["name"]
        assert _bbox(worn) == s["box"].tolist()


@pytest.mark.parametrize("hw", [(64, 48), (128, 96)])
def test_garment_pos_points_at_the_same_colour_in_the_flat_garment(hw):
    """Each worn pixel's garment_pos, looked up in the flat garment image (nearest pixel), shows
    the worn pixel's colour; positions are the flat image's relative (y, x), 0 off the garment."""
    ds = SyntheticTryOn(30, resolution=hw)
    h, w = hw
    agree = total = 0
    for i in range(len(ds)):
        s = ds[i]
        worn = s["worn_mask"][0].bool()
        pos = s["garment_pos"]
        assert torch.all(pos[:, ~worn] == 0) and pos[:, worn].min() > 0 and pos[:, worn].max() < 1
        if s["pattern"] == "solid":
            continue  # any garment pixel matches; only patterns tell positions apart
        ys, xs = torch.nonzero(worn, as_tuple=True)
        gy = (pos[0, ys, xs] * h).long().clamp(0, h - 1)  # relative y -> the flat pixel containing it
        gx = (pos[1, ys, xs] * w).long().clamp(0, w - 1)
        same = (s["garment"][:, gy, gx] == s["person"][:, ys, xs]).all(0)
        agree += int(same.sum())
        total += len(ys)
    # The nearest flat pixel can lie across a stripe or dot edge, or just off the silhouette (a few
    # per cent of the pixels); a position off by 5 % of the image height matches only about 63 %.
    assert total > 1000 and agree / total > 0.95, agree / total


def test_garment_pos_maps_the_worn_box_onto_the_flat_garment_box():
    """An independent check of the affine map: the worn box's corner pixels land within a pixel
    of the flat garment mask's box (both are the same garment box, scaled)."""
    ds = SyntheticTryOn(20, resolution=(128, 96))
    for i in range(len(ds)):
        s = ds[i]
        pos = s["garment_pos"]
        worn = s["worn_mask"][0].bool()
        gy0, gx0, gy1, gx1 = _bbox(s["garment_mask"][0].bool())
        rows = torch.nonzero(worn.any(1)).flatten()
        top_y = pos[0, rows[0]][worn[rows[0]]].mean() * 128
        bottom_y = pos[0, rows[-1]][worn[rows[-1]]].mean() * 128
        assert abs(top_y - (gy0 + 0.5)) < 1.5 and abs(bottom_y - (gy1 - 0.5)) < 1.5, s["name"]
        cols = torch.nonzero(worn.any(0)).flatten()
        left_x = pos[1][:, cols[0]][worn[:, cols[0]]].mean() * 96
        right_x = pos[1][:, cols[-1]][worn[:, cols[-1]]].mean() * 96
        assert abs(left_x - (gx0 + 0.5)) < 1.5 and abs(right_x - (gx1 - 0.5)) < 1.5, s["name"]


def test_unpaired_worn_mask_and_garment_pos_describe_the_tryon_target():
    ds = SyntheticTryOn(10, mode="unpaired")
    for i in range(10):
        s = ds[i]
        check_sample(s)
        assert torch.equal(s["worn_mask"][0].bool(), _garment_pixels(ds.tryon_target(i), s["colors"]))


def test_unpaired_garment_is_another_samples_garment():
    paired, unpaired = SyntheticTryOn(10), SyntheticTryOn(10, mode="unpaired")
    for i in range(10):
        p, u = paired[i], unpaired[i]
        j = unpaired.garment_index(i)
        assert j != i
        assert not torch.equal(p["garment"], u["garment"])
        for key in ("garment", "garment_mask", "colors"):
            assert torch.equal(u[key], paired[j][key])
        assert u["pattern"] == paired[j]["pattern"]
        for key in ("person", "agnostic", "mask", "box"):
            assert torch.equal(u[key], p[key])
    assert {unpaired.garment_index(i) for i in range(10)} == set(range(10))  # a permutation
    assert SyntheticTryOn(1, mode="unpaired").garment_index(0) == 1


def test_tryon_target_wears_the_garment_and_keeps_the_rest():
    paired, unpaired = SyntheticTryOn(6), SyntheticTryOn(6, mode="unpaired")
    for i in range(6):
        assert torch.equal(paired.tryon_target(i), paired[i]["person"])
        s, target = unpaired[i], unpaired.tryon_target(i)
        outside = ~s["mask"].bool().expand(3, -1, -1)
        assert torch.equal(target[outside], s["agnostic"][outside])
        worn = _garment_pixels(target, s["colors"])
        assert worn.sum() > 40 and not (worn & ~s["mask"][0].bool()).any()


def test_indexing_and_collation():
    ds = SyntheticTryOn(5)
    assert _same(ds[-1], ds[4])
    with pytest.raises(IndexError):
        ds[5]
    batch = default_collate([ds[i] for i in range(4)])
    assert batch["person"].shape == (4, 3, 32, 24) and batch["box"].shape == (4, 4)
    assert batch["name"] == [f"synthetic_train_{i:06d}" for i in range(4)]


def test_generation_is_fast():
    ds = SyntheticTryOn(2048)
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    elapsed = time.perf_counter() - t
    assert elapsed < 10.0, f"2048 samples took {elapsed:.2f} s (about 0.4 s expected)"


def test_colour_error_is_the_error_of_mean_colours_in_the_mask():
    g = torch.Generator().manual_seed(1)
    gen = torch.rand(3, 3, 8, 6, generator=g) * 2 - 1
    tgt = torch.rand(3, 3, 8, 6, generator=g) * 2 - 1
    mask = (torch.rand(3, 1, 8, 6, generator=g) > 0.5).float()
    mask[2] = 0
    a, b, m = (gen.numpy() + 1) / 2, (tgt.numpy() + 1) / 2, mask.numpy()[:, 0].astype(bool)
    expected = [np.abs(a[i][:, m[i]].mean(1) - b[i][:, m[i]].mean(1)).mean() if m[i].any() else 0.0
                for i in range(3)]
    np.testing.assert_allclose(colour_error(gen, tgt, mask).numpy(), expected, rtol=1e-5, atol=1e-7)
    # A pattern whose pixels are shuffled inside the mask keeps its mean colour: no colour error,
    # but a pixel error.
    perm = torch.randperm(48, generator=g)
    shuffled = gen.flatten(2)[:, :, perm].view_as(gen)
    full = torch.ones(3, 1, 8, 6)
    assert colour_error(shuffled, gen, full).max() < 1e-6 and pixel_error(shuffled, gen, full).min() > 0.1


def test_pixel_error_matches_explicit_numpy():
    g = torch.Generator().manual_seed(0)
    gen = torch.rand(4, 3, 8, 6, generator=g) * 2 - 1
    tgt = torch.rand(4, 3, 8, 6, generator=g) * 2 - 1
    mask = (torch.rand(4, 1, 8, 6, generator=g) > 0.5).float()
    mask[3] = 0
    got = pixel_error(gen, tgt, mask)
    a, b, m = (gen.numpy() + 1) / 2, (tgt.numpy() + 1) / 2, mask.numpy()[:, 0].astype(bool)
    expected = [np.abs(a[i] - b[i])[:, m[i]].mean() if m[i].any() else 0.0 for i in range(4)]
    assert got.shape == (4,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert got[0] > 0 and got[3] == 0
    np.testing.assert_allclose(pixel_error(gen[0], tgt[0], mask[0]).numpy(), expected[:1], rtol=1e-5)
    assert torch.equal(pixel_error(gen, gen, mask), torch.zeros(4))
    with pytest.raises(ValueError, match="mask"):
        pixel_error(gen, tgt, mask[:, :, :4])
    with pytest.raises(ValueError):
        pixel_error(gen, tgt[:2], mask)


def test_masked_mean_colour_matches_explicit_computation():
    ds = SyntheticTryOn(20)
    num, den = np.zeros(3), 0.0
    for i in range(12):
        s = ds[i]
        m = s["mask"][0].numpy().astype(bool)
        num += s["person"].numpy()[:, m].astype(np.float64).sum(axis=1)
        den += m.sum()
    np.testing.assert_allclose(masked_mean_colour(ds, num=12).numpy(), num / den, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(masked_mean_colour(ds, num=12), masked_mean_colour(ds, num=1))
    with pytest.raises(ValueError):
        masked_mean_colour(ds, num=0)


def test_garment_blind_baseline_is_clearly_wrong(train200):
    mean = masked_mean_colour(train200)
    batch = default_collate(train200[:64])
    blind = batch["agnostic"] * (1 - batch["mask"]) + mean.view(1, 3, 1, 1) * batch["mask"]
    err = pixel_error(blind, batch["person"], batch["mask"])
    assert err.mean() > 0.15, float(err.mean())
    assert colour_error(blind, batch["person"], batch["mask"]).mean() > 0.05
    perfect = colour_error(batch["person"], batch["person"], batch["mask"])
    assert perfect.max() == 0
