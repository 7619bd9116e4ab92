"""Data for the loop: datasets from config and an exactly resumable sample stream."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from configs.schema import DataConfig


def build_dataset(cfg: DataConfig, split: str = "train", mode: str = "paired", num_samples: int | None = None) -> Dataset:
    if cfg.name == "synthetic":
        from tryon_data.synthetic import SyntheticTryOn

        n = num_samples if num_samples is not None else (cfg.num_train if split == "train" else cfg.num_val)
        return SyntheticTryOn(num_samples=n, resolution=tuple(cfg.resolution), seed=cfg.seed, split=split, mode=mode,
                              patterns=tuple(cfg.patterns),
                              pattern_probs=tuple(cfg.pattern_probs) if cfg.pattern_probs else None)
    if cfg.name in ("viton_hd", "dresscode"):
        # The constructor checks the whole tree: a missing file fails here, before the run starts.
        from tryon_data.real import build_real_dataset

        return build_real_dataset(cfg, split=split, mode=mode, num_samples=num_samples)
    raise ValueError(f"data.name={cfg.name!r} is not known; expected synthetic, viton_hd or dresscode")


class StreamSampler(Sampler[list[tuple[int, int]]]):
    """An endless batch sampler over a seeded stream of epochs.

    The global stream is the concatenation of per-epoch permutations
    (`randperm(N)` seeded by `seed + epoch`). Micro-step k of rank r takes the
    global positions `start + k*world*bs + r*bs + [0, bs)`. Position is the
    only state, so resuming (even on a different number of processes) needs
    just the number of samples already consumed. With the same global batch
    (`bs * world`), micro-step k covers the same positions on any number of processes.

    Each batch is a list of `(dataset index, stream position)` pairs: the position
    travels with the sample (as `batch["position"]`, see `StreamDataset`) and keys
    its noise, so the noise does not depend on the rank either.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0) -> None:
        self.n, self.bs, self.seed = num_samples, batch_size, seed
        self.rank, self.world, self.start = rank, world_size, start
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return int(self._perm[offset])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        pos = self.start + self.rank * self.bs
        while True:
            yield [(self._index(p), p) for p in range(pos, pos + self.bs)]
            pos += self.world * self.bs

    def __len__(self) -> int:  # endless; DataLoader only needs this for len(loader)
        return 2**62


# Mixed into the per-sample seed of the data's own randomness, so that it never shares a
# stream with the noise generator the trainer keys by the same (seed, position).
_DATA_KEY = 0x3C6EF372FE94F82B


class StreamDataset(Dataset):
    """`dataset[index]` plus `"position"`: where the sample sits in the global stream.

    Randomness inside the data set (the real-data augmentation draws from torch's global
    generator) is seeded per sample by (seed, position) and the global state put back after,
    so it is the same on any rank, worker, process count and after a resume."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, position = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 2**40 + position) % 2**63) ^ _DATA_KEY)
            sample = self.dataset[index]
        return {**sample, "position": position}


def build_loader(dataset: Dataset, batch_size: int, seed: int, rank: int, world_size: int, start: int,
                 num_workers: int = 0) -> DataLoader:
    """Batches of `dataset` samples in stream order, each with `batch["position"]` (int64, (B,))."""
    sampler = StreamSampler(len(dataset), batch_size, seed, rank, world_size, start)
    return DataLoader(StreamDataset(dataset, seed), batch_sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
