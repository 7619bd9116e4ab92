"""The training loop: build everything from a `Config`, then `fit()`.

Accelerate handles devices, DDP and mixed precision; the loop owns only what
try-on training needs: the diffusion loss (plus optional regularisers),
EMA, validation, checkpoints and a summary.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from common.tables import fmt
from configs.loader import to_yaml
from configs.schema import Config
from losses.stability import describe as describe_stability
from losses import DiffusionLoss, TryOnObjective
from models import build_model
from models.sampling import Sampler

from .checkpoint import checkpoint_dir, init_weights, resolve_resume, save_checkpoint
from .data import build_dataset, build_loader, to_device
from .distributed import check_launch
from .monitoring import MonitorHooks
from .threads import apply_cpu_threads
from .tracking import init_trackers, log_images, log_table, prepare_tracker_env, tracker_location
from .validation import Validator


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        tc = cfg.train
        apply_cpu_threads(tc.cpu_threads)  # CPU only: accelerate launch gives each process 1 thread by default
        self.run_dir = Path(tc.output_dir).resolve()
        check_launch(cfg)  # before the Accelerator: an FSDP plugin fails on CPUs with a less clear error
        log_with = prepare_tracker_env(cfg.tracker, self.run_dir)
        self.accelerator = Accelerator(mixed_precision=tc.mixed_precision, log_with=log_with,
                                       project_dir=str(self.run_dir))
        acc = self.accelerator
        check_launch(cfg, acc.distributed_type)  # also an FSDP plugin passed in code
        if log_with == "wandb" and os.environ.get("WANDB_MODE") == "offline":
            acc.print(f"W&B: logging offline (no credentials, or WANDB_MODE=offline); "
                      f"upload later with: wandb sync {self.run_dir}/wandb/offline-run-*")
        set_seed(tc.seed)  # identical initial weights on every rank

        # Build everything that can fail on bad input before anything is written.
        self.train_set = build_dataset(cfg.data, "train")
        self.val_set = build_dataset(cfg.data, "val")
        model = build_model(cfg.model)
        self.resume_from = resolve_resume(self.run_dir, tc.resume)
        if tc.init_from and self.resume_from is None:
            acc.print(f"train.init_from: starting from the model weights of {init_weights(model, tc.init_from)}")
        # The I²AM monitor attaches to the UNet's cross-attention before DDP wraps the model.
        self.hooks = MonitorHooks(model, cfg.monitor, cfg.stability) if cfg.monitor.enabled else None

        sampler = Sampler.from_config(cfg.diffusion)
        self.noise_scheduler = sampler.train_scheduler  # training and sampling share one schedule
        self.diffusion_loss = DiffusionLoss(self.noise_scheduler, cfg.diffusion.snr_gamma)
        # The whole training objective (noising, forward, diffusion + stability terms) is one object.
        self.objective = TryOnObjective(self.diffusion_loss, cfg.model.cfg_drop_prob,
                                        self.hooks.monitor if self.hooks is not None else None, cfg.stability,
                                        dataset=f"data.name={cfg.data.name}")
        params = model.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                      eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        # The LR schedule is not handed to accelerate.prepare: a prepared scheduler steps the
        # wrapped one num_processes times per optimizer step, which ties the schedule to the
        # process count (and breaks resuming on a different count). The trainer steps it once
        # per optimizer step and keeps its state in train_state.json.
        self.lr_scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer,
                                          num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=tc.max_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.ema = EMAModel(params, decay=cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        if self.ema is not None:
            self.ema.to(acc.device)
            # save_state/load_state carry its state_dict (shadow weights, step) as custom_checkpoint_0.pkl
            acc.register_for_checkpointing(self.ema)
        self.validator = Validator(self.val_set, self.train_set, sampler, seed=tc.seed)
        self.step = 0
        self.samples_seen = 0
        # Training time of earlier invocations (restored on resume), so a run's time adds up.
        self.seconds_before = 0.0
        self._fit_start = time.time()
        self._first_step = 0  # the step fit() started at (set there)
        self.first_val_error: float | None = None
        self.last_val_error: float | None = None
        self.history: list[dict[str, float]] = []  # what was logged, step by step
        self.val_history: list[dict[str, float]] = []
        self.local_history: list[dict[str, float]] = []  # this rank's values before the reduction
        self._stop_reason = ""
        self.first_val_pixel_error: float | None = None

    # -- helpers ----------------------------------------------------------------------------
    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _params(self) -> list[torch.nn.Parameter]:
        return self.unwrapped.trainable_parameters()

    def _generators(self, positions: torch.Tensor) -> list[torch.Generator]:
        """One generator per sample, keyed by (seed, the sample's position in the global data
        stream): its guidance dropout, noise and timestep are the same whichever rank, batch
        size or process count it is trained with, and exactly reproducible after a resume."""
        device = self.accelerator.device
        return [torch.Generator(device).manual_seed((self.cfg.train.seed * 2**40 + int(p)) % 2**63)
                for p in positions.tolist()]

    def _write_extras(self, directory: Path) -> None:
        (directory / "config.yaml").write_text(to_yaml(self.cfg))
        (directory / "train_state.json").write_text(json.dumps(
            {"step": self.step, "samples_seen": self.samples_seen, "num_processes": self.accelerator.num_processes,
             "global_batch": self._global_batch(), "lr_scheduler": self.lr_scheduler.state_dict(),
             "train_seconds": self.seconds_before + time.time() - self._fit_start}))
        with self.ema_weights():
            self.unwrapped.save_pretrained(directory / "model")

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Inside the block the model holds the EMA weights; the training weights come back after."""
        if self.ema is None:
            yield
            return
        self.ema.store(self._params())
        self.ema.copy_to(self._params())
        try:
            yield
        finally:
            self.ema.restore(self._params())

    def _global_batch(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.accelerator.num_processes

    def _resume(self, path: Path) -> None:
        acc = self.accelerator
        acc.load_state(str(path))
        state = json.loads((path / "train_state.json").read_text())
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        if "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        else:
            # Written before the schedule was saved here (its prepared copy counted process-steps):
            # every diffusers schedule is a function of the optimizer step, so set it to that step.
            self.lr_scheduler.last_epoch = self.step - 1
            with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
                warnings.simplefilter("ignore", UserWarning)
                self.lr_scheduler.step()
        if state.get("global_batch", self._global_batch()) != self._global_batch():
            acc.print(f"note: {path} was trained with {state['global_batch']} samples per step, this run uses "
                      f"{self._global_batch()} (train.batch_size x train.grad_accum x processes); the data stream "
                      f"continues at sample {self.samples_seen}, but the run no longer matches an uninterrupted one")
        self.seconds_before = float(state.get("train_seconds", 0.0))
        if self.ema is not None:
            self.ema.to(self.accelerator.device)  # accelerate loads custom states onto the CPU
        self.accelerator.print(f"resumed from {path} at step {self.step}")

    def _validate(self) -> float:
        acc = self.accelerator
        err = float("nan")
        if acc.is_main_process:
            with self.ema_weights():
                result = self.validator.run(self.unwrapped, acc.device,
                                            self.hooks if self.cfg.monitor.maps_at_validation else None)
            err = result.colour_error
            acc.log({"val/colour_error": err, "val/garment_blind_colour_error": self.validator.baseline_error,
                     "val/garment_blind_pixel_error": self.validator.baseline_pixel_error, **result.metrics},
                    step=self.step)
            self.val_history.append({"step": self.step, "val/colour_error": err, **result.metrics})
            log_images(acc, result.images, self.step, self.run_dir)
            log_table(acc, "val/table", result.table, self.step)
        acc.wait_for_everyone()
        return err

    def _save(self) -> Path:
        return save_checkpoint(self.accelerator, self.run_dir, self.step, self.cfg.train.checkpoint_limit,
                               self._write_extras)

    # -- one optimizer step -------------------------------------------------------------------
    def train_step(self, batches) -> dict[str, torch.Tensor] | None:
        """Returns detached metrics, or None when the step was skipped (non-finite loss)."""
        acc, cfg = self.accelerator, self.cfg
        accum = cfg.train.grad_accum
        totals: dict[str, torch.Tensor] = {}
        for i in range(accum):
            batch = next(batches)
            gen = self._generators(batch["position"])  # each drawn in order: dropout, noise, timestep
            batch = to_device(batch, acc.device)
            problem = ""
            try:
                loss, metrics = self.objective(self.model, self.unwrapped, batch, gen, self.step)
            except FloatingPointError as err:  # names the layer whose attention statistic is NaN
                problem, loss, metrics = str(err), torch.full((), float("nan"), device=acc.device), {}
            metrics["loss/total"] = loss.detach()
            finite = torch.isfinite(loss).float()
            if acc.num_processes > 1:
                finite = acc.reduce(finite, reduction="sum") / acc.num_processes  # every rank skips together
            self.samples_seen += batch["person"].shape[0] * acc.num_processes
            if finite.item() < 1 - 1e-6:
                bad = [k for k, v in metrics.items() if not torch.isfinite(v).all() and k != "loss/total"]
                what = problem or ", ".join(bad) or "on another rank"
                acc.print(f"warning: non-finite loss at step {self.step} ({what}); step skipped")
                self.optimizer.zero_grad(set_to_none=True)
                return None
            sync = i == accum - 1
            ctx = acc.no_sync(self.model) if not sync else contextlib.nullcontext()
            with ctx:
                acc.backward(loss / accum)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0) + v / accum
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self._params())
        totals["train/grad_norm"] = grad_norm.detach().float() if torch.is_tensor(grad_norm) else torch.tensor(float(grad_norm))
        return totals

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> dict:
        """Train to `train.max_steps` (or stop early at `stop_at`, e.g. to simulate an interruption)."""
        acc, cfg, tc = self.accelerator, self.cfg, self.cfg.train
        end = min(stop_at, tc.max_steps) if stop_at is not None else tc.max_steps
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        acc.wait_for_everyone()
        if self.resume_from is not None:
            self._resume(self.resume_from)
        elif tc.resume == "latest":
            acc.print(f"train.resume=latest: no complete checkpoint in {checkpoint_dir(self.run_dir)}; starting at step 0")
        init_trackers(acc, cfg.tracker, self.run_dir, _flat_config(cfg))

        loader = build_loader(self.train_set, tc.batch_size, cfg.data.seed, acc.process_index, acc.num_processes,
                              start=self.samples_seen, num_workers=cfg.data.num_workers)
        batches = iter(loader)
        if tc.validate_at_start and self.step == 0:
            self.first_val_error = self._validate()
            self.first_val_pixel_error = self.val_history[-1].get("val/pixel_error") if self.val_history else None

        start, interval_start, interval_samples = time.time(), time.time(), 0
        self._fit_start = start
        self._first_step = self.step
        sums: dict[str, torch.Tensor] = {}
        n_logged, nan_streak, last_loss = 0, 0, float("nan")
        in_main_thread = threading.current_thread() is threading.main_thread()
        # Preemption (SLURM, Kubernetes) sends SIGTERM: save a checkpoint, then exit cleanly.
        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm) if in_main_thread else None
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", disable=not acc.is_main_process,
                   dynamic_ncols=True)
        self.model.train()
        while self.step < end:
            metrics = self.train_step(batches)
            self.step += 1
            bar.update(1)
            if metrics is None:
                nan_streak += 1
                if nan_streak >= tc.nan_tolerance:
                    raise FloatingPointError(
                        f"{nan_streak} non-finite losses in a row (last at step {self.step}); stopping. "
                        f"The last good checkpoint is kept in {self.run_dir / 'checkpoints'}.")
                continue
            nan_streak = 0
            interval_samples += tc.batch_size * tc.grad_accum * acc.num_processes
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v
            n_logged += 1
            if self.step % tc.log_every == 0 or self.step == end:
                # Reduce across ranks only when logging.
                local = {k: v / n_logged for k, v in sums.items()}
                self.local_history.append({"step": self.step, **{k: v.item() for k, v in local.items()}})
                logs = {k: acc.reduce(v.clone(), reduction="mean").item() for k, v in local.items()}
                logs["train/lr"] = self.lr_scheduler.get_last_lr()[0]
                logs["train/samples_per_s"] = interval_samples / max(time.time() - interval_start, 1e-9)
                acc.log(logs, step=self.step)
                self.history.append({"step": self.step, **logs})
                last_loss = logs["loss/diffusion"]
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{logs['train/lr']:.1e}")
                sums, n_logged, interval_start, interval_samples = {}, 0, time.time(), 0
            if self.step % tc.val_every == 0 or self.step == end:
                self.last_val_error = self._validate()
            stop = self._stop_requested(start)
            if self.step % tc.checkpoint_every == 0 or self.step == end or stop:
                self._save()
            if stop:
                acc.print(f"{self._stop_reason or 'another rank asked to stop'} at step {self.step}: checkpoint saved; "
                          f"continue with train.resume=latest")
                break
        bar.close()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
        return self._finish(time.time() - start, last_loss)

    def _on_sigterm(self, signum: int, frame) -> None:
        self._stop_reason = "SIGTERM received (preemption?)"

    def _stop_requested(self, start: float) -> bool:
        """Stop on SIGTERM or the time budget; every rank stops at the same step."""
        limit = self.cfg.train.max_time_minutes
        if limit is not None and time.time() - start > limit * 60 and not self._stop_reason:
            self._stop_reason = f"train.max_time_minutes={limit} reached"
        flag = torch.tensor(float(bool(self._stop_reason)), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def _finish(self, seconds: float, last_loss: float) -> dict:
        acc = self.accelerator
        self.train_seconds = self.seconds_before + seconds  # over every invocation of this run
        saved = self.run_dir / "summary.json"
        if self.step == self._first_step and saved.is_file():
            # Resumed a finished run (e.g. to load it for figures): nothing trained, so this
            # invocation knows none of the numbers; keep the summary of the run that did.
            summary = json.loads(saved.read_text())
            acc.print(f"already at step {self.step}: nothing to train; its summary ({saved}):")
            acc.print(format_summary(summary))
            acc.end_training()
            return summary
        summary = {
            "steps": self.step, "seconds": round(seconds, 1), "final_loss": last_loss,
            "stopped_early": self._stop_reason or None,
            "colour_error_untrained": self.first_val_error, "colour_error_final": self.last_val_error,
            "colour_error_garment_blind": self.validator.baseline_error,
            "pixel_error_untrained": self.first_val_pixel_error,
            "pixel_error_final": self.val_history[-1].get("val/pixel_error") if self.val_history else None,
            "pixel_error_garment_blind": self.validator.baseline_pixel_error,
            "stability": describe_stability(self.cfg.stability) if self.cfg.monitor.enabled else "off (monitor off)",
            "run_dir": str(self.run_dir), "checkpoints": str(self.run_dir / "checkpoints"),
            "tracker": tracker_location(acc, self.cfg.tracker, self.run_dir),
        }
        if acc.is_main_process:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            acc.print(format_summary(summary))
        acc.end_training()
        return summary

    def close(self) -> None:
        """Detach the monitor (restores the UNet's original attention processors)."""
        if self.hooks is not None:
            self.hooks.close()


def format_summary(s: dict) -> str:
    lines = [
        "", "── run summary " + "─" * 50,
        f"steps            {s['steps']}  in {s['seconds'] / 60:.1f} min",
        f"final loss       {fmt(s['final_loss'])}",
        f"colour error     untrained {fmt(s['colour_error_untrained'])}  ->  trained {fmt(s['colour_error_final'])}"
        f"   (garment-blind baseline {fmt(s['colour_error_garment_blind'])})   mean colour in the mask",
        f"pixel error      untrained {fmt(s['pixel_error_untrained'])}  ->  trained {fmt(s['pixel_error_final'])}"
        f"   (garment-blind baseline {fmt(s['pixel_error_garment_blind'])})   per pixel in the mask",
        f"stability loss   {s.get('stability', 'off')}",
        f"checkpoints      {s['checkpoints']}",
        f"tracking         {s['tracker']}",
        "─" * 65,
    ]
    return "\n".join(lines)


def _flat_config(cfg: Config) -> dict:
    flat = {}

    def walk(prefix: str, node) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                flat[f"{prefix}{k}"] = v if not isinstance(v, list) else str(v)

    walk("", OmegaConf.to_container(OmegaConf.structured(cfg)))
    return flat
