"""VITON-HD and DressCode loaders on tiny trees written in their exact published layouts."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from configs import ConfigError, load_config
from tryon_data import DatasetError, check_sample
from tryon_data.dresscode import DressCode, inpainting_mask, keypoints_to_pixels, limb_region
from tryon_data.images import JointAugment, garment_mask_from_white, read_labels, read_rgb
from tryon_data.viton_hd import VitonHD

ROOT = Path(__file__).resolve().parents[1]
H, W = 64, 48      # files on disk
RES = (32, 24)     # loader resolution: every image is resized 2x down


def _rgb(seed: int) -> Image.Image:
    """Four flat colour blocks: survives JPEG and resizing well enough to compare."""
    rng = np.random.default_rng(seed)
    a = np.zeros((H, W, 3), np.uint8)
    for (r0, r1, c0, c1) in ((0, H // 2, 0, W // 2), (0, H // 2, W // 2, W), (H // 2, H, 0, W // 2), (H // 2, H, W // 2, W)):
        a[r0:r1, c0:c1] = rng.integers(0, 256, 3)
    return Image.fromarray(a)


def _box_mask(y0: int, y1: int, x0: int, x1: int) -> Image.Image:
    a = np.zeros((H, W), np.uint8)
    a[y0:y1, x0:x1] = 255
    return Image.fromarray(a)


def _parse(k: int) -> Image.Image:
    """A 20-class LIP parse as VITON-HD ships it (palette PNG): hair 2, face 13, upper clothes 5,
    a coat 7 below it, a left arm 14 and pants 9; the garment moves down 2k rows for sample k."""
    lab = np.zeros((H, W), np.uint8)
    lab[0:8, 16:32] = 2
    lab[8:16, 16:32] = 13
    lab[16 + 2 * k:40 + 2 * k, 10:38] = 5
    lab[40 + 2 * k:44 + 2 * k, 10:38] = 7
    lab[18:36, 4:10] = 14
    lab[48:60, 14:34] = 9
    im = Image.fromarray(lab, mode="P")
    im.putpalette([v for i in range(256) for v in ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)])
    return im


def make_viton(root: Path, ids: dict[str, list[str]], pose: bool = True, parse: bool = True) -> Path:
    """<root>/{train,test}_pairs.txt and the six folders (plus image-parse-v3 with ``parse``);
    test pairs are unpaired (rotated)."""
    for split, names in ids.items():
        d = root / split
        for k, n in enumerate(names):
            seed = int(n[:5])
            for folder in ("image", "cloth", "agnostic-v3.2") + (("image-densepose",) if pose else ()):
                (d / folder).mkdir(parents=True, exist_ok=True)
                _rgb(seed * 10 + len(folder)).save(d / folder / f"{n}.jpg", quality=95)
            (d / "cloth-mask").mkdir(exist_ok=True)
            _box_mask(8, 56, 8, 40).save(d / "cloth-mask" / f"{n}.jpg", quality=95)
            (d / "agnostic-mask").mkdir(exist_ok=True)
            _box_mask(16 + 2 * k, 48, 10, 38).save(d / "agnostic-mask" / f"{n}_mask.png")
            if parse:
                (d / "image-parse-v3").mkdir(exist_ok=True)
                _parse(k).save(d / "image-parse-v3" / f"{n}.png")
        if split == "train":
            lines = [f"{n}.jpg {n}.jpg" for n in names]
        else:
            lines = [f"{n}.jpg {names[(k + 1) % len(names)]}.jpg" for k, n in enumerate(names)]
        (root / f"{split}_pairs.txt").write_text("\n".join(lines) + "\n")
    return root


# 18 OpenPose keypoints in the 384 x 512 frame: a standing figure, arms down.
KEYPOINTS = [[192, 60], [192, 110], [150, 115], [135, 200], [130, 280], [234, 115], [249, 200], [254, 280],
             [165, 260], [165, 370], [165, 480], [219, 260], [219, 370], [219, 480],
             [180, 50], [204, 50], [170, 55], [214, 55]]


def _labels(category: str) -> np.ndarray:
    lab = np.zeros((H, W), np.uint8)
    lab[2:14, 17:31] = 11                      # head
    lab[14:34, 14:34] = {"upper_body": 4, "lower_body": 4, "dresses": 7}[category]
    lab[34:56, 16:32] = {"upper_body": 6, "lower_body": 6, "dresses": 7}[category]
    lab[56:62, 16:32] = 9                      # shoes
    return lab


def make_dresscode(root: Path, ids: dict[str, list[str]], pose: bool = True) -> Path:
    for cat, names in ids.items():
        d = root / cat
        for folder in ("images", "label_maps", "keypoints", "dense"):
            (d / folder).mkdir(parents=True, exist_ok=True)
        for n in names:
            _rgb(int(n)).save(d / "images" / f"{n}_0.jpg", quality=95)
            g = np.full((H, W, 3), 255, np.uint8)
            g[10:50, 8:40] = (200, 30, 40)
            Image.fromarray(g).save(d / "images" / f"{n}_1.jpg", quality=95)
            Image.fromarray(_labels(cat)).save(d / "label_maps" / f"{n}_4.png")
            kp = [[x, y, 0.9, i] for i, (x, y) in enumerate(KEYPOINTS)]
            (d / "keypoints" / f"{n}_2.json").write_text(json.dumps({"keypoints": kp}))
            if pose:
                Image.fromarray((_labels(cat) > 0).astype(np.uint8) * 3).save(d / "dense" / f"{n}_5.png")
        (d / "train_pairs.txt").write_text("".join(f"{n}_0.jpg {n}_1.jpg\n" for n in names))
        (d / "test_pairs_paired.txt").write_text("".join(f"{n}_0.jpg {n}_1.jpg\n" for n in names))
        rot = names[1:] + names[:1]
        (d / "test_pairs_unpaired.txt").write_text("".join(f"{n}_0.jpg {m}_1.jpg\n" for n, m in zip(names, rot)))
    return root


VITON_IDS = {"train": ["00001_00", "00002_00", "00003_00"], "test": ["00011_00", "00012_00", "00013_00"]}
DRESS_IDS = {"upper_body": ["000001", "000002"], "lower_body": ["010001", "010002"], "dresses": ["020001", "020002"]}


@pytest.fixture(scope="module")
def viton_root(tmp_path_factory) -> Path:
    return make_viton(tmp_path_factory.mktemp("viton"), VITON_IDS)


@pytest.fixture(scope="module")
def dress_root(tmp_path_factory) -> Path:
    return make_dresscode(tmp_path_factory.mktemp("dresscode"), DRESS_IDS)


# ----------------------------------------------------------------------------------- VITON-HD
def test_viton_paired_unpaired_and_train(viton_root):
    tr = VitonHD(viton_root, "train", resolution=RES)
    paired = VitonHD(viton_root, "test", "paired", resolution=RES)
    unpaired = VitonHD(viton_root, "test", "unpaired", resolution=RES)
    assert len(tr) == 3 and len(paired) == 3 and len(unpaired) == 3
    for ds in (tr, paired, unpaired):
        for i in range(len(ds)):
            s = ds[i]
            check_sample(s)
            assert s["person"].shape == (3, *RES) and "pose" not in s
    assert [paired[i]["name"] for i in range(3)] == ["00011_00", "00012_00", "00013_00"]
    assert unpaired[0]["name"] == "00011_00_00012_00"
    test = viton_root / "test"
    # paired: the person's own garment; unpaired: the pair file's second column
    assert torch.equal(paired[0]["garment"], read_rgb(test / "cloth" / "00011_00.jpg", RES))
    assert torch.equal(unpaired[0]["garment"], read_rgb(test / "cloth" / "00012_00.jpg", RES))
    assert torch.equal(unpaired[0]["person"], read_rgb(test / "image" / "00011_00.jpg", RES))
    assert not torch.equal(unpaired[0]["garment"], paired[0]["garment"])


def test_viton_masks_agnostic_box_and_pose(viton_root):
    ds = VitonHD(viton_root, "test", "paired", resolution=RES, use_pose=True)
    s = ds[1]  # agnostic-mask rows 18..47, cols 10..37 at 64x48 -> rows 9..23, cols 5..18 at 32x24
    expected = torch.zeros(1, *RES)
    expected[:, 9:24, 5:19] = 1
    assert torch.equal(s["mask"], expected)
    assert s["box"].tolist() == [9, 5, 24, 19]
    gm = torch.zeros(1, *RES)
    gm[:, 4:28, 4:20] = 1  # cloth-mask rows 8..55, cols 8..39
    assert torch.equal(s["garment_mask"], gm)
    published = read_rgb(viton_root / "test" / "agnostic-v3.2" / "00012_00.jpg", RES)
    inside = s["mask"].bool().expand(3, -1, -1)
    assert torch.all(s["agnostic"][inside] == 0)
    assert torch.equal(s["agnostic"][~inside], published[~inside])
    assert s["pose"].shape == (3, *RES)
    check_sample(s)


def test_viton_worn_mask_is_the_upper_clothes_of_the_parse(viton_root):
    """Labels 5 (upper clothes) and 7 (coat) of image-parse-v3; not face, hair, arm or pants."""
    ds = VitonHD(viton_root, "test", "unpaired", resolution=RES)
    for k in range(3):
        s = ds[k]
        check_sample(s)
        # Full size: rows 16+2k..43+2k, cols 10..37; nearest 2x down -> rows 8+k..21+k, cols 5..18.
        expected = torch.zeros(1, *RES)
        expected[:, 8 + k:22 + k, 5:19] = 1
        assert torch.equal(s["worn_mask"], expected), k
    full = VitonHD(viton_root, "test", resolution=(H, W))[1]
    expected = torch.zeros(1, H, W)
    expected[:, 18:46, 10:38] = 1
    assert torch.equal(full["worn_mask"], expected)
    # The flip moves it with the person.
    flipped = JointAugment(flip_prob=1.0)(full)
    assert torch.equal(flipped["worn_mask"], expected.flip(-1))


def test_viton_without_parse_falls_back_to_the_inpainting_mask_and_says_so_once(tmp_path, caplog):
    root = make_viton(tmp_path / "v", VITON_IDS, pose=False, parse=False)
    with caplog.at_level(logging.WARNING, logger="tryon_data"):
        ds = VitonHD(root, "test", resolution=RES)
        VitonHD(root, "test", "unpaired", resolution=RES)
        VitonHD(root, "train", resolution=RES)
        s = ds[1]
    warnings = [r.getMessage() for r in caplog.records if "worn_mask" in r.getMessage()]
    assert len(warnings) == 1 and "VITON-HD" in warnings[0] and "image-parse-v3" in warnings[0]
    assert "falls back to the inpainting mask" in warnings[0]
    assert torch.equal(s["worn_mask"], s["mask"])
    check_sample(s)


def test_viton_with_part_of_the_parse_folder_is_a_broken_tree(tmp_path):
    root = make_viton(tmp_path / "v", VITON_IDS, pose=False)
    gone = root / "test" / "image-parse-v3" / "00012_00.png"
    gone.unlink()
    with pytest.raises(DatasetError, match=r"(?s)optional 'worn_mask'.*1 of 3 required files.*00012_00.png"):
        VitonHD(root, "test", resolution=RES)


def test_viton_resizes_to_the_configured_resolution(viton_root):
    s = VitonHD(viton_root, "test", resolution=(48, 36))[0]
    assert all(s[k].shape[-2:] == (48, 36) for k in ("person", "garment", "garment_mask", "agnostic", "mask"))
    # flat colour blocks keep their colour (up to JPEG) after resizing
    top_left = (s["person"][:, 2:20, 2:14] + 1) * 127.5
    ref = np.asarray(_rgb(11 * 10 + len("image")), np.float32)[0, 0]
    assert torch.allclose(top_left.mean((1, 2)), torch.tensor(ref), atol=4)


def test_viton_missing_file_is_named_before_anything_loads(tmp_path):
    root = make_viton(tmp_path / "v", VITON_IDS, pose=False)
    gone = root / "test" / "agnostic-mask" / "00012_00_mask.png"
    gone.unlink()
    with pytest.raises(DatasetError) as err:
        VitonHD(root, "test", "paired", resolution=RES)
    msg = str(err.value)
    assert str(gone) in msg and "1 of 15 required files" in msg and "test/agnostic-mask/" in msg
    # the pose folder is only required with use_pose: 3 files in a missing folder
    with pytest.raises(DatasetError, match=r"(?s)3 of 18 required files.*image-densepose/: 3 missing \(folder missing\)"):
        VitonHD(root, "train", "paired", resolution=RES, use_pose=True)


def test_missing_file_stops_the_trainer_before_the_run_dir_exists(tmp_path):
    from train import Trainer

    root = make_viton(tmp_path / "v", VITON_IDS, pose=False)
    gone = root / "train" / "cloth" / "00002_00.jpg"
    gone.unlink()
    run = tmp_path / "run"
    cfg = load_config(overrides=["data.name=viton_hd", f"data.root={root}", "data.resolution=[32,24]",
                                 f"train.output_dir={run}", "tracker.kind=none", "model.unet.size=test",
                                 "stability.position=0", "stability.placement=0", "stability.sink=0"])
    with pytest.raises(DatasetError, match=str(gone)):
        Trainer(cfg)
    assert not run.exists()


def test_pair_file_problems_are_named(tmp_path):
    root = make_viton(tmp_path / "v", VITON_IDS, pose=False)
    (root / "test_pairs.txt").write_text("00011_00.jpg 00012_00.jpg\nbroken-line\n")
    with pytest.raises(DatasetError, match=r"test_pairs.txt.*line 2: 'broken-line'"):
        VitonHD(root, "test", resolution=RES)
    (root / "train_pairs.txt").unlink()
    with pytest.raises(DatasetError, match="pair file not found: .*train_pairs.txt"):
        VitonHD(root, "train", resolution=RES)


def test_corrupt_jpeg_is_named_or_skipped(tmp_path, caplog):
    root = make_viton(tmp_path / "v", VITON_IDS, pose=False)
    bad = root / "test" / "image" / "00011_00.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: the header parses, the data does not
    strict = VitonHD(root, "test", resolution=RES)
    with pytest.raises(DatasetError, match=f"cannot read {bad}"):
        strict[0]
    lenient = VitonHD(root, "test", resolution=RES, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="tryon_data"):
        s = lenient[0]
        again = lenient[0]
    assert s["name"] == again["name"] == "00012_00"  # the next good sample stands in
    assert lenient.skipped == 1 and lenient.bad_files == {0: str(bad)}
    assert "1 skipped so far" in caplog.text and str(bad) in caplog.text
    assert lenient[1]["name"] == "00012_00" and lenient[2]["name"] == "00013_00"


WEIGHTS = ["model.codec.pretrained=/m", "model.unet.pretrained=/m", "model.garment.pretrained=/c"]


def test_build_dataset_dispatches_real_data(viton_root, dress_root):
    from train.data import build_dataset

    cfg = load_config(files=[ROOT / "configs" / "viton_hd.yaml"],
                      overrides=[f"data.root={viton_root}", "data.resolution=[32,24]", *WEIGHTS])
    assert cfg.data.flip_prob == 0.5 and cfg.data.color_jitter == 0.05
    train = build_dataset(cfg.data, "train")
    val = build_dataset(cfg.data, "val")
    test = build_dataset(cfg.data, "test", mode="unpaired", num_samples=2)
    assert isinstance(train, VitonHD) and train.augment is not None and train.augment.active
    assert (val.split, val.mode, len(val), val.augment) == ("test", "paired", 3, None)  # num_val 8 > 3 pairs
    assert len(test) == 2 and test.mode == "unpaired"
    dcfg = load_config(files=[ROOT / "configs" / "dresscode.yaml"],
                       overrides=[f"data.root={dress_root}", "data.category=dresses", *WEIGHTS])
    dtest = build_dataset(dcfg.data, "test", "unpaired")
    assert isinstance(dtest, DressCode) and len(dtest) == 2 and dcfg.data.resolution == [512, 384]
    with pytest.raises(ConfigError, match="data.root"):
        load_config(files=[ROOT / "configs" / "viton_hd.yaml"])


# ---------------------------------------------------------------------------------- DressCode
def test_dresscode_categories_modes_and_names(dress_root):
    everything = DressCode(dress_root, "test", "paired", resolution=RES)
    assert len(everything) == 6
    assert [everything[i]["name"] for i in range(6)] == [
        "dresses_020001_0", "dresses_020002_0", "upper_body_000001_0", "upper_body_000002_0",
        "lower_body_010001_0", "lower_body_010002_0"]
    upper = DressCode(dress_root, "test", "unpaired", category="upper_body", resolution=RES, use_pose=True)
    s = upper[0]
    check_sample(s)
    assert s["name"] == "upper_body_000001_0_000002_1" and s["pose"].shape == (3, *RES)
    imgs = dress_root / "upper_body" / "images"
    assert torch.equal(s["garment"], read_rgb(imgs / "000002_1.jpg", RES))
    assert torch.equal(s["person"], read_rgb(imgs / "000001_0.jpg", RES))
    two = DressCode(dress_root, "train", category="upper_body,dresses", resolution=RES)
    assert len(two) == 4 and all(check_sample(two[i]) is None for i in range(4))
    with pytest.raises(ValueError, match="data.category"):
        DressCode(dress_root, "test", category="shoes", resolution=RES)


def test_dresscode_mask_agnostic_and_garment_mask(dress_root):
    s = DressCode(dress_root, "test", "paired", category="upper_body", resolution=(H, W))[0]
    lab = _labels("upper_body")
    m = s["mask"][0].bool().numpy()
    assert m[lab == 4].all()                       # the worn garment is always repainted
    assert not m[lab == 11].any() and not m[lab == 6].any() and not m[lab == 9].any()  # head, pants, shoes stay
    assert torch.all(s["agnostic"][:, m] == 0) and torch.equal(s["agnostic"][:, ~m], s["person"][:, ~m])
    assert s["box"].tolist() == [int(np.nonzero(m.any(1))[0][0]), int(np.nonzero(m.any(0))[0][0]),
                                 int(np.nonzero(m.any(1))[0][-1]) + 1, int(np.nonzero(m.any(0))[0][-1]) + 1]
    gm = s["garment_mask"][0]
    assert gm[12:48, 10:38].all() and not gm[:8].any() and not gm[:, :6].any()  # red block on white


def test_dresscode_worn_mask_is_the_category_garment(dress_root):
    """upper_body: upper clothes 4; lower_body: skirt 5 / pants 6; dresses: dress 7 (label_maps)."""
    # _labels at 64x48: class 4 or 7 at rows 14..33, cols 14..33; class 6 or 7 at rows 34..55,
    # cols 16..31. Nearest 2x down: rows 7..16, cols 7..16 and rows 17..27, cols 8..15.
    top = torch.zeros(1, *RES)
    top[:, 7:17, 7:17] = 1
    bottom = torch.zeros(1, *RES)
    bottom[:, 17:28, 8:16] = 1
    for category, expected in (("upper_body", top), ("lower_body", bottom), ("dresses", top + bottom)):
        s = DressCode(dress_root, "test", "paired", category=category, resolution=RES)[0]
        check_sample(s)
        assert torch.equal(s["worn_mask"], expected), category


def test_dresscode_inpainting_mask_hand_cases():
    # keypoints in the 384x512 frame map to pixels by (W/384, H/512)
    kp = keypoints_to_pixels({"keypoints": [[x, y, 1, i] for i, (x, y) in enumerate(KEYPOINTS)]}, (H, W))
    assert np.allclose(kp[2], [150 * W / 384, 115 * H / 512])
    undetected = keypoints_to_pixels([[0, 0, 0, i] for i in range(18)], (H, W))
    assert np.isnan(undetected).all() and not limb_region(undetected, "dresses", (H, W)).any()
    # an arm line from keypoints alone (no arm labels): covered by the upper-body mask
    labels = np.zeros((512, 384), np.int64)
    region = limb_region(keypoints_to_pixels([[x, y, 1, i] for i, (x, y) in enumerate(KEYPOINTS)], (512, 384)),
                         "upper_body", (512, 384))
    assert region[240, 132] and region[160, 250] and not region[450, 192]  # right forearm, left upper arm; not feet
    mask = inpainting_mask(labels, None, "upper_body")
    assert not mask.any()  # nothing to repaint without labels or keypoints
    labels[100:200, 100:200] = 4
    labels[150:160, 150:160] = 2  # hair over the shirt stays
    mask = inpainting_mask(labels, None, "upper_body")
    # dilation: 5x5, 5 times at H=512 -> the shirt grows by exactly 10 px (square), hair cut out
    expected = np.zeros_like(mask)
    expected[90:210, 90:210] = True
    expected[150:160, 150:160] = False
    assert np.array_equal(mask, expected)
    lower = inpainting_mask(labels, None, "lower_body")  # an upper-body shirt is kept for lower_body
    assert not lower.any()


def test_label_maps_keep_palette_indices(tmp_path):
    lab = np.arange(18, dtype=np.uint8).repeat(4).reshape(8, 9)
    im = Image.fromarray(lab, mode="P")
    im.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
    im.save(tmp_path / "p.png")
    assert np.array_equal(read_labels(tmp_path / "p.png", (8, 9)), lab)


# ------------------------------------------------------------------------------- augmentation
def test_joint_flip_and_jitter_keep_the_sample_consistent(viton_root):
    base = VitonHD(viton_root, "test", resolution=RES)[1]
    flipped = JointAugment(flip_prob=1.0)(base)
    for k in ("person", "garment", "garment_mask", "agnostic", "mask"):
        assert torch.equal(flipped[k], base[k].flip(-1)), k
    y0, x0, y1, x1 = base["box"].tolist()
    assert flipped["box"].tolist() == [y0, RES[1] - x1, y1, RES[1] - x0]
    # jitter: one set of factors for person, garment and agnostic; the grey region stays grey
    same = {**base, "garment": base["person"].clone(), "agnostic": base["person"] * (1 - base["mask"])}
    g = torch.Generator().manual_seed(3)
    out = JointAugment(color_jitter=0.3)(same, generator=g)
    assert torch.allclose(out["garment"], out["person"])
    assert not torch.allclose(out["person"], base["person"], atol=1e-3)
    m = out["mask"].bool().expand(3, -1, -1)
    assert torch.all(out["agnostic"][m] == 0)
    assert torch.allclose(out["agnostic"][~m], out["person"][~m])  # still the person outside the mask
    check_sample(out)


def test_training_split_augments_and_test_does_not(viton_root):
    torch.manual_seed(0)
    tr = VitonHD(viton_root, "train", resolution=RES, flip_prob=1.0)
    plain = VitonHD(viton_root, "train", resolution=RES)
    assert torch.equal(tr[0]["person"], plain[0]["person"].flip(-1))
    test = VitonHD(viton_root, "test", resolution=RES, flip_prob=1.0)
    assert test.augment is None


def test_white_background_garment_mask():
    g = torch.ones(3, 10, 8)
    g[:, 2:8, 2:6] = -0.5
    g[:, 4, 3] = 1.0  # a white print inside the garment: filled
    m = garment_mask_from_white(g)
    expected = torch.zeros(1, 10, 8)
    expected[:, 2:8, 2:6] = 1
    assert torch.equal(m, expected)
