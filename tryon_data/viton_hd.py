"""VITON-HD in its published layout.

::

    <root>/train_pairs.txt, <root>/test_pairs.txt     "person garment" file names, one pair a line
    <root>/{train,test}/image/<id>_00.jpg               person
                        cloth/<id>_00.jpg               garment
                        cloth-mask/<id>_00.jpg          garment mask
                        agnostic-v3.2/<id>_00.jpg       person with the garment area greyed
                        agnostic-mask/<id>_00_mask.png  inpainting mask
                        image-densepose/<id>_00.jpg     densepose rendering (data.use_pose only)
                        image-parse-v3/<id>_00.png      human parsing, 20 LIP classes (optional:
                                                        the worn-garment mask; without the folder
                                                        it falls back to the inpainting mask)

Modes: ``test_pairs.txt`` is the *unpaired* test list (another person's garment);
``mode="paired"`` substitutes the person's own garment (cloth/<person id>), which is how
the paired metrics (SSIM, LPIPS) are computed. The training list names the same id twice.

The agnostic is the published ``agnostic-v3.2`` image (what StableVITON conditions on),
with the inpainting mask greyed as well: the contract's "agnostic is grey inside the mask"
then holds exactly, and nothing of the worn garment can leak into the region to generate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .images import read_labels, read_mask, read_rgb
from .real import RealTryOn, stem
from .tree_check import read_pairs

# LIP classes of image-parse-v3 that make up the worn garment: upper clothes 5, dress 6, coat 7
# (the grouping VITON-HD's own preprocessing uses for its "upper" parse channel).
UPPER_LABELS: tuple[int, ...] = (5, 6, 7)


@dataclass(frozen=True)
class VitonEntry:
    person: str   # file name in image/, e.g. 05006_00.jpg
    garment: str  # file name in cloth/


class VitonHD(RealTryOn[VitonEntry]):
    """VITON-HD (split train | test, mode paired | unpaired) as sample-contract dicts.

    Names: the person's id in paired mode ("05006_00"), "<person>_<garment>" in unpaired
    mode (a person may appear with several garments in custom pair lists).
    """

    dataset_name = "VITON-HD"

    def __init__(self, root: str | Path, split: str = "train", mode: str = "paired",
                 resolution: tuple[int, int] = (512, 384), use_pose: bool = False, skip_bad: bool = False,
                 flip_prob: float = 0.0, color_jitter: float = 0.0, num_samples: int | None = None) -> None:
        super().__init__(root, split, mode, resolution, use_pose, skip_bad, flip_prob, color_jitter, num_samples)

    def list_entries(self) -> list[VitonEntry]:
        pairs = read_pairs(self.root / f"{self.split}_pairs.txt", self.dataset_name)
        if self.mode == "paired":
            return [VitonEntry(p, p) for p, _ in pairs]
        return [VitonEntry(p, g) for p, g in pairs]

    def _paths(self, e: VitonEntry) -> dict[str, Path]:
        d = self.root / self.split
        paths = {
            "person": d / "image" / e.person,
            "garment": d / "cloth" / e.garment,
            "garment_mask": d / "cloth-mask" / e.garment,
            "agnostic": d / "agnostic-v3.2" / e.person,
            "mask": d / "agnostic-mask" / f"{stem(e.person)}_mask.png",
        }
        if self.use_pose:
            paths["pose"] = d / "image-densepose" / e.person
        return paths

    def required_files(self, entry: VitonEntry) -> list[Path]:
        return list(self._paths(entry).values())

    def optional_files(self, entry: VitonEntry) -> dict[str, Path]:
        return {"worn_mask": self.root / self.split / "image-parse-v3" / f"{stem(entry.person)}.png"}

    def entry_name(self, e: VitonEntry) -> str:
        return stem(e.person) if self.mode == "paired" else f"{stem(e.person)}_{stem(e.garment)}"

    def load(self, entry: VitonEntry) -> dict[str, Any]:
        p, size = self._paths(entry), self.resolution
        mask = read_mask(p["mask"], size)
        sample: dict[str, Any] = {
            "person": read_rgb(p["person"], size),
            "garment": read_rgb(p["garment"], size),
            "garment_mask": read_mask(p["garment_mask"], size),
            "agnostic": read_rgb(p["agnostic"], size) * (1 - mask),
            "mask": mask,
            "worn_mask": self._worn_mask(entry, mask),
            "name": self.entry_name(entry),
        }
        if self.use_pose:
            sample["pose"] = read_rgb(p["pose"], size)
        return sample

    def _worn_mask(self, entry: VitonEntry, mask: torch.Tensor) -> torch.Tensor:
        """Upper clothes of the person's parsing (nearest-resized labels), else the inpainting mask."""
        if "worn_mask" not in self.present:
            return mask.clone()
        labels = read_labels(self.optional_files(entry)["worn_mask"], self.resolution)
        return torch.from_numpy(np.isin(labels, UPPER_LABELS).astype(np.float32))[None]
