"""trace() on tiny random StableDiffusionInpaint and PaintByExample pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from i2am import AttentionMonitor, trace

from .conftest import TINY_UNET, one_thread

H_IMG, W_IMG = 24, 16  # VAE factor 2: latent 12×8
TEXT_LEN = 16


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 16), latent_channels=4,
                         norm_num_groups=8, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**TINY_UNET, "in_channels": 9, "sample_size": 64})


def _build_inpaint(tmp_path_factory):
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in "abcdefghijklmnopqrstuvwxyz":
            vocab[ch + suffix] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=TEXT_LEN)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=2,
                                        max_position_embeddings=TEXT_LEN, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1)).eval()
    pipe = StableDiffusionInpaintPipeline(vae=_vae(), text_encoder=text, tokenizer=tokenizer, unet=_unet(),
                                          scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_pbe():
    from diffusers import DDIMScheduler, PaintByExamplePipeline
    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, projection_dim=32, intermediate_size=37, num_attention_heads=4,
                              num_hidden_layers=4, image_size=32, patch_size=8)
    encoder = PaintByExampleImageEncoder(config, proj_size=32).eval()
    processor = CLIPImageProcessor(crop_size=32, size=32)
    pipe = PaintByExamplePipeline(vae=_vae(), image_encoder=encoder, unet=_unet(), scheduler=DDIMScheduler(),
                                  safety_checker=None, feature_extractor=processor, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def inpaint_pipe(tmp_path_factory):
    with one_thread():
        return _build_inpaint(tmp_path_factory)


@pytest.fixture(scope="session")
def pbe_pipe():
    with one_thread():
        return _build_pbe()


def _images(seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (H_IMG, W_IMG, 3), dtype=np.uint8))
    mask = np.zeros((H_IMG, W_IMG), dtype=np.uint8)
    mask[6:18, 4:12] = 255
    example = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    return image, Image.fromarray(mask), example


def _inpaint_kwargs(guidance):
    image, mask, _ = _images()
    return dict(prompt="a red shirt", image=image, mask_image=mask, height=H_IMG, width=W_IMG,
                num_inference_steps=3, guidance_scale=guidance, output_type="np",
                generator=torch.Generator().manual_seed(0))


def _pbe_kwargs(guidance):
    image, mask, example = _images()
    return dict(example_image=example, image=image, mask_image=mask, num_inference_steps=3,
                guidance_scale=guidance, output_type="np", generator=torch.Generator().manual_seed(0))


def _both_halves(pipe, grid, kwargs):
    """Reference: a plain monitor recording the whole [uncond, cond] batch."""
    with AttentionMonitor(pipe.unet, grid) as mon:
        out = pipe(**kwargs)
        return out, mon.maps()


@pytest.mark.parametrize("kind", ["inpaint", "pbe"])
def test_trace_records_conditional_half(kind, request):
    pipe = request.getfixturevalue(f"{kind}_pipe")
    make, grid = (_inpaint_kwargs, (1, TEXT_LEN)) if kind == "inpaint" else (_pbe_kwargs, (1, 1))
    before = dict(pipe.unet.attn_processors)
    out, maps = trace(pipe, **make(7.5))
    assert all(pipe.unet.attn_processors[n] is p for n, p in before.items())
    assert out.images.shape == (1, H_IMG, W_IMG, 3)
    assert maps.batch_size == 1 and maps.num_steps == 3 and maps.reference_grid == grid
    assert maps.generated_grid == (H_IMG // 2, W_IMG // 2)
    assert maps.unified("r2g").shape == (1, 12, 8) and maps.unified("g2r").shape == (1, *grid)
    assert maps.time_level("r2g", groups=3).shape == (1, 3, 12, 8)
    assert maps.specific_reference((0, 0, 4, 4)).shape == (1, *grid)

    ref_out, both = _both_halves(pipe, grid, make(7.5))
    np.testing.assert_allclose(ref_out.images, out.images, atol=1e-6)  # same run, monitor or not
    assert both.batch_size == 2
    for d in ("r2g", "g2r", "daam"):
        torch.testing.assert_close(maps.unified(d)[0], both.unified(d)[1], atol=1e-6, rtol=1e-6)
    # the unconditional half attends differently, so recording it would have shown
    assert not torch.allclose(both.unified("r2g")[0], both.unified("r2g")[1], atol=1e-6)

    _, no_cfg = trace(pipe, **make(1.0))  # UNet batch 1: everything recorded
    assert no_cfg.batch_size == 1 and no_cfg.num_steps == 3
