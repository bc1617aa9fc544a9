"""Inpaint masks, the WebUI's way: white repaints, a blur softens the seam, and "only
masked" works on the mask's box grown by padding to the processing aspect ratio.

Masks are uint8 arrays (H, W), 0 = keep, 255 = repaint. Every function here is pure.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFilter

from sdbatch.images import ImageFileError

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 (x2, y2 exclusive)


def read_mask(path: Path) -> np.ndarray:
    """A mask file as the WebUI reads it: an RGBA image whose alpha is not uniform is
    painted by its alpha (opaque > 128 repaints); anything else by its brightness."""
    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGBA") if im.mode in ("RGBA", "LA", "PA", "P") else im.copy()
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageFileError(f"{path} is not a readable image ({e})") from e
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        return np.where(np.asarray(image)[..., 3] > 128, 255, 0).astype(np.uint8)
    return np.asarray(image.convert("L"), dtype=np.uint8).copy()


def kernel_size(blur: float) -> int:
    """The WebUI's Gaussian kernel width for a mask blur (sigma = blur px)."""
    return 2 * int(2.5 * blur + 0.5) + 1


def blur(mask: np.ndarray, blur_x: float, blur_y: float | None = None) -> np.ndarray:
    """Gaussian blur along x, then along y (sigma in pixels; 0 leaves that axis alone)."""
    blur_y = blur_x if blur_y is None else blur_y
    out = mask
    if blur_x > 0:
        out = cv2.GaussianBlur(out, (kernel_size(blur_x), 1), blur_x)
    if blur_y > 0:
        out = cv2.GaussianBlur(out, (1, kernel_size(blur_y)), blur_y)
    return out


def bbox(mask: np.ndarray) -> Box | None:
    """The smallest box holding every non-zero pixel; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def crop_box(mask: np.ndarray, padding: int, width: int, height: int) -> Box | None:
    """The "only masked" region: the mask's box plus ``padding``, clamped to the image, then
    grown on its short side to the processing aspect ``width:height`` (kept inside the
    image where it fits). None for an empty mask."""
    box = bbox(mask)
    if box is None:
        return None
    h, w = mask.shape
    x1, y1, x2, y2 = box
    if padding:
        x1, y1, x2, y2 = max(x1 - padding, 0), max(y1 - padding, 0), \
            min(x2 + padding, w), min(y2 + padding, h)
    return expand_to_aspect((x1, y1, x2, y2), width, height, w, h)


def expand_to_aspect(box: Box, width: int, height: int, image_w: int, image_h: int) -> Box:
    """Grow ``box`` along its short side to the aspect width:height, centred, shifted back
    inside the image when it overhangs an edge and clipped if the image is too small."""
    x1, y1, x2, y2 = box
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), image_h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), image_w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, extra: int, size: int) -> tuple[int, int]:
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi > size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def overlay_mask(blurred: np.ndarray, only_masked: bool) -> np.ndarray:
    """The mask the repaint is composited through. Whole picture: the blurred mask doubled
    (fully repainted from its middle out), as the WebUI; only masked: the blurred mask."""
    if only_masked:
        return blurred
    return np.clip(blurred.astype(np.float32) * 2, 0, 255).astype(np.uint8)


def latent_mask(mask: np.ndarray, latent_w: int, latent_h: int) -> np.ndarray:
    """The mask at latent size, rounded to 0 / 1 (float32, H x W): 1 = repaint."""
    small = Image.fromarray(mask).resize((latent_w, latent_h), Image.Resampling.BICUBIC)
    return np.around(np.asarray(small, dtype=np.float32) / 255.0)


def fill(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """Masked content "fill": the masked area painted with the colours around it, by
    compositing ever less blurred copies of the unmasked picture (the WebUI's recipe)."""
    keep = Image.fromarray(255 - mask)
    known = Image.new("RGBa", image.size)
    known.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = known.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")
