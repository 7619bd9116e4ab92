"""Every file in launch/: the CPU ones run for real (2 gloo ranks; SLURM with stand-in
`srun`/`scontrol`), the GPU ones are read by accelerate's own config and launch-argument
code. Plus how launches are refused (DeepSpeed missing, unconnected CPU ranks) and how many
CPU threads a launched process uses."""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_overrides
from train.threads import Launcher, available_cores, choose_cpu_threads, launcher_kind

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
VENV_BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that chooses threads or devices for the run."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                             "ACCELERATE_USE_CPU", "WORLD_SIZE")}
    env.update({"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PATH": f"{VENV_BIN}:{env.get('PATH', '')}"})
    env.update(extra)
    return env


def _train_entry():
    # train.py shares its name with the train/ package, so load it by path.
    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _thread_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("CPU threads per process:")]
    assert lines, f"no thread line in the output:\n{output[-3000:]}"
    return lines[0]


# ------------------------------------------------------------------------ the GPU configs
EXPECTED = {  # what each file is for, written out (not read back from the files)
    "single_gpu.yaml": dict(distributed_type="NO", num_processes=1, num_machines=1, mixed_precision="bf16",
                            use_cpu=False, launcher="simple"),
    "multi_gpu.yaml": dict(distributed_type="MULTI_GPU", num_processes=8, num_machines=1, mixed_precision="bf16",
                           use_cpu=False, launcher="multi_gpu"),
    "fsdp.yaml": dict(distributed_type="FSDP", num_processes=8, num_machines=1, mixed_precision="bf16",
                      use_cpu=False, launcher="fsdp"),
    "deepspeed_zero2.yaml": dict(distributed_type="DEEPSPEED", num_processes=8, num_machines=1,
                                 mixed_precision="bf16", use_cpu=False, launcher="deepspeed"),
    "multi_node.yaml": dict(distributed_type="MULTI_GPU", num_processes=16, num_machines=2, mixed_precision="bf16",
                            use_cpu=False, launcher="multi_gpu"),
    "cpu_2proc.yaml": dict(distributed_type="MULTI_GPU", num_processes=2, num_machines=1, mixed_precision="no",
                           use_cpu=True, launcher="multi_gpu"),
}


