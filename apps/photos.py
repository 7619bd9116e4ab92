"""Real photographs in, model-sized tensors out, and back again.

Try-on models run at one fixed resolution (32×24 for the embedded default, 512×384
for VITON-HD), while users bring photos of any size and format. Everything goes
through :func:`open_photo` (EXIF orientation applied, transparency composited on
white, greyscale and palette images made RGB) and a :class:`Letterbox`: scaled to
fit the model's (H, W) keeping the aspect ratio, then padded (grey for a person,
as the agnostic's masked region is grey; white for a garment, as product photos
are on white). The letterbox is recorded so the result can be cropped and scaled
back to the photo's own size, and :meth:`Letterbox.describe` is what gets printed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from common.images import from_uint8, to_pil

Size = tuple[int, int]  # (height, width), the project's convention

GREY = (128, 128, 128)  # 0 in [-1, 1], up to uint8 rounding: the agnostic's grey
WHITE = (255, 255, 255)
_ORIENTATION = 0x0112
_ROTATIONS = {3: "rotated 180°", 6: "rotated 90° clockwise", 8: "rotated 90° counter-clockwise",
              2: "mirrored", 4: "flipped", 5: "transposed", 7: "transversed"}


class PhotoError(ValueError):
    """A photo (or mask) that cannot be used as asked; the message says what to change."""


@dataclass
class Photo:
    """An opened photo, upright, as RGB (or L for masks), with where it came from."""

    image: Image.Image
    path: str
    format: str          # "JPEG", "PNG", ...
    mode: str            # the file's own mode before conversion ("RGBA", "L", "P", ...)
    orientation: int     # EXIF orientation tag (1 = upright, none given)

    @property
    def size(self) -> Size:
        return (self.image.height, self.image.width)

    def describe(self) -> str:
        h, w = self.size
        notes = [self.format or "?", self.mode, f"{h}x{w} (HxW)"]
        if self.orientation in _ROTATIONS:
            notes.append(f"EXIF orientation {self.orientation}: turned upright ({_ROTATIONS[self.orientation]})")
        if _has_alpha(self.mode):
            notes.append("transparency composited on white")
        return f"{Path(self.path).name} [{', '.join(notes)}]"


def _has_alpha(mode: str) -> bool:
    return mode in ("RGBA", "LA", "PA", "RGBa", "La")


def open_photo(path: str | Path, as_mask: bool = False) -> Photo:
    """Open any PIL-readable image upright. Photos become RGB (transparent pixels
    white, the garment-on-white convention); masks become L (transparent pixels 0,
    i.e. not repainted)."""
    p = Path(path)
    if not p.is_file():
        raise PhotoError(f"no such image file: {p}")
    try:
        with Image.open(p) as raw:
            raw.load()
            fmt, mode = raw.format or "", raw.mode
            orientation = int(raw.getexif().get(_ORIENTATION, 1))
            im = ImageOps.exif_transpose(raw)
    except (OSError, SyntaxError, ValueError) as err:  # PIL's "cannot identify image file" and friends
        raise PhotoError(f"cannot read {p} as an image: {err}") from err
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA" if mode == "P" else mode
    if _has_alpha(im.mode):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (0, 0, 0, 255) if as_mask else (*WHITE, 255))
        im = Image.alpha_composite(base, rgba)
    im = im.convert("L" if as_mask else "RGB")
    return Photo(im, str(p), fmt, mode, orientation)


@dataclass
class Letterbox:
    """Fit an image of ``original`` size into ``target`` keeping its aspect ratio:
    scale by ``scale`` to ``resized``, then pad (``top``, ``left`` offsets)."""

    original: Size
    target: Size
    scale: float
    resized: Size
    top: int
    left: int

    @classmethod
    def fit(cls, original: Size, target: Size) -> Letterbox:
        (h, w), (H, W) = original, target
        if min(h, w, H, W) < 1:
            raise PhotoError(f"cannot fit a {h}x{w} image into {H}x{W}")
        scale = min(H / h, W / w)
        # round, never beyond the target (h * scale <= H holds before rounding)
        rh, rw = min(H, max(1, round(h * scale))), min(W, max(1, round(w * scale)))
        return cls((h, w), (H, W), scale, (rh, rw), (H - rh) // 2, (W - rw) // 2)

    @property
    def padding(self) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) pixels of padding at the target size."""
        (H, W), (rh, rw) = self.target, self.resized
        return self.top, H - rh - self.top, self.left, W - rw - self.left

    def apply(self, image: Image.Image, fill: tuple[int, ...] | int) -> Image.Image:
        if (image.height, image.width) != self.original:
            raise PhotoError(f"image is {image.height}x{image.width}, the letterbox was fitted to "
                             f"{self.original[0]}x{self.original[1]}")
        # LANCZOS antialiases when shrinking a large photo to a 32x24 model
        small = image.resize((self.resized[1], self.resized[0]), Image.Resampling.LANCZOS)
        canvas = Image.new(image.mode, (self.target[1], self.target[0]), fill)
        canvas.paste(small, (self.left, self.top))
        return canvas

    def invert(self, image: Image.Image) -> Image.Image:
        """A target-sized image (e.g. the result) cropped to the content and scaled
        back to the original size."""
        if (image.height, image.width) != self.target:
            raise PhotoError(f"expected a {self.target[0]}x{self.target[1]} image, got {image.height}x{image.width}")
        crop = image.crop((self.left, self.top, self.left + self.resized[1], self.top + self.resized[0]))
        return crop.resize((self.original[1], self.original[0]), Image.Resampling.BICUBIC)

    def describe(self, fill_name: str) -> str:
        (h, w), (H, W), (rh, rw) = self.original, self.target, self.resized
        t, b, l, r = self.padding
        if (rh, rw) == (H, W):
            pad = "no padding"
        else:
            pad = f"padded with {fill_name} to {H}x{W} (top {t}, bottom {b}, left {l}, right {r})"
        return f"{h}x{w} -> scaled x{self.scale:.4g} to {rh}x{rw}, {pad}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["padding_tblr"] = list(self.padding)
        return d


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> float32 (3, H, W) in [-1, 1]; L (mask) -> (1, H, W) in {0, 1}."""
    a = np.asarray(image)
    if image.mode == "L":
        return torch.from_numpy((a >= 128).astype(np.float32))[None]
    return from_uint8(a)


@dataclass
class TryOnInputs:
    """What the model sees (at its resolution) plus what is needed to map back."""

    person: torch.Tensor          # (3, H, W) [-1, 1]: the person (or the agnostic when only that was given)
    agnostic: torch.Tensor        # (3, H, W) [-1, 1]: grey (0) inside the mask
    mask: torch.Tensor            # (1, H, W) {0, 1}: 1 = repaint
    garment: torch.Tensor         # (3, H, W) [-1, 1]
    person_box: Letterbox
    garment_box: Letterbox
    person_original: Image.Image  # upright RGB at the photo's size (the base for mapping back)
    mask_original: Image.Image    # L at the photo's size
    choices: dict[str, str]       # what was done to each input, for printing and summary.json


def load_inputs(size: Size, garment: str | Path, mask: str | Path, person: str | Path | None = None,
                agnostic: str | Path | None = None) -> TryOnInputs:
    """Load a try-on's photos at the model's ``size``: the person (or an agnostic
    image), the mask (white = repaint; same size as the person photo) and the garment."""
    if (person is None) == (agnostic is None):
        raise PhotoError("pass exactly one of --person or --agnostic")
    base = open_photo(person if person is not None else agnostic)
    m = open_photo(mask, as_mask=True)
    if m.size != base.size:
        raise PhotoError(f"the mask {m.describe()} must have the same size as the "
                         f"{'person' if person is not None else 'agnostic'} photo {base.describe()}")
    g = open_photo(garment)
    pbox, gbox = Letterbox.fit(base.size, size), Letterbox.fit(g.size, size)
    mask_t = to_tensor(pbox.apply(m.image, 0))
    # thresholding after the antialiased resize keeps cells at least half inside
    person_t = to_tensor(pbox.apply(base.image, GREY))
    if not mask_t.any():
        raise PhotoError(f"the mask {m.describe()} has no white pixel left at the model's size "
                         f"{size[0]}x{size[1]}: nothing would be repainted")
    agnostic_t = person_t * (1 - mask_t) if person is not None else person_t
    which = "person" if person is not None else "agnostic"
    choices = {
        which: f"{base.describe()}: {pbox.describe('grey')}",
        "mask": f"{m.describe()}: same letterbox, padding not repainted, thresholded at 50%",
        "garment": f"{g.describe()}: {gbox.describe('white')}",
    }
    return TryOnInputs(person_t, agnostic_t, mask_t, to_tensor(gbox.apply(g.image, WHITE)), pbox, gbox,
                       base.image, m.image, choices)


def result_to_original(result: torch.Tensor, inputs: TryOnInputs) -> Image.Image:
    """The result (3, H, W) at the photo's own size: scaled back, and outside the mask
    the photo's own pixels (the model's resolution only matters where it repainted)."""
    back = inputs.person_box.invert(to_pil(result))
    keep = inputs.mask_original.point(lambda v: 255 if v >= 128 else 0)
    return Image.composite(back, inputs.person_original, keep)
