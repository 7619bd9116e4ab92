"""Typed configuration: one dataclass per component.

OmegaConf turns these into structured configs, so a typo in a YAML file or on
the command line fails at parse time with the key's name instead of deep inside
training. Every field has a default; `configs/default.yaml` states only where the
embedded default run differs from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class DataConfig:
    # "synthetic" (embedded, no files), "viton_hd", "dresscode"
    name: str = "synthetic"
    root: Optional[str] = None
    # (H, W) in pixels; try-on images are portrait, so H > W.
    resolution: List[int] = field(default_factory=lambda: [32, 24])
    num_train: int = 2048  # synthetic only
    num_val: int = 16  # size of the fixed validation batch
    seed: int = 0
    num_workers: int = 0
    # synthetic only: garment pattern kinds and their probabilities (None: uniform)
    patterns: List[str] = field(default_factory=lambda: ["solid", "stripes", "checks", "dots"])
    pattern_probs: Optional[List[float]] = None
    # viton_hd / dresscode only (tryon_data.viton_hd, tryon_data.dresscode):
    category: str = "all"  # dresscode: "all", or upper_body, lower_body, dresses (comma-separated)
    use_pose: bool = False  # also load the densepose rendering as sample["pose"]
    skip_bad: bool = False  # skip (and count) unreadable images instead of stopping
    flip_prob: float = 0.0  # training only: joint horizontal flip of person, garment and masks
    color_jitter: float = 0.0  # training only: joint brightness/contrast/saturation jitter (0.05 = mild)


@dataclass
class CodecConfig:
    # "pixel": exact invertible space-to-depth (no pretrained VAE needed);
    # "vae": a frozen diffusers AutoencoderKL (pretrained dir, or tiny config).
    kind: str = "pixel"
    pixel_factor: int = 2
    pretrained: Optional[str] = None  # local AutoencoderKL directory
    scaling_factor: Optional[float] = None  # None: read from the VAE config


@dataclass
class UNetConfig:
    size: str = "tiny"  # key into models.registry.UNET_SIZES
    pretrained: Optional[str] = None  # local UNet2DConditionModel directory
    use_pose: bool = False  # add a pose (densepose) latent to the UNet input
    # Add two input channels: each latent cell's (y, x) relative to the inpainting mask's
    # bounding box (CoordConv). Cross-attention can only fetch the garment cell that belongs at
    # a place on the torso if the query knows where on the garment region it is.
    mask_coords: bool = False
    gradient_checkpointing: bool = False


@dataclass
class GarmentEncoderConfig:
    # "conv": a small conv tokenizer trained from scratch; "clip": CLIP vision patch tokens.
    kind: str = "conv"
    grid: List[int] = field(default_factory=lambda: [8, 6])  # (h_r, w_r) of the token grid
    width: int = 64  # conv tokenizer channels
    downsample: int = 2  # conv tokenizer: stride-2 convolutions before pooling to the grid
    mixer_layers: int = 0  # conv tokenizer: transformer layers over the tokens (global view of the garment)
    # conv tokenizer: learned tokens before the grid that carry no garment content, so a
    # query with nothing to take from the garment (skin, background) can attend to them
    null_tokens: int = 0
    pretrained: Optional[str] = None  # local CLIPVisionModel directory (kind=clip)
    clip_size: str = "tiny"  # config used when kind=clip and pretrained is None
    freeze_backbone: bool = True  # kind=clip: train only the projection


@dataclass
class WarpConfig:
    """The attention warp (models/warp.py): the garment resampled at one cross-attention layer's
    attention centres, blended into the x0 prediction through gates the UNet predicts, one per
    latent channel. Needs diffusion.prediction_type=sample."""

    enabled: bool = False
    layer: Optional[str] = None  # module path of a cross-attention layer; None = the UNet's last


@dataclass
class ModelConfig:
    codec: CodecConfig = field(default_factory=CodecConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    garment: GarmentEncoderConfig = field(default_factory=GarmentEncoderConfig)
    warp: WarpConfig = field(default_factory=WarpConfig)
    # classifier-free guidance: probability of replacing garment tokens by learned null tokens
    cfg_drop_prob: float = 0.1


@dataclass
class DiffusionConfig:
    prediction_type: str = "v_prediction"  # "epsilon" | "v_prediction" | "sample" (x0)
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    snr_gamma: Optional[float] = 5.0  # min-SNR weighting; None disables
    sample_steps: int = 25  # DDIM steps at validation
    guidance_scale: float = 1.0  # 1.0 = no classifier-free guidance


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lr_scheduler: str = "cosine"  # any diffusers.optimization.get_scheduler name
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    ema_decay: Optional[float] = 0.99  # None disables EMA


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 1000
    batch_size: int = 16  # per process
    grad_accum: int = 1
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    seed: int = 0
    resume: Optional[str] = None  # "latest" or a checkpoint path
    # Fine-tune: start from the model weights (the EMA weights it evaluates with) of another run's
    # checkpoint, or its run directory's latest; optimizer, LR schedule and step start fresh.
    # Ignored once this run has checkpoints of its own (train.resume picks those up).
    init_from: Optional[str] = None
    checkpoint_every: int = 250
    checkpoint_limit: int = 2
    log_every: int = 25
    val_every: int = 250
    validate_at_start: bool = True  # colour error of the untrained model, for the summary
    max_time_minutes: Optional[float] = None  # stop (with a checkpoint) after this long
    nan_tolerance: int = 5  # non-finite losses in a row before the run stops
    # CPU training: torch threads per process. None = auto: all cores divided among the processes
    # on the machine, unless the launch chose (accelerate's --num_cpu_threads_per_process, or
    # OMP_NUM_THREADS set by the user). See train/threads.py.
    cpu_threads: Optional[int] = None


@dataclass
class TrackerConfig:
    kind: str = "wandb"  # "wandb" | "tensorboard" | "none"
    project: str = "i2am-tryon"
    run_name: Optional[str] = None
    # wandb: "auto" = online with credentials, else offline; or "online" / "offline"
    mode: str = "auto"
    # wandb's CPU/GPU/memory charts: its sampler costs ~10 % of a 2-core CPU run, so off by default
    system_metrics: bool = False


@dataclass
class MonitorConfig:
    """The I²AM monitor on the UNet's reference cross-attention layers."""

    enabled: bool = True
    layers: Optional[List[str]] = None  # processor names; None = every cross-attention layer
    chunk_size: int = 4096  # queries per no-grad score chunk when recording maps
    time_groups: int = 5  # time-level groups at validation
    maps_at_validation: bool = True  # record sampling and log attribution maps
    patches: int = 3  # specific-reference figures per validation (highest-R2G cells in the mask)
    samples: int = 4  # validation samples with map figures


