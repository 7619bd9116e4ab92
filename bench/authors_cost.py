"""Cost of the I²AM authors' explicit recipe per training step, next to the plain step.

    python bench/authors_cost.py [--steps 10] [--repeats 3] [--skip-large] [--threads N]

Side by side in one invocation, for each size of `bench/step.py` (same UNets, inputs
and batch, imported from there):

* plain: a training step of the try-on UNet (forward, backward, AdamW);
* authors: the same plus CWG + TV + DCML (`losses/authors.py`) on the authors' one
  layer, the middle decoder cross-attention layer at 16x12 queries
  (`up_blocks.1.attentions.1`), from explicit probabilities kept for backward, with
  only that layer monitored (its q/k kept with graph, no maps recorded).

Measured as `bench/step.py` does: the modes take turns step by step for
`--steps` x `--repeats` rounds and each mode's time is its median step, with the
normal allocator; peak memory afterwards, one step per mode, lowest of `--repeats`
(CUDA: max_memory_allocated; CPU: resident-set high-water mark with glibc's mmap
threshold lowered so freed tensors leave the RSS). Weights are random; cost does not
depend on them. Each size runs in its own process.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from monitor import machine  # noqa: E402  (bench/monitor.py)
from step import build_step, measure, run_workers  # noqa: E402  (bench/step.py: the same sizes and loop)

MODES = ("plain", "authors")
# The authors' layer in diffusers' names; at 16x12 queries in every size of bench/step.py.
AUTHORS_LAYER = "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor"


def worker(size: str, device: str, steps: int, repeats: int, threads: int | None = None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from i2am import AttentionMonitor
    from i2am.dispersion import query_mask
    from losses.authors import authors_loss, grid_probabilities

    built = build_step(size, device)
    spec, unet, opt, x, ctx, t = (built[k] for k in ("spec", "unet", "opt", "x", "ctx", "t"))
    (h, w), b = spec["latent"], spec["batch"]
    # A worn-garment mask on the middle half of the torso, so the masks do real work.
    worn = torch.zeros(b, 1, h, w, device=device)
    worn[..., h // 4:3 * h // 4, w // 4:3 * w // 4] = 1
    cuda = device == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def one_step(monitor) -> None:
        with autocast:
            loss = unet(x, t, encoder_hidden_states=ctx).sample.float().square().mean()
            if monitor is not None:
                s = monitor.last_attention()[AUTHORS_LAYER]
                if tuple(s.grid) != (16, 12):
                    raise SystemExit(f"{AUTHORS_LAYER} has {s.grid} queries at size {size}; the authors' is 16x12")
                probs = grid_probabilities(s.query, s.key, s.scale, s.extra_tokens)
                extra, _ = authors_loss(probs, s.grid, s.reference_grid, query_mask(worn, s.grid, b))
                loss = loss + extra
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def setup(mode: str):
        if mode == "plain":
            return None
        return AttentionMonitor(unet, spec["grid"], layers=[AUTHORS_LAYER], keep_last=True, record=False)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(mode: str) -> float:
        """One step; the monitor is attached before and closed after the timed part, as in step.py."""
        monitor = setup(mode)
        try:
            sync()
            t0 = time.perf_counter()
            one_step(monitor)
            sync()
            return time.perf_counter() - t0
        finally:
            if monitor is not None:
                monitor.close()

    times, peaks = measure(MODES, timed, steps, repeats, cuda)
    n_tok = spec["grid"][0] * spec["grid"][1]
    return {"size": size, "device": device, "batch": b, "times": times, "peaks": peaks,
            "tokens": n_tok, "heads": unet.get_submodule(AUTHORS_LAYER.removesuffix(".processor")).heads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in the workers")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(**json.loads(args.worker))))
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = ["toy"] + ([] if args.skip_large else ["sd15" if device == "cuda" else "sd15-reduced"])
    print(machine() + (f"; workers use {args.threads} torch thread(s)" if args.threads else ""))
    rows = run_workers(__file__, sizes, device=device, steps=args.steps, repeats=args.repeats, threads=args.threads)
    header = (f"{'size':<20} {'batch':>5} {'heads':>5} {'keys':>5} | {'plain ms':>9} {'authors ms':>10} {'×':>6} | "
              f"{'plain MiB':>9} {'authors MiB':>11} {'×':>6}")
    print(f"\none 16x12 layer, CWG + TV + DCML from explicit probabilities\n{header}\n{'-' * len(header)}")
    for r in rows:
        tm, pk = r["times"], r["peaks"]
        print(f"{r['size'] + ' ' + r['device']:<20} {r['batch']:>5} {r['heads']:>5} {r['tokens']:>5} | "
              f"{tm['plain'] * 1e3:>9.1f} {tm['authors'] * 1e3:>10.1f} {tm['authors'] / tm['plain']:>6.3f} | "
              f"{pk['plain'] / 2**20:>9.0f} {pk['authors'] / 2**20:>11.0f} {pk['authors'] / pk['plain']:>6.3f}")


if __name__ == "__main__":
    main()
