"""How many CPU threads a training process gives torch.

`accelerate launch` exports OMP_NUM_THREADS to every process it starts: the value of
``--num_cpu_threads_per_process``, else the launching shell's OMP_NUM_THREADS, else 1. So a
plain ``accelerate launch train.py`` on a CPU would train on one core. Nothing in the child's
environment tells whether the user chose that number, so the launcher process itself is
looked at (its command line and its own environment, via psutil).

The rule, on CPU only (on GPUs torch's threads only feed the data pipeline: left alone):

1. ``train.cpu_threads=N``: N threads.
2. The user chose at launch: ``--num_cpu_threads_per_process N`` on the accelerate command
   line, or OMP_NUM_THREADS set in the launcher's (or, without a launcher, this process's)
   environment: that value, as accelerate/OpenMP already applied it.
3. Otherwise (auto): all cores available to this process, divided among the processes on
   this machine (LOCAL_WORLD_SIZE), at least 1.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

FLAG = "--num_cpu_threads_per_process"


@dataclass(frozen=True)
class Launcher:
    """The process that started this one: its kind, command line and own environment."""

    kind: str  # "accelerate" or "torchrun"
    cmdline: tuple[str, ...]
    environ: Mapping[str, str]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset / container CPU sets
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def launcher_kind(cmdline: Sequence[str]) -> str | None:
    """'accelerate' for `accelerate launch ...` / `python -m accelerate.commands.launch ...`,
    'torchrun' for `torchrun ...` / `python -m torch.distributed.run ...`, else None."""
    args = [os.path.basename(a) for a in cmdline]
    for i, a in enumerate(args):
        if a in ("accelerate.commands.launch",) or (a == "accelerate" and "launch" in args[i + 1:i + 2]) \
                or (a == "accelerate.commands.accelerate_cli" and "launch" in args[i + 1:i + 2]):
            return "accelerate"
        if a in ("torchrun", "torch.distributed.run", "torch.distributed.launch"):
            return "torchrun"
    return None


def find_launcher() -> Launcher | None:
    """The nearest ancestor process that is an accelerate or torchrun launcher, if any."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        for proc in psutil.Process().parents():
            try:
                cmdline = proc.cmdline()
            except (psutil.Error, OSError):
                continue
            kind = launcher_kind(cmdline)
            if kind is not None:
                try:
                    environ = proc.environ()
                except (psutil.Error, OSError):  # not ours to read: assume the user chose
                    environ = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "?")}
                return Launcher(kind, tuple(cmdline), environ)
    except (psutil.Error, OSError):
        return None
    return None


def _flag_value(cmdline: Sequence[str]) -> str | None:
    for i, a in enumerate(cmdline):
        if a == FLAG and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if a.startswith(FLAG + "="):
            return a.split("=", 1)[1]
    return None


def choose_cpu_threads(configured: int | None, environ: Mapping[str, str], launcher: Launcher | None,
                       cores: int) -> tuple[int | None, str]:
    """(threads to set, or None to keep what the launch chose; why)."""
    if configured is not None:
        return int(configured), "train.cpu_threads"
    if launcher is not None:
        if launcher.kind == "accelerate" and _flag_value(launcher.cmdline) is not None:
            return None, f"chosen at launch: {FLAG} {_flag_value(launcher.cmdline)}"
        if "OMP_NUM_THREADS" in launcher.environ:
            return None, f"chosen at launch: OMP_NUM_THREADS={launcher.environ['OMP_NUM_THREADS']}"
    elif "OMP_NUM_THREADS" in environ:
        return None, f"chosen: OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}"
    try:
        local = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    n = max(1, cores // local)
    plural = "es" if local > 1 else ""
    return n, f"auto: {cores} cores / {local} local process{plural}"


def on_cpu(environ: Mapping[str, str] = os.environ) -> bool:
    import torch

    forced = environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes", "on")
    return forced or not torch.cuda.is_available()


def apply_cpu_threads(configured: int | None, log: Callable[[str], None] | None = print) -> int | None:
    """Apply the rule above (module docstring) when training on the CPU; returns torch's
    thread count then (None on GPU). The main process of each machine prints one line."""
    import torch

    if not on_cpu():
        return None
    n, why = choose_cpu_threads(configured, os.environ, find_launcher(), available_cores())
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    threads = torch.get_num_threads()
    if log is not None and os.environ.get("LOCAL_RANK", "0") == "0":
        log(f"CPU threads per process: {threads} ({why})")
    return threads
