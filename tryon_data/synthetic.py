"""A synthetic virtual try-on data set, generated from a seed: the project's default data.

Each sample is a simple figure (head, neck, arms, trousers) in front of a muted background,
wearing a T-shirt with a pattern (solid, stripes, checks, dots), plus the flat garment on
white, its mask, the garment-agnostic person, the inpainting mask, the garment's box, the
exact worn-garment mask and, for each worn pixel, the position of the same garment point in
the flat garment image (the contract is in :mod:`tryon_data.samples`).

Why it looks like this:

* Learnable on a CPU in minutes: a tiny UNet at 32x24 only has to copy a few saturated,
  well separated colours into a region it is told about (the mask); the figure, background
  and trousers are muted so that the garment's colours can't be confused with them.
* Spatial correspondence: the pattern is a function of garment coordinates (u, v) in [0, 1]^2
  relative to the garment's bounding box, both on the person and on the flat garment (a
  uniformly scaled copy of the worn silhouette). Garment position (u, v) therefore shows the
  same colour as torso position (u, v): that is what cross-attention can learn and what
  attribution maps should show.
* The failure mode the I²AM paper studies: two-colour patterns (stripes, checks, dots) use
  two saturated colours at least ~80 degrees of hue apart. A model whose cross-attention is
  scattered over the garment averages them into a muddy colour that matches neither, which
  ``colour_error`` measures.

Everything is drawn in continuous coordinates relative to the image size (pixel centres at
((r + 0.5) / H, (c + 0.5) / W)), so any resolution shows the same scene; the figure's
proportions assume the usual 4:3 (H:W) aspect. Pattern periods are chosen so that stripes and
check cells are at least 2 px wide at 32x24.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .samples import check_sample, colour_error, pixel_error, masked_mean_colour

__all__ = ["SyntheticTryOn", "PATTERNS", "colour_error", "pixel_error", "masked_mean_colour", "check_sample"]

PATTERNS: tuple[str, ...] = ("solid", "stripes", "checks", "dots")
_SPLITS: tuple[str, ...] = ("train", "val", "test")
_MODES: tuple[str, ...] = ("paired", "unpaired")
# The canonical resolution: pattern periods guarantee >= 2 px stripes / cells here.
_CANON_H, _CANON_W = 32, 24
_NUM_RANDOM = 48  # uniforms drawn per index (more than used: room to add features)

# Muted colour palettes, [0, 1] RGB: kept far (in saturation) from the garment colours.
_SKIN = ((0.96, 0.80, 0.69), (0.90, 0.72, 0.58), (0.78, 0.58, 0.43), (0.63, 0.45, 0.32),
         (0.48, 0.33, 0.23), (0.36, 0.25, 0.18))
_HAIR = ((0.10, 0.08, 0.07), (0.25, 0.16, 0.10), (0.45, 0.32, 0.20), (0.20, 0.20, 0.22))
_TROUSERS = ((0.20, 0.27, 0.45), (0.12, 0.12, 0.14), (0.30, 0.30, 0.32), (0.33, 0.24, 0.17),
             (0.14, 0.18, 0.30))


@dataclass(frozen=True)
class _Person:
    """Body and scene of one index: relative coordinates (y of H, x of W)."""
    bg: tuple[float, float, float]
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    trousers: tuple[float, float, float]
    cx: float           # body centre column
    head_cy: float
    head_ry: float
    head_rx: float
    ys: float           # shoulder line = top of the garment box
    gh: float           # garment box height (shoulder to hem)
    bw: float           # body half width
    sw: float           # sleeve / arm column width
    taper: float        # hem half width / shoulder half width
    arm_end: float
    feet: float
    leg_gap: float
    leg_w: float

    @property
    def gw(self) -> float:
        """Garment box width: body plus a sleeve column on each side."""
        return 2.0 * (self.bw + self.sw)


@dataclass(frozen=True)
class _Garment:
    """The garment of one index: pattern in garment coordinates, sleeves, neckline."""
    pattern: str
    c1: tuple[float, float, float]
    c2: tuple[float, float, float]
    horizontal: bool    # stripes orientation
    k_u: float          # stripes / check cells / dot cells along u (garment height)
    k_v: float          # ... along v (garment width)
    ph_u: float
    ph_v: float
    dot_r: float        # dot radius as a fraction of the smaller dot cell side
    sleeve_len: float   # in units of garment height
    drop: float         # shoulder slope: how far the sleeve top drops at its outer edge
    neck_d: float       # neckline depth (u units)
    neck_w: float       # neckline half width (v units)


def _index_seed(seed: int, split: str, index: int) -> int:
    """A 63-bit seed from (seed, split, index): streams of different splits never overlap."""
    digest = hashlib.blake2b(f"synthetic|{seed}|{split}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    return colorsys.hsv_to_rgb(h % 1.0, s, v)


def _skip_orange(deg: float) -> float:
    """Hue in degrees, pushed out of 10-50 degrees (orange: too close to skin tones)."""
    deg %= 360.0
    return deg + 40.0 if 10.0 <= deg < 50.0 else deg


def _jitter(c: tuple[float, float, float], r: float, amount: float = 0.04) -> tuple[float, float, float]:
    d = (2 * r - 1) * amount
    return tuple(min(1.0, max(0.0, x + d)) for x in c)  # type: ignore[return-value]


def _sample_params(seed: int, split: str, index: int, patterns: tuple[str, ...],
                   cum_probs: tuple[float, ...]) -> tuple[_Person, _Garment]:
    g = torch.Generator().manual_seed(_index_seed(seed, split, index))
    it = iter(torch.rand(_NUM_RANDOM, generator=g, dtype=torch.float64).tolist())

    def U(a: float, b: float) -> float:
        return a + (b - a) * next(it)

    def pick(seq: tuple) -> Any:
        return seq[min(int(next(it) * len(seq)), len(seq) - 1)]

    s = U(1.08, 1.2)                           # body size
    head_ry = 0.075 * s * U(0.95, 1.05)
    head_cy = U(0.1, 0.12)
    ys = head_cy + head_ry + 0.025 * s
    gh = s * U(0.34, 0.40)
    bw, sw = s * U(0.16, 0.19), s * U(0.09, 0.11)
    person = _Person(
        bg=_hsv(next(it), U(0.05, 0.22), U(0.35, 0.75)),
        skin=_jitter(pick(_SKIN), next(it)),
        hair=_jitter(pick(_HAIR), next(it)),
        trousers=_jitter(pick(_TROUSERS), next(it)),
        cx=0.5 + U(-0.05, 0.05), head_cy=head_cy, head_ry=head_ry,
        head_rx=head_ry * 0.8 * _CANON_H / _CANON_W,   # 0.8 as wide as tall, in pixels
        ys=ys, gh=gh, bw=bw, sw=sw, taper=U(0.85, 1.0),
        arm_end=ys + gh * U(0.85, 1.0), feet=min(0.985, ys + gh + s * U(0.30, 0.36)),
        leg_gap=s * U(0.01, 0.025), leg_w=bw * U(0.8, 0.95),
    )

    x = next(it)
    kind = patterns[-1]
    for name, cp in zip(patterns, cum_probs):
        if x < cp:
            kind = name
            break
    # Saturated colours; the second is 120-240 degrees of hue from the first (>= 80 after
    # skipping orange), so that mixing them up is a large, measurable colour error.
    h1 = U(0.0, 320.0)
    h1 = h1 + 40.0 if h1 >= 10.0 else h1  # uniform over [0, 10) and [50, 360)
    c1 = _hsv(h1 / 360.0, U(0.75, 1.0), U(0.75, 1.0))
    h2 = _skip_orange(h1 + U(120.0, 240.0))
    c2 = _hsv(h2 / 360.0, U(0.75, 1.0), U(0.7, 1.0))
    if kind == "solid":
        c2 = c1
    # The garment box is >= 0.367 H tall (11.7 px at 32x24) and >= 0.54 W wide (13 px): at most
    # 5 resp. 5.5 stripes / check cells keep them >= 2.1 px wide; dot cells stay >= 4 px.
    if kind == "dots":
        k_u, k_v = U(2.0, 2.8), U(2.0, 3.0)
    else:
        k_u, k_v = U(3.0, 5.0), U(3.0, 5.5)
    garment = _Garment(
        pattern=kind, c1=c1, c2=c2, horizontal=next(it) < 0.5, k_u=k_u, k_v=k_v,
        ph_u=next(it), ph_v=next(it), dot_r=U(0.3, 0.38),
        sleeve_len=U(0.3, 0.45), drop=U(0.02, 0.08), neck_d=U(0.08, 0.2), neck_w=U(0.1, 0.17),
    )
    return person, garment


# Drawing is vectorised numpy on broadcast coordinate vectors: a torch op costs ~3 us of
# dispatch on a CPU, a numpy op ~0.6 us, and a 32x24 sample needs ~100 of them (the
# randomness stays a seeded torch.Generator). Results go back to torch once, at the end.

@functools.lru_cache(maxsize=16)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates relative to the image: y (H, 1), x (1, W). Read-only."""
    y = ((np.arange(h, dtype=np.float32) + 0.5) / h).reshape(h, 1)
    x = ((np.arange(w, dtype=np.float32) + 0.5) / w).reshape(1, w)
    y.flags.writeable = x.flags.writeable = False
    return y, x


