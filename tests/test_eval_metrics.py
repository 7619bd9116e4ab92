"""tryon_eval's metrics against closed forms, the definitions written out and hand cases."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tryon_eval import boxes
from tryon_eval.metrics import (RandomFeatures, build_lpips, fid_kid, image_features, imacs_per_sample,
                                inception_extractor, lpips_distance, mask_to_grid, paired_metrics, ssim)
from tryon_eval.weights import MissingWeightsError, find_alexnet, find_inception

CPU = torch.device("cpu")


def _write_images(folder: Path, n: int, seed: int, shift: float = 0.0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        base = rng.uniform(0, 1, (4, 3, 3)) + shift
        img = np.kron(base, np.ones((8, 8, 1)))[:32, :24]  # 32x24 blocks
        p = folder / f"img_{i:03d}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    gen = _write_images(root / "gen", 12, seed=1, shift=0.15)
    real = _write_images(root / "real", 10, seed=2)
    return root / "gen", root / "real", gen, real


# --------------------------------------------------------------------------------- FID / KID
def test_features_follow_clean_fids_folder_protocol(folders):
    """Our explicit file list gives the features clean-fid's folder reader gives (clean mode:
    PIL bicubic to 299, batches of 32), so distances are computed on the same numbers."""
    import cleanfid.fid as cf

    gen_dir, _, gen, _ = folders
    fx = RandomFeatures(dim=16)
    ours = image_features(sorted(gen), fx, CPU)
    theirs = cf.get_folder_features(str(gen_dir), fx, num_workers=0, device=CPU, mode="clean", verbose=False)
    assert ours.shape == (12, 16)
    np.testing.assert_array_equal(ours, theirs)


def _with_moments(rng: np.random.Generator, n: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """n samples whose sample mean and (n - 1)-normalised sample covariance are exactly
    ``mean`` and ``cov`` (whitened noise, then coloured)."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(z.T @ z / (n - 1))).T  # sample covariance = I
    return mean + z @ np.linalg.cholesky(cov).T


def test_fid_is_the_frechet_distance_of_the_feature_gaussians():
    """||m1 - m2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) by hand: S1 = Q D1 Q^T, S2 = Q D2 Q^T share
    the (random) eigenvectors Q, so (S1 S2)^1/2 = Q (D1 D2)^1/2 Q^T and the trace term is
    sum (sqrt d1 - sqrt d2)^2 = (1-2)^2 + (2-1)^2 + (3-1)^2 + (0.5-1)^2 = 6.25; the means differ
    by (3, 0, -4, 0): 25. FID = 31.25."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    s1 = q @ np.diag([1.0, 4.0, 9.0, 0.25]) @ q.T
    s2 = q @ np.diag([4.0, 1.0, 1.0, 1.0]) @ q.T
    m1, m2 = np.array([1.0, 2.0, -1.0, 0.5]), np.array([-2.0, 2.0, 3.0, 0.5])
    a, b = _with_moments(rng, 300, m1, s1), _with_moments(rng, 200, m2, s2)
    assert fid_kid(a, b)["fid"] == pytest.approx(31.25, rel=1e-6)
    assert fid_kid(b, a)["fid"] == pytest.approx(31.25, rel=1e-6)
    # same moments, different samples: 0
    assert fid_kid(a, _with_moments(rng, 50, m1, s1))["fid"] == pytest.approx(0.0, abs=1e-6)
    # sampled (not moment-matched) Gaussians: the estimate approaches the closed form
    big_a = rng.multivariate_normal(m1, s1, size=20000)
    big_b = rng.multivariate_normal(m2, s2, size=20000)
    assert fid_kid(big_a, big_b)["fid"] == pytest.approx(31.25, rel=0.02)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the KID kernel k(a, b) = (a.b / d + 1)^3, written out pair by pair."""
    d = x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    # by hand, d = 2: x = {(0, 0), (1, 1)}, y = {(0, 0), (2, 0)}; k(a, b) = (a.b / 2 + 1)^3
    # xx: k(x0, x1) = 1 (both orders) -> 1; yy: 1 likewise; xy: (1 + 1 + 1 + (2/2 + 1)^3) / 4 = 2.75
    # KID = 1 + 1 - 2 * 2.75 = -3.5. FID of the same sets: means differ by (-0.5, 0.5) -> 0.5;
    # S1 = [[.5, .5], [.5, .5]], S2 = [[2, 0], [0, 0]], S1 S2 has eigenvalues 1, 0 -> 1 + 2 - 2 * 1 = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy: S1 S2 is singular (two points per set)
        hand = fid_kid(np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 0.0], [2.0, 0.0]]))
    assert hand["kid"] == pytest.approx(-3.5, rel=1e-12) and hand["fid"] == pytest.approx(1.5, rel=1e-6)
    # equal set sizes (<= 1000): clean-fid's subsets are the whole sets, so KID is exactly the estimator
    rng = np.random.default_rng(1)
    gen, real = rng.normal(0.3, 1.0, (40, 8)), rng.normal(0.0, 1.2, (40, 8))
    assert fid_kid(gen, real)["kid"] == pytest.approx(_mmd2_unbiased(gen, real), rel=1e-9)
    assert fid_kid(real, real[::-1])["kid"] == pytest.approx(_mmd2_unbiased(real, real), rel=1e-9)
    # unequal sizes: the mean over subsets of the larger set (size of the smaller), reproducible
    # with kid_seed, so between the smallest and largest estimate over those subsets
    from itertools import combinations

    small = real[:12]
    per_subset = [_mmd2_unbiased(small[list(c)], real[:10]) for c in combinations(range(12), 10)]
    kid = fid_kid(small, real[:10], kid_seed=3)["kid"]
    assert min(per_subset) <= kid <= max(per_subset) and max(per_subset) - min(per_subset) > 1e-3
    assert fid_kid(small, real[:10], kid_seed=3)["kid"] == kid
    state = np.random.get_state()[1].copy()
    fid_kid(small, real[:10], kid_seed=4)
    assert np.array_equal(np.random.get_state()[1], state)  # numpy's global RNG is left as it was


