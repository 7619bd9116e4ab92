"""Cost of the stability loss per training step: plain vs fused vs naive.

    python bench/step.py [--steps 10] [--repeats 3] [--skip-large]

Side by side in one invocation, for each size:

* plain: a training step of the try-on UNet (forward, backward, AdamW);
* fused: the same with the I²AM monitor attached and the dispersion loss on
  every cross-attention layer, computed by `scaled_dot_product_attention` with
  the coordinates as values (the probability matrix is never materialised);
* naive: the same loss from explicit softmax probabilities kept for backward
  (what StableVITON's ATV and the I²AM authors' code do).

Sizes: toy (the default config's UNet, 16x12 latent, 48 garment tokens,
batch 16); "sd15" on CUDA (SD-1.5 shapes, 64x48 latent, 16 cross-attention
layers, 8 heads, 768 reference tokens, batch 2, bf16 autocast) or, on CPU, a
reduced SD-like UNet with the same layer count, grid and tokens (channels
64/128/256/256, batch 1). Weights are random; cost does not depend on them.
Each size runs in its own process; modes alternate within it. Time: mean of
`--steps` steps, best of `--repeats`. Peak memory as in bench/monitor.py
(CUDA: max_memory_allocated; CPU: resident-set high-water mark).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from monitor import _rss_kib, machine  # noqa: E402  (bench/monitor.py)

SIZES = {
    "toy": dict(unet="tiny", latent=(16, 12), grid=(8, 6), batch=16, channels=12),
    "sd15": dict(unet="sd15", latent=(64, 48), grid=(32, 24), batch=2, channels=4),
    "sd15-reduced": dict(unet=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                   cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
                         latent=(64, 48), grid=(32, 24), batch=1, channels=4),
}
MODES = ("plain", "fused", "naive")


def worker(size: str, device: str, steps: int, repeats: int) -> dict:
    import ctypes

    import torch
    from diffusers import UNet2DConditionModel

    from i2am import AttentionMonitor
    from configs.schema import StabilityConfig
    from losses.stability import StabilityLoss
    from models.registry import unet_size

    spec = SIZES[size]
    kwargs = unet_size(spec["unet"]) if isinstance(spec["unet"], str) else dict(spec["unet"])
    c, (h, w), b = spec["channels"], spec["latent"], spec["batch"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=2 * c + 1, out_channels=c, **kwargs).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    n_tok = spec["grid"][0] * spec["grid"][1]
    x = torch.randn(b, 2 * c + 1, h, w, generator=g).to(device)
    ctx = torch.randn(b, n_tok, kwargs["cross_attention_dim"], generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    mask = torch.ones(b, 1, h, w, device=device)
    cuda = device == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def one_step(loss_fn, monitor) -> None:
        with autocast:
            out = unet(x, t, encoder_hidden_states=ctx).sample
            loss = out.float().square().mean()
            if loss_fn is not None:
                extra, _ = loss_fn(monitor.last_attention(), mask, t)
                loss = loss + extra
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def setup(mode: str):
        if mode == "plain":
            return None, None
        monitor = AttentionMonitor(unet, spec["grid"], keep_last=True, record=False)
        return monitor, StabilityLoss(StabilityConfig(dispersion=1.0), explicit=mode == "naive")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    times = {m: float("inf") for m in MODES}
    for _ in range(repeats):
        for mode in MODES:
            monitor, loss_fn = setup(mode)
            one_step(loss_fn, monitor)  # warm-up
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                one_step(loss_fn, monitor)
            sync()
            times[mode] = min(times[mode], (time.perf_counter() - t0) / steps)
            if monitor is not None:
                monitor.close()
    peaks = {}
    libc = ctypes.CDLL("libc.so.6")
    for mode in MODES:
        monitor, loss_fn = setup(mode)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            one_step(loss_fn, monitor)
            sync()
            peaks[mode] = torch.cuda.max_memory_allocated()
        else:
            libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            one_step(loss_fn, monitor)
            peaks[mode] = _rss_kib("VmHWM") * 1024
        if monitor is not None:
            monitor.close()
    return {"size": size, "device": device, "batch": b, "times": times, "peaks": peaks,
            "layers": sum(1 for n in unet.attn_processors if "attn2" in n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(**json.loads(args.worker))))
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = ["toy"] + ([] if args.skip_large else ["sd15" if device == "cuda" else "sd15-reduced"])
    print(machine())
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    header = (f"{'size':<13} {'dev':<4} {'xattn':>5} {'batch':>5} | {'plain ms':>9} {'fused ms':>9} {'naive ms':>9} "
              f"{'fused×':>6} {'naive×':>6} | {'plain MiB':>9} {'fused MiB':>9} {'naive MiB':>9} {'fused×':>6} {'naive×':>6}")
    print(header)
    print("-" * len(header))
    for size in sizes:
        job = dict(size=size, device=device, steps=args.steps, repeats=args.repeats)
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                             env=env, cwd=ROOT)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"worker for {size} failed:\n{out.stderr[-3000:]}")
        r = json.loads(line[7:])
        tm, pk, mib = r["times"], r["peaks"], 2**20
        print(f"{size:<13} {device:<4} {r['layers']:>5} {r['batch']:>5} | {tm['plain'] * 1e3:>9.1f} "
              f"{tm['fused'] * 1e3:>9.1f} {tm['naive'] * 1e3:>9.1f} {tm['fused'] / tm['plain']:>6.2f} "
              f"{tm['naive'] / tm['plain']:>6.2f} | {pk['plain'] / mib:>9.0f} {pk['fused'] / mib:>9.0f} "
              f"{pk['naive'] / mib:>9.0f} {pk['fused'] / pk['plain']:>6.3f} {pk['naive'] / pk['plain']:>6.3f}")


if __name__ == "__main__":
    main()
