"""Cost of recording I²AM maps during DDIM sampling, plain vs monitored.

    python bench/monitor.py [--toy-steps 50] [--sd-steps N] [--skip-sd] [--chunk-size 1024]

Runs, side by side in one invocation:

* toy: the tests' tiny UNet (2 levels, 8 heads, 7 cross-attention layers),
  32×24 latent, 48 reference tokens + 1 extra, batch 2;
* sd15: an SD-1.5-sized UNet (block_out_channels 320/640/1280/1280,
  layers_per_block 2, 8 heads, 16 cross-attention layers, cross_attention_dim
  768), 64×48 latent, 768 reference tokens as a 32×24 grid; on CUDA (fp16,
  batch 2) when available, else on CPU (fp32, batch 1, few steps).

Weights are random (no downloads); cost does not depend on their values.
Each size runs in a fresh subprocess; plain and monitored runs alternate in
it (the monitor attached and closed around each monitored run), so load from
other processes on a shared machine hits both alike. Measured:

* time: wall time of the DDIM loop (scheduler steps included; for the
  monitored run also ``monitor.maps()``), best of ``--repeats``, after one
  warm-up UNet call;
* CPU time: the process's user + system time over the same loops (best of
  each), less sensitive than wall time to other processes on the machine;
* peak memory, in one further loop: CUDA: ``torch.cuda.max_memory_allocated``
  (tensors only, weights included). CPU: the process's resident-set
  high-water mark (VmHWM, reset through /proc/self/clear_refs just before the
  loop), with glibc's mmap threshold set to 64 KiB and the heap trimmed first,
  so freed tensors leave the RSS instead of sitting in malloc's free lists
  (this slows allocation, which is why it is not the timed loop). It includes
  weights and the Python runtime; "Δ" is the growth over the level right
  before the loop, i.e. activations plus what the monitor adds.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    "toy": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                  norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D",) * 2,
                  up_block_types=("CrossAttnUpBlock2D",) * 2),
        latent=(32, 24), reference_grid=(8, 6), extra_tokens=1, context_dim=32,
    ),
    "sd15": dict(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                  attention_head_dim=8),
        latent=(64, 48), reference_grid=(32, 24), extra_tokens=0, context_dim=768,
    ),
}


def machine() -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"CPU: {cpu}, {os.cpu_count()} logical cores; torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f"; GPU: {torch.cuda.get_device_name(0)}"
    else:
        text += "; no CUDA GPU"
    return text


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(size: str, device: str, dtype: str, batch: int, steps: int, repeats: int,
           chunk_size: int, threads: int | None = None) -> dict:
    """Plain and monitored measurements of one size; runs in its own process."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from diffusers.utils import logging as diffusers_logging

    from i2am import AttentionMonitor

    diffusers_logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    spec = SIZES[size]
    dt = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**spec["unet"]).eval().to(device, dt)
    h_r, w_r = spec["reference_grid"]
    n_tokens = h_r * w_r + spec["extra_tokens"]
    gen = torch.Generator().manual_seed(1)
    cond = torch.randn(batch, n_tokens, spec["context_dim"], generator=gen).to(device, dt)
    start = torch.randn(batch, 4, *spec["latent"], generator=gen).to(device, dt)
    scheduler = DDIMScheduler()
    cuda = device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def sample() -> None:
        scheduler.set_timesteps(steps)
        latents = start
        for t in scheduler.timesteps:
            eps = unet(latents, t, encoder_hidden_states=cond).sample
            latents = scheduler.step(eps, t, latents).prev_sample

    def run(monitored: bool) -> float:
        """One DDIM sampling, with a freshly attached monitor when ``monitored``."""
        monitor = None
        if monitored:
            monitor = AttentionMonitor(unet, (h_r, w_r), extra_tokens=spec["extra_tokens"], num_steps=steps,
                                       time_groups=min(5, steps), chunk_size=chunk_size)
        try:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            sample()
            if monitor is not None:
                monitor.maps()
                state["bytes"] = monitor.state_nbytes()
            sync()
            cpu_times[monitored].append(time.process_time() - c0)
            return time.perf_counter() - t0
        finally:
            if monitor is not None:
                monitor.close()

    state = {"bytes": 0}
    cpu_times: dict[bool, list[float]] = {False: [], True: []}
    out: dict = dict(size=size, device=device, dtype=dtype, batch=batch, steps=steps)
    with torch.no_grad():
        unet(start, 999, encoder_hidden_states=cond)  # warm-up, not recorded below
        # Interleaved so that load from other processes hits both alike; best of each.
        times: dict[str, list[float]] = {"plain": [], "monitored": []}
        for _ in range(repeats):
            for mode in times:
                times[mode].append(run(mode == "monitored"))
        # Memory passes, separate from the timed ones: on CPU they need malloc
        # to return freed blocks to the OS, which slows allocation down.
        if not cuda:
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
            libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD: blocks >= 64 KiB are mmapped, freed on free()
        for mode in times:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                run(mode == "monitored")
                peak = torch.cuda.max_memory_allocated()
            else:
                libc.malloc_trim(0)
                before = _rss_kib("VmRSS") * 1024
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                run(mode == "monitored")
                peak = _rss_kib("VmHWM") * 1024
            out[mode] = dict(time_s=min(times[mode]), cpu_s=min(cpu_times[mode == "monitored"][:repeats]),
                             peak_bytes=peak, delta_bytes=peak - before)
    out["state_bytes"] = state["bytes"]
    return out


