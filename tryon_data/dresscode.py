"""DressCode in its published layout, with the inpainting mask derived as public loaders do.

::

    <root>/<category>/train_pairs.txt, test_pairs_paired.txt, test_pairs_unpaired.txt
    <root>/<category>/images/<n>_0.jpg        person
                      images/<n>_1.jpg        garment (product photo on white)
                      label_maps/<n>_4.png    human parsing, 18 classes (LABELS below)
                      keypoints/<n>_2.json    {"keypoints": 18 x [x, y, score, id]} (OpenPose order,
                                              coordinates in a 384 x 512 frame)
                      dense/<n>_5.png         densepose part labels (data.use_pose only)

with ``<category>`` one of upper_body, lower_body, dresses. DressCode ships no agnostic
images, inpainting masks or garment masks; they are derived here:

* inpainting mask = (parsing labels of the region to repaint, unioned with thick lines /
  polygons over the limbs and torso from the keypoints), dilated, minus the classes that
  must stay (head, hair, hat, sunglasses, shoes, bag, and the other category's clothes),
  plus every pixel of the worn garment's own class. Region labels per category (choice
  made after the aimagelab/LaDI-VTON loaders: the worn garment plus the skin it may
  uncover or cover): upper_body = upper clothes 4 + arms 14, 15; lower_body = skirt 5,
  pants 6 + legs 12, 13; dresses = dress 7 + arms 14, 15 + legs 12, 13.
* agnostic = person with the mask greyed (0 in [-1, 1]).
* garment mask = non-white pixels of the product photo, holes filled.
* worn-garment mask = the parsing labels of the category's garment (GARMENT_LABELS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .images import (UnreadableFileError, garment_mask_from_white, labels_to_rgb, read_json,
                     read_labels, read_rgb)
from .real import RealTryOn, stem
from .tree_check import read_pairs

CATEGORIES: tuple[str, ...] = ("dresses", "upper_body", "lower_body")
LABELS: dict[str, int] = {
    "background": 0, "hat": 1, "hair": 2, "sunglasses": 3, "upper_clothes": 4, "skirt": 5, "pants": 6,
    "dress": 7, "belt": 8, "left_shoe": 9, "right_shoe": 10, "head": 11, "left_leg": 12, "right_leg": 13,
    "left_arm": 14, "right_arm": 15, "bag": 16, "scarf": 17,
}
KEYPOINT_FRAME = (512, 384)  # (H, W) of the keypoints' coordinate frame

GARMENT_LABELS = {"upper_body": (4,), "lower_body": (5, 6), "dresses": (7,)}
REGION_LABELS = {"upper_body": (4, 14, 15), "lower_body": (5, 6, 12, 13), "dresses": (7, 12, 13, 14, 15)}
KEEP_LABELS = {
    "upper_body": (1, 2, 3, 9, 10, 11, 16, 5, 6, 12, 13),
    "lower_body": (1, 2, 3, 9, 10, 11, 16, 4, 14, 15),
    "dresses": (1, 2, 3, 9, 10, 11, 16),
}
# OpenPose-18: 1 neck, 2/5 shoulders, 3/6 elbows, 4/7 wrists, 8/11 hips, 9/12 knees, 10/13 ankles.
_ARMS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7))
_LEGS = ((8, 11), (8, 9), (9, 10), (11, 12), (12, 13))
_TORSO = (2, 5, 11, 8)
_PELVIS = (8, 11, 12, 9)
LIMBS = {"upper_body": (_ARMS, (_TORSO,)), "lower_body": (_LEGS, (_PELVIS,)),
         "dresses": (_ARMS + _LEGS, (_TORSO, _PELVIS))}


def parse_categories(category: str) -> tuple[str, ...]:
    """"all", one category, or a comma-separated list."""
    if category == "all":
        return CATEGORIES
    cats = tuple(c.strip() for c in category.split(",") if c.strip())
    bad = [c for c in cats if c not in CATEGORIES]
    if not cats or bad:
        raise ValueError(f"data.category={category!r}: expected 'all' or names from {CATEGORIES}")
    return cats


def keypoints_to_pixels(data: Any, size: tuple[int, int]) -> np.ndarray:
    """DressCode keypoint JSON -> float (18, 2) (x, y) in pixels of an (H, W) image; NaN
    for keypoints that were not detected (stored at or near the origin)."""
    kp = np.asarray(data["keypoints"] if isinstance(data, dict) else data, dtype=np.float64).reshape(-1, 4)[:, :2]
    h, w = size
    xy = kp * np.array([w / KEYPOINT_FRAME[1], h / KEYPOINT_FRAME[0]])
    xy[(kp[:, 0] <= 1) | (kp[:, 1] <= 1)] = np.nan
    return xy


def limb_region(keypoints: np.ndarray | None, category: str, size: tuple[int, int]) -> np.ndarray:
    """bool (H, W): thick lines over the limbs and filled torso/pelvis polygons whose
    keypoints were all detected. Line width 0.09 H (45 px at 512, as public loaders)."""
    h, w = size
    canvas = Image.new("L", (w, h), 0)
    if keypoints is None:
        return np.zeros((h, w), bool)
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(0.09 * h))
    lines, polygons = LIMBS[category]
    ok = ~np.isnan(keypoints).any(1)
    for a, b in lines:
        if ok[a] and ok[b]:
            pa, pb = tuple(keypoints[a]), tuple(keypoints[b])
            draw.line([pa, pb], fill=255, width=width)
            for x, y in (pa, pb):  # round joints, so bent limbs have no notch
                r = width / 2
                draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    for poly in polygons:
        if all(ok[i] for i in poly):
            draw.polygon([tuple(keypoints[i]) for i in poly], fill=255)
    return np.asarray(canvas) > 0


def inpainting_mask(labels: np.ndarray, keypoints: np.ndarray | None, category: str) -> np.ndarray:
    """bool (H, W) inpainting mask from a label map (at image size) and keypoints in pixels
    (see the module docstring). Dilation: 5x5, round(5 H / 512) times (at least once)."""
    from scipy import ndimage

    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    h, w = labels.shape
    region = np.isin(labels, REGION_LABELS[category]) | limb_region(keypoints, category, (h, w))
    region = ndimage.binary_dilation(region, structure=np.ones((5, 5), bool),
                                     iterations=max(1, round(5 * h / 512)))
    keep = np.isin(labels, KEEP_LABELS[category])
    return (region & ~keep) | np.isin(labels, GARMENT_LABELS[category])


@dataclass(frozen=True)
class DressEntry:
    category: str
    person: str   # images/<n>_0.jpg
    garment: str  # images/<n>_1.jpg


class DressCode(RealTryOn[DressEntry]):
    """DressCode (split train | test, mode paired | unpaired; categories: "all", one, or a
    comma-separated list) as sample-contract dicts. Names: "<category>_<person stem>"
    (paired) or "<category>_<person stem>_<garment stem>" (unpaired)."""

    dataset_name = "DressCode"

    def __init__(self, root: str | Path, split: str = "train", mode: str = "paired", category: str = "all",
                 resolution: tuple[int, int] = (512, 384), use_pose: bool = False, skip_bad: bool = False,
                 flip_prob: float = 0.0, color_jitter: float = 0.0, num_samples: int | None = None) -> None:
        self.categories = parse_categories(category)
        super().__init__(root, split, mode, resolution, use_pose, skip_bad, flip_prob, color_jitter, num_samples)

    def list_entries(self) -> list[DressEntry]:
        entries = []
        for cat in self.categories:
            name = "train_pairs.txt" if self.split == "train" else f"test_pairs_{self.mode}.txt"
            for p, g in read_pairs(self.root / cat / name, f"{self.dataset_name} {cat}"):
                entries.append(DressEntry(cat, p, g))
        return entries

    def _paths(self, e: DressEntry) -> dict[str, Path]:
        d = self.root / e.category
        n = stem(e.person).rsplit("_", 1)[0]  # "013563_0" -> "013563"
        paths = {
            "person": d / "images" / e.person,
            "garment": d / "images" / e.garment,
            "labels": d / "label_maps" / f"{n}_4.png",
            "keypoints": d / "keypoints" / f"{n}_2.json",
        }
        if self.use_pose:
            paths["pose"] = d / "dense" / f"{n}_5.png"
        return paths

    def required_files(self, entry: DressEntry) -> list[Path]:
        return list(self._paths(entry).values())

    def entry_name(self, e: DressEntry) -> str:
        name = f"{e.category}_{stem(e.person)}"
        return name if self.mode == "paired" else f"{name}_{stem(e.garment)}"

    def load(self, entry: DressEntry) -> dict[str, Any]:
        p, size = self._paths(entry), self.resolution
        person = read_rgb(p["person"], size)
        garment = read_rgb(p["garment"], size)
        labels = read_labels(p["labels"], size)
        data = read_json(p["keypoints"])
        try:
            keypoints = keypoints_to_pixels(data, size)
        except (KeyError, ValueError, TypeError) as err:
            raise UnreadableFileError(p["keypoints"], f"not 18 x [x, y, score, id] keypoints ({err})") from None
        if keypoints.shape[0] < 14:
            raise UnreadableFileError(p["keypoints"], f"expected 18 keypoints, got {keypoints.shape[0]}")
        mask = torch.from_numpy(inpainting_mask(labels, keypoints, entry.category).astype(np.float32))[None]
        sample: dict[str, Any] = {
            "person": person,
            "garment": garment,
            "garment_mask": garment_mask_from_white(garment),
            "agnostic": person * (1 - mask),
            "mask": mask,
            # The worn garment: its category's parsing classes (the same labels the mask adds back).
            "worn_mask": torch.from_numpy(np.isin(labels, GARMENT_LABELS[entry.category]).astype(np.float32))[None],
            "name": self.entry_name(entry),
        }
        if self.use_pose:
            sample["pose"] = labels_to_rgb(read_labels(p["pose"], size))
        return sample
