"""Cost of the attention warp: the default model's training step and sampling, warp off vs on.

    python bench/warp.py [--steps 30] [--repeats 3] [--threads N] [key=value ...]

Side by side in one invocation, on the embedded default (configs/default.yaml, its
stability recipe on) with any overrides given:

* train step: `Trainer.train_step` as `fit()` runs it (forward with the monitor's fused
  statistics, the stability terms, backward, AdamW, EMA), `--steps` steps per repeat;
* sampling: the validation sampler's DDIM run on the validation batch.

The two models alternate within each repeat, so drift in the machine's speed hits both;
the best repeat of each is compared. Prints the seconds and the ratio warp / plain.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import load_config  # noqa: E402
from models.sampling import Sampler  # noqa: E402
from train import Trainer  # noqa: E402
from train.data import build_loader  # noqa: E402


def build(warp: bool, out: Path, overrides: list[str]) -> Trainer:
    cfg = load_config(overrides=[f"model.warp.enabled={str(warp).lower()}", f"train.output_dir={out}",
                                 "tracker.kind=none", *overrides])
    return Trainer(cfg)


def time_steps(trainer: Trainer, steps: int) -> float:
    batches = iter(build_loader(trainer.train_set, trainer.cfg.train.batch_size, trainer.cfg.data.seed, 0, 1, start=0))
    trainer.model.train()
    trainer.train_step(batches)  # warm-up: first-call allocations and caches
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batches)
        trainer.step += 1
    return time.perf_counter() - start


def time_sampling(trainer: Trainer) -> float:
    model = trainer.unwrapped.eval()
    sampler = Sampler.from_config(trainer.cfg.diffusion)
    batch = {k: v for k, v in trainer.validator.batch.items() if isinstance(v, torch.Tensor)}
    start = time.perf_counter()
    sampler(model, batch, seed=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {w: build(w, Path(tmp) / str(w), args.overrides) for w in (False, True)}
        best = {(w, k): float("inf") for w in trainers for k in ("train", "sample")}
        for _ in range(args.repeats):
            for w, trainer in trainers.items():
                best[w, "train"] = min(best[w, "train"], time_steps(trainer, args.steps))
                best[w, "sample"] = min(best[w, "sample"], time_sampling(trainer))
        for trainer in trainers.values():
            trainer.close()
    print(f"torch threads {torch.get_num_threads()}; best of {args.repeats} repeats")
    print(f"{'':12s} {'plain s':>9s} {'warp s':>9s} {'ratio':>7s}")
    for kind, label in (("train", f"{args.steps} steps"), ("sample", "sampling")):
        plain, warp = best[False, kind], best[True, kind]
        print(f"{label:12s} {plain:9.2f} {warp:9.2f} {warp / plain:6.3f}x")


if __name__ == "__main__":
    main()
