"""Data-parallel scaling on the CPU: samples/s of the default model with 1 and 2 processes.

    python bench/scaling.py [--steps 60] [--batch 16]

Each run goes through the real launcher (`accelerate launch`, 2 gloo ranks for
the second), trains `--steps` steps of the embedded default with the monitor
attached, and reports samples/s over the training loop (its summary's seconds,
which include a tiny final validation and checkpoint). On a GPU machine pass `--gpus N` to use `--multi_gpu` with N
processes instead. Each process uses cores / processes torch threads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]

from monitor import machine  # noqa: E402


def run(processes: int, steps: int, batch: int, gpu: bool) -> float:
    out = Path(tempfile.mkdtemp(prefix=f"scaling{processes}_"))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes)), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_processes", str(processes)]
    if processes > 1:
        cmd += ["--multi_gpu", "--main_process_port", "29547"]
        if not gpu:
            env["ACCELERATE_USE_CPU"] = "1"
    cmd += [str(ROOT / "train.py"), f"train.output_dir={out}", f"train.max_steps={steps}", f"train.batch_size={batch}",
            "train.log_every=10", "train.val_every=100000", "train.checkpoint_every=100000",
            "train.validate_at_start=false", "tracker.kind=none", "diffusion.sample_steps=2", "data.num_val=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    # End to end: the training loop's seconds (a 2-step validation and the final checkpoint included).
    return summary["steps"] * batch * processes / summary["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16, help="per process")
    parser.add_argument("--gpus", type=int, default=0)
    args = parser.parse_args()
    print(machine())
    counts = [1, args.gpus] if args.gpus > 1 else [1, 2]
    results = {n: run(n, args.steps, args.batch, args.gpus > 1) for n in counts}
    base = results[counts[0]]
    print(f"{'processes':>9} {'batch/proc':>10} {'samples/s':>10} {'speed-up':>9}")
    for n, sps in results.items():
        print(f"{n:>9} {args.batch:>10} {sps:>10.1f} {sps / base:>8.2f}×")


if __name__ == "__main__":
    main()
