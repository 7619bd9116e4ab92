"""Numbers as text: one value formatter and one markdown table builder."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

MISSING = "n/a"
ALIGN = {"": "---", "left": ":---", "right": "---:", "center": ":---:"}


def fmt(value: Any, digits: int = 4, missing: str = MISSING) -> str:
    """A float (numpy's too) with ``digits`` decimals; None and NaN as ``missing``;
    integers, booleans and strings as they are."""
    if value is None:
        return missing
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return missing if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, align: Sequence[str] | None = None,
                   digits: int | Sequence[int] = 4, missing: str = MISSING) -> str:
    """A markdown table (no trailing newline). Cells that are not strings go through
    :func:`fmt` with their column's ``digits``; ``align`` per column is "" (the renderer's
    default), "left", "right" or "center"."""
    n = len(header)
    align = [""] * n if align is None else list(align)
    places = [digits] * n if isinstance(digits, int) else list(digits)
    if len(align) != n or len(places) != n:
        raise ValueError(f"{n} columns, but {len(align)} alignments and {len(places)} digit counts")
    lines = ["| " + " | ".join(header) + " |", "|" + "".join(ALIGN[a] + "|" for a in align)]
    for row in rows:
        if len(row) != n:
            raise ValueError(f"a row has {len(row)} cells, the header {n}: {row!r}")
        cells = [c if isinstance(c, str) else fmt(c, d, missing) for c, d in zip(row, places)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["fmt", "markdown_table", "MISSING"]
