"""What VITON-HD and DressCode share: pair lists, the tree check, bad-file handling,
training augmentation, and the mapping from a :class:`DataConfig` to a data set."""

from __future__ import annotations

import itertools
import logging
from abc import abstractmethod
from pathlib import Path
from typing import Any, Generic, TypeVar

from torch.utils.data import Dataset

from .images import DatasetError, JointAugment, UnreadableFileError, mask_box
from .tree_check import check_files, find_missing

log = logging.getLogger("tryon_data")
# What a sample gets instead when a tree lacks an optional kind of file (key: the contract key).
FALLBACK = {"worn_mask": "'worn_mask' falls back to the inpainting mask"}
_warned: set[tuple[str, str, str]] = set()  # (data set, root, kind): say it once per process

E = TypeVar("E")  # one data set entry (a pair of file names and where they live)
SPLITS: tuple[str, ...] = ("train", "test")
MODES: tuple[str, ...] = ("paired", "unpaired")


class RealTryOn(Dataset, Generic[E]):
    """Base of the file-backed try-on data sets; subclasses list entries and load one.

    * The constructor checks the tree (every file every entry needs), so a broken data set
      fails before a run directory is written.
    * An unreadable file raises :class:`UnreadableFileError` naming it; with
      ``skip_bad=True`` the sample is replaced by the next readable one, a warning is
      logged with the running count, and :attr:`skipped` / :attr:`bad_files` say which.
      (With data loader workers each worker counts its own.)
    * ``split="train"`` applies :class:`JointAugment` (flip, colour jitter); test never.
    """

    dataset_name = "real"

    def __init__(self, root: str | Path, split: str, mode: str, resolution: tuple[int, int],
                 use_pose: bool, skip_bad: bool, flip_prob: float, color_jitter: float,
                 num_samples: int | None) -> None:
        if split not in SPLITS:
            raise ValueError(f"{self.dataset_name}: split must be one of {SPLITS}, got {split!r}")
        if mode not in MODES:
            raise ValueError(f"{self.dataset_name}: mode must be one of {MODES}, got {mode!r}")
        if len(resolution) != 2 or min(int(r) for r in resolution) < 8:
            raise ValueError(f"resolution: expected (H, W) with H, W >= 8, got {resolution}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(f"{self.dataset_name}: data.root {self.root} is not a directory")
        self.split, self.mode = split, mode
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.use_pose, self.skip_bad = bool(use_pose), bool(skip_bad)
        self.augment = JointAugment(flip_prob, color_jitter) if split == "train" else None
        entries = self.list_entries()
        if num_samples is not None:
            entries = entries[: max(0, int(num_samples))]
        if not entries:
            raise DatasetError(f"{self.dataset_name} at {self.root}: no {split} pairs")
        self.entries: list[E] = entries
        self.bad_files: dict[int, str] = {}
        check_files(itertools.chain.from_iterable(self.required_files(e) for e in entries), self.root,
                    f"{self.dataset_name} ({split}, {mode})")
        self.present: set[str] = self._check_optional(entries, f"{self.dataset_name} ({split}, {mode})")

    def _check_optional(self, entries: list[E], what: str) -> set[str]:
        """The optional kinds of file every entry has. A kind no entry has falls back (a warning
        naming the data set, once per process); one only some entries have is a broken tree and
        stops here, like a missing required file."""
        present = set()
        for kind in self.optional_files(entries[0]):
            paths = [self.optional_files(e)[kind] for e in entries]
            missing, total = find_missing(paths)
            if not missing:
                present.add(kind)
            elif len(missing) < total:
                check_files(paths, self.root, f"{what} optional {kind!r} files (a tree has all of them or none)")
            elif (key := (self.dataset_name, str(self.root), kind)) not in _warned:
                _warned.add(key)
                log.warning("%s at %s: no %s files (e.g. %s); %s", self.dataset_name, self.root, kind,
                            missing[0], FALLBACK.get(kind, "samples come without it"))
        return present

    # -- what subclasses provide -------------------------------------------------------------
    @abstractmethod
    def list_entries(self) -> list[E]:
        """All entries of (split, mode), in the pair files' order."""

    @abstractmethod
    def required_files(self, entry: E) -> list[Path]:
        """Every file ``load(entry)`` reads."""

    def optional_files(self, entry: E) -> dict[str, Path]:
        """Files ``load(entry)`` reads when the tree has them, by the contract key they give
        (``self.present`` says which kinds the tree has). None by default."""
        return {}

    @abstractmethod
    def entry_name(self, entry: E) -> str:
        """The sample's "name" (without reading any file)."""

    @abstractmethod
    def load(self, entry: E) -> dict[str, Any]:
        """person, garment, garment_mask, agnostic, mask, worn_mask, name[, pose]: the
        contract's tensors at ``self.resolution``; the box is added here."""

    # -- the Dataset protocol --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def sample_name(self, index: int) -> str:
        """Name of sample ``index`` without loading it (e.g. to find existing outputs)."""
        return self.entry_name(self.entries[index])

    @property
    def skipped(self) -> int:
        """Number of distinct samples skipped as unreadable so far."""
        return len(self.bad_files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.entries)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        for step in range(n):
            j = (i + step) % n
            if j in self.bad_files:
                continue
            try:
                sample = self.load(self.entries[j])
            except UnreadableFileError as err:
                if not self.skip_bad:
                    raise DatasetError(f"{self.dataset_name}: {err} (set data.skip_bad=true to skip "
                                       f"unreadable samples)") from None
                self.bad_files[j] = str(err.path)
                log.warning("%s: skipping unreadable sample %d: %s (%d skipped so far)",
                            self.dataset_name, j, err, len(self.bad_files))
                continue
            sample["box"] = mask_box(sample["mask"])
            if self.augment is not None and self.augment.active:
                sample = self.augment(sample)
            return sample
        raise DatasetError(f"{self.dataset_name}: every one of the {n} samples is unreadable")


def build_real_dataset(cfg: Any, split: str = "train", mode: str = "paired",
                       num_samples: int | None = None) -> RealTryOn:
    """A :class:`DataConfig` (name viton_hd | dresscode) -> data set.

    Neither benchmark has a validation split: ``split="val"`` is the first ``data.num_val``
    paired test pairs (as StableVITON validates), never augmented.
    """
    if split == "val":
        split, mode = "test", "paired"
        num_samples = cfg.num_val if num_samples is None else num_samples
    common: dict[str, Any] = dict(
        root=cfg.root, split=split, mode=mode, resolution=tuple(cfg.resolution), use_pose=cfg.use_pose,
        skip_bad=cfg.skip_bad, flip_prob=cfg.flip_prob, color_jitter=cfg.color_jitter, num_samples=num_samples)
    if cfg.root is None:
        raise DatasetError(f"data.name={cfg.name!r} needs data.root=<dataset directory>")
    if cfg.name == "viton_hd":
        from .viton_hd import VitonHD

        return VitonHD(**common)
    if cfg.name == "dresscode":
        from .dresscode import DressCode

        return DressCode(category=cfg.category, **common)
    raise ValueError(f"data.name={cfg.name!r} is not a file-backed data set (viton_hd, dresscode)")


def stem(name: str) -> str:
    """File name without its extension ("00006_00.jpg" -> "00006_00")."""
    return name.rsplit(".", 1)[0]


__all__ = ["RealTryOn", "build_real_dataset", "stem", "DatasetError", "UnreadableFileError"]
