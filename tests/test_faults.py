"""Multi-process correctness and fault tolerance: 2 CPU ranks, kill -9, SIGTERM, NaN, atomic saves."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from configs import load_config
from tests.conftest import tiny_overrides
from tests.dist_worker import RecordingDataset
from tests.run_state import assert_same_training, checkpoint_state
from train import Trainer
from train.checkpoint import list_checkpoints, resolve_resume
from train.data import build_loader
from train.distributed import UnsupportedLaunchError, check_launch, fsdp_problems

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    """A port nobody listens on: other worktrees may run these tests at the same time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], processes: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--num_processes", str(processes)]
    if processes > 1:
        launcher += ["--multi_gpu", "--main_process_port", str(_free_port())]
    return launcher + args


def _first_step_local_loss(tmp_path: Path, overrides: list[str], rank: int, world: int) -> dict[str, float]:
    """What rank `rank` of `world` should compute at step 1, computed by one process: a fresh
    trainer (the seed gives every rank the same initial weights) fed that rank's slice of the
    stream. Returns the step's metrics before the optimizer step."""
    trainer = Trainer(load_config(overrides=[*overrides, f"train.output_dir={tmp_path / f'expect{rank}'}",
                                             "tracker.kind=none"]))
    cfg = trainer.cfg
    batches = iter(build_loader(trainer.train_set, cfg.train.batch_size, cfg.data.seed, rank, world, start=0))
    metrics = trainer.train_step(batches)
    trainer.close()
    return {k: float(v) for k, v in metrics.items()}


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
    # Each rank trained on its own slice of the stream with its samples' own noise: its step-1 loss
    # is what one process computes on that slice from the same initial weights ...
    for r, ranked in enumerate((r0, r1)):
        want = _first_step_local_loss(tmp_path, args, r, 2)
        for k in ("loss/diffusion", "loss/mse"):
            assert ranked["local_history"][0][k] == pytest.approx(want[k], rel=1e-5), (r, k)
    # ... and what was logged is their mean, for the loss and the per-layer dispersion alike.
    keys = [k for k in r0["history"][0] if k.startswith(("loss/", "i2am/dispersion/"))]
    assert any(k.startswith("i2am/dispersion/") for k in keys)
    for logged, a, b in zip(r0["history"], r0["local_history"], r1["local_history"]):
        for k in keys:
            assert logged[k] == pytest.approx((a[k] + b[k]) / 2, rel=1e-5), k
    assert r0["samples_seen"] == 3 * 4 * 2
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    assert (run / "checkpoints" / "checkpoint-0000003" / "model").is_dir()
    # Resuming on another number of processes: test_resume_on_another_process_count_...


# -- resuming on another number of processes ----------------------------------------------------
# Global batch 8 per micro-step (8 x 1 process or 4 x 2 ranks), 2 micro-steps per step, 6 steps, a
# linear warm-up of 4 steps across the interruption at step 3, EMA and guidance dropout on.
# stability.position=0, stability.placement=0, stability.sink=0: the anchored terms average over each rank's own worn-garment queries, so
# with them on a run on 2 processes computes a (slightly) different loss than on 1
# (docs/distributed.md); the resume itself is what these tests check.
CROSS = {"train.max_steps": 6, "train.grad_accum": 2, "train.checkpoint_every": 3, "optim.warmup_steps": 4,
         "optim.lr_scheduler": "linear", "optim.lr": 1e-3, "model.cfg_drop_prob": 0.3, "data.num_val": 2,
         "stability.position": 0, "stability.placement": 0, "stability.sink": 0}
GLOBAL_BATCH = 8


