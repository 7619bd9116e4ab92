"""What a training run leaves in a checkpoint, as named tensors, and how two runs are compared."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def checkpoint_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Everything a checkpoint holds that training produced, as named tensors: the training
    weights of every module (model.safetensors: UNet, garment encoder, null tokens), the
    optimizer's moments and steps, the EMA's shadow weights and step, the exported EMA model
    (model/), the step, the samples consumed and the LR schedule's position and rate."""
    out = {f"weights/{k}": v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    optimizer = torch.load(ckpt / "optimizer.bin", weights_only=True)
    for i, state in optimizer["state"].items():
        out.update({f"optimizer/{i}/{k}": torch.as_tensor(v) for k, v in state.items()})
    ema = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False)  # trusted: written by this test
    out.update({f"ema/{i}": v for i, v in enumerate(ema["shadow_params"])})
    out["ema/step"] = torch.tensor(ema["optimization_step"])
    unet = load_file(str(ckpt / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    out.update({f"export/unet/{k}": v for k, v in unet.items()})
    out.update({f"export/{k}": v for k, v in load_file(str(ckpt / "model" / "garment_encoder.safetensors")).items()})
    state = json.loads((ckpt / "train_state.json").read_text())
    out["step"], out["samples_seen"] = torch.tensor(state["step"]), torch.tensor(state["samples_seen"])
    out["lr/last_epoch"] = torch.tensor(state["lr_scheduler"]["last_epoch"])
    out["lr/rate"] = torch.tensor(state["lr_scheduler"]["_last_lr"], dtype=torch.float64)
    return out


def _kind(key: str) -> str:
    """weights, ema, export, optimizer/exp_avg, optimizer/exp_avg_sq, optimizer/step, lr/rate, ..."""
    parts = key.split("/")
    return f"optimizer/{parts[-1]}" if parts[0] == "optimizer" else parts[0]


def assert_same_training(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    """Equal within float tolerance: every tensor within `rtol` of the largest magnitude of its
    kind across the model (all weights, all first moments, ...); counts and steps exactly.

    Why of the kind, not of each element or tensor: 2 ranks add their gradients up in another
    order than 1 process (per-rank means, then the all-reduce mean; convolutions on half
    batches), so float32 rounding moves every gradient element by ~1e-7 of the model's
    gradient scale (measured: 2.4e-6 of a tensor's largest gradient at worst). Adam divides
    each element by its own running RMS, so a near-zero gradient element turns that into a
    visible change of its own small update: 2e-4 of the largest value of a zero-initialised
    bias, but measured after 6 steps (3 on 2 ranks) at most 7.5e-7 of the largest weight,
    7.1e-7 of the largest first moment and 6.2e-7 of the largest second moment. A wrong LR
    schedule or other noise per sample changes updates by a sizeable fraction of the learning
    rate (1e-3 here, against weights up to 1)."""
    assert want.keys() == got.keys()
    scale: dict[str, float] = {}
    for k, w in want.items():
        if w.is_floating_point() and w.numel():
            scale[_kind(k)] = max(scale.get(_kind(k), 0.0), float(w.abs().max()))
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, k
        if not w.is_floating_point():
            assert torch.equal(g, w), (k, g, w)
            continue
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale.get(_kind(k), 0.0),
                                   msg=lambda m, k=k: f"{k}: {m}")
