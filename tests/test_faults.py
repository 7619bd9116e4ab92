"""Multi-process correctness and fault tolerance: 2 CPU ranks, kill -9, SIGTERM, NaN, atomic saves."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from configs import load_config
from tests.conftest import tiny_overrides
from train import Trainer
from train.checkpoint import list_checkpoints, resolve_resume

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _launch(args: list[str], processes: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--num_processes", str(processes)]
    if processes > 1:
        launcher += ["--multi_gpu", "--main_process_port", "29533"]
    return launcher + args


@pytest.mark.slow
def test_two_cpu_ranks_agree_and_log_global_means(tmp_path):
    """2 gloo ranks: identical parameters, logged values = mean of the per-rank values, one W&B run."""
    args = tiny_overrides(tmp_path, **{"train.max_steps": 3, "tracker.kind": "wandb", "train.checkpoint_every": 3,
                                       "data.num_val": 2})
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(_launch([str(ROOT / "tests" / "dist_worker.py"), *args], processes=2), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    r0, r1 = (json.loads((run / f"rank{i}.json").read_text()) for i in (0, 1))
    assert (r0["world"], r1["world"]) == (2, 2)
    assert r0["params_sum"] == r1["params_sum"] and r0["first_params"] == r1["first_params"]
    # Each rank saw different data/noise, so the per-rank losses differ ...
    assert r0["local_history"][0]["loss/diffusion"] != r1["local_history"][0]["loss/diffusion"]
    # ... and what was logged is their mean, for the loss and the per-layer dispersion alike.
    keys = [k for k in r0["history"][0] if k.startswith(("loss/", "i2am/dispersion/"))]
    assert any(k.startswith("i2am/dispersion/") for k in keys)
    for logged, a, b in zip(r0["history"], r0["local_history"], r1["local_history"]):
        for k in keys:
            assert logged[k] == pytest.approx((a[k] + b[k]) / 2, rel=1e-5), k
    assert r0["samples_seen"] == 3 * 4 * 2
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    assert (run / "checkpoints" / "checkpoint-0000003" / "model").is_dir()

    # Resume the 2-process checkpoint with 1 process: it continues at step 3.
    cfg = load_config(overrides=tiny_overrides(tmp_path, **{"train.max_steps": 5, "train.resume": "latest",
                                                            "data.num_val": 2}))
    trainer = Trainer(cfg)
    trainer.fit()
    assert trainer.history[0]["step"] == 4 and trainer.samples_seen == 24 + 2 * 4
    trainer.close()


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    last = list_checkpoints(run)[-1]
    return load_file(str(last / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    common = {"train.max_steps": 40, "train.checkpoint_every": 2, "train.log_every": 10}
    ref = subprocess.run(_launch([str(ROOT / "train.py"), *tiny_overrides(tmp_path / "ref", **common)]),
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "killed" / "run"
    args = [str(ROOT / "train.py"), *tiny_overrides(tmp_path / "killed", **common)]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list_checkpoints(run) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(list_checkpoints(run)[-1].name.split("-")[1])
    assert killed_at < 40, "the run finished before it could be killed"

    resumed = subprocess.run([sys.executable, *args, "train.resume=latest"], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = _final_weights(tmp_path / "ref" / "run"), _final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    args = [str(ROOT / "train.py"), *tiny_overrides(tmp_path, **{"train.max_steps": 100000, "train.checkpoint_every": 5})]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list_checkpoints(run) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM" in out and "train.resume=latest" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] < 100000
    last = list_checkpoints(run)[-1]
    assert json.loads((last / "train_state.json").read_text())["step"] == summary["steps"]


def test_non_finite_losses_skip_steps_then_stop_with_the_checkpoint_kept(tmp_path, capsys):
    cfg = load_config(overrides=tiny_overrides(tmp_path, **{"train.max_steps": 20, "train.checkpoint_every": 2,
                                                            "train.nan_tolerance": 3}))
    trainer = Trainer(cfg)
    real = trainer.objective.diffusion.loss

    def flaky(pred, latents, noised):
        loss, metrics = real(pred, latents, noised)
        if trainer.step in (2, 5, 6, 7):  # one isolated NaN, then three in a row
            loss = loss * float("nan")
            metrics["loss/diffusion"] = loss.detach()
        return loss, metrics

    trainer.objective.diffusion.loss = flaky
    before = {k: v.clone() for k, v in trainer.unwrapped.unet.state_dict().items()}
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row"):
        trainer.fit()
    out = capsys.readouterr().out
    assert "non-finite loss at step 2 (loss/diffusion" in out
    assert [h["step"] for h in trainer.history][:4] == [1, 2, 4, 5]  # step 3 (the NaN) was skipped
    assert not all(torch.equal(before[k], v) for k, v in trainer.unwrapped.unet.state_dict().items())
    ckpts = list_checkpoints(tmp_path / "run")
    assert ckpts and ckpts[-1].name == "checkpoint-0000004"  # the last good one is still there
    trainer.close()


def test_half_written_checkpoint_is_ignored_and_limit_keeps_the_newest(tmp_path):
    cfg = load_config(overrides=tiny_overrides(tmp_path, **{"train.max_steps": 2, "train.checkpoint_every": 1,
                                                            "train.checkpoint_limit": 1}))
    trainer = Trainer(cfg)
    trainer.fit()
    trainer.close()
    run = tmp_path / "run"
    assert [c.name for c in list_checkpoints(run)] == ["checkpoint-0000002"]
    # A crash while saving leaves only a .tmp directory: resume must not pick it.
    crashed = run / "checkpoints" / "checkpoint-0000009.tmp"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"partial")
    assert resolve_resume(run, "latest").name == "checkpoint-0000002"
    # The next save clears the leftover and commits a complete checkpoint.
    cfg = load_config(overrides=tiny_overrides(tmp_path, **{"train.max_steps": 3, "train.checkpoint_every": 1,
                                                            "train.checkpoint_limit": 1, "train.resume": "latest"}))
    trainer = Trainer(cfg)
    trainer.fit()
    trainer.close()
    assert [c.name for c in list_checkpoints(run)] == ["checkpoint-0000003"]
    assert not crashed.exists()
    assert (run / "checkpoints" / "checkpoint-0000003" / "train_state.json").is_file()
