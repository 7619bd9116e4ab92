"""tryon_eval's metrics against clean-fid's own functions, explicit formulas and hand cases."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tryon_eval import boxes
from tryon_eval.metrics import (RandomFeatures, build_lpips, fid_kid, image_features, imacs_per_sample,
                                inception_extractor, mask_to_grid, paired_metrics, ssim)
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
def test_fid_kid_equal_clean_fids_own_functions(folders, monkeypatch):
    import cleanfid.fid as cf

    gen_dir, real_dir, gen, real = folders
    fx = RandomFeatures(dim=16)
    ours = fid_kid(image_features(sorted(gen), fx, CPU), image_features(sorted(real), fx, CPU))
    fid_ref = cf.compute_fid(str(gen_dir), str(real_dir), mode="clean", custom_feat_extractor=fx, device=CPU,
                             num_workers=0, verbose=False)
    # compute_kid takes no custom extractor: give it ours through clean-fid's builder
    monkeypatch.setattr(cf, "build_feature_extractor", lambda *a, **k: fx)
    np.random.seed(0)  # 12 vs 10 images: KID draws subsets of 10 from numpy's global RNG
    kid_ref = cf.compute_kid(str(gen_dir), str(real_dir), mode="clean", device=CPU, num_workers=0, verbose=False)
    assert ours["fid"] == pytest.approx(fid_ref, rel=1e-9)
    assert ours["kid"] == pytest.approx(kid_ref, rel=1e-9, abs=1e-15)
    assert ours["fid"] > 0.1  # the two folders differ (a colour shift)


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
