"""DressCode inpainting masks for all three categories, from label maps and keypoint JSON files
written here, against a reference written from the data set's documentation (the label list,
OpenPose-18 keypoint order) and the rule in `tryon_data/dresscode.py`'s docstring, not from the
module's constants or functions. Plus explicit pixels that name each part of the rule.

Image 128 x 96: keypoints in DressCode's 384 x 512 frame map by exactly 1/4; limb lines are
0.09 H = 12 px wide with round joints; the dilation is a 5x5 square applied round(5 * 128 / 512)
= 1 time (2 px in every direction, corners included)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tryon_data.dresscode import DressCode

H, W = 128, 96

# DressCode's human-parsing classes (as published with the data set)
LABEL = {"background": 0, "hat": 1, "hair": 2, "sunglasses": 3, "upper_clothes": 4, "skirt": 5, "pants": 6,
         "dress": 7, "belt": 8, "left_shoe": 9, "right_shoe": 10, "head": 11, "left_leg": 12, "right_leg": 13,
         "left_arm": 14, "right_arm": 15, "bag": 16, "scarf": 17}
# OpenPose-18 order
KP = {"nose": 0, "neck": 1, "r_shoulder": 2, "r_elbow": 3, "r_wrist": 4, "l_shoulder": 5, "l_elbow": 6,
      "l_wrist": 7, "r_hip": 8, "r_knee": 9, "r_ankle": 10, "l_hip": 11, "l_knee": 12, "l_ankle": 13,
      "r_eye": 14, "l_eye": 15, "r_ear": 16, "l_ear": 17}

# The rule, per category: the worn garment and the skin it covers or uncovers are repainted;
# head, hair, hat, sunglasses, shoes and bag always stay, and so do the other category's clothes
# (with the limbs they dress); the worn garment's own pixels are always repainted.
WORN = {"upper_body": ["upper_clothes"], "lower_body": ["skirt", "pants"], "dresses": ["dress"]}
SKIN = {"upper_body": ["left_arm", "right_arm"], "lower_body": ["left_leg", "right_leg"],
        "dresses": ["left_arm", "right_arm", "left_leg", "right_leg"]}
ALWAYS_KEPT = ["hat", "hair", "sunglasses", "left_shoe", "right_shoe", "head", "bag"]
OTHER_CLOTHES = {"upper_body": ["skirt", "pants", "left_leg", "right_leg"],
                 "lower_body": ["upper_clothes", "left_arm", "right_arm"], "dresses": []}
ARM_BONES = [("neck", "r_shoulder"), ("neck", "l_shoulder"), ("r_shoulder", "r_elbow"), ("r_elbow", "r_wrist"),
             ("l_shoulder", "l_elbow"), ("l_elbow", "l_wrist")]
LEG_BONES = [("r_hip", "l_hip"), ("r_hip", "r_knee"), ("r_knee", "r_ankle"), ("l_hip", "l_knee"),
             ("l_knee", "l_ankle")]
TORSO = ["r_shoulder", "l_shoulder", "l_hip", "r_hip"]
PELVIS = ["r_hip", "l_hip", "l_knee", "r_knee"]
BONES = {"upper_body": ARM_BONES, "lower_body": LEG_BONES, "dresses": ARM_BONES + LEG_BONES}
POLYGONS = {"upper_body": [TORSO], "lower_body": [PELVIS], "dresses": [TORSO, PELVIS]}

# A standing figure: keypoints in pixels (x, y) here, stored x4 in the 384 x 512 frame
PIXEL_XY = {"nose": (48, 18), "neck": (48, 30), "r_shoulder": (34, 32), "r_elbow": (28, 50), "r_wrist": (26, 68),
            "l_shoulder": (62, 32), "l_elbow": (68, 50), "l_wrist": (76, 64), "r_hip": (40, 64),
            "r_knee": (35, 90), "r_ankle": (35, 115), "l_hip": (56, 64), "l_knee": (61, 90), "l_ankle": (61, 115),
            "r_eye": (46, 16), "l_eye": (50, 16), "r_ear": (44, 17), "l_ear": (52, 17)}
FRAME_XY = {k: (4 * x, 4 * y) for k, (x, y) in PIXEL_XY.items()}


def label_map(category: str) -> np.ndarray:
    """Rectangles (rows, cols half-open) per class. Lower garment: short pants for upper_body,
    a mini skirt for lower_body; the dress runs from the shoulders to the skirt's hem. The legs
    stop short of the ankles and stand apart, so that limb lines and the pelvis polygon reach
    background pixels that no label covers."""
    lab = np.zeros((H, W), np.uint8)
    boxes = [("hat", 0, 4, 40, 56), ("hair", 4, 10, 38, 58), ("head", 10, 26, 40, 56), ("sunglasses", 14, 17, 42, 54),
             ("scarf", 26, 30, 40, 56), ("right_arm", 30, 70, 22, 30), ("left_arm", 30, 70, 66, 74),
             ("bag", 50, 75, 80, 90), ("right_leg", 80, 105, 30, 40), ("left_leg", 80, 105, 56, 66),
             ("right_shoe", 118, 124, 30, 40), ("left_shoe", 118, 124, 56, 66)]
    if category == "dresses":
        boxes += [("dress", 30, 80, 30, 66)]
    else:
        boxes += [("upper_clothes", 30, 62, 30, 66), ("belt", 62, 65, 30, 66),
                  ("pants" if category == "upper_body" else "skirt", 65, 80, 32, 64)]
    for name, r0, r1, c0, c1 in boxes:
        lab[r0:r1, c0:c1] = LABEL[name]
    return lab


def keypoint_json(undetected: tuple[str, ...] = ()) -> dict:
    """DressCode's keypoint file: 18 x [x, y, score, id]; undetected points sit at (0, 0)."""
    rows = []
    for name, i in sorted(KP.items(), key=lambda kv: kv[1]):
        x, y = FRAME_XY[name]
        rows.append([0.0, 0.0, 0.0, i] if name in undetected else [float(x), float(y), 0.9, i])
    return {"keypoints": rows}