def test_every_launch_file_is_covered():
    assert {p.name for p in LAUNCH.glob("*.yaml")} == set(EXPECTED)
    assert {p.name for p in LAUNCH.iterdir()} == set(EXPECTED) | {"slurm.sh"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_config_has_what_accelerate_needs(name):
    """Each file loads with accelerate's own config class, and accelerate's launch-argument
    code (the step before it starts processes) picks the launcher the file is meant for."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    want = EXPECTED[name]
    path = LAUNCH / name
    raw = yaml.safe_load(path.read_text())
    assert raw["compute_environment"] == "LOCAL_MACHINE"
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert str(cfg.distributed_type).split(".")[-1] == want["distributed_type"]
    assert (cfg.num_processes, cfg.num_machines, cfg.mixed_precision, bool(cfg.use_cpu)) == \
        (want["num_processes"], want["num_machines"], want["mixed_precision"], want["use_cpu"])
    assert cfg.num_processes % cfg.num_machines == 0
    if name == "fsdp.yaml":
        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_auto_wrap_policy"] == "SIZE_BASED_WRAP"
        assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and fsdp["fsdp_use_orig_params"] is True
    if name == "deepspeed_zero2.yaml":
        assert cfg.deepspeed_config["zero_stage"] == 2
    if name == "multi_node.yaml":
        assert cfg.rdzv_backend == "c10d" and cfg.same_network is True

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py", "train.max_steps=2"])
    args, _, _ = _validate_launch_command(args)
    launcher = ("deepspeed" if args.use_deepspeed else "fsdp" if args.use_fsdp else
                "multi_gpu" if args.multi_gpu else "simple")
    assert launcher == want["launcher"]
    assert (args.num_processes, args.num_machines, args.mixed_precision) == \
        (want["num_processes"], want["num_machines"], want["mixed_precision"])
    assert args.training_script == "train.py" and args.training_script_args == ["train.max_steps=2"]


# -------------------------------------------------------------------- the CPU config, for real
@pytest.mark.slow
def test_cpu_2proc_config_starts_two_gloo_ranks(tmp_path):
    """The README's command starts 2 connected processes (the checkpoint records 2), each with
    its share of the cores (no thread count was given)."""
    args = tiny_overrides(tmp_path, **{"train.max_steps": 2, "train.checkpoint_every": 2, "data.num_val": 2})
    cmd = [str(VENV_BIN / "accelerate"), "launch", "--config_file", str(LAUNCH / "cpu_2proc.yaml"),
           "--main_process_port", "0", "train.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-0000002" / "train_state.json").read_text())
    assert state["num_processes"] == 2 and state["step"] == 2
    assert state["samples_seen"] == 2 * 4 * 2  # steps x batch x ranks
    expected = max(1, available_cores() // 2)
    assert _thread_line(proc.stdout) == f"CPU threads per process: {expected} (auto: {available_cores()} cores / " \
                                        f"2 local processes)"


def test_unconnected_cpu_ranks_are_refused(tmp_path, capsys, monkeypatch):
    """Without ACCELERATE_USE_CPU=1 the multi-GPU launcher on a CPU gives N single-process runs
    writing to one directory: refused before anything is built."""
    import torch

    entry = _train_entry()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    out = tmp_path / "run"
    assert entry.main([f"train.output_dir={out}", "train.max_steps=1", "tracker.kind=none"]) == 2
    err = capsys.readouterr().err
    assert "ACCELERATE_USE_CPU=1" in err and "launch/cpu_2proc.yaml" in err and not out.exists()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert entry.launch_problem() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert entry.launch_problem() is None


# ------------------------------------------------------------------------------- DeepSpeed
def test_deepspeed_launch_without_deepspeed_is_refused_clearly(tmp_path, capsys, monkeypatch):
    """A process launched for DeepSpeed (accelerate exports ACCELERATE_USE_DEEPSPEED=true) on a
    machine without the package: one line naming the package and the install command, exit 2,
    nothing written (not accelerate's ImportError traceback from inside the Accelerator)."""
    entry = _train_entry()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "deepspeed" else real_find_spec(name, *a, **k))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    out = tmp_path / "run"
    code = entry.main(tiny_overrides(tmp_path, **{"train.max_steps": 1}))
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "`deepspeed` package is not installed" in err and "pip install deepspeed" in err
    assert "Traceback" not in err
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert entry.launch_problem() is None


@pytest.mark.slow
def test_deepspeed_config_through_the_launcher(tmp_path):
    """`accelerate launch --config_file launch/deepspeed_zero2.yaml train.py` on this machine."""
    cmd = [str(VENV_BIN / "accelerate"), "launch", "--config_file", str(LAUNCH / "deepspeed_zero2.yaml"), "train.py",
           *tiny_overrides(tmp_path, **{"train.max_steps": 1})]
    if importlib.util.find_spec("deepspeed") is None:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert "DeepSpeed is not installed" in last and "pip" in last and "install deepspeed" in last
        assert not (tmp_path / "run").exists()
    else:  # installed: the refusal must not fire
        assert _train_entry().launch_problem({"ACCELERATE_USE_DEEPSPEED": "true"}) is None


# ------------------------------------------------------------------------------------ SLURM
def _fake_slurm(bin_dir: Path, log: Path, nodes: int, record_only: bool) -> None:
    """Stand-ins on PATH: `scontrol show hostnames` lists node-a, node-b, ...; `srun` logs its
    arguments (JSON, one line per call) and runs its command once per node (one task per node)
    with SLURM_NODEID set; `accelerate` logs its argv, then (unless record_only) runs the real one."""
    bin_dir.mkdir()
    names = " ".join(f"node-{chr(97 + i)}" for i in range(nodes))
    (bin_dir / "scontrol").write_text(f"#!/usr/bin/env bash\n[ \"$1 $2\" = 'show hostnames' ] || exit 3\n"
                                      f"for n in {names}; do echo $n; done\n")
    record = f"{shlex.quote(sys.executable)} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\" " \
             f">> {shlex.quote(str(log))}\n"
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n" + record +
        "while [[ $1 == --* ]]; do shift; done\n"
        f"for id in $(seq 0 {nodes - 1}); do SLURM_NODEID=$id \"$@\" || exit $?; done\n")
    real = "" if record_only else f'exec {shlex.quote(str(VENV_BIN / "accelerate"))} "$@"\n'
    (bin_dir / "accelerate").write_text("#!/usr/bin/env bash\n" + record + real)
    for f in bin_dir.iterdir():
        f.chmod(0o755)


