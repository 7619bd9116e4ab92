"""The field's image metrics, computed the way published try-on tables compute them.

* FID and KID: clean-fid in "clean" mode (PIL bicubic resize to 299, TorchScript Inception),
  through clean-fid's own feature and distance functions, so that a number here equals
  ``cleanfid.fid.compute_fid`` / ``compute_kid`` on the same folders.
* LPIPS (AlexNet, v0.1 linear heads) and SSIM (Gaussian window, sigma 1.5, Wang et al.'s
  constants) on paired results against the ground truth, from the PNG files.
* IMACS of the I²AM maps against masks brought to the map's grid.

Feature extractors follow clean-fid's protocol: a callable taking float (N, 3, 299, 299) in
[0, 255] and returning (N, D) features.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.images import from_uint8, to_uint8

# IMACS helpers: one implementation, shared with training and `python -m i2am analyze`.
from i2am.metrics import imacs_per_sample, mask_to_grid  # noqa: F401

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------ feature extractors
class RandomFeatures(torch.nn.Module):
    """A seeded random projection of an 8x8 colour thumbnail: a stand-in feature extractor
    that exercises the FID/KID code paths without Inception. Its numbers are NOT
    comparable with anything published."""

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(3 * 8 * 8, dim, generator=g) / (3 * 8 * 8) ** 0.5)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        thumb = F.adaptive_avg_pool2d(x.float() / 127.5 - 1, 8).flatten(1)
        return thumb @ self.proj.to(thumb.device)


def inception_extractor(path: Path, device: torch.device) -> FeatureExtractor:
    """clean-fid's InceptionV3W (clean mode: inputs already resized to 299) from a local file."""
    from cleanfid.inception_torchscript import InceptionV3W

    path = Path(path).resolve()
    if path.name == "inception-2015-12-05.pt":
        model = InceptionV3W(str(path.parent), download=False, resize_inside=False)
    else:  # a renamed copy: InceptionV3W only takes a folder holding the canonical name
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "inception-2015-12-05.pt").symlink_to(path)
            model = InceptionV3W(tmp, download=False, resize_inside=False)
    model = model.to(device).eval()
    return lambda x: model(x)


FEATURE_BATCH = 32  # clean-fid's compute_fid / compute_kid default: batching changes float rounding


def image_features(files: Sequence[Path], extractor: FeatureExtractor, device: torch.device,
                   batch_size: int = FEATURE_BATCH, progress: bool = False, description: str = "") -> np.ndarray:
    """clean-fid's ``get_files_features`` (clean mode, no workers) on an explicit file list:
    what ``get_folder_features`` does on a folder holding exactly these files."""
    from cleanfid.fid import get_files_features

    return get_files_features([str(f) for f in files], model=extractor, num_workers=0, batch_size=batch_size,
                              device=device, mode="clean", verbose=progress, description=description)


def fid_kid(generated: np.ndarray, real: np.ndarray, kid_seed: int = 0) -> dict[str, float | None]:
    """FID (clean-fid's ``fid_from_feats``) and KID (``kernel_distance``: 100 subsets of
    min(n, 1000)) between feature sets; None where a set has fewer than 2 images.
    ``kernel_distance`` draws its subsets from numpy's global RNG: it is seeded here (and
    restored after) so that KID is reproducible; with n <= 1000 on both sides every subset
    is the whole set and the seed doesn't matter."""
    from cleanfid.fid import fid_from_feats, kernel_distance

    if len(generated) < 2 or len(real) < 2:
        return {"fid": None, "kid": None}
    state = np.random.get_state()
    np.random.seed(kid_seed)
    try:
        kid = float(kernel_distance(generated, real))
    finally:
        np.random.set_state(state)
    return {"fid": float(np.real(fid_from_feats(generated, real))), "kid": kid}


# ---------------------------------------------------------------------------- paired metrics
def read_uint8(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 (H, W, 3) images: Gaussian window sigma 1.5 (11x11), population
    covariances, K1 = 0.01, K2 = 0.03, data range 255, mean over channels (Wang et al. 2004)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                       data_range=255, channel_axis=-1))


def build_lpips(backend: str = "alex", alexnet: Path | None = None, seed: int = 0) -> torch.nn.Module:
    """LPIPS v0.1 with AlexNet. The linear heads ship inside the lpips package; the AlexNet
    backbone is loaded from ``alexnet`` (torchvision's ImageNet checkpoint) instead of
    torchvision's downloader. ``backend="random"`` keeps a random backbone drawn from
    ``seed`` (a stand-in for tests and smoke runs: NOT comparable, but the same in every run,
    so that a resumed evaluation reports what an uninterrupted one does)."""
    import warnings

    import lpips

    # torch's global generator would make the random backbone differ from run to run
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", UserWarning)  # torchvision's "pretrained is deprecated", inside lpips
        torch.manual_seed(seed)
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if backend == "alex":
        if alexnet is None:
            raise ValueError("build_lpips(backend='alex') needs the AlexNet checkpoint path")
        load_alexnet_backbone(model.net, Path(alexnet))
    elif backend != "random":
        raise ValueError(f"LPIPS backend must be 'alex' or 'random', got {backend!r}")
    return model.eval().requires_grad_(False)


