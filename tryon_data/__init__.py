"""Try-on data sets sharing one sample contract (see :mod:`tryon_data.samples`).

The synthetic set is embedded; VITON-HD and DressCode are read from their published
layouts (:mod:`tryon_data.viton_hd`, :mod:`tryon_data.dresscode`), imported on use.
"""

from .images import DatasetError, UnreadableFileError
from .samples import (OPTIONAL_KEYS, REQUIRED_KEYS, SAMPLE_KEYS, check_sample, colour_error, pixel_error,
                      masked_mean_colour)
from .synthetic import PATTERNS, SyntheticTryOn

__all__ = ["SAMPLE_KEYS", "REQUIRED_KEYS", "OPTIONAL_KEYS", "PATTERNS", "SyntheticTryOn", "DatasetError",
           "UnreadableFileError", "DressCode", "VitonHD", "build_real_dataset", "check_sample", "colour_error", "pixel_error",
           "masked_mean_colour"]


def __getattr__(name: str):  # lazy: the real-data loaders pull in scipy
    if name == "VitonHD":
        from .viton_hd import VitonHD
        return VitonHD
    if name == "DressCode":
        from .dresscode import DressCode
        return DressCode
    if name == "build_real_dataset":
        from .real import build_real_dataset
        return build_real_dataset
    raise AttributeError(f"module 'tryon_data' has no attribute {name!r}")