def _garment_fields(u: np.ndarray, v: np.ndarray, p: _Person, g: _Garment
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Shape and pattern of garment ``g`` fitted to body ``p`` at garment coordinates (u, v).

    Returns (garment, region, pattern): the garment's pixels (neckline cut out); the
    inpainting region (body without the neckline cut, plus the upper-arm columns down to any
    possible sleeve length, so that any garment fits inside a person's mask); and the
    pattern's second-colour pixels (None for solid).
    """
    av = np.abs(v - 0.5)
    in_box = (u >= 0) & (u <= 1) & (av <= 0.5)
    hb0 = p.bw / p.gw
    body = in_box & (av <= hb0 * (1.0 + (p.taper - 1.0) * u))
    sleeves = in_box & (u <= g.sleeve_len) & (u >= g.drop * (av - hb0) / (0.5 - hb0))
    neck = (u / g.neck_d) ** 2 + ((v - 0.5) / g.neck_w) ** 2 < 1
    garment = (body | sleeves) & ~neck
    region = body | (in_box & (u <= 0.5))
    return garment, region, _pattern(u, v, p, g)


def _pattern(u: np.ndarray, v: np.ndarray, p: _Person, g: _Garment) -> np.ndarray | None:
    if g.pattern == "solid":
        return None
    if g.pattern == "stripes":
        t = u * g.k_u + g.ph_u if g.horizontal else v * g.k_v + g.ph_v
        return np.floor(t) % 2 == 1
    if g.pattern == "checks":
        return (np.floor(u * g.k_u + g.ph_u) + np.floor(v * g.k_v + g.ph_v)) % 2 == 1
    # dots: a k_u x k_v lattice of round (in canonical pixels) dots of colour 2 on colour 1
    cell_u = p.gh * _CANON_H / g.k_u
    cell_v = p.gw * _CANON_W / g.k_v
    fu = ((u * g.k_u + g.ph_u) % 1.0 - 0.5) * cell_u
    fv = ((v * g.k_v + g.ph_v) % 1.0 - 0.5) * cell_v
    return fu ** 2 + fv ** 2 <= (g.dot_r * min(cell_u, cell_v)) ** 2


# Palette rows of the label maps below.
_L_BG, _L_TROUSERS, _L_SKIN, _L_HAIR, _L_WHITE, _L_C1, _L_C2 = range(7)


def _palette(p: _Person, g: _Garment) -> np.ndarray:
    """(3, 7) colours in [0, 1] indexed by the label constants."""
    return np.ascontiguousarray(
        np.array([p.bg, p.trousers, p.skin, p.hair, (1.0, 1.0, 1.0), g.c1, g.c2], dtype=np.float32).T)


def _colourise(p: _Person, g: _Garment, labels: np.ndarray) -> np.ndarray:
    """Label map (H, W) -> contiguous float32 image (3, H, W) in [-1, 1]."""
    return np.take(_palette(p, g) * 2 - 1, labels, axis=1)


def _person_uv(p: _Person, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Garment coordinates of the pixels of an (H, W) image of person ``p``."""
    y, x = _grid(h, w)
    return (y - p.ys) / p.gh, (x - (p.cx - p.gw / 2)) / p.gw


def _flat_frame(p: _Person) -> tuple[float, float, float, float]:
    """(top, left, height, width) of the garment box in the flat garment image, relative to
    the image size: the silhouette worn by its owner ``p``, uniformly scaled to fit 86 % of
    the image, centred."""
    k = 0.86 / max(p.gh, p.gw)
    fh, fw = k * p.gh, k * p.gw
    return 0.5 - fh / 2, 0.5 - fw / 2, fh, fw


def _flat_uv(p: _Person, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Garment coordinates of the flat garment image (so (u, v) matches the worn garment)."""
    y, x = _grid(h, w)
    top, left, fh, fw = _flat_frame(p)
    return (y - top) / fh, (x - left) / fw


def _garment_pos(u: np.ndarray, v: np.ndarray, worn: np.ndarray, owner: _Person) -> np.ndarray:
    """float32 (2, H, W): where garment point (u, v) of each worn pixel lies in the flat garment
    image of ``owner``'s garment, as (y, x) relative to the image size; 0 off the garment.
    The inverse of :func:`_flat_uv`: the worn pixel and that flat point show the same colour."""
    top, left, fh, fw = _flat_frame(owner)
    y = np.broadcast_to(top + u * fh, worn.shape)
    x = np.broadcast_to(left + v * fw, worn.shape)
    return np.where(worn, np.stack([y, x]), 0).astype(np.float32)


def _garment_labels(garment: np.ndarray, pat: np.ndarray | None, base: np.ndarray | int) -> np.ndarray:
    lab = _L_C1 if pat is None else pat + _L_C1
    return np.where(garment, lab, base)


def _person_labels(p: _Person, h: int, w: int, garment: np.ndarray, pat: np.ndarray | None
                   ) -> np.ndarray:
    """Label map (H, W) of person ``p`` wearing the garment whose fields are given."""
    y, x = _grid(h, w)
    dx = np.abs(x - p.cx)
    hem = p.ys + p.gh
    legs = ((y >= hem - 0.04) & (y <= p.feet) & (dx <= p.leg_gap + p.leg_w)
            & ((dx >= p.leg_gap) | (y <= hem + 0.07)))
    lab = np.where(legs, _L_TROUSERS, _L_BG)
    arms = (np.abs(dx - (p.bw + p.sw / 2)) <= 0.4 * p.sw) & (y >= p.ys + 0.01) & (y <= p.arm_end)
    neck = (dx <= 0.35 * p.bw) & (y >= p.head_cy) & (y <= p.ys + 0.2 * p.gh)
    e = ((y - p.head_cy) / p.head_ry) ** 2 + (dx / p.head_rx) ** 2
    lab = np.where(arms | neck | (e <= 1), _L_SKIN, lab)
    lab = np.where((e <= 1.12) & (y <= p.head_cy - 0.2 * p.head_ry), _L_HAIR, lab)
    return _garment_labels(garment, pat, lab)


def _dilate(m: np.ndarray) -> np.ndarray:
    """3x3 binary dilation (1 px, 8-neighbourhood), separable."""
    r = m.copy()
    r[1:] |= m[:-1]
    r[:-1] |= m[1:]
    c = r.copy()
    c[:, 1:] |= r[:, :-1]
    c[:, :-1] |= r[:, 1:]
    return c


def _bbox(m: np.ndarray) -> torch.Tensor:
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        raise RuntimeError("synthetic garment is empty: resolution too small?")
    return torch.tensor([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], dtype=torch.int64)


class SyntheticTryOn(torch.utils.data.Dataset):
    """The embedded synthetic try-on data set (see the module docstring).

    ``split`` selects one of three disjoint random streams; sample ``i`` only depends on
    (seed, split, i) and the constructor's arguments, never on access order.
    ``mode="unpaired"``: "garment" (with "garment_mask", "pattern", "colors") is the garment of
    index ``(i + max(1, n // 2)) % n`` (index ``i + 1`` when n = 1) and "person" is not the
    target; :meth:`tryon_target` renders the true target (the person wearing that garment).
    "mask" covers the body's garment region (neckline included) plus the upper arms down to the
    longest possible sleeve, dilated by 1 px: any garment fits inside any person's mask.
    """

    def __init__(self, num_samples: int = 2048, resolution: tuple[int, int] = (32, 24),
                 seed: int = 0, split: str = "train", mode: str = "paired",
                 patterns: tuple[str, ...] = PATTERNS,
                 pattern_probs: tuple[float, ...] | None = None) -> None:
        if int(num_samples) < 1:
            raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
        if len(resolution) != 2 or min(int(r) for r in resolution) < 8:
            raise ValueError(f"resolution: expected (H, W) with H, W >= 8, got {resolution}")
        if split not in _SPLITS:
            raise ValueError(f"split: expected one of {_SPLITS}, got {split!r}")
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
        patterns = tuple(patterns)
        bad = [k for k in patterns if k not in PATTERNS]
        if not patterns or bad or len(set(patterns)) != len(patterns):
            raise ValueError(f"patterns: expected distinct names from {PATTERNS}, got {patterns}")
        probs = [1.0] * len(patterns) if pattern_probs is None else [float(q) for q in pattern_probs]
        if len(probs) != len(patterns) or min(probs) < 0 or sum(probs) <= 0:
            raise ValueError(f"pattern_probs: expected {len(patterns)} nonnegative numbers with a "
                             f"positive sum, got {pattern_probs}")
        total, acc, cum = sum(probs), 0.0, []
        for q in probs:
            acc += q / total
            cum.append(acc)
        cum[-1] = 1.0
        self.num_samples = int(num_samples)
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.seed, self.split, self.mode = int(seed), split, mode
        self.patterns, self.pattern_probs = patterns, tuple(q / total for q in probs)
        self._cum = tuple(cum)

    def __len__(self) -> int:
        return self.num_samples

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        return i

    def garment_index(self, i: int) -> int:
        """Index whose garment sample ``i`` shows (``i`` itself in paired mode)."""
        i = self._index(i)
        if self.mode == "paired":
            return i
        n = self.num_samples
        return i + 1 if n == 1 else (i + max(1, n // 2)) % n

    def _params(self, i: int) -> tuple[_Person, _Garment]:
        return _sample_params(self.seed, self.split, i, self.patterns, self._cum)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._index(i)
        h, w = self.resolution
        person_p, own_g = self._params(i)
        j = self.garment_index(i)
        pu, pv = _person_uv(person_p, h, w)
        if j == i:
            # Paired: one garment, evaluated on both images at once (half the ops).
            owner_p, garment_g = person_p, own_g
            fu, fv = _flat_uv(owner_p, h, w)
            both, region2, pat2 = _garment_fields(np.stack([pu, fu]), np.stack([pv, fv]), person_p, own_g)
            worn, flat_mask, region = both[0], both[1], region2[0]
            pat_p, pat_f = (None, None) if pat2 is None else (pat2[0], pat2[1])
        else:
            owner_p, garment_g = self._params(j)
            worn, region, pat_p = _garment_fields(pu, pv, person_p, own_g)
            flat_mask, _, pat_f = _garment_fields(*_flat_uv(owner_p, h, w), owner_p, garment_g)
        person = _colourise(person_p, own_g, _person_labels(person_p, h, w, worn, pat_p))
        garment = _colourise(owner_p, garment_g, _garment_labels(flat_mask, pat_f, _L_WHITE))
        # 1-px dilation: the mask's edge must not trace the garment's outline exactly.
        mask = _dilate(region)[None].astype(np.float32)
        # The worn garment of the true result: "person" when paired, tryon_target(i) when not.
        target_worn = worn if j == i else _garment_fields(pu, pv, person_p, garment_g)[0]
        return {
            "person": torch.from_numpy(person),
            "garment": torch.from_numpy(garment),
            "garment_mask": torch.from_numpy(flat_mask[None].astype(np.float32)),
            "agnostic": torch.from_numpy(person * (1 - mask)),
            "mask": torch.from_numpy(mask),
            "box": _bbox(worn),
            "name": f"synthetic_{self.split}_{i:06d}",
            "pattern": garment_g.pattern,
            "colors": torch.tensor([garment_g.c1, garment_g.c2], dtype=torch.float32),
            "worn_mask": torch.from_numpy(target_worn[None].astype(np.float32)),
            "garment_pos": torch.from_numpy(_garment_pos(pu, pv, target_worn, owner_p)),
        }

    def tryon_target(self, i: int) -> torch.Tensor:
        """The true try-on result of sample ``i``: its person wearing its "garment" (fitted to
        the person's body), float32 (3, H, W) in [-1, 1]. Equals "person" in paired mode;
        equals "agnostic" outside "mask" in both modes. Only synthetic data has this."""
        i = self._index(i)
        h, w = self.resolution
        person_p, _ = self._params(i)
        _, garment_g = self._params(self.garment_index(i))
        worn, _, pat = _garment_fields(*_person_uv(person_p, h, w), person_p, garment_g)
        return torch.from_numpy(_colourise(person_p, garment_g, _person_labels(person_p, h, w, worn, pat)))