def _cross_overrides(tmp_path: Path, processes: int, **extra) -> list[str]:
    return tiny_overrides(tmp_path, **CROSS, **{"train.batch_size": GLOBAL_BATCH // processes}, **extra)


def _train(tmp_path: Path, processes: int, stop_at: int | None = None, resume: bool = False
           ) -> tuple[list[dict], list[str]]:
    """Train in tmp_path/run with 1 process (here) or 2 gloo ranks (launched). Returns the logged
    history and the names of the samples trained on, in global stream order."""
    extra = {"train.resume": "latest"} if resume else {}
    overrides = _cross_overrides(tmp_path, processes, **extra)
    if processes == 1:
        trainer = Trainer(load_config(overrides=overrides))
        trainer.train_set = recorder = RecordingDataset(trainer.train_set)
        trainer.fit(stop_at=stop_at)
        trainer.close()
        return trainer.history, recorder.names
    args = [str(ROOT / "tests" / "dist_worker.py"), *([f"--stop-at={stop_at}"] if stop_at else []), *overrides]
    proc = subprocess.run(_launch(args, processes=processes), cwd=ROOT, env={**ENV, "ACCELERATE_USE_CPU": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in range(processes)]
    bs = GLOBAL_BATCH // processes
    # Micro-step k of rank r holds stream positions k*8 + r*bs + [0, bs): interleave the ranks' lists.
    names = [n for k in range(len(ranks[0]["names"]) // bs) for r in ranks for n in r["names"][k * bs:(k + 1) * bs]]
    return ranks[0]["history"], names


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> tuple[Path, list[dict], list[str]]:
    """The uninterrupted reference: 1 process, 6 steps."""
    tmp = tmp_path_factory.mktemp("single")
    history, names = _train(tmp, 1)
    return tmp / "run", history, names


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_on_another_process_count_continues_the_single_process_run(tmp_path, single_process_run, first, then):
    """3 steps on `first` processes, then 3 more on `then` (resumed), with the same global batch:
    step, LR at every step, data order, losses, and every trained tensor (optimizer, EMA, weights)
    equal the uninterrupted single-process run's."""
    ref_run, ref_history, ref_names = single_process_run
    per_step = GLOBAL_BATCH * CROSS["train.grad_accum"]
    assert len(ref_names) == 6 * per_step and len(set(ref_names)) == 64  # the stream crossed an epoch
    ref_lr = {h["step"]: h["train/lr"] for h in ref_history}
    # Linear warm-up over 4 steps to lr 1e-3, then linear decay to 0 at step 6, counted in optimizer
    # steps whatever the process count: logged after step s, 1e-3 * min(s / 4, (6 - s) / 2).
    assert [ref_lr[s] for s in range(1, 7)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 5e-4, 0.0], abs=1e-12)

    history1, names1 = _train(tmp_path, first, stop_at=3)
    history2, names2 = _train(tmp_path, then, resume=True)
    assert [h["step"] for h in history1] == [1, 2, 3] and [h["step"] for h in history2] == [4, 5, 6]
    assert names1 + names2 == ref_names
    ref_loss = {h["step"]: h["loss/diffusion"] for h in ref_history}
    for h in history1 + history2:
        assert h["train/lr"] == pytest.approx(ref_lr[h["step"]], rel=1e-12, abs=1e-15), h["step"]
        assert h["loss/diffusion"] == pytest.approx(ref_loss[h["step"]], rel=1e-5), h["step"]
    ckpts = {c.name: c for c in list_checkpoints(tmp_path / "run")}
    for name in ("checkpoint-0000003", "checkpoint-0000006"):  # after `first`, and after `then`
        want = checkpoint_state(ref_run / "checkpoints" / name)
        assert int(want["samples_seen"]) == int(name[-7:]) * per_step
        assert {"weights/null_tokens", "export/null_tokens", "ema/0", "optimizer/0/exp_avg_sq"} <= want.keys()
        assert any(k.startswith("weights/garment_encoder.") for k in want)
        assert any(k.startswith("weights/unet.") for k in want)
        assert_same_training(want, checkpoint_state(ckpts[name]))


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


# -- FSDP: refused at start --------------------------------------------------------------------
def test_fsdp_launch_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """`accelerate launch` with an FSDP config exports ACCELERATE_USE_FSDP=true to every process."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UnsupportedLaunchError) as err:
        Trainer(load_config(overrides=tiny_overrides(tmp_path)))
    message = str(err.value)
    assert message.startswith("FSDP launch (e.g. launch/fsdp.yaml) is not supported by this trainer:")
    for feature in ("  - validation (every train.val_every steps", "  - checkpoints export model/",
                    "  - the EMA (optim.ema_decay=0.99)", "launch/multi_gpu.yaml", "docs/distributed.md#fsdp"):
        assert feature in message, feature
    assert "VAE" not in message  # the tiny config encodes pixels: nothing to say about a VAE
    assert not (tmp_path / "run").exists()


def test_fsdp_distributed_type_names_each_feature_of_the_config(monkeypatch):
    """An Accelerator built with an FSDP plugin in code reports the FSDP distributed type."""
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    plain = load_config(overrides=[])
    check_launch(plain, DistributedType.MULTI_CPU)  # DDP on CPUs: fine
    check_launch(plain, DistributedType.NO)
    vae_no_ema = load_config(overrides=["model.codec.kind=vae", "optim.ema_decay=null"])
    with pytest.raises(UnsupportedLaunchError, match="the VAE codec \\(model.codec.kind=vae\\)") as err:
        check_launch(vae_no_ema, DistributedType.FSDP)
    assert "EMA" not in str(err.value)
    assert [p.split(" (")[0] for p in fsdp_problems(plain)] == ["validation", "checkpoints export model/",
                                                                 "the EMA"]


@pytest.mark.slow
def test_the_fsdp_launch_file_is_refused_on_cpu_ranks_with_the_reasons(tmp_path):
    """launch/fsdp.yaml as shipped, on 2 CPU ranks: every process stops with the trainer's error
    (not accelerate's "no available devices" RuntimeError, and not a silent DDP run)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "fsdp.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), str(ROOT / "train.py"),
           *tiny_overrides(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert out.count("error: FSDP launch (e.g. launch/fsdp.yaml) is not supported by this trainer:") == 2, out[-3000:]
    assert "  - validation" in out and "no available devices" not in out
    assert not (tmp_path / "run").exists()
