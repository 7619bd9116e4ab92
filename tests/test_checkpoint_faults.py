"""kill -9 inside a checkpoint save: resume always finds a complete checkpoint and ends where an
uninterrupted run ends.

The kill is real (SIGKILL of a `train.py` process), placed deterministically by the
TRYON_CRASH_AT hook of train/checkpoint.py at a named point of the save of step 4:

- saved:     the new state is complete as checkpoint-0000004.tmp, nothing renamed yet
- aside:     re-saving step 4: the old checkpoint-0000004 moved to .old, the new one not in place
- committed: the new checkpoint-0000004 in place; the aside copy and old checkpoints not deleted
- pruning:   an old checkpoint renamed to .del, not yet deleted

A re-save of step 4 happens when a run resumes from an older checkpoint (here one kept outside
the run directory) while checkpoint-0000004 exists. Then a new process resumes with
train.resume=latest and trains to step 5.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs import load_config
from tests.conftest import tiny_overrides
from tests.run_state import assert_same_training, checkpoint_state
from train import Trainer
from train.checkpoint import CRASH_ENV, list_checkpoints, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"train.max_steps": 5, "train.checkpoint_every": 1}


def _overrides(tmp: Path, limit: int, **extra) -> list[str]:
    return tiny_overrides(tmp, **STEPS, **{"train.checkpoint_limit": limit}, **extra)


def _train(tmp: Path, limit: int, stop_at: int | None = None, **extra) -> Trainer:
    trainer = Trainer(load_config(overrides=_overrides(tmp, limit, **extra)))
    trainer.fit(stop_at=stop_at)
    trainer.close()
    return trainer


def _crash(tmp: Path, limit: int, point: str, **extra) -> None:
    """Run train.py until SIGKILL at `point` of the step-4 save. The child uses as many threads
    as this process, so its float results match the in-process runs bit for bit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", CRASH_ENV: f"{point}@4",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *_overrides(tmp, limit, **extra)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == -9, f"not killed at {point}@4 (rc {proc.returncode}): {proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    _train(tmp, limit=2)
    return checkpoint_state(tmp / "run" / "checkpoints" / "checkpoint-0000005")


@pytest.fixture(scope="module")
def trained_to_4(tmp_path_factory) -> Path:
    """A run directory at step 4 (checkpoints 2 and 4), and beside it its step-3 checkpoint."""
    tmp = tmp_path_factory.mktemp("to4")
    _train(tmp, limit=3, stop_at=4)
    shutil.move(str(tmp / "run" / "checkpoints" / "checkpoint-0000003"), str(tmp / "step3"))
    return tmp


def _resume_and_check(tmp: Path, limit: int, from_step: int, kept: list[int],
                      uninterrupted: dict[str, torch.Tensor]) -> None:
    trainer = Trainer(load_config(overrides=_overrides(tmp, limit, **{"train.resume": "latest"})))
    assert trainer.resume_from is not None, "resume found no complete checkpoint"
    assert json.loads((trainer.resume_from / "train_state.json").read_text())["step"] == from_step
    trainer.fit()
    trainer.close()
    assert [h["step"] for h in trainer.history] == list(range(from_step + 1, 6))
    ckpts = list_checkpoints(tmp / "run")
    assert [c.name for c in ckpts] == [f"checkpoint-{s:07d}" for s in kept]
    assert sorted(p.name for p in (tmp / "run" / "checkpoints").iterdir()) == [c.name for c in ckpts]
    assert_same_training(uninterrupted, checkpoint_state(ckpts[-1]))


@pytest.mark.slow
@pytest.mark.parametrize("limit", [1, 3])
@pytest.mark.parametrize("point, from_step", [("saved", 3), ("committed", 4), ("pruning", 4)])
def test_kill_inside_a_save_then_resume_ends_like_an_uninterrupted_run(tmp_path, uninterrupted, limit, point,
                                                                       from_step):
    _crash(tmp_path, limit, point)
    left = {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()}
    assert {"saved": "checkpoint-0000004.tmp", "committed": "checkpoint-0000004",
            "pruning": "checkpoint-0000004"}[point] in left
    if point == "pruning":  # limit 1 prunes step 3 (and earlier ones are gone), limit 3 prunes step 1
        assert {f"checkpoint-{4 - limit:07d}.del"} <= left
    _resume_and_check(tmp_path, limit, from_step, list(range(6 - limit, 6)), uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("limit", [1, 3])
@pytest.mark.parametrize("point", ["aside", "committed"])
def test_kill_while_a_step_is_saved_again_keeps_a_complete_copy(tmp_path, trained_to_4, uninterrupted, limit, point):
    """Resumed from step 3 (kept outside the run directory), the run saves step 4 again over the
    existing one, the only checkpoint in the run directory. A kill
    between moving the old copy aside and deleting it leaves step 4 complete (as .old or as the
    new copy); with the old delete-then-rename order, limit 1 left no checkpoint at all."""
    shutil.copytree(trained_to_4 / "run", tmp_path / "run")
    # Limit 1 as well: when this run saves step 4, checkpoint-0000004 is the only complete one.
    for c in list_checkpoints(tmp_path / "run")[:-1]:
        shutil.rmtree(c)
    _crash(tmp_path, limit, point, **{"train.resume": str(trained_to_4 / "step3")})
    found = list_checkpoints(tmp_path / "run")
    assert found and found[-1].name == {"aside": "checkpoint-0000004.old", "committed": "checkpoint-0000004"}[point]
    _resume_and_check(tmp_path, limit, 4, [4, 5][-limit:], uninterrupted)


def test_pruning_never_removes_the_checkpoint_just_saved(tmp_path):
    """Checkpoints of higher steps than the one saved (left from before resuming an older one)
    do not push the new one out, even with limit 1; leftovers of killed saves are cleared."""
    from accelerate import Accelerator

    root = tmp_path / "run" / "checkpoints"
    for name in ("checkpoint-0000007", "checkpoint-0000009", "checkpoint-0000002.tmp", "checkpoint-0000006.del"):
        (root / name).mkdir(parents=True)
    (root / "checkpoint-0000005.old").mkdir()  # its step has no other copy: it is restored, not deleted
    (root / "checkpoint-0000007.old").mkdir()  # step 7 exists: the aside copy goes
    written: list[str] = []
    acc = Accelerator(cpu=True)  # nothing prepared or registered: save_state writes only RNG states
    saved = save_checkpoint(acc, tmp_path / "run", 3, 1, lambda d: written.append(d.name))
    assert written == ["checkpoint-0000003.tmp"] and saved.name == "checkpoint-0000003" and saved.is_dir()
    # Limit 1: only the checkpoint just saved stays, and nothing else is left in the directory.
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-0000003"]
