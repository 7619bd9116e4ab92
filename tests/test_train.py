"""The loop itself: learning, exact resume, checkpoint layout, the real launcher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs import load_config
from tests.conftest import tiny_overrides
from train import Trainer
from train.trainer import format_summary
from train.checkpoint import list_checkpoints, load_checkpoint
from train.data import build_loader

ROOT = Path(__file__).resolve().parents[1]


def _fixed_batch_loss(trainer: Trainer) -> float:
    """Diffusion loss on a fixed batch with fixed noise: comparable across training."""
    model = trainer.unwrapped
    batch = torch.utils.data.default_collate([trainer.train_set[i] for i in range(16)])
    with torch.no_grad():
        latents = model.codec.encode(batch["person"])
        cond = model.condition(batch)
        gen = torch.Generator().manual_seed(1234)
        loss, _ = trainer.diffusion_loss(lambda x, t: model(x, t, cond, batch["garment"]), latents, gen)
    return float(loss)


@pytest.mark.slow
def test_short_training_lowers_the_loss(tmp_path):
    cfg = load_config(overrides=tiny_overrides(tmp_path, **{"train.max_steps": 50, "optim.lr": 2e-3,
                                                            "train.batch_size": 8, "optim.lr_scheduler": "constant"}))
    trainer = Trainer(cfg)
    before = _fixed_batch_loss(trainer)
    trainer.fit()
    after = _fixed_batch_loss(trainer)
    assert after < 0.8 * before, (before, after)
    assert len(trainer.history) == 50 and all("loss/diffusion" in h for h in trainer.history)


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}


def test_resume_continues_exactly(tmp_path):
    """6 uninterrupted steps == 3 steps, checkpoint, new process state, 3 more steps."""
    common = {"train.max_steps": 6, "train.checkpoint_every": 3, "train.grad_accum": 2}
    full = Trainer(load_config(overrides=tiny_overrides(tmp_path / "a", **common)))
    full.fit()

    part = Trainer(load_config(overrides=tiny_overrides(tmp_path / "b", **common)))
    part.fit(stop_at=3)  # as if killed right after the step-3 checkpoint
    ckpt = list_checkpoints(tmp_path / "b" / "run")[-1]
    assert ckpt.name == "checkpoint-0000003"
    torch.manual_seed(999)  # a resumed process must not depend on leftover global RNG state
    resumed = Trainer(load_config(overrides=tiny_overrides(tmp_path / "b", **common, **{"train.resume": "latest"})))
    summary = resumed.fit()

    assert resumed.history[0]["step"] == 4
    # The run's training time adds up over both invocations (what the checkpoint recorded).
    recorded = json.loads((ckpt / "train_state.json").read_text())["train_seconds"]
    assert 0 < recorded <= part.train_seconds
    assert resumed.train_seconds - recorded == pytest.approx(summary["seconds"], abs=0.06)
    losses_full = {h["step"]: h["loss/diffusion"] for h in full.history}
    for h in resumed.history:
        assert h["loss/diffusion"] == pytest.approx(losses_full[h["step"]], rel=1e-5, abs=1e-7), h["step"]
    a, b = _params(full), _params(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # The EMA came back through accelerate's load_state (custom_checkpoint_0.pkl): every shadow
    # tensor and the decay schedule's step, on the training device.
    assert not list(ckpt.glob("ema*")) and (ckpt / "custom_checkpoint_0.pkl").is_file()
    assert resumed.ema.optimization_step == full.ema.optimization_step == 6
    assert len(resumed.ema.shadow_params) == len(full.ema.shadow_params) == len(resumed._params())
    for i, (x, y) in enumerate(zip(full.ema.shadow_params, resumed.ema.shadow_params)):
        assert y.device == resumed.accelerator.device
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=f"shadow param {i}")
    # Resuming the finished run trains nothing and leaves its summary as the training wrote it.
    written = (tmp_path / "a" / "run" / "summary.json").read_text()
    again = Trainer(load_config(overrides=tiny_overrides(tmp_path / "a", **common, **{"train.resume": "latest"})))
    assert again.fit() == json.loads(written) and again.step == 6
    assert (tmp_path / "a" / "run" / "summary.json").read_text() == written and again.history == []


def test_a_checkpoint_without_the_schedule_state_resumes_it_at_its_step(tmp_path, capsys):
    """Checkpoints written before train_state.json held the LR schedule (it was accelerate's
    scheduler.bin then) resume with the schedule at their step."""
    common = {"train.max_steps": 6, "optim.warmup_steps": 4, "optim.lr_scheduler": "linear", "optim.lr": 1e-3,
              "train.resume": "latest"}
    part = Trainer(load_config(overrides=tiny_overrides(tmp_path, **common)))
    part.fit(stop_at=3)
    part.close()
    assert "train.resume=latest: no complete checkpoint in" in capsys.readouterr().out
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["lr_scheduler"]["last_epoch"] == 3
    del state["lr_scheduler"]
    (ckpt / "train_state.json").write_text(json.dumps(state))
    resumed = Trainer(load_config(overrides=tiny_overrides(tmp_path, **common)))
    resumed.fit(stop_at=4)
    resumed.close()
    # Linear warm-up over 4 steps to 1e-3: 7.5e-4 after step 3 (the rate of step 4), 1e-3 after step 4.
    assert resumed.history[0]["step"] == 4 and resumed.history[0]["train/lr"] == pytest.approx(1e-3, rel=1e-12)
    assert resumed.lr_scheduler.last_epoch == 4
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx([1e-3])


def test_init_from_fine_tunes_a_trained_run_from_its_evaluated_weights(tmp_path, capsys):
    """train.init_from: the new run starts at step 0 (fresh schedule) from the EMA weights the
    source checkpoint saved in model/; its own checkpoints take over on resume; a model that
    does not fit, or a path that is no checkpoint, is a clear error naming the path."""
    from train.checkpoint import CheckpointError

    source = Trainer(load_config(overrides=tiny_overrides(tmp_path / "src", **{"train.max_steps": 3})))
    source.fit()
    source.close()
    saved = load_checkpoint(tmp_path / "src" / "run").model.state_dict()

    over = tiny_overrides(tmp_path / "ft", **{"train.init_from": str(tmp_path / "src" / "run"),
                                              "train.max_steps": 2, "train.checkpoint_every": 1,
                                              "train.resume": "latest"})
    ft = Trainer(load_config(overrides=over))
    assert "train.init_from: starting from the model weights of" in capsys.readouterr().out
    start = ft.unwrapped.state_dict()
    for k, v in saved.items():
        torch.testing.assert_close(start[k], v, rtol=0, atol=0, msg=k)
    ft.fit(stop_at=1)
    ft.close()
    assert ft.history[0]["step"] == 1 and ft.lr_scheduler.last_epoch == 1
    after_one = _params(ft)
    again = Trainer(load_config(overrides=over))  # resumes its own step-1 checkpoint, not the source
    assert again.step == 0 and "starting from the model weights" not in capsys.readouterr().out
    again.fit()
    assert again.history[0]["step"] == 2
    assert any(not torch.equal(after_one[k], saved[k]) for k in saved)

    wider = tiny_overrides(tmp_path / "bad", **{"train.init_from": str(tmp_path / "src" / "run"),
                                                "model.garment.width": 32})
    with pytest.raises(CheckpointError, match=r"do not fit this run's model .*config\.yaml"):
        Trainer(load_config(overrides=wider))
    with pytest.raises(CheckpointError, match=r"train.init_from=.*nowhere.*neither a checkpoint"):
        Trainer(load_config(overrides=tiny_overrides(tmp_path / "bad2", **{"train.init_from": str(tmp_path / "nowhere")})))


class _Randomised(torch.utils.data.Dataset):
    """A data set that draws from torch's global generator, as real-data augmentation does."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "draw": torch.rand(())}


