"""Launched by tests/test_faults.py under `accelerate launch` (2 CPU ranks): trains, then
writes what each rank saw to <output_dir>/rank<r>.json so the test can compare ranks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import parse_args  # noqa: E402
from train import Trainer  # noqa: E402


def main() -> None:
    trainer = Trainer(parse_args(sys.argv[1:]))
    trainer.fit()
    acc = trainer.accelerator
    params = torch.cat([p.detach().flatten() for p in trainer.unwrapped.trainable_parameters()])
    out = Path(trainer.cfg.train.output_dir) / f"rank{acc.process_index}.json"
    out.write_text(json.dumps({
        "rank": acc.process_index, "world": acc.num_processes,
        "local_history": trainer.local_history, "history": trainer.history,
        "params_sum": float(params.double().sum()),
        "first_params": params[:64].tolist(), "samples_seen": trainer.samples_seen,
    }))
    trainer.close()


if __name__ == "__main__":
    main()
