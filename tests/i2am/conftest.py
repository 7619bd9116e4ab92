"""Session-scoped tiny models for the i2am tests (UNet construction and the
diffusers import are the slow parts; every test shares them).

Tests that attach a monitor to a shared UNet must detach it (use ``with``);
the autouse fixture below fails a test that leaves one attached.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

TINY_UNET = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,  # diffusers quirk: 8 heads
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
LATENT = (11, 9)  # odd sides: the inner level is the ceil-half (6, 5)
INNER = (6, 5)


def _unet(seed: int, **overrides):
    from diffusers import UNet2DConditionModel

    with one_thread():
        torch.manual_seed(seed)
        return UNet2DConditionModel(**{**TINY_UNET, **overrides}).eval()


@pytest.fixture(scope="session")
def tiny_unet():
    return _unet(0)


@pytest.fixture(scope="session")
def mixed_heads_unet():
    """Blocks with 2 and 4 heads: head_level must refuse it."""
    return _unet(1, attention_head_dim=(2, 4))


@pytest.fixture(scope="session")
def cross_names(tiny_unet):
    return [n for n in tiny_unet.attn_processors if n.endswith("attn2.processor")]


@contextlib.contextmanager
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core
    machine OpenMP threads spinning against other processes slow them 10×.
    Restored afterwards so the rest of the suite keeps its setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(autouse=True)
def _no_monitor_left_behind(request):
    yield
    from i2am.processor import MonitorProcessor

    for name in ("tiny_unet", "mixed_heads_unet"):
        if name in request.fixturenames:
            unet = request.getfixturevalue(name)
            left = [n for n, p in unet.attn_processors.items() if isinstance(p, MonitorProcessor)]
            assert not left, f"test left monitor processors attached: {left}"