def _stream(batch_size: int, world: int, start: int, batches: int, workers: int = 0) -> list[tuple[int, int, float]]:
    """(position, index, draw) of `batches` global batches, ranks interleaved as the trainer reads them."""
    its = [iter(build_loader(_Randomised(), batch_size, 7, r, world, start, num_workers=workers)) for r in range(world)]
    out = []
    for _ in range(batches):
        for it in its:
            b = next(it)
            out += list(zip(b["position"].tolist(), b["index"].tolist(), b["draw"].tolist()))
    return out


def test_the_stream_is_the_same_on_any_process_count_worker_count_and_resume_point():
    """Positions, samples and the data set's own random draws depend on the stream position only."""
    torch.manual_seed(1)
    one = _stream(8, 1, 0, 4)  # 32 samples: 3 epochs of 10 and a bit
    assert [p for p, _, _ in one] == list(range(32))
    # Each epoch is a permutation of the data set, seeded by data seed + epoch.
    for e in range(3):
        want = torch.randperm(10, generator=torch.Generator().manual_seed(7 + e)).tolist()
        assert [i for _, i, _ in one[10 * e:10 * e + 10]] == want
    torch.manual_seed(2)  # the global generator's state must not matter
    assert _stream(4, 2, 0, 4) == one  # 2 ranks of 4
    assert _stream(2, 4, 8, 3) == one[8:]  # 4 ranks of 2, resumed at sample 8
    assert _stream(8, 1, 16, 2, workers=2) == one[16:]  # worker processes, resumed at sample 16
    # The same sample index in another epoch draws again: the draw follows the position.
    first = {i: d for _, i, d in one[:10]}
    assert sum(first[i] == d for _, i, d in one[10:20]) == 0


