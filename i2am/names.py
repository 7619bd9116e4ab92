"""Readable names for attention layers (module paths are long)."""
from __future__ import annotations

import re


def short_name(name: str) -> str:
    """`up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor` -> `up1.0`: readable keys and titles."""
    m = re.match(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)", name)
    if m:
        return f"{m.group(1)}{m.group(2)}.{m.group(3)}"
    m = re.match(r"mid_block\.attentions\.(\d+)", name)
    return f"mid.{m.group(1)}" if m else name.removesuffix(".processor")
