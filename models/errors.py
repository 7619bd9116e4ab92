"""Errors about model files: say which file, where it was looked for, how to fix it."""
from __future__ import annotations

from pathlib import Path


class ModelConfigError(ValueError):
    """The model described by the config cannot be built from what is on disk."""


def missing_path_error(what: str, key: str, path: Path, expected_file: str) -> ModelConfigError:
    return ModelConfigError(
        f"{what} not found: expected {path / expected_file} (from config key '{key}' = {str(path)!r}, "
        f"resolved to {path.resolve()}). Nothing is downloaded at run time: save the model there with "
        f"`save_pretrained('{path}')` on a machine that has it, copy the directory over, "
        f"or set {key}=<local directory> (null builds a fresh model from the size registry)."
    )