def _slurm_env(bin_dir: Path, nodes: int, gpus: int, **extra: str) -> dict[str, str]:
    env = _env(SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST=f"node-[a-{chr(96 + nodes)}]",
               SLURM_GPUS_ON_NODE=str(gpus), **extra)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def test_slurm_script_builds_one_accelerate_launch_per_node(tmp_path):
    """2 nodes x 8 GPUs: each node's accelerate command line, with the user's arguments
    (a --config after an override, a value with spaces) passed through unchanged."""
    log = tmp_path / "calls.log"
    _fake_slurm(tmp_path / "bin", log, nodes=2, record_only=True)
    user = ["train.max_steps=5", "--config", "configs/viton_hd.yaml", "data.root=/data/VITON HD",
            "tracker.run_name=a b  c"]
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sh"), *user], cwd=ROOT, capture_output=True, text=True,
                          env=_slurm_env(tmp_path / "bin", nodes=2, gpus=8), timeout=60)
    assert proc.returncode == 0, proc.stderr
    srun, *launches = [json.loads(x) for x in log.read_text().splitlines()]
    assert srun[:3] == ["--kill-on-bad-exit=1", "bash", "-c"] and "$SLURM_NODEID" in srun[3]
    assert srun[4:] == ["slurm-node", "2", "16", "node-a", *user]  # the user's arguments as positional ones
    assert len(launches) == 2
    for rank, argv in enumerate(launches):
        assert argv == ["launch", "--config_file", "launch/multi_node.yaml", "--num_machines", "2",
                        "--num_processes", "16", "--machine_rank", str(rank), "--main_process_ip", "node-a",
                        "--main_process_port", "29500", "train.py", "train.resume=latest", *user]


def test_slurm_script_outside_slurm_says_so(tmp_path):
    env = _env()
    for k in [k for k in env if k.startswith("SLURM_")]:
        del env[k]
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sh")], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode != 0 and "SLURM_NNODES" in proc.stderr and "sbatch" in proc.stderr


