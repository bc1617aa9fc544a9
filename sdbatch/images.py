"""Pictures in and out of the stage graph, the WebUI's way: reading a user's image, the
resize modes, the hires target size, and compositing a repaint back over its original.

The geometry is kept in small pure functions (sizes and boxes in, sizes and boxes out) so
it is tested on its own; the PIL work around it only follows the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill", "latent_upscale")
BACKGROUND = (255, 255, 255)  # the WebUI flattens transparency onto white


class ImageFileError(ValueError):
    """An input image that cannot be read; the message names the file."""


def read_image(path: Path) -> Image.Image:
    """An RGB picture as the WebUI reads an upload: EXIF rotation applied; palette, CMYK,
    grey, 16-bit and alpha converted (transparency flattened onto white)."""
    try:
        with Image.open(path) as im:
            im.load()
            image = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageFileError(f"{path} is not a readable image ({e})") from e
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greys: scale to 8 bits instead of clipping at 255 as convert() does
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "F" and a.max() > 255 else max(float(a.max()), 1.0)
        if image.mode == "F":
            top = 1.0 if a.max() <= 1.0 else top
        image = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "RGBa", "PA"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        flat = Image.new("RGBA", image.size, BACKGROUND + (255,))
        flat.alpha_composite(image)
        image = flat
    return image.convert("RGB") if image.mode != "RGB" else image


@dataclass(frozen=True)
class Placement:
    """Where a resized source lands on the target canvas: scaled to (w, h), pasted at (x, y)."""

    w: int
    h: int
    x: int
    y: int


def placement(mode: str, src: tuple[int, int], dst: tuple[int, int]) -> Placement:
    """The WebUI's resize modes as geometry. ``just_resize`` stretches; ``crop_and_resize``
    covers the target keeping the aspect (the overhang is cropped, centred);
    ``resize_and_fill`` fits inside it (the bands are filled from the edges)."""
    (sw, sh), (w, h) = src, dst
    if mode in ("just_resize", "latent_upscale"):
        return Placement(w, h, 0, 0)
    ratio, src_ratio = w / h, sw / sh
    wide = ratio > src_ratio if mode == "crop_and_resize" else ratio < src_ratio
    pw, ph = (w, sh * w // sw) if wide else (sw * h // sh, h)
    return Placement(pw, ph, w // 2 - pw // 2, h // 2 - ph // 2)


def resize(image: Image.Image, mode: str, width: int, height: int) -> Image.Image:
    """``image`` brought to width x height by a resize mode (Lanczos, as the WebUI)."""
    p = placement(mode, image.size, (width, height))
    scaled = image.resize((p.w, p.h), Image.Resampling.LANCZOS)
    if (p.w, p.h) == (width, height):
        return scaled
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(scaled, (p.x, p.y))
    if mode == "resize_and_fill":
        if p.h < height:  # bands above and below: stretch the first and last rows
            top, bottom = p.y, height - p.y - p.h
            if top:
                canvas.paste(scaled.resize((width, top), box=(0, 0, width, 0)), (0, 0))
            if bottom:
                canvas.paste(scaled.resize((width, bottom), box=(0, p.h, width, p.h)),
                             (0, p.y + p.h))
        elif p.w < width:
            left, right = p.x, width - p.x - p.w
            if left:
                canvas.paste(scaled.resize((left, height), box=(0, 0, 0, height)), (0, 0))
            if right:
                canvas.paste(scaled.resize((right, height), box=(p.w, 0, p.w, height)),
                             (p.x + p.w, 0))
    return canvas


@dataclass(frozen=True)
class HiresSize:
    """The hires pass's size: the upscale target and the latent cells cropped off each axis
    (both resize sides given: cover the box, then centre-crop the overhang)."""

    width: int
    height: int
    truncate_x: int = 0  # in latent cells (8 px)
    truncate_y: int = 0
    cover: bool = False  # both resize sides given: the target covers them, then is cropped

    @property
    def final(self) -> tuple[int, int]:
        """The size the pass renders. A cover is cut in whole latent cells (1024x1433 has
        179 rows; 51 cropped leave 1024 px, not 1025; none cropped, 1432); any other
        target is taken as it is (refused by the plan when off the latent grid)."""
        if not self.cover:
            return self.width, self.height
        return 8 * (self.width // 8 - self.truncate_x), 8 * (self.height // 8 - self.truncate_y)


def hires_size(width: int, height: int, scale: float | None, resize_x: int = 0,
               resize_y: int = 0) -> HiresSize:
    """The WebUI's hires target (calculate_target_resolution): ``scale`` alone multiplies
    both sides; one of resize_x / resize_y keeps the aspect; both cover, then crop."""
    if not resize_x and not resize_y:
        return HiresSize(int(width * scale), int(height * scale))
    if not resize_y:
        return HiresSize(resize_x, resize_x * height // width)
    if not resize_x:
        return HiresSize(resize_y * width // height, resize_y)
    if width / height < resize_x / resize_y:
        w, h = resize_x, resize_x * height // width
    else:
        w, h = resize_y * width // height, resize_y
    return HiresSize(w, h, (w - resize_x) // 8, (h - resize_y) // 8, cover=True)


def composite(original: Image.Image, repainted: Image.Image, mask: np.ndarray) -> Image.Image:
    """``repainted`` where the mask is white, ``original`` where it is black, blended in
    between; where the mask is 0 the original's bytes are kept exactly."""
    a = mask.astype(np.float32)[..., None] / 255.0
    old = np.asarray(original.convert("RGB"), dtype=np.float32)
    new = np.asarray(repainted.convert("RGB"), dtype=np.float32)
    out = np.rint(new * a + old * (1.0 - a)).astype(np.uint8)
    keep = mask == 0
    out[keep] = np.asarray(original.convert("RGB"))[keep]
    return Image.fromarray(out, "RGB")