def limbs_drawn(category: str, undetected: tuple[str, ...]) -> np.ndarray:
    """Lines 12 px wide with 12 px discs at both ends for every bone whose two keypoints were
    detected, and the filled polygons whose corners all were."""
    canvas = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(canvas)
    xy = PIXEL_XY
    for a, b in BONES[category]:
        if a in undetected or b in undetected:
            continue
        draw.line([xy[a], xy[b]], fill=255, width=12)
        for x, y in (xy[a], xy[b]):
            draw.ellipse([x - 6, y - 6, x + 6, y + 6], fill=255)
    for poly in POLYGONS[category]:
        if not any(p in undetected for p in poly):
            draw.polygon([xy[p] for p in poly], fill=255)
    return np.asarray(canvas) > 0


def grow_2px(m: np.ndarray) -> np.ndarray:
    """Binary dilation by a 5x5 square, by shifting: a pixel is on when any pixel within 2 rows
    and 2 columns is (outside the image counts as off)."""
    p = np.pad(m, 2)
    out = np.zeros_like(m)
    for dy in range(5):
        for dx in range(5):
            out |= p[dy:dy + H, dx:dx + W]
    return out


def reference_mask(labels: np.ndarray, category: str, undetected: tuple[str, ...] = ()) -> np.ndarray:
    def of(names: list[str]) -> np.ndarray:
        return np.isin(labels, [LABEL[n] for n in names])

    region = grow_2px(of(WORN[category] + SKIN[category]) | limbs_drawn(category, undetected))
    keep = of(ALWAYS_KEPT + OTHER_CLOTHES[category])
    return (region & ~keep) | of(WORN[category])


def write_tree(root: Path, undetected: tuple[str, ...] = ()) -> Path:
    """One sample per category in DressCode's layout (person and garment photos are plain)."""
    for cat in ("upper_body", "lower_body", "dresses"):
        d = root / cat
        for folder in ("images", "label_maps", "keypoints"):
            (d / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (W, H), (90, 140, 200)).save(d / "images" / "000001_0.jpg")
        Image.new("RGB", (W, H), (255, 255, 255)).save(d / "images" / "000001_1.jpg")
        Image.fromarray(label_map(cat)).save(d / "label_maps" / "000001_4.png")
        (d / "keypoints" / "000001_2.json").write_text(json.dumps(keypoint_json(undetected)))
        (d / "test_pairs_paired.txt").write_text("000001_0.jpg 000001_1.jpg\n")
    return root


def loaded_mask(root: Path, category: str) -> np.ndarray:
    s = DressCode(root, "test", "paired", category=category, resolution=(H, W))[0]
    m = s["mask"][0].numpy()
    assert set(np.unique(m)) <= {0.0, 1.0}
    assert torch.all(s["agnostic"][:, s["mask"][0] > 0] == 0)
    return m > 0


CATEGORIES = ["upper_body", "lower_body", "dresses"]