@pytest.mark.slow
def test_slurm_script_trains_for_real_on_one_cpu_node(tmp_path):
    """One node with 2 "GPUs" on the CPU (ACCELERATE_USE_CPU=1): the real accelerate starts 2
    ranks from launch/multi_node.yaml, and train.py gets the user's --config and overrides."""
    log = tmp_path / "calls.log"
    _fake_slurm(tmp_path / "bin", log, nodes=1, record_only=False)
    tiny = dict(item.split("=", 1) for item in tiny_overrides(tmp_path, **{"train.max_steps": 2,
                                                                          "train.checkpoint_every": 2,
                                                                          "data.num_val": 2}))
    nested: dict = {}
    for key, value in tiny.items():
        section, leaf = key.split(".", 1)
        node = nested.setdefault(section, {})
        for part in leaf.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[leaf.split(".")[-1]] = yaml.safe_load(value)
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(nested))
    user = ["train.seed=3", "--config", str(cfg_file), "tracker.run_name=slurm smoke test"]
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sh"), *user], cwd=ROOT, capture_output=True, text=True,
                          env=_slurm_env(tmp_path / "bin", nodes=1, gpus=2, ACCELERATE_USE_CPU="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    argv = json.loads(log.read_text().splitlines()[1])
    assert argv[argv.index("--num_processes") + 1] == "2" and argv[argv.index("--num_machines") + 1] == "1"
    assert argv[argv.index("train.py") + 1:] == ["train.resume=latest", *user]
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-0000002"
    assert json.loads((ckpt / "train_state.json").read_text())["num_processes"] == 2
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert saved["train"]["resume"] == "latest" and saved["train"]["seed"] == 3
    assert saved["tracker"]["run_name"] == "slurm smoke test"
    assert saved["model"]["unet"]["size"] == "test" and saved["train"]["max_steps"] == 2  # from the file


# ---------------------------------------------------------------------------- CPU threads
def test_thread_choice_hand_cases():
    acc = ("/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes", "1", "train.py")
    plain = Launcher("accelerate", acc, {"PATH": "/bin"})
    # auto: the cores split among the processes on this machine
    assert choose_cpu_threads(None, {}, plain, cores=8) == (8, "auto: 8 cores / 1 local process")
    assert choose_cpu_threads(None, {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}, plain, cores=8)[0] == 4
    assert choose_cpu_threads(None, {"LOCAL_WORLD_SIZE": "2"}, plain, cores=3)[0] == 1
    assert choose_cpu_threads(None, {"LOCAL_WORLD_SIZE": "4"}, plain, cores=2)[0] == 1
    # the launcher's flag or the user's OMP_NUM_THREADS: keep what the launch set
    flag = Launcher("accelerate", acc[:3] + ("--num_cpu_threads_per_process", "3") + acc[3:], {})
    assert choose_cpu_threads(None, {"OMP_NUM_THREADS": "3"}, flag, cores=8) == \
        (None, "chosen at launch: --num_cpu_threads_per_process 3")
    eq = Launcher("accelerate", acc[:3] + ("--num_cpu_threads_per_process=5",) + acc[3:], {})
    assert choose_cpu_threads(None, {}, eq, cores=8)[0] is None
    omp = Launcher("torchrun", ("torchrun", "--nproc_per_node", "2", "train.py"), {"OMP_NUM_THREADS": "2"})
    assert choose_cpu_threads(None, {"OMP_NUM_THREADS": "2"}, omp, cores=8) == \
        (None, "chosen at launch: OMP_NUM_THREADS=2")
    # no launcher: the process's own environment is the user's
    assert choose_cpu_threads(None, {"OMP_NUM_THREADS": "2"}, None, cores=8)[0] is None
    assert choose_cpu_threads(None, {}, None, cores=6)[0] == 6
    # the config key beats everything
    assert choose_cpu_threads(2, {"OMP_NUM_THREADS": "3"}, flag, cores=8) == (2, "train.cpu_threads")
    # which processes are launchers
    assert launcher_kind(acc) == "accelerate"
    assert launcher_kind(["python3", "-m", "accelerate.commands.launch", "--num_processes", "2", "x.py"]) == \
        "accelerate"
    assert launcher_kind(["/usr/bin/python", "/v/bin/torchrun", "--nproc_per_node", "2", "x.py"]) == "torchrun"
    assert launcher_kind(["python", "-m", "torch.distributed.run", "x.py"]) == "torchrun"
    assert launcher_kind(["/v/bin/accelerate", "config"]) is None
    assert launcher_kind(["python", "train.py", "train.max_steps=2"]) is None


def test_cpu_threads_key_is_applied_and_validated(tmp_path):
    import torch

    from configs import ConfigError, load_config
    from train import Trainer

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        trainer = Trainer(load_config(overrides=tiny_overrides(tmp_path, **{"train.cpu_threads": 1})))
        assert torch.get_num_threads() == 1
        trainer.close()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match=r"train\.cpu_threads"):
        load_config(overrides=["train.cpu_threads=0"])


@pytest.mark.slow
def test_launch_flag_sets_the_threads(tmp_path):
    """`accelerate launch --num_cpu_threads_per_process 1` keeps 1 thread; without the flag the
    same launch uses every core (tests/test_train.py::test_two_steps_through_accelerate_launch)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           str(ROOT / "train.py"), *tiny_overrides(tmp_path, **{"train.max_steps": 1})]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _thread_line(proc.stdout) == \
        "CPU threads per process: 1 (chosen at launch: --num_cpu_threads_per_process 1)"
