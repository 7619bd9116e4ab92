"""Cost of the stability loss per training step: plain vs fused vs naive.

    python bench/step.py [--steps 10] [--repeats 3] [--skip-large] [--threads N] [--modes M,..]
                         [--batch N] [--profile MODE]

Side by side in one invocation, for each size:

* plain: a training step of the try-on UNet (forward, backward, AdamW);
* fused: the same with the I²AM monitor attached and the dispersion loss on
  every cross-attention layer, its statistics computed inside each layer's own
  `scaled_dot_product_attention` call, with the coordinates as extra value
  columns (`AttentionMonitor(moments=True)`; no probability matrix, no second
  kernel);
* colour: the colour-anchored variance on every cross-attention layer instead,
  fused the same way: the garment colours [g, ||g||^2] pooled to the token grid
  ride along as four more value columns (`monitor.set_anchors`), the targets
  (true colours and worn mask pooled to each query grid) are built every step,
  as `losses.objective.TryOnObjective` does;
* anchored: the default run's recipe, the position-anchored terms in both directions
  on every cross-attention layer (`position`: each worn query's attention over the garment
  around its true garment position, from the fused moments; `placement`: each garment
  cell's attention over the image around where it is worn, one more SDPA call per layer
  with q and k swapped, over `stability.placement_cells` garment cells sampled per layer
  and step, the default run's setting) and `sink` (the grid mass, the coordinate
  columns' fourth, of the queries off the worn garment), the targets built every step;
* anchored-all: the same with `placement` over every garment cell (`placement_cells=0`);
* 2-call: the dispersion statistics from a second, separate fused SDPA call on the
  kept q/k (what a layer with a non-default processor gets);
* naive: the same loss from explicit softmax probabilities kept for backward
  (what StableVITON's ATV and the I²AM authors' code do).

Sizes: toy (the default config's UNet, 16x12 latent, 48 garment tokens,
batch 16); "sd15" on CUDA (SD-1.5 shapes, 64x48 latent, 16 cross-attention
layers, 8 heads, 768 reference tokens, batch 2, bf16 autocast) or, on CPU, a
reduced SD-like UNet with the same layer count, grid and tokens (channels
64/128/256/256, batch 1). The garment tokens are preceded by `--null-tokens` extra tokens
(default 16, the default model's `model.garment.null_tokens`) in every mode, plain included.
Weights are random; cost does not depend on them.
Each size runs in its own process. Time: the modes take turns step by step for
`--steps` × `--repeats` rounds; each mode's median step, with the normal
allocator. Peak memory afterwards, one step per mode, lowest of `--repeats`, as
in bench/monitor.py (CUDA: max_memory_allocated; CPU: resident-set high-water
mark with glibc's mmap threshold lowered so freed tensors leave the RSS; that
slows allocation, which is why it is not in the timed loop).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from monitor import _rss_kib, machine  # noqa: E402  (bench/monitor.py)

SIZES = {
    # factor: image pixels per latent cell (the colour targets are pooled from image-size tensors)
    "toy": dict(unet="tiny", latent=(16, 12), grid=(8, 6), batch=16, channels=12, factor=2),
    "sd15": dict(unet="sd15", latent=(64, 48), grid=(32, 24), batch=2, channels=4, factor=8),
    "sd15-reduced": dict(unet=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                   cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
                         latent=(64, 48), grid=(32, 24), batch=1, channels=4, factor=8),
}
# The default run's sampled-cell count (configs/default.yaml: stability.placement_cells).
PLACEMENT_CELLS = 16
# The default model's content-free tokens before the garment grid (model.garment.null_tokens).
NULL_TOKENS = 16
MODES = ("plain", "fused", "colour", "anchored", "anchored-all", "2-call", "naive")


def build_step(size: str, device: str, batch: int | None = None, extra_tokens: int = 0) -> dict:
    """The UNet, its optimizer and one batch of random inputs for `size` (shared with
    bench/authors_cost.py), the context with ``extra_tokens`` tokens before the garment grid:
    keys spec, unet, opt, x, ctx, t, generator."""
    import torch
    from diffusers import UNet2DConditionModel

    from models.registry import unet_size

    spec = SIZES[size]
    kwargs = unet_size(spec["unet"]) if isinstance(spec["unet"], str) else dict(spec["unet"])
    if batch:
        spec = {**spec, "batch": batch}
    c, (h, w), b = spec["channels"], spec["latent"], spec["batch"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=2 * c + 1, out_channels=c, **kwargs).to(device)
    g = torch.Generator().manual_seed(0)
    n_tok = extra_tokens + spec["grid"][0] * spec["grid"][1]
    return dict(spec=spec, unet=unet, opt=torch.optim.AdamW(unet.parameters(), lr=1e-5), generator=g,
                x=torch.randn(b, 2 * c + 1, h, w, generator=g).to(device),
                ctx=torch.randn(b, n_tok, kwargs["cross_attention_dim"], generator=g).to(device),
                t=torch.randint(0, 1000, (b,), generator=g).to(device))


def measure(modes: tuple[str, ...], timed, steps: int, repeats: int, cuda: bool
            ) -> tuple[dict[str, float], dict[str, float]]:
    """(median seconds per step, peak bytes) of each mode. ``timed(mode)`` runs one step with the
    mode's set-up outside the timed part and returns the timed seconds. Modes take turns step by
    step, so slow drifts of a shared machine hit every mode alike; peak memory afterwards, one
    step per mode, lowest of `repeats` (the RSS high-water mark is noisy)."""
    import ctypes

    import torch

    for mode in modes:  # warm-up
        timed(mode)
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(steps * repeats):
        for mode in modes:
            samples[mode].append(timed(mode))
    times = {m: statistics.median(v) for m, v in samples.items()}
    peaks: dict[str, float] = {}
    libc = ctypes.CDLL("libc.so.6")
    if not cuda:
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD: blocks >= 64 KiB are mmapped and returned on free()
    for _ in range(repeats):
        for mode in modes:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                timed(mode)
                peak = torch.cuda.max_memory_allocated()
            else:
                libc.malloc_trim(0)
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                timed(mode)
                peak = _rss_kib("VmHWM") * 1024
            peaks[mode] = min(peaks.get(mode, peak), peak)
    return times, peaks


def run_workers(script: str, sizes: list[str], **job) -> list[dict]:
    """Run `script --worker` once per size, each in its own process; their RESULT rows."""
    rows = []
    for size in sizes:
        out = subprocess.run([sys.executable, script, "--worker", json.dumps(dict(size=size, **job))],
                             capture_output=True, text=True, cwd=ROOT)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"worker for {size} failed (exit status {out.returncode}; -9 is a kill, e.g. out of "
                             f"memory):\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[7:]))
    return rows


def worker(size: str, device: str, steps: int, repeats: int, threads: int | None = None,
           modes: tuple[str, ...] = MODES, batch: int | None = None, profile: str | None = None,
           null_tokens: int = NULL_TOKENS) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from i2am import AttentionMonitor
    from i2am.dispersion import colour_anchors
    from configs.schema import StabilityConfig
    from losses.stability import AttentionTargets, StabilityLoss

    built = build_step(size, device, batch if size != "toy" else None, null_tokens)
    spec, unet, opt, x, ctx, t, g = (built[k] for k in ("spec", "unet", "opt", "x", "ctx", "t", "generator"))
    (h, w), b = spec["latent"], spec["batch"]
    mask = torch.ones(b, 1, h, w, device=device)
    # Image-size tensors for the colour term: garment, ground truth and a worn mask on the torso.
    image = (h * spec["factor"], w * spec["factor"])
    garment = (torch.rand(b, 3, *image, generator=g) * 2 - 1).to(device)
    person = (torch.rand(b, 3, *image, generator=g) * 2 - 1).to(device)
    worn = torch.zeros(b, 1, *image, device=device)
    worn[..., image[0] // 4:3 * image[0] // 4, image[1] // 4:3 * image[1] // 4] = 1
    # Garment positions of the worn pixels: the torso box maps onto the whole garment image.
    ys = torch.linspace(0, 1, image[0] // 2, device=device)
    xs = torch.linspace(0, 1, image[1] // 2, device=device)
    garment_pos = torch.zeros(b, 2, *image, device=device)
    garment_pos[:, :, image[0] // 4:image[0] // 4 + len(ys), image[1] // 4:image[1] // 4 + len(xs)] = torch.stack(
        torch.meshgrid(ys, xs, indexing="ij"))
    cuda = device == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def one_step(loss_fn, monitor, mode: str) -> None:
        colour = mode == "colour"
        if colour:  # what the objective does per step: anchors before the forward, targets after
            monitor.set_anchors(colour_anchors(garment, spec["grid"]))
        with autocast:
            out = unet(x, t, encoder_hidden_states=ctx).sample
            loss = out.float().square().mean()
            if loss_fn is not None:
                targets = (AttentionTargets(person, worn) if colour
                           else AttentionTargets(person, worn, garment_pos) if mode.startswith("anchored") else None)
                extra, _ = loss_fn(monitor.last_attention(), mask, t, targets=targets)
                loss = loss + extra
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if colour:
            monitor.set_anchors(None)

    def setup(mode: str):
        if mode == "plain":
            return None, None
        fused = mode in ("fused", "colour", "anchored", "anchored-all")
        monitor = AttentionMonitor(unet, spec["grid"], null_tokens, keep_last=True, moments=fused, record=False)
        sink = 1.0 if null_tokens else 0.0  # the term needs extra tokens to move attention onto
        cfg = {"colour": StabilityConfig(colour=1.0),
               "anchored": StabilityConfig(position=1.0, placement=1.0, placement_cells=PLACEMENT_CELLS, sink=sink),
               "anchored-all": StabilityConfig(position=1.0, placement=1.0, placement_cells=0, sink=sink),
               }.get(mode, StabilityConfig(dispersion=1.0))
        return monitor, StabilityLoss(cfg, explicit=mode == "naive")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(mode: str) -> float:
        """One step; the monitor is attached before and closed after the timed part."""
        monitor, loss_fn = setup(mode)
        try:
            sync()
            t0 = time.perf_counter()
            one_step(loss_fn, monitor, mode)
            sync()
            return time.perf_counter() - t0
        finally:
            if monitor is not None:
                monitor.close()

    table = None
    if profile:  # where a mode's time goes: the top operators over 3 steps, after a warm-up step
        from torch.profiler import ProfilerActivity, profile as torch_profile

        timed(profile)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                timed(profile)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = (f"{size} {device}, {profile}: top operators by {sort} over 3 steps\n"
                 + prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=50))
    times, peaks = measure(tuple(modes), timed, steps, repeats, cuda)
    return {"size": size, "device": device, "batch": b, "times": times, "peaks": peaks, "profile": table,
            "layers": sum(1 for n in unet.attn_processors if "attn2" in n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in the workers (default: torch's); 1 is steadier on a busy machine")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated subset of {','.join(MODES)} (plain is always timed: the ratios' base)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch of the SD-like size (default: 2 on CUDA, 1 on CPU); the toy size keeps 16")
    parser.add_argument("--profile", default=None, metavar="MODE",
                        help="also print the top operators of MODE's step (torch.profiler, 3 steps) per size")
    parser.add_argument("--null-tokens", type=int, default=NULL_TOKENS,
                        help="extra tokens before the garment grid in every mode (the default model's "
                             f"model.garment.null_tokens, {NULL_TOKENS}); 0 also drops the sink term from anchored")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(**json.loads(args.worker))))
        return
    import torch

    modes = tuple(m for m in MODES if m == "plain" or m in args.modes.split(","))
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from {','.join(MODES)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = ["toy"] + ([] if args.skip_large else ["sd15" if device == "cuda" else "sd15-reduced"])
    print(machine() + (f"; workers use {args.threads} torch thread(s)" if args.threads else ""))
    if args.profile and args.profile not in modes:
        parser.error(f"--profile {args.profile}: not among the timed modes {','.join(modes)}")
    rows = run_workers(__file__, sizes, device=device, steps=args.steps, repeats=args.repeats, threads=args.threads,
                       modes=modes, batch=args.batch, profile=args.profile, null_tokens=args.null_tokens)
    for what, key, unit, scale, fmt in (("time per step", "times", "ms", 1e3, ".1f"),
                                        ("peak memory", "peaks", "MiB", 2.0**-20, ".0f")):
        header = (f"{what + ' (' + unit + ')':<22} {'xattn':>5} {'batch':>5} | "
                  + " ".join(f"{m:>8}" for m in modes) + " | " + " ".join(f"{m + '×':>8}" for m in modes[1:]))
        print(f"\n{header}\n{'-' * len(header)}")
        for r in rows:
            v = r[key]
            print(f"{r['size'] + ' ' + r['device']:<22} {r['layers']:>5} {r['batch']:>5} | "
                  + " ".join(f"{v[m] * scale:>8{fmt}}" for m in modes) + " | "
                  + " ".join(f"{v[m] / v['plain']:>8.3f}" for m in modes[1:]))
    for r in rows:
        if r.get("profile"):
            print("\n" + r["profile"])

if __name__ == "__main__":
    main()
