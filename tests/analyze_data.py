"""Shared, cached inputs for the analysis-command tests (tests/test_analyze.py and
tests/test_html_report_browser.py): real photographs in awkward formats, a tiny
trained checkpoint, tiny diffusers pipelines saved to disk, and one analysis run.

Everything is cached per pytest session (keyed by its base temp dir), so the
checkpoint is trained and analysed once even when both test files run.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PERSON_SIZE = (512, 384)   # (H, W) of the upright person photo
INPAINT_RES = (32, 24)     # --resolution for the tiny pipelines (portrait, divisible by 4)


def _person_display() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, 64:448])  # 512 x 384, portrait


@functools.cache
def photos(base: Path) -> dict[str, Path]:
    """Real photos (scikit-image's samples) as a user would have them:

    person.jpg        astronaut, stored sideways with EXIF orientation 6 (upright: 512x384)
    person_mask.png   L, the torso, in upright coordinates
    coffee.jpg        400x600 landscape JPEG (a person for the pipelines: padded top/bottom)
    coffee_mask.png   its mask
    chelsea_grey.png  greyscale (L) 300x451: an agnostic image
    chelsea_mask.png  its mask
    garment_rgba.png  coffee with a transparent left band (composited on white)
    garment_grey.png  camera(), greyscale 512x512
    """
    from skimage import data

    d = base / "photos"
    d.mkdir(parents=True)
    upright = Image.fromarray(_person_display())
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back clockwise
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(d / "person.jpg", exif=exif.tobytes(), quality=92)
    m = np.zeros(PERSON_SIZE, np.uint8)
    m[280:512, 40:340] = 255
    Image.fromarray(m).save(d / "person_mask.png")

    coffee = data.coffee()
    Image.fromarray(coffee).save(d / "coffee.jpg", quality=90)
    m = np.zeros(coffee.shape[:2], np.uint8)
    m[100:300, 150:450] = 255
    Image.fromarray(m).save(d / "coffee_mask.png")

    cat = Image.fromarray(data.chelsea()).convert("L")
    cat.save(d / "chelsea_grey.png")
    m = np.zeros((cat.height, cat.width), np.uint8)
    m[150:300, 100:350] = 255
    Image.fromarray(m).save(d / "chelsea_mask.png")

    rgba = np.dstack([coffee, np.full(coffee.shape[:2], 255, np.uint8)])
    rgba[:, :100, 3] = 0
    Image.fromarray(rgba).save(d / "garment_rgba.png")
    Image.fromarray(data.camera()).save(d / "garment_grey.png")
    return _names(d)


def _names(d: Path) -> dict[str, Path]:
    return {"person": d / "person.jpg", "person_mask": d / "person_mask.png", "coffee": d / "coffee.jpg",
            "coffee_mask": d / "coffee_mask.png", "chelsea_grey": d / "chelsea_grey.png",
            "chelsea_mask": d / "chelsea_mask.png", "garment_rgba": d / "garment_rgba.png",
            "garment_grey": d / "garment_grey.png"}


@functools.cache
def tiny_run(base: Path) -> Path:
    """A run directory trained for 2 steps by the real Trainer (checkpoint at step 2)."""
    from configs import load_config
    from tests.conftest import tiny_overrides
    from train import Trainer

    root = base / "tiny_ckpt"
    with contextlib.redirect_stdout(io.StringIO()):
        Trainer(load_config(overrides=tiny_overrides(root, **{"train.max_steps": 2,
                                                               "train.checkpoint_every": 2}))).fit()
    return root / "run"


CHECKPOINT_ARGS = dict(steps=2, seed=3, patch="5,4")


@functools.cache
def analysed_checkpoint(base: Path) -> tuple[Path, str]:
    """``python -m i2am analyze`` on the tiny run: (out dir, what it printed)."""
    from apps.cli import main

    p = photos(base)
    out = base / "analysis_ckpt"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["analyze", str(tiny_run(base)), "--person", str(p["person"]), "--mask", str(p["person_mask"]),
                   "--garment", str(p["garment_rgba"]), "--out", str(out), "--steps", str(CHECKPOINT_ARGS["steps"]),
                   "--seed", str(CHECKPOINT_ARGS["seed"]), "--patch", CHECKPOINT_ARGS["patch"], "--no-progress"])
    assert rc == 0, buf.getvalue()
    return out, buf.getvalue()


# ------------------------------------------------------------------------ tiny pipelines
TEXT_LEN = 16


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 16), latent_channels=4,
                         norm_num_groups=8, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _unet(**overrides):
    from diffusers import UNet2DConditionModel

    from tests.i2am.conftest import TINY_UNET

    return UNet2DConditionModel(**{**TINY_UNET, "in_channels": 9, "sample_size": 16, **overrides})


@functools.cache
def tiny_pipeline(base: Path, kind: str) -> tuple[Path, Any]:
    """A random tiny StableDiffusionInpaintPipeline ("inpaint") or PaintByExamplePipeline
    ("pbe") built from configs and saved with save_pretrained: (directory, the pipeline)."""
    import torch
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    out = base / f"pipe_{kind}"
    if kind == "inpaint":
        from diffusers import StableDiffusionInpaintPipeline
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        tdir = base / "tokenizer_src"
        tdir.mkdir(exist_ok=True)
        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
        for suffix in ("", "</w>"):
            for ch in "abcdefghijklmnopqrstuvwxyz":
                vocab[ch + suffix] = len(vocab)
        (tdir / "vocab.json").write_text(json.dumps(vocab))
        (tdir / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(tdir / "vocab.json"), str(tdir / "merges.txt"), model_max_length=TEXT_LEN)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                            num_attention_heads=4, num_hidden_layers=2,
                                            max_position_embeddings=TEXT_LEN, bos_token_id=0, eos_token_id=1,
                                            pad_token_id=1)).eval()
        pipe = StableDiffusionInpaintPipeline(vae=_vae(), text_encoder=text, tokenizer=tokenizer, unet=_unet(),
                                              scheduler=DDIMScheduler(), safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
    else:
        from diffusers import PaintByExamplePipeline
        from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
        from transformers import CLIPImageProcessor, CLIPVisionConfig

        config = CLIPVisionConfig(hidden_size=32, projection_dim=32, intermediate_size=37, num_attention_heads=4,
                                  num_hidden_layers=2, image_size=32, patch_size=8)
        encoder = PaintByExampleImageEncoder(config, proj_size=32).eval()
        # blocks with 2 and 4 heads: the head level must fall back to the layers sharing a count
        pipe = PaintByExamplePipeline(vae=_vae(), image_encoder=encoder, unet=_unet(attention_head_dim=(2, 4)),
                                      scheduler=DDIMScheduler(), safety_checker=None,
                                      feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
                                      requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(out)
    return out, pipe