@dataclass
class StabilityConfig:
    """Attention-stability loss terms (weights 0 = off; dispersion, colour variance and, on
    synthetic data, centre error are still logged)."""

    dispersion: float = 0.0
    atv: float = 0.0
    concentration: float = 0.0
    concentration_sigma: float = 0.1
    # colour-anchored attention variance E_A||g - y||^2 over the worn-garment queries (every data set)
    colour: float = 0.0
    # position-anchored attention variance E_A||p - p*||^2 (needs sample["garment_pos"]: the synthetic set)
    position: float = 0.0
    # position-anchored R2G: each garment cell's attention over the person (softmax over queries)
    # around where that cell is worn, E||x - x*_j||^2 (needs sample["garment_pos"]: the synthetic set)
    placement: float = 0.0
    # garment cells per layer and step the placement term samples (uniformly, among the cells some
    # worn pixel shows): an unbiased estimate of the mean over all of them at a fraction of the
    # cost of the transposed attention call it needs; 0 = every cell, exactly
    placement_cells: int = 16
    # which queries take from the garment at all: the grid mass of the queries showing no garment plus
    # the extra-token mass of the worn ones (needs extra tokens: model.garment.null_tokens > 0 or CLIP's CLS)
    sink: float = 0.0
    layers: Optional[List[str]] = None  # names or resolution levels like "16x12"; None = all monitored
    # The peers' recipes (docs/stability.md), each on its own layers; `t_max` and `warmup_steps` gate them too.
    # Leffa's flow loss: the garment warped by the attention centres vs the person (Leffa: 1e-3, t_max=500)
    flow: float = 0.0
    flow_layers: Optional[List[str]] = None  # names or levels; None = Leffa's: layers at >= 1/32 of the image size
    # The I²AM authors' CWG + TV + DCML (their weights: 2.0, 1e-4, 0.01). CWG and DCML are rewards: the
    # loss subtracts them, so the weights stay >= 0 and the loss is -cwg*CWG + tv*TV - dcml*DCML.
    cwg: float = 0.0
    tv: float = 0.0
    dcml: float = 0.0
    authors_layers: Optional[List[str]] = None  # names or levels; None = the authors': decoder layers at 16x12
    t_max: Optional[int] = None  # apply only for timesteps t < t_max
    warmup_steps: int = 0  # no stability loss before this step


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
