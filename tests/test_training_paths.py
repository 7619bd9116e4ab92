"""Training paths a user hits that no other test covers: bf16 autocast on CPU, the EMA
weights at validation and in the saved model, the loss without min-SNR and with epsilon
prediction, gradient checkpointing under the monitor, and the TensorBoard tracker.

Every trainer here is the tiny one of `tests/conftest.py`; steps are run through
`Trainer.train_step` where the whole `fit()` (validation, checkpoints) isn't the point."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from configs import load_config
from tests.conftest import tiny_overrides
from train import Trainer
from train.data import build_loader

SMALL = {"data.num_train": 16, "data.num_val": 2, "train.batch_size": 2}


def _reset_accelerate() -> None:
    """Accelerate's process-wide state fixes the precision of the first Accelerator; a
    second trainer with another precision in the same test needs it cleared (as conftest
    does between tests)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _trainer(tmp_path: Path, **overrides) -> Trainer:
    return Trainer(load_config(overrides=tiny_overrides(tmp_path, **{**SMALL, **overrides})))


def _batches(trainer: Trainer):
    tc = trainer.cfg.train
    return iter(build_loader(trainer.train_set, tc.batch_size, trainer.cfg.data.seed, 0, 1, start=0))


def _steps(trainer: Trainer, n: int) -> list[dict[str, float]]:
    """n optimizer steps as fit() runs them (train mode, step counter), metrics as floats."""
    batches, out = _batches(trainer), []
    trainer.model.train()
    for _ in range(n):
        metrics = trainer.train_step(batches)
        assert metrics is not None, f"step {trainer.step} was skipped (non-finite loss)"
        out.append({k: float(v) for k, v in metrics.items()})
        trainer.step += 1
    return out


# ------------------------------------------------------------------------------ bf16 on CPU
def test_bf16_autocast_steps_on_cpu(tmp_path):
    fp32 = _trainer(tmp_path / "fp32")
    want = _steps(fp32, 1)[0]["loss/diffusion"]
    fp32.close()
    _reset_accelerate()

    bf16 = _trainer(tmp_path / "bf16", **{"train.mixed_precision": "bf16"})
    before = [p.detach().clone() for p in bf16._params()]
    out_dtypes: list[torch.dtype] = []
    hook = bf16.unwrapped.unet.register_forward_hook(lambda m, a, o: out_dtypes.append(o.sample.dtype))
    try:
        losses = [m["loss/diffusion"] for m in _steps(bf16, 2)]
    finally:
        hook.remove()
    assert out_dtypes == [torch.bfloat16] * 2  # autocast really ran the UNet in bf16
    assert all(torch.isfinite(torch.tensor(losses)))
    # Same weights, data, noise and timesteps at step 1: only bf16 rounding differs (8 bits of mantissa).
    assert losses[0] == pytest.approx(want, rel=2e-2)
    params = bf16._params()
    assert {p.dtype for p in params} == {torch.float32}  # autocast computes in bf16, weights stay fp32
    assert {p.dtype for p in bf16.ema.shadow_params} == {torch.float32}
    assert all(torch.isfinite(p).all() for p in params)
    assert sum(not torch.equal(a, b) for a, b in zip(before, params)) > len(params) // 2  # the optimizer stepped
    bf16.close()


# ------------------------------------------- a short fit: EMA at validation, saved weights, TensorBoard
@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> SimpleNamespace:
    """2 steps with the TensorBoard tracker and validation at the end, observed from outside:
    the weights the validator samples with, and the weights before and after validation."""
    tmp = tmp_path_factory.mktemp("fitted")
    trainer = _trainer(tmp, **{"train.max_steps": 2, "tracker.kind": "tensorboard", "diffusion.sample_steps": 2})
    seen = SimpleNamespace(validated=[], around=[])
    run_validator, run_validate = trainer.validator.run, trainer._validate

    def validator_run(model, device, hooks=None):
        seen.validated.append([p.detach().clone() for p in model.trainable_parameters()])
        return run_validator(model, device, hooks)

    def validate():
        before = [p.detach().clone() for p in trainer._params()]
        err = run_validate()
        seen.around.append((before, [p.detach().clone() for p in trainer._params()]))
        return err

    trainer.validator.run, trainer._validate = validator_run, validate
    seen.summary = trainer.fit()
    trainer.close()
    seen.trainer, seen.run_dir = trainer, tmp / "run"
    return seen


