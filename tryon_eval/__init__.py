"""Evaluation of try-on checkpoints: the field's metrics plus the I²AM ones.

``python -m tryon_eval RUN_OR_CHECKPOINT`` generates the test set (resumably) and writes
FID/KID (clean-fid), LPIPS/SSIM, IMACS_g/IMACS_r, colour error and box mIoU;
``python -m tryon_eval.detect`` runs the box-mIoU detection experiment on a COCO-style
folder or on the synthetic data. Submodules are imported on use (the CLI's --help stays fast).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "evaluate": "pipeline", "markdown_table": "pipeline", "EvalError": "generate",
    "MissingWeightsError": "weights", "find_inception": "weights", "find_alexnet": "weights",
    "RandomFeatures": "metrics", "fid_kid": "metrics", "ssim": "metrics", "build_lpips": "metrics",
    "imacs_per_sample": "metrics",
    "box_from_map": "boxes", "iou": "boxes", "random_box": "boxes", "whole_box": "boxes",
    "coco_box_miou": "boxes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'tryon_eval' has no attribute {name!r}")
