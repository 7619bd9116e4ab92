"""Where the analysis command gets its model: a training run/checkpoint of this
project, or a local diffusers pipeline directory.

Each source runs one try-on at its own resolution and returns the result with the
I²AM maps of that run. Checkpoints are sampled with the project's DDIM sampler
(``models.sampling.Sampler``) under an :class:`~i2am.AttentionMonitor`;
pipelines are called through :func:`i2am.trace`. Heavy imports (torch models,
diffusers) happen inside the functions, so the CLI's ``--help`` stays fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from common.images import to_pil
from i2am.maps import AttributionMaps

from .photos import Size, TryOnInputs

PIPELINES = ("StableDiffusionInpaintPipeline", "PaintByExamplePipeline")
DEFAULT_PROMPT = "a person wearing a garment"


class AnalyzeError(ValueError):
    """An analysis that cannot run as asked; the message says what to change."""


@dataclass
class RunOutput:
    generated: torch.Tensor               # (3, H, W) in [-1, 1], the person kept outside the mask
    maps: AttributionMaps
    # text references (SD inpaint): one label per reference token, for the G2R figures
    token_labels: list[str] | None = None
    notes: list[str] = field(default_factory=list)


class CheckpointSource:
    """A run directory (its latest checkpoint) or one checkpoint directory."""

    kind = "checkpoint"

    def __init__(self, path: str | Path, overrides: Sequence[str], device: str) -> None:
        from train.checkpoint import load_checkpoint

        self.loaded = load_checkpoint(path, overrides, device)
        self.device = device
        cfg = self.loaded.cfg
        if self.loaded.model.use_pose:
            raise AnalyzeError(f"{self.loaded.path} was trained with a pose input (model.unet.use_pose=true); "
                               "the analysis command takes no pose image")
        self.resolution: Size = (int(cfg.data.resolution[0]), int(cfg.data.resolution[1]))
        self.default_steps = int(cfg.diffusion.sample_steps)
        self.default_guidance = float(cfg.diffusion.guidance_scale)

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.loaded.path), "step": self.loaded.step}

    def run(self, inputs: TryOnInputs, *, steps: int, seed: int, guidance_scale: float, time_groups: int,
            progress: bool, prompt: str) -> RunOutput:
        from models.sampling import Sampler

        from i2am import AttentionMonitor

        model = self.loaded.model
        sampler = Sampler.from_config(self.loaded.cfg.diffusion, steps=steps, guidance_scale=guidance_scale)
        batch = {"agnostic": inputs.agnostic[None], "mask": inputs.mask[None], "garment": inputs.garment[None]}
        batch = {k: v.to(self.device) for k, v in batch.items()}
        # num_steps known: constant-memory time bins, one per time group
        with AttentionMonitor(model.unet, model.reference_grid, model.extra_tokens, num_steps=steps,
                              time_groups=min(time_groups, steps)) as mon:
            run = sampler(model, batch, seed=seed, monitor=mon, paste_back=True, progress=progress)
        return RunOutput(run.images[0].float().cpu(), run.maps)


def _load_components(path: Path, index: dict[str, Any]) -> dict[str, Any]:
    """Each component of a pipeline directory, loaded from its subfolder. Needed for
    Paint-by-Example: its image encoder is declared as ("diffusers" or "paint_by_example",
    "PaintByExampleImageEncoder"), a class diffusers' loader no longer resolves since the
    pipeline moved to ``diffusers.pipelines.deprecated``."""
    import importlib

    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder

    parts: dict[str, Any] = {"requires_safety_checker": False}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2:
            continue
        library, class_name = spec
        if library is None or name == "safety_checker":  # not part of an attribution analysis
            parts[name] = None
            continue
        cls = (PaintByExampleImageEncoder if class_name == "PaintByExampleImageEncoder"
               else getattr(importlib.import_module(library), class_name))
        parts[name] = cls.from_pretrained(path / name, local_files_only=True)
    return parts


class PipelineSource:
    """A local diffusers pipeline directory (``model_index.json``)."""

    def __init__(self, path: str | Path, device: str, resolution: Size | None) -> None:
        self.path = Path(path)
        index = json.loads((self.path / "model_index.json").read_text())
        self.kind = index.get("_class_name", "?")
        if self.kind not in PIPELINES:
            raise AnalyzeError(f"{self.path} holds a {self.kind}; supported pipelines: {', '.join(PIPELINES)}")
        import diffusers

        cls = getattr(diffusers, self.kind)
        if self.kind == "PaintByExamplePipeline":
            self.pipe = cls(**_load_components(self.path, index)).to(device)
        else:  # local files only; safety checkers are not part of an attribution analysis
            self.pipe = cls.from_pretrained(self.path, local_files_only=True, safety_checker=None,
                                            requires_safety_checker=False).to(device)
        self.device = device
        side = int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)
        self.resolution = tuple(resolution) if resolution is not None else (side, side)
        factor = int(self.pipe.vae_scale_factor) * 2 ** (len(self.pipe.unet.config.down_block_types) - 1)
        if any(v % factor for v in self.resolution):
            raise AnalyzeError(f"{self.kind} needs a resolution divisible by {factor}, got "
                               f"{self.resolution[0]}x{self.resolution[1]} (use --resolution HxW)")
        self.default_steps = 50
        self.default_guidance = 7.5 if self.kind == "StableDiffusionInpaintPipeline" else 5.0

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path)}

    def call_kwargs(self, inputs: TryOnInputs, *, steps: int, seed: int, guidance_scale: float,
                    prompt: str) -> dict[str, Any]:
        """The pipeline's call arguments (also what a test needs to reproduce the run)."""
        mask = to_pil(inputs.mask.expand(3, -1, -1) * 2 - 1).convert("L")
        kwargs: dict[str, Any] = dict(
            image=to_pil(inputs.person), mask_image=mask, height=self.resolution[0], width=self.resolution[1],
            num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np",
            generator=torch.Generator(self.device).manual_seed(seed))
        if self.kind == "PaintByExamplePipeline":
            kwargs["example_image"] = to_pil(inputs.garment)
        else:
            kwargs["prompt"] = prompt
        return kwargs

    def token_labels(self, prompt: str, length: int) -> list[str]:
        tok = self.pipe.tokenizer
        ids = tok(prompt, padding="max_length", max_length=length, truncation=True).input_ids
        return [t.replace("</w>", "") for t in tok.convert_ids_to_tokens(ids)]

    def run(self, inputs: TryOnInputs, *, steps: int, seed: int, guidance_scale: float, time_groups: int,
            progress: bool, prompt: str) -> RunOutput:
        from i2am import trace

        self.pipe.set_progress_bar_config(disable=not progress, desc="sampling")
        # num_steps=None: one time bin per UNet call, since some schedulers (PNDM) call it more often
        # than num_inference_steps
        out, maps = trace(self.pipe, **self.call_kwargs(inputs, steps=steps, seed=seed,
                                                        guidance_scale=guidance_scale, prompt=prompt))
        image = torch.from_numpy(np.asarray(out.images[0], dtype=np.float32)).permute(2, 0, 1) * 2 - 1
        m = inputs.mask
        generated = image * m + inputs.agnostic * (1 - m)  # as the Sampler's paste_back
        notes = []
        labels = None
        if self.kind == "StableDiffusionInpaintPipeline":
            labels = self.token_labels(prompt, maps.reference_grid[1])
            notes.append(f"reference = the {maps.reference_grid[1]} text tokens of the prompt {prompt!r}; "
                         "the garment image is shown for comparison only")
        else:
            notes.append("Paint-by-Example conditions on ONE pooled image token: G2R is trivially 1 "
                         "and specific-reference maps are constant; R2G is the informative direction")
        return RunOutput(generated, maps, labels, notes)


def open_source(path: str | Path, *, overrides: Sequence[str] = (), device: str = "cpu",
                resolution: Size | None = None) -> CheckpointSource | PipelineSource:
    """A diffusers pipeline directory when it has ``model_index.json``, else a run or
    checkpoint directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise AnalyzeError(f"no such run, checkpoint or pipeline directory: {p}")
    if (p / "model_index.json").is_file():
        if overrides:
            raise AnalyzeError("--set overrides apply to checkpoints, not to diffusers pipelines")
        return PipelineSource(p, device, resolution)
    if resolution is not None:
        raise AnalyzeError("--resolution applies to diffusers pipelines; a checkpoint runs at its "
                           "training resolution (data.resolution)")
    from train.checkpoint import CheckpointError

    try:
        return CheckpointSource(p, overrides, device)
    except CheckpointError as err:
        raise AnalyzeError(f"{err}; or a diffusers pipeline directory (model_index.json)") from err