def load_alexnet_backbone(net: torch.nn.Module, path: Path) -> None:
    """Copy ``features.<i>.*`` of a torchvision AlexNet state dict into lpips' slices (which
    keep torchvision's layer indices as module names)."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    loaded = 0
    for slice_name in ("slice1", "slice2", "slice3", "slice4", "slice5"):
        for idx, module in getattr(net, slice_name).named_children():
            for pname, param in module.named_parameters(recurse=False):
                key = f"features.{idx}.{pname}"
                if key not in state:
                    raise ValueError(f"{path} is not a torchvision AlexNet checkpoint: no {key!r}")
                with torch.no_grad():
                    param.copy_(state[key])
                loaded += 1
    if loaded != 10:  # 5 convolutions x (weight, bias)
        raise ValueError(f"expected 10 AlexNet feature tensors in {path}, loaded {loaded}")


LPIPS_MIN_SIDE = 64  # AlexNet's pooling needs >= 31 px; tiny (synthetic) images are upsampled


@torch.no_grad()
def lpips_distance(model: torch.nn.Module, a: np.ndarray, b: np.ndarray, device: torch.device) -> float:
    """LPIPS between two uint8 (H, W, 3) images (mapped to [-1, 1], as lpips expects).
    Images with a side under 64 px (only the synthetic default) are first upsampled
    (bilinear, both alike) so that the shorter side is 64."""
    def t(x: np.ndarray) -> torch.Tensor:
        y = from_uint8(x)[None]
        short = min(y.shape[-2:])
        if short < LPIPS_MIN_SIDE:
            scale = LPIPS_MIN_SIDE / short
            size = (round(y.shape[-2] * scale), round(y.shape[-1] * scale))
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y.to(device)

    return float(model.to(device)(t(a), t(b)).flatten()[0])


def paired_metrics(pairs: Sequence[tuple[Path, Path]], lpips_model: torch.nn.Module, device: torch.device,
                   progress: bool = False) -> dict[str, float | None]:
    """Mean LPIPS and SSIM over (generated, ground truth) PNG pairs."""
    from tqdm.auto import tqdm

    if not pairs:
        return {"lpips": None, "ssim": None}
    lp, ss = [], []
    for gen, real in tqdm(pairs, desc="LPIPS/SSIM", disable=not progress, leave=False):
        a, b = read_uint8(gen), read_uint8(real)
        if a.shape != b.shape:
            raise ValueError(f"{gen} is {a.shape[:2]} but its ground truth {real} is {b.shape[:2]}")
        lp.append(lpips_distance(lpips_model, a, b, device))
        ss.append(ssim(a, b))
    return {"lpips": float(np.mean(lp)), "ssim": float(np.mean(ss))}


def sample_scores(generated: torch.Tensor, batch: Mapping[str, torch.Tensor], maps: Any,
                  target: torch.Tensor | None = None, with_ssim: bool = False) -> dict[str, list[float | None]]:
    """Per-sample scores of one generated batch (B, 3, H, W) in [-1, 1]: ``imacs_g`` (the R2G
    map against the inpainting mask) and ``imacs_r`` (G2R against the garment mask) from the
    I²AM ``maps`` (None where undefined), and against ``target`` (what the images should
    be inside the mask; None: unknown, the scores are None) ``colour_error`` and
    ``pixel_error`` inside the mask, and with ``with_ssim`` the whole image's ``ssim``."""
    from tryon_data.samples import colour_error, pixel_error

    n = generated.shape[0]
    generated, mask = generated.cpu(), batch["mask"].cpu()
    scores: dict[str, list[float | None]] = {
        "imacs_g": imacs_per_sample(maps.unified("r2g").float().cpu(), mask),
        "imacs_r": imacs_per_sample(maps.unified("g2r").float().cpu(), batch["garment_mask"].cpu()),
    }
    if target is None:
        scores.update(colour_error=[None] * n, pixel_error=[None] * n)
        if with_ssim:
            scores["ssim"] = [None] * n
        return scores
    target = target.cpu()
    scores["colour_error"] = colour_error(generated, target, mask).tolist()
    scores["pixel_error"] = pixel_error(generated, target, mask).tolist()
    if with_ssim:
        scores["ssim"] = [ssim(a, b) for a, b in zip(to_uint8(generated), to_uint8(target))]
    return scores


def mean_or_none(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None