def test_identical_folders_give_zero_fid(folders):
    _, _, gen, _ = folders
    f = image_features(sorted(gen), RandomFeatures(dim=8), CPU)
    assert fid_kid(f, f)["fid"] == pytest.approx(0.0, abs=1e-4)
    assert fid_kid(f[:1], f) == {"fid": None, "kid": None}  # FID needs >= 2 images


def _fake_inception(path: Path) -> None:
    """A TorchScript module with InceptionV3W's interface: ``.layers`` maps (N, 3, 299, 299)
    to (N, 2048)."""
    class Layers(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1).repeat(1, 683)[:, :2048]

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = Layers()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    torch.jit.script(Net()).save(str(path))


def test_inception_loads_from_a_local_file_through_clean_fid(tmp_path, folders):
    _, _, gen, _ = folders
    canonical = tmp_path / "inception-2015-12-05.pt"
    _fake_inception(canonical)
    renamed = tmp_path / "my-inception.pt"
    renamed.write_bytes(canonical.read_bytes())
    for path in (canonical, renamed):
        fx = inception_extractor(path, CPU)
        feats = image_features(sorted(gen)[:3], fx, CPU)
        assert feats.shape == (3, 2048)
        # clean-fid normalises [0, 255] -> [-1, 1] before ``layers``: the mean colour in [-1, 1]
        img = np.asarray(Image.open(sorted(gen)[0]).convert("RGB").resize((299, 299), Image.BICUBIC), np.float64)
        assert feats[0, 0] == pytest.approx((img[..., 0].mean() - 128) / 128, abs=0.02)