def _spawn(args: argparse.Namespace, **job) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(job)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy-steps", type=int, default=50)
    ap.add_argument("--sd-steps", type=int, default=None, help="default: 50 on CUDA, 3 on CPU")
    ap.add_argument("--repeats", type=int, default=None, help="default: 3 (toy), 2 (sd15)")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--skip-sd", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads in the workers (default: torch's); 1 is steadier on a busy machine")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return

    import torch

    cuda = torch.cuda.is_available()
    print(machine() + (f"; workers use {args.threads} torch thread(s)" if args.threads else ""))
    jobs = [dict(size="toy", device="cpu", dtype="fp32", batch=2, steps=args.toy_steps, repeats=args.repeats or 3)]
    if not args.skip_sd:
        if cuda:
            jobs.append(dict(size="sd15", device="cuda", dtype="fp16", batch=2, steps=args.sd_steps or 50,
                             repeats=args.repeats or 2))
        else:
            jobs.append(dict(size="sd15", device="cpu", dtype="fp32", batch=1, steps=args.sd_steps or 3,
                             repeats=args.repeats or 2))
    mib = 2 ** 20
    head = (f"{'size':<5} {'device':<6} {'dtype':<5} {'B':>2} {'steps':>5} | {'plain s':>8} {'monit. s':>8} "
            f"{'ratio':>6} | {'plain cpu':>8} {'monit. cpu':>8} {'ratio':>6} | {'plain peak':>10} {'monit. peak':>11} {'+%':>6} | {'plain Δ':>8} {'monit. Δ':>8} "
            f"| {'state':>7}")
    rows = []
    for job in jobs:
        r = _spawn(args, chunk_size=args.chunk_size, threads=args.threads, **job)
        plain, mon = r["plain"], r["monitored"]
        rows.append(
            f"{job['size']:<5} {job['device']:<6} {job['dtype']:<5} {job['batch']:>2} {job['steps']:>5} | "
            f"{plain['time_s']:>8.3f} {mon['time_s']:>8.3f} {mon['time_s'] / plain['time_s']:>5.2f}x | "
            f"{plain['cpu_s']:>8.3f} {mon['cpu_s']:>8.3f} {mon['cpu_s'] / plain['cpu_s']:>5.2f}x | "
            f"{plain['peak_bytes'] / mib:>7.0f}MiB {mon['peak_bytes'] / mib:>8.0f}MiB "
            f"{100 * (mon['peak_bytes'] / plain['peak_bytes'] - 1):>+5.1f}% | "
            f"{plain['delta_bytes'] / mib:>5.0f}MiB {mon['delta_bytes'] / mib:>5.0f}MiB | "
            f"{r['state_bytes'] / mib:>4.1f}MiB"
        )
    print(f"chunk_size={args.chunk_size}; peak = {'torch.cuda.max_memory_allocated (sd15), ' if cuda else ''}"
          "process RSS high-water mark on CPU; Δ = growth over the level before sampling; "
          "s = wall seconds, cpu = process CPU seconds (best of the repeats); "
          "state = monitor accumulators")
    print(head)
    print("-" * len(head))
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
