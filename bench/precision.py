"""How exact the fused statistics are in half precision, at SD-1.5 attention shapes.

    python bench/precision.py [--device cuda|cpu]

Under mixed precision the layer's own attention call runs in bf16 or fp16, and the fused
statistics ride in it: the centres mu, the dispersion Var = E||p||^2 - ||mu||^2 (a difference,
which half precision can cancel), and the R2G moments of the placement term. This compares each
with the explicit float32 computation from the probability matrix, on the SD-1.5 shapes of
the cross-attention layer with the most queries (64x48 latent, 8 heads of 40, 768 garment
tokens as a 32x24 grid after one extra token), and prints the errors relative to the spread of
the exact values. The layer output is compared with plain SDPA in the same dtype.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from i2am.dispersion import attention_moments_explicit, attention_with_moments, r2g_moments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    dev = args.device
    g = torch.Generator().manual_seed(0)
    b, heads, d, grid, ref, extra = args.batch, 8, 40, (64, 48), (32, 24), 1
    n_q, n_k = grid[0] * grid[1], extra + ref[0] * ref[1]
    # Logit spread like a trained layer's: scores of a few units, so attention is neither flat nor one-hot.
    q = (torch.randn(b, heads, n_q, d, generator=g) * 1.5).to(dev)
    k = (torch.randn(b, heads, n_k, d, generator=g) * 1.5).to(dev)
    v = torch.randn(b, heads, n_k, d, generator=g).to(dev)
    scale = d ** -0.5
    mu_x, var_x = attention_moments_explicit(q, k, scale, ref, extra)
    # R2G exact: softmax over queries per grid key, moments over the query grid.
    mu_rx, var_rx = attention_moments_explicit(k[:, :, extra:], q, scale, grid, 0)
    print(f"device {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'}); torch {torch.__version__}; "
          f"q {tuple(q.shape)}, k {tuple(k.shape)}")
    print(f"{'dtype':>9} | {'out err':>9} | {'mu err':>9} {'Var err':>9} {'Var mean':>9} | "
          f"{'R2G mu err':>10} {'R2G Var err':>11} {'R2G Var mean':>12}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
        fused = attention_with_moments(qh, kh, vh, None, scale, ref, extra)
        plain = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, scale=scale)
        mu_r, var_r = r2g_moments(qh, kh, scale, grid, extra)
        out_err = (fused.out.float() - plain.float()).abs().max().item()
        print(f"{str(dtype).split('.')[-1]:>9} | {out_err:9.2e} | "
              f"{(fused.mu - mu_x).abs().max().item():9.2e} {(fused.var - var_x).abs().max().item():9.2e} "
              f"{var_x.mean().item():9.2e} | {(mu_r - mu_rx).abs().max().item():10.2e} "
              f"{(var_r - var_rx).abs().max().item():11.2e} {var_rx.mean().item():12.2e}")
    print("errors: largest absolute difference from the float32 explicit values (coordinates in image "
          "units; the inputs rounded to the dtype first, as autocast does); mean: the exact values' mean")


if __name__ == "__main__":
    main()