def test_missing_weights_say_which_file_where_and_how(tmp_path, monkeypatch):
    import tryon_eval.weights as w

    monkeypatch.delenv("I2AM_INCEPTION", raising=False)
    monkeypatch.delenv("I2AM_ALEXNET", raising=False)
    monkeypatch.setattr(w, "CLEANFID_CACHE", tmp_path / "cache")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingWeightsError) as err:
        find_inception()
    msg = str(err.value)
    assert "inception-2015-12-05.pt" in msg and str(tmp_path / "cache" / "inception-2015-12-05.pt") in msg
    assert w.INCEPTION_URL in msg and "--inception" in msg and "I2AM_INCEPTION" in msg
    with pytest.raises(MissingWeightsError) as err:
        find_alexnet()
    msg = str(err.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in msg
    assert w.ALEXNET_URL in msg and "--alexnet" in msg
    # an explicit path is the only place looked at, and is named
    with pytest.raises(MissingWeightsError, match=str(tmp_path / "nope.pt")):
        find_inception(tmp_path / "nope.pt")
    # found: flag (file or folder), then environment
    (tmp_path / "inception-2015-12-05.pt").write_bytes(b"x")
    assert find_inception(tmp_path) == tmp_path / "inception-2015-12-05.pt"
    monkeypatch.setenv("I2AM_INCEPTION", str(tmp_path / "inception-2015-12-05.pt"))
    assert find_inception() == tmp_path / "inception-2015-12-05.pt"


# ------------------------------------------------------------------------------ LPIPS / SSIM
def test_identical_images_give_lpips_0_and_ssim_1(folders):
    _, _, gen, _ = folders
    model = build_lpips("random")
    same = paired_metrics([(p, p) for p in gen[:3]], model, CPU)
    assert same["lpips"] == 0.0 and same["ssim"] == pytest.approx(1.0, abs=1e-12)
    diff = paired_metrics([(gen[0], gen[1])], model, CPU)
    assert diff["lpips"] > 0 and diff["ssim"] < 0.99


def test_ssim_of_flat_images_is_the_luminance_formula():
    a = np.full((20, 16, 3), 100, np.uint8)
    b = np.full((20, 16, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2  # contrast/structure term is C2 / C2 = 1 for flat images
    assert ssim(a, b) == pytest.approx((2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1), rel=1e-9)


def _ssim_written_out(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. (2004): an 11x11 Gaussian window (sigma 1.5, sums to 1) slid over every
    position where it fits inside the image, population (co)variances, C1 = (0.01 L)^2,
    C2 = (0.03 L)^2 with L = 255; mean over positions, then over channels."""
    r = np.arange(-5, 6)
    g = np.exp(-r ** 2 / (2 * 1.5 ** 2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    h, w = a.shape[:2]
    means = []
    for ch in range(3):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        vals = []
        for i in range(h - 10):
            for j in range(w - 10):
                px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
                mx, my = (win * px).sum(), (win * py).sum()
                vx, vy = (win * (px - mx) ** 2).sum(), (win * (py - my) ** 2).sum()
                cxy = (win * (px - mx) * (py - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        means.append(np.mean(vals))
    return float(np.mean(means))


def test_ssim_equals_the_definition_written_out():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, 19, 3)).astype(np.uint8)
    smooth = np.kron(rng.integers(0, 256, (6, 5, 3)), np.ones((4, 4, 1)))[:24, :19]
    b = np.clip(0.6 * a + 0.4 * smooth + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
    expected = _ssim_written_out(a, b)
    assert 0.05 < expected < 0.95  # a case far from both ends
    assert ssim(a, b) == pytest.approx(expected, rel=1e-9)
    assert ssim(b, a) == pytest.approx(expected, rel=1e-9)


def test_lpips_is_zero_on_identical_images_and_symmetric():
    """No AlexNet weights on this machine (a known-value check needs them): the properties any
    LPIPS has, on the random backbone: d(x, x) = 0, d(x, y) = d(y, x) > 0, also for images
    under 64 px (upsampled alike)."""
    model = build_lpips("random")
    rng = np.random.default_rng(0)
    for shape in ((32, 24, 3), (80, 64, 3)):
        x = rng.integers(0, 256, shape).astype(np.uint8)
        y = np.clip(x.astype(int) + rng.integers(-40, 41, shape), 0, 255).astype(np.uint8)
        assert lpips_distance(model, x, x, CPU) == 0.0
        d_xy, d_yx = lpips_distance(model, x, y, CPU), lpips_distance(model, y, x, CPU)
        assert d_xy > 0 and d_xy == pytest.approx(d_yx, rel=1e-6)


def test_lpips_loads_a_torchvision_alexnet_checkpoint(tmp_path):
    ref = build_lpips("random").net
    state = {}
    for name in ("slice1", "slice2", "slice3", "slice4", "slice5"):
        for idx, mod in getattr(ref, name).named_children():
            for pname, p in mod.named_parameters(recurse=False):
                state[f"features.{idx}.{pname}"] = torch.randn_like(p)
    state["classifier.1.weight"] = torch.zeros(2, 2)  # the rest of a torchvision checkpoint is ignored
    torch.save(state, tmp_path / "alexnet-owt-7be5be79.pth")
    net = build_lpips("alex", find_alexnet(tmp_path)).net
    assert torch.equal(net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(getattr(net.slice5, "10").bias, state["features.10.bias"])
    del state["features.8.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="features.8.weight"):
        build_lpips("alex", tmp_path / "broken.pth")


# ------------------------------------------------------------------------------------ IMACS
def test_imacs_hand_cases():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [1.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]]])
    mask = torch.zeros(3, 1, 4, 4)
    mask[0, :, :2, 2:] = 1          # top-right cell of the 2x2 grid
    mask[1, :, :2, :] = 1           # top row
    mask[1, :, 2, 0] = 1            # a quarter of the bottom-left cell: below half, outside
    got = imacs_per_sample(maps, mask)
    # sample 0: map normalised [[0, 1/3], [2/3, 1]]; inside 1/3, outside (0 + 2/3 + 1) / 3
    assert got[0] == pytest.approx(1 / 3 - 3 * (5 / 9))
    # sample 1: normalised [[1, 1], [0, 0]]: inside 1, outside 0
    assert got[1] == pytest.approx(1.0)
    assert got[2] is None           # empty mask: IMACS undefined
    half = torch.zeros(1, 1, 4, 4)
    half[0, 0, 0, :1] = 1
    half[0, 0, 1, :1] = 1           # exactly half of cell (0, 0)
    assert mask_to_grid(half, (2, 2)).tolist() == [[[True, False], [False, False]]]


# ------------------------------------------------------------------------------------ boxes
def test_box_from_map_hand_case():
    m = np.zeros((40, 40))
    m[10:20, 5:25] = 1.0            # the garment: 200 cells
    m[30:36, 30:36] = 0.8           # a smaller blob: survives opening, loses the size contest
    m[2, 38] = 1.0                  # a speck: removed by opening
    # 65th percentile is 0: the three regions pass; dilation by the 5x5 square grows 2 px
    assert boxes.box_from_map(m) == (8, 3, 22, 27)
    # on a coarse grid, upsampled (bicubic) to the image first: a round blob centred between
    # coarse cells 7 and 8 (image centre 31.5); the top 35 % of 64x64 cells is a disk of
    # radius sqrt(0.35 * 4096 / pi) = 21.4 px, dilated by 2 px -> a box ~47 px wide, centred
    yy, xx = np.mgrid[0:16, 0:16]
    coarse = np.exp(-((yy - 7.5) ** 2 + (xx - 7.5) ** 2) / (2 * 3.0 ** 2))
    y0, x0, y1, x1 = boxes.box_from_map(coarse, image_size=(64, 64))
    assert (y0, x0, y1, x1) == boxes.box_from_map(boxes.upsample_map(coarse, (64, 64)))
    assert y0 == x0 and y1 == x1 and y0 + y1 == 64  # symmetric about 31.5
    assert 45 <= y1 - y0 <= 49


def test_iou_random_and_whole_boxes():
    assert boxes.iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert boxes.iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0
    assert boxes.iou((2, 3, 7, 9), (2, 3, 7, 9)) == 1.0
    assert boxes.whole_box((48, 64)) == (0, 0, 48, 64)
    assert boxes.iou(boxes.whole_box((10, 10)), (0, 0, 5, 4)) == pytest.approx(0.2)
    rng = np.random.default_rng(0)
    for _ in range(200):
        y0, x0, y1, x1 = boxes.random_box((120, 90), rng)
        h, w = y1 - y0, x1 - x0
        assert 0 <= y0 < y1 <= 120 and 0 <= x0 < x1 <= 90
        assert 0.09 <= h * w / (120 * 90) <= 0.31 and 0.45 <= w / h <= 2.2
    a = boxes.random_box((50, 50), np.random.default_rng((0, 7)))
    assert a == boxes.random_box((50, 50), np.random.default_rng((0, 7)))


def test_coco_runner_with_an_oracle_map(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    ann = {"images": [], "annotations": []}
    for i, (bbox, extra) in enumerate([([10, 20, 30, 40], None), ([0, 0, 90, 100], [40, 30, 30, 40]),
                                       ([0, 0, 5, 5], None)]):
        Image.new("RGB", (80, 100), (i * 60, 90, 120)).save(images / f"{i}.jpg")
        ann["images"].append({"id": i, "file_name": f"{i}.jpg", "width": 80, "height": 100})
        ann["annotations"].append({"image_id": i, "bbox": bbox})
        if extra:
            ann["annotations"].append({"image_id": i, "bbox": extra})
    (tmp_path / "ann.json").write_text(json.dumps(ann))

    def oracle(image, box):  # the map is 1 exactly on the ground-truth box
        m = np.zeros(image.shape[:2])
        m[box[0]:box[2], box[1]:box[3]] = 1
        return m

    out = boxes.coco_box_miou(images, tmp_path / "ann.json", oracle)
    # image 0: 30x40 = 15 % of 80x100 -> chosen; image 1: the first box is too big, the second
    # (15 %) is chosen; image 2: 0.3 % -> no box, skipped
    assert out["n"] == 2 and out["skipped_no_box"] == 1
    first, second = out["per_image"]
    assert first["truth"] == [20, 10, 60, 40] and second["truth"] == [30, 40, 70, 70]
    assert first["box"] == [18, 8, 62, 42] and second["box"] == [28, 38, 72, 72]  # dilation: +2 px
    assert first["iou"] == second["iou"] == pytest.approx(40 * 30 / (44 * 34))
    assert first["iou_whole"] == pytest.approx(1200 / 8000)
    assert out["miou"] == pytest.approx(first["iou"]) and out["miou_whole"] == pytest.approx(0.15)
    assert 0 <= out["miou_random"] <= 1