@pytest.mark.parametrize("category", CATEGORIES)
@pytest.mark.parametrize("undetected", [(), ("l_wrist", "r_hip")], ids=["all_keypoints", "two_undetected"])
def test_dresscode_mask_equals_the_reference(tmp_path, category, undetected):
    root = write_tree(tmp_path, undetected)
    got = loaded_mask(root, category)
    want = reference_mask(label_map(category), category, undetected)
    assert want.sum() > 500  # a substantial region, not a vacuous comparison
    diff = np.argwhere(got != want)
    assert diff.size == 0, f"{len(diff)} pixels differ, e.g. (row, col) {diff[:8].tolist()}"


def test_dresscode_mask_pixels_by_hand(tmp_path):
    """Each part of the rule at named pixels (row, col), chosen at least 2 px away from where
    a drawing detail could matter, independent of any drawing code."""
    full = {c: loaded_mask(write_tree(tmp_path / "full"), c) for c in CATEGORIES}
    part = {c: loaded_mask(write_tree(tmp_path / "part", ("l_wrist", "r_hip")), c) for c in CATEGORIES}
    up, low, dress = full["upper_body"], full["lower_body"], full["dresses"]
    labs = {c: label_map(c) for c in CATEGORIES}
    # always kept, in every category: head, hair, hat, sunglasses, shoes, bag
    for c, m in full.items():
        for name in ALWAYS_KEPT:
            assert not m[labs[c] == LABEL[name]].any(), (c, name)
    # the worn garment, every pixel
    assert up[labs["upper_body"] == LABEL["upper_clothes"]].all()
    assert low[labs["lower_body"] == LABEL["skirt"]].all()
    assert dress[labs["dresses"] == LABEL["dress"]].all()
    # the other category's clothes (and the limbs they dress) stay
    assert not up[labs["upper_body"] == LABEL["pants"]].any() and not up[labs["upper_body"] == LABEL["right_leg"]].any()
    assert not low[labs["lower_body"] == LABEL["upper_clothes"]].any()
    assert not low[labs["lower_body"] == LABEL["left_arm"]].any()
    # the category's skin: arms for upper_body, legs for lower_body, both for dresses
    assert up[labs["upper_body"] == LABEL["left_arm"]].all() and low[labs["lower_body"] == LABEL["left_leg"]].all()
    assert dress[labs["dresses"] == LABEL["right_arm"]].all() and dress[labs["dresses"] == LABEL["right_leg"]].all()
    # label growth: 2 px around the worn garment and skin, not 3 (background beside the right arm)
    assert labs["upper_body"][40, 20] == 0 and up[40, 20] and not up[40, 19]

    # keypoints alone (background pixels, no label near):
    # the disc at the right wrist (x 26, y 68; radius 6, grown 2) below the arm label (rows < 70)
    assert labs["upper_body"][74, 26] == 0 and up[74, 26] and dress[74, 26] and not low[74, 26]
    assert not up[79, 26]
    # the right shin line (knee (35, 90) -> ankle (35, 115)) below the leg label (rows < 105)
    assert labs["lower_body"][112, 35] == 0 and low[112, 35] and dress[112, 35] and not up[112, 35]
    # the pelvis polygon between the legs, under the skirt's hem (rows >= 80)
    assert labs["lower_body"][85, 48] == 0 and low[85, 48] and dress[85, 48] and not up[85, 48]
    # the left forearm line reaches past the arm label towards the bag (cols 80..89), which stays
    assert labs["upper_body"][64, 77] == 0 and up[64, 77] and not up[64, 81]
    # scarf and belt: neither kept nor repainted by label; in where the region reaches them
    assert labs["upper_body"][27, 48] == LABEL["scarf"] and up[27, 48] and dress[27, 48] and not low[27, 48]
    assert labs["upper_body"][64, 48] == LABEL["belt"] and up[64, 48] and low[64, 48]  # torso / pelvis polygon

    # undetected keypoints draw nothing that needs them:
    # no left wrist -> no left forearm line; no right hip -> no torso or pelvis polygon
    assert not part["upper_body"][64, 77]
    assert not part["upper_body"][64, 48]     # the belt row under the torso polygon's lower edge
    assert not part["lower_body"][85, 48] and not part["dresses"][85, 48]
    # ... while bones without them stay: right forearm disc, right shin line
    assert part["upper_body"][74, 26] and part["lower_body"][112, 35]
    # ... and labels still give their part
    assert part["dresses"][labs["dresses"] == LABEL["left_arm"]].all()
    assert part["lower_body"][labs["lower_body"] == LABEL["skirt"]].all()