def test_checkpoint_layout_and_limit(tmp_path):
    cfg = load_config(overrides=tiny_overrides(tmp_path, **{"train.max_steps": 4, "train.checkpoint_every": 1,
                                                            "train.checkpoint_limit": 2}))
    trainer = Trainer(cfg)
    trainer.fit()
    run = tmp_path / "run"
    ckpts = list_checkpoints(run)
    assert [c.name for c in ckpts] == ["checkpoint-0000003", "checkpoint-0000004"]
    last = ckpts[-1]
    assert (last / "config.yaml").is_file() and (last / "model" / "unet" / "config.json").is_file()
    assert (last / "model" / "garment_encoder.safetensors").is_file()
    assert json.loads((last / "train_state.json").read_text())["step"] == 4
    # The EMA is one of accelerate's registered objects, not a file of its own.
    assert (last / "custom_checkpoint_0.pkl").is_file() and not list(last.glob("ema*"))
    assert not list((run / "checkpoints").glob("*.tmp"))
    # The saved resolved config rebuilds the same run.
    assert load_config(files=[last / "config.yaml"]).train.max_steps == 4

    # Loading it for inference (the run directory resolves to its latest checkpoint) gives
    # the EMA weights, buffers included, in eval mode.
    loaded = load_checkpoint(run)
    assert loaded.path == last and loaded.step == 4 and not loaded.model.training
    assert loaded.cfg.train.max_steps == 4
    with trainer.ema_weights():
        want = {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
    got = loaded.model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    # ... and not the raw training weights (the comparison above could tell them apart).
    assert any(not torch.equal(got[k], v) for k, v in trainer.unwrapped.state_dict().items())
    trainer.close()


def test_summary_reports_colour_errors(tmp_path):
    cfg = load_config(overrides=tiny_overrides(tmp_path, **{"train.max_steps": 2, "train.validate_at_start": True}))
    summary = Trainer(cfg).fit()
    assert summary["steps"] == 2
    for key in ("colour_error_untrained", "colour_error_final", "colour_error_garment_blind"):
        assert 0 < summary[key] < 1, key
    assert (tmp_path / "run" / "summary.json").is_file()
    assert list((tmp_path / "run" / "images").glob("val_samples_*.png"))
    # the default run's stability recipe is named in the summary
    assert summary["stability"] == (f"position {cfg.stability.position:g} + placement {cfg.stability.placement:g} "
                                    f"+ sink {cfg.stability.sink:g} on every monitored layer; every t")
    assert "stability loss   position" in format_summary(summary)


@pytest.mark.slow
def test_two_steps_through_accelerate_launch(tmp_path):
    """The README's main command, for 2 steps: a checkpoint and a W&B offline run. No thread
    count is given (accelerate would give the process 1): it trains on every core."""
    from train.threads import available_cores

    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    for key in ("WANDB_API_KEY", "OMP_NUM_THREADS", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    args = tiny_overrides(tmp_path, **{"train.max_steps": 2, "train.checkpoint_every": 2, "tracker.kind": "wandb"})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "checkpoints" / "checkpoint-0000002" / "model" / "unet" / "config.json").is_file()
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    # The validation's per-sample table (sortable in W&B) and the map figures were logged.
    tables = list(offline[0].glob("files/media/table/**/*.table.json"))
    assert tables and "imacs_g" in tables[0].read_text()
    assert list(offline[0].glob("files/media/images/i2am/r2g*.png"))
    assert "wandb sync" in proc.stdout + proc.stderr
    cores = available_cores()
    assert f"CPU threads per process: {cores} (auto: {cores} cores / 1 local process)" in proc.stdout.splitlines()
