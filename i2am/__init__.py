"""I²AM: bi-directional attribution maps for image-to-image latent diffusion.

Public API: :class:`AttentionMonitor`, :class:`AttributionMaps`, :func:`imacs`,
:func:`trace`. ``i2am.render`` (visualisation) is a submodule imported on use,
so this package works without it. diffusers is imported only when a monitor is
attached, so loading saved maps stays light.
"""

from .maps import AttributionMaps
from .metrics import imacs
from .monitor import AttentionMonitor, LastAttention
from .trace import trace

__all__ = ["AttentionMonitor", "AttributionMaps", "LastAttention", "imacs", "trace"]