def test_validation_and_the_saved_model_use_the_ema_weights(fitted):
    from train.checkpoint import load_checkpoint

    trainer = fitted.trainer
    shadow = [p.detach().clone() for p in trainer.ema.shadow_params]
    raw = [p.detach().clone() for p in trainer._params()]
    assert trainer.ema.optimization_step == 2
    assert sum(not torch.allclose(s, r) for s, r in zip(shadow, raw)) > len(raw) // 2  # they can be told apart
    assert len(fitted.validated) == 1 and len(fitted.around) == 1  # validation at the last step
    for i, (v, s) in enumerate(zip(fitted.validated[0], shadow)):
        assert torch.equal(v, s), f"validation sampled with parameter {i} != its EMA shadow"
    before, after = fitted.around[0]
    for i, (b, a, r) in enumerate(zip(before, after, raw)):
        assert torch.equal(b, a) and torch.equal(a, r), f"training parameter {i} not restored after validation"
    # The checkpoint's model/ holds the EMA weights (what evaluation and analysis load).
    loaded = load_checkpoint(fitted.run_dir, device=torch.device("cpu"))
    assert loaded.step == 2
    saved = dict(loaded.model.named_parameters())
    names = [n for n, p in trainer.unwrapped.named_parameters() if p.requires_grad]
    assert len(names) == len(shadow)
    for name, s in zip(names, shadow):
        assert torch.equal(saved[name].detach(), s), name


