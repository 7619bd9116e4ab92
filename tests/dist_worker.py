"""Launched by tests/test_faults.py under `accelerate launch` (2 CPU ranks): trains, then
writes what each rank saw to <output_dir>/rank<r>.json so the test can compare ranks.

    dist_worker.py [--stop-at=N] key=value ...   (--stop-at: Trainer.fit(stop_at=N))
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import parse_args  # noqa: E402
from train import Trainer  # noqa: E402


class RecordingDataset(Dataset):
    """The training set, noting the name of every sample read (num_workers=0: in stream order)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.names = dataset, []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        self.names.append(sample["name"])
        return sample


def main() -> None:
    stop_at = [int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--stop-at=")]
    trainer = Trainer(parse_args([a for a in sys.argv[1:] if not a.startswith("--stop-at=")]))
    trainer.train_set = recorder = RecordingDataset(trainer.train_set)
    trainer.fit(stop_at=stop_at[0] if stop_at else None)
    acc = trainer.accelerator
    params = torch.cat([p.detach().flatten() for p in trainer.unwrapped.trainable_parameters()])
    out = Path(trainer.cfg.train.output_dir) / f"rank{acc.process_index}.json"
    out.write_text(json.dumps({
        "rank": acc.process_index, "world": acc.num_processes,
        "local_history": trainer.local_history, "history": trainer.history,
        "params_sum": float(params.double().sum()),
        "first_params": params[:64].tolist(), "samples_seen": trainer.samples_seen,
        "step": trainer.step, "names": recorder.names,
    }))
    trainer.close()


if __name__ == "__main__":
    main()
