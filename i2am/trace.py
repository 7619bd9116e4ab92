"""trace(pipeline, ...): run a diffusers pipeline once and return its maps.

Supported and tested: ``StableDiffusionInpaintPipeline`` (reference = the text
tokens, a 1 × L row, L the encoder length) and ``PaintByExamplePipeline``
(reference = the single pooled image token, a 1 × 1 grid). Any pipeline with a
``unet`` and a ``guidance_scale`` call argument works the same way, given the
reference grid.

Classifier-free guidance: both pipelines stack the batch as
``[unconditional, conditional]`` (``torch.cat([negative, positive])``, then
``noise_pred.chunk(2)`` → uncond, text), so only the second half is recorded.
Whether guidance is on is decided per UNet call: from the pipeline's own
``do_classifier_free_guidance`` property where it has one (the inpaint
pipeline: ``guidance_scale > 1`` and no guidance embedding), else from
``guidance_scale > 1`` (Paint-by-Example's rule).
"""

from __future__ import annotations

import inspect
from typing import Any

from .maps import AttributionMaps
from .monitor import AttentionMonitor, LayerSelector


def _guidance_scale(pipeline: Any, call_kwargs: dict[str, Any]) -> float:
    if "guidance_scale" in call_kwargs:
        return float(call_kwargs["guidance_scale"])
    param = inspect.signature(pipeline.__call__).parameters.get("guidance_scale")
    if param is None or param.default is inspect.Parameter.empty:
        raise ValueError(f"cannot tell whether {type(pipeline).__name__} uses classifier-free guidance: "
                         "pass guidance_scale=... explicitly")
    return float(param.default)


def _uses_cfg(pipeline: Any, call_kwargs: dict[str, Any]) -> bool:
    if isinstance(getattr(type(pipeline), "do_classifier_free_guidance", None), property):
        return bool(pipeline.do_classifier_free_guidance)
    return _guidance_scale(pipeline, call_kwargs) > 1.0


def _default_reference_grid(pipeline: Any) -> tuple[int, int] | None:
    name = type(pipeline).__name__
    if name == "PaintByExamplePipeline":
        return (1, 1)  # PaintByExampleImageEncoder returns one pooled, projected token
    return None  # text pipelines: a 1 × (encoder length) row, read at the first call


def trace(
    pipeline: Any,
    *,
    reference_grid: tuple[int, int] | None = None,
    extra_tokens: int = 0,
    layers: LayerSelector = None,
    num_steps: int | None = None,
    time_groups: int = 5,
    chunk_size: int = 1024,
    pair_layers: Any = None,
    **call_kwargs: Any,
) -> tuple[Any, AttributionMaps]:
    """Call ``pipeline(**call_kwargs)`` with an :class:`AttentionMonitor` on its
    UNet; return ``(pipeline output, AttributionMaps)``.

    Under classifier-free guidance only the conditional half of the UNet batch
    is recorded, so the maps have the pipeline's image batch size. The monitor
    is removed afterwards, also when the call raises. ``num_steps=None`` keeps
    one time bin per UNet call (exact ``time_level`` for any grouping).
    """
    unet = getattr(pipeline, "unet", None)
    if unet is None:
        raise ValueError(f"trace needs a pipeline with a `unet`, got {type(pipeline).__name__}")
    grid = reference_grid if reference_grid is not None else _default_reference_grid(pipeline)

    def cond_half(batch: int) -> slice:
        if not _uses_cfg(pipeline, call_kwargs):
            return slice(None)
        if batch % 2:
            raise ValueError(f"classifier-free guidance expects an even UNet batch [uncond, cond], got {batch}")
        return slice(batch // 2, batch)

    monitor = AttentionMonitor(
        unet, grid, extra_tokens=extra_tokens, layers=layers, num_steps=num_steps,
        time_groups=time_groups, chunk_size=chunk_size, pair_layers=pair_layers, batch_slice=cond_half,
    )
    try:
        output = pipeline(**call_kwargs)
        maps = monitor.maps()
    finally:
        monitor.close()
    return output, maps