def test_tensorboard_tracker_writes_the_logged_scalars(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # accelerate writes the run's events under <run>/<project>/ (and the hyperparameters in a sub-run)
    events = sorted((fitted.run_dir / fitted.trainer.cfg.tracker.project).glob("events.out.tfevents.*"))
    assert len(events) == 1, f"expected one TensorBoard event file in {fitted.run_dir}, got {events}"
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    history = fitted.trainer.history
    assert [h["step"] for h in history] == [1, 2]
    for key in ("loss/diffusion", "loss/total", "train/lr", "train/grad_norm", "i2am/dispersion/mean"):
        assert key in tags, (key, sorted(tags))
        got = {e.step: e.value for e in acc.Scalars(key)}
        assert got == pytest.approx({h["step"]: h[key] for h in history}, rel=1e-6), key
    val = {e.step: e.value for e in acc.Scalars("val/colour_error")}
    assert val == pytest.approx({2: fitted.trainer.val_history[-1]["val/colour_error"]}, rel=1e-6)
    assert "val/samples" in acc.Tags()["images"]
    assert "TensorBoard" in fitted.summary["tracker"] and str(fitted.run_dir) in fitted.summary["tracker"]


# ------------------------------------------------------------------- the loss's target and weights
def _alpha_bar(t: torch.Tensor, n: int = 1000) -> torch.Tensor:
    """ᾱ_t of "scaled_linear" with DDPMScheduler's default ends (1e-4, 0.02), in float64."""
    betas = torch.linspace(1e-4 ** 0.5, 0.02 ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)[t]


@pytest.mark.parametrize("prediction, gamma", [("epsilon", "null"), ("v_prediction", "null"), ("sample", "null"),
                                               ("epsilon", 5.0), ("v_prediction", 5.0), ("sample", 5.0)])
def test_loss_target_and_weights_from_the_config(tmp_path, prediction, gamma):
    """The trainer's loss with a stand-in model (a fixed function of its input) against the
    MSE written out by hand: target noise (epsilon), x0 (sample) or v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0,
    weights 1 without min-SNR, else min(SNR, γ)/SNR (epsilon), min(SNR, γ) (sample) or
    min(SNR, γ)/(SNR + 1) (v)."""
    cfg = load_config(overrides=tiny_overrides(tmp_path, **{**SMALL, "diffusion.prediction_type": prediction,
                                                            "diffusion.snr_gamma": gamma,
                                                            "model.warp.enabled": prediction == "sample"}))
    assert cfg.diffusion.snr_gamma == (None if gamma == "null" else gamma)  # YAML null reaches the schema
    trainer = Trainer(cfg)
    x0 = torch.randn(6, 12, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    seen = {}

    def model(noisy, t):
        seen["noisy"], seen["t"] = noisy, t
        return 0.3 * noisy + 0.1

    loss, metrics = trainer.diffusion_loss(model, x0, torch.Generator().manual_seed(1))
    t = seen["t"]
    assert len(set(t.tolist())) > 1  # several timesteps, so the weights matter
    ab = _alpha_bar(t).view(-1, 1, 1, 1)
    noisy = seen["noisy"].double()
    eps = (noisy - ab.sqrt() * x0.double()) / (1 - ab).sqrt()  # the noise, whatever order it was drawn in
    target = {"epsilon": eps, "sample": x0.double(),
              "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0.double()}[prediction]
    mse = ((0.3 * noisy + 0.1 - target) ** 2).mean(dim=(1, 2, 3))
    snr = (ab / (1 - ab)).flatten()
    if gamma == "null":
        weights = torch.ones_like(snr)
    else:
        weights = snr.clamp(max=gamma) / {"epsilon": snr, "v_prediction": snr + 1, "sample": 1.0}[prediction]
    assert float(loss) == pytest.approx(float((mse * weights).mean()), rel=1e-4)
    assert float(metrics["loss/mse"]) == pytest.approx(float(mse.mean()), rel=1e-4)
    trainer.close()


# -------------------------------------------------- gradient checkpointing with the monitor's moments
def _one_step_grads(tmp_path: Path, checkpointing: bool, **extra) -> SimpleNamespace:
    """One training step's gradients (caught before the optimizer step), metrics, the monitor's
    last moments, and how often a monitored attention layer ran."""
    # colour: the anchored values ride in the checkpointed layers' own attention call, so the
    # backward's re-run must see the same anchors; sink: the grid mass of the null tokens.
    trainer = _trainer(tmp_path, **{"model.unet.gradient_checkpointing": checkpointing,
                                    "stability.dispersion": 0.5, "stability.atv": 0.5, "stability.colour": 0.5,
                                    "optim.max_grad_norm": 1e9, **extra})
    unet, names = trainer.unwrapped.unet, trainer.unwrapped.trainable_parameters()
    layer = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
    calls = []
    hook = layer.register_forward_hook(lambda *a: calls.append(1))
    caught = {}

    def before_step(optimizer, args, kwargs):  # the gradients as AdamW gets them (zeroed after)
        caught["grads"] = [p.grad.detach().clone() for p in names]

    handle = trainer.optimizer.optimizer.register_step_pre_hook(before_step)
    try:
        metrics = _steps(trainer, 1)[0]
    finally:
        hook.remove()
        handle.remove()
    moments = {n: (a.mu.detach().clone(), a.var.detach().clone())
               for n, a in trainer.hooks.monitor.last_attention().items()}
    trainer.close()
    return SimpleNamespace(grads=caught["grads"], metrics=metrics, moments=moments, calls=len(calls))


def test_gradient_checkpointing_with_the_monitor_gives_the_same_gradients(tmp_path):
    plain = _one_step_grads(tmp_path / "plain", False)
    _reset_accelerate()
    ckpt = _one_step_grads(tmp_path / "ckpt", True)
    assert plain.calls == 1 and ckpt.calls == 2  # checkpointing really re-ran the layer in backward
    assert plain.metrics["loss/stability"] > 0  # the moments carry gradient into the loss
    assert len(plain.grads) == len(ckpt.grads)
    assert sum(float(g.abs().sum()) > 0 for g in plain.grads) > len(plain.grads) // 2
    for i, (a, b) in enumerate(zip(plain.grads, ckpt.grads)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=f"gradient {i}")
    assert plain.metrics.keys() == ckpt.metrics.keys()
    assert any(k.startswith("i2am/dispersion/") for k in plain.metrics)
    for k, v in plain.metrics.items():
        if k not in ("train/grad_norm",):
            assert ckpt.metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert ckpt.metrics["train/grad_norm"] == pytest.approx(plain.metrics["train/grad_norm"], rel=1e-5)
    assert plain.moments.keys() == ckpt.moments.keys() and plain.moments
    for n, (mu, var) in plain.moments.items():
        torch.testing.assert_close(ckpt.moments[n][0], mu, rtol=0, atol=1e-5, msg=n)
        torch.testing.assert_close(ckpt.moments[n][1], var, rtol=0, atol=1e-5, msg=n)


def test_gradient_checkpointing_with_the_attention_warp_gives_the_same_gradients(tmp_path):
    # The warp's centres are read inside a checkpointed block by a hook and used after the UNet: with a
    # re-entrant checkpoint they would carry no gradient and the warp would silently stop training the layer.
    warp = {"model.warp.enabled": True, "diffusion.prediction_type": "sample"}
    plain = _one_step_grads(tmp_path / "plain", False, **warp)
    _reset_accelerate()
    ckpt = _one_step_grads(tmp_path / "ckpt", True, **warp)
    assert ckpt.calls == 2
    for i, (a, b) in enumerate(zip(plain.grads, ckpt.grads)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=f"gradient {i}")
